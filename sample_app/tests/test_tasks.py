from datetime import timedelta
from smtplib import SMTPException, SMTPServerDisconnected
from unittest import mock

import pytest
from django.core import mail
from django.utils import timezone

from analytics.models import Event
from analytics.tasks import track_event
from myproject.celery_config import WELCOME_EMAIL_RESEND_AFTER
from users import tasks
from users.models import WelcomeEmail
from users.tasks import resend_pending_welcome_emails, send_welcome_email

pytestmark = pytest.mark.django_db


def test_welcome_email_is_sent_once_however_often_the_task_runs():
    assert send_welcome_email.delay("ada@example.com").get() is True
    assert send_welcome_email.delay("ada@example.com").get() is False

    assert len(mail.outbox) == 1
    assert mail.outbox[0].to == ["ada@example.com"]
    assert "ada@example.com" in mail.outbox[0].body
    assert WelcomeEmail.objects.get().sent_at is not None
    # A copy sent again after a crash would carry the same Message-ID.
    assert mail.outbox[0].extra_headers["Message-ID"] == f"<welcome.{WelcomeEmail.objects.get().pk}@localhost>"


def test_welcome_email_retries_on_smtp_errors_then_sends():
    failures = [SMTPServerDisconnected("connection dropped"), ConnectionRefusedError("smtp down")]

    def flaky_send(message):
        if failures:
            raise failures.pop(0)
        return message.send()

    with mock.patch.object(tasks, "send_message", side_effect=flaky_send) as patched:
        result = send_welcome_email.apply(args=["ada@example.com"])

    assert result.get() is True
    assert patched.call_count == 3
    assert len(mail.outbox) == 1


def test_welcome_email_gives_up_after_max_retries_without_marking_sent():
    with mock.patch.object(tasks, "send_message", side_effect=SMTPException("rejected")) as patched:
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


def test_owed_welcome_emails_are_enqueued_again_after_the_grace_period():
    now = timezone.now()
    WelcomeEmail.objects.create(
        email="owed@example.com", created_at=now - timedelta(seconds=WELCOME_EMAIL_RESEND_AFTER + 1)
    )
    WelcomeEmail.objects.create(email="recent@example.com", created_at=now)
    WelcomeEmail.objects.create(email="sent@example.com", created_at=now - timedelta(hours=1), sent_at=now)

    assert resend_pending_welcome_emails.delay().get() == 1

    assert [message.to for message in mail.outbox] == [["owed@example.com"]]
    assert WelcomeEmail.objects.get(email="owed@example.com").sent_at is not None
    assert resend_pending_welcome_emails.delay().get() == 0
