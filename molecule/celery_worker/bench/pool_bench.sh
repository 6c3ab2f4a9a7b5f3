#!/bin/sh
# Measures how fast one email worker drains N welcome emails per pool and concurrency,
# against an SMTP server that answers each command after DELAY seconds (a remote relay),
# with PostgreSQL as the database (SQLite would serialise the senders on its write lock).
# Runs inside a converged celery_worker instance, as root:
#   docker cp molecule/celery_worker/bench cbk-celery_worker-debian12:/root/bench
#   docker exec cbk-celery_worker-debian12 sh /root/bench/pool_bench.sh 200 0.1 "prefork:2 threads:16" ENV_FILE
# where ENV_FILE is the instance's django_app_env_file (the app's settings, copied for the bench).
# Prints one line per configuration: pool, concurrency, wall seconds (enqueue to last mail),
# drain seconds (first to last mail sent), mails/s while draining, worker RSS (MB, all
# processes) and worker CPU milliseconds per mail (main process and pool children).
# Bounded: each run stops after 300 s. The regular workers are stopped meanwhile.
set -eu
N=${1:-200}
DELAY=${2:-0.1}
CONFIGS=${3:-"prefork:2 prefork:4 prefork:8 threads:8 threads:16 threads:32"}
ENV_FILE=${4:?"the instance's django_app_env_file, as the 4th argument"}
BENCH_ENV="$(dirname "$ENV_FILE")/bench.env"
HERE=$(dirname "$(readlink -f "$0")")
PSQL="runuser -u postgres -- psql -qtAX -d bench"

if ! command -v pg_ctlcluster >/dev/null; then
    apt-get install -qq -y postgresql >/dev/null
fi
systemctl start postgresql
runuser -u postgres -- psql -qtAX -c "SELECT 1 FROM pg_roles WHERE rolname='sample_app'" | grep -q 1 \
    || runuser -u postgres -- psql -q -c "CREATE ROLE sample_app LOGIN PASSWORD 'bench-only'"
runuser -u postgres -- psql -qtAX -c "SELECT 1 FROM pg_database WHERE datname='bench'" | grep -q 1 \
    || runuser -u postgres -- psql -q -c "CREATE DATABASE bench OWNER sample_app"

# The app's settings with the bench database and SMTP server.
sed -e 's|^DATABASE_URL=.*|DATABASE_URL="postgres://sample_app:bench-only@127.0.0.1:5432/bench"|' \
    -e 's|^EMAIL_PORT=.*|EMAIL_PORT="2525"|' "$ENV_FILE" > "$BENCH_ENV"
chown --reference="$ENV_FILE" "$BENCH_ENV"
chmod --reference="$ENV_FILE" "$BENCH_ENV"
release=$(readlink -f /srv/sample_app/current)
as_app() {
    (set -a; . "$BENCH_ENV"; set +a; cd "$release"
     exec setpriv --reuid=sample_app --regid=sample_app --init-groups "$@")
}
as_app "$release/venv/bin/python" -m django migrate --noinput >/dev/null

systemctl stop celery-workers.target
systemd-run --quiet --unit=bench-smtp --collect python3 "$HERE/slow_smtp.py" 2525 "$DELAY"
trap 'systemctl stop bench-smtp bench-worker 2>/dev/null || true; systemctl start celery-workers.target' EXIT

# The bench worker's main process and its pool children; their CPU time in clock ticks.
worker_pids() {
    main=$(systemctl show -p MainPID --value bench-worker)
    echo "$main${main:+,}$(pgrep -d, -P "$main" || true)" | sed 's/,$//'
}
cpu_ticks() {
    for pid in $(worker_pids | tr , ' '); do cut -d' ' -f14,15 "/proc/$pid/stat"; done \
        | awk '{s += $1 + $2} END {print s + 0}'
}

printf '%-8s %4s %8s %8s %8s %8s %10s\n' pool conc wall_s drain_s mails/s rss_mb cpu_ms/mail
for config in $CONFIGS; do
    pool=${config%%:*} concurrency=${config##*:}
    $PSQL -c "TRUNCATE users_welcomeemail"
    as_app "$release/venv/bin/celery" --app=myproject purge -f -Q email >/dev/null
    systemd-run --quiet --unit=bench-worker --collect --uid=sample_app --gid=sample_app \
        --working-directory="$release" --property=EnvironmentFile="$BENCH_ENV" \
        -- "$release/venv/bin/celery" --app=myproject worker --hostname="bench@%h" --queues=email \
        --pool="$pool" --concurrency="$concurrency" --loglevel=WARNING
    tries=0
    until as_app "$release/venv/bin/celery" --app=myproject inspect ping --timeout=2 >/dev/null 2>&1; do
        tries=$((tries + 1)); [ $tries -lt 60 ] || { echo "bench worker did not start" >&2; exit 1; }
        sleep 1
    done
    cpu_before=$(cpu_ticks)
    start=$(date +%s.%N)
    as_app "$release/venv/bin/python" -m django shell -c "
from users.tasks import send_welcome_email
for i in range($N):
    send_welcome_email.delay(f'bench-{i}@example.com')" >/dev/null
    timeout 300 sh -c "until [ \"\$($PSQL -c 'SELECT count(*) FROM users_welcomeemail WHERE sent_at IS NOT NULL')\" -ge $N ]; do sleep 0.2; done"
    end=$(date +%s.%N)
    # Drain time from the first to the last mail sent, without start-up and enqueueing.
    span=$($PSQL -c "SELECT extract(epoch FROM max(sent_at) - min(sent_at)) FROM users_welcomeemail")
    pids=$(worker_pids)
    rss=$(ps -o rss= -p "$pids" | awk '{s+=$1} END {printf "%.0f", s/1024}')
    cpu_ms=$(( ($(cpu_ticks) - cpu_before) * 1000 / $(getconf CLK_TCK) / N ))
    systemctl stop bench-worker
    awk -v p="$pool" -v c="$concurrency" -v s="$start" -v e="$end" -v d="$span" -v n="$N" -v r="$rss" -v m="$cpu_ms" \
        'BEGIN {printf "%-8s %4d %8.1f %8.1f %8.1f %8s %10s\n", p, c, e-s, d, (n-1)/d, r, m}'
done
