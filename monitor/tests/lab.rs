//! Lab tests: real libvirt TCG guests of the pinned Debian cloud kernel,
//! attacked by the lab's modules and checked by the real `vigil` binary.
//!
//! They need the lab prepared (`lab/setup.sh --install`) and libvirtd and
//! virtlogd running (`.ci/run` does both); without them they fail and say so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vigil_lab::{Guest, Lab, Memory, Shape};

/// The guest's own early activity (clocksource switch and the like) is over
/// this long after init answers.
const SETTLE: Duration = Duration::from_secs(3);

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("vigil printed no JSON ({e}): {}\n{}", self.stdout, self.stderr)
        })
    }
}

fn vigil(state: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("running vigil");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn boot(suffix: &str, memory: Memory) -> Guest {
    boot_shape(suffix, &Shape { memory, ..Shape::default() })
}

fn boot_shape(suffix: &str, shape: &Shape) -> Guest {
    let lab = Lab::open().unwrap_or_else(|e| panic!("{e}"));
    let g = lab.start_with(suffix, shape).unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(SETTLE);
    g
}

fn state_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().to_path_buf();
    (d, p)
}

fn baseline(state: &Path, g: &Guest) {
    let r = vigil(state, &["baseline", &g.name]);
    assert_eq!(r.code, 0, "baseline of {} failed: {}", g.name, r.stderr);
}

fn check_json(state: &Path, g: &Guest) -> (i32, Value) {
    let r = vigil(state, &["check", &g.name, "--format", "json"]);
    assert!(r.code == 0 || r.code == 1, "check of {} failed ({}): {}", g.name, r.code, r.stderr);
    (r.code, r.json())
}

fn region_intact(report: &Value, name: &str) -> bool {
    report["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no region {name} in {report:#}"))["intact"]
        .as_bool()
        .unwrap()
}

/// Asserts that each named region has no violation.
fn assert_intact(report: &Value, regions: &[&str]) {
    for region in regions {
        assert!(region_intact(report, region), "{region} reported changed: {report:#}");
    }
}

fn violations(report: &Value) -> Vec<Value> {
    report["violations"].as_array().unwrap().clone()
}

fn page_of(addr: u64) -> String {
    format!("{:#x}", addr & !0xfff)
}

#[test]
fn lab_shared_ram_2vcpu_guest_idle_is_intact_twice_10s_apart() {
    let g = boot_shape("idle", &Shape { vcpus: 2, ..Shape::default() });
    let (_d, state) = state_dir();
    baseline(&state, &g);
    for round in 0..2 {
        if round == 1 {
            std::thread::sleep(Duration::from_secs(10));
        }
        let (code, report) = check_json(&state, &g);
        assert_eq!(code, 0, "round {round}: idle guest not intact: {report:#}");
        assert_eq!(report["intact"], true);
        assert!(violations(&report).is_empty());
        for region in ["kernel-text", "kernel-rodata", "idt", "gdt-cpu0", "registers"] {
            assert!(region_intact(&report, region), "{region} changed on an idle guest");
        }
    }
    // The baseline's regions are real: thousands of code pages, a root that
    // is plain BLAKE3 (checked in unit tests), an IDT and a GDT.
    let b: Value = serde_json::from_slice(
        &std::fs::read(state.join("baselines").join(format!("{}.json", g.uuid))).unwrap(),
    )
    .unwrap();
    let text_pages = b["regions"][0]["pages"].as_array().unwrap().len();
    assert!(text_pages > 1000, "only {text_pages} kernel text pages found");
    let regs = b["registers"].as_array().unwrap();
    assert_eq!(regs.len(), 2, "both vCPUs' registers are baselined");
    assert_ne!(regs[0]["gdtr_base"], regs[1]["gdtr_base"], "each vCPU has its own GDT");
}

#[test]
fn lab_shared_ram_5g_guest_with_ram_split_around_4g_is_read_through_both_sources() {
    use vigil::addr::{GuestPhysAddr, GuestVirtAddr};
    use vigil::libvirt::{Hypervisor, SourceChoice};

    let g = boot_shape("split", &Shape { mib: 5 * 1024, ..Shape::default() });
    let hv = Hypervisor::connect(vigil_lab::URI).unwrap();
    let dom = hv.domain(&g.name).unwrap();
    let shared = dom.open_memory(SourceChoice::Shared).unwrap();
    let process = dom.open_memory(SourceChoice::Process).unwrap();
    let ranges = shared.layout().ranges();
    let high = ranges.iter().find(|r| r.start.raw() >= 1 << 32).expect("RAM above 4 GiB");
    let low_end = ranges.iter().filter(|r| r.start.raw() < 1 << 32).map(|r| r.end()).max().unwrap();
    assert!(low_end <= 0xe000_0000, "a PCI hole below 4 GiB: low RAM ends at {low_end:#x}");
    assert_eq!(
        high.block_offset, low_end,
        "high RAM continues the same block where low RAM stopped"
    );
    assert_eq!(high.end() - high.start.raw() + low_end, 5 << 30, "all of the 5 GiB is laid out");
    // Pages on both sides of the hole and at the very top, through both sources.
    let probes: Vec<_> = [low_end - 4096, high.start.raw(), high.end() - 4096]
        .into_iter()
        .map(|a| (GuestVirtAddr(0), GuestPhysAddr(a)))
        .collect();
    let a = vigil::integrity::baseline::hash_pages(&*shared, "probe", &probes).unwrap();
    let b = vigil::integrity::baseline::hash_pages(&*process, "probe", &probes).unwrap();
    assert_eq!(a, b);
    assert!(shared.read(GuestPhysAddr(low_end), &mut [0u8; 1]).is_err(), "the hole is not RAM");
    // And the whole job works on it.
    let (_d, state) = state_dir();
    baseline(&state, &g);
    assert_eq!(check_json(&state, &g).0, 0);
}

/// Loads one attack module and returns the check report.
fn attack(suffix: &str, which: &str) -> (Guest, Value) {
    let mut g = boot(suffix, Memory::Shared);
    let (_d, state) = state_dir();
    baseline(&state, &g);
    let out = g.run(&format!("attack {which}")).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{out}");
    let (code, report) = check_json(&state, &g);
    assert_eq!(code, 1, "attack {which} not detected: {report:#}");
    (g, report)
}

#[test]
fn lab_shared_ram_guest_syscall_table_hook_is_a_rodata_content_change() {
    let (mut g, report) = attack("syscall", "syscall");
    let table = g.symbol("sys_call_table").unwrap();
    let v = violations(&report);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0]["region"], "kernel-rodata");
    assert_eq!(v[0]["kind"], "content");
    // getppid is syscall 110: its slot's page.
    assert_eq!(v[0]["gva"], page_of(table + 110 * 8));
    assert_intact(&report, &["kernel-text", "idt", "gdt-cpu0", "registers", "kernel-image"]);
}

#[test]
fn lab_shared_ram_guest_inline_hook_is_a_text_content_change() {
    let (mut g, report) = attack("inline", "inline");
    let target = g.symbol("__x64_sys_getppid").unwrap();
    let v = violations(&report);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0]["region"], "kernel-text");
    assert_eq!(v[0]["kind"], "content");
    assert_eq!(v[0]["gva"], page_of(target));
    // No profile here: the page is named from the guest's own kallsyms, as such.
    let sym = v[0]["symbol"].as_str().unwrap_or_default();
    assert!(sym.contains("(kernel text, named from guest memory: lower trust)"), "{:#}", v[0]);
    // Named by the first byte changed, not by the page's first symbol, and
    // the changed span said.
    assert!(sym.starts_with("__x64_sys_getppid+0x"), "{:#}", v[0]);
    let detail = v[0]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&format!("bytes {target:#x}..")), "{:#}", v[0]);
    assert_intact(&report, &["kernel-rodata", "idt", "gdt-cpu0", "registers", "kernel-image"]);
}

#[test]
fn lab_shared_ram_guest_idt_overwrite_is_an_idt_content_change() {
    let (_g, report) = attack("idt", "idt");
    let v = violations(&report);
    let idt: Vec<_> = v.iter().filter(|f| f["region"] == "idt").collect();
    assert_eq!(idt.len(), 1, "{v:#?}");
    assert_eq!(idt[0]["kind"], "content");
    assert_eq!(idt[0]["gva"], "0xfffffe0000000000");
    // Linux keeps idt_table in __ro_after_init data, so the same physical page
    // is also the kernel image's last rodata page: the only other finding
    // allowed is that page, at the same guest-physical address.
    for f in &v {
        assert_eq!(f["gpa"], idt[0]["gpa"], "a change outside the IDT's page: {f:#}");
    }
    assert_intact(&report, &["kernel-text", "gdt-cpu0", "registers", "kernel-image"]);
}

#[test]
fn lab_shared_ram_guest_cr0_wp_left_cleared_is_a_register_change() {
    let (_g, report) = attack("wp", "wp");
    let v = violations(&report);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0]["kind"], "register");
    assert_eq!(v[0]["register"], "CR0.WP");
    assert_eq!(v[0]["vcpu"], 0);
    assert_intact(&report, &["kernel-text", "kernel-rodata", "idt", "gdt-cpu0", "kernel-image"]);
}

#[test]
fn lab_shared_ram_guest_both_sources_read_identical_bytes() {
    use vigil::integrity::Baseline;
    use vigil::integrity::baseline::DomainId;
    use vigil::integrity::check::check;
    use vigil::libvirt::{Hypervisor, SourceChoice};

    let g = boot("sources", Memory::Shared);
    let hv = Hypervisor::connect(vigil_lab::URI).unwrap();
    let dom = hv.domain(&g.name).unwrap();
    let shared = dom.open_memory(SourceChoice::Shared).unwrap();
    let process = dom.open_memory(SourceChoice::Process).unwrap();
    assert_eq!(shared.kind(), "shared-mapping");
    assert_eq!(process.kind(), "process-read");
    assert_eq!(shared.layout(), process.layout(), "both sources describe the same RAM");
    let regs = dom.registers().unwrap();
    let id = DomainId { name: g.name.clone(), uuid: g.uuid.clone() };

    // The same kernel, found and hashed through each source, gives the same roots...
    let view_s = vigil::linux::discover(&*shared, &regs).unwrap();
    let view_p = vigil::linux::discover(&*process, &regs).unwrap();
    assert_eq!(view_s.image_pages, view_p.image_pages, "both sources see the same page tables");
    let b_s = Baseline::build(
        &*shared,
        id.clone(),
        view_s.identification.clone(),
        regs.clone(),
        &view_s,
        &view_s.regions,
    )
    .unwrap();
    let b_p = Baseline::build(
        &*process,
        id,
        view_p.identification.clone(),
        regs.clone(),
        &view_p,
        &view_p.regions,
    )
    .unwrap();
    for (a, b) in b_s.regions.iter().zip(&b_p.regions) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.root, b.root, "region {} differs between sources", a.name);
    }
    // Each root is plain BLAKE3 of the region's pages read in order (what
    // b3sum says of the same bytes).
    for (r, layout) in b_s.regions.iter().zip(&view_s.regions) {
        let mut bytes = vec![0u8; layout.pages.len() * 4096];
        for (p, chunk) in layout.pages.iter().zip(bytes.chunks_mut(4096)) {
            shared.read(p.gpa, chunk).unwrap();
        }
        assert_eq!(r.root, *blake3::hash(&bytes).as_bytes(), "root of {}", r.name);
    }
    // ...and a baseline taken through one checks intact through the other.
    let report = check(&b_s, &*process, &view_p, &regs).unwrap();
    assert!(report.intact, "{report:#?}");

    // Arbitrary RAM, not only the kernel: every 16th MiB, both below the
    // kernel and above it, hashed through the engine from each source.
    let ram = shared.layout().ranges().last().unwrap().end();
    let pages: Vec<_> = (1..ram / (16 << 20))
        .map(|i| (vigil::addr::GuestVirtAddr(0), vigil::addr::GuestPhysAddr(i * (16 << 20))))
        .collect();
    let hs = vigil::integrity::baseline::hash_pages(&*shared, "ram", &pages).unwrap();
    let hp = vigil::integrity::baseline::hash_pages(&*process, "ram", &pages).unwrap();
    assert!(!hs.is_empty());
    assert_eq!(hs, hp);
}

#[test]
fn lab_private_ram_guest_is_read_through_the_process_and_attacks_are_caught() {
    let mut g = boot("private", Memory::Private);
    let (_d, state) = state_dir();
    let r = vigil(&state, &["domains", "--format", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let list = r.json();
    let me = list["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == g.name.as_str())
        .expect("domain listed")
        .clone();
    assert_eq!(me["memory_source"], "process-read");
    assert_eq!(me["state"], "running");

    let r = vigil(&state, &["baseline", &g.name, "--source", "shared"]);
    assert_eq!(r.code, 2, "private RAM cannot be mapped: {}", r.stdout);
    assert!(
        r.stderr.contains(&g.name) && r.stderr.contains("not a shared file mapping"),
        "{}",
        r.stderr
    );

    baseline(&state, &g);
    let (code, report) = check_json(&state, &g);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["source"], "process-read");
    g.run("attack inline").unwrap();
    let (code, report) = check_json(&state, &g);
    assert_eq!(code, 1);
    let v = violations(&report);
    assert_eq!(
        (v.len(), v[0]["region"].as_str(), v[0]["kind"].as_str()),
        (1, Some("kernel-text"), Some("content")),
        "{v:#?}"
    );
}

/// A reboot under the same QEMU process leaves no record libvirt could
/// give a later `vigil check`: the moved kernel is reported page by page as
/// remap violations (exit 1). A new QEMU process is another run of the
/// domain: refused as such (exit 2), with no page-by-page storm.
#[test]
fn lab_shared_ram_guest_rebooted_is_remapped_and_restarted_is_another_run() {
    let mut g = boot("reboot", Memory::Shared);
    let (_d, state) = state_dir();
    baseline(&state, &g);
    g.reboot().unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(SETTLE);
    let (code, report) = check_json(&state, &g);
    assert_eq!(code, 1, "{report:#}");
    let v = violations(&report);
    assert!(
        v.iter().any(|f| f["region"] == "kernel-text" && f["kind"] == "remap"),
        "the moved kernel's pages: {v:#?}"
    );
    g.restart_process().unwrap_or_else(|e| panic!("{e}"));
    std::thread::sleep(SETTLE);
    let r = vigil(&state, &["check", &g.name]);
    assert_eq!(r.code, 2, "stdout: {}", r.stdout);
    assert!(r.stderr.contains("another run") && r.stderr.contains(&g.name), "{}", r.stderr);
    assert!(r.stdout.is_empty(), "no page-by-page storm: {}", r.stdout);
    // A new baseline of the new boot is intact.
    baseline(&state, &g);
    assert_eq!(check_json(&state, &g).0, 0);
}

#[test]
fn lab_errors_name_the_domain_and_the_reason() {
    let g = boot("errors", Memory::Shared);
    let (_d, state) = state_dir();
    // No baseline yet.
    let r = vigil(&state, &["check", &g.name]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("no baseline for domain") && r.stderr.contains(&g.name),
        "{}",
        r.stderr
    );
    // A baseline of another domain.
    let other = state.join("other.json");
    let r = vigil(&state, &["baseline", &g.name, "-o", other.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let text = std::fs::read_to_string(&other)
        .unwrap()
        .replace(&g.uuid, "00000000-0000-4000-8000-000000000000");
    std::fs::write(&other, text).unwrap();
    let r = vigil(&state, &["check", &g.name, "--baseline", other.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("is of domain"), "{}", r.stderr);
    // A damaged baseline.
    std::fs::write(&other, "{\"format\": \"vigil-baseline\"").unwrap();
    let r = vigil(&state, &["check", &g.name, "--baseline", other.to_str().unwrap()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("other.json"), "{}", r.stderr);
    // No such domain; a domain that is not running.
    let r = vigil(&state, &["check", "vigil-lab-no-such-domain"]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("no domain named") && r.stderr.contains("vigil-lab-no-such-domain"),
        "{}",
        r.stderr
    );
    let stopped =
        Lab::open().unwrap().define("stopped", Memory::Shared).unwrap_or_else(|e| panic!("{e}"));
    for args in [vec!["baseline", stopped.name.as_str()], vec!["check", stopped.name.as_str()]] {
        let r = vigil(&state, &args);
        assert_eq!(r.code, 2);
        assert!(
            r.stderr.contains(&format!("domain {} is not running (it is shut off)", stopped.name)),
            "{}",
            r.stderr
        );
    }
    // A guest paused before its first instruction has no kernel to find.
    drop(g);
    let paused = Lab::open().unwrap().start_paused("paused").unwrap_or_else(|e| panic!("{e}"));
    let r = vigil(&state, &["baseline", &paused.name]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains(&paused.name) && r.stderr.contains("no vCPU is in 64-bit mode"),
        "{}",
        r.stderr
    );
}

#[test]
fn lab_shared_ram_guest_with_profile_names_syscall_entry_and_idt_vector() {
    let profiles = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles");
    let mut g = boot("semantic", Memory::Shared);
    let (_d, state) = state_dir();
    baseline(&state, &g);
    let check = |state: &Path, g: &Guest| {
        let r = vigil(state, &["--profiles", profiles, "check", &g.name, "--format", "json"]);
        assert!(r.code == 0 || r.code == 1, "{}", r.stderr);
        assert!(!r.stderr.contains("no guest profile"), "{}", r.stderr);
        (r.code, r.json())
    };
    // An untouched guest: the profile matches and nothing is out of place.
    let (code, report) = check(&state, &g);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["profile"], "6.1.0-56-cloud-amd64");
    // The per-domain budget counts what is held across checks (here the
    // baseline and its original pages) and the tables read, and both fit.
    let bytes = |k: &str| report[k].as_u64().unwrap_or_else(|| panic!("no {k}: {report:#}"));
    let (held, read, limit) =
        (bytes("guest_memory_held"), bytes("guest_memory"), bytes("guest_memory_limit"));
    eprintln!("held {held} bytes, read {read}, of {limit}");
    assert!(held >= 1 << 20 && read > 0 && held + read <= limit, "{report:#}");

    g.run("attack syscall").unwrap();
    let (code, report) = check(&state, &g);
    assert_eq!(code, 1);
    let pointers: Vec<Value> =
        violations(&report).into_iter().filter(|v| v["kind"] == "pointer").collect();
    assert_eq!(pointers.len(), 1, "{pointers:#?}");
    let d = pointers[0]["detail"].as_str().unwrap();
    assert!(d.starts_with("sys_call_table[110] (getppid) points to 0xffffffffc"), "{d}");
    assert!(
        d.contains("in module vigil_hook_syscall+0x") && d.contains("not to __x64_sys_getppid"),
        "{d}"
    );
    let table = g.symbol("sys_call_table").unwrap();
    assert_eq!(pointers[0]["gva"], format!("{:#x}", table + 110 * 8), "the entry's own address");
    // A text page's finding is placed by symbol too.
    g.run("attack inline").unwrap();
    let (_, report) = check(&state, &g);
    let text: Vec<Value> =
        violations(&report).into_iter().filter(|v| v["region"] == "kernel-text").collect();
    assert_eq!(text.len(), 1);
    assert!(
        text[0]["symbol"].as_str().is_some_and(|s| s.ends_with("(kernel text)")),
        "{:#}",
        text[0]
    );

    g.run("attack idt").unwrap();
    let (_, report) = check(&state, &g);
    let idt: Vec<Value> =
        violations(&report).into_iter().filter(|v| v["region"] == "idt-vectors").collect();
    assert_eq!(idt.len(), 1, "{idt:#?}");
    let d = idt[0]["detail"].as_str().unwrap();
    assert!(
        d.starts_with("IDT vector 4 points to 0xffffffffc")
            && d.contains("not to asm_exc_overflow"),
        "{d}"
    );
}

#[test]
fn lab_shared_ram_guest_hidden_module_is_reported_and_module_churn_is_not() {
    let profiles = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles");
    let mut g = boot("modules", Memory::Shared);
    let (_d, state) = state_dir();
    baseline(&state, &g);
    let check = |g: &Guest| {
        let r = vigil(&state, &["--profiles", profiles, "check", &g.name, "--format", "json"]);
        assert!(r.code == 0 || r.code == 1, "{}", r.stderr);
        r.json()
    };
    // A benign module loaded and unloaded, and one that stays: no violation,
    // and the one that stays is listed.
    g.run("attack benign").unwrap();
    g.run("insmod /lib/vigil/vigil_benign.ko").unwrap();
    let report = check(&g);
    assert_eq!(report["intact"], true, "{report:#}");
    assert_eq!(report["modules"], serde_json::json!(["vigil_benign"]));
    g.run("rmmod vigil_benign").unwrap();
    assert_eq!(check(&g)["intact"], true);

    // A module that unlinks itself from the list.
    g.run("attack hide").unwrap();
    let report = check(&g);
    let v = violations(&report);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(v[0]["region"], "module-area");
    assert_eq!(v[0]["kind"], "unlisted");
    assert!(v[0]["detail"].as_str().unwrap().contains("belong to no listed module"), "{:#}", v[0]);
    assert!(
        !g.run("cat /proc/modules").unwrap().contains("vigil_hide"),
        "the module is hidden from the guest too"
    );

    // A syscall hook's target is named by its module.
    g.run("attack syscall").unwrap();
    let report = check(&g);
    let p: Vec<Value> =
        violations(&report).into_iter().filter(|v| v["kind"] == "pointer").collect();
    assert!(
        p[0]["detail"].as_str().unwrap().contains("in module vigil_hook_syscall+0x"),
        "{:#}",
        p[0]
    );
}

/// `vigil profile build` writes where `vigil check` looks (STATE_DIR/guest-profiles,
/// on the search path), so that a check without `--profiles` uses the new
/// profile, and `vigil profile list` shows it and the domain it matches;
/// where that cannot be written, the profile goes to ./guest-profiles and
/// a note says how to use it.
#[test]
fn lab_shared_ram_a_profile_built_on_the_host_is_used_without_being_named() {
    let lab = Lab::open().unwrap_or_else(|e| panic!("{e}"));
    let vmlinuz = vigil_lab::Kernel::V6_1.dir(&lab.dir).join("vmlinuz");
    let release = "6.1.0-56-cloud-amd64";
    for shipped in ["/etc/vigil/guest-profiles", "/usr/share/vigil/guest-profiles"] {
        let there = Path::new(shipped).join(format!("{release}.profile"));
        assert!(
            !there.exists(),
            "{} would match the lab guest before any is built: remove it (an installed vigil package?)",
            there.display()
        );
    }
    let g = boot("built", Memory::Shared);
    let (_d, state) = state_dir();
    baseline(&state, &g);
    let r = vigil(&state, &["check", &g.name, "--format", "json"]);
    assert!(r.stderr.contains("no guest profile"), "before any is built: {}", r.stderr);

    let r = vigil(&state, &["profile", "build", vmlinuz.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let built = state.join("guest-profiles").join(format!("{release}.profile"));
    assert!(r.stdout.contains(&built.display().to_string()), "{}", r.stdout);
    assert!(built.exists() && built.with_extension("reference").exists());

    let r = vigil(&state, &["check", &g.name, "--format", "json"]);
    assert!(r.code == 0, "{}\n{}", r.stdout, r.stderr);
    assert!(!r.stderr.contains("no guest profile"), "{}", r.stderr);
    assert_eq!(r.json()["profile"], release);

    let r = vigil(&state, &["profile", "list", "--format", "json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let list = r.json();
    let ours = list["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["file"] == built.display().to_string())
        .unwrap_or_else(|| panic!("{list:#}"));
    assert_eq!((&ours["release"], &ours["state"]), (&Value::from(release), &Value::from("used")));
    let dom = list["domains"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["domain"] == g.name.as_str())
        .unwrap_or_else(|| panic!("{list:#}"));
    assert_eq!(dom["profile"], release, "{list:#}");
    let r = vigil(&state, &["profile", "list"]);
    assert!(r.stdout.contains(&g.name) && r.stdout.contains(release), "{}", r.stdout);

    // A state directory that cannot take it (here a plain file): the
    // profile goes to ./guest-profiles, and the note says how to use it.
    let cwd = tempfile::tempdir().unwrap();
    let blocked = cwd.path().join("not-a-directory");
    std::fs::write(&blocked, b"").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .current_dir(cwd.path())
        .arg("--state-dir")
        .arg(&blocked)
        .args(["profile", "build", vmlinuz.to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("--profiles guest-profiles") && said.contains("cannot be written"),
        "{said}"
    );
    assert!(cwd.path().join("guest-profiles").join(format!("{release}.profile")).exists());
}

/// `lab/demo.sh`, the README's first command, on the binaries this test
/// run built (the machine already set up): the profile built and used, the
/// hooked function named, the daemon's alert of a second attack, and no
/// word of a missing profile.
#[test]
fn lab_shared_ram_the_demo_shows_the_hook_named_and_the_daemon_alerting() {
    let bin = Path::new(env!("CARGO_BIN_EXE_vigil")).parent().unwrap().to_path_buf();
    assert!(
        bin.join("vigil-lab").exists(),
        "{} is missing: build the workspace (cargo build -p vigil-lab)",
        bin.join("vigil-lab").display()
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(repo.join("lab/demo.sh"))
        .env("VIGIL_DEMO_BIN", &bin)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed:\n{said}");
    for shown in [
        "guest profile: 6.1.0-56-cloud-amd64",
        "at __x64_sys_getppid (kernel text)",
        "jmp 0FFFFFFFFC", // the diff's disassembly of the hook
        "\"symbol\":\"__x64_sys_getppid (kernel text)\"",
        "\"region\":\"sys_call_table\"",
        "alerted ",
        "vigil_violations_total{domain=\"vigil-lab-demo\",region=\"sys_call_table\",kind=\"pointer\"} 1",
    ] {
        assert!(said.contains(shown), "the demo did not show {shown:?}:\n{said}");
    }
    assert!(!said.contains("no guest profile"), "{said}");
    let took = said
        .lines()
        .find_map(|l| l.strip_prefix("alerted ")?.split(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no alert time:\n{said}"));
    eprintln!("the daemon alerted {took} s after the attack command returned");
}
