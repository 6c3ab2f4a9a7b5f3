"""Round trips through a real broker: ``CBK_TEST_BROKER_URL=redis://... pytest -m integration``.

Use a scratch Redis database or RabbitMQ vhost: the tests declare the app's queues there.
"""

import os

import pytest
from celery import Celery
from celery.contrib.testing import tasks  # noqa: F401 (registers celery.ping, which start_worker sends)
from celery.contrib.testing.app import setup_default_app
from celery.contrib.testing.worker import start_worker
from django.core import mail

from myproject.celery import DeclareDeadLetterQueue
from myproject.celery_config import VISIBILITY_TIMEOUT, broker_name, build_celery_config
from users.models import WelcomeEmail

BROKER_URL = os.environ.get("CBK_TEST_BROKER_URL")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not BROKER_URL, reason="set CBK_TEST_BROKER_URL to a redis:// or amqp:// broker to run"),
]


@pytest.fixture
def celery_app():
    """A Celery app with the deployed settings for the test broker, current only during the test."""
    # Results come back through Redis itself, or through RabbitMQ reply queues.
    result_backend = BROKER_URL if broker_name(BROKER_URL) == "redis" else "rpc://"
    app = Celery("integration", set_as_current=False)
    app.config_from_object(build_celery_config(BROKER_URL, result_backend=result_backend))
    app.steps["consumer"].add(DeclareDeadLetterQueue)
    with setup_default_app(app):
        yield app


@pytest.mark.django_db(transaction=True)  # the worker thread must see committed rows
def test_worker_runs_a_task_sent_through_the_broker(celery_app):
    with start_worker(celery_app, perform_ping_check=True):  # celery.ping is a round trip of its own
        result = celery_app.tasks["users.tasks.send_welcome_email"].delay("ada@example.com")
        assert result.get(timeout=10) is True

    assert [message.to for message in mail.outbox] == [["ada@example.com"]]
    assert WelcomeEmail.objects.get().sent_at is not None


def test_broker_specific_settings_reach_the_connection(celery_app):
    with celery_app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1)
        channel = connection.default_channel
        if broker_name(BROKER_URL) == "rabbitmq":
            assert connection.connection.confirm_publish is True  # the amqp library's connection
        else:
            assert channel.visibility_timeout == VISIBILITY_TIMEOUT
            assert channel.priority_steps == list(range(10))
            assert channel.queue_order_strategy == "priority"
