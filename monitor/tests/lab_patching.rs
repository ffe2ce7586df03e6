//! Lab tests of the patch-aware verifier, with `vigil daemon` checking a real
//! guest every second: the kernel patching its own text in storms gives no
//! violation, attacks during the storms are still caught, and attacks that
//! mimic the kernel's patching are caught.
//!
//! Needs the lab prepared and libvirtd running (`lab/test.sh` does both).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vigil::linux::patch::{NOP5, PatchKind, PatchTables};
use vigil::linux::semantic::{self, read_virt};
use vigil::linux::{discover, profile};

mod common;
use common::{Daemon, boot, violations};

const STORM: Duration = Duration::from_secs(60);

/// Violations (any region) the daemon reported for `g` so far.
fn all_violations(d: &Daemon, name: &str) -> Vec<String> {
    d.events("violation", name)
        .iter()
        .map(|a| format!("{} {} {}", a["region"], a["symbol"], a["detail"]))
        .collect()
}

#[test]
fn lab_patching_storms_give_no_violations_and_attacks_are_still_caught() {
    let d = Daemon::every_second("vigil-lab-storm");
    let mut g = boot("storm");
    d.wait_watching(&g);
    let out = g.run("storm start").unwrap();
    assert!(out.contains("storm: started"), "{out}");

    // A minute of storms, checked every second: not one violation.
    let start = Instant::now();
    let dom = format!("domain=\"{}\"", g.name);
    let (mut most_patched, mut most_pending) = (0f64, None::<f64>);
    while start.elapsed() < STORM {
        std::thread::sleep(Duration::from_secs(5));
        // The sites patched away from the baseline now, and those held
        // while they disagree with their records.
        most_patched = most_patched.max(d.metric("vigil_patched_sites", &dom).unwrap_or(0.0));
        if let Some(p) = d.metric("vigil_patch_sites_pending", &dom) {
            most_pending = Some(most_pending.unwrap_or(0.0).max(p));
        }
        let v = all_violations(&d, &g.name);
        if !v.is_empty() {
            let now = d.control(&json!({ "command": "check", "domain": g.name }));
            let details: Vec<String> = now["result"]["violations"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .take(10)
                        .map(|f| format!("{} {} {}", f["gva"], f["symbol"], f["detail"]))
                        .collect()
                })
                .unwrap_or_default();
            panic!("violations during the storms: {v:#?}\nnow: {details:#?}");
        }
        assert!(d.events("error", &g.name).is_empty(), "{:#?}", d.events("error", &g.name));
    }
    let checks = d.metric("vigil_checks_total", &format!("domain=\"{}\",scope=\"full\"", g.name));
    eprintln!("full checks during the storms: {checks:?}");
    assert!(checks.unwrap_or(0.0) >= 30.0, "too few full checks: {checks:?}");
    eprintln!("patched sites at most {most_patched}, pending at most {most_pending:?}");
    assert!(most_patched > 0.0, "vigil_patched_sites stayed 0 through the storms");
    assert!(most_pending.is_some(), "vigil_patch_sites_pending not exported:\n{}", d.metrics());
    for kind in PatchKind::ALL {
        let n = d.metric(
            "vigil_patches_accepted_total",
            &format!("domain=\"{}\",kind=\"{}\"", g.name, kind.as_str()),
        );
        eprintln!("accepted {} patches: {n:?}", kind.as_str());
        assert!(n.unwrap_or(0.0) > 0.0, "no {} patches counted: {}", kind.as_str(), d.metrics());
    }
    assert!(!d.events("kernel-patched", &g.name).is_empty(), "no kernel-patched info events");
    let loads = d.events("module-loaded", &g.name).len();
    assert!(loads >= 5, "the module loop was seen loading only {loads} time(s)");

    // Every attack of the earlier issues, made during the storms, is caught.
    let attacks: [(&str, &str, &str); 6] = [
        ("attack module-inline", "module:vigil_benign", "changed after it was loaded"),
        ("attack inline", "kernel-text", "__x64_sys_getppid"),
        ("attack syscall", "sys_call_table", "sys_call_table[110] (getppid)"),
        ("attack idt", "idt-vectors", "IDT vector"),
        ("attack hide", "module-area", "belong to no listed module"),
        ("attack wp", "registers", "CR0.WP"),
    ];
    g.run("insmod /lib/vigil/vigil_benign.ko").unwrap();
    d.wait_for("vigil_benign to be seen loaded", Duration::from_secs(20), |d| {
        d.events("module-loaded", &g.name)
            .iter()
            .any(|a| a["detail"].as_str().unwrap_or("").contains("vigil_benign"))
    });
    for (cmd, region, needle) in attacks {
        g.run(cmd).unwrap_or_else(|e| panic!("{cmd}: {e}"));
        let t = Instant::now();
        d.wait_for(&format!("{region} alert after `{cmd}`"), Duration::from_secs(20), |d| {
            violations(d, &g, region).iter().any(|a| {
                let text = format!("{} {}", a["detail"], a["symbol"]);
                text.contains(needle)
            })
        });
        eprintln!("`{cmd}` caught in {region} after {:?}", t.elapsed());
    }
    // Nothing but the attacks: their regions, and the pages they wrote (the
    // IDT's page, the rodata page holding sys_call_table).
    let mut expected: Vec<&str> = attacks.iter().map(|a| a.1).collect();
    expected.extend(["idt", "kernel-rodata"]);
    for a in d.events("violation", &g.name) {
        let region = a["region"].as_str().unwrap_or("");
        assert!(expected.contains(&region), "unexpected violation: {a:#}");
    }
    let out = g.run("storm stop").unwrap();
    assert!(out.contains("storm: stopped"), "{out}");
    // After the storms, past the time a dropped record still counts: the
    // function tracer's trampoline stays allocated (ftrace keeps a static
    // ops' trampoline) and must still be accounted for.
    let before = d.events("violation", &g.name).len();
    std::thread::sleep(patch_grace() + Duration::from_secs(5));
    let after = d.events("violation", &g.name);
    assert_eq!(after.len(), before, "new violations after the storms: {:#?}", &after[before..]);
}

fn patch_grace() -> Duration {
    vigil::linux::patch::RECORD_GRACE
}

/// What the mimicry attacks need to know of the live guest.
struct Targets {
    /// A 5-byte jump-label site holding a NOP, whose key nothing flips here.
    jump_label: (u64, u64),
    /// Two 5-byte NOPs of alignment padding that no patch record names.
    padding: Vec<u64>,
    /// `__x64_sys_getppid`'s ftrace entry, and `ftrace_stub`.
    fentry: u64,
    ftrace_stub: u64,
    /// A static call site of the `sched_process_fork` tracepoint, calling
    /// its iterator.
    static_call: u64,
}

fn targets(domain: &str, tracepoint_key: u64) -> Targets {
    let hv = vigil::libvirt::Hypervisor::connect("qemu:///system").unwrap();
    let dom = hv.domain(domain).unwrap();
    let mem = dom.open_memory(vigil::libvirt::SourceChoice::Auto).unwrap();
    let regs = dom.registers().unwrap();
    let view = discover(&*mem, &regs).unwrap();
    let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles"));
    let (profiles, bad) = profile::load_dir(&[dir]);
    assert!(bad.is_empty(), "{bad:?}");
    let mut m = semantic::match_profile(&profiles, &*mem, &view, view.identification.image_base)
        .expect("the lab kernel matches the committed profile");
    m.modules = semantic::walk_modules(&m, &*mem, &view).unwrap();
    let tables = PatchTables::read(&m, &*mem, &view);
    assert!(tables.problems.is_empty(), "{:?}", tables.problems);
    assert!(tables.site_count() > 40_000, "only {} patch sites", tables.site_count());
    // A watch's kept site map gives the same sites, made once.
    let mut memo = vigil::linux::patch::SiteMemo::default();
    for _ in 0..2 {
        let kept = PatchTables::read_with(&m, &*mem, &view, &mut memo);
        assert_eq!(kept.site_count(), tables.site_count());
        assert!(kept.problems.is_empty(), "{:?}", kept.problems);
    }
    let now = |a: u64, n: usize| read_virt(&*mem, &view, a, n).unwrap().0;

    let jump_label = tables
        .jump_labels()
        .find(|&(a, t, k)| k == tracepoint_key && t != a + 5 && now(a, 5) == NOP5)
        .map(|(a, t, _)| (a, t))
        .expect("a NOP jump-label site of the tracepoint");

    // Padding after a function: int3, then a 5-byte NOP up to a 16-byte boundary.
    let text = view.regions.iter().find(|r| r.name == "kernel-text").unwrap();
    let mut padding = Vec::new();
    for p in &text.pages {
        let bytes = now(p.gva.raw(), 4096);
        for i in 1..4096 - 5 {
            let a = p.gva.raw() + i as u64;
            if bytes[i - 1] == 0xcc
                && bytes[i..i + 5] == NOP5
                && (a + 5).is_multiple_of(16)
                && !tables.touches(a, a + 5)
            {
                padding.push(a);
            }
        }
        if padding.len() >= 2 {
            break;
        }
    }
    assert!(padding.len() >= 2, "no padding NOPs found: {padding:x?}");
    let fentry = m.expect("__x64_sys_getppid").unwrap();
    assert!(tables.is_site(fentry, PatchKind::Ftrace), "{fentry:#x} is no ftrace site");
    assert_eq!(now(fentry, 5), NOP5);
    let key = m.expect("__SCK__tp_func_sched_process_fork").unwrap();
    let iter = m.expect("__traceiter_sched_process_fork").unwrap();
    let static_call = tables
        .static_calls()
        .find(|&(a, k)| k == key && now(a, 5) == rel32_bytes(0xe8, a, iter))
        .map(|(a, _)| a)
        .expect("a static call site of sched_process_fork calling its iterator");
    Targets {
        jump_label,
        padding,
        fentry,
        ftrace_stub: m.expect("ftrace_stub").unwrap(),
        static_call,
    }
}

fn rel32_bytes(op: u8, from: u64, to: u64) -> Vec<u8> {
    let rel = i32::try_from(i64::from_ne_bytes(to.wrapping_sub(from + 5).to_ne_bytes()))
        .expect("a near target");
    let mut b = vec![op];
    b.extend_from_slice(&rel.to_le_bytes());
    b
}

fn rel32(op: u8, from: u64, to: u64) -> String {
    rel32_bytes(op, from, to).iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn lab_patching_mimicry_of_the_kernels_patches_is_caught() {
    let d = Daemon::every_second("vigil-lab-mimic");
    let mut g = boot("mimic");
    d.wait_watching(&g);
    // struct tracepoint { const char *name; struct static_key key; ... }
    let tp = g.symbol("__tracepoint_sched_process_fork").unwrap();
    let t = targets(&g.name, tp + 8);

    let (jl, jl_target) = t.jump_label;
    let cases = [
        // A jump-label site turned into a jmp that is not its target.
        (jl, rel32(0xe9, jl, jl + 5), "a jump-label site may hold a NOP or a jmp to its target"),
        // A NOP that is no patch site turned into a jmp.
        (
            t.padding[0],
            rel32(0xe9, t.padding[0], t.padding[0] + 5),
            "where the kernel patches nothing",
        ),
        // A function entry turned into a call to something that is no ftrace
        // trampoline: into kernel text, where no trampoline ftrace makes lies,
        // so reported at once (no hold).
        (
            t.fentry,
            rel32(0xe8, t.fentry, t.ftrace_stub),
            "an ftrace function entry may hold a NOP or a call",
        ),
        // An int3 where no kprobe is registered.
        (t.padding[1], "cc".to_owned(), "where no kprobe is registered"),
        // A tracepoint's static call site turned into a call to another
        // function: how the kernel's own update looks for a moment, so held
        // (PENDING_HOLD), then reported.
        (
            t.static_call,
            rel32(0xe8, t.static_call, t.ftrace_stub),
            "a static call site may call only its key's function",
        ),
    ];
    // Record disagreements (a call the record does not name at a site the
    // kernel patches through a record) are reported once held this long; a
    // function entry's call into kernel text is none.
    let held = |addr: u64| addr == t.static_call;
    eprintln!("jump-label site {jl:#x} (target {jl_target:#x})");
    for (addr, bytes, rule) in &cases {
        g.run(&format!("attack poke {addr:#x} {bytes}")).unwrap();
        let found = || -> Option<Value> {
            let r = d.control(&json!({ "command": "check", "domain": g.name }));
            r["result"]["violations"]
                .as_array()?
                .iter()
                .find(|f| {
                    f["gva"]
                        .as_str()
                        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                        == Some(*addr)
                })
                .cloned()
        };
        let poked = Instant::now();
        let limit = Duration::from_secs(20) + vigil::linux::patch::PENDING_HOLD;
        d.wait_for(&format!("a violation at {addr:#x}"), limit, |_| found().is_some());
        let f = found().unwrap();
        assert_eq!(f["region"], "kernel-text", "{f:#}");
        let detail = f["detail"].as_str().unwrap();
        assert!(detail.contains(rule), "{addr:#x}: {f:#}");
        if held(*addr) {
            assert!(detail.contains("longer than the kernel takes"), "{addr:#x}: {f:#}");
            assert!(
                poked.elapsed() >= vigil::linux::patch::PENDING_HOLD,
                "reported before its hold ended"
            );
        } else {
            assert!(!detail.contains("longer than the kernel takes"), "{addr:#x} held: {f:#}");
        }
        eprintln!("{addr:#x} ({}): {}", f["symbol"], f["detail"]);
    }
    // The ftrace mimicry names the function.
    let fs = violations(&d, &g, "kernel-text");
    assert!(!fs.is_empty());
    let r = d.control(&json!({ "command": "check", "domain": g.name }));
    let names: Vec<String> = r["result"]["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["symbol"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("__x64_sys_getppid")), "{names:?}");
}

use common::vigil_in as vigil;

#[test]
fn lab_patching_cli_check_accepts_the_tracer_and_needs_the_original_pages() {
    let mut g = boot("patch-cli");
    let state = tempfile::tempdir().unwrap();
    let out = vigil(state.path(), &["baseline", &g.name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pages = std::fs::read_dir(state.path().join("baselines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pages"))
        .expect("the baseline's original pages are kept beside it");

    g.run("echo 'vfs_*' > /sys/kernel/tracing/set_ftrace_filter && echo function > /sys/kernel/tracing/current_tracer")
        .unwrap();
    let out = vigil(state.path(), &["check", &g.name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("kernel patches:") && text.contains("ftrace"), "{text}");
    let out = vigil(state.path(), &["check", &g.name, "--format", "json"]);
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["patches"]["ftrace"].as_u64().unwrap_or(0) > 10, "{:#}", r["patches"]);

    // Without the original pages a patch cannot be told from an attack: said, and refused.
    std::fs::remove_file(&pages).unwrap();
    let out = vigil(state.path(), &["check", &g.name]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without the baseline's original pages"), "{err}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("no original bytes are kept"));
}
