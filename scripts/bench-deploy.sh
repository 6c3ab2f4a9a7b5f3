#!/usr/bin/env bash
# How long site.yml takes on the five sandbox hosts, every figure from this one run:
#   1. new hosts: the sandbox hosts removed and created again from the base image, then
#      site.yml (images built, package cache and wheelhouse warm);
#   2. warm re-runs (changed=0) with the kit's ansible.cfg (Mitogen), the same file without
#      Mitogen (ANSIBLE_STRATEGY=linear), and an empty ansible.cfg.
# Writes bench/deploy.md. Not a test: nothing fails on speed. The sandbox's data (users,
# mails, queued tasks) goes with its hosts; its generated secrets stay.
set -euo pipefail
cd "$(dirname "$0")/.."
empty_cfg=$(mktemp --suffix=.cfg)
run_log=$(mktemp)
trap 'rm -f "$empty_cfg" "$run_log"' EXIT

timed() {  # timed LABEL [ENV=VALUE ...]: one site.yml run; prints "LABEL|seconds|changed"
  local label=$1 start end
  shift
  start=$(date +%s.%N)
  env "$@" ansible-playbook -i inventories/sandbox site.yml >"$run_log" ||
    { tail -n 40 "$run_log" >&2; echo "bench-deploy: site.yml failed ($label)" >&2; exit 1; }
  end=$(date +%s.%N)
  sed -n '/PLAY RECAP/,$p' "$run_log" | grep -o 'changed=[0-9]*' |
    awk -F= -v l="$label" -v s="$start" -v e="$end" '{ c += $2 } END { printf "%s|%.1f|%d\n", l, e - s, c }'
}

# A cold deploy leaves the hosts busy for a while (RabbitMQ, PostgreSQL and the workers
# starting up). Re-runs happen on settled hosts, so wait until the CPUs are 85 % idle over
# 5 s (at most 3 minutes), and report how long that took.
settle() {  # settle: prints the seconds waited
  local waited=0 a b
  while ((waited < 180)); do
    read -ra a < <(grep '^cpu ' /proc/stat)
    sleep 5
    read -ra b < <(grep '^cpu ' /proc/stat)
    waited=$((waited + 5))
    awk -v i1="${a[4]}" -v i2="${b[4]}" -v t1="$(IFS=+; echo $((${a[*]:1})))" -v t2="$(IFS=+; echo $((${b[*]:1})))" \
      'BEGIN { exit !((i2 - i1) / (t2 - t1) >= 0.85) }' && break
  done
  echo "$waited"
}

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
others=$(docker ps --format '{{.Names}}' | grep -cv -e '^cbk-apt-cache$' -e '^cbk-broker$' -e '^cbk-db$' -e '^cbk-web$' -e '^cbk-worker[12]$' || true)
ansible-playbook playbooks/sandbox/destroy.yml >/dev/null
ansible-playbook playbooks/sandbox/hosts.yml >/dev/null
rows=("$(timed 'new hosts: site.yml on freshly created hosts, kit ansible.cfg')")
settled=$(settle)
rows+=("$(timed 'warm re-run, kit ansible.cfg (Mitogen)')")
rows+=("$(timed 'warm re-run, kit ansible.cfg without Mitogen' ANSIBLE_STRATEGY=linear)")
rows+=("$(timed 'warm re-run, empty ansible.cfg' ANSIBLE_CONFIG="$empty_cfg" ANSIBLE_COLLECTIONS_PATH=collections)")
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

seconds() { printf '%s\n' "${rows[@]}" | awk -F'|' -v l="$1" 'index($1, l) == 1 { print $2 }'; }
kit=$(seconds 'warm re-run, kit ansible.cfg (Mitogen)')
ratio() { awk -v a="$1" -v b="$kit" 'BEGIN { printf "%.2f", a / b }'; }
{
  echo "# site.yml on the five sandbox hosts ($(date -u '+%F %H:%M') UTC, $(nproc) cores)"
  echo
  echo "One run of \`make bench-deploy\`, in this order. Load average before: $load_before; after: $load_after;"
  echo "other containers running beside the sandbox: $others (0 = a quiet machine). The warm re-runs"
  echo "started once the hosts had settled after the new-host deploy (CPUs 85 % idle over 5 s): ${settled} s."
  echo
  echo "| run | seconds | changed |"
  echo "|---|---|---|"
  printf '%s\n' "${rows[@]}" | awk -F'|' '{ printf "| %s | %s | %s |\n", $1, $2, $3 }'
  echo
  echo "Warm re-run, kit against an empty ansible.cfg: **$(ratio "$(seconds 'warm re-run, empty')")x**;"
  echo "against the kit's file without Mitogen: **$(ratio "$(seconds 'warm re-run, kit ansible.cfg without')")x**."
} >bench/deploy.md
cat bench/deploy.md
