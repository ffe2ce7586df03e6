//! Lab tests of a watch whose guest memory misbehaves: a real guest (libvirt,
//! QEMU), read through a fault-injecting wrapper (`memory::faults`). A read
//! error, a short read or a RAM mapping that is gone makes a check fail with
//! an error that says so, never a panic or a verdict on bytes not read, and
//! the next check after the fault clears is whole again. Register snapshots
//! that lead to no whole kernel (a vCPU caught mid-switch) are taken again.
//!
//! The daemon's side, each with a real fault: QEMU killed under one of two
//! watched guests; a guest paused; a guest saved and restored (a new QEMU
//! process); a guest migrated live to a second libvirt host; the webhook unreachable across a daemon
//! restart; the state directory full (tmpfs) or read-only (ext4 forced
//! read-only by an error). libvirtd restarting is in lab_daemon.rs.
//!
//! Needs the lab prepared and libvirtd running (`lab/test.sh` does both).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};

use vigil::addr::PAGE_SIZE;
use vigil::integrity::check::Scope;
use vigil::libvirt::{GuestDomain, LibvirtError};
use vigil::memory::GuestMemory;
use vigil::memory::faults::{FaultPlan, Faults, Faulty};
use vigil::watch::{Guest, GuestError, Watched};

mod common;
use common::{Daemon, FULL, boot};

use std::time::{Duration, Instant};

/// A libvirt domain whose memory is read through a [`Faulty`] wrapper, and
/// whose next `glitches` register snapshots have the IDT where nothing is
/// mapped, as one of a vCPU caught in an address space without it would.
/// `asked` counts the questions whether the domain runs; while `refuse`
/// is set, register snapshots fail.
struct FaultyGuest {
    dom: GuestDomain,
    plan: FaultPlan,
    glitches: Arc<AtomicU32>,
    asked: Arc<AtomicU32>,
    refuse: Arc<AtomicBool>,
}

/// In the guard hole of x86-64's kernel half: never mapped.
const UNMAPPED: u64 = 0xffff_8000_0000_1000;

impl Guest for FaultyGuest {
    fn name(&self) -> &str {
        Guest::name(&self.dom)
    }
    fn uuid(&self) -> &str {
        Guest::uuid(&self.dom)
    }
    fn ensure_running(&self) -> Result<(), GuestError> {
        self.asked.fetch_add(1, SeqCst);
        Guest::ensure_running(&self.dom)
    }
    fn registers(&self) -> Result<Vec<vigil::x86::VcpuRegisters>, GuestError> {
        if self.refuse.load(SeqCst) {
            return Err(LibvirtError::Memory {
                domain: Guest::name(&self.dom).to_owned(),
                reason: "registers refused by the test".into(),
            }
            .into());
        }
        let mut regs = Guest::registers(&self.dom)?;
        let glitch = self.glitches.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok();
        if glitch {
            regs.iter_mut().for_each(|r| r.idtr_base = UNMAPPED);
        }
        Ok(regs)
    }
    fn run(&self) -> Result<vigil::integrity::baseline::Run, GuestError> {
        Guest::run(&self.dom)
    }
    fn open_memory(&self) -> Result<Box<dyn GuestMemory + Send + Sync>, GuestError> {
        Ok(Box::new(Faulty::new(Guest::open_memory(&self.dom)?, self.plan.clone())))
    }
    fn memory_bytes(&self) -> Result<u64, GuestError> {
        Guest::memory_bytes(&self.dom)
    }
    fn dump_memory(&self, path: &Path) -> Result<(), GuestError> {
        Guest::dump_memory(&self.dom, path)
    }
}

#[test]
fn lab_faults_in_guest_memory_fail_a_check_and_it_recovers() {
    let g = boot("faults");
    let hv = vigil::libvirt::Hypervisor::connect("qemu:///system").unwrap();
    let plan = FaultPlan::default();
    let glitches = Arc::new(AtomicU32::new(0));
    let asked = Arc::new(AtomicU32::new(0));
    let refuse = Arc::new(AtomicBool::new(false));
    let guest = FaultyGuest {
        dom: hv.domain(&g.name).unwrap(),
        plan: plan.clone(),
        glitches: glitches.clone(),
        asked: asked.clone(),
        refuse: refuse.clone(),
    };
    let state = tempfile::tempdir().unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-profiles");
    let (profiles, bad) = vigil::linux::profile::load_dir(&[dir]);
    assert!(bad.is_empty(), "{bad:?}");
    let settings = vigil::watch::AttachSettings {
        originals_on_disk: false,
        provisional_window: Duration::from_secs(60),
        profiles: profiles.clone().into(),
    };
    let known = vigil::watch::Knowledge::default();
    let (mut w, _) =
        Watched::attach_guest(Box::new(guest), state.path(), &known, settings).unwrap();
    let check = |w: &mut Watched| w.check(Scope::Full, &profiles);
    check(&mut w).unwrap_or_else(|e| panic!("the first check: {e}"));
    // Checks in steady state do not ask libvirt whether the domain runs
    // (a round trip each, at the host's cost): only a failure does.
    let before = asked.load(SeqCst);
    for _ in 0..3 {
        check(&mut w).unwrap_or_else(|e| panic!("a check in steady state: {e}"));
    }
    assert_eq!(asked.load(SeqCst), before, "steady-state checks asked whether the domain runs");

    let text = w.baseline.regions.iter().find(|r| r.name == "kernel-text").unwrap();
    let page = text.pages[text.pages.len() / 2].gpa;
    for (faults, what) in [
        (Faults { fail: Some((page, PAGE_SIZE)), ..Faults::default() }, "a read error"),
        (Faults { short: Some((page, PAGE_SIZE)), ..Faults::default() }, "a short read"),
        (Faults { gone: true, ..Faults::default() }, "the mapping gone"),
    ] {
        *plan.lock().unwrap() = faults;
        let e = match check(&mut w) {
            Ok(r) => {
                panic!(
                    "{what}: the check passed: intact {} {:?}",
                    r.check.intact,
                    r.check.violations.first()
                )
            }
            Err(e) => e,
        };
        // Counted as what it is, in vigil_errors_total.
        assert_eq!(e.kind(), "memory_unreadable", "{what}: {}", vigil::libvirt::error_chain(&e));
        *plan.lock().unwrap() = Faults::default();
        let r = check(&mut w).unwrap_or_else(|e| panic!("after {what}, the next check: {e}"));
        assert!(
            r.check.violations.iter().all(|v| v.region != "kernel-text"),
            "after {what}: {:?}",
            r.check.violations
        );
    }

    // Register snapshots that lead to no whole kernel are taken again: two
    // such in a row pass unnoticed, three fail the check, naming the table.
    // Each snapshot is counted (vigil_register_snapshots_total), so that
    // snapshots taken again show.
    w.take_register_snapshots();
    glitches.store(2, SeqCst);
    let r = check(&mut w).unwrap_or_else(|e| panic!("two bad snapshots, then a good one: {e}"));
    assert!(r.check.violations.is_empty(), "{:?}", r.check.violations);
    assert_eq!(glitches.load(SeqCst), 0);
    assert_eq!(w.take_register_snapshots(), 3, "two bad snapshots, then a good one");
    glitches.store(3, SeqCst);
    let e = check(&mut w).map(|r| r.check.intact).expect_err("three bad snapshots in a row");
    let says = vigil::libvirt::error_chain(&e);
    assert!(says.contains(&format!("IDT of vCPU 0 at {UNMAPPED:#x} is not mapped")), "{says}");
    assert_eq!(e.kind(), "kernel_not_found");
    assert_eq!(w.take_register_snapshots(), 3, "three bad snapshots");
    check(&mut w).unwrap_or_else(|e| panic!("after the bad snapshots, the next check: {e}"));
    assert_eq!(w.take_register_snapshots(), 1, "a check in steady state");

    // A check that fails on a running domain fails as what failed; on a
    // domain gone since the check before, as the domain's going (which the
    // daemon takes quietly), whatever failed first.
    refuse.store(true, SeqCst);
    let e = check(&mut w).map(|r| r.check.intact).expect_err("registers refused");
    assert_eq!(e.kind(), "memory_unreadable", "{}", vigil::libvirt::error_chain(&e));
    refuse.store(false, SeqCst);
    check(&mut w).unwrap_or_else(|e| panic!("after the refused registers, the next check: {e}"));
    g.destroy();
    refuse.store(true, SeqCst);
    let e = check(&mut w).map(|r| r.check.intact).expect_err("a check of a destroyed domain");
    assert_eq!(e.kind(), "domain_lost", "{}", vigil::libvirt::error_chain(&e));
}

/// QEMU killed under a watched guest (its RAM mapping and monitor gone at
/// once, as in a host OOM kill): the daemon says so with an event and a
/// metric, and goes on checking the other guest it watches.
#[test]
fn lab_faults_qemu_killed_under_one_guest_leaves_the_other_checked() {
    let d = Daemon::start("vigil-lab-flt-q*");
    let a = boot("flt-qa");
    let b = boot("flt-qb");
    d.wait_watching(&a);
    d.wait_watching(&b);
    let full = |d: &Daemon, g: &vigil_lab::Guest| {
        d.metric("vigil_checks_total", &format!("domain=\"{}\",scope=\"full\"", g.name))
            .unwrap_or(0.0)
    };
    let pid = std::process::Command::new("pgrep")
        .args(["-f", &format!("guest={},", a.name)])
        .output()
        .unwrap();
    let pid = String::from_utf8_lossy(&pid.stdout).lines().next().map(str::to_owned);
    let pid = pid.unwrap_or_else(|| panic!("no QEMU process for {}", a.name));
    let killed = std::process::Command::new("kill").args(["-9", &pid]).status().unwrap();
    assert!(killed.success());
    let before = full(&d, &b);
    d.wait_for("the killed guest's event", Duration::from_secs(30), |d| {
        !d.events("detached", &a.name).is_empty() || !d.events("error", &a.name).is_empty()
    });
    // Killed between two checks the domain is detached; killed in mid-scan
    // the check fails first (its memory unreadable, or its kernel gone).
    // A check failed by the kill may be said before libvirt's stop event
    // has the domain detached: the count is waited for, not read once.
    let counted = |d: &Daemon| {
        let text = d.metrics();
        [
            "events_total{kind=\"detached\"}",
            "errors_total{kind=\"memory_unreadable\"}",
            "errors_total{kind=\"kernel_not_found\"}",
        ]
        .iter()
        .any(|m| text.lines().any(|l| l.starts_with(&format!("vigil_{m} ")) && !l.ends_with(" 0")))
    };
    d.wait_for("a metric counting the loss", Duration::from_secs(30), counted);
    d.wait_for("the other guest checked on", 4 * FULL + Duration::from_secs(5), |d| {
        full(d, &b) >= before + 2.0
    });
    assert!(d.status(&b.name).is_some_and(|s| s["state"] == "watching"), "{:?}", d.status(&b.name));
    assert!(d.events("violation", &b.name).is_empty(), "{:#?}", d.alerts());
}

/// A guest paused (`virsh suspend`, as during a snapshot or a migration's
/// last phase) is said to be (a `paused` event, counted), is still checked,
/// finds nothing wrong, and runs on after (a `resumed` event).
#[test]
fn lab_faults_a_paused_guest_is_checked_without_false_alarms() {
    let d = Daemon::start("vigil-lab-flt-pause");
    let mut g = boot("flt-pause");
    d.wait_watching(&g);
    let name = g.name.clone();
    let virsh = |cmd: &str| {
        let ok = std::process::Command::new("virsh")
            .args(["-c", "qemu:///system", cmd, &name])
            .output()
            .unwrap();
        assert!(ok.status.success(), "virsh {cmd}: {}", String::from_utf8_lossy(&ok.stderr));
    };
    let full = |d: &Daemon| {
        d.metric("vigil_checks_total", &format!("domain=\"{name}\",scope=\"full\"")).unwrap_or(0.0)
    };
    virsh("suspend");
    let before = full(&d);
    // The pause is said (an info event, counted), and checking goes on.
    d.wait_for("the pause reported", Duration::from_secs(10), |d| {
        d.events("paused", &name)
            .iter()
            .any(|a| a["detail"].as_str().unwrap_or("").contains("paused by request"))
    });
    // The counter moves just after the line is in the log (the log first).
    d.wait_for("the pause counted", Duration::from_secs(5), |d| {
        d.metric("vigil_events_total", "kind=\"paused\"").is_some()
    });
    assert_eq!(d.metric("vigil_events_total", "kind=\"paused\""), Some(1.0), "{}", d.metrics());
    d.wait_for("checks of the paused guest", 4 * FULL + Duration::from_secs(5), |d| {
        full(d) >= before + 2.0
    });
    assert!(d.events("violation", &name).is_empty(), "{:#?}", d.alerts());
    assert!(d.events("error", &name).is_empty(), "{:#?}", d.alerts());
    virsh("resume");
    g.run("true").unwrap_or_else(|e| panic!("the guest after resume: {e}"));
    d.wait_for("the resume reported", Duration::from_secs(10), |d| {
        !d.events("resumed", &name).is_empty()
    });
    let before = full(&d);
    d.wait_for("checks after resume", 4 * FULL + Duration::from_secs(5), |d| {
        full(d) >= before + 2.0
    });
    assert!(d.events("violation", &g.name).is_empty(), "{:#?}", d.alerts());
}

/// The webhook unreachable while an attack is caught, and the daemon killed
/// before it comes back: the alert waits in the log and is delivered once
/// the webhook is up, by the restarted daemon.
#[test]
fn lab_faults_an_alert_survives_an_unreachable_webhook_and_a_restart() {
    let port = common::free_port();
    let mut d = Daemon::start_with(
        "vigil-lab-flt-hook",
        &format!("[webhook]\nurl = \"http://127.0.0.1:{port}/hook\"\n"),
        vec![],
    );
    let mut g = boot("flt-hook");
    d.wait_watching(&g);
    g.run("attack inline").unwrap();
    d.wait_for("the violation in the log", 2 * FULL + Duration::from_secs(5), |d| {
        !common::violations(d, &g, "kernel-text").is_empty()
    });
    d.wait_for("a failed push counted", Duration::from_secs(10), |d| {
        d.metric("vigil_errors_total", "kind=\"webhook_push\"").unwrap_or(0.0) >= 1.0
    });
    d.kill9();
    // The webhook comes up; the daemon restarts.
    let rx = webhook(port);
    d.spawn();
    wait_for_violation(&rx, "kernel-text");
}

/// A webhook on `port` that answers 200 and hands over each alert it gets.
fn webhook(port: u16) -> std::sync::mpsc::Receiver<serde_json::Value> {
    webhook_answering(port, |_| "200 OK")
}

/// A webhook on `port` that answers each alert with the status `answer`
/// gives it, and hands over those it answers 200.
fn webhook_answering(
    port: u16,
    answer: impl Fn(&serde_json::Value) -> &'static str + Send + 'static,
) -> std::sync::mpsc::Receiver<serde_json::Value> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { return };
            let mut req = Vec::new();
            let mut buf = [0u8; 65536];
            let body = loop {
                let n = s.read(&mut buf).unwrap_or(0);
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if body.len() >= len || n == 0 {
                        break body.to_owned();
                    }
                } else if n == 0 {
                    break String::new();
                }
            };
            let v = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
            let status = answer(&v);
            let _ =
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes());
            if status.starts_with("200") && !v.is_null() {
                let _ = tx.send(v);
            }
        }
    });
    rx
}

/// The webhook's place in the alert log corrupted, then deleted, each while
/// the daemon was down with an alert the webhook had not taken (it was
/// answering 503): after each restart that alert reaches the webhook (a
/// cursor that cannot be used means delivering again, never skipping), and
/// an event says why.
#[test]
fn lab_faults_a_corrupted_or_deleted_push_cursor_skips_no_alert() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let port = common::free_port();
    let up = std::sync::Arc::new(AtomicBool::new(false));
    let is_up = up.clone();
    let rx = webhook_answering(port, move |_| {
        if is_up.load(SeqCst) { "200 OK" } else { "503 Service Unavailable" }
    });
    let mut d = Daemon::start_with(
        "vigil-lab-flt-cur",
        &format!("[webhook]\nurl = \"http://127.0.0.1:{port}/hook\"\n"),
        vec![],
    );
    let mut g = boot("flt-cur");
    d.wait_watching(&g);
    let cursor = d.path("push-webhook.offset");
    let corrupt = |c: &Path| std::fs::write(c, b"not a cursor\n").unwrap();
    let delete = |c: &Path| std::fs::remove_file(c).unwrap();
    type Damage<'a> = &'a dyn Fn(&Path);
    let rounds: [(&str, &str, Damage); 2] =
        [("inline", "kernel-text", &corrupt), ("syscall", "kernel-rodata", &delete)];
    let mut got = Vec::new();
    for (attack, region, damage) in rounds {
        up.store(false, SeqCst);
        let refused = d.metric("vigil_errors_total", "kind=\"webhook_push\"").unwrap_or(0.0);
        g.run(&format!("attack {attack}")).unwrap();
        d.wait_for(
            &format!("the {region} violation logged"),
            2 * FULL + Duration::from_secs(10),
            |d| !common::violations(d, &g, region).is_empty(),
        );
        d.wait_for("the webhook's 503 counted", Duration::from_secs(20), |d| {
            d.metric("vigil_errors_total", "kind=\"webhook_push\"").unwrap_or(0.0) > refused
        });
        d.kill9();
        damage(&cursor);
        up.store(true, SeqCst);
        d.spawn();
        wait_at_webhook(&rx, &mut got, &format!("the {region} violation"), |a| {
            a["event"] == "violation" && a["region"] == region
        });
        // Said: why the cursor could not be used ("... is gone" once deleted).
        let gone = region == "kernel-rodata";
        wait_at_webhook(&rx, &mut got, "the cursor's damage said", |a| {
            a["event"] == "error"
                && a["detail"].as_str().is_some_and(|t| {
                    t.contains("place in the alert log cannot be used")
                        && t.contains("is gone)") == gone
                })
        });
    }
}

/// A webhook that refuses kernel-text alerts for good (400 each time, as a
/// sink whose schema rejects them would): after 8 refusals the alert goes
/// to the dead-letter file, an event says so, and the violation after it
/// reaches the webhook.
#[test]
fn lab_faults_a_webhook_refusing_an_alert_forever_still_gets_the_ones_after() {
    let port = common::free_port();
    let rx = webhook_answering(port, |a| {
        if a["region"] == "kernel-text" { "400 Bad Request" } else { "200 OK" }
    });
    let d = Daemon::start_with(
        "vigil-lab-flt-400",
        &format!("[webhook]\nurl = \"http://127.0.0.1:{port}/hook\"\n"),
        vec![],
    );
    let mut g = boot("flt-400");
    d.wait_watching(&g);
    g.run("attack inline").unwrap();
    d.wait_for("the kernel-text violation logged", 2 * FULL + Duration::from_secs(10), |d| {
        !common::violations(d, &g, "kernel-text").is_empty()
    });
    g.run("attack syscall").unwrap();
    let mut got = Vec::new();
    // Eight refusals take about 40 s of backoff.
    wait_at_webhook_within(
        &rx,
        &mut got,
        "the violation after the refused one",
        Duration::from_secs(120),
        |a| a["event"] == "violation" && a["region"] == "kernel-rodata",
    );
    wait_at_webhook(&rx, &mut got, "the dead-letter event", |a| {
        a["event"] == "error" && a["kind"] == "push_dead_letter"
    });
    let dead = std::fs::read_to_string(d.path("push-webhook.dead.jsonl")).unwrap();
    let dead: Vec<serde_json::Value> =
        dead.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        !dead.is_empty() && dead.iter().all(|a| a["region"] == "kernel-text"),
        "the dead-letter file holds the refused alerts only: {dead:#?}"
    );
    assert_eq!(
        d.metric("vigil_errors_total", "kind=\"webhook_dead_letter\""),
        Some(dead.len() as f64)
    );
    assert!(
        !got.iter().any(|a| a["region"] == "kernel-text"),
        "a refused alert was taken: {got:#?}"
    );
}

/// Waits up to a minute for a violation of `region` at the webhook.
fn wait_for_violation(rx: &std::sync::mpsc::Receiver<serde_json::Value>, region: &str) {
    let mut got = Vec::new();
    wait_at_webhook(rx, &mut got, &format!("a {region} violation"), |a| {
        a["event"] == "violation" && a["region"] == region
    });
}

/// Waits up to a minute for an alert that `want` accepts at the webhook,
/// keeping in `got` everything that arrived.
fn wait_at_webhook(
    rx: &std::sync::mpsc::Receiver<serde_json::Value>,
    got: &mut Vec<serde_json::Value>,
    what: &str,
    want: impl Fn(&serde_json::Value) -> bool,
) {
    wait_at_webhook_within(rx, got, what, Duration::from_secs(60), want);
}

/// [`wait_at_webhook`], waiting up to `timeout`.
fn wait_at_webhook_within(
    rx: &std::sync::mpsc::Receiver<serde_json::Value>,
    got: &mut Vec<serde_json::Value>,
    what: &str,
    timeout: Duration,
    want: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if got.iter().any(&want) {
            return;
        }
        if let Ok(v) = rx.recv_timeout(Duration::from_millis(500)) {
            got.push(v);
        }
    }
    panic!("{what} did not reach the webhook; it got: {got:#?}");
}

/// The state directory full (a small tmpfs filled up, the alert log's last
/// page too) when an attack is caught: the alert log cannot take the alert,
/// which is counted, and the alert still reaches the webhook; checking goes
/// on, and once there is room again the log takes alerts again. (Before,
/// the first warning written to a stderr on that full disk panicked the
/// pusher's task, and nothing was pushed any more.)
#[test]
fn lab_faults_a_full_state_directory_loses_no_alert() {
    state_directory_fault(
        "full",
        StateFs::Tmpfs,
        &fill,
        Some(&|dir| std::fs::remove_file(dir.join("filler")).unwrap()),
    );
}

/// Fills the filesystem of the state directory `dir`: a file `filler` as
/// large as it goes, then the alert log's last page.
fn fill(dir: &Path) {
    let filler = format!("of={}", dir.join("filler").display());
    let _ = std::process::Command::new("dd").args(["if=/dev/zero", &filler, "bs=1M"]).output();
    // And the alert log's last page: blank lines, which readers skip.
    use std::io::Write;
    let mut log = std::fs::OpenOptions::new().append(true).open(dir.join("alerts.jsonl")).unwrap();
    while log.write_all(&[b'\n'; 512]).and_then(|()| log.sync_data()).is_ok() {}
}

/// Everything at once: the state directory full, the webhook down and its
/// queue of alerts the log could not take full (one place, so the second
/// alert finds it taken). Once the disk has room and the webhook is up,
/// every violation reaches the webhook, in the log's order (duplicates
/// allowed: an alert pushed while unlogged comes again from the log), and
/// none is lost.
#[test]
fn lab_faults_a_full_disk_a_down_webhook_and_a_full_queue_lose_no_alert() {
    let port = common::free_port();
    let mut d = Daemon::unstarted(
        "vigil-lab-flt-all",
        &format!("[limits]\npush_queue = 1\n[webhook]\nurl = \"http://127.0.0.1:{port}/hook\"\n"),
    );
    let dir = d.path("");
    let _mounted = mount_state(&dir, StateFs::Tmpfs);
    d.spawn();
    let mut g = boot("flt-all");
    d.wait_watching(&g);
    fill(&dir);
    let attacks = [("inline", "kernel-text"), ("syscall", "kernel-rodata"), ("idt", "idt")];
    for (attack, region) in attacks {
        g.run(&format!("attack {attack}")).unwrap();
        d.wait_for(
            &format!("the {region} violation held"),
            2 * FULL + Duration::from_secs(10),
            |d| {
                d.metrics().lines().any(|l| {
                    l.starts_with("vigil_violations_total{")
                        && l.contains(&format!("region=\"{region}\""))
                        && !l.ends_with(" 0")
                })
            },
        );
    }
    let count = |d: &Daemon, kind: &str| {
        d.metric("vigil_errors_total", &format!("kind=\"{kind}\"")).unwrap_or(0.0)
    };
    assert!(count(&d, "alert_log") >= 1.0, "the log's failure uncounted");
    assert!(count(&d, "push_queue_full") >= 1.0, "the queue never filled");
    assert!(count(&d, "webhook_push") >= 1.0, "no push failed");
    let held = d.metric("vigil_alerts_held", "").unwrap_or(0.0);
    assert!(held >= 4.0, "the failure and three violations held, got {held}");
    assert!(
        common::violations(&d, &g, "kernel-text").is_empty(),
        "the full log took a violation; the test filled nothing"
    );
    // Both come back.
    std::fs::remove_file(dir.join("filler")).unwrap();
    let rx = webhook(port);
    d.wait_for("the held alerts logged", Duration::from_secs(30), |d| {
        d.metric("vigil_alerts_held", "") == Some(0.0)
    });
    // The pusher's backoff reached its longest pause (a minute) while the
    // webhook was down.
    let within = Duration::from_secs(150);
    let mut got = Vec::new();
    for (_, region) in attacks {
        wait_at_webhook_within(&rx, &mut got, &format!("the {region} violation"), within, |a| {
            a["event"] == "violation" && a["region"] == region
        });
    }
    let log = d.alerts();
    let logged: Vec<&serde_json::Value> =
        log.iter().filter(|a| a["event"] == "violation").collect();
    // Each attack's violation logged, in the attacks' order.
    let first: Vec<Option<usize>> =
        attacks.iter().map(|(_, r)| logged.iter().position(|a| a["region"] == *r)).collect();
    assert!(
        first.iter().all(Option::is_some) && first.is_sorted(),
        "the attacks' violations in the log, out of order or missing: {first:?} {logged:#?}"
    );
    // Everything the log holds reaches the webhook in the log's order:
    // wait for the last of it, then find the log as a subsequence.
    let last = log.last().cloned().unwrap();
    wait_at_webhook_within(&rx, &mut got, "the log's last alert", within, |a| *a == last);
    let mut pending = log.iter().peekable();
    for a in &got {
        if pending.peek() == Some(&a) {
            pending.next();
        }
    }
    let missed: Vec<_> = pending.collect();
    assert!(
        missed.is_empty(),
        "not delivered in the log's order from the first missed on: {missed:#?}\nwebhook got: {got:#?}"
    );
}

/// The state directory's filesystem turned read-only under the running
/// daemon, as ext4 does on an I/O error with `errors=remount-ro` (forced
/// through ext4's `trigger_fs_error`): the alert log, open for appending,
/// fails with EROFS from then on. Both attacks after it reach the webhook,
/// the failures are counted, and checking goes on. ext4 will not go back to
/// read-write without being unmounted, so nothing is mended.
#[test]
fn lab_faults_a_read_only_state_directory_loses_no_alert() {
    state_directory_fault(
        "ro",
        StateFs::Ext4,
        &|dir| {
            let out = std::process::Command::new("findmnt")
                .args(["-n", "-o", "SOURCE", "--mountpoint"])
                .arg(dir)
                .output()
                .expect("findmnt (util-linux)");
            let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let name = dev.rsplit('/').next().unwrap();
            let trigger = format!("/sys/fs/ext4/{name}/trigger_fs_error");
            std::fs::write(&trigger, "vigil lab: state directory made read-only")
                .unwrap_or_else(|e| panic!("{trigger}: {e}"));
            let probe = std::fs::write(dir.join("probe"), b"x").unwrap_err();
            assert_eq!(probe.raw_os_error(), Some(30), "EROFS after the error: {probe}");
        },
        None,
    );
}

/// What the state directory of [`state_directory_fault`] is.
enum StateFs {
    /// A 48 MiB tmpfs: room for the baseline and its original pages (about
    /// 16 MiB), not much more.
    Tmpfs,
    /// A 64 MiB ext4 on a loop device, mounted `errors=remount-ro`.
    Ext4,
}

/// A daemon whose state directory is a filesystem of its own, broken by
/// `fault` while an attack is caught and, if `mend` is given, mended before
/// another: no alert is lost (the first reaches the webhook though the log
/// could not take it), the log's failure is counted, checking goes on, and
/// no line of the log is torn.
fn state_directory_fault(
    suffix: &str,
    fs: StateFs,
    fault: &dyn Fn(&Path),
    mend: Option<&dyn Fn(&Path)>,
) {
    let port = common::free_port();
    let mut d = Daemon::unstarted(
        &format!("vigil-lab-flt-{suffix}"),
        &format!("[webhook]\nurl = \"http://127.0.0.1:{port}/hook\"\n"),
    );
    let dir = d.path("");
    let _mounted = mount_state(&dir, fs);
    let rx = webhook(port);
    d.spawn();
    let mut g = boot(&format!("flt-{suffix}"));
    d.wait_watching(&g);
    fault(&dir);
    g.run("attack inline").unwrap();
    let mut got = Vec::new();
    wait_at_webhook(&rx, &mut got, "the kernel-text violation", |a| {
        a["event"] == "violation" && a["region"] == "kernel-text"
    });
    // The fault itself: an event (where the log cannot take it) and a metric.
    wait_at_webhook(&rx, &mut got, "the alert log's failure as an event", |a| {
        a["event"] == "error"
            && a["detail"].as_str().unwrap_or("").starts_with("the alert log cannot take alerts")
    });
    d.wait_for("the alert log's failure counted", Duration::from_secs(10), |d| {
        d.metric("vigil_errors_total", "kind=\"alert_log\"").unwrap_or(0.0) >= 1.0
    });
    assert!(d.status(&g.name).is_some_and(|s| s["state"] == "watching"), "{:?}", d.status(&g.name));
    match mend {
        Some(mend) => {
            mend(&dir);
            g.run("attack syscall").unwrap();
            d.wait_for("the next alert in the log", 2 * FULL + Duration::from_secs(10), |d| {
                !common::violations(d, &g, "kernel-rodata").is_empty()
            });
            assert!(
                d.alerts().iter().any(|a| a["detail"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("the alert log takes alerts again")),
                "the log's recovery is said"
            );
            // What the log could not take was held, and is logged now, in
            // order: the failure, the violation it could not take, the next.
            let alerts = d.alerts();
            let at = |what: &str, f: &dyn Fn(&serde_json::Value) -> bool| {
                alerts.iter().position(f).unwrap_or_else(|| {
                    panic!("{what} is not in the log once it takes alerts: {alerts:#?}")
                })
            };
            let failure = at("the log's failure", &|a| {
                a["detail"].as_str().unwrap_or("").starts_with("the alert log cannot take alerts")
            });
            let held = at("the held violation", &|a| {
                a["event"] == "violation" && a["region"] == "kernel-text"
            });
            let next = at("the next violation", &|a| {
                a["event"] == "violation" && a["region"] == "kernel-rodata"
            });
            assert!(failure < held && held < next, "out of order: {failure}, {held}, {next}");
            assert_eq!(d.metric("vigil_alerts_held", ""), Some(0.0));
        }
        None => {
            g.run("attack syscall").unwrap();
            wait_for_violation(&rx, "kernel-rodata");
            let failures = d.metric("vigil_errors_total", "kind=\"alert_log\"").unwrap_or(0.0);
            assert!(failures >= 2.0, "both alerts' log failures counted, got {failures}");
            // Held, to be logged if the log ever takes alerts again: the
            // failure and both violations at least.
            let held = d.metric("vigil_alerts_held", "").unwrap_or(0.0);
            assert!(held >= 3.0, "alerts held: {held}");
        }
    }
    let log = std::fs::read_to_string(d.path("alerts.jsonl")).unwrap();
    for l in log.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|e| panic!("a torn line {l:?}: {e}"));
    }
}

/// Unmounts a state directory's filesystem when dropped.
struct Mounted {
    dir: std::path::PathBuf,
    /// Where the ext4 image lives.
    _image: tempfile::TempDir,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Mounts a filesystem of its own (`fs`) on the state directory `dir`.
fn mount_state(dir: &Path, fs: StateFs) -> Mounted {
    let image = tempfile::tempdir().unwrap();
    let mount = match fs {
        StateFs::Tmpfs => {
            vec!["-t".to_owned(), "tmpfs".into(), "-o".into(), "size=48m".into(), "tmpfs".into()]
        }
        StateFs::Ext4 => {
            let img = image.path().join("state.ext4");
            std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
            let made = std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&img)
                .status()
                .expect("mkfs.ext4 (apt-get install e2fsprogs)");
            assert!(made.success(), "mkfs.ext4 {}", img.display());
            vec!["-o".to_owned(), "loop,errors=remount-ro".into(), img.display().to_string()]
        }
    };
    let ok = std::process::Command::new("mount").args(&mount).arg(dir).status().unwrap();
    assert!(
        ok.success(),
        "mount {mount:?} {} (needs root, and loop devices for ext4)",
        dir.display()
    );
    Mounted { dir: dir.to_owned(), _image: image }
}

/// A daemon's resident memory, and its peak since it started, in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
    };
    (kib("VmRSS:") << 10, kib("VmHWM:") << 10)
}

/// A guest forging its module list (2,000 entries aliasing one module's
/// text, each naming a jump table of 2^18 entries, each entry a distinct
/// site in kernel text: 8 GiB if read whole, and more once placed)
/// while a text change makes the daemon read the patch tables: the daemon's
/// peak memory grows by less than twice the guest memory budget, a
/// critical error event names the budget, the hook is still reported, and
/// the other guest is still checked at its pace.
#[test]
fn lab_faults_a_forged_module_list_with_huge_tables_stays_within_the_memory_budget() {
    // Room for the kernel's tables and one forged one (4 MiB read, 32 MiB
    // of parsed sites charged).
    const BUDGET: u64 = 64 << 20;
    let d = Daemon::start_with(
        "vigil-lab-flt-mem-*",
        &format!("[limits]\nguest_memory = \"{}MiB\"\n", BUDGET >> 20),
        vec![],
    );
    let mut forger = boot("flt-mem-a");
    let calm = boot("flt-mem-b");
    d.wait_watching(&forger);
    d.wait_watching(&calm);
    let pid = d.child.as_ref().unwrap().id();
    let (_, peak_before) = rss(pid);
    let full = format!("domain=\"{}\",scope=\"full\"", calm.name);
    // Its pace before, over 6 full intervals.
    let checks =
        |d: &Daemon| d.metric("vigil_checks_total", &full).expect("the other guest's checks");
    let before = checks(&d);
    std::thread::sleep(6 * FULL);
    let calm_checks = checks(&d);
    let pace_before = (calm_checks - before) / (6 * FULL).as_secs_f64();
    let started = Instant::now();
    // A write to kernel text (first: with the list forged, /proc/kallsyms
    // repeats a module's symbols 2,000 times): every full check from then
    // on reviews the changed page, reading every listed module's tables.
    forger.run("attack inline").unwrap();
    forger.run("attack forge 2000").unwrap();
    d.wait_for("the budget's event", 4 * FULL + Duration::from_secs(20), |d| {
        d.events("error", &forger.name).iter().any(|a| a["kind"] == "limit_memory")
    });
    let event = d.events("error", &forger.name);
    let event = event.iter().find(|a| a["kind"] == "limit_memory").unwrap();
    let detail = event["detail"].as_str().unwrap();
    assert!(detail.contains("limits.guest_memory") && event["severity"] == "critical", "{event:#}");
    d.wait_for("the inline hook's violation", 2 * FULL + Duration::from_secs(5), |d| {
        !common::violations(d, &forger, "kernel-text").is_empty()
    });
    // A few more checks of both.
    let now = d.metric("vigil_checks_total", &full).unwrap_or(0.0);
    d.wait_for("two more full checks", 3 * FULL + Duration::from_secs(10), |d| {
        d.metric("vigil_checks_total", &full).unwrap_or(0.0) >= now + 2.0
    });
    let (rss_now, peak) = rss(pid);
    let grew = peak.saturating_sub(peak_before);
    eprintln!(
        "daemon memory: peak {} MiB before the forgery, {} MiB after (+{} MiB), {} MiB resident now; budget {} MiB",
        peak_before >> 20,
        peak >> 20,
        grew >> 20,
        rss_now >> 20,
        BUDGET >> 20
    );
    assert!(grew < 2 * BUDGET, "the daemon's peak grew {grew} bytes, the budget is {BUDGET}");
    let used = d
        .metric("vigil_guest_memory_bytes", &format!("domain=\"{}\"", forger.name))
        .unwrap_or(f64::MAX);
    assert!(used <= BUDGET as f64, "the gauge says {used} bytes of {BUDGET}");
    let refused = d.metric("vigil_errors_total", "kind=\"limit_memory\"").unwrap_or(0.0);
    assert!(refused >= 1.0, "the refusals uncounted: {refused}");
    // The other guest was checked all along, at its pace (as measured
    // before, in this run: two TCG guests and a debug build share 2 cores).
    let elapsed = started.elapsed();
    let pace = (checks(&d) - calm_checks) / elapsed.as_secs_f64();
    eprintln!(
        "{}: {pace_before:.2} full checks/s before the forgery, {pace:.2} after ({elapsed:?})",
        calm.name
    );
    assert!(
        pace >= pace_before / 2.0,
        "{}: checked at {pace:.2}/s, {pace_before:.2}/s before",
        calm.name
    );
    assert!(d.status(&calm.name).is_some_and(|s| s["state"] == "watching"));
}

/// A guest saved and restored (`virsh save`/`restore`: what a migration does
/// to a host, a new QEMU process, started with `-incoming`, with the same
/// guest memory): the daemon lets go of the old process, takes up the new
/// one against the stored baseline (the same boot, so no new baseline),
/// finds nothing wrong, records the new process in the baseline, and
/// catches a hook made after against it.
#[test]
fn lab_faults_a_guest_saved_and_restored_is_taken_up_again() {
    let d = Daemon::start("vigil-lab-flt-save");
    let mut g = boot("flt-save");
    d.wait_watching(&g);
    let boot_before = d.status(&g.name).unwrap()["boot"].clone();
    let path = vigil::paths::baseline_path(d.dir.path(), &g.uuid);
    let run_before = vigil::integrity::Baseline::load(&path).unwrap().run.unwrap();
    g.save_and_restore().unwrap_or_else(|e| panic!("{e}"));
    d.wait_for("the restored guest watched again", Duration::from_secs(90), |d| {
        !d.events("attached", &g.name).is_empty()
            && d.status(&g.name).is_some_and(|s| s["state"] == "watching" && s["last_check"] != "")
    });
    assert!(!d.events("detached", &g.name).is_empty(), "the saved guest let go: {:#?}", d.alerts());
    let attached = d.events("attached", &g.name);
    assert!(
        attached[0]["detail"].as_str().unwrap().contains("stored baseline of this boot"),
        "{:#}",
        attached[0]
    );
    assert_eq!(d.status(&g.name).unwrap()["boot"], boot_before, "the same boot");
    assert_eq!(d.events("new-boot", &g.name).len(), 1, "no new baseline: {:#?}", d.alerts());
    let run_after = vigil::integrity::Baseline::load(&path).unwrap().run.unwrap();
    assert_ne!(run_after.pid, run_before.pid, "the baseline names the restored process");
    assert!(run_after.incoming, "{run_after:?}");
    std::thread::sleep(2 * FULL);
    assert!(d.events("violation", &g.name).is_empty(), "{:#?}", d.alerts());
    // Saving is not a fault: a check caught in flight by it says nothing.
    assert!(d.events("error", &g.name).is_empty(), "{:#?}", d.events("error", &g.name));
    g.run("attack inline").unwrap();
    d.wait_for("the inline hook", 2 * FULL + Duration::from_secs(3), |d| {
        d.events("violation", &g.name).iter().any(|a| a["region"] == "kernel-text")
    });
    assert_eq!(d.events("new-boot", &g.name).len(), 1, "{:#?}", d.alerts());
}

/// A second libvirt host on this machine (`lab/second-libvirtd.sh`): its own
/// libvirtd, directories and host UUID, stopped (its domains destroyed)
/// when dropped.
struct SecondHost {
    root: std::path::PathBuf,
    uri: String,
}

impl SecondHost {
    fn start(name: &str) -> Self {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../lab/second-libvirtd.sh");
        let root = std::path::PathBuf::from(format!("/run/{name}"));
        let out = std::process::Command::new("bash").arg(script).arg("start").arg(&root).output();
        let out = out.unwrap_or_else(|e| panic!("{script}: {e}"));
        assert!(
            out.status.success(),
            "{script} start: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let uri = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        SecondHost { root, uri }
    }
}

impl Drop for SecondHost {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../lab/second-libvirtd.sh");
        let _ = std::process::Command::new("bash").arg(script).arg("stop").arg(&self.root).status();
    }
}

/// A guest migrated live (`virsh migrate --live`, here to a second libvirt
/// host on this machine, see `lab/second-libvirtd.sh`), attacked just
/// before it leaves. The source daemon lets it go with an event and a
/// metric and goes on checking the guest that stays (an attack on that one
/// is caught after). The destination's daemon, given the baseline the
/// source took (shared storage, or a copy made at migration), takes the
/// guest up against it as the same boot, not as a new one to trust, and
/// catches the attack made before the move: no alert is lost to it, even
/// when the source had no check left to see it.
#[test]
fn lab_faults_a_guest_migrated_live_is_let_go_and_taken_up_on_the_other_host() {
    let host_b = SecondHost::start("vigil-lab-flt-mig-b");
    let a = Daemon::start("vigil-lab-flt-mig*");
    let mut g = boot("flt-mig");
    let mut stay = boot("flt-mig-stay");
    a.wait_watching(&g);
    a.wait_watching(&stay);
    let boot_id = a.status(&g.name).unwrap()["boot"].clone();

    // The destination's daemon, on host B's libvirt, with the baseline carried.
    let mut b = Daemon::unstarted(&g.name, "");
    b.config = format!("connect = \"{}\"\n{}", host_b.uri, b.config);
    let carried = b.path("baselines");
    std::fs::create_dir_all(&carried).unwrap();
    for f in std::fs::read_dir(a.path("baselines")).unwrap() {
        let f = f.unwrap();
        if f.file_name().to_string_lossy().starts_with(&g.uuid) {
            std::fs::copy(f.path(), carried.join(f.file_name())).unwrap();
        }
    }
    assert!(std::fs::read_dir(&carried).unwrap().count() > 0, "no baseline of {} to carry", g.uuid);
    b.spawn();

    g.run("attack inline").unwrap();
    g.migrate(&host_b.uri).unwrap_or_else(|e| panic!("{e}"));
    let out = g.run("cat /proc/sys/kernel/random/boot_id").unwrap();
    assert!(!out.trim().is_empty(), "the guest answers on host B");

    // The source: let go, with an event and a metric.
    // (The detached event names the migration when libvirt's event comes
    // before the domain's next check finds it gone; when it comes after,
    // a notice gives libvirt's reason.)
    a.wait_for("the source letting go", Duration::from_secs(30), |d| {
        !d.events("detached", &g.name).is_empty()
    });
    // libvirt's pause event can come after a check found the domain gone:
    // it is reported all the same.
    a.wait_for("the source naming the migration", Duration::from_secs(30), |d| {
        d.events("paused", &g.name)
            .iter()
            .any(|a| a["detail"].as_str().unwrap_or("").contains("end of a migration"))
    });
    assert!(
        a.metric("vigil_events_total", "kind=\"detached\"").unwrap_or(0.0) >= 1.0,
        "{}",
        a.metrics()
    );
    // The destination: the same boot, against the carried baseline, and
    // the attack made before the move is caught there.
    b.wait_for("the destination taking it up", Duration::from_secs(60), |d| {
        !d.events("attached", &g.name).is_empty()
    });
    assert!(b.events("new-boot", &g.name).is_empty(), "trusted anew: {:#?}", b.alerts());
    b.wait_for("its status on host B", Duration::from_secs(20), |d| d.status(&g.name).is_some());
    assert_eq!(b.status(&g.name).unwrap()["boot"], boot_id, "the same boot");
    b.wait_for("the attack caught on host B", 4 * FULL + Duration::from_secs(10), |d| {
        common::violations(d, &g, "kernel-text")
            .iter()
            .any(|v| format!("{} {}", v["detail"], v["symbol"]).contains("__x64_sys_getppid"))
    });
    for v in b.events("violation", &g.name) {
        assert_eq!(v["region"], "kernel-text", "only the attack: {v:#}");
    }
    assert!(b.events("error", &g.name).is_empty(), "{:#?}", b.events("error", &g.name));

    // The source goes on checking the guest that stayed.
    stay.run("attack syscall").unwrap();
    a.wait_for("the attack on the guest that stayed", 4 * FULL + Duration::from_secs(10), |d| {
        !common::violations(d, &stay, "sys_call_table").is_empty()
    });
    assert!(a.events("error", &stay.name).is_empty(), "{:#?}", a.events("error", &stay.name));
    drop(g);
    drop(host_b);
}

/// A check over its time limit (`schedule.check_timeout`, here 1 ms, which
/// every full check of the lab kernel exceeds): reported as an error event,
/// counted as `limit_check_time`, its end noted, and checking goes on, with
/// attacks still caught.
#[test]
fn lab_faults_a_check_over_its_time_limit_is_stopped_and_reported() {
    let d = Daemon::start_with("vigil-lab-flt-slow", "check_timeout = \"1ms\"\n", vec![]);
    let mut g = boot("flt-slow");
    // Every check now stops after its first stage: the attach (no check)
    // succeeds, the checks fail, each said and counted.
    d.wait_for("a check stopped at its time limit", Duration::from_secs(60), |d| {
        d.metric("vigil_errors_total", "kind=\"limit_check_time\"").unwrap_or(0.0) >= 2.0
            && d.events("error", &g.name).iter().any(|a| {
                let detail = a["detail"].as_str().unwrap_or("");
                detail.contains("stopped after the page and mapping check")
                    && detail.contains("ran past its 1ms (schedule.check_timeout)")
            })
    });
    // A stopped check reports nothing of what it saw: an attack now is not
    // taken for reverted or reported half-judged, and the daemon checks on.
    g.run("attack inline").unwrap();
    let before = d.metric("vigil_errors_total", "kind=\"limit_check_time\"").unwrap_or(0.0);
    d.wait_for("checks still tried", 2 * FULL + Duration::from_secs(5), |d| {
        d.metric("vigil_errors_total", "kind=\"limit_check_time\"").unwrap_or(0.0) > before + 1.0
    });
    assert!(
        d.events("violation", &g.name).is_empty(),
        "a stopped check reported: {:#?}",
        d.alerts()
    );
    assert!(d.events("reverted", &g.name).is_empty(), "{:#?}", d.alerts());
}

/// The state directory read-only from the start: the daemon cannot keep the
/// alert log, so it refuses to start, naming the file and the reason, with
/// exit status 2 (systemd's Restart= retries it; no alert can be lost
/// before it runs).
#[test]
fn daemon_refuses_to_start_on_a_read_only_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m,ro", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(ok.success(), "mounting a read-only tmpfs (needs root)");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(self.0).status();
        }
    }
    let _unmount = Unmount(dir.path());
    let socket = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("--state-dir")
        .arg(dir.path())
        .arg("--control-socket")
        .arg(socket.path().join("control.sock"))
        .args(["daemon", "--metrics-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        // The first file it needs to write: the state directory's lock.
        err.contains(&format!("{}", dir.path().join("daemon.lock").display()))
            && err.contains("Read-only file system"),
        "{err}"
    );
}
