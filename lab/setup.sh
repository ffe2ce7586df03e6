#!/usr/bin/env bash
# Prepares the vigil lab on a Debian 12 host, for each of the two kernel lines
# the lab runs (Debian 12's 6.1 and the 6.12 of Debian 13 and bookworm
# backports): the pinned guest kernel, the attack modules built against its
# headers, and a busybox initramfs that carries them.
#
#   lab/setup.sh [--install]    --install first apt-get installs what the lab needs
#
# Output goes to $VIGIL_LAB_DIR (default /var/lib/vigil-lab) for 6.1 and to
# its subdirectory 6.12 for 6.12, readable by the libvirt-qemu user. Safe to
# run again: finished steps are skipped.
set -euo pipefail

PINNED_61=6.1.0-56
PINNED_612=6.12.111+deb12
LAB_DIR=${VIGIL_LAB_DIR:-/var/lib/vigil-lab}
HERE=$(cd "$(dirname "$0")" && pwd)
PACKAGES=(qemu-system-x86 libvirt-daemon-system libvirt-clients busybox-static
          cpio gzip xz-utils make gcc libc6-dev systemd prometheus prometheus-alertmanager util-linux procps
          chromium linux-libc-dev e2fsprogs ca-certificates curl)

say() { printf 'lab/setup: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if [[ ${1:-} == --install ]]; then
    say "installing packages: ${PACKAGES[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >/dev/null
fi

# The daemon's own user, as the package makes it (lab tests run the daemon as
# it, under the unit's capabilities and system-call filter).
systemd-sysusers "$HERE/../systemd/vigil.sysusers" || die "systemd-sysusers could not create user vigil"
# An operator: not root, a listed member of group vigil (lab tests use the
# control socket as it, as a host's operators do).
systemd-sysusers --inline 'u vigil-lab-operator - "vigil lab operator, in group vigil"' \
    'm vigil-lab-operator vigil' || die "systemd-sysusers could not create user vigil-lab-operator"

mkdir -p "$LAB_DIR"
chmod 0755 "$LAB_DIR"
[[ -x /bin/busybox ]] || die "/bin/busybox not found: apt-get install busybox-static"

# prepare LINE ABI PACKAGE-SUFFIX DIR: the kernel of build ABI (from package
# linux-image-ABI-cloud-amd64SUFFIX), the modules, and the initramfs, in DIR.
prepare() {
    local line=$1 abi=$2 suffix=$3 dir=$4
    local flavour="$abi-cloud-amd64"
    local package="linux-image-$flavour$suffix"
    local headers=/usr/src/linux-headers-$flavour
    if [[ ! -d $headers ]]; then
        say "$line: installing linux-headers-$flavour"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$flavour" >/dev/null \
            || die "could not install linux-headers-$flavour (apt-get update first?)"
    fi
    mkdir -p "$dir"
    chmod 0755 "$dir"
    (
    cd "$dir"
    # The kernel, and the two modules an ACPI lab guest needs to hear its
    # power button (what `virsh reboot` presses): the ACPI button driver and
    # evdev (compressed in later packages: the guest's busybox insmod takes
    # them plain).
    if [[ ! -s vmlinuz || ! -s kmods/button.ko || $(cat kernel-release 2>/dev/null) != "$flavour" ]]; then
        say "$line: fetching $package"
        rm -rf kernel-unpacked ./*.deb kmods
        apt-get download "$package" 2>/dev/null || die "apt-get download $package failed"
        dpkg-deb -x "$package"_*.deb kernel-unpacked
        cp "kernel-unpacked/boot/vmlinuz-$flavour" vmlinuz
        mkdir kmods
        for m in drivers/acpi/button drivers/input/evdev; do
            local ko="kernel-unpacked/lib/modules/$flavour/kernel/$m.ko"
            if [[ -f $ko ]]; then
                cp "$ko" kmods/
            elif [[ -f $ko.xz ]]; then
                xz -dc "$ko.xz" > "kmods/$(basename "$m").ko" || die "$ko.xz: xz -d failed"
            else
                die "$m.ko is not in $package"
            fi
        done
        echo "$flavour" > kernel-release
        rm -rf kernel-unpacked ./*.deb
    fi

    say "$line: building the attack modules against $headers"
    rm -rf modules-build
    cp -r "$HERE/modules" modules-build
    make -s -C "$headers" M="$dir/modules-build" modules >modules-build.log 2>&1 \
        || { cat modules-build.log >&2; die "$line: module build failed (log above)"; }

    say "$line: building the initramfs"
    local root
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/vigil}
    cp /bin/busybox "$root/bin/busybox"
    cp "$HERE/initramfs/init" "$root/init"
    cp "$HERE/initramfs/attack" "$root/bin/attack"
    cp "$HERE/initramfs/storm" "$root/bin/storm"
    gcc -O2 -static -o "$root/bin/grind" "$HERE/initramfs/grind.c" \
        || die "building grind failed: apt-get install gcc libc6-dev"
    gcc -O2 -static -o "$root/bin/bpfprobe" "$HERE/initramfs/bpfprobe.c" \
        || die "building bpfprobe failed: apt-get install gcc libc6-dev linux-libc-dev"
    cp modules-build/*.ko "$root/lib/vigil/"
    mkdir -p "$root/lib/kmods" "$root/etc/acpi/PWRF"
    cp kmods/*.ko "$root/lib/kmods/"
    # busybox acpid runs CONFDIR/PWRF/00000080 for the power button.
    printf '#!/bin/sh\npoweroff -f\n' > "$root/etc/acpi/PWRF/00000080"
    chmod 0755 "$root/etc/acpi/PWRF/00000080"
    (cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > initramfs.cpio.gz.new
    rm -rf "$root"
    mv initramfs.cpio.gz.new initramfs.cpio.gz
    chmod 0644 vmlinuz initramfs.cpio.gz
    say "$line: ready: $dir/vmlinuz ($flavour) and $dir/initramfs.cpio.gz"
    )
}

# 6.1: the pinned build, or, once it has left the archive, the build that
# the linux-image-cloud-amd64 metapackage depends on.
abi=$PINNED_61
if ! apt-cache show "linux-image-$abi-cloud-amd64" >/dev/null 2>&1; then
    dep=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
          | sed -n 's/.*Depends: linux-image-\(.*\)-cloud-amd64.*/\1/p' | head -n 1)
    [[ -n $dep ]] || die "neither linux-image-$PINNED_61-cloud-amd64 nor linux-image-cloud-amd64 is known to apt (run apt-get update)"
    say "pinned kernel $PINNED_61 has left the archive; using $dep"
    abi=$dep
fi
prepare 6.1 "$abi" "" "$LAB_DIR"

# 6.12: the pinned build (the unsigned image: the same kernel as the signed
# one without the Secure Boot signature), or, once it has left the archive,
# the newest 6.12 cloud build apt knows.
abi=$PINNED_612
if ! apt-cache show "linux-image-$abi-cloud-amd64-unsigned" >/dev/null 2>&1; then
    dep=$(apt-cache pkgnames linux-image-6.12. 2>/dev/null \
          | sed -n 's/^linux-image-\(6\.12\.[0-9]*+deb[0-9]*\)-cloud-amd64-unsigned$/\1/p' \
          | sort -V | tail -n 1)
    [[ -n $dep ]] || die "neither linux-image-$PINNED_612-cloud-amd64-unsigned nor another 6.12 cloud build is known to apt (run apt-get update)"
    say "pinned kernel $PINNED_612 has left the archive; using $dep"
    abi=$dep
fi
prepare 6.12 "$abi" "-unsigned" "$LAB_DIR/6.12"
