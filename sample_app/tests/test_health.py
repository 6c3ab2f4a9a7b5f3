from unittest import mock

import pytest
from django.db import OperationalError, connection

from myproject import views


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "broker"),
    [("redis://127.0.0.1:6379/0", "redis"), ("amqp://app:secret@127.0.0.1:5672/app", "rabbitmq")],
)
def test_readyz_reports_broker_when_ready(client, settings, url, broker):
    settings.CELERY_BROKER_URL = url
    with mock.patch.object(views.celery_app, "connection_for_read") as connection_for_read:
        response = client.get("/readyz")

    connection_for_read.assert_called_once_with(url)
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "broker": broker, "broker_connection": "ok", "database": "ok"}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("url", "broker"),
    # Nothing listens on port 1, so the connection is refused straight away.
    [("redis://127.0.0.1:1/0", "redis"), ("amqp://guest:guest@127.0.0.1:1//", "rabbitmq")],
)
def test_readyz_503_when_broker_unreachable(client, settings, url, broker):
    settings.CELERY_BROKER_URL = url
    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json() == {"status": "error", "broker": broker, "broker_connection": "error", "database": "ok"}


@pytest.mark.django_db
def test_readyz_503_when_database_unreachable(client):
    with (
        mock.patch.object(views.celery_app, "connection_for_read"),
        mock.patch.object(connection, "cursor", side_effect=OperationalError("database is down")),
    ):
        response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["database"] == "error"
    assert response.json()["broker_connection"] == "ok"
