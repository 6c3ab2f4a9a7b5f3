#!/usr/bin/env bash
# Runs the checks behind `make test` (or only the Molecule scenarios) and prints
# one summary line per step: name, result, seconds. Logs go to artifacts/test-logs/;
# a failing step's log tail is printed. Exits non-zero if any step failed.
#   run-tests.sh all | run-tests.sh molecule [scenario ...]
set -uo pipefail
cd "$(dirname "$0")/.."
LOGS=artifacts/test-logs
mkdir -p "$LOGS"
summary=() failed=0

step() {
  local name=$1 start=$SECONDS result=pass
  shift
  echo "== $name"
  "$@" >"$LOGS/$name.log" 2>&1 || { result=FAIL; failed=1; tail -n 60 "$LOGS/$name.log"; }
  summary+=("$(printf '%-22s %-4s %6ss' "$name" "$result" $((SECONDS - start)))")
}

mode=${1:-all}
shift || true
scenarios=("$@")
[ ${#scenarios[@]} -gt 0 ] || mapfile -t scenarios < <(find molecule -mindepth 2 -maxdepth 2 -name molecule.yml -printf '%h\n' | xargs -n1 basename | sort)

total_start=$SECONDS
if [ "$mode" = all ]; then
  step yamllint yamllint --strict .
  step ansible-lint ansible-lint --profile production
  step sample_app bash -c 'cd sample_app && .venv/bin/pytest -q'
fi
for scenario in "${scenarios[@]}"; do
  step "molecule:$scenario" molecule test -s "$scenario" --no-command-borders
done

printf '\n%-22s %-4s %7s\n' step result time
printf '%s\n' "${summary[@]}"
printf '%-22s %-4s %6ss\n' total "$([ $failed = 0 ] && echo pass || echo FAIL)" $((SECONDS - total_start))
exit $failed
