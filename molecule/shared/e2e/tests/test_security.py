"""Security probes: a stranger's container on the scenario network (the probe, see
prepare.yml) tries every door of the deployed stack and must be refused. The probe may
reach the web site, the broker port, the management UI and Flower like any client or
operator, so what stops it there is authentication; every other listening port must be closed to it.
Each probe is one line of the report: probe, expected, got (printed, and written to
artifacts/security/<scenario>.txt). Secrets must not be readable by an unprivileged
user on any host, nor appear in the -v output of the scenario's Ansible runs."""

import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from cbk_testlib import (
    OTHER_CA_ONLY,
    SYSTEM_CA_BUNDLE,
    address,
    ansible_playbook,
    app_env_file,
    broker_port,
    direct,
    docker_host,
    e2e_broker,
    host_variable,
    http_request,
    inventory_host,
    pending_security_updates,
    scenario_setting,
    scenario_variables,
)

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
BROKER = e2e_broker(SCENARIO)
PROBE = f"cbk-{SCENARIO}-probe"
HOSTS = [f"cbk-{SCENARIO}-debian12", f"cbk-{SCENARIO}-debian13"]
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
EPHEMERAL = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"])
REPORT = PROJECT / "artifacts" / "security" / f"e2e-{BROKER}.txt"
# Where services keep configuration, releases, state and runtime files.
SEARCHED_DIRS = "/etc /opt /srv /var /home /root /usr/local /run /tmp"
REFUSED = r"refused|timeout"  # a closed port: RST, or dropped by the firewall
lines = []


@pytest.fixture(scope="module", autouse=True)
def report():
    """Print the probe table and keep it as an artifact, whatever the outcome."""
    yield
    table = [f"{'probe':62} {'expected':34} got", *lines]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text("\n".join(table) + "\n")
    print("\n" + "\n".join(table))


def report_line(name, expected, got, ok):
    lines.append(f"{name:62} {expected:34} {got}{'' if ok else '   <-- UNEXPECTED'}")


def check(probes):
    """Run (name, expected regex, probe spec) triples from the probe container; record
    one report line each; fail naming every probe whose result did not match."""
    specs = [spec for _, _, spec in probes]
    out = subprocess.run(
        ["docker", "exec", "-i", PROBE, "python3", "-c", PROBE_PROGRAM],
        input=json.dumps(specs),
        capture_output=True,
        text=True,
        check=True,
    )
    results = json.loads(out.stdout)
    failed = []
    for (name, expected, _), got in zip(probes, results, strict=True):
        ok = re.search(expected, got) is not None
        report_line(name, expected, got, ok)
        if not ok:
            failed.append(f"{name}: expected {expected}, got {got}")
    assert not failed, "\n".join(failed)


PROBE_PROGRAM = (Path(__file__).parent.parent / "probe.py").read_text()


@pytest.fixture(scope="module")
def kit_hosts():
    """{inventory name: (testinfra host over docker exec, address)}."""
    hosts = {}
    for name in HOSTS:
        host = inventory_host(name)
        hosts[name] = (direct(host), address(host))
    return hosts


@pytest.fixture(scope="module")
def variables():
    return scenario_variables()


@pytest.fixture(scope="module")
def broker_address(kit_hosts):
    return kit_hosts[HOSTS[0]][1]


@pytest.fixture(scope="module")
def amqp_endpoint(broker_address):
    """RabbitMQ's client port as the scenario serves it: AMQPS only in e2e-rabbitmq."""
    tls = host_variable(HOSTS[0], "rabbitmq_tls_only") is True
    port = broker_port("rabbitmq", "tls" if tls else "plain")
    return SimpleNamespace(address=broker_address, port=port, tls=tls, https=tls)


@pytest.fixture(scope="module")
def redis_endpoint(broker_address):
    """Redis' client port as the scenario serves it: TLS only in switch (redis_tls_enabled)."""
    tls = host_variable(HOSTS[0], "redis_tls_enabled") is True
    port = broker_port("redis", "tls" if tls else "plain")
    return SimpleNamespace(address=broker_address, port=port, tls=tls)


def test_redis_refuses_strangers_and_limits_the_app_user(redis_endpoint, variables, probe_trusts_kit_ca):
    if BROKER != "redis":
        pytest.skip("Redis is not this scenario's broker")
    app = {"username": "celery", "password": variables["redis_app_password"]}
    spec = {"kind": "redis", "address": redis_endpoint.address, "port": redis_endpoint.port, "tls": redis_endpoint.tls}
    probes = [
        ("redis: PING without credentials", "NOAUTH|AuthenticationError", {**spec, "command": ["PING"]}),
        (
            "redis: default user, no password",
            "WRONGPASS|AuthenticationError",
            {**spec, "command": ["PING"], "username": "default", "password": ""},
        ),
        (
            "redis: default user, the app's password",
            "WRONGPASS|AuthenticationError",
            {**spec, "command": ["PING"], "username": "default", "password": app["password"]},
        ),
        (
            "redis: app user, wrong password",
            "WRONGPASS|AuthenticationError",
            {**spec, "command": ["PING"], "username": "celery", "password": "not-the-password-1234"},
        ),
        ("redis: app user PING (the door is the password)", "^ok", {**spec, **app, "command": ["PING"]}),
    ]
    for command in (
        ["CONFIG", "GET", "requirepass"],
        ["FLUSHALL"],
        ["KEYS", "*"],
        ["DEBUG", "SLEEP", "0"],
        ["ACL", "LIST"],
        ["SHUTDOWN", "ABORT"],
        ["MODULE", "LIST"],
        ["CLIENT", "LIST"],
        ["SCRIPT", "FLUSH"],
        ["EVAL", "return 1", "0"],
        ["MIGRATE", "x", "1", "k", "0", "1"],
    ):
        # DEBUG and MODULE may also be refused to everyone, by the server's enable-*-command settings.
        probes.append(
            (
                f"redis: app user runs {' '.join(command[:2])}",
                "NoPermissionError|NOPERM|not allowed",
                {**spec, **app, "command": command},
            )
        )
    check(probes)


def test_rabbitmq_refuses_guest_and_keeps_the_app_user_out_of_the_management_api(
    broker_address, variables, management, amqp_endpoint, probe_trusts_kit_ca
):
    if BROKER != "rabbitmq":
        pytest.skip("RabbitMQ is not this scenario's broker")
    api = f"{management.api}overview"
    app_password = variables["rabbitmq_app_password"]
    amqp = {"kind": "amqp", "address": broker_address, "port": amqp_endpoint.port, "tls": amqp_endpoint.tls}
    check(
        [
            (
                "rabbitmq: guest/guest over AMQP, vhost /",
                "AccessRefused|ACCESS_REFUSED",
                {**amqp, "username": "guest", "password": "guest", "vhost": "/"},
            ),
            (
                "rabbitmq: guest/guest over AMQP, app vhost",
                "AccessRefused|ACCESS_REFUSED",
                {**amqp, "username": "guest", "password": "guest", "vhost": "celery"},
            ),
            (
                "rabbitmq: app user, wrong password",
                "AccessRefused|ACCESS_REFUSED",
                {**amqp, "username": "celery", "password": "not-the-password-1234", "vhost": "celery"},
            ),
            (
                "rabbitmq: app user on vhost / ",
                "NotAllowed|AccessRefused|ACCESS_REFUSED|NOT_ALLOWED",
                {**amqp, "username": "celery", "password": app_password, "vhost": "/"},
            ),
            (
                "rabbitmq: app user on its vhost (the door is the password)",
                "^ok",
                {**amqp, "username": "celery", "password": app_password, "vhost": "celery"},
            ),
            ("rabbitmq: management API anonymous", "^401", {"kind": "http", "url": api}),
            (
                "rabbitmq: management API guest/guest",
                "^401",
                {"kind": "http", "url": api, "username": "guest", "password": "guest"},
            ),
            (
                "rabbitmq: management API app user",
                "^401",
                {"kind": "http", "url": api, "username": "celery", "password": app_password},
            ),
            (
                "rabbitmq: management API admin (control)",
                "^200",
                {"kind": "http", "url": api, "username": "admin", "password": variables["rabbitmq_admin_password"]},
            ),
        ]
    )


def test_flower_answers_its_admin_only(variables, flower, probe_trusts_kit_ca):
    api = f"{flower.api}workers"
    http = {"kind": "http", "url": api}
    check(
        [
            ("flower: API anonymous", "^401$", http),
            (
                "flower: API with the app's broker password",
                "^401$",
                {**http, "username": "admin", "password": variables[f"{BROKER}_app_password"]},
            ),
            (
                "flower: API admin (control)",
                "^200$",
                {**http, "username": "admin", "password": variables["celery_worker_flower_password"]},
            ),
        ]
    )


def test_https_at_nginx_and_plain_http_only_redirects(probe_trusts_kit_ca, variables):
    site = probe_trusts_kit_ca
    if not site.https:
        pytest.skip("this scenario serves plain HTTP, as the sandbox does (django_app_https)")
    plain = f"http://{site.address}"
    secure = {"kind": "tls", "address": site.address, "port": site.port}
    check(
        [
            ("https: port 80 GET redirects", f"^301 {site.url}/signup/\\?x=1$",
             {"kind": "http", "url": f"{plain}/signup/?x=1", "redirects": False}),
            ("https: port 80 POST signup redirects, not run", f"^301 {site.url}/api/signup/$",
             {"kind": "http", "url": f"{plain}/api/signup/", "method": "POST", "body": "{}", "redirects": False}),
            ("https: signup page, kit CA trusted", "^200$", {"kind": "http", "url": f"{site.url}/signup/"}),
            ("https: TLS 1.0 offered alone", "SSLError", {**secure, "version": "TLSv1"}),
            ("https: TLS 1.1 offered alone", "SSLError", {**secure, "version": "TLSv1_1"}),
            ("https: TLS 1.2", "^ok TLSv1.2$", {**secure, "version": "TLSv1_2"}),
            ("https: TLS 1.3", "^ok TLSv1.3$", {**secure, "version": "TLSv1_3"}),
            ("https: client trusting another CA only", "CERTIFICATE_VERIFY_FAILED",
             {**secure, "version": "TLSv1_3", "cafile": OTHER_CA_ONLY}),
        ]
    )
    # HSTS only where HTTPS is served; the redirect sets nothing, not even a cookie.
    probe = docker_host(PROBE)
    headers = {"Host": site.address}
    secure_page = http_request(probe, f"https://{site.address}:{site.port}/signup/", headers=headers)
    redirect = http_request(probe, f"http://{site.address}/signup/", headers=headers, expect=301)
    hsts = [f"max-age={scenario_setting('django_app', 'django_app_hsts_seconds')}"]
    got = (secure_page.header("Strict-Transport-Security"), redirect.header("Strict-Transport-Security"),
           redirect.header("Set-Cookie"))
    report_line("https: HSTS on HTTPS, none on port 80", f"{hsts}, [], no cookie", str(got), got == (hsts, [], []))
    assert got == (hsts, [], []), got


@pytest.mark.parametrize("ui", ["management", "flower", "prometheus", "amqps"])
def test_operator_uis_and_amqp_over_tls_only(request, ui, probe_trusts_kit_ca, broker_address):
    if ui != "flower" and BROKER != "rabbitmq":
        pytest.skip("RabbitMQ is not this scenario's broker")
    if not probe_trusts_kit_ca.https:
        pytest.skip("this scenario serves plain HTTP, as the sandbox")
    # Where the site is HTTPS (production mode), no operator UI or broker link may stay plain.
    served = request.getfixturevalue("amqp_endpoint" if ui == "amqps" else ui)
    assert served.https, f"{ui} is plain text beside an HTTPS site: its role's TLS switch is off"
    secure = {"kind": "tls", "address": served.address, "port": served.port}
    if ui == "amqps":
        plain_port = broker_port("rabbitmq", "plain")
        plain = [(f"amqp: plain AMQP port {plain_port} (rabbitmq_tls_only)", REFUSED,
                  {"kind": "tcp", "address": broker_address, "port": plain_port})]
    else:
        # A TLS listener answers a plain request with a TLS alert, or closes; Go's (Prometheus)
        # with 400 "Client sent an HTTP request to an HTTPS server".
        refused = "RemoteDisconnected|BadStatusLine|ConnectionResetError" + ("|^400$" if ui == "prometheus" else "")
        plain = [
            (f"{ui}: plain HTTP on its port", refused,
             {"kind": "http", "url": served.url.replace("https://", "http://", 1) + "/"}),
            (f"{ui}: over HTTPS, kit CA trusted", "^200$|^401$", {"kind": "http", "url": served.url + "/"}),
        ]
    check(
        [
            *plain,
            (f"{ui}: TLS 1.1 offered alone", "SSLError", {**secure, "version": "TLSv1_1"}),
            (f"{ui}: TLS 1.2", "^ok TLSv1.2$", {**secure, "version": "TLSv1_2"}),
            (f"{ui}: TLS 1.3", "^ok TLSv1.3$", {**secure, "version": "TLSv1_3"}),
            (f"{ui}: client trusting another CA only", "CERTIFICATE_VERIFY_FAILED",
             {**secure, "version": "TLSv1_3", "cafile": OTHER_CA_ONLY}),
        ]
    )


def test_django_has_no_admin_and_no_debug_pages(probe_trusts_kit_ca, web_address):
    site = probe_trusts_kit_ca.url
    page = {"kind": "http", "host": web_address}
    check(
        [
            ("django: /admin/", "^404$", {**page, "url": f"{site}/admin/"}),
            ("django: /admin/login/", "^404$", {**page, "url": f"{site}/admin/login/"}),
            ("django: unknown page (debug 404 lists the URLs)", "^404$", {**page, "url": f"{site}/{uuid.uuid4().hex}"}),
            (
                "django: malformed signup JSON (debug 500 has a traceback)",
                "^4\\d\\d$",
                {**page, "url": f"{site}/api/signup/", "method": "POST", "body": "{not json"},
            ),
            (
                "django: Host not allowed (debug page names ALLOWED_HOSTS)",
                "^400$",
                {"kind": "http", "url": f"{site}/signup/", "host": "attacker.example"},
            ),
            ("django: signup page (control)", "^200$", {**page, "url": f"{site}/signup/"}),
        ]
    )


def test_postgresql_refuses_an_outside_host(broker_address, variables):
    check(
        [
            (
                "postgresql: app user from the probe",
                "OperationalError",
                {
                    "kind": "postgres",
                    "address": broker_address,
                    "port": 5432,
                    "username": "app",
                    "password": variables["postgresql_app_password"],
                    "dbname": "app",
                },
            ),
        ]
    )


# From an app host: the database's and the mail sink's certificates (STARTTLS), checked as the
# app checks them (chain and address), against the system's trust store and another CA only.
STARTTLS = "openssl s_client -starttls %s -connect %s:%s -verify_ip %s -verify_return_error -CAfile %s"


def test_the_app_hosts_verify_the_database_certificate(kit_hosts, broker_address):
    front = kit_hosts[HOSTS[1]][0]
    env = front.check_output("grep ^DATABASE_URL= %s", app_env_file(HOSTS[1]))
    verified = front.run(STARTTLS + " </dev/null", "postgres", broker_address, "5432", broker_address, SYSTEM_CA_BUNDLE)
    other = front.run(STARTTLS + " </dev/null", "postgres", broker_address, "5432", broker_address, OTHER_CA_ONLY)
    got = ("sslmode=verify-full" in env, verified.rc, other.rc != 0)
    report_line("postgresql: app's sslmode, verified, other CA refused", "(True, 0, True)", str(got), got == (True, 0, True))
    assert got == (True, 0, True), (verified.stdout[-500:], other.stdout[-500:])


def test_the_workers_verify_the_mail_sinks_certificate(kit_hosts, broker_address):
    """The relay's stand-in (mail_sink_tls_enabled): Django sends with STARTTLS and checks the chain."""
    if host_variable(HOSTS[0], "mail_sink_tls_enabled") is not True:
        pytest.skip("the mail sink speaks plain SMTP here (mail_sink_tls_enabled), as in the sandbox")
    front = kit_hosts[HOSTS[1]][0]
    env = front.check_output("grep ^EMAIL_USE_TLS= %s", app_env_file(HOSTS[1]))
    smtp = ("smtp", broker_address, "25", broker_address)
    verified = front.run(STARTTLS + " </dev/null", *smtp, SYSTEM_CA_BUNDLE)
    other = front.run(STARTTLS + " </dev/null", *smtp, OTHER_CA_ONLY)
    got = ('"true"' in env, verified.rc, other.rc != 0)
    report_line("smtp: app's STARTTLS, verified, other CA refused", "(True, 0, True)", str(got), got == (True, 0, True))
    assert got == (True, 0, True), (verified.stdout[-500:], other.stdout[-500:])


def refused_before_any_host_changes(kit_hosts, probe_address, cases):
    """Run the converge's base tier once per (variable, extra vars, message) case: each run must
    fail naming the variable, with the message, and leave every host as it was."""
    state = ("sha256sum /etc/ssl/certs/cbk-host.pem /etc/ssl/private/cbk-host.key /etc/nftables.conf /etc/apt/sources.list"
             " $(ls /etc/ssh/sshd_config.d/*.conf 2>/dev/null)")
    before = {name: host.check_output(state) for name, (host, _) in kit_hosts.items()}
    for variable, extra_vars, message in cases:
        returncode, stdout, output, _ = ansible_playbook(
            Path(__file__).parent.parent / "converge.yml", "--tags", "base",
            "-e", f"e2e_probe_address={probe_address}", "-e", json.dumps(extra_vars, default=str),
        )
        refused = returncode != 0 and variable in output and message in output
        report_line(f"bad input: {variable} wrong", "refused, naming it", "refused" if refused else "NOT refused", refused)
        assert refused, stdout[-3000:]
    assert {name: host.check_output(state) for name, (host, _) in kit_hosts.items()} == before, "a refused run changed a host"


def test_a_wrong_certificate_or_key_stops_the_run_before_any_host_changes(
    kit_hosts, probe_address, variables, tmp_path
):
    if host_variable(HOSTS[0], "e2e_production") is not True:
        pytest.skip("e2e-rabbitmq checks it: switch's time goes to the switch")
    kit_ca = Path(variables["base_tls_kit_ca_dir"])
    other_key = tmp_path / "other.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", other_key],
                   check=True, capture_output=True)
    given = {"base_tls_certificates": "files", "base_tls_cert_file": kit_ca / f"{HOSTS[0]}.crt",
             "base_tls_key_file": kit_ca / f"{HOSTS[0]}.key", "base_tls_ca_file": kit_ca / "ca.crt"}
    refused_before_any_host_changes(kit_hosts, probe_address, [
        ("base_tls_cert_file", {**given, "base_tls_cert_file": "/nonexistent/host.crt"}, "is not a file on the controller"),
        ("base_tls_key_file", {**given, "base_tls_key_file": other_key}, "base_tls_key_file does not match base_tls_cert_file"),
    ])


@pytest.fixture(scope="module")
def ssh_logins():
    """{inventory name: its SSH settings} as prepare.yml filled them in: e2e-rabbitmq reaches its
    hosts as production.example does; switch through docker, as the sandbox."""
    if host_variable(HOSTS[0], "e2e_production") is not True:
        pytest.skip("the hosts are reached through docker here, as in the sandbox")
    return yaml.safe_load((Path(os.environ["MOLECULE_INVENTORY_FILE"]).parent / "ssh.yml").read_text())["all"]["hosts"]


def ssh(settings, *command, options=()):
    """A new login from the controller with the inventory's settings, sharing no connection."""
    return subprocess.run(
        ["ssh", "-i", settings["ansible_ssh_private_key_file"], *settings["ansible_ssh_common_args"].split(),
         "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ControlMaster=no", *options,
         f"{settings['ansible_user']}@{settings['ansible_host']}", *command],
        capture_output=True, text=True, timeout=60,
    )


def test_operators_log_in_over_ssh_with_their_key_only_and_sudo(ssh_logins, kit_hosts):
    def yes_no(name):
        return "yes" if scenario_setting("base", name) else "no"

    passwords = yes_no("base_ssh_password_authentication")
    expected_sshd = {
        "port": str(scenario_setting("base", "base_ssh_port")),
        "passwordauthentication": passwords,
        "kbdinteractiveauthentication": passwords,
        # sshd -T spells prohibit-password as without-password.
        "permitrootlogin": scenario_setting("base", "base_ssh_permit_root_login").replace("prohibit-password", "without-password"),
        "maxauthtries": str(scenario_setting("base", "base_ssh_max_auth_tries")),
        "allowtcpforwarding": yes_no("base_ssh_allow_tcp_forwarding"),
    }
    for name, settings in ssh_logins.items():
        short = name.removeprefix(f"cbk-{SCENARIO}-")
        host = kit_hosts[name][0]
        with_key = ssh(settings, "sudo", "-n", "id", "-u")
        password = ssh(settings, "true", options=("-o", "PubkeyAuthentication=no",
                                                  "-o", "PreferredAuthentications=password,keyboard-interactive"))
        effective = dict(line.split(" ", 1) for line in host.check_output("sshd -T").splitlines() if " " in line)
        # The converge itself logged in as deploy with the key, from the controller.
        converge_logins = host.check_output("journalctl -u ssh -o cat | grep -c 'Accepted publickey for deploy' || true")
        got = {
            "key login + sudo": with_key.stdout.strip(),
            "password login": "refused" if "Permission denied (publickey)" in password.stderr else password.stderr.strip(),
            "sshd": {key: effective.get(key) for key in expected_sshd},
            "Ansible's logins": int(converge_logins or 0) > 0,
        }
        expected = {"key login + sudo": "0", "password login": "refused", "sshd": expected_sshd, "Ansible's logins": True}
        report_line(f"ssh to {short}: key + sudo, password, sshd -T, Ansible's logins", "as expected",
                    "as expected" if got == expected else str(got), got == expected)
        assert got == expected, (with_key.stderr, password.stderr)


def test_settings_that_would_lock_out_the_run_stop_it_before_any_host_changes(ssh_logins, kit_hosts, probe_address):
    refused_before_any_host_changes(kit_hosts, probe_address, [
        ("base_firewall_ssh_sources", {"base_firewall_ssh_sources": ["192.0.2.0/24"]},
         "the address this run logs in from"),
        ("base_ssh_port", {"base_ssh_port": 2222},
         f"this run reaches sshd on port {scenario_setting('base', 'base_ssh_port')}"),
    ])


def listening_ports(host, own_address):
    """{(address, port)} the host listens on beyond loopback, wildcards as its own address."""
    found = set()
    for line in host.check_output("ss -Hltn").splitlines():
        local = line.split()[3]
        ip, _, port = local.rpartition(":")
        ip = ip.strip("[]").split("%")[0]
        if ip in ("0.0.0.0", "*", "::"):
            ip = own_address
        if ip.startswith("127.") or ip == "::1" or ":" in ip:
            continue
        found.add((ip, int(port)))
    return found


def test_only_allow_listed_ports_answer_the_probe(
    kit_hosts, broker_address, web_address, site, amqp_endpoint, redis_endpoint, flower, management, prometheus
):
    allowed = {(web_address, 80), (broker_address, (redis_endpoint if BROKER == "redis" else amqp_endpoint).port)}
    if site.https:
        allowed.add((web_address, site.port))
    allowed.add((broker_address, flower.port))  # Flower, behind its password
    allowed.add((broker_address, prometheus.port))  # Prometheus, to the operators' networks (the probe's)
    if BROKER == "rabbitmq":
        allowed.add((broker_address, management.port))
    probes = []
    for name, (host, own_address) in kit_hosts.items():
        for ip, port in sorted(listening_ports(host, own_address)):
            expected = "open" if (ip, port) in allowed else REFUSED
            probes.append(
                (
                    f"port {port} of {name.removeprefix(f'cbk-{SCENARIO}-')} ({ip})",
                    expected,
                    {"kind": "tcp", "address": ip, "port": port},
                )
            )
    assert len(probes) > len(allowed), "the hosts list fewer ports than the probe may use"
    check(probes)


def test_no_security_update_is_pending_after_the_converge(kit_hosts):
    pending = {
        name.removeprefix(f"cbk-{SCENARIO}-"): pending_security_updates(host) for name, (host, _) in kit_hosts.items()
    }
    for short, packages in pending.items():
        report_line(f"security updates pending on {short}", "none", ", ".join(packages) or "none", not packages)
    assert not any(pending.values()), pending


def test_no_secret_is_readable_by_an_unprivileged_user(kit_hosts, secrets):
    patterns = "\n".join(secrets.values()) + "\n"
    for name, (host, _) in kit_hosts.items():
        short = name.removeprefix(f"cbk-{SCENARIO}-")
        # Patterns on stdin: a secret on a command line would itself be world-readable.
        files = subprocess.run(
            [
                "docker",
                "exec",
                "-i",
                name,
                "runuser",
                "-u",
                "nobody",
                "--",
                "grep",
                "-rlsF",
                "-f",
                "-",
                "--exclude-dir=apt",
                "--exclude-dir=dpkg",
                *SEARCHED_DIRS.split(),
            ],
            input=patterns,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        report_line(f"files nobody can read on {short} holding a secret", "none", ", ".join(files) or "none", not files)
        command_lines = host.check_output("ps -eo args")
        leaked = [secret for secret, value in secrets.items() if value in command_lines]
        report_line(
            f"process command lines on {short} (ps) holding a secret", "none", ", ".join(leaked) or "none", not leaked
        )
        assert not files, f"{short}: secrets readable by nobody in {files}"
        assert not leaked, f"{short}: secrets on process command lines: {leaked}"


def test_no_secret_appears_in_the_verbose_ansible_output(secrets):
    log = (EPHEMERAL / "ansible.log").read_text(errors="replace")
    runs = log.count("PLAY RECAP")
    assert runs >= 2, "the -v log of converge and idempotence is missing"
    leaked = [name for name, value in secrets.items() if value in log]
    report_line(f"secrets in the -v output of {runs} Ansible runs", "none", ", ".join(leaked) or "none", not leaked)
    assert not leaked, f"secrets printed by Ansible at -v: {leaked}"
