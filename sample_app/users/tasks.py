import logging
from datetime import timedelta
from smtplib import SMTPException

from celery import shared_task
from django.conf import settings
from django.core.mail import EmailMessage
from django.db import transaction
from django.template.loader import render_to_string
from django.utils import timezone

from myproject.celery_config import MAX_COUNTDOWN, WELCOME_EMAIL_RESEND_AFTER

from .models import WelcomeEmail

logger = logging.getLogger(__name__)


def message_id_domain():
    """The sender's domain: the same on every worker host, unlike the host name Django would use."""
    return settings.DEFAULT_FROM_EMAIL.rpartition("@")[2].strip(">") or "localhost"


def send_message(message):
    """Hand one message to the SMTP server (the seam tests use to make it fail)."""
    return message.send()


@shared_task(
    # SMTPException is an OSError; OSError also covers refused connections and timeouts.
    autoretry_for=(SMTPException, OSError),
    retry_backoff=True,
    retry_backoff_max=MAX_COUNTDOWN,
    retry_jitter=True,
    max_retries=5,
)
def send_welcome_email(user_email):
    """Send the welcome email once per address, however often the task runs.

    The row lock makes a concurrent run wait and then see ``sent_at``; if sending
    fails the transaction rolls back and the task retries.
    """
    with transaction.atomic():
        record, _ = WelcomeEmail.objects.select_for_update().get_or_create(email=user_email)
        if record.sent_at is not None:
            logger.info("Welcome email to %s already sent at %s", user_email, record.sent_at)
            return False
        send_message(
            EmailMessage(
                subject="Welcome!",
                body=render_to_string("users/email/welcome.txt", {"email": user_email}),
                to=[user_email],
                # The same Message-ID every time: if a crash between sending and the commit below
                # makes the task send again, mail clients see one message, not two.
                headers={"Message-ID": f"<welcome.{record.pk}@{message_id_domain()}>"},
            )
        )
        record.sent_at = timezone.now()
        record.save(update_fields=["sent_at"])
    return True


@shared_task
def resend_pending_welcome_emails():
    """Enqueue the welcome emails still owed, WELCOME_EMAIL_RESEND_AFTER seconds after their
    signup: those whose task was never published (the broker was down for longer than the
    publish retries) or was lost. Run by beat; a duplicate task sends nothing twice."""
    owed_since = timezone.now() - timedelta(seconds=WELCOME_EMAIL_RESEND_AFTER)
    emails = list(
        WelcomeEmail.objects.filter(sent_at__isnull=True, created_at__lt=owed_since).values_list("email", flat=True)
    )
    for email in emails:
        send_welcome_email.delay(email)
    if emails:
        logger.warning("Re-sent %d welcome email tasks still owed", len(emails))
    return len(emails)
