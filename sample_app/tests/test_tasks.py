from smtplib import SMTPException, SMTPServerDisconnected
from unittest import mock

import pytest
from django.core import mail
from django.core.mail import send_mail

from analytics.models import Event
from analytics.tasks import track_event
from users import tasks
from users.models import WelcomeEmail
from users.tasks import send_welcome_email

pytestmark = pytest.mark.django_db


def test_welcome_email_is_sent_once_however_often_the_task_runs():
    assert send_welcome_email.delay("ada@example.com").get() is True
    assert send_welcome_email.delay("ada@example.com").get() is False

    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["ada@example.com"]
    assert "ada@example.com" in mail.outbox[0].body
    assert WelcomeEmail.objects.get().sent_at is not None


def test_welcome_email_retries_on_smtp_errors_then_sends():
    failures = [SMTPServerDisconnected("connection dropped"), ConnectionRefusedError("smtp down")]

    def flaky_send_mail(*args, **kwargs):
        if failures:
            raise failures.pop(0)
        return send_mail(*args, **kwargs)

    with mock.patch.object(tasks, "send_mail", side_effect=flaky_send_mail) as patched:
        result = send_welcome_email.apply(args=["ada@example.com"])

    assert result.get() is True
    assert patched.call_count == 3
    assert len(mail.outbox) == 1


def test_welcome_email_gives_up_after_max_retries_without_marking_sent():
    with mock.patch.object(tasks, "send_mail", side_effect=SMTPException("rejected")) as patched:
        result = send_welcome_email.apply(args=["ada@example.com"])

    assert result.failed()
    assert isinstance(result.result, SMTPException)
    assert patched.call_count == send_welcome_email.max_retries + 1
    assert not WelcomeEmail.objects.filter(sent_at__isnull=False).exists()

    # A later run (e.g. a redelivery) still sends it.
    assert send_welcome_email.apply(args=["ada@example.com"]).get() is True
    assert len(mail.outbox) == 1


def test_welcome_email_retry_policy_uses_exponential_backoff():
    assert send_welcome_email.retry_backoff is True
    assert send_welcome_email.max_retries == 5
    assert issubclass(SMTPServerDisconnected, send_welcome_email.autoretry_for)


def test_track_event_is_idempotent_per_event_id():
    event_id = "9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d"
    assert track_event.delay(event_id, "signup", {"user_id": 1}).get() is True
    assert track_event.delay(event_id, "signup", {"user_id": 1}).get() is False
    assert Event.objects.count() == 1
