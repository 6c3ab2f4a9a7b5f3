"""Django settings, read from the environment (see README.md for the variables)."""

import os
from pathlib import Path

import dj_database_url
from django.conf import global_settings
from django.core.exceptions import ImproperlyConfigured

from .celery_config import QUEUE_NAMES, build_celery_config, build_hybrid_celery_config, sentinel_settings


def env_bool(name, default=False):
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name):
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG")

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("Set SECRET_KEY (or DEBUG=true for local development).")
    SECRET_KEY = "django-insecure-local-development-only"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "users",
    "analytics",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "myproject.urls"
WSGI_APPLICATION = "myproject.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# PostgreSQL in deployment, e.g. postgres://user:password@127.0.0.1:5432/app.
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=60,
        conn_health_checks=True,
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_USER_MODEL = "users.User"
# The first hashes new passwords; the others still check old hashes. Django's own list
# (PBKDF2 first) unless set.
PASSWORD_HASHERS = env_list("PASSWORD_HASHERS") or global_settings.PASSWORD_HASHERS
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = os.environ.get("STATIC_ROOT") or None

# Path the admin is served at; empty disables it.
ADMIN_URL = os.environ.get("ADMIN_URL", "admin/").strip("/")

# HTTPS hardening: on unless DEBUG. Turn off with the variables below only where
# the site is served over plain HTTP.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]  # probes may use plain HTTP
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", default=not DEBUG)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", default=not DEBUG)
SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000))
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", default=not DEBUG)
if env_bool("TRUST_X_FORWARDED_PROTO"):
    # Only behind a proxy that always sets X-Forwarded-Proto itself.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", 25))
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS")
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL")
EMAIL_TIMEOUT = int(os.environ.get("EMAIL_TIMEOUT", 10))
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "webmaster@localhost")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}

# Celery reads the CELERY_-prefixed settings (see myproject/celery.py).
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")
# Hybrid mode (README.md): the CELERY_HYBRID_QUEUES live on a second broker, served by the app in
# myproject/celery_hybrid.py, which reads the CELERY_HYBRID_-prefixed settings. Off unless the URL is set.
CELERY_HYBRID_BROKER_URL = os.environ.get("CELERY_HYBRID_BROKER_URL") or None
CELERY_HYBRID_QUEUES = (env_list("CELERY_HYBRID_QUEUES") or ["analytics"]) if CELERY_HYBRID_BROKER_URL else []

_result_backend = os.environ.get("CELERY_RESULT_BACKEND") or None
# What sentinel:// URLs need (celery_config.build_celery_config): the master name the Sentinels
# monitor, the app's login on the Sentinels (the URLs carry the Redis servers' login), TLS.
_sentinel = sentinel_settings(os.environ)
# The name every RabbitMQ cluster node's certificate carries: amqps:// to a cluster (celery_config).
_rabbitmq_tls_name = os.environ.get("CELERY_RABBITMQ_TLS_NAME") or None
_celery_config = build_celery_config(
    CELERY_BROKER_URL,
    result_backend=_result_backend,
    quorum_queues=env_bool("CELERY_QUORUM_QUEUES"),
    queue_names=[name for name in QUEUE_NAMES if name not in CELERY_HYBRID_QUEUES],
    sentinel=_sentinel,
    rabbitmq_tls_name=_rabbitmq_tls_name,
)
globals().update({f"CELERY_{name.upper()}": value for name, value in _celery_config.items()})
if CELERY_HYBRID_BROKER_URL:
    _hybrid_config = build_hybrid_celery_config(
        CELERY_HYBRID_BROKER_URL,
        CELERY_HYBRID_QUEUES,
        _result_backend,
        sentinel=_sentinel,
        rabbitmq_tls_name=_rabbitmq_tls_name,
    )
    globals().update({f"CELERY_HYBRID_{name.upper()}": value for name, value in _hybrid_config.items()})
