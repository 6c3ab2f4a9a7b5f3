"""Health probes for the load balancer and the deploy."""

import logging

from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from .celery import app as celery_app
from .celery_config import broker_name

logger = logging.getLogger(__name__)


@never_cache
@require_GET
def healthz(request):
    """The process is up and serving requests."""
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def readyz(request):
    """The database and the broker are reachable; 503 otherwise."""
    database = "ok" if _database_reachable() else "error"
    broker_connection = "ok" if _broker_reachable(settings.CELERY_BROKER_URL) else "error"
    ready = database == broker_connection == "ok"
    return JsonResponse(
        {
            "status": "ok" if ready else "error",
            "broker": broker_name(settings.CELERY_BROKER_URL),
            "broker_connection": broker_connection,
            "database": database,
        },
        status=200 if ready else 503,
    )


def _database_reachable():
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        logger.warning("Readiness check: database unreachable", exc_info=True)
        return False
    return True


def _broker_reachable(url):
    try:
        with celery_app.connection_for_read(url) as broker:
            broker.ensure_connection(max_retries=0)  # one attempt, no sleeping between retries
    except Exception:
        logger.warning("Readiness check: broker unreachable", exc_info=True)
        return False
    return True
