import logging

from celery import shared_task

from .models import Event

logger = logging.getLogger(__name__)


@shared_task
def track_event(event_id, name, properties=None):
    """Record an analytics event; redelivery of the same ``event_id`` is ignored."""
    _, created = Event.objects.get_or_create(id=event_id, defaults={"name": name, "properties": properties or {}})
    return created


@shared_task
def priority_demo(label):
    """Routed to the ``priority`` queue; send with ``apply_async(priority=...)``.

    RabbitMQ serves 9 first, Redis serves 0 first (see README.md).
    """
    logger.info("priority_demo: %s", label)
    return label
