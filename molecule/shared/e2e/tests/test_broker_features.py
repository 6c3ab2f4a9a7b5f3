"""What the broker does with the kit's settings, measured on the deployed stack: task
priorities, and what becomes of finally failed tasks (dead letters an operator lists, replays
and purges). Results go to
artifacts/features/<scenario>.json for docs/broker-matrix.md."""

import json
import os
import re
import textwrap
import time
import uuid
from pathlib import Path

import yaml
from cbk_testlib import (
    MANAGE,
    ansible_playbook,
    e2e_broker,
    journal,
    prometheus_query,
    wait_for_alert_email,
    wait_for_task_runs,
    wait_until,
)

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
BROKER = e2e_broker(SCENARIO)
RESULTS = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "artifacts" / "features" / f"e2e-{BROKER}.json"
EACH = 10
# The alerts' emails are checked in e2e-rabbitmq (test_monitoring.py).
ALERT_EMAILS = SCENARIO == "e2e-rabbitmq"
DEAD_LETTERS_PLAYBOOK = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "playbooks" / "dead_letters.yml"


def save(name, value):
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**results, name: value}, indent=2) + "\n")


def journal_lines(host, unit, since, needle):
    return [line for line in journal(host, unit, since).splitlines() if needle in line]


def test_priorities_with_a_backlog(backend, front):
    """A backlog of priority 0 tasks, then priority 9 ones, waits for a stopped worker;
    which does the worker run first?"""
    for host in (backend, front):
        host.check_output("systemctl stop celery-worker@priority")
    backend.check_output(
        "%s shell -c %s",
        MANAGE,
        "from analytics.tasks import priority_demo\n"
        f"for i in range({EACH}):\n    priority_demo.apply_async(('prio-0',), priority=0)\n"
        f"for i in range({EACH}):\n    priority_demo.apply_async(('prio-9',), priority=9)\n",
    )
    started = time.time() - 1
    backend.check_output("systemctl start celery-worker@priority")

    def all_ran():
        ran = journal_lines(backend, "celery-worker@priority", started, "priority_demo: prio-")
        return ran if len(ran) >= 2 * EACH else None

    try:
        ran = wait_until(all_ran, 60, f"all {2 * EACH} priority tasks run")
    finally:
        front.check_output("systemctl start celery-worker@priority")
    first_half = [line.rsplit("prio-", 1)[1] for line in ran[:EACH]]
    served_first = max(("0", "9"), key=first_half.count)
    save("priority", {"first_half": first_half, "served_first": served_first})
    # RabbitMQ (x-max-priority 9) serves 9 first; kombu's Redis priority steps serve 0 first.
    assert served_first == {"rabbitmq": "9", "redis": "0"}[BROKER], first_half
    assert first_half.count(served_first) >= EACH - 2, first_half


def dead_letters(*args):
    """playbooks/dead_letters.yml as an operator runs it, with more arguments: (what it shows,
    its output, how many tasks it changed)."""
    returncode, output, _, recap = ansible_playbook(DEAD_LETTERS_PLAYBOOK, *args)
    assert returncode == 0, output[-3000:]
    shown = re.split(r"\n(?:TASK \[|PLAY RECAP)", output.split("dead_letters_result:", 1)[1], maxsplit=1)[0]
    ((changed, _failed),) = recap.values()
    return yaml.safe_load(textwrap.dedent(shown)), output, changed


def test_failed_tasks_are_dead_lettered_listed_replayed_once_and_purged(backend, front, prometheus):
    """Two analytics tasks fail for good (they have no retries): one while the app may not write
    events (INSERT revoked, a cause that is fixed below), one whose event id is no UUID. On both
    brokers playbooks/dead_letters.yml lists them, with the token among the arguments redacted,
    and Prometheus counts them; in e2e-rabbitmq the dead-letter alert is emailed. Once the grant
    is back, the first is replayed and runs once, the second is purged, and in e2e-rabbitmq the
    alert is emailed as resolved."""
    if ALERT_EMAILS:
        # Else the alert already fires, and Alertmanager emails nothing new.
        before, _, _ = dead_letters()
        assert not before["dead_letters"], f"dead letters before the drill: {before}"
    event, poison = str(uuid.uuid4()), str(uuid.uuid4())
    token = f"token-{uuid.uuid4().hex}"
    # The app's database user owns the table; REVOKE FROM / GRANT TO it.
    grant = (
        "from django.db import connection\nfrom analytics.models import Event\nwith connection.cursor() as cursor:\n"
        "    cursor.execute(f'{} INSERT ON {{Event._meta.db_table}} {} CURRENT_USER')\n"
    )
    started = time.time() - 1
    backend.check_output(
        "%s shell -c %s",
        MANAGE,
        grant.format("REVOKE", "FROM") + "from analytics.tasks import track_event\n"
        f"track_event.apply_async(({event!r}, 'dead-letter-drill'), "
        f"{{'properties': {{'plan': 'pro', 'api_token': {token!r}}}}}, task_id={event!r})\n"
        f"track_event.apply_async(('not-a-uuid', 'poison'), task_id={poison!r})\n",
    )
    try:
        wait_until(
            lambda: all(
                any(
                    f"[{task}] raised unexpected" in journal(host, "celery-worker@*", started)
                    for host in (backend, front)
                )
                for task in (event, poison)
            ),
            60,
            "both tasks failing",
        )
        time.sleep(2)
        listed, output, changed = dead_letters()
    finally:
        backend.check_output("%s shell -c %s", MANAGE, grant.format("GRANT", "TO"))
    ours = {entry["id"]: entry for entry in listed["dead_letters"] if entry["id"] in (event, poison)}
    assert ours.keys() == {event, poison}, listed
    reasons = {"rabbitmq": ("rejected", "rejected"), "redis": ("failed: ProgrammingError", "failed: ValidationError")}
    assert (ours[event]["reason"], ours[poison]["reason"]) == reasons[BROKER], ours
    assert ours[event] | {"reason": None, "first_death": None} == {
        "id": event,
        "task": "analytics.tasks.track_event",
        "broker": BROKER,
        "queue": "analytics",
        "reason": None,
        "count": 1,
        "first_death": None,
        "args": [event, "dead-letter-drill"],
        "kwargs": {"properties": {"plan": "pro", "api_token": "***"}},
    }
    assert token not in output and changed == 0
    # The broker's own count (RabbitMQ's queue, the Redis list through its exporter's key checks).
    counted = f'cbk:celery_queue_messages{{queue="dead_letter", broker="{BROKER}"}}'
    wait_until(
        lambda: sum(prometheus_query(backend, prometheus, counted).values()) >= len(ours),
        60,
        f"{counted} >= {len(ours)}",
    )
    if ALERT_EMAILS:
        fired = wait_for_alert_email(backend, "CeleryDeadLetters", (BROKER,), "firing", started, 240) - started

    since = time.time() - 1
    replayed, _, changed = dead_letters(
        "-e", "dead_letters_action=replay", "-e", json.dumps({"dead_letters_ids": [event]})
    )
    assert (replayed["replayed"], replayed["purged"], changed) == ([event], [], 1)
    purged, _, changed = dead_letters(
        "-e", "dead_letters_action=purge", "-e", json.dumps({"dead_letters_ids": [poison]})
    )
    assert (purged["replayed"], purged["purged"], changed) == ([], [poison], 1)
    replay_runs = wait_for_task_runs((backend, front), [event], since)[event]
    assert replay_runs == 1
    recorded = backend.check_output(
        "%s shell -c %s",
        MANAGE,
        f"from analytics.models import Event\nprint(Event.objects.filter(id={event!r}).count())",
    )
    assert recorded.splitlines()[-1] == "1"
    left, _, _ = dead_letters()
    assert not {event, poison} & {entry["id"] for entry in left["dead_letters"]}, left
    if ALERT_EMAILS:
        assert not left["dead_letters"], f"other dead letters keep the alert firing: {left}"
        resolved = wait_for_alert_email(backend, "CeleryDeadLetters", (BROKER,), "resolved", since, 240) - since
    save(
        "dead_letter",
        {
            "failed": len((event, poison)),
            "dead_lettered": len(ours),
            "reasons": dict(zip(("fixable", "poison"), reasons[BROKER], strict=True)),
            "replay_runs": replay_runs,
            **(
                {"alert_emailed_after_seconds": round(fired), "resolved_emailed_after_seconds": round(resolved)}
                if ALERT_EMAILS
                else {}
            ),
        },
    )
