"""The broker switch (molecule/switch, after the Redis end-to-end checks): bad input stops
before any change; Redis -> RabbitMQ and back under a signup load, with tasks scheduled by
countdown and a backlog on the old broker; then hybrid mode, in the same run as the single Redis
becomes a Sentinel group of three (into high availability); then each broker onto new Debian 13
hosts, as docs/upgrade-debian-13.md gives it (Redis: the group onto a single Redis 8.0; RabbitMQ:
onto a cluster of three on 4.0), and back to the single RabbitMQ node. Each switch is
playbooks/switch_broker.yml or site.yml, as an operator runs it. Every accepted signup must get
exactly one email (one copy), every published task must run exactly once (its id in one
"succeeded" line across the workers' journals), and the old broker must be empty after.
Figures go to artifacts/switch/results.json and .txt (README.md, "Switching brokers")."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml
from cbk_testlib import (
    MANAGE,
    SignupLoad,
    ansible_env,
    app_env_file,
    broker_entry,
    docker_host,
    host_variable,
    inventory_args,
    mail_tally,
    messages_waiting,
    overlapping_worker_restarts,
    redis_admin,
    redis_engine,
    role_defaults,
    scenario_setting,
    scenario_variables,
    settle_mail,
    wait_for_task_runs,
)
from conftest import BACKEND, FRONT

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
pytestmark = pytest.mark.skipif(SCENARIO != "switch", reason="the switch runs in molecule/switch only")

PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
INVENTORY = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
PROBE = f"cbk-{SCENARIO}-probe"
RESULTS = PROJECT / "artifacts" / "switch"
# The project's queues and its Celery command (the django_app and celery_worker roles).
QUEUES = scenario_setting("django_app", "django_app_queues")
CELERY = scenario_setting("celery_worker", "celery_worker__cli")
BACKLOG = 300  # analytics tasks published on the old broker right before the switch
COUNTDOWNS = (10, 30, 60, 90)  # seconds; several tasks each, held by the old broker's workers
SIGNUP_RATE = 1  # per second, for the whole switch (each one an email and an analytics task)
rows = []
# Published before a switch and run by it (the task scheduled beyond the drain timeout).
carried_over = []


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not rows:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [" | ".join(rows[0])] + [" | ".join(str(value) for value in row.values()) for row in rows]
    (RESULTS / "results.txt").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


def playbook(name, probe_address, *args, inventory=INVENTORY, interrupt_when=None):
    """ansible-playbook playbooks/<name> on the scenario's hosts; its output goes to
    artifacts/switch/<nn>-<the args>.log (default verbosity: no secret is printed).
    With interrupt_when, the run is interrupted once that function returns true, by SIGINT
    to its process group as Ctrl-C in a terminal sends it (under Mitogen its connection
    processes end with it), and run again to the end."""
    # The log shows where a switch spends its time.
    env = ansible_env(ANSIBLE_CALLBACKS_ENABLED="ansible.posix.profile_tasks")
    command = ["ansible-playbook", *inventory_args(inventory), "-e", f"e2e_probe_address={probe_address}", *args]
    command.append(str(PROJECT / "playbooks" / name))
    started = time.monotonic()
    output = ""
    if interrupt_when:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        while process.poll() is None and not interrupt_when():
            time.sleep(1)
        # Python can swallow a KeyboardInterrupt raised inside a cleanup function (a CI run's
        # ansible-playbook printed "Exception ignored in: <function _releaseLock>" and ran on to
        # the end): press Ctrl-C again every 20 s, for 120 s at most, until the run stops.
        for _ in range(6):
            with contextlib.suppress(ProcessLookupError):  # the run may have ended first
                os.killpg(process.pid, signal.SIGINT)
            try:
                output = process.communicate(timeout=20)[0] + "\n==== interrupted; run again ====\n"
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            # What still runs (the session's processes), to see why.
            ps = ["ps", "-o", "pid,stat,etime,args", "-g", str(process.pid)]
            tree = subprocess.run(ps, capture_output=True, text=True)
            os.killpg(process.pid, signal.SIGKILL)
            output = process.communicate()[0] + f"\n==== still running 120 s after Ctrl-C ====\n{tree.stdout}"
            raise AssertionError(output[-4000:]) from None
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=2400)
    result.seconds = time.monotonic() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    playbook.runs += 1
    log = "-".join(arg.split("=")[-1] for arg in args if not arg.startswith("-")).replace("/", "_")
    # Both runs' output: an interrupted run may have gone as far as the drain.
    result.log = output + result.stdout
    (RESULTS / f"{playbook.runs:02d}-{log}.log").write_text(result.log)
    return result


playbook.runs = 0


def env_file(host):
    """The app's settings on the host (django_app_env_file: the scenario puts them elsewhere than the
    role's default path). The workers' settings and a switch's copy of the old ones are beside them."""
    return app_env_file(host.backend.get_hostname())


def uses_broker(host, broker, address='[^"]*'):
    """Whether the broker URL in the host's app settings is broker's (redis or rabbitmq), at address
    when given: its URL scheme (playbooks/vars/brokers.yml), the TLS one exactly where the scenario
    gives that broker TLS (redis_tls_enabled, rabbitmq_tls_enabled). The URL holds a password: only
    grep's exit code is read."""
    tls = host_variable(BACKEND, f"{broker}_tls_enabled") is True
    url = f'^CELERY_BROKER_URL="{broker_entry(broker)["tls_scheme" if tls else "scheme"]}://[^"@]*@{address}:'
    return host.run("grep -q %s %s", url, env_file(host)).rc == 0


def hybrid_queues(host):
    """The queues hybrid mode puts on RabbitMQ, as the host's app settings name them (CELERY_HYBRID_QUEUES)."""
    line = host.check_output("grep ^CELERY_HYBRID_QUEUES= %s", env_file(host))
    return line.split("=", 1)[1].strip('"').split(",")


def fingerprint(backend, front):
    """What a refused switch must leave as it was: the app settings of both hosts and
    whether RabbitMQ is installed."""
    settings = "sha256sum %s %s/celery-worker-*.env"  # the directory is quoted, the pattern is not
    return (
        front.check_output(settings, env_file(front), os.path.dirname(env_file(front))),
        backend.check_output(settings, env_file(backend), os.path.dirname(env_file(backend))),
        backend.run("dpkg-query -W -f '${Status}' rabbitmq-server").stdout,
    )


def publish(host, tag, count, countdowns=(None,)):
    """Publishes count track_event tasks per countdown (seconds, None for none) from the host
    with its current settings, in one Django shell (each costs seconds to start); the task id
    is the event id. Returns the ids."""
    batches = [(countdown, [str(uuid.uuid4()) for _ in range(count)]) for countdown in countdowns]
    host.check_output(
        "%s shell -c %s",
        MANAGE,
        "from analytics.tasks import track_event\n"
        f"for countdown, ids in {batches!r}:\n"
        "    for event_id in ids:\n"
        f"        track_event.apply_async((event_id, {tag!r}), task_id=event_id, countdown=countdown)\n",
    )
    return [event_id for _, ids in batches for event_id in ids]


def drain_figures(switch):
    """From the drain's report in the run's output: (waiting, held) when it began, and its seconds."""
    began = re.search(r"old broker: (\d+) waiting, (\d+) held by workers", switch.log)
    took = re.search(r"drained after (\d+) s", switch.log)
    return (tuple(map(int, began.groups())) if began else None), (int(took[1]) if took else None)


def result_row(name, switch, signups, tally, runs, left):
    """A row of the results: the run, its signups and their emails (mail_tally's), how often each
    of its tasks ran ({id: runs}), what it left on the old broker, and the drain's figures."""
    lost, twice, resent, emails = tally
    began, seconds = drain_figures(switch)
    return {
        "switch": name,
        "seconds": round(switch.seconds),
        "signups accepted": len(signups["accepted"]),
        "refused": len(signups["refused"]),
        "emails": emails,
        "emails lost": len(lost),
        "emails twice": len(twice) + resent,
        "tasks sent": len(runs),
        "tasks run once": sum(1 for n in runs.values() if n == 1),
        "tasks lost": sum(1 for n in runs.values() if n == 0),
        "tasks run twice": sum(1 for n in runs.values() if n > 1),
        "left on old broker": left,
        "drain began with (waiting, held)": began,
        "drain seconds": seconds,
    }


def switch_with_backlog(backend, front, site, probe_address, tag, name, *args, inventory=INVENTORY, before=None):
    """Stops the default workers (analytics, celery) on both hosts and publishes a backlog of BACKLOG
    analytics tasks from the web host, which waits on its broker until the run's workers tier starts
    them again; then runs playbooks/<name> under the signup load (tag). Returns the epoch second it
    began, the backlog, what before() returned just ahead of the run, the run, its signups and the
    queues its switch check reported moving. Fails when the run fails."""
    since = time.time() - 1
    for host in (backend, front):
        host.check_output("systemctl stop celery-worker@default")
    backlog = publish(front, f"{tag}-backlog", BACKLOG)
    waiting = before() if before else None
    load = SignupLoad(PROBE, site, tag.replace("-", ""), rate=SIGNUP_RATE)
    switch = playbook(name, probe_address, *args, inventory=inventory)
    during = load.result()
    assert switch.returncode == 0, switch.stdout[-4000:]
    moved = re.search(r"queues that move: ([\w, ]+)", switch.log)[1].split(", ")
    return since, backlog, waiting, switch, during, moved


def left_on(backend, broker):
    """Messages the broker still holds for the app's queues: waiting plus unacknowledged.
    A stopped RabbitMQ (celery_broker_retire=stop) is started to count and stopped again."""
    if broker == "redis":
        unacked = int(redis_admin(backend, "HLEN", "unacked"))
        return sum(messages_waiting(backend, broker, queue) for queue in QUEUES) + unacked
    service = broker_entry("rabbitmq")["service"]
    stopped = not backend.service(service).is_running
    backend.check_output("systemctl start %s", service)
    try:
        return sum(messages_waiting(backend, broker, queue) for queue in QUEUES)
    finally:
        if stopped:
            backend.check_output("systemctl stop %s", service)


def cluster_queues(front, *columns):
    """The app vhost's queues on the new RabbitMQ cluster (debian13 and the two hosts the test adds):
    {name: {column: value}}. Each node lists the queues it leads (--local): the cluster-wide listing
    timed out there (4.0.5: "Some queue(s) are unresponsive" while list_unresponsive_queues named none)."""
    vhost = scenario_setting("rabbitmq", "rabbitmq_app_vhost")
    command = "rabbitmqctl -q list_queues --local -p %s name " + " ".join(columns) + " --formatter json"
    nodes = [front] + [docker_host(name) for name in scenario_variables()["e2e_rabbitmq_cluster_names"]]
    listed = [queue for node in nodes for queue in json.loads(node.check_output(command, vhost) or "[]")]
    return {queue.pop("name"): queue for queue in listed}


def test_bad_input_stops_before_any_change(backend, front, probe_address, tmp_path):
    before = fingerprint(backend, front)

    # The new broker's group is empty.
    inventory = tmp_path / "inventory"
    shutil.copytree(INVENTORY, inventory)
    hosts_file = inventory / "hosts"  # Molecule writes the groups there
    hosts = yaml.safe_load(hosts_file.read_text())
    hosts["all"]["children"]["rabbitmq"]["hosts"] = {}
    hosts_file.write_text(yaml.safe_dump(hosts))
    result = playbook("switch_broker.yml", probe_address, "-e", "celery_broker=rabbitmq", inventory=inventory)
    assert result.returncode != 0
    assert "inventory group 'rabbitmq' has no hosts" in result.stdout, result.stdout[-2000:]

    # AMQP over TLS only on a RabbitMQ cluster, which the app reaches over amqp://. Host
    # variables: the scenario's group_vars/all would win over the inventory file's group vars.
    tls_only = {"rabbitmq_tls_enabled": True, "rabbitmq_tls_only": True}
    hosts["all"]["children"]["rabbitmq"] = {"hosts": {f"mq{node}.invalid": tls_only for node in (1, 2, 3)}}
    hosts_file.write_text(yaml.safe_dump(hosts))
    result = playbook("switch_broker.yml", probe_address, "-e", "celery_broker=rabbitmq", inventory=inventory)
    assert result.returncode != 0
    assert "rabbitmq_tls_only is true on a RabbitMQ cluster of 3 hosts" in result.stdout, result.stdout[-2000:]

    # PostgreSQL has no room for every connection the app may hold (gunicorn workers, worker
    # threads and processes, a switch's drain workers): refused, naming the variable.
    max_connections = 20
    result = playbook(
        "switch_broker.yml",
        probe_address,
        "-e",
        "celery_broker=rabbitmq",
        "-e",
        f"postgresql_max_connections={max_connections}",
    )
    assert result.returncode != 0
    reserved = role_defaults("postgresql", "vars")["postgresql__superuser_reserved_connections"]
    refusal = f"postgresql_max_connections leaves it {max_connections - reserved} (the rest are the superuser's)"
    assert refusal in " ".join(result.stdout.split()), result.stdout[-2000:]

    # The workers' settings are not where django_app_env_file says (the app is installed): the
    # check stops, naming the variable, rather than find no broker to compare and report no switch.
    moved = os.path.join(os.path.dirname(env_file(front)), "moved.env")
    result = playbook(
        "switch_broker.yml", probe_address, "-e", "celery_broker=rabbitmq", "-e", f"django_app_env_file={moved}"
    )
    assert result.returncode != 0
    assert f"django_app_env_file is {moved}, but" in " ".join(result.stdout.split()), result.stdout[-2000:]

    # Publishes that wait for a replica, where the broker has none (no Redis Sentinel group).
    result = playbook(
        "switch_broker.yml", probe_address, "-e", "celery_broker=rabbitmq", "-e", "django_app_redis_wait_replicas=1"
    )
    assert result.returncode != 0
    refusal = "django_app_redis_wait_replicas is 1: a publish can wait only for the replicas of a Redis Sentinel group"
    assert refusal in " ".join(result.stdout.split()), result.stdout[-2000:]

    # A task scheduled beyond the drain timeout of the refusal below (30 s), well within that
    # of the switch after it (600 s), which must still run it once; held by a worker that then
    # dies: Redis keeps the message in its `unacked` hash, where only visibility_timeout (1 h)
    # would bring it back: an orphan.
    late = publish(front, "switch-late", 1, countdowns=(300,))
    carried_over.extend(late)
    deadline = time.monotonic() + 120
    while late[0] not in front.check_output(f"{CELERY} inspect scheduled --timeout=5 || true"):
        assert time.monotonic() < deadline, "no worker reserved the scheduled task within 120 s"
        time.sleep(2)
    reserved = time.monotonic()
    for host in (backend, front):
        host.check_output("systemctl kill --signal=SIGKILL celery-worker@default")  # systemd restarts it

    # The old broker does not answer.
    backend.check_output("systemctl stop %s", redis_engine()["server"])
    try:
        result = playbook("switch_broker.yml", probe_address, "-e", "celery_broker=rabbitmq")
    finally:
        backend.check_output("systemctl start %s", redis_engine()["server"])
    assert result.returncode != 0
    assert "does not answer" in result.stdout and "Nothing was changed" in result.stdout, result.stdout[-2000:]

    # --check counts what waits (at the app's default priority, one of Redis' priority lists)
    # and lists the orphan (one delivered 30 s ago or more) by its ETA; a switch refuses.
    for host in (backend, front):
        host.check_output("systemctl stop celery-worker@default")
    try:
        queued = publish(front, "switch-waiting", 5)
        queued_at = time.time() - 1
        time.sleep(max(0, reserved + 35 - time.monotonic()))
        report = playbook("switch_broker.yml", probe_address, "--check", "-e", "celery_broker=rabbitmq")
    finally:
        for host in (backend, front):
            host.check_output("systemctl start celery-worker@default")
    assert report.returncode == 0, report.stdout[-3000:]
    assert "Broker switch to celery_broker=rabbitmq" in report.stdout and late[0] in report.stdout
    waiting = re.search(r"analytics'+:\s+(\d+)", report.stdout)
    assert waiting and int(waiting[1]) >= 5, report.stdout[-3000:]
    orphaned = re.search(r"orphaned\s+in\s+Redis.*?:\s+(\d+)", report.stdout, re.S)
    assert orphaned and int(orphaned[1]) >= 1, report.stdout[-3000:]
    assert set(wait_for_task_runs((backend, front), queued, queued_at).values()) == {1}
    result = playbook(
        "switch_broker.yml", probe_address, "-e", "celery_broker=rabbitmq", "-e", "celery_broker_drain_timeout=30"
    )
    assert result.returncode != 0
    assert "later than celery_broker_drain_timeout" in result.stdout and late[0] in result.stdout, result.stdout[-2000:]

    assert fingerprint(backend, front) == before, "a refused switch changed the hosts"
    assert uses_broker(front, "redis"), "the app left Redis"


def test_a_new_broker_that_fails_to_deploy_stops_the_switch_before_the_workers_move(backend, front, probe_address):
    """The new broker fails on its host (a release the package mirror does not have): the run stops
    in the broker tier, and the workers on the other host, and the web, stay on the old broker."""
    before = fingerprint(backend, front)
    missing = "rabbitmq_version=0.0.1"
    result = playbook("switch_broker.yml", probe_address, "-e", "celery_broker=rabbitmq", "-e", missing)
    assert result.returncode != 0
    assert "rabbitmq-server=0.0.1-*" in result.stdout, result.stdout[-3000:]
    assert "PLAY [Workers tier]" not in result.stdout, result.stdout[-3000:]
    assert fingerprint(backend, front) == before, "a switch whose new broker failed moved the app"
    for host in (backend, front):
        assert uses_broker(host, "redis"), "the app left Redis"


@pytest.mark.parametrize(
    "old, new, retire, interrupted",
    [("redis", "rabbitmq", "keep", True), ("rabbitmq", "redis", "stop", False)],
    ids=["redis-to-rabbitmq-interrupted", "rabbitmq-to-redis"],
)
def test_switch_under_load(backend, front, site, probe_address, old, new, retire, interrupted):
    """The first switch is interrupted (Ctrl-C) once its drain workers run, before the workers
    and the web move, and run again, which must finish it."""
    hosts = (backend, front)
    since = time.time() - 1
    assert uses_broker(front, old), f"the app does not use {old} before the switch"
    # On the old broker, just before the switch: a backlog (the default workers stopped for
    # it) and tasks scheduled by countdown, which its workers hold until they are due.
    for host in hosts:
        host.check_output("systemctl stop celery-worker@default")
    backlog = publish(front, f"switch-{new}-backlog", BACKLOG)
    for host in hosts:
        host.check_output("systemctl start celery-worker@default")
    scheduled = publish(front, f"switch-{new}-eta", 5, COUNTDOWNS)
    load = SignupLoad(PROBE, site, f"switch{new}", rate=SIGNUP_RATE)
    # After the backlog's restarts of celery-worker@default above, which the test made.
    switched_at = time.time() - 1
    switch = playbook(
        "switch_broker.yml",
        probe_address,
        "-e",
        f"celery_broker={new}",
        "-e",
        f"celery_broker_retire={retire}",
        interrupt_when=(lambda: backend.service("celery-worker@drain-main").is_running) if interrupted else None,
    )
    signups = load.result()
    assert switch.returncode == 0, switch.stdout[-4000:]
    # Published after the switch, from the new settings.
    after = publish(front, f"switch-{new}-after", 20)

    messages = settle_mail(backend, signups, 240)
    lost, twice, resent, emails = mail_tally(signups, messages)
    # The task the bad-input step orphaned (its worker was killed): the drain put it back.
    put_back = re.findall(r"put\s+back\s+in\s+\w+:\s+\S+\[([0-9a-f-]+)\]", switch.log)
    unrestored = [task for task in carried_over if task not in put_back]
    tasks = backlog + scheduled + after + carried_over
    carried_over.clear()
    counts = wait_for_task_runs(hosts, tasks, since)
    never = [task for task, n in counts.items() if n == 0]
    again = [task for task, n in counts.items() if n > 1]
    recorded = int(
        front.check_output(
            "%s shell -c %s",
            MANAGE,
            f"from analytics.models import Event\nprint(Event.objects.filter(id__in={tasks!r}).count())",
        ).split()[-1]
    )
    left = left_on(backend, old)
    # A rolling release (playbooks/vars/release.yml): one host's workers restart at a time.
    windows, overlapping = overlapping_worker_restarts(backend, front, switched_at)
    name = f"{old} -> {new} (old broker: {retire}{', interrupted, run again' if interrupted else ''})"
    row = result_row(name, switch, signups, (lost, twice, resent, emails), counts, left)
    rows.append({**row, "worker restarts overlapping across hosts": len(overlapping)})
    assert not signups["refused"], f"the web tier refused signups during the switch: {signups['refused'][:5]}"
    assert all(windows.values()) and not overlapping, f"worker restarts (stopping, started) per host: {windows}"
    assert not lost and not twice and not resent, f"emails lost {lost[:3]}, twice {twice[:3]}, resent {resent}"
    assert not never and not again, f"tasks never run: {never[:5]}; run more than once: {again[:5]}"
    assert not unrestored, f"the drain did not put these orphans back in their queue: {unrestored}"
    assert recorded == len(tasks), f"{len(tasks) - recorded} events missing in the database"
    assert left == 0, f"{left} messages left on the old broker ({old})"
    for host in hosts:
        assert uses_broker(host, new), f"the app does not use {new} after the switch"
        assert host.run("ls /etc/systemd/system/ | grep -q 'celery-worker@drain-'").rc != 0, "drain workers left"
        beside = os.path.dirname(env_file(host))
        drain_settings = host.check_output("find %s -maxdepth 1 -name 'celery-drain*.env'", beside)
        assert not drain_settings, f"drain settings left: {drain_settings}"
    # The redis group's unit depends on redis_engine (brokers.yml's names_from).
    old_unit = redis_engine()["server"] if old == "redis" else broker_entry(old)["service"]
    assert backend.service(old_unit).is_running == (retire == "keep"), f"celery_broker_retire={retire}"


def start_host(name, platform):
    """Starts a systemd container on the scenario network with the settings of the platforms'
    entry (.config/molecule/config.yml, 0 Debian 12, 1 Debian 13), as a host the kit can deploy to
    over the docker connection; cleanup.yml removes it. An earlier verify's container (molecule
    verify run again) is started as it is."""
    platform = yaml.safe_load((PROJECT / ".config" / "molecule" / "config.yml").read_text())["platforms"][platform]
    command = ["docker", "run", "--detach", "--name", name, "--hostname", name, "--network", f"cbk-{SCENARIO}"]
    command += [f"--cap-add={capability}" for capability in platform["capabilities"]]
    command += [f"--security-opt={option}" for option in platform["security_opts"]]
    command += [f"--tmpfs={path}" for path in platform["tmpfs"]]
    command += [f"--volume={volume}" for volume in platform["volumes"]]
    if subprocess.run(["docker", "container", "inspect", name], capture_output=True).returncode == 0:
        command = ["docker", "start", name]
    else:
        command += [platform["image"], platform["command"]]
    subprocess.run(command, check=True, capture_output=True)
    # "degraded" (a unit the container cannot run) exits non-zero too: booted is what counts.
    subprocess.run(["docker", "exec", name, "systemctl", "is-system-running", "--wait"], capture_output=True)


def inventory_with(tmp_path_factory, base, name, groups):
    """A copy of the inventory directory base with one more file, name.yml, that adds hosts and
    variables to groups ({group: {"hosts": ..., "vars": ...}})."""
    inventory = tmp_path_factory.mktemp(name) / "inventory"
    shutil.copytree(base, inventory)
    (inventory / f"{name}.yml").write_text(yaml.safe_dump({"all": {"children": groups}}))
    return inventory


def debian13_redis_name():
    """The Debian 13 host Redis moves onto (redis_debian13_inventory), the RabbitMQ cluster's second node after."""
    return scenario_variables()["e2e_rabbitmq_cluster_names"][0]


def without_molecule_hosts(inventory, group):
    """The inventory copy with group emptied in Molecule's hosts file (where debian12 is the
    rabbitmq and redis groups): the group's hosts are then those of the copy's other files."""
    hosts_file = inventory / "hosts"
    hosts = yaml.safe_load(hosts_file.read_text())
    hosts["all"]["children"][group]["hosts"] = {}
    hosts_file.write_text(yaml.safe_dump(hosts))
    return inventory


@pytest.fixture(scope="module")
def sentinel_inventory(tmp_path_factory):
    """An inventory copy whose redis group is a Sentinel group of three: debian12 (the single Redis
    until then, first in the group: the initial primary), debian13, and a third host started here.
    debian13 runs Redis 8.0 beside the others' 7.0: a replica of a newer release reads its primary's data."""
    third = scenario_variables()["e2e_third_redis_name"]
    start_host(third, 0)
    redis_group = {"hosts": {FRONT: {}, third: {"ansible_connection": "docker"}}, "vars": {"redis_sentinel": True}}
    return inventory_with(tmp_path_factory, INVENTORY, "sentinel", {"redis": redis_group})


@pytest.fixture(scope="module")
def redis_debian13_inventory(tmp_path_factory, sentinel_inventory):
    """A copy of sentinel_inventory whose redis group is a Debian 13 host started here alone (Redis
    8.0, no Sentinel): out of Molecule's hosts file (debian12) and out of the Sentinel group's file."""
    new_redis = debian13_redis_name()
    start_host(new_redis, 1)
    redis_group = {"redis": {"hosts": {new_redis: {"ansible_connection": "docker"}}}}
    inventory = inventory_with(tmp_path_factory, sentinel_inventory, "debian13-redis", redis_group)
    (inventory / "sentinel.yml").unlink()  # sentinel_inventory's file
    return without_molecule_hosts(inventory, "redis")


@pytest.fixture(scope="module")
def cluster_inventories(tmp_path_factory, redis_debian13_inventory):
    """Two copies of redis_debian13_inventory whose rabbitmq group also has debian13 and two Debian 13
    hosts (the first of them the new Redis), each with the management UI on its own address: with
    debian12 (the single RabbitMQ until then, Debian 12's 3.10.8) as its first node, grown in place;
    and without it, a new cluster of three on Debian 13's 4.0.5 (blue-green)."""
    names = scenario_variables()["e2e_rabbitmq_cluster_names"]
    for name in names:
        start_host(name, 1)
    own_address = {"rabbitmq_management_bind": "{{ ansible_facts['default_ipv4']['address'] }}"}
    new_hosts = {FRONT: own_address, **{name: {"ansible_connection": "docker", **own_address} for name in names}}
    in_place, blue_green = (
        inventory_with(tmp_path_factory, redis_debian13_inventory, name, {"rabbitmq": {"hosts": new_hosts}})
        for name in ("in-place", "blue-green")
    )
    return in_place, without_molecule_hosts(blue_green, "rabbitmq")


def test_hybrid_mode_with_redis_into_high_availability(backend, front, site, probe_address, sentinel_inventory):
    """celery_broker: hybrid puts email and priority on RabbitMQ and the other queues on
    Redis; each worker instance consumes one broker. The same run turns the single Redis into a
    Sentinel group of three (redis_sentinel): its queues keep their data, so they do not move
    (no drain; the workers and the web only restart on the sentinel:// URLs), while email and
    priority are drained to RabbitMQ. Under a signup load, with a backlog on Redis through the
    primary's restart: the workers of its queue stay stopped until the run's workers tier starts them."""
    hosts = (backend, front)
    # site.yml, not switch_broker.yml: the new host needs every tier (base: its certificate).
    since, backlog, waiting_before, switch, during, moved = switch_with_backlog(
        backend,
        front,
        site,
        probe_address,
        "hybrid-ha",
        "../site.yml",
        "-e",
        "celery_broker=hybrid",
        inventory=sentinel_inventory,
        before=lambda: messages_waiting(backend, "redis", "analytics"),
    )
    # The single Redis is the group's primary, with both replicas; the app asks the Sentinels.
    replication = redis_admin(backend, "INFO", "replication")
    sentinel_url = f'^CELERY_BROKER_URL="{broker_entry("redis")["sentinel_scheme"]}://'
    sentinel_urls = {env_file(host): host.run("grep -q %s %s", sentinel_url, env_file(host)).rc for host in hosts}
    mail = settle_mail(backend, during, 240)
    during_tally = mail_tally(during, mail)
    during_lost, during_twice, during_resent, _ = during_tally
    backlog_runs = wait_for_task_runs(hosts, backlog, since)

    # Where tasks wait while their workers are stopped: email on RabbitMQ, analytics on Redis.
    for host in hosts:
        host.check_output("systemctl stop celery-worker@email celery-worker@default")
    try:
        signups = SignupLoad(PROBE, site, "hybrid", count=20, rate=5).result()
        events = publish(front, "hybrid", 20)
        time.sleep(2)
        placement = {
            "email on RabbitMQ": messages_waiting(backend, "rabbitmq", "email"),
            "email on Redis": messages_waiting(backend, "redis", "email"),
            "analytics on Redis": messages_waiting(backend, "redis", "analytics"),
            "analytics on RabbitMQ": messages_waiting(backend, "rabbitmq", "analytics"),
        }
    finally:
        for host in hosts:
            host.check_output("systemctl start celery-worker@email celery-worker@default")
    messages = settle_mail(backend, signups, 240)
    lost, twice, resent, _ = mail_tally(signups, messages)
    counts = wait_for_task_runs(hosts, events, since)

    # Which queues the workers of each app consume, asked through that app's broker.
    main_app = scenario_setting("django_app", "django_app_celery_app")
    hybrid_app = scenario_setting("django_app", "django_app_celery_hybrid_app")
    consumers = {}
    for module in (main_app, hybrid_app):
        out = backend.check_output("CELERY_APP_MODULE=%s %s inspect active_queues --json --timeout=5", module, CELERY)
        consumers[module] = sorted({q["name"] for queues in json.loads(out).values() for q in queues})
    name = "redis -> hybrid, Redis single -> Sentinel group of 3"
    rows.append(result_row(name, switch, during, during_tally, backlog_runs, json.dumps(placement)))
    assert waiting_before >= BACKLOG, f"{waiting_before} analytics tasks waiting on Redis before the run"
    assert sorted(moved) == consumers[hybrid_app], f"queues drained: {moved}"
    assert "role:master" in replication and "connected_slaves:2" in replication, replication
    assert not any(sentinel_urls.values()), f"settings without sentinel:// URLs (grep's exit code): {sentinel_urls}"
    assert not during["refused"], f"the web tier refused signups during the switch: {during['refused'][:5]}"
    assert not during_lost and not during_twice and not during_resent
    assert all(n == 1 for n in backlog_runs.values()), {task: n for task, n in backlog_runs.items() if n != 1}
    accepted = len(signups["accepted"])
    assert placement == {
        "email on RabbitMQ": accepted,
        "email on Redis": 0,
        "analytics on Redis": len(events) + accepted,  # each signup also records a "signup" event
        "analytics on RabbitMQ": 0,
    }
    assert consumers == {main_app: ["analytics", "celery"], hybrid_app: ["email", "priority"]}
    assert not lost and not twice and not resent
    assert all(n == 1 for n in counts.values()), counts


def test_redis_onto_debian_13_out_of_high_availability(backend, front, site, probe_address, redis_debian13_inventory):
    """Redis onto Debian 13 as docs/upgrade-debian-13.md gives it, in hybrid mode: the redis group
    becomes a single Redis 8.0 on a new Debian 13 host instead of the Sentinel group of 7.0 (whose
    replicas could not follow an 8.0 primary). A switch between two Redis URLs on different hosts:
    the queues on Redis are drained out of the Sentinel group, email and priority stay on RabbitMQ.
    Under the signup load, with a backlog on the group (the workers of its queue stopped until the
    run's workers tier starts them). The old group keeps running, out of the inventory."""
    hosts = (backend, front)
    new_redis = docker_host(debian13_redis_name())
    on_redis = sorted(set(QUEUES) - set(hybrid_queues(front)))
    since, backlog, waiting_before, switch, during, moved = switch_with_backlog(
        backend,
        front,
        site,
        probe_address,
        "redis13",
        "../site.yml",
        "-e",
        "celery_broker=hybrid",
        inventory=redis_debian13_inventory,
        before=lambda: messages_waiting(backend, "redis", "analytics"),
    )
    tally = mail_tally(during, settle_mail(backend, during, 240))
    backlog_runs = wait_for_task_runs(hosts, backlog, since)
    server = redis_admin(new_redis, "INFO", "server")
    new_address = new_redis.check_output("hostname -I").split()[0]
    settings = {host.backend.get_hostname(): uses_broker(host, "redis", new_address) for host in hosts}
    left = left_on(backend, "redis")
    name = "hybrid: Redis, the Sentinel group of 7.0 -> a single Redis 8.0 on a new Debian 13 host"
    rows.append(result_row(name, switch, during, tally, backlog_runs, left))
    assert waiting_before >= BACKLOG, f"{waiting_before} analytics tasks waiting on Redis before the run"
    assert sorted(moved) == on_redis, f"queues drained: {moved}"
    assert "redis_version:8." in server, server
    assert all(settings.values()), f"hosts whose settings name the new Redis: {settings}"
    assert not during["refused"], f"the web tier refused signups during the switch: {during['refused'][:5]}"
    lost, twice, resent, _ = tally
    assert not lost and not twice and not resent, f"emails lost {lost[:3]}, twice {twice[:3]}, resent {resent}"
    assert all(n == 1 for n in backlog_runs.values()), {task: n for task, n in backlog_runs.items() if n != 1}
    assert left == 0, f"{left} messages left on the Sentinel group"


def test_hybrid_into_a_new_rabbitmq_cluster(backend, front, site, probe_address, cluster_inventories):
    """From hybrid mode (the Debian 13 Redis above, and the single RabbitMQ of debian12, Debian 12's
    3.10.8) to celery_broker: rabbitmq on a new cluster of three Debian 13 hosts (4.0.5, quorum
    queues), as docs/upgrade-debian-13.md gives it: every queue is drained, out of Redis and out of
    the single node's classic queues. Under the signup load, with backlogs on both old brokers (their
    workers stopped until the run's workers tier starts them). Growing the single node into the
    cluster in place is refused first, before any host changes: its classic queues cannot become
    quorum queues."""
    in_place, blue_green = cluster_inventories
    hosts = (backend, front)
    old_redis = docker_host(debian13_redis_name())
    before = fingerprint(backend, front)
    refused = playbook("../site.yml", probe_address, "-e", "celery_broker=rabbitmq", inventory=in_place)
    assert refused.returncode != 0
    refusal = f"rabbitmq_app_vhost '{scenario_setting('rabbitmq', 'rabbitmq_app_vhost')}' on {BACKEND} holds durable"
    assert refusal in " ".join(refused.stdout.split()), refused.stdout[-3000:]
    assert "PLAY [Base tier]" not in refused.stdout, refused.stdout[-3000:]
    assert fingerprint(backend, front) == before, "a refused switch changed the hosts"

    since = time.time() - 1
    for host in hosts:
        host.check_output("systemctl stop celery-worker@default celery-worker@email")
    backlog = publish(front, "cluster-backlog", BACKLOG)
    queued = SignupLoad(PROBE, site, "clusterqueued", count=20, rate=5).result()
    waiting_before = {
        "analytics on Redis": messages_waiting(old_redis, "redis", "analytics"),
        "email on RabbitMQ": messages_waiting(backend, "rabbitmq", "email"),
    }
    load = SignupLoad(PROBE, site, "cluster", rate=SIGNUP_RATE)
    switch = playbook("../site.yml", probe_address, "-e", "celery_broker=rabbitmq", inventory=blue_green)
    during = load.result()
    assert switch.returncode == 0, switch.stdout[-4000:]
    moved = re.search(r"queues that move: ([\w, ]+)", switch.log)[1].split(", ")
    mail = settle_mail(backend, during, 240)
    during_tally = mail_tally(during, mail)
    queued_tally = mail_tally(queued, settle_mail(backend, queued, 120))
    backlog_runs = wait_for_task_runs(hosts, backlog, since)
    cluster = json.loads(front.check_output("rabbitmqctl -q cluster_status --formatter json"))
    listed = cluster_queues(front, "type", "members")
    app_queues = {name: (queue["type"], len(queue["members"] or [])) for name, queue in listed.items()}
    left = left_on(old_redis, "redis") + left_on(backend, "rabbitmq")

    name = "hybrid (Redis 8.0 on Debian 13, single RabbitMQ 3.10) -> rabbitmq, a new cluster of 3 on 4.0"
    rows.append(result_row(name, switch, during, during_tally, backlog_runs, left))
    assert waiting_before == {
        "analytics on Redis": BACKLOG + len(queued["accepted"]),
        "email on RabbitMQ": len(queued["accepted"]),
    }
    assert sorted(moved) == sorted(QUEUES), f"queues drained: {moved}"
    assert len(cluster["running_nodes"]) == 3, cluster
    assert {queue: app_queues.get(queue) for queue in QUEUES} == {queue: ("quorum", 3) for queue in QUEUES}
    assert not during["refused"], f"the web tier refused signups during the switch: {during['refused'][:5]}"
    for lost, twice, resent, _ in (during_tally, queued_tally):
        assert not lost and not twice and not resent, f"emails lost {lost[:3]}, twice {twice[:3]}, resent {resent}"
    assert all(n == 1 for n in backlog_runs.values()), {task: n for task, n in backlog_runs.items() if n != 1}
    assert left == 0, f"{left} messages left on the old brokers"
    for host in hosts:
        assert uses_broker(host, "rabbitmq"), "the app does not use RabbitMQ after the switch"


def test_back_from_the_cluster_to_the_single_node(backend, front, site, probe_address):
    """And back, as a blue-green upgrade rolls back: the scenario's own inventory, whose rabbitmq
    group is debian12 again, with switch_broker.yml. Its node kept running out of the group, with the
    classic queues the drain emptied; the cluster's quorum queues, a backlog among them (their
    workers stopped until the run's workers tier starts them), are drained into them, under the
    signup load."""
    hosts = (backend, front)
    since, backlog, _, switch, during, moved = switch_with_backlog(
        backend, front, site, probe_address, "single", "switch_broker.yml", "-e", "celery_broker=rabbitmq"
    )
    tally = mail_tally(during, settle_mail(backend, during, 240))
    backlog_runs = wait_for_task_runs(hosts, backlog, since)
    left = sum(queue["messages"] for name, queue in cluster_queues(front, "messages").items() if name in QUEUES)
    rows.append(
        result_row("rabbitmq, the cluster of 3 -> back to the single node", switch, during, tally, backlog_runs, left)
    )
    assert sorted(moved) == sorted(QUEUES), f"queues drained: {moved}"
    assert not during["refused"], f"the web tier refused signups during the switch: {during['refused'][:5]}"
    lost, twice, resent, _ = tally
    assert not lost and not twice and not resent, f"emails lost {lost[:3]}, twice {twice[:3]}, resent {resent}"
    assert all(n == 1 for n in backlog_runs.values()), {task: n for task, n in backlog_runs.items() if n != 1}
    assert left == 0, f"{left} messages left on the cluster"
    # One node's URL, not a cluster's list (the URL holds a password: not printed).
    single = f'^CELERY_BROKER_URL="{broker_entry("rabbitmq")["scheme"]}://[^;]*"$'
    for host in hosts:
        assert host.run("grep -q %s %s", single, env_file(host)).rc == 0, f"{host} not on the single node"
