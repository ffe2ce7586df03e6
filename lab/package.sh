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
cargo build --release --quiet -p vigil
# Completions and the manual page, made by the binary from its own CLI.
mkdir -p target/release/assets
target/release/vigil completions bash >target/release/assets/vigil.bash
target/release/vigil completions zsh >target/release/assets/_vigil
target/release/vigil completions fish >target/release/assets/vigil.fish
rm -rf target/release/assets/man
target/release/vigil man --dir target/release/assets/man
gzip -9n target/release/assets/man/*.8
cargo deb -p vigil --no-build
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
cmp -s /usr/share/vigil/grafana/vigil.json deploy/grafana/vigil.json || fail "the Grafana dashboard is missing or not the repo's"
for f in /usr/share/bash-completion/completions/vigil /usr/share/zsh/vendor-completions/_vigil \
    /usr/share/fish/vendor_completions.d/vigil.fish; do
    grep -q 'profile' "$f" 2>/dev/null || fail "the completions $f are missing or name no subcommand"
done
# bash completes `vigil prof` with what the script defines.
[[ $(bash -c 'source /usr/share/bash-completion/completions/vigil; COMP_WORDS=(vigil prof); COMP_CWORD=1;
    _vigil vigil prof vigil; echo "${COMPREPLY[*]}"') == profile ]] || fail "bash does not complete vigil prof"
zcat /usr/share/man/man8/vigil.8.gz | grep -q '^\.TH vigil 8' || fail "the manual page vigil(8) is missing"
zcat /usr/share/man/man8/vigil-profile-build.8.gz | grep -qF '\-\-output' \
    || fail "the manual page vigil-profile-build(8) is missing or shows none of its options"
/usr/bin/vigil daemon --config /etc/vigil/vigil.toml --check-config >/dev/null \
    || fail "the installed /etc/vigil/vigil.toml is refused"
say "package check passed: binary, unit (verified), user vigil, tmpfiles, config, rules, dashboard, completions and manual page installed"
