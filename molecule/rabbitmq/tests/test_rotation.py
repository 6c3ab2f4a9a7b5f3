"""Password rotation: a second converge with another app password.

Runs after test_rabbitmq.py (pytest takes the files in name order): from the
first test here to the end of the session, the brokers hold the new password.
"""

import json
import os
import tempfile
import uuid

import pytest
import testinfra
from cbk_testlib import address, ansible_playbook
from test_rabbitmq import Broker
from testinfra.utils.ansible_runner import AnsibleRunner


@pytest.fixture(scope="module")
def broker(host):
    return Broker(address(host), host.ansible.get_variables())


@pytest.fixture(scope="session")
def rotation():
    """Converge (broker role only) with a new app password; put the old one back at the end."""
    inventory = os.environ["MOLECULE_INVENTORY_FILE"]
    playbook = os.path.join(os.path.dirname(__file__), os.pardir, "converge.yml")
    names = AnsibleRunner(inventory).get_hosts("all")
    old = AnsibleRunner(inventory).get_variables(names[0])["rabbitmq_app_password"]
    new = f"rotated-{uuid.uuid4().hex}"

    def converge(password):
        with tempfile.NamedTemporaryFile("w", suffix=".json") as extra_vars:
            json.dump({"rabbitmq_app_password": password}, extra_vars)
            extra_vars.flush()
            returncode, stdout, _, recap = ansible_playbook(
                playbook, "--skip-tags", "cbk-base", "-e", f"@{extra_vars.name}"
            )
        assert returncode == 0, stdout[-6000:]
        return {name: changed for name, (changed, _) in recap.items()}

    yield {"old": old, "new": new, "changed": converge(new), "names": names}
    # Put the inventory's password back directly (a full converge would only
    # repeat what the test proved); printf is a shell builtin, so the password
    # stays off the process list here too.
    for name in names:
        host = testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}")
        host.check_output("printf '%%s' %s | rabbitmqctl change_password celery", old)


def test_rotation_converge_changes_only_the_password(rotation):
    # One change per host, the password itself: everything else stays as it was.
    assert rotation["changed"] == {name: 1 for name in rotation["names"]}


def test_rotated_password_replaces_the_old_one(peer, broker, rotation):
    assert broker.login(peer, "celery", rotation["new"])["result"] == "ok"
    assert broker.login(peer, "celery", rotation["old"])["result"] == "AccessRefused"
