"""Celery app of the HA failover tests: workers and publisher on the docker host, brokers in the scenario.

The settings are the sample app's (build_celery_config), for the broker URL list in HA_BROKER_URL.
Every execution of ``ha.record`` is logged in the SQLite file HA_DB, so a test can tell a task lost
(never run) from one run twice; ``ha.crash`` kills its worker process, as a poison message would.
"""

import functools
import importlib.util
import json
import os
import sqlite3
import time
from pathlib import Path

from celery import Celery
from kombu.transport import redis as kombu_redis

# The sample app's settings module on its own: importing the myproject package would set up Django.
_spec = importlib.util.spec_from_file_location(
    "celery_config", Path(__file__).resolve().parents[3] / "sample_app" / "myproject" / "celery_config.py"
)
celery_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(celery_config)

DB = os.environ["HA_DB"]
# Long enough that a failover catches tasks in flight.
TASK_SECONDS = 0.3

app = Celery("ha")
app.config_from_object(
    celery_config.build_celery_config(
        os.environ["HA_BROKER_URL"],
        quorum_queues=os.environ.get("HA_QUORUM_QUEUES") == "true",
        # The only queue the workers consume (ha_testlib).
        queue_names=["celery"],
        sentinel=json.loads(os.environ.get("HA_SENTINEL", "null")),
        rabbitmq_tls_name=os.environ.get("HA_RABBITMQ_TLS_NAME") or None,
    )
)


def connect():
    db = sqlite3.connect(DB, timeout=60)
    db.execute("CREATE TABLE IF NOT EXISTS runs (task TEXT NOT NULL, worker TEXT, at REAL)")
    db.execute("CREATE TABLE IF NOT EXISTS unrecorded (task TEXT NOT NULL, error TEXT)")
    return db


def _append_or_log(qos, message, delivery_tag, append=kombu_redis.QoS.append):
    """Kombu's Redis ack emulation pops a message (BRPOP) and only then records it as unacked: a
    connection lost in between (a primary going down) loses that message. Log each such task,
    so a test can tell this known window from any other loss."""
    try:
        append(qos, message, delivery_tag)
    except Exception as exc:
        with connect() as db:
            db.execute("INSERT INTO unrecorded VALUES (?, ?)", (message.headers.get("id"), repr(exc)))
        raise


kombu_redis.QoS.append = _append_or_log
# A test ages the messages a worker held when its primary went away, as the clock would
# (visibility_timeout), and kombu restores aged messages at every tenth of its polls, 10 s apart:
# every poll restores them here, so a test waits 10 s for them instead of 100.
kombu_redis.QoS.restore_visible = functools.partialmethod(kombu_redis.QoS.restore_visible, interval=1)


@app.task(name="ha.record", bind=True)
def record(self):
    time.sleep(TASK_SECONDS)
    with connect() as db:
        db.execute("INSERT INTO runs VALUES (?, ?, ?)", (self.request.id, self.request.hostname, time.time()))


@app.task(name="ha.crash", bind=True)
def crash(self):
    with connect() as db:
        db.execute("INSERT INTO runs VALUES (?, ?, ?)", (self.request.id, self.request.hostname, time.time()))
    os._exit(1)


def publish(task, count, per_second):
    """Send ``count`` tasks, printing one JSON line per publish: {"sent": id, "seconds": how long the
    publish took} or {"refused": error}."""
    for _ in range(count):
        started = time.monotonic()
        try:
            task_id = app.send_task(task).id
            print(json.dumps({"sent": task_id, "seconds": time.monotonic() - started}), flush=True)
        except Exception as exc:  # noqa: BLE001 - a refused publish is a result to report, not a crash
            # When (UTC, as the brokers log), and the error kombu's wraps: to be read beside their logs.
            now = time.time()
            at = time.strftime("%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}"
            print(json.dumps({"refused": f"{at} {exc!r} from {exc.__context__!r}"}), flush=True)
        time.sleep(1 / per_second)


if __name__ == "__main__":
    import sys

    publish(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
