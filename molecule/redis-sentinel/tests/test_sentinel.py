"""roles/redis with redis_sentinel: one primary, two replicas, three Sentinels.

The tests run once each, from the controller, against the three containers over docker
exec, in file order: the topology and ACL checks first, then the failover (a halt of the
primary), the old primary's return (`docker start`), a converge after both, and a second
failover under a Celery task load through the Sentinels (ha_testlib)."""

import json
import os
import re
import subprocess
import time
import uuid

import pytest
from cbk_testlib import (
    OTHER_CA_ONLY,
    ansible_playbook,
    broker_entry,
    broker_port,
    docker_host,
    packet_capture,
    platform_addresses,
    redis_cli,
    role_defaults,
    scenario_setting,
    scenario_variables,
    wait_until,
)
from cbk_testlib import redis_password as password
from ha_testlib import CONCURRENCY, REPO, WORKERS, HALoad, halt

NODES = platform_addresses()
# TLS only (molecule.yml): Redis on its TLS port, the Sentinels on theirs, plain text closed.
TLS = scenario_setting("redis", "redis_tls_enabled")
PLAIN_PORT = broker_port("redis", "plain")
REDIS_PORT = broker_port("redis", "tls") if TLS else PLAIN_PORT
SENTINEL_PORT = broker_port("redis", "sentinel")
MASTER = scenario_setting("redis", "redis_sentinel_master_name")
# The kit CA in each node's trust store (base role), and its copy on the controller.
HOST_CA = role_defaults("base")["base_tls_ca_path"]
CONTROLLER_CA = f"{scenario_variables()['base_tls_kit_ca_dir']}/ca.crt"
# down-after-milliseconds (5 s) plus the election: a few seconds; the bound leaves room
# for a loaded CI machine.
ELECTION_BOUND = 30
TASKS, PER_SECOND, STOP_AFTER = 300, 20, 100
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
            "/etc/redis/replication.conf": ("root", "redis", 0o640),
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


def test_a_tls_change_of_the_running_group_is_refused_before_any_change():
    """The Sentinels' state files hold their peers' ports: the role stops, naming the steps."""
    playbook = os.path.join(os.path.dirname(__file__), os.pardir, "converge.yml")
    before = {name: node(name).check_output("sha256sum /etc/redis/redis.conf") for name in NODES}
    returncode, _, output, _ = ansible_playbook(
        playbook, "--check", "--skip-tags", "cbk-base", "-e", json.dumps({"redis_tls_enabled": not TLS})
    )
    assert returncode != 0 and "so a running group cannot change them in place" in output, output[-3000:]
    assert "set redis_sentinel_initial_primary to the host at " + NODES["cbk-redis-sentinel-n1"] in output
    assert {name: node(name).check_output("sha256sum /etc/redis/redis.conf") for name in NODES} == before


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


def test_old_primary_returns_as_a_replica_of_the_new_one(failover):
    old, new = failover["old"], failover["primary"]
    subprocess.run(["docker", "start", old], check=True, capture_output=True)

    def replicating():
        try:
            state = info(old)
        except Exception:  # noqa: BLE001 (still booting)
            return False
        return (
            state.get("role") == "slave"
            and state.get("master_host") == NODES[new]
            and state.get("master_link_status") == "up"
        )

    wait_until(replicating, 60, f"{old} a replica of {new} with its link up")
    wait_until(
        lambda: all(primary_by_sentinel(name, "127.0.0.1") == [NODES[new]] for name in NODES),
        30,
        f"every Sentinel names {new}",
    )


# --- (f) a converge after the failover ------------------------------------------------------------


def test_converge_after_the_failover_keeps_the_new_primary_and_restarts_nothing(failover):
    new = failover["primary"]
    playbook = os.path.join(os.path.dirname(__file__), os.pardir, "converge.yml")
    returncode, stdout, _, recap = ansible_playbook(playbook, "--skip-tags", "cbk-base")
    assert returncode == 0, stdout[-6000:]
    changed = {name: changed for name, (changed, _) in recap.items()}
    print(f"changed per host: {changed}")
    assert info(new)["role"] == "master"
    assert all(primary_by_sentinel(name, "127.0.0.1") == [NODES[new]] for name in NODES)
    for name, pid in failover["pids"].items():
        assert main_pid(name) == pid, f"redis-server restarted on {name}"


# --- (g) a failover under a Celery task load ---------------------------------------------------


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


def test_failover_under_a_celery_load_loses_only_tasks_popped_as_the_primary_went_down(failover, tmp_path):
    old = failover["primary"]
    scheme = broker_entry("redis")["sentinel_scheme"]
    url = ";".join(f"{scheme}://celery:{password('celery')}@{ip}:{SENTINEL_PORT}/0" for ip in NODES.values())
    sentinel = {"master_name": MASTER, "username": "celery-sentinel", "password": password("celery-sentinel"), "tls": TLS}
    load = HALoad(tmp_path, url, sentinel=sentinel, ca_file=CONTROLLER_CA if TLS else None)
    load.start_workers()
    survivors = [name for name in NODES if name != old]

    def elected():
        answers = {tuple(primary_by_sentinel(name, "127.0.0.1")) for name in survivors}
        return len(answers) == 1 and answers != {(NODES[old],)} and next(iter(answers))[0]

    try:
        sent, refused = load.publish("ha.record", TASKS, PER_SECOND, after=STOP_AFTER, action=lambda: halt(old))
        new = next(name for name, ip in NODES.items() if ip == wait_until(elected, ELECTION_BOUND + 30, "a new primary"))
        # Tasks the workers logged as popped but unrecorded (below) cannot run: not waited for.
        expected = set(sent) - set(load.unrecorded())
        runs = load.wait_for_runs(expected, timeout=120)
        held = 0
        if expected - runs.keys():
            held = age_held_messages(new)
            runs = load.wait_for_runs(expected, timeout=120)
    finally:
        load.stop_workers()
        subprocess.run(["docker", "start", old], check=True, capture_output=True)
    lost = [task for task in sent if task not in runs]
    unrecorded = load.unrecorded()
    twice = {task: count for task, count in runs.items() if count > 1}
    # The numbers first: a CI summary keeps only the start of the assertion message.
    report = {
        "lost": len(lost),
        "lost_between_pop_and_unacked_record": len(set(lost) & set(unrecorded)),
        "ran_more_than_once": len(twice),
        "refused": refused,
        "held_until_aged": held,
        "sent": len(sent),
        "ran_but_not_sent": len(runs.keys() - set(sent)),
        "stopped": old,
        "new_primary": new,
    }
    (REPO / "artifacts" / "ha").mkdir(parents=True, exist_ok=True)
    (REPO / "artifacts" / "ha" / "redis-sentinel.json").write_text(json.dumps(report, indent=2) + "\n")
    assert not refused, report
    # Kombu's Redis transport pops a message, then records it as unacked: a task popped from the
    # halted primary just before it went down is lost (ha_load logs it). That window holds at most
    # one message per worker's consumer connection; any other loss fails here.
    assert set(lost) <= set(unrecorded) and len(unrecorded) <= WORKERS, report
    assert len(twice) <= WORKERS * CONCURRENCY * 2, report
