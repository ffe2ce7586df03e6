#!/usr/bin/env bash
# vigil's main job, end to end, on a fresh Debian 12 machine, as root:
# boot a lab guest of the Debian cloud kernel under libvirt, baseline its
# kernel from the host, let a rootkit module hook a kernel function, and
# show what `vigil check` reports. The guest is destroyed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

lab/setup.sh --install
lab/services.sh
cargo build --release --quiet -p vigil -p vigil-lab
vigil=target/release/vigil
lab=target/release/vigil-lab
state=$(mktemp -d)
trap '$lab stop demo || true; rm -rf "$state"' EXIT

step() { printf '\n== %s\n' "$*"; }
step "booting lab guest vigil-lab-demo (TCG, Debian cloud kernel $(cat /var/lib/vigil-lab/kernel-release))"
$lab start demo
sleep 3
$vigil domains
step "vigil baseline vigil-lab-demo"
$vigil --state-dir "$state" baseline vigil-lab-demo
step "vigil check vigil-lab-demo (untouched guest)"
$vigil --state-dir "$state" check vigil-lab-demo
step "in the guest: loading a rootkit module that inline-hooks __x64_sys_getppid"
$lab exec demo attack inline
step "vigil check vigil-lab-demo"
status=0
$vigil --state-dir "$state" check vigil-lab-demo || status=$?
printf '\nvigil check exited %s (0 intact, 1 violations, 2 error)\n' "$status"
[[ $status == 1 ]]
