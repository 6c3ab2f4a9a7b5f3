"""The postgresql role's behaviour: the app user works over the network from the allowed
peer, with TLS and a SCRAM-SHA-256 password, and nothing else gets in (wrong password,
the postgres superuser, other databases, plain text, sources outside the allow-list);
no clear-text secret on disk; data survives a restart.

Both instances run the server and are each other's only client: `host` is the server
under test, `peer` the app host allowed by its postgresql_client_networks.

side_effect.yml (before this) proves the preflight refusals and the password rotation;
the idempotence step proves an unchanged password reports no change."""

import pytest
import testinfra
from cbk_testlib import OTHER_CA_ONLY, SYSTEM_CA_BUNDLE, address, role_defaults, tcp_probe

# The two servers; the scenario's third host is the backup repository (tests/test_backup.py).
testinfra_hosts = ["ansible://servers"]

# Debian release -> PostgreSQL major the role must have found.
EXPECTED_MAJOR = {"12": "15", "13": "17"}


@pytest.fixture(scope="module")
def settings(host):
    """The role's variables for this host: inventory values over the role's defaults."""
    inventory = host.ansible.get_variables()
    return {
        "port": int(inventory.get("postgresql_port", 5432)),
        "db": inventory.get("postgresql_app_db", "app"),
        "user": inventory.get("postgresql_app_user", "app"),
        "password": inventory["postgresql_app_password"],
        "max_connections": int(
            inventory.get("postgresql_max_connections", role_defaults("postgresql")["postgresql_max_connections"])
        ),
    }


@pytest.fixture(scope="module")
def server_address(host):
    return address(host)


@pytest.fixture(scope="module")
def major(host):
    debian = host.file("/etc/debian_version").content_string.split(".")[0]
    return EXPECTED_MAJOR[debian]


def psql(client, sql, *, host_address, port, db, user, password="", sslmode="require"):
    """Run SQL with psql on client against a server; returns the command result."""
    conninfo = (
        f"host={host_address} port={port} dbname={db} user={user} "
        f"sslmode={sslmode} connect_timeout=5"
    )
    return client.run(
        "env PGPASSWORD=%s psql %s -X -At -v ON_ERROR_STOP=1 -c %s", password, conninfo, sql
    )


def as_app(client, sql, server_address, settings, **overrides):
    """psql as the app user with its password, from client (the peer, usually)."""
    params = {
        "host_address": server_address,
        "port": settings["port"],
        "db": settings["db"],
        "user": settings["user"],
        "password": settings["password"],
    }
    params.update(overrides)
    return psql(client, sql, **params)


def as_postgres(host, sql, settings, db="postgres"):
    """Local administration: the postgres OS user over the socket (peer)."""
    return host.check_output(
        "runuser -u postgres -- psql -X -At -p %s -d %s -c %s", str(settings["port"]), db, sql
    )


def test_release_default_major_is_the_only_cluster_and_online(host, major, settings):
    clusters = host.check_output("pg_lsclusters --no-header").splitlines()
    assert len(clusters) == 1, clusters
    version, name, port, status = clusters[0].split()[:4]
    assert (version, name, status) == (major, "main", "online")
    assert int(port) == settings["port"]
    assert host.service(f"postgresql@{major}-main").is_running
    assert host.service("postgresql").is_enabled


def test_listens_on_loopback_and_the_private_address_only(host, server_address, settings):
    listeners = host.check_output("ss -Htln 'sport = :%s'", str(settings["port"])).splitlines()
    local = {line.split()[3].rsplit(":", 1)[0] for line in listeners}
    assert local == {"127.0.0.1", server_address}


def test_app_user_works_over_tls_from_the_allowed_peer(host, peer, server_address, settings):
    sql = (
        "CREATE TABLE IF NOT EXISTS probe (id serial PRIMARY KEY, note text NOT NULL);"
        "INSERT INTO probe (note) VALUES ('from the peer');"
        "SELECT note FROM probe WHERE note = 'from the peer' LIMIT 1;"
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid();"
        "SELECT current_user, current_database();"
    )
    result = as_app(peer, sql, server_address, settings)
    assert result.rc == 0, result.stderr
    assert result.stdout.splitlines()[-3:] == [
        "from the peer",
        "t",
        f"{settings['user']}|{settings['db']}",
    ]


def test_wrong_password_is_refused(host, peer, server_address, settings):
    result = as_app(peer, "SELECT 1", server_address, settings, password="not-the-password-at-all")
    assert result.rc == 2
    assert f'FATAL:  password authentication failed for user "{settings["user"]}"' in result.stderr


def test_plain_text_connection_is_refused(host, peer, server_address, settings):
    result = as_app(peer, "SELECT 1", server_address, settings, sslmode="disable")
    assert result.rc == 2
    assert "pg_hba.conf rejects connection" in result.stderr
    assert "no encryption" in result.stderr


@pytest.mark.parametrize("target", ["postgres database", "app database"])
def test_postgres_superuser_cannot_log_in_remotely(host, peer, server_address, settings, target):
    db = settings["db"] if target == "app database" else "postgres"
    result = as_app(peer, "SELECT 1", server_address, settings, user="postgres", db=db)
    assert result.rc == 2
    assert f'pg_hba.conf rejects connection for host "{address(peer)}", user "postgres"' in result.stderr


def test_app_user_reaches_only_its_own_database(host, peer, server_address, settings):
    result = as_app(peer, "SELECT 1", server_address, settings, db="postgres")
    assert result.rc == 2
    assert "pg_hba.conf rejects connection" in result.stderr


def test_firewall_drops_a_source_outside_the_allow_list(host, peer, server_address, settings):
    # The docker host is on the scenario network but not in postgresql_client_networks.
    controller = testinfra.get_host("local://")
    assert tcp_probe(controller, server_address, settings["port"]) == "timeout"
    # Guard: the same port answers the allowed peer.
    assert tcp_probe(peer, server_address, settings["port"]) == "open"


def test_pg_hba_rejects_a_source_outside_the_allow_list_past_the_firewall(host, server_address, settings):
    # From the server to its own private address: the firewall accepts loopback-interface
    # traffic, so only pg_hba.conf stands between this source and the app database.
    result = as_app(host, "SELECT 1", server_address, settings)
    assert result.rc == 2
    assert f'pg_hba.conf rejects connection for host "{server_address}"' in result.stderr


def test_the_peer_verifies_the_servers_host_certificate(host, peer, server_address, settings):
    # The base role gave the server its host certificate (the kit CA's) and the peer the CA, in
    # its system store; the name checked is the address the app connects to.
    trusted = as_app(peer, "SHOW ssl", server_address, settings,
                     sslmode=f"verify-full sslrootcert={SYSTEM_CA_BUNDLE}")
    assert trusted.rc == 0 and trusted.stdout.strip() == "on", trusted.stderr
    other_ca = as_app(peer, "SELECT 1", server_address, settings,
                      sslmode=f"verify-full sslrootcert={OTHER_CA_ONLY}")
    assert other_ca.rc != 0 and "certificate verify failed" in other_ca.stderr, other_ca.stderr


def test_config_files_are_readable_by_postgres_only(host, major):
    config = f"/etc/postgresql/{major}/main"
    files = host.run("find %s -type f", config).stdout.split()
    assert f"{config}/postgresql.conf" in files and f"{config}/pg_hba.conf" in files
    for path in files:
        assert host.file(path).user == "postgres", path
        assert host.run("runuser -u postgres -- cat %s", path).rc == 0, path
        assert host.run("runuser -u nobody -- cat %s", path).rc != 0, path
    key = host.file("/etc/ssl/private/ssl-cert-snakeoil.key")
    assert key.mode & 0o007 == 0


def test_no_clear_text_app_password_on_disk(host, settings):
    for tree in ("/etc/postgresql", "/var/log/postgresql", "/var/lib/postgresql"):
        found = host.run("grep -rlF -- %s %s", settings["password"], tree)
        assert found.rc == 1, f"{tree}: {found.stdout}{found.stderr}"


def test_the_server_has_the_connection_slots_site_yml_counts_on(host, settings):
    """playbooks/db_connections.yml checks the app's connections against max_connections less the
    superuser's reserved slots: the running server must have both as the role says."""
    expected = {
        "max_connections": settings["max_connections"],
        "superuser_reserved_connections": role_defaults("postgresql", "vars")["postgresql__superuser_reserved_connections"],
    }
    running = {name: int(as_postgres(host, f"SHOW {name}", settings)) for name in expected}
    assert running == expected


def test_passwords_are_stored_as_scram_sha_256(host, settings):
    assert as_postgres(host, "SHOW password_encryption", settings) == "scram-sha-256"
    stored = as_postgres(
        host, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{settings['user']}'", settings
    )
    assert stored.startswith("SCRAM-SHA-256$")


def test_app_user_owns_its_database_and_nothing_more(host, settings):
    row = as_postgres(
        host,
        "SELECT pg_get_userbyid(d.datdba), r.rolsuper, r.rolcreatedb, r.rolcreaterole,"
        " has_database_privilege('public', d.oid, 'CONNECT'),"
        " pg_encoding_to_char(d.encoding), d.datcollate"
        " FROM pg_database d, pg_roles r"
        f" WHERE d.datname = '{settings['db']}' AND r.rolname = '{settings['user']}'",
        settings,
    )
    assert row == f"{settings['user']}|f|f|f|f|UTF8|C.UTF-8"


def test_connections_and_disconnections_are_logged(host, peer, server_address, settings, major):
    as_app(peer, "SELECT 1", server_address, settings)
    log = host.file(f"/var/log/postgresql/postgresql-{major}-main.log").content_string
    assert f"connection authorized: user={settings['user']} database={settings['db']}" in log
    assert "disconnection: session time:" in log


def test_data_survives_a_restart(host, peer, server_address, settings, major):
    marker = "kept across a restart"
    sql = (
        "CREATE TABLE IF NOT EXISTS durable (note text NOT NULL);"
        f"INSERT INTO durable (note) VALUES ('{marker}');"
    )
    written = as_app(peer, sql, server_address, settings)
    assert written.rc == 0, written.stderr
    host.check_output("systemctl restart postgresql@%s-main", major)
    host.run_expect(
        [0],
        "timeout 30 sh -c %s",
        f"until pg_isready -q -h 127.0.0.1 -p {settings['port']}; do sleep 0.5; done",
    )
    read = as_app(peer, f"SELECT count(*) FROM durable WHERE note = '{marker}'", server_address, settings)
    assert read.rc == 0, read.stderr
    assert int(read.stdout) >= 1
