# Mitogen's linear strategy under a stable path: ansible.cfg cannot point into the venv's
# site-packages, whose name changes with the Python version. Requires the `mitogen` package
# (requirements.txt). Turn it off with ANSIBLE_STRATEGY=linear.
from ansible_mitogen.plugins.strategy.mitogen_linear import StrategyModule  # noqa: F401
