"""roles/redis documents every variable once: argument specs, defaults and README agree.

Runs on the controller (no instance needed)."""

import os
import re

import yaml

ROLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "roles", "redis")


def read(path):
    with open(os.path.join(ROLE, path), encoding="utf-8") as handle:
        return handle.read()


def spec_options():
    return set(yaml.safe_load(read("meta/argument_specs.yml"))["argument_specs"]["main"]["options"])


def test_every_default_and_required_variable_is_in_the_argument_specs():
    defaults = read("defaults/main.yml")
    # Set defaults, and the required ones that are only named in a comment.
    names = set(re.findall(r"^(redis_\w+):", defaults, re.M)) | set(
        re.findall(r"^# (redis_\w+): required", defaults, re.M)
    )
    assert names == spec_options()


def test_readme_table_lists_the_argument_specs():
    rows = re.findall(r"^\| `(redis_\w+)` \|", read("README.md"), re.M)
    assert len(rows) == len(set(rows)), "a variable appears twice in the README table"
    assert set(rows) == spec_options()
