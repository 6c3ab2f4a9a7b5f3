"""roles/django_app's argument specs: what the role promises beyond the generic checks of
scripts/role_docs.py (run by `make lint`). Runs on the controller (no instance needed)."""

import os

import yaml

ROLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "roles", "django_app")


def read(path):
    with open(os.path.join(ROLE, path), encoding="utf-8") as handle:
        return handle.read()


def specs():
    return yaml.safe_load(read("meta/argument_specs.yml"))["argument_specs"]


def test_main_entry_point_takes_every_release_option():
    assert set(specs()["release"]["options"]) < set(specs()["main"]["options"])


def test_required_options_are_secrets_and_not_logged():
    options = specs()["main"]["options"]
    required = {name for name, spec in options.items() if spec.get("required")}
    assert required == {"django_app_secret_key", "django_app_database_url", "django_app_broker_url"}
    for name in required | {"django_app_email_password", "django_app_result_backend"}:
        assert options[name].get("no_log") is True, name

