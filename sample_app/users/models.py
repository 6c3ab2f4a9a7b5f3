from django.contrib.auth.models import AbstractUser
from django.db import models
from django.utils import timezone


class User(AbstractUser):
    email = models.EmailField("email address", unique=True)


class WelcomeEmail(models.Model):
    """One row per address welcomed, written with the signup (an outbox): ``sent_at`` is set
    once the email has gone out, so rows still without it are emails owed."""

    email = models.EmailField(unique=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return self.email
