"""A real browser (Debian's chromium, headless, driven by chromedriver from the probe
container): a user signs up through the HTML form and sees the confirmation, and gets
the email; the admin logs in to the RabbitMQ management UI and sees the app's queues;
Flower lists the workers of both hosts. Screenshots: artifacts/browser/<scenario>/."""

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from cbk_testlib import e2e_broker, scenario_variables, wait_for_maildir_message

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
BROKER = e2e_broker(SCENARIO)
PROBE = f"cbk-{SCENARIO}-probe"
SCREENSHOTS = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "artifacts" / "browser" / f"e2e-{BROKER}"
PROGRAM = (Path(__file__).parent.parent / "browser.py").read_text()


@pytest.fixture(scope="module")
def seen(backend, front, backend_address, web_address):
    """Run every browser check once from the probe; {check: {"ok", "saw"}}."""
    variables = scenario_variables()
    token = uuid.uuid4().hex[:10]
    request = {
        "screenshots": "/tmp",
        "signup": {
            "site": f"http://{web_address}",
            "username": f"browser-{token}",
            "email": f"browser-{token}@example.com",
            "password": "Correct-Horse-Battery-Staple-4711",
        },
        "rabbitmq": BROKER == "rabbitmq"
        and {
            "url": f"http://{backend_address}:15672/",
            "username": "admin",
            "password": variables["rabbitmq_admin_password"],
            "queues": ["celery", "email", "analytics"],
        },
        "flower": {
            "url": f"http://{backend_address}:5555",
            "username": "admin",
            "password": variables["celery_worker_flower_password"],
            "workers": [f"@{host.check_output('uname -n')}" for host in (backend, front)],
        },
    }
    out = subprocess.run(
        ["docker", "exec", "-i", PROBE, "python3", "-c", PROGRAM],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name in ("signup", "rabbitmq", "flower"):
        if request[name]:
            subprocess.run(["docker", "cp", f"{PROBE}:/tmp/{name}.png", str(SCREENSHOTS / f"{name}.png")], check=True)
    return {**json.loads(out), "email": request["signup"]["email"]}


def test_signup_form_confirms_and_the_email_arrives(seen, backend):
    assert seen["signup"]["ok"], seen["signup"]["saw"]
    assert "signed up" in seen["signup"]["saw"]
    assert wait_for_maildir_message(backend, "/home/sink/Maildir", seen["email"], timeout=60), (
        f"no welcome email to {seen['email']} after the browser signup"
    )


def test_rabbitmq_management_ui_shows_the_admin_the_app_queues(seen):
    if BROKER != "rabbitmq":
        pytest.skip("the management UI belongs to RabbitMQ")
    assert seen["rabbitmq"]["ok"], seen["rabbitmq"]["saw"]


def test_flower_lists_the_workers_of_both_hosts(seen):
    assert seen["flower"]["ok"], seen["flower"]["saw"]
    assert (SCREENSHOTS / "flower.png").stat().st_size > 10_000, "the screenshot is blank"
