"""Celery app: ``celery -A myproject worker``; hybrid mode adds the one in ``celery_hybrid.py``."""

import os
from datetime import UTC, datetime

import celery
from celery import Celery, bootsteps, signals
from django.conf import settings

from .celery_config import (
    DEAD_LETTER_QUEUE,
    REDIS_DEAD_LETTERS_KEPT,
    PromptAcks,
    PublishTaskEventsUnbuffered,
    broker_name,
    dead_letter_queue,
    redis_death_headers,
)

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "myproject.settings")


class Task(celery.Task):
    """Publishes each task through the app whose broker holds its queue.

    Celery has no per-route broker: an app sends every task over its own broker connection. So in
    hybrid mode a task routed to one of ``CELERY_HYBRID_QUEUES`` is handed to the same task on the
    hybrid app, and any other task to the main app (in the hybrid worker, shared tasks resolve to
    the hybrid app).
    """

    def apply_async(self, args=None, kwargs=None, **options):
        if settings.CELERY_HYBRID_QUEUES:
            # A copy: the router pops "queue" from the options it is given.
            queue = self.app.amqp.router.route(dict(options), self.name, args, kwargs)["queue"].name
            target = _hybrid_app() if queue in settings.CELERY_HYBRID_QUEUES else app
            if target is not self.app:
                options.pop("producer", None)  # e.g. from a group: connected to this app's broker
                return target.tasks[self.name].apply_async(args, kwargs, **options)
        return super().apply_async(args, kwargs, **options)


def _hybrid_app():
    from .celery_hybrid import app as hybrid_app  # imported when first needed: that module imports this one

    return hybrid_app


app = Celery("myproject", task_cls=Task)
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


class DeclareDeadLetterQueue(bootsteps.StartStopStep):
    """On RabbitMQ, declare the exchange and queue that the task queues dead-letter to.

    Runs each time the worker (re)connects, before anything can be rejected.
    """

    requires = {"celery.worker.consumer.connection:Connection"}

    def include_if(self, consumer):
        # broker_read_url, not broker_url: the CELERY_BROKER_URL environment variable overrides the
        # latter in every app, including the hybrid one (see celery_config.build_hybrid_celery_config).
        return broker_name(consumer.app.conf.broker_read_url) == "rabbitmq"

    def start(self, consumer):
        # Quorum mode declares the task queues, and so their dead-letter queue, as quorum queues.
        quorum_queues = consumer.app.conf.task_default_queue_type == "quorum"
        with consumer.connection.channel() as channel:
            dead_letter_queue(quorum_queues)(channel).declare()


@signals.task_failure.connect
def keep_failed_task_on_redis(sender, task_id, exception, args, kwargs, **_):
    """On Redis, keep a task that finally failed in the dead-letter list, as RabbitMQ keeps its
    dead letters: the same message, with the headers RabbitMQ would give it.

    Retries are no failure. Late acks: this runs before the task's message is acknowledged, so a
    worker lost meanwhile leaves the task to be delivered again, as on RabbitMQ (at least once).
    """
    request = sender.request
    if request.is_eager or broker_name(sender.app.conf.broker_read_url) != "redis":
        return
    # The worker's main process sends this signal too (a hard time limit), with an empty request.
    delivery = request.delivery_info or {}
    queue = delivery.get("routing_key") or sender.app.amqp.router.route({}, sender.name, args, kwargs)["queue"].name
    # What the task needs to run again as it would have: its place in a workflow included.
    message = sender.app.amqp.create_task_message(
        task_id,
        sender.name,
        args,
        kwargs,
        root_id=request.root_id,
        parent_id=request.parent_id,
        group_id=request.group,
        group_index=request.group_index,
        chord=request.chord,
        chain=request.chain,
        callbacks=request.callbacks,
        errbacks=request.errbacks,
    )
    headers = redis_death_headers(queue, delivery.get("priority"), exception, datetime.now(UTC))
    with sender.app.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            exchange="",
            routing_key=DEAD_LETTER_QUEUE,
            headers={**message.headers, **headers},
            serializer=sender.serializer,
            # kombu's list for priority 0 is the queue's own name, the one trimmed below.
            priority=0,
            retry=True,
            retry_policy=sender.app.conf.task_publish_retry_policy,
            **message.properties,
        )
        producer.channel.client.ltrim(DEAD_LETTER_QUEUE, 0, REDIS_DEAD_LETTERS_KEPT - 1)


def add_worker_steps(celery_app):
    """The kit's worker and consumer steps, in the main app and the hybrid one alike."""
    celery_app.steps["consumer"].update({DeclareDeadLetterQueue, PublishTaskEventsUnbuffered})
    celery_app.steps["worker"].add(PromptAcks)


add_worker_steps(app)
