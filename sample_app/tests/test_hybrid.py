"""Hybrid mode: the CELERY_HYBRID_QUEUES go to a second broker through a second Celery app."""

import importlib
import json
import subprocess
import sys

import pytest
from celery import Celery
from kombu import Producer

from analytics.tasks import track_event
from myproject.celery import app
from myproject.celery_config import (
    QUEUE_NAMES,
    PromptAcks,
    PublishTaskEventsUnbuffered,
    broker_name,
    build_hybrid_celery_config,
)
from users.tasks import send_welcome_email

from .test_settings import SAMPLE_APP

EVENT = ("9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d", "signup")
REDIS_URL = "redis://:secret@redis.internal:6379/0"
RABBITMQ_URL = "amqp://app:secret@rabbit.internal:5672/app"
TRANSPORT_OPTION = {"redis": "visibility_timeout", "rabbitmq": "confirm_publish"}


@pytest.fixture
def published(monkeypatch):
    """Task messages as they reach a producer, without sending them (so no broker is needed)."""
    messages = []

    def publish(producer, body, routing_key=None, headers=None, **properties):
        if "task" in (headers or {}):  # not a task-sent event
            url = producer.connection.as_uri()
            messages.append({"url": url, "task": headers["task"], "routing_key": routing_key, **properties})

    monkeypatch.setattr(Producer, "publish", publish)
    # The test settings run tasks eagerly. Celery's conf doesn't see Django's override_settings, and
    # prefers the prefixed name to the plain one in every layer.
    monkeypatch.setitem(app.conf, "CELERY_TASK_ALWAYS_EAGER", False)
    return messages


@pytest.fixture
def hybrid_app(settings):
    settings.CELERY_HYBRID_BROKER_URL = RABBITMQ_URL
    settings.CELERY_HYBRID_QUEUES = ["analytics"]
    hybrid_app = importlib.import_module("myproject.celery_hybrid").app
    hybrid_app.conf.update(build_hybrid_celery_config(RABBITMQ_URL, ["analytics"]))
    return hybrid_app


def test_both_apps_acknowledge_and_send_task_events_as_soon_as_a_pool_thread_finishes(hybrid_app):
    for celery_app in (app, hybrid_app):
        assert PromptAcks in celery_app.steps["worker"]
        assert PublishTaskEventsUnbuffered in celery_app.steps["consumer"]


def main_broker():
    return app.connection_for_write().as_uri()


def test_hybrid_off_sends_analytics_through_the_main_broker(published):
    track_event.delay(*EVENT)

    assert [(message["url"], message["routing_key"]) for message in published] == [(main_broker(), "analytics")]


def test_hybrid_on_sends_hybrid_queues_through_the_hybrid_broker(published, hybrid_app):
    track_event.delay(*EVENT)
    send_welcome_email.delay("ada@example.com")

    assert hybrid_app.connection_for_write().as_uri() == "amqp://app:**@rabbit.internal:5672/app"
    assert [(message["task"], message["url"], message["routing_key"]) for message in published] == [
        ("analytics.tasks.track_event", hybrid_app.connection_for_write().as_uri(), "analytics"),
        ("users.tasks.send_welcome_email", main_broker(), "email"),
    ]


def test_hybrid_worker_sends_other_queues_through_the_main_broker(published, hybrid_app):
    # In the hybrid worker, shared tasks resolve to the hybrid app.
    hybrid_app.tasks["users.tasks.send_welcome_email"].delay("ada@example.com")

    assert [(message["url"], message["routing_key"]) for message in published] == [(main_broker(), "email")]


def test_seed_broker_route_key_does_not_change_the_broker(published, monkeypatch):
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)  # it would override broker_url
    with Celery("seed", broker="memory://main", set_as_current=False) as seed_app:
        # The original seed's attempt at hybrid mode.
        seed_app.conf.task_routes = {"analytics.tasks.*": {"queue": "analytics", "broker": "memory://analytics"}}
        seed_app.send_task("analytics.tasks.track_event", EVENT)

    [message] = published
    assert message["url"] == "memory://main//"
    # The unknown route key just rides along as a message property.
    assert message["broker"] == "memory://analytics"


@pytest.mark.parametrize(
    ("main_url", "hybrid_url", "hybrid_queues", "expected_hybrid_queues"),
    [
        (REDIS_URL, RABBITMQ_URL, "", ["analytics"]),
        (RABBITMQ_URL, REDIS_URL, "analytics, priority", ["analytics", "priority"]),
    ],
)
def test_settings_give_each_app_its_broker_and_queues(main_url, hybrid_url, hybrid_queues, expected_hybrid_queues):
    apps = describe_apps(
        {"CELERY_BROKER_URL": main_url, "CELERY_HYBRID_BROKER_URL": hybrid_url, "CELERY_HYBRID_QUEUES": hybrid_queues}
    )

    for app_name, url in [("myproject", main_url), ("myproject_hybrid", hybrid_url)]:
        described = apps[app_name]
        assert described["url"] == described["consumer_url"] == url.replace(":secret@", ":**@")
        # Each app gets the settings of its own broker.
        assert TRANSPORT_OPTION[broker_name(url)] in described["transport_options"]
    assert apps["myproject_hybrid"]["queues"] == expected_hybrid_queues
    assert apps["myproject"]["queues"] == [name for name in QUEUE_NAMES if name not in expected_hybrid_queues]


def test_hybrid_app_refuses_to_start_when_hybrid_mode_is_off():
    result = run_describe_apps({"CELERY_BROKER_URL": REDIS_URL})
    assert result.returncode != 0
    assert "Hybrid mode is off" in result.stderr


def test_unknown_hybrid_queue_is_rejected():
    with pytest.raises(ValueError, match="reports"):
        build_hybrid_celery_config(REDIS_URL, ["analytics", "reports"])


def test_hybrid_rabbitmq_keeps_classic_queues():
    config = build_hybrid_celery_config(RABBITMQ_URL, ["analytics"])
    assert "task_default_queue_type" not in config
    assert config["task_queues"][0].queue_arguments["x-max-priority"] == 9


# Settings are read once per process, so each environment gets its own interpreter.
DESCRIBE_APPS = """
import json
from myproject.celery import app
from myproject.celery_hybrid import app as hybrid_app

print(json.dumps({
    app.main: {
        "url": app.connection_for_write().as_uri(),
        "consumer_url": app.connection_for_read().as_uri(),
        "transport_options": app.conf.broker_transport_options,
        "queues": [queue.name for queue in app.conf.task_queues],
    }
    for app in (app, hybrid_app)
}))
"""


def run_describe_apps(env):
    # A real CELERY_BROKER_URL variable, as deployed: Celery lets it override broker_url in every app.
    base = {"PATH": "/usr/bin:/bin", "DJANGO_SETTINGS_MODULE": "myproject.settings", "DEBUG": "true"}
    return subprocess.run(
        [sys.executable, "-c", DESCRIBE_APPS],
        cwd=SAMPLE_APP,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def describe_apps(env):
    result = run_describe_apps(env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
