#!/usr/bin/env bash
# vigil's main job, end to end, on a fresh Debian 12 machine, as root:
# boot a lab guest of the Debian cloud kernel under libvirt, make the
# kernel's profile from its vmlinuz, baseline the kernel from the host, let
# a rootkit module hook a kernel function and show what `vigil check` and
# `vigil diff` report, then run the daemon and time how long it takes to
# alert on a second attack, with its metrics. The guest is destroyed at the
# end.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

# VIGIL_DEMO_BIN: a directory holding vigil and vigil-lab already built, on
# a machine already set up (the lab test of this script uses it).
if [[ -z ${VIGIL_DEMO_BIN:-} ]]; then
    lab/setup.sh --install
    lab/services.sh
    cargo build --release --quiet -p vigil -p vigil-lab
    VIGIL_DEMO_BIN=target/release
fi
vigil=$VIGIL_DEMO_BIN/vigil
lab=$VIGIL_DEMO_BIN/vigil-lab
state=$(mktemp -d)
daemon=
cleanup() {
    [[ -n $daemon ]] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    $lab stop demo >/dev/null 2>&1 || true
    rm -rf "$state"
}
trap cleanup EXIT

started=$(date +%s)
step() { printf '\n== %s\n' "$*"; }
step "booting lab guest vigil-lab-demo (TCG, Debian cloud kernel $(cat /var/lib/vigil-lab/kernel-release))"
$lab start demo
sleep 3
$vigil domains
step "vigil profile build /var/lib/vigil-lab/vmlinuz   (what vigil knows of this kernel build, from the vendor's image)"
$vigil --state-dir "$state" profile build /var/lib/vigil-lab/vmlinuz
step "vigil profile list   (found without --profiles: the build went onto the search path)"
$vigil --state-dir "$state" profile list
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
step "vigil diff vigil-lab-demo --region kernel-text   (the bytes and code before and after)"
$vigil --state-dir "$state" diff vigil-lab-demo --region kernel-text || [[ $? == 1 ]]

step "vigil daemon: checking vigil-lab-demo every second, metrics on 127.0.0.1:9797"
cat >"$state/vigil.toml" <<EOF
metrics_listen = "127.0.0.1:9797"
control_socket = "$state/control.sock"
[domains]
include = ["vigil-lab-demo"]
[schedule]
hot_interval = "1s"
full_interval = "1s"
EOF
$vigil --state-dir "$state" daemon --config "$state/vigil.toml" >"$state/daemon.out" 2>"$state/daemon.log" &
daemon=$!
for _ in $(seq 60); do
    grep -q '"event":"violation"' "$state/alerts.jsonl" 2>/dev/null && break
    sleep 0.5
done
grep -q '"event":"violation"' "$state/alerts.jsonl" || { cat "$state/daemon.log"; exit 1; }
# One alert line a field a line: when, what, where, and the evidence.
show() {
    grep -o '"\(time\|event\|severity\|domain\|region\|kind\|gva\|detail\|symbol\|before\|after\)":"[^"]*"' |
        sed 's/^/    /'
}
echo "attached ($state/alerts.jsonl); the hook already there is its first alert:"
grep '"event":"violation"' "$state/alerts.jsonl" | head -n 1 | show
step "in the guest: a second attack, a syscall table entry pointed at the rootkit"
before=$(grep -c '"event":"violation"' "$state/alerts.jsonl" || true)
attacked=$(date +%s.%N)
$lab exec demo attack syscall >/dev/null
done_at=$(date +%s.%N)
alerted=
for _ in $(seq 200); do
    if grep '"event":"violation"' "$state/alerts.jsonl" | tail -n +"$((before + 1))" | grep -q sys_call_table; then
        alerted=$(date +%s.%N)
        break
    fi
    sleep 0.05
done
[[ -n $alerted ]] || { echo "no alert within 10 s"; cat "$state/daemon.log"; exit 1; }
grep '"event":"violation"' "$state/alerts.jsonl" | grep '"region":"sys_call_table"' | head -n 1 | show
awk -v a="$attacked" -v d="$done_at" -v t="$alerted" 'BEGIN {
    printf "alerted %.1f s after the attack command returned (%.1f s after it was sent: the command loads the module in the guest)\n", t - d, t - a
}'
step "curl -s http://127.0.0.1:9797/metrics   (the counts that moved)"
curl -s http://127.0.0.1:9797/metrics | grep -E '^vigil_(violations_total|checks_total|open_violations)' |
    grep demo | grep -v ' 0$'
printf '\ndemo done in %s s (after setup)\n' "$(($(date +%s) - started))"
