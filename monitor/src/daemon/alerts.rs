//! Alerts and events: one JSON object per line, in a stable schema
//! (`schema: 1`), appended and fsynced to the alert log before anything else
//! counts them as sent.
//!
//! The log is also the daemon's memory of what it has already said: on start
//! it is read back, so a restarted daemon neither repeats an alert nor loses
//! track of a change it reported before it died.
//!
//! It does not grow without end: past a size ([`Rotation`]) it is renamed
//! `<log>.1` (the older ones shifting to `.2`, ... and the oldest dropped)
//! and a new one begun. What was still reported then is first written to
//! `<log>.state`, which is read back before the log itself.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use crate::integrity::{Finding, FindingKind, Severity};

pub const SCHEMA: u32 = 1;
/// Alert-log lines longer than this are not believed when reading back.
const MAX_LINE: usize = 64 * 1024;

/// What an alert line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A change the baseline does not allow.
    Violation,
    /// A change reported before is gone: the page or register is as in the baseline again.
    Reverted,
    /// A change that is information only (permissions tightened, ...).
    Notice,
    /// A domain was attached (with a new or a stored baseline).
    Attached,
    /// A domain is waiting to be attached (kernel not found yet, ...).
    Waiting,
    /// A domain stopped or disappeared.
    Detached,
    /// A watched domain was paused: its vCPUs stopped, its memory still checked.
    Paused,
    /// A paused domain runs again.
    Resumed,
    /// A new boot of a domain got a new baseline.
    NewBoot,
    /// An operator accepted a domain's current state as its baseline.
    Accepted,
    /// The monitor itself failed: memory unreadable, check failed, ...
    Error,
    /// The CPU budget could not be met.
    BudgetExceeded,
    /// A module appeared in the guest's module list (its text is protected from then on).
    ModuleLoaded,
    /// A module left the guest's module list.
    ModuleUnloaded,
    /// The kernel patched its own text (jump labels, static calls, ftrace,
    /// kprobes), and every change was one its patch records allow.
    KernelPatched,
    /// Evidence of a violation was saved (or could only be saved in part).
    EvidenceSaved,
    /// Stored state (a baseline, its original pages) exists but cannot be
    /// used: kept aside, and what can no longer be checked is said.
    StateUnreadable,
    /// The guest profiles on the search path changed and were loaded again
    /// (or a reload was asked for): checks use them from then on.
    ProfilesLoaded,
}

/// How much an alert asks of the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertSeverity {
    /// Nothing to do: the kernel patched itself, a module loaded, ...
    Info,
    /// vigil cannot check everything it should (a failure, a missing profile).
    Warning,
    /// A violation, or state that vouched for the guest is lost.
    Critical,
}

impl AlertSeverity {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertSeverity::Info => "info",
            AlertSeverity::Warning => "warning",
            AlertSeverity::Critical => "critical",
        }
    }
}

impl std::fmt::Display for AlertSeverity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of the alert log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Alert {
    pub schema: u32,
    /// RFC 3339, UTC.
    pub time: String,
    pub host: String,
    pub event: EventKind,
    /// `critical` (violations), `warning` (monitor failures), `info`.
    pub severity: AlertSeverity,
    pub domain: String,
    pub uuid: String,
    /// The boot key: where KASLR placed the kernel in this boot.
    #[serde(default)]
    pub boot: String,
    #[serde(default)]
    pub region: String,
    /// `content`, `remap`, `permission`, `register`; empty for lifecycle events.
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub gva: String,
    #[serde(default)]
    pub gpa: String,
    /// Pages the event covers.
    #[serde(default)]
    pub pages: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub register: Option<String>,
    /// MITRE ATT&CK technique.
    #[serde(default)]
    pub technique: String,
    pub detail: String,
    /// Evidence: the baseline's hash (or mapping, or register value).
    #[serde(default)]
    pub before: String,
    /// Evidence: the current hash (or mapping, or register value).
    #[serde(default)]
    pub after: String,
    /// Identifies the changed thing across alerts: region, kind, severity
    /// (and register).
    #[serde(default)]
    pub key: String,
    /// Digest of exactly what changed in this group (pages and evidence).
    #[serde(default)]
    pub digest: String,
    /// Where the first page or entry lies, by symbol, when a profile matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
    /// The directory where evidence of this violation is being saved
    /// (`[evidence]`); its `manifest.json` appears when the saving is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evidence: Option<String>,
    /// Who asked (`accepted`, and an accept refused): the control socket
    /// peer's credentials, as the kernel gave them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<Operator>,
    /// `accepted`: the digest of the diff accepted (`vigil diff`); an
    /// accept refused: the digest of the diff the operator had reviewed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_digest: Option<String>,
}

/// Someone on the control socket, by the kernel's peer credentials
/// (`SO_PEERCRED`), not by anything they said.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Operator {
    pub uid: u32,
    pub gid: u32,
    /// The uid's name in `/etc/passwd`; `null` when it has none.
    pub user: Option<String>,
    /// The process that connected; `null` when the kernel did not say.
    pub pid: Option<i32>,
}

impl std::fmt::Display for Operator {
    /// `alice (uid 1001, pid 4242)`, or `uid 1001 (pid 4242)` for a uid
    /// with no name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pid = self.pid.map(|p| format!(", pid {p}")).unwrap_or_default();
        match &self.user {
            Some(u) => write!(f, "{u} (uid {}{pid})", self.uid),
            None => write!(f, "uid {} (no user name{pid})", self.uid),
        }
    }
}

fn kind_text(k: FindingKind) -> &'static str {
    match k {
        FindingKind::Content => "content",
        FindingKind::Remap => "remap",
        FindingKind::Permission => "permission",
        FindingKind::Register => "register",
        FindingKind::Pointer => "pointer",
        FindingKind::Unlisted => "unlisted",
        FindingKind::Reference => "reference",
        FindingKind::Hook => "hook",
    }
}

/// MITRE ATT&CK: a kernel-resident rootkit changing kernel code or tables is
/// T1014 (Rootkit); switching off a CPU protection is T1562 (Impair Defenses).
fn technique(f: &Finding) -> &'static str {
    match f.kind {
        FindingKind::Register
            if f.register
                .as_deref()
                .is_some_and(|r| r.starts_with("CR") || r.starts_with("EFER")) =>
        {
            "T1562"
        }
        _ => "T1014",
    }
}

/// Which group a finding belongs to: one alert covers one group, so that a
/// change of many pages (a new boot's permission tightening, say) is one
/// event, not thousands.
pub fn group_key(f: &Finding) -> String {
    let sev = match f.severity {
        Severity::Violation => "violation",
        Severity::Info => "info",
    };
    match &f.register {
        Some(r) => format!("{}/{}/{sev}/{r}", f.region, kind_text(f.kind)),
        None => format!("{}/{}/{sev}", f.region, kind_text(f.kind)),
    }
}

/// A group of findings: its key, its digest, its findings.
pub type Group<'a> = (String, String, Vec<&'a Finding>);

/// The findings of one scan, grouped, each group with a digest of exactly
/// what changed: the same change seen again has the same digest; a change
/// that grows, shrinks or differs has another.
pub fn groups(findings: &[Finding]) -> Vec<Group<'_>> {
    let mut map: std::collections::BTreeMap<String, Vec<&Finding>> =
        std::collections::BTreeMap::new();
    for f in findings {
        map.entry(group_key(f)).or_default().push(f);
    }
    map.into_iter()
        .map(|(key, fs)| {
            let mut h = blake3::Hasher::new();
            for f in &fs {
                h.update(
                    format!("{:#x}|{:?}|{}|{}\n", f.gva.raw(), f.vcpu, f.before, f.after)
                        .as_bytes(),
                );
            }
            (key, h.finalize().to_hex().to_string(), fs)
        })
        .collect()
}

/// Context shared by every alert about one domain.
#[derive(Debug, Clone, Default)]
pub struct Subject {
    pub host: String,
    pub domain: String,
    pub uuid: String,
    pub boot: String,
}

impl Subject {
    pub fn event(&self, event: EventKind, severity: AlertSeverity, detail: String) -> Alert {
        Alert {
            schema: SCHEMA,
            time: crate::integrity::baseline::now_rfc3339(),
            host: self.host.clone(),
            event,
            severity,
            domain: self.domain.clone(),
            uuid: self.uuid.clone(),
            boot: self.boot.clone(),
            region: String::new(),
            kind: String::new(),
            gva: String::new(),
            gpa: String::new(),
            pages: 0,
            vcpu: None,
            register: None,
            technique: String::new(),
            detail,
            before: String::new(),
            after: String::new(),
            key: String::new(),
            digest: String::new(),
            symbol: None,
            evidence: None,
            by: None,
            diff_digest: None,
        }
    }

    /// One alert for a group of findings (see [`groups`]); `digest` becomes
    /// its `after` evidence when the group has more than one page.
    pub fn group(&self, key: &str, digest: &str, fs: &[&Finding]) -> Alert {
        let f = fs[0];
        let (event, severity) = match f.severity {
            Severity::Violation => (EventKind::Violation, AlertSeverity::Critical),
            Severity::Info => (EventKind::Notice, AlertSeverity::Info),
        };
        let moved = |f: &&Finding| f.kind == FindingKind::Remap && f.after != "unmapped";
        let detail = if fs.len() == 1 {
            f.detail.clone()
        } else if f.kind == FindingKind::Hook {
            // Hooks are no pages: each said, the first few in full.
            let shown: Vec<&str> = fs.iter().take(4).map(|f| f.detail.as_str()).collect();
            format!(
                "{} hooks: {}{}",
                fs.len(),
                shown.join(" | "),
                if fs.len() > shown.len() { " | ..." } else { "" }
            )
        } else if f.severity == Severity::Violation && fs.iter().all(moved) {
            // The kernel's own page tables repointed at other frames: one
            // alert that says so, not a page list to decode.
            format!(
                "kernel image remapped: {} pages of {} now map other memory, and the hypervisor reported no \
                 reboot (first at {:#x}: {}, was {})",
                fs.len(),
                f.region,
                f.gva.raw(),
                f.after,
                f.before
            )
        } else {
            let shown: Vec<String> =
                fs.iter().take(4).map(|f| format!("{:#x}", f.gva.raw())).collect();
            // The first finding's own sentence: the rule it broke, which a
            // page list does not say.
            let first = if f.detail.is_empty() {
                String::new()
            } else {
                format!("; the first: {}", f.detail)
            };
            format!(
                "{} pages of {} ({}): {}{}{first}",
                fs.len(),
                f.region,
                kind_text(f.kind),
                shown.join(", "),
                if fs.len() > shown.len() { ", ..." } else { "" }
            )
        };
        let mut a = self.event(event, severity, detail);
        a.region = f.region.clone();
        a.kind = kind_text(f.kind).into();
        a.gva = format!("{:#x}", f.gva.raw());
        a.gpa = format!("{:#x}", f.gpa.raw());
        a.pages = fs.iter().filter(|f| f.page.is_some() || f.kind != FindingKind::Register).count()
            as u64;
        a.vcpu = f.vcpu;
        a.register = f.register.clone();
        a.technique = technique(f).into();
        if fs.len() == 1 {
            a.before = f.before.clone();
            a.after = f.after.clone();
        } else {
            a.before = "baseline".into();
        }
        a.digest = digest.into();
        a.key = key.into();
        a.symbol = f.symbol.clone();
        a
    }
}

/// Why the alert log failed.
#[derive(Debug, thiserror::Error)]
#[error("alert log {path}")]
pub struct AlertLogError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// When the alert log is rotated and how many rotated logs are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// The log is rotated after the append that takes it past this size.
    pub max_bytes: u64,
    /// Rotated logs kept (`<log>.1` the newest), at least 1: a pusher that
    /// is behind finishes the one it was reading.
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Self { max_bytes: 64 << 20, keep: 4 }
    }
}

/// The `n`th rotated log beside `log`: `alerts.jsonl.1`, ...
pub fn rotated_path(log: &Path, n: u32) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// What was reported when `log` was last rotated.
pub fn state_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".state");
    PathBuf::from(name)
}

/// One reported group in the state file.
#[derive(serde::Serialize, serde::Deserialize)]
struct StateEntry {
    uuid: String,
    boot: String,
    key: String,
    digest: String,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    schema: u32,
    reported: Vec<StateEntry>,
}

/// The append-only, fsynced alert log.
pub struct AlertLog {
    path: PathBuf,
    file: File,
    /// An append failed, perhaps part-way: the next starts a line of its own.
    torn: bool,
    rotation: Rotation,
}

/// What the log says is currently reported, per domain and boot: group key
/// to the digest last reported.
pub type Reported = HashMap<(String, String), HashMap<String, String>>;

impl AlertLog {
    pub fn open(path: &Path) -> Result<Self, AlertLogError> {
        Self::open_rotating(path, Rotation::default())
    }

    pub fn open_rotating(path: &Path, rotation: Rotation) -> Result<Self, AlertLogError> {
        let err = |source| AlertLogError { path: path.to_owned(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut file =
            OpenOptions::new().create(true).append(true).read(true).open(path).map_err(err)?;
        // A crash in mid-append leaves a torn last line: end it, so the next
        // alert starts a line of its own.
        let len = file.metadata().map_err(err)?.len();
        if len > 0 {
            use std::os::unix::fs::FileExt;
            let mut last = [0u8; 1];
            file.read_exact_at(&mut last, len - 1).map_err(err)?;
            if last[0] != b'\n' {
                file.write_all(b"\n").and_then(|()| file.sync_data()).map_err(err)?;
            }
        }
        Ok(Self { path: path.to_owned(), file, torn: false, rotation })
    }

    /// Appends one line and waits until it is on disk.
    pub fn append(&mut self, alert: &Alert) -> Result<(), AlertLogError> {
        let mut line = if self.torn { vec![b'\n'] } else { Vec::new() };
        line.extend(serde_json::to_vec(alert).expect("alerts serialise"));
        line.push(b'\n');
        let err = |source| AlertLogError { path: self.path.clone(), source };
        // A full disk may take part of a line: mark it, so that the next
        // append does not continue it (readers skip the torn part).
        self.torn = true;
        self.file.write_all(&line).map_err(err)?;
        self.file.sync_data().map_err(err)?;
        self.torn = false;
        Ok(())
    }

    /// Rotates the log if it has grown past its size; whether it did. The
    /// alerts already appended stay logged whatever this returns.
    pub fn rotate_if_due(&mut self) -> Result<bool, AlertLogError> {
        let err = |source| AlertLogError { path: self.path.clone(), source };
        if self.file.metadata().map_err(err)?.len() <= self.rotation.max_bytes {
            return Ok(false);
        }
        self.rotate()?;
        Ok(true)
    }

    /// Keeps what is reported in the state file, shifts the rotated logs
    /// (dropping the oldest), renames the log `<log>.1` and begins a new one.
    /// A crash at any step loses nothing: the state and the log are read
    /// back together, and reading a log twice over its state changes nothing.
    pub fn rotate(&mut self) -> Result<(), AlertLogError> {
        let outstanding = Self::reported(&self.path)?;
        write_state(&state_path(&self.path), &outstanding)?;
        let keep = self.rotation.keep.max(1);
        for n in (1..keep).rev() {
            let from = rotated_path(&self.path, n);
            match std::fs::rename(&from, rotated_path(&self.path, n + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(AlertLogError { path: from, source: e });
                }
                _ => {}
            }
        }
        let err = |source| AlertLogError { path: self.path.clone(), source };
        std::fs::rename(&self.path, rotated_path(&self.path, 1)).map_err(err)?;
        sync_parent(&self.path).map_err(err)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)
            .map_err(err)?;
        self.torn = false;
        Ok(())
    }

    /// Reads the log back, over the state kept at its last rotation, and
    /// returns what is currently reported. Lines that are not alerts (a torn
    /// last line after a crash, say) are skipped.
    pub fn reported(path: &Path) -> Result<Reported, AlertLogError> {
        let mut out = read_state(&state_path(path))?;
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(source) => return Err(AlertLogError { path: path.to_owned(), source }),
        };
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|source| AlertLogError { path: path.to_owned(), source })?;
            if n == 0 {
                break;
            }
            if n > MAX_LINE {
                // Skip the rest of an over-long line.
                let mut sink = Vec::new();
                let _ = reader.read_until(b'\n', &mut sink);
                continue;
            }
            let Ok(a) = serde_json::from_slice::<Alert>(&buf) else { continue };
            if matches!(a.event, EventKind::NewBoot) {
                // A domain's earlier boots are over, and what was reported
                // of them with them: the state file does not carry them on.
                out.retain(|(uuid, boot), _| *uuid != a.uuid || *boot == a.boot);
            }
            let slot = out.entry((a.uuid.clone(), a.boot.clone())).or_default();
            match a.event {
                EventKind::Violation | EventKind::Notice => {
                    slot.insert(a.key, a.digest);
                }
                EventKind::Reverted => {
                    slot.remove(&a.key);
                }
                EventKind::Accepted | EventKind::NewBoot => slot.clear(),
                _ => {}
            }
        }
        Ok(out)
    }
}

/// The state file's reported groups; none if there is no state file.
fn read_state(path: &Path) -> Result<Reported, AlertLogError> {
    let mut out: Reported = HashMap::new();
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => return Err(AlertLogError { path: path.to_owned(), source }),
    };
    let state: State = serde_json::from_slice(&text).map_err(|e| AlertLogError {
        path: path.to_owned(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not an alert-log state file ({e}); move it away to start afresh (changes still present are then reported again)"
            ),
        ),
    })?;
    for e in state.reported {
        out.entry((e.uuid, e.boot)).or_default().insert(e.key, e.digest);
    }
    Ok(out)
}

/// Writes the state file whole or not at all: a temporary file, synced,
/// renamed over it.
fn write_state(path: &Path, reported: &Reported) -> Result<(), AlertLogError> {
    let mut entries: Vec<StateEntry> = reported
        .iter()
        .flat_map(|((uuid, boot), groups)| {
            groups.iter().map(move |(key, digest)| StateEntry {
                uuid: uuid.clone(),
                boot: boot.clone(),
                key: key.clone(),
                digest: digest.clone(),
            })
        })
        .collect();
    entries.sort_by(|a, b| (&a.uuid, &a.boot, &a.key).cmp(&(&b.uuid, &b.boot, &b.key)));
    let text = serde_json::to_vec(&State { schema: SCHEMA, reported: entries }).expect("json");
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let err = |source| AlertLogError { path: path.to_owned(), source };
    File::create(&tmp)
        .and_then(|mut f| f.write_all(&text).and_then(|()| f.sync_all()))
        .map_err(|source| AlertLogError { path: tmp.clone(), source })?;
    std::fs::rename(&tmp, path).map_err(err)?;
    sync_parent(path).map_err(err)
}

/// Makes the renames in `path`'s directory durable.
fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Decides which groups of a scan are news (not reported before, or
/// reported with another digest) and which reported groups are gone.
pub fn news<'a>(
    reported: &HashMap<String, String>,
    groups: &'a [Group<'a>],
) -> (Vec<&'a Group<'a>>, Vec<String>) {
    let fresh = groups.iter().filter(|(k, d, _)| reported.get(k) != Some(d)).collect();
    let mut gone: Vec<String> =
        reported.keys().filter(|k| !groups.iter().any(|(g, _, _)| g == *k)).cloned().collect();
    gone.sort();
    (fresh, gone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{GuestPhysAddr, GuestVirtAddr};
    use crate::libvirt::error_chain;

    fn finding(gva: u64, after: &str) -> Finding {
        Finding {
            region: "kernel-text".into(),
            kind: FindingKind::Content,
            severity: Severity::Violation,
            gva: GuestVirtAddr(gva),
            gpa: GuestPhysAddr(0x1000),
            page: Some(3),
            vcpu: None,
            register: None,
            detail: "page 3 changed".into(),
            before: "aa".into(),
            after: after.into(),
            symbol: None,
            entry: None,
        }
    }

    fn subject() -> Subject {
        Subject { host: "h".into(), domain: "d".into(), uuid: "u".into(), boot: "b".into() }
    }

    #[test]
    fn one_alert_per_distinct_change() {
        let mut reported = HashMap::new();
        let scan1 = [finding(0x1000, "bb")];
        let g1 = groups(&scan1);
        let (fresh, gone) = news(&reported, &g1);
        assert_eq!((fresh.len(), gone.len()), (1, 0));
        reported.insert(g1[0].0.clone(), g1[0].1.clone());
        // Same change, next scan: nothing new.
        assert_eq!(news(&reported, &groups(&scan1)).0.len(), 0);
        // The change grew (a page joined): news, as one alert for the group.
        let scan3 = [finding(0x1000, "bb"), finding(0x2000, "dd")];
        let g3 = groups(&scan3);
        assert_eq!(g3.len(), 1);
        assert_eq!(news(&reported, &g3).0.len(), 1);
        let a = subject().group(&g3[0].0, &g3[0].1, &g3[0].2);
        assert_eq!(a.pages, 2);
        assert!(a.detail.starts_with("2 pages of kernel-text"), "{}", a.detail);
        // Same page, other bytes: news too.
        assert_eq!(news(&reported, &groups(&[finding(0x1000, "cc")])).0.len(), 1);
        // Reverted: reported but absent.
        let (fresh, gone) = news(&reported, &[]);
        assert_eq!((fresh.len(), gone), (0, vec![g1[0].0.clone()]));
    }

    /// A kernel whose page tables were repointed at copies: one alert per
    /// region that says the image was remapped, with the first page's old
    /// and new frame.
    #[test]
    fn a_remapped_image_is_one_alert_that_says_so() {
        let remap = |gva: u64, to: u64| Finding {
            kind: FindingKind::Remap,
            before: format!("{:#x} r-x", gva - 0xffff_ffff_8000_0000),
            after: format!("{to:#x} r-x"),
            ..finding(gva, "")
        };
        let scan: Vec<Finding> = (0..300u64)
            .map(|i| remap(0xffff_ffff_8100_0000 + i * 4096, 0x7000_0000 + i * 4096))
            .collect();
        let g = groups(&scan);
        assert_eq!(g.len(), 1);
        let a = subject().group(&g[0].0, &g[0].1, &g[0].2);
        assert_eq!(
            (a.event, a.severity.as_str(), a.pages),
            (EventKind::Violation, "critical", 300)
        );
        assert!(
            a.detail.starts_with(
                "kernel image remapped: 300 pages of kernel-text now map other memory"
            ),
            "{}",
            a.detail
        );
        assert!(a.detail.contains("0x70000000 r-x, was 0x1000000 r-x"), "{}", a.detail);
        // Pages that are gone rather than moved are listed as before.
        let mut gone = scan.clone();
        gone[1].after = "unmapped".into();
        let g = groups(&gone);
        let a = subject().group(&g[0].0, &g[0].1, &g[0].2);
        assert!(a.detail.starts_with("300 pages of kernel-text (remap)"), "{}", a.detail);
    }

    #[test]
    fn the_log_remembers_across_restarts_and_survives_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let mut log = AlertLog::open(&path).unwrap();
        let s = subject();
        let text = [finding(0x1000, "bb")];
        let mut reg = finding(0, "0x80040033");
        reg.region = "registers".into();
        reg.kind = FindingKind::Register;
        reg.register = Some("CR0.WP".into());
        let regs = [reg];
        for scan in [&text[..], &regs[..]] {
            let g = groups(scan);
            log.append(&s.group(&g[0].0, &g[0].1, &g[0].2)).unwrap();
        }
        let mut rev = s.event(EventKind::Reverted, AlertSeverity::Info, "gone".into());
        rev.key = groups(&regs)[0].0.clone();
        log.append(&rev).unwrap();
        drop(log);
        // A crash in mid-write leaves half a line.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"schema\":1,\"ti")
            .unwrap();
        let r = AlertLog::reported(&path).unwrap();
        let cur = &r[&("u".to_string(), "b".to_string())];
        let g = groups(&text);
        assert_eq!(cur.len(), 1);
        assert_eq!(cur[&g[0].0], g[0].1);
        // Appending after the torn line still gives readable lines.
        let mut log = AlertLog::open(&path).unwrap();
        log.append(&s.event(EventKind::Accepted, AlertSeverity::Info, "ok".into())).unwrap();
        let r = AlertLog::reported(&path).unwrap();
        assert!(r[&("u".to_string(), "b".to_string())].is_empty());
    }

    /// A change reported long ago is still known once its line has been
    /// rotated away (and its file dropped); rotated logs beyond `keep` go.
    #[test]
    fn what_is_reported_outlives_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let rotation = Rotation { max_bytes: 1000, keep: 2 };
        let mut log = AlertLog::open_rotating(&path, rotation).unwrap();
        let s = subject();
        let text = [finding(0x1000, "bb")];
        let g = groups(&text);
        log.append(&s.group(&g[0].0, &g[0].1, &g[0].2)).unwrap();
        let mut rotations = 0;
        for i in 0..20 {
            log.append(&s.event(EventKind::Attached, AlertSeverity::Info, format!("filler {i}")))
                .unwrap();
            rotations += u32::from(log.rotate_if_due().unwrap());
        }
        assert!(rotations > rotation.keep, "only {rotations} rotations");
        assert!(rotated_path(&path, 2).exists() && !rotated_path(&path, 3).exists());
        let all: String = [path.clone(), rotated_path(&path, 1), rotated_path(&path, 2)]
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect();
        assert!(!all.contains(&g[0].1), "the violation's line should be gone by now");
        let key = ("u".to_string(), "b".to_string());
        assert_eq!(AlertLog::reported(&path).unwrap()[&key][&g[0].0], g[0].1);
        // Read twice over the state (a crash between writing the state and
        // renaming the log): the same.
        let before = AlertLog::reported(&path).unwrap();
        write_state(&state_path(&path), &before).unwrap();
        assert_eq!(AlertLog::reported(&path).unwrap(), before);
        // The change reverted, then rotated away: gone from the state too.
        let mut rev = s.event(EventKind::Reverted, AlertSeverity::Info, "gone".into());
        rev.key = g[0].0.clone();
        log.append(&rev).unwrap();
        log.rotate().unwrap();
        assert!(AlertLog::reported(&path).unwrap().get(&key).is_none_or(HashMap::is_empty));
        // A state file that is not one is refused, by name.
        std::fs::write(state_path(&path), "{").unwrap();
        let e = error_chain(&AlertLog::reported(&path).unwrap_err());
        assert!(e.contains("alerts.jsonl.state") && e.contains("move it away"), "{e}");
    }

    /// A new boot ends what was reported of the domain's earlier boots, in
    /// the state file too; other domains' groups stay.
    #[test]
    fn a_new_boot_drops_the_earlier_boots_from_the_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let mut log = AlertLog::open(&path).unwrap();
        let text = [finding(0x1000, "bb")];
        let g = groups(&text);
        let web = |boot: &str| Subject { boot: boot.into(), ..subject() };
        let db = Subject { domain: "db".into(), uuid: "v".into(), ..subject() };
        for s in [web("b1"), db.clone()] {
            log.append(&s.event(EventKind::NewBoot, AlertSeverity::Info, "first sight".into()))
                .unwrap();
            log.append(&s.group(&g[0].0, &g[0].1, &g[0].2)).unwrap();
        }
        let key = |uuid: &str, boot: &str| (uuid.to_string(), boot.to_string());
        let before = AlertLog::reported(&path).unwrap();
        assert_eq!(before[&key("u", "b1")].len(), 1);
        assert_eq!(before[&key("v", "b")].len(), 1);
        log.append(&web("b2").event(EventKind::NewBoot, AlertSeverity::Info, "rebooted".into()))
            .unwrap();
        log.rotate().unwrap();
        let after = AlertLog::reported(&path).unwrap();
        assert!(!after.contains_key(&key("u", "b1")), "{after:?}");
        assert_eq!(after[&key("v", "b")][&g[0].0], g[0].1);
        let state = std::fs::read_to_string(state_path(&path)).unwrap();
        assert!(!state.contains("\"b1\""), "{state}");
    }

    #[test]
    fn accept_audit_fields_are_written_only_when_present() {
        let plain = serde_json::to_value(subject().event(
            EventKind::Attached,
            AlertSeverity::Info,
            "x".into(),
        ))
        .unwrap();
        assert!(plain.get("by").is_none() && plain.get("diff_digest").is_none(), "{plain}");
        let alice = Operator { uid: 1001, gid: 1001, user: Some("alice".into()), pid: Some(4242) };
        assert_eq!(alice.to_string(), "alice (uid 1001, pid 4242)");
        let mut a = subject().event(EventKind::Accepted, AlertSeverity::Warning, "accepted".into());
        a.by = Some(alice);
        a.diff_digest = Some("ab".repeat(32));
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(
            v["by"],
            serde_json::json!({ "uid": 1001, "gid": 1001, "user": "alice", "pid": 4242 })
        );
        assert_eq!(v["diff_digest"], "ab".repeat(32));
        assert_eq!(serde_json::from_value::<Alert>(v).unwrap(), a, "read back as written");
        // A uid without a name is said so, as null, not left out.
        let nameless = Operator { uid: 1002, gid: 1002, user: None, pid: None };
        assert_eq!(serde_json::to_value(&nameless).unwrap()["user"], serde_json::Value::Null);
        assert_eq!(nameless.to_string(), "uid 1002 (no user name)");
    }

    #[test]
    fn schema_fields_are_stable() {
        let f = [finding(0xffff_ffff_8100_0000, "bb")];
        let g = groups(&f);
        let a = subject().group(&g[0].0, &g[0].1, &g[0].2);
        let v = serde_json::to_value(&a).unwrap();
        for k in [
            "schema",
            "time",
            "host",
            "event",
            "severity",
            "domain",
            "uuid",
            "boot",
            "region",
            "kind",
            "gva",
            "gpa",
            "pages",
            "technique",
            "before",
            "after",
            "key",
            "digest",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["event"], "violation");
        assert_eq!(v["gva"], "0xffffffff81000000");
        assert_eq!(v["technique"], "T1014");
    }
}
