//! Lab: the kernel proved against the vendor's image (issue 25). Untouched
//! guests of both lines, under two CPU models (other alternatives apply)
//! and during the kernel's own patching storms, verify with no mismatch; a
//! guest attacked from its initramfs, before vigil ever looked, is reported
//! by `vigil baseline`, `vigil check`, `vigil verify` and the daemon's first
//! attach as critical `reference` violations naming the function and the
//! syscall table entry.
#![cfg(feature = "lab")]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use vigil_lab::{Kernel, Lab, Memory, Shape};

/// `vigil ARGS` with the profiles and references, JSON out.
fn vigil_ref(state: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("--state-dir")
        .arg(state)
        .arg("--profiles")
        .arg(profiles_with_references())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn start(suffix: &str, kernel: Kernel, cpu: Option<&str>, cmdline: &str) -> vigil_lab::Guest {
    let lab = Lab::open().unwrap_or_else(|e| panic!("{e}"));
    let shape = Shape {
        memory: Memory::Shared,
        kernel,
        cpu: cpu.map(str::to_owned),
        cmdline: cmdline.to_owned(),
        ..Shape::default()
    };
    lab.start_with(suffix, &shape).unwrap_or_else(|e| panic!("{e}"))
}

/// `vigil verify` of a guest: its exit status and JSON answer.
fn verify(g: &vigil_lab::Guest) -> (i32, Value) {
    let state = tempfile::tempdir().unwrap();
    let (code, out, err) = vigil_ref(state.path(), &["--format", "json", "verify", &g.name]);
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("verify of {}: {e}: {out} {err}", g.name));
    (code, v)
}

/// Verifies `g`, which must be verified; returns the runs by kind.
fn assert_verified(g: &vigil_lab::Guest, when: &str) -> Value {
    let (code, v) = verify(g);
    assert_eq!(
        (code, v["reference"]["state"].as_str()),
        (0, Some("verified")),
        "{} {when}: {}",
        g.name,
        serde_json::to_string_pretty(&v).unwrap()
    );
    v["runs"].clone()
}

fn untouched_guests_verify(kernel: Kernel) {
    let line = kernel.line().replace('.', "-");
    // The most TCG emulates, and a plain 64-bit CPU: other alternatives,
    // other return thunks, other paravirt choices. Each boot a new slide.
    let mut forms_by_cpu = Vec::new();
    for (n, cpu) in [None, Some("qemu64")].into_iter().enumerate() {
        let mut slides = Vec::new();
        // Two boots of the first model (two slides), one of the other.
        for boot in 0..2 - n {
            let mut g = start(&format!("refok-{line}-{n}"), kernel, cpu, "");
            let (code, v) = verify(&g);
            assert_eq!(code, 0, "{} ({cpu:?}, boot {boot}): {v:#}", g.name);
            if boot == 0 {
                forms_by_cpu.push(v["runs"].clone());
            }
            slides.push(v["reference"]["detail"].as_str().unwrap_or_default().to_owned());
            if n == 0 && boot == 1 {
                // The kernel's own patching while it is verified: tracers on
                // and off, modules in and out, jump labels flipping.
                let out = g.run("storm start full pressure hooks").unwrap();
                assert!(out.contains("storm: started"), "{out}");
                // Runs the kernel's records judge, before and during it: the
                // tracers make many more.
                let by_records = |runs: &Value| -> u64 {
                    runs.as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(k, _)| k.ends_with("patched at run time"))
                        .map(|(_, n)| n.as_u64().unwrap_or(0))
                        .sum()
                };
                let before = by_records(&v["runs"]);
                let mut most = 0;
                for round in 0..4 {
                    std::thread::sleep(Duration::from_secs(5));
                    let runs = assert_verified(&g, &format!("during the storm, round {round}"));
                    most = most.max(by_records(&runs));
                }
                assert!(
                    most > before + 1000,
                    "the storm's tracers left few sites for the records to judge: {before} before, at most {most} during"
                );
                let out = g.run("storm stop").unwrap();
                assert!(out.contains("counted"), "{out}");
                assert_verified(&g, "after the storm");
                // An int3 parked on a function's ftrace entry (a die
                // notifier's hook): no rewrite of the kernel's lasts.
                let entry = g.symbol("__x64_sys_acct").unwrap()
                    + if kernel == Kernel::V6_12 { 4 } else { 0 };
                g.run(&format!("attack poke {entry:#x} cc")).unwrap();
                let (code, v) = verify(&g);
                let m = v["reference"]["mismatches"].as_array().cloned().unwrap_or_default();
                assert_eq!(code, 1, "{v:#}");
                assert!(
                    !naming(&m, "__x64_sys_acct").is_empty(),
                    "int3 at an ftrace entry: {m:#?}"
                );
            }
            g.destroy();
        }
        eprintln!("{} {cpu:?}: {slides:#?}", kernel.line());
    }
    // The two CPU models took different boot-time forms.
    assert_ne!(
        forms_by_cpu[0],
        forms_by_cpu[1],
        "{}: the CPU models made no difference",
        kernel.line()
    );
    eprintln!("{}: forms by CPU model: {forms_by_cpu:#?}", kernel.line());
}

#[test]
fn lab_reference_6_1_untouched_guests_verify_across_boots_cpus_and_storms() {
    untouched_guests_verify(Kernel::V6_1);
}

#[test]
fn lab_reference_6_12_untouched_guests_verify_across_boots_cpus_and_storms() {
    untouched_guests_verify(Kernel::V6_12);
}

/// The `reference` findings (or alerts) that name `what`.
fn naming<'a>(findings: &'a [Value], what: &str) -> Vec<&'a Value> {
    findings
        .iter()
        .filter(|f| f["kind"] == "reference")
        .filter(|f| {
            ["symbol", "detail"].iter().any(|k| f[*k].as_str().is_some_and(|s| s.contains(what)))
        })
        .collect()
}

fn attacked_before_vigil_looked(kernel: Kernel) {
    let line = kernel.line().replace('.', "-");
    let mut g = start(&format!("refbad-{line}"), kernel, None, "vigil.attack=inline,syscall");
    let console = g.console_tail();
    assert!(
        console.contains("inline hook") || g.run("dmesg").unwrap().contains("inline hook"),
        "the early attack did not run: {console}"
    );
    let state = tempfile::tempdir().unwrap();
    let json =
        |out: &str| -> Value { serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}")) };
    // vigil baseline: written, with the mismatches, exit status 1.
    let (code, out, err) = vigil_ref(state.path(), &["--format", "json", "baseline", &g.name]);
    let b = json(&out);
    assert_eq!((code, b["reference"]["state"].as_str()), (1, Some("mismatch")), "{b:#} {err}");
    let m = b["reference"]["mismatches"].as_array().cloned().unwrap_or_default();
    assert!(!naming(&m, "__x64_sys_getppid").is_empty(), "baseline: no inline hook named: {m:#?}");
    assert!(!naming(&m, "sys_call_table[110]").is_empty(), "baseline: no table entry: {m:#?}");
    assert!(m.iter().all(|f| f["severity"] == "violation"), "{m:#?}");
    // vigil check: the same, as violations, at every check.
    let (code, out, _) = vigil_ref(state.path(), &["--format", "json", "check", &g.name]);
    let c = json(&out);
    let v = c["violations"].as_array().cloned().unwrap_or_default();
    assert_eq!((code, c["reference"].as_str()), (1, Some("mismatch")), "{c:#}");
    assert!(!naming(&v, "__x64_sys_getppid").is_empty(), "check: {v:#?}");
    assert!(!naming(&v, "sys_call_table[110]").is_empty(), "check: {v:#?}");
    // vigil diff: the image's bytes and the guest's, disassembled.
    let (code, out, _) = vigil_ref(state.path(), &["--format", "json", "diff", &g.name]);
    let d = json(&out);
    let changes = d["changes"].as_array().cloned().unwrap_or_default();
    let hook = naming(&changes, "__x64_sys_getppid");
    assert_eq!(code, 1, "{d:#}");
    assert!(
        hook.iter().any(|c| c["bytes"]["disasm_after"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i.to_string().contains("jmp")))),
        "diff: no disassembled jmp at the hooked function: {hook:#?}"
    );
    // vigil verify.
    let (code, v) = verify(&g);
    let m = v["reference"]["mismatches"].as_array().cloned().unwrap_or_default();
    assert_eq!(code, 1, "{v:#}");
    assert!(!naming(&m, "__x64_sys_getppid").is_empty(), "verify: {m:#?}");
    assert!(!naming(&m, "sys_call_table[110]").is_empty(), "verify: {m:#?}");
    // Offline, from a memory-only ELF core of the guest: the same.
    let core = state.path().join("guest.core");
    dump_core(&g.name, &core);
    let (code, out, err) =
        vigil_ref(state.path(), &["--format", "json", "verify", "--dump", core.to_str().unwrap()]);
    let v = json(&out);
    let m = v["reference"]["mismatches"].as_array().cloned().unwrap_or_default();
    assert_eq!(code, 1, "{v:#} {err}");
    assert!(!naming(&m, "__x64_sys_getppid").is_empty(), "verify --dump: {m:#?}");
    assert!(!naming(&m, "sys_call_table[110]").is_empty(), "verify --dump: {m:#?}");
    std::fs::remove_file(&core).unwrap();
    // The daemon's first attach: critical violations, and the attach says so.
    let config = Daemon::config_text(&g.name).replace(
        &format!("profiles = [\"{}/../guest-profiles\"]", env!("CARGO_MANIFEST_DIR")),
        &format!("profiles = [\"{}\"]", profiles_with_references().display()),
    );
    assert!(config.contains("lab-references"), "{config}");
    let d = Daemon::start_config(config);
    d.wait_for("reference violations", Duration::from_secs(120), |d| {
        let v = d.events("violation", &g.name);
        !naming(&v, "__x64_sys_getppid").is_empty() && !naming(&v, "sys_call_table[110]").is_empty()
    });
    let attached: Vec<Value> =
        ["new-boot", "attached"].iter().flat_map(|k| d.events(k, &g.name)).collect();
    assert!(
        attached
            .iter()
            .any(|e| e["detail"].as_str().is_some_and(|s| s.contains("Reference: MISMATCH"))),
        "{attached:#?}"
    );
    let metric = d.metric("vigil_reference_verified", &format!("domain=\"{}\"", g.name));
    assert_eq!(metric, Some(0.0));
    for e in naming(&d.events("violation", &g.name), "") {
        assert_eq!(e["severity"], "critical", "{e:#}");
    }
    g.destroy();
}

#[test]
fn lab_reference_6_1_an_attack_before_vigil_looked_is_a_reference_violation() {
    attacked_before_vigil_looked(Kernel::V6_1);
}

#[test]
fn lab_reference_6_12_an_attack_before_vigil_looked_is_a_reference_violation() {
    attacked_before_vigil_looked(Kernel::V6_12);
}
