# shellcheck shell=bash
# A booted Debian 12 for tests: a root file system made once with debootstrap (cached), a
# writable overlay on it per run, and systemd-nspawn booting systemd as the container's PID 1.
# Sourced by packaging/host-test.sh and scripts/neighbour.sh.
#
# The host needs no systemd of its own: `--register=no --keep-unit` keep nspawn from asking a
# host systemd (over D-Bus) for a scope and a machine registration. The container shares the
# host's network namespace, so servers on the host's 127.0.0.1 are reachable from it.
#
#   ct_rootfs [EXTRA_PACKAGE...]   # sets CT_ROOTFS (cached; the first run takes a few minutes)
#   ct_boot NAME RUNDIR            # sets CT_INIT (the container's PID 1 as seen by the host)
#   ct CMD...                      # runs CMD inside the booted container (all its namespaces)
#   ct_shutdown                    # powers off, unmounts, removes the overlay; safe to call twice
#
# Callers must call ct_shutdown on exit (trap), also after a failure.

# Everything the tests run inside needs: systemd as PID 1, D-Bus for systemctl, curl for the
# look-up server, sqlite3 to read the journal, and what the .deb depends on (libc6, libgcc-s1,
# systemd: in the minimal base or listed here). The package is installed offline from these
# (the container has no package lists), so the test never depends on a mirror once the root
# file system is cached.
CT_PACKAGES=systemd,systemd-sysv,dbus,ca-certificates,curl,procps,sqlite3
CT_SUITE=bookworm
CT_MIRROR=${CT_MIRROR:-http://deb.debian.org/debian}
# Bump when the recipe below changes, so old caches are not used.
CT_RECIPE=1
if [ -z "${CT_CACHE:-}" ]; then
  if [ -d /var/cache ]; then
    CT_CACHE=/var/cache/record-offload-hosttest
  else
    CT_CACHE=$(pwd)/target/host-test/cache
  fi
fi

CT_INIT=
CT_NSPAWN=
CT_MERGED=
CT_RUNDIR=
CT_CGROUPS_BEFORE=

ct_die() {
  echo "FAIL: $*" >&2
  exit 1
}

ct_tools() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
  command -v nsenter >/dev/null || missing+=(util-linux)
  command -v python3 >/dev/null || missing+=(python3)
  command -v curl >/dev/null || missing+=(curl)
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  [ "$(id -u)" = 0 ] || ct_die "booting a container needs root"
  grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || true
  grep -qw overlay /proc/filesystems || ct_die "the kernel has no overlay file system"
}

# Sets CT_ROOTFS to a cached root file system with CT_PACKAGES and the given extra packages
# (installed with the container's apt from the mirror, after debootstrap), making it if needed.
ct_rootfs() {
  local extra="$*" key dir
  key=$(printf '%s\n' "$CT_RECIPE" "$CT_SUITE" "$CT_PACKAGES" "$extra" | sha256sum | cut -c1-12)
  dir="$CT_CACHE/$CT_SUITE-$key"
  mkdir -p "$CT_CACHE"
  exec {lockfd}>"$CT_CACHE/lock"
  flock "$lockfd"
  if [ ! -f "$dir/.complete" ]; then
    echo "root file system: making $dir (debootstrap $CT_SUITE${extra:+, then $extra}; a few minutes)"
    rm -rf "$dir.tmp"
    if ! debootstrap --variant=minbase --include="$CT_PACKAGES" "$CT_SUITE" "$dir.tmp" "$CT_MIRROR" \
      >"$CT_CACHE/debootstrap.log" 2>&1; then
      tail -n 20 "$CT_CACHE/debootstrap.log" >&2
      ct_die "debootstrap failed (log: $CT_CACHE/debootstrap.log)"
    fi
    if [ -n "$extra" ]; then
      # shellcheck disable=SC2086
      if ! chroot "$dir.tmp" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
          apt-get install -y -qq --no-install-recommends $extra && apt-get clean \
          && rm -rf /var/lib/apt/lists/*" >"$CT_CACHE/apt.log" 2>&1; then
        tail -n 20 "$CT_CACHE/apt.log" >&2
        ct_die "installing $extra in the root file system failed (log: $CT_CACHE/apt.log)"
      fi
    fi
    # No getty on the console: nothing reads it, and its prompt only clutters the log.
    ln -sf /dev/null "$dir.tmp/etc/systemd/system/console-getty.service"
    touch "$dir.tmp/.complete"
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
  fi
  flock -u "$lockfd"
  exec {lockfd}>&-
  CT_ROOTFS=$dir
}

ct() {
  nsenter -t "$CT_INIT" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 TERM=dumb \
    SYSTEMD_PAGER=cat SYSTEMD_COLORS=0 DEBIAN_FRONTEND=noninteractive "$@" </dev/null
}

# cgroup directories the container's systemd and nspawn make at the top of the host's
# hierarchies (the host has no systemd: its processes sit in the root cgroups). Listed before
# the boot so that ct_shutdown removes only what the container added.
ct_cgroup_dirs() {
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -d "$h" ] && find "$h" -mindepth 1 -maxdepth 1 -type d 2>/dev/null
  done | sort
}

ct_boot() {
  local name=$1 pid deadline state
  CT_RUNDIR=$2
  if [ -d /sys/fs/cgroup/systemd/payload ] \
    && [ -n "$(find /sys/fs/cgroup/systemd/payload -name cgroup.procs -exec cat {} + 2>/dev/null)" ]; then
    ct_die "another nspawn container is running in this cgroup (/sys/fs/cgroup/systemd/payload has processes)"
  fi
  CT_CGROUPS_BEFORE=$(ct_cgroup_dirs)
  mkdir -p "$CT_RUNDIR/upper" "$CT_RUNDIR/work" "$CT_RUNDIR/merged"
  mount -t overlay overlay \
    -o "lowerdir=$CT_ROOTFS,upperdir=$CT_RUNDIR/upper,workdir=$CT_RUNDIR/work" "$CT_RUNDIR/merged"
  CT_MERGED=$CT_RUNDIR/merged
  systemd-nspawn -D "$CT_MERGED" --boot --register=no --keep-unit -M "$name" \
    --console=read-only </dev/null >"$CT_RUNDIR/console.log" 2>&1 &
  CT_NSPAWN=$!
  # PID 1 of the container is the child of nspawn whose last NSpid is 1.
  deadline=$((SECONDS + 30))
  while [ -z "$CT_INIT" ]; do
    for pid in $(pgrep -P "$CT_NSPAWN" || true); do
      if awk '/^NSpid:/ { exit !($NF == 1) }' "/proc/$pid/status" 2>/dev/null; then CT_INIT=$pid; fi
    done
    [ -n "$CT_INIT" ] && break
    kill -0 "$CT_NSPAWN" 2>/dev/null || { tail -n 20 "$CT_RUNDIR/console.log" >&2; ct_die "systemd-nspawn exited"; }
    [ $SECONDS -lt $deadline ] || ct_die "no container init after 30 s (console: $CT_RUNDIR/console.log)"
    sleep 0.2
  done
  # Wait for the boot to finish; "degraded" (some unit failed) is reported but not fatal.
  deadline=$((SECONDS + 120))
  while :; do
    state=$(ct systemctl is-system-running 2>/dev/null || true)
    case $state in running | degraded) break ;; esac
    [ $SECONDS -lt $deadline ] || { tail -n 20 "$CT_RUNDIR/console.log" >&2; ct_die "the container did not finish booting in 120 s (state: ${state:-none})"; }
    sleep 0.5
  done
  if [ "$state" = degraded ]; then
    echo "container: degraded boot; failed units:"
    ct systemctl --failed --no-legend || true
  fi
}

ct_shutdown() {
  local deadline d
  if [ -n "$CT_NSPAWN" ] && kill -0 "$CT_NSPAWN" 2>/dev/null; then
    if [ -n "$CT_INIT" ]; then timeout 10 nsenter -t "$CT_INIT" -a systemctl poweroff 2>/dev/null || true; fi
    deadline=$((SECONDS + 30))
    while kill -0 "$CT_NSPAWN" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    if kill -0 "$CT_NSPAWN" 2>/dev/null; then
      echo "container: no clean power-off in 30 s; killing it" >&2
      # Killing a PID namespace's init kills every process in it.
      if [ -n "$CT_INIT" ]; then kill -KILL "$CT_INIT" 2>/dev/null || true; fi
      kill -KILL "$CT_NSPAWN" 2>/dev/null || true
    fi
    wait "$CT_NSPAWN" 2>/dev/null || true
  fi
  CT_NSPAWN=
  CT_INIT=
  if [ -n "$CT_MERGED" ] && mountpoint -q "$CT_MERGED"; then
    umount "$CT_MERGED" 2>/dev/null || umount -l "$CT_MERGED"
  fi
  CT_MERGED=
  # Empty cgroups the container left at the top of the host's hierarchies.
  if [ -n "$CT_CGROUPS_BEFORE" ]; then
    comm -13 <(printf '%s\n' "$CT_CGROUPS_BEFORE") <(ct_cgroup_dirs) | while read -r d; do
      find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    done
  fi
  CT_CGROUPS_BEFORE=
  if [ -n "$CT_RUNDIR" ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$CT_RUNDIR/upper" "$CT_RUNDIR/work" "$CT_RUNDIR/merged"; fi
}
