#!/usr/bin/env bash
# Runs the checks behind `make test` (or only the Molecule scenarios) and prints
# one summary line per step: name, result, seconds. Logs go to artifacts/test-logs/;
# a failing step's log tail is printed. Exits non-zero if any step failed.
#   run-tests.sh all | run-tests.sh molecule [scenario ...] | run-tests.sh ha
# Mode all runs every scenario, the HA ones (three broker nodes each) included; mode ha
# (make test-ha) only those two.
# Scenarios run CBK_TEST_JOBS at a time (default 3): with Mitogen they wait on packages and
# services more than on CPU, and each has its own containers and network. The longest start
# first (LONGEST_FIRST, measured), so none runs alone at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=artifacts/test-logs
JOBS=${CBK_TEST_JOBS:-3}
HA_SCENARIOS=(rabbitmq-cluster redis-sentinel)
LONGEST_FIRST=(e2e-rabbitmq switch rabbitmq-cluster redis-sentinel postgresql celery_worker redis django_app rabbitmq collection base mail_sink)
mode=${1:-all}
shift || true
scenarios=("$@")
# Results of the last run only: logs, and what the scenarios measured (make test-ha keeps the others').
if [ "$mode" = ha ]; then
  LOGS=artifacts/test-logs-ha
  rm -rf "$LOGS" artifacts/ha && mkdir -p "$LOGS"
  for scenario in "${HA_SCENARIOS[@]}"; do [ -f "molecule/$scenario/molecule.yml" ] && scenarios+=("$scenario"); done
else
  rm -rf "$LOGS" artifacts/faults artifacts/features artifacts/security artifacts/browser artifacts/switch artifacts/ha \
    artifacts/monitoring artifacts/release && mkdir -p "$LOGS"
fi

step() {  # step NAME COMMAND...: runs it, logs it, writes its summary line
  local name=$1 start=$SECONDS result=pass
  shift
  "$@" >"$LOGS/$name.log" 2>&1 || result=FAIL
  printf '%-24s %-4s %6ss\n' "$name" "$result" $((SECONDS - start)) >"$LOGS/$name.result"
  echo "== $name: $result"
}

if [ ${#scenarios[@]} -eq 0 ]; then
  # Every scenario, the measured longest first, then any other in name order.
  mapfile -t all < <(find molecule -mindepth 2 -maxdepth 2 -name molecule.yml -printf '%h\n' | xargs -n1 basename | sort)
  for scenario in "${LONGEST_FIRST[@]}"; do [[ " ${all[*]} " == *" $scenario "* ]] && scenarios+=("$scenario"); done
  for scenario in "${all[@]}"; do [[ " ${LONGEST_FIRST[*]} " == *" $scenario "* ]] || scenarios+=("$scenario"); done
fi

total_start=$SECONDS
for scenario in "${scenarios[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  step "molecule-$scenario" molecule test -s "$scenario" --no-command-borders &
done
# The linters and the app's tests run beside the last scenarios rather than before the first.
if [ "$mode" = all ]; then
  step yamllint yamllint --strict .
  step ansible-lint ansible-lint --profile production
  step role-docs python scripts/role_docs.py --check
  step changelog antsibull-changelog lint
  step alert-rules make --no-print-directory alert-rules
  step ci-templates make --no-print-directory ci-templates
  step sample_app bash -c 'cd sample_app && .venv/bin/pytest -q'
  step ruff bash -c 'cd sample_app && .venv/bin/ruff check . && .venv/bin/ruff format --check .'
fi
wait
# The measured broker matrix, from what both full-stack scenarios just measured.
if [ -f artifacts/faults/e2e-redis.json ] && [ -f artifacts/faults/e2e-rabbitmq.json ]; then
  step broker-matrix python3 scripts/broker_matrix.py
fi

failed=0
for result in "$LOGS"/*.result; do
  grep -q ' FAIL ' "$result" || continue
  failed=1
  log=${result%.result}.log
  printf '\n---- last lines of %s\n' "$log"
  tail -n 60 "$log"
done
printf '\n%-24s %-4s %7s\n' step result time
cat "$LOGS"/*.result
printf '%-24s %-4s %6ss\n' total "$([ $failed = 0 ] && echo pass || echo FAIL)" $((SECONDS - total_start))
# Last, where a CI summary that keeps only the end of the output still shows it: why tests failed.
for result in "$LOGS"/*.result; do
  grep -q ' FAIL ' "$result" || continue
  sed 's/\x1b\[[0-9;]*m//g' "${result%.result}.log" | grep -E '^(FAILED|ERROR) |^E +[A-Za-z.]*(Error|Exception)\b' | cut -c1-1200 | tail -n 8
done
exit $failed
