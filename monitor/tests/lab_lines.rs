//! Lab tests run on both kernel lines the lab boots (Debian 12's 6.1 and the
//! 6.12 of Debian 13 and bookworm): the regions end where the kernel's
//! layout says on every boot, a freed gap page made executable is caught,
//! attacks are caught and named, and five-minute storms of the kernel's own
//! patching, with memory pressure and a benign hooking module, raise no
//! violation. On 6.1 also: a baseline stored before layout bounds is bounded
//! when attached, and a module reloaded in place under the tracer is no
//! violation.
//!
//! Needs the lab prepared (both lines) and libvirtd running (`lab/test.sh`
//! does both).

use std::time::{Duration, Instant};

use vigil_lab::Kernel;

mod common;
use common::{Daemon, FULL, boot_kernel, lab_profile, vigil_in, violations};

fn suffix(what: &str, kernel: Kernel) -> String {
    format!("{what}-{}", kernel.line().replace('.', "-"))
}

/// Pages of text (`_text` to `_etext`) and rodata (`__start_rodata` to
/// `__end_rodata`) in the profile, whole pages.
fn spans(kernel: Kernel) -> (u64, u64) {
    let p = lab_profile(kernel);
    let at = |n: &str| p.symbol(n).unwrap_or_else(|| panic!("no {n} in the profile")).addr;
    let pages = |a: u64, b: u64| (b.next_multiple_of(4096) - (a & !4095)) / 4096;
    (pages(at("_text"), at("_etext")), pages(at("__start_rodata"), at("__end_rodata")))
}

fn region_pages(d: &Daemon, uuid: &str) -> (u64, u64, String) {
    let path = d.path("baselines").join(format!("{uuid}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let b: serde_json::Value = serde_json::from_str(&text).unwrap();
    let count = |name: &str| {
        b["regions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .and_then(|r| r["pages"].as_array())
            .map_or(0, |p| p.len() as u64)
    };
    (
        count("kernel-text"),
        count("kernel-rodata"),
        b["kernel"]["bounds"].as_str().unwrap_or("").into(),
    )
}

fn bounds_and_gap(kernel: Kernel) {
    let s = suffix("bounds", kernel);
    let d = Daemon::start(&format!("vigil-lab-{s}"));
    let mut g = boot_kernel(&s, kernel);
    let (text, rodata) = spans(kernel);
    for boot in 1..=2 {
        d.wait_for(&format!("baseline {boot} of {}", g.name), Duration::from_secs(90), |d| {
            d.events("new-boot", &g.name).len() >= boot
                && d.status(&g.name).is_some_and(|s| s["state"] == "watching")
        });
        let (t, r, bounds) = region_pages(&d, &g.uuid);
        eprintln!("{} boot {boot}: {t} text and {r} rodata pages; {bounds}", kernel.line());
        assert_eq!((t, r), (text, rodata), "boot {boot} of {}: {bounds}", kernel.line());
        assert!(bounds.contains("from the profile of"), "{bounds}");
        let attached = &d.events("new-boot", &g.name)[boot - 1];
        assert!(
            attached["detail"].as_str().unwrap_or("").contains("bounded by the kernel's layout"),
            "{attached:#}"
        );
        if boot == 1 {
            g.reset().unwrap_or_else(|e| panic!("{e}"));
        }
    }
    // The reset's boot is past its provisional window (the state says
    // watching): a freed gap page made executable.
    let before = d.events("violation", &g.name).len();
    assert_eq!(before, 0, "{:#?}", d.events("violation", &g.name));
    let gap = g.symbol("__end_rodata").unwrap().next_multiple_of(4096);
    g.run("attack gapx").unwrap();
    d.wait_for("the gap page made executable", 4 * FULL + Duration::from_secs(10), |d| {
        violations(d, &g, "kernel-image").iter().any(|v| {
            let detail = v["detail"].as_str().unwrap_or("");
            let at = v["gva"]
                .as_str()
                .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
            v["kind"] == "permission" && detail.contains("loosened") && at == Some(gap)
        })
    });
    for v in d.events("violation", &g.name) {
        assert_eq!(v["region"], "kernel-image", "only the gap page: {v:#}");
    }
}

#[test]
fn lab_lines_6_1_regions_end_at_the_layout_and_a_gap_page_made_executable_is_caught() {
    bounds_and_gap(Kernel::V6_1);
}

#[test]
fn lab_lines_6_12_regions_end_at_the_layout_and_a_gap_page_made_executable_is_caught() {
    bounds_and_gap(Kernel::V6_12);
}

/// `vigil check` names an inline hook by symbol, a syscall table hook by
/// its entry, and finds a hidden module; loading and unloading a module is
/// no violation.
fn attacks_named(kernel: Kernel) {
    let s = suffix("named", kernel);
    let mut g = boot_kernel(&s, kernel);
    let state = tempfile::tempdir().unwrap();
    let out = vigil_in(state.path(), &["baseline", &g.name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("regions bounded by the kernel's layout"), "{said}");
    // And one without profiles: bounds and names from the guest's kallsyms.
    let bare = tempfile::tempdir().unwrap();
    let no_profiles = tempfile::tempdir().unwrap();
    let bare_vigil = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
            .arg("--state-dir")
            .arg(bare.path())
            .arg("--profiles")
            .arg(no_profiles.path())
            .args(args)
            .output()
            .unwrap()
    };
    let out = bare_vigil(&["baseline", &g.name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("from the guest's own kallsyms (lower trust)"), "{said}");
    g.run("attack benign").unwrap();
    let out = vigil_in(state.path(), &["check", &g.name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "a module loaded and unloaded: {text}");
    assert!(text.contains("INTACT"), "{text}");
    g.run("attack inline").unwrap();
    g.run("attack syscall").unwrap();
    g.run("attack hide").unwrap();
    let out = vigil_in(state.path(), &["check", &g.name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for needle in [
        "at __x64_sys_getppid",
        "sys_call_table[110] (getppid)",
        "belong to no listed module (a hidden module?)",
    ] {
        assert!(text.contains(needle), "{}: no {needle:?} in\n{text}", kernel.line());
    }
    assert!(!text.contains("no guest profile matches"), "{text}");
    // Without a profile the hooks are still caught, at page level, the
    // page named from the guest's own kallsyms (by its first symbol: naming
    // the changed bytes without a profile is issue 28's).
    let out = bare_vigil(&["check", &g.name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("kernel-text") && text.contains("named from guest memory: lower trust"),
        "{}: without a profile: {text}",
        kernel.line()
    );
}

#[test]
fn lab_lines_6_1_attacks_are_caught_and_named() {
    attacks_named(Kernel::V6_1);
}

#[test]
fn lab_lines_6_12_attacks_are_caught_and_named() {
    attacks_named(Kernel::V6_12);
}

/// A baseline stored by a vigil from before layout bounds: its rodata ran
/// on into the freed rodata/data gap, and the gap pages have been reused
/// since (values that no longer match). Attached again, it is bounded in
/// memory by the profile: the gap pages are dropped from content checks
/// (the attach event counts them), and no violation follows.
fn earlier_baseline_bounded(kernel: Kernel) {
    use vigil::integrity::baseline::{PageRecord, expand_runs};
    let s = suffix("earlier", kernel);
    let mut d = Daemon::start(&format!("vigil-lab-{s}"));
    let g = boot_kernel(&s, kernel);
    d.wait_watching(&g);
    d.kill9();
    let path = vigil::paths::baseline_path(d.dir.path(), &g.uuid);
    let mut b = vigil::integrity::Baseline::load(&path).unwrap();
    let p = lab_profile(kernel);
    let slide = b.kernel.image_base.raw().wrapping_sub(p.symbol("_text").unwrap().addr);
    let end = p.symbol("__end_rodata").unwrap().addr.wrapping_add(slide).next_multiple_of(4096);
    let gap: Vec<PageRecord> = expand_runs(&b.image_mapping)
        .unwrap()
        .into_iter()
        .filter(|m| (end..end.next_multiple_of(2 << 20)).contains(&m.gva.raw()))
        .map(|m| PageRecord { gva: m.gva, gpa: m.gpa, perms: m.perms, value: [0xa5; 32] })
        .collect();
    assert!(!gap.is_empty(), "{}: no gap page in the image mapping", kernel.line());
    let r = b.regions.iter_mut().find(|r| r.name == "kernel-rodata").unwrap();
    assert_eq!(
        r.pages.last().unwrap().gva.raw() + 4096,
        end,
        "the stored rodata ends at __end_rodata"
    );
    r.pages.extend(gap.iter().cloned());
    r.bytes = r.pages.len() as u64 * 4096;
    let values: Vec<_> = r.pages.iter().map(|p| p.value).collect();
    r.root = *vigil::integrity::tree::region_root(&values, r.bytes).unwrap().as_bytes();
    b.kernel.rodata_pages = r.pages.len() as u64;
    b.kernel.bounds.clear();
    b.save(&path).unwrap();
    d.spawn();
    d.wait_for("the stored baseline attached", Duration::from_secs(90), |d| {
        !d.events("attached", &g.name).is_empty()
            && d.status(&g.name).is_some_and(|s| s["state"] == "watching")
    });
    std::thread::sleep(2 * FULL);
    assert!(d.events("violation", &g.name).is_empty(), "{:#?}", d.alerts());
    let attached = d.events("attached", &g.name).last().cloned().unwrap();
    let said = attached["detail"].as_str().unwrap_or("");
    assert!(
        said.contains(&format!(
            "{} rodata page(s) of the stored baseline in the freed gaps now checked for mapping only",
            gap.len()
        )),
        "{}: {attached:#}",
        kernel.line()
    );
    assert!(d.events("new-boot", &g.name).len() == 1, "no new baseline: {:#?}", d.alerts());
}

#[test]
fn lab_lines_6_1_a_baseline_stored_before_layout_bounds_is_bounded_when_attached() {
    earlier_baseline_bounded(Kernel::V6_1);
}

/// Fails, with each violation's rule and bytes from the evidence bundles,
/// if the daemon raised any violation on `domain`; `when` says at what point.
fn no_violation(d: &Daemon, domain: &str, kernel: Kernel, when: &str) {
    let v: Vec<String> = d
        .events("violation", domain)
        .iter()
        .map(|a| format!("{} {} {}", a["region"], a["symbol"], a["detail"]))
        .collect();
    if !v.is_empty() {
        std::thread::sleep(Duration::from_secs(5)); // the bundle is written
        panic!(
            "{}: violations {when}: {v:#?}\nwhat the evidence says: {:#?}",
            kernel.line(),
            d.evidence_changes()
        );
    }
}

/// During a storm: `vigil hooks` lists the kernel's own tracers' hooks as
/// the kernel's (the function tracer's ftrace ops, kprobe events) and
/// vigil_count's ftrace ops and kprobe as the module's, with no violation;
/// the daemon said vigil_count's hooks as information.
fn storm_hooks_listed(d: &Daemon, domain: &str, kernel: Kernel) {
    let mut kernel_owned = std::collections::BTreeSet::new();
    let mut module_owned = std::collections::BTreeSet::new();
    // The tracers come and go: look a few times.
    for _ in 0..20 {
        let out = vigil_in(
            d.dir.path(),
            &["--format", "json", "--allow-hook", "vigil_count", "hooks", domain],
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("vigil hooks: {e}: {}", String::from_utf8_lossy(&out.stderr))
        });
        assert_eq!(out.status.code(), Some(0), "{}: hooks during the storm: {v:#}", kernel.line());
        for h in v["hooks"].as_array().unwrap() {
            for c in h["callbacks"].as_array().unwrap() {
                let what = format!("{} {}", h["mechanism"], c["role"]);
                match c["owner"]["kind"].as_str() {
                    Some("kernel") => {
                        kernel_owned.insert(format!("{what} {}", c["owner"]["symbol"]))
                    }
                    Some("module") => module_owned.insert(format!("{what} {}", c["owner"]["name"])),
                    other => panic!(
                        "{}: a hook owned by {other:?} during the storm: {h:#}",
                        kernel.line()
                    ),
                };
            }
        }
        let tracers = ["function_trace_call", "kprobe_dispatcher"];
        if tracers.iter().all(|t| kernel_owned.iter().any(|k| k.contains(t))) {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!(
        "{}: kernel-owned hooks seen: {kernel_owned:#?}\nmodule-owned: {module_owned:#?}",
        kernel.line()
    );
    for t in ["function_trace_call", "kprobe_dispatcher"] {
        assert!(
            kernel_owned.iter().any(|k| k.contains(t)),
            "{}: the storm's {t} never listed as the kernel's: {kernel_owned:#?}",
            kernel.line()
        );
    }
    for m in ["\"ftrace\" \"func\" \"vigil_count\"", "\"kprobe\" \"pre_handler\" \"vigil_count\""] {
        assert!(module_owned.contains(m), "{}: {m} not listed: {module_owned:#?}", kernel.line());
    }
    let said = d.events("notice", domain).iter().any(|a| {
        a["region"] == "hooks" && a["detail"].as_str().unwrap_or_default().contains("vigil_count")
    });
    assert!(said, "{}: the daemon said nothing of vigil_count's hooks", kernel.line());
}

/// An inline hook of `__x64_sys_getppid`, caught by the daemon.
fn inline_hook_caught(d: &Daemon, g: &mut vigil_lab::Guest, after: &str) {
    g.run("attack inline").unwrap();
    d.wait_for(&format!("the inline hook after {after}"), Duration::from_secs(30), |d| {
        violations(d, g, "kernel-text")
            .iter()
            .any(|v| format!("{} {}", v["detail"], v["symbol"]).contains("__x64_sys_getppid"))
    });
}

/// A module unloaded and loaded again at the same base faster than the
/// checks (the daemon compares such a reload with the text it had), while
/// the function tracer goes on and off over every function: its ftrace
/// entry, jump label and return sites are the kernel's, so no violation.
/// Memory is filled and freed meanwhile, so freed module pages are reused.
/// Then an inline hook is still caught.
fn module_reloaded_in_place(kernel: Kernel) {
    let s = suffix("reload", kernel);
    let d = Daemon::every_second_with(
        &format!("vigil-lab-{s}"),
        "[evidence]\nenabled = true\nmemory_dump = false\n",
    );
    let mut g = boot_kernel(&s, kernel);
    d.wait_watching(&g);
    let full = format!("domain=\"{}\",scope=\"full\"", g.name);
    let checks_before = d.metric("vigil_checks_total", &full).unwrap_or(0.0);
    let t = "/sys/kernel/tracing";
    g.run(&format!("[ -e {t}/current_tracer ] || mount -t tracefs nodev {t}")).unwrap();
    // Memory pressure, as in the storms: freed pages handed out at once.
    g.run(
        "( while :; do kb=$(awk '/MemAvailable/ { print int($2 * 3 / 4) }' /proc/meminfo); \
         dd if=/dev/zero of=/dev/null bs=${kb}k count=2; done ) </dev/null >/dev/null 2>&1 &",
    )
    .unwrap();
    // Each load lives 1.2 s and the next follows its unload at once: most
    // fall between two checks that both see the module live.
    let start = Instant::now();
    let mut bases = std::collections::BTreeMap::<String, u32>::new();
    let mut round = 0;
    while start.elapsed() < Duration::from_secs(90) {
        let tracer = if round % 2 == 0 { "function" } else { "nop" };
        round += 1;
        let out = g
            .run(&format!(
                "echo {tracer} > {t}/current_tracer; for i in 1 2 3 4 5 6; do \
                 insmod /lib/vigil/vigil_churn.ko && grep '^vigil_churn ' /proc/modules; \
                 sleep 1.2; rmmod vigil_churn; done"
            ))
            .unwrap();
        for line in out.lines() {
            if let Some(base) = line.split_whitespace().find(|w| w.starts_with("0x")) {
                *bases.entry(base.to_owned()).or_default() += 1;
            }
        }
        no_violation(
            &d,
            &g.name,
            kernel,
            &format!("after {round} rounds (loads by base {bases:?})"),
        );
    }
    std::thread::sleep(2 * FULL);
    no_violation(&d, &g.name, kernel, &format!("after the last round (loads by base {bases:?})"));
    let checks = d.metric("vigil_checks_total", &full).unwrap_or(0.0) - checks_before;
    // Loads the daemon saw as such; the others were reloads at the same base
    // between two checks that saw the module live, compared with its text.
    let seen = u32::try_from(d.events("module-loaded", &g.name).len()).unwrap_or(u32::MAX);
    let loads: u32 = bases.values().sum();
    eprintln!(
        "{}: {round} rounds, {loads} loads by base {bases:?}, {seen} seen as loads, {checks} full checks",
        kernel.line()
    );
    assert!(checks >= 45.0, "the daemon checked {checks} times in full");
    assert!(bases.values().any(|&n| n >= 2), "never loaded twice at one base: {bases:?}");
    assert!(
        2 * seen < loads,
        "most reloads should fall between two checks: {seen} of {loads} seen"
    );
    // And the daemon still catches a write.
    inline_hook_caught(&d, &mut g, "the reloads");
}

#[test]
fn lab_lines_6_1_a_module_reloaded_in_place_under_the_tracer_is_no_violation() {
    module_reloaded_in_place(Kernel::V6_1);
}

const LONG_STORM: Duration = Duration::from_secs(5 * 60);

/// BLAKE3 of each page of the rodata/data gap (from `__end_rodata` to the
/// next 2 MiB) that the kernel image still maps, read from the host.
fn gap_pages(domain: &str, kernel: Kernel) -> Vec<(u64, [u8; 32])> {
    use vigil::integrity::AddressSpace;
    use vigil::memory::GuestMemory;
    let hv = vigil::libvirt::Hypervisor::connect("qemu:///system").unwrap();
    let dom = hv.domain(domain).unwrap();
    let mem = dom.open_memory(vigil::libvirt::SourceChoice::Auto).unwrap();
    let regs = dom.registers().unwrap();
    let view = vigil::linux::discover(&*mem, &regs).unwrap();
    let p = lab_profile(kernel);
    let slide = view.identification.image_base.raw().wrapping_sub(p.symbol("_text").unwrap().addr);
    let end = p.symbol("__end_rodata").unwrap().addr.wrapping_add(slide).next_multiple_of(4096);
    let mut out = Vec::new();
    for gva in (end..end.next_multiple_of(2 << 20)).step_by(4096) {
        if let Some((gpa, _)) = view.translate(vigil::addr::GuestVirtAddr(gva)) {
            let mut page = vec![0u8; 4096];
            mem.read(gpa, &mut page).unwrap();
            out.push((gva, *blake3::hash(&page).as_bytes()));
        }
    }
    out
}

/// Five minutes of the kernel patching itself (the function tracer on every
/// function every other round, tracepoints, kprobes, module loads), with
/// memory filled and freed in a loop and vigil_count's kprobe and ftrace
/// callback in place, checked in full every second: no violation. Then an
/// inline hook is caught.
fn long_storm(kernel: Kernel) {
    let s = suffix("longstorm", kernel);
    // Evidence bundles: a violation's rule and bytes for the failure message.
    // vigil_count's kprobe handler lies in a module: a hook that can
    // redirect, allowed as an operator allows their observability agent.
    let d = Daemon::every_second_with(
        &format!("vigil-lab-{s}"),
        "[evidence]\nenabled = true\nmemory_dump = false\n[hooks]\nallow = [\"vigil_count\"]\n",
    );
    let mut g = boot_kernel(&s, kernel);
    d.wait_watching(&g);
    // (Watching: past the boot's provisional window, so the storm is
    // judged, not absorbed.)
    let gap_before = gap_pages(&g.name, kernel);
    assert!(!gap_before.is_empty(), "{}: no gap page mapped after __end_rodata", kernel.line());
    let out = g.run("storm start full pressure hooks").unwrap();
    assert!(out.contains("storm: started") && out.contains("vigil_count loaded"), "{out}");
    let start = Instant::now();
    while start.elapsed() < LONG_STORM {
        std::thread::sleep(Duration::from_secs(10));
        no_violation(&d, &g.name, kernel, &format!("after {:?} of the storm", start.elapsed()));
    }
    let checks = d.metric("vigil_checks_total", &format!("domain=\"{}\",scope=\"full\"", g.name));
    eprintln!("{}: full checks during the storm: {checks:?}", kernel.line());
    assert!(checks.unwrap_or(0.0) >= 100.0, "too few full checks: {checks:?}");
    storm_hooks_listed(&d, &g.name, kernel);
    // The pressure reused gap pages: a check that protected them as
    // rodata would have alarmed.
    let gap_after = gap_pages(&g.name, kernel);
    let reused = gap_before.iter().filter(|(a, h)| !gap_after.contains(&(*a, *h))).count();
    eprintln!(
        "{}: {reused} of {} mapped gap pages changed during the storm",
        kernel.line(),
        gap_before.len()
    );
    assert!(reused > 0, "{}: the memory pressure reused no freed gap page", kernel.line());
    let out = g.run("storm stop").unwrap();
    eprintln!("{out}");
    assert!(out.contains("counted"), "{out}");
    inline_hook_caught(&d, &mut g, "the storm");
}

#[test]
fn lab_lines_6_1_five_minute_storm_with_pressure_and_hooks_gives_no_violation() {
    long_storm(Kernel::V6_1);
}

#[test]
fn lab_lines_6_12_five_minute_storm_with_pressure_and_hooks_gives_no_violation() {
    long_storm(Kernel::V6_12);
}
