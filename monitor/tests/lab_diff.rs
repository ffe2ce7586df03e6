//! Lab tests of `vigil diff`: what an incident responder reads after an
//! alert, live and from a dump taken with `virsh dump --memory-only`.
//!
//! Needs the lab prepared and libvirtd running (`lab/test.sh` does both).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use vigil::memory::GuestMemory;

mod common;
use common::boot;

use common::vigil_in as vigil;

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The changes of a diff, as comparable text (what they are, not when read).
fn findings(d: &Value) -> BTreeSet<String> {
    d["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {} {} {} {} {}",
                c["region"], c["gva"], c["verdict"], c["rule"], c["bytes"]["after"], c["entry"]
            )
        })
        .collect()
}

/// Writes the RAM of an ELF core as a raw guest-physical image (sparse).
fn raw_from_core(core: &Path, raw: &Path) {
    use std::os::unix::fs::FileExt;
    let c = vigil::memory::ElfCore::open(core).unwrap();
    let f = std::fs::File::create(raw).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for r in c.layout().ranges() {
        let mut at = 0;
        while at < r.len {
            let n = usize::try_from((r.len - at).min(buf.len() as u64)).unwrap();
            c.read(vigil::addr::GuestPhysAddr(r.start.raw() + at), &mut buf[..n]).unwrap();
            f.write_all_at(&buf[..n], r.start.raw() + at).unwrap();
            at += n as u64;
        }
    }
}

/// The DOM headless chromium builds from a page.
fn chromium_dom(page: &Path) -> String {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--dump-dom"])
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "chromium: {e}: install it (apt-get install chromium, or lab/setup.sh --install)"
            )
        });
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn lab_diff_shows_the_hooks_live_and_the_same_from_a_dump() {
    let mut g = boot("diff");
    let state = tempfile::tempdir().unwrap();
    assert!(vigil(state.path(), &["baseline", &g.name]).status.success());
    g.run("attack inline").unwrap();
    g.run("attack syscall").unwrap();

    let live = vigil(state.path(), &["diff", &g.name, "--format", "json"]);
    assert_eq!(live.status.code(), Some(1));
    let d = json(&live);
    assert_eq!((d["format"].as_str(), d["version"].as_u64()), (Some("vigil-diff"), Some(1)));
    let changes = d["changes"].as_array().unwrap();

    // The inline hook: the function by name, both instructions, the jmp's target.
    let hook = changes
        .iter()
        .find(|c| c["region"] == "kernel-text" && c["verdict"] == "violation")
        .unwrap_or_else(|| panic!("{d:#}"));
    assert!(hook["symbol"].as_str().unwrap().starts_with("__x64_sys_getppid"), "{hook:#}");
    let before = &hook["bytes"]["disasm_before"][0];
    let after = &hook["bytes"]["disasm_after"][0];
    assert_eq!(before["addr"], hook["gva"]);
    assert!(before["text"].as_str().unwrap().starts_with("nop"), "{hook:#}");
    assert!(after["text"].as_str().unwrap().starts_with("jmp"), "{hook:#}");
    assert!(after["target"].as_str().unwrap().starts_with("module vigil_hook_inline+"), "{hook:#}");

    // The syscall hook: the entry, the old and the new target with their owners.
    let entry = changes
        .iter()
        .find_map(|c| (c["region"] == "sys_call_table").then(|| c["entry"].clone()))
        .unwrap_or_else(|| panic!("{d:#}"));
    assert_eq!(
        (entry["table"].as_str(), entry["index"].as_u64()),
        (Some("sys_call_table"), Some(110))
    );
    assert_eq!(entry["expected_symbol"], "__x64_sys_getppid");
    assert!(
        entry["found_owner"].as_str().unwrap().starts_with("module vigil_hook_syscall+"),
        "{entry:#}"
    );

    // Text for a terminal says the same.
    let text = vigil(state.path(), &["diff", &g.name]);
    let t = String::from_utf8_lossy(&text.stdout);
    assert!(t.contains("sys_call_table[110]") && t.contains("__x64_sys_getppid"), "{t}");
    assert!(t.contains("-> module vigil_hook_inline+"), "{t}");
    assert!(!t.contains("\x1b["), "no colour when not a terminal");

    // One HTML page, opened in a real browser: the verdict, the map leading
    // to the changes, and the changes themselves.
    let html = vigil(state.path(), &["--format", "html", "diff", &g.name]);
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("diff.html");
    std::fs::write(&page, &html.stdout).unwrap();
    let dom = chromium_dom(&page);
    assert!(dom.contains("VIOLATIONS: 3"), "{dom}");
    assert!(dom.contains("sys_call_table[110]") && dom.contains("__x64_sys_getppid"), "{dom}");
    assert!(dom.contains("module vigil_hook_inline+"), "{dom}");
    assert!(dom.contains("<a class=\"violation\" href=\"#c"), "the page map links no violation");

    // Offline, from the dump libvirt writes: the same findings.
    let core = dir.path().join("guest.core");
    common::dump_core(&g.name, &core);
    let baseline = std::fs::read_dir(state.path().join("baselines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let b = baseline.to_str().unwrap();
    let offline = vigil(
        state.path(),
        &["diff", "--baseline", b, "--dump", core.to_str().unwrap(), "--format", "json"],
    );
    assert_eq!(offline.status.code(), Some(1), "{}", String::from_utf8_lossy(&offline.stderr));
    let o = json(&offline);
    assert!(o["source"].as_str().unwrap().starts_with("ELF core"));
    assert_eq!(findings(&o), findings(&d));

    // A raw image of the same memory: the same findings again.
    let raw = dir.path().join("guest.raw");
    raw_from_core(&core, &raw);
    let r = json(&vigil(
        state.path(),
        &["diff", "--baseline", b, "--dump", raw.to_str().unwrap(), "--format", "json"],
    ));
    assert_eq!(findings(&r), findings(&d));

    // Malformed dumps are refused, saying why.
    let cut = dir.path().join("cut.core");
    std::fs::write(&cut, &std::fs::read(&core).unwrap()[..1 << 20]).unwrap();
    let junk = dir.path().join("junk.raw");
    std::fs::write(&junk, vec![0x5au8; 4 << 20]).unwrap();
    for (file, why) in [(&cut, "truncated"), (&junk, "kernel not found")] {
        let out = vigil(state.path(), &["diff", "--baseline", b, "--dump", file.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(why), "{}: {err}", file.display());
    }
    let out = vigil(state.path(), &["diff", "--dump", core.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dump needs --baseline"));
}

#[test]
fn lab_diff_through_the_daemon_shows_module_text_it_protects() {
    let d = common::Daemon::start("vigil-lab-diff-dmn");
    let mut g = boot("diff-dmn");
    d.wait_watching(&g);
    g.run("insmod /lib/vigil/vigil_benign.ko").unwrap();
    d.wait_for("vigil_benign to be seen", std::time::Duration::from_secs(20), |d| {
        !d.events("module-loaded", &g.name).is_empty()
    });
    g.run("attack module-inline").unwrap();
    d.wait_for("the module text alert", std::time::Duration::from_secs(20), |d| {
        !common::violations(d, &g, "module:vigil_benign").is_empty()
    });
    let out = d.vigil(&["diff", &g.name, "--daemon", "--format", "json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v = json(&out);
    let c = v["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["region"] == "module:vigil_benign")
        .unwrap_or_else(|| panic!("{v:#}"));
    assert!(c["rule"].as_str().unwrap().contains("changed after it was loaded"), "{c:#}");
    let after = &c["bytes"]["disasm_after"][0];
    assert!(after["text"].as_str().is_some_and(|t| t.starts_with("jmp")), "{c:#}");
    assert!(
        after["target"].as_str().is_some_and(|t| t.starts_with("module vigil_hook_modtext+")),
        "{c:#}"
    );
    // The page map comes through the socket too: the HTML page draws it.
    let html = d.vigil(&["--format", "html", "diff", &g.name, "--daemon"]);
    let page = String::from_utf8_lossy(&html.stdout);
    assert!(page.contains("id=\"map-kernel-text\""), "no page map in {page}");
    // Text through the daemon as well; an unknown domain is refused by name.
    let text = d.vigil(&["diff", &g.name, "--daemon"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("module:vigil_benign"));
    let out = d.vigil(&["diff", "no-such-domain", "--daemon"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-domain"));
}

/// The CLI and the daemon run one examination: for the same guest and
/// baseline, `vigil diff` and `vigil diff --daemon` give the same changes,
/// word for word (names of code and of data, verdicts, rules, bytes).
#[test]
fn lab_diff_the_cli_and_the_daemon_give_the_same_changes() {
    let d = common::Daemon::start("vigil-lab-diff-same");
    let mut g = boot("diff-same");
    d.wait_watching(&g);
    g.run("attack inline").unwrap();
    g.run("attack syscall").unwrap();
    d.wait_for("the hooks' alerts", std::time::Duration::from_secs(30), |d| {
        !common::violations(d, &g, "kernel-text").is_empty()
            && !common::violations(d, &g, "sys_call_table").is_empty()
    });
    let daemon = d.vigil(&["diff", &g.name, "--daemon", "--format", "json"]);
    assert_eq!(daemon.status.code(), Some(1), "{}", String::from_utf8_lossy(&daemon.stderr));
    // The CLI reads the daemon's own baseline and original pages.
    let cli = vigil(d.dir.path(), &["diff", &g.name, "--format", "json"]);
    assert_eq!(cli.status.code(), Some(1), "{}", String::from_utf8_lossy(&cli.stderr));
    // The violations, in any order: what each is, where, by which rule, its
    // name and bytes. (Accepted patches may differ: only the daemon has seen
    // the records of the last seconds and holds modules' text.)
    let violations = |d: &Value| -> BTreeSet<String> {
        d["changes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["verdict"] == "violation")
            .filter(|c| !c["region"].as_str().unwrap_or("").starts_with("module:"))
            .map(|c| {
                format!(
                    "{} {} {} {} {} {} {}",
                    c["region"],
                    c["gva"],
                    c["rule"],
                    c["symbol"],
                    c["bytes"]["before"],
                    c["bytes"]["after"],
                    c["entry"]
                )
            })
            .collect()
    };
    let (a, b) = (violations(&json(&daemon)), violations(&json(&cli)));
    assert!(a.len() >= 2, "{a:#?}");
    assert_eq!(a, b, "daemon:\n{a:#?}\nCLI:\n{b:#?}");
    // Data named as data by both (the daemon named it nowhere before).
    assert!(
        a.iter().any(|v| v.contains("sys_call_table") && v.contains("(kernel data)")),
        "{a:#?}"
    );
}

/// The files of one evidence bundle, by name, with their manifest entries.
fn manifest(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("manifest.json"))
        .unwrap_or_else(|e| panic!("{}: no manifest: {e}", dir.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn lab_daemon_saves_evidence_of_a_violation_and_keeps_within_its_limits() {
    use std::os::unix::fs::PermissionsExt;
    let d = common::Daemon::start_with(
        "vigil-lab-diff-evid",
        "[evidence]\nenabled = true\nkeep = 1\nmin_interval = \"1s\"\nmax_total = \"2GiB\"\n",
        vec![],
    );
    let mut g = boot("diff-evid");
    d.wait_watching(&g);
    g.run("attack inline").unwrap();
    let timeout = std::time::Duration::from_secs(60);
    d.wait_for("evidence of the inline hook", timeout, |d| {
        !d.events("evidence-saved", &g.name).is_empty()
    });
    // The alert names the bundle; the event says it is complete.
    let alert = common::violations(&d, &g, "kernel-text").remove(0);
    let first = std::path::PathBuf::from(alert["evidence"].as_str().unwrap());
    assert!(first.starts_with(d.path("evidence")), "{alert:#}");
    let saved = d.events("evidence-saved", &g.name).remove(0);
    assert_eq!(saved["evidence"], alert["evidence"]);
    assert_eq!(saved["severity"], "info", "{saved:#}");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&first), 0o700);

    // Every file is there, private, with the hash the manifest gives.
    let m = manifest(&first);
    assert_eq!(
        (m["format"].as_str(), m["domain"].as_str()),
        (Some("vigil-evidence"), Some(g.name.as_str()))
    );
    assert!(m["skipped"].as_array().unwrap().is_empty(), "{m:#}");
    let names: Vec<&str> =
        m["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["diff.json", "diff.html", "memory.core"]);
    for f in m["files"].as_array().unwrap() {
        let p = first.join(f["name"].as_str().unwrap());
        assert_eq!(mode(&p), 0o600, "{}", p.display());
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(f["bytes"].as_u64(), Some(bytes.len() as u64));
        assert_eq!(f["blake3"].as_str(), Some(blake3::hash(&bytes).to_hex().as_str()));
    }

    // The saved diff names the hook; the saved memory gives the same
    // findings offline, against the daemon's own baseline.
    let saved_diff: Value =
        serde_json::from_slice(&std::fs::read(first.join("diff.json")).unwrap()).unwrap();
    let hook = saved_diff["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["region"] == "kernel-text" && c["verdict"] == "violation")
        .unwrap_or_else(|| panic!("{saved_diff:#}"));
    assert!(hook["symbol"].as_str().unwrap().starts_with("__x64_sys_getppid"), "{hook:#}");
    let baseline = std::fs::read_dir(d.path("baselines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let core = first.join("memory.core");
    let offline = vigil(
        d.dir.path(),
        &[
            "diff",
            "--baseline",
            baseline.to_str().unwrap(),
            "--dump",
            core.to_str().unwrap(),
            "--format",
            "json",
        ],
    );
    let o = json(&offline);
    let text_violations = |d: &Value| -> BTreeSet<String> {
        findings(&serde_json::json!({ "changes": d["changes"].as_array().unwrap().iter()
            .filter(|c| c["region"] == "kernel-text" && c["verdict"] == "violation")
            .cloned().collect::<Vec<_>>() }))
    };
    assert!(!text_violations(&o).is_empty());
    assert_eq!(text_violations(&o), text_violations(&saved_diff));

    // A second violation makes a second bundle; keep = 1 removes the first.
    g.run("attack syscall").unwrap();
    d.wait_for("evidence of the syscall hook", timeout, |d| {
        d.events("evidence-saved", &g.name).len() >= 2
    });
    let second = d.events("evidence-saved", &g.name).remove(1);
    let second = std::path::PathBuf::from(second["evidence"].as_str().unwrap());
    assert_ne!(second, first);
    assert!(!first.exists(), "keep = 1 leaves only the newest bundle");
    let m = manifest(&second);
    assert_eq!(m["removed"][0].as_str(), Some(first.to_str().unwrap()), "{m:#}");
    assert!(
        m["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k.as_str().unwrap().starts_with("sys_call_table/")),
        "{m:#}"
    );
    let saved_total = d.metric("vigil_evidence_saved_total", &format!("domain=\"{}\"", g.name));
    assert_eq!(saved_total, Some(2.0));
    // The gauge is the directory's size: the one bundle's files.
    let bytes: u64 =
        m["files"].as_array().unwrap().iter().map(|f| f["bytes"].as_u64().unwrap()).sum();
    let gauge = d.metrics().lines().find_map(|l| {
        l.strip_prefix("vigil_evidence_bytes ").map(|v| v.trim().parse::<u64>().unwrap())
    });
    assert_eq!(gauge, Some(bytes));
}
