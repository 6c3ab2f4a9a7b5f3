"""Celery throughput and latency on one broker: the kit's settings against Celery's defaults.

Runs on a worker host with the app's venv (celery, kombu, redis, amqp and the app's
``myproject.celery_config``) and prints one JSON document:

    python celery_bench.py run BROKER_URL_FILE KIT_ENV_DIR

BROKER_URL_FILE holds the broker URL. KIT_ENV_DIR holds the kit's worker instance files
(roles/celery_worker): no-op tasks run like celery-worker-default.env, I/O-bound tasks like
celery-worker-email.env, with the app's Celery settings. The bench has its own Celery app,
tasks and queues (``bench_*``), so the app's workers never see its messages; every bench
worker is a subprocess stopped before the next case starts. Every wait is bounded.
"""

import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import typing
from concurrent.futures import ThreadPoolExecutor

from celery import Celery
from celery.signals import worker_ready
from kombu import Connection, Exchange, Queue

IO_SECONDS = 0.05  # the welcome email's SMTP round trips, as a wait that releases the GIL
# Tasks per burst: 2000 no-op tasks run 2 s at the defaults' rate (bursts of 1000 varied by up
# to 2x between runs); 600 I/O tasks run 1 s at 600/s and 16 s at the defaults' rate.
BURST_TASKS = {"noop": 2000, "io": 600}
REPEATS = 3  # bursts per case; the median one is reported
# The email worker's threads pool at more threads than the kit's: where the 50 ms task stops
# gaining, and how busy the cores are then.
IO_THREADS = (32, 64, 128)
IO_PACED_TASKS = 150
IO_PACED_RATE = 30  # tasks/s, below what either configuration can drain
KOMBU_MESSAGES = 3000
WARMUP_TASKS = 50
# Threads sending a burst, as several web processes do: with the kit's publisher confirms
# on RabbitMQ one sender waits for every confirm and would measure itself, not the workers.
PUBLISHERS = 4
CASE_TIMEOUT = 90  # seconds a case may wait for its tasks
START_TIMEOUT = 60  # seconds a bench worker may take to become ready


def kit_celery_config():
    """The app's myproject/celery_config.py, so the bench follows the kit when it changes.

    Loaded by path: importing the myproject package would set up the app's own Celery app
    and, through it, Django.
    """
    package_dir = os.path.dirname(importlib.util.find_spec("myproject").origin)
    spec = importlib.util.spec_from_file_location("kit_celery_config", os.path.join(package_dir, "celery_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_worker_events(config):
    config["worker_send_task_events"] = True


def as_before_issue_20(config):
    config.update(worker_send_task_events=True, task_send_sent_event=True)


def without_confirms(config):
    config["broker_transport_options"] = {
        key: value for key, value in config["broker_transport_options"].items() if key != "confirm_publish"
    }


def without_priorities(config):
    """One list per queue on Redis instead of one per priority step, no x-max-priority on RabbitMQ."""
    options = config["broker_transport_options"]
    if "priority_steps" in options:
        options["priority_steps"] = [0]
        options.pop("queue_order_strategy")
    config.pop("task_default_priority", None)
    config["task_queues"] = [
        Queue(
            queue.name,
            queue.exchange,
            routing_key=queue.routing_key,
            queue_arguments={
                key: value for key, value in (queue.queue_arguments or {}).items() if key != "x-max-priority"
            },
        )
        for queue in config["task_queues"]
    ]


def with_early_acks(config):
    config.update(task_acks_late=False, task_reject_on_worker_lost=False)


def without_time_limit(config):
    config["task_time_limit"] = None


# What keeps a task from being lost or run twice: acks after the task ran, a requeue when its
# process dies, RabbitMQ's confirm of every publish, and Redis's redelivery of unacked messages
# after the visibility timeout, which the time limit keeps longer than any task.
GUARANTEES = ("task_acks_late", "task_reject_on_worker_lost", "task_time_limit", "broker_transport_options")
GUARANTEED_TRANSPORT_OPTIONS = ("confirm_publish", "visibility_timeout")


def only_guarantees(config):
    kept = {key: config[key] for key in GUARANTEES if key in config}
    kept["broker_transport_options"] = {
        key: value for key, value in kept["broker_transport_options"].items() if key in GUARANTEED_TRANSPORT_OPTIONS
    }
    config.clear()
    config.update(kept)


def options_without(prefix, *added):
    """A change of the worker's options: those starting with prefix dropped, added appended."""
    return lambda options: [option for option in options if not option.startswith(prefix)] + list(added)


class Variant(typing.NamedTuple):
    text: str
    settings: typing.Callable = lambda config: None
    options: typing.Callable = lambda options: options
    brokers: tuple = ("rabbitmq", "redis")
    prompt_acks: bool = True  # the app's PromptAcks worker step
    kinds: tuple = ("noop",)  # the kit workers it changes: no-op (prefork), io (threads)


# The kit with one thing changed in its app settings or its worker's options, most of them put
# back to Celery's default: what each costs in tasks/s, and what it buys. Each runs on the kit's
# workers of its kinds: no-op (prefork), I/O (threads).
KIT_VARIANTS = {
    # Not Celery's default: what the deployed workers run while Flower watches them.
    "kit-flower-events": Variant("worker task events on, as Flower turns them on", settings=with_worker_events),
    "kit-no-confirms": Variant(
        "no publisher confirms (a publish the broker never took goes unnoticed)",
        settings=without_confirms,
        brokers=("rabbitmq",),
    ),
    "kit-no-priorities": Variant("no priorities", settings=without_priorities),
    "kit-early-acks": Variant("acks before the task runs (a killed worker loses its task)", settings=with_early_acks),
    "kit-no-time-limit": Variant("no time limit (a stuck task holds its message forever)", settings=without_time_limit),
    "kit-children-kept": Variant("prefork children never replaced", options=options_without("--max-tasks-per-child")),
    "kit-prefetch1": Variant(
        "prefetch multiplier 1 (the app's own)",
        options=options_without("--prefetch", "--prefetch-multiplier=1"),
        kinds=("noop", "io"),
    ),
    # A prefork worker's acks do not wait: only the threads pool's.
    "kit-no-prompt-acks": Variant(
        "without the app's PromptAcks step: a threads pool's acks wait for the event loop to wake",
        prompt_acks=False,
        kinds=("io",),
    ),
    # The kit until issue 20, against today's in the same run.
    "kit-before-issue-20": Variant(
        "all four task events always on, children replaced every 200 tasks (the kit before issue 20)",
        settings=as_before_issue_20,
        options=options_without("--max-tasks-per-child", "--max-tasks-per-child=200"),
    ),
    # Not one setting: all of them but the guarantees, to show what the guarantees alone cost.
    "kit-guarantees-only": Variant(
        "everything but the guarantees (late acks, requeue on a lost worker, time limit, confirms, visibility"
        " timeout; prefetch 4)",
        settings=only_guarantees,
        options=options_without("--max-tasks-per-child"),
    ),
}


def make_app(broker_url, profile, queue):
    """A Celery app for the bench queue ``queue``, with the kit's settings (one of them changed in a
    KIT_VARIANTS profile) or Celery's defaults."""
    app = Celery("bench", broker=broker_url)
    if profile.startswith("kit"):
        kit = kit_celery_config()
        config = kit.build_celery_config(broker_url, queue_names=(queue,))
        variant = KIT_VARIANTS.get(profile, Variant("the kit"))
        variant.settings(config)
        app.conf.update(config)
        app.conf.task_routes = None
        if variant.prompt_acks:
            app.steps["worker"].add(kit.PromptAcks)
    app.conf.task_default_queue = queue
    app.conf.worker_hijack_root_logger = False
    # Apart from the app's workers' remote control: Flower's enable_events would turn task events
    # on in every case (kit-flower-events measures them).
    app.conf.control_exchange = "bench"

    @app.task(name="bench.noop")
    def noop(phase, sent):
        record(phase, sent)

    @app.task(name="bench.io")
    def io_wait(phase, sent):
        time.sleep(IO_SECONDS)
        record(phase, sent)

    return app


_done_files = {}


def record(phase, sent):
    """Append 'sent done' (epoch seconds) to this process's file of the phase.

    One O_APPEND descriptor per process and phase: a short os.write is atomic, so the
    threads of a threads pool don't need a lock.
    """
    key = (os.getpid(), phase)
    if key not in _done_files:
        path = os.path.join(os.environ["BENCH_RUN_DIR"], f"{phase}.{os.getpid()}")
        _done_files[key] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(_done_files[key], f"{sent} {time.time()}\n".encode())


def done_times(run_dir, phase):
    pairs = []
    for name in os.listdir(run_dir):
        if name.startswith(phase + "."):
            with open(os.path.join(run_dir, name)) as done_file:
                pairs += [tuple(map(float, line.split())) for line in done_file if line.endswith("\n")]
    return pairs


def wait_done(run_dir, phase, count):
    deadline = time.monotonic() + CASE_TIMEOUT
    while len(pairs := done_times(run_dir, phase)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{phase}: {len(pairs)} of {count} tasks done after {CASE_TIMEOUT} s")
        time.sleep(0.2)
    return pairs


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def peak_running(pairs, seconds):
    """Most tasks of ``seconds`` each that ran at the same time."""
    edges = sorted([(done - seconds, 1) for _, done in pairs] + [(done, -1) for _, done in pairs])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def summary(pairs):
    first_sent = min(sent for sent, _ in pairs)
    last_done = max(done for _, done in pairs)
    latencies = [done - sent for sent, done in pairs]
    return {
        "tasks": len(pairs),
        "tasks_per_s": round(len(pairs) / (last_done - first_sent), 1),
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
    }


class BenchWorker:
    """A Celery worker subprocess (this file's ``worker`` command) on one bench queue."""

    def __init__(self, run_dir, profile, queue, pool, concurrency, extra_args=()):
        self.ready_file = os.path.join(run_dir, f"ready-{profile}-{queue}")
        argv = [
            sys.executable,
            os.path.abspath(__file__),
            "worker",
            profile,
            queue,
            self.ready_file,
            f"--pool={pool}",
            f"--concurrency={concurrency}",
            *extra_args,
        ]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.ready_file):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"bench worker {profile}/{queue} did not start")
            time.sleep(0.2)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # The next worker on this queue announces itself afresh.
        if os.path.exists(self.ready_file):
            os.remove(self.ready_file)


def publish(task, phase, count, rate=None, send_seconds=None):
    """Send ``count`` tasks at ``rate`` per second, or from PUBLISHERS threads back to back.

    Returns the tasks sent per second; appends how long each send took to ``send_seconds``.
    """
    send_seconds = [] if send_seconds is None else send_seconds

    def send_one():
        sent = time.time()
        task.apply_async((phase, sent))
        send_seconds.append(time.time() - sent)

    start = time.monotonic()
    if rate:
        for i in range(count):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            send_one()
    else:

        def send(share):
            for _ in range(share):
                send_one()

        with ThreadPoolExecutor(PUBLISHERS) as publishers:
            shares = [count // PUBLISHERS + (i < count % PUBLISHERS) for i in range(PUBLISHERS)]
            list(publishers.map(send, shares))
    return round(count / (time.monotonic() - start), 1)


class Case(typing.NamedTuple):
    """One worker configuration on one task kind."""

    profile: str
    kind: str
    pool: str
    concurrency: int
    options: tuple = ()


def in_rounds(cases, run_one):
    """REPEATS rounds of every case in turn, each run on a worker started for it: a slow spell
    of the machine falls on every case alike, not on the ones measured during it.

    Returns {case: [run_one(case, repeat), ...]}.
    """
    runs = {case: [] for case in cases}
    for repeat in range(REPEATS):
        for case in cases:
            runs[case].append(run_one(case, repeat))
        log(f"round {repeat + 1} of {REPEATS} done")
    return runs


class BenchQueue:
    """A case's own queue, app and task; the queue and its exchange are deleted on leaving."""

    def __init__(self, broker_url, case, name):
        self.name = name
        self.app = make_app(broker_url, case.profile, name)
        self.task = self.app.tasks[f"bench.{case.kind}"]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        with self.app.connection_for_write() as connection:
            Queue(self.name)(connection.default_channel).delete()
            Exchange(self.name)(connection.default_channel).delete()


def run_burst(broker_url, run_dir, case, repeat):
    """One burst of a case: its worker started and warmed up, the burst sent back to back, and
    after an I/O case's last burst the paced phase."""
    with BenchQueue(broker_url, case, f"bench_{case.kind}_{case.profile}") as queue:
        worker = BenchWorker(run_dir, case.profile, queue.name, case.pool, case.concurrency, case.options)
        try:
            publish(queue.task, f"{queue.name}-warmup{repeat}", WARMUP_TASKS)
            wait_done(run_dir, f"{queue.name}-warmup{repeat}", WARMUP_TASKS)
            phase, count = f"{queue.name}-burst{repeat}", BURST_TASKS[case.kind]
            cpu_before = cpu_times()
            published_per_s = publish(queue.task, phase, count)
            pairs = wait_done(run_dir, phase, count)
            run = (
                summary(pairs)
                | {"published_per_s": published_per_s, "cpu_busy": cpu_busy(cpu_before, cpu_times())}
                | ({"peak_running": peak_running(pairs, IO_SECONDS)} if case.kind == "io" else {})
            )
            if case.kind == "io" and repeat == REPEATS - 1:
                publish(queue.task, f"{queue.name}-paced", IO_PACED_TASKS, IO_PACED_RATE)
                run["paced"] = summary(wait_done(run_dir, f"{queue.name}-paced", IO_PACED_TASKS))
                run["paced"]["rate"] = IO_PACED_RATE
        finally:
            worker.stop()
    return run


def run_split(broker_url, run_dir, case, repeat):
    """The no-op burst in two halves that do not share the cores: sent with no worker running
    (the publish path: what each send waits for, confirms included), then drained by a worker
    started on the full queue (the worker's own rate, no publisher beside it)."""
    with BenchQueue(broker_url, case, f"bench_split_{case.profile}") as queue:
        with queue.app.connection_for_write() as connection:
            # Declared before the first send: with no worker yet, nothing else would.
            queue.app.amqp.queues[queue.name].bind(connection.default_channel).declare()
        phase, count, send_seconds = f"{queue.name}-split{repeat}", BURST_TASKS["noop"], []
        published_per_s = publish(queue.task, phase, count, send_seconds=send_seconds)
        worker = BenchWorker(run_dir, case.profile, queue.name, case.pool, case.concurrency, case.options)
        try:
            done = sorted(done for _, done in wait_done(run_dir, phase, count))
        finally:
            worker.stop()
    return {
        "published_per_s": published_per_s,
        "send_p50_ms": round(percentile(send_seconds, 0.5) * 1000, 2),
        "send_p99_ms": round(percentile(send_seconds, 0.99) * 1000, 2),
        # From the first task done, so the worker's start-up is not counted.
        "drained_per_s": round((count - 1) / (done[-1] - done[0]), 1),
    }


def case_fields(case):
    """What the report shows of a case's worker (not its options)."""
    return {"profile": case.profile, "kind": case.kind, "pool": case.pool, "concurrency": case.concurrency}


def case_result(case, runs):
    """A case's runs as the report reads them: the median burst, an I/O case's paced phase."""
    result = case_fields(case)
    if case.profile in KIT_VARIANTS:
        result["variant"] = KIT_VARIANTS[case.profile].text
    if "paced" in runs[-1]:
        result["paced"] = runs[-1].pop("paced")
    result["runs"] = runs
    result["burst"] = sorted(runs, key=lambda run: run["tasks_per_s"])[len(runs) // 2]
    log(f"{case.profile} {case.kind}: {result['burst']['tasks_per_s']} tasks/s")
    return result


def split_result(case, runs):
    result = case_fields(case) | {"runs": runs}
    for figure in ("published_per_s", "drained_per_s"):
        result[figure] = statistics.median(run[figure] for run in runs)
    log(f"{case.profile} split: sent {result['published_per_s']}/s, drained {result['drained_per_s']}/s")
    return result


def kombu_ceiling(broker_url):
    """Raw kombu: one thread publishes persistent messages while the main thread consumes and acks them."""
    exchange = Exchange("bench_kombu", type="direct")
    queue = Queue("bench_kombu", exchange, routing_key="bench_kombu")
    received = []
    with Connection(broker_url) as consumer_connection, Connection(broker_url) as producer_connection:
        queue(consumer_connection.default_channel).declare()

        def produce():
            with producer_connection.Producer() as producer:
                for i in range(KOMBU_MESSAGES):
                    producer.publish(
                        {"i": i, "sent": time.time()},
                        exchange=exchange,
                        routing_key="bench_kombu",
                        serializer="json",
                        delivery_mode="persistent",
                    )

        def consume(body, message):
            received.append((body["sent"], time.time()))
            message.ack()

        with consumer_connection.Consumer(queue, callbacks=[consume], accept=["json"], prefetch_count=100):
            producer_thread = threading.Thread(target=produce)
            producer_thread.start()
            deadline = time.monotonic() + CASE_TIMEOUT
            while len(received) < KOMBU_MESSAGES and time.monotonic() < deadline:
                try:
                    consumer_connection.drain_events(timeout=1)
                except TimeoutError:
                    pass
            producer_thread.join()
        queue(consumer_connection.default_channel).delete()
        exchange(consumer_connection.default_channel).delete()
    if len(received) < KOMBU_MESSAGES:
        raise TimeoutError(f"kombu: {len(received)} of {KOMBU_MESSAGES} messages after {CASE_TIMEOUT} s")
    result = summary(received)
    log(f"kombu: {result['tasks_per_s']} messages/s")
    return result


def log(line):
    print(time.strftime("%H:%M:%S"), line, file=sys.stderr)


def cpu_times():
    """Busy and total jiffies of every core of the machine (/proc/stat is not per container)."""
    with open("/proc/stat") as proc_stat:
        jiffies = [int(value) for value in proc_stat.readline().split()[1:]]
    idle = jiffies[3] + jiffies[4]  # idle and iowait
    return sum(jiffies) - idle, sum(jiffies)


def cpu_busy(before, after):
    """Fraction of the machine's cores busy between two cpu_times()."""
    busy, total = (a - b for a, b in zip(after, before, strict=True))
    return round(busy / total, 2) if total else None


def loadavg():
    with open("/proc/loadavg") as proc_loadavg:
        return " ".join(proc_loadavg.read().split()[:3])


def kit_instance(env_dir, name):
    """Pool, concurrency and worker options of the kit's worker instance ``name``."""
    with open(os.path.join(env_dir, f"celery-worker-{name}.env")) as env_file:
        env = dict(line.strip().split("=", 1) for line in env_file if "=" in line and not line.startswith("#"))
    pool = env["CELERY_WORKER_POOL"]
    # The unit's options: prefetch (the celery_worker role's), and for prefork the children's lifetime.
    options = [f"--prefetch-multiplier={env['CELERY_WORKER_PREFETCH_MULTIPLIER']}"]
    if pool == "prefork":
        options.append(f"--max-tasks-per-child={env['CELERY_WORKER_MAX_TASKS_PER_CHILD']}")
    return pool, int(env["CELERY_WORKER_CONCURRENCY"]), tuple(options)


def variant_worker(profile, kit_worker):
    """The kit worker's pool, concurrency and options, as a KIT_VARIANTS profile changes them."""
    pool, concurrency, options = kit_worker
    return pool, concurrency, tuple(KIT_VARIANTS.get(profile, Variant("the kit")).options(options))


def run(url_file, kit_env_dir):
    with open(url_file) as url:
        broker_url = url.read().strip()
    # Bench workers are subprocesses of this file: they read the URL from here.
    os.environ["BENCH_BROKER_URL"] = broker_url
    kit = {"noop": kit_instance(kit_env_dir, "default"), "io": kit_instance(kit_env_dir, "email")}
    cores = os.cpu_count()
    run_dir = tempfile.mkdtemp(prefix="celery-bench-")
    os.environ["BENCH_RUN_DIR"] = run_dir
    try:
        result = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cores": cores, "loadavg_before": loadavg()}
        result["kombu"] = kombu_ceiling(broker_url)
        cases = []
        for kind in ("noop", "io"):
            cases.append(Case("defaults", kind, "prefork", cores))
            cases.append(Case("kit", kind, *kit[kind]))
        io_pool, _, io_options = kit["io"]
        cases += [Case(f"kit-threads{threads}", "io", io_pool, threads, io_options) for threads in IO_THREADS]
        broker = kit_celery_config().broker_name(broker_url)
        cases += [
            Case(profile, kind, *variant_worker(profile, kit[kind]))
            for kind in ("io", "noop")
            for profile, variant in KIT_VARIANTS.items()
            if broker in variant.brokers and kind in variant.kinds
        ]
        bursts = in_rounds(cases, lambda case, repeat: run_burst(broker_url, run_dir, case, repeat))
        result["cases"] = [case_result(case, runs) for case, runs in bursts.items()]
        # The kit's publish path with and without confirms (RabbitMQ), measured apart from the worker.
        split_cases = [
            case for case in cases if case.kind == "noop" and case.profile in ("defaults", "kit", "kit-no-confirms")
        ]
        splits = in_rounds(split_cases, lambda case, repeat: run_split(broker_url, run_dir, case, repeat))
        result["split"] = [split_result(case, runs) for case, runs in splits.items()]
        result["loadavg_after"] = loadavg()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps(result))


def worker(profile, queue, ready_file, *options):
    app = make_app(os.environ["BENCH_BROKER_URL"], profile, queue)

    @worker_ready.connect
    def announce_ready(**kwargs):
        open(ready_file, "w").close()

    app.worker_main(["worker", f"--queues={queue}", f"--hostname=bench-{profile}@%h", "--loglevel=WARNING", *options])


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(*sys.argv[2:])
    elif sys.argv[1:2] == ["worker"]:
        worker(*sys.argv[2:])
    else:
        sys.exit(__doc__)
