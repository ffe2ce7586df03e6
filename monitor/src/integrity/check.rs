//! Comparing a fresh reading of a guest with its baseline.
//!
//! Every difference becomes a [`Finding`] localised to a page (or, for
//! registers, to a vCPU): content changes, pages remapped to other physical
//! memory or unmapped, permission changes (loosening is a violation,
//! tightening only information, as a running kernel does it), and control or
//! descriptor-table register changes.

use std::collections::HashSet;

use super::baseline::{Baseline, BaselineError, expand_runs, hash_pages_at, to_hex};
use super::{AddressSpace, tree};
use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_BYTES, PAGE_SIZE};
use crate::memory::GuestMemory;
use crate::x86::Perms;
use crate::x86::VcpuRegisters;

use crate::x86::{CR0_WP, CR4_SMAP, CR4_SMEP, EFER_NXE};

/// Region name for image pages that belong to no hashed region.
pub const IMAGE_REGION: &str = "kernel-image";
/// Region name for register findings.
pub const REGISTER_REGION: &str = "registers";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FindingKind {
    Content,
    Remap,
    Permission,
    Register,
    /// A pointer in a kernel table (syscall table, IDT gate) that points
    /// somewhere the kernel did not put it.
    Pointer,
    /// Executable kernel memory that belongs to nothing the kernel lists (a
    /// hidden module).
    Unlisted,
    /// Bytes that differ from the vendor's image of the kernel in a way the
    /// kernel never writes, found when the baseline was taken.
    Reference,
    /// A callback the kernel runs at its functions or traps for a module or
    /// for code nowhere known (an ftrace ops, a kprobe, a die notifier).
    Hook,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Violation,
    Info,
}

/// One difference from the baseline.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    pub region: String,
    pub kind: FindingKind,
    pub severity: Severity,
    /// The page's virtual address; `0x0` for register findings.
    pub gva: GuestVirtAddr,
    /// The page's guest-physical address now (or in the baseline, if it is no
    /// longer mapped); `0x0` for register findings.
    pub gpa: GuestPhysAddr,
    /// Index of the page in its region.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub page: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub register: Option<String>,
    pub detail: String,
    /// Baseline value: page hash, mapping, permissions or register value.
    pub before: String,
    /// Current value, in the same form.
    pub after: String,
    /// Where `gva` lies, by symbol, when a guest profile matched
    /// (`symbol+0xoff (kernel text)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
    /// For an entry of a pointer table (syscall table, IDT): which entry,
    /// and the target it should have and has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryRef>,
}

/// An entry of a kernel pointer table that points elsewhere than it should.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EntryRef {
    pub table: String,
    pub index: u64,
    /// Where the entry should point, and the symbol there.
    #[serde(with = "crate::addr::hex_addr")]
    pub expected: u64,
    pub expected_symbol: String,
    /// Where it points, and what lies there.
    #[serde(with = "crate::addr::hex_addr")]
    pub found: u64,
    pub found_owner: String,
}

/// How one region compares.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RegionStatus {
    pub name: String,
    pub pages: u64,
    /// Pages (or, for registers, vCPU registers) with a violation.
    pub changed_pages: u64,
    /// Findings that are information only (permissions tightened, ...).
    pub info: u64,
    /// No violation in this region.
    pub intact: bool,
    pub baseline_root: String,
    pub current_root: String,
}

/// The result of a check.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub domain: String,
    pub uuid: String,
    pub baseline_created: String,
    pub checked: String,
    pub source: String,
    pub intact: bool,
    pub violations: Vec<Finding>,
    pub info: Vec<Finding>,
    pub regions: Vec<RegionStatus>,
    pub scope: Scope,
    /// Bytes of guest memory read and hashed.
    pub bytes_verified: u64,
}

impl Report {
    /// Names the place of every finding that has an address, with `locate`
    /// (a guest profile's symbols).
    pub fn symbolize(&mut self, locate: impl Fn(u64) -> Option<String>) {
        for f in self.violations.iter_mut().chain(self.info.iter_mut()) {
            if f.symbol.is_none() && f.gva.raw() != 0 {
                f.symbol = locate(f.gva.raw());
            }
        }
    }

    /// Says that region `name` was checked, creating its status (intact) if
    /// no finding did.
    pub fn cover(&mut self, name: &str) {
        if !self.regions.iter().any(|s| s.name == name) {
            self.regions.push(RegionStatus {
                name: name.into(),
                pages: 0,
                changed_pages: 0,
                info: 0,
                intact: true,
                baseline_root: String::new(),
                current_root: String::new(),
            });
        }
    }

    /// Adds findings made outside the page comparison (semantic checks by the
    /// kernel model), each under its region's status.
    pub fn add_findings(&mut self, findings: Vec<Finding>) {
        for f in findings {
            self.cover(&f.region);
            match f.severity {
                Severity::Violation => self.violations.push(f),
                Severity::Info => self.info.push(f),
            }
        }
        self.recount();
    }

    /// Takes out the violations `pick` chooses (to be judged again).
    pub fn take_violations(&mut self, pick: impl Fn(&Finding) -> bool) -> Vec<Finding> {
        let (taken, kept) = std::mem::take(&mut self.violations).into_iter().partition(|f| pick(f));
        self.violations = kept;
        self.recount();
        taken
    }

    /// Recomputes each region's status from the findings: changed pages (or
    /// entries) are the distinct places with a violation.
    fn recount(&mut self) {
        for status in &mut self.regions {
            let violated: HashSet<(u64, Option<u32>)> = self
                .violations
                .iter()
                .filter(|f| f.region == status.name)
                .map(|f| (f.gva.raw(), f.vcpu))
                .collect();
            status.changed_pages = violated.len() as u64;
            status.info = self.info.iter().filter(|f| f.region == status.name).count() as u64;
            status.intact = violated.is_empty();
        }
        self.intact = self.violations.is_empty();
    }
}

/// Why a check could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Read(#[from] BaselineError),
    /// The check's time ran out (`schedule.check_timeout`): stopped after
    /// `stage`, its findings so far not reported (a partial check would
    /// take what it did not reach for reverted).
    #[error("stopped after {stage}: the check ran past its {limit:?} (schedule.check_timeout)")]
    OverTime { stage: &'static str, limit: std::time::Duration },
}

/// When a check must stop, checked between its stages.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: std::time::Instant,
    /// The limit it was set from, for the error.
    pub limit: std::time::Duration,
}

thread_local! {
    /// When the examination running on this thread must stop (see
    /// [`Deadline::enter`]).
    static RUNNING: std::cell::Cell<Option<std::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// The deadline [`Deadline::enter`] made current; the one before comes
/// back when this drops.
pub struct Entered(Option<std::time::Instant>);

impl Drop for Entered {
    fn drop(&mut self) {
        RUNNING.with(|r| r.set(self.0));
    }
}

/// What a loop over guest data stopped by the deadline says.
pub const OUT_OF_TIME: &str = "stopped at the check's time limit (schedule.check_timeout)";

impl Deadline {
    /// Makes `deadline` the one that loops over guest data on this thread
    /// (list walks, the kallsyms search) stop at, until the guard drops:
    /// such a loop can run for seconds on forged data, and a check is only
    /// stopped between stages otherwise.
    pub fn enter(deadline: Option<Deadline>) -> Entered {
        Entered(RUNNING.with(|r| r.replace(deadline.map(|d| d.at))))
    }

    /// Whether a loop over guest data at step `n` is to stop: every 256th
    /// step asks whether the deadline entered on this thread has passed.
    /// A loop that stops returns an error saying [`OUT_OF_TIME`]; the
    /// stage after it then fails the check as over time, so nothing it
    /// read in part is judged.
    pub fn stops(n: usize) -> bool {
        n % 256 == 255 && Self::passed()
    }

    /// Whether the deadline entered on this thread has passed.
    pub fn passed() -> bool {
        RUNNING.with(|r| r.get()).is_some_and(|at| std::time::Instant::now() >= at)
    }

    /// From now, `limit` on.
    pub fn after(limit: std::time::Duration) -> Self {
        Deadline { at: std::time::Instant::now() + limit, limit }
    }

    /// `Err` once past the deadline, naming the stage just done.
    pub fn check(deadline: Option<Deadline>, stage: &'static str) -> Result<(), CheckError> {
        match deadline {
            Some(d) if std::time::Instant::now() >= d.at => {
                Err(CheckError::OverTime { stage, limit: d.limit })
            }
            _ => Ok(()),
        }
    }
}

impl Finding {
    /// A finding at `gva` (`gpa`), with nothing else said yet.
    pub fn new(
        region: &str,
        kind: FindingKind,
        severity: Severity,
        gva: GuestVirtAddr,
        gpa: GuestPhysAddr,
    ) -> Self {
        Finding {
            region: region.to_owned(),
            kind,
            severity,
            gva,
            gpa,
            page: None,
            vcpu: None,
            register: None,
            detail: String::new(),
            before: String::new(),
            after: String::new(),
            symbol: None,
            entry: None,
        }
    }

    /// The same finding, with its sentence and evidence.
    pub fn saying(mut self, detail: String, before: String, after: String) -> Self {
        self.detail = detail;
        self.before = before;
        self.after = after;
        self
    }
}

fn finding(
    region: &str,
    kind: FindingKind,
    severity: Severity,
    gva: GuestVirtAddr,
    gpa: GuestPhysAddr,
) -> Finding {
    Finding::new(region, kind, severity, gva, gpa)
}

fn mapping_text(gpa: GuestPhysAddr, perms: Perms) -> String {
    format!("{gpa} {}", perms.as_text())
}

/// How much of the baseline a check covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every region, the whole image mapping and the registers.
    Full,
    /// The small structures attackers go for first and that are cheap to
    /// check often: descriptor tables and control registers.
    Hot,
}

impl Scope {
    fn covers(self, kind: super::RegionKind) -> bool {
        self == Scope::Full || kind == super::RegionKind::DescriptorTable
    }
}

/// Where a baseline's code sits in a fresh reading, page by page: how many
/// of its pages still map their baseline frames, and how many hold their
/// baseline bytes at their addresses, on whatever frames. Evidence for the
/// caller's judgement of a move, never a decision of the engine's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CodePlacement {
    /// Pages of code regions in the baseline.
    pub pages: u64,
    /// Of those, mapped to the very frames the baseline has.
    pub same_frames: u64,
    /// Of those, holding the baseline's bytes at their virtual addresses.
    pub same_bytes: u64,
}

/// Reads every code page of `baseline` where `space` maps its address now
/// and compares it with the baseline's value. A page that is not mapped or
/// cannot be read holds other bytes.
pub fn code_placement<M: GuestMemory + ?Sized>(
    baseline: &Baseline,
    mem: &M,
    space: &dyn AddressSpace,
) -> CodePlacement {
    let mut out = CodePlacement::default();
    let mut page = vec![0u8; PAGE_BYTES];
    for r in baseline.regions.iter().filter(|r| r.kind == super::RegionKind::Code) {
        for (i, p) in r.pages.iter().enumerate() {
            out.pages += 1;
            let Some((gpa, _)) = space.translate(p.gva) else { continue };
            if gpa == p.gpa {
                out.same_frames += 1;
            }
            let len = usize::try_from((r.bytes - i as u64 * PAGE_SIZE).min(PAGE_SIZE))
                .expect("a page's length");
            if mem.read(gpa, &mut page[..len]).is_ok()
                && super::tree::page_value(i as u64, &page[..len], r.bytes) == p.value
            {
                out.same_bytes += 1;
            }
        }
    }
    out
}

/// Compares a fresh reading with `baseline`, in full.
///
/// A kernel found elsewhere than the baseline has it is judged page by page
/// like any other: whether the guest booted again is the hypervisor's to
/// say, not the guest's page tables' (the caller decides that before it
/// checks). So a kernel image moved to copies makes every moved page a
/// `remap` finding, and the copies' bytes are compared with the baseline.
pub fn check<M: GuestMemory + ?Sized>(
    baseline: &Baseline,
    mem: &M,
    space: &dyn AddressSpace,
    registers: &[VcpuRegisters],
) -> Result<Report, CheckError> {
    check_scoped(baseline, mem, space, registers, Scope::Full)
}

/// Compares the part of a fresh reading that `scope` covers with `baseline`.
pub fn check_scoped<M: GuestMemory + ?Sized>(
    baseline: &Baseline,
    mem: &M,
    space: &dyn AddressSpace,
    registers: &[VcpuRegisters],
    scope: Scope,
) -> Result<Report, CheckError> {
    check_tagged(baseline, mem, space, registers, scope, None)
}

/// Like [`check_scoped`], with the baseline pages' NH tags: a page whose
/// tag matches holds its baseline bytes (but for a chance of one in
/// 2^[`super::tags::ESCAPE_BITS`]) and is not hashed; the others are hashed
/// with BLAKE3 and judged as without tags. The report is the same.
pub fn check_tagged<M: GuestMemory + ?Sized>(
    baseline: &Baseline,
    mem: &M,
    space: &dyn AddressSpace,
    registers: &[VcpuRegisters],
    scope: Scope,
    tags: Option<&super::tags::PageTags>,
) -> Result<Report, CheckError> {
    let mut findings = Vec::new();
    let mut regions = Vec::new();
    // Every region page of the baseline, sorted: looked up by binary search
    // (no hashing of addresses on the hot path).
    // Each region's pages are in address order already, and a stable sort
    // merges such runs in about linear time.
    let mut region_pages: Vec<u64> =
        baseline.regions.iter().flat_map(|r| r.pages.iter().map(|p| p.gva.raw())).collect();
    region_pages.sort();
    region_pages.dedup();
    let mut bytes_verified = 0u64;
    for (ri, r) in baseline.regions.iter().enumerate().filter(|(_, r)| scope.covers(r.kind)) {
        let reads = where_pages_map(r, mem, space, &mut findings);
        let slow = tags.and_then(|t| super::tags::untagged_or_changed(t, ri, &r.root, mem, &reads));
        // Without tags: the whole region first, at BLAKE3's full width, and
        // page by page only to find what changed.
        let whole = slow.is_none()
            && reads.len() == r.pages.len()
            && region_hash(mem, &reads, r.bytes).is_some_and(|h| h == r.root);
        let values = match &slow {
            None if whole => r.pages.iter().map(|p| p.value).collect(),
            None => hash_pages_at(mem, &r.name, r.bytes, &reads)?,
            Some(slow) => {
                let fresh: std::collections::HashMap<u64, _> = slow
                    .iter()
                    .map(|s| s.0)
                    .zip(hash_pages_at(mem, &r.name, r.bytes, slow)?)
                    .collect();
                reads
                    .iter()
                    .map(|(index, ..)| {
                        fresh.get(index).copied().unwrap_or_else(|| {
                            r.pages[usize::try_from(*index).expect("index of a page in memory")]
                                .value
                        })
                    })
                    .collect()
            }
        };
        bytes_verified += reads.len() as u64 * PAGE_SIZE;
        for (&(index, gva, gpa), v) in reads.iter().zip(&values) {
            let old = &r.pages[usize::try_from(index).expect("index of a page in memory")];
            if old.value != *v {
                let mut f = finding(&r.name, FindingKind::Content, Severity::Violation, gva, gpa);
                f.page = Some(index);
                f.detail = format!("page {index} of {} changed", r.name);
                f.before = to_hex(&old.value);
                f.after = to_hex(v);
                findings.push(f);
            }
        }
        // A root only when every page could be read now.
        let current_root = if reads.len() != r.pages.len() {
            "unavailable: pages unmapped or outside RAM".to_owned()
        } else if whole || slow.as_ref().is_some_and(Vec::is_empty) {
            to_hex(&r.root) // the region hashed whole, or every page's tag, matched
        } else if values.is_empty() {
            to_hex(blake3::hash(&[]).as_bytes())
        } else {
            to_hex(tree::region_root(&values, r.bytes).expect("one value per page").as_bytes())
        };
        regions.push(RegionStatus {
            name: r.name.clone(),
            pages: r.pages.len() as u64,
            changed_pages: 0,
            info: 0,
            intact: true,
            baseline_root: to_hex(&r.root),
            current_root,
        });
    }

    if scope == Scope::Full {
        // Pages of regions this scope covers are compared above; the rest of
        // the image's mapping here.
        image_mapping_findings(baseline, space, &region_pages, &mut findings);
    }
    register_findings(&baseline.registers, registers, &mut findings);

    let image_pages: u64 = baseline.image_mapping.iter().map(|r| r.pages).sum();
    let mut extra = vec![(REGISTER_REGION, 0)];
    if scope == Scope::Full {
        extra.insert(0, (IMAGE_REGION, image_pages.saturating_sub(region_pages.len() as u64)));
    }
    for (name, pages) in extra {
        regions.push(RegionStatus {
            name: name.into(),
            pages,
            changed_pages: 0,
            info: 0,
            intact: true,
            baseline_root: String::new(),
            current_root: String::new(),
        });
    }
    for status in &mut regions {
        let mine = || findings.iter().filter(|f| f.region == status.name);
        let violated: HashSet<(u64, Option<u32>)> = mine()
            .filter(|f| f.severity == Severity::Violation)
            .map(|f| (f.gva.raw(), f.vcpu))
            .collect();
        status.changed_pages = violated.len() as u64;
        status.info = mine().filter(|f| f.severity == Severity::Info).count() as u64;
        status.intact = violated.is_empty();
    }
    let (violations, info): (Vec<_>, Vec<_>) =
        findings.into_iter().partition(|f| f.severity == Severity::Violation);
    Ok(Report {
        domain: baseline.domain.name.clone(),
        uuid: baseline.domain.uuid.clone(),
        baseline_created: baseline.created.clone(),
        checked: super::baseline::now_rfc3339(),
        source: mem.kind().into(),
        intact: violations.is_empty(),
        violations,
        info,
        regions,
        scope,
        bytes_verified,
    })
}

/// Where each page of region `r` maps now, as (index in region, virtual,
/// physical): the pages to hash. A page unmapped, mapped elsewhere or with
/// other permissions is a finding; one mapped outside guest RAM is not read.
fn where_pages_map<M: GuestMemory + ?Sized>(
    r: &super::baseline::RegionRecord,
    mem: &M,
    space: &dyn AddressSpace,
    findings: &mut Vec<Finding>,
) -> Vec<(u64, GuestVirtAddr, GuestPhysAddr)> {
    let mut reads = Vec::with_capacity(r.pages.len());
    for (i, p) in r.pages.iter().enumerate() {
        let index = i as u64;
        let Some((gpa, perms)) = space.translate(p.gva) else {
            let mut f = finding(&r.name, FindingKind::Remap, Severity::Violation, p.gva, p.gpa);
            f.page = Some(index);
            f.detail = "page is no longer mapped".into();
            f.before = mapping_text(p.gpa, p.perms);
            f.after = "unmapped".into();
            findings.push(f);
            continue;
        };
        if gpa != p.gpa {
            let mut f = finding(&r.name, FindingKind::Remap, Severity::Violation, p.gva, gpa);
            f.page = Some(index);
            f.detail = format!("page now maps guest-physical {gpa}, not {}", p.gpa);
            f.before = mapping_text(p.gpa, p.perms);
            f.after = mapping_text(gpa, perms);
            if !mem.layout().contains(gpa, PAGE_SIZE) {
                // Hostile or broken tables: say so rather than fail the check.
                f.detail.push_str(", which is not guest RAM");
                findings.push(f);
                continue;
            }
            findings.push(f);
        }
        if perms != p.perms {
            findings.push(permission_finding(&r.name, Some(index), p.gva, gpa, p.perms, perms));
        }
        reads.push((index, p.gva, gpa));
    }
    reads
}

/// BLAKE3 of the pages `reads` (the whole region, in order), hashed in
/// pieces as large as the source lends or a batch holds, so that BLAKE3
/// works at its full SIMD width. `None` when a page cannot be read (the
/// page-by-page path then reports it).
pub fn region_hash<M: GuestMemory + ?Sized>(
    mem: &M,
    reads: &[(u64, GuestVirtAddr, GuestPhysAddr)],
    region_len: u64,
) -> Option<[u8; 32]> {
    if u64::try_from(reads.len()).ok()? != tree::page_count(region_len) {
        return None;
    }
    let mut h = blake3::Hasher::new();
    super::read_in_runs(mem, reads, |_, bytes| {
        h.update(bytes);
    })
    .ok()?;
    Some(*h.finalize().as_bytes())
}

fn permission_finding(
    region: &str,
    page: Option<u64>,
    gva: GuestVirtAddr,
    gpa: GuestPhysAddr,
    old: Perms,
    new: Perms,
) -> Finding {
    let loosened = old.loosened_by(&new);
    let sev = if loosened { Severity::Violation } else { Severity::Info };
    let mut f = finding(region, FindingKind::Permission, sev, gva, gpa);
    f.page = page;
    f.detail = format!(
        "permissions {} from {} to {}",
        if loosened { "loosened" } else { "tightened" },
        old.as_text(),
        new.as_text()
    );
    f.before = old.as_text();
    f.after = new.as_text();
    f
}

/// Remaps and permission changes of image pages outside every region
/// (kernel data, and pages mapped since the baseline).
fn image_mapping_findings(
    baseline: &Baseline,
    space: &dyn AddressSpace,
    in_regions: &[u64],
    out: &mut Vec<Finding>,
) {
    let mut out = Capped::new(out);
    let mut old = expand_runs(&baseline.image_mapping).unwrap_or_default();
    old.sort_by_key(|m| m.gva.raw()); // in order already, but for a hand-edited file
    let mut now = std::borrow::Cow::Borrowed(space.image_pages());
    if !now.is_sorted_by_key(|m| m.gva.raw()) {
        now.to_mut().sort_unstable_by_key(|m| m.gva.raw());
    }
    // One merge walk over three sorted lists: the baseline's image pages,
    // the image pages now, and the region pages (compared elsewhere).
    let (mut j, mut r) = (0, 0);
    let newly_mapped = |m: &crate::x86::Mapping, out: &mut Capped<'_>| {
        let sev =
            if m.perms.executable || m.perms.user { Severity::Violation } else { Severity::Info };
        let mut f = finding(IMAGE_REGION, FindingKind::Remap, sev, m.gva, m.gpa);
        f.detail = format!("page newly mapped {}", m.perms.as_text());
        f.before = "unmapped".into();
        f.after = mapping_text(m.gpa, m.perms);
        out.push(f);
    };
    for m in &old {
        let va = m.gva.raw();
        while j < now.len() && now[j].gva.raw() < va {
            newly_mapped(&now[j], &mut out);
            j += 1;
        }
        let current = if j < now.len() && now[j].gva.raw() == va {
            j += 1;
            Some((now[j - 1].gpa, now[j - 1].perms))
        } else {
            space.translate(m.gva)
        };
        while r < in_regions.len() && in_regions[r] < va {
            r += 1;
        }
        if r < in_regions.len() && in_regions[r] == va {
            continue;
        }
        match current {
            None => {
                // Unmapping kernel data takes nothing from the kernel's protection.
                let mut f = finding(IMAGE_REGION, FindingKind::Remap, Severity::Info, m.gva, m.gpa);
                f.detail = "page is no longer mapped".into();
                f.before = mapping_text(m.gpa, m.perms);
                f.after = "unmapped".into();
                out.push(f);
            }
            Some((gpa, perms)) => {
                if gpa != m.gpa {
                    let mut f =
                        finding(IMAGE_REGION, FindingKind::Remap, Severity::Violation, m.gva, gpa);
                    f.detail = format!("page now maps guest-physical {gpa}, not {}", m.gpa);
                    f.before = mapping_text(m.gpa, m.perms);
                    f.after = mapping_text(gpa, perms);
                    out.push(f);
                }
                if perms != m.perms {
                    out.push(permission_finding(IMAGE_REGION, None, m.gva, gpa, m.perms, perms));
                }
            }
        }
    }
    for m in &now[j..] {
        newly_mapped(m, &mut out);
    }
    out.summarise();
}

/// Most findings of the image's mappings one check keeps, of each severity:
/// the image spans up to 262,144 pages, and a guest that remaps them all
/// would otherwise make as many findings. Past this, one more finding
/// counts the rest (violations first kept, so that harmless findings cannot
/// crowd a violation out).
pub const MAX_IMAGE_FINDINGS: usize = 4096;

/// Findings pushed up to a bound per severity, the rest counted and hashed.
struct Capped<'a> {
    out: &'a mut Vec<Finding>,
    left: [usize; 2],
    over: usize,
    worst: Severity,
    /// What was left out, so that the summary changes when it does (an
    /// alert's digest is made of its findings' addresses and bytes).
    dropped: blake3::Hasher,
}

impl<'a> Capped<'a> {
    fn new(out: &'a mut Vec<Finding>) -> Self {
        Capped {
            out,
            left: [MAX_IMAGE_FINDINGS; 2],
            over: 0,
            worst: Severity::Info,
            dropped: blake3::Hasher::new(),
        }
    }

    fn push(&mut self, f: Finding) {
        let left = &mut self.left[usize::from(f.severity == Severity::Violation)];
        if *left > 0 {
            *left -= 1;
            self.out.push(f);
        } else {
            self.over += 1;
            if f.severity == Severity::Violation {
                self.worst = Severity::Violation;
            }
            self.dropped.update(&f.gva.raw().to_le_bytes());
            self.dropped.update(f.after.as_bytes());
            self.dropped.update(&[0]);
        }
    }

    fn summarise(&mut self) {
        if self.over > 0 {
            let mut f = finding(
                IMAGE_REGION,
                FindingKind::Remap,
                self.worst,
                GuestVirtAddr(0),
                GuestPhysAddr(0),
            );
            f.detail = format!(
                "and {} more pages of the kernel image mapped anew, remapped or unmapped: past the \
                 {MAX_IMAGE_FINDINGS} findings of each severity one check lists",
                self.over
            );
            let digest = self.dropped.finalize();
            f.after = format!("{} more, digest {}", self.over, &digest.to_hex()[..16]);
            self.out.push(f);
        }
    }
}

fn vcpu_finding(vcpu: u32, severity: Severity, gva: GuestVirtAddr, detail: String) -> Finding {
    let mut f = finding(REGISTER_REGION, FindingKind::Register, severity, gva, GuestPhysAddr(0));
    f.vcpu = Some(vcpu);
    f.detail = detail;
    f
}

fn register_findings(old: &[VcpuRegisters], new: &[VcpuRegisters], out: &mut Vec<Finding>) {
    let none = GuestVirtAddr(0);
    for o in old.iter().filter(|r| r.in_long_mode()) {
        let Some(n) = new.iter().find(|r| r.index == o.index) else {
            out.push(vcpu_finding(
                o.index,
                Severity::Info,
                none,
                format!("vCPU {} is gone", o.index),
            ));
            continue;
        };
        if !n.in_long_mode() {
            let detail = format!("vCPU {} is no longer in 64-bit mode (reset or offline)", o.index);
            out.push(vcpu_finding(o.index, Severity::Info, none, detail));
            continue;
        }
        let bits: [(&str, u64, u64, u64, &str); 4] = [
            (
                "CR0.WP",
                CR0_WP,
                o.cr0,
                n.cr0,
                "write protection off: the kernel can write its read-only pages",
            ),
            ("CR4.SMEP", CR4_SMEP, o.cr4, n.cr4, "supervisor-mode execution prevention off"),
            ("CR4.SMAP", CR4_SMAP, o.cr4, n.cr4, "supervisor-mode access prevention off"),
            (
                "EFER.NXE",
                EFER_NXE,
                o.efer,
                n.efer,
                "no-execute disabled: data pages become executable",
            ),
        ];
        for (name, bit, before, after, why) in bits {
            if before & bit != 0 && after & bit == 0 {
                let detail = format!("{name} cleared on vCPU {}: {why}", o.index);
                let mut f = vcpu_finding(o.index, Severity::Violation, none, detail);
                f.register = Some(name.into());
                f.before = format!("{before:#x}");
                f.after = format!("{after:#x}");
                out.push(f);
            }
        }
        let tables = [
            ("IDTR", o.idtr_base, o.idtr_limit, n.idtr_base, n.idtr_limit),
            ("GDTR", o.gdtr_base, o.gdtr_limit, n.gdtr_base, n.gdtr_limit),
        ];
        for (name, ob, ol, nb, nl) in tables {
            if (ob, ol) != (nb, nl) {
                let detail = format!(
                    "{name} of vCPU {} moved from {ob:#x} (limit {ol:#x}) to {nb:#x} (limit {nl:#x})",
                    o.index
                );
                let mut f = vcpu_finding(o.index, Severity::Violation, GuestVirtAddr(nb), detail);
                f.register = Some(name.into());
                f.before = format!("{ob:#x}/{ol:#x}");
                f.after = format!("{nb:#x}/{nl:#x}");
                out.push(f);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::type_complexity)]
mod tests;
