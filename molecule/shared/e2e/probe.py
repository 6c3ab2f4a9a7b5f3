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


def redis(address, port, command, username=None, password=None):
    import redis as redis_py

    client = redis_py.Redis(address, port, username=username, password=password, socket_timeout=TIMEOUT)
    reply = client.execute_command(*command)
    return f"ok {str(reply)[:40]}"


def amqp(address, port, username, password, vhost):
    import amqp as py_amqp

    with py_amqp.Connection(
        f"{address}:{port}", userid=username, password=password, virtual_host=vhost, connect_timeout=TIMEOUT
    ) as connection:
        connection.connect()
    return "ok"


def http(url, username=None, password=None, host=None, method="GET", body=None):
    request = urllib.request.Request(url, method=method, data=body.encode() if body else None)
    if username is not None:
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    if host:
        request.add_header("Host", host)
    if body:
        request.add_header("Content-Type", "application/json")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
        status, text = response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
    # A debug page names itself; production error pages do not.
    debug = any(marker in text for marker in ("Traceback", "DEBUG = True", "technical_500", "Django tried these"))
    return f"{status}{' debug page' if debug else ''}"


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
