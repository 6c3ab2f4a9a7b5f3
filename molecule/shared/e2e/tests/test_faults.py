"""Fault injection under a bounded load of signups (each one a welcome email task whose
WelcomeEmail row is its idempotency record): a worker killed mid-task, a broker restart,
one worker host losing every worker process at once, a web restart while publishing.
For each: every signup the web tier accepted (201) gets its email, exactly one message
(one Message-ID) per address, none lost. A worker killed between handing a message to
SMTP and recording it sends that message again; such copies carry the same Message-ID
and are counted ("resent"), since SMTP has no transactions. Then queued tasks through a
clean and an unclean broker stop (on Redis with appendfsync everysec and always).
Figures go to artifacts/faults/<scenario>.txt and .json."""

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cbk_testlib import address, direct, inventory_host, scenario_variables

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
BROKER = SCENARIO.removeprefix("e2e-")
BACKEND = f"cbk-{SCENARIO}-debian12"  # broker, database, mail sink, worker 1
FRONT = f"cbk-{SCENARIO}-debian13"  # web, worker 2
MAILDIR = "/home/sink/Maildir"
REPORT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "artifacts" / "faults" / SCENARIO
WORKER_UNITS = "celery-worker@email celery-worker@default celery-worker@priority"
BROKER_UNIT = {"redis": "redis-server", "rabbitmq": "rabbitmq-server"}[BROKER]
SIGNUPS = 60
SIGNUP_RATE = 15  # per second
# Long enough for beat to re-send an email whose task was never published (WELCOME_EMAIL_RESEND_AFTER).
DELIVERY_SECONDS = 240
rows = []  # one per fault: what happened, for the report and docs/broker-matrix.md
COLUMNS = ("fault", "accepted", "refused", "emails", "lost", "twice", "resent", "notes")

# Runs on the backend host: signs SIGNUPS users up through nginx at a fixed rate and
# prints which addresses the web tier accepted and what it said to the others.
SIGNUP_LOAD = """
import http.client, json, sys, time, uuid
args = json.loads(sys.argv[1])
accepted, refused = [], []
start = time.monotonic()
for i in range(args["count"]):
    time.sleep(max(0, start + i / args["rate"] - time.monotonic()))
    token = uuid.uuid4().hex[:12]
    email = f"{args['tag']}-{token}@example.com"
    # A random password: a fixed one can be too similar to some address for Django's validator.
    body = json.dumps({"username": f"u-{token}", "email": email, "password": f"Pw-{uuid.uuid4().hex}"})
    try:
        conn = http.client.HTTPConnection(args["address"], 80, timeout=60)
        conn.request("POST", "/api/signup/", body, {"Content-Type": "application/json", "Host": args["address"]})
        status = conn.getresponse().status
    except OSError as error:
        status = type(error).__name__
    (accepted if status == 201 else refused).append([email, status])
print(json.dumps({"accepted": [e for e, _ in accepted], "refused": refused}))
"""

# Runs on the backend host: the Message-IDs the sink holds per recipient with a tag (a copy
# sent again after a crash has the same Message-ID: one message to the recipient).
MAILDIR_MESSAGES = """
import collections, email, json, pathlib, sys
messages = collections.defaultdict(list)
for path in pathlib.Path(sys.argv[1]).glob("*/*"):
    message = email.message_from_bytes(path.read_bytes())
    if (message["To"] or "").startswith(sys.argv[2] + "-"):
        messages[message["To"]].append(message["Message-ID"])
print(json.dumps(messages))
"""


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    widths = {"fault": 48, "accepted": 8, "refused": 7, "emails": 6, "lost": 4, "twice": 5, "resent": 6}
    align = {name: "<" if name == "fault" else ">" for name in widths}
    table = [" ".join(f"{name:{align[name]}{width}}" for name, width in widths.items()) + "  notes"]
    table += [
        " ".join(f"{row[name]!s:{align[name]}{width}}" for name, width in widths.items()) + f"  {row['notes']}"
        for row in rows
    ]
    REPORT.with_suffix(".txt").write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))


@pytest.fixture(scope="module")
def backend():
    return direct(inventory_host(BACKEND))


@pytest.fixture(scope="module")
def front():
    return direct(inventory_host(FRONT))


@pytest.fixture(scope="module")
def web_address():
    return address(inventory_host(FRONT))


class SignupLoad:
    """The signup load, running on the backend host while the test injects a fault."""

    def __init__(self, web_address, fault, count=SIGNUPS, rate=SIGNUP_RATE):
        self.tag = f"{fault}{uuid.uuid4().hex[:6]}"  # this run's addresses only
        args = json.dumps({"address": web_address, "tag": self.tag, "count": count, "rate": rate})
        self.process = subprocess.Popen(
            ["docker", "exec", BACKEND, "python3", "-c", SIGNUP_LOAD, args], stdout=subprocess.PIPE, text=True
        )
        self.seconds = count / rate

    def result(self):
        out, _ = self.process.communicate(timeout=self.seconds + 120)
        return {**json.loads(out), "tag": self.tag}


def settle(backend, load):
    """Wait until every signup the load got accepted has its email (or DELIVERY_SECONDS
    pass), then read the sink: {recipient: [Message-ID of each copy]}."""
    deadline = time.monotonic() + DELIVERY_SECONDS
    while True:
        messages = json.loads(backend.check_output("python3 -c %s %s %s", MAILDIR_MESSAGES, MAILDIR, load["tag"]))
        if all(email in messages for email in load["accepted"]) or time.monotonic() > deadline:
            break
        time.sleep(2)
    time.sleep(5)  # a late copy would arrive now
    return json.loads(backend.check_output("python3 -c %s %s %s", MAILDIR_MESSAGES, MAILDIR, load["tag"]))


def record(fault, load, messages, notes=""):
    """One report row; fails on a lost email, two different emails to one address, or a
    refused signup. Copies of one message (same Message-ID, sent again after a worker died
    between sending and recording it) are counted, not failed: SMTP has no transactions."""
    lost = [email for email in load["accepted"] if email not in messages]
    twice = [email for email, ids in messages.items() if len(set(ids)) > 1]
    resent = sum(len(ids) - len(set(ids)) for ids in messages.values())
    emails = sum(len(set(ids)) for ids in messages.values())
    values = (fault, len(load["accepted"]), len(load["refused"]), emails, len(lost), len(twice), resent, notes)
    rows.append(dict(zip(COLUMNS, values, strict=True)))
    assert load["accepted"], f"{fault}: the web tier accepted no signup: {load['refused'][:3]}"
    assert not lost, f"{fault}: {len(lost)} accepted signups got no email, e.g. {lost[:3]}"
    assert not twice, f"{fault}: {len(twice)} addresses got two different welcome emails, e.g. {twice[:3]}"
    assert not load["refused"], f"{fault}: the web tier refused signups: {load['refused'][:5]}"


def redis_admin(backend, *command):
    """A redis-cli command as the admin user (password through the environment)."""
    password = scenario_variables()["redis_admin_password"]
    return backend.check_output(
        "REDISCLI_AUTH=%s redis-cli --user admin --no-auth-warning " + " ".join(["%s"] * len(command)),
        password,
        *command,
    )


def expire_redis_visibility(backend):
    """Redis has no acks: a killed worker's messages stay in the `unacked` hash until
    visibility_timeout (1 h) passes. Age their index entries by an hour, as the clock
    would, so idle workers restore them now; returns how many were held."""
    if BROKER != "redis":
        return None
    tags = redis_admin(backend, "ZRANGE", "unacked_index", "0", "-1").split()
    for tag in redis_admin(backend, "ZRANGE", "unacked_index", "0", "-1").split():
        redis_admin(backend, "ZADD", "unacked_index", "XX", str(int(time.time()) - 3700), tag)
    return len(tags)


def test_worker_killed_mid_task(backend, front, web_address):
    """The queue fills while the email workers are stopped; both start, and one is killed
    with SIGKILL while it holds prefetched and running tasks."""
    backend.check_output("systemctl stop celery-worker@email")
    front.check_output("systemctl stop celery-worker@email")
    load = SignupLoad(web_address, "sigkill").result()
    backend.check_output("systemctl start celery-worker@email")
    front.check_output("systemctl start celery-worker@email")
    time.sleep(3)
    front.check_output("systemctl kill --signal=SIGKILL celery-worker@email")
    held = expire_redis_visibility(backend)
    messages = settle(backend, load)
    notes = "RabbitMQ requeues the killed consumer's unacked messages at once"
    if held is not None:
        notes = f"{held} held unacked in Redis until visibility_timeout (aged by the test)"
    record("SIGKILL of a worker mid-task", load, messages, notes)


def test_broker_restart_while_publishing(backend, web_address):
    load = SignupLoad(web_address, "brokerrestart")
    time.sleep(load.seconds / 3)
    started = time.monotonic()
    backend.check_output("systemctl restart %s", BROKER_UNIT)
    restart_seconds = time.monotonic() - started
    result = load.result()
    messages = settle(backend, result)
    record(
        f"systemctl restart {BROKER_UNIT}",
        result,
        messages,
        f"restart took {restart_seconds:.1f} s; publishers retried through it",
    )


def test_worker_host_loses_every_worker(backend, front, web_address):
    """Every worker process of one host dies at once (the host's power, as far as the
    workers can tell; the host also serves the web tier, which stays up)."""
    load = SignupLoad(web_address, "hostdown")
    time.sleep(load.seconds / 3)
    front.check_output(f"systemctl kill --signal=SIGKILL {WORKER_UNITS}")
    front.check_output(f"systemctl stop {WORKER_UNITS}")
    try:
        result = load.result()
        held = expire_redis_visibility(backend)
        messages = settle(backend, result)
    finally:
        front.check_output(f"systemctl start {WORKER_UNITS}")
    notes = "the other host's workers take over"
    if held is not None:
        notes += f"; {held} held unacked in Redis until visibility_timeout (aged by the test)"
    record("all workers of one host SIGKILLed, stay down", result, messages, notes)


def test_web_restart_while_publishing(backend, front, web_address):
    load = SignupLoad(web_address, "webrestart")
    time.sleep(load.seconds / 3)
    front.check_output("systemctl restart sample_app.service")
    result = load.result()
    messages = settle(backend, result)
    record(
        "systemctl restart of gunicorn (web)",
        result,
        messages,
        "requests wait in systemd's socket during the restart",
    )


def queued(backend, queue):
    """Messages waiting in the queue (every priority step of it on Redis)."""
    if BROKER == "rabbitmq":
        listed = backend.check_output("rabbitmqctl list_queues -q -p celery name messages")
        return sum(int(count) for name, count in (line.split() for line in listed.splitlines()) if name == queue)
    return sum(
        int(redis_admin(backend, "LLEN", key))
        for key in redis_admin(backend, "--scan", "--pattern", f"{queue}*").split()
    )


KILLS = [
    ("rabbitmq", "restart", None),
    ("rabbitmq", "SIGKILL", None),
    ("redis", "restart", None),
    ("redis", "SIGKILL", "everysec"),
    ("redis", "SIGKILL", "always"),
]


@pytest.mark.parametrize("broker, stop, appendfsync", KILLS, ids=["-".join(filter(None, kill)) for kill in KILLS])
def test_queued_tasks_survive_the_broker_going_down(backend, front, broker, stop, appendfsync):
    """Publish a burst of tasks with no consumer (every publish acknowledged: RabbitMQ's
    publisher confirms, Redis's reply), stop the broker cleanly or SIGKILL it, start it
    and count what it still holds. On Redis with appendfsync everysec and always."""
    if broker != BROKER:
        pytest.skip(f"{broker} is not this scenario's broker")
    count = 2000
    for host in (backend, front):  # no consumer of the analytics queue
        host.check_output("systemctl stop celery-worker@default")
    original = redis_admin(backend, "CONFIG", "GET", "appendfsync").split()[-1] if appendfsync else None
    try:
        if appendfsync:
            redis_admin(backend, "CONFIG", "SET", "appendfsync", appendfsync)
        before = queued(backend, "analytics")
        backend.check_output(
            "/usr/local/sbin/sample_app-manage shell -c %s",
            "import uuid\nfrom analytics.tasks import track_event\n"
            f"for i in range({count}):\n    track_event.delay(str(uuid.uuid4()), 'broker-down')\n",
        )
        if stop == "SIGKILL":
            backend.check_output("systemctl kill --signal=SIGKILL %s", BROKER_UNIT)
        backend.check_output("systemctl restart %s", BROKER_UNIT)
        held = queued(backend, "analytics") - before
    finally:
        if original:
            redis_admin(backend, "CONFIG", "SET", "appendfsync", original)
        for host in (backend, front):
            host.check_output("systemctl start celery-worker@default")
    setting = f", appendfsync {appendfsync}" if appendfsync else ""
    values = (
        f"{BROKER_UNIT} {stop} with tasks queued{setting}",
        count,
        0,
        "-",
        count - held,
        "-",
        "-",
        f"{held} of {count} acknowledged publishes held after it",
    )
    rows.append(dict(zip(COLUMNS, values, strict=True)))
    assert held == count, f"{count - held} of {count} acknowledged messages lost"
