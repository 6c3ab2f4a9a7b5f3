"""The django_app role's behaviour: the app serves through nginx only, with security headers,
signups work (JSON and the CSRF-protected form) and reach the broker, static files come from
nginx, secrets are confined, gunicorn runs sandboxed as the app user, restarts drop nothing,
and a broken release is rolled back (side_effect.yml deployed releases B and C)."""

import hashlib
import json
import re
import uuid
from urllib.parse import urlencode, urlsplit

import pytest
import testinfra
from cbk_testlib import (
    MANAGE,
    address,
    app_env_file,
    host_variable,
    http_request,
    redis_cli,
    scenario_setting,
    tcp_probe,
)

# The app's user, paths and unit as the scenario deploys them (its variables, else the role's).
APP_USER = scenario_setting("django_app", "django_app_user")
ROOT = scenario_setting("django_app", "django_app_root")
CURRENT = scenario_setting("django_app", "django_app__current")
STATE_DIR = scenario_setting("django_app", "django_app_state_dir")
SOCKET = scenario_setting("django_app", "django_app_gunicorn_socket")
SERVICE = scenario_setting("django_app", "django_app__service")
RELEASE_MARKERS = [
    scenario_setting("django_app", f"django_app__{step}_marker") for step in ("installed", "migrated", "collected")
]
KEEP_RELEASES = scenario_setting("django_app", "django_app_keep_releases")
SIDE_EFFECT_RECORD = "/var/tmp/django_app_side_effect.json"
BROKER = urlsplit(scenario_setting("django_app", "django_app_broker_url"))


@pytest.fixture(scope="module")
def ip(host):
    return address(host)


@pytest.fixture(scope="module")
def side_effect(host):
    return json.loads(host.file(SIDE_EFFECT_RECORD).content_string)


def get(host, path, ip, **kwargs):
    """A request through nginx on the instance itself, with the instance's address as Host, as
    the load balancer in front (django_app_https) passes on what it received over HTTPS."""
    headers = {"Host": ip, "X-Forwarded-Proto": "https", **kwargs.pop("headers", {})}
    return http_request(host, f"http://127.0.0.1{path}", headers=headers, **kwargs)


def main_pid(host):
    pid = int(host.check_output("systemctl show -P MainPID %s", SERVICE))
    assert pid > 0, f"{SERVICE} is not running"
    return pid


def signup_payload():
    name = f"user{uuid.uuid4().hex[:10]}"
    return {"username": name, "email": f"{name}@example.org", "password": f"Pw-{uuid.uuid4().hex}"}


def test_signup_page_through_nginx_has_security_headers_once(host, ip):
    response = get(host, "/signup/", ip)
    assert response.status == 200
    assert "<form" in response.body
    expected = {
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
    }
    for name, value in expected.items():
        # nginx sets them and hides the app's copies: exactly one value each.
        assert response.header(name) == [value], name
    (csp,) = response.header("Content-Security-Policy")
    assert "default-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp
    # server_tokens off: no version.
    assert response.header("Server") == ["nginx"]


def test_root_redirects_to_the_signup_page(host, ip):
    response = get(host, "/", ip, expect=None)
    assert response.status == 302
    assert response.header("Location") == ["/signup/"]


def test_behind_the_load_balancer_https_is_strict_and_http_is_redirected(host, ip):
    secure = get(host, "/signup/", ip)
    assert secure.status == 200
    (hsts,) = secure.header("Strict-Transport-Security")
    assert hsts == f"max-age={scenario_setting('django_app', 'django_app_hsts_seconds')}"
    cookies = secure.header("Set-Cookie")
    assert cookies and all("Secure" in cookie for cookie in cookies), cookies
    # What the balancer received over plain HTTP: Django sends it to HTTPS, without HSTS.
    plain = get(host, "/signup/?next=x", ip, headers={"X-Forwarded-Proto": "http"}, expect=None)
    assert plain.status == 301
    assert plain.header("Location") == [f"https://{ip}/signup/?next=x"]
    assert plain.header("Strict-Transport-Security") == []


def test_unknown_host_header_is_refused(host):
    response = http_request(host, "http://127.0.0.1/signup/", headers={"Host": "evil.example.com"}, expect=None)
    assert response.status == 400


def test_api_signup_creates_user_then_refuses_duplicate(host, ip):
    payload = signup_payload()
    headers = {"Content-Type": "application/json"}
    created = get(host, "/api/signup/", ip, method="POST", headers=headers, body=json.dumps(payload))
    assert created.status == 201, created.body
    assert created.json()["username"] == payload["username"]
    duplicate = get(host, "/api/signup/", ip, method="POST", headers=headers, body=json.dumps(payload), expect=None)
    assert duplicate.status == 400
    errors = duplicate.json()["errors"]
    assert errors["username"][0]["code"] == "unique"
    assert errors["email"][0]["code"] == "unique"


def queued_emails(host):
    """Messages waiting in the Redis lists of Celery's `email` queue (one list per priority), in
    the stock Redis of the scenario's broker URL."""
    broker = {"server": BROKER.hostname, "port": BROKER.port, "check": True}
    keys = redis_cli(host, "--scan", "--pattern", "email*", **broker).split()
    return sum(int(redis_cli(host, "LLEN", key, **broker)) for key in keys)


def test_signup_publishes_the_welcome_email_task_to_redis(host, ip):
    # No worker consumes here: the task stays queued, which proves the web tier uses the
    # broker URL of the environment file.
    before = queued_emails(host)
    payload = signup_payload()
    created = get(host, "/api/signup/", ip, method="POST",
                  headers={"Content-Type": "application/json"}, body=json.dumps(payload))
    assert created.status == 201
    assert queued_emails(host) == before + 1


def test_html_signup_form_with_csrf_cookie_and_token(host, ip):
    page = get(host, "/signup/", ip)
    cookies = dict(c.split(";")[0].split("=", 1) for c in page.header("Set-Cookie"))
    assert "csrftoken" in cookies
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.body).group(1)
    payload = signup_payload()
    form = urlencode({"csrfmiddlewaretoken": token, **payload})
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "Cookie": f"csrftoken={cookies['csrftoken']}",
        "Origin": f"https://{ip}",
    }
    posted = get(host, "/signup/", ip, method="POST", headers=headers, body=form, expect=None)
    assert posted.status == 302, posted.body
    assert posted.header("Location") == ["/signup/done/"]
    session = "; ".join(c.split(";")[0] for c in posted.header("Set-Cookie"))
    done = get(host, "/signup/done/", ip, headers={"Cookie": session})
    assert done.status == 200
    assert f"Welcome, {payload['username']}!" in done.body


def test_html_signup_without_csrf_token_is_forbidden(host, ip):
    form = urlencode(signup_payload())
    posted = get(host, "/signup/", ip, method="POST",
                 headers={"Content-Type": "application/x-www-form-urlencoded"}, body=form, expect=None)
    assert posted.status == 403


def test_readyz_reports_redis_broker_and_database(host, ip):
    response = get(host, "/readyz", ip)
    assert response.status == 200, response.body
    assert response.json() == {"status": "ok", "broker": "redis", "broker_connection": "ok", "database": "ok"}


def test_static_files_are_served_by_nginx_with_cache_headers(host, ip):
    response = get(host, "/static/users/site.css", ip)
    assert response.status == 200
    assert response.header("Cache-Control") == ["max-age=604800"]
    assert response.header("Expires")
    assert response.body == host.file(f"{CURRENT}/static/users/site.css").content_string
    # gunicorn itself does not serve it (DEBUG is off): nginx did.
    direct = http_request(host, "http://localhost/static/users/site.css", headers={"Host": ip, "X-Forwarded-Proto": "https"},
                          unix_socket=SOCKET, user="www-data", expect=None)
    assert direct.status == 404


def test_gunicorn_listens_on_a_unix_socket_only_nginx_may_use(host):
    socket = host.file(SOCKET)
    assert socket.is_socket
    assert socket.user == "www-data"
    assert socket.mode == 0o600
    # The only TCP listeners off loopback are nginx's (Redis is on 127.0.0.1).
    listeners = host.check_output("ss -Htlnp").splitlines()
    public = [line for line in listeners if not re.search(r"\s(127\.\d+\.\d+\.\d+|\[::1\]):\d+\s", line)]
    assert public, listeners
    for line in public:
        assert re.search(r":80\s", line) and '"nginx"' in line, line


def test_only_nginx_port_is_reachable_from_the_peer(host, peer, ip):
    assert tcp_probe(peer, ip, 80) == "open"
    response = http_request(peer, f"http://{ip}/healthz", headers={"Host": ip})
    assert response.status == 200
    # Gunicorn's usual port: nothing there, and the firewall drops it anyway.
    assert tcp_probe(peer, ip, 8000) == "timeout"


def test_http_port_is_dropped_for_networks_not_allowed(host, ip):
    # Only the peer is in django_app_http_client_networks; the docker host is not.
    controller = testinfra.get_host("local://")
    assert tcp_probe(controller, ip, 80) == "timeout"
    assert tcp_probe(host, "127.0.0.1", 80) == "open"


def test_environment_file_is_readable_by_root_and_the_app_group_only(host):
    name = host.backend.get_hostname()
    env_file = app_env_file(name)
    env = host.file(env_file)
    assert env.user == "root"
    assert env.group == host_variable(name, "django_app_group", ("django_app",))
    assert env.mode == 0o640
    assert host.run("runuser -u nobody -- cat %s", env_file).rc != 0
    assert host.run("runuser -u %s -- cat %s", APP_USER, env_file).rc == 0


def test_secret_with_shell_and_systemd_metacharacters_reaches_django_intact(host):
    secret = host.ansible.get_variables()["django_app_secret_key"]
    assert "$" in secret and '"' in secret and "\\" in secret and "`" in secret
    expected = hashlib.sha256(secret.encode()).hexdigest()
    # As systemd reads the environment file: the running gunicorn's environment.
    environ = host.check_output(
        "cat /proc/%s/environ | tr '\\0' '\\n' | sed -n 's/^SECRET_KEY=//p'", str(main_pid(host))
    )
    assert hashlib.sha256(environ.encode()).hexdigest() == expected
    # As sh reads it: the manage command.
    seen = host.check_output(
        "%s shell -c %s",
        MANAGE,
        "import hashlib; from django.conf import settings; "
        "print(hashlib.sha256(settings.SECRET_KEY.encode()).hexdigest())",
    )
    assert seen.strip().splitlines()[-1] == expected


def test_gunicorn_runs_as_the_app_user(host):
    pid = main_pid(host)
    pids = [pid] + [int(p) for p in host.check_output("pgrep -P %s", str(pid)).split()]
    assert len(pids) >= 3  # master and the two workers of molecule.yml
    for each in pids:
        assert host.check_output("ps -o user= -p %s", str(each)).strip() == APP_USER


def test_gunicorn_is_sandboxed(host):
    pid = str(main_pid(host))
    status = host.file(f"/proc/{pid}/status").content_string
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    assert re.search(r"^CapEff:\s+0+$", status, re.M)
    inside = "nsenter -t %s -m -- "  # the service's mount namespace
    # ProtectSystem=strict: the code and /etc are read-only even for root in its namespace.
    for path in (f"{ROOT}/probe", "/etc/probe", "/usr/probe"):
        denied = host.run(inside + "touch %s", pid, path)
        assert denied.rc != 0 and "Read-only file system" in denied.stderr, path
    # ...except the state directory.
    probe = f"{STATE_DIR}/probe"
    assert host.run(inside + "touch %s", pid, probe).rc == 0
    host.check_output(inside + "rm %s", pid, probe)
    # ProtectHome: /root is empty there; PrivateTmp: a file in the host's /tmp is not there.
    assert host.check_output("ls -A /root")
    assert host.check_output(inside + "ls -A /root", pid) == ""
    host.check_output("touch /tmp/django_app_host_probe")
    assert host.run(inside + "test -e /tmp/django_app_host_probe", pid).rc != 0


def test_restart_under_traffic_drops_no_request(host, ip):
    # Sequential requests while the service restarts: they wait in the socket systemd
    # holds (for as long as the new master takes to import the app), none fails.
    pid_before = main_pid(host)
    script = (
        "import http.client, json, subprocess, sys, threading, time\n"
        "results, stop = [], threading.Event()\n"
        "def load():\n"
        "    deadline = time.monotonic() + 60\n"
        "    while not stop.is_set() and len(results) < 300 and time.monotonic() < deadline:\n"
        "        c = http.client.HTTPConnection('127.0.0.1', 80, timeout=60)\n"
        "        started = time.monotonic()\n"
        "        try:\n"
        "            c.request('GET', '/healthz', headers={'Host': sys.argv[1]})\n"
        "            results.append([c.getresponse().status, time.monotonic() - started])\n"
        "        except OSError as e:\n"
        "            results.append([repr(e), time.monotonic() - started])\n"
        "        time.sleep(0.05)\n"
        "t = threading.Thread(target=load); t.start(); time.sleep(1)\n"
        "subprocess.run(['systemctl', 'restart', sys.argv[2]], check=True)\n"
        "time.sleep(3); stop.set(); t.join()\n"
        "print(json.dumps(results))\n"
    )
    results = json.loads(host.check_output("python3 -c %s %s %s", script, ip, SERVICE))
    assert main_pid(host) != pid_before
    assert len(results) >= 10
    slowest = max(seconds for _, seconds in results)
    assert [status for status, _ in results if status != 200] == [], f"slowest request {slowest:.1f} s"


def test_migrations_and_static_files_ran_for_the_current_release(host):
    release = host.file(CURRENT).linked_to
    for marker in RELEASE_MARKERS:
        assert host.file(f"{release}/{marker}").exists, marker
    assert "[X] 0001_initial" in host.check_output("%s showmigrations users", MANAGE)


def test_release_venv_uses_the_hosts_python_and_its_wheels(host):
    release = host.file(CURRENT).linked_to
    python = host.check_output(f"{release}/venv/bin/python -c 'import sys; print(sys.version_info[:2])'")
    host_python = host.check_output("python3 -c 'import sys; print(sys.version_info[:2])'")
    assert python == host_python
    tag = "cp" + "".join(re.findall(r"\d+", host_python))
    assert host.run(f"ls {release}/wheels/psycopg_binary-*-{tag}-*.whl").rc == 0
    freeze = host.check_output(f"{release}/venv/bin/pip freeze --disable-pip-version-check")
    assert "Django==5.2.19" in freeze
    assert "sample-app==1.0.0" in freeze or "sample_app==1.0.0" in freeze


def test_project_check_refused_a_missing_wsgi_module_before_any_change(side_effect):
    assert side_effect["project_check_passed"] is False
    message = " ".join(side_effect["project_check_messages"])
    assert "django_app_wsgi_app is myproject.missing_wsgi:application" in message
    assert "myproject/missing_wsgi.py" in message
    assert side_effect["refused_current"] == side_effect["converged"]


def test_release_b_replaced_the_converged_release(side_effect):
    assert side_effect["release_b"] != side_effect["converged"]
    assert side_effect["release_b_changed"] is True
    assert side_effect["release_b"].startswith("1.0.0-")


def test_broken_release_was_rolled_back_to_release_b(host, ip, side_effect):
    assert side_effect["release_c"] and side_effect["release_c"] != side_effect["release_b"]
    assert side_effect["release_c_succeeded"] is False
    message = side_effect["rollback_message"]
    assert f"Release {side_effect['release_c']} failed" in message
    assert f"Rolled back: current points at {side_effect['release_b']} again, which answers 200" in message
    assert host.file(CURRENT).linked_to == f"{ROOT}/releases/{side_effect['release_b']}"
    # The running gunicorn was started from release B (its working directory).
    cwd = host.check_output("readlink /proc/%s/cwd", str(main_pid(host)))
    assert cwd == f"{ROOT}/releases/{side_effect['release_b']}"
    assert get(host, "/signup/", ip).status == 200
    assert get(host, "/healthz", ip).status == 200


def test_old_releases_are_pruned(host, side_effect):
    releases = host.file(f"{ROOT}/releases").listdir()
    assert len(releases) <= KEEP_RELEASES
    assert side_effect["release_b"] in releases
    assert side_effect["converged"] not in releases
