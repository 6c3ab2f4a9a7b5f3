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
