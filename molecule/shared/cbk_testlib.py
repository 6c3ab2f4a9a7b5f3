"""Helpers shared by the testinfra suites of every Molecule scenario, and their common fixtures:
a pytest plugin (`-p cbk_testlib`, .config/molecule/config.yml), so a suite uses `peer` without
defining it."""

import base64
import contextlib
import functools
import json
import os
import re
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import testinfra.host
from testinfra.backend.docker import DockerBackend

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


# Debian's bundle of the system's trusted CAs (the kit CA joins it on every kit host), and one
# public root alone: a client trusting only another CA than the kit's.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
OTHER_CA_ONLY = "/usr/share/ca-certificates/mozilla/ISRG_Root_X1.crt"


def inventory_host(name):
    """A testinfra host for another instance of the scenario."""
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")


@functools.cache
def scenario_variables():
    """The scenario's group_vars for all hosts, as written in its molecule.yml (untemplated)."""
    import yaml

    return yaml.safe_load((Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent / "group_vars" / "all").read_text())


@functools.cache
def scenario_config():
    """The scenario's molecule.yml (untemplated; without .config/molecule/config.yml)."""
    import yaml

    return yaml.safe_load((Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"]) / "molecule.yml").read_text())


def inventory_sources():
    """The inventories of the scenario's Ansible runs: Molecule's, then those its molecule.yml
    adds in ansible_args (e2e-rabbitmq's copy of production.example), whose values win."""
    args = [os.path.expandvars(arg) for arg in scenario_config().get("provisioner", {}).get("ansible_args", [])]
    added = [source for flag, source in zip(args, args[1:], strict=False) if flag == "--inventory"]
    return [str(Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent), *added]


def inventory_args(molecule_inventory=None):
    """ansible-playbook's arguments for the scenario's inventories, as its runs get them; with
    molecule_inventory, that directory instead of Molecule's own (a test's altered copy)."""
    sources = inventory_sources()
    return [f"--inventory={source}" for source in [molecule_inventory or sources[0], *sources[1:]]]


@functools.cache
def platform_addresses():
    """{instance: address} of the scenario's instances that molecule.yml gives a fixed one."""
    return {
        platform["name"]: network["ipv4_address"]
        for platform in scenario_config().get("platforms", [])
        for network in platform.get("networks", [])
        if "ipv4_address" in network
    }


@functools.cache
def role_defaults(role, kind="defaults"):
    """A role's defaults/main.yml, or with kind="vars" its vars/main.yml (untemplated)."""
    import yaml

    path = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "roles" / role / kind / "main.yml"
    return yaml.safe_load(path.read_text())


@functools.cache
def host_variable(host_name, name, roles=()):
    """A variable of one inventory host as the scenario's runs template it, from all their inventories;
    with roles (a tuple of role names), as those roles' tasks see it: their defaults and vars too,
    e.g. django_app_env_file where the scenario leaves it to the role's default."""
    env = ansible_env(ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.posix.json")
    with tempfile.TemporaryDirectory() as tmp:
        if roles:
            # Each role imported (its variables given to the play, none of its tasks run), then the variable.
            imports = [{"ansible.builtin.import_role": {"name": role_fqcn(role)}, "when": False} for role in roles]
            debug = {"ansible.builtin.debug": {"var": name}}
            play = {"hosts": host_name, "gather_facts": False, "tasks": [*imports, debug]}
            playbook = Path(tmp) / "host_variable.yml"
            playbook.write_text(json.dumps([play]))
            command = ["ansible-playbook", *inventory_args(), str(playbook)]
        else:
            command = ["ansible", host_name, *inventory_args(), "-m", "ansible.builtin.debug", "-a", f"var={name}"]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    # The JSON report, between the lines of the scenario's other callbacks (profile_tasks).
    report, _ = json.JSONDecoder().raw_decode(out.stdout, out.stdout.index("{"))
    return report["plays"][0]["tasks"][-1]["hosts"][host_name][name]


@functools.cache
def galaxy():
    """This checkout's galaxy.yml: the collection it is."""
    import yaml

    return yaml.safe_load((Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "galaxy.yml").read_text())


@functools.cache
def brokers():
    """playbooks/vars/brokers.yml: {"brokers": {name: group, role, service, ports, schemes,
    secrets}, "brokers_of_celery_broker": {celery_broker: [broker names, main first]}} (untemplated)."""
    import yaml

    return yaml.safe_load(
        (Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "playbooks" / "vars" / "brokers.yml").read_text()
    )


def broker_entry(name):
    """One broker's entry of playbooks/vars/brokers.yml (rabbitmq, redis)."""
    return brokers()["brokers"][name]


def broker_port(name, kind):
    """A broker's port (kind: plain, tls, sentinel, management) as a host of the scenario sees
    it: the role variable brokers.yml names, from the scenario's group_vars or the role's defaults."""
    port = broker_entry(name)["ports"][kind]
    return int(scenario_setting(broker_entry(name)["role"].rsplit(".", 1)[-1], port["var"]))


def broker_secrets():
    """Every broker's secrets (vault variable names), in brokers.yml's order."""
    return [secret for entry in brokers()["brokers"].values() for secret in entry["secrets"]]


def role_fqcn(role):
    """A role's name in this collection (cbk.celery_broker_kit.<role>)."""
    return f"{galaxy()['namespace']}.{galaxy()['name']}.{role}"


def app_env_file(host_name):
    """The app's environment file on an inventory host: django_app_env_file as the django_app role reads it."""
    return host_variable(host_name, "django_app_env_file", ("django_app",))


def scenario_setting(role, name):
    """A role variable as a host of the scenario sees it: the role's vars/main.yml, else the
    scenario's group_vars, else the role's default (Ansible's order), its simple templates
    ("{{ mail_sink_home }}/Maildir") filled in the same way."""
    import jinja2
    import jinja2.meta

    role_vars = role_defaults(role, "vars") or {}
    if name in role_vars:
        value = role_vars[name]
    else:
        # Not .get() with the default: a required variable (django_app_broker_url) has none.
        value = scenario_variables()[name] if name in scenario_variables() else role_defaults(role)[name]
    if not (isinstance(value, str) and "{{" in value):
        return value
    template = jinja2.Environment(undefined=jinja2.StrictUndefined)
    names = jinja2.meta.find_undeclared_variables(template.parse(value))
    return template.from_string(value).render({other: scenario_setting(role_of(other, role), other) for other in names})


def role_of(name, default):
    """The role a variable belongs to by its prefix (django_app_name: django_app), else default."""
    roles = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "roles"
    return next((role.name for role in roles.iterdir() if name.startswith(f"{role.name}_")), default)


def ansible_env(**extra):
    """The environment of an ansible-playbook run of a test against the scenario's hosts, with
    Molecule's configuration, at default verbosity and unlogged (no secret is printed)."""
    inventory = Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent
    return {
        **os.environ,
        "ANSIBLE_CONFIG": str(inventory.parent / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(Path(os.environ["MOLECULE_PROJECT_DIRECTORY"]) / "collections"),
        "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml",
        "ANSIBLE_VERBOSITY": "0",
        "ANSIBLE_LOG_PATH": "/dev/null",
        **extra,
    }


def ansible_playbook(playbook, *args):
    """A playbook run against the scenario's hosts, through all its inventories, with more
    ansible-playbook arguments: (return code, output, the same with its whitespace folded to
    single spaces, {host: (changed, failed)} of the recap). Without colours, which Molecule turns
    on (ANSIBLE_FORCE_COLOR), so the recap's lines can be read."""
    result = subprocess.run(
        ["ansible-playbook", *inventory_args(), *args, str(playbook)],
        env=ansible_env(ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )
    recap_line = r"^(\S+)\s+: ok=\d+\s+changed=(\d+)\s+unreachable=\d+\s+failed=(\d+)"
    recap = re.findall(recap_line, result.stdout, re.MULTILINE)
    return (
        result.returncode,
        result.stdout,
        " ".join(result.stdout.split()),
        {name: (int(changed), int(failed)) for name, changed, failed in recap},
    )


def failures(output):
    """An ansible_playbook output's failed tasks and handlers, each with its title and message, or its
    last lines when none failed (a test's assertion message)."""
    lines, title, found = output.splitlines(), "", []
    for line in lines:
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            title = line
        elif line.startswith(("fatal: [", "failed: [")):
            found += [title, line[:2000]]
    return "\n".join(found) or "\n".join(lines[-40:])


def changed_tasks(output):
    """{host: [the titles of the tasks that changed on it]} from an ansible_playbook output."""
    changed, task = {}, None
    for line in output.splitlines():
        if title := re.match(r"^(?:TASK|RUNNING HANDLER) \[(.*)\]", line):
            task = title.group(1)
        elif host := re.match(r"^changed: \[(\S+)\]", line):
            changed.setdefault(host.group(1), []).append(task)
    return {name: list(dict.fromkeys(tasks)) for name, tasks in changed.items()}


def redis_engine_name(variables=None):
    """The redis role's engine for a host's variables: their redis_engine, else the role's default."""
    return (variables or {}).get("redis_engine", role_defaults("redis")["redis_engine"])


def redis_engine(variables=None):
    """The redis role's engine for a host's variables, as its entry in the role's engine table
    (vars/main.yml): server, cli, user, config_dir, data_dir, socket, ..."""
    return role_defaults("redis", "vars")["redis__engines"][redis_engine_name(variables)]


# The redis role's ACL users, by the variable that holds each one's password.
REDIS_PASSWORD_VARIABLES = {
    "celery": "redis_app_password",
    "admin": "redis_admin_password",
    "monitor": "redis_monitor_password",
    "replica": "redis_replication_password",
    "sentinel": "redis_sentinel_password",
    "celery-sentinel": "redis_sentinel_client_password",
}


def redis_password(user):
    """The scenario's password for one of the redis role's ACL users."""
    return scenario_variables()[REDIS_PASSWORD_VARIABLES[user]]


def redis_cli(
    client,
    *command,
    user=None,
    password=None,
    server=None,
    port=None,
    tls=False,
    ca=None,
    engine=None,
    lines=(),
    check=False,
):
    """The cli (redis-cli, valkey-cli) of engine (the client's redis_engine entry, else the role's
    default engine) run on client: against server (at port, else the cli's default port), over TLS
    with tls (trusting ca, else the client's trust store), or without server over the role's local
    socket, which serves with and without TLS. As user when given, with the scenario's password for
    that user unless password says another, through the environment (which both clis read). With
    lines instead of a command, the cli runs them, one command each, on one connection. With check,
    the exit code must be 0 and stdout is returned; else stdout and stderr together (error replies,
    refused connections)."""
    engine = engine or redis_engine()
    command_line = ["timeout", "10", engine["cli"], "--no-auth-warning"]
    command_line += ["-h", server] + (["-p", str(port)] if port else []) if server else ["-s", engine["socket"]]
    if tls:
        command_line += ["--tls"] + (["--cacert", ca] if ca else [])
    if user:
        command_line += ["--user", user]
        password = redis_password(user) if password is None else password
    if password is not None:
        command_line = ["env", f"REDISCLI_AUTH={password}", *command_line]
    feed = "printf '%%s\\n' " + " ".join(["%s"] * len(lines)) + " | " if lines else ""
    shell = feed + " ".join(["%s"] * len(command_line + list(command)))
    if check:
        return client.check_output(shell, *lines, *command_line, *command)
    result = client.run(shell, *lines, *command_line, *command)
    return (result.stdout + result.stderr).strip()


def redis_admin(host, *command):
    """A cli command on host as the Redis role's admin user over its local socket: its stdout."""
    return redis_cli(host, *command, user="admin", check=True)


def messages_waiting(host, broker, queue):
    """Messages waiting in one of the app's queues on the broker's host: in RabbitMQ's app vhost;
    on Redis, every priority step of it (a list each)."""
    if broker == "rabbitmq":
        vhost = scenario_setting("rabbitmq", "rabbitmq_app_vhost")
        listed = host.check_output("rabbitmqctl list_queues -q -p %s name messages", vhost)
        return sum(int(n) for name, n in (line.split() for line in listed.splitlines()) if name == queue)
    keys = redis_admin(host, "--scan", "--pattern", f"{queue}*").split()
    return sum(int(redis_admin(host, "LLEN", key)) for key in keys if redis_admin(host, "TYPE", key) == "list")


def e2e_broker(scenario):
    """The broker a full-stack scenario deploys: e2e-rabbitmq RabbitMQ; switch starts on Redis."""
    return "rabbitmq" if scenario == "e2e-rabbitmq" else "redis"


def other_hosts(host, group="all"):
    """Every other instance of the scenario, or of one of its groups, by inventory name."""
    own = host.backend.get_hostname()
    names = host.backend.ansible_runner.get_hosts(group)
    return [inventory_host(name) for name in names if name != own]


@pytest.fixture(scope="module")
def peer(host, request):
    """The scenario's other instance, in the two-instance scenarios; in a test module that runs
    on one group of the scenario (testinfra_hosts = ["ansible://<group>"]), that group's other one."""
    (hosts,) = getattr(request.module, "testinfra_hosts", ["ansible://all"])
    (other,) = other_hosts(host, hosts.removeprefix("ansible://"))
    return other


def journal(host, unit, since=None):
    """The messages of a unit's journal (or of the units a pattern such as 'celery-worker@*'
    matches), since the epoch second ``since`` or all of them."""
    since_args = ("--since", f"@{int(since)}") if since is not None else ()
    return host.check_output("journalctl --no-pager -o cat -u %s" + " %s" * len(since_args), unit, *since_args)


# systemd's catalog ids of its "Stopping <unit>" and "Started <unit>" messages.
UNIT_STOPPING, UNIT_STARTED = "de5b426a63be47a7b6ac3eaac82e2f6f", "39f53479d3a045ac8e11786248231fbf"


def restarts(host, units, since):
    """[(unit, stopping, started)]: when each restart of the units (a pattern such as
    'celery-worker@*') on the host since the epoch second ``since`` began and ended, in epoch
    seconds, from systemd's own messages."""
    output = host.check_output(
        "journalctl --no-pager -o json --output-fields=UNIT,MESSAGE_ID --since @%s -u %s", str(int(since)), units
    )
    stopping, spans = {}, []
    for entry in map(json.loads, output.splitlines()):
        unit, at = entry.get("UNIT"), int(entry["__REALTIME_TIMESTAMP"]) / 1e6
        if entry.get("MESSAGE_ID") == UNIT_STOPPING:
            stopping[unit] = at
        elif entry.get("MESSAGE_ID") == UNIT_STARTED and unit in stopping:
            spans.append((unit, stopping.pop(unit), at))
    return spans


def overlapping_worker_restarts(first, second, since):
    """({host: [(stopping, started)]}, [pairs of those windows that overlap across the two
    hosts]) of the Celery worker units' restarts since the epoch second ``since``, a switch's
    drain workers left out: a rolling release restarts one host's workers at a time."""
    windows = {
        host: [(stop, start) for unit, stop, start in restarts(host, "celery-worker@*", since) if "@drain-" not in unit]
        for host in (first, second)
    }
    overlapping = [(a, b) for a in windows[first] for b in windows[second] if a[0] < b[1] and b[0] < a[1]]
    return windows, overlapping


def task_runs(hosts, ids, since):
    """How often each task id succeeded, across the hosts' Celery workers' journals since the
    epoch second ``since`` (Celery logs ``Task <name>[<id>] succeeded in ...``)."""
    counts = dict.fromkeys(ids, 0)
    for host in hosts:
        for line in journal(host, "celery-worker@*", since).splitlines():
            if match := re.search(r"\[([^\]]+)\] succeeded in ", line):
                if match[1] in counts:
                    counts[match[1]] += 1
    return counts


def wait_for_task_runs(hosts, ids, since, seconds=180):
    """task_runs() once every task ran or after seconds, and a few seconds more, in which a
    second run of any of them would show."""
    deadline = time.monotonic() + seconds
    while True:
        counts = task_runs(hosts, ids, since)
        if all(counts.values()) or time.monotonic() > deadline:
            time.sleep(3)
            return task_runs(hosts, ids, since)
        time.sleep(3)


def wait_until(condition, seconds, what, pause=1, tolerate=(subprocess.CalledProcessError,)):
    """condition()'s first true result within seconds, polled every pause; fails naming what did
    not happen (what, or what() for a text known only then). An exception in tolerate (a node
    still booting or electing) counts as false."""
    deadline = time.monotonic() + seconds
    error = ""
    while True:
        try:
            if result := condition():
                return result
        except tolerate as exc:
            error = f" (last error: {getattr(exc, 'stderr', None) or exc})"
        assert time.monotonic() < deadline, f"not within {seconds} s: {what() if callable(what) else what}{error}"
        time.sleep(pause)


def address(host):
    """The instance's address on the scenario network."""
    return host.ansible("setup", "gather_subset=network")["ansible_facts"]["ansible_default_ipv4"]["address"]


def pending_security_updates(host):
    """The packages `apt-get upgrade` would take from a -security suite, as the host's index knows them."""
    simulation = host.check_output("apt-get -s upgrade")
    return [line.split()[1] for line in simulation.splitlines() if line.startswith("Inst ") and "-security" in line]


def tcp_probe(client, ip, port, timeout=3):
    """'open', 'refused' (reachable, nothing listening) or 'timeout' (dropped), seen from client."""
    return client.check_output("python3 -c %s %s %s %s", PROBE, ip, str(port), str(timeout))


def listen(host, port):
    """Start a throw-away TCP listener on the instance (idempotent)."""
    unit = f"probe-listener-{port}"
    if not host.service(unit).is_running:
        host.check_output("systemd-run --unit %s --collect python3 -m http.server %s --bind 0.0.0.0", unit, str(port))
    host.run_expect([0], "timeout 10 sh -c 'until ss -Htln \"sport = :%s\" | grep -q .; do sleep 0.2; done'", str(port))


# A UDP datagram, its text from argv, to the host's own loopback.
PLAIN_DATAGRAM = (
    "import socket, sys\nsocket.socket(type=socket.SOCK_DGRAM).sendto(sys.argv[1].encode(), ('127.0.0.1', 9))\n"
)


class PacketCapture:
    """What tcpdump wrote on one host: read it once the capture has stopped."""

    def __init__(self, host, path):
        self.host, self.path = host, path

    def packets(self, expression):
        """How many captured packets match a tcpdump filter expression, e.g. 'tcp port 6379'."""
        return int(self.host.check_output("tcpdump -r %s -nn %s 2>/dev/null | wc -l", self.path, expression))

    @functools.cached_property
    def raw(self):
        """The capture file's bytes, headers and payloads: what a listener on the wire could read."""
        return base64.b64decode(self.host.check_output("base64 -w0 %s", self.path))

    def holds(self, value):
        """Whether the capture file holds value as it is (also while tcpdump still writes it)."""
        return self.host.run("grep -qaF -- %s %s", str(value), self.path).rc == 0

    def in_clear(self, values):
        """The names of the values ({name: value}) found as they are in the raw capture."""
        return [name for name, value in values.items() if str(value).encode() in self.raw]


@contextlib.contextmanager
def packet_capture(hosts, path="/var/tmp/cbk-capture.pcap"):
    """tcpdump on every interface of each host ({key: testinfra host}), loopback included and
    SSH left out, while the with-block runs; yields {key: PacketCapture}, to read after it.

    Each capture must be whole, or it proves nothing: tcpdump reports no packet dropped by the
    kernel, and a UDP datagram each host sends in clear to its own loopback before the stop is
    in its capture (the capture sees payloads, and tcpdump, slow on a busy machine, has written
    everything it was given before)."""
    unit = f"cbk-capture-{uuid.uuid4().hex[:8]}"
    try:
        for host in hosts.values():
            host.check_output("apt-get install -y -qq tcpdump >/dev/null")
            # --immediate-mode: packets still in the kernel's buffer would be lost at the stop.
            # -B: the default 2 MiB holds only 8 packets of the full snap length in immediate mode,
            # and the kernel dropped a tenth of a Sentinel node's packets on an idle machine;
            # 16 MiB dropped none in 30 captures under full CPU load, and 64 MiB leaves room.
            host.check_output(
                "systemd-run --collect --unit %s tcpdump --immediate-mode -B 65536 -U -i any -w %s 'not port 22'",
                unit,
                path,
            )
            # Capturing once tcpdump says so: traffic before that would go unseen.
            host.check_output(
                'timeout 20 sh -c \'until journalctl -u "$1" -o cat | grep -q "listening on"; do sleep 0.2; done\''
                " _ %s",
                unit,
            )
        captures = {key: PacketCapture(host, path) for key, host in hosts.items()}
        yield captures
        control = f"control-{uuid.uuid4().hex}"
        for host in hosts.values():
            host.check_output("python3 -c %s %s", PLAIN_DATAGRAM, control)

        def unseen():
            return [key for key, capture in captures.items() if not capture.holds(control)]

        wait_until(lambda: not unseen(), 60, lambda: f"the captures of {unseen()} holding their datagram")
    finally:
        for key, host in hosts.items():
            host.run("systemctl stop %s", unit)
            # Shown with any failure above, a missing datagram's likeliest cause among them.
            try:
                said = " ".join(line for line in journal(host, unit).splitlines() if "dropped" in line)
            except AssertionError as error:  # a diagnostic: never hide the failure above
                said = f"(journal not read: {error})"
            print(f"{key}: tcpdump {said}")
    dropped = {key: tcpdump_dropped(host, unit) for key, host in hosts.items()}
    assert not any(dropped.values()), f"packets the kernel dropped before tcpdump read them: {dropped}"


def tcpdump_dropped(host, unit):
    """The packets tcpdump said, at its stop, the kernel had dropped before it read them."""
    said = wait_until(
        lambda: re.search(r"(\d+) packets? dropped by kernel", journal(host, unit)),
        10,
        f"tcpdump's counts at its stop in {unit}'s journal",
    )
    return int(said.group(1))


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
        'timeout %s sh -c \'until f=$(grep -rlF -- "$1" "$2/new" "$2/cur" 2>/dev/null | head -n1) && [ -n "$f" ];'
        ' do sleep 0.5; done; echo "$f"\' _ %s %s',
        str(timeout),
        needle,
        maildir,
    )
    return found.stdout.strip() or None


HTTP_REQUEST = (
    "import http.client, json, socket, ssl, sys\n"
    "req = json.loads(sys.argv[1])\n"
    "class UnixHTTPConnection(http.client.HTTPConnection):\n"
    "    def connect(self):\n"
    "        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "        self.sock.settimeout(self.timeout)\n"
    "        self.sock.connect(req['unix_socket'])\n"
    "if req['unix_socket']:\n"
    "    conn = UnixHTTPConnection('localhost', timeout=req['timeout'])\n"
    "elif req['https']:\n"
    "    context = ssl.create_default_context(cafile=req['cafile'])\n"
    "    conn = http.client.HTTPSConnection(req['host'], req['port'], timeout=req['timeout'], context=context)\n"
    "else:\n"
    "    conn = http.client.HTTPConnection(req['host'], req['port'], timeout=req['timeout'])\n"
    "body = req['body'].encode() if req['body'] is not None else None\n"
    "try:\n"
    "    conn.request(req['method'], req['path'], body=body, headers=req['headers'])\n"
    "    resp = conn.getresponse()\n"
    "    answer = {'status': resp.status, 'headers': resp.getheaders(), 'body': resp.read().decode('utf-8', 'replace')}\n"
    "except Exception as exc:\n"
    "    answer = {'status': None, 'headers': [], 'body': f'{type(exc).__name__}: {exc}'}\n"
    "print(json.dumps(answer))\n"
)


class HTTPResponse:
    """Status, headers (every occurrence kept) and text body of one response; status None when
    no response came (the body then names the error: refused, TLS handshake failed, ...)."""

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name):
        """Every value of the header called name (case-insensitive), in order."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)


def http_request(
    client,
    url,
    method="GET",
    headers=None,
    body=None,
    auth=None,
    unix_socket=None,
    user=None,
    cafile=None,
    timeout=15,
    expect=range(200, 300),
):
    """One HTTP/1.1 request to url sent from client with python3's http.client (no redirects
    followed): an https URL over TLS verified against cafile, else the client's trust store; with
    unix_socket, over that socket instead; optionally run as user. auth: (user, password) for
    basic authentication. The response's status must be expect (a status or several), else the
    test fails naming what came; expect=None: whatever came, for the caller to check (status None
    when no response came)."""
    from urllib.parse import urlsplit

    target = urlsplit(url)
    headers = dict(headers or {})
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = json.dumps(
        {
            "host": target.hostname,
            "port": target.port or (443 if target.scheme == "https" else 80),
            "https": target.scheme == "https",
            "path": target.path + (f"?{target.query}" if target.query else ""),
            "method": method,
            "headers": headers,
            "body": body,
            "unix_socket": unix_socket,
            "cafile": cafile,
            "timeout": timeout,
        }
    )
    prefix, as_user = ("runuser -u %s -- ", [user]) if user else ("", [])
    out = client.check_output(prefix + "python3 -c %s %s", *as_user, HTTP_REQUEST, request)
    response = HTTPResponse(**json.loads(out))
    if expect is not None:
        expected = [expect] if isinstance(expect, int) else list(expect)
        assert response.status in expected, f"{method} {url}: {response.status} {response.body[:500]}"
    return response


class DockerExecBackend(DockerBackend):
    """`docker exec` that runs a command again when Docker could not start it (exit 126 with
    the runtime's "OCI runtime exec failed"): the command never ran, so a second try is safe,
    and a container runtime failing now and then under load is the test machine's fault, not
    the kit's. Any other result, 126 from the command itself included, is returned as is."""

    def run(self, command, *args, **kwargs):
        for _ in range(3):
            result = super().run(command, *args, **kwargs)
            if result.exit_status != 126 or "OCI runtime exec failed" not in result.stdout + result.stderr:
                return result
            time.sleep(1)
        return result


@functools.cache
def docker_host(container):
    """A testinfra host reaching a container with `docker exec`."""
    return testinfra.host.Host(DockerExecBackend(container))


def direct(host):
    """The same instance, reached with `docker exec` when Ansible connects to it through
    docker: one process per command instead of one Ansible run (much faster for suites
    that run many commands). Other connections are returned unchanged."""
    name = host.backend.get_hostname()
    variables = host.backend.ansible_runner.get_variables(name)
    if variables.get("ansible_connection") in ("docker", "community.docker.docker"):
        return docker_host(variables.get("ansible_host", name))
    return host


def systemd_seconds(value):
    """Seconds of a systemd time span as `systemctl show` prints it, e.g. '5min 30s'."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "min": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(us|ms|min|s|h|d)", value))


def run_python(client, program, argument):
    """Run a Python program on client with one JSON argument; return its JSON output."""
    import json

    return json.loads(client.check_output("python3 -c %s %s", program, json.dumps(argument)))


AMQP_LOGIN = (
    "import json, sys\n"
    "from kombu import Connection\n"
    "try:\n"
    "    with Connection(sys.argv[1], ssl=json.loads(sys.argv[2]), connect_timeout=5) as conn:\n"
    "        conn.connect()\n"
    "        mechanisms = sorted(m.decode() for m in conn.connection.mechanisms)\n"
    "        print(json.dumps({'result': 'ok', 'mechanisms': mechanisms}))\n"
    "except Exception as exc:\n"
    "    print(json.dumps({'result': type(exc).__name__, 'detail': str(exc)}))\n"
)


def amqp_login(client, url, ssl=None):
    """Log in to an AMQP broker from client (needs python3-kombu there).

    ssl: kombu/py-amqp TLS options (a JSON-able dict), e.g.
    {"context": {"cafile": "/etc/ca.crt", "check_hostname": True}, "server_hostname": "10.0.0.5"}.
    Returns {'result': 'ok', 'mechanisms': [SASL mechanisms the server offers]} or
    {'result': <exception class, e.g. 'AccessRefused'>, 'detail': <message>}.
    """
    import json

    return json.loads(client.check_output("python3 -c %s %s %s", AMQP_LOGIN, url, json.dumps(ssl or False)))


# --- Signup load and the welcome emails it must produce (full-stack scenarios) ----------

# Where the mail sink delivers every message, and the app's management command (as the app user).
MAILDIR = scenario_setting("mail_sink", "mail_sink__maildir")
MANAGE = scenario_setting("django_app", "django_app__manage")


class Site:
    """Where a full-stack scenario's app answers: HTTPS at nginx or plain HTTP
    (django_app_https, as the scenario templates it for the web host)."""

    def __init__(self, web_host, address):
        self.address = address
        self.https = host_variable(web_host, "django_app_https") == "nginx"
        self.port = int(
            scenario_setting("django_app", "django_app_https_port" if self.https else "django_app_http_port")
        )
        self.url = f"{'https' if self.https else 'http'}://{address}"


class OperatorUI:
    """Where an operators' web UI answers, RabbitMQ's management UI, Flower or Prometheus: HTTPS
    with the host's certificate or plain HTTP, as the role's TLS switch is for the host."""

    def __init__(self, host, address, role, tls_variable, port_variable):
        self.address = address
        self.https = host_variable(host, tls_variable, (role,)) is True
        self.port = int(scenario_setting(role, port_variable))
        self.url = f"{'https' if self.https else 'http'}://{address}:{self.port}"
        self.api = f"{self.url}/api/"


def management_ui(broker_host, address):
    return OperatorUI(broker_host, address, "rabbitmq", "rabbitmq_management_tls_enabled", "rabbitmq_management_port")


def flower_ui(flower_host, address):
    return OperatorUI(
        flower_host, address, "celery_worker", "celery_worker_flower_tls_enabled", "celery_worker_flower_port"
    )


def prometheus_ui(monitoring_host, address):
    return OperatorUI(
        monitoring_host, address, "monitoring", "monitoring_exporter_tls_enabled", "monitoring_prometheus_port"
    )


def prometheus_query(client, prometheus, expr):
    """{labels (a frozenset of name-value pairs): value} of a PromQL expression now, asked from
    client (a host allowed in, trusting the kit CA where Prometheus serves HTTPS)."""
    from urllib.parse import quote

    answer = http_request(client, f"{prometheus.url}/api/v1/query?query={quote(expr)}").json()
    return {frozenset(sample["metric"].items()): float(sample["value"][1]) for sample in answer["data"]["result"]}


# Runs on the mail sink's host: [arrival epoch second, subject] of Alertmanager's emails
# (subjects "[FIRING:<n>] <alert> (<labels>)" and "[RESOLVED] <alert> (<labels>)") since an epoch second.
# Polled while thousands of signup emails sit beside: only the new files that may be alerts
# are parsed, their headers only.
ALERT_EMAILS = """
import email.parser, json, pathlib, sys
parser = email.parser.BytesHeaderParser()
found = []
for path in [*pathlib.Path(sys.argv[1]).glob("new/*"), *pathlib.Path(sys.argv[1]).glob("cur/*")]:
    arrived = path.stat().st_mtime
    if arrived < float(sys.argv[2]):
        continue
    raw = path.read_bytes()
    if b"[FIRING:" not in raw and b"[RESOLVED]" not in raw:
        continue
    subject = str(parser.parsebytes(raw)["Subject"] or "")
    if subject.startswith(("[FIRING:", "[RESOLVED]")):
        found.append([arrived, subject])
print(json.dumps(sorted(found)))
"""


def wait_for_alert_email(sink, alert, labels, state, since, seconds):
    """Epoch second at which the sink got the email saying that alert (its name, and the values
    of its labels) is firing or resolved (state), sent after the epoch second since."""
    prefix = "[FIRING:" if state == "firing" else "[RESOLVED]"

    def arrived():
        emails = json.loads(sink.check_output("python3 -c %s %s %s", ALERT_EMAILS, MAILDIR, str(since)))
        return next(
            (
                at
                for at, subject in emails
                if subject.startswith(prefix) and f" {alert} " in subject and all(value in subject for value in labels)
            ),
            None,
        )

    return wait_until(arrived, seconds, f"the email that {alert} {labels} is {state}", pause=3)


# Runs in a scenario container: signs users up through nginx at a fixed rate, `count` of them
# or, with count None, until its stdin closes; prints which addresses the web tier accepted
# and what it said to the others.
SIGNUP_LOAD = """
import http.client, json, select, sys, time, uuid
args = json.loads(sys.argv[1])
accepted, refused = [], []
start = time.monotonic()
i = 0
while args["count"] is None or i < args["count"]:
    if args["count"] is None and select.select([sys.stdin], [], [], 0)[0] and not sys.stdin.read(1):
        break
    time.sleep(max(0, start + i / args["rate"] - time.monotonic()))
    i += 1
    token = uuid.uuid4().hex[:12]
    email = f"{args['tag']}-{token}@example.com"
    # Django's similarity validator compares character counts (quick_ratio >= 0.7): against
    # a password over twice as long as the address no address can reach that; a short
    # random one did, about once in 10,000 signups.
    password = "Pw-" + "".join(uuid.uuid4().hex for _ in range(4))
    body = json.dumps({"username": f"u-{token}", "email": email, "password": password})
    try:
        connection = http.client.HTTPSConnection if args["https"] else http.client.HTTPConnection
        conn = connection(args["address"], args["port"], timeout=60)
        conn.request("POST", "/api/signup/", body, {"Content-Type": "application/json", "Host": args["address"]})
        response = conn.getresponse()
        status, answer = response.status, response.read().decode(errors="replace")[:200]
    except OSError as error:
        status, answer = type(error).__name__, str(error)[:200]
    if status == 201:
        accepted.append(email)
    else:
        refused.append([email, status, answer])
print(json.dumps({"accepted": accepted, "refused": refused}))
"""

# Runs on the mail sink's host: the Message-IDs the sink holds per recipient with a tag (a
# copy sent again after a crash has the same Message-ID: one message to the recipient).
# Delivered messages only: Postfix writes each into tmp/ and then moves it to new/. The sink
# holds every test's emails: only those with the tag in them are parsed, their headers only.
MAILDIR_MESSAGES = """
import collections, email.parser, json, pathlib, sys
parser = email.parser.BytesHeaderParser()
prefix = sys.argv[2] + "-"
messages = collections.defaultdict(list)
for path in [*pathlib.Path(sys.argv[1]).glob("new/*"), *pathlib.Path(sys.argv[1]).glob("cur/*")]:
    raw = path.read_bytes()
    if prefix.encode() not in raw:
        continue
    message = parser.parsebytes(raw)
    if (message["To"] or "").startswith(prefix):
        messages[message["To"]].append(message["Message-ID"])
print(json.dumps(messages))
"""


class SignupLoad:
    """A signup load running in a scenario container while a test does something else."""

    def __init__(self, container, site, tag, count=None, rate=15):
        self.tag = f"{tag}{uuid.uuid4().hex[:6]}"  # this run's addresses only
        args = json.dumps(
            {
                "address": site.address,
                "port": site.port,
                "https": site.https,
                "tag": self.tag,
                "count": count,
                "rate": rate,
            }
        )
        self.process = subprocess.Popen(
            ["docker", "exec", "-i", container, "python3", "-c", SIGNUP_LOAD, args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.seconds = count / rate if count else 0

    def result(self):
        """Waits for the load (an open-ended one stops now) and returns what it got."""
        out, _ = self.process.communicate(timeout=self.seconds + 120)
        return {**json.loads(out), "tag": self.tag}


def mail_messages(host, tag):
    return json.loads(host.check_output("python3 -c %s %s %s", MAILDIR_MESSAGES, MAILDIR, tag))


def settle_mail(host, load, seconds):
    """Wait until every signup the load got accepted has its email (or the seconds pass),
    then read the sink: {recipient: [Message-ID of each copy]}."""
    deadline = time.monotonic() + seconds
    # One read of the sink per poll: each is a docker exec reading the maildir (it was once per
    # accepted signup, minutes of CPU after a switch under load).
    while time.monotonic() <= deadline:
        messages = mail_messages(host, load["tag"])
        if all(email in messages for email in load["accepted"]):
            break
        time.sleep(2)
    time.sleep(5)  # a late copy would arrive now
    return mail_messages(host, load["tag"])


def mail_tally(load, messages):
    """(lost addresses, addresses with two different messages, extra copies, messages)."""
    lost = [email for email in load["accepted"] if email not in messages]
    twice = [email for email, ids in messages.items() if len(set(ids)) > 1]
    resent = sum(len(ids) - len(set(ids)) for ids in messages.values())
    return lost, twice, resent, sum(len(set(ids)) for ids in messages.values())
