//! The lab kernel image (from `lab/setup.sh`) through vigil's image and
//! kallsyms parsers, checked against what a running guest of the same build
//! printed in /proc/kallsyms (captured in `tests/data/`).

use std::collections::HashMap;

use vigil::linux::{image, kallsyms};
use vigil_lab::Kernel;

/// What the lab's two kernel lines are checked against: the pinned build,
/// its payload's compression, its symbol count, and what a running guest
/// printed in /proc/kallsyms and /proc/version (captured in `tests/data/`).
struct Line {
    kernel: Kernel,
    release: &'static str,
    method: &'static str,
    symbols: usize,
    sample: &'static str,
    version: &'static str,
    syscalls64: usize,
}

const LINES: [Line; 2] = [
    Line {
        kernel: Kernel::V6_1,
        release: "6.1.0-56-cloud-amd64",
        method: "lz4",
        symbols: 87347,
        sample: include_str!("data/kallsyms-6.1.0-56-cloud-amd64.sample"),
        version: include_str!("data/version-6.1.0-56-cloud-amd64.txt"),
        syscalls64: 451,
    },
    Line {
        kernel: Kernel::V6_12,
        release: "6.12.111+deb12-cloud-amd64",
        method: "zstd",
        symbols: 154496,
        sample: include_str!("data/kallsyms-6.12.111+deb12-cloud-amd64.sample"),
        version: include_str!("data/version-6.12.111+deb12-cloud-amd64.txt"),
        syscalls64: 463,
    },
];

fn lab_dir(line: &Line) -> std::path::PathBuf {
    let dir = std::env::var("VIGIL_LAB_DIR").unwrap_or_else(|_| "/var/lib/vigil-lab".into());
    line.kernel.dir(std::path::Path::new(&dir))
}

fn lab_vmlinux(line: &Line) -> Vec<u8> {
    let dir = lab_dir(line);
    let release = std::fs::read_to_string(dir.join("kernel-release")).unwrap_or_default();
    assert_eq!(
        release.trim(),
        line.release,
        "the reference capture is of the pinned build; run lab/setup.sh (found {release:?} in {})",
        dir.display()
    );
    let img = std::fs::read(dir.join("vmlinuz"))
        .unwrap_or_else(|e| panic!("{}/vmlinuz: {e}; run lab/setup.sh", dir.display()));
    let (elf, method) = image::vmlinux(&img).unwrap();
    assert_eq!(method, line.method, "Debian's {} cloud kernel payload", line.release);
    elf
}

#[test]
fn lab_kernel_kallsyms_match_the_running_guest() {
    for line in &LINES {
        let syms = kallsyms::from_vmlinux(&lab_vmlinux(line)).unwrap();
        assert_eq!(
            syms.len(),
            line.symbols,
            "{}: the guest's /proc/kallsyms has {} lines",
            line.release,
            line.symbols
        );
        let mut by_name: HashMap<&str, Vec<&kallsyms::Symbol>> = HashMap::new();
        for s in &syms {
            by_name.entry(s.name.as_str()).or_default().push(s);
        }
        let reference: Vec<(u64, char, &str)> = line
            .sample
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (u64::from_str_radix(f[0], 16).unwrap(), f[1].chars().next().unwrap(), f[2])
            })
            .collect();
        assert!(reference.len() > 2000);
        let text_now = reference.iter().find(|r| r.2 == "_text").unwrap().0;
        let slide = text_now.wrapping_sub(by_name["_text"][0].addr);
        assert_eq!(slide % (2 << 20), 0, "KASLR slides the kernel by 2 MiB steps");
        for &(addr, kind, name) in &reference {
            let cands =
                by_name.get(name).unwrap_or_else(|| panic!("{}: {name} is missing", line.release));
            // Per-CPU and absolute symbols do not slide.
            let ok = cands
                .iter()
                .any(|s| s.kind == kind && (s.addr == addr || s.addr.wrapping_add(slide) == addr));
            assert!(
                ok,
                "{}: {name}: guest says {addr:#x} {kind}, image has {cands:?} (slide {slide:#x})",
                line.release
            );
        }
    }
}

#[test]
fn kallsyms_refuse_malformed_tables_without_panicking() {
    for line in &LINES {
        malformed(&lab_vmlinux(line));
    }
}

fn malformed(elf: &[u8]) {
    use object::{Object, ObjectSection};
    let file = object::File::parse(elf).unwrap();
    let rodata = file.section_by_name(".rodata").unwrap().data().unwrap().to_vec();
    let t = kallsyms::find(&rodata).unwrap();
    let tok = t.token_table;
    // Damage each table in turn: each must be refused (or, where the damage
    // only renames one symbol, still parse), never panic.
    for (what, at) in [("token table", tok + 100), ("markers", tok - 600_000), ("first bytes", 0)] {
        let mut b = rodata.clone();
        for x in &mut b[at..at + 64] {
            *x ^= 0x5a;
        }
        let _ = kallsyms::find(&b).map_err(|e| eprintln!("{what}: {e}"));
    }
    // Cut short anywhere near the tables.
    for cut in [tok, tok + 300, tok - 4, tok / 2] {
        let _ = kallsyms::find(&rodata[..cut]);
    }
    assert!(kallsyms::find(&rodata[..tok - 8]).is_err(), "no token table, no symbols");
    assert!(kallsyms::from_vmlinux(b"\x7fELF garbage").is_err());
}

#[test]
fn committed_lab_profiles_are_what_profile_build_makes() {
    for line in &LINES {
        let _ = lab_vmlinux(line); // the pinned build is there
        let vmlinuz = lab_dir(line).join("vmlinuz");
        let out = tempfile::tempdir().unwrap();
        let path = out.path().join("p.profile");
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["profile", "build"])
            .arg(&vmlinuz)
            .arg("-o")
            .arg(&path)
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let made = std::fs::read_to_string(&path).unwrap();
        // Beside it, the reference (issue 25): it reads back, with its rewrite tables.
        let stored = std::fs::read(path.with_extension("reference")).unwrap();
        let r = vigil::linux::reference::ReferenceFile::read(&stored).unwrap();
        let w = vigil::linux::reference::Rewrites::of(&r).unwrap();
        assert!(
            r.relocs.abs32.len() > 10_000 && w.sites.len() > 50_000,
            "{}: {} sites",
            line.release,
            w.sites.len()
        );
        let committed_path =
            format!("{}/../guest-profiles/{}.profile", env!("CARGO_MANIFEST_DIR"), line.release);
        let committed = std::fs::read_to_string(&committed_path)
            .unwrap_or_else(|e| panic!("{committed_path}: {e}"));
        assert!(
            made == committed,
            "guest-profiles/{}.profile is stale: run `vigil profile build {}`",
            line.release,
            vmlinuz.display()
        );
        let p = vigil::linux::profile::Profile::parse(&committed).unwrap();
        // The banner is what the running guest printed in /proc/version.
        assert_eq!(p.banner, line.version.trim_end());
        let syscalls64 = p.syscall_tables()[0].1;
        assert_eq!(syscalls64[110].1, "__x64_sys_getppid");
        assert_eq!(syscalls64.len(), line.syscalls64, "{}", line.release);
        // Where struct module keeps its text: the core layout up to 6.3,
        // mem[MOD_TEXT] from 6.4.
        let layout = if line.kernel == Kernel::V6_1 { "core_layout" } else { "mem" };
        assert!(p.offset(&format!("module.{layout}.base")).is_some(), "{}", line.release);
        // The layout the region bounds come from.
        for sym in ["_text", "_etext", "__start_rodata", "__end_rodata"] {
            assert!(p.symbol(sym).is_some(), "{}: no {sym}", line.release);
        }
    }
}
