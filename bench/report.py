"""bench/results.json (playbooks/bench.yml) -> bench/results.md and bench/results.png.

python report.py SECONDS    # SECONDS: how long `make bench` took
"""

import json
import os
import statistics
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BROKERS = ("rabbitmq", "redis")
# Celery defaults, no-op tasks end to end, measured once on a 2-core container (issue 8).
REFERENCE_NOOP = {"rabbitmq": 930, "redis": 590}


def case(results, broker, kind, profile):
    return next(c for c in results["celery"][broker]["cases"] if c["kind"] == kind and c["profile"] == profile)


def variants(results, broker):
    """The no-op cases of the kit with one setting changed (celery_bench.KIT_VARIANTS), in run order."""
    return [c for c in results["celery"][broker]["cases"] if c["kind"] == "noop" and "variant" in c]


def ratio(kit, defaults):
    return f"{kit / defaults:.2f}x"


def signup_latencies(phase):
    """Seconds from each signup sent to its first welcome email in the sink."""
    return [min(phase["arrived"][email]) - sent for email, sent in phase["sent"].items() if email in phase["arrived"]]


def signup_phase(phases, name):
    return next(phase for phase in phases if phase["name"] == name)


def io_rows(results, broker):
    """The I/O cases: the defaults, the kit's email worker, and that worker changed (prefetch, threads)."""
    return [c for c in results["celery"][broker]["cases"] if c["kind"] == "io"]


def runs_text(row, figure="tasks_per_s"):
    return ", ".join(str(run[figure]) for run in row["runs"])


def percentile_ms(values, fraction):
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000)


def markdown(results, seconds):
    celery = results["celery"]
    lines = [
        "# Celery bench on the sandbox",
        "",
        f"`make bench`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds} s in all, "
        f"{celery['rabbitmq']['cores']} cores shared by every container (and by whatever else runs on the machine).",
        "Load average (1, 5, 15 min) before and after each broker's run: "
        + "; ".join(f"{b} {celery[b]['loadavg_before']} -> {celery[b]['loadavg_after']}" for b in BROKERS)
        + ". Above 2 the cores were shared with other work and every figure is lower than on an idle machine.",
        "",
        "Kit = the sandbox's deployed worker instance (`celery-worker-*.env` beside django_app_env_file) with the",
        "app's Celery settings (`myproject.celery_config`); defaults = a bare `Celery(broker=URL)`, prefork pool,",
        "concurrency = cores. Throughput is end to end: first task sent to last task finished, bursts",
        "sent by 4 publisher threads (like several web processes). Latency is sent to finished.",
        "Every case runs 3 bursts, each on a worker started for it, and the cases take turns: one",
        "burst of each, then the next round, so a slow spell of the machine falls on every case",
        "alike. The median burst is reported.",
        "",
        "## (a) I/O-bound task (50 ms wait, like the welcome email's SMTP round trips)",
        "",
        "| broker | worker | burst tasks/s (median of 3) | runs | burst p50 / p99 ms | peak running | cores busy "
        "| kit/defaults | at 30 tasks/s: p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for broker in BROKERS:
        defaults = case(results, broker, "io", "defaults")
        for row in io_rows(results, broker):
            burst, paced = row["burst"], row["paced"]
            lines.append(
                f"| {broker} | {row['profile']} ({row['pool']} x{row['concurrency']}) | {burst['tasks_per_s']} "
                f"| {runs_text(row)} | {burst['p50_ms']} / {burst['p99_ms']} | {burst['peak_running']} "
                f"| {burst['cpu_busy']:.0%} | {ratio(burst['tasks_per_s'], defaults['burst']['tasks_per_s'])} "
                f"| {paced['p50_ms']} / {paced['p99_ms']} |"
            )
    lines += [
        "",
        "Burst: the tasks are sent back to back, so latency includes the wait in the queue. Peak running:",
        "most tasks running at once. Cores busy: the machine's cores during the burst, bench publisher",
        "and broker included. kit-prefetch1 is the kit's email worker with the app's prefetch multiplier",
        "of 1 instead of the celery_worker role's 4 (`celery_worker_prefetch_multiplier`);",
        "kit-no-prompt-acks is it without the app's `PromptAcks` worker step (a threads pool's late acks",
        "then wait for the event loop's next message or timer, 0.8-1.9 s seen); kit-threadsN is it with N threads.",
        "",
        "## (b) No-op task",
        "",
        "| broker | worker | tasks/s (median of 3) | runs | sent/s | cores busy | kit/defaults | reference defaults |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for broker in BROKERS:
        defaults = case(results, broker, "noop", "defaults")
        for row in (defaults, case(results, broker, "noop", "kit")):
            sent = statistics.median(run["published_per_s"] for run in row["runs"])
            reference = f"{REFERENCE_NOOP[broker]}" if row is defaults else ""
            lines.append(
                f"| {broker} | {row['profile']} ({row['pool']} x{row['concurrency']}) | {row['burst']['tasks_per_s']} "
                f"| {runs_text(row)} | {sent} | {row['burst']['cpu_busy']:.0%} "
                f"| {ratio(row['burst']['tasks_per_s'], defaults['burst']['tasks_per_s'])} | {reference} |"
            )
        kombu = celery[broker]["kombu"]
        lines.append(f"| {broker} | raw kombu publish/consume (ceiling) | {kombu['tasks_per_s']} | | | | | |")
    lines += [
        "",
        "sent/s: how fast the publisher threads sent the tasks; on RabbitMQ the kit waits for a",
        "publisher confirm on every send.",
        "",
        "### The same burst in two halves: sent with no worker running, then drained",
        "",
        "End to end, the publisher threads, the broker and the worker share the 2 cores. Here the",
        "burst is sent first (the publish path alone: what each send waits for, a publisher confirm",
        "included), then a worker is started on the full queue (its own rate, from its first task",
        "done to its last, with no publisher beside it). 3 rounds, taking turns; medians.",
        "",
        "| broker | worker | sent/s | runs | send p50 / p99 ms | drained tasks/s | runs "
        "| kit/defaults: sent, drained |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for broker in BROKERS:
        split = celery[broker]["split"]
        defaults = next(row for row in split if row["profile"] == "defaults")
        for row in split:
            middle = sorted(row["runs"], key=lambda run: run["published_per_s"])[len(row["runs"]) // 2]
            lines.append(
                f"| {broker} | {row['profile']} ({row['pool']} x{row['concurrency']}) | {row['published_per_s']} "
                f"| {runs_text(row, 'published_per_s')} "
                f"| {middle['send_p50_ms']} / {middle['send_p99_ms']} | {row['drained_per_s']} "
                f"| {runs_text(row, 'drained_per_s')} "
                f"| {ratio(row['published_per_s'], defaults['published_per_s'])}, "
                f"{ratio(row['drained_per_s'], defaults['drained_per_s'])} |"
            )
    lines += [
        "",
        "Send p50 / p99: of the run with the median sent/s, how long one `apply_async` took.",
        "kit-no-confirms is the kit without RabbitMQ's publisher confirms.",
        "",
        "## Kit against defaults",
        "",
    ]
    for broker in BROKERS:
        noop = [case(results, broker, "noop", p)["burst"]["tasks_per_s"] for p in ("kit", "defaults")]
        io = [case(results, broker, "io", p)["burst"]["tasks_per_s"] for p in ("kit", "defaults", "kit-prefetch1")]
        fastest_io = max(io_rows(results, broker), key=lambda row: row["burst"]["tasks_per_s"])
        flower, before, guarantees_only = (
            case(results, broker, "noop", profile)["burst"]["tasks_per_s"]
            for profile in ("kit-flower-events", "kit-before-issue-20", "kit-guarantees-only")
        )
        verdict = "beats" if noop[0] > noop[1] else "does not beat"
        split = {row["profile"]: row for row in celery[broker]["split"]}
        lines.append(
            f"- {broker}: no-op {ratio(*noop)}, the kit {verdict} Celery's defaults ({ratio(flower, noop[1])} while"
            f" Flower watches, {ratio(before, noop[1])} as it was before issue 20, {ratio(guarantees_only, noop[1])}"
            f" with its guarantees alone; in two halves, sent"
            f" {ratio(split['kit']['published_per_s'], split['defaults']['published_per_s'])} and drained"
            f" {ratio(split['kit']['drained_per_s'], split['defaults']['drained_per_s'])});"
            f" I/O-bound {ratio(io[0], io[1])}, {ratio(io[2], io[1])} with prefetch 1,"
            f" at most {fastest_io['burst']['tasks_per_s']} tasks/s"
            f" ({ratio(fastest_io['burst']['tasks_per_s'], io[1])}, {fastest_io['profile']},"
            f" cores {fastest_io['burst']['cpu_busy']:.0%} busy)."
        )
    lines += [
        "",
        "The kit trades tasks/s for not losing tasks. Per task it acknowledges only after the task ran",
        "(`task_acks_late`), so each task costs an ack round trip; on RabbitMQ it waits for a publisher",
        "confirm on every send; prefork children are replaced (`celery_worker_max_tasks_per_child`); its",
        "queues have priorities (on Redis, 10 lists per queue). Task events are off unless Flower turns them",
        "on, and the bench's workers are out of Flower's reach. Its workers reserve 4 messages per slot (the",
        "celery_worker role's prefetch multiplier): with 1, as the app alone would, the email threads wait",
        "on the broker (the kit-prefetch1 rows).",
        "",
        "## What each kit setting costs: the no-op task with one thing changed",
        "",
        "The kit's no-op worker (b), run again with one of its app settings or worker options changed,",
        "most of them put back to Celery's default, the rest unchanged. Above 1.00x the setting costs",
        "throughput; what it buys is in the second column.",
        "",
        "| broker | what changes | tasks/s (median of 3) | runs | against the kit |",
        "|---|---|---|---|---|",
    ]
    for broker in BROKERS:
        kit = case(results, broker, "noop", "kit")["burst"]["tasks_per_s"]
        for row in variants(results, broker):
            lines.append(
                f"| {broker} | {row['variant']} | {row['burst']['tasks_per_s']} | {runs_text(row)} "
                f"| {ratio(row['burst']['tasks_per_s'], kit)} |"
            )
    cores = celery["rabbitmq"]["cores"]
    lines += [
        "",
        "## (c) Signup to welcome email in the sink",
        "",
        "Signups through nginx (`/api/signup/` on 127.0.0.1:8080), each sent at its time by its own",
        f"thread: first on the sandbox's broker (`celery_broker: {results['broker']}`), then on each other",
        "broker after a broker switch to it (the sandbox is switched back at the end). alone: one at a",
        "time, what a signup costs the web tier (mostly hashing its password: Django's PBKDF2,",
        "1,000,000 iterations); steady: a rate the web tier keeps up with; load: the goal's rate.",
        "Request: sent to answered. To mail: sent to the mail's file in the sink's Maildir.",
        "",
        "| broker | phase | signups | answered 201 | request p50 / p99 ms | mails arrived | second mails "
        "| to mail p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for broker, phases in results["signup"].items():
        for phase in phases:
            latencies = signup_latencies(phase)
            to_mail = f"{percentile_ms(latencies, 0.5)} / {percentile_ms(latencies, 0.99)}" if latencies else "-"
            second_mails = sum(len(times) - 1 for times in phase["arrived"].values())
            lines.append(
                f"| {broker} | {phase['name']} | {phase['count']} at {phase['rate']}/s | {len(phase['sent'])} "
                f"| {percentile_ms(phase['seconds'], 0.5)} / {percentile_ms(phase['seconds'], 0.99)} "
                f"| {len(latencies)} of {len(phase['sent'])} | {second_mails} | {to_mail} |"
            )
    hash_s = results["password_hash_cpu_s"]
    load_rate = signup_phase(results["signup"][results["broker"]], "load")["rate"]
    lines += [
        "",
        f"Each signup hashes its password: {hash_s * 1000:.0f} ms of CPU on the web host (Django's",
        f"`make_password`, measured there). {cores} cores hash at most {cores / hash_s:.1f} passwords a",
        f"second, with nothing else running; at {load_rate} signups/s the hashes alone need",
        f"{load_rate * hash_s:.0f} cores, so the requests queue in front of gunicorn and the p99 grows with",
        "the length of the load, whichever broker carries the email.",
    ]
    failures = {why for phases in results["signup"].values() for phase in phases for why in phase["failed"].values()}
    if failures:
        lines += ["", "Signups not answered 201: " + "; ".join(sorted(failures)[:5]) + "."]
    lines += [
        "",
        "## Memory of the Celery units on each worker host, after the signup load",
        "",
        "Proportional set size (pages shared by prefork children count once), MiB.",
        "",
        "| broker | host | "
        + " | ".join(
            units := sorted({u for hosts in results["worker_memory"].values() for host in hosts.values() for u in host})
        )
        + " | all |",
        "|---|---|" + "---|" * (len(units) + 1),
    ]
    for broker, hosts in results["worker_memory"].items():
        for host, memory in hosts.items():
            lines.append(
                f"| {broker} | {host} | "
                + " | ".join(str(memory.get(unit, "-")) for unit in units)
                + f" | {round(sum(memory.values()), 1)} |"
            )
    lines += ["", "![results](results.png)", ""]
    return "\n".join(lines)


def plot(results, path):
    figure, (io_axes, noop_axes, latency_axes) = plt.subplots(1, 3, figsize=(14, 4.5))
    width = 0.25
    positions = range(len(BROKERS))
    for offset, profile in ((-width, "defaults"), (0, "kit"), (width, "kit-prefetch1")):
        io_axes.bar(
            [p + offset for p in positions],
            [case(results, b, "io", profile)["burst"]["tasks_per_s"] for b in BROKERS],
            width,
            label=profile,
        )
    io_axes.set_title("(a) I/O-bound task (50 ms), burst")
    for offset, label in ((-width, "defaults"), (0, "kit"), (width, "raw kombu")):
        values = [
            results["celery"][b]["kombu"]["tasks_per_s"]
            if label == "raw kombu"
            else case(results, b, "noop", label)["burst"]["tasks_per_s"]
            for b in BROKERS
        ]
        noop_axes.bar([p + offset for p in positions], values, width, label=label)
    noop_axes.set_title("(b) no-op task")
    for axes in (io_axes, noop_axes):
        axes.set_xticks(list(positions), BROKERS)
        axes.set_ylabel("tasks/s (end to end)")
        axes.legend()
    labels, p50, p99 = [], [], []
    for broker in BROKERS:
        for profile in ("defaults", "kit"):
            paced = case(results, broker, "io", profile)["paced"]
            labels.append(f"{broker}\n{profile}")
            p50.append(paced["p50_ms"])
            p99.append(paced["p99_ms"])
    for broker, phases in results["signup"].items():
        steady = signup_phase(phases, "steady")
        latencies = signup_latencies(steady)
        if latencies:
            labels.append(f"signup->mail\n{broker}, {steady['rate']}/s")
            p50.append(percentile_ms(latencies, 0.5))
            p99.append(percentile_ms(latencies, 0.99))
    latency_positions = range(len(labels))
    latency_axes.bar([p - width / 2 for p in latency_positions], p50, width, label="p50")
    latency_axes.bar([p + width / 2 for p in latency_positions], p99, width, label="p99")
    latency_axes.set_xticks(list(latency_positions), labels, fontsize=8)
    latency_axes.set_ylabel("ms")
    latency_axes.set_title("(a, c) latency at a fixed rate")
    latency_axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main():
    with open(os.path.join(HERE, "results.json")) as results_file:
        results = json.load(results_file)
    with open(os.path.join(HERE, "results.md"), "w") as report:
        report.write(markdown(results, int(sys.argv[1])))
    plot(results, os.path.join(HERE, "results.png"))


if __name__ == "__main__":
    main()
