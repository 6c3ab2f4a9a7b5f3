"""Runs inside the probe container (a stranger on the scenario network): tries each
connection it is given and prints, as JSON, what it got. Reads a JSON list of probes
{"kind": ..., ...} on stdin. The tests decide what counts as refused."""

import base64
import json
import socket
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

TIMEOUT = 5


def tcp(address, port):
    try:
        socket.create_connection((address, port), timeout=TIMEOUT).close()
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError:
        return "timeout"


def redis(address, port, command, username=None, password=None, tls=False):
    """A Redis command; with tls, over TLS verified against the system's CAs, the name included."""
    import redis as redis_py

    client = redis_py.Redis(
        address, port, username=username, password=password, socket_timeout=TIMEOUT,
        ssl=tls, ssl_cert_reqs="required", ssl_check_hostname=tls,
    )
    reply = client.execute_command(*command)
    return f"ok {str(reply)[:40]}"


def amqp(address, port, username, password, vhost, tls=False):
    """An AMQP login; with tls, over TLS verified against the system's CAs, the name included."""
    import ssl

    import amqp as py_amqp

    options = {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": address} if tls else False
    with py_amqp.Connection(
        f"{address}:{port}", userid=username, password=password, virtual_host=vhost, connect_timeout=TIMEOUT, ssl=options
    ) as connection:
        connection.connect()
    return "ok"


class NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the redirect itself is the answer


def http(url, username=None, password=None, host=None, method="GET", body=None, redirects=True):
    """Status of a request (verified against the system's CAs over https), with " debug page"
    when Django's debug pages show; without redirects, a redirect's status and Location."""
    request = urllib.request.Request(url, method=method, data=body.encode() if body else None)
    if username is not None:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    if host:
        request.add_header("Host", host)
    if body:
        request.add_header("Content-Type", "application/json")
    opener = urllib.request.build_opener(*([] if redirects else [NoRedirects]))
    location = ""
    try:
        response = opener.open(request, timeout=TIMEOUT)
        status, text = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
        location = "" if redirects else f" {error.headers.get('Location')}"
    # A debug page names itself; production error pages do not.
    debug = any(marker in text for marker in ("Traceback", "DEBUG = True", "technical_500", "Django tried these"))
    return f"{status}{location}{' debug page' if debug else ''}"


def tls(address, port, version, cafile=None):
    """A TLS handshake with only `version` (an ssl.TLSVersion name) offered, verifying the
    server against cafile or the system's CAs: "ok <version>" or why it failed."""
    import ssl

    context = ssl.create_default_context(cafile=cafile)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # the client itself would offer TLS 1.0 and 1.1
    context.minimum_version = context.maximum_version = ssl.TLSVersion[version]
    with socket.create_connection((address, port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=address) as connection:
            return f"ok {connection.version()}"


def postgres(address, port, username, password, dbname):
    import psycopg2

    psycopg2.connect(
        host=address,
        port=port,
        user=username,
        password=password,
        dbname=dbname,
        connect_timeout=TIMEOUT,
        sslmode="require",
    ).close()
    return "ok"


def run(probe):
    kind = probe.pop("kind")
    try:
        return globals()[kind](**probe)
    except Exception as error:  # what the server answered is the result
        first_line = (str(error).strip().splitlines() or [""])[0]
        return f"{type(error).__name__}: {first_line}"[:90]


if __name__ == "__main__":
    with ThreadPoolExecutor(16) as pool:
        print(json.dumps(list(pool.map(run, json.load(sys.stdin)))))
