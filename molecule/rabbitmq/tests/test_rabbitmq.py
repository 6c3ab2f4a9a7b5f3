"""The rabbitmq role: a hardened broker Celery can use from its client networks.

Each instance is a broker, and the other instance is its client and admin
workstation (rabbitmq_client_networks and rabbitmq_admin_networks hold only the
peer's address), so every client test crosses the broker's firewall. The docker
host is on neither list. Debian 12 (3.10) serves AMQP and AMQPS and plain-HTTP
management; Debian 13 (4.0) serves AMQPS only (TLS 1.3 only) and HTTPS management.
"""

import json
import os
import re
import uuid

import pytest
import testinfra
from cbk_testlib import address, amqp_login, broker_entry, broker_port, http_request, journal, run_python, tcp_probe

RABBITMQ = broker_entry("rabbitmq")
AMQP_PORT = broker_port("rabbitmq", "plain")
AMQPS_PORT = broker_port("rabbitmq", "tls")
MANAGEMENT_PORT = broker_port("rabbitmq", "management")
SERVICE = RABBITMQ["service"]
CLUSTER_PORTS = (4369, 25672)
VHOST = "celery"
DEAD_LETTER_QUEUE = "dead_letter"
DEAD_LETTER_EXCHANGE = "celery.dlx"
EXPECTED_VERSION = {"12": "3.10.8", "13": "4.0.5"}
TEST_CA = "/etc/cbk-test-ca.crt"  # installed on both instances by prepare.yml

# Client programs run on the peer with its Debian python3-celery/python3-kombu
# (see run_python): each takes one JSON argument and prints one JSON result.
ANONYMOUS_LOGIN = """
import json, sys
from amqp import Connection
from amqp.sasl import RAW
args = json.loads(sys.argv[1])
conn = Connection(args["host"], ssl=args["ssl"], authentication=(RAW(b"ANONYMOUS", b""),), connect_timeout=5)
try:
    conn.connect()
    print(json.dumps({"result": "ok"}))
except Exception as exc:
    print(json.dumps({"result": type(exc).__name__, "detail": str(exc)}))
"""

CELERY_ROUND_TRIP = """
import json, sys
from celery import Celery
from kombu import Connection, Exchange, Queue
args = json.loads(sys.argv[1])
app = Celery("probe", broker=args["url"])
app.conf.broker_use_ssl = args["ssl"]
queue = Queue(args["queue"], Exchange(args["queue"], type="direct"), routing_key=args["queue"])
with Connection(args["url"], ssl=args["ssl"], connect_timeout=5) as conn:
    queue(conn.default_channel).declare()
    sent = app.send_task("probe.add", args=(2, 3), queue=queue)
    consumer = conn.SimpleQueue(queue)
    message = consumer.get(timeout=10)
    task_args = message.payload[0]
    message.ack()
    consumer.close()
    queue(conn.default_channel).delete()
print(json.dumps({"sent": sent.id, "id": message.headers["id"], "task": message.headers["task"], "args": task_args}))
"""

DEAD_LETTER = """
import json, sys, time
from kombu import Connection, Exchange, Queue
args = json.loads(sys.argv[1])
marker = args["marker"]
with Connection(args["url"], ssl=args["ssl"], connect_timeout=5) as conn:
    channel = conn.channel()
    # The sample app's worker declares the dead-letter queue like this at start-up:
    # it must be equivalent to the role's declaration (no PRECONDITION_FAILED).
    dead_letters = Queue(args["dlq"], Exchange(args["dlx"], type="fanout"))(channel)
    dead_letters.declare()
    probe = Queue(args["queue"], durable=False)(channel)
    probe.declare()
    conn.Producer(channel).publish(marker, exchange="", routing_key=args["queue"])
    deadline = time.monotonic() + 10
    message = None
    while message is None and time.monotonic() < deadline:
        message = probe.get(no_ack=False)
        time.sleep(0.1)
    message.reject(requeue=False)
    found = None
    while found is None and time.monotonic() < deadline:
        candidate = dead_letters.get(no_ack=False)
        if candidate is None:
            time.sleep(0.2)
        elif candidate.payload == marker:
            found = candidate
        else:
            candidate.requeue()
    death = found.headers["x-death"][0] if found else {}
    if found:
        found.ack()
    probe.delete()
print(json.dumps({"found": found is not None, "reason": death.get("reason"), "queue": death.get("queue")}))
"""

TLS_HANDSHAKE = """
import json, socket, ssl, sys
args = json.loads(sys.argv[1])
context = ssl.create_default_context(cafile=args["cafile"])
if args["max_version"]:
    context.maximum_version = getattr(ssl.TLSVersion, args["max_version"])
try:
    with socket.create_connection((args["ip"], args["port"]), timeout=5) as sock:
        with context.wrap_socket(sock, server_hostname=args["ip"]) as tls:
            print(json.dumps({"result": "ok", "version": tls.version()}))
except Exception as exc:
    print(json.dumps({"result": type(exc).__name__, "version": None}))
"""


class Broker:
    """How clients reach one instance, from its inventory settings."""

    def __init__(self, ip, variables):
        self.ip = ip
        self.tls_only = variables.get("rabbitmq_tls_only", False)
        self.tls_versions = variables.get("rabbitmq_tls_versions", ["tlsv1.3", "tlsv1.2"])
        self.management_scheme = "https" if variables.get("rabbitmq_management_tls_enabled", False) else "http"
        self.secrets = {
            "app": ("celery", variables["rabbitmq_app_password"]),
            "admin": ("admin", variables["rabbitmq_admin_password"]),
            "monitoring": ("monitoring", variables["rabbitmq_monitoring_password"]),
        }

    def amqp(self, user, password, vhost=VHOST, ip=None):
        """URL and TLS options for an AMQP client: AMQPS, verified against the test CA, if TLS-only."""
        ip = ip or self.ip
        if not self.tls_only:
            return {"url": f"{RABBITMQ['scheme']}://{user}:{password}@{ip}:{AMQP_PORT}/{vhost}", "ssl": False}
        # The certificate is issued for the private address, not for loopback.
        context = {"cafile": TEST_CA, "check_hostname": ip == self.ip}
        url = f"{RABBITMQ['scheme']}://{user}:{password}@{ip}:{AMQPS_PORT}/{vhost}"  # TLS by the ssl options
        return {"url": url, "ssl": {"context": context, "server_hostname": ip}}

    def login(self, client, user, password, vhost=VHOST, ip=None):
        target = self.amqp(user, password, vhost, ip)
        return amqp_login(client, target["url"], target["ssl"])

    def http(self, client, path, account, method="GET", body=None, expect=None):
        """A management API call from client as account (a user of secrets, else account:account)."""
        return http_request(
            client,
            f"{self.management_scheme}://{self.ip}:{MANAGEMENT_PORT}/api/{path}",
            method=method,
            headers={"Content-Type": "application/json"},
            body=None if body is None else json.dumps(body),
            auth=self.secrets.get(account, (account, account)),
            cafile=TEST_CA,
            timeout=10,
            expect=expect,
        )


@pytest.fixture(scope="module")
def broker(host):
    return Broker(address(host), host.ansible.get_variables())


def open_files(host, pid):
    """(soft, hard) open file limit of a process."""
    limits = host.file(f"/proc/{pid}/limits").content_string
    soft, hard = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M).groups()
    return int(soft), int(hard)


def listening(host, port):
    return sorted(line.split()[3].rsplit(":", 1)[0] for line in host.check_output("ss -Htln 'sport = :%s'", str(port)).splitlines())


def test_pinned_package_from_debian(host):
    release = host.system_info.release.split(".")[0]
    assert host.package("rabbitmq-server").version.startswith(EXPECTED_VERSION[release] + "-")
    pin = host.file("/etc/apt/preferences.d/rabbitmq-server").content_string
    assert f"Pin: version {EXPECTED_VERSION[release]}-*" in pin


def test_service_runs_with_the_file_limit_and_logs_to_the_journal(host):
    service = host.service(SERVICE)
    assert service.is_running
    assert service.is_enabled
    assert int(host.check_output("systemctl show -P LimitNOFILE %s", SERVICE)) >= 65536
    # The container's hard limit (docker's default ulimit) caps what systemd can grant.
    container_cap = open_files(host, "1")[1]
    beam = host.check_output("pgrep -u rabbitmq -x beam.smp")
    assert open_files(host, beam)[0] == min(65536, container_cap)
    assert host.check_output("systemctl show -P StandardOutput %s", SERVICE) == "journal"
    assert "Server startup complete" in journal(host, SERVICE)


def test_listeners_are_bound_to_the_configured_addresses_only(host, broker):
    assert listening(host, AMQP_PORT) == ([] if broker.tls_only else sorted(["127.0.0.1", broker.ip]))
    assert listening(host, AMQPS_PORT) == sorted(["127.0.0.1", broker.ip])
    assert listening(host, MANAGEMENT_PORT) == [broker.ip]


def test_celery_round_trip_from_the_peer(peer, broker):
    queue = f"probe-{uuid.uuid4().hex}"
    result = run_python(peer, CELERY_ROUND_TRIP, {**broker.amqp(*broker.secrets["app"]), "queue": queue})
    assert result["task"] == "probe.add"
    assert result["id"] == result["sent"]
    assert result["args"] == [2, 3]


def test_only_plain_and_amqplain_logins_are_offered(peer, broker):
    assert broker.login(peer, *broker.secrets["app"]) == {"result": "ok", "mechanisms": ["AMQPLAIN", "PLAIN"]}
    target = broker.amqp("", "")
    anonymous = run_python(peer, ANONYMOUS_LOGIN, {"host": target["url"].split("@")[1].split("/")[0], "ssl": target["ssl"]})
    assert anonymous["result"] != "ok", anonymous


def test_guest_is_refused_over_amqp_even_from_loopback(host, peer, broker):
    assert '"guest"' not in host.check_output("rabbitmqctl list_users --formatter json")
    assert broker.login(peer, "guest", "guest", vhost="")["result"] == "AccessRefused"
    # loopback_users would let guest in from 127.0.0.1 if the account still existed.
    assert broker.login(host, "guest", "guest", vhost="", ip="127.0.0.1")["result"] == "AccessRefused"


def test_guest_is_refused_by_the_http_api(peer, broker):
    assert broker.http(peer, "overview", "guest").status == 401


def test_app_user_is_refused_on_other_vhosts(peer, broker):
    refused = broker.login(peer, *broker.secrets["app"], vhost="")
    assert refused["result"] in ("AccessRefused", "NotAllowed"), refused


def test_app_user_is_refused_by_the_http_api(peer, broker):
    assert broker.http(peer, "whoami", "app").status == 401


def test_admin_sees_the_app_vhost_queues(peer, broker):
    queues = broker.http(peer, f"queues/{VHOST}", "admin", expect=200).json()
    assert DEAD_LETTER_QUEUE in [queue["name"] for queue in queues]


def test_monitoring_user_reads_but_cannot_administer(peer, broker):
    assert broker.http(peer, "overview", "monitoring").status == 200
    created = broker.http(peer, "users/intruder", "monitoring", "PUT", {"password": "x" * 20, "tags": ""})
    assert created.status in (401, 403)
    assert broker.http(peer, "users/intruder", "admin").status == 404


def test_monitoring_user_has_no_vhost_access(peer, broker):
    assert broker.http(peer, "users/monitoring/permissions", "admin", expect=200).json() == []


def test_rejected_message_is_dead_lettered(peer, broker):
    queue = f"probe-dlx-{uuid.uuid4().hex}"
    result = run_python(
        peer,
        DEAD_LETTER,
        {**broker.amqp(*broker.secrets["app"]), "queue": queue, "marker": uuid.uuid4().hex,
         "dlq": DEAD_LETTER_QUEUE, "dlx": DEAD_LETTER_EXCHANGE},
    )
    assert result == {"found": True, "reason": "rejected", "queue": queue}


@pytest.mark.parametrize(
    "queue, dead_lettered",
    [("celery", True), ("email", True), ("priority", True), (DEAD_LETTER_QUEUE, False),
     ("celery@worker1.celery.pidbox", False), ("5b7c2f0e.reply.celery.pidbox", False),
     ("celeryev.0f9b3c1e", False), ("amq.gen-JzTY20BRgKO", False)],
)
def test_dead_letter_policy_spares_its_own_and_celery_control_queues(peer, broker, queue, dead_lettered):
    (policy,) = broker.http(peer, f"policies/{VHOST}", "admin", expect=200).json()
    assert policy["apply-to"] == "queues"
    assert policy["definition"]["dead-letter-exchange"] == DEAD_LETTER_EXCHANGE
    assert bool(re.search(policy["pattern"], queue)) is dead_lettered


def test_amqps_accepts_only_the_configured_tls_versions(peer, broker):
    handshake = {"ip": broker.ip, "port": AMQPS_PORT, "cafile": TEST_CA}
    assert run_python(peer, TLS_HANDSHAKE, {**handshake, "max_version": None}) == {"result": "ok", "version": "TLSv1.3"}
    tls12 = run_python(peer, TLS_HANDSHAKE, {**handshake, "max_version": "TLSv1_2"})
    if "tlsv1.2" in broker.tls_versions:
        assert tls12 == {"result": "ok", "version": "TLSv1.2"}
    else:
        assert tls12["result"] != "ok"


def test_management_uses_the_configured_scheme_only(peer, broker):
    other = "http" if broker.management_scheme == "https" else "https"
    url = f"{other}://{broker.ip}:{MANAGEMENT_PORT}/api/overview"
    wrong = http_request(peer, url, auth=("monitoring", "x"), cafile=TEST_CA, timeout=10, expect=None)
    assert wrong.status is None, (wrong.status, wrong.body)


def test_erlang_cookie_is_the_generated_secret_and_private(host):
    cookie = host.file("/var/lib/rabbitmq/.erlang.cookie")
    assert cookie.user == "rabbitmq"
    assert cookie.mode == 0o400
    name = host.backend.get_hostname()
    secret = os.path.join(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"], "secrets", f"rabbitmq-erlang-cookie-{name}")
    with open(secret, encoding="ascii") as stored:
        assert host.check_output("cat /var/lib/rabbitmq/.erlang.cookie") == stored.read().strip()


def test_config_is_private_and_holds_no_password(host, broker):
    assert host.check_output("find /etc/rabbitmq -perm /o=rwx") == ""
    assert host.file("/etc/rabbitmq").mode == 0o750
    assert host.file("/etc/rabbitmq/tls/server.key").mode == 0o640
    for _, password in broker.secrets.values():
        assert host.run("grep -rqF -- %s /etc/rabbitmq", password).rc == 1


def test_client_ports_are_open_to_the_peer_only(peer, broker):
    controller = testinfra.get_host("local://")
    for port in (AMQPS_PORT,) if broker.tls_only else (AMQP_PORT, AMQPS_PORT):
        assert tcp_probe(peer, broker.ip, port) == "open"
        assert tcp_probe(controller, broker.ip, port) == "timeout"
    if broker.tls_only:
        # Plain AMQP is off, and the firewall has no rule for it either.
        assert tcp_probe(peer, broker.ip, AMQP_PORT) == "timeout"


def test_management_port_is_open_to_the_admin_network_only(peer, broker):
    assert tcp_probe(peer, broker.ip, MANAGEMENT_PORT) == "open"
    assert tcp_probe(testinfra.get_host("local://"), broker.ip, MANAGEMENT_PORT) == "timeout"


@pytest.mark.parametrize("port", CLUSTER_PORTS)
def test_cluster_ports_are_closed_without_peers(host, peer, broker, port):
    # Guard: epmd and the distribution port do listen; only the firewall hides them.
    assert tcp_probe(host, broker.ip, port) == "open"
    assert tcp_probe(peer, broker.ip, port) == "timeout"
