//! Evidence saved when a violation is first reported (`[evidence]` in the
//! configuration): the diff as JSON and as an HTML page, and the guest's
//! memory as an ELF core written by libvirt, in one directory per
//! violation:
//!
//! ```text
//! <state_dir>/evidence/<uuid>/<20261130T181200Z>/
//!     diff.json      the `vigil diff` of the guest just after the alert
//!     diff.html      the same, as a page for a ticket
//!     memory.core    virsh dump --memory-only (absent when over a limit)
//!     manifest.json  what was saved, with BLAKE3 of each file, and what was not and why
//! ```
//!
//! The manifest is written last, so a bundle without one is incomplete.
//! Bundles hold guest memory (secrets included): directories are 0700 and
//! files 0600. Retention keeps each domain's newest `keep` bundles and the
//! whole directory under `max_total`, removing the oldest bundles first.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::config::EvidenceSettings;
use crate::libvirt::error_chain;
use crate::linux::profile::Profile;
use crate::watch::Watched;

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "vigil-evidence";
pub const VERSION: u32 = 1;
/// Bundles listed at most, across all domains (a bound on a directory
/// someone else may have filled).
const MAX_BUNDLES: usize = 100_000;

/// One saved file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedFile {
    pub name: String,
    pub bytes: u64,
    pub blake3: String,
}

/// Something not saved, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Skipped {
    pub what: String,
    pub reason: String,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub domain: String,
    pub uuid: String,
    pub boot: String,
    /// When saving started and ended (RFC 3339, UTC).
    pub started: String,
    pub finished: String,
    /// The alert keys this evidence is for.
    pub alerts: Vec<String>,
    pub files: Vec<SavedFile>,
    pub skipped: Vec<Skipped>,
    /// Bundles removed to keep within `keep` and `max_total`.
    pub removed: Vec<String>,
}

/// Where the bundle of a violation seen now goes: a new directory under
/// `<state_dir>/evidence/<uuid>/`, named by the UTC time (made unique).
pub fn bundle_dir(state_dir: &Path, uuid: &str) -> PathBuf {
    let now = time::OffsetDateTime::now_utc();
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    );
    let parent = state_dir.join("evidence").join(uuid);
    let mut dir = parent.join(&stamp);
    let mut n = 1;
    while dir.exists() {
        dir = parent.join(format!("{stamp}-{n}"));
        n += 1;
    }
    dir
}

/// A bundle on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub path: PathBuf,
    pub uuid: String,
    /// The directory's name: its time, sortable.
    pub stamp: String,
    pub bytes: u64,
}

/// Every bundle under `root` (`<state_dir>/evidence`), oldest first.
pub fn bundles(root: &Path) -> io::Result<Vec<Bundle>> {
    let mut out = Vec::new();
    let domains = match fs::read_dir(root) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for d in domains {
        let d = d?;
        if !d.file_type()?.is_dir() {
            continue;
        }
        let uuid = d.file_name().to_string_lossy().into_owned();
        for b in fs::read_dir(d.path())? {
            let b = b?;
            if !b.file_type()?.is_dir() {
                continue;
            }
            let mut bytes = 0u64;
            for f in fs::read_dir(b.path())? {
                let f = f?;
                if f.file_type()?.is_file() {
                    bytes = bytes.saturating_add(f.metadata()?.len());
                }
            }
            out.push(Bundle {
                path: b.path(),
                uuid: uuid.clone(),
                stamp: b.file_name().to_string_lossy().into_owned(),
                bytes,
            });
            if out.len() >= MAX_BUNDLES {
                return Err(io::Error::other(format!(
                    "more than {MAX_BUNDLES} bundles under {}",
                    root.display()
                )));
            }
        }
    }
    out.sort_by(|a, b| (&a.stamp, &a.uuid).cmp(&(&b.stamp, &b.uuid)));
    Ok(out)
}

/// Removes bundles, oldest first, so that each domain keeps at most `keep`
/// and the total stays at most `max_total - room` (room for a file about to
/// be written). `current` is never removed. Returns what was removed and
/// the total left.
pub fn prune(
    root: &Path,
    keep: usize,
    max_total: u64,
    room: u64,
    current: &Path,
) -> io::Result<(Vec<PathBuf>, u64)> {
    let all = bundles(root)?;
    let mut removed = Vec::new();
    let mut doomed = vec![false; all.len()];
    // Per domain: all but the newest `keep`.
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, b) in all.iter().enumerate().rev() {
        let n = seen.entry(b.uuid.as_str()).or_default();
        *n += 1;
        if *n > keep && b.path != current {
            doomed[i] = true;
        }
    }
    let mut total: u64 = all.iter().zip(&doomed).filter(|&(_, &d)| !d).map(|(b, _)| b.bytes).sum();
    let limit = max_total.saturating_sub(room);
    for (i, b) in all.iter().enumerate() {
        if total <= limit {
            break;
        }
        if !doomed[i] && b.path != current {
            doomed[i] = true;
            total -= b.bytes;
        }
    }
    for (b, d) in all.iter().zip(doomed) {
        if d {
            fs::remove_dir_all(&b.path)?;
            removed.push(b.path.clone());
        }
    }
    Ok((removed, total))
}

/// BLAKE3 of a file, streamed.
fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut f = fs::File::open(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((n, h.finalize().to_hex().to_string()))
}

/// Writes `bytes` to `dir/name`, private to its owner.
fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, bytes)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, dir.join(name))
}

fn mkdir_private(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700))
}

/// What `save` did: the manifest (also on disk when it could be written)
/// and the bytes now under the evidence directory.
pub struct Outcome {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub total_bytes: u64,
    /// Why the bundle could not be written at all, if so.
    pub failed: Option<String>,
}

/// Saves the evidence of a violation of `w` into `dir` (from
/// [`bundle_dir`]), within the limits of `cfg`.
pub fn save(
    w: &mut Watched,
    profiles: &[Profile],
    cfg: &EvidenceSettings,
    dir: &Path,
    alerts: Vec<String>,
) -> Outcome {
    let root = dir.parent().and_then(Path::parent).unwrap_or(dir).to_path_buf();
    let mut m = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        domain: w.dom.name().to_owned(),
        uuid: w.dom.uuid().to_owned(),
        boot: w.boot(),
        started: crate::integrity::baseline::now_rfc3339(),
        finished: String::new(),
        alerts,
        files: Vec::new(),
        skipped: Vec::new(),
        removed: Vec::new(),
    };
    let fail = |m: Manifest, why: String| Outcome {
        dir: dir.to_path_buf(),
        manifest: m,
        total_bytes: 0,
        failed: Some(why),
    };
    if let Err(e) = mkdir_private(&root).and_then(|()| mkdir_private(dir)) {
        return fail(m, format!("cannot create {}: {e}", dir.display()));
    }
    let file = |m: &mut Manifest, name: &str| match hash_file(&dir.join(name)) {
        Ok((bytes, blake3)) => m.files.push(SavedFile { name: name.into(), bytes, blake3 }),
        Err(e) => m.skipped.push(Skipped { what: name.into(), reason: e.to_string() }),
    };
    match w.diff(profiles) {
        Ok(d) => {
            let json = serde_json::to_vec_pretty(&d).expect("diffs serialise");
            let html = crate::linux::diff::render_html(&d);
            for (name, bytes) in [("diff.json", json), ("diff.html", html.into_bytes())] {
                match write_private(dir, name, &bytes) {
                    Ok(()) => file(&mut m, name),
                    Err(e) => m.skipped.push(Skipped { what: name.into(), reason: e.to_string() }),
                }
            }
        }
        Err(e) => m.skipped.push(Skipped {
            what: "diff.json, diff.html".into(),
            reason: format!("the diff failed: {}", e.message()),
        }),
    }
    let written: u64 = m.files.iter().map(|f| f.bytes).sum();
    if let Some(reason) = dump_memory(w, cfg, dir, &root, written, &mut m.removed) {
        m.skipped.push(Skipped { what: "memory.core".into(), reason });
    } else {
        file(&mut m, "memory.core");
    }
    // Retention, now that this bundle's size is known.
    let total = match prune(&root, cfg.keep, cfg.max_total, 0, dir) {
        Ok((gone, total)) => {
            m.removed.extend(gone.iter().map(|p| p.display().to_string()));
            total
        }
        Err(e) => {
            m.skipped.push(Skipped {
                what: "retention".into(),
                reason: format!("listing or removing old bundles: {e}"),
            });
            0
        }
    };
    m.finished = crate::integrity::baseline::now_rfc3339();
    let json = serde_json::to_vec_pretty(&m).expect("manifests serialise");
    match write_private(dir, MANIFEST, &json) {
        Ok(()) => Outcome { dir: dir.to_path_buf(), manifest: m, total_bytes: total, failed: None },
        Err(e) => fail(m, format!("cannot write {}: {e}", dir.join(MANIFEST).display())),
    }
}

/// Why a dump of `size` bytes may not be written, with `used` bytes under
/// the evidence directory after making room (when known).
fn over_limit(cfg: &EvidenceSettings, size: u64, used: Option<u64>) -> Option<String> {
    if size > cfg.max_dump {
        return Some(format!(
            "the guest has {} MiB of memory, more than evidence.max_dump ({} MiB)",
            size >> 20,
            cfg.max_dump >> 20
        ));
    }
    let used = used?;
    (used.saturating_add(size) > cfg.max_total).then(|| {
        format!(
            "a {} MiB dump would take the evidence directory over evidence.max_total ({} MiB, of which {} MiB are kept bundles and this one's diff)",
            size >> 20,
            cfg.max_total >> 20,
            used >> 20
        )
    })
}

/// Dumps the guest's memory into `dir/memory.core` when the limits allow;
/// otherwise, or when libvirt fails, the reason.
fn dump_memory(
    w: &Watched,
    cfg: &EvidenceSettings,
    dir: &Path,
    root: &Path,
    written: u64,
    removed: &mut Vec<String>,
) -> Option<String> {
    if !cfg.memory_dump {
        return Some("evidence.memory_dump is off".into());
    }
    let size = match w.dom.memory_bytes() {
        Ok(s) => s,
        Err(e) => {
            return Some(format!(
                "libvirt did not say the guest's memory size: {}",
                error_chain(&e)
            ));
        }
    };
    if let Some(why) = over_limit(cfg, size, None) {
        return Some(why);
    }
    // Make room: older bundles go first; this one's diff stays.
    match prune(root, cfg.keep, cfg.max_total, size, dir) {
        Ok((gone, total)) => {
            removed.extend(gone.iter().map(|p| p.display().to_string()));
            if let Some(why) = over_limit(cfg, size, Some(total.max(written))) {
                return Some(why);
            }
        }
        Err(e) => return Some(format!("making room under {}: {e}", root.display())),
    }
    let path = dir.join("memory.core");
    if let Err(e) = w.dom.dump_memory(&path) {
        let _ = fs::remove_file(&path);
        return Some(format!("libvirt could not dump the memory: {}", error_chain(&e)));
    }
    make_private(&path).err()
}

/// Leaves a file libvirt wrote readable by its owner only. libvirt writes the
/// dump as itself (root), so the daemon, running as user vigil, may not chmod
/// it; a file already closed to group and others is private as it is.
fn make_private(path: &Path) -> Result<(), String> {
    let mode = fs::metadata(path)
        .map_err(|e| format!("the dump was written but cannot be inspected: {e}"))?
        .permissions()
        .mode();
    if mode & 0o077 == 0 {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|e| {
        format!("the dump was written (mode {:o}) but cannot be made private: {e}", mode & 0o7777)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_open_to_others_is_closed_and_a_private_one_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open.core");
        fs::write(&open, b"x").unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o644)).unwrap();
        make_private(&open).unwrap();
        assert_eq!(fs::metadata(&open).unwrap().permissions().mode() & 0o777, 0o600);
        let private = dir.path().join("private.core");
        fs::write(&private, b"x").unwrap();
        fs::set_permissions(&private, fs::Permissions::from_mode(0o400)).unwrap();
        make_private(&private).unwrap();
        assert_eq!(
            fs::metadata(&private).unwrap().permissions().mode() & 0o777,
            0o400,
            "left as it was"
        );
        let err = make_private(&dir.path().join("missing")).unwrap_err();
        assert!(err.contains("cannot be inspected"), "{err}");
    }

    fn bundle(root: &Path, uuid: &str, stamp: &str, bytes: usize) -> PathBuf {
        let dir = root.join(uuid).join(stamp);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("memory.core"), vec![0u8; bytes]).unwrap();
        dir
    }

    #[test]
    fn retention_keeps_the_newest_per_domain_and_the_total_under_the_cap() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        let a1 = bundle(root, "a", "20261130T100000Z", 100);
        let a2 = bundle(root, "a", "20261130T110000Z", 100);
        let a3 = bundle(root, "a", "20261130T120000Z", 100);
        let b1 = bundle(root, "b", "20261130T103000Z", 100);
        // A stray file beside the bundles is not a bundle.
        fs::write(root.join("a").join("note"), b"x").unwrap();
        assert_eq!(bundles(root).unwrap().len(), 4);

        // Keep 2 per domain: a1 goes; the total (300) is under the cap.
        let (gone, total) = prune(root, 2, 1000, 0, &a3).unwrap();
        assert_eq!((gone, total), (vec![a1.clone()], 300));
        assert!(!a1.exists() && a2.exists() && b1.exists());

        // Room for 150 more under a cap of 400: the oldest (b1), then a2, go;
        // the current bundle never does.
        let (gone, total) = prune(root, 5, 400, 150, &a2).unwrap();
        assert_eq!((gone, total), (vec![b1.clone()], 200));
        let (gone, total) = prune(root, 5, 100, 0, &a2).unwrap();
        assert_eq!((gone, total), (vec![a3.clone()], 100));
        let (gone, total) = prune(root, 5, 10, 0, &a2).unwrap();
        assert_eq!((gone, total), (vec![], 100), "the current bundle stays");
        assert!(a2.exists());
    }

    #[test]
    fn dumps_over_the_limits_are_refused_saying_which() {
        let cfg = EvidenceSettings {
            memory_dump: true,
            max_dump: 512 << 20,
            max_total: 1 << 30,
            keep: 3,
            min_interval: std::time::Duration::from_secs(1),
        };
        assert_eq!(over_limit(&cfg, 384 << 20, None), None);
        assert_eq!(over_limit(&cfg, 384 << 20, Some(600 << 20)), None);
        let why = over_limit(&cfg, 1 << 30, None).unwrap();
        assert!(why.contains("1024 MiB") && why.contains("evidence.max_dump (512 MiB)"), "{why}");
        let why = over_limit(&cfg, 384 << 20, Some(700 << 20)).unwrap();
        assert!(why.contains("evidence.max_total (1024 MiB") && why.contains("700 MiB"), "{why}");
    }

    #[test]
    fn an_empty_or_missing_directory_has_no_bundles() {
        let t = tempfile::tempdir().unwrap();
        assert!(bundles(&t.path().join("nothing")).unwrap().is_empty());
        assert!(bundles(t.path()).unwrap().is_empty());
        let d = bundle_dir(t.path(), "u");
        assert!(d.starts_with(t.path().join("evidence/u")));
        let name = d.file_name().unwrap().to_str().unwrap();
        assert!(name.len() == 16 && name.ends_with('Z') && name.as_bytes()[8] == b'T', "{name}");
        fs::create_dir_all(&d).unwrap();
        assert_ne!(bundle_dir(t.path(), "u"), d, "a second bundle in the same second");
    }

    #[test]
    fn private_files_and_directories() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("x/y");
        mkdir_private(&d).unwrap();
        write_private(&d, "f", b"secret").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&d), mode(&d.join("f"))), (0o700, 0o600));
        assert_eq!(
            hash_file(&d.join("f")).unwrap().1,
            blake3::hash(b"secret").to_hex().to_string()
        );
    }
}
