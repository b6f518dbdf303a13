#!/usr/bin/env bash
# The release .deb on a booted systemd: installs it with apt in a Debian 12 container whose
# PID 1 is systemd (systemd-nspawn, see packaging/host-test/container.sh), configures it the
# way the README tells an operator to, and checks what the unit promises:
#
#   - the maintainer scripts under a real systemd (user, directories, daemon-reload);
#   - `systemctl enable --now`: ExecStartPre's check-config, READY=1 before `active`, the
#     STATUS line in `systemctl status`;
#   - a single-part and a multipart recording written by a separate `recorder` user are
#     uploaded and deleted under the unit's sandbox, and `journalctl -u record-offload
#     F_PATH=…` tells their story;
#   - a file the recorder still holds open for writing is not taken (the unit's capabilities
#     let the daemon see another user's descriptors), and is taken once closed;
#   - the watchdog: the daemon frozen with SIGSTOP is killed (Result=watchdog), restarted,
#     and finishes the interrupted upload without sending it all again;
#   - `systemctl stop` during a multipart upload exits 0 within TimeoutStopSec, and the next
#     start resumes from the finished parts;
#   - an upgrade to a newer version restarts the running service and keeps the edited config;
#     `apt remove` keeps the journal, `apt purge` removes what the README says;
#   - `systemd-analyze security record-offload` on the booted system gives the README's figure.
#
# Every step prints PASS or FAIL with what it saw; the script exits non-zero on any FAIL.
#
#   packaging/host-test.sh [DEB]
#
# DEB defaults to target/debian/record-offload_*.deb (made by packaging/check.sh, which is run
# with --no-install when there is none). The S3-compatible server is the dev-feature build's
# `dev-s3` (target/debug/record-offload, as `cargo test` builds it), on the host's 127.0.0.1,
# behind packaging/host-test/countproxy.py, which counts the bytes sent to it. Needs root,
# debootstrap and systemd-container (installed when missing). The root file system is cached
# in /var/cache/record-offload-hosttest (CT_CACHE=DIR to change): the first run makes it
# (about 3 minutes), later runs reuse it. KEEP=1 keeps the run's directory.
set -euo pipefail
cd "$(dirname "$0")/.."
here=packaging/host-test
# shellcheck source=packaging/host-test/container.sh
. "$here/container.sh"

MIB=$((1024 * 1024))
PART_MIB=5
CONCURRENCY=2
# Slow enough that a multipart upload is still in flight when it is interrupted.
RATE=$((4 * MIB))
SETTLE=2
BIG_MIB=60
# The stop step's file: more than the drain (upload.drain_secs, 20 s by default) can finish at
# RATE, so the stop abandons parts in flight and the next start must resume.
STOP_MIB=160

PASSED=0
FAILED=0
pass() {
  PASSED=$((PASSED + 1))
  echo "PASS: $*"
}
failed() {
  FAILED=$((FAILED + 1))
  echo "FAIL: $*"
}
step() { printf '\n== %s\n' "$*"; }
trap 'echo "FAIL: unexpected error: line $LINENO: $BASH_COMMAND"; FAILED=$((FAILED + 1))' ERR

# Runs COND (a shell snippet) until it succeeds or SECS pass; returns its last status.
wait_until() {
  local cond=$2 deadline=$((SECONDS + $1))
  until eval "$cond"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

started=$SECONDS
finished=
RUN=
S3_PID=
PROXY_PID=
cleanup() {
  local rc=$?
  trap - ERR
  set +e
  if [ -z "$finished" ]; then
    echo "FAIL: the host test stopped early (exit status $rc)"
    [ "$rc" = 0 ] && rc=1
  fi
  ct_shutdown
  [ -n "$PROXY_PID" ] && kill "$PROXY_PID" 2>/dev/null && wait "$PROXY_PID" 2>/dev/null
  [ -n "$S3_PID" ] && kill "$S3_PID" 2>/dev/null && wait "$S3_PID" 2>/dev/null
  if [ -n "$RUN" ]; then
    if [ "${KEEP:-0}" = 1 ]; then echo "kept: $RUN"; else rm -rf "$RUN"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT

step "tools, packages, the test server"
ct_tools
deb=${1:-}
if [ -z "$deb" ]; then
  deb=$(ls target/debian/record-offload_*_amd64.deb 2>/dev/null | head -n1 || true)
  if [ -z "$deb" ]; then
    bash packaging/check.sh --no-install
    deb=$(ls target/debian/record-offload_*_amd64.deb | head -n1)
  fi
fi
[ -f "$deb" ] || ct_die "no package at $deb"
deb=$(realpath "$deb")
version=$(dpkg-deb -f "$deb" Version)
# The newer package: the same files, a higher version (as a rebuilt release would be).
RUN=$(mktemp -d /var/tmp/record-offload-hosttest.XXXXXX)
new_version="${version%-*}-$((${version##*-} + 1))"
mkdir "$RUN/pkg"
dpkg-deb -R "$deb" "$RUN/pkg/tree"
sed -i "s/^Version: .*/Version: $new_version/" "$RUN/pkg/tree/DEBIAN/control"
newdeb="$RUN/pkg/record-offload_${new_version}_amd64.deb"
dpkg-deb --root-owner-group -b "$RUN/pkg/tree" "$newdeb" >/dev/null
rm -rf "$RUN/pkg/tree"
echo "package: $(basename "$deb") ($version), upgrade to $(basename "$newdeb")"

dev_bin=target/debug/record-offload
if ! "$dev_bin" dev-s3 --help >/dev/null 2>&1; then
  cargo build --locked --bin record-offload
fi
s3_port=$(free_port)
proxy_port=$(free_port)
lookup_port=$(free_port)
mkdir "$RUN/store"
"$dev_bin" dev-s3 --data "$RUN/store" --listen "127.0.0.1:$s3_port" --bucket recordings \
  >"$RUN/dev-s3.log" 2>&1 &
S3_PID=$!
python3 "$here/countproxy.py" "$proxy_port" "$s3_port" "$RUN/sent" >"$RUN/proxy.log" 2>&1 &
PROXY_PID=$!
wait_until 30 "grep -q 'S3-compatible server on' '$RUN/dev-s3.log' && [ -f '$RUN/sent' ] || curl -s -o /dev/null 127.0.0.1:$proxy_port" \
  || ct_die "the test server did not start: $(cat "$RUN/dev-s3.log" "$RUN/proxy.log")"
access_key=$(sed -n 's/.*access key \([^,]*\), secret \([^)]*\)).*/\1/p' "$RUN/dev-s3.log")
secret=$(sed -n 's/.*access key \([^,]*\), secret \([^)]*\)).*/\2/p' "$RUN/dev-s3.log")
[ -n "$access_key" ] && [ -n "$secret" ] || ct_die "no credentials in the test server's banner"
echo "test server: dev-s3 on 127.0.0.1:$s3_port, counting relay on 127.0.0.1:$proxy_port"
sent() { cat "$RUN/sent" 2>/dev/null || echo 0; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

step "boot Debian 12 with systemd as PID 1"
t=$SECONDS
ct_rootfs
echo "root file system: $CT_ROOTFS ($((SECONDS - t)) s)"
t=$SECONDS
ct_boot "rohosttest$$" "$RUN/ct"
echo "booted in $((SECONDS - t)) s: $(ct systemctl is-system-running || true), $(ct systemctl --version | head -n1)"
root=$CT_MERGED

# In the container, as root, quietly; output goes to the run's log and is shown on failure.
log="$RUN/steps.log"
show_log() { tail -n 30 "$log" | sed 's/^/    | /'; }
svc_show() { ct systemctl show record-offload -p "$1" --value; }
journal() { ct journalctl --no-pager -u record-offload "$@"; }

step "apt install (maintainer scripts under systemd)"
cp "$deb" "$newdeb" "$root/root/"
if ct apt-get install -y "/root/$(basename "$deb")" >"$log" 2>&1; then
  pass "apt install ./$(basename "$deb"): installed offline from the container's packages"
else
  failed "apt install ./$(basename "$deb")"
  show_log
  exit 1
fi
grep -q "record-offload is installed but not started" "$log" \
  && pass "postinst told the operator what to do: '$(grep -m1 'installed but not started' "$log")'" \
  || failed "postinst message missing"
if ct id record-offload >/dev/null 2>&1; then
  pass "user created by sysusers: $(ct id record-offload)"
else
  failed "no record-offload user"
fi
seen=$(ct stat -c '%U:%G %a' /var/lib/record-offload 2>&1 || true)
[ "$seen" = "record-offload:record-offload 750" ] \
  && pass "/var/lib/record-offload is $seen" || failed "/var/lib/record-offload is '$seen'"
seen="$(svc_show LoadState) $(svc_show UnitFileState) $(svc_show ActiveState) NeedDaemonReload=$(svc_show NeedDaemonReload)"
[ "$seen" = "loaded disabled inactive NeedDaemonReload=no" ] \
  && pass "systemd knows the unit, not enabled, not started: $seen" || failed "unit after install: $seen"

step "systemd-analyze security, the unit as shipped"
claimed=$(sed -n 's/.*Overall exposure level for record-offload.service: \([0-9.]*\).*/\1/p' README.md | head -n1)
ct systemd-analyze security --no-pager record-offload.service >"$RUN/security.txt" 2>&1 || true
exposure=$(sed -n 's/.*Overall exposure level for record-offload.service: \([0-9.]*\).*/\1/p' "$RUN/security.txt")
grep '✗' "$RUN/security.txt" | sed 's/^/    | /'
tail -n1 "$RUN/security.txt" | sed 's/^/    | /'
[ -n "$exposure" ] && [ "$exposure" = "$claimed" ] \
  && pass "systemd-analyze security on the booted system: $exposure, as the README says" \
  || failed "systemd-analyze security: '$exposure', the README says '$claimed'"

step "configure as the README says: recorder, watch root, drop-in, config, secret"
ct useradd --create-home --user-group recorder
ct install -d -o recorder -g recorder -m 2775 /record
ct mkdir -p /etc/systemd/system/record-offload.service.d
ct cp /usr/share/doc/record-offload/examples/recorder-group.conf /etc/systemd/system/record-offload.service.d/
ct systemctl daemon-reload
cat >"$root/etc/record-offload/config.toml" <<EOF
# Edited by the operator (the package's copy is a conffile).
[node]
name = "hosttest"

[watch]
root = "/record"
settle_secs = $SETTLE

[storage]
endpoint = "http://127.0.0.1:$proxy_port"
region = "us-east-1"
bucket = "recordings"
access_key_id = "$access_key"
access_key_secret_file = "/etc/record-offload/secret"
path_style = true

[upload]
part_size_mib = $PART_MIB
concurrency = $CONCURRENCY
max_bytes_per_sec = $RATE
retry_max_secs = 5

[lookup]
listen = ["127.0.0.1:$lookup_port"]
EOF
ct sh -c "umask 077; printf '%s\n' '$secret' >/etc/record-offload/secret"
config_sum=$(ct sha256sum /etc/record-offload/config.toml | cut -d' ' -f1)
if ct record-offload check-config >"$log" 2>&1; then
  pass "check-config by hand as root: $(tail -n1 "$log")"
else
  failed "check-config by hand"
  show_log
fi

step "systemctl enable --now"
t0=$(date +%s.%N)
if ct systemctl enable --now record-offload >"$log" 2>&1; then
  took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  pass "systemctl enable --now returned after $took s: $(grep -m1 'Created symlink' "$log" || true)"
else
  failed "systemctl enable --now"
  show_log
  journal -n 30 | sed 's/^/    | /'
  exit 1
fi
# Type=notify: start returns once the daemon said READY=1, which it says after its listeners
# are bound. So /healthz must answer at once, and the daemon's "listening" line must come
# before systemd's "Started".
health=$(curl -s -m 5 "http://127.0.0.1:$lookup_port/healthz" || true)
state=$(svc_show ActiveState)
[ "$state" = active ] && [ "$health" = '{"status":"ok"}' ] \
  && pass "active right after start, and /healthz answers at once: $health" \
  || failed "after start: ActiveState=$state, /healthz '$health'"
journal -o short-monotonic >"$RUN/start.log"
listen_line=$(grep -n 'look-up server listening' "$RUN/start.log" | head -n1 | cut -d: -f1)
started_line=$(grep -n 'Started record-offload.service' "$RUN/start.log" | head -n1 | cut -d: -f1)
if [ -n "$listen_line" ] && [ -n "$started_line" ] && [ "$listen_line" -lt "$started_line" ]; then
  pass "READY before active: the journal has the daemon's 'look-up server listening' (line $listen_line) before systemd's 'Started' (line $started_line)"
else
  failed "READY ordering: listening at '${listen_line:-none}', Started at '${started_line:-none}'"
  sed 's/^/    | /' "$RUN/start.log"
fi
seen=$(svc_show ExecStartPre)
case $seen in
  *"check-config"*"code=exited ; status=0 "*) pass "ExecStartPre check-config passed: $(grep -o 'argv\[\]=[^;]*' <<<"$seen"); $(grep -o 'status=[^ ;]*' <<<"$seen")" ;;
  *) failed "ExecStartPre: $seen" ;;
esac
grep -q 'config ok' "$RUN/start.log" && pass "check-config's 'config ok' is in the unit's journal" \
  || failed "no 'config ok' from ExecStartPre in the journal"
# The summary is refreshed every 5 s.
if wait_until 15 "ct systemctl status record-offload --no-pager 2>/dev/null | grep -q 'Status: \"idle'"; then
  pass "systemctl status shows the daemon's STATUS: $(ct systemctl status record-offload --no-pager | grep 'Status:' | sed 's/^ *//')"
else
  failed "no STATUS line in systemctl status"
  ct systemctl status record-offload --no-pager | sed 's/^/    | /' || true
fi
ct systemctl status record-offload --no-pager -n 0 >"$RUN/status.txt" 2>&1 || true
sed 's/^/    | /' "$RUN/status.txt"

# The recorder writes a file under /record as its own user (umask 002: group-readable).
record() { # PATH MIB
  ct setpriv --reuid=recorder --regid=recorder --init-groups sh -c \
    "umask 002; mkdir -p \"\$(dirname /record/$1)\" && head -c $(($2 * MIB)) /dev/urandom >/record/$1"
}
stored_md5() { md5sum "$RUN/store/recordings/hosttest/$1" 2>/dev/null | cut -d' ' -f1; }
gone() { ! ct test -e "/record/$1"; }

step "recordings by the recorder user: single-part and multipart"
small=2026/12/04/room1/small.mp4
big=2026/12/04/room1/big.mp4
record "$small" 1
record "$big" 24
small_md5=$(md5sum "$root/record/$small" | cut -d' ' -f1)
big_md5=$(md5sum "$root/record/$big" | cut -d' ' -f1)
for f in "$small:$small_md5:1" "$big:$big_md5:24"; do
  IFS=: read -r path md5 size <<<"$f"
  if wait_until 90 "gone '$path'" && [ "$(stored_md5 "$path")" = "$md5" ]; then
    pass "$path ($size MiB) uploaded and deleted; the stored object's MD5 is the file's ($md5)"
  else
    failed "$path: local copy $(gone "$path" && echo gone || echo still there), stored MD5 '$(stored_md5 "$path")', file's $md5"
    journal -n 20 | sed 's/^/    | /'
  fi
done
journal F_PATH="$big" -o short >"$RUN/story.txt" 2>&1 || true
if grep -q 'upload complete' "$RUN/story.txt"; then
  pass "journalctl -u record-offload F_PATH=$big finds its story ($(grep -c . "$RUN/story.txt") lines):"
  sed 's/^/    | /' "$RUN/story.txt"
  journal F_PATH="$big" -o verbose -n 1 | grep -E '^ +(F_[A-Z_]+|PRIORITY|MESSAGE)=' | sed 's/^ */    | /'
else
  failed "journalctl -u record-offload F_PATH=$big: $(cat "$RUN/story.txt")"
fi

step "a file the recorder still holds open for writing"
open_file=2026/12/04/room2/paused.mp4
ct setpriv --reuid=recorder --regid=recorder --init-groups sh -c \
  "umask 002; mkdir -p /record/2026/12/04/room2 && head -c $MIB /dev/urandom >/record/$open_file"
# A paused recorder: the file was written and closed once, and is open for writing again
# (no more writes), by a process of the recorder's user.
ct systemd-run --quiet --unit=recorder-paused --uid=recorder --gid=recorder \
  sh -c "exec 3>>/record/$open_file; exec sleep 600"
sleep $((SETTLE * 4))
if wait_until 20 "journal F_PATH='$open_file' -o cat | grep -q 'still open for writing'" && ! gone "$open_file"; then
  pass "not taken while recorder's PID $(ct systemctl show recorder-paused -p MainPID --value) holds it open: '$(journal F_PATH="$open_file" -o cat | tail -n1)', file still there after $((SETTLE * 4)) s"
else
  failed "the open file: $(gone "$open_file" && echo "was taken" || echo "kept, but no 'still open for writing' in the journal")"
fi
ct systemctl stop recorder-paused || true
if wait_until 60 "gone '$open_file'" && [ -n "$(stored_md5 "$open_file")" ]; then
  pass "taken once the recorder closed it: uploaded and deleted"
else
  failed "the closed file was not taken within 60 s"
fi

# A big file, uploaded until at least MIN_MIB are sent; prints the count before it.
start_big() { # PATH MIB SENT_MIB: writes the file, waits until SENT_MIB are sent
  local before
  before=$(sent)
  record "$1" "$2"
  wait_until 60 "[ \$(( \$(sent) - $before )) -ge $(($3 * MIB)) ]" || return 1
  echo "$before"
}
resume_parts() { # PATH -> parts_done of the last "resuming multipart upload"
  journal F_PATH="$1" -o verbose | sed -n 's/^ *F_PARTS_DONE=//p' | tail -n1
}

step "watchdog: the daemon frozen with SIGSTOP"
wd=2026/12/04/room3/frozen.mp4
restarts=$(svc_show NRestarts)
if before=$(start_big "$wd" "$BIG_MIB" 20); then
  wd_md5=$(md5sum "$root/record/$wd" | cut -d' ' -f1)
  pid=$(svc_show MainPID)
  sleep 5 # let the STATUS line catch up with the upload
  echo "systemctl status while it uploads: $(ct systemctl status record-offload --no-pager | grep 'Status:' | sed 's/^ *//')"
  frozen_at=$SECONDS
  echo "sent $(mib $(($(sent) - before))) MiB of $BIG_MIB; kill -STOP $pid"
  ct kill -STOP "$pid"
  if wait_until 100 "journal -o cat | grep -q \"Failed with result 'watchdog'\""; then
    pass "systemd killed the frozen daemon after $((SECONDS - frozen_at)) s: '$(journal -o cat | grep -m1 'Watchdog timeout')' / '$(journal -o cat | grep -m1 "Failed with result 'watchdog'")'"
  else
    failed "no watchdog kill within 100 s of the SIGSTOP"
  fi
  if wait_until 40 "[ \"\$(svc_show ActiveState)\" = active ] && [ \"\$(svc_show MainPID)\" != $pid ] && [ \"\$(svc_show MainPID)\" != 0 ]"; then
    pass "restarted: NRestarts $restarts -> $(svc_show NRestarts), new PID $(svc_show MainPID), $(svc_show ActiveState)"
    journal -o short --since "@$(($(date +%s) - SECONDS + frozen_at))" \
      | grep -E 'Watchdog timeout|Killing process|Main process exited|Failed with result|Scheduled restart|Starting|Started' \
      | sed 's/^/    | /'
  else
    failed "not restarted: $(svc_show ActiveState), PID $(svc_show MainPID)"
  fi
  if wait_until 90 "gone '$wd'" && [ "$(stored_md5 "$wd")" = "$wd_md5" ]; then
    total=$(($(sent) - before))
    limit=$(((BIG_MIB + (CONCURRENCY + 1) * PART_MIB) * MIB))
    parts=$(resume_parts "$wd")
    if [ "$total" -le "$limit" ] && [ "${parts:-0}" -gt 0 ]; then
      pass "the interrupted upload finished from its parts: resumed with $parts parts done, $(mib "$total") MiB sent in all for the $BIG_MIB MiB file (at most $(mib "$limit")), object MD5 matches"
      echo "    journalctl -u record-offload F_PATH=$wd:"
      journal F_PATH="$wd" -o short | sed 's/^/    | /'
    else
      failed "resume after the watchdog: parts done '${parts:-none}', $(mib "$total") MiB sent (limit $(mib "$limit"))"
    fi
  else
    failed "$wd not stored and deleted after the restart"
  fi
else
  failed "the watchdog step's upload did not get going"
fi

step "systemctl stop during a multipart upload"
st=2026/12/04/room4/stopped.mp4
if before=$(start_big "$st" "$STOP_MIB" 30); then
  st_md5=$(md5sum "$root/record/$st" | cut -d' ' -f1)
  timeout_stop=$(svc_show TimeoutStopUSec)
  echo "sent $(mib $(($(sent) - before))) MiB of $STOP_MIB; systemctl stop"
  t0=$(date +%s.%N)
  ct systemctl stop record-offload || true
  took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  seen="Result=$(svc_show Result) ExecMainCode=$(svc_show ExecMainCode) ExecMainStatus=$(svc_show ExecMainStatus)"
  # ExecMainCode 1 is CLD_EXITED: the process exited by itself (not killed).
  if [ "$seen" = "Result=success ExecMainCode=1 ExecMainStatus=0" ] && awk -v t="$took" 'BEGIN { exit !(t < 60) }'; then
    pass "stopped in $took s (TimeoutStopSec=$timeout_stop), $seen; '$(journal -o cat | grep -E 'waiting for uploads in flight|record-offload stopped' | tail -n2 | paste -sd'|' | sed 's/|/ ... /')'"
  else
    failed "stop: took $took s, $seen"
  fi
  ct test -e "/record/$st" && pass "the unfinished file is still on disk" || failed "the unfinished file is gone"
  ct systemctl start record-offload || failed "systemctl start after the stop"
  if wait_until 120 "gone '$st'" && [ "$(stored_md5 "$st")" = "$st_md5" ]; then
    total=$(($(sent) - before))
    limit=$(((STOP_MIB + (CONCURRENCY + 1) * PART_MIB) * MIB))
    parts=$(resume_parts "$st")
    if [ "$total" -le "$limit" ] && [ "${parts:-0}" -gt 0 ]; then
      pass "the next start resumed from the finished parts: $parts parts done, $(mib "$total") MiB sent in all for the $STOP_MIB MiB file (at most $(mib "$limit")), object MD5 matches"
    else
      failed "resume after stop: parts done '${parts:-none}', $(mib "$total") MiB sent (limit $(mib "$limit"))"
    fi
  else
    failed "$st not stored and deleted after the next start"
  fi
else
  failed "the stop step's upload did not get going"
fi

step "upgrade to $new_version while running"
inv=$(svc_show InvocationID)
pid=$(svc_show MainPID)
if ct apt-get install -y "/root/$(basename "$newdeb")" >"$log" 2>&1; then
  pass "apt install ./$(basename "$newdeb"): $(ct dpkg-query -W -f '${Version}' record-offload) installed"
else
  failed "upgrade"
  show_log
fi
if wait_until 30 "[ \"\$(svc_show ActiveState)\" = active ] && [ \"\$(svc_show InvocationID)\" != '$inv' ]"; then
  pass "the running service was restarted by the upgrade: PID $pid -> $(svc_show MainPID), $(svc_show ActiveState)"
else
  failed "after the upgrade: $(svc_show ActiveState), invocation $(svc_show InvocationID) (was $inv)"
fi
[ "$(ct sha256sum /etc/record-offload/config.toml | cut -d' ' -f1)" = "$config_sum" ] \
  && pass "the edited config was kept (sha256 unchanged, no prompt)" || failed "the upgrade changed the config"
after=2026/12/04/room5/after-upgrade.mp4
record "$after" 1
after_md5=$(md5sum "$root/record/$after" | cut -d' ' -f1)
wait_until 60 "gone '$after'" && [ "$(stored_md5 "$after")" = "$after_md5" ] \
  && pass "a recording after the upgrade is uploaded and deleted" || failed "no upload after the upgrade"

step "systemd-analyze security with the recorder-group drop-in"
ct systemd-analyze security --no-pager record-offload.service >"$RUN/security-dropin.txt" 2>&1 || true
exposure2=$(sed -n 's/.*Overall exposure level for record-offload.service: \([0-9.]*\).*/\1/p' "$RUN/security-dropin.txt")
diff <(grep '✗' "$RUN/security.txt") <(grep '✗' "$RUN/security-dropin.txt") | sed -n 's/^> /    | /p' || true
[ -n "$exposure2" ] && pass "with SupplementaryGroups=recorder: $exposure2" || failed "no exposure with the drop-in"

step "apt remove, apt purge"
journal_lines=$(journal -o cat | wc -l)
if ct apt-get remove -y record-offload >"$log" 2>&1; then
  seen="service $(ct systemctl is-active record-offload || true), unit $(svc_show LoadState)"
  seen="$seen, binary $(ct test -e /usr/bin/record-offload && echo kept || echo gone)"
  seen="$seen, journal.db $(ct test -f /var/lib/record-offload/journal.db && echo kept || echo gone)"
  seen="$seen, config $(ct test -f /etc/record-offload/config.toml && echo kept || echo gone)"
  seen="$seen, secret $(ct test -f /etc/record-offload/secret && echo kept || echo gone)"
  lines=$(journal -o cat | wc -l)
  seen="$seen, journald's lines of the unit $([ "$lines" -ge "$journal_lines" ] && echo kept || echo lost)"
  # debhelper masks the unit of a removed package until it is purged.
  expected="service inactive, unit masked, binary gone, journal.db kept, config kept, secret kept, journald's lines of the unit kept"
  [ "$seen" = "$expected" ] && pass "apt remove: $seen" || failed "apt remove: $seen"
else
  failed "apt remove"
  show_log
fi
if ct apt-get purge -y record-offload >"$log" 2>&1; then
  seen="/var/lib/record-offload $(ct test -e /var/lib/record-offload && echo kept || echo gone)"
  seen="$seen, /etc/record-offload $(ct test -e /etc/record-offload && echo kept || echo gone)"
  seen="$seen, enablement $(ct test -e /etc/systemd/system/multi-user.target.wants/record-offload.service && echo kept || echo gone)"
  seen="$seen, user record-offload $(ct id record-offload >/dev/null 2>&1 && echo kept || echo gone)"
  expected="/var/lib/record-offload gone, /etc/record-offload gone, enablement gone, user record-offload kept"
  [ "$seen" = "$expected" ] && pass "apt purge: $seen" || failed "apt purge: $seen"
else
  failed "apt purge"
  show_log
fi

finished=1
printf '\nhost test: %d passed, %d failed (%d s)\n' "$PASSED" "$FAILED" "$((SECONDS - started))"
[ "$FAILED" = 0 ]
