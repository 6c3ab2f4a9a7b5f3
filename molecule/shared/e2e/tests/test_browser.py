"""A real browser (Debian's chromium, headless, driven by chromedriver from the probe
container): over HTTPS, the site is refused until the browser trusts the kit CA; a user
signs up through the HTML form and sees the confirmation, and gets
the email; the admin logs in to the RabbitMQ management UI and sees the app's queues;
Flower lists the workers of both hosts. Screenshots: artifacts/browser/<scenario>/."""

import json
import os
import re
import subprocess
import uuid
from pathlib import Path

import pytest
from cbk_testlib import MAILDIR, e2e_broker, scenario_variables, wait_for_maildir_message

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
BROKER = e2e_broker(SCENARIO)
PROBE = f"cbk-{SCENARIO}-probe"
SCREENSHOTS = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "artifacts" / "browser" / f"e2e-{BROKER}"
PROGRAM = (Path(__file__).parent.parent / "browser.py").read_text()
# The system's copy of the kit CA (conftest.py) into chromium's NSS database, as trusted for servers.
TRUST_KIT_CA_IN_CHROMIUM = (
    "mkdir -p /root/.pki/nssdb && { [ -f /root/.pki/nssdb/cert9.db ] || certutil -d sql:/root/.pki/nssdb -N --empty-password; }"
    " && certutil -d sql:/root/.pki/nssdb -A -t C,, -n cbk-kit-ca -i /usr/local/share/ca-certificates/cbk-ca.crt"
)


def browse(request):
    """Run browser.py in the probe with request; {check: {"ok", "saw"}}; screenshots copied out."""
    out = subprocess.run(
        ["docker", "exec", "-i", PROBE, "python3", "-c", PROGRAM],
        input=json.dumps({"screenshots": "/tmp", **request}),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for name in request:
        subprocess.run(["docker", "cp", f"{PROBE}:/tmp/{name}.png", str(SCREENSHOTS / f"{name}.png")], check=True)
    return json.loads(out)


@pytest.fixture(scope="module")
def seen(backend, front, probe_trusts_kit_ca, management, flower):
    """Run every browser check once from the probe; {check: {"ok", "saw"}}. Over HTTPS, the
    browser first meets the site without the kit CA, then trusts it (in chromium's own
    certificate store) and signs up."""
    site = probe_trusts_kit_ca
    variables = scenario_variables()
    token = uuid.uuid4().hex[:10]
    results = {}
    if site.https:
        results.update(browse({"untrusted": {"site": site.url}}))
        subprocess.run(["docker", "exec", PROBE, "sh", "-c", TRUST_KIT_CA_IN_CHROMIUM], check=True)
    request = {
        "signup": {
            "site": site.url,
            "username": f"browser-{token}",
            "email": f"browser-{token}@example.com",
            "password": "Correct-Horse-Battery-Staple-4711",
        },
        "flower": {
            "url": flower.url,
            "username": "admin",
            "password": variables["celery_worker_flower_password"],
            "workers": [f"@{host.check_output('uname -n')}" for host in (backend, front)],
        },
    }
    if BROKER == "rabbitmq":
        request["rabbitmq"] = {
            "url": f"{management.url}/",
            "username": "admin",
            "password": variables["rabbitmq_admin_password"],
            "queues": ["celery", "email", "analytics"],
        }
    results.update(browse(request))
    return {**results, "email": request["signup"]["email"], "https": site.https}


def test_without_the_kit_ca_the_browser_stops_at_the_certificate_warning(seen):
    if not seen["https"]:
        pytest.skip("this scenario serves plain HTTP, as the sandbox does (django_app_https)")
    assert seen["untrusted"]["ok"], seen["untrusted"]["saw"]
    assert re.search(r"ERR_CERT_AUTHORITY_INVALID|not private", seen["untrusted"]["saw"]), seen["untrusted"]["saw"]


def test_signup_form_confirms_and_the_email_arrives(seen, backend):
    assert seen["signup"]["ok"], seen["signup"]["saw"]
    assert "signed up" in seen["signup"]["saw"]
    assert wait_for_maildir_message(backend, MAILDIR, seen["email"], timeout=60), (
        f"no welcome email to {seen['email']} after the browser signup"
    )


def test_rabbitmq_management_ui_shows_the_admin_the_app_queues(seen):
    if BROKER != "rabbitmq":
        pytest.skip("the management UI belongs to RabbitMQ")
    assert seen["rabbitmq"]["ok"], seen["rabbitmq"]["saw"]


def test_flower_lists_the_workers_of_both_hosts(seen):
    assert seen["flower"]["ok"], seen["flower"]["saw"]
    assert (SCREENSHOTS / "flower.png").stat().st_size > 10_000, "the screenshot is blank"
