"""WSGI entry point under a name of its own (django_app_wsgi_app: ledger_site.web:application)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ledger_site.settings")

application = get_wsgi_application()
