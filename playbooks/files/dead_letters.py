# Run by `<app>-manage shell -c` on a worker host (playbooks/dead_letters.yml): the tasks that
# failed for good. RabbitMQ dead-letters them to the dead-letter queue, with the reason in each
# message's x-death header; on Redis the app's workers keep them in a list of that name, with the
# same headers (sample_app/myproject/celery.py, keep_failed_task_on_redis).
# The request comes on stdin as JSON:
#   celery_apps  the project's Celery apps, as `celery --app` finds them (hybrid mode has two,
#                each with its own broker)
#   queue        the dead-letter queue's name
#   action       list | replay | purge
#   ids          task ids to replay or purge; "all" acts on every dead letter
#   redact       regular expression: argument keys (keyword arguments' names, dictionaries' keys)
#                whose name matches are shown as '***'
# Prints one JSON line: {"dead_letters": [{id, task, broker, queue, reason, count, first_death,
# args, kwargs}], "replayed": [ids], "purged": [ids], "not_replayed": {id: why}}. Listing changes nothing: every message
# read and not chosen is given back, in its place. A replay publishes the message
# again, unchanged but for the death headers, on the queue it died in, and acknowledges the dead
# letter only once that publish went through (RabbitMQ: confirmed).
import json
import re
import sys
from datetime import UTC, datetime

from celery.app.utils import find_app
from kombu import Producer, Queue

# Headers of a dead letter (RabbitMQ's, and the Redis list's), and of its redeliveries, which a
# replay drops.
DEATH_HEADERS = {
    f"x-{which}-death-{what}" for which in ("first", "last") for what in ("queue", "reason", "exchange")
} | {"x-death", "x-priority", "x-delivery-count", "redelivered"}

request = json.load(sys.stdin)
redact = re.compile(request["redact"], re.IGNORECASE)
ids = request["ids"]


def redacted(value):
    if isinstance(value, dict):
        return {key: "***" if redact.search(str(key)) else redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(item) for item in value]
    return value


def when(time):
    """A death's time in ISO 8601, UTC: RabbitMQ's is an AMQP timestamp, the Redis list's a string."""
    if isinstance(time, datetime):
        return (time if time.tzinfo else time.replace(tzinfo=UTC)).isoformat()
    return time


def shown(message, broker):
    """What an operator sees of a dead letter: Celery's task id and name, where and why it died,
    and its arguments with the secret-looking keys redacted."""
    headers = message.headers or {}
    death = (headers.get("x-death") or [{}])[0]
    try:
        args, kwargs, _embed = message.decode()
    except Exception as error:  # listed all the same, and can be purged: its body is not shown
        args, kwargs = f"not decoded: {type(error).__name__}", None
    return {
        "id": headers.get("id"),
        "task": headers.get("task"),
        "broker": broker,
        "queue": death.get("queue"),
        "reason": death.get("reason"),
        "count": death.get("count"),
        "first_death": when(death.get("time")),
        "args": redacted(args),
        "kwargs": redacted(kwargs),
    }


def missing_queue(connection, broker, queue):
    """Why a dead letter cannot go back to the queue it died in, or None. RabbitMQ's default
    exchange confirms, and drops, a message for a queue that no longer exists; a Redis queue is
    a list, made by the first message pushed."""
    if not queue:
        return "no x-death header names its queue"
    if broker == "rabbitmq":
        try:
            # On a channel of its own: RabbitMQ closes the channel that asks for a missing queue.
            with connection.channel() as probe:
                probe.queue_declare(queue=queue, passive=True)
        except connection.channel_errors:
            return f"queue {queue} does not exist"
    return None


def replay(producer, message, queue):
    headers = message.headers or {}
    # The default exchange routes by queue name, whatever exchange the task was first sent to.
    producer.publish(
        message.body,
        exchange="",
        routing_key=queue,
        headers={name: value for name, value in headers.items() if name not in DEATH_HEADERS},
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        priority=headers.get("x-priority", message.properties.get("priority")),
        delivery_mode=2,
        serializer=None,
    )


result = {"dead_letters": [], "replayed": [], "purged": [], "not_replayed": {}}
for app in map(find_app, request["celery_apps"]):
    with app.connection_for_write() as connection:
        broker = {"amqp": "rabbitmq"}.get(connection.transport.driver_type, connection.transport.driver_type)
        channel = connection.channel()
        dead_letters = Queue(request["queue"], no_declare=True)(channel)
        producer = Producer(channel)
        kept = []
        # Decoded only from the content types the app accepts (no pickle pushed by others).
        while (message := dead_letters.get(no_ack=False, accept=app.conf.accept_content)) is not None:
            entry = shown(message, broker)
            result["dead_letters"].append(entry)
            chosen = request["action"] != "list" and (ids == "all" or entry["id"] in ids)
            why_not = chosen and request["action"] == "replay" and missing_queue(connection, broker, entry["queue"])
            if why_not:
                result["not_replayed"][entry["id"]] = why_not
            if not chosen or why_not:
                kept.append(message)
                continue
            if request["action"] == "replay":
                replay(producer, message, entry["queue"])
            message.ack()
            result[{"replay": "replayed", "purge": "purged"}[request["action"]]].append(entry["id"])
        # Given back oldest first, which keeps their order on both brokers (closing the channel
        # would too, but reverses it on Redis).
        for message in kept:
            message.requeue()
        channel.close()
print(json.dumps(result, default=repr))
