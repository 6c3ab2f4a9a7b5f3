"""Celery app: ``celery -A myproject worker``."""

import os

from celery import Celery, bootsteps

from .celery_config import DEAD_LETTER_QUEUE, broker_name

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "myproject.settings")

app = Celery("myproject")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


class DeclareDeadLetterQueue(bootsteps.StartStopStep):
    """On RabbitMQ, declare the exchange and queue that the task queues dead-letter to.

    Runs each time the worker (re)connects, before anything can be rejected.
    """

    requires = {"celery.worker.consumer.connection:Connection"}

    def include_if(self, consumer):
        return broker_name(consumer.app.conf.broker_url) == "rabbitmq"

    def start(self, consumer):
        with consumer.connection.channel() as channel:
            DEAD_LETTER_QUEUE(channel).declare()


app.steps["consumer"].add(DeclareDeadLetterQueue)
