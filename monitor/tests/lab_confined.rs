//! The daemon confined as the shipped unit (systemd/vigil.service) confines
//! it, applied by the lab's launcher (`vigil_lab::confine`) since no systemd
//! runs here: user vigil, the unit's capabilities and nothing else, its
//! system-call filter. Every lab test's daemon runs so (tests/common); these
//! tests check that the confinement is really in force and that each
//! capability the unit keeps is needed.
//!
//! Needs the lab prepared (lab/setup.sh creates user vigil) and libvirtd
//! started by lab/services.sh.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use vigil_lab::confine::{Confinement, capability_mask};

mod common;
use common::{Daemon, boot, shipped_confinement, unit_settings};

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc status:\n{status}"))
        .trim()
        .to_owned()
}

#[test]
fn lab_confined_daemon_watches_a_guest_as_user_vigil_with_only_the_units_capabilities() {
    let unit = unit_settings();
    let mut kept = unit.capabilities();
    kept.sort();
    assert_eq!(
        kept,
        ["CAP_CHECKPOINT_RESTORE", "CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"],
        "the unit's capabilities changed: update the unit's comment, the README and this test"
    );
    let g = boot("cnf");
    let d = Daemon::start(&g.name);
    d.wait_watching(&g);
    let pid = d.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let confinement = shipped_confinement();
    let uid = status_field(&status, "Uid:");
    assert!(
        uid.split_whitespace().all(|u| u == confinement.uid.to_string()),
        "Uid: {uid}, want {} (user vigil) throughout",
        confinement.uid
    );
    let mask = format!("{:016x}", capability_mask(&kept).unwrap());
    for set in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
        assert_eq!(status_field(&status, set), mask, "{set} of the daemon");
    }
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1");
    assert_eq!(status_field(&status, "Seccomp:"), "2", "a seccomp filter is in force");
    // It reads the guest's RAM through the shared mapping, not a fallback.
    let s = d.status(&g.name).unwrap();
    assert_eq!(s["state"], "watching", "{s}");
}

#[test]
fn lab_confined_daemon_needs_each_capability_the_unit_keeps() {
    let g = boot("cnf-caps");
    let unit = unit_settings();
    // What each capability is for (the unit's comment), seen as what fails
    // without it.
    let expected = |cap: &str| match cap {
        "CAP_SYS_PTRACE" => "is not visible in /proc",
        "CAP_DAC_READ_SEARCH" => "map_files",
        "CAP_CHECKPOINT_RESTORE" => "map_files",
        other => panic!("no expectation for {other}: say what it is needed for"),
    };
    let errno = |cap: &str| match cap {
        "CAP_DAC_READ_SEARCH" => "Permission denied",
        "CAP_CHECKPOINT_RESTORE" => "Operation not permitted",
        _ => "",
    };
    for cap in unit.capabilities() {
        let mut d = Daemon::unstarted(&g.name, "");
        d.confinement = Arc::new(
            Confinement::new(&unit.without_capability(&cap)).unwrap_or_else(|e| panic!("{e}")),
        );
        d.spawn();
        d.wait_for(&format!("a failed attach without {cap}"), Duration::from_secs(30), |d| {
            !d.events("waiting", &g.name).is_empty()
        });
        std::thread::sleep(Duration::from_secs(5));
        let s = d.status(&g.name).unwrap();
        assert_eq!(s["state"], "waiting", "without {cap} the daemon must not read the guest: {s}");
        let detail = d.events("waiting", &g.name)[0]["detail"].as_str().unwrap().to_owned();
        assert!(detail.contains(&g.name), "the failure names the domain: {detail}");
        assert!(
            detail.contains(expected(&cap)) && detail.contains(errno(&cap)),
            "without {cap}: {detail}"
        );
    }
}

#[test]
fn confined_filter_denies_what_the_unit_denies() {
    // ioprio_set is in @resources, which the unit denies; any user may set
    // its own best-effort I/O priority, so only the filter can refuse it.
    let run = |confined: bool| {
        let mut cmd = Command::new("ionice");
        cmd.args(["-c", "2", "-n", "7", "true"]);
        if confined {
            shipped_confinement().apply(&mut cmd);
        }
        cmd.output().expect("ionice (util-linux)")
    };
    assert!(run(false).status.success(), "ionice works unconfined");
    let out = run(true);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Operation not permitted"), "{err}");
    // chown (in @privileged) of a file to a group the user is in: allowed
    // by the kernel, denied by the filter.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"").unwrap();
    let c = shipped_confinement();
    std::os::unix::fs::chown(dir.path(), Some(c.uid), Some(c.gid)).unwrap();
    std::os::unix::fs::chown(&file, Some(c.uid), Some(c.gid)).unwrap();
    let chgrp = |confinement: &Arc<Confinement>| {
        let mut cmd = Command::new("chgrp");
        cmd.arg("libvirt").arg(&file);
        confinement.apply(&mut cmd);
        cmd.output().unwrap()
    };
    let out = chgrp(&c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("Operation not permitted"), "{err}");
    // The same user and capabilities with only the unit's allow-list (no
    // denials): the kernel lets it, so the refusal above is the filter's.
    let mut allow_only = unit_settings();
    allow_only.syscall_filter.truncate(1);
    let out = chgrp(&Arc::new(Confinement::new(&allow_only).unwrap()));
    assert!(
        out.status.success(),
        "chgrp without the denials: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
