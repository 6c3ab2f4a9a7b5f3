"""roles/django_app documents every variable once: argument specs (both entry points),
defaults and README agree. Runs on the controller (no instance needed)."""

import os
import re

import yaml

ROLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "roles", "django_app")


def read(path):
    with open(os.path.join(ROLE, path), encoding="utf-8") as handle:
        return handle.read()


def specs():
    return yaml.safe_load(read("meta/argument_specs.yml"))["argument_specs"]


def test_main_entry_point_takes_every_release_option():
    assert set(specs()["release"]["options"]) < set(specs()["main"]["options"])


def test_every_default_and_required_variable_is_in_the_argument_specs():
    defaults = read("defaults/main.yml")
    names = set(re.findall(r"^(django_app_\w+):", defaults, re.M)) | set(
        re.findall(r"^# (django_app_\w+): required", defaults, re.M)
    )
    assert names == set(specs()["main"]["options"])


def test_required_options_are_secrets_and_not_logged():
    options = specs()["main"]["options"]
    required = {name for name, spec in options.items() if spec.get("required")}
    assert required == {"django_app_secret_key", "django_app_database_url", "django_app_broker_url"}
    for name in required | {"django_app_email_password", "django_app_result_backend"}:
        assert options[name].get("no_log") is True, name


def test_readme_tables_list_the_argument_specs():
    variables = read("README.md").split("## The `release` entry point")[0]  # the facts table follows
    rows = re.findall(r"^\| `(django_app_\w+)` \|", variables, re.M)
    assert len(rows) == len(set(rows)), "a variable appears twice in the README tables"
    assert set(rows) == set(specs()["main"]["options"])
