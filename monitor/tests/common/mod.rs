//! What the lab tests of `vigil daemon` share: a daemon of the test's own in a
//! temporary state directory, and lab guests to watch.
//!
//! Every daemon runs as the shipped unit runs it: as user vigil, with only
//! the unit's capabilities and under its system-call filter
//! (`vigil_lab::confine`), so the whole lab suite passes under them.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;
use vigil_lab::confine::{Confinement, UnitSettings};
use vigil_lab::{Guest, Lab, Memory, Shape};

pub const HOT: Duration = Duration::from_secs(1);
pub const FULL: Duration = Duration::from_secs(3);

/// The shipped unit file.
pub fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/vigil.service")
}

/// The shipped unit's settings.
pub fn unit_settings() -> UnitSettings {
    let text = std::fs::read_to_string(unit_path()).unwrap();
    UnitSettings::parse(&text).unwrap_or_else(|e| panic!("systemd/vigil.service: {e}"))
}

/// The shipped unit's confinement, worked out once.
pub fn shipped_confinement() -> Arc<Confinement> {
    static SHIPPED: OnceLock<Arc<Confinement>> = OnceLock::new();
    SHIPPED
        .get_or_init(|| {
            Arc::new(Confinement::from_unit(&unit_path()).unwrap_or_else(|e| {
                panic!("confining the daemon as systemd/vigil.service does: {e} (run lab/setup.sh as root)")
            }))
        })
        .clone()
}

/// Gives `dir` and everything in it to the unit's user, as systemd does to a
/// `StateDirectory=`.
fn give_to(dir: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
    if dir.is_dir() && !dir.is_symlink() {
        for entry in std::fs::read_dir(dir).unwrap() {
            give_to(&entry.unwrap().path(), uid, gid);
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `vigil daemon` of the test's own, in a temporary state directory.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub port: u16,
    pub extra_env: Vec<(String, String)>,
    pub config: String,
    /// How the daemon is confined: the shipped unit's, unless a test changes it.
    pub confinement: Arc<Confinement>,
    /// The `vigil` binary run: this test build's, unless a test changes it.
    pub binary: PathBuf,
}

impl Daemon {
    /// A configuration with short intervals that watches only `domain`
    /// (other tests' guests run beside it). `[schedule]` comes last, so that
    /// text appended to it may add schedule keys or new tables.
    pub fn config_text(domain: &str) -> String {
        format!(
            "profiles = [\"{}/../guest-profiles\"]\n[domains]\ninclude = [\"{domain}\"]\n[schedule]\nhot_interval = \"{}ms\"\nfull_interval = \"{}ms\"\nsettle = \"3s\"\nattach_retry = \"1s\"\n",
            env!("CARGO_MANIFEST_DIR"),
            HOT.as_millis(),
            FULL.as_millis()
        )
    }

    pub fn start(domain: &str) -> Self {
        Self::start_with(domain, "", vec![])
    }

    /// A daemon that checks `domain` in full every second.
    pub fn every_second(domain: &str) -> Self {
        Self::every_second_with(domain, "")
    }

    /// [`Daemon::every_second`] with more configuration after `[schedule]`.
    pub fn every_second_with(domain: &str, extra_config: &str) -> Self {
        let config = Self::config_text(domain).replace(
            &format!("full_interval = \"{}ms\"", FULL.as_millis()),
            "full_interval = \"1s\"",
        );
        assert!(config.contains("full_interval = \"1s\""), "{config}");
        Self::spawned(format!("{config}{extra_config}"), vec![])
    }

    /// What the evidence bundles saved so far say of each violation: the
    /// rule it broke, where, and the bytes (for a failing test's message).
    pub fn evidence_changes(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut dirs = vec![self.path("evidence")];
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.file_name().is_some_and(|n| n == "diff.json") {
                    let v: Value = std::fs::read_to_string(&p)
                        .ok()
                        .and_then(|t| serde_json::from_str(&t).ok())
                        .unwrap_or_default();
                    for c in v["changes"].as_array().into_iter().flatten() {
                        if c["verdict"] == "violation" {
                            out.push(format!(
                                "{} {} {}: {} ({})",
                                c["region"], c["gva"], c["symbol"], c["rule"], c["bytes"]
                            ));
                        }
                    }
                }
            }
        }
        out
    }

    /// One request on the control socket, and its answer.
    pub fn control(&self, req: &Value) -> Value {
        let mut s = std::os::unix::net::UnixStream::connect(self.path("control.sock")).unwrap();
        s.write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("control answer {out:?}: {e}"))
    }

    /// The value of one sample of the metrics, by name and label text.
    pub fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let text = self.metrics();
        let want =
            if labels.is_empty() { format!("{name} ") } else { format!("{name}{{{labels}}} ") };
        text.lines().find_map(|l| l.strip_prefix(&want)).and_then(|v| v.trim().parse().ok())
    }

    /// A daemon of the given configuration, whole.
    pub fn start_config(config: String) -> Self {
        Self::spawned(config, vec![])
    }

    /// `top_level` settings go first in the configuration file.
    pub fn start_top_level(domain: &str, top_level: &str) -> Self {
        Self::spawned(format!("{top_level}\n{}", Self::config_text(domain)), vec![])
    }

    /// A daemon not yet started (`spawn` starts it), with `extra_config`
    /// appended to its configuration file.
    pub fn unstarted(domain: &str, extra_config: &str) -> Self {
        Daemon {
            dir: tempfile::tempdir().unwrap(),
            child: None,
            port: free_port(),
            extra_env: vec![],
            config: Self::config_text(domain) + extra_config,
            confinement: shipped_confinement(),
            binary: env!("CARGO_BIN_EXE_vigil").into(),
        }
    }

    /// `extra_config` is appended to the configuration file.
    pub fn start_with(domain: &str, extra_config: &str, extra_env: Vec<(String, String)>) -> Self {
        Self::spawned(Self::config_text(domain) + extra_config, extra_env)
    }

    fn spawned(config: String, extra_env: Vec<(String, String)>) -> Self {
        let mut d = Daemon {
            dir: tempfile::tempdir().unwrap(),
            child: None,
            port: free_port(),
            extra_env,
            config,
            confinement: shipped_confinement(),
            binary: env!("CARGO_BIN_EXE_vigil").into(),
        };
        d.spawn();
        d
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn spawn(&mut self) {
        std::fs::write(self.path("vigil.toml"), &self.config).unwrap();
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--state-dir")
            .arg(self.dir.path())
            .arg("--control-socket")
            .arg(self.path("control.sock"))
            .arg("daemon")
            .arg("--config")
            .arg(self.path("vigil.toml"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.path("stderr.log")).unwrap());
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        give_to(self.dir.path(), self.confinement.uid, self.confinement.gid);
        self.confinement.apply(&mut cmd);
        self.child = Some(cmd.spawn().unwrap_or_else(|e| {
            panic!("starting vigil daemon confined ({}): {e}", self.confinement.summary)
        }));
        self.wait_for("the control socket", Duration::from_secs(20), |d| {
            d.path("control.sock").exists()
        });
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    pub fn alerts(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.path("alerts.jsonl")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    pub fn events(&self, event: &str, domain: &str) -> Vec<Value> {
        self.alerts().into_iter().filter(|a| a["event"] == event && a["domain"] == domain).collect()
    }

    pub fn vigil(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_vigil"))
            .arg("--control-socket")
            .arg(self.path("control.sock"))
            .args(args)
            .output()
            .unwrap()
    }

    pub fn status(&self, domain: &str) -> Option<Value> {
        let out = self.vigil(&["status", "--format", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["domains"].as_array()?.iter().find(|d| d["name"] == domain).cloned()
    }

    pub fn metrics(&self) -> String {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        // A scrape kept waiting fails the test rather than hangs it.
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, mut ok: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !ok(self) {
            if Instant::now() > deadline {
                let err = std::fs::read_to_string(self.path("stderr.log")).unwrap_or_default();
                let alerts: Vec<String> = self
                    .alerts()
                    .iter()
                    .map(|a| format!("{} {} {}", a["event"], a["region"], a["detail"]))
                    .collect();
                panic!(
                    "timed out after {timeout:?} waiting for {what}\nalerts:\n{}\nstderr:\n{err}",
                    alerts.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until the daemon checks `g` against a settled baseline.
    pub fn wait_watching(&self, g: &Guest) {
        self.wait_for(&format!("{} to be watched", g.name), Duration::from_secs(90), |d| {
            d.status(&g.name).is_some_and(|s| s["state"] == "watching" && s["last_check"] != "")
        });
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // SIGTERM first: the daemon should stop cleanly.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One `vigil` command with a state directory of its own and the repo's
/// guest profiles.
pub fn vigil_in(state: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vigil"))
        .arg("--state-dir")
        .arg(state)
        .arg("--profiles")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles"))
        .args(args)
        .output()
        .unwrap()
}

pub fn boot(suffix: &str) -> Guest {
    boot_kernel(suffix, vigil_lab::Kernel::V6_1)
}

/// A lab guest of the given kernel line.
pub fn boot_kernel(suffix: &str, kernel: vigil_lab::Kernel) -> Guest {
    let lab = Lab::open().unwrap_or_else(|e| panic!("{e}"));
    lab.start_with(suffix, &Shape { memory: Memory::Shared, kernel, ..Shape::default() })
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The committed profile of a lab kernel line.
pub fn lab_profile(kernel: vigil_lab::Kernel) -> vigil::linux::profile::Profile {
    let release = match kernel {
        vigil_lab::Kernel::V6_1 => "6.1.0-56-cloud-amd64",
        vigil_lab::Kernel::V6_12 => "6.12.111+deb12-cloud-amd64",
    };
    let path = format!("{}/../guest-profiles/{release}.profile", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    vigil::linux::profile::Profile::parse(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn violations(d: &Daemon, g: &Guest, region: &str) -> Vec<Value> {
    d.events("violation", &g.name).into_iter().filter(|a| a["region"] == region).collect()
}

/// The committed profiles of both lab lines, each with the reference
/// `vigil profile build` makes of the lab's image beside it: built once per
/// test run (into the target directory, under a lock, so that tests started
/// together do not all build them) and shared by the tests.
pub fn profiles_with_references() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.join("lab-references");
    let lock = std::fs::File::create(tmp.join("lab-references.lock")).unwrap();
    lock.lock().unwrap();
    // Made anew when the committed profiles change (what `profile build`
    // writes changed with them).
    let mut h = blake3::Hasher::new();
    for k in vigil_lab::Kernel::ALL {
        let release = lab_profile(k).release;
        let path = format!("{}/../guest-profiles/{release}.profile", env!("CARGO_MANIFEST_DIR"));
        h.update(&std::fs::read(&path).unwrap());
    }
    let stamp = h.finalize().to_hex().to_string();
    if std::fs::read_to_string(dir.join("done")).is_ok_and(|d| d == stamp) {
        return dir;
    }
    let lab = Lab::open().unwrap_or_else(|e| panic!("{e}"));
    let fresh = tempfile::tempdir_in(tmp).unwrap();
    for k in vigil_lab::Kernel::ALL {
        let release = lab_profile(k).release;
        let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["profile", "build"])
            .arg(k.dir(&lab.dir).join("vmlinuz"))
            .arg("-o")
            .arg(fresh.path().join(format!("{release}.profile")))
            .output()
            .unwrap();
        assert!(out.status.success(), "profile build: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::write(fresh.path().join("done"), &stamp).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(fresh.keep(), &dir).unwrap();
    dir
}

/// A memory-only ELF core of a running lab guest, as libvirt writes it.
pub fn dump_core(domain: &str, core: &Path) {
    let dumped = Command::new("virsh")
        .args(["-c", "qemu:///system", "dump", domain])
        .arg(core)
        .args(["--memory-only", "--format", "elf"])
        .output()
        .unwrap();
    assert!(dumped.status.success(), "{}", String::from_utf8_lossy(&dumped.stderr));
}
