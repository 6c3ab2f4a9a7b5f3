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
import time
from pathlib import Path

import pytest
from cbk_testlib import (
    MANAGE,
    SignupLoad,
    e2e_broker,
    mail_tally,
    messages_waiting,
    redis_admin,
    redis_engine,
    scenario_setting,
    settle_mail,
)

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
BROKER = e2e_broker(SCENARIO)
BACKEND = f"cbk-{SCENARIO}-debian12"  # the signups come from here
REPORT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "artifacts" / "faults" / f"e2e-{BROKER}"
WORKER_UNITS = "celery-worker@email celery-worker@default celery-worker@priority"
BROKER_UNIT = {"redis": redis_engine()["server"], "rabbitmq": "rabbitmq-server"}[BROKER]
SIGNUPS = 60
SIGNUP_RATE = 15  # per second
# Long enough for beat to re-send an email whose task was never published (WELCOME_EMAIL_RESEND_AFTER).
DELIVERY_SECONDS = 240
rows = []  # one per fault: what happened, for the report and docs/broker-matrix.md
COLUMNS = ("fault", "accepted", "refused", "emails", "lost", "twice", "resent", "notes")


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


def signup_load(site, fault, count=SIGNUPS, rate=SIGNUP_RATE):
    return SignupLoad(BACKEND, site, fault, count, rate)


def record(fault, load, messages, notes=""):
    """One report row; fails on a lost email, two different emails to one address, or a
    refused signup. Copies of one message (same Message-ID, sent again after a worker died
    between sending and recording it) are counted, not failed: SMTP has no transactions."""
    lost, twice, resent, emails = mail_tally(load, messages)
    values = (fault, len(load["accepted"]), len(load["refused"]), emails, len(lost), len(twice), resent, notes)
    rows.append(dict(zip(COLUMNS, values, strict=True)))
    assert load["accepted"], f"{fault}: the web tier accepted no signup: {load['refused'][:3]}"
    assert not lost, f"{fault}: {len(lost)} accepted signups got no email, e.g. {lost[:3]}"
    assert not twice, f"{fault}: {len(twice)} addresses got two different welcome emails, e.g. {twice[:3]}"
    assert not load["refused"], f"{fault}: the web tier refused signups: {load['refused'][:5]}"


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


def test_worker_killed_mid_task(backend, front, site):
    """The queue fills while the email workers are stopped; both start, and one is killed
    with SIGKILL while it holds prefetched and running tasks."""
    backend.check_output("systemctl stop celery-worker@email")
    front.check_output("systemctl stop celery-worker@email")
    load = signup_load(site, "sigkill").result()
    backend.check_output("systemctl start celery-worker@email")
    front.check_output("systemctl start celery-worker@email")
    time.sleep(3)
    front.check_output("systemctl kill --signal=SIGKILL celery-worker@email")
    held = expire_redis_visibility(backend)
    messages = settle_mail(backend, load, DELIVERY_SECONDS)
    notes = "RabbitMQ requeues the killed consumer's unacked messages at once"
    if held is not None:
        notes = f"{held} held unacked in Redis until visibility_timeout (aged by the test)"
    record("SIGKILL of a worker mid-task", load, messages, notes)


def test_broker_restart_while_publishing(backend, site):
    load = signup_load(site, "brokerrestart")
    time.sleep(load.seconds / 3)
    started = time.monotonic()
    backend.check_output("systemctl restart %s", BROKER_UNIT)
    restart_seconds = time.monotonic() - started
    result = load.result()
    messages = settle_mail(backend, result, DELIVERY_SECONDS)
    record(
        f"systemctl restart {BROKER_UNIT}",
        result,
        messages,
        f"restart took {restart_seconds:.1f} s; publishers retried through it",
    )


def test_worker_host_loses_every_worker(backend, front, site):
    """Every worker process of one host dies at once (the host's power, as far as the
    workers can tell; the host also serves the web tier, which stays up)."""
    load = signup_load(site, "hostdown")
    time.sleep(load.seconds / 3)
    front.check_output(f"systemctl kill --signal=SIGKILL {WORKER_UNITS}")
    front.check_output(f"systemctl stop {WORKER_UNITS}")
    try:
        result = load.result()
        held = expire_redis_visibility(backend)
        messages = settle_mail(backend, result, DELIVERY_SECONDS)
    finally:
        front.check_output(f"systemctl start {WORKER_UNITS}")
    notes = "the other host's workers take over"
    if held is not None:
        notes += f"; {held} held unacked in Redis until visibility_timeout (aged by the test)"
    record("all workers of one host SIGKILLed, stay down", result, messages, notes)


def test_web_restart_while_publishing(backend, front, site):
    load = signup_load(site, "webrestart")
    time.sleep(load.seconds / 3)
    front.check_output("systemctl restart sample_app.service")
    result = load.result()
    messages = settle_mail(backend, result, DELIVERY_SECONDS)
    record(
        "systemctl restart of gunicorn (web)",
        result,
        messages,
        "requests wait in systemd's socket during the restart",
    )


def purge(backend, queue):
    """Drops every message waiting in the queue."""
    if BROKER == "rabbitmq":
        backend.check_output(
            "rabbitmqctl purge_queue -q -p %s %s", scenario_setting("rabbitmq", "rabbitmq_app_vhost"), queue
        )
        return
    for key in redis_admin(backend, "--scan", "--pattern", f"{queue}*").split():
        redis_admin(backend, "DEL", key)


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
        before = messages_waiting(backend, BROKER, "analytics")
        backend.check_output(
            "%s shell -c %s",
            MANAGE,
            "import uuid\nfrom analytics.tasks import track_event\n"
            f"for i in range({count}):\n    track_event.delay(str(uuid.uuid4()), 'broker-down')\n",
        )
        if stop == "SIGKILL":
            backend.check_output("systemctl kill --signal=SIGKILL %s", BROKER_UNIT)
        backend.check_output("systemctl restart %s", BROKER_UNIT)
        held = messages_waiting(backend, BROKER, "analytics") - before
    finally:
        if original:
            redis_admin(backend, "CONFIG", "SET", "appendfsync", original)
        # The burst only measured the broker: running its 2000 tasks would keep the workers
        # busy long into the next tests (a task queued behind them waits minutes).
        purge(backend, "analytics")
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
