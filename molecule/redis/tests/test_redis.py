"""The redis role: a Celery broker only the app's hosts can reach, only its ACL users can
use, each with only the commands it needs; durable across restarts; TLS-only where enabled.
The same on either engine (redis_engine): Redis, or Valkey with its own unit and paths.

Every instance is a Redis (or Valkey) server, and the instance its probe_client names
(molecule.yml) is its client, so the network checks and the Celery round trips run on that
peer and cross the firewall. cbk-redis-debian13 and cbk-redis-valkey run TLS only;
cbk-redis-debian12 plain text."""

import hashlib
import time

import pytest
import testinfra
from cbk_testlib import (
    address,
    broker_entry,
    broker_port,
    direct,
    inventory_host,
    journal,
    other_hosts,
    redis_cli,
    redis_engine,
    redis_engine_name,
    role_defaults,
    tcp_probe,
)

PROBE_DIR = "/opt/cbk-probe"
PROBE_CA = f"{PROBE_DIR}/redis-ca.crt"
PLAIN_PORT, TLS_PORT = broker_port("redis", "plain"), broker_port("redis", "tls")
# The Debian package versions each engine comes in, by release (tests the pin's effect).
PACKAGE_VERSIONS = {"redis": {"12": "5:7.0.", "13": "5:8.0."}, "valkey": {"13": "8.1."}}
# The instances share the docker host's clock. Journal entries before this moment come
# from the Ansible runs (converge, idempotence, side effect); later ones from these tests,
# whose own commands carry the test passwords.
SESSION_START = int(time.time())


class Broker:
    """The instance under test as its clients see it."""

    def __init__(self, host):
        variables = host.ansible.get_variables()
        self.host = direct(host)
        # The engine's unit, user and paths (the role's engine table), and the peer's cli.
        self.engine_name = redis_engine_name(variables)
        self.engine = redis_engine(variables)
        self.client = inventory_host(variables["probe_client"])
        self.client_engine = redis_engine(self.client.ansible.get_variables())
        self.acl_file = f"{self.engine['config_dir']}/users.acl"
        # Everything the server and its unit read, where a clear-text password must never be.
        self.secret_free_paths = (
            self.engine["config_dir"],
            self.engine["data_dir"],
            f"/etc/systemd/system/{self.engine['server']}.service.d",
        )
        self.tls = bool(variables.get("redis_tls_enabled", False))
        self.port = TLS_PORT if self.tls else PLAIN_PORT
        self.ip = address(host)
        self.appendfsync = variables.get("redis_appendfsync", "everysec")
        self.maxmemory = variables.get("redis_maxmemory")  # None: the default, half the RAM
        self.passwords = {
            "celery": variables["redis_app_password"],
            "admin": variables["redis_admin_password"],
            "monitor": variables["redis_monitor_password"],
        }

    def cli(self, client, *args, user=None, password=None, tls=None, ca=PROBE_CA, port=None, stdin=()):
        """The client's cli against this instance (cbk_testlib.redis_cli); with stdin (lines,
        one command each), the cli runs them on one connection."""
        tls = self.tls if tls is None else tls
        return redis_cli(
            client, *args, user=user, password=password, server=self.ip, port=port or self.port,
            tls=tls, ca=ca, engine=self.client_engine, lines=stdin,
        )

    def as_user(self, client, user, *args):
        return self.cli(client, *args, user=user)

    def url(self, user="celery"):
        scheme = broker_entry("redis")["tls_scheme" if self.tls else "scheme"]
        return f"{scheme}://{user}:{self.passwords[user]}@{self.ip}:{self.port}/0"

    def probe(self, client, *args):
        """Run molecule/redis/files/celery_probe.py on client against this instance (over TLS
        with its CA when the instance serves TLS)."""
        return client.check_output(
            "cd %s && env PROBE_URL=%s PROBE_CA=%s venv/bin/python celery_probe.py " + " ".join(["%s"] * len(args)),
            PROBE_DIR,
            self.url(),
            PROBE_CA if self.tls else "",
            *args,
        )

    def wait_ready(self, client):
        """Wait until Redis answers again (it says LOADING while it replays the AOF)."""
        for _ in range(60):
            if self.as_user(client, "monitor", "PING") == "PONG":
                return
            self.host.run("sleep 0.5")
        pytest.fail("Redis did not come back")


@pytest.fixture(scope="module")
def broker(host):
    return Broker(host)


@pytest.fixture(scope="module")
def peer(broker):
    """The instance's client (its probe_client)."""
    return direct(broker.client)


@pytest.fixture(scope="module")
def node(host):
    """The instance under test, for commands and files (faster than the Ansible backend)."""
    return direct(host)


def acl_log_entries(broker, client, user):
    """(reason, object) of each ACL LOG entry about user (redis-cli prints fields one per line)."""
    lines = broker.as_user(client, "admin", "ACL", "LOG", "128").splitlines()
    entries, current = [], {}
    for key, value in zip(lines, lines[1:]):
        if key in ("reason", "object", "username"):
            current[key] = value
        if key == "username":
            if value == user:
                entries.append((current.get("reason"), current.get("object")))
            current = {}
    return entries


# --- Package and service -----------------------------------------------------------------


def test_redis_comes_from_the_debian_release(node, broker):
    server = broker.engine["server"]
    expected = PACKAGE_VERSIONS[broker.engine_name][node.system_info.release.split(".")[0]]
    assert node.package(server).version.startswith(expected)
    policy = node.check_output("apt-cache policy %s", server)
    assert "990" in policy, "the apt pin to Debian's archive is not in effect"
    # One engine per host: another's server would want the same ports, and hold the data.
    for name, engine in role_defaults("redis", "vars")["redis__engines"].items():
        if name != broker.engine_name:
            assert not node.package(engine["server"]).is_installed, name


def test_service_runs_with_the_hardening_drop_in(node, broker):
    service = node.service(broker.engine["server"])
    assert service.is_running
    assert service.is_enabled
    props = dict(
        line.split("=", 1)
        for line in node.check_output(
            "systemctl show %s -p NoNewPrivileges -p ProtectSystem -p PrivateTmp "
            "-p LimitNOFILE -p ReadWritePaths -p UMask -p User -p CapabilityBoundingSet",
            broker.engine["server"],
        ).splitlines()
    )
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["PrivateTmp"] == "yes"
    assert props["LimitNOFILE"] == "65536"
    assert props["UMask"] == "0027"
    assert props["User"] == broker.engine["user"]
    assert props["CapabilityBoundingSet"] == ""
    # Debian's unit lets the server write /etc/redis (and /var/log/redis; Valkey's the same in
    # /etc/valkey, /var/log/valkey); the drop-in does not.
    assert props["ReadWritePaths"].split() == [broker.engine["data_dir"], "-" + broker.engine["run_dir"]]


def test_redis_cannot_write_its_own_configuration(node, peer, broker):
    # Ansible is the source of truth: CONFIG REWRITE and ACL SAVE fail even for the admin.
    assert broker.as_user(peer, "admin", "CONFIG", "REWRITE").startswith("ERR")
    assert broker.as_user(peer, "admin", "ACL", "SAVE").startswith("ERR")


# --- Files on disk -------------------------------------------------------------------------


def test_configuration_is_root_owned_and_not_world_readable(node, broker):
    engine, group = broker.engine, broker.engine["user"]
    directory = node.file(engine["config_dir"])
    assert (directory.user, directory.group, directory.mode) == ("root", group, 0o750)
    for path in (engine["config_file"], broker.acl_file):
        config = node.file(path)
        assert (config.user, config.group, config.mode) == ("root", group, 0o640), path
    data = node.file(engine["data_dir"])
    assert (data.user, data.group, data.mode) == (group, group, 0o750)
    # Package upgrades re-apply these instead of Debian's server-owned modes.
    overrides = node.check_output("dpkg-statoverride --list").splitlines()
    assert f"root {group} 750 {engine['config_dir']}" in overrides
    assert f"root {group} 640 {engine['config_file']}" in overrides


def test_no_clear_text_password_on_disk_or_in_logs(node, broker):
    for user, password in broker.passwords.items():
        paths = broker.secret_free_paths
        found = node.run("grep -rlF -e %s" + " %s" * len(paths), password, *paths)
        assert found.rc == 1, f"{user}'s password in clear text in {found.stdout}"
        # Ansible modules log their arguments to the journal unless no_log hides them.
        logged = node.run("journalctl --no-pager -o cat --until @%s | grep -cF -e %s", str(SESSION_START), password)
        assert logged.stdout.strip() == "0", f"{user}'s password is in the journal"
        digest = hashlib.sha256(password.encode()).hexdigest()
        assert f"user {user} on #{digest} " in node.file(broker.acl_file).content_string
    config = node.file(broker.engine["config_file"]).content_string
    assert "requirepass" not in config
    assert "masterauth" not in config
    assert "rename-command" not in config


# --- Authentication and authorisation -----------------------------------------------------


def test_unauthenticated_clients_get_noauth(peer, broker):
    assert broker.cli(peer, "PING").startswith("NOAUTH")


@pytest.mark.parametrize("password", ["", "anything", "test-admin-Hb3mK8cJf5dR1gVe"])
def test_default_user_cannot_log_in(peer, broker, password):
    assert "WRONGPASS" in broker.cli(peer, "AUTH", "default", password)
    assert "WRONGPASS" in broker.cli(peer, "HELLO", "2", "AUTH", "default", password)


def test_each_user_logs_in_with_its_password_only(peer, broker):
    for user in broker.passwords:
        assert broker.as_user(peer, user, "PING") == "PONG", user
        assert "WRONGPASS" in broker.cli(peer, "PING", user=user, password="wrong-password-123456")


@pytest.mark.parametrize(
    "command",
    [
        ["CONFIG", "GET", "maxmemory"],
        ["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
        ["FLUSHALL"],
        ["FLUSHDB"],
        ["DEBUG", "SLEEP", "0"],
        ["MODULE", "LIST"],
        ["ACL", "LIST"],
        ["ACL", "SETUSER", "celery", "+@all"],
        ["KEYS", "*"],
        ["INFO"],
        ["CLIENT", "LIST"],
        ["SHUTDOWN", "ABORT"],
        ["REPLICAOF", "NO", "ONE"],
        ["BGREWRITEAOF"],
        ["EVAL", "return 1", "0"],
        ["SCRIPT", "FLUSH"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_app_user_is_refused_admin_and_dangerous_commands(peer, broker, command):
    reply = broker.as_user(peer, "celery", *command)
    # DEBUG is switched off for everyone (enable-debug-command no), which Redis checks first.
    assert reply.startswith("NOPERM") or reply.startswith("ERR DEBUG command not allowed"), reply
    # The ACL alone refuses it too, whatever the server settings.
    assert "no permissions" in broker.as_user(peer, "admin", "ACL", "DRYRUN", "celery", *command)


def test_admin_user_may_administer(peer, broker):
    assert broker.as_user(peer, "admin", "ACL", "WHOAMI") == "admin"
    assert broker.as_user(peer, "admin", "CONFIG", "GET", "maxmemory-policy").splitlines() == [
        "maxmemory-policy",
        "noeviction",
    ]
    assert broker.as_user(peer, "admin", "CONFIG", "GET", "appendonly").splitlines()[1] == "yes"
    assert broker.as_user(peer, "admin", "CONFIG", "GET", "appendfsync").splitlines()[1] == broker.appendfsync
    assert broker.as_user(peer, "admin", "CONFIG", "GET", "protected-mode").splitlines()[1] == "yes"
    users = broker.as_user(peer, "admin", "ACL", "LIST")
    assert "user default off" in users
    assert "+@all" not in users.split("user celery", 1)[1].splitlines()[0]
    # Disabled by the server configuration, for everyone.
    assert "DEBUG command not allowed" in broker.as_user(peer, "admin", "DEBUG", "SLEEP", "0")
    assert "MODULE command not allowed" in broker.as_user(peer, "admin", "MODULE", "LOAD", "/nonexistent.so")


def test_memory_is_capped_and_never_evicts(node, peer, broker):
    if broker.maxmemory:
        assert broker.maxmemory == "256mb"  # molecule.yml
        expected = 256 * 1024 * 1024
    else:
        # Ansible's memtotal_mb is MemTotal in MiB; the default is half of it.
        memtotal_mb = int(node.check_output("awk '/^MemTotal:/ {print $2}' /proc/meminfo")) // 1024
        expected = int(memtotal_mb * 0.5) * 1024 * 1024
    assert broker.as_user(peer, "admin", "CONFIG", "GET", "maxmemory").splitlines()[1] == str(expected)
    assert broker.as_user(peer, "admin", "CONFIG", "GET", "maxmemory-policy").splitlines()[1] == "noeviction"


def test_monitor_user_reads_health_only(peer, broker):
    assert "aof_enabled:1" in broker.as_user(peer, "monitor", "INFO", "persistence")
    assert broker.as_user(peer, "monitor", "LLEN", "celery").isdigit()
    assert broker.as_user(peer, "monitor", "SLOWLOG", "LEN").isdigit()
    # The monitoring role's exporter finds each queue's lists by name (SCAN, TYPE, LLEN).
    assert broker.as_user(peer, "monitor", "TYPE", "celery") in ("list", "none")
    assert not broker.as_user(peer, "monitor", "SCAN", "0", "MATCH", "celery*").startswith("NOPERM")
    for command in (["GET", "x"], ["LPUSH", "celery", "x"], ["CONFIG", "GET", "*"], ["CLIENT", "LIST"], ["KEYS", "*"]):
        assert broker.as_user(peer, "monitor", *command).startswith("NOPERM"), command


# --- Celery ------------------------------------------------------------------------------


def test_celery_round_trip_from_the_peer_needs_no_more_than_the_app_acl(peer, broker):
    broker.as_user(peer, "admin", "ACL", "LOG", "RESET")
    assert broker.probe(peer, "roundtrip").splitlines()[-1] == "ok"
    # Nothing Celery, kombu or redis-py sent was refused (redis-py ignores some refusals).
    assert acl_log_entries(broker, peer, "celery") == []


# --- Network -----------------------------------------------------------------------------


def test_redis_listens_on_the_configured_addresses_only(node, broker):
    listeners = node.check_output("ss -Htln 'sport = :%s'", str(broker.port)).splitlines()
    local = sorted(line.split()[3].rsplit(":", 1)[0] for line in listeners)
    assert local == sorted(["127.0.0.1", broker.ip])


def test_port_is_open_to_the_peer_and_closed_to_others(host, node, peer, broker):
    assert tcp_probe(peer, broker.ip, broker.port) == "open"
    # The docker host shares the network but is in no allow-list.
    assert tcp_probe(testinfra.get_host("local://"), broker.ip, broker.port) == "timeout"
    # Nor is an instance that is not this one's client.
    peer_name = broker.client.backend.get_hostname()
    for other in other_hosts(host):
        if other.backend.get_hostname() != peer_name:
            assert tcp_probe(direct(other), broker.ip, broker.port) == "timeout", other.backend.get_hostname()


def test_plain_text_is_refused_when_tls_is_on(node, peer, broker):
    if not broker.tls:
        assert tcp_probe(node, "127.0.0.1", TLS_PORT) == "refused"
        pytest.skip("plain-text instance")
    # `port 0`: nothing listens on the plain port, and the firewall does not open it.
    assert tcp_probe(node, "127.0.0.1", PLAIN_PORT) == "refused"
    assert tcp_probe(peer, broker.ip, PLAIN_PORT) == "timeout"
    # Plain text to the TLS port gets no answer.
    assert "PONG" not in broker.cli(peer, "PING", user="celery", tls=False)
    # A client that trusts other CAs only (the peer's system store lacks the kit CA) refuses
    # the server; with the kit CA, it works.
    assert "PONG" not in broker.cli(peer, "PING", user="celery", ca=None)
    assert broker.cli(peer, "PING", user="celery") == "PONG"
    assert broker.as_user(peer, "admin", "CONFIG", "GET", "port").splitlines()[1] == "0"
    assert broker.as_user(peer, "admin", "CONFIG", "GET", "tls-auth-clients").splitlines()[1] == "no"


def test_kernel_settings_are_skipped_in_containers(node):
    # /proc/sys is read-only here: the base hook must not persist what it could not apply.
    assert not node.file("/etc/sysctl.d/60-redis.conf").exists


# --- Durability (restarts Redis: keep last) -------------------------------------------------


def test_app_transactions_survive_a_restart(node, peer, broker):
    """kombu records each message a worker holds with MULTI/EXEC (its `unacked` hash).
    Redis replays the AOF as the default user and drops a transaction that user may not
    run, which would lose every held message at a restart (redis#14541)."""
    key = f"cbk-test-unacked-{time.time_ns()}"
    # That user may run everything, so it must stay unusable: off, no empty password.
    default = broker.as_user(peer, "admin", "ACL", "GETUSER", "default").splitlines()
    assert "off" in default and "nopass" not in default, default
    transaction = ["MULTI", f"HSET {key} tag message", f"ZADD {key}-index 1 tag", "EXEC"]
    try:
        replies = broker.cli(peer, user="celery", stdin=transaction)
        assert replies.splitlines()[-2:] == ["1", "1"], replies
        restarted = int(time.time())
        node.check_output("systemctl restart %s", broker.engine["server"])
        broker.wait_ready(peer)
        assert broker.as_user(peer, "celery", "HGET", key, "tag") == "message"
        assert broker.as_user(peer, "celery", "ZRANGE", f"{key}-index", "0", "-1") == "tag"
        log = journal(node, broker.engine["server"], restarted)
        assert "AOF-loading-client" not in log, "Redis refused part of its append-only file at start"
    finally:
        broker.as_user(peer, "celery", "DEL", key, f"{key}-index")


def test_queued_task_survives_a_restart(node, peer, broker):
    task_id = broker.probe(peer, "send").splitlines()[-1]
    node.check_output("systemctl restart %s", broker.engine["server"])
    broker.wait_ready(peer)
    assert broker.probe(peer, "collect", task_id).splitlines()[-1] == "42"
