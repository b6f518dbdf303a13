#!/usr/bin/env bash
# Builds the release packages and checks them: contents, lintian, the systemd unit
# (`systemd-analyze verify` and the exposure score), then installs the .deb on this machine,
# runs the installed binary and `check-config` on the shipped config, reinstalls it over an
# edited config, and removes and purges it again, checking what each step keeps; then the
# same for the .rpm's scriptlets with Debian's rpm.
#
#   packaging/check.sh               # everything; needs root and a Debian-like machine
#   packaging/check.sh --no-install  # build and inspect only
#
# Packages land in target/debian/*.deb and target/generate-rpm/*.rpm. They are built without
# the default features (no `demo`, no local S3 server, no crash hooks) and stripped.
set -euo pipefail
cd "$(dirname "$0")/.."

INSTALL=1
[ "${1:-}" = "--no-install" ] && INSTALL=0

# Tool versions that build on the project's rust-version.
CARGO_DEB_VERSION=3.8.0
CARGO_GENERATE_RPM_VERSION=0.21.1
MAX_EXPOSURE=2.0
UNIT=systemd/record-offload.service

step() { printf '\n== %s\n' "$*"; }
fail() { echo "packaging/check.sh: $*" >&2; exit 1; }

step "tools"
missing=()
command -v lintian >/dev/null || missing+=(lintian)
command -v rpm >/dev/null || missing+=(rpm)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v strip >/dev/null || missing+=(binutils)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
  cargo install --locked "cargo-deb@$CARGO_DEB_VERSION"
fi
if ! cargo generate-rpm --version 2>/dev/null | grep -qF "$CARGO_GENERATE_RPM_VERSION"; then
  cargo install --locked "cargo-generate-rpm@$CARGO_GENERATE_RPM_VERSION"
fi
cargo deb --version
cargo generate-rpm --version
systemd-analyze --version | head -n1

step "release build (--no-default-features, stripped)"
# Stripped here, not by the packaging tools: cargo-generate-rpm does not strip, and the
# profile keeps line tables for local profiling.
CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
  cargo build --release --locked --no-default-features
bin=target/release/record-offload
"$bin" --version
if "$bin" --help | grep -qw demo; then
  fail "the release binary still has the demo command (built with default features?)"
fi

step "build the packages"
rm -rf target/debian target/generate-rpm
cargo deb --no-build --locked
cargo generate-rpm
deb=$(ls target/debian/record-offload_*.deb)
rpmf=$(ls target/generate-rpm/record-offload-*.rpm)
ls -l "$deb" "$rpmf"

step "deb contents"
dpkg-deb -I "$deb"
dpkg-deb -c "$deb" | tee target/debian/contents.txt
for p in ./usr/bin/record-offload ./usr/lib/systemd/system/record-offload.service \
  ./etc/record-offload/config.toml ./usr/lib/sysusers.d/record-offload.conf \
  ./usr/share/doc/record-offload/copyright ./usr/share/doc/record-offload/README.md \
  ./usr/share/doc/record-offload/examples/config.example.toml \
  ./usr/share/doc/record-offload/examples/recorder-group.conf \
  ./usr/share/doc/record-offload/examples/as-recorder.conf; do
  grep -q " $p\$" target/debian/contents.txt || fail "$deb lacks $p"
done
dpkg-deb -f "$deb" Depends
[ "$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)" = "/etc/record-offload/config.toml" ] \
  || fail "/etc/record-offload/config.toml is not the one conffile"
cmp <(dpkg-deb --fsys-tarfile "$deb" | tar -xO ./usr/lib/systemd/system/record-offload.service) "$UNIT" \
  || fail "the packaged unit differs from $UNIT"

step "rpm contents"
rpm -qip "$rpmf"
rpm -qpl "$rpmf" | tee target/generate-rpm/contents.txt
for p in /usr/bin/record-offload /usr/lib/systemd/system/record-offload.service \
  /etc/record-offload/config.toml /usr/lib/sysusers.d/record-offload.conf \
  /usr/share/licenses/record-offload/LICENSE \
  /usr/share/doc/record-offload/README.md \
  /usr/share/doc/record-offload/examples/as-recorder.conf; do
  grep -qx "$p" target/generate-rpm/contents.txt || fail "$rpmf lacks $p"
done
# The config is %config(noreplace): an upgrade never overwrites the operator's copy.
rpm -qp --qf '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' "$rpmf" | grep -qx 'cn /etc/record-offload/config.toml' \
  || fail "/etc/record-offload/config.toml is not %config(noreplace)"
rpm -qp --scripts "$rpmf"
rpm -qp --requires "$rpmf"
rpm -K --nosignature "$rpmf"

step "lintian"
# Errors fail the build; warnings and notes are shown (justified overrides:
# packaging/deb/lintian-overrides).
lintian --fail-on error --display-info --show-overrides "$deb"
echo "lintian: no errors"

if [ "$INSTALL" = 1 ]; then
  [ "$(id -u)" = 0 ] || fail "installing needs root (or pass --no-install)"

  step "install the .deb"
  dpkg -i "$deb"
  id record-offload
  [ "$(stat -c '%U:%G %a' /var/lib/record-offload)" = "record-offload:record-offload 750" ] \
    || fail "/var/lib/record-offload is not record-offload's, mode 0750"
  record-offload --version
fi

step "systemd-analyze verify"
if [ -x /usr/bin/record-offload ]; then
  # Checks the unit's syntax and that ExecStart= and ExecStartPre= exist; works without a
  # running systemd.
  systemd-analyze verify --man=no "$UNIT"
  echo "verify: ok"
else
  echo "skipped: it needs /usr/bin/record-offload (run without --no-install)"
fi

step "systemd-analyze security"
systemd-analyze security --offline=yes --no-pager "$UNIT" | tee target/security.txt
exposure=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' target/security.txt)
[ -n "$exposure" ] || fail "no exposure level in the systemd-analyze output"
awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' \
  || fail "exposure $exposure is above $MAX_EXPOSURE"
echo "exposure: $exposure (at most $MAX_EXPOSURE)"

[ "$INSTALL" = 0 ] && exit 0

step "check-config on the shipped config"
# What an operator provides on a recording host: the watch root (the recorder's) and the
# storage secret. Everything else is the config as the package installed it.
made_root=0
if [ ! -d /record ]; then mkdir /record && made_root=1; fi
umask 077
printf 'ci-placeholder-secret\n' >/etc/record-offload/secret
umask 022
# As root, by hand: the config's access_key_secret_file.
record-offload check-config >/dev/null
echo "check-config as root: ok"
# As the unit runs it: the service user, the secret handed over as a systemd credential
# (a copy readable by that user only) and the unit's Environment= pointing at it.
creds=$(mktemp -d)
install -o record-offload -g record-offload -m 0400 /etc/record-offload/secret "$creds/access_key_secret"
chown record-offload:record-offload "$creds" && chmod 0500 "$creds"
env_line=$(sed -n 's/^Environment=//p' "$UNIT")
setpriv --reuid=record-offload --regid=record-offload --init-groups \
  env CREDENTIALS_DIRECTORY="$creds" "${env_line//%d/$creds}" \
  record-offload check-config | grep -F "access_key_secret_file = \"$creds/access_key_secret\""
echo "check-config as record-offload with the credential: ok"
rm -rf "$creds"

step "upgrade (reinstall) keeps the operator's config"
echo '# edited by the operator' >>/etc/record-offload/config.toml
dpkg -i "$deb"
grep -qx '# edited by the operator' /etc/record-offload/config.toml || fail "dpkg -i overwrote the edited config"
record-offload check-config >/dev/null

step "remove keeps the journal and the config; purge deletes them"
printf 'keep me' >/var/lib/record-offload/journal.db
dpkg -r record-offload
[ -f /var/lib/record-offload/journal.db ] || fail "dpkg -r deleted the journal"
[ -f /etc/record-offload/config.toml ] || fail "dpkg -r deleted the config"
[ ! -e /usr/bin/record-offload ] || fail "dpkg -r left the binary"
dpkg -P record-offload
[ ! -e /var/lib/record-offload ] || fail "dpkg -P left /var/lib/record-offload"
[ ! -e /etc/record-offload ] || fail "dpkg -P left /etc/record-offload"

step "the .rpm's scriptlets, with Debian's rpm (no dependency resolution here)"
rpm_i() { rpm --nodeps --force-debian "$@"; }
rpm_i -i "$rpmf"
[ "$(stat -c '%U:%G %a' /var/lib/record-offload)" = "record-offload:record-offload 750" ] \
  || fail "the rpm did not create /var/lib/record-offload for record-offload, mode 0750"
echo '# edited by the operator' >>/etc/record-offload/config.toml
rpm_i -U --replacepkgs "$rpmf"
grep -qx '# edited by the operator' /etc/record-offload/config.toml || fail "rpm -U overwrote the edited config"
printf 'keep me' >/var/lib/record-offload/journal.db
rpm_i -e record-offload
[ -f /var/lib/record-offload/journal.db ] || fail "rpm -e deleted the journal"
[ ! -e /usr/bin/record-offload ] || fail "rpm -e left the binary"
rm -rf /var/lib/record-offload /etc/record-offload
if [ "$made_root" = 1 ]; then rmdir /record; fi

echo "packaging checks passed"
