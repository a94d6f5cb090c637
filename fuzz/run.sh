#!/usr/bin/env bash
# Runs each fuzz target in turn for FUZZ_SECONDS (one libFuzzer process, one core), then
# prints one summary line per target. Exits non-zero if any target crashed.
#
#   fuzz/run.sh [TARGET...]     (default: every target; `make fuzz` runs python3 fuzz/seed.py first)
#
# Environment: FUZZ_SECONDS (default 60), FUZZ_SANITIZER (default none: the fuzzed crate has
# no unsafe code; panics, overflow checks and debug assertions are what is caught),
# FUZZ_TIMEOUT (seconds for one input, default 60), FUZZ_RSS_MB (default 2048).
set -uo pipefail

FUZZ_DIR=$(cd "$(dirname "$0")" && pwd)
SECONDS_PER_TARGET=${FUZZ_SECONDS:-60}
SANITIZER=${FUZZ_SANITIZER:-none}
TIMEOUT=${FUZZ_TIMEOUT:-60}
RSS_MB=${FUZZ_RSS_MB:-2048}
ALL_TARGETS=(config request_body usage_openai_json usage_openai_sse usage_anthropic_json usage_anthropic_sse)
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")

# Built once up front, so build time does not count against FUZZ_SECONDS.
cargo +nightly fuzz build --fuzz-dir "$FUZZ_DIR" -s "$SANITIZER" || exit 1

max_len() {
  case $1 in
    usage_*) echo 262144 ;;  # 256 KiB: several times MAX_HELD_EVENT_BYTES
    *) echo 65536 ;;         # 64 KiB request bodies and configurations
  esac
}

dict() {
  case $1 in
    usage_*) echo usage ;;
    *) echo "$1" ;;
  esac
}

count_files() { find "$1" -maxdepth 1 -type f 2>/dev/null | wc -l; }

summaries=()
failed=0
for t in "${TARGETS[@]}"; do
  corpus="$FUZZ_DIR/corpus/$t"
  artifacts="$FUZZ_DIR/artifacts/$t"
  logdir="$FUZZ_DIR/logs/$t"
  mkdir -p "$corpus" "$artifacts" "$logdir"
  cat "$FUZZ_DIR/dicts/json.dict" "$FUZZ_DIR/dicts/$(dict "$t").dict" > "$logdir/$t.dict"
  inputs=("$corpus")
  for extra in "$FUZZ_DIR/seeds/$t" "$FUZZ_DIR/regressions/$t"; do
    [ -d "$extra" ] && inputs+=("$extra")
  done
  crashes_before=$(count_files "$artifacts")
  rm -f "$logdir/fuzz-0.log"
  echo "fuzz: $t for ${SECONDS_PER_TARGET}s (log: ${logdir#"$FUZZ_DIR"/}/fuzz-0.log)"
  # -jobs=1 -workers=1: one fuzzing process, its output in fuzz-0.log of the current
  # directory; the seeds and regression inputs are read, new inputs go to corpus/.
  (cd "$logdir" && cargo +nightly fuzz run --fuzz-dir "$FUZZ_DIR" -s "$SANITIZER" "$t" "${inputs[@]}" -- \
      -max_total_time="$SECONDS_PER_TARGET" -timeout="$TIMEOUT" -rss_limit_mb="$RSS_MB" \
      -max_len="$(max_len "$t")" -dict="$logdir/$t.dict" -jobs=1 -workers=1 -print_final_stats=1 \
      >"$logdir/cargo-fuzz.out" 2>&1)
  status=$?
  log="$logdir/fuzz-0.log"
  [ -f "$log" ] || log="$logdir/cargo-fuzz.out"
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1)
  last_line=$(grep -E '^#[0-9]+[[:space:]]+(pulse|NEW|REDUCE|DONE|INITED)' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last_line")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last_line")
  corp=$(sed -n 's/.* corp: \([^ ]*\).*/\1/p' <<<"$last_line")
  new_crashes=$(( $(count_files "$artifacts") - crashes_before ))
  verdict=ok
  if [ "$status" -ne 0 ] || [ "$new_crashes" -gt 0 ] || [ -z "$done_line" ]; then
    verdict="FAILED (exit $status; see $log and $artifacts/)"
    failed=1
  fi
  line="fuzz: $t: ${SECONDS_PER_TARGET}s, ${execs:-?} execs, ${rate:-?} exec/s, cov ${cov:-?}, ft ${ft:-?}, corp ${corp:-?} ($(count_files "$corpus") files in corpus/$t), new crashes: $new_crashes: $verdict"
  echo "$line"
  [ -n "$done_line" ] && echo "  $done_line"
  summaries+=("$line")
done

echo
echo "fuzz summary:"
printf '  %s\n' "${summaries[@]}"
exit "$failed"
