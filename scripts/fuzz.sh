#!/usr/bin/env bash
# Runs every cargo-fuzz target for a fixed time and prints, per target, the executions, the
# corpus size and the crashes found.
#
#   scripts/fuzz.sh            # 60 s per target
#   scripts/fuzz.sh 600        # 10 min per target
#   TARGETS="config" scripts/fuzz.sh 30
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). One job per target, at
# low priority. Built without a sanitizer (the targets exercise safe Rust; this doubles the
# executions per second) but with debug assertions. The corpus grows in fuzz/corpus/TARGET
# (seeded from fuzz/seeds/TARGET when present); crashes land in fuzz/artifacts/TARGET, and
# `cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-…` replays one.
set -euo pipefail

secs="${1:-60}"
cd "$(dirname "$0")/.."
targets="${TARGETS:-legacy_path key_template config auth_verify}"
flags=(--sanitizer none --debug-assertions)

nice -n 15 cargo +nightly fuzz build "${flags[@]}" >&2

printf '%-14s %12s %10s %8s %8s\n' target executions exec/s corpus crashes
status=0
for t in $targets; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
    log="fuzz/artifacts/$t/last-run.log"
    before=$(find "fuzz/artifacts/$t" -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' | wc -l)
    set +e
    nice -n 15 cargo +nightly fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$secs" -jobs=1 -workers=1 -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    # With -jobs, libFuzzer writes the worker's own output to fuzz-0.log in the current directory.
    if [ -f fuzz-0.log ]; then
        cat fuzz-0.log >>"$log"
        rm -f fuzz-0.log
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
    after=$(find "fuzz/artifacts/$t" -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' | wc -l)
    crashes=$((after - before))
    printf '%-14s %12s %10s %8s %8s\n' "$t" "${execs:-?}" "${rate:-?}" "$corpus" "$crashes"
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        status=1
        echo "  $t: exit $rc; see $log" >&2
        grep -m3 -E 'panicked|ERROR|SUMMARY' "$log" | sed 's/^/  /' >&2 || true
    fi
done
exit "$status"
