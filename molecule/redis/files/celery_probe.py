"""Celery round trips through the Redis broker, as the sample app's workers make them.

test_redis.py runs this on the peer instance, so the traffic crosses the network and
the firewall. The settings are the sample app's own (``celery_config.py`` is copied
next to this file), so the ACL the role gives the app user is tested against what the
app really sends: queues with priority steps, late acks, events, results, chords.

    celery_probe.py roundtrip          start a worker, run tasks through it, stop it
    celery_probe.py send               publish one task with no worker running; print its id
    celery_probe.py collect TASK_ID    start a worker and print that task's result

Environment: PROBE_URL (redis:// or rediss:// with the app user's credentials) and
PROBE_CA: over TLS, the CA certificate that signed the server's certificate; empty without.
"""

import os
import ssl
import subprocess
import sys
import time

from celery import Celery, chord
from celery_config import build_celery_config

URL = os.environ["PROBE_URL"]
WORKER_TIMEOUT = 30

app = Celery("celery_probe")
app.conf.update(build_celery_config(URL, result_backend=URL))
# Task events on, the workers' as Flower turns them on and the "sent" event a project may turn on:
# the app user's ACL must let both be published.
app.conf.worker_send_task_events = app.conf.task_send_sent_event = True
if os.environ["PROBE_CA"]:
    tls = {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": os.environ["PROBE_CA"]}
    app.conf.broker_use_ssl = tls
    app.conf.redis_backend_use_ssl = tls


@app.task
def add(x, y):
    return x + y


@app.task
def total(numbers):
    return sum(numbers)


def start_worker():
    """A worker like the app's (prefork is not needed to exercise the broker); waits until it answers."""
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "celery_probe", "worker", "--pool", "solo", "--loglevel", "WARNING"],
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    deadline = time.monotonic() + WORKER_TIMEOUT
    while time.monotonic() < deadline:
        # Broadcast over the pidbox fanout exchange (PUBLISH) and wait for the reply queue.
        if app.control.inspect(timeout=1).ping():
            return worker
        if worker.poll() is not None:
            raise SystemExit(f"worker exited with {worker.returncode}")
    worker.kill()
    raise SystemExit("worker did not answer a ping")


def stop_worker(worker):
    worker.terminate()  # warm shutdown: unacked messages go back to their queues
    if worker.wait(WORKER_TIMEOUT) != 0:
        raise SystemExit(f"worker exited with {worker.returncode}")


def roundtrip():
    worker = start_worker()
    try:
        assert add.delay(2, 3).get(timeout=WORKER_TIMEOUT) == 5
        # Highest priority on Redis is 0; priority steps are separate lists.
        assert add.apply_async((1, 1), priority=0).get(timeout=WORKER_TIMEOUT) == 2
        # A countdown keeps the message unacked in the worker (the visibility bookkeeping).
        assert add.apply_async((2, 2), countdown=1).get(timeout=WORKER_TIMEOUT) == 4
        # A chord uses the result backend's counters and ordered join lists.
        assert chord(add.s(i, i) for i in range(3))(total.s()).get(timeout=WORKER_TIMEOUT) == 6
    finally:
        stop_worker(worker)
    print("ok")


def send():
    print(add.delay(20, 22).id)


def collect(task_id):
    worker = start_worker()
    try:
        print(app.AsyncResult(task_id).get(timeout=WORKER_TIMEOUT))
    finally:
        stop_worker(worker)


if __name__ == "__main__":
    {"roundtrip": roundtrip, "send": send, "collect": collect}[sys.argv[1]](*sys.argv[2:])
