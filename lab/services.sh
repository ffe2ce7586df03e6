#!/usr/bin/env bash
# Starts what the lab needs on a host where no systemd runs as PID 1 (CI, and
# the development machines): /dev/kvm for group kvm (without it libvirt
# re-probes QEMU at every domain start, about a minute each), virtlogd and
# libvirtd. On a host with systemd it asks systemd instead. Safe to run again.
set -euo pipefail
say() { printf 'lab/services: %s\n' "$*" >&2; }

if [[ -e /dev/kvm ]] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
if [[ $(cat /proc/1/comm 2>/dev/null) == systemd ]]; then
    systemctl start virtlogd libvirtd
else
    pgrep -x virtlogd >/dev/null || { say "starting virtlogd"; virtlogd -d; }
    # lab/libvirtd.conf lets group libvirt (vigil's unit runs in it) use the
    # read-write socket. A libvirtd started without it is restarted; running
    # domains carry on.
    # The system libvirtd is the one in /run/libvirtd.pid (the migration
    # tests' second one, lab/second-libvirtd.sh, keeps its own pid file).
    sock=/run/libvirt/libvirt-sock
    system_libvirtd() { [[ -s /run/libvirtd.pid ]] && kill -0 "$(cat /run/libvirtd.pid)" 2>/dev/null; }
    if system_libvirtd && [[ $(stat -c %G:%a "$sock" 2>/dev/null) != libvirt:770 ]]; then
        say "restarting libvirtd with lab/libvirtd.conf"
        pid=$(cat /run/libvirtd.pid)
        kill "$pid"
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    fi
    system_libvirtd || { say "starting libvirtd"; libvirtd -d -f "$(cd "$(dirname "$0")" && pwd)/libvirtd.conf"; }
fi
for _ in $(seq 1 60); do
    if virsh -c qemu:///system version >/dev/null 2>&1; then
        exit 0
    fi
    sleep 0.5
done
say "error: libvirtd does not answer at qemu:///system after 30 s"
exit 1
