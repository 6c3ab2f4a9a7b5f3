"""Monitoring as an operator meets it (roles/monitoring): Prometheus on the monitoring host
scrapes every host, over HTTPS with the hosts' certificates where production puts TLS, and
only the monitoring host gets through to the exporters; a queue left without workers under
load is emailed about, as firing and then as resolved. The alert emails run in e2e-rabbitmq
(production's settings); switch reads Redis' queue lengths through Prometheus in
test_broker_features. Figures go to artifacts/monitoring/<scenario>.json."""

import json
import os
import time
from pathlib import Path

import pytest
from cbk_testlib import (
    SignupLoad,
    e2e_broker,
    http_request,
    mail_tally,
    prometheus_query,
    role_defaults,
    scenario_setting,
    settle_mail,
    tcp_probe,
    wait_for_alert_email,
    wait_until,
)

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
BROKER = e2e_broker(SCENARIO)
# The exporters the monitoring role runs (the redis one while Redis is the broker).
EXPORTERS = set(role_defaults("monitoring", "vars")["monitoring__exporters"]) - ({"redis"} - {BROKER})
BACKEND = f"cbk-{SCENARIO}-debian12"  # the monitoring host and the mail sink
HOSTS = (BACKEND, f"cbk-{SCENARIO}-debian13")
RESULTS = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "artifacts" / "monitoring" / f"{SCENARIO}.json"
QUEUE = "email"
WORKER_UNIT = f"celery-worker@{QUEUE}"
# The rules' own waits (files/cbk-alerts.rules.yml: for 1m and 5m), a scrape and an evaluation,
# Alertmanager's group_wait and group_interval, all at the monitoring role's defaults (the
# scenario's are shorter), and room.
FIRING_SECONDS = {"CeleryQueueNoConsumer": 60 + 180, "CeleryBacklogNotDraining": 300 + 180}
RESOLVED_SECONDS = 240
DELIVERY_SECONDS = 240


def save(name, value):
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps({**results, name: value}, indent=2) + "\n")


def test_prometheus_scrapes_every_target_over_tls_and_only_it_reaches_the_exporters(backend, front, prometheus):
    """Every target is up: each host's exporters, the broker in use, Flower, Prometheus and each
    host's certificate. The exporters answer over HTTPS with the hosts' certificates; in
    e2e-rabbitmq (production's settings) every target across the network does. Each certificate
    verifies against the kit CA and is far from its end. The web host, no monitoring host,
    cannot reach an exporter."""

    down = []

    def all_up():
        """The active targets once every one is up, else None (and what is down, for the message)."""
        found = http_request(backend, f"{prometheus.url}/api/v1/targets?state=active").json()["data"]["activeTargets"]
        down[:] = [(t["labels"]["job"], t["labels"]["instance"], t["lastError"]) for t in found if t["health"] != "up"]
        return found if found and not down else None

    # A broker the fault tests just restarted is up again by its next scrape.
    targets = wait_until(all_up, 60, lambda: f"every target up; down: {down}", pause=5)
    # The blackbox exporter's probes are scraped on the loopback; they reach each host over TLS.
    schemes = {
        (t["labels"]["job"], t["labels"]["instance"]): t["scrapeUrl"].split(":", 1)[0]
        for t in targets
        if "//127.0.0.1:" not in t["scrapeUrl"]
    }
    broker_jobs = {"rabbitmq": {"rabbitmq", "rabbitmq_queues"}, "redis": {"redis"}}[BROKER]
    jobs = {t["labels"]["job"] for t in targets}
    assert jobs == EXPORTERS | broker_jobs | {"celery", "prometheus", "certificates"}, jobs
    tls_jobs = {job for job, _ in schemes} if SCENARIO == "e2e-rabbitmq" else EXPORTERS
    plain = sorted(target for target, scheme in schemes.items() if target[0] in tls_jobs and scheme != "https")
    assert not plain, f"scraped in plain HTTP: {plain}"
    verified = prometheus_query(backend, prometheus, 'probe_success{job="certificates"}')
    assert sorted(dict(labels)["instance"] for labels, ok in verified.items() if ok == 1) == sorted(HOSTS), verified
    days_left = prometheus_query(backend, prometheus, "(probe_ssl_earliest_cert_expiry - time()) / 86400")
    assert min(days_left.values()) > 21, days_left
    port = int(scenario_setting("monitoring", "monitoring_node_exporter_port"))
    assert tcp_probe(front, prometheus.address, port) == "timeout"


@pytest.mark.skipif(SCENARIO != "e2e-rabbitmq", reason="the alert emails are checked in e2e-rabbitmq")
def test_a_queue_without_workers_under_load_is_emailed_firing_then_resolved(backend, front, site):
    """Every email worker stops while signups keep coming: the no-consumer and the backlog
    alerts reach the sink by email. The workers start again: both are emailed as resolved,
    and every accepted signup gets its welcome email once."""
    load = SignupLoad(BACKEND, site, "alerts", rate=2)
    stopped = time.time()
    for host in (backend, front):
        host.check_output("systemctl stop %s", WORKER_UNIT)
    try:
        fired = {
            alert: wait_for_alert_email(backend, alert, ("rabbitmq", QUEUE), "firing", stopped, seconds) - stopped
            for alert, seconds in FIRING_SECONDS.items()
        }
    finally:
        started = time.time()
        for host in (backend, front):
            host.check_output("systemctl start %s", WORKER_UNIT)
    result = load.result()
    resolved = {
        alert: wait_for_alert_email(backend, alert, ("rabbitmq", QUEUE), "resolved", started, RESOLVED_SECONDS)
        - started
        for alert in FIRING_SECONDS
    }
    lost, twice, resent, emails = mail_tally(result, settle_mail(backend, result, DELIVERY_SECONDS))
    save(
        "queue_without_workers",
        {
            "firing_email_after_seconds": {alert: round(seconds) for alert, seconds in fired.items()},
            "resolved_email_after_seconds": {alert: round(seconds) for alert, seconds in resolved.items()},
            "signups_accepted": len(result["accepted"]),
            "refused": len(result["refused"]),
            "emails": emails,
            "lost": len(lost),
            "twice": len(twice),
        },
    )
    assert (result["refused"], lost, twice) == ([], [], []), (result["refused"][:5], lost[:5], twice[:5])
