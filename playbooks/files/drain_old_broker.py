# Run by `<app>-manage shell -c` with the settings the workers run on now; the broker
# URL the inventory now names and the seconds to wait come on stdin, as JSON. When they differ, waits until the old
# broker's queues are empty and no worker holds a task (running, prefetched or waiting
# for its ETA): the web tier already publishes to the new broker, so nothing new
# arrives, and the workers can then move without leaving a task behind.
# Prints counts only, never a URL.
import json
import sys
import time

from django.conf import settings
from kombu.exceptions import ChannelError

from myproject.celery import app

request = json.load(sys.stdin)
if settings.CELERY_BROKER_URL == request["broker_url"]:
    print("same broker")
    raise SystemExit(0)

timeout = request["timeout"]
deadline = time.monotonic() + timeout


def waiting_messages(connection):
    total = 0
    for queue in app.amqp.queues:
        channel = connection.channel()
        try:
            total += channel.queue_declare(queue, passive=True).message_count
        except ChannelError:
            pass  # never declared on this broker: nothing waits there
        finally:
            channel.close()
    return total


while True:
    with app.connection_for_write() as connection:
        waiting = waiting_messages(connection)
    inspect = app.control.inspect(timeout=5)
    held = sum(
        len(tasks)
        for reply in (inspect.active(), inspect.reserved(), inspect.scheduled())
        for tasks in (reply or {}).values()
    )
    print(f"old broker: {waiting} waiting, {held} held by workers", flush=True)
    if waiting == held == 0:
        print("drained")
        break
    if time.monotonic() > deadline:
        raise SystemExit(f"old broker not drained after {timeout} s; re-run site.yml later, nothing was lost")
    time.sleep(2)
