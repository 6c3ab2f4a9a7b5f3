# Run by `<app>-manage shell -c` on a worker host (playbooks/switch_check.yml and
# switch_finish.yml). Compares the brokers of the settings the workers run on (env_file: the
# app's environment file, or an unfinished switch's copy of the old one) with the brokers the
# inventory names now, queue by queue, and looks at what the old brokers still hold.
#   mode "report": prints one JSON line: the queues that move, their old and new broker
#     (without credentials), the messages waiting there, the tasks workers hold, every task
#     scheduled with an ETA or countdown and whether the old broker answers.
#   mode "drain": waits, at most `timeout` seconds, until the moving queues are empty on their
#     old broker and no worker there says it holds one of their tasks; exits 1 listing what is
#     left. Only a hint of when to stop the drain workers: Celery's inspect can miss a task.
#   mode "confirm": run once every drain worker has stopped (and nothing else publishes with
#     the old settings): looks at the broker alone. On Redis it puts every message of the
#     moving queues left in kombu's `unacked` hash back in its queue (no live worker holds it
#     any more), then counts every priority list; on RabbitMQ it counts the queues' messages
#     (with no consumer left, none is unacknowledged). Prints "empty" when nothing is left.
# Orphans: when a worker dies holding tasks (or forgets them when its Redis connection drops),
# kombu keeps the messages in its `unacked` hash, to hand them out again only after
# visibility_timeout (1 h). The report counts them as held (with their ETA); "confirm" puts
# them back in their queue, where the drain workers of the next round run them. Nothing is put
# back while a worker may still hold the message: it would run twice.
# The request (new broker URLs, so secret) comes on stdin as JSON; nothing printed carries a password.
# It also names the project's queues, its Celery apps and the module of the kit's Celery settings
# (the django_app role's django_app_queues, django_app_celery_app, django_app_celery_hybrid_app
# and django_app_celery_config_module).
import importlib
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

from celery.app.utils import find_app
from kombu import Connection
from kombu.exceptions import ChannelError, OperationalError

request = json.load(sys.stdin)
# The app as `celery --app` finds it; the settings builder reaches the old broker with the app's
# transport and TLS options (connect()).
app = find_app(request["celery_app"])
celery_config = importlib.import_module(request["celery_config"])
build_celery_config, sentinel_settings = celery_config.build_celery_config, celery_config.sentinel_settings
# The mailbox publishes through the app's producer pool, on the broker of the app's settings
# (the new one once the switch has written them), whatever connection inspect is given, while
# the replies are awaited on that connection: the old broker's workers never heard the
# question. Without the pool it publishes on the connection given.
app.control.mailbox.producer_pool = None
ORPHAN_AFTER = 30  # seconds


def read_env(path):
    """The KEY="value" lines django_app writes (\\ " $ ` escaped with a backslash)."""
    env = {}
    for line in open(path, encoding="utf-8"):
        match = re.match(r'^([A-Z_][A-Z0-9_]*)="(.*)"$', line.rstrip("\n"))
        if match:
            env[match[1]] = re.sub(r"\\(.)", r"\1", match[2])
    return env


def broker_of(queue, main_url, hybrid_url, hybrid_queues):
    return hybrid_url if hybrid_url and queue in hybrid_queues else main_url


def due(eta):
    when = datetime.fromisoformat(eta)
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def safe(url):
    return Connection(url).as_uri()  # password masked


old = read_env(request["env_file"])
old_hybrid_url = old.get("CELERY_HYBRID_BROKER_URL") or None
old_hybrid_queues = [q for q in old.get("CELERY_HYBRID_QUEUES", "").split(",") if q]
# django_app writes CELERY_HYBRID_QUEUES whenever it writes a hybrid broker URL. Without it (a file
# written by hand) the queues the workers served on each broker are unknown: guessing could leave a
# queue undrained on the old broker.
if old_hybrid_url and not old_hybrid_queues:
    raise SystemExit(
        f"{request['env_file']} has CELERY_HYBRID_BROKER_URL but no CELERY_HYBRID_QUEUES: add the queues "
        "the workers consume on that broker (comma-separated), then re-run"
    )
new_hybrid_queues = request["hybrid_queues"]


def redis_hosts(url):
    """The hosts a Redis URL names: one server, or the Sentinels of a group (a ';' list; the
    redis role runs one beside each of its servers). None for another broker."""
    urls = url.split(";")
    if any(u.split("://")[0] not in request["redis_schemes"] for u in urls):
        return None
    return {Connection(u).hostname for u in urls}


def same_redis_data(was, now):
    """Whether two Redis URLs reach the same data, because they share a host: a single server
    that became a Sentinel group's first primary, or a group that gained or lost members, or a
    server whose port or TLS changed. The redis role sees to the data: a group's first deployment
    refuses to make a server that holds keys a replica, and replicas copy their primary. The old
    URL is read back from the settings file: it is all that is left of the old inventory."""
    was_hosts, now_hosts = redis_hosts(was), redis_hosts(now)
    return (
        was_hosts is not None
        and now_hosts is not None
        and bool(was_hosts & now_hosts)
        and Connection(was.split(";")[0]).virtual_host == Connection(now.split(";")[0]).virtual_host
    )


moving = {}  # queue -> old broker URL
for queue in request["queues"]:
    was = broker_of(queue, old["CELERY_BROKER_URL"], old_hybrid_url, old_hybrid_queues)
    now = broker_of(queue, request["broker_url"], request["hybrid_broker_url"], new_hybrid_queues)
    # The same Redis data through other URLs: the workers and the web only restart on the new
    # ones. Drained, its tasks would be taken by both sides, and "confirm" would put back in the
    # queue those the new workers hold.
    if was != now and not same_redis_data(was, now):
        moving[queue] = (was, now)


def unacked(connection, queues, older_than=0):
    """Redis only: the messages of the queues in kombu's `unacked` hash, delivered older_than
    seconds ago or more: {delivery tag: (id, name, queue, eta or None)}."""
    channel = connection.default_channel
    client = channel.client
    found = {}
    # Only commands the app's Redis user may run (roles/redis, redis_app_acl_commands).
    for tag, delivered in client.zrange(channel.unacked_index_key, 0, -1, withscores=True):
        raw = client.hget(channel.unacked_key, tag)
        if raw is None or time.time() - delivered < older_than:
            continue  # acknowledged meanwhile, or too recent
        message, _exchange, queue = json.loads(raw)
        headers = message.get("headers") or {}
        if queue in queues:
            found[tag] = (headers.get("id"), headers.get("task"), queue, headers.get("eta"))
    return found


def orphans(connection, queues, held_ids):
    """Redis only: delivered messages of the queues that no live worker holds, delivered
    ORPHAN_AFTER seconds ago or more (a younger one may be on its way into a worker's
    reserved list): [(id, name, queue, eta or None)]."""
    return [task for task in unacked(connection, queues, ORPHAN_AFTER).values() if task[0] and task[0] not in held_ids]


def connect(url):
    # The app's transport options (on Redis its priority steps, one list each, all counted)
    # and TLS options (amqps:// and rediss:// verify the broker, as the app does), with the old
    # settings' Sentinel login and cluster name (sentinel:// URLs, a list of amqps:// URLs).
    config = build_celery_config(
        url, sentinel=sentinel_settings(old), rabbitmq_tls_name=old.get("CELERY_RABBITMQ_TLS_NAME") or None
    )
    options = config["broker_transport_options"]
    return Connection(url, connect_timeout=5, transport_options=options, ssl=config.get("broker_use_ssl", False))


def declared(connection, queue):
    """The queue's passive declaration on this broker (message and consumer counts), or None
    when it was never declared there."""
    channel = connection.channel()
    try:
        return channel.queue_declare(queue, passive=True)
    except ChannelError:
        return None
    finally:
        channel.close()


def ask_workers(url, kind):
    """The replies of the workers connected to this broker to inspect's `kind` query (active,
    reserved or scheduled), on a connection of its own: a kombu connection serves one thread."""
    with connect(url) as connection:
        connection.ensure_connection(max_retries=1)
        return getattr(app.control.inspect(timeout=3, connection=connection), kind)() or {}


def look(url, queues):
    """Messages waiting in the queues on this broker, the tasks of those queues that workers
    connected to it say they hold: [(id, name, queue, eta or None)], and the orphans (Redis)."""
    with connect(url) as connection:
        connection.ensure_connection(max_retries=1)
        waiting = {queue: ok.message_count if (ok := declared(connection, queue)) else 0 for queue in queues}
        # Then the workers (a task taken from a queue since is held), the three queries at once:
        # with the number of workers unknown each waits its whole timeout, 9 s one after another.
        kinds = ("active", "reserved", "scheduled")
        with ThreadPoolExecutor(max_workers=len(kinds)) as pool:
            answers = list(pool.map(lambda kind: ask_workers(url, kind), kinds))
        held = []
        for replies in answers:
            for tasks in replies.values():
                for entry in tasks:
                    task = entry.get("request", entry)
                    queue = (task.get("delivery_info") or {}).get("routing_key")
                    if queue in queues:
                        held.append((task["id"], task["name"], queue, entry.get("eta")))
        lost = []
        if connection.transport.driver_type == "redis":
            lost = orphans(connection, queues, {task[0] for task in held})
    return waiting, held, lost


def confirm(url, queues):
    """With no drain worker left: what the broker itself still holds of the queues, Redis'
    unacked messages put back in their queue first. Returns (messages, consumers)."""
    with connect(url) as connection:
        connection.ensure_connection(max_retries=1)
        if connection.transport.driver_type == "redis":
            for tag, (task_id, name, queue, _) in unacked(connection, queues).items():
                connection.default_channel.qos.restore_by_tag(tag)
                print(f"put back in {queue}: {name}[{task_id}], left in Redis' unacked", flush=True)
        counts = [ok for queue in queues if (ok := declared(connection, queue))]
    return sum(ok.message_count for ok in counts), sum(ok.consumer_count for ok in counts)


def per_broker(look_at):
    """look_at(url, its moving queues) on each old broker: ([its results], [the unreachable
    ones, password masked])."""
    brokers = {}
    for queue, (was, _) in moving.items():
        brokers.setdefault(was, []).append(queue)
    results, unreachable = [], []
    for url, queues in brokers.items():
        try:
            results.append(look_at(url, queues))
        except (OperationalError, OSError):
            unreachable.append(safe(url))
    return results, unreachable


def stop_if_unreachable(unreachable):
    if unreachable and not request["abandon_unreachable"]:
        raise SystemExit(f"old broker unreachable: {', '.join(unreachable)}; re-run when it is back")


def state():
    waiting, held, orphaned = {}, [], []
    results, unreachable = per_broker(look)
    for broker_waiting, broker_held, broker_orphaned in results:
        waiting.update(broker_waiting)
        held += broker_held
        orphaned += broker_orphaned
    return waiting, held, orphaned, unreachable


if request["mode"] == "confirm":
    results, unreachable = per_broker(confirm)
    stop_if_unreachable(unreachable)
    left, consumers = sum(result[0] for result in results), sum(result[1] for result in results)
    print(f"old broker, its drain workers stopped: {left} messages, {consumers} consumers")
    print("not empty" if left or consumers else "empty")
    raise SystemExit(0)

deadline = datetime.now(timezone.utc) + timedelta(seconds=request["timeout"])
waiting, held, orphaned, unreachable = state()
if request["mode"] == "report":
    held += orphaned  # held by no live worker, but due as their ETA says
    scheduled = [{"id": i, "name": n, "queue": q, "eta": e} for i, n, q, e in held if e]
    print(
        json.dumps(
            {
                "switch": bool(moving),
                "moving": {q: {"from": safe(was), "to": safe(now)} for q, (was, now) in moving.items()},
                # Drain worker instances: the app (main or hybrid) that served a moving queue on
                # its old broker, and those of its queues that move.
                "drain_workers": {
                    name: {"app": module, "queues": queues}
                    for name, module, hybrid in (
                        ("main", request["celery_app"], False),
                        ("hybrid", request["hybrid_app"], True),
                    )
                    if (queues := sorted(q for q, (was, _) in moving.items() if (was == old_hybrid_url) == hybrid))
                },
                "waiting": waiting,
                "held": len(held),
                "orphaned": len(orphaned),
                "scheduled": scheduled,
                "late": [task for task in scheduled if due(task["eta"]) > deadline],
                "unreachable": unreachable,
            }
        )
    )
    raise SystemExit(0)

start = time.monotonic()
end = start + request["timeout"]
while True:
    # Orphans do not hold the drain: "confirm" puts them back once the drain workers stopped.
    print(
        f"old broker: {sum(waiting.values())} waiting, {len(held)} held by workers "
        f"({len(orphaned)} orphaned in Redis' unacked, put back after the drain workers stop)",
        flush=True,
    )
    stop_if_unreachable(unreachable)
    if not sum(waiting.values()) and not held:
        print(f"drained after {time.monotonic() - start:.0f} s")
        print("drained")
        break
    if time.monotonic() > end:
        pending = ", ".join(f"{name}[{task_id}] eta {eta}" for task_id, name, _, eta in held[:20])
        raise SystemExit(
            f"old broker not drained after {request['timeout']} s: {waiting} waiting, held: {pending}; "
            "its drain workers keep running, nothing was lost: re-run the playbook later"
        )
    time.sleep(2)
    waiting, held, orphaned, unreachable = state()
