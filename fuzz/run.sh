#!/usr/bin/env bash
# Runs vigil's fuzz targets (fuzz/README.md) with cargo-fuzz and libFuzzer,
# installing cargo-fuzz first if it is missing.
#
#   fuzz/run.sh smoke                 every target for 20 s from its seeds (CI)
#   fuzz/run.sh long [TARGET...]      each target for ten million runs or an
#                                     hour, whichever comes first
#
# Targets are built with AddressSanitizer, debug assertions and overflow
# checks. The machine has one stable toolchain; cargo-fuzz needs the
# compiler's sanitizer flags, which RUSTC_BOOTSTRAP=1 lets stable accept. A crash,
# hang (over 10 s on one input) or failed invariant stops the run, leaves
# the input in fuzz/artifacts/TARGET/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$HOME/.cargo/bin:$PATH" RUSTC_BOOTSTRAP=1
say() { printf 'fuzz/run: %s\n' "$*" >&2; }

mode=${1:-smoke}
shift || true
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz --version 0.13.2
cargo fuzz build --release --debug-assertions 2>&1 | grep -v '^ *\(Compiling\|Finished\)' || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || mapfile -t targets < <(cargo fuzz list)
case $mode in
    smoke) limits=(-max_total_time=20) ;;
    long) limits=(-runs=10000000 -max_total_time=3600) ;;
    *) say "unknown mode $mode (smoke or long)"; exit 2 ;;
esac
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t" "artifacts/$t"
    say "$t: ${limits[*]}"
    start=$(date +%s)
    log=$(mktemp)
    if ! cargo fuzz run --release --debug-assertions "$t" "corpus/$t" "seeds/$t" -- \
        "${limits[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        say "$t: FAILED after $(( $(date +%s) - start )) s; the input is in fuzz/artifacts/$t/"
        exit 1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    say "$t: ${runs:-?} runs in $(( $(date +%s) - start )) s, no crash, hang or failed invariant"
    rm -f "$log"
done
