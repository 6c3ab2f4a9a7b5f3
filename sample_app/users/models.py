from django.contrib.auth.models import AbstractUser
from django.db import models


class User(AbstractUser):
    email = models.EmailField("email address", unique=True)


class WelcomeEmail(models.Model):
    """One row per address welcomed; ``sent_at`` is set once the email has gone out."""

    email = models.EmailField(unique=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return self.email
