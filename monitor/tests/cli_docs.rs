//! The manual pages and completions the binary makes of its own CLI (the
//! Debian package installs them; `lab/package.sh --check` checks them
//! installed).

use std::process::Command;

const VIGIL: &str = env!("CARGO_BIN_EXE_vigil");

#[test]
fn man_dir_writes_a_page_for_each_subcommand_with_its_options() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(VIGIL).arg("man").arg("--dir").arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page = |name: &str| {
        std::fs::read_to_string(dir.path().join(format!("{name}.8")))
            .unwrap_or_else(|e| panic!("{name}.8: {e}"))
    };
    let main = page("vigil");
    assert!(main.contains(".TH vigil 8"), "{main}");
    // A subcommand's page is titled as such and shows its own options,
    // which the main page does not.
    let check = page("vigil-check");
    assert!(check.contains(".TH vigil-check 8"), "{check}");
    assert!(check.contains("format"), "vigil-check.8 shows no --format:\n{check}");
    let build = page("vigil-profile-build");
    assert!(build.contains(".TH vigil-profile-build 8"), "{build}");
    assert!(build.contains("vigil profile build"), "{build}");
    // Each says whose version it documents.
    let version = format!("vigil {}", env!("CARGO_PKG_VERSION"));
    assert!(build.lines().any(|l| l.starts_with(".TH") && l.contains(&version)), "{build}");
    // Hidden commands and clap's help get none.
    for none in ["vigil-man", "vigil-help"] {
        assert!(!dir.path().join(format!("{none}.8")).exists(), "{none}.8 written");
    }
    let count = std::fs::read_dir(dir.path()).unwrap().count();
    assert!(count > 10, "{count} pages");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains(&format!("{count} manual pages written")), "{said}");
}

#[test]
fn a_man_dir_that_cannot_be_made_is_named() {
    let out = Command::new(VIGIL).args(["man", "--dir", "/proc/vigil-man"]).output().unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("/proc/vigil-man"), "{said}");
}
