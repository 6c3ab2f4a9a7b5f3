# Run by `<app>-manage shell -c` on a worker host (playbooks/switch_check.yml and
# switch_finish.yml). Compares the brokers of the settings the workers run on (env_file: the
# app's environment file, or an unfinished switch's copy of the old one) with the brokers the
# inventory names now, queue by queue, and looks at what the old brokers still hold.
#   mode "report": prints one JSON line: the queues that move, their old and new broker
#     (without credentials), the messages waiting there, the tasks workers hold, every task
#     scheduled with an ETA or countdown and whether the old broker answers.
#   mode "drain": waits, at most `timeout` seconds, until the moving queues are empty on their
#     old broker and no worker holds one of their tasks; exits 1 listing what is left.
# Orphans: when a worker dies holding tasks (or forgets them when its Redis connection drops),
# kombu keeps the messages in its `unacked` hash, to hand them out again only after
# visibility_timeout (1 h). Both modes count them as held (with their ETA); the drain puts
# them back in their queue, where its drain workers run them.
# The request (new broker URLs, so secret) comes on stdin as JSON; nothing printed carries a password.
import json
import re
import sys
import time
from datetime import datetime, timedelta, timezone

from kombu import Connection
from kombu.exceptions import ChannelError, OperationalError

from myproject.celery import app
from myproject.celery_config import QUEUE_NAMES, build_celery_config

request = json.load(sys.stdin)
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
old_hybrid_queues = [q for q in old.get("CELERY_HYBRID_QUEUES", "").split(",") if q] or ["analytics"]
new_hybrid_queues = request["hybrid_queues"]
moving = {}  # queue -> old broker URL
for queue in QUEUE_NAMES:
    was = broker_of(queue, old["CELERY_BROKER_URL"], old_hybrid_url, old_hybrid_queues)
    now = broker_of(queue, request["broker_url"], request["hybrid_broker_url"], new_hybrid_queues)
    if was != now:
        moving[queue] = (was, now)


def orphans(connection, queues, held_ids):
    """Redis only: delivered messages of the queues that no live worker holds, delivered
    ORPHAN_AFTER seconds ago or more (a younger one may be on its way into a worker's
    reserved list): {delivery tag: (id, name, queue, eta or None)}."""
    channel = connection.default_channel
    client = channel.client
    found = {}
    # Only commands the app's Redis user may run (roles/redis, redis_app_acl_commands).
    for tag, delivered in client.zrange(channel.unacked_index_key, 0, -1, withscores=True):
        raw = client.hget(channel.unacked_key, tag)
        if raw is None or time.time() - delivered < ORPHAN_AFTER:
            continue  # acknowledged meanwhile, or too recent to tell
        message, _exchange, queue = json.loads(raw)
        headers = message.get("headers") or {}
        if queue in queues and headers.get("id") and headers["id"] not in held_ids:
            found[tag] = (headers["id"], headers.get("task"), queue, headers.get("eta"))
    return found


# Per broker URL, from the previous look: the delivery tags found orphaned, and the workers
# that answered every inspect.
orphaned_before, answered_before = {}, {}


def look(url, queues, restore=False):
    """Messages waiting in the queues on this broker, the tasks of those queues that workers
    connected to it hold, orphans included: [(id, name, queue, eta or None)], and how many
    of these are orphans.
    With restore, orphans found by the previous look too go back to their queue, unless a
    worker that answered then is silent now: a live worker slow to answer must not have
    its tasks run a second time."""
    # The app's transport options (on Redis its priority steps, one list each, all counted)
    # and TLS options (amqps:// and rediss:// verify the broker, as the app does).
    config = build_celery_config(url)
    options = config["broker_transport_options"]
    with Connection(url, connect_timeout=5, transport_options=options, ssl=config.get("broker_use_ssl", False)) as connection:
        connection.ensure_connection(max_retries=1)
        waiting, orphaned = {}, 0
        for queue in queues:
            channel = connection.channel()
            try:
                waiting[queue] = channel.queue_declare(queue, passive=True).message_count
            except ChannelError:
                waiting[queue] = 0  # never declared there
            finally:
                channel.close()
        inspect = app.control.inspect(timeout=3, connection=connection)
        held, answered = [], None
        for kind in ("active", "reserved", "scheduled"):
            replies = getattr(inspect, kind)() or {}
            answered = set(replies) if answered is None else answered & set(replies)
            for tasks in replies.values():
                for entry in tasks:
                    task = entry.get("request", entry)
                    queue = (task.get("delivery_info") or {}).get("routing_key")
                    if queue in queues:
                        held.append((task["id"], task["name"], queue, entry.get("eta")))
        if connection.transport.driver_type == "redis":
            lost = orphans(connection, queues, {task[0] for task in held})
            steady = answered_before.get(url, set()) <= answered
            restored = set(lost) & orphaned_before.get(url, set()) if restore and steady else set()
            for tag, (task_id, name, queue, _) in lost.items():
                if tag in restored:
                    connection.default_channel.qos.restore_by_tag(tag)
                    waiting[queue] += 1
                    print(f"put back in {queue}: {name}[{task_id}], orphaned in Redis' unacked", flush=True)
                else:
                    held.append(lost[tag])
                    orphaned += 1
            orphaned_before[url] = set(lost) - restored
            answered_before[url] = answered
    return waiting, held, orphaned


def state(restore=False):
    by_broker = {}
    for queue, (was, _) in moving.items():
        by_broker.setdefault(was, []).append(queue)
    waiting, held, orphaned, unreachable = {}, [], 0, []
    for url, queues in by_broker.items():
        try:
            broker_waiting, broker_held, broker_orphaned = look(url, queues, restore)
        except (OperationalError, OSError):
            unreachable.append(safe(url))
            continue
        waiting.update(broker_waiting)
        held += broker_held
        orphaned += broker_orphaned
    return waiting, held, orphaned, unreachable


deadline = datetime.now(timezone.utc) + timedelta(seconds=request["timeout"])
waiting, held, orphaned, unreachable = state()
if request["mode"] == "report":
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
                    for name, module, hybrid in (("main", "myproject", False), ("hybrid", "myproject.celery_hybrid", True))
                    if (queues := sorted(q for q, (was, _) in moving.items() if (was == old_hybrid_url) == hybrid))
                },
                "waiting": waiting,
                "held": len(held),
                "orphaned": orphaned,
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
    print(
        f"old broker: {sum(waiting.values())} waiting, {len(held)} held by workers ({orphaned} orphaned)", flush=True
    )
    if unreachable and not request["abandon_unreachable"]:
        raise SystemExit(f"old broker unreachable: {', '.join(unreachable)}; re-run when it is back")
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
    waiting, held, orphaned, unreachable = state(restore=True)
