"""The base role's behaviour: default-deny firewall with a working allow-list,
hardened sshd, persistent size-limited journal, time sync enabled."""

import re

import pytest
from cbk_testlib import address, listen, pending_security_updates, role_defaults, scenario_variables, tcp_probe

ROLE_VARS = role_defaults("base", "vars")
ROLE_DEFAULTS = role_defaults("base")

# 8081 is allowed from the peer by the inventory list, 8082 by the hook other
# roles use; 8083 is on no list.
ALLOWED = (8081, 8082)
NOT_ALLOWED = 8083


@pytest.fixture(scope="module")
def listeners(host):
    for port in (*ALLOWED, NOT_ALLOWED):
        listen(host, port)
    return address(host)


def test_ruleset_is_default_deny_and_enabled(host):
    chain = host.check_output("nft list chain inet %s input", ROLE_VARS["base__firewall_table"])
    assert "policy drop" in chain
    assert host.service("nftables").is_enabled


def test_firewall_owns_only_its_table(host):
    """prepare.yml loaded the role's earlier ruleset (its own table after flushing every other)
    and then a table of other software: the converge replaced the first and kept the second,
    and stopping nftables removes only the kit's table."""
    ours = f"table inet {ROLE_VARS['base__firewall_table']}"
    foreign = f"table {scenario_variables()['base_test_foreign_table']}"
    tables = host.check_output("nft list tables").splitlines()
    assert ours in tables and foreign in tables, tables
    assert f"table inet {ROLE_VARS['base__firewall_legacy_table']}" not in tables, tables
    host.check_output("systemctl stop nftables")
    try:
        assert host.check_output("nft list tables").splitlines() == [foreign]
    finally:
        host.check_output("systemctl start nftables")
    assert ours in host.check_output("nft list tables").splitlines()


@pytest.mark.parametrize("port", ALLOWED)
def test_allowed_port_is_reachable_from_the_allowed_peer(host, peer, listeners, port):
    assert tcp_probe(peer, listeners, port) == "open"


def test_port_not_on_the_allow_list_is_dropped(host, peer, listeners):
    assert tcp_probe(peer, listeners, NOT_ALLOWED) == "timeout"


def test_allowed_port_is_dropped_for_other_sources(host, peer, listeners):
    # The peer's address is the only allowed source: the docker host, on the
    # same network, is not.
    import testinfra

    controller = testinfra.get_host("local://")
    assert tcp_probe(controller, listeners, ALLOWED[0]) == "timeout"


def test_listener_itself_works_behind_the_firewall(host, listeners):
    # Guards the drop test above: the port is open locally, only the firewall hides it.
    assert tcp_probe(host, "127.0.0.1", NOT_ALLOWED) == "open"


def test_sshd_refuses_passwords(host, peer, listeners):
    effective = host.check_output("sshd -T")
    assert "passwordauthentication no" in effective
    assert "kbdinteractiveauthentication no" in effective
    assert "x11forwarding no" in effective
    attempt = peer.run(
        "ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
        "-o PreferredAuthentications=password,keyboard-interactive root@%s true",
        listeners,
    )
    assert attempt.rc == 255
    assert "Permission denied (publickey)" in attempt.stderr


def test_config_files_are_not_world_writable_and_firewall_files_not_world_readable(host):
    for path in ("/etc/nftables.conf", "/etc/nftables.d/00-base.nft", "/etc/nftables.d/50-probe-hook.nft"):
        assert host.file(path).mode & 0o007 == 0, path
    assert host.file("/etc/ssh/sshd_config.d/50-hardening.conf").mode == 0o600


def test_journal_is_persistent_and_bounded(host):
    config = host.check_output("systemd-analyze cat-config systemd/journald.conf")
    assert "SystemMaxUse=500M" in config
    host.check_output("journalctl --flush")
    machine_id = host.file("/etc/machine-id").content_string.strip()
    assert host.file(f"/var/log/journal/{machine_id}").is_directory


def test_time_sync_is_enabled_with_the_configured_servers(host):
    assert host.service("systemd-timesyncd").is_enabled
    config = host.check_output("systemd-analyze cat-config systemd/timesyncd.conf")
    assert "NTP=0.debian.pool.ntp.org" in config


def test_kernel_settings_are_skipped_not_half_applied_in_containers(host):
    # /proc/sys is read-only in these containers: the role must not persist a
    # setting it could not apply, and must leave the running value alone.
    assert not host.file("/etc/sysctl.d/60-celery-broker-kit.conf").exists
    assert not host.file("/etc/systemd/system/transparent-hugepages.service").exists


def test_sources_hold_the_updates_and_security_suites(host):
    release = host.system_info.codename
    policy = host.check_output("apt-cache policy")
    for suite in (release, f"{release}-updates", f"{release}-security"):
        assert f"n={suite}," in policy, suite
    # Once only: sources.list no longer lists what debian.sources does.
    assert "configured multiple times" not in host.run("apt-get -s check").stderr


def test_the_converge_applied_the_pending_security_fix(host):
    package = host.file(scenario_variables()["base_test_downgraded_file"]).content_string.strip()
    assert package, "prepare.yml found no package to take back"
    # Back at the archive's newest version, whichever apt run of the converge took it there.
    policy = host.check_output("apt-cache policy %s", package)
    assert re.search(r"Installed: (\S+)", policy)[1] == re.search(r"Candidate: (\S+)", policy)[1], policy
    assert pending_security_updates(host) == []


def test_unattended_upgrades_take_security_fixes_daily_without_rebooting(host):
    settings = host.check_output("apt-config dump")
    origins = [line for line in settings.splitlines() if line.startswith("Unattended-Upgrade::Origins-Pattern::")]
    assert origins and all("label=Debian-Security" in line for line in origins), origins
    reboot = str(ROLE_DEFAULTS["base_security_updates_reboot"]).lower()
    assert f'Unattended-Upgrade::Automatic-Reboot "{reboot}";' in settings
    assert 'APT::Periodic::Unattended-Upgrade "1";' in settings
    assert host.service("apt-daily-upgrade.timer").is_enabled
    assert host.package("needrestart").is_installed


def test_the_host_certificate_names_the_host_and_its_address_and_the_system_trusts_its_ca(host):
    cert, key, ca = (ROLE_DEFAULTS[f"base_tls_{name}_path"] for name in ("cert", "key", "ca"))
    assert host.file(key).user == "root" and host.file(key).group == "ssl-cert" and host.file(key).mode == 0o640
    assert host.file(cert).mode == 0o644 and host.file(ca).mode == 0o644
    names = host.check_output("openssl x509 -in %s -noout -ext subjectAltName", cert)
    assert f"DNS:{host.backend.get_hostname()}" in names and f"IP Address:{address(host)}" in names, names
    # The CA joined the system's store: verification needs no CA file.
    assert host.check_output("openssl verify %s", cert).endswith(": OK")
    # The key is the certificate's.
    assert host.check_output("openssl x509 -in %s -noout -pubkey", cert) == host.check_output("openssl pkey -in %s -pubout", key)
    # Its key stays unreadable to others: the private directory admits only root and ssl-cert.
    assert host.run("runuser -u nobody -- cat %s", key).rc != 0


def test_new_accounts_get_private_homes_and_costly_password_hashes(host):
    login_defs = ROLE_DEFAULTS["base_login_defs"]
    host.check_output("useradd --create-home cbk-hardening-test")
    try:
        home_mode = host.file("/home/cbk-hardening-test").mode
        # chpasswd -c hashes itself with login.defs' settings (without -c, PAM decides).
        host.check_output("echo cbk-hardening-test:not-a-real-password | chpasswd -c SHA512")
        shadow = host.check_output("getent shadow cbk-hardening-test")
    finally:
        host.run("userdel --remove cbk-hardening-test")
    assert home_mode == int(login_defs["HOME_MODE"], 8)
    assert f"$6$rounds={login_defs['SHA_CRYPT_MIN_ROUNDS']}$" in shadow


def test_unused_protocols_and_removable_storage_may_not_load(host):
    rules = host.file("/etc/modprobe.d/cbk-disabled-modules.conf").content_string
    for module in ROLE_DEFAULTS["base_disabled_kernel_modules"]:
        assert f"install {module} /bin/false" in rules, module


def test_the_legal_banner_is_shown_before_login(host):
    banner = ROLE_DEFAULTS["base_login_banner"]
    assert host.file("/etc/issue").content_string.strip() == banner
    assert host.file("/etc/issue.net").content_string.strip() == banner
    assert "banner /etc/issue.net" in host.check_output("sshd -T")


def test_auditd_is_left_to_the_host_in_containers(host):
    # Kernel audit is one per kernel: a container must not claim it (real servers get auditd).
    assert not host.package("auditd").is_installed


def test_debsums_names_a_changed_package_file_and_nothing_else(host):
    assert host.service("cbk-debsums.timer").is_enabled
    changed = "/usr/share/doc/debsums/changelog.gz"
    host.check_output("cp -p %s /var/tmp/cbk-debsums-test && echo tampered >> %s", changed, changed)
    try:
        run = host.run("systemctl start cbk-debsums.service")
        report = host.check_output("journalctl -u cbk-debsums.service -o cat --since '-5min' | grep '^debsums: ' || true")
    finally:
        host.check_output("mv /var/tmp/cbk-debsums-test %s", changed)
    assert run.rc != 0
    assert report.strip() == f"debsums: changed file {changed} (from debsums package)", report
