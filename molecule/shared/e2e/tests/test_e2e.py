"""End to end: site.yml deployed on two hosts signs a user up (over HTTPS in e2e-rabbitmq), and a Celery
worker on the broker the scenario names sends the welcome email into the mail sink;
losing one worker host's workers does not stop delivery; Flower and the RabbitMQ
management UI answer operators with credentials only."""

import json
import os
import time
import uuid

import pytest
from cbk_testlib import (
    MAILDIR,
    broker_port,
    e2e_broker,
    host_variable,
    http_request,
    journal,
    packet_capture,
    scenario_setting,
    scenario_variables,
    wait_for_maildir_message,
    wait_until,
)
from conftest import FRONT

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
BROKER = e2e_broker(SCENARIO)
WORKERS = "celery-worker@*.service"
FLOWER = ("admin", scenario_variables()["celery_worker_flower_password"])
RABBITMQ_ADMIN = ("admin", scenario_variables()["rabbitmq_admin_password"])
RABBITMQ_APP = ("celery", scenario_variables()["rabbitmq_app_password"])
DELIVERY_SECONDS = 60


def sign_up(client, site):
    """POST a new user to the JSON signup endpoint through nginx; returns the email address."""
    token = uuid.uuid4().hex[:12]
    email = f"user-{token}@example.com"
    body = {"username": f"user-{token}", "email": email, "password": "Correct-Horse-Battery-Staple-4711"}
    response = http_request(
        client,
        f"{site.url}:{site.port}/api/signup/",
        method="POST",
        headers={"Content-Type": "application/json", "Host": site.address},
        body=json.dumps(body),
    )
    assert response.status == 201, response.body
    return email


def test_readyz_names_the_broker_and_reaches_database_and_broker(backend, site):
    response = http_request(backend, f"{site.url}:{site.port}/readyz", headers={"Host": site.address})
    assert response.status == 200, response.body
    assert response.json() == {"status": "ok", "broker": BROKER, "broker_connection": "ok", "database": "ok"}


def test_signup_delivers_the_welcome_email(backend, site):
    email = sign_up(backend, site)
    path = wait_for_maildir_message(backend, MAILDIR, email, timeout=DELIVERY_SECONDS)
    assert path, f"no welcome email to {email} in {MAILDIR} within {DELIVERY_SECONDS} s"
    message = backend.file(path).content_string
    assert "Subject: Welcome!" in message
    assert f"From: {host_variable(FRONT, 'django_app_email_from')}" in message


def test_no_secret_and_no_signup_address_cross_the_network_in_clear(backend, front, site, secrets):
    """A packet capture on every interface of both hosts while a user signs up and gets the welcome
    email: the broker, database and SMTP links carry neither a password nor the address. Loopback
    counts: the first worker reaches the broker, the database and the mail sink on its own host."""
    if not site.https:
        pytest.skip("switch keeps the sandbox's plain HTTP, AMQP and SMTP")
    hosts = {"debian12": backend, "debian13": front}
    with packet_capture(hosts) as captures:
        email = sign_up(front, site)
        assert wait_for_maildir_message(backend, MAILDIR, email, timeout=DELIVERY_SECONDS), email
    values = {**secrets, "the signup address": email}
    links = {
        "AMQPS": broker_port("rabbitmq", "tls"),
        "PostgreSQL": scenario_setting("postgresql", "postgresql_port"),
    }
    # The mail sink is on debian12: whichever worker sends the email, its SMTP crosses an interface there.
    expected = {"debian12": {**links, "SMTP": scenario_setting("django_app", "django_app_email_port")}, "debian13": links}
    for short, capture in captures.items():
        packets = {link: capture.packets(f"tcp port {port}") for link, port in expected[short].items()}
        in_clear = capture.in_clear(values)
        assert all(packets.values()), f"{short}: the capture missed a link of the signup: {packets}"
        assert not in_clear, f"{short}: in clear on the network: {in_clear}"


def test_flower_shows_the_workers_of_both_hosts_with_credentials_only(backend, flower, front):
    url = f"{flower.api}workers?refresh=1"
    assert http_request(front, url, expect=None).status == 401
    assert http_request(front, url, auth=(FLOWER[0], "wrong-password-123456"), expect=None).status == 401
    hostnames = {name.split("@", 1)[1] for name in http_request(front, url, auth=FLOWER, expect=200).json()}
    assert hostnames == {backend.check_output("uname -n"), front.check_output("uname -n")}


def test_flower_shows_a_signup_s_welcome_email_task_though_the_app_sends_no_task_events(flower, front, site):
    """The app's settings leave task events off; Flower turns them on in the workers it watches."""
    email = sign_up(front, site)
    url = f"{flower.api}tasks?limit=1000"

    def succeeded():
        tasks = http_request(front, url, auth=FLOWER, expect=200).json().values()
        return [
            task
            for task in tasks
            if task.get("name") == "users.tasks.send_welcome_email"
            and email in (task.get("args") or "")
            and task.get("state") == "SUCCESS"
        ]

    wait_until(succeeded, DELIVERY_SECONDS, f"Flower showing the welcome email task to {email} succeeded")


def test_rabbitmq_management_ui_answers_the_admin_only(management, front):
    if BROKER != "rabbitmq":
        pytest.skip("the management UI belongs to RabbitMQ")
    url = f"{management.api}queues/celery"
    assert http_request(front, url, expect=None).status == 401
    assert http_request(front, url, auth=RABBITMQ_APP, expect=None).status == 401
    queues = http_request(front, url, auth=RABBITMQ_ADMIN, expect=200).json()
    assert {"email", "analytics", "celery"} <= {queue["name"] for queue in queues}


# Stops and restarts workers: keep last.
@pytest.mark.parametrize("lost, survivor", [("backend", "front"), ("front", "backend")])
def test_delivery_goes_on_when_one_worker_host_loses_its_workers(request, site, lost, survivor):
    lost, survivor = request.getfixturevalue(lost), request.getfixturevalue(survivor)
    backend = request.getfixturevalue("backend")
    lost.check_output("systemctl kill --signal=SIGKILL %s && systemctl stop %s", WORKERS, WORKERS)
    try:
        started = time.time() - 1
        email = sign_up(backend, site)
        assert wait_for_maildir_message(backend, MAILDIR, email, timeout=DELIVERY_SECONDS), (
            f"no welcome email to {email} with one worker host down"
        )
        assert "succeeded" in journal(survivor, "celery-worker@email", started)
    finally:
        lost.check_output("systemctl start celery-worker@email celery-worker@default celery-worker@priority")
