"""The separate project (project/) converged from the installed collection: what was installed
is the collection alone, at galaxy.yml's version, the project finds it in its own directory only,
and the roles did their work: the sink takes mail, port 25 is open to the web host that the
collection's group_networks filter read from the project's inventory, and the project's own
Django + Celery app (project/ledger, not sample_app) runs its task, whose email lands."""

import json
import os
import subprocess
import uuid
from pathlib import Path

import jinja2
import yaml
from cbk_testlib import MAILDIR, galaxy, smtp_send, wait_for_maildir_message

PROJECT = Path(os.environ["CBK_COLLECTION_PROJECT"])
GALAXY = galaxy()
INSTALLED = PROJECT / "collections" / "ansible_collections" / GALAXY["namespace"] / GALAXY["name"]
# The project inventory's web host.
INVENTORY = yaml.safe_load((PROJECT / "inventory" / "hosts.yml").read_text())
(WEB_HOST_ADDRESS,) = [host["ansible_host"] for host in INVENTORY["all"]["children"]["web"]["hosts"].values()]
# The project's variables, and the manage command the installed django_app role gives its app.
PROJECT_VARS = yaml.safe_load((PROJECT / "inventory" / "group_vars" / "all.yml").read_text())
DJANGO_APP_VARS = yaml.safe_load((INSTALLED / "roles" / "django_app" / "vars" / "main.yml").read_text())
MANAGE = jinja2.Template(DJANGO_APP_VARS["django_app__manage"]).render(PROJECT_VARS)


def test_the_installed_collection_has_galaxy_yml_version():
    manifest = json.loads((INSTALLED / "MANIFEST.json").read_text())["collection_info"]
    assert (manifest["namespace"], manifest["name"], manifest["version"]) == (
        GALAXY["namespace"],
        GALAXY["name"],
        GALAXY["version"],
    )


def test_the_tarball_holds_the_collection_and_nothing_of_the_repository():
    assert sorted(path.name for path in INSTALLED.iterdir()) == [
        "CHANGELOG.md",
        "FILES.json",
        "LICENSE",
        "MANIFEST.json",
        "README.md",
        "changelogs",
        "meta",
        "plugins",
        "roles",
    ]
    assert sorted(path.name for path in (INSTALLED / "plugins").iterdir()) == ["filter"]


def test_the_project_finds_the_collection_in_its_own_directory_only():
    listed = subprocess.run(
        ["ansible-galaxy", "collection", "list", f"{GALAXY['namespace']}.{GALAXY['name']}", "--format", "json"],
        cwd=PROJECT,
        env={"PATH": os.environ["PATH"], "HOME": os.environ["HOME"]},
        capture_output=True,
        text=True,
        check=True,
    )
    assert list(json.loads(listed.stdout)) == [str(PROJECT / "collections" / "ansible_collections")]


def test_the_sink_delivers_mail_into_its_maildir(host):
    token = uuid.uuid4().hex
    assert smtp_send(host, "127.0.0.1", f"user-{token}@example.com", f"Probe {token}", token) == "accepted"
    assert wait_for_maildir_message(host, MAILDIR, token, timeout=60)


def test_port_25_is_open_to_the_inventory_web_host(host):
    ruleset = host.check_output("nft list ruleset")
    (rule,) = [line for line in ruleset.splitlines() if 'comment "mail-sink"' in line]
    assert f"saddr {WEB_HOST_ADDRESS} tcp dport 25 accept" in rule


def test_the_projects_task_runs_on_its_worker_and_its_email_lands(host):
    order = uuid.uuid4().hex
    send = f"from receipts.tasks import send_receipt; send_receipt.delay({order!r}, 'buyer@example.com')"
    host.check_output("%s shell -c %s", MANAGE, send)
    assert wait_for_maildir_message(host, MAILDIR, f"Receipt for order {order}", timeout=60)
