"""Helpers shared by the testinfra suites of every Molecule scenario."""

import os

import testinfra

PROBE = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
    "s.settimeout(float(sys.argv[3]))\n"
    "try:\n"
    "    s.connect((sys.argv[1], int(sys.argv[2])))\n"
    "    print('open')\n"
    "except ConnectionRefusedError:\n"
    "    print('refused')\n"
    "except OSError:\n"
    "    print('timeout')\n"
)


def inventory_host(name):
    """A testinfra host for another instance of the scenario."""
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")


def other_hosts(host):
    """Every other instance of the scenario, by inventory name."""
    own = host.backend.get_hostname()
    names = host.backend.ansible_runner.get_hosts("all")
    return [inventory_host(name) for name in names if name != own]


def address(host):
    """The instance's address on the scenario network."""
    return host.ansible("setup", "gather_subset=network")["ansible_facts"]["ansible_default_ipv4"]["address"]


def tcp_probe(client, ip, port, timeout=3):
    """'open', 'refused' (reachable, nothing listening) or 'timeout' (dropped), seen from client."""
    return client.check_output("python3 -c %s %s %s %s", PROBE, ip, str(port), str(timeout))


def listen(host, port):
    """Start a throw-away TCP listener on the instance (idempotent)."""
    unit = f"probe-listener-{port}"
    if not host.service(unit).is_running:
        host.check_output(
            "systemd-run --unit %s --collect python3 -m http.server %s --bind 0.0.0.0", unit, str(port)
        )
    host.run_expect([0], "timeout 10 sh -c 'until ss -Htln \"sport = :%s\" | grep -q .; do sleep 0.2; done'", str(port))


SMTP_SEND = (
    "import smtplib, sys\n"
    "from email.message import EmailMessage\n"
    "msg = EmailMessage()\n"
    "msg['From'], msg['To'], msg['Subject'] = sys.argv[3], sys.argv[4], sys.argv[5]\n"
    "msg.set_content(sys.argv[6])\n"
    "with smtplib.SMTP(sys.argv[1], int(sys.argv[2]), timeout=10) as smtp:\n"
    "    print(smtp.send_message(msg) or 'accepted')\n"
)


def smtp_send(client, server, recipient, subject, body, port=25, sender="probe@example.org"):
    """Send one plain-text message from client to server:port with python3's smtplib.

    Returns 'accepted' when the server took every recipient; raises on refusal."""
    return client.check_output(
        "python3 -c %s %s %s %s %s %s %s", SMTP_SEND, server, str(port), sender, recipient, subject, body
    )


def wait_for_maildir_message(host, maildir, needle, timeout=60):
    """Path of the first message in maildir/new or maildir/cur containing needle, polled for
    up to timeout seconds; None when none arrives."""
    found = host.run(
        "timeout %s sh -c 'until f=$(grep -rlF -- \"$1\" \"$2/new\" \"$2/cur\" 2>/dev/null | head -n1) && [ -n \"$f\" ];"
        " do sleep 0.5; done; echo \"$f\"' _ %s %s",
        str(timeout),
        needle,
        maildir,
    )
    return found.stdout.strip() or None
