//! Lab tests of what KVM gives a host process other than QEMU: its
//! statistics, through libvirt, exported by the daemon; and nothing at all
//! through QEMU's own KVM file descriptors, which answer `EIO` to any other
//! process (what the README's "What comes from KVM" says).
//!
//! Needs the lab prepared, libvirtd running and `/dev/kvm` (`lab/test.sh`).

use std::time::Duration;

use vigil_lab::Lab;

mod common;
use common::{Daemon, boot};

fn kvm_guest(suffix: &str) -> vigil_lab::Guest {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this test needs KVM on the host (load kvm_intel or kvm_amd)"
    );
    let lab = Lab::open().unwrap_or_else(|e| panic!("{e}"));
    let shape = vigil_lab::Shape { kvm: true, ..vigil_lab::Shape::default() };
    lab.start_booting(suffix, &shape).unwrap_or_else(|e| panic!("{e}"))
}

/// KVM's own statistics of a watched domain run by KVM are exported (one
/// libvirt call every 5 s), and grow as it runs; a TCG domain
/// watched beside it has none. The KVM guest is nested here, about a
/// thousand times slower: it is still booting throughout, which is enough
/// for KVM to count its exits.
#[test]
fn lab_kvm_statistics_of_a_kvm_guest_are_exported_and_none_of_a_tcg_one() {
    let k = kvm_guest("dmn-kvm");
    let d = Daemon::start("vigil-lab-dmn-kvm*");
    let t = boot("dmn-kvmtcg");
    // The TCG guest is watched: its statistics were asked for at each
    // collection since.
    d.wait_watching(&t);
    let exits = |d: &Daemon| {
        d.metric(
            "vigil_kvm_vcpu_cumulative_total",
            &format!("domain=\"{}\",stat=\"exits\"", k.name),
        )
    };
    d.wait_for("KVM's exit count of the KVM guest", Duration::from_secs(30), |d| {
        exits(d).is_some_and(|n| n > 0.0)
    });
    let first = exits(&d).unwrap();
    // Collected again later, grown.
    d.wait_for("the exit count to grow", Duration::from_secs(15), |d| {
        exits(d).is_some_and(|n| n > first)
    });
    let text = d.metrics();
    let kvm_lines: Vec<&str> = text.lines().filter(|l| l.starts_with("vigil_kvm_")).collect();
    let of_k = format!("domain=\"{}\"", k.name);
    assert!(kvm_lines.iter().any(|l| *l == format!("vigil_kvm_vcpus{{{of_k}}} 1")), "{text}");
    // The VM's own statistics as well as its vCPU's, and gauges with them.
    for family in ["vigil_kvm_vm_cumulative_total{", "vigil_kvm_vm{", "vigil_kvm_vcpu{"] {
        assert!(
            kvm_lines.iter().any(|l| l.starts_with(family) && l.contains(&of_k)),
            "no {family}...}} of {}:\n{}",
            k.name,
            kvm_lines.join("\n")
        );
    }
    // The TCG guest's are none.
    assert!(
        kvm_lines.iter().all(|l| l.contains(&of_k)),
        "KVM statistics of another domain than {}:\n{}",
        k.name,
        kvm_lines.join("\n")
    );
    assert_eq!(d.metric("vigil_errors_total", "kind=\"kvm_stats\""), None);
    // Asked directly, libvirt answers for both domains, the TCG one with
    // nothing of KVM's: it was asked, and had none.
    let hv = vigil::libvirt::Hypervisor::connect("qemu:///system").unwrap();
    let both: std::collections::HashSet<String> = [k.uuid.clone(), t.uuid.clone()].into();
    // A QEMU busy with the daemon's own monitor command is not waited for
    // and gives none that time: asked again, a few times.
    let mut tries = 0;
    let (tcg, kvm, took) = loop {
        let asked = std::time::Instant::now();
        let got = hv.kvm_stats(&both).unwrap();
        let took = asked.elapsed();
        let of = |uuid: &str| got.iter().find(|(u, _, _)| u == uuid).map(|(_, _, s)| s.clone());
        let tcg = of(&t.uuid).expect("libvirt gave no statistics of the TCG domain");
        let kvm = of(&k.uuid).expect("libvirt gave no statistics of the KVM domain");
        tries += 1;
        if !kvm.is_empty() || tries == 5 {
            break (tcg, kvm, took);
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(tcg.is_empty(), "KVM statistics of a TCG domain: {tcg:?}");
    assert!(kvm.vcpu.len() >= 10 && !kvm.vm.is_empty(), "{kvm:#?}");
    println!("one collection of both domains took {took:?}");
    println!("{} exits, then {:?}; {} KVM series of {}", first, exits(&d), kvm_lines.len(), k.name);
}

/// The ioctl numbers of `linux/kvm.h` (x86-64): `_IOR`, `_IOW`, `_IO` of
/// KVM's type 0xAE with the argument's size.
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAE << 8) | nr
}
const KVM_GET_REGS: u64 = ioc(2, 0x81, 144);
const KVM_GET_SREGS: u64 = ioc(2, 0x83, 312);
const KVM_GET_STATS_FD: u64 = ioc(0, 0xce, 0);
const KVM_GET_DIRTY_LOG: u64 = ioc(1, 0x42, 16);

/// A copy of QEMU's file descriptor `fd`, taken with `pidfd_getfd`.
fn take_fd(pid: i32, fd: i32) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: plain system calls on integers; each descriptor returned is
    // new and owned here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        assert!(pidfd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
        let pidfd = std::os::fd::OwnedFd::from_raw_fd(i32::try_from(pidfd).unwrap());
        let got =
            libc::syscall(libc::SYS_pidfd_getfd, std::os::fd::AsRawFd::as_raw_fd(&pidfd), fd, 0);
        assert!(got >= 0, "pidfd_getfd({pid}, {fd}): {}", std::io::Error::last_os_error());
        std::os::fd::OwnedFd::from_raw_fd(i32::try_from(got).unwrap())
    }
}

/// The error of ioctl `request` on `fd`, with room for its argument.
fn ioctl_error(fd: &std::os::fd::OwnedFd, request: u64) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let mut arg = [0u64; 64];
    // SAFETY: the argument is 512 bytes, more than any request here
    // reads or writes (KVM_GET_DIRTY_LOG's bitmap pointer is null: it
    // fails before using it, or says EFAULT).
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg.as_mut_ptr()) };
    (rc < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// What the README says of KVM's file descriptors, on this host's kernel:
/// QEMU's VM and vCPU descriptors can be taken (root, `pidfd_getfd`), but
/// every ioctl on them answers `EIO` to this process, KVM serving a VM only
/// in the process that created it: registers, binary statistics and the
/// dirty log alike. A statistics descriptor QEMU holds (8.1 on) is read
/// through its copy. Hence registers and memory layout through QEMU's
/// monitor, statistics through libvirt, and no dirty logging.
#[test]
fn lab_kvm_qemus_kvm_descriptors_answer_eio_to_another_process() {
    let k = kvm_guest("kvm-fds");
    let hv = vigil::libvirt::Hypervisor::connect("qemu:///system").unwrap();
    let pid = hv.domain(&k.name).unwrap().qemu_pid().unwrap();
    let (mut vm, mut vcpu) = (None, None);
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let link = std::fs::read_link(entry.path()).unwrap_or_default();
        let link = link.to_string_lossy();
        let fd: i32 = entry.file_name().to_string_lossy().parse().unwrap();
        match link.as_ref() {
            "anon_inode:kvm-vm" => vm = Some(fd),
            "anon_inode:kvm-vcpu:0" => vcpu = Some(fd),
            _ => {}
        }
        // QEMU 8.1 and later keep each vCPU's statistics descriptor open
        // (7.2, Debian 12's, keeps none): its reads are not tied to the
        // process that made it, so a copy reads KVM's statistics header.
        if link.starts_with("anon_inode:kvm-") && link.contains("-stats") {
            let copy = take_fd(pid, fd);
            let mut header = [0u32; 6];
            // SAFETY: reads at most the 24 bytes of `header`.
            let n = unsafe {
                libc::pread(
                    std::os::fd::AsRawFd::as_raw_fd(&copy),
                    header.as_mut_ptr().cast(),
                    24,
                    0,
                )
            };
            assert_eq!(n, 24, "reading QEMU's {link}: {}", std::io::Error::last_os_error());
            assert!(header[2] > 0, "{link}: a statistics header of no descriptors: {header:?}");
            println!("QEMU holds {link}; its copy reads {} statistics", header[2]);
        }
    }
    let (vm, vcpu) = (
        take_fd(pid, vm.expect("QEMU of a KVM domain holds no kvm-vm descriptor")),
        take_fd(pid, vcpu.expect("QEMU of a KVM domain holds no kvm-vcpu:0 descriptor")),
    );
    let asked = [
        ("KVM_GET_REGS on the vCPU", &vcpu, KVM_GET_REGS),
        ("KVM_GET_SREGS on the vCPU", &vcpu, KVM_GET_SREGS),
        ("KVM_GET_STATS_FD on the vCPU", &vcpu, KVM_GET_STATS_FD),
        ("KVM_GET_STATS_FD on the VM", &vm, KVM_GET_STATS_FD),
        ("KVM_GET_DIRTY_LOG on the VM", &vm, KVM_GET_DIRTY_LOG),
    ];
    for (what, fd, request) in asked {
        let got = ioctl_error(fd, request);
        assert_eq!(
            got,
            Some(libc::EIO),
            "{what}: {got:?} (EIO is {}): KVM now serves another process; the README's account of KVM's interfaces needs a look",
            libc::EIO
        );
    }
}
