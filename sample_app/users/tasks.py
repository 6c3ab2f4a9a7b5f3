import logging
from smtplib import SMTPException

from celery import shared_task
from django.core.mail import send_mail
from django.db import transaction
from django.template.loader import render_to_string
from django.utils import timezone

from myproject.celery_config import MAX_COUNTDOWN

from .models import WelcomeEmail

logger = logging.getLogger(__name__)


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
        send_mail(
            subject="Welcome!",
            message=render_to_string("users/email/welcome.txt", {"email": user_email}),
            from_email=None,
            recipient_list=[user_email],
        )
        record.sent_at = timezone.now()
        record.save(update_fields=["sent_at"])
    return True
