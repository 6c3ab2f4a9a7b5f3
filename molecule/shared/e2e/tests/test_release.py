"""A release of new code rolled out under load (README.md, "Releases"): the app's source with
one change, deployed with `site.yml --tags workers,app` while signups keep coming. No signup
is refused, every accepted one is emailed once, the web host and both worker hosts end on the
new release, and the worker hosts' journals show no two of them restarting at once. Runs in
e2e-rabbitmq; switch rolls releases of new settings out the same way (test_switch.py).
Figures go to artifacts/release/<scenario>.json."""

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import pytest
from cbk_testlib import (
    SignupLoad,
    ansible_playbook,
    mail_tally,
    overlapping_worker_restarts,
    role_defaults,
    scenario_setting,
    settle_mail,
)

SCENARIO = os.environ["MOLECULE_SCENARIO_NAME"]
PROJECT = Path(os.environ["MOLECULE_PROJECT_DIRECTORY"])
BACKEND = f"cbk-{SCENARIO}-debian12"  # the signups come from here
RESULTS = PROJECT / "artifacts" / "release" / f"{SCENARIO}.json"
SIGNUP_RATE = 5  # per second, for as long as the rollout runs
DELIVERY_SECONDS = 240

pytestmark = pytest.mark.skipif(
    SCENARIO != "e2e-rabbitmq", reason="switch rolls releases of new settings out under load (test_switch.py)"
)


def test_a_new_release_rolls_out_under_load_one_host_at_a_time(backend, front, site, probe_address, tmp_path):
    # The role's default source (django_app_source_dir), less what its digest leaves out.
    source = tmp_path / "app"
    excludes = role_defaults("django_app")["django_app_source_excludes"]
    shutil.copytree(PROJECT / "sample_app", source, ignore=shutil.ignore_patterns(*excludes))
    with (source / "myproject" / "settings.py").open("a") as settings:
        settings.write(f"\n# Release drill {uuid.uuid4().hex}: a new source digest, a new release.\n")
    current = {
        "web": scenario_setting("django_app", "django_app__current"),
        "workers": scenario_setting("celery_worker", "celery_worker__current"),
    }
    hosts = {"web": [front], "workers": [backend, front]}
    before = {tier: [host.check_output("readlink -f %s", current[tier]) for host in hosts[tier]] for tier in hosts}

    load = SignupLoad(BACKEND, site, "release", rate=SIGNUP_RATE)
    since = time.time() - 1
    started = time.monotonic()
    returncode, output, _, _ = ansible_playbook(
        PROJECT / "site.yml",
        "--tags",
        "workers,app",
        "-e",
        f"django_app_source_dir={source}",
        # What the converge reads first (molecule/shared/e2e/converge.yml).
        "-e",
        f"e2e_probe_address={probe_address}",
    )
    seconds = time.monotonic() - started
    signups = load.result()
    assert returncode == 0, output[-4000:]

    after = {tier: [host.check_output("readlink -f %s", current[tier]) for host in hosts[tier]] for tier in hosts}
    releases = set(after["web"] + after["workers"])
    windows, overlapping = overlapping_worker_restarts(backend, front, since)
    lost, twice, resent, emails = mail_tally(signups, settle_mail(backend, signups, DELIVERY_SECONDS))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "rollout_seconds": round(seconds),
                "signups_accepted": len(signups["accepted"]),
                "refused": len(signups["refused"]),
                "emails": emails,
                "lost": len(lost),
                "twice": len(twice) + resent,
                "worker_restarts_overlapping_across_hosts": len(overlapping),
            },
            indent=2,
        )
        + "\n"
    )
    assert len(releases) == 1 and not releases & set(before["web"] + before["workers"]), (before, after)
    assert not signups["refused"], f"the web tier refused signups during the release: {signups['refused'][:5]}"
    assert all(windows.values()) and not overlapping, f"worker restarts (stopping, started) per host: {windows}"
    assert not lost and not twice and not resent, f"emails lost {lost[:3]}, twice {twice[:3]}, resent {resent}"
