"""Hybrid mode's second Celery app: ``celery -A myproject.celery_hybrid worker``.

Bound to CELERY_HYBRID_BROKER_URL and serving the CELERY_HYBRID_QUEUES; ``myproject.celery.Task``
sends the tasks routed to those queues through it. See "Hybrid mode" in README.md.
"""

from celery import Celery
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from .celery import Task, add_worker_steps

if not settings.CELERY_HYBRID_BROKER_URL:
    # Without it this app would fall back to CELERY_BROKER_URL and quietly serve the main broker.
    raise ImproperlyConfigured("Hybrid mode is off: set CELERY_HYBRID_BROKER_URL to use myproject.celery_hybrid.")

# Not the current app, so shared tasks called in web processes keep resolving to the main app.
app = Celery("myproject_hybrid", task_cls=Task, set_as_current=False)
app.config_from_object("django.conf:settings", namespace="CELERY_HYBRID")
app.autodiscover_tasks()
add_worker_steps(app)
