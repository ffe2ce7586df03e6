//! Rules the library's sources keep, read from the files themselves.
//!
//! `unsafe` lives in two modules of vigil's library only: the system calls
//! (`sys/`, libvirt's C API among them) and the SIMD page tags
//! (`integrity/nh.rs`). The crate denies
//! `unsafe_code`; this test fails if another module allows it again or
//! holds an `unsafe` block, so that every parser of guest- or
//! file-controlled data stays safe Rust.
//!
//! The library's modules follow the data flow `lib.rs` tells: each imports
//! only the modules before it (or itself), so that the integrity engine and
//! memory sources know nothing of QEMU, Linux or the daemon, and nothing
//! but the daemon uses the daemon. A second test reads every source file's
//! `crate::` paths and fails on an import against the flow, naming it.

use std::path::{Path, PathBuf};

const ALLOWED: [&str; 3] = ["sys/mod.rs", "sys/virt.rs", "integrity/nh.rs"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn only_the_system_and_simd_modules_hold_unsafe() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "found only {} source files under {}", files.len(), src.display());
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    assert!(lib.contains("#![deny(unsafe_code)]"), "lib.rs no longer denies unsafe_code");
    let mut offenders = Vec::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(f).unwrap();
        let holds = text.lines().any(|l| {
            let code = l.split("//").next().unwrap_or("");
            code.contains("unsafe ")
                || code.contains("unsafe{")
                || code.contains("allow(unsafe_code)")
        });
        let exempt = ALLOWED.contains(&rel.as_str())
            // The two `allow`s that exempt those modules.
            || (rel == "lib.rs" || rel == "integrity/mod.rs")
                && text.lines().filter(|l| l.contains("allow(unsafe_code)")).count() == 1;
        if holds && !exempt {
            offenders.push(rel);
        }
    }
    assert!(offenders.is_empty(), "unsafe code outside {ALLOWED:?}: {offenders:?}");
}

/// The flow, first to last. A module may use those before it.
const FLOW: [&str; 12] = [
    "addr",
    "sys",
    "paths",
    "memory",
    "x86",
    "qemu",
    "integrity",
    "linux",
    "kvm",
    "libvirt",
    "watch",
    "daemon",
];

/// The top-level module a file under `src/` belongs to (`None` for the
/// crate root and the binary).
fn module_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_string_lossy().into_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

/// Every module named by a `crate::` path in `text`, outside comments.
fn imports(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            let name: String =
                after.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.push(name);
            }
            rest = after;
        }
    }
    out
}

#[test]
fn every_module_imports_only_what_comes_before_it_in_the_flow() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "found only {} source files under {}", files.len(), src.display());
    let rank = |m: &str| FLOW.iter().position(|f| *f == m);
    let mut against = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let Some(module) = module_of(rel) else { continue };
        let Some(mine) = rank(&module) else {
            panic!("{}: module {module} is not in the flow of this test (FLOW)", rel.display())
        };
        seen.insert(module.clone());
        for used in imports(&std::fs::read_to_string(f).unwrap()) {
            // Items of the crate root (a helper such as panic_message).
            let Some(theirs) = rank(&used) else { continue };
            if theirs > mine {
                against.push(format!("{} uses crate::{used}", rel.display()));
            }
        }
    }
    assert_eq!(seen.len(), FLOW.len(), "modules found: {seen:?}");
    assert!(against.is_empty(), "imports against the data flow:\n{}", against.join("\n"));
}

#[test]
fn the_import_reader_finds_paths_and_skips_comments() {
    let text =
        "use crate::linux::x;\nlet a = crate::daemon::run(); // crate::watch\n// crate::qemu";
    assert_eq!(imports(text), ["linux", "daemon"]);
    assert_eq!(module_of(Path::new("linux/patch/mod.rs")).as_deref(), Some("linux"));
    assert_eq!(module_of(Path::new("paths.rs")).as_deref(), Some("paths"));
    assert_eq!(module_of(Path::new("main.rs")), None);
}
