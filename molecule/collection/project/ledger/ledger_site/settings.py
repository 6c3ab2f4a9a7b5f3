"""The settings this project takes from the environment file django_app writes."""

import os

SECRET_KEY = os.environ["SECRET_KEY"]
ALLOWED_HOSTS = [name for name in os.environ.get("ALLOWED_HOSTS", "").split(",") if name]
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.staticfiles", "receipts"]
ROOT_URLCONF = "ledger_site.urls"
# Only SQLite: the fixture has no database server (DATABASE_URL is sqlite:////<path>).
DATABASES = {
    "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.environ["DATABASE_URL"].removeprefix("sqlite:///")}
}
STATIC_URL = "static/"
STATIC_ROOT = os.environ.get("STATIC_ROOT")
USE_TZ = True

EMAIL_HOST = os.environ["EMAIL_HOST"]
EMAIL_PORT = int(os.environ["EMAIL_PORT"])
DEFAULT_FROM_EMAIL = os.environ["DEFAULT_FROM_EMAIL"]

CELERY_BROKER_URL = os.environ["CELERY_BROKER_URL"]
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_ROUTES = {"receipts.tasks.send_receipt": {"queue": "receipts"}}
