"""Celery app: ``celery -A myproject worker``; hybrid mode adds the one in ``celery_hybrid.py``."""

import os

import celery
from celery import Celery, bootsteps
from django.conf import settings

from .celery_config import PromptAcks, broker_name, dead_letter_queue

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


app.steps["consumer"].add(DeclareDeadLetterQueue)
app.steps["worker"].add(PromptAcks)
