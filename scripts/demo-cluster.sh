#!/usr/bin/env bash
# Two Sluice gateways sharing global limits, in the foreground: Redis, the quota service, the
# mock providers and two Envoys. Ctrl-C (or TERM) stops all of them. Run through
# `make demo-cluster`, which builds and installs first.
#
#   Redis            127.0.0.1:6380   config and data in .run/redis (AOF, fsync every second:
#                                     counters and monthly budgets survive restarts;
#                                     `rm -rf .run/redis` starts from zero)
#   quota service    127.0.0.1:18090  (sluice-quota, stateless)
#   mock providers   127.0.0.1:18001-18005
#   gateway A        127.0.0.1:10000  admin 9901  usage records .run/access-10000.log
#   gateway B        127.0.0.1:10001  admin 9902  usage records .run/access-10001.log
#
# Each gateway's config is generated from envoy/demo.yaml by scripts/cluster_config.py (the
# tenants, models and limits of `make demo`, plus the `global` section and the sluice_quota
# cluster) into .run/envoy-<port>.yaml. Process logs go to .run/*.log.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${ENVOY:=.venv/bin/envoy}" "${MOCK:=target/release/sluice-mock}"
: "${QUOTA:=target/release/sluice-quota}" "${PYTHON:=python3}"
REDIS_SERVER=${SLUICE_REDIS_SERVER:-$(command -v redis-server || true)}

REDIS_PORT=6380 QUOTA_PORT=18090
GATEWAYS=(10000:9901 10001:9902)   # listener:admin

for bin in "$ENVOY" "$MOCK" "$QUOTA"; do
  [[ -x "$bin" ]] || { echo "demo-cluster: $bin not found; run \`make demo-cluster\`" >&2; exit 1; }
done
[[ -n "$REDIS_SERVER" && -x "$REDIS_SERVER" ]] || {
  echo "demo-cluster: no redis-server (PATH or SLUICE_REDIS_SERVER); run \`make redis\`" >&2; exit 1; }

# Refuse to start over something already listening (e.g. `make demo` in another terminal).
busy=()
for port in "$REDIS_PORT" "$QUOTA_PORT" 18001 18002 18003 18004 18005 "${GATEWAYS[@]%%:*}" "${GATEWAYS[@]##*:}"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then busy+=("$port"); fi
done
if (( ${#busy[@]} )); then
  echo "demo-cluster: port(s) ${busy[*]} on 127.0.0.1 already in use (another demo running?)" >&2
  exit 1
fi

mkdir -p .run/redis
run=$PWD/.run

# Our own Redis: never the system one, never its default port.
cat > .run/redis/redis.conf <<CONF
# written by scripts/demo-cluster.sh on every start
bind 127.0.0.1
port $REDIS_PORT
protected-mode yes
daemonize no
dir $run/redis
# Durability: the append-only file, fsynced every second (a crash loses at most about a
# second of counts), plus the default RDB snapshots.
appendonly yes
appendfsync everysec
logfile ""
CONF

for gw in "${GATEWAYS[@]}"; do
  listener=${gw%%:*} admin=${gw##*:}
  "$PYTHON" scripts/cluster_config.py --listener-port "$listener" --admin-port "$admin" \
    --access-log ".run/access-$listener.log" --quota-port "$QUOTA_PORT" --on-engine-failure deny \
    --out ".run/envoy-$listener.yaml"
done

pids=() names=()
cleanup() {   # cleanup [STATUS]: stops every process started here, then exits
  local status=${1:-$?}
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo-cluster stopped"
  exit "$status"
}
trap 'cleanup 0' INT TERM
trap cleanup EXIT

# start NAME COMMAND...: runs COMMAND in the background, its output in .run/NAME.log.
start() {
  local name=$1; shift
  "$@" >".run/$name.log" 2>&1 &
  pids+=($!) names+=("$name")
}

# wait_until NAME CHECK...: polls CHECK for up to 10 s; if NAME's process exits or time runs
# out, shows the end of NAME's log and exits.
wait_until() {
  local what=$1 pid="" i; shift
  for i in "${!names[@]}"; do [[ "${names[$i]}" == "$what" ]] && pid=${pids[$i]}; done
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "demo-cluster: $what did not come up; the end of .run/$what.log:" >&2
  tail -n 20 ".run/$what.log" >&2 || true
  exit 1
}

redis_pong() (   # a subshell: the connection closes with it
  exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" || exit 1
  printf 'PING\r\n' >&3
  line=""
  read -r -t 1 line <&3 || true
  [[ "$line" == +PONG* ]]
)

start redis "$REDIS_SERVER" .run/redis/redis.conf
wait_until redis redis_pong

start quota "$QUOTA" --listen "127.0.0.1:$QUOTA_PORT" --redis "redis://127.0.0.1:$REDIS_PORT/"
wait_until quota curl -sf "http://127.0.0.1:$QUOTA_PORT/healthz"

start mock "$MOCK" \
  --provider openai,openai,127.0.0.1:18001,/v1,OPENAI_API_KEY \
  --provider openai-b,openai,127.0.0.1:18005,/v1,OPENAI_API_KEY_B \
  --provider anthropic,anthropic,127.0.0.1:18002,/v1,ANTHROPIC_API_KEY \
  --provider deepseek,openai,127.0.0.1:18003,,DEEPSEEK_API_KEY \
  --provider gemini,openai,127.0.0.1:18004,/v1beta/openai,GEMINI_API_KEY

# Usage records reach .run/access-<port>.log within a second (Envoy batches file writes).
# --disable-hot-restart: no shared-memory region, so two Envoys need no distinct --base-id.
for gw in "${GATEWAYS[@]}"; do
  listener=${gw%%:*}
  start "envoy-$listener" "$ENVOY" -c ".run/envoy-$listener.yaml" --concurrency 2 \
    --disable-hot-restart --log-level info --file-flush-interval-msec 1000
done
for gw in "${GATEWAYS[@]}"; do
  wait_until "envoy-${gw%%:*}" curl -sf "http://127.0.0.1:${gw##*:}/ready"
done

cat <<'MSG'

Sluice cluster demo is up: two gateways sharing their limits through the quota service.
  gateway A http://127.0.0.1:10000 (admin :9901)   gateway B http://127.0.0.1:10001 (admin :9902)
  quota service http://127.0.0.1:18090   Redis 127.0.0.1:6380 (data in .run/redis)
Try: the bronze tenant (initech) may send 10 requests/min in all, whichever gateway they reach:
  for i in $(seq 12); do for port in 10000 10001; do
    curl -s -o /dev/null -w "$port:%{http_code} " http://127.0.0.1:$port/v1/chat/completions \
      -H 'Authorization: Bearer sk-sluice-demo-initech' \
      -d '{"model":"gpt-4.1-mini","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}'
  done; done; echo
  # 10 x 200 in all, then 429 on both ports (the counters survive a restart of this demo:
  # rm -rf .run/redis to start from zero)
Usage records: .run/access-10000.log .run/access-10001.log   Logs: .run/{redis,quota,mock,envoy-*}.log
Press Ctrl-C to stop.
MSG

# Exit (and clean up) as soon as any process dies, saying which.
set +e
wait -n "${pids[@]}"
for i in "${!pids[@]}"; do
  if ! kill -0 "${pids[$i]}" 2>/dev/null; then
    echo "demo-cluster: ${names[$i]} exited; the end of .run/${names[$i]}.log:" >&2
    tail -n 20 ".run/${names[$i]}.log" >&2
  fi
done
exit 1
