"""The backup role: the db host's cluster archives its WAL to, and is backed up by, the backup
host's pgBackRest repository, over TLS both ways, and playbooks/restore.yml brings it back to a
point in time after its data directory is destroyed (the restore drill). Its figures go to
artifacts/backup/restore.json."""

import json
import os
import tempfile
import time
from pathlib import Path

import jinja2
import pytest
from cbk_testlib import address, ansible_playbook, inventory_host, role_defaults, tcp_probe, wait_until

testinfra_hosts = ["ansible://db"]

PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
RESTORE_PLAYBOOK = PROJECT / "playbooks" / "restore.yml"
DB_PLAYBOOK = PROJECT / "playbooks" / "db.yml"
BACKUP_PLAYBOOK = PROJECT / "playbooks" / "backup.yml"
RESULTS = PROJECT / "artifacts" / "backup" / "restore.json"
BACKUP = role_defaults("backup")
BACKUP_VARS = role_defaults("backup", "vars")
STANZA = BACKUP["backup_postgresql_stanza"]
# Signups in each phase of the drill.
EACH = 25


@pytest.fixture(scope="module")
def repository(host):
    (name,) = host.backend.ansible_runner.get_hosts("backup")
    return inventory_host(name)


@pytest.fixture(scope="module")
def cluster(host):
    """The db host's cluster: its port and database (the inventory's, over the role defaults)."""
    inventory = host.ansible.get_variables()
    defaults = role_defaults("postgresql")
    return {
        "port": str(inventory.get("postgresql_port", defaults["postgresql_port"])),
        "db": inventory.get("postgresql_app_db", defaults["postgresql_app_db"]),
    }


def sql(host, cluster, query):
    """One statement as the postgres user over the local socket; its rows, unaligned."""
    return host.check_output(
        "runuser -u postgres -- psql -X -At -v ON_ERROR_STOP=1 -p %s -d %s -c %s", cluster["port"], cluster["db"], query
    )


def pgbackrest(repository, *args):
    return repository.run("runuser -u postgres -- pgbackrest --stanza=%s" + " %s" * len(args), STANZA, *args)


def sign_up(host, cluster, phase):
    sql(
        host,
        cluster,
        f"INSERT INTO drill_signup (email, phase) SELECT 'user' || n || '@{phase}.example', '{phase}'"
        f" FROM generate_series(1, {EACH}) AS n",
    )


def signups(host, cluster):
    rows = sql(host, cluster, "SELECT phase, count(*) FROM drill_signup GROUP BY phase ORDER BY phase")
    return {phase: int(count) for phase, count in (line.split("|") for line in rows.splitlines())}


def test_wal_archiving_and_both_tls_links_work(repository):
    """pgbackrest check: the cluster switches WAL file, archive-push sends it to the repository's
    server, and the repository reads the cluster through the db host's server."""
    check = pgbackrest(repository, "check")
    assert check.rc == 0, check.stderr


def test_each_pgbackrest_server_lets_in_only_the_other_host(host, repository):
    """The firewall opens the port to the other host only, and the server itself takes only the
    other host's certificate: the db host's own certificate is refused by its own server."""
    port = BACKUP["backup_pgbackrest_port"]
    assert tcp_probe(repository, address(host), port) == "open"
    assert tcp_probe(host, address(repository), port) == "open"
    # The db host, as a client of its own server (no firewall in the way to itself), with its own
    # certificate, which that server does not let in.
    own = host.run(
        "runuser -u postgres -- pgbackrest --stanza=%s --repo1-host=%s info", STANZA, host.backend.get_hostname()
    )
    assert "access denied" in own.stdout + own.stderr, own.stdout + own.stderr


def test_a_backup_records_its_time_for_prometheus(repository):
    """A backup through its service writes when it finished and how old the last may get, where
    node_exporter's textfile collector reads (a directory that the monitoring tier makes)."""
    metrics_dir = BACKUP_VARS["backup__metrics_dir"]
    repository.check_output("install -d -m 0755 %s", metrics_dir)
    try:
        started = time.time()
        repository.check_output("systemctl start %s@diff.service", BACKUP_VARS["backup__service"])
        metrics = dict(
            line.rsplit(" ", 1)
            for line in repository.file(
                f"{metrics_dir}/{BACKUP_VARS['backup__metrics_file'].format(source='postgresql')}"
            ).content_string.splitlines()
            if not line.startswith("#")
        )
    finally:
        repository.check_output("rm -rf %s", metrics_dir)
    (finished,) = [float(value) for name, value in metrics.items() if name.startswith("cbk_backup_last_success")]
    (max_age,) = [int(value) for name, value in metrics.items() if name.startswith("cbk_backup_max_age")]
    assert started - 1 <= finished <= time.time() and max_age == BACKUP["backup_max_age_seconds"], metrics


def test_the_timers_take_full_and_differential_backups(repository):
    for kind in BACKUP_VARS["backup__schedules"]:
        timer = repository.service(f"{BACKUP_VARS['backup__service']}-{kind}.timer")
        assert timer.is_enabled and timer.is_running, kind
    info = json.loads(pgbackrest(repository, "--output=json", "info").stdout)
    assert {backup["type"] for backup in info[0]["backup"]} >= {"full"}, info


def test_a_full_and_a_differential_backup_started_together_both_succeed(repository):
    """As when both timers catch up after downtime: systemctl starts both at once and waits for
    both; the second waits for the first's lock instead of failing on it."""
    service = BACKUP_VARS["backup__service"]
    both = repository.run("systemctl start %s@full.service %s@diff.service", service, service)
    assert both.rc == 0, both.stderr + repository.check_output("journalctl -n 30 -u '%s@*' --no-pager", service)


def test_restore_to_a_point_in_time_after_the_data_directory_is_lost(host, repository, cluster):
    """Signups, a backup, more signups, the point in time, signups after it (archived). The data
    directory is then destroyed, and playbooks/restore.yml restores to the point: the signups
    before it are back, those after it are not, and the server takes writes again."""
    sql(host, cluster, "CREATE TABLE IF NOT EXISTS drill_signup (id serial PRIMARY KEY, email text, phase text)")
    sql(host, cluster, "TRUNCATE drill_signup")
    sign_up(host, cluster, "before-backup")
    repository.check_output("systemctl start %s@diff.service", BACKUP_VARS["backup__service"])
    sign_up(host, cluster, "before-point")
    time.sleep(1)
    point = sql(host, cluster, "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'")
    time.sleep(1)
    sign_up(host, cluster, "after-point")
    # Every WAL file up to here is archived: the signups after the point are in the archive, and
    # only the target keeps them out.
    assert pgbackrest(repository, "check").rc == 0
    data_directory = sql(host, cluster, "SHOW data_directory")
    host.check_output("systemctl stop 'postgresql@*'")
    host.check_output("rm -rf %s", data_directory)

    started = time.monotonic()
    returncode, output, _, _ = ansible_playbook(
        RESTORE_PLAYBOOK,
        "-e",
        json.dumps({"backup_restore_confirm": host.backend.get_hostname(), "backup_restore_target_time": point}),
    )
    restore_seconds = time.monotonic() - started
    assert returncode == 0, output[-3000:]

    restored = signups(host, cluster)
    assert restored == {"before-backup": EACH, "before-point": EACH}, restored
    sql(host, cluster, "INSERT INTO drill_signup (email, phase) VALUES ('new@after-restore.example', 'after-restore')")
    # Archiving goes on, on the restored cluster's new timeline.
    wait_until(lambda: pgbackrest(repository, "check").rc == 0, 60, "pgbackrest check after the restore")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "signups_before_point": 2 * EACH,
                "restored_before_point": restored.get("before-backup", 0) + restored.get("before-point", 0),
                "signups_after_point": EACH,
                "restored_after_point": restored.get("after-point", 0),
                "restore_playbook_seconds": round(restore_seconds, 1),
            },
            indent=2,
        )
        + "\n"
    )


def test_the_restore_refuses_without_confirmation_or_with_a_future_target(host):
    """Refused before PostgreSQL stops: no confirmation, or a point in time not yet reached."""
    confirmed = {"backup_restore_confirm": host.backend.get_hostname()}
    cases = {
        "set backup_restore_confirm to": {},
        "must be in the past and after the oldest backup": {
            **confirmed,
            "backup_restore_target_time": time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime(time.time() + 3600)),
        },
    }
    for refusal, extra_vars in cases.items():
        returncode, output, folded, _ = ansible_playbook(RESTORE_PLAYBOOK, "-e", json.dumps(extra_vars))
        assert returncode != 0 and refusal in folded, output[-3000:]
        assert host.service(f"postgresql@{host.check_output('pg_lsclusters --no-header').split()[0]}-main").is_running


def test_a_broker_no_longer_in_use_has_its_timer_stopped_and_its_files_removed(repository):
    """playbooks/backup.yml with celery_broker rabbitmq (Redis no longer in use): Redis' timer
    stops and its settings, secret and metrics file go, its copies stay; RabbitMQ's timer runs on.
    The scenario's celery_broker brings it all back."""
    service = BACKUP_VARS["backup__broker_service"]
    # The role's vars as Ansible templates them (they name one another), then Redis' name in.
    redis_files = [
        jinja2.Template(path).render(BACKUP_VARS).replace("{}", "redis") for path in BACKUP_VARS["backup__broker_files"]
    ]
    metrics_dir = BACKUP_VARS["backup__metrics_dir"]
    repository.check_output("install -d -m 0755 %s && touch %s", metrics_dir, redis_files[-1])
    try:
        returncode, output, _, _ = ansible_playbook(BACKUP_PLAYBOOK, "-e", json.dumps({"celery_broker": "rabbitmq"}))
        assert returncode == 0, output[-3000:]
        # Stopped, and its unit gone (systemd no longer finds it, so nothing starts it at boot).
        redis_timer = f"{service}-redis.timer"
        assert repository.run("systemctl is-active %s", redis_timer).stdout.strip() == "inactive"
        assert repository.run("systemctl is-enabled %s", redis_timer).stdout.strip() == "not-found"
        assert not [path for path in redis_files if repository.file(path).exists]
        assert repository.check_output("ls %s/redis", BACKUP_VARS["backup__broker_dir"])
        rabbitmq_timer = repository.service(f"{service}-rabbitmq.timer")
        assert rabbitmq_timer.is_running and rabbitmq_timer.is_enabled
    finally:
        repository.check_output("rm -rf %s", metrics_dir)
        returncode, output, _, _ = ansible_playbook(BACKUP_PLAYBOOK)
    assert returncode == 0, output[-3000:]
    assert repository.service(f"{service}-redis.timer").is_running


def test_without_backups_the_db_host_retires_its_pgbackrest_server(host, repository, cluster):
    """Last: playbooks/db.yml for an inventory without a backup group (no repository host) stops
    the db host's pgBackRest server, closes its port (the firewall drops, rather than the host
    refusing) and turns WAL archiving off."""
    # The inventory's allow-lists read the other hosts' addresses: their facts first, as site.yml.
    with tempfile.NamedTemporaryFile("w", suffix=".yml", dir=os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) as playbook:
        playbook.write(json.dumps([{"hosts": "all", "gather_facts": True}, {"import_playbook": str(DB_PLAYBOOK)}]))
        playbook.flush()
        returncode, output, _, _ = ansible_playbook(playbook.name, "-e", json.dumps({"backup_repository_host": ""}))
    assert returncode == 0, output[-3000:]
    assert not host.service(BACKUP_VARS["backup__server_unit"]).is_running
    assert tcp_probe(repository, address(host), BACKUP["backup_pgbackrest_port"]) == "timeout"
    assert sql(host, cluster, "SHOW archive_mode") == "off"
