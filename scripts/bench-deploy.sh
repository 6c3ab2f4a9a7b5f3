#!/usr/bin/env bash
# Warm re-run of site.yml on the deployed sandbox, with the kit's ansible.cfg and
# with an empty one, in one run; writes bench/deploy.md. Not a test: nothing fails
# on speed, the figures go into the README.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench
empty_cfg=$(mktemp --suffix=.cfg)
run_log=$(mktemp)
trap 'rm -f "$empty_cfg" "$run_log"' EXIT

timed_run() {  # prints seconds and the changed= total of one site.yml run
  local start end
  start=$(date +%s.%N)
  ansible-playbook -i inventories/sandbox site.yml >"$run_log"
  end=$(date +%s.%N)
  sed -n '/PLAY RECAP/,$p' "$run_log" | grep -o 'changed=[0-9]*' |
    awk -F= -v s="$start" -v e="$end" '{ c += $2 } END { printf "%.1f %d\n", e - s, c }'
}

ansible-playbook site.yml >/dev/null  # make sure the stack is converged and facts are cached
read -r tuned tuned_changed < <(timed_run)
read -r plain plain_changed < <(ANSIBLE_CONFIG=$empty_cfg ANSIBLE_ROLES_PATH=roles timed_run)
ratio=$(awk -v p="$plain" -v t="$tuned" 'BEGIN { printf "%.2f", p / t }')
cat >bench/deploy.md <<EOT
# Warm re-run of site.yml on the sandbox ($(date -u +%F), $(nproc) cores)

| ansible.cfg | seconds | changed |
|---|---|---|
| kit (pipelining, fact cache, forks=20) | $tuned | $tuned_changed |
| empty | $plain | $plain_changed |

Speed-up of the kit's ansible.cfg: **${ratio}x**
EOT
cat bench/deploy.md
