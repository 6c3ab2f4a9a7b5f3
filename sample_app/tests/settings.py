"""Test settings: in-memory SQLite, Celery tasks run eagerly, email kept in memory."""

import os

os.environ.setdefault("SECRET_KEY", "test-only-secret-key")

from myproject.settings import *  # noqa: E402,F403

DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
SECURE_SSL_REDIRECT = False  # the test client speaks plain HTTP

# Run tasks in-process. Errors are kept in the EagerResult (result.get() raises them)
# rather than propagated, which is what lets apply() run retries eagerly.
CELERY_TASK_ALWAYS_EAGER = True
