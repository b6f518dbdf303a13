#!/usr/bin/env bash
# How much the daemon takes from a recording host's mixer, measured under a booted systemd.
#
# A CPU-bound stand-in for the mixer (ffmpeg encoding a 720p test picture with x264 to
# nothing, on both cores, as the `recorder` user in a service of its own) runs throughout.
# Its throughput (frames per second, from ffmpeg's -progress) is measured in windows:
#
#   alone   the mixer by itself;
#   old     while the daemon uploads a backlog of several GiB under the unit without its
#           resource settings (a drop-in resets Nice=, CPUWeight=, IOWeight=,
#           IOSchedulingClass=, MemoryHigh=, OOMScoreAdjust= to systemd's defaults);
#   new     the same under the unit as shipped.
#
# A round runs alone, old, alone, new, alone; each daemon window is compared with the mean
# of the alone windows on either side of it (other work on a shared machine drifts). The
# report gives each window's figures and the medians over the rounds: the mixer's frames/s,
# its loss against alone, and the daemon's upload rate (MiB/s).
#
# The other end of the upload, the local S3-compatible server (`dev-s3` of the dev build),
# runs in the container too, as a service with the daemon's resource settings in each
# window: on a real host that CPU is the store's, not the host's, so it is counted as part
# of the upload and given the daemon's place.
#
# cgroups: on a host whose cgroup v1 hierarchies nspawn mounts read-only in the container,
# the cpu (and cpuacct) hierarchies are remounted writable inside the container's mount
# namespace and systemd re-executed, so CPUWeight= applies (the container's cgroups are then
# made at the top of the host's cpu hierarchy; they are removed on exit). The report says
# which of the unit's settings took effect (cpu.shares, nice, I/O class of the daemon's
# processes, memory controller).
#
#   scripts/neighbour.sh [--rounds N] [--window SECS] [--backlog-gib N] [--new 'KEY=V ...']
#                        [--slice-weight W] [DEB]
#
# --new replaces the unit's resource settings for the `new` windows (to try other values);
# DEB defaults to target/debian/record-offload_*.deb. Needs root; the root file system (with
# ffmpeg) is cached like packaging/host-test.sh's.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=packaging/host-test/container.sh
. packaging/host-test/container.sh

ROUNDS=3
WINDOW=30
BACKLOG_GIB=4
NEW_SETTINGS=
# The container's system.slice against the host's own processes (it sits at the top of the
# host's cpu hierarchy, beside them): CPUWeight 800 is cpu.shares 8192, eight busy processes'
# worth, so other work on the host disturbs the windows less. It does not change the contest
# inside the slice (mixer, daemon, store).
SLICE_WEIGHT=800
deb=
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --window) WINDOW=$2; shift 2 ;;
    --backlog-gib) BACKLOG_GIB=$2; shift 2 ;;
    --new) NEW_SETTINGS=$2; shift 2 ;;
    --slice-weight) SLICE_WEIGHT=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) deb=$1; shift ;;
  esac
done
MIB=$((1024 * 1024))
FILE_MIB=64
# The unit's resource settings (the keys the `old` drop-in resets).
KEYS='Nice|CPUWeight|IOWeight|IOSchedulingClass|IOSchedulingPriority|MemoryHigh|OOMScoreAdjust|CPUSchedulingPolicy'

RUN=
cleanup() {
  local rc=$?
  set +e
  ct_shutdown
  [ -n "$RUN" ] && rm -rf "$RUN"
  exit "$rc"
}
trap cleanup EXIT
die() {
  echo "neighbour: $*" >&2
  exit 1
}

ct_tools
if [ -z "$deb" ]; then
  deb=$(ls target/debian/record-offload_*_amd64.deb 2>/dev/null | head -n1 || true)
  [ -n "$deb" ] || bash packaging/check.sh --no-install
  deb=$(ls target/debian/record-offload_*_amd64.deb | head -n1)
fi
deb=$(realpath "$deb")
dev_bin=target/debug/record-offload
"$dev_bin" dev-s3 --help >/dev/null 2>&1 || cargo build --locked --bin record-offload

ct_rootfs ffmpeg
RUN=$(mktemp -d /var/tmp/record-offload-neighbour.XXXXXX)
ct_boot "roneighbour$$" "$RUN/ct"
root=$CT_MERGED

# CPU controller: make the container's cpu hierarchies writable when nspawn mounted them
# read-only, then let systemd see them.
for h in cpu cpuacct cpu,cpuacct; do
  if ct test -d "/sys/fs/cgroup/$h" && ! ct test -w "/sys/fs/cgroup/$h/cgroup.procs"; then
    nsenter -t "$CT_INIT" -m mount -o remount,bind,rw "/sys/fs/cgroup/$h"
    remounted=1
  fi
done
[ -n "${remounted:-}" ] && ct systemctl daemon-reexec && sleep 1
ct systemctl set-property --runtime system.slice CPUWeight="$SLICE_WEIGHT"

cp "$deb" "$root/root/"
cp "$dev_bin" "$root/usr/local/bin/record-offload-dev"
ct apt-get install -y "/root/$(basename "$deb")" >"$RUN/apt.log" 2>&1 || { cat "$RUN/apt.log"; die "apt install failed"; }
ct useradd --create-home --user-group recorder
ct install -d -o recorder -g recorder -m 2775 /record
ct mkdir -p /etc/systemd/system/record-offload.service.d
ct cp /usr/share/doc/record-offload/examples/recorder-group.conf /etc/systemd/system/record-offload.service.d/
unit_settings=$(grep -E "^($KEYS)=" "$root/usr/lib/systemd/system/record-offload.service" | tr '\n' ' ' || true)
new_settings=${NEW_SETTINGS:-$unit_settings}
store_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
lookup_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$root/etc/record-offload/config.toml" <<EOF
[node]
name = "neighbour"
[watch]
root = "/record"
settle_secs = 1
[storage]
endpoint = "http://127.0.0.1:$store_port"
region = "us-east-1"
bucket = "recordings"
access_key_id = "record-offload-dev"
access_key_secret_file = "/etc/record-offload/secret"
path_style = true
[lookup]
listen = ["127.0.0.1:$lookup_port"]
EOF
ct sh -c "umask 077; echo record-offload-dev-secret >/etc/record-offload/secret"
ct systemctl daemon-reload

# The mixer: as the recorder, a service of its own with systemd's defaults, until stopped.
ct systemd-run --quiet --unit=mixer --uid=recorder --gid=recorder \
  ffmpeg -hide_banner -nostdin -loglevel error -stats_period 0.5 -progress /var/tmp/mixer.progress \
  -f lavfi -i testsrc2=size=1280x720:rate=30 -c:v libx264 -preset veryfast -threads 2 -f null -
progress() { # -> "frames seconds" (seconds since the epoch)
  local f
  f=$(grep '^frame=' "$root/var/tmp/mixer.progress" 2>/dev/null | tail -n1 | cut -d= -f2)
  echo "${f:-0} $(date +%s.%N)"
}
sleep 5
[ "$(ct systemctl show mixer -p ActiveState --value)" = active ] || die "the mixer did not start: $(ct journalctl -u mixer -n 5 --no-pager)"

# The backlog: FILE_MIB files up to BACKLOG_GIB, copies of one random file.
ct setpriv --reuid=recorder --regid=recorder --init-groups sh -c \
  "head -c $((FILE_MIB * MIB)) /dev/urandom >/home/recorder/seed"
refill() {
  ct setpriv --reuid=recorder --regid=recorder --init-groups sh -c '
    umask 002; mkdir -p /record/backlog; n=0
    while [ $n -lt '$((BACKLOG_GIB * 1024 / FILE_MIB))' ]; do
      f=/record/backlog/$1-$n.mp4; [ -e $f ] || cp /home/recorder/seed $f; n=$((n + 1))
    done' sh "$1"
  sync
}
uploaded() { # bytes stored plus bytes of uploads in flight, from the journal
  ct record-offload status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
b = s.get("bytes", {})
print(b.get("deleted", 0) + b.get("uploaded", 0) + s.get("bytes_uploading_sent", 0))' 2>/dev/null || echo 0
}
store_start() { # SETTINGS...
  local props=() kv
  for kv in "$@"; do props+=(-p "$kv"); done
  ct rm -rf /srv/store
  ct mkdir -p /srv/store
  ct systemd-run --quiet --unit=store "${props[@]}" /usr/local/bin/record-offload-dev dev-s3 \
    --data /srv/store --listen "127.0.0.1:$store_port" --bucket recordings
  for _ in $(seq 50); do curl -s -o /dev/null "127.0.0.1:$store_port" && return 0; sleep 0.2; done
  die "the store did not start"
}
store_stop() { ct systemctl stop store || true; }

fps_of() { awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); printf "%.2f", (y[1] - x[1]) / (y[2] - x[2]) }'; }

# One window: MODE alone|old|new. Prints "fps MiB/s".
window() {
  local mode=$1 p0 p1 u0 u1 settings=() t0 t1 drop=/etc/systemd/system/record-offload.service.d/zz-neighbour.conf
  case $mode in
    alone) ;;
    old)
      printf '[Service]\n' >"$root$drop"
      grep -oE "($KEYS)=" <<<"$unit_settings $new_settings" | sort -u >>"$root$drop"
      ;;
    new)
      read -r -a settings <<<"$new_settings"
      { printf '[Service]\n'; grep -oE "($KEYS)=" <<<"$unit_settings" | sort -u; printf '%s\n' "${settings[@]}"; } >"$root$drop"
      ;;
  esac
  if [ "$mode" != alone ]; then
    ct systemctl daemon-reload
    store_start "${settings[@]}"
    ct systemctl start record-offload
    sleep 3
    u0=$(uploaded)
    t0=$(date +%s.%N)
  fi
  p0=$(progress)
  sleep "$WINDOW"
  p1=$(progress)
  if [ "$mode" != alone ]; then
    u1=$(uploaded)
    t1=$(date +%s.%N)
    daemon_settings >"$RUN/seen"
    left=$(ct record-offload status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["counts"]["queued"])')
    ct systemctl stop record-offload
    store_stop
    ct rm -f "$drop"
    [ "$left" -gt 0 ] || echo "neighbour: warning: the backlog ran out during the $mode window (use --backlog-gib)" >&2
    echo "$(fps_of "$p0" "$p1") $(awk -v a="$u0" -v b="$u1" -v s="$t0" -v e="$t1" 'BEGIN { printf "%.1f", (b - a) / 1048576 / (e - s) }')"
  else
    echo "$(fps_of "$p0" "$p1") -"
  fi
}
# What the kernel applied to the daemon's main process.
daemon_settings() {
  local pid cg shares
  pid=$(ct systemctl show record-offload -p MainPID --value)
  cg=$(ct sh -c "grep -E '^[0-9]+:(cpu|cpu,cpuacct):' /proc/$pid/cgroup | cut -d: -f3")
  shares=$(ct sh -c "cat /sys/fs/cgroup/cpu/$cg/cpu.shares 2>/dev/null || cat /sys/fs/cgroup/cpu,cpuacct/$cg/cpu.shares 2>/dev/null || echo none")
  echo "cpu.shares $shares, policy $(ct ps -o cls= -p "$pid" | tr -d ' '), nice $(ct ps -o ni= -p "$pid" | tr -d ' '), ionice '$(ct ionice -p "$pid")', oom_score_adj $(ct cat /proc/"$pid"/oom_score_adj)"
}

echo "neighbour: $ROUNDS rounds of ${WINDOW}-s windows, backlog $BACKLOG_GIB GiB of $FILE_MIB MiB files"
echo "neighbour: unit's settings: ${unit_settings:-none}; new windows use: ${new_settings:-none}"
echo "neighbour: memory controller in the container: $(ct sh -c 'if [ -w /sys/fs/cgroup/memory/cgroup.procs ]; then echo v1 writable; elif grep -qw memory /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null || grep -qw memory /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then echo v2; else echo "not available (MemoryHigh= cannot apply here)"; fi')"
echo "neighbour: load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
results=()
for r in $(seq "$ROUNDS"); do
  refill "r$r"
  a0=$(window alone)
  echo "round $r: alone  mixer ${a0% *} frames/s  (load $(cut -d' ' -f1 /proc/loadavg))"
  o=$(window old)
  echo "round $r: old    mixer ${o% *} frames/s, daemon ${o#* } MiB/s  [$(cat "$RUN/seen")]"
  refill "r$r"
  a1=$(window alone)
  echo "round $r: alone  mixer ${a1% *} frames/s  (load $(cut -d' ' -f1 /proc/loadavg))"
  n=$(window new)
  echo "round $r: new    mixer ${n% *} frames/s, daemon ${n#* } MiB/s  [$(cat "$RUN/seen")]"
  a2=$(window alone)
  echo "round $r: alone  mixer ${a2% *} frames/s  (load $(cut -d' ' -f1 /proc/loadavg))"
  results+=("${a0% *} ${a1% *} ${a2% *} $o $n")
done
echo "neighbour: load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%s\n' "${results[@]}" >"$RUN/results"
python3 - "$RUN/results" <<'EOF_PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
a0, a1, a2 = ([float(r[i]) for r in rows] for i in range(3))
old, old_up = [float(r[3]) for r in rows], [float(r[4]) for r in rows]
new, new_up = [float(r[5]) for r in rows], [float(r[6]) for r in rows]
base_old = [(x + y) / 2 for x, y in zip(a0, a1)]
base_new = [(x + y) / 2 for x, y in zip(a1, a2)]
alone = a0 + a1 + a2
m = statistics.median
def loss(x, base):
    return [100 * (1 - v / b) for v, b in zip(x, base)]
def each(x):
    return ", ".join(f"{v:.1f}" for v in x)
print("| window | mixer frames/s (median) | mixer loss against the alone windows beside it: median (each round) | daemon MiB/s (median) |")
print("| --- | ---: | ---: | ---: |")
print(f"| mixer alone | {m(alone):.1f} | - | - |")
print(f"| + daemon, old unit | {m(old):.1f} | {m(loss(old, base_old)):.1f} % ({each(loss(old, base_old))}) | {m(old_up):.1f} |")
print(f"| + daemon, new unit | {m(new):.1f} | {m(loss(new, base_new)):.1f} % ({each(loss(new, base_new))}) | {m(new_up):.1f} |")
EOF_PY
