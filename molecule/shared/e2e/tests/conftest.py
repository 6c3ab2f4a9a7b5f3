"""The hosts every full-stack check works on: debian12 holds the brokers, the database,
the mail sink and worker 1 (beat, Flower); debian13 the web tier and worker 2; the
probe is no kit host, a client from outside."""

import os
import subprocess

import pytest
from cbk_testlib import address, direct, inventory_host

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
BACKEND = f"cbk-{SCENARIO}-debian12"
FRONT = f"cbk-{SCENARIO}-debian13"
PROBE = f"cbk-{SCENARIO}-probe"


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
