"""The mail_sink role's behaviour: mail from an allowed peer, for any domain, lands in
the one local Maildir; nothing is queued for or relayed to another host; port 25 is
closed to hosts outside the allow-list."""

import email
import email.policy
import uuid

import pytest
import testinfra
from cbk_testlib import MAILDIR, address, scenario_setting, smtp_send, tcp_probe, wait_for_maildir_message


@pytest.fixture(scope="module")
def sink_ip(host):
    return address(host)


@pytest.fixture(scope="module")
def delivered(host, peer, sink_ip):
    """One message from the peer to a random example.com address, and where it landed."""
    token = uuid.uuid4().hex
    recipient = f"user-{token}@example.com"
    assert smtp_send(peer, sink_ip, recipient, f"Probe {token}", f"Hello from the peer, {token}.") == "accepted"
    path = wait_for_maildir_message(host, MAILDIR, token, timeout=60)
    assert path, f"no message containing {token} in {MAILDIR} within 60 s"
    return {"token": token, "recipient": recipient, "path": path}


def test_mail_for_an_external_domain_lands_in_the_maildir(host, delivered):
    message_file = host.file(delivered["path"])
    assert message_file.user == "sink"
    message = email.message_from_string(message_file.content_string, policy=email.policy.default)
    assert message["Subject"] == f"Probe {delivered['token']}"
    assert message["To"] == delivered["recipient"]
    assert message.get_content().strip() == f"Hello from the peer, {delivered['token']}."
    # Postfix records the original recipient it rewrote.
    assert message["X-Original-To"] == delivered["recipient"]


def test_the_message_was_delivered_locally_and_nothing_is_queued(host, delivered):
    assert host.check_output("postqueue -j") == ""
    log = host.check_output("journalctl --no-pager -o cat SYSLOG_IDENTIFIER=postfix/local")
    assert f"orig_to=<{delivered['recipient']}>, relay=local" in log
    assert "status=sent (delivered to maildir)" in log
    smtp_log = host.run("journalctl --no-pager -o cat SYSLOG_IDENTIFIER=postfix/smtp").stdout
    assert delivered["recipient"] not in smtp_log


def test_no_transport_leads_off_the_host(host):
    assert host.check_output("postconf -h relayhost") == ""
    assert host.check_output("postconf -h default_transport").startswith("error:")
    assert host.check_output("postconf -h relay_transport").startswith("error:")


def test_listens_on_loopback_and_the_private_address_only(host, sink_ip):
    listeners = host.check_output("ss -Htln 'sport = :25'")
    assert f"{sink_ip}:25" in listeners
    assert "127.0.0.1:25" in listeners
    assert "0.0.0.0:25" not in listeners and "*:25" not in listeners


def test_port_25_is_dropped_for_hosts_outside_the_allow_list(host, sink_ip):
    # The docker host sits on the scenario network but is not on the allow-list.
    controller = testinfra.get_host("local://")
    assert tcp_probe(controller, sink_ip, 25) == "timeout"
    assert tcp_probe(host, "127.0.0.1", 25) == "open"


def test_mailbox_is_private(host):
    assert host.file(scenario_setting("mail_sink", "mail_sink_home")).mode == 0o750
    assert host.file(MAILDIR).user == scenario_setting("mail_sink", "mail_sink_user")
