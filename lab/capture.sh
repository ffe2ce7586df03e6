#!/usr/bin/env bash
# Captures a real lab guest for the benchmarks (benches/README.md): boots a
# lab guest, lets it settle, takes vigil's baseline of it and a memory-only
# ELF core through libvirt, and leaves both in /var/lib/vigil-lab/capture
# (or $1). Nothing of it is committed: run it on the benchmark machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
out=${1:-/var/lib/vigil-lab/capture}
say() { printf 'lab/capture: %s\n' "$*" >&2; }

lab/setup.sh
lab/services.sh
cargo build --release --quiet -p vigil -p vigil-lab
lab=target/release/vigil-lab
vigil=target/release/vigil
trap '$lab stop capture >/dev/null 2>&1 || true' EXIT
$lab stop capture >/dev/null 2>&1 || true
say "booting vigil-lab-capture"
$lab start capture >/dev/null
# The kernel patches itself for a few seconds after boot; wait until two
# checks a few seconds apart find nothing changed.
rm -rf "$out.new" && mkdir -p "$out.new"
for attempt in $(seq 1 20); do
    sleep 3
    $vigil --state-dir "$out.new" --profiles guest-profiles baseline vigil-lab-capture >/dev/null
    sleep 3
    if $vigil --state-dir "$out.new" --profiles guest-profiles check vigil-lab-capture >/dev/null; then
        break
    fi
    [[ $attempt == 20 ]] && { say "error: the guest did not settle in a minute"; exit 1; }
done
say "dumping its memory"
virsh -c qemu:///system dump vigil-lab-capture "$out.new/guest.core" --memory-only --format elf >/dev/null
rm -rf "$out" && mv "$out.new" "$out"
say "ready: $out ($(du -sh "$out" | cut -f1))"
