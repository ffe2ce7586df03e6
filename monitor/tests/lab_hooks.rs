//! Lab tests of the hook inventory (issue 26): hooks a module places
//! through the kernel's own APIs, a forged ftrace ops, and an int3 with a
//! die notifier, on both kernel lines, each a critical `hook` (or text)
//! alert within one full interval naming the hooked function, the owning
//! module and the mechanism; the same modules allowed give information.
//!
//! Each attack makes getppid return 4242 in the guest, which the test
//! checks first: an attack that did not take is no test of vigil.
//!
//! Needs the lab prepared and libvirtd running (`lab/test.sh` does both).

use std::time::{Duration, Instant};

use serde_json::Value;
use vigil_lab::{Guest, Kernel};

mod common;
use common::{Daemon, boot_kernel};

/// The daemon's full interval in these tests: an alert must come within it
/// (and the few seconds of slack the check itself and the int3 hold take).
const FULL: Duration = Duration::from_secs(5);

fn daemon(name: &str) -> Daemon {
    let config = Daemon::config_text(name)
        .lines()
        .map(|l| {
            if l.starts_with("full_interval") {
                format!("full_interval = \"{}s\"", FULL.as_secs())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    Daemon::start_config(format!("{config}\n"))
}

fn suffix(what: &str, kernel: Kernel) -> String {
    format!("{what}-{}", kernel.line().replace('.', "-"))
}

/// Runs attack `what` in `g` and checks that getppid now returns 4242.
/// Returns when the attack's module was loaded (its hook in place).
fn attack(g: &mut Guest, what: &str) -> Instant {
    let out = g.run(&format!("attack {what}")).unwrap_or_else(|e| panic!("attack {what}: {e}"));
    let done = Instant::now();
    let ppid = g.run("sh -c 'echo $PPID'").unwrap();
    assert_eq!(ppid.trim(), "4242", "attack {what} did not take: {out}");
    done
}

/// The daemon's alerts of `g` so far, one line each, for a failure's message
/// and the test's log.
fn timeline(d: &Daemon, g: &Guest) -> String {
    d.alerts()
        .iter()
        .filter(|a| a["domain"] == g.name.as_str())
        .map(|a| {
            let detail = a["detail"].as_str().unwrap_or_default();
            format!(
                "{} {} {} {}",
                a["time"].as_str().unwrap_or_default(),
                a["event"].as_str().unwrap_or_default(),
                a["region"].as_str().unwrap_or_default(),
                &detail[..detail.len().min(160)]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Critical alerts of `g` whose text says every one of `words`.
fn critical(d: &Daemon, g: &Guest, words: &[&str]) -> Vec<Value> {
    d.events("violation", &g.name)
        .into_iter()
        .filter(|a| a["severity"] == "critical")
        .filter(|a| {
            let text = format!("{} {} {} {}", a["region"], a["kind"], a["symbol"], a["detail"]);
            words.iter().all(|w| text.contains(w))
        })
        .collect()
}

/// Waits for a critical alert saying all of `words`, at most one full
/// interval and `slack` after `since`; returns how long it took.
fn alerted_within(
    d: &Daemon,
    g: &Guest,
    words: &[&str],
    since: Instant,
    slack: Duration,
) -> Duration {
    let limit = FULL + slack;
    d.wait_for(
        &format!("a critical alert saying {words:?}"),
        limit + Duration::from_secs(20),
        |d| !critical(d, g, words).is_empty(),
    );
    let took = since.elapsed();
    eprintln!("{}: {words:?} alerted {:.1} s after the attack", g.name, took.as_secs_f64());
    assert!(
        took <= limit + Duration::from_secs(1),
        "{words:?} took {took:?}, more than one full interval ({FULL:?}) and {slack:?}:\n{}",
        timeline(d, g)
    );
    took
}

/// `vigil hooks` (JSON) with the repo's profiles and the allowed modules.
fn hooks_json(g: &Guest, allow: &[&str]) -> (i32, Value) {
    let mut args = vec![
        "--profiles".to_owned(),
        concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles").to_owned(),
        "--format".into(),
        "json".into(),
        "hooks".into(),
        g.name.clone(),
    ];
    for a in allow {
        args.push(format!("--allow-hook={a}"));
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vigil")).args(&args).output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("vigil hooks: {e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), v)
}

/// The findings of `vigil hooks` of one severity.
fn findings(v: &Value, severity: &str) -> Vec<String> {
    v["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["severity"] == severity)
        .map(|f| f["detail"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// An ftrace ops with IPMODIFY and a redirecting kprobe, each placed through
/// the kernel's API by a module: each a critical hook alert within one full
/// interval naming getppid, the module and the mechanism; allowed, each is
/// information. Then a forged ftrace ops, linked by a plain write, with a
/// call to module code written at getppid's entry.
fn api_hooks_and_forged_ops(kernel: Kernel) {
    let s = suffix("hookapi", kernel);
    let d = daemon(&format!("vigil-lab-{s}"));
    let mut g = boot_kernel(&s, kernel);
    d.wait_watching(&g);

    for (what, module, mechanism, flag) in [
        ("ftrace-hook", "vigil_hook_ftrace", "ftrace ops", "IPMODIFY"),
        ("kprobe-hook", "vigil_hook_kprobe", "kprobe", "can redirect"),
    ] {
        let t = attack(&mut g, what);
        alerted_within(
            &d,
            &g,
            &["hooks", "hook", "getppid", module, mechanism, flag],
            t,
            Duration::ZERO,
        );
        // The same module allowed: information, and `vigil hooks` exits 0.
        let (code, v) = hooks_json(&g, &[module]);
        assert_eq!(code, 0, "{what} allowed: {v:#}");
        let info = findings(&v, "info");
        assert!(
            info.iter().any(|f| f.contains(module) && f.contains("allowed by configuration")),
            "{what} allowed gives no info finding: {v:#}"
        );
        assert!(findings(&v, "violation").is_empty(), "{what} allowed: {v:#}");
        // Allowed on another function only: still a violation.
        let (code, v) = hooks_json(&g, &[&format!("{module}:__x64_sys_kill")]);
        assert_eq!(code, 1, "{what} allowed on kill only: {v:#}");
        // The owner named in the inventory.
        let owned = v["hooks"].as_array().unwrap().iter().any(|h| {
            h["callbacks"].as_array().unwrap().iter().any(|c| c["owner"]["name"] == module)
        });
        assert!(owned, "{what}: no hook owned by {module} in {v:#}");
        g.run(&format!("rmmod {module}")).unwrap();
        assert_ne!(g.run("sh -c 'echo $PPID'").unwrap().trim(), "4242");
    }

    // The ftrace ops again with neither SAVE_REGS nor IPMODIFY: on x86-64
    // its callback still moves the instruction pointer (getppid gives 4242,
    // `attack` checks), so it is a violation all the same.
    attack(&mut g, "ftrace-plain");
    let (code, v) = hooks_json(&g, &[]);
    assert_eq!(code, 1, "a flagless ftrace hook: {v:#}");
    let said = findings(&v, "violation").into_iter().find(|f| f.contains("vigil_hook_ftrace"));
    let said = said.unwrap_or_else(|| panic!("no violation names vigil_hook_ftrace: {v:#}"));
    assert!(!said.contains("IPMODIFY") && said.contains("can redirect"), "{said}");
    g.run("rmmod vigil_hook_ftrace").unwrap();

    let t = attack(&mut g, "forged-ops");
    // The record: forged (its trampoline is the module's code) ...
    alerted_within(&d, &g, &["hooks", "vigil_hook_forged", "forged record"], t, Duration::ZERO);
    // ... and the call it was to excuse, at getppid's entry, into the module.
    alerted_within(
        &d,
        &g,
        &["kernel-text", "getppid", "ftrace function entry", "vigil_hook_forged"],
        t,
        Duration::ZERO,
    );
    // No allow-list makes a forged record information.
    let (code, v) = hooks_json(&g, &["vigil_hook_forged"]);
    assert_eq!(code, 1, "a forged ops allowed: {v:#}");
    eprintln!("{}", timeline(&d, &g));
}

/// An int3 over getppid's ftrace entry and a die notifier that redirects
/// it: the notifier a critical hook alert, and the int3 a text violation
/// once it stood longer than any rewrite of the kernel's, both within one
/// full interval (and the int3's hold).
fn int3_and_die_notifier(kernel: Kernel) {
    let s = suffix("hookint3", kernel);
    let d = daemon(&format!("vigil-lab-{s}"));
    let mut g = boot_kernel(&s, kernel);
    d.wait_watching(&g);
    // A one-shot `vigil check` too, against a baseline of its own.
    let state = tempfile::tempdir().unwrap();
    let out = common::vigil_in(state.path(), &["baseline", &g.name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = attack(&mut g, "int3-hook");
    alerted_within(
        &d,
        &g,
        &["hooks", "die notifier", "vigil_hook_int3", "int3"],
        t,
        Duration::ZERO,
    );
    alerted_within(
        &d,
        &g,
        &["kernel-text", "getppid", "an int3 has stood"],
        t,
        vigil::linux::patch::INT3_HOLD + Duration::from_secs(1),
    );
    // Allowing the module makes its notifier information, not the int3.
    let (code, v) = hooks_json(&g, &["vigil_hook_int3"]);
    assert_eq!(code, 0, "{v:#}");
    let out = common::vigil_in(state.path(), &["--format", "json", "check", &g.name]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{v:#}");
    let said = v["violations"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["detail"].as_str().unwrap_or_default().contains("an int3 has stood"));
    assert!(said, "the one-shot check does not report the int3: {v:#}");
}

/// The kernel's own tracing (the storm: function tracer, tracepoints,
/// kprobe events, module loads), BPF programs on vfs_read, on a kprobe and
/// in a BPF trampoline (fentry), as observability tools attach them, and a
/// module's probe on the sys_enter tracepoint: no violation of any kind in
/// half a minute, and `vigil hooks` lists the kprobe as the kernel's
/// (perf's kprobe dispatcher), the trampoline with its program, the images
/// among the BPF images, and the module's probe (information).
fn kernel_tracing_and_bpf(kernel: Kernel) {
    let s = suffix("hookok", kernel);
    let d = daemon(&format!("vigil-lab-{s}"));
    let mut g = boot_kernel(&s, kernel);
    d.wait_watching(&g);
    let out = g.run("storm start").unwrap();
    assert!(out.contains("storm: started"), "{out}");
    // A kprobe and a BPF trampoline (fentry, an ftrace direct call) on the
    // same function, as tracing tools place them.
    g.run("bpfprobe vfs_read > /tmp/bpf.out 2>&1 &").unwrap();
    g.run("bpfprobe --fentry vfs_read > /tmp/fentry.out 2>&1 &").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let out = g.run("cat /tmp/bpf.out /tmp/fentry.out").unwrap();
    assert_eq!(out.matches("bpfprobe: attached").count(), 2, "a BPF program did not attach: {out}");
    // And a module's probe on the sys_enter tracepoint: it observes.
    g.run("attack tracepoint").unwrap();
    let start = Instant::now();
    let mut listed = false;
    while start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_secs(3));
        let v = d.events("violation", &g.name);
        assert!(v.is_empty(), "violations under the kernel's own tracing: {v:#?}");
        let (code, h) = hooks_json(&g, &[]);
        assert_eq!(code, 0, "{h:#}");
        let bpf_image = h["bpf"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"].as_str().unwrap_or_default().contains("vigil_lab"));
        let probe = h["hooks"].as_array().unwrap().iter().any(|k| {
            k["mechanism"] == "kprobe"
                // (6.12 probes the ftrace entry after the ENDBR: +0x4.)
                && k["hooked"][0].as_str().is_some_and(|p| p.starts_with("vfs_read"))
                && k["callbacks"][0]["owner"]["symbol"] == "kprobe_dispatcher"
        });
        let fentry = h["hooks"].as_array().unwrap().iter().any(|k| {
            k["mechanism"] == "bpf_trampoline"
                && k["hooked"][0].as_str().is_some_and(|p| p.starts_with("vfs_read"))
                && k["callbacks"].as_array().unwrap().iter().any(|c| {
                    c["role"] == "fentry"
                        && c["owner"]["name"].as_str().is_some_and(|n| n.ends_with("_vigil_lab"))
                })
        });
        let tracepoint = h["hooks"].as_array().unwrap().iter().any(|k| {
            k["mechanism"] == "tracepoint"
                && k["hooked"][0] == "sys_enter"
                && k["callbacks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["role"] == "probe" && c["owner"]["name"] == "vigil_tracepoint")
        });
        let observes = findings(&h, "info")
            .iter()
            .any(|f| f.contains("sys_enter") && f.contains("observation only"));
        listed |= bpf_image && probe && fentry && tracepoint && observes;
    }
    assert!(
        listed,
        "vigil hooks never listed the BPF kprobe, the fentry trampoline, the image and the module's tracepoint probe"
    );
    let out = g.run("storm stop").unwrap();
    assert!(out.contains("stopped"), "{out}");
    assert!(d.events("violation", &g.name).is_empty(), "{}", timeline(&d, &g));
}

/// Hooks through the kernel's sanctioned mechanisms that replace what a
/// function does: a BPF program that returns in a function's place
/// (fmod_ret on security_task_kill: `kill` is refused), and a livepatch
/// module replacing getppid. Each is a critical hook alert within one full
/// interval naming the function, the owner and the mechanism; allowed, it
/// is information.
fn bpf_fmod_ret_and_livepatch(kernel: Kernel) {
    let s = suffix("hookbpf", kernel);
    let d = daemon(&format!("vigil-lab-{s}"));
    let mut g = boot_kernel(&s, kernel);
    d.wait_watching(&g);
    // A one-shot baseline too, for `vigil diff`.
    let state = tempfile::tempdir().unwrap();
    let out = common::vigil_in(state.path(), &["baseline", &g.name]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Timed from before the program loads (the loading takes up to a
    // second of the slack).
    let t = Instant::now();
    g.run("bpfprobe --fmod-ret security_task_kill > /tmp/fmod.out 2>&1 &").unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let out = g.run("cat /tmp/fmod.out; kill -0 $$ && echo alive || echo refused").unwrap();
    assert!(
        out.contains("bpfprobe: attached") && out.contains("refused"),
        "fmod_ret did not take: {out}"
    );
    let slack = Duration::from_secs(3);
    alerted_within(
        &d,
        &g,
        &["hooks", "BPF trampoline", "security_task_kill", "fmod_ret", "vigil_lab"],
        t,
        slack,
    );
    let (code, v) = hooks_json(&g, &["bpf:vigil_lab"]);
    assert_eq!(code, 0, "fmod_ret allowed: {v:#}");
    assert!(
        findings(&v, "info").iter().any(|f| f.contains("fmod_ret") && f.contains("allowed")),
        "fmod_ret allowed gives no info finding: {v:#}"
    );
    let (code, v) = hooks_json(&g, &["bpf:another"]);
    assert_eq!(code, 1, "fmod_ret with another program allowed: {v:#}");
    // (The program stays: it refuses the kill that would end it.)

    let t = attack(&mut g, "livepatch");
    alerted_within(
        &d,
        &g,
        &["hooks", "livepatch", "getppid", "vigil_livepatch"],
        t,
        Duration::ZERO,
    );
    // (With the BPF program, still attached, allowed too.)
    let (code, v) = hooks_json(&g, &["vigil_livepatch", "bpf:vigil_lab"]);
    assert_eq!(code, 0, "the livepatch allowed: {v:#}");
    assert!(
        findings(&v, "info").iter().any(|f| f.contains("vigil_livepatch") && f.contains("allowed")),
        "the livepatch allowed gives no info finding: {v:#}"
    );
    // The daemon's metrics count them by mechanism and owner.
    let hooks = |d: &Daemon, mechanism: &str, owner: &str| {
        let labels = format!("domain=\"{}\",mechanism=\"{mechanism}\",owner=\"{owner}\"", g.name);
        d.metric("vigil_hooks", &labels).unwrap_or(-1.0)
    };
    d.wait_for("vigil_hooks to count the livepatch and the BPF trampoline", FULL * 3, |d| {
        hooks(d, "livepatch", "module") == 1.0 && hooks(d, "bpf_trampoline", "bpf") == 1.0
    });
    assert_eq!(hooks(&d, "kprobe", "unknown"), 0.0, "every pair is exported, zeros too");
    // `vigil diff`, one-shot and the daemon's: both hooks added since the
    // baseline, nothing gone.
    let one_shot = common::vigil_in(state.path(), &["--format", "json", "diff", &g.name]);
    let by_daemon = d.vigil(&["diff", &g.name, "--daemon", "--format", "json"]);
    for (how, out) in [("one-shot", one_shot), ("daemon", by_daemon)] {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{how} diff: {e}: {}", String::from_utf8_lossy(&out.stderr))
        });
        let added: Vec<String> = v["hooks_added"]
            .as_array()
            .unwrap_or_else(|| panic!("{how} diff lists no hooks added: {v:#}"))
            .iter()
            .map(|h| h.to_string())
            .collect();
        for words in [
            ["BPF trampoline", "security_task_kill", "fmod_ret", "vigil_lab"],
            ["livepatch", "getppid", "new_func", "module vigil_livepatch"],
        ] {
            assert!(
                added.iter().any(|h| words.iter().all(|w| h.contains(w))),
                "{how} diff: no hook added saying {words:?}: {added:#?}"
            );
        }
        assert!(v.get("hooks_removed").is_none(), "{how} diff: hooks gone: {v:#}");
        assert!(v.get("hooks_note").is_none(), "{how} diff: {v:#}");
    }
    eprintln!("{}", timeline(&d, &g));
}

#[test]
fn lab_hooks_6_1_bpf_fmod_ret_and_a_livepatch_are_critical_alerts() {
    bpf_fmod_ret_and_livepatch(Kernel::V6_1);
}

#[test]
fn lab_hooks_6_12_bpf_fmod_ret_and_a_livepatch_are_critical_alerts() {
    bpf_fmod_ret_and_livepatch(Kernel::V6_12);
}

#[test]
fn lab_hooks_6_1_kernel_tracing_and_a_bpf_kprobe_are_no_violation() {
    kernel_tracing_and_bpf(Kernel::V6_1);
}

#[test]
fn lab_hooks_6_12_kernel_tracing_and_a_bpf_kprobe_are_no_violation() {
    kernel_tracing_and_bpf(Kernel::V6_12);
}

#[test]
fn lab_hooks_6_1_api_hooks_and_a_forged_ops_are_critical_alerts() {
    api_hooks_and_forged_ops(Kernel::V6_1);
}

#[test]
fn lab_hooks_6_12_api_hooks_and_a_forged_ops_are_critical_alerts() {
    api_hooks_and_forged_ops(Kernel::V6_12);
}

#[test]
fn lab_hooks_6_1_an_int3_and_a_die_notifier_are_critical_alerts() {
    int3_and_die_notifier(Kernel::V6_1);
}

#[test]
fn lab_hooks_6_12_an_int3_and_a_die_notifier_are_critical_alerts() {
    int3_and_die_notifier(Kernel::V6_12);
}
