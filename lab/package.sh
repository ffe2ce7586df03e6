#!/usr/bin/env bash
# Builds vigil's Debian package with cargo-deb (target/debian/vigil_*.deb).
#
#   lab/package.sh            build it
#   lab/package.sh --check    build it, then install it here with apt, check what
#                             it installed (binary, unit that systemd-analyze
#                             verifies, user and group, state directory, config), purge it
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
say() { printf 'lab/package: %s\n' "$*" >&2; }

command -v cargo-deb >/dev/null || { say "installing cargo-deb"; cargo install --locked cargo-deb; }
cargo deb -p vigil
deb=$(ls -t target/debian/vigil_*.deb | head -n 1)
say "built $deb"
[[ ${1:-} == --check ]] || exit 0

say "installing $deb"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "./$deb" >/dev/null
trap 'DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq vigil >/dev/null' EXIT
fail() { say "check failed: $*"; exit 1; }
/usr/bin/vigil --version >/dev/null || fail "/usr/bin/vigil does not run"
[[ -z $(systemd-analyze verify /lib/systemd/system/vigil.service 2>&1) ]] \
    || fail "systemd-analyze verify: $(systemd-analyze verify /lib/systemd/system/vigil.service 2>&1)"
getent passwd vigil >/dev/null || fail "user vigil was not created"
getent group vigil >/dev/null || fail "group vigil was not created"
[[ $(stat -c %U /var/lib/vigil/baselines) == vigil ]] || fail "/var/lib/vigil/baselines is not user vigil's"
[[ $(stat -c %G:%a /etc/vigil/vigil.toml) == vigil:640 ]] \
    || fail "/etc/vigil/vigil.toml is $(stat -c %G:%a /etc/vigil/vigil.toml), not vigil:640 (the daemon reads it as vigil)"
[[ -d /var/lib/vigil/baselines ]] || fail "/var/lib/vigil/baselines was not created"
[[ -f /etc/vigil/vigil.toml ]] || fail "/etc/vigil/vigil.toml is missing"
[[ -f /usr/share/vigil/vigil-rules.yml ]] || fail "the Prometheus rules are missing"
ls /usr/share/vigil/guest-profiles/*.profile >/dev/null 2>&1 || fail "the guest profiles are missing"
/usr/bin/vigil daemon --config /etc/vigil/vigil.toml --check-config >/dev/null \
    || fail "the installed /etc/vigil/vigil.toml is refused"
say "package check passed: binary, unit (verified), user vigil, tmpfiles, config and rules installed"
