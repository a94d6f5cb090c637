#!/usr/bin/env bash
# Starts the mock providers and Envoy with the Sluice filter, in the foreground.
# Ctrl-C (or TERM) stops both. Run through `make demo`, which builds and installs first.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${ENVOY:=.venv/bin/envoy}" "${MOCK:=target/release/sluice-mock}"

mkdir -p .run   # the access log (usage records) goes to .run/access.log
pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo stopped"
}
trap cleanup INT TERM EXIT

"$MOCK" \
  --provider openai,openai,127.0.0.1:18001,/v1,OPENAI_API_KEY \
  --provider openai-b,openai,127.0.0.1:18005,/v1,OPENAI_API_KEY_B \
  --provider anthropic,anthropic,127.0.0.1:18002,/v1,ANTHROPIC_API_KEY \
  --provider deepseek,openai,127.0.0.1:18003,,DEEPSEEK_API_KEY \
  --provider gemini,openai,127.0.0.1:18004,/v1beta/openai,GEMINI_API_KEY &
pids+=($!)

# Usage records reach .run/access.log within a second (Envoy batches file writes).
"$ENVOY" -c envoy/demo.yaml --concurrency 2 --disable-hot-restart --log-level info \
  --file-flush-interval-msec 1000 &
pids+=($!)

for _ in $(seq 1 100); do
  if curl -sf http://127.0.0.1:9901/ready >/dev/null 2>&1; then
    cat <<'MSG'

Sluice demo is up: gateway http://127.0.0.1:10000  (Envoy admin http://127.0.0.1:9901)
Try:
  curl -s http://127.0.0.1:10000/v1/chat/completions \
    -H 'Authorization: Bearer sk-sluice-demo-acme' -H 'Content-Type: application/json' \
    -d '{"model":"gpt-4.1-mini","messages":[{"role":"user","content":"Hello"}]}'
Usage records: .run/access.log   Metrics: curl -s http://127.0.0.1:9901/stats/prometheus | grep sluice_
Press Ctrl-C to stop.
MSG
    break
  fi
  sleep 0.1
done

# Exit (and clean up) as soon as either process dies.
wait -n "${pids[@]}"
