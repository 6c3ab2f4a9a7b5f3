"""The hosts every full-stack check works on: debian12 holds the brokers, the database,
the mail sink and worker 1 (beat, Flower); debian13 the web tier and worker 2; the
probe is no kit host, a client from outside."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml
from cbk_testlib import (
    Site,
    address,
    ansible_env,
    broker_secrets,
    direct,
    flower_ui,
    host_variable,
    inventory_host,
    inventory_sources,
    management_ui,
    prometheus_ui,
    scenario_variables,
)

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
BACKEND = f"cbk-{SCENARIO}-debian12"
FRONT = f"cbk-{SCENARIO}-debian13"
PROBE = f"cbk-{SCENARIO}-probe"
EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
SECRET_VARIABLES = [
    "postgresql_app_password",
    *broker_secrets(),
    "django_app_secret_key",
    "celery_worker_flower_password",
]


@pytest.fixture(scope="session")
def backend():
    return direct(inventory_host(BACKEND))


@pytest.fixture(scope="session")
def front():
    return direct(inventory_host(FRONT))


@pytest.fixture(scope="session")
def backend_address():
    return address(inventory_host(BACKEND))


@pytest.fixture(scope="session")
def web_address():
    return address(inventory_host(FRONT))


@pytest.fixture(scope="session")
def probe_address():
    out = subprocess.check_output(
        ["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", PROBE], text=True
    )
    return out.strip()


@pytest.fixture(scope="session")
def site(web_address):
    """The app as clients reach it: HTTPS at nginx in e2e-rabbitmq, plain HTTP in switch."""
    return Site(FRONT, web_address)


@pytest.fixture(scope="session")
def management(backend_address):
    """RabbitMQ's management UI: HTTPS with the broker host's certificate in e2e-rabbitmq."""
    return management_ui(BACKEND, backend_address)


@pytest.fixture(scope="session")
def flower(backend_address):
    """Flower, on the first worker (debian12): HTTPS with that host's certificate in e2e-rabbitmq."""
    return flower_ui(BACKEND, backend_address)


@pytest.fixture(scope="session")
def prometheus(backend_address):
    """Prometheus, on the monitoring host (debian12): HTTPS with that host's certificate in e2e-rabbitmq."""
    return prometheus_ui(BACKEND, backend_address)


@pytest.fixture(scope="session")
def probe_trusts_kit_ca(site):
    """The probe trusts the kit CA in its system store (python's clients), as an operator's
    machine would, where the scenario has one; chromium's own store is left to the browser test."""
    ca = Path(scenario_variables()["base_tls_kit_ca_dir"]) / "ca.crt"
    if ca.exists():
        subprocess.run(["docker", "cp", ca, f"{PROBE}:/usr/local/share/ca-certificates/cbk-ca.crt"], check=True)
        subprocess.run(["docker", "exec", PROBE, "update-ca-certificates"], check=True, capture_output=True)
    return site


@pytest.fixture(scope="session")
def secrets():
    """{name: value} of every secret of the scenario, the generated ones included."""
    variables = scenario_variables()
    found = {name: str(variables[name]) for name in SECRET_VARIABLES}
    # e2e-rabbitmq's copy of production.example: its vault's values (the Erlang cookie and
    # the relay's password besides the scenario's).
    if host_variable(BACKEND, "e2e_production") is True:
        vault = Path(inventory_sources()[-1]) / "group_vars" / "all" / "vault.yml"
        plain = subprocess.run(
            ["ansible-vault", "view", str(vault)], env=ansible_env(), capture_output=True, text=True, check=True
        )
        found |= {f"vault {name}": str(value) for name, value in yaml.safe_load(plain.stdout).items()}
    for path in (EPHEMERAL / "secrets").glob("*"):
        if path.is_file():
            found[f"generated {path.name}"] = path.read_text().strip()
    # The kit CA's and the hosts' private keys: a line of each key's base64 body.
    for path in Path(variables["base_tls_kit_ca_dir"]).glob("*.key"):
        found[f"private key {path.name}"] = path.read_text().splitlines()[1]
    return found
