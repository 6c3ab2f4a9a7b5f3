"""Run ``manage.py check`` in a subprocess with deployment-style environments."""

import os
import subprocess
import sys
from pathlib import Path

SAMPLE_APP = Path(__file__).resolve().parent.parent
DEPLOY_ENV = {
    "DJANGO_SETTINGS_MODULE": "myproject.settings",
    "SECRET_KEY": "x7#kq2!vLm9@pZ4$wR8^tY6&nB3*cF5(hJ1)dG0-sA+eU_iO=Qz2%Wm",
    "ALLOWED_HOSTS": "example.com",
    "DATABASE_URL": "sqlite://:memory:",
    "CELERY_BROKER_URL": "amqp://app:secret@127.0.0.1:5672/app",
}


def manage(env, *args):
    base = {key: value for key, value in os.environ.items() if key in {"PATH", "HOME", "LANG"}}
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=SAMPLE_APP,
        env={**base, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def run_check(env, *args):
    return manage(env, "check", *args)


def test_check_deploy_is_clean_with_defaults():
    result = run_check(DEPLOY_ENV, "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_plain_http_switches_are_reported_by_check_deploy():
    switches = {"SECURE_SSL_REDIRECT": "false", "SESSION_COOKIE_SECURE": "false", "CSRF_COOKIE_SECURE": "false"}
    result = run_check({**DEPLOY_ENV, **switches}, "--deploy", "--fail-level", "WARNING")
    assert result.returncode != 0
    for name in switches:
        assert name in result.stderr


def test_secret_key_is_required_without_debug():
    env = {key: value for key, value in DEPLOY_ENV.items() if key != "SECRET_KEY"}
    result = run_check(env)
    assert result.returncode != 0
    assert "Set SECRET_KEY" in result.stderr
    assert run_check({**env, "DEBUG": "true"}).returncode == 0


def test_sentinel_broker_needs_the_master_name():
    env = {
        **DEPLOY_ENV,
        "CELERY_BROKER_URL": "sentinel://celery:pw@10.0.0.1:26379/0;sentinel://celery:pw@10.0.0.2:26379/0",
    }
    result = run_check(env)
    assert result.returncode != 0
    assert "CELERY_REDIS_SENTINEL_MASTER" in result.stderr
    sentinel = {"CELERY_REDIS_SENTINEL_MASTER": "celery", "CELERY_REDIS_SENTINEL_USER": "celery-sentinel"}
    assert run_check({**env, **sentinel, "CELERY_REDIS_SENTINEL_PASSWORD": "pw"}).returncode == 0


def test_password_hashers_come_from_the_environment():
    hash_one = ["shell", "-c", "from django.contrib.auth.hashers import make_password; print(make_password('pw'))"]
    assert manage(DEPLOY_ENV, *hash_one).stdout.split()[-1].startswith("pbkdf2_sha256$")
    fast = {"PASSWORD_HASHERS": "django.contrib.auth.hashers.MD5PasswordHasher"}
    assert manage({**DEPLOY_ENV, **fast}, *hash_one).stdout.split()[-1].startswith("md5$")
