#!/usr/bin/env bash
# A second libvirt host on this machine, for live-migration tests.
#
#   lab/second-libvirtd.sh start [ROOT]   prints the URI to reach it
#   lab/second-libvirtd.sh stop [ROOT]    destroys its domains, stops it
#
# libvirt refuses to migrate a domain to a libvirtd with its own host UUID
# ("Attempt to migrate guest to the same host"), and one libvirtd owns
# /run/libvirt, /var/lib/libvirt and the rest. So this one runs in a mount
# namespace of its own where those directories are ROOT's subdirectories
# (default /run/vigil-lab-b), with a host UUID of its own. Everything else
# (processes, network, /proc, the lab's kernel and sockets) is shared, as
# between two hosts with shared storage. QEMU's output goes to files, not to
# virtlogd. Its socket, seen from outside: ROOT/run/libvirt-sock.
set -euo pipefail
say() { printf 'lab/second-libvirtd: %s\n' "$*" >&2; }

cmd=${1:-}
root=${2:-/run/vigil-lab-b}
uri="qemu+unix:///system?socket=$root/run/libvirt-sock"
pidfile=$root/libvirtd.pid
running() { [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case $cmd in
start)
    if running; then
        echo "$uri"
        exit 0
    fi
    for dir in run lib cache log etc; do
        mkdir -p "$root/$dir"
    done
    # The host's configuration, without its domains and networks.
    cp -a /etc/libvirt/. "$root/etc/"
    rm -f "$root"/etc/qemu/*.xml
    rm -rf "$root/etc/qemu/networks/autostart" "$root/etc/qemu/autostart"
    printf '\nstdio_handler = "file"\n' >>"$root/etc/qemu.conf"
    # QEMU's probed capabilities, so that it is not probed again.
    cp -a /var/cache/libvirt/. "$root/cache/" 2>/dev/null || true
    lab=$(cd "$(dirname "$0")" && pwd)
    {
        cat "$lab/libvirtd.conf"
        printf 'host_uuid = "%s"\n' "$(cat /proc/sys/kernel/random/uuid)"
    } >"$root/libvirtd.conf"
    unshare --mount --propagation private -- bash -c '
        set -e
        root=$1
        mount --bind "$root/run" /run/libvirt
        mount --bind "$root/lib" /var/lib/libvirt
        mount --bind "$root/cache" /var/cache/libvirt
        mount --bind "$root/log" /var/log/libvirt
        mount --bind "$root/etc" /etc/libvirt
        exec libvirtd -d -f "$root/libvirtd.conf" -p "$root/libvirtd.pid"
    ' _ "$root"
    for _ in $(seq 1 60); do
        if virsh -c "$uri" version >/dev/null 2>&1; then
            echo "$uri"
            exit 0
        fi
        sleep 0.5
    done
    say "error: the second libvirtd does not answer at $uri after 30 s"
    exit 1
    ;;
stop)
    if running; then
        for dom in $(virsh -c "$uri" list --name 2>/dev/null); do
            virsh -c "$uri" destroy "$dom" >/dev/null 2>&1 || true
        done
        pid=$(cat "$pidfile")
        kill "$pid"
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
    fi
    # Only a directory this script made (it holds its libvirtd.conf).
    if [[ -f $root/libvirtd.conf ]]; then
        rm -rf "$root"
    fi
    ;;
*)
    say "usage: $0 start|stop [ROOT]"
    exit 2
    ;;
esac
