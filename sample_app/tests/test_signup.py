import json
from unittest import mock

import pytest
from django.core import mail
from django.db import IntegrityError
from django.test import Client
from kombu.exceptions import OperationalError

from analytics.models import Event
from users.models import User, WelcomeEmail
from users.tasks import send_welcome_email

pytestmark = pytest.mark.django_db

STRONG_PASSWORD = "correct-horse-battery-staple-42"


def post_json(client, data):
    return client.post("/api/signup/", data=json.dumps(data), content_type="application/json")


def error_codes(response):
    return {field: [error["code"] for error in errors] for field, errors in response.json()["errors"].items()}


def test_api_signup_enqueues_tasks_only_after_commit(client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = post_json(client, {"username": "ada", "email": "ada@example.com", "password": STRONG_PASSWORD})
        user = User.objects.get(username="ada")
        # Nothing has run before the commit.
        assert mail.outbox == []
        assert not Event.objects.exists()

    assert response.status_code == 201
    assert response.json() == {"id": user.pk, "username": "ada", "email": "ada@example.com"}
    assert user.check_password(STRONG_PASSWORD)
    assert len(callbacks) == 2

    for callback in callbacks:
        callback()
    assert [message.to for message in mail.outbox] == [["ada@example.com"]]
    assert WelcomeEmail.objects.get(email="ada@example.com").sent_at is not None
    event = Event.objects.get()
    assert (event.name, event.properties) == ("signup", {"user_id": user.pk})


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"username": "ada", "email": "not-an-email", "password": STRONG_PASSWORD}, {"email": ["invalid"]}),
        (
            {"username": "ada", "email": "ada@example.com", "password": "12345678"},
            {"password": ["password_too_common", "password_entirely_numeric"]},
        ),
        ({"username": "ada", "email": "ada@example.com", "password": "short"}, {"password": ["password_too_short"]}),
        (
            {"username": "ada", "email": "ada@example.com", "password": "ada@example.com"},
            {"password": ["password_too_similar"]},
        ),
        ({"username": "bad name!", "email": "ada@example.com", "password": STRONG_PASSWORD}, {"username": ["invalid"]}),
        ({"email": "ada@example.com"}, {"username": ["required"], "password": ["required"]}),
    ],
)
def test_api_signup_validation_errors(client, django_capture_on_commit_callbacks, data, expected):
    with django_capture_on_commit_callbacks() as callbacks:
        response = post_json(client, data)

    assert response.status_code == 400
    assert error_codes(response) == expected
    assert callbacks == []
    assert not User.objects.exists()


def test_api_signup_rejects_duplicate_username_and_email(client, django_user_model):
    django_user_model.objects.create_user("ada", "ada@example.com", STRONG_PASSWORD)

    response = post_json(client, {"username": "ada", "email": "other@example.com", "password": STRONG_PASSWORD})
    assert response.status_code == 400
    assert error_codes(response) == {"username": ["unique"]}

    response = post_json(client, {"username": "grace", "email": "ADA@example.com", "password": STRONG_PASSWORD})
    assert response.status_code == 400
    assert error_codes(response) == {"email": ["unique"]}
    assert django_user_model.objects.count() == 1


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", "\xff"])
def test_api_signup_rejects_malformed_body(client, body):
    response = client.post("/api/signup/", data=body.encode("latin-1"), content_type="application/json")
    assert response.status_code == 400
    assert "__all__" in response.json()["errors"]


def test_api_signup_requires_json(client):
    response = client.post("/api/signup/", {"username": "ada", "email": "ada@example.com", "password": STRONG_PASSWORD})
    assert response.status_code == 415
    assert not User.objects.exists()


def test_api_signup_rejects_get(client):
    assert client.get("/api/signup/").status_code == 405


def test_html_signup_with_csrf_then_confirmation(django_capture_on_commit_callbacks):
    client = Client(enforce_csrf_checks=True)
    page = client.get("/signup/")
    assert page.status_code == 200
    assert b'name="csrfmiddlewaretoken"' in page.content
    data = {"username": "grace", "email": "grace@example.com", "password": STRONG_PASSWORD}

    assert client.post("/signup/", data).status_code == 403  # no CSRF token

    data["csrfmiddlewaretoken"] = page.context["csrf_token"]
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client.post("/signup/", data, follow=True)

    assert response.redirect_chain == [("/signup/done/", 302)]
    assert b"Welcome, grace!" in response.content
    assert len(callbacks) == 2
    assert [message.to for message in mail.outbox] == [["grace@example.com"]]


def test_html_signup_shows_validation_errors(client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post("/signup/", {"username": "grace", "email": "nope", "password": "123"})

    assert response.status_code == 400
    assert b"Enter a valid email address." in response.content
    assert b"This password is too short." in response.content
    assert callbacks == []
    assert not User.objects.exists()


def test_api_signup_concurrent_duplicate_gives_400(client, django_capture_on_commit_callbacks):
    # Another request inserted the same username between validation and INSERT.
    with (
        mock.patch("users.forms.SignupForm.save", side_effect=IntegrityError("UNIQUE constraint failed")),
        django_capture_on_commit_callbacks() as callbacks,
    ):
        response = post_json(client, {"username": "ada", "email": "ada@example.com", "password": STRONG_PASSWORD})

    assert response.status_code == 400
    assert error_codes(response) == {"__all__": ["unique"]}
    assert callbacks == []


def test_api_signup_succeeds_when_broker_is_down(client, django_capture_on_commit_callbacks, caplog):
    broker_down = OperationalError("[Errno 111] Connection refused")
    with (
        mock.patch.object(send_welcome_email, "delay", side_effect=broker_down),
        django_capture_on_commit_callbacks(execute=True),
    ):
        response = post_json(client, {"username": "ada", "email": "ada@example.com", "password": STRONG_PASSWORD})

    assert response.status_code == 201
    assert "Connection refused" in caplog.text
    # The email is still owed: resend_pending_welcome_emails sends it later.
    assert WelcomeEmail.objects.get(email="ada@example.com").sent_at is None
    assert Event.objects.filter(name="signup").exists()  # the other task was still enqueued
