"""The celery_worker role's behaviour: three worker units consuming their queues, a
welcome email sent through the broker and a worker lands in the mail sink, warm shutdown
lets a running task finish, beat on one host, Flower behind basic auth and the firewall."""

import json
import time
import uuid

import pytest
import testinfra
from cbk_testlib import (
    MAILDIR,
    MANAGE,
    address,
    app_env_file,
    host_variable,
    http_request,
    journal,
    role_defaults,
    scenario_setting,
    systemd_seconds,
    tcp_probe,
    wait_for_maildir_message,
)

CLI = scenario_setting("celery_worker", "celery_worker__cli")
FLOWER_USER, FLOWER_PASSWORD = "admin", "test-flower-Zu6tP4nQa2xL7kWs"


def expected_instances():
    """The role's default worker instances, which the scenario keeps, as `celery inspect` reports
    them: queues sorted, the prefetch multiplier the instance's or the role's, and the concurrency
    where it is a number (the default instance's is the host's vCPUs)."""
    prefetch = scenario_setting("celery_worker", "celery_worker_prefetch_multiplier")
    expected = {}
    for instance in role_defaults("celery_worker")["celery_worker_instances"]:
        spec = {
            "queues": sorted(instance["queues"]),
            "pool": instance["pool"],
            "prefetch_multiplier": instance.get("prefetch_multiplier", prefetch),
        }
        if isinstance(instance["concurrency"], int):
            spec["concurrency"] = instance["concurrency"]
        expected[instance["name"]] = spec
    return expected


EXPECTED = expected_instances()
UNITS = [f"celery-worker@{name}" for name in EXPECTED]


@pytest.fixture(scope="module")
def hostvars(host):
    return host.ansible.get_variables()


@pytest.fixture(scope="module")
def app_group(hostvars):
    """The group that may read the app's settings (django_app_group, as the django_app role sees it)."""
    return host_variable(hostvars["inventory_hostname"], "django_app_group", ("django_app",))


@pytest.fixture(scope="module")
def nodename(host):
    return host.check_output("uname -n")


@pytest.fixture(scope="module")
def is_main(host, hostvars):
    """The first host of group workers runs beat and Flower (the role's defaults)."""
    return hostvars["inventory_hostname"] == hostvars["groups"]["workers"][0]


def inspect(host, command, nodename):
    destinations = ",".join(f"{name}@{nodename}" for name in EXPECTED)
    return json.loads(host.check_output(f"{CLI} inspect {command} --json --timeout=10 --destination={destinations}"))


def send_welcome_email(host, recipient):
    """Queue the task through the broker as the app does; returns the task id."""
    code = f"from users.tasks import send_welcome_email; print(send_welcome_email.delay({recipient!r}).id)"
    return host.check_output("%s shell -c %s", MANAGE, code).strip().splitlines()[-1]


@pytest.mark.parametrize("unit", UNITS)
def test_worker_unit_is_enabled_and_running(host, unit):
    service = host.service(unit)
    assert service.is_enabled
    assert service.is_running


def test_each_worker_consumes_its_queues(host, nodename):
    replies = inspect(host, "active_queues", nodename)
    consumed = {node.split("@")[0]: sorted(q["name"] for q in queues) for node, queues in replies.items()}
    assert consumed == {name: spec["queues"] for name, spec in EXPECTED.items()}


def test_each_worker_runs_its_pool_concurrency_and_prefetch(host, nodename):
    implementations = {"threads": "celery.concurrency.thread:TaskPool", "prefork": "celery.concurrency.prefork:TaskPool"}
    stats = inspect(host, "stats", nodename)
    for name, spec in EXPECTED.items():
        pool = stats[f"{name}@{nodename}"]["pool"]
        assert pool["implementation"] == implementations[spec["pool"]], name
        # The broker lets each worker hold concurrency x prefetch multiplier unacked messages.
        expected_prefetch = pool["max-concurrency"] * spec["prefetch_multiplier"]
        assert stats[f"{name}@{nodename}"]["prefetch_count"] == expected_prefetch, name
        if "concurrency" in spec:
            assert pool["max-concurrency"] == spec["concurrency"], name
    # Prefork children are recycled and killed at the hard time limit (soft, hard).
    default_pool = stats[f"default@{nodename}"]["pool"]
    assert default_pool["max-tasks-per-child"] == scenario_setting("celery_worker", "celery_worker_max_tasks_per_child")
    assert default_pool["timeouts"] == [0, scenario_setting("celery_worker", "celery_worker_time_limit")]


def test_welcome_email_lands_in_the_mail_sink(host):
    token = uuid.uuid4().hex
    recipient = f"new-user-{token}@example.com"
    started = time.time() - 1
    task_id = send_welcome_email(host, recipient)
    path = wait_for_maildir_message(host, MAILDIR, recipient, timeout=60)
    assert path, f"the welcome email to {recipient} did not reach {MAILDIR} within 60 s"
    message = host.file(path).content_string
    assert "Subject: Welcome!" in message
    assert f"To: {recipient}" in message
    assert "From: welcome@example.org" in message
    assert f"{task_id}] succeeded" in journal(host, "celery-worker@email", started)


def test_stop_is_a_warm_shutdown_bounded_above_the_time_limit(host):
    for unit in UNITS:
        props = host.check_output("systemctl show %s -p KillMode -p KillSignal -p TimeoutStopUSec -p Restart", unit)
        values = dict(line.split("=", 1) for line in props.splitlines())
        assert values["KillMode"] == "mixed"
        assert values["KillSignal"] == "15"
        assert systemd_seconds(values["TimeoutStopUSec"]) > 300
        assert values["Restart"] == "always"


def test_stopped_worker_finishes_its_running_task(host):
    """SMTP is frozen while the email worker holds a task; systemctl stop must wait for
    the task (warm shutdown), which completes once SMTP answers again."""
    token = uuid.uuid4().hex
    recipient = f"warm-{token}@example.com"
    started = time.time() - 1
    # Debian 12 runs Postfix in postfix@-.service, Debian 13 in postfix.service: freeze
    # every process of the unit that holds the SMTP listener.
    master = host.check_output("ss -Hltnp 'sport = :25' | grep -o 'pid=[0-9]*' | head -n1 | cut -d= -f2")
    smtp_unit = host.check_output("ps -o unit= -p %s", master)
    host.check_output("systemctl kill --signal=SIGSTOP %s", smtp_unit)
    try:
        task_id = send_welcome_email(host, recipient)
        host.run_expect(
            [0],
            "timeout 20 sh -c 'until journalctl -o cat -u celery-worker@email --since @%s | grep -qF \"%s] received\";"
            " do sleep 0.3; done'",
            str(int(started)),
            task_id,
        )
        host.check_output("systemctl stop --no-block celery-worker@email")
        time.sleep(3)
        # Still waiting for the task that waits for SMTP (EMAIL_TIMEOUT is 10 s).
        assert host.check_output("systemctl show -p ActiveState --value celery-worker@email") == "deactivating"
    finally:
        host.check_output("systemctl kill --signal=SIGCONT %s", smtp_unit)
    host.run_expect(
        [0], "timeout 60 sh -c 'until systemctl show -p ActiveState --value celery-worker@email | grep -qx inactive; do sleep 0.5; done'"
    )
    log = journal(host, "celery-worker@email", started)
    assert f"{task_id}] succeeded" in log
    assert host.check_output("systemctl show -p Result --value celery-worker@email") == "success"
    assert wait_for_maildir_message(host, MAILDIR, recipient, timeout=30)
    host.check_output("systemctl start celery-worker@email")


def test_units_are_sandboxed_and_run_as_the_app_user(host):
    for unit in [*UNITS, "celery-beat", "celery-flower"]:
        props = host.check_output(
            "systemctl show %s -p User -p NoNewPrivileges -p ProtectSystem -p PrivateTmp -p ProtectHome", unit
        )
        values = dict(line.split("=", 1) for line in props.splitlines())
        assert values == {
            "User": scenario_setting("django_app", "django_app_user"),
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "PrivateTmp": "yes",
            "ProtectHome": "yes",
        }, unit


def test_beat_runs_on_the_beat_host_only(host, is_main):
    beat = host.service("celery-beat")
    assert beat.is_running == is_main
    assert beat.is_enabled == is_main


def test_flower_runs_on_its_host_only_with_credentials_in_a_private_file(host, hostvars, is_main, app_group):
    flower = host.service("celery-flower")
    assert flower.is_running == is_main
    assert flower.is_enabled == is_main
    roles = ("django_app", "celery_worker")
    env_file = host.file(host_variable(hostvars["inventory_hostname"], "celery_worker__flower_env_file", roles))
    assert env_file.exists == is_main
    if is_main:
        assert (env_file.user, env_file.group, env_file.mode) == ("root", app_group, 0o640)
        pid = host.check_output("systemctl show -p MainPID --value celery-flower")
        assert FLOWER_PASSWORD not in host.file(f"/proc/{pid}/cmdline").content_string
        assert FLOWER_PASSWORD not in host.check_output("systemctl cat celery-flower")


def test_flower_needs_credentials_and_shows_the_workers(host, peer, is_main, nodename):
    if not is_main:
        pytest.skip("Flower runs on the first worker host")
    base = f"http://{address(host)}:5555"
    assert http_request(peer, f"{base}/api/workers", expect=None).status == 401
    assert http_request(peer, f"{base}/api/workers", auth=(FLOWER_USER, "wrong-password-123456"), expect=None).status == 401
    workers = http_request(peer, f"{base}/api/workers?refresh=1", auth=(FLOWER_USER, FLOWER_PASSWORD), expect=200).json()
    assert sorted(workers) == sorted(f"{name}@{nodename}" for name in EXPECTED)
    assert "Flower" in http_request(peer, f"{base}/workers", auth=(FLOWER_USER, FLOWER_PASSWORD), expect=200).body


def test_flower_port_is_dropped_for_hosts_outside_the_allow_list(host, is_main):
    if not is_main:
        pytest.skip("Flower runs on the first worker host")
    controller = testinfra.get_host("local://")
    assert tcp_probe(controller, address(host), 5555) == "timeout"


def test_settings_change_restarted_the_units_and_kept_the_env_private(host, hostvars, app_group):
    env = host.file(app_env_file(hostvars["inventory_hostname"]))
    assert (env.user, env.group, env.mode) == ("root", app_group, 0o640)
    assert 'CBK_SIDE_EFFECT="settings-changed"' in env.content_string
    pid = host.check_output("systemctl show -p MainPID --value celery-worker@default")
    environ = host.file(f"/proc/{pid}/environ").content_string
    assert "CBK_SIDE_EFFECT=settings-changed" in environ


def test_a_release_whose_workers_cannot_start_was_rolled_back(host, nodename):
    """side_effect.yml deployed a release whose Celery module raises on import in a worker: the role put
    current back on the release before, whose workers answer, and failed saying so."""
    record = json.loads(host.file("/var/tmp/celery_worker_side_effect.json").content_string)
    assert record["broken_release"] not in ("", record["before"]) and record["broken_release_succeeded"] is False, record
    assert record["after"] == record["before"], record
    message = record["rollback_message"]
    assert "did not all answer a ping" in message and "Rolled back: current points at" in message, message
    assert record["before"].rsplit("/", 1)[1] in message
    assert sorted(inspect(host, "ping", nodename)) == sorted(f"{name}@{nodename}" for name in EXPECTED)
