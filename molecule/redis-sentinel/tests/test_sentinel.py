"""roles/redis with redis_sentinel: one primary, two replicas, three Sentinels.

The tests run once each, from the controller, against the three containers over docker
exec, in file order: the topology and ACL checks first, then the failover (a halt of the
primary), the old primary's return (`docker start`), a converge after both, and then faults
under one Celery task load through the Sentinels (ha_testlib): a halt, a rolling restart by a
converge, a power cut (kill) whose first election splits, with half the load's publishes waiting
for a replica (WAIT), a frozen primary and a primary cut off from its peers. Each leaves the group
healthy for the next and adds its counts to artifacts/ha/redis-sentinel.json."""

import contextlib
import json
import os
import re
import statistics
import subprocess
import threading
import time
import uuid

import pytest
from cbk_testlib import (
    OTHER_CA_ONLY,
    ansible_playbook,
    broker_entry,
    broker_port,
    changed_tasks,
    docker_host,
    host_variable,
    packet_capture,
    platform_addresses,
    redis_cli,
    role_defaults,
    scenario_config,
    scenario_setting,
    scenario_variables,
    wait_until,
)
from cbk_testlib import redis_password as password
from ha_testlib import (
    CONCURRENCY,
    REPO,
    WORKERS,
    HALoad,
    cut_off,
    frozen,
    halt,
    kill,
    partitioned,
    tally,
    write_report,
)

NODES = platform_addresses()
# TLS only (molecule.yml): Redis on its TLS port, the Sentinels on theirs, plain text closed.
TLS = scenario_setting("redis", "redis_tls_enabled")
PLAIN_PORT = broker_port("redis", "plain")
REDIS_PORT = broker_port("redis", "tls") if TLS else PLAIN_PORT
SENTINEL_PORT = broker_port("redis", "sentinel")
MASTER = scenario_setting("redis", "redis_sentinel_master_name")
ADMIN = scenario_setting("redis", "redis_admin_user")
# The kit CA in each node's trust store (base role), and its copy on the controller.
HOST_CA = role_defaults("base")["base_tls_ca_path"]
CONTROLLER_CA = f"{scenario_variables()['base_tls_kit_ca_dir']}/ca.crt"
TASKS, PER_SECOND, STOP_AFTER = 300, 20, 100
# How long the runs may stop coming before a batch counts as settled: the workers drain a backlog
# faster than the load fills it, so a pause this long means no task is left to run.
SETTLE_SECONDS = 15
SCENARIO = scenario_config()["scenario"]["name"]
# Sentinel's down-after-milliseconds, and the primary's min-replicas-max-lag, in seconds.
DOWN_AFTER = scenario_setting("redis", "redis_sentinel_down_after_ms") / 1000
MAX_LAG = scenario_setting("redis", "redis_min_replicas_max_lag")
FAILOVER_TIMEOUT = scenario_setting("redis", "redis_sentinel_failover_timeout_ms") / 1000
# down-after, then the election, tried again after twice failover-timeout when the first one's votes
# split (the two Sentinels a power cut leaves asked at once), then the promotion: a few seconds more.
ELECTION_BOUND = DOWN_AFTER + 2 * FAILOVER_TIMEOUT + 5
# The Sentinels PING each other every second and publish hello messages through every server
# every 2 s: a capture this much longer holds several of each.
SENTINEL_SECONDS = 5


def node(name):
    return docker_host(name)


def cli(client, ip, port, *commands, user=None, ca=HOST_CA):
    """redis_cli on client against ip:port (over TLS when the scenario has it, trusting ca), as
    user; each command a line on one connection. stdout and stderr together, one reply line per line."""
    return redis_cli(node(client), server=ip, port=port, user=user, tls=TLS, ca=ca, lines=commands).splitlines()


def other(name):
    return next(n for n in NODES if n != name)


def info(name, section="replication"):
    text = "\n".join(cli(name, "127.0.0.1", REDIS_PORT, f"INFO {section}", user="admin"))
    return dict(re.findall(r"^(\w+):(.*?)\r?$", text, re.M))


def primary_by_sentinel(client, ip):
    """What the Sentinel at ip says the primary is (the client user's view)."""
    return cli(client, ip, SENTINEL_PORT, f"SENTINEL GET-MASTER-ADDR-BY-NAME {MASTER}", user="celery-sentinel")[:1]


def main_pid(name):
    return node(name).check_output("systemctl show -p MainPID --value redis-server")


@pytest.fixture(scope="module")
def failover():
    """State shared by the failover tests: the keys written before, who the primary is."""
    return {"primary": "cbk-redis-sentinel-n1"}


# --- (a) replication ---------------------------------------------------------------------


def test_first_node_is_primary_with_two_online_replicas():
    primary = info("cbk-redis-sentinel-n1")
    assert primary["role"] == "master"
    online = [v for k, v in primary.items() if re.match(r"slave\d+$", k) and "state=online" in v]
    assert len(online) == 2, primary
    for name in ("cbk-redis-sentinel-n2", "cbk-redis-sentinel-n3"):
        replica = info(name)
        assert (replica["role"], replica["master_host"], replica["master_port"], replica["master_link_status"]) == (
            "slave",
            NODES["cbk-redis-sentinel-n1"],
            str(REDIS_PORT),
            "up",
        )
    for name, ip in NODES.items():
        assert cli(other(name), ip, REDIS_PORT, "CONFIG GET min-replicas-to-write", user="admin")[-1] == "1"


# --- (b) Sentinels --------------------------------------------------------------------------


def test_every_sentinel_names_the_first_node_and_has_a_quorum():
    for name, ip in NODES.items():
        assert primary_by_sentinel(other(name), ip) == [NODES["cbk-redis-sentinel-n1"]], name
        assert cli(name, "127.0.0.1", SENTINEL_PORT, f"SENTINEL CKQUORUM {MASTER}", user="admin")[0].startswith("OK ")
        master = cli(name, "127.0.0.1", SENTINEL_PORT, f"SENTINEL MASTER {MASTER}", user="admin")
        fields = dict(zip(master[::2], master[1::2], strict=True))
        assert (fields["num-other-sentinels"], fields["num-slaves"], fields["quorum"]) == ("2", "2", "2")


# --- (c) users and files --------------------------------------------------------------------


@pytest.mark.parametrize("port", [REDIS_PORT, SENTINEL_PORT])
def test_default_user_is_refused(port):
    client, ip = "cbk-redis-sentinel-n2", NODES["cbk-redis-sentinel-n1"]
    assert cli(client, ip, port, "PING")[0].startswith("NOAUTH")
    assert "WRONGPASS" in cli(client, ip, port, "AUTH default anything")[0]


def test_each_user_may_run_only_its_own_commands():
    client, ip = "cbk-redis-sentinel-n2", NODES["cbk-redis-sentinel-n1"]
    for command in (f"SENTINEL FAILOVER {MASTER}", f"SENTINEL SET {MASTER} quorum 1", "SENTINEL CONFIG GET *"):
        assert cli(client, ip, SENTINEL_PORT, command, user="celery-sentinel")[0].startswith("NOPERM"), command
    assert cli(client, ip, SENTINEL_PORT, "SENTINEL MASTERS", user="celery-sentinel")[0] == "name"
    for command in ("GET x", "KEYS *", "CONFIG SET maxmemory 1"):
        assert cli(client, ip, REDIS_PORT, command, user="replica")[0].startswith("NOPERM"), command
    for command in ("GET x", "CONFIG SET maxmemory 1", "FLUSHALL"):
        assert cli(client, ip, REDIS_PORT, command, user="sentinel")[0].startswith("NOPERM"), command


def test_only_tls_is_served_and_a_client_of_another_ca_is_refused():
    """`port 0` on every Redis and Sentinel: the replication links and the Sentinels' links
    to the servers and to each other, which the tests above see working, can only be TLS."""
    if not TLS:
        pytest.skip("plain-text scenario")
    client, ip = "cbk-redis-sentinel-n2", NODES["cbk-redis-sentinel-n1"]
    for name in NODES:
        assert f":{PLAIN_PORT} " not in node(name).check_output("ss -Htln"), f"{name} listens on {PLAIN_PORT}"
    for port in (REDIS_PORT, SENTINEL_PORT):
        plain = redis_cli(node(client), server=ip, port=port, lines=["PING"])
        assert not re.search("PONG|NOAUTH", plain), (port, plain)
        other_ca = cli(client, ip, port, "PING", user="admin", ca=OTHER_CA_ONLY)
        assert "certificate verify failed" in " ".join(other_ca), (port, other_ca)
        assert cli(client, ip, port, "PING", user="admin") == ["PONG"], port


def replication_link(replica):
    """The replica's local port of its link to the primary (CLIENT LIST's laddr of the master)."""
    line = cli(replica, "127.0.0.1", REDIS_PORT, "CLIENT LIST TYPE master", user="admin")[0]
    return int(re.search(r"\bladdr=\S+:(\d+)", line).group(1))


def test_replication_and_sentinel_links_carry_no_data_in_clear():
    """Packets captured on every node while a marker is written to the primary, replicated and read
    back on both replicas, and the Sentinels talk to the servers, to each other and to a client:
    the replication links and the Sentinel port carry packets but neither the marker nor any of
    the scenario's passwords (packet_capture checks that each capture sees payloads)."""
    primary = "cbk-redis-sentinel-n1"
    replicas = [name for name in NODES if name != primary]
    links = {name: replication_link(name) for name in replicas}
    key, marker = f"capture-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    with packet_capture({name: node(name) for name in NODES}) as captures:
        # From a replica's host to the primary's address: the write crosses the network as well.
        written = cli(replicas[0], NODES[primary], REDIS_PORT, f"SET {key} {marker}", "WAIT 2 5000", user="admin")
        assert written == ["OK", "2"], written
        for name in replicas:
            assert cli(name, "127.0.0.1", REDIS_PORT, f"GET {key}", user="admin") == [marker], name
        for name, ip in NODES.items():
            assert primary_by_sentinel(other(name), ip) == [NODES[primary]], name
        time.sleep(SENTINEL_SECONDS)
    secrets = {name: str(value) for name, value in scenario_variables().items() if name.endswith("_password")}
    secrets.update({"the marker": marker, "the marker's key": key})
    packets, in_clear = {}, {}
    for name, capture in captures.items():
        peers = " or ".join(f"host {ip}" for peer, ip in NODES.items() if peer != name)
        packets[name] = {
            "data port to peers": capture.packets(f"tcp port {REDIS_PORT} and ({peers})"),
            "Sentinel port to peers": capture.packets(f"tcp port {SENTINEL_PORT} and ({peers})"),
        }
        if name in links:
            link = f"tcp port {REDIS_PORT} and tcp port {links[name]} and host {NODES[primary]}"
            packets[name]["replication link"] = capture.packets(link)
        in_clear[name] = capture.in_clear(secrets)
    print(f"packets per node: {packets}")
    assert all(all(counts.values()) for counts in packets.values()), packets
    assert not any(in_clear.values()), f"in clear on the network: {in_clear}"


def test_no_peer_or_client_was_refused_by_a_sentinel():
    for name in NODES:
        log = cli(name, "127.0.0.1", SENTINEL_PORT, "ACL LOG", user="admin")
        refused = {log[i + 1] for i, line in enumerate(log) if line == "username"}
        # This suite's own probes are refused on purpose; the Sentinels' logins are not.
        assert "sentinel" not in refused, (name, log)


def test_secrets_are_not_world_readable():
    for name in NODES:
        host = node(name)
        expected = {
            # Group-writable: the Sentinel records each new primary there.
            "/etc/redis/replication.conf": ("root", "redis", 0o660),
            "/etc/redis/users.acl": ("root", "redis", 0o640),
            "/etc/redis/sentinel-settings.sha256": ("root", "root", 0o600),
            "/var/lib/redis-sentinel": ("redis", "redis", 0o700),
            "/var/lib/redis-sentinel/sentinel.conf": ("redis", "redis", 0o600),
        }
        for path, owner in expected.items():
            entry = host.file(path)
            assert (entry.user, entry.group, entry.mode) == owner, (name, path)
        for user in ("celery", "admin", "celery-sentinel"):
            found = host.run("grep -rlF -e %s /etc/redis /var/lib/redis /var/lib/redis-sentinel", password(user))
            assert found.rc == 1, f"{user}'s password in clear text on {name}: {found.stdout}"


@pytest.mark.parametrize(
    "change, refusal",
    [
        # The Sentinels' state files hold their peers' ports.
        (
            {"redis_tls_enabled": not TLS},
            "so a running group cannot change them in place. To change them: set redis_sentinel_initial_primary "
            "to the host at " + NODES["cbk-redis-sentinel-n1"],
        ),
        # Out of the group in place: the other Sentinels would fail over meanwhile.
        ({"redis_sentinel": False}, "but it is in a Sentinel group"),
    ],
    ids=["tls", "out-of-the-group"],
)
def test_a_change_the_running_group_cannot_make_in_place_is_refused_before_any_change(change, refusal):
    """The role stops on every host, naming the steps."""
    playbook = os.path.join(os.path.dirname(__file__), os.pardir, "converge.yml")
    before = {name: node(name).check_output("sha256sum /etc/redis/redis.conf") for name in NODES}
    returncode, _, output, recap = ansible_playbook(playbook, "--skip-tags", "cbk-base", "-e", json.dumps(change))
    assert returncode != 0 and refusal in output, output[-3000:]
    assert recap == dict.fromkeys(NODES, (0, 1)), f"(changed, failed) per host: {recap}"
    assert {name: node(name).check_output("sha256sum /etc/redis/redis.conf") for name in NODES} == before


def test_a_first_deployment_that_would_make_a_primary_holding_keys_a_replica_is_refused():
    """A single Redis turned into a Sentinel group: its data would be replaced if another host became
    the initial primary. A master name no Sentinel knows yet stands for that first deployment, and a
    key on the primary for its queued tasks. A Redis that refuses the admin login cannot be read,
    and is refused too."""
    primary, replica = "cbk-redis-sentinel-n1", "cbk-redis-sentinel-n2"
    playbook = os.path.join(os.path.dirname(__file__), os.pardir, "converge.yml")
    first = {"redis_sentinel_master_name": f"{MASTER}-new", "redis_sentinel_initial_primary": replica}
    wrong_login = {**first, "redis_admin_password": "not-the-admin-password"}
    key = f"queued-{uuid.uuid4()}"
    cli(primary, "127.0.0.1", REDIS_PORT, f"SET {key} 1", user="admin")
    try:
        runs = {
            f"Set redis_sentinel_initial_primary to {primary}. Nothing was changed": ansible_playbook(
                playbook, "--skip-tags", "cbk-base", "-e", json.dumps(first)
            ),
            f"runs a Redis that refused redis_admin_user ({ADMIN}) with redis_admin_password": ansible_playbook(
                playbook, "--skip-tags", "cbk-base", "-e", json.dumps(wrong_login)
            ),
        }
    finally:
        cli(primary, "127.0.0.1", REDIS_PORT, f"DEL {key}", user="admin")
    for refusal, (returncode, _, output, recap) in runs.items():
        assert returncode != 0 and refusal in output, output[-3000:]
        assert {name: changed for name, (changed, _) in recap.items()} == dict.fromkeys(NODES, 0), recap


# --- (d) failover ----------------------------------------------------------------------------


def test_failover_elects_a_new_primary_that_has_the_data(failover):
    old = failover["primary"]
    keys = {f"ha-{uuid.uuid4().hex[:8]}": str(i) for i in range(5)}
    writes = cli(
        other(old), NODES[old], REDIS_PORT, *[f"SET {k} {v}" for k, v in keys.items()], "WAIT 1 2000", user="admin"
    )
    assert writes[:5] == ["OK"] * 5 and int(writes[5]) >= 1, writes
    failover["pids"] = {name: main_pid(name) for name in NODES if name != old}
    started = time.monotonic()
    halt(old)
    survivors = [name for name in NODES if name != old]

    def elected():
        answers = {tuple(primary_by_sentinel(name, "127.0.0.1")) for name in survivors}
        return len(answers) == 1 and answers != {(NODES[old],)} and next(iter(answers))

    answer = wait_until(elected, ELECTION_BOUND + 30, "both surviving Sentinels name one new primary")
    seconds = time.monotonic() - started
    print(f"new primary {answer} named by both surviving Sentinels {seconds:.1f} s after docker stop")
    assert seconds <= ELECTION_BOUND, answer
    new = next(name for name, ip in NODES.items() if ip == answer[0])
    failover.update(old=old, primary=new)
    wait_until(lambda: info(new)["role"] == "master", 10, f"{new} a primary")
    values = cli(new, "127.0.0.1", REDIS_PORT, *[f"GET {k}" for k in keys], user="celery")
    assert values == list(keys.values())
    # With one replica left (min-replicas-to-write 1) the new primary takes writes.
    assert cli(new, "127.0.0.1", REDIS_PORT, "SET ha-after-failover 1", user="celery") == ["OK"]


# --- (e) the old primary returns ---------------------------------------------------------------


def replicates_from(replica, primary):
    try:
        state = info(replica)
    except Exception:  # noqa: BLE001 (still booting)
        return False
    return (
        state.get("role") == "slave"
        and state.get("master_host") == NODES[primary]
        and state.get("master_link_status") == "up"
    )


def test_old_primary_returns_as_a_replica_of_the_new_one(failover):
    old, new = failover["old"], failover["primary"]
    subprocess.run(["docker", "start", old], check=True, capture_output=True)
    wait_until(lambda: replicates_from(old, new), 60, f"{old} a replica of {new} with its link up")
    wait_until(
        lambda: all(primary_by_sentinel(name, "127.0.0.1") == [NODES[new]] for name in NODES),
        30,
        f"every Sentinel names {new}",
    )


# --- (f) a converge after the failover ------------------------------------------------------------


# Left by a run that wrote new settings and stopped before the restart (a hand-over that failed).
RESTART_PENDING_FILE = scenario_setting("redis", "redis__restart_pending_file")


def recorded_primaries():
    """The primary each host's replication settings name (None: itself), as a Redis restarted
    now would start: the Sentinels rewrite them after each failover (client-reconfig-script)."""
    path = host_variable(next(iter(NODES)), "redis__replication_file", ("redis",))
    recorded = {}
    for name in NODES:
        lines = node(name).file(path).content_string.splitlines()
        recorded[name] = next((line.split()[1] for line in lines if line.startswith("replicaof ")), None)
    return recorded


def test_converge_after_the_failover_keeps_the_new_primary_and_restarts_only_a_pending_restart(failover):
    """Before any converge, the Sentinels have recorded the new primary in every host's replication
    settings. The converge then changes nothing, and restarts no server but the one an earlier run
    left a restart pending on (here the old primary, now a replica): that one rejoins. That earlier
    run also left the primary's running ACLs without the replication user its ACL file names, as a
    first deployment of the group stopped before its handlers does: the converge loads the file
    before the restart, and both replicas replicate again."""
    new, old = failover["primary"], failover["old"]
    expected = {name: None if name == new else NODES[new] for name in NODES}
    wait_until(lambda: recorded_primaries() == expected, 30, f"every host's replication settings naming {new}")
    node(old).check_output(f"touch {RESTART_PENDING_FILE}")
    replication_user = scenario_setting("redis", "redis_replication_user")
    cli(new, "127.0.0.1", REDIS_PORT, f"ACL DELUSER {replication_user}", user=ADMIN)
    old_pid = main_pid(old)
    playbook = os.path.join(os.path.dirname(__file__), os.pardir, "converge.yml")
    returncode, stdout, _, recap = ansible_playbook(playbook, "--skip-tags", "cbk-base")
    assert returncode == 0, stdout[-6000:]
    changed = {name: changed for name, (changed, _) in recap.items()}
    print(f"changed per host: {changed}")
    assert {name: count for name, count in changed.items() if name != old} == dict.fromkeys(set(NODES) - {old}, 0), (
        changed_tasks(stdout)
    )
    assert info(new)["role"] == "master"
    assert all(primary_by_sentinel(name, "127.0.0.1") == [NODES[new]] for name in NODES)
    for name, pid in failover["pids"].items():
        assert main_pid(name) == pid, f"redis-server restarted on {name}"
    assert main_pid(old) != old_pid, f"the restart left pending on {old} was not done"
    assert replicates_from(old, new), f"{old} did not rejoin as a replica of {new}"
    for name in set(NODES) - {new}:
        wait_until(lambda name=name: replicates_from(name, new), 30, f"{name} replicating from {new}")
    assert not any(node(name).file(RESTART_PENDING_FILE).exists for name in NODES)


# --- (g) to (k): faults under a Celery task load ----------------------------------------------


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    """One Celery load through the Sentinels for every fault below: the workers start once, and each
    test publishes its own tasks. The report starts anew with them."""
    scheme = broker_entry("redis")["sentinel_scheme"]
    url = ";".join(f"{scheme}://celery:{password('celery')}@{ip}:{SENTINEL_PORT}/0" for ip in NODES.values())
    sentinel = {
        "master_name": MASTER,
        "username": "celery-sentinel",
        "password": password("celery-sentinel"),
        "tls": TLS,
    }
    load = HALoad(tmp_path_factory.mktemp("ha"), url, sentinel=sentinel, ca_file=CONTROLLER_CA if TLS else None)
    (REPO / "artifacts" / "ha" / f"{SCENARIO}.json").unlink(missing_ok=True)
    load.start_workers()
    yield load
    load.stop_workers()


def age_held_messages(primary):
    """Kombu's Redis transport restores a message a worker held (in the unacked hash) only after
    visibility_timeout (1 h). Age them by an hour, as the clock would; returns how many there were."""
    tags = [tag for tag in cli(primary, "127.0.0.1", REDIS_PORT, "ZRANGE unacked_index 0 -1", user="admin") if tag]
    cli(
        primary,
        "127.0.0.1",
        REDIS_PORT,
        *[f"ZADD unacked_index XX {int(time.time()) - 3700} {t}" for t in tags],
        user="admin",
    )
    return len(tags)


def name_of(ip):
    return next(name for name, address in NODES.items() if address == ip)


def named_primary(sentinels):
    """The primary the Sentinels of these nodes all name, else None."""
    answers = {tuple(primary_by_sentinel(name, "127.0.0.1")) for name in sentinels}
    return name_of(answers.pop()[0]) if len(answers) == 1 and () not in answers else None


def wait_for_a_healthy_group(seconds=60):
    """The state every fault test starts from and leaves: the three Sentinels name one primary, the only
    node that says it is one, and both others replicate from it with their link up. Returns its name."""

    def healthy():
        primary = named_primary(NODES)
        if not primary:
            return None
        roles = {name: info(name) for name in NODES}
        replicas = [
            state.get("role") == "slave"
            and state.get("master_host") == NODES[primary]
            and state.get("master_link_status") == "up"
            for name, state in roles.items()
            if name != primary
        ]
        return roles[primary].get("role") == "master" and all(replicas) and primary

    return wait_until(healthy, seconds, "one primary named by the three Sentinels, two replicas linked to it")


class Election(threading.Thread):
    """Seconds from start() until the Sentinels of the nodes other than ``old`` name another primary."""

    def __init__(self, old):
        super().__init__(daemon=True)
        self.old, self.new, self.seconds = old, None, None
        self.started = time.monotonic()

    def run(self):
        survivors = [name for name in NODES if name != self.old]
        deadline = self.started + ELECTION_BOUND + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.CalledProcessError, StopIteration):
                if (new := named_primary(survivors)) and new != self.old:
                    self.new, self.seconds = new, round(time.monotonic() - self.started, 1)
                    return
            time.sleep(0.5)

    def result(self):
        self.join()
        assert self.new, f"the Sentinels named no primary other than {self.old} within {ELECTION_BOUND + 30} s"
        return self.new, self.seconds


def run_batch(load, publish, primary):
    """Publishes with ``publish`` (a call of load.publish, returning sent and refused), then waits until
    every task sent ran, or the runs stop coming; the messages held on ``primary()`` are aged once.
    Returns sent, refused, this batch's runs (of tasks unknown before it), how many were held, the
    tasks sent that a worker popped but could not record, and how many worker processes exited."""
    before = set(load.runs())
    sent, refused = publish()
    expected = set(sent) - set(load.unrecorded())
    exited = []
    runs = settle(load, expected, exited)
    held = 0
    if expected - runs.keys():
        held = age_held_messages(primary())
        runs = settle(load, expected, exited)
    batch = {task: count for task, count in load.runs().items() if task not in before}
    return sent, refused, batch, held, set(load.unrecorded()) & set(sent), sum(exited)


def restart_exited_workers(load):
    """Starts the workers anew when one exited, as the kit's unit does (Restart=always): kombu takes an
    error reply to a worker's ack (NOREPLICAS from a primary cut off from its replicas) for an
    unrecoverable one. Returns how many had exited."""
    exited = sum(worker.poll() is not None for worker in load.workers)
    if exited:
        load.stop_workers()
        load.workers = []
        load.start_workers()
    return exited


def settle(load, expected, exited, quiet=SETTLE_SECONDS, timeout=120):
    """load.runs() once every expected task ran, or no run came for ``quiet`` seconds; the workers that
    exited meanwhile are started again and counted in ``exited``."""
    deadline, last, count = time.monotonic() + timeout, time.monotonic(), -1
    while True:
        exited.append(restart_exited_workers(load))
        runs = load.runs()
        if expected <= runs.keys() or time.monotonic() > deadline or time.monotonic() - last > quiet:
            return runs
        if sum(runs.values()) != count:
            count, last = sum(runs.values()), time.monotonic()
        time.sleep(2)


def report_of(sent, refused, runs, unrecorded, **more):
    """tally's counts, with the lost tasks split: popped from a primary that went down before the worker
    recorded them (kombu's window, ha_load logs them), and the others (their publish, or the worker's
    record of them, acknowledged by a primary and not replicated before it went away)."""
    report = tally(sent, refused, runs)
    lost = {task for task in sent if task not in runs}
    report.update(
        lost_popped_unrecorded=len(lost & unrecorded),
        lost_not_replicated=len(lost - unrecorded),
        **more,
    )
    return report


def primary_fault_under_load(load, act, count=TASKS, start_again=False, publish=None):
    """act(primary, election) after the STOP_AFTER-th publish of ``count``, while the load goes on (act
    may block: the publisher runs on); the primary's container started again afterwards when
    ``start_again``. ``publish(fault)``, returning sent and refused, replaces the one publisher, which
    calls ``fault()`` part-way. Returns the report (report_of, with the election and the workers'
    fate) and the tasks a worker popped but could not record."""
    old = wait_for_a_healthy_group()
    election = Election(old)

    def default_publish(fault):
        return load.publish("ha.record", count, PER_SECOND, after=STOP_AFTER, action=fault)

    def fault():
        election.started = time.monotonic()
        election.start()
        act(old, election)

    try:
        sent, refused, runs, held, unrecorded, exited = run_batch(
            load,
            lambda: (publish or default_publish)(fault),
            lambda: election.result()[0],
        )
        new, seconds = election.result()
    finally:
        if start_again:
            subprocess.run(["docker", "start", old], check=True, capture_output=True)
    report = report_of(
        sent,
        refused,
        runs,
        unrecorded,
        recovery_seconds=seconds,
        held_until_aged=held,
        workers_exited=exited,
        faulted=old,
        new_primary=new,
    )
    return report, unrecorded


def test_failover_under_a_celery_load_loses_only_tasks_popped_as_the_primary_went_down(load):
    report, unrecorded = primary_fault_under_load(load, lambda primary, _: halt(primary), start_again=True)
    write_report(SCENARIO, "halt", report)
    assert not report["refused"], report
    # Kombu's Redis transport pops a message, then records it as unacked: a task popped from the
    # halted primary just before it went down is lost (ha_load logs it). That window holds at most
    # one message per worker's consumer connection; any other loss fails here.
    assert report["lost_not_replicated"] == 0 and len(unrecorded) <= WORKERS, report
    assert report["ran_more_than_once"] <= WORKERS * CONCURRENCY * 2, report
    wait_for_a_healthy_group(90)


# --- (h) a rolling restart under a Celery task load ---------------------------------------------------

PLAYBOOK = os.path.join(os.path.dirname(__file__), os.pardir, "converge.yml")
# A redis.conf setting the role applies by a restart: the other of its two allowed values.
RESTART_SETTING = "redis_appendfsync"


def test_a_restart_of_the_group_under_a_celery_load_loses_nothing(load):
    """A converge that changes redis.conf restarts every server, the primary after handing over,
    while tasks are published: none is refused, none lost but in kombu's window."""
    old = wait_for_a_healthy_group()
    pids = {name: main_pid(name) for name in NODES}
    value = {"everysec": "always", "always": "everysec"}[scenario_setting("redis", RESTART_SETTING)]
    converge = {}
    thread = threading.Thread(
        target=lambda: converge.update(
            result=ansible_playbook(PLAYBOOK, "--skip-tags", "cbk-base", "-e", json.dumps({RESTART_SETTING: value}))
        )
    )
    started = time.monotonic()

    def publish_while_converging():
        thread.start()
        sent, refused = [], []
        # Batches until the converge ends: it takes a minute or more, the restarts towards its end.
        while thread.is_alive():
            batch_sent, batch_refused = load.publish("ha.record", TASKS // 3, PER_SECOND)
            sent += batch_sent
            refused += batch_refused
        return sent, refused

    sent, refused, runs, held, unrecorded, exited = run_batch(
        load, publish_while_converging, lambda: named_primary(NODES)
    )
    returncode, output, _, recap = converge["result"]
    new = wait_for_a_healthy_group()
    report = report_of(
        sent,
        refused,
        runs,
        unrecorded,
        converge_seconds=round(time.monotonic() - started),
        held_until_aged=held,
        workers_exited=exited,
        old_primary=old,
        new_primary=new,
    )
    write_report(SCENARIO, "rolling restart", report)
    try:
        assert returncode == 0, output[-6000:]
        assert {name: main_pid(name) != pid for name, pid in pids.items()} == dict.fromkeys(NODES, True), pids
        assert new != old, report
        appendfsync = RESTART_SETTING.removeprefix("redis_")
        for name in NODES:
            assert cli(name, "127.0.0.1", REDIS_PORT, f"CONFIG GET {appendfsync}", user="admin")[-1] == value, name
        assert not refused and report["workers_exited"] == 0, report
        assert report["lost_not_replicated"] == 0 and len(unrecorded) <= WORKERS, report
    finally:
        # The scenario's setting back, by another rolling restart, whatever the checks found: the
        # tests after this one converge with it and expect no restart.
        returncode, output, _, _ = ansible_playbook(PLAYBOOK, "--skip-tags", "cbk-base")
    assert returncode == 0, output[-6000:]
    wait_for_a_healthy_group()


# --- (i) a power cut of the primary, and a split election, under a Celery task load -------------------

# Replication is asynchronous: the primary acknowledges a write before its replicas have it. They
# follow within milliseconds, so a power cut loses what they had not received yet. Here replication
# lags this long before the cut (the primary's links to its peers dropped, as a congested or failing
# network would), which is what such a cut can take: at most the load's last second (PER_SECOND).
LAG_SECONDS = 0.5
UNREPLICATED_BOUND = PER_SECOND
# Half the load comes from a publisher whose publishes count once this many replicas have them
# (django_app_redis_wait_replicas: Redis WAIT): none of its tasks may be lost.
WAIT_REPLICAS = 1
# A Sentinel that voted for another starts no election of its own for twice failover-timeout.
NOBODY = "0" * 40


def command_calls(name, command):
    """Calls of ``command`` the server of ``name`` ran since it started, and those it refused (LPUSH,
    kombu's publish: NOREPLICAS), so far."""
    prefix = f"cmdstat_{command}:"
    lines = cli(name, "127.0.0.1", REDIS_PORT, "INFO commandstats", user="admin")
    fields = dict(
        field.split("=") for line in lines if line.startswith(prefix) for field in line[len(prefix) :].split(",")
    )
    return int(fields.get("calls", 0)), int(fields.get("rejected_calls", 0))


def current_epoch(name):
    """The Sentinel's current epoch, as its state file (INFO's config_file) has it."""
    config_file = next(
        line.split(":", 1)[1]
        for line in cli(name, "127.0.0.1", SENTINEL_PORT, "INFO server", user="admin")
        if line.startswith("config_file:")
    )
    state = node(name).file(config_file.strip()).content_string
    return int(re.search(r"^sentinel current-epoch (\d+)$", state, re.M)[1])


def vote_for_nobody(name, primary, epoch):
    """The Sentinel of ``name`` votes, in ``epoch``, for a Sentinel that does not exist, asked as a
    peer asks (IS-MASTER-DOWN-BY-ADDR) for the failover of ``primary``."""
    request = f"SENTINEL IS-MASTER-DOWN-BY-ADDR {NODES[primary]} {REDIS_PORT} {epoch} {NOBODY}"
    reply = cli(name, "127.0.0.1", SENTINEL_PORT, request, user=scenario_setting("redis", "redis_sentinel_user"))
    assert reply[1:] == [NOBODY, str(epoch)], (name, reply)


def test_a_power_cut_of_the_primary_and_a_split_election_under_a_celery_load_lose_at_most_its_last_second(load):
    """The worst a power cut brings: it comes as replication lags, the first election after it splits,
    the next comes twice failover-timeout later, and the publishes retry all through (redis_sentinel_*
    timings checked). What the primary acknowledged in the lag is lost, but for the waited publishes."""

    def power_cut(primary, _):
        epochs = {name: current_epoch(name) for name in NODES if name != primary}
        cut_off(primary, [address for name, address in NODES.items() if name != primary])
        time.sleep(LAG_SECONDS)
        kill(primary)
        # What a power cut leaves now and then (1 in 6 measured): the two Sentinels left ask for
        # votes at the same moment, each votes for itself, and neither is elected. Here each votes
        # for nobody, in the epoch after its own, just before it could find the primary down.
        time.sleep(DOWN_AFTER - 1)
        for name, epoch in epochs.items():
            vote_for_nobody(name, primary, epoch + 1)

    sentinel = {**json.loads(load.env["HA_SENTINEL"]), "wait_replicas": WAIT_REPLICAS}
    publishers = {}

    def side_by_side(fault):
        """Half the load from each publisher; the fault comes part-way through the asynchronous one's."""
        waiting = {"HA_SENTINEL": json.dumps(sentinel)}
        results = load.publish_side_by_side("ha.record", TASKS, PER_SECOND / 2, waiting, after=STOP_AFTER, action=fault)
        publishers.update(zip(("asynchronous", "waiting"), results, strict=True))
        return tuple([task for result in results for task in result[kind]] for kind in ("sent", "refused"))

    waits_before = {name: command_calls(name, "wait")[0] for name in NODES}
    report, unrecorded = primary_fault_under_load(load, power_cut, start_again=True, publish=side_by_side)
    new = report["new_primary"]
    # The waiting publisher's WAITs since its failover (the old primary's went with it); nothing else waits.
    report["waits_on_the_new_primary"] = command_calls(new, "wait")[0] - waits_before[new]
    # What waiting costs, side by side under the same load: the median and 90th percentile publish.
    report.update(
        waiting_sent=len(publishers["waiting"]["sent"]),
        waiting_lost_not_replicated=len(set(publishers["waiting"]["sent"]) - load.runs().keys() - set(unrecorded)),
        publish_ms={
            kind: {
                f"p{q}": round(1000 * statistics.quantiles(result["seconds"], n=10)[q // 10 - 1], 1) for q in (50, 90)
            }
            for kind, result in publishers.items()
        },
    )
    report["replication_lag_seconds"] = LAG_SECONDS
    write_report(SCENARIO, "kill", report)
    old = report["faulted"]
    wait_until(lambda: replicates_from(old, new), 90, f"{old} back as a replica of {new}")
    assert report["recovery_seconds"] >= 2 * FAILOVER_TIMEOUT, f"the election did not split: {report}"
    assert not report["refused"], report
    assert report["waits_on_the_new_primary"] > 0 and report["waiting_lost_not_replicated"] == 0, report
    assert len(unrecorded) <= WORKERS and report["lost_not_replicated"] <= UNREPLICATED_BOUND, report
    assert report["ran_more_than_once"] <= WORKERS * CONCURRENCY * 2, report
    wait_for_a_healthy_group()


# --- (j) a frozen primary under a Celery task load ----------------------------------------------------

# Longer than down-after-milliseconds and the election after it: the others go on without it.
FREEZE_SECONDS = 3 * DOWN_AFTER
# From SIGCONT until the Sentinels have made it a replica (they wait 8 s before demoting a stale one).
DEMOTION_BOUND = 30
# A thawed primary runs the commands that waited on its connections before it counts its replicas again
# (once a second): it may take the publish each publishing connection had in flight, and lose it when it
# resynchronises. The load publishes from one connection, one task at a time.
IN_FLIGHT_BOUND = 1


def test_a_frozen_primary_comes_back_as_a_replica_without_a_split_brain(load):
    demoted = {}

    def freeze(old, election):
        with frozen(old, "redis-server"):
            time.sleep(FREEZE_SECONDS)
        thawed = time.monotonic()
        new = election.result()[0]
        wait_until(lambda: replicates_from(old, new), DEMOTION_BOUND + 30, f"{old} a replica of {new} after SIGCONT")
        demoted["seconds"] = round(time.monotonic() - thawed, 1)

    report, unrecorded = primary_fault_under_load(load, freeze)
    new = report["new_primary"]
    masters = [name for name in NODES if info(name).get("role") == "master"]
    report.update(frozen_seconds=FREEZE_SECONDS, demoted_seconds_after_sigcont=demoted.get("seconds"))
    write_report(SCENARIO, "frozen", report)
    assert masters == [new], report
    assert demoted["seconds"] <= DEMOTION_BOUND, report
    assert len(unrecorded) <= WORKERS and report["lost_not_replicated"] <= IN_FLIGHT_BOUND, report
    wait_for_a_healthy_group()


# --- (k) a primary cut off from its peers under a Celery task load ------------------------------------

# Longer than the election and than min-replicas-max-lag, after which the cut-off primary refuses writes.
PARTITION_SECONDS = 3 * MAX_LAG


def test_a_primary_cut_off_from_its_peers_stops_taking_writes_and_rejoins(load):
    calls = {}

    def cut_off(old, election):
        calls["before"] = command_calls(old, "lpush")
        with partitioned(old, [ip for name, ip in NODES.items() if name != old]):
            time.sleep(PARTITION_SECONDS)
            calls["cut off"] = command_calls(old, "lpush")
        healed = time.monotonic()
        new = election.result()[0]
        wait_until(lambda: replicates_from(old, new), DEMOTION_BOUND + 30, f"{old} a replica of {new} after the heal")
        calls["rejoined_seconds_after_heal"] = round(time.monotonic() - healed, 1)

    # Published all through the partition, and a while after the heal.
    report, unrecorded = primary_fault_under_load(load, cut_off, count=PER_SECOND * (PARTITION_SECONDS + 15))
    new = report["new_primary"]
    pids = {name: main_pid(name) for name in NODES}
    returncode, output, _, recap = ansible_playbook(PLAYBOOK, "--skip-tags", "cbk-base")
    (ran, rejected), (ran_cut_off, rejected_cut_off) = calls["before"], calls["cut off"]
    report.update(
        partition_seconds=PARTITION_SECONDS,
        acknowledged_by_the_cut_off_primary=ran_cut_off - ran,
        refused_by_the_cut_off_primary=rejected_cut_off - rejected,
        rejoined_seconds_after_heal=calls["rejoined_seconds_after_heal"],
        converge_changed={name: changed for name, (changed, _) in recap.items()},
    )
    write_report(SCENARIO, "partition", report)
    assert returncode == 0, output[-6000:]
    assert {name: main_pid(name) for name in NODES} == pids, (
        f"the converge after the partition restarted Redis: {changed_tasks(output)}"
    )
    assert set(report["converge_changed"].values()) == {0}, changed_tasks(output)
    assert [name for name in NODES if info(name).get("role") == "master"] == [new], report
    # Refused by the cut-off primary (NOREPLICAS), a publish is sent again once to the primary most
    # Sentinels name, whichever Sentinel the app asks first (the cut-off one still names the old).
    assert not report["refused"], report
    # Only what the cut-off primary acknowledged before min-replicas-max-lag can be lost.
    assert report["lost_not_replicated"] <= report["acknowledged_by_the_cut_off_primary"], report
    assert len(unrecorded) <= WORKERS, report
    wait_for_a_healthy_group()
