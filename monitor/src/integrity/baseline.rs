//! The baseline file: what a guest kernel looked like when it was trusted.
//!
//! JSON, versioned (`format` and `version`), written atomically. It holds the
//! domain's name and UUID, how the kernel was identified, every vCPU's
//! control and descriptor-table registers, the kernel image mapping (runs of
//! pages with their guest-physical addresses and permissions), and for each
//! region its pages (address, mapping, permissions, BLAKE3 value) and root.
//! A file read back is validated before use: a baseline is input too.

use std::io::Write;
use std::path::Path;

use super::tree::{self, PageValue};
use super::{AddressSpace, Identification, RegionKind, RegionLayout};
use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_BYTES, PAGE_SIZE};
use crate::memory::{GuestMemory, MemoryError};
use crate::x86::VcpuRegisters;
use crate::x86::{Mapping, Perms};

pub const FORMAT: &str = "vigil-baseline";
pub const VERSION: u32 = 1;
/// Pages hashed per batched read.
const READ_BATCH: usize = 256;
/// Largest baseline file accepted.
const MAX_FILE: u64 = 256 << 20;
/// Most pages a region may hold (4 GiB of pages).
const MAX_REGION_PAGES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DomainId {
    pub name: String,
    pub uuid: String,
}

/// A run of consecutive pages mapped to consecutive guest-physical pages with
/// the same permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MappingRun {
    pub gva: GuestVirtAddr,
    pub gpa: GuestPhysAddr,
    pub pages: u64,
    pub perms: Perms,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PageRecord {
    pub gva: GuestVirtAddr,
    pub gpa: GuestPhysAddr,
    pub perms: Perms,
    #[serde(with = "hex32")]
    pub value: PageValue,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionRecord {
    pub name: String,
    pub kind: RegionKind,
    /// Bytes covered: pages times 4096.
    pub bytes: u64,
    /// BLAKE3 of the region's bytes, pages concatenated in order.
    #[serde(with = "hex32")]
    pub root: [u8; 32],
    pub pages: Vec<PageRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Baseline {
    pub format: String,
    pub version: u32,
    /// RFC 3339, UTC.
    pub created: String,
    pub domain: DomainId,
    /// The memory source the baseline was read through.
    pub source: String,
    pub kernel: Identification,
    pub registers: Vec<VcpuRegisters>,
    pub image_mapping: Vec<MappingRun>,
    /// Executable kernel memory outside the image when the baseline was taken.
    #[serde(default)]
    pub exec_outside_image: Vec<MappingRun>,
    pub regions: Vec<RegionRecord>,
    /// The hypervisor's run of the guest the baseline was taken in (absent
    /// in baselines of earlier versions, and of dumps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Run>,
    /// The pages compared with a reference the guest cannot forge (the
    /// vendor's image of its kernel) when the baseline was taken; absent in
    /// baselines of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceCheck>,
    /// The hooks of the guest kernel when the baseline was taken, to show
    /// those added since; absent when no
    /// profile matched, and in baselines of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Vec<HookRecord>>,
}

/// A hook of the guest kernel as a baseline keeps it and a diff compares it
/// (the kernel model fills it in): what it is and whose code it runs, not
/// where its record lies (records move; a hook whose owners and hooked
/// functions stay the same is the same hook).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct HookRecord {
    pub mechanism: String,
    /// What it hooks, in words (`crate::linux::hooks::Hook::hooked_text`).
    pub hooked: String,
    /// Each callback: `role owner`.
    pub callbacks: Vec<String>,
    pub redirects: bool,
}

impl std::fmt::Display for HookRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}{}: {}: {}",
            self.mechanism,
            if self.redirects { " (can redirect)" } else { "" },
            self.hooked,
            self.callbacks.join(", ")
        )
    }
}

/// Whether a baseline's pages matched a reference when it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReferenceState {
    /// Every compared byte is the reference's, or a form the reference
    /// allows at that place.
    Verified,
    /// Some bytes are neither: see the mismatches.
    Mismatch,
    /// No reference to compare with, or it could not be read: the baseline
    /// is trusted on first use.
    Unavailable,
}

impl ReferenceState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReferenceState::Verified => "verified",
            ReferenceState::Mismatch => "mismatch",
            ReferenceState::Unavailable => "unavailable",
        }
    }
}

/// The outcome of comparing a baseline's pages with a reference.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReferenceCheck {
    pub state: ReferenceState,
    /// What was compared, with what, and what was not (or why nothing was).
    pub detail: String,
    /// One critical finding per run of bytes that is no allowed form.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatches: Vec<super::Finding>,
}

impl ReferenceCheck {
    pub fn unavailable(why: impl Into<String>) -> Self {
        ReferenceCheck {
            state: ReferenceState::Unavailable,
            detail: why.into(),
            mismatches: Vec::new(),
        }
    }
}

/// One run of a guest as the hypervisor host knows it, never the guest: the
/// emulator process that runs it, told apart from any other by its start
/// time. A start, a restore or an incoming migration is a new run; a reset
/// of the guest is not (the same process resets it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Run {
    /// When the host booted, in seconds of the Unix epoch (to a second or
    /// two: worked out from two clocks).
    pub host_booted: u64,
    /// The emulator process.
    pub pid: i32,
    /// When it started, in clock ticks after the host booted.
    pub started: u64,
    /// Whether it was started to receive the guest's memory (QEMU's
    /// `-incoming`: a restore or an incoming migration) rather than to boot
    /// the guest from its firmware.
    #[serde(default)]
    pub incoming: bool,
    /// Clock ticks a second, for `started`.
    #[serde(default = "user_hz")]
    pub ticks_per_second: u64,
}

fn user_hz() -> u64 {
    100
}

impl Run {
    /// Whether `other` is the same process: the same pid started at the same
    /// tick, in the same host boot. The boot times are worked out from the
    /// wall clock, which may have been stepped since (NTP): they may differ
    /// by up to two minutes, and by less than half the time the process
    /// started after its boot. Two boots whose processes share pid and tick
    /// lie at least that far apart (the first boot ran that long).
    pub fn same_as(&self, other: &Run) -> bool {
        let after_boot = self.started / self.ticks_per_second.max(1);
        self.pid == other.pid
            && self.started == other.started
            && self.host_booted.abs_diff(other.host_booted) <= (after_boot / 2).min(120)
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "QEMU process {} (started at clock tick {} of the host boot at Unix time {})",
            self.pid, self.started, self.host_booted
        )
    }
}

/// Why a baseline could not be made, read or written.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("reading region {region} page {gva}")]
    Read {
        region: String,
        gva: GuestVirtAddr,
        #[source]
        source: MemoryError,
    },
    #[error("{path}: cannot read")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {size} bytes is larger than any baseline ({MAX_FILE} at most)")]
    TooLarge { path: String, size: u64 },
    #[error("{path}: not a vigil baseline")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::to_hex(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        super::from_hex32(&s).ok_or_else(|| D::Error::custom(format!("not 64 hex digits: {s:?}")))
    }
}

pub fn to_hex(v: &[u8]) -> String {
    v.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Coalesces 4 KiB pages into runs.
pub fn mapping_runs(pages: &[Mapping]) -> Vec<MappingRun> {
    let mut runs: Vec<MappingRun> = Vec::new();
    for p in pages {
        if let Some(last) = runs.last_mut() {
            let off = last.pages * PAGE_SIZE;
            if last.perms == p.perms
                && last.gva.checked_add(off) == Some(p.gva)
                && last.gpa.checked_add(off) == Some(p.gpa)
            {
                last.pages += 1;
                continue;
            }
        }
        runs.push(MappingRun { gva: p.gva, gpa: p.gpa, pages: 1, perms: p.perms });
    }
    runs
}

/// Expands runs back into 4 KiB pages, refusing runs that overflow.
pub fn expand_runs(runs: &[MappingRun]) -> Option<Vec<Mapping>> {
    let total = runs.iter().try_fold(0u64, |n, r| n.checked_add(r.pages))?;
    if total > MAX_REGION_PAGES as u64 + 1 {
        return None;
    }
    let mut out = Vec::with_capacity(usize::try_from(total).ok()?);
    for r in runs {
        for i in 0..r.pages {
            let off = i.checked_mul(PAGE_SIZE)?;
            out.push(Mapping {
                gva: r.gva.checked_add(off)?,
                gpa: r.gpa.checked_add(off)?,
                size: PAGE_SIZE,
                perms: r.perms,
            });
            if out.len() > MAX_REGION_PAGES {
                return None;
            }
        }
    }
    Some(out)
}

/// Reads and hashes the pages of a region at the guest-physical addresses
/// given, returning each page's value. Pages are read in batches.
pub fn hash_pages<M: GuestMemory + ?Sized>(
    mem: &M,
    region: &str,
    pages: &[(GuestVirtAddr, GuestPhysAddr)],
) -> Result<Vec<PageValue>, BaselineError> {
    let indexed: Vec<(u64, GuestVirtAddr, GuestPhysAddr)> =
        pages.iter().zip(0u64..).map(|(&(gva, gpa), i)| (i, gva, gpa)).collect();
    hash_pages_at(mem, region, pages.len() as u64 * PAGE_SIZE, &indexed)
}

/// Like [`hash_pages`], for some pages of a region of `region_len` bytes:
/// each entry names its page index in the region.
pub fn hash_pages_at<M: GuestMemory + ?Sized>(
    mem: &M,
    region: &str,
    region_len: u64,
    pages: &[(u64, GuestVirtAddr, GuestPhysAddr)],
) -> Result<Vec<PageValue>, BaselineError> {
    hash_pages_keeping(mem, region, region_len, pages, &mut |_, _| {})
}

/// Like [`hash_pages_at`], handing each page's bytes to `keep` as well.
pub fn hash_pages_keeping<M: GuestMemory + ?Sized>(
    mem: &M,
    region: &str,
    region_len: u64,
    pages: &[(u64, GuestVirtAddr, GuestPhysAddr)],
    keep: &mut dyn FnMut(GuestVirtAddr, &[u8]),
) -> Result<Vec<PageValue>, BaselineError> {
    let mut values = Vec::with_capacity(pages.len());
    let mut bufs = vec![[0u8; PAGE_BYTES]; READ_BATCH.min(pages.len())];
    for batch in pages.chunks(READ_BATCH) {
        let mut reads: Vec<(GuestPhysAddr, &mut [u8])> =
            batch.iter().zip(bufs.iter_mut()).map(|(&(_, _, gpa), b)| (gpa, &mut b[..])).collect();
        if let Err(source) = mem.read_many(&mut reads) {
            // Find the page at fault for the message.
            let mut one = [0u8; PAGE_BYTES];
            let bad = batch
                .iter()
                .find(|(_, _, gpa)| mem.read(*gpa, &mut one).is_err())
                .unwrap_or(&batch[0]);
            return Err(BaselineError::Read { region: region.to_owned(), gva: bad.1, source });
        }
        for (&(index, gva, _), buf) in batch.iter().zip(&bufs) {
            keep(gva, buf);
            values.push(tree::page_value(index, buf, region_len));
        }
    }
    Ok(values)
}

impl Baseline {
    /// Host memory the baseline holds: its page records, mapping runs and
    /// hooks (the strings of a hook record counted whole).
    pub fn held_bytes(&self) -> u64 {
        use crate::memory::held;
        let regions: u64 =
            self.regions.iter().map(|r| held::vec(&r.pages) + held::string(&r.name) + 96).sum();
        let hooks: u64 = self.hooks.as_ref().map_or(0, |hs| {
            hs.iter()
                .map(|h| {
                    held::string(&h.mechanism)
                        + held::string(&h.hooked)
                        + h.callbacks.iter().map(|c| held::string(c) + 24).sum::<u64>()
                        + 96
                })
                .sum()
        });
        regions
            + held::vec(&self.registers)
            + held::vec(&self.image_mapping)
            + held::vec(&self.exec_outside_image)
            + hooks
    }

    /// Reads and hashes every region the kernel model found.
    pub fn build<M: GuestMemory + ?Sized>(
        mem: &M,
        domain: DomainId,
        kernel: Identification,
        registers: Vec<VcpuRegisters>,
        space: &dyn AddressSpace,
        regions: &[RegionLayout],
    ) -> Result<Self, BaselineError> {
        Self::build_keeping(mem, domain, kernel, registers, space, regions).map(|(b, _)| b)
    }

    /// Like [`Baseline::build`], keeping every page's original bytes too.
    pub fn build_keeping<M: GuestMemory + ?Sized>(
        mem: &M,
        domain: DomainId,
        kernel: Identification,
        registers: Vec<VcpuRegisters>,
        space: &dyn AddressSpace,
        regions: &[RegionLayout],
    ) -> Result<(Self, super::Originals), BaselineError> {
        let mut records = Vec::with_capacity(regions.len());
        let mut originals = super::Originals::default();
        for r in regions {
            let addrs: Vec<_> =
                r.pages.iter().zip(0u64..).map(|(p, i)| (i, p.gva, p.gpa)).collect();
            let bytes = r.pages.len() as u64 * PAGE_SIZE;
            let values = hash_pages_keeping(mem, &r.name, bytes, &addrs, &mut |gva, page| {
                originals.insert(gva.raw(), page);
            })?;
            let root = if values.is_empty() {
                *blake3::hash(&[]).as_bytes()
            } else {
                *tree::region_root(&values, bytes).expect("one value per page").as_bytes()
            };
            let pages = r
                .pages
                .iter()
                .zip(values)
                .map(|(p, value)| PageRecord { gva: p.gva, gpa: p.gpa, perms: p.perms, value })
                .collect();
            records.push(RegionRecord { name: r.name.clone(), kind: r.kind, bytes, root, pages });
        }
        let baseline = Self {
            format: FORMAT.into(),
            version: VERSION,
            created: now_rfc3339(),
            domain,
            source: mem.kind().into(),
            kernel,
            registers,
            image_mapping: mapping_runs(space.image_pages()),
            exec_outside_image: mapping_runs(&space.exec_outside_image()),
            regions: records,
            run: None,
            reference: None,
            hooks: None,
        };
        Ok((baseline, originals))
    }

    /// Keeps, of region `name`, the pages `keep` accepts, when they are the
    /// region's first pages (at least two): a page's value depends on its
    /// place in the region (and a lone page's is the root), so only a tail
    /// can be dropped without the pages themselves. Returns how many were
    /// dropped, or `None` (and changes nothing) when the kept pages are not
    /// such a head. (A baseline taken before regions were bounded by the
    /// kernel's layout is bounded so.)
    pub fn keep_head(&mut self, name: &str, keep: impl Fn(GuestVirtAddr) -> bool) -> Option<usize> {
        let r = self.regions.iter_mut().find(|r| r.name == name)?;
        let kept = r.pages.iter().take_while(|p| keep(p.gva)).count();
        if r.pages[kept..].iter().any(|p| keep(p.gva)) || (kept < 2 && kept < r.pages.len()) {
            return None;
        }
        let dropped = r.pages.len() - kept;
        if dropped > 0 {
            r.pages.truncate(kept);
            r.bytes = kept as u64 * PAGE_SIZE;
            let values: Vec<PageValue> = r.pages.iter().map(|p| p.value).collect();
            r.root = *tree::region_root(&values, r.bytes).expect("one value per page").as_bytes();
        }
        Some(dropped)
    }

    /// Writes the baseline atomically: a temporary file beside `path`,
    /// synced, then renamed over it.
    pub fn save(&self, path: &Path) -> Result<(), BaselineError> {
        let shown = path.display().to_string();
        let werr = |source| BaselineError::Write { path: shown.clone(), source };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let mut tmp = tempfile_in(dir).map_err(werr)?;
        let json = serde_json::to_vec_pretty(self).expect("a baseline always serialises");
        tmp.1
            .write_all(&json)
            .and_then(|()| tmp.1.write_all(b"\n"))
            .and_then(|()| tmp.1.sync_all())
            .map_err(werr)?;
        std::fs::rename(&tmp.0, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp.0);
            werr(e)
        })?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Reads and validates a baseline file.
    pub fn load(path: &Path) -> Result<Self, BaselineError> {
        let shown = path.display().to_string();
        let oerr = |source| BaselineError::Open { path: shown.clone(), source };
        let size = std::fs::metadata(path).map_err(oerr)?.len();
        if size > MAX_FILE {
            return Err(BaselineError::TooLarge { path: shown, size });
        }
        let text = std::fs::read(path).map_err(oerr)?;
        Self::from_json(&text).map_err(|e| match e {
            BaselineError::Parse { source, .. } => {
                BaselineError::Parse { path: shown.clone(), source }
            }
            BaselineError::Invalid { reason, .. } => {
                BaselineError::Invalid { path: shown.clone(), reason }
            }
            other => other,
        })
    }

    /// Parses and validates baseline JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, BaselineError> {
        let b: Self = serde_json::from_slice(bytes)
            .map_err(|source| BaselineError::Parse { path: String::new(), source })?;
        b.validate().map_err(|reason| BaselineError::Invalid { path: String::new(), reason })?;
        Ok(b)
    }

    fn validate(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format is {:?}, not {FORMAT:?}", self.format));
        }
        if self.version != VERSION {
            return Err(format!(
                "version {} is not supported (this vigil reads version {VERSION})",
                self.version
            ));
        }
        if self.regions.is_empty() {
            return Err("no regions".into());
        }
        expand_runs(&self.image_mapping).ok_or("image mapping runs overflow or are too large")?;
        expand_runs(&self.exec_outside_image).ok_or("executable runs overflow or are too large")?;
        for r in &self.regions {
            if r.pages.len() > MAX_REGION_PAGES {
                return Err(format!(
                    "region {} has {} pages, more than {MAX_REGION_PAGES}",
                    r.name,
                    r.pages.len()
                ));
            }
            if r.bytes != r.pages.len() as u64 * PAGE_SIZE {
                return Err(format!(
                    "region {} says {} bytes but has {} pages",
                    r.name,
                    r.bytes,
                    r.pages.len()
                ));
            }
            if r.pages.iter().any(|p| p.gva.page_offset() != 0 || p.gpa.page_offset() != 0) {
                return Err(format!(
                    "region {} has a page address that is not page-aligned",
                    r.name
                ));
            }
            if !r.pages.is_empty() {
                let values: Vec<PageValue> = r.pages.iter().map(|p| p.value).collect();
                let root = tree::region_root(&values, r.bytes)
                    .map_err(|e| format!("region {}: {e}", r.name))?;
                if root.as_bytes() != &r.root {
                    return Err(format!(
                        "region {}: page values do not merge into the recorded root (file damaged or edited)",
                        r.name
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn region(&self, name: &str) -> Option<&RegionRecord> {
        self.regions.iter().find(|r| r.name == name)
    }
}

fn tempfile_in(dir: &Path) -> std::io::Result<(std::path::PathBuf, std::fs::File)> {
    for attempt in 0..100u32 {
        let p = dir.join(format!(".vigil-baseline.{}.{attempt}.tmp", std::process::id()));
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary file name"))
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::type_complexity)]
pub(crate) mod tests {
    use super::*;
    use crate::integrity::PageSpec;
    use crate::memory::RawDump;

    /// A tiny fake guest: 4 text pages, 2 rodata pages, at known addresses.
    pub struct Fake {
        pub mem: RawDump,
        pub pages: Vec<Mapping>,
    }

    /// A source that only copies (as `process_vm_readv` and dumps do).
    pub struct Copying<'a>(pub &'a RawDump);

    impl GuestMemory for Copying<'_> {
        fn read(
            &self,
            start: GuestPhysAddr,
            buf: &mut [u8],
        ) -> Result<(), crate::memory::MemoryError> {
            self.0.read(start, buf)
        }
        fn layout(&self) -> &crate::memory::RamLayout {
            self.0.layout()
        }
        fn kind(&self) -> &'static str {
            "copying"
        }
    }

    pub const TEXT_VA: u64 = 0xffff_ffff_8100_0000;
    const RX: Perms = Perms { writable: false, user: false, executable: true };
    const RO: Perms = Perms { writable: false, user: false, executable: false };

    impl Fake {
        pub fn new() -> Self {
            let bytes: Vec<u8> =
                (0..16 * 4096u32).map(|i| (i.wrapping_mul(7) >> 3) as u8).collect();
            let mut pages = Vec::new();
            for i in 0..6u64 {
                let perms = if i < 4 { RX } else { RO };
                pages.push(Mapping {
                    gva: GuestVirtAddr(TEXT_VA + i * 4096),
                    gpa: GuestPhysAddr(0x2000 + i * 4096),
                    size: 4096,
                    perms,
                });
            }
            Self { mem: RawDump::from_bytes(bytes), pages }
        }

        pub fn regions(&self) -> Vec<RegionLayout> {
            let spec = |m: &Mapping| PageSpec { gva: m.gva, gpa: m.gpa, perms: m.perms };
            vec![
                RegionLayout {
                    name: "kernel-text".into(),
                    kind: RegionKind::Code,
                    pages: self.pages[..4].iter().map(spec).collect(),
                },
                RegionLayout {
                    name: "kernel-rodata".into(),
                    kind: RegionKind::ReadOnlyData,
                    pages: self.pages[4..].iter().map(spec).collect(),
                },
            ]
        }

        pub fn identification(&self) -> Identification {
            Identification {
                method: "test".into(),
                vcpu: 0,
                cr3: 0x1000,
                paging: "4-level".into(),
                image_base: self.pages[0].gva,
                image_base_gpa: self.pages[0].gpa,
                text_pages: 4,
                rodata_pages: 2,
                bounds: String::new(),
            }
        }

        pub fn registers() -> Vec<VcpuRegisters> {
            vec![VcpuRegisters {
                index: 0,
                cr0: 0x8005_0033,
                cr3: 0x1000,
                cr4: 0x0075_1eb0,
                efer: 0xd01,
                idtr_base: 0xffff_fe00_0000_0000,
                idtr_limit: 0xfff,
                gdtr_base: 0xffff_fe00_0000_1000,
                gdtr_limit: 0x7f,
            }]
        }

        pub fn baseline(&self) -> Baseline {
            let domain = DomainId {
                name: "fake".into(),
                uuid: "00000000-0000-0000-0000-000000000001".into(),
            };
            Baseline::build(
                &self.mem,
                domain,
                self.identification(),
                Self::registers(),
                self,
                &self.regions(),
            )
            .unwrap()
        }
    }

    impl AddressSpace for Fake {
        fn image_pages(&self) -> &[Mapping] {
            &self.pages
        }
        fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, Perms)> {
            self.pages.iter().find(|m| m.gva == gva).map(|m| (m.gpa, m.perms))
        }
    }

    #[test]
    fn region_roots_are_plain_blake3_of_the_pages() {
        let f = Fake::new();
        let b = f.baseline();
        let mut text = vec![0u8; 4 * 4096];
        f.mem.read(GuestPhysAddr(0x2000), &mut text).unwrap();
        assert_eq!(b.region("kernel-text").unwrap().root, *blake3::hash(&text).as_bytes());
        assert_eq!(b.image_mapping.len(), 2, "two runs: text and rodata");
    }

    #[test]
    fn save_load_round_trip() {
        let b = Fake::new().baseline();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.json");
        b.save(&path).unwrap();
        assert_eq!(Baseline::load(&path).unwrap(), b);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left behind"
        );
    }

    #[test]
    fn malformed_or_edited_baselines_are_refused() {
        let b = Fake::new().baseline();
        let good = serde_json::to_value(&b).unwrap();
        let edits: Vec<(&str, Box<dyn Fn(&mut serde_json::Value)>)> = vec![
            ("format", Box::new(|v| v["format"] = "other".into())),
            ("version", Box::new(|v| v["version"] = 99.into())),
            (
                "page value",
                Box::new(|v| v["regions"][0]["pages"][1]["value"] = "00".repeat(32).into()),
            ),
            ("root", Box::new(|v| v["regions"][0]["root"] = "11".repeat(32).into())),
            ("bytes", Box::new(|v| v["regions"][0]["bytes"] = 4096.into())),
            ("short hash", Box::new(|v| v["regions"][0]["root"] = "abc".into())),
            ("perms", Box::new(|v| v["regions"][0]["pages"][0]["perms"] = "rwz".into())),
            ("gva", Box::new(|v| v["regions"][0]["pages"][0]["gva"] = "0x1001".into())),
            ("gpa not hex", Box::new(|v| v["regions"][0]["pages"][0]["gpa"] = 4096.into())),
            ("no regions", Box::new(|v| v["regions"] = serde_json::json!([]))),
            ("huge run", Box::new(|v| v["image_mapping"][0]["pages"] = u64::MAX.into())),
        ];
        for (what, edit) in edits {
            let mut v = good.clone();
            edit(&mut v);
            let bytes = serde_json::to_vec(&v).unwrap();
            assert!(Baseline::from_json(&bytes).is_err(), "accepted a baseline with a bad {what}");
        }
        assert!(Baseline::from_json(b"").is_err());
        assert!(Baseline::from_json(b"{\"format\":").is_err());
        let dir = tempfile::tempdir().unwrap();
        let err = Baseline::load(&dir.path().join("missing.json")).unwrap_err().to_string();
        assert!(err.contains("missing.json"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn truncated_or_mutated_json_never_panics(cut in 0usize..4000, pos in 0usize..4000, byte: u8) {
            let json = serde_json::to_vec(&Fake::new().baseline()).unwrap();
            let _ = Baseline::from_json(&json[..cut.min(json.len())]);
            let mut m = json.clone();
            let i = pos % m.len();
            m[i] = byte;
            let _ = Baseline::from_json(&m);
        }
    }
}
