"""Task load for the HA scenarios' failover tests (molecule/rabbitmq-cluster, molecule/redis-sentinel).

Workers and publisher run on the docker host from the sample app's venv (ha/ha_load.py); the brokers
are the scenario's containers. A test starts the workers, publishes at a steady rate, makes a fault
on a broker node part-way through (halt, kill, frozen, partitioned), and then compares what was
sent with what ran (tally), writing the counts to artifacts/ha/<scenario>.json (write_report),
one entry per fault.
"""

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = REPO / "sample_app" / ".venv" / "bin" / "python"
HA_DIR = Path(__file__).resolve().parent / "ha"
WORKERS = 2
CONCURRENCY = 4


class HALoad:
    """The Celery side of a failover test, for one broker URL list and its settings."""

    def __init__(self, tmp_path, broker_url, quorum_queues=False, sentinel=None, rabbitmq_tls_name=None, ca_file=None):
        """``sentinel`` and ``rabbitmq_tls_name`` as build_celery_config takes them. ``ca_file``: the CA
        that signed the brokers' certificates, which the controller's trust store lacks (OpenSSL
        reads SSL_CERT_FILE instead of the system's bundle)."""
        self.db = tmp_path / "runs.sqlite"
        self.env = dict(
            os.environ,
            **({"SSL_CERT_FILE": str(ca_file)} if ca_file else {}),
            PYTHONPATH=str(HA_DIR),
            HA_DB=str(self.db),
            HA_BROKER_URL=broker_url,
            HA_QUORUM_QUEUES="true" if quorum_queues else "false",
            HA_SENTINEL=json.dumps(sentinel),
            HA_RABBITMQ_TLS_NAME=rabbitmq_tls_name or "",
        )
        self.logs = tmp_path
        self.workers = []

    def start_workers(self):
        for number in range(1, WORKERS + 1):
            log = open(self.logs / f"worker{number}.log", "w")  # noqa: SIM115 - closed with the process
            command = [
                str(PYTHON),
                "-m",
                "celery",
                "-A",
                "ha_load",
                "worker",
                "-Q",
                "celery",
                "-c",
                str(CONCURRENCY),
                "-n",
                f"ha{number}@%h",
                "--without-gossip",
                "--without-mingle",
            ]
            self.workers.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def stop_workers(self):
        for worker in self.workers:
            worker.send_signal(signal.SIGTERM)
        for worker in self.workers:
            worker.wait(timeout=60)

    def publish(self, task, count, per_second, after=None, action=None, env=None, seconds=None):
        """Publish ``count`` tasks; run ``action()`` once ``after`` of them were sent. Returns (sent, refused).
        ``env`` overrides the settings' variables for this publisher; ``seconds``, a list, gets how long
        each publish sent took."""
        command = [str(PYTHON), "-m", "ha_load", task, str(count), str(per_second)]
        publisher = subprocess.Popen(command, env={**self.env, **(env or {})}, stdout=subprocess.PIPE, text=True)
        sent, refused = [], []
        for line in publisher.stdout:
            outcome = json.loads(line)
            if "sent" in outcome:
                sent.append(outcome["sent"])
                if seconds is not None:
                    seconds.append(outcome["seconds"])
            else:
                refused.append(outcome["refused"])
            if action and len(sent) + len(refused) == after:
                action()
        publisher.wait(timeout=60)
        return sent, refused

    def publish_side_by_side(self, task, count, per_second, env, after=None, action=None):
        """Two publishers at once, ``count`` tasks each: the first with the load's settings, running
        ``action()`` once ``after`` of them were sent, the second with ``env`` over them. Returns a
        dict per publisher, in that order: its sent and refused task ids, and each publish's seconds."""
        results = [{"seconds": []}, {"seconds": []}]

        def second():
            sent, refused = self.publish(task, count, per_second, env=env, seconds=results[1]["seconds"])
            results[1].update(sent=sent, refused=refused)

        beside = threading.Thread(target=second)
        beside.start()
        sent, refused = self.publish(task, count, per_second, after=after, action=action, seconds=results[0]["seconds"])
        results[0].update(sent=sent, refused=refused)
        beside.join()
        return results

    def runs(self, since=0.0):
        """{task id: executions} so far, or only those from ``since`` (time.time()): a test that makes
        several faults with one load counts each fault's own."""
        if not self.db.exists():
            return {}
        with sqlite3.connect(self.db, timeout=60) as db:
            return dict(db.execute("SELECT task, count(*) FROM runs WHERE at >= ? GROUP BY task", (since,)).fetchall())

    def unrecorded(self):
        """Task ids a worker popped from Redis but could not record as unacked (ha_load)."""
        if not self.db.exists():
            return []
        with sqlite3.connect(self.db, timeout=60) as db:
            return [task for (task,) in db.execute("SELECT task FROM unrecorded")]

    def wait_for_runs(self, task_ids, timeout, since=0.0):
        """Wait until every task in ``task_ids`` ran; return {task id: executions} of the runs from ``since``."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.runs(since)
            if set(task_ids) <= runs.keys() or time.monotonic() > deadline:
                return runs
            time.sleep(2)


def halt(container, timeout=120):
    """Shut a node's container down as a host shutdown would: systemd stops every service, then exits.

    Not `docker stop`: systemd re-executes itself on its SIGTERM, and this docker (20.10) ignores
    `--signal`, so the container would be SIGKILLed after the timeout instead.
    """
    subprocess.run(["docker", "kill", "--signal", "SIGRTMIN+3", container], check=True, capture_output=True)
    subprocess.run(["docker", "wait", container], check=True, capture_output=True, timeout=timeout)


def kill(container):
    """A power cut: SIGKILL to every process of the node at once (`docker kill`), nothing flushed or handed over."""
    subprocess.run(["docker", "kill", container], check=True, capture_output=True)


@contextmanager
def frozen(container, process):
    """The node's ``process`` (its exact name) stopped with SIGSTOP, as a long GC pause or a stalled VM
    would: its sockets stay open and its peers see it go silent. SIGCONT on leaving."""
    signal_all = ["docker", "exec", container, "pkill", "--exact"]
    subprocess.run([*signal_all, "--signal", "STOP", process], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([*signal_all, "--signal", "CONT", process], check=True, capture_output=True)


FAULT_TABLE = "cbk_fault"


def cut_off(container, peers):
    """The node cut off from the ``peers`` addresses both ways, its other links (clients) kept: a table
    of its own, ahead of the kit's firewall (which a converge replaces whole, leaving other tables be).
    It stays until deleted, or until the node's network goes with it (kill)."""
    addresses = ", ".join(peers)
    rules = (
        f"table inet {FAULT_TABLE} {{\n"
        f"  chain input {{ type filter hook input priority -10; ip saddr {{ {addresses} }} drop; }}\n"
        f"  chain output {{ type filter hook output priority -10; ip daddr {{ {addresses} }} drop; }}\n"
        "}\n"
    )
    subprocess.run(["docker", "exec", "-i", container, "nft", "-f", "-"], input=rules, text=True, check=True)


@contextmanager
def partitioned(container, peers):
    """cut_off while in the context; deleted on leaving: the partition heals."""
    cut_off(container, peers)
    try:
        yield
    finally:
        subprocess.run(["docker", "exec", container, "nft", "delete", "table", "inet", FAULT_TABLE], check=True)


def tally(sent, refused, runs):
    """What every fault reports, from HALoad.publish's (sent, refused) and HALoad.runs(): tasks sent,
    confirmed by the broker, run once, lost (confirmed, never run), run more than once, and run though
    their publish was refused (its confirm lost with the node)."""
    return {
        # First: a failed test prints the report, and a CI log's excerpt shows a line's start only.
        "refused": refused,
        "sent": len(sent) + len(refused),
        "confirmed": len(sent),
        "ran_once": sum(1 for task in sent if runs.get(task) == 1),
        "lost": sum(1 for task in sent if task not in runs),
        "ran_more_than_once": sum(1 for count in runs.values() if count > 1),
        "ran_but_not_confirmed": len(runs.keys() - set(sent)),
    }


def write_report(scenario, fault, report):
    """Adds ``{fault: report}`` to artifacts/ha/<scenario>.json (the README's HA table comes from these)."""
    path = REPO / "artifacts" / "ha" / f"{scenario}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    reports = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**reports, fault: report}, indent=2) + "\n")
