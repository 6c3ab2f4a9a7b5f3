"""rabbitmq-cluster: three nodes form one cluster; quorum queues survive the loss of their leader.

The failover test runs two Celery workers and a publisher on the docker host (ha_testlib), with
the sample app's settings for the three-node URL list, stops the node leading the task queue
part-way through the load, and then checks every task sent ran, and how often.
"""

import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cbk_testlib import (
    OTHER_CA_ONLY,
    ansible_playbook,
    broker_entry,
    broker_port,
    changed_tasks,
    docker_host,
    failures,
    http_request,
    platform_addresses,
    role_defaults,
    role_fqcn,
    scenario_setting,
    scenario_variables,
    tcp_probe,
    wait_until,
)
from ha_testlib import CONCURRENCY, WORKERS, HALoad, frozen, halt, kill, partitioned, tally, write_report

testinfra_hosts = ["ansible://rabbitmq"]

NODES = {f"rabbit@{name}": ip for name, ip in platform_addresses().items()}
CLUSTER_PORTS = (4369, 25672)
TLS_DIR = role_defaults("rabbitmq", "vars")["rabbitmq__tls_dir"]
VHOST = scenario_setting("rabbitmq", "rabbitmq_app_vhost")
DELIVERY_LIMIT = scenario_setting("rabbitmq", "rabbitmq_app_delivery_limit")
TASKS, PER_SECOND, STOP_AFTER = 300, 20, 100
# The management API, which each node serves on its loopback (plain HTTP).
MANAGEMENT_PORT = broker_port("rabbitmq", "management")


def container(node):
    return node.split("@", 1)[1]


def rabbitmqctl(node, *args):
    """rabbitmqctl on one node's container, JSON output parsed."""
    command = ["docker", "exec", container(node), "rabbitmqctl", "-q", *args, "--formatter", "json"]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def api(node, path, body=None):
    """A call to a node's HTTP API as the administrator, with a JSON body (POST) or none (GET):
    rabbitmqctl list_queues hung on a 3.10 cluster when not --local."""
    response = http_request(
        docker_host(container(node)),
        f"http://127.0.0.1:{MANAGEMENT_PORT}/api/{path}",
        method="POST" if body else "GET",
        headers={"Content-Type": "application/json"},
        body=json.dumps(body) if body else None,
        auth=("admin", scenario_variables()["rabbitmq_admin_password"]),
        timeout=20,
    )
    return response.json()


def queues(node):
    return {queue["name"]: queue for queue in api(node, f"queues/{VHOST}")}


def raft_leader(node, queue):
    """The quorum queue's leader, as its replicas report it to the node (the HTTP API's queue list
    also asks a node that just went away, and hangs for a minute or more): of those that say they
    lead, the one of the highest term. A replica cut off, or just back, may still say it leads, in an
    older term."""
    replicas = subprocess.run(
        [
            "docker",
            "exec",
            container(node),
            # A replica whose node is cut off answers only once the node's connection gives up.
            "timeout",
            "60",
            "rabbitmq-queues",
            "-q",
            "quorum_status",
            "-p",
            VHOST,
            queue,
            "--formatter",
            "json",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    leaders = [replica for replica in json.loads(replicas) if replica["Raft State"] == "leader"]
    return max(leaders, key=lambda replica: int(replica["Term"]), default={}).get("Node Name")


def test_every_node_runs_in_one_cluster(host):
    status = json.loads(host.check_output("rabbitmqctl cluster_status --formatter json"))
    assert sorted(status["running_nodes"]) == sorted(NODES)
    assert not status["partitions"]
    assert status["cluster_name"] == "cbk-rabbitmq-cluster-1"


def test_nodes_share_the_cookie_and_hide_it(host):
    cookie = host.file("/var/lib/rabbitmq/.erlang.cookie")
    assert (cookie.user, cookie.mode) == ("rabbitmq", 0o400)
    digests = {
        subprocess.run(
            ["docker", "exec", container(node), "md5sum", "/var/lib/rabbitmq/.erlang.cookie"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()[0]
        for node in NODES
    }
    assert len(digests) == 1


@pytest.mark.parametrize("port", CLUSTER_PORTS)
def test_cluster_ports_open_to_peers_only(host, port):
    own = host.backend.get_hostname()
    for node, ip in NODES.items():
        if container(node) != own:
            assert tcp_probe(host, ip, port) == "open", f"{own} cannot reach {node} on {port}"
    # The docker host is a client (AMQP), not a peer.
    with pytest.raises(OSError):
        socket.create_connection((NODES[f"rabbit@{own}"], port), timeout=3).close()


def test_nodes_and_cli_tools_reach_each_other_over_mutual_tls(host):
    # rabbitmqctl reaches its node through the Erlang distribution too: this call goes over TLS.
    assert "inet_tls" in host.check_output("rabbitmqctl eval 'init:get_argument(proto_dist).'")
    own = host.backend.get_hostname()
    peer = next(ip for node, ip in NODES.items() if container(node) != own)
    tls = f"openssl s_client -connect {peer}:25672 -verify_return_error -CAfile "
    cert = f" -cert {TLS_DIR}/server.crt -key {TLS_DIR}/server.key"
    with_cert = host.run(tls + f"{TLS_DIR}/ca.crt" + cert + " </dev/null 2>&1")
    # TLS 1.3 refuses a missing client certificate after the handshake: read for a second.
    without_cert = host.run("sleep 1 | " + tls + f"{TLS_DIR}/ca.crt" + " 2>&1")
    other_ca = host.run(tls + OTHER_CA_ONLY + cert + " </dev/null 2>&1")
    assert "Verify return code: 0 (ok)" in with_cert.stdout and "alert" not in with_cert.stdout, with_cert.stdout
    assert re.search("certificate required|handshake failure", without_cert.stdout), without_cert.stdout
    assert other_ca.rc != 0 and "verify error" in other_ca.stdout, other_ca.stdout


def test_clients_reach_every_node_over_amqps_only_by_the_clusters_name():
    """From the docker host, the app's network position: each node's certificate carries the
    cluster's name, which the app checks whichever node it fails over to; plain AMQP is closed."""
    variables = scenario_variables()
    context = ssl.create_default_context(cafile=f"{variables['base_tls_kit_ca_dir']}/ca.crt")
    for node, ip in NODES.items():
        with (
            socket.create_connection((ip, broker_port("rabbitmq", "tls")), timeout=5) as sock,
            context.wrap_socket(sock, server_hostname=variables["rabbitmq_tls_cluster_name"]) as tls,
        ):
            assert tls.version() in ("TLSv1.2", "TLSv1.3"), node
        with pytest.raises(OSError):
            socket.create_connection((ip, broker_port("rabbitmq", "plain")), timeout=3).close()


def converge(*args):
    """The scenario's converge, the rabbitmq scenario's playbook: base role, then rabbitmq role."""
    return ansible_playbook(Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"]).parent / "rabbitmq" / "converge.yml", *args)


def test_changing_the_distribution_kind_of_the_running_cluster_is_refused():
    """Before any change: a node restarted with plain distribution could not rejoin its TLS peers."""
    returncode, _, output, _ = converge("--skip-tags", "cbk-base", "-e", "rabbitmq_erlang_dist_tls=false")
    assert returncode != 0 and "rabbitmq_erlang_dist_tls is false, but the running node" in output, output[-3000:]
    for node in NODES:
        subprocess.run(
            ["docker", "exec", container(node), "grep", "-q", "inet_tls", "/etc/rabbitmq/rabbitmq-env.conf"], check=True
        )


def throwaway_pki(directory, *dns_names):
    """A new CA in directory and a node certificate it signs for dns_names: {cert, key, ca} paths."""
    directory.mkdir()
    new_key = ["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc", "-days", "2"]
    files = {"cert": directory / "node.crt", "key": directory / "node.key", "ca": directory / "ca.crt"}
    for command in (
        [*new_key, "-x509", "-subj", "/CN=throwaway test CA", "-keyout", directory / "ca.key", "-out", files["ca"]],
        [
            *new_key,
            "-CA",
            files["ca"],
            "-CAkey",
            directory / "ca.key",
            "-subj",
            "/CN=node",
            "-keyout",
            files["key"],
            "-addext",
            "subjectAltName=" + ",".join(f"DNS:{name}" for name in dns_names),
            "-out",
            files["cert"],
        ],
    ):
        subprocess.run(command, check=True, capture_output=True)
    return files


# What a refused run must leave as it was on every node: the broker's TLS files and settings,
# the host's certificate from the base role, and the broker process.
NODE_STATE = (
    "sha256sum $(find /etc/rabbitmq /etc/ssl/certs/cbk-host.pem /etc/ssl/private/cbk-host.key -type f | sort)"
    " && systemctl show -p MainPID -p ActiveEnterTimestamp rabbitmq-server"
)


def node_states():
    return {
        node: subprocess.run(
            ["docker", "exec", container(node), "sh", "-c", NODE_STATE], check=True, capture_output=True, text=True
        ).stdout
        for node in NODES
    }


def test_another_pkis_certificate_without_the_clusters_tls_name_is_refused_before_any_change(tmp_path):
    """The role's own certificate (rabbitmq_tls_cert) or the base role's files (base_tls_cert_file),
    issued by another CA than the kit's for other names than rabbitmq_tls_cluster_name: the broker
    role reads it on the controller and stops before changing a node, naming both variables. The
    base role is skipped, as in the rotation test: it would install base_tls_cert_file first."""
    name = scenario_variables()["rabbitmq_tls_cluster_name"]
    wrong = throwaway_pki(tmp_path / "wrong", "node.cbk.test", "rabbitmq-cluster.cbk.example")
    cases = {
        "rabbitmq_tls_cert": {
            "rabbitmq_tls_cert": wrong["cert"],
            "rabbitmq_tls_key": wrong["key"],
            "rabbitmq_tls_ca": wrong["ca"],
        },
        "base_tls_cert_file": {
            "base_tls_certificates": "files",
            "base_tls_cert_file": wrong["cert"],
            "base_tls_key_file": wrong["key"],
            "base_tls_ca_file": wrong["ca"],
        },
    }
    before = node_states()
    for variable, extra_vars in cases.items():
        returncode, _, output, recap = converge("--skip-tags", "cbk-base", "-e", json.dumps(extra_vars, default=str))
        assert returncode != 0, output[-3000:]
        assert f"rabbitmq_tls_cluster_name is {name}, but the certificate" in output, output[-3000:]
        assert f"{variable} ({wrong['cert']}), does not carry it" in output, output[-3000:]
        assert "(node.cbk.test, rabbitmq-cluster.cbk.example)" in output, output[-3000:]
        # Every node refused, in the validate step: nothing reported changed.
        assert recap == {container(node): (0, 1) for node in NODES}, output[-3000:]
    assert node_states() == before, "a refused run changed a node"


def test_a_wildcard_certificate_for_the_clusters_tls_name_passes_the_check(tmp_path):
    """The check matches as the app's TLS client does: a wildcard for the name's domain, in another
    case, in a file with the chain after the certificate. The validate step alone: nothing changes."""
    domain = scenario_variables()["rabbitmq_tls_cluster_name"].split(".", 1)[1]
    given = throwaway_pki(tmp_path / "wildcard", "node.cbk.test", f"*.{domain.upper()}")
    chain = tmp_path / "chain.crt"
    chain.write_text(given["cert"].read_text() + given["ca"].read_text())
    playbook = tmp_path / "validate.yml"
    playbook.write_text(
        json.dumps(
            [
                {
                    "name": "The rabbitmq role's checks alone",
                    "hosts": "rabbitmq",
                    "tasks": [
                        {"ansible.builtin.include_role": {"name": role_fqcn("rabbitmq"), "tasks_from": "validate"}},
                    ],
                }
            ]
        )
    )
    extra_vars = {"rabbitmq_tls_cert": chain, "rabbitmq_tls_key": given["key"], "rabbitmq_tls_ca": given["ca"]}
    returncode, output, _, recap = ansible_playbook(playbook, "-e", json.dumps(extra_vars, default=str))
    assert returncode == 0 and recap == {container(node): (0, 0) for node in NODES}, output[-3000:]
    # The check ran, and passed, on every node.
    check = output.split("Check that the AMQPS certificate carries the cluster's TLS name", 1)[1].split("TASK [", 1)[0]
    assert sorted(re.findall(r"^ok: \[(\S+)\]", check, re.MULTILINE)) == sorted(map(container, NODES)), check


def test_app_queues_policy_dead_letters_after_the_delivery_limit():
    node = next(iter(NODES))
    policy = next(p for p in rabbitmqctl(node, "list_policies", "-p", VHOST) if p["name"] == "celery-dead-letter")
    definition = json.loads(policy["definition"]) if isinstance(policy["definition"], str) else policy["definition"]
    assert definition == {
        "dead-letter-exchange": "celery.dlx",
        "delivery-limit": DELIVERY_LIMIT,
        "dead-letter-strategy": "at-least-once",
        "overflow": "reject-publish",
    }
    assert queues(node)["dead_letter"]["type"] == "quorum"


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    variables = scenario_variables()
    # AMQPS only (molecule.yml): the URL of every node, checked for the cluster's name, as the app's.
    port, scheme = broker_port("rabbitmq", "tls"), broker_entry("rabbitmq")["tls_scheme"]
    url = ";".join(
        f"{scheme}://celery:{variables['rabbitmq_app_password']}@{ip}:{port}/{VHOST}" for ip in NODES.values()
    )
    ha = HALoad(
        tmp_path_factory.mktemp("ha"),
        url,
        quorum_queues=True,
        rabbitmq_tls_name=variables["rabbitmq_tls_cluster_name"],
        ca_file=f"{variables['base_tls_kit_ca_dir']}/ca.crt",
    )
    ha.start_workers()
    # The workers declare the task queue: a quorum queue with a member on each node.
    node = next(iter(NODES))
    wait_until(
        lambda: sorted(queues(node).get("celery", {}).get("online", [])) == sorted(NODES),
        120,
        "the celery quorum queue",
    )
    yield ha
    ha.stop_workers()


def whole_cluster(node):
    """Every node running in one cluster and none remembering a partition (the role's verify step
    refuses either), and every quorum queue's members all online, as node sees them. Asks node
    first and stops at the first no: each rabbitmqctl starts an Erlang VM, on a busy machine."""
    statuses = (rabbitmqctl(each, "cluster_status") for each in sorted(NODES, key=lambda each: each != node))
    return all(
        sorted(status["running_nodes"]) == sorted(NODES) and not status["partitions"] for status in statuses
    ) and all(sorted(queue["online"]) == sorted(NODES) for queue in queues(node).values() if queue["type"] == "quorum")


def cluster_picture(node):
    """What whole_cluster looks at, for a failure's message: each node's running nodes and remembered
    partitions, and the quorum queues' online members as node sees them."""
    picture = {}
    for each in NODES:
        try:
            status = rabbitmqctl(each, "cluster_status")
            picture[each] = {"running": sorted(status["running_nodes"]), "partitions": status["partitions"]}
        except (subprocess.CalledProcessError, ValueError) as exc:
            picture[each] = getattr(exc, "stderr", None) or repr(exc)
    try:
        picture["online"] = {name: sorted(queue["online"]) for name, queue in queues(node).items()}
    except Exception as exc:  # noqa: BLE001 - a picture of a failure, whatever the API answers
        picture["online"] = repr(exc)
    return json.dumps(picture)


def accepts_amqps(node):
    try:
        socket.create_connection((NODES[node], broker_port("rabbitmq", "tls")), timeout=3).close()
    except OSError:
        return False
    return True


def under_load(load, fault, act, recover=lambda leader: None):
    """The fault on the node leading the task queue, under the Celery load: act(leader) after the
    STOP_AFTER-th publish (the publisher goes on meanwhile), recover(leader) once the tasks ran, then
    the cluster whole again. Writes and returns the report: the tally, the leader the survivors elected
    and when, when the cluster was whole again (from the fault), and what act and recover returned."""
    leader = queues(next(iter(NODES)))["celery"]["leader"]
    survivor = next(node for node in NODES if node != leader)
    times, observed = {}, {}

    def fault_then_watch():
        times["fault"] = time.monotonic()
        observed.update(act(leader) or {})
        times["act_took"] = time.monotonic() - times["fault"]

    since = time.time()
    try:
        sent, refused = load.publish("ha.record", TASKS, PER_SECOND, after=STOP_AFTER, action=fault_then_watch)
        runs = load.wait_for_runs(sent, timeout=180, since=since)
        new_leader = raft_leader(survivor, "celery")
    finally:
        recovery = recover(leader) or {}
    wait_until(
        lambda: whole_cluster(survivor),
        240,
        lambda: f"all three nodes running, every quorum queue 3/3 online: {cluster_picture(survivor)}",
        pause=3,
    )
    report = {
        **tally(sent, refused, runs),
        "node": leader,
        "fault_took_s": round(times["act_took"], 1),
        "leader_after": new_leader,
        "whole_again_after_s": round(time.monotonic() - times["fault"], 1),
        **observed,
        **recovery,
    }
    write_report("rabbitmq-cluster", fault, report)
    # Confirmed means a majority wrote it: no fault of one node may lose it. At-least-once
    # delivery: only tasks in flight on a lost channel may run again.
    assert not report["lost"], report
    assert report["ran_more_than_once"] <= WORKERS * CONCURRENCY * 2, report
    return report


# The containers `docker start` brought back: docker rewrote their /etc/hosts.
STARTED_AGAIN = set()


def start(leader):
    subprocess.run(["docker", "start", container(leader)], check=True, capture_output=True)
    STARTED_AGAIN.add(container(leader))


def test_halting_the_queue_leader_loses_no_task(load):
    """systemd's orderly shutdown of the leader's host."""
    report = under_load(load, "halt", lambda leader: halt(container(leader)), recover=start)
    assert not report["refused"] and report["leader_after"] != report["node"], report


def test_killing_the_queue_leader_loses_no_confirmed_task(load):
    """A power cut: every process of the leader's host SIGKILLed at once."""
    report = under_load(load, "kill", lambda leader: kill(container(leader)), recover=start)
    assert report["leader_after"] != report["node"], report


# Ra's failure detector (aten) names a silent leader down within seconds; the Erlang distribution
# only after net_ticktime (60 s), so a freeze this long moves the leader without a partition.
FREEZE_SECONDS = 20


def test_a_frozen_queue_leader_loses_no_confirmed_task_and_rejoins_as_a_follower(load):
    """SIGSTOP of the leader's broker (a GC pause, a stalled VM) for longer than the leader's
    failure detection, then SIGCONT: the survivors elect a leader; the old one follows it."""

    def freeze(leader):
        with frozen(container(leader), "beam.smp"):
            time.sleep(FREEZE_SECONDS)

    report = under_load(load, "frozen", freeze)
    assert report["leader_after"] != report["node"], report
    assert raft_leader(report["node"], "celery") == report["leader_after"], "two leaders after the freeze"


# From the heal: a paused node resumes within seconds once it sees the majority again.
RESUME_SECONDS = 90


def running(node):
    command = ["docker", "exec", container(node), "rabbitmq-diagnostics", "-q", "check_running"]
    return subprocess.run(command, check=False, capture_output=True).returncode == 0


def resume(node):
    """The paused node's return after the heal, by itself: pause_minority starts its rabbit app again
    once it sees the majority. (RabbitMQ 3.10.8, Debian 12's, hung in that boot in 4 runs of 7 until
    its service was restarted: rabbitmq-server#6034, fixed in later 3.10 releases; this scenario runs
    Debian 13's 4.0.5.)"""
    healed = time.monotonic()
    wait_until(lambda: running(node), RESUME_SECONDS, f"{node} resumed by itself after the heal", pause=2)
    return {"resumed_after_heal_s": round(time.monotonic() - healed, 1)}


def test_a_partitioned_node_pauses_and_the_cluster_heals(load):
    """The leader's node cut off from both peers (its clients still reach it): pause_minority stops
    it serving once it sees it is alone (net_ticktime), its clients move to the majority, which
    elected a new leader; after the partition heals, the node rejoins (resume())."""

    def partition(leader):
        peers = [ip for node, ip in NODES.items() if node != leader]
        with partitioned(container(leader), peers):
            # A paused node stops its listeners.
            wait_until(lambda: not accepts_amqps(leader), 150, f"{leader} paused, its AMQPS listener closed")
            # Read before the heal: the majority's leader while the node is away.
            survivor = next(node for node in NODES if node != leader)
            return {"leader_while_cut_off": raft_leader(survivor, "celery")}

    report = under_load(load, "partition", partition, recover=resume)
    assert report["leader_while_cut_off"] not in (None, report["node"]), report
    status = rabbitmqctl(report["node"], "cluster_status")
    assert not status["partitions"], status


# Peer discovery's settings (the role's configure.yml), read on a blank node's first start.
DISCOVERY_CONF = "/etc/rabbitmq/conf.d/10-cluster.conf"
ROLE = "cbk.celery_broker_kit.rabbitmq"


def test_a_converge_after_the_faults_joins_a_node_that_booted_alone_and_changes_nothing_else():
    """One converge after the faults. Before it, a node is reset and started blank without its peers
    (down, or not reachable in time at its first start): it stands alone, and peer discovery does
    not run again. Here its discovery settings are moved aside for that start: a blank node that
    reaches its peers joins them by itself. The role's fallback (cluster.yml) resets it, joins it
    to the cluster and grows the queues onto it. Nothing else changes, but for what docker itself
    undid: it writes a new /etc/hosts into a container it starts, without the role's peer entries
    (a real host keeps its file across a power cut)."""
    alone = container(list(NODES)[-1])  # not the first node, which manages the cluster-wide data
    for command in (
        ["rabbitmqctl", "-q", "stop_app"],
        ["rabbitmqctl", "-q", "reset"],
        ["mv", DISCOVERY_CONF, "/root/"],
        ["systemctl", "restart", "rabbitmq-server"],
    ):
        subprocess.run(["docker", "exec", alone, *command], check=True, capture_output=True)
    assert rabbitmqctl(f"rabbit@{alone}", "cluster_status")["running_nodes"] == [f"rabbit@{alone}"]
    returncode, output, _, _ = converge()
    assert returncode == 0, failures(output)
    hosts_entries = f"{ROLE} : Map the peers' host names to their addresses"
    rejoin = [
        f"{ROLE} : Write the cluster's peer discovery settings",
        f"{ROLE} : Reset this node and join the cluster",
        f"{ROLE} : Add this node to every quorum queue",
    ]
    expected = {name: [hosts_entries] for name in STARTED_AGAIN}
    expected[alone] = sorted(expected.get(alone, []) + rejoin)
    assert {name: sorted(tasks) for name, tasks in changed_tasks(output).items()} == expected, failures(output)
    wait_until(lambda: whole_cluster(next(iter(NODES))), 120, "every quorum queue 3/3 online after the join")


PENDING = role_defaults("rabbitmq", "vars")["rabbitmq__restart_pending_file"]
# A rabbitmq.conf value: changing it restarts the broker. One MB more than the scenario's.
DISK_LIMIT_MB = int(scenario_variables()["rabbitmq_disk_free_limit"].removesuffix("MB"))
RESTART_CHANGE = {"rabbitmq_disk_free_limit": f"{DISK_LIMIT_MB + 1}MB"}


def main_pids():
    return {
        node: subprocess.run(
            ["docker", "exec", container(node), "systemctl", "show", "-p", "MainPID", "--value", "rabbitmq-server"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        for node in NODES
    }


def restart_pending(node):
    return subprocess.run(["docker", "exec", container(node), "test", "-e", PENDING], check=False).returncode == 0


def test_a_restart_waits_while_its_node_is_quorum_critical_then_stops_and_leaves_it_pending():
    """One node's broker stopped: every quorum queue needs each of the other two for its majority.
    A change that needs a restart: the two wait, then stop naming their node, not restarted; the
    stopped one restarts at once (nothing runs on it to lose)."""
    *up, down = NODES
    subprocess.run(["docker", "exec", container(down), "rabbitmqctl", "-q", "stop_app"], check=True)
    before = main_pids()
    wait = 10
    returncode, output, folded, _ = converge(
        "--skip-tags", "cbk-base", "-e", json.dumps({**RESTART_CHANGE, "rabbitmq_restart_quorum_wait_seconds": wait})
    )
    assert returncode != 0, output[-3000:]
    for node in up:
        assert f"{node} is quorum-critical after {wait} s (rabbitmq_restart_quorum_wait_seconds)" in folded, output[
            -3000:
        ]
        assert restart_pending(node), node
    after = main_pids()
    assert [after[node] == before[node] for node in NODES] == [True, True, False], (before, after)
    assert not restart_pending(down)
    wait_until(lambda: whole_cluster(down), 120, "the stopped node back, every quorum queue 3/3 online")


def test_a_rolling_restart_under_load_restarts_the_pending_nodes_one_by_one_and_loses_no_task(load):
    """The next run restarts the two nodes the last one left pending (their settings are already
    written, so only the pending file says so), one at a time, while tasks are published."""
    before = main_pids()
    run = {}
    converging = threading.Thread(
        target=lambda: run.update(result=converge("--skip-tags", "cbk-base", "-e", json.dumps(RESTART_CHANGE)))
    )
    sent, refused, since = [], [], time.time()
    converging.start()
    while converging.is_alive():
        batch_sent, batch_refused = load.publish("ha.record", PER_SECOND * 5, PER_SECOND)
        sent += batch_sent
        refused += batch_refused
    returncode, output, _, recap = run["result"]
    assert returncode == 0, failures(output)
    runs = load.wait_for_runs(sent, timeout=180, since=since)
    report = {**tally(sent, refused, runs), "changed": {name: changed for name, (changed, _) in recap.items()}}
    write_report("rabbitmq-cluster", "rolling restart", report)
    after = main_pids()
    assert [after[node] != before[node] for node in NODES] == [True, True, False], (before, after)
    assert not any(map(restart_pending, NODES))
    assert not report["lost"] and not refused, report
    assert report["ran_more_than_once"] <= WORKERS * CONCURRENCY * 2, report


def test_stopped_node_rejoins_and_queues_regain_their_members():
    node = next(iter(NODES))
    wait_until(lambda: whole_cluster(node), 180, "all three nodes running, every quorum queue 3/3 online")
    for each in NODES:
        subprocess.run(
            ["docker", "exec", container(each), "rabbitmq-queues", "check_if_node_is_quorum_critical"],
            check=True,
            capture_output=True,
        )


def test_poison_message_ends_in_the_dead_letter_queue(load):
    node = next(iter(NODES))
    before = queues(node)["dead_letter"]["messages"]
    sent, refused = load.publish("ha.crash", 1, PER_SECOND)
    assert sent and not refused
    wait_until(lambda: queues(node)["dead_letter"]["messages"] > before, 180, "the poison message dead-lettered")
    assert 1 <= load.runs()[sent[0]] <= DELIVERY_LIMIT + 1
    dead_letters = api(
        node, f"queues/{VHOST}/dead_letter/get", {"count": 1000, "ackmode": "ack_requeue_true", "encoding": "auto"}
    )
    headers = next(m["properties"]["headers"] for m in dead_letters if m["properties"]["headers"]["id"] == sent[0])
    assert headers["x-first-death-reason"] == "delivery_limit"
