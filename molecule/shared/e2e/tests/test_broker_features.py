"""What the broker does with the kit's settings, measured on the deployed stack: task
priorities and dead-lettering of finally failed tasks. Results go to
artifacts/features/<scenario>.json for docs/broker-matrix.md."""

import json
import os
import time
from pathlib import Path

from cbk_testlib import MANAGE, e2e_broker, journal, wait_until

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
BROKER = e2e_broker(SCENARIO)
RESULTS = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "artifacts" / "features" / f"e2e-{BROKER}.json"
EACH = 10


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


def test_a_finally_failed_task_is_dead_lettered_on_rabbitmq_and_dropped_on_redis(backend, front):
    """track_event with an id that is no UUID fails for good (it has no retries)."""
    dead_letter = "rabbitmqctl list_queues -q -p celery name messages | awk '$1 == \"dead_letter\" {print $2}'"
    before = int(backend.check_output(dead_letter) or 0) if BROKER == "rabbitmq" else 0
    started = time.time() - 1
    backend.check_output(
        "%s shell -c %s", MANAGE, "from analytics.tasks import track_event\ntrack_event.delay('not-a-uuid', 'poison')"
    )
    wait_until(
        lambda: any(journal_lines(host, "celery-worker@default", started, "ValidationError") for host in (backend, front)),
        60,
        "the poison task failing",
    )
    time.sleep(2)
    # Redis has no dead-lettering: the failed task is acknowledged and only the worker's log keeps it.
    dead = int(backend.check_output(dead_letter) or 0) - before if BROKER == "rabbitmq" else 0
    save("dead_letter", {"dead_lettered": dead})
    assert dead == {"rabbitmq": 1, "redis": 0}[BROKER], f"{dead} messages reached dead_letter"
