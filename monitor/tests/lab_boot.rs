//! Lab tests of boot identity: whether a watched guest booted again is the
//! hypervisor's to say. A kernel the guest moves to other frames is a
//! violation, never a new baseline; a reset or reboot that libvirt reports
//! is a new boot; stored state that cannot be read is an alarm, not a reset.
//!
//! Each boots a real guest of the pinned Debian cloud kernel under libvirt
//! and runs the real daemon, confined as the shipped unit. Needs the lab
//! prepared and libvirtd running (`lab/test.sh` does both).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

mod common;
use common::{Daemon, FULL, boot, vigil_in, violations};

/// The daemon's baseline of `g`, and its original pages.
fn stored(d: &Daemon, g: &vigil_lab::Guest) -> (PathBuf, PathBuf) {
    let b = vigil::paths::baseline_path(d.dir.path(), &g.uuid);
    let pages = vigil::integrity::Originals::path_for(&b);
    (b, pages)
}

/// Files kept aside beside `path` (named `<file>.set-aside-<time>`).
fn kept_aside(path: &Path) -> Vec<PathBuf> {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    let mut out: Vec<PathBuf> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .strip_prefix(&name)
                .is_some_and(|rest| rest.starts_with(".set-aside-"))
        })
        .collect();
    out.sort();
    out
}

/// A file's bytes, or those of the file a spoiled path holds.
fn contents(path: &Path) -> Vec<u8> {
    if path.is_dir() { std::fs::read(path.join("was")) } else { std::fs::read(path) }.unwrap()
}

fn detail(a: &Value) -> &str {
    a["detail"].as_str().unwrap_or("")
}

/// The guest's kernel text moved whole to copies by a module, one copy
/// holding an int3 run at the start of a syscall handler (`acct`, which
/// nothing in the lab calls: an int3 executed would crash the guest): one critical
/// remap alert that says the image was remapped, a content alert at the
/// patched function, no new baseline; `vigil check` says the same (exit 1),
/// not "another boot".
#[test]
fn lab_daemon_catches_a_kernel_text_moved_whole_to_copies() {
    let d = Daemon::start("vigil-lab-remap-whole");
    let mut g = boot("remap-whole");
    d.wait_watching(&g);
    let boot_before = d.status(&g.name).unwrap()["boot"].clone();
    g.run("attack remap whole").unwrap_or_else(|e| panic!("{e}"));
    let said = g.run("dmesg | grep 'vigil-lab: remap whole'").unwrap_or_else(|e| panic!("{e}"));
    assert!(said.contains("2M and"), "the module moved nothing: {said}");
    d.wait_for("the remap and the int3s", 2 * FULL + Duration::from_secs(3), |d| {
        let text = violations(d, &g, "kernel-text");
        text.iter().any(|a| a["kind"] == "remap") && text.iter().any(|a| a["kind"] == "content")
    });
    let text = violations(&d, &g, "kernel-text");
    let remap: Vec<&Value> = text.iter().filter(|a| a["kind"] == "remap").collect();
    assert_eq!(remap.len(), 1, "one alert for the moved image: {remap:#?}");
    assert_eq!(remap[0]["severity"], "critical");
    assert!(
        detail(remap[0]).starts_with("kernel image remapped: ")
            && detail(remap[0]).contains("pages of kernel-text now map other memory"),
        "{:#}",
        remap[0]
    );
    assert!(remap[0]["pages"].as_u64().unwrap() > 100, "{:#}", remap[0]);
    let content: Vec<&Value> = text.iter().filter(|a| a["kind"] == "content").collect();
    assert!(
        content.iter().any(|a| a["symbol"].as_str().unwrap_or("").starts_with("__x64_sys_acct")),
        "the int3s named at their function: {content:#?}"
    );
    std::thread::sleep(2 * FULL);
    assert_eq!(d.events("new-boot", &g.name).len(), 1, "only first sight: {:#?}", d.alerts());
    assert_eq!(d.status(&g.name).unwrap()["boot"], boot_before, "the baseline was replaced");
    // The CLI against the daemon's baseline: violations, not another boot.
    let out = vigil_in(d.dir.path(), &["check", &g.name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("remap"), "{text}");
}

/// One 4 KiB text page, then the 2 MiB of text around another function,
/// moved to copies: each a critical remap with the old and new frame, and
/// the copies' int3s content violations at their functions.
#[test]
fn lab_daemon_catches_a_single_text_page_moved_4k_and_2m() {
    let d = Daemon::start("vigil-lab-remap-page");
    let mut g = boot("remap-page");
    d.wait_watching(&g);
    g.run("attack remap page4k __x64_sys_acct").unwrap_or_else(|e| panic!("{e}"));
    d.wait_for("the 4 KiB page's remap", 2 * FULL + Duration::from_secs(3), |d| {
        violations(d, &g, "kernel-text").iter().any(|a| a["kind"] == "remap")
            && violations(d, &g, "kernel-text").iter().any(|a| a["kind"] == "content")
    });
    let remap = violations(&d, &g, "kernel-text");
    let remap: Vec<&Value> = remap.iter().filter(|a| a["kind"] == "remap").collect();
    assert_eq!(remap[0]["pages"], 1, "{:#?}", remap);
    assert!(detail(remap[0]).contains("now maps guest-physical"), "{:#}", remap[0]);
    assert_ne!(remap[0]["before"], remap[0]["after"]);
    let before = violations(&d, &g, "kernel-text").len();
    // Another syscall handler nothing in the lab calls, in another 2 MiB.
    let acct = g.symbol("__x64_sys_acct").unwrap();
    let other = ["__x64_sys_swapoff", "__x64_sys_quotactl", "__x64_sys_kexec_load"]
        .into_iter()
        .find(|f| g.symbol(f).is_ok_and(|a| a >> 21 != acct >> 21))
        .expect("a handler outside acct's 2 MiB");
    g.run(&format!("attack remap page2m {other}")).unwrap_or_else(|e| panic!("{e}"));
    d.wait_for("the 2 MiB page's remap", 2 * FULL + Duration::from_secs(3), |d| {
        violations(d, &g, "kernel-text")
            .iter()
            .any(|a| a["kind"] == "remap" && a["pages"].as_u64().unwrap_or(0) >= 512)
    });
    // The content alert grows to the second copy's int3s (a group of pages
    // lists their addresses).
    let at = format!("{:#x}", g.symbol(other).unwrap());
    d.wait_for("the second int3s", 2 * FULL + Duration::from_secs(3), |d| {
        violations(d, &g, "kernel-text")
            .iter()
            .any(|a| a["kind"] == "content" && a["pages"] == 2 && detail(a).contains(&at))
    });
    assert!(violations(&d, &g, "kernel-text").len() > before);
    assert_eq!(d.events("new-boot", &g.name).len(), 1, "{:#?}", d.alerts());
}

/// `virsh reset` and `virsh reboot` restart the guest with a new KASLR
/// placement: libvirt reports both, so each is a new baseline with a
/// `new-boot` event that names libvirt as the source, and neither is a
/// violation. (A reboot from inside is
/// `lab_daemon_rebaselines_a_reboot_and_detaches_a_destroyed_domain`.)
#[test]
fn lab_daemon_rebaselines_a_virsh_reset_and_a_virsh_reboot() {
    let d = Daemon::start("vigil-lab-boot-reset");
    let lab = vigil_lab::Lab::open().unwrap_or_else(|e| panic!("{e}"));
    let shape = vigil_lab::Shape { acpi: true, ..vigil_lab::Shape::default() };
    let mut g = lab.start_with("boot-reset", &shape).unwrap_or_else(|e| panic!("{e}"));
    d.wait_watching(&g);
    for (i, how) in ["reset", "reboot"].into_iter().enumerate() {
        let before = d.status(&g.name).unwrap()["boot"].clone();
        match how {
            "reset" => g.reset(),
            _ => g.reboot_by_libvirt(),
        }
        .unwrap_or_else(|e| panic!("{e}"));
        d.wait_for(&format!("the new boot after virsh {how}"), Duration::from_secs(90), |d| {
            d.status(&g.name).is_some_and(|s| s["state"] == "watching" && s["boot"] != before)
        });
        let boots = d.events("new-boot", &g.name);
        assert_eq!(boots.len(), i + 2, "after virsh {how}: {:#?}", d.alerts());
        let last = boots.last().unwrap();
        assert_eq!(last["severity"], "info", "{last:#}");
        assert!(detail(last).contains("libvirt reported a reset"), "{last:#}");
    }
    assert!(d.events("violation", &g.name).is_empty(), "{:#?}", d.alerts());
}

/// The daemon down while the guest reboots (the same QEMU process: libvirt
/// keeps no record of resets to ask for afterwards). Back up, it finds the
/// kernel moved, virtually too: a new baseline of the new boot with a
/// warning that says the reboot is unconfirmed and keeps the old baseline
/// aside; no violation. Then down again while the domain is destroyed and
/// started: a new QEMU process, a confirmed new boot.
#[test]
fn lab_daemon_restarted_across_guest_reboots_ends_with_the_right_baseline() {
    let mut d = Daemon::start("vigil-lab-boot-down");
    let mut g = boot("boot-down");
    d.wait_watching(&g);
    let (path, _) = stored(&d, &g);
    let boot_before = d.status(&g.name).unwrap()["boot"].clone();
    d.kill9();
    g.reboot().unwrap_or_else(|e| panic!("{e}"));
    d.spawn();
    d.wait_watching(&g);
    let boots = d.events("new-boot", &g.name);
    assert_eq!(boots.len(), 2, "{:#?}", d.alerts());
    assert_eq!(boots[1]["severity"], "warning", "{:#}", boots[1]);
    assert!(detail(&boots[1]).contains("cannot confirm"), "{:#}", boots[1]);
    assert_eq!(kept_aside(&path).len(), 1, "the old baseline kept aside");
    let boot_now = d.status(&g.name).unwrap()["boot"].clone();
    assert_ne!(boot_now, boot_before);
    let b = vigil::integrity::Baseline::load(&path).unwrap();
    assert_eq!(b.kernel.boot_key(), boot_now.as_str().unwrap(), "the baseline is of the new boot");
    std::thread::sleep(2 * FULL);
    assert!(d.events("violation", &g.name).is_empty(), "{:#?}", d.alerts());

    // Down again; the domain destroyed and started anew: another process.
    d.kill9();
    g.restart_process().unwrap_or_else(|e| panic!("{e}"));
    d.spawn();
    d.wait_watching(&g);
    let boots = d.events("new-boot", &g.name);
    assert_eq!(boots.len(), 3, "{:#?}", d.alerts());
    assert_eq!(boots[2]["severity"], "info", "{:#}", boots[2]);
    assert!(detail(&boots[2]).contains("a new QEMU process"), "{:#}", boots[2]);
    let boot_now = d.status(&g.name).unwrap()["boot"].clone();
    let b = vigil::integrity::Baseline::load(&path).unwrap();
    assert_eq!(b.kernel.boot_key(), boot_now.as_str().unwrap());
    std::thread::sleep(2 * FULL);
    assert!(d.events("violation", &g.name).is_empty(), "{:#?}", d.alerts());
}

/// How a stored file is spoiled while the daemon is down.
#[derive(Debug, Clone, Copy)]
enum Spoil {
    Corrupt,
    Truncated,
    Unreadable,
    OtherDomains,
}

fn spoil(path: &Path, how: Spoil) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| {
        let dir: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        panic!("{}: {e}; the directory holds {dir:?}", path.display())
    });
    match how {
        Spoil::Corrupt => {
            let mut b = bytes;
            let mid = b.len() / 2;
            b[mid..mid + 64].fill(b'#');
            std::fs::write(path, b).unwrap();
        }
        Spoil::Truncated => std::fs::write(path, &bytes[..bytes.len() / 3]).unwrap(),
        // Permissions do not stop the daemon (the unit grants it
        // CAP_DAC_READ_SEARCH to map guest RAM), and the test gives the
        // state directory to its user at every start: what it cannot read
        // is a directory where the file should be (EISDIR).
        Spoil::Unreadable => {
            std::fs::remove_file(path).unwrap();
            std::fs::create_dir(path).unwrap();
            std::fs::write(path.join("was"), bytes).unwrap();
        }
        Spoil::OtherDomains => {
            let text = String::from_utf8(bytes).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap();
            let uuid = v["domain"]["uuid"].as_str().unwrap().to_owned();
            let text = text.replace(&uuid, "00000000-0000-4000-8000-00000000beef");
            std::fs::write(path, text).unwrap();
        }
    }
}

/// Each way a stored baseline or its original pages can be spoiled while
/// the daemon is down: a critical `state-unreadable` event naming the file
/// and the reason, the file kept aside with its bytes (never overwritten),
/// and the daemon watching on with what it can trust.
#[test]
fn lab_daemon_stored_state_that_cannot_be_read_is_an_alarm_not_a_reset() {
    let mut d = Daemon::start("vigil-lab-boot-state");
    let g = boot("boot-state");
    d.wait_watching(&g);
    let (baseline, pages) = stored(&d, &g);
    let cases = [
        (&baseline, Spoil::Corrupt, "not a vigil baseline"),
        (&baseline, Spoil::Truncated, "not a vigil baseline"),
        (&baseline, Spoil::Unreadable, "cannot read"),
        (&baseline, Spoil::OtherDomains, "not of vigil-lab-boot-state"),
        (&pages, Spoil::Corrupt, "original pages"),
        (&pages, Spoil::Truncated, "original pages"),
        (&pages, Spoil::Unreadable, "cannot read"),
    ];
    // The original pages of the baseline in force: a spoiled pages file is
    // kept aside and not made again until the next baseline, so the next
    // case starts from this copy.
    let mut good_pages = None;
    for (i, (file, how, reason)) in cases.into_iter().enumerate() {
        d.kill9();
        match std::fs::read(&pages) {
            Ok(b) => good_pages = Some(b),
            Err(_) => std::fs::write(&pages, good_pages.as_ref().unwrap()).unwrap(),
        }
        let aside_before = kept_aside(file).len();
        spoil(file, how);
        let spoiled = contents(file);
        d.spawn();
        d.wait_for(
            &format!("the alarm for {how:?} {}", file.display()),
            Duration::from_secs(60),
            |d| d.events("state-unreadable", &g.name).len() > i,
        );
        let ev = d.events("state-unreadable", &g.name).pop().unwrap();
        assert_eq!(ev["severity"], "critical", "{ev:#}");
        let said = detail(&ev);
        assert!(said.contains(&file.display().to_string()), "{how:?}: {said}");
        assert!(said.contains(reason), "{how:?}: wanted {reason:?} in {said}");
        let aside = kept_aside(file);
        assert_eq!(aside.len(), aside_before + 1, "{how:?}: kept aside: {aside:?}");
        assert_eq!(contents(aside.last().unwrap()), spoiled, "{how:?}");
        d.wait_watching(&g);
        if file == &pages {
            assert!(said.contains("cannot be told from attacks"), "{said}");
        } else {
            // A new baseline in the spoiled one's place, said to be one.
            assert!(vigil::integrity::Baseline::load(&baseline).is_ok());
            let boots = d.events("new-boot", &g.name);
            assert!(detail(boots.last().unwrap()).contains("could not be used"), "{boots:#?}");
        }
    }
    assert!(d.events("violation", &g.name).is_empty(), "{:#?}", d.alerts());
    let errors = d.metric("vigil_errors_total", "kind=\"baseline_file\"").unwrap_or(0.0);
    assert!(errors >= 1.0, "counted: {errors}");
}
