# Mitogen's linear strategy under a stable path: ansible.cfg cannot point into the venv's
# site-packages, whose name changes with the Python version. Requires the `mitogen` package
# (requirements.txt). Turn it off with ANSIBLE_STRATEGY=linear. Not under plugins/strategy/: that would
# make it a plugin of the collection cbk.celery_broker_kit, which it is not (galaxy.yml).
from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule  # noqa: F401
