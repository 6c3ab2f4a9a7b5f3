# Loaded with Django, so tasks sent from web and manage processes use this project's Celery app.
from .worker import app as celery_app

__all__ = ["celery_app"]
