#!/usr/bin/env bash
# make bench: playbooks/bench.yml (Celery on both brokers side by side, then signups on the
# sandbox's broker), then the signups on each other broker: a broker switch to it and the
# signup bench (playbooks/bench_signups.yml), and at the end the switch back to the
# inventory's celery_broker. bench/report.py then turns bench/results.json into
# bench/results.md and bench/results.png. Not a test: nothing fails on speed.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${BENCH_PYTHON:?the python of the bench venv, with matplotlib (make bench sets it)}"
start=$(date +%s)
ansible-playbook playbooks/bench.yml

switched=""
# A failure after a switch leaves the sandbox on the other broker: say so, and how to go back.
left_switched() {
  [ -z "$switched" ] || echo "bench: the sandbox runs celery_broker=$switched;" \
    "back to the inventory's broker: ansible-playbook playbooks/switch_broker.yml" >&2
}
trap left_switched EXIT
# Read first: a failure inside the for's word list would not stop the script.
other_brokers=$(python3 -c 'import json; print(*json.load(open("bench/results.json"))["signup_brokers_left"])')
for broker in $other_brokers; do
  switched=$broker
  ansible-playbook playbooks/switch_broker.yml -e "celery_broker=$broker"
  ansible-playbook playbooks/bench_signups.yml -e "celery_broker=$broker"
done
if [ -n "$switched" ]; then
  ansible-playbook playbooks/switch_broker.yml
  switched=""
fi
"$BENCH_PYTHON" bench/report.py $(($(date +%s) - start))
