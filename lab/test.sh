#!/usr/bin/env bash
# The whole test suite, on a fresh Debian 12 machine, as root:
# installs the lab's packages, prepares the lab guest, starts libvirt, removes
# lab domains left over from an earlier run, builds and checks the Debian
# package (install, verify, purge), runs every fuzz target for a short while
# from its seeds, then runs every test (unit tests, and the lab tests that
# boot real guests, Prometheus and Alertmanager: the `lab` feature) with
# nextest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

lab/setup.sh --install
lab/services.sh
for dom in $(virsh -c qemu:///system list --name | grep '^vigil-lab-' || true); do
    virsh -c qemu:///system destroy "$dom" >/dev/null 2>&1 || true
done
lab/package.sh --check
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
# The benchmarks need a captured guest to run (lab/capture.sh); here they
# are only built, so that they cannot rot.
cargo build --quiet -p vigil-bench --benches --examples
# The lab's own command, which the demo's lab test runs beside the test build.
cargo build --quiet -p vigil-lab
fuzz/run.sh smoke
cargo nextest run --workspace --features vigil/lab --no-fail-fast "$@"
