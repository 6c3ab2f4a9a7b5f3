"""The role's preflight: a wrong inventory fails before any change, with a message that
names the variable, and without printing a password. Among them, the engines: Valkey on
Debian 12, which has none, and a change of engine on a host that runs the other one.

Runs ansible-playbook (check mode, or a real run where a case says so) from the controller
against one instance; the cases run in parallel."""

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pytest
from cbk_testlib import broker_entry, redis_engine_name, role_defaults, scenario_config

SCENARIO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT_DIR = os.environ.get("MOLECULE_PROJECT_DIRECTORY", os.path.dirname(os.path.dirname(SCENARIO_DIR)))
PLATFORMS = {platform["name"]: platform["image"] for platform in scenario_config()["platforms"]}
HOST_VARS = scenario_config()["provisioner"]["inventory"]["host_vars"]
ENGINES = role_defaults("redis", "vars")["redis__engines"]


def instance(engine, release):
    """The scenario's instance of an engine (redis_engine in molecule.yml) on a Debian release."""
    return next(
        name
        for name, image in PLATFORMS.items()
        if image.endswith(f":{release}") and redis_engine_name(HOST_VARS.get(name)) == engine
    )


INSTANCE = instance("redis", 12)
# The Redis host on Debian 13 and the Valkey host: each asked to run the other engine.
REDIS_HOST, VALKEY_HOST = instance("redis", 13), instance("valkey", 13)
VALID = {
    **{secret: f"preflight-password-{n}-0123" for n, secret in enumerate(broker_entry("redis")["secrets"])},
    "redis_maxmemory": "64mb",
}
# The TLS port's variable and default, which the port check's message names.
TLS_PORT = broker_entry("redis")["ports"]["tls"]


class Case(NamedTuple):
    changes: dict  # variables set or, with None, removed
    message: str  # text the failure must contain
    host: str = INSTANCE
    check: bool = True  # a real run where False: it must refuse all the same, changing nothing


def engine_change(host, engine):
    """A host running the other engine, told to run this one: refused with the steps to follow."""
    other = ENGINES[redis_engine_name(HOST_VARS.get(host))]
    return Case(
        {"redis_engine": engine},
        f"redis_engine is {engine}, but {host} runs {other['name']} ({other['server']}, its data in "
        f"{other['data_dir']}). The role does not change the engine in place",
        host,
        check=False,
    )


CASES = {
    "missing admin password": ({"redis_admin_password": None}, "missing required arguments: redis_admin_password"),
    "short app password": (
        {"redis_app_password": "short-pw-123"},
        "redis_app_password must be a string of at least 16",
    ),
    "port out of range": (
        {"redis_port": 70000},
        f"redis_port (70000) and {TLS_PORT['var']} ({TLS_PORT['default']}) must be different TCP ports",
    ),
    "unknown appendfsync": ({"redis_appendfsync": "no"}, "redis_appendfsync must be one of: everysec, always, got: no"),
    "client network without prefix": (
        {"redis_client_networks": ["10.0.0.7"]},
        "redis_client_networks entries must be CIDR",
    ),
    "wildcard bind address": ({"redis_bind_addresses": ["0.0.0.0"]}, "redis_bind_addresses must list specific"),
    "TLS file missing on the host": (
        {"redis_tls_enabled": True, "redis_tls_source": "files", "redis_tls_cert_path": "/nonexistent/redis.crt"},
        "redis_tls_source is files but redis_tls_cert_path (/nonexistent/redis.crt) does not exist",
    ),
    "TLS from a host without a certificate": (
        {"redis_tls_enabled": True, "base_tls_certificates": "none"},
        f"redis_tls_source is host, but {INSTANCE} has no certificate of the base role (base_tls_certificates is none)",
    ),
    "TLS key that is not PEM": (
        {"redis_tls_enabled": True, "redis_tls_source": "content", "redis_tls_key": "not-a-key"},
        "redis_tls_source is content: redis_tls_ca_cert and redis_tls_cert must hold PEM",
    ),
    "Valkey on Debian 12": (
        {"redis_engine": "valkey"},
        f"redis_engine is valkey, but {INSTANCE} runs Debian 12 (bookworm), whose archive has no "
        f"{ENGINES['valkey']['name']}",
    ),
    "Redis host told to run Valkey": engine_change(REDIS_HOST, "valkey"),
    "Valkey host told to run Redis": engine_change(VALKEY_HOST, "redis"),
}
CASES = {name: Case(*case) for name, case in CASES.items()}


def run_case(case):
    variables = {**VALID, **case.changes}
    variables = {key: value for key, value in variables.items() if value is not None}
    variables["ansible_connection"] = "docker"
    check = ["--check"] if case.check else []
    result = subprocess.run(
        ["ansible-playbook", *check, "-i", f"{case.host},", "-e", json.dumps(variables), "preflight.yml"],
        check=False,
        cwd=SCENARIO_DIR,
        env={
            **os.environ,
            "ANSIBLE_COLLECTIONS_PATH": os.path.join(PROJECT_DIR, "collections"),
            "ANSIBLE_NOCOLOR": "1",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def outcomes():
    with ThreadPoolExecutor(len(CASES)) as pool:
        futures = {name: pool.submit(run_case, case) for name, case in CASES.items()}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", CASES)
def test_wrong_inventory_fails_in_preflight_naming_the_variable(outcomes, case):
    changes, message = CASES[case].changes, CASES[case].message
    returncode, output = outcomes[case]
    assert returncode != 0
    assert message in " ".join(output.split()), output[-3000:]
    # Stopped before install.yml, the first task that could change the host.
    assert "Take Redis packages from Debian's archive only" not in output
    assert "changed=0" in output
    passwords = [value for key, value in {**VALID, **changes}.items() if key.endswith("_password") and value]
    for password in passwords:
        assert password not in output
