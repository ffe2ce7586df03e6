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
    // Hidden commands get none; every page another names is there.
    assert!(!dir.path().join("vigil-man.8").exists(), "vigil-man.8 written");
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for word in text.split(|c: char| c.is_whitespace() || c == ',') {
            let Some(named) = word.strip_suffix("(8)") else { continue };
            let page = named.replace("\\fB", "").replace("\\fR", "").replace("\\-", "-");
            assert!(dir.path().join(format!("{page}.8")).exists(), "{page}(8) named, not written");
        }
    }
    let count = std::fs::read_dir(dir.path()).unwrap().count();
    assert!((10..30).contains(&count), "{count} pages");
    assert!(dir.path().join("vigil-help.8").exists());
    assert!(!dir.path().join("vigil-help-check.8").exists(), "a page for each help topic");
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
