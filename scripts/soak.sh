#!/bin/sh
# Kill-loop soak (not CI): tests/crash.rs with hundreds of SIGKILLs on the release binary.
#
#   scripts/soak.sh                 # 200 kills, 6 files kept waiting
#   KILLS=500 BATCH=10 scripts/soak.sh
#   CRASH_SEED=123 scripts/soak.sh  # repeat a run
#
# Each kill lands at a random moment (or at a failpoint in the windows that matter: after a
# part, after CompleteMultipartUpload, after the `uploaded` commit, after the unlink), the
# daemon is restarted on the same journal, and at the end one run finishes the batch. It
# prints lost / corrupted / deleted-unverified files, open multipart uploads, bytes re-sent
# per kill, and the daemon's resident memory (VmRSS from /proc/PID/status) at every kill and
# through the last run; then asserts that the first four are zero and the re-sent bytes stay
# under the parts in flight. Everything runs on 127.0.0.1.
set -eu
cd "$(dirname "$0")/.."
KILLS=${KILLS:-200}
BATCH=${BATCH:-6}
log=$(mktemp /tmp/record-offload-soak.XXXXXX)
echo "soak: $KILLS kills, $BATCH files kept waiting; full output in $log"
status=0
CRASH_KILLS=$KILLS CRASH_BATCH=$BATCH nice -n 15 \
    cargo test --release --locked --test crash -- --nocapture >"$log" 2>&1 || status=$?
grep -E '^crash test' "$log" || true
grep -E '^test result|panicked' "$log" || true
if [ "$status" -ne 0 ]; then
    echo "soak: FAILED (exit $status); see $log"
    exit "$status"
fi
echo "soak: ok"
