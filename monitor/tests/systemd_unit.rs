//! The shipped systemd files, checked by systemd's own tools: the unit with
//! `systemd-analyze verify`, its hardening with `systemd-analyze security`
//! (the score the README records), sysusers.d and tmpfiles.d applied to a
//! scratch root.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The unit with ExecStart pointing at the binary under test (verify wants
/// the executable to exist).
fn unit_copy(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("systemd/vigil.service")).unwrap();
    assert!(
        text.contains("ExecStart=/usr/bin/vigil daemon"),
        "the unit runs /usr/bin/vigil daemon"
    );
    let path = dir.join("vigil.service");
    std::fs::write(&path, text.replace("/usr/bin/vigil", env!("CARGO_BIN_EXE_vigil"))).unwrap();
    path
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (apt-get install systemd)"));
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let (ok, out) = run(Command::new("systemd-analyze").arg("verify").arg(&unit));
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify: {out}");
}

/// The unit bounds the daemon's memory and file descriptors, with room
/// for the metrics listener's connections (a local user may hold them all)
/// and more.
#[test]
fn the_unit_bounds_memory_and_file_descriptors() {
    let text = std::fs::read_to_string(repo().join("systemd/vigil.service")).unwrap();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("the unit sets no {key}="))
            .trim()
            .to_owned()
    };
    let memory = value("MemoryMax");
    let gib: u64 = memory.strip_suffix('G').and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(gib >= 2, "MemoryMax={memory}: under the 2 GiB 100 guests take (benches/README.md)");
    let files: usize = value("LimitNOFILE").parse().unwrap();
    let connections = vigil::daemon::metrics::Limits::DEFAULT.connections;
    assert!(
        files >= 16 * connections,
        "LimitNOFILE={files} leaves little past {connections} metrics connections"
    );
}

#[test]
fn security_exposure_is_the_one_the_readme_records() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let (_, out) = run(Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit));
    let score = out
        .lines()
        .find_map(|l| l.split("Overall exposure level for vigil.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no exposure level in: {out}"))
        .to_owned();
    let value: f64 = score.parse().unwrap();
    assert!(value <= 3.0, "exposure {value} is above 3.0");
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    assert!(
        readme.contains(&format!("exposure level {score}")),
        "README does not record exposure level {score}"
    );
}

#[test]
fn sysusers_and_tmpfiles_apply_to_a_scratch_root() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc")).unwrap();
    let (ok, out) = run(Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .arg(repo().join("systemd/vigil.sysusers")));
    assert!(ok, "{out}");
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(group.lines().any(|l| l.starts_with("vigil:")), "{group}");
    let passwd = std::fs::read_to_string(root.path().join("etc/passwd")).unwrap();
    assert!(
        passwd.lines().any(|l| l.starts_with("vigil:") && l.ends_with(":/usr/sbin/nologin")),
        "the unit's User=vigil, with no login: {passwd}"
    );
    let (ok, out) = run(Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.path().display()))
        .arg("--create")
        .arg(repo().join("systemd/vigil.tmpfiles")));
    assert!(ok, "{out}");
    let baselines = root.path().join("var/lib/vigil/baselines");
    assert!(baselines.is_dir());
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&baselines).unwrap());
    let vigil_uid: u32 = passwd
        .lines()
        .find_map(|l| l.strip_prefix("vigil:x:"))
        .and_then(|rest| rest.split(':').next()?.parse().ok())
        .unwrap();
    assert_eq!(owner, vigil_uid, "baselines belong to the daemon's user");
}

#[test]
fn example_config_is_valid_and_says_the_defaults() {
    let path = repo().join("systemd/vigil.toml");
    let s = vigil::daemon::config::Settings::load(Some(&path), &Default::default()).unwrap();
    let d = vigil::daemon::config::Settings::load(None, &Default::default()).unwrap();
    assert_eq!(
        format!(
            "{:?}",
            (
                s.hot_interval,
                s.full_interval,
                s.cpu_budget,
                s.settle,
                s.check_timeout,
                s.module_grace,
                s.module_text,
                s.guest_memory,
                s.push_queue,
                s.alert_rotation,
                &s.state_dir,
                &s.profiles
            )
        ),
        format!(
            "{:?}",
            (
                d.hot_interval,
                d.full_interval,
                d.cpu_budget,
                d.settle,
                d.check_timeout,
                d.module_grace,
                d.module_text,
                d.guest_memory,
                d.push_queue,
                d.alert_rotation,
                &d.state_dir,
                &d.profiles
            )
        )
    );
}
