"""The backup role's copies of the brokers' data: RabbitMQ's definitions (debian12) and a Redis
snapshot (debian13) go to the backup host over TLS on a timer, only root reads them there, the
oldest go, and playbooks/restore.yml puts each back (the restore drills). Their figures go to
artifacts/backup/broker-restores.json."""

import json
import os
import time
from pathlib import Path

import pytest
from cbk_testlib import (
    ansible_playbook,
    broker_entry,
    broker_port,
    http_request,
    inventory_host,
    redis_admin,
    redis_engine,
    role_defaults,
    scenario_setting,
    scenario_variables,
)

testinfra_hosts = ["ansible://backup"]

PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
RESTORE_PLAYBOOK = PROJECT / "playbooks" / "restore.yml"
RESULTS = PROJECT / "artifacts" / "backup" / "broker-restores.json"
BACKUP_VARS = role_defaults("backup", "vars")
KINDS = BACKUP_VARS["backup__broker_kinds"]
BROKERS = list(KINDS)
AOF_DIR = role_defaults("redis", "vars")["redis__aof_dir"]
# Keys written before, and after, the Redis copy in the drill.
EACH = 25


def broker_host(host, name):
    (host_name,) = host.backend.ansible_runner.get_hosts(broker_entry(name)["group"])
    return inventory_host(host_name)


def copy_dir(name):
    return f"{BACKUP_VARS['backup__broker_dir']}/{name}"


def copies(host, name):
    """The broker's copies on the repository host, oldest first (their names sort by time)."""
    return sorted(host.check_output("ls -1 %s", copy_dir(name)).split())


def take_copy(host, name):
    """One copy through the service, as the timer takes it; the new copy's name."""
    before = set(copies(host, name))
    time.sleep(1)  # the names have the time to the second
    host.check_output("systemctl start %s@%s.service", BACKUP_VARS["backup__broker_service"], name)
    (new,) = set(copies(host, name)) - before
    return new


def restore(name, confirm, extra=None):
    """playbooks/restore.yml for the broker: (return code, output, folded output, seconds)."""
    started = time.monotonic()
    returncode, output, folded, _ = ansible_playbook(
        RESTORE_PLAYBOOK,
        "-e",
        json.dumps({"backup_restore_source": name, "backup_restore_confirm": confirm, **(extra or {})}),
    )
    return returncode, output, folded, time.monotonic() - started


def record(name, figures):
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({**results, name: figures}, indent=2) + "\n")


@pytest.fixture(scope="module", autouse=True)
def fresh_results():
    """This run's figures only."""
    RESULTS.unlink(missing_ok=True)


@pytest.mark.parametrize("name", BROKERS)
def test_each_broker_is_copied_on_a_timer_into_a_directory_only_root_reads(host, name):
    timer = host.service(f"{BACKUP_VARS['backup__broker_service']}-{name}.timer")
    assert timer.is_enabled and timer.is_running
    directory = host.file(copy_dir(name))
    assert (directory.user, directory.mode) == ("root", 0o700)
    latest = copies(host, name)[-1]
    assert latest.startswith(KINDS[name]["what"] + "-") and latest.endswith("." + KINDS[name]["suffix"])
    secret = host.file(f"{BACKUP_VARS['backup__broker_config_dir']}/{name}.auth")
    assert (secret.user, secret.mode) == ("root", 0o600)


def test_the_definitions_copy_holds_the_app_vhost_and_accounts(host):
    latest = copies(host, "rabbitmq")[-1]
    definitions = json.loads(host.check_output("cat %s/%s", copy_dir("rabbitmq"), latest))
    assert scenario_setting("rabbitmq", "rabbitmq_app_vhost") in {vhost["name"] for vhost in definitions["vhosts"]}
    users = {user["name"] for user in definitions["users"]}
    assert {
        scenario_setting("rabbitmq", f"rabbitmq_{account}_user") for account in ("app", "admin", "monitoring")
    } <= users
    assert definitions["policies"], definitions


def test_the_snapshot_copy_is_a_redis_rdb_file(host):
    latest = copies(host, "redis")[-1]
    assert host.check_output("head -c 5 %s/%s", copy_dir("redis"), latest) == "REDIS"


@pytest.mark.parametrize("name", BROKERS)
def test_a_copy_records_its_time_for_prometheus_and_the_oldest_go(host, name):
    """Past the retention the oldest copies go, and only copies: a file of another name stays."""
    metrics_dir = BACKUP_VARS["backup__metrics_dir"]
    other_file = f"{copy_dir(name)}/notes.txt"
    host.check_output("install -d -m 0755 %s && touch %s", metrics_dir, other_file)
    try:
        started = time.time()
        for _ in range(scenario_setting("backup", "backup_broker_retention") + 1):
            take_copy(host, name)
        metrics = host.file(f"{metrics_dir}/{BACKUP_VARS['backup__metrics_file'].format(source=name)}").content_string
        assert host.file(other_file).exists
    finally:
        host.check_output("rm -rf %s %s", metrics_dir, other_file)
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if not line.startswith("#"))
    labels = f'{{source="{name}",host="{broker_host(host, name).backend.get_hostname()}"}}'
    assert started - 1 <= float(values[f"cbk_backup_last_success_timestamp_seconds{labels}"]) <= time.time(), values
    assert int(values[f"cbk_backup_max_age_seconds{labels}"]) == scenario_setting(
        "backup", "backup_broker_max_age_seconds"
    )
    suffix = "." + KINDS[name]["suffix"]
    assert len([copy for copy in copies(host, name) if copy.endswith(suffix)]) == scenario_setting(
        "backup", "backup_broker_retention"
    )


def test_restore_rabbitmq_definitions_after_an_account_and_the_policies_are_lost(host):
    """The monitoring account and the app vhost's policies are deleted after the copy; the
    restore puts them back, the account with its password."""
    rabbitmq = broker_host(host, "rabbitmq")
    vhost = scenario_setting("rabbitmq", "rabbitmq_app_vhost")
    monitoring = scenario_setting("rabbitmq", "rabbitmq_monitoring_user")

    def policies():
        listed = rabbitmq.check_output("rabbitmqctl -q list_policies -p %s --formatter json", vhost)
        return sorted(policy["name"] for policy in json.loads(listed))

    def has_monitoring_account():
        users = json.loads(rabbitmq.check_output("rabbitmqctl -q list_users --formatter json"))
        return monitoring in {user["user"] for user in users}

    take_copy(host, "rabbitmq")
    lost = policies()
    assert lost
    for policy in lost:
        rabbitmq.check_output("rabbitmqctl -q clear_policy -p %s %s", vhost, policy)
    rabbitmq.check_output("rabbitmqctl -q delete_user %s", monitoring)
    assert not policies() and not has_monitoring_account()

    returncode, output, _, seconds = restore("rabbitmq", rabbitmq.backend.get_hostname())
    assert returncode == 0, output[-3000:]

    restored = policies()
    assert restored == lost and has_monitoring_account()
    # Its password too: a login by the name its certificate carries, as the copies reach it.
    http_request(
        host,
        f"https://{rabbitmq.backend.get_hostname()}:{broker_port('rabbitmq', 'management')}/api/whoami",
        auth=(monitoring, scenario_variables()["rabbitmq_monitoring_password"]),
    )
    record(
        "rabbitmq",
        {
            "restore_playbook_seconds": round(seconds, 1),
            "policies_lost": len(lost),
            "policies_restored": len(restored),
            "accounts_lost": 1,
            "accounts_restored": int(has_monitoring_account()),
        },
    )


def test_restore_redis_from_a_snapshot(host):
    """Keys written before the copy are back after the restore, those written after it are not,
    and the data replaced is kept beside the new."""
    redis = broker_host(host, "redis")
    before = [f"cbk:drill:before-copy:{n}" for n in range(EACH)]
    after = [f"cbk:drill:after-copy:{n}" for n in range(EACH)]
    redis_admin(redis, "MSET", *[part for key in before for part in (key, "1")])
    take_copy(host, "redis")
    redis_admin(redis, "MSET", *[part for key in after for part in (key, "1")])

    returncode, output, _, seconds = restore("redis", redis.backend.get_hostname())
    assert returncode == 0, output[-3000:]

    restored_before = int(redis_admin(redis, "EXISTS", *before))
    restored_after = int(redis_admin(redis, "EXISTS", *after))
    assert (restored_before, restored_after) == (EACH, 0)
    assert redis.check_output("ls -d %s/%s.before-restore-*", redis_engine()["data_dir"], AOF_DIR)
    record(
        "redis",
        {
            "restore_playbook_seconds": round(seconds, 1),
            "keys_before_copy": EACH,
            "restored_before_copy": restored_before,
            "keys_after_copy": EACH,
            "restored_after_copy": restored_after,
        },
    )


def test_a_broker_restore_refuses_what_it_cannot_do(host):
    """Refused before the broker is touched (the same Redis process, no data moved aside): an
    unknown source, no confirmation, a copy the repository does not have."""
    redis = broker_host(host, "redis")
    name = redis.backend.get_hostname()

    def state():
        run_id = [line for line in redis_admin(redis, "INFO", "server").splitlines() if line.startswith("run_id:")]
        kept = redis.run("ls -d %s/%s.before-restore-*", redis_engine()["data_dir"], AOF_DIR).stdout.split()
        return run_id, kept

    untouched = state()
    cases = [
        ("backup_restore_source must be postgresql or a broker", "memcached", name, {}),
        ("set backup_restore_confirm to", "redis", "", {}),
        (
            "must name one of the repository's copies",
            "redis",
            name,
            {"backup_restore_file": "snapshot-19700101T000000Z.rdb"},
        ),
    ]
    for refusal, source, confirm, extra in cases:
        returncode, output, folded, _ = restore(source, confirm, extra)
        assert returncode != 0 and refusal in folded, output[-3000:]
    assert state() == untouched
