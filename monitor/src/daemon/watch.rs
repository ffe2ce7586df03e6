//! One watched domain's blocking work: attach (find the kernel, load or
//! take its baseline), check, re-baseline. Runs on tokio's blocking pool; the
//! memory source stays open between checks.

use std::path::{Path, PathBuf};

use crate::integrity::baseline::{DomainId, Run};
use crate::integrity::check::{CheckError, Report, Scope, check_tagged};
use crate::integrity::tags::PageTags;
use crate::integrity::{Baseline, BaselineError};
use crate::libvirt::{GuestDomain, Hypervisor, LibvirtError, SourceChoice, error_chain};
use std::collections::HashMap;

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use crate::integrity::Originals;
use crate::integrity::baseline::to_hex;
use crate::integrity::{AddressSpace, Finding, FindingKind, Severity};
use crate::linux::diff::{self, Change, Diff};
use crate::linux::patch::{self, PatchMemory, Patched};
use crate::linux::profile::Profile;
use crate::linux::{DiscoverError, KernelView, discover, layout, semantic};
use crate::memory::GuestMemory;
use crate::x86::{Mapping, Perms};

/// Why a domain could not be attached or checked.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Libvirt(#[from] LibvirtError),
    #[error("kernel not found")]
    Discover(#[from] DiscoverError),
    #[error(transparent)]
    Baseline(#[from] BaselineError),
    #[error("{0}")]
    StoredState(String),
    #[error(
        "{0} is paused, receiving its memory (a restore or an incoming migration): it is taken \
         up once it runs"
    )]
    Receiving(String),
}

impl WatchError {
    /// A short, stable name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            WatchError::Libvirt(LibvirtError::NotRunning { .. } | LibvirtError::NoDomain(_)) => {
                "domain_lost"
            }
            WatchError::Libvirt(LibvirtError::Memory { .. }) => "memory_unreadable",
            WatchError::Libvirt(_) => "libvirt",
            // A bound on the page-table walk was hit: hostile or broken
            // tables, counted apart from a kernel that is simply not there.
            WatchError::Discover(DiscoverError::Walk {
                source: crate::x86::WalkError::TooManyTables(_),
                ..
            }) => "limit_walk_tables",
            WatchError::Discover(DiscoverError::Walk {
                source: crate::x86::WalkError::TooManyMappings(_),
                ..
            }) => "limit_walk_mappings",
            WatchError::Discover(DiscoverError::Unreadable { .. }) => "memory_unreadable",
            WatchError::Discover(_) => "kernel_not_found",
            WatchError::Baseline(BaselineError::Read { .. }) => "memory_unreadable",
            WatchError::Baseline(_) | WatchError::StoredState(_) => "baseline_file",
            WatchError::Receiving(_) => "receiving",
        }
    }

    pub fn domain_gone(&self) -> bool {
        matches!(
            self,
            WatchError::Libvirt(LibvirtError::NotRunning { .. } | LibvirtError::NoDomain(_))
        )
    }

    pub fn message(&self) -> String {
        error_chain(self)
    }
}

/// How an attach found its baseline, as [`super::boot::decide`] chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attached {
    /// The stored baseline is of this very boot: checked against, not replaced.
    Stored,
    /// The kernel's code is not all where the stored baseline has it and the
    /// hypervisor reported no reboot: checked against the stored baseline,
    /// which reports every moved page. `then` and `now` are the image's
    /// placements (virtual-physical), which may be the same.
    Remapped { then: String, now: String },
    /// A new baseline of a new boot the hypervisor reported; `why` says by
    /// what. Provisional while [`Watched::provisional_left`] says so.
    NewBoot { why: String },
    /// No baseline was stored: the first one, trust on first use.
    FirstSight,
    /// The kernel moved, virtually too, while vigil could not have heard of
    /// a reset (`why`): a new baseline, the old one kept at `kept`.
    Unconfirmed { then: String, now: String, why: String, kept: String },
    /// The stored baseline could not be used: a new baseline, the unusable
    /// file kept aside ([`Watched::problems`] says why and where).
    Replaced,
}

/// What the daemon knows of a domain from the hypervisor, across attaches
/// (see [`super::boot`]).
#[derive(Debug, Clone, Default)]
pub struct Knowledge {
    /// libvirt reported a reset of the guest since the baseline was taken.
    pub reset_reported: Option<std::time::Instant>,
    /// The QEMU process the daemon has listened to libvirt about without a
    /// gap since it last attached to it.
    pub listened: Option<Run>,
}

/// How an attach treats the domain.
#[derive(Debug, Clone)]
pub struct AttachSettings {
    /// The baseline's original pages stay in their file (`originals = "disk"`).
    pub originals_on_disk: bool,
    /// How long after a start or reset the hypervisor reported a new
    /// baseline may be provisional.
    pub provisional_window: std::time::Duration,
    /// The guest profiles: new baselines bound their regions by the
    /// kernel's layout as the matching one gives it.
    pub profiles: std::sync::Arc<[Profile]>,
}

/// A problem with the stored state that the attach worked around, to be
/// reported as a critical event: what cannot be checked now, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateProblem {
    pub file: String,
    pub detail: String,
}

/// What a watch needs of a running guest: libvirt's domains
/// ([`GuestDomain`]) in the daemon, in-process guests in the benchmarks.
pub trait Guest: Send {
    fn name(&self) -> &str;
    fn uuid(&self) -> &str;
    /// `Ok` while the guest runs (or is paused).
    fn ensure_running(&self) -> Result<(), LibvirtError>;
    fn registers(&self) -> Result<Vec<crate::qemu::VcpuRegisters>, LibvirtError>;
    /// The hypervisor's run of the guest (its emulator process).
    fn run(&self) -> Result<Run, LibvirtError>;
    /// Whether the guest is paused (an emulator started `-incoming` is
    /// paused until its memory has all arrived).
    fn paused(&self) -> bool {
        false
    }
    fn open_memory(&self) -> Result<Box<dyn GuestMemory + Send + Sync>, LibvirtError>;
    /// The guest's memory size, for evidence limits.
    fn memory_bytes(&self) -> Result<u64, LibvirtError>;
    /// Writes the guest's memory to `path` as an ELF core (evidence).
    fn dump_memory(&self, path: &Path) -> Result<(), LibvirtError>;
}

impl Guest for GuestDomain {
    fn name(&self) -> &str {
        &self.name
    }
    fn uuid(&self) -> &str {
        &self.uuid
    }
    fn ensure_running(&self) -> Result<(), LibvirtError> {
        GuestDomain::ensure_running(self)
    }
    fn registers(&self) -> Result<Vec<crate::qemu::VcpuRegisters>, LibvirtError> {
        GuestDomain::registers(self)
    }
    fn run(&self) -> Result<Run, LibvirtError> {
        GuestDomain::run(self)
    }
    fn paused(&self) -> bool {
        self.state_text() == "paused"
    }
    fn open_memory(&self) -> Result<Box<dyn GuestMemory + Send + Sync>, LibvirtError> {
        GuestDomain::open_memory(self, SourceChoice::Auto)
    }
    fn memory_bytes(&self) -> Result<u64, LibvirtError> {
        GuestDomain::memory_bytes(self)
    }
    fn dump_memory(&self, path: &Path) -> Result<(), LibvirtError> {
        GuestDomain::dump_memory(self, path)
    }
}

/// A domain being watched.
pub struct Watched {
    pub dom: Box<dyn Guest>,
    mem: Option<Box<dyn GuestMemory + Send + Sync>>,
    pub baseline: Baseline,
    pub path: PathBuf,
    /// The baseline's original page bytes (empty if the file is missing:
    /// then every text change is a violation).
    originals: Originals,
    /// The guest profile the kernel matched at the last check, if any.
    pub profile: Option<String>,
    /// Live modules' text, kept when first seen: (name, base) to page
    /// hashes and bytes. Kept in memory: a restarted daemon protects modules
    /// from when it sees them again.
    modules: HashMap<(String, u64), ModuleText>,
    /// Modules seen loaded or unloaded by the last check.
    pub module_events: Vec<ModuleEvent>,
    /// Listed modules that are not live, and for how long.
    modules_not_live: NotLive,
    /// Patch sites accepted by the last checks, and patch records seen lately.
    patch_state: PatchMemory,
    /// Executable pages of the module area that a kernel record (the module
    /// list, an ftrace trampoline, a kprobe slot, a BPF image) accounted for,
    /// as (virtual, physical), with when a record last did. The kernel drops
    /// a record some time before it frees the memory (an RCU grace period
    /// apart), so such a page stays accounted for up to [`RECORD_GRACE`].
    recognized: HashMap<(u64, u64), std::time::Instant>,
    /// Unlisted executable runs seen by the last check, as (virtual,
    /// physical) of their start, with when first seen in a row: reported
    /// once seen for [`UNLISTED_PERSIST`].
    unlisted_seen: HashMap<(u64, u64), std::time::Instant>,
    /// Names from the guest's own kallsyms, read once when no profile
    /// matches and something needs naming (lower trust).
    guest_symbols: Option<Option<semantic::GuestSymbols>>,
    /// The baseline pages' NH tags under a key of this watch's own: checks
    /// hash with BLAKE3 only the pages whose tag differs. Made at the first
    /// check of a baseline.
    tags: Option<PageTags>,
    /// Whether original pages stay in their file (`originals = "disk"`).
    originals_on_disk: bool,
    /// vCPU register snapshots asked of the hypervisor since the last
    /// [`Watched::take_register_snapshots`]: one per check, more when one
    /// led to no whole kernel and was taken again.
    register_snapshots: u64,
    /// Problems with the stored state met by the attach, to be reported.
    pub problems: Vec<StateProblem>,
    /// The hypervisor's run of the guest when it was attached.
    pub run: Option<Run>,
    /// For a provisional new baseline: how long it may stay so, counted
    /// from the hypervisor's reset or start of the guest.
    pub provisional_left: Option<std::time::Duration>,
    /// The profiles the attach was given: a re-taken baseline is bounded
    /// with them as the first was.
    profiles: std::sync::Arc<[Profile]>,
    /// How the baseline's regions are bounded (`Ok`: by what) or why they
    /// are not (`Err`), to be reported.
    pub bounds: Result<String, String>,
}

/// How long executable module-area memory that no record accounts for must
/// stay so, seen at every check meanwhile, before it is reported. The kernel
/// maps some memory executable a moment before it records it (a kprobe slot
/// page, an ftrace trampoline) and frees some a while after it drops the
/// record (a module's init text goes after an RCU grace period, from a
/// workqueue): seconds, in a slow guest.
const UNLISTED_PERSIST: std::time::Duration = std::time::Duration::from_secs(8);

/// Listed modules whose state is not live, since when, in which state.
///
/// The kernel leaves a module loading only while its init function runs,
/// and unloading only while its exit function runs; meanwhile its text is
/// not compared (the kernel still patches it). A module that stays so for
/// longer than `grace` is reported: a rootkit that writes its own state
/// would otherwise hide its text from the checks.
struct NotLive {
    since: HashMap<(String, u64), (u32, std::time::Instant)>,
    grace: std::time::Duration,
}

/// How long a module may stay loading or unloading before it is reported,
/// unless configured (`schedule.module_grace`): long enough for an init
/// function waiting out the kernel's 60 s firmware timeout.
pub const MODULE_GRACE: std::time::Duration = std::time::Duration::from_secs(120);

impl Default for NotLive {
    fn default() -> Self {
        NotLive { since: HashMap::new(), grace: MODULE_GRACE }
    }
}

/// A live module's text as first seen.
struct ModuleText {
    hashes: Vec<[u8; 32]>,
    bytes: Vec<u8>,
}

/// A module appearing in or leaving the module list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEvent {
    pub loaded: bool,
    pub name: String,
    pub base: u64,
    pub text_pages: u64,
}

/// Most pages of module text protected per module.
const MAX_MODULE_PAGES: u64 = 4096;

use crate::linux::patch::RECORD_GRACE;

/// Where a domain's baseline is kept (the same place `vigil baseline` uses).
pub fn baseline_path(state_dir: &Path, uuid: &str) -> PathBuf {
    state_dir.join("baselines").join(format!("{uuid}.json"))
}

/// The stored baseline of a domain: `None` when there is no file, the
/// reason when one exists and cannot be used (unreadable, too large,
/// corrupt or invalid, another domain's).
fn load_stored(path: &Path, name: &str, uuid: &str) -> Result<Option<Baseline>, String> {
    match Baseline::load(path) {
        Ok(b) if b.domain.uuid == uuid => Ok(Some(b)),
        Ok(b) => Err(format!(
            "it is the baseline of domain {} ({}), not of {name} ({uuid})",
            b.domain.name, b.domain.uuid
        )),
        Err(BaselineError::Open { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(error_chain(&e)),
    }
}

/// Moves a stored file out of the way, never overwriting or deleting it:
/// renamed with a suffix saying when. A file that cannot be moved is an
/// error: nothing is then stored in its place.
fn keep_aside(path: &Path) -> Result<PathBuf, WatchError> {
    let stamp = crate::integrity::baseline::now_rfc3339().replace(':', "");
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".set-aside-{stamp}"));
    let aside = PathBuf::from(aside);
    if aside.exists() {
        return Err(WatchError::StoredState(format!(
            "{} cannot be kept aside: {} exists",
            path.display(),
            aside.display()
        )));
    }
    std::fs::rename(path, &aside).map_err(|e| {
        WatchError::StoredState(format!(
            "{} cannot be kept aside as {}: {e}; nothing is stored in its place",
            path.display(),
            aside.display()
        ))
    })?;
    Ok(aside)
}

/// Keeps a baseline and its original pages aside (see [`keep_aside`]), and
/// says where they went.
fn keep_baseline_aside(path: &Path) -> Result<String, WatchError> {
    let kept = format!("the file is kept as {}", keep_aside(path)?.display());
    let pages = Originals::path_for(path);
    if pages.exists() {
        return Ok(format!("{kept}; its original pages as {}", keep_aside(&pages)?.display()));
    }
    Ok(kept)
}

/// Register snapshots a check may take when one finds no whole kernel.
const REGISTER_ATTEMPTS: u32 = 3;

/// Guest memory as a watch reads it.
type Memory = dyn GuestMemory + Send + Sync;

/// The vCPUs' registers and the kernel they lead to. The registers are a
/// snapshot of running vCPUs, which may catch one in an address space being
/// torn down, or in the kernel's own short-lived one for patching its text,
/// where the image or a descriptor table is not all mapped. Such a snapshot
/// is taken again, `REGISTER_ATTEMPTS` times in all, before the failure
/// counts. Memory that cannot be read, and a walk past its bounds, are not
/// tried again. Each snapshot asked for is counted in `snapshots`.
fn registers_and_kernel<'m>(
    dom: &dyn Guest,
    mem: &'m Memory,
    snapshots: &mut u64,
) -> Result<(Vec<crate::qemu::VcpuRegisters>, KernelView<'m, Memory>), WatchError> {
    let mut attempt = 1;
    loop {
        *snapshots += 1;
        let regs = dom.registers()?;
        match discover(mem, &regs) {
            Ok(view) => return Ok((regs, view)),
            Err(
                DiscoverError::NoText { .. }
                | DiscoverError::TableUnmapped { .. }
                | DiscoverError::TableLimit { .. },
            ) if attempt < REGISTER_ATTEMPTS => attempt += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A new baseline of the kernel as it is now, of the hypervisor's `run` of
/// the guest: what later tells a reset or a new process from the guest
/// moving its own kernel.
///
/// Its text and rodata end where the kernel's layout says (see
/// [`layout`]); the third value says by what, or why not.
fn take_baseline(
    dom: &dyn Guest,
    mem: &Memory,
    run: Run,
    snapshots: &mut u64,
    profiles: &[Profile],
) -> Result<(Baseline, Originals, Result<String, String>), WatchError> {
    let (regs, mut view) = registers_and_kernel(dom, mem, snapshots)?;
    let said = layout::bound_view(profiles, mem, &mut view);
    let id = DomainId { name: dom.name().to_owned(), uuid: dom.uuid().to_owned() };
    let (mut baseline, originals) =
        Baseline::build_keeping(mem, id, view.identification.clone(), regs, &view, &view.regions)?;
    baseline.run = Some(run);
    Ok((baseline, originals, said))
}

/// Bounds a stored baseline taken before regions were bounded by the
/// kernel's layout: only by a profile's bounds (the live guest's own
/// kallsyms may have been rewritten since the baseline was taken), and
/// only when just the rodata region's tail goes (see
/// [`Baseline::keep_head`]). Done in memory, after the baseline and its
/// original pages are loaded as stored; says what was done, or why not.
fn bound_stored(
    stored: &mut Baseline,
    mem: &Memory,
    view: &KernelView<'_, Memory>,
    profiles: &[Profile],
) -> Result<String, String> {
    if !stored.kernel.bounds.is_empty() {
        return Ok(stored.kernel.bounds.clone());
    }
    let b = layout::from_profile(profiles, mem, view, view.identification.image_base)
        .map_err(|e| format!("the stored baseline predates layout bounds and {e}"))?;
    let dropped = stored.keep_head("kernel-rodata", |g| !b.in_gap(g)).ok_or_else(|| {
        format!(
            "the stored baseline predates layout bounds and its rodata pages in the freed gaps \
                 ({}) are not its tail: they stay protected by content until the next baseline",
            b.describe()
        )
    })?;
    stored.kernel.bounds = b.describe();
    stored.kernel.rodata_pages = stored.region("kernel-rodata").map_or(0, |r| r.pages.len() as u64);
    Ok(format!(
        "{}; {dropped} rodata page(s) of the stored baseline in the freed gaps now checked for mapping only",
        b.describe()
    ))
}

/// Stores a baseline and its original pages; returns the originals as the
/// watch keeps them (in memory, or indexed in their file).
fn store(
    path: &Path,
    baseline: &Baseline,
    originals: Originals,
    on_disk: bool,
) -> Result<Originals, WatchError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|source| BaselineError::Write { path: dir.display().to_string(), source })?;
    }
    // Pages first: a baseline never points at missing originals.
    let pages = Originals::path_for(path);
    originals.save(&pages)?;
    baseline.save(path)?;
    if on_disk {
        // Read back indexed; should that fail, keep them in memory.
        return Ok(Originals::load_indexed(&pages, baseline).unwrap_or(originals));
    }
    Ok(originals)
}

impl Watched {
    fn new(
        dom: Box<dyn Guest>,
        mem: Box<dyn GuestMemory + Send + Sync>,
        baseline: Baseline,
        path: PathBuf,
        originals: Originals,
    ) -> Self {
        Self {
            dom,
            mem: Some(mem),
            baseline,
            path,
            originals,
            profile: None,
            modules: HashMap::new(),
            module_events: Vec::new(),
            modules_not_live: NotLive::default(),
            patch_state: PatchMemory::default(),
            recognized: HashMap::new(),
            unlisted_seen: HashMap::new(),
            guest_symbols: None,
            tags: None,
            originals_on_disk: false,
            register_snapshots: 0,
            problems: Vec::new(),
            run: None,
            provisional_left: None,
            profiles: std::sync::Arc::from(Vec::new()),
            bounds: Err("not yet bounded".into()),
        }
    }

    /// Finds the kernel of a running domain and decides, from what the
    /// hypervisor says (`known`, and the domain's QEMU process now) and where
    /// the kernel sits, whether to check against its stored baseline or take
    /// a new one ([`super::boot::decide`]). Problems with the stored state
    /// are in [`Watched::problems`] afterwards.
    pub fn attach(
        hv: &Hypervisor,
        uuid: &str,
        state_dir: &Path,
        known: &Knowledge,
        settings: AttachSettings,
    ) -> Result<(Self, Attached), WatchError> {
        Self::attach_guest(Box::new(hv.domain(uuid)?), state_dir, known, settings)
    }

    /// [`Watched::attach`] for any [`Guest`].
    pub fn attach_guest(
        dom: Box<dyn Guest>,
        state_dir: &Path,
        known: &Knowledge,
        settings: AttachSettings,
    ) -> Result<(Self, Attached), WatchError> {
        use super::boot::{Action, Placement, Signal, Stored, decide};
        dom.ensure_running()?;
        let run = dom.run()?;
        // Memory that is still arriving is no evidence of where the kernel
        // is: wait until the emulator runs the guest.
        if run.incoming && dom.paused() {
            return Err(WatchError::Receiving(dom.name().to_owned()));
        }
        let mem = dom.open_memory()?;
        let mut snapshots = 0;
        let (_, view) = registers_and_kernel(&*dom, &*mem, &mut snapshots)?;
        let now = view.identification.boot_key();
        let path = baseline_path(state_dir, dom.uuid());
        let (stored, found, unusable) = match load_stored(&path, dom.name(), dom.uuid()) {
            Ok(None) => (Stored::Missing, None, None),
            Ok(Some(b)) => {
                let code = crate::integrity::check::code_placement(&b, &*mem, &view);
                (Stored::Found(Placement::of(code)), Some(b), None)
            }
            Err(reason) => (Stored::Unreadable, None, Some(reason)),
        };
        // No baseline: the process is new to vigil, booted or received.
        let same_run = match &found {
            None => Some(false),
            Some(b) => b.run.as_ref().map(|r| r.same_as(&run)),
        };
        let listened = known.listened.as_ref().is_some_and(|l| l.same_as(&run));
        let signal = Signal::from_knowledge(
            known.reset_reported.is_some(),
            same_run,
            run.incoming,
            listened,
        );
        // How much of the provisional window is left, from when the
        // hypervisor reset or started the guest.
        let since_signal = match signal {
            Signal::Reset => known.reset_reported.map(|t| t.elapsed()),
            _ => crate::libvirt::run_age(&run),
        };
        let window_left = since_signal.and_then(|t| settings.provisional_window.checked_sub(t));
        let action = decide(signal, stored, window_left.is_some());
        let then = found.as_ref().map(|b| b.kernel.boot_key()).unwrap_or_default();
        let mut problems = Vec::new();
        let attached = match action {
            Action::UseStored => Attached::Stored,
            Action::Remapped => Attached::Remapped { then, now },
            Action::NewBoot { .. } => Attached::NewBoot {
                why: match signal {
                    Signal::Reset => "libvirt reported a reset of the guest".into(),
                    Signal::Incoming => format!(
                        "a new {run} received the guest's memory holding another kernel than the baseline's \
                         (restored or migrated from another save)"
                    ),
                    _ => match found.as_ref().and_then(|b| b.run.as_ref()) {
                        Some(old) => format!("a new {run} booted it (the baseline's was {old})"),
                        None => format!("a new {run} booted it"),
                    },
                },
            },
            Action::FirstSight { .. } => Attached::FirstSight,
            Action::Unconfirmed => Attached::Unconfirmed {
                then,
                now,
                why: format!(
                    "the same {run} has run the guest since its baseline was taken, and vigil may have \
                     missed a reset (it was not running, or libvirtd was unreachable)"
                ),
                kept: String::new(),
            },
            Action::Replace => Attached::Replaced,
        };
        if let (Attached::Stored | Attached::Remapped { .. }, Some(mut stored)) = (&attached, found)
        {
            // The baseline goes on under this run: record it, so that the
            // next attach compares with the process the guest is in now
            // (after a restore or migration; or a baseline of an earlier
            // vigil, which did not record one).
            if !stored.run.as_ref().is_some_and(|r| r.same_as(&run)) {
                stored.run = Some(run.clone());
                stored.save(&path)?;
            }
            // Without its original pages the stored baseline still protects,
            // but cannot tell the kernel's patches from an attack: said, and
            // a file that exists but cannot be used is kept aside.
            let pages = Originals::path_for(&path);
            let loaded = if settings.originals_on_disk {
                Originals::load_indexed(&pages, &stored)
            } else {
                Originals::load(&pages, &stored)
            };
            let originals = match loaded {
                Ok(o) => o,
                Err(e) => {
                    let missing = matches!(&e, BaselineError::Open { source, .. }
                        if source.kind() == std::io::ErrorKind::NotFound);
                    let kept = if missing {
                        "the file is missing".into()
                    } else {
                        format!("the file is kept as {}", keep_aside(&pages)?.display())
                    };
                    problems.push(StateProblem {
                        file: pages.display().to_string(),
                        detail: format!(
                            "the original pages of {}'s baseline cannot be used: {}; {kept}. Until the \
                             next baseline, the kernel's own patches cannot be told from attacks: every \
                             change to its text is reported as a violation",
                            dom.name(),
                            error_chain(&e)
                        ),
                    });
                    Originals::default()
                }
            };
            // Bounded after its files are read as stored (the pages file
            // holds the pages the baseline had).
            let bounds = bound_stored(&mut stored, &*mem, &view, &settings.profiles);
            drop(view);
            let mut w = Self::new(dom, mem, stored, path, originals);
            w.originals_on_disk = settings.originals_on_disk;
            w.register_snapshots = snapshots;
            w.problems = problems;
            w.run = Some(run);
            w.profiles = settings.profiles;
            w.bounds = bounds;
            return Ok((w, attached));
        }
        drop(view);
        // The new baseline is read before anything stored is moved: should
        // the read fail, the next attach finds the same files and decides
        // (and says) the same.
        let (baseline, originals, bounds) =
            take_baseline(&*dom, &*mem, run.clone(), &mut snapshots, &settings.profiles)?;
        let mut attached = attached;
        match (&mut attached, unusable) {
            (Attached::Unconfirmed { kept, .. }, _) => *kept = keep_baseline_aside(&path)?,
            (Attached::Replaced, Some(reason)) => problems.push(StateProblem {
                file: path.display().to_string(),
                detail: format!(
                    "the stored baseline of {} cannot be used: {reason}; {}. A new baseline is \
                     taken of the kernel as it is now, trusted on first use: a change made before now \
                     cannot be detected",
                    dom.name(),
                    keep_baseline_aside(&path)?
                ),
            }),
            _ => {}
        }
        let originals = store(&path, &baseline, originals, settings.originals_on_disk)?;
        let mut w = Self::new(dom, mem, baseline, path, originals);
        w.originals_on_disk = settings.originals_on_disk;
        w.register_snapshots = snapshots;
        w.problems = problems;
        w.run = Some(run);
        w.profiles = settings.profiles;
        w.bounds = bounds;
        let provisional = matches!(
            action,
            Action::NewBoot { provisional: true } | Action::FirstSight { provisional: true }
        );
        w.provisional_left = window_left.filter(|_| provisional);
        Ok((w, attached))
    }

    pub fn boot(&self) -> String {
        self.baseline.kernel.boot_key()
    }

    /// How long a listed module may stay loading or unloading (its text
    /// unchecked) before that is a violation.
    pub fn set_module_grace(&mut self, grace: std::time::Duration) {
        self.modules_not_live.grace = grace;
    }

    /// vCPU register snapshots asked for since the last call (checks,
    /// baselines, failures alike): each is a libvirt and QEMU round trip,
    /// and more than one per check, attach and baseline means snapshots
    /// taken again.
    pub fn take_register_snapshots(&mut self) -> u64 {
        std::mem::take(&mut self.register_snapshots)
    }

    /// Time the checks since the last call spent waiting for the kernel to
    /// finish an update of its own text (a pause, not work: the CPU budget
    /// does not count it).
    pub fn take_waited(&mut self) -> std::time::Duration {
        std::mem::take(&mut self.patch_state.waited)
    }

    /// Compares the guest with the baseline over `scope`.
    pub fn check(&mut self, scope: Scope, profiles: &[Profile]) -> Result<Report, WatchError> {
        let r = self.check_inner(scope, profiles, None);
        if r.is_err() {
            self.mem = None; // re-open on the next check
        }
        r
    }

    /// A full check with every change's bytes and code, as `vigil diff`
    /// shows it. It leaves the watch's own state (what was accepted and
    /// counted, what was seen once) as it was.
    pub fn diff(&mut self, profiles: &[Profile]) -> Result<Diff, WatchError> {
        let mut changes = Vec::new();
        let r = self.check_inner(Scope::Full, profiles, Some(&mut changes));
        let report = match r {
            Ok(r) => r,
            Err(e) => {
                self.mem = None;
                return Err(e);
            }
        };
        let d = Diff::of(
            &report,
            &self.baseline,
            &self.path.display().to_string(),
            format!("live {}", report.source),
            changes,
        );
        Ok(d)
    }

    /// Whether the domain still runs is asked of libvirt only when its
    /// memory is opened and when a check fails, not at every check: each
    /// such round trip costs libvirtd and the daemon host CPU next to the
    /// guest's own (benches/README.md, `guest_load`). A check that fails
    /// on a domain gone meanwhile fails as the domain's going.
    fn check_inner(
        &mut self,
        scope: Scope,
        profiles: &[Profile],
        changes: Option<&mut Vec<Change>>,
    ) -> Result<Report, WatchError> {
        match self.check_open(scope, profiles, changes) {
            Err(e) if !e.domain_gone() => match self.dom.ensure_running() {
                Err(gone @ (LibvirtError::NotRunning { .. } | LibvirtError::NoDomain(_))) => {
                    Err(gone.into())
                }
                _ => Err(e),
            },
            r => r,
        }
    }

    fn check_open(
        &mut self,
        scope: Scope,
        profiles: &[Profile],
        changes: Option<&mut Vec<Change>>,
    ) -> Result<Report, WatchError> {
        let diffing = changes.is_some();
        if self.mem.is_none() {
            self.dom.ensure_running()?;
            self.mem = Some(self.dom.open_memory()?);
        }
        let mem = self.mem.as_deref().expect("opened above");
        let (regs, view) = registers_and_kernel(&*self.dom, mem, &mut self.register_snapshots)?;
        if self.tags.is_none()
            && let Ok(key) = crate::integrity::nh::Key::random()
        {
            let (tags, _) = PageTags::build(key, &self.baseline, mem, &view, &self.originals);
            self.tags = Some(tags);
        }
        match check_tagged(&self.baseline, mem, &view, &regs, scope, self.tags.as_ref()) {
            Ok(mut r) => {
                let originals = &self.originals;
                semantic::review_gdt_pages(&mut r, mem, &self.baseline.registers, &|gva| {
                    originals.page(gva)
                });
                // Syscall tables and IDT gates are small: both scopes check them.
                self.profile = None;
                if let Some(mut m) =
                    semantic::match_profile(profiles, mem, &view, view.identification.image_base)
                {
                    let mut known =
                        crate::integrity::baseline::expand_runs(&self.baseline.exec_outside_image)
                            .unwrap_or_default();
                    let now = std::time::Instant::now();
                    self.recognized.retain(|_, seen| now.duration_since(*seen) < RECORD_GRACE);
                    known.extend(self.recognized.keys().map(|&(gva, gpa)| Mapping {
                        gva: GuestVirtAddr(gva),
                        gpa: GuestPhysAddr(gpa),
                        size: PAGE_SIZE,
                        perms: Perms { writable: false, user: false, executable: true },
                    }));
                    let (ranges, unread) = patch::exec_ranges(&m, mem, &view);
                    let mut found =
                        semantic::check(&mut m, mem, &view, &regs, &known, Some(&ranges));
                    let before = if diffing {
                        self.unlisted_seen.clone()
                    } else {
                        std::mem::take(&mut self.unlisted_seen)
                    };
                    found.retain(|f| {
                        if diffing {
                            return true;
                        }
                        if f.kind != FindingKind::Unlisted || f.severity != Severity::Violation {
                            return true;
                        }
                        let key = (f.gva.raw(), f.gpa.raw());
                        let first = before.get(&key).copied().unwrap_or(now);
                        self.unlisted_seen.insert(key, first);
                        now.duration_since(first) >= UNLISTED_PERSIST
                    });
                    for mp in view.exec_outside_image() {
                        let (s, e) = (mp.gva.raw(), mp.gva.raw().saturating_add(mp.size));
                        let recorded =
                            ranges.iter().any(|x| x.start & !(PAGE_SIZE - 1) <= s && s < x.end)
                                || m.modules.iter().any(|md| md.holds(s, e));
                        if recorded {
                            self.recognized.insert((s, mp.gpa.raw()), now);
                        }
                    }
                    self.profile = Some(m.profile.release.clone());
                    r.profile = self.profile.clone();
                    r.add_findings(found);
                    r.add_findings(unread.into_iter().map(unreadable_records).collect());
                    let module_findings = protect_modules(
                        (&mut self.modules, &mut self.modules_not_live),
                        &mut self.module_events,
                        &m,
                        mem,
                        &view,
                        now,
                    );
                    r.add_findings(module_findings);
                    let mut scratch;
                    let state = if diffing {
                        scratch = self.patch_state.clone();
                        &mut scratch
                    } else {
                        &mut self.patch_state
                    };
                    let accepted = review_patches(
                        &self.baseline,
                        &self.originals,
                        &self.modules,
                        state,
                        (&mut r, &m),
                        mem,
                        &view,
                        scope,
                    );
                    r.symbolize(|gva| m.symbol_of(gva));
                    if let Some(out) = changes {
                        let locate = |a: u64| m.locate(a);
                        let start = |a: u64| {
                            m.profile.symbolize(a.wrapping_sub(m.slide)).map(|(_, off)| a - off)
                        };
                        let namer = diff::Namer { locate: &locate, function_start: &start };
                        let modules = &self.modules;
                        let module_original = |a: u64, n: u64| {
                            modules.iter().find_map(|((_, base), t)| {
                                let off = usize::try_from(a.checked_sub(*base)?).ok()?;
                                t.bytes
                                    .get(off..off.checked_add(usize::try_from(n).ok()?)?)
                                    .map(<[u8]>::to_vec)
                            })
                        };
                        let code =
                            |region: &str| region == "kernel-text" || region.starts_with("module:");
                        *out = diff::changes(
                            &r,
                            &accepted,
                            mem,
                            &view,
                            &self.originals,
                            &module_original,
                            &code,
                            &namer,
                        );
                    }
                    r.modules = m.modules.iter().map(|md| md.name.clone()).collect();
                    for region in semantic::REGIONS {
                        r.cover(region);
                    }
                } else if !r.intact {
                    // No profile: name places from the guest's own kallsyms
                    // (read once), marked as lower trust.
                    let syms = self.guest_symbols.get_or_insert_with(|| {
                        view.regions
                            .iter()
                            .find(|g| g.kind == crate::integrity::RegionKind::ReadOnlyData)
                            .and_then(|ro| semantic::GuestSymbols::read(mem, ro))
                    });
                    if let Some(syms) = syms {
                        r.symbolize(|gva| syms.locate(gva));
                    }
                }
                Ok(r)
            }
            Err(CheckError::Read(e)) => Err(WatchError::Baseline(e)),
        }
    }
}

/// Judges text changes (kernel and module) against the kernel's patch
/// records, and counts the accepted ones.
#[allow(clippy::too_many_arguments)]
fn review_patches(
    baseline: &Baseline,
    originals: &Originals,
    modules: &HashMap<(String, u64), ModuleText>,
    state: &mut PatchMemory,
    (r, m): (&mut Report, &semantic::Matched<'_>),
    mem: &(dyn GuestMemory + Send + Sync),
    space: &dyn AddressSpace,
    scope: Scope,
) -> Vec<Patched> {
    // Text pages, sorted (a binary search per look-up, no hashing).
    let mut text: Vec<u64> = baseline
        .regions
        .iter()
        .filter(|g| g.kind == crate::integrity::RegionKind::Code)
        .flat_map(|g| g.pages.iter().map(|p| p.gva.raw()))
        .collect();
    text.sort_unstable();
    let code_regions: Vec<String> = baseline
        .regions
        .iter()
        .filter(|g| g.kind == crate::integrity::RegionKind::Code)
        .map(|g| g.name.clone())
        .collect();
    let in_module = |a: u64| {
        modules.iter().find_map(|((_, base), t)| {
            let off = usize::try_from(a.checked_sub(*base)?).ok()?;
            (off < t.bytes.len()).then_some((t, off))
        })
    };
    let original = |gva: u64| {
        originals.page(gva).or_else(|| {
            let (t, off) = in_module(gva)?;
            t.bytes.get(off..off + crate::addr::PAGE_BYTES).map(<[u8]>::to_vec)
        })
    };
    let is_text =
        |region: &str| region.starts_with("module:") || code_regions.iter().any(|c| c == region);
    let full = scope == Scope::Full;
    let covered = |a: u64| {
        if text.binary_search(&(a & !(PAGE_SIZE - 1))).is_ok() {
            Some(full)
        } else {
            in_module(a).map(|_| true)
        }
    };
    patch::review(r, m, mem, space, &original, state, &is_text, &covered)
}

fn unreadable_records(what: String) -> Finding {
    Finding::new(
        patch::TABLES_REGION,
        FindingKind::Pointer,
        Severity::Info,
        GuestVirtAddr(0),
        GuestPhysAddr(0),
    )
    .saying(
        format!("kernel records of executable memory not read: {what}"),
        String::new(),
        String::new(),
    )
}

/// Hashes the text of live modules first seen now, compares the text of
/// those seen before, notes loads and unloads in `events`, and reports
/// modules that stay loading or unloading past the grace of `not_live`.
///
/// The guest loads and unloads modules while this runs: each module's text
/// is believed only if the module is live just before it is read and still
/// is just after ([`semantic::still_live`]). Otherwise it is left for the
/// next check, so that a module unloaded after the list was walked, and
/// another instance loaded at its base and not yet relocated, is not taken
/// for the module's text changed.
///
/// A known module that says it is unloading, or loading, stays known until
/// it leaves the list: if it turns live again, its text is compared with what
/// it was, so that a module cannot rewrite itself while claiming either. (A
/// real reload at the same base between two checks is compared so too, as
/// one that is live at both: a different build loaded there is reported.)
fn protect_modules(
    (known, not_live): (&mut HashMap<(String, u64), ModuleText>, &mut NotLive),
    events: &mut Vec<ModuleEvent>,
    m: &semantic::Matched<'_>,
    mem: &(dyn GuestMemory + Send + Sync),
    space: &dyn AddressSpace,
    now: std::time::Instant,
) -> Vec<Finding> {
    let mut out = Vec::new();
    events.clear();
    let list = &m.modules;
    let listed = |n: &str, b: u64, state: u32| {
        list.iter().any(|m| m.name == n && m.base == b && m.state == state)
    };
    // Gone, or in another state: counted afresh.
    not_live.since.retain(|(n, b), (state, _)| listed(n, *b, *state));
    for md in list.iter().filter(|m| m.state != semantic::MODULE_LIVE) {
        let (_, since) =
            *not_live.since.entry((md.name.clone(), md.base)).or_insert((md.state, now));
        let stayed = now.saturating_duration_since(since);
        if stayed >= not_live.grace {
            let gpa = space.translate(GuestVirtAddr(md.base)).map_or(GuestPhysAddr(0), |t| t.0);
            out.push(
                Finding::new(
                    &format!("module:{}", md.name),
                    FindingKind::Unlisted,
                    Severity::Violation,
                    GuestVirtAddr(md.base),
                    gpa,
                )
                .saying(
                    format!(
                        "module {} has been {} for {} s: its text is not checked while it is not live, \
                         and the kernel leaves a module so only while its init or exit function runs",
                        md.name,
                        semantic::module_state_name(md.state),
                        stayed.as_secs()
                    ),
                    semantic::module_state_name(semantic::MODULE_LIVE).to_owned(),
                    semantic::module_state_name(md.state).to_owned(),
                ),
            );
        }
    }
    let live: Vec<&semantic::Module> =
        list.iter().filter(|m| m.state == semantic::MODULE_LIVE).collect();
    // Known and no longer listed, in any state, at its base.
    let gone: Vec<(String, u64)> = known
        .keys()
        .filter(|(n, b)| !list.iter().any(|m| &m.name == n && m.base == *b))
        .cloned()
        .collect();
    for key in gone {
        let pages = known.remove(&key).map_or(0, |t| t.hashes.len() as u64);
        events.push(ModuleEvent { loaded: false, name: key.0, base: key.1, text_pages: pages });
    }
    for md in live {
        if !semantic::still_live(m, mem, space, md) {
            continue;
        }
        let pages = md.text_size.div_ceil(PAGE_SIZE).min(MAX_MODULE_PAGES);
        let mut hashes = Vec::with_capacity(pages as usize);
        let mut places = Vec::with_capacity(pages as usize);
        let mut bytes = Vec::new();
        for i in 0..pages {
            let va = md.base + i * PAGE_SIZE;
            match semantic::read_virt(mem, space, va, crate::addr::PAGE_BYTES) {
                Some((page, gpa)) => {
                    hashes.push(*blake3::hash(&page).as_bytes());
                    places.push((va, gpa));
                    bytes.extend_from_slice(&page);
                }
                None => break,
            }
        }
        if !semantic::still_live(m, mem, space, md) {
            continue;
        }
        let key = (md.name.clone(), md.base);
        match known.get(&key) {
            None => {
                events.push(ModuleEvent {
                    loaded: true,
                    name: md.name.clone(),
                    base: md.base,
                    text_pages: hashes.len() as u64,
                });
                known.insert(key, ModuleText { hashes, bytes });
            }
            Some(old) => {
                for (i, (h, (va, gpa))) in hashes.iter().zip(&places).enumerate() {
                    if old.hashes.get(i) != Some(h) {
                        let region = format!("module:{}", md.name);
                        let mut f = Finding::new(
                            &region,
                            FindingKind::Content,
                            Severity::Violation,
                            GuestVirtAddr(*va),
                            *gpa,
                        )
                        .saying(
                            format!(
                                "page {i} of the text of module {} changed after it was loaded",
                                md.name
                            ),
                            old.hashes.get(i).map(|h| to_hex(h)).unwrap_or_default(),
                            to_hex(h),
                        );
                        f.page = Some(i as u64);
                        out.push(f);
                    }
                }
            }
        }
    }
    out
}

impl Watched {
    /// Replaces the baseline with the guest's current state, and stores it.
    pub fn rebaseline(&mut self) -> Result<(), WatchError> {
        if self.mem.is_none() {
            self.mem = Some(self.dom.open_memory()?);
        }
        let run = self.dom.run()?;
        let (baseline, originals, bounds) = take_baseline(
            &*self.dom,
            self.mem.as_deref().expect("opened above"),
            run.clone(),
            &mut self.register_snapshots,
            &self.profiles,
        )?;
        self.run = Some(run);
        self.bounds = bounds;
        let originals = store(&self.path, &baseline, originals, self.originals_on_disk)?;
        self.baseline = baseline;
        self.originals = originals;
        self.patch_state = PatchMemory::default();
        self.tags = None;
        // Modules too: each live one is taken up anew at the next check, its
        // text as it is then its reference (a module-loaded event each).
        self.modules.clear();
        self.modules_not_live.since.clear();
        Ok(())
    }

    pub fn pages(&self) -> impl Iterator<Item = (&str, u64)> {
        self.baseline.regions.iter().map(|r| (r.name.as_str(), r.pages.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_BYTES;
    use crate::x86::WalkError;
    use std::time::Duration;

    /// Bounds hit are counted apart from a kernel that is simply not there.
    #[test]
    fn errors_are_counted_by_why() {
        let walk = |source| WatchError::Discover(DiscoverError::Walk { cr3: 0x1000, source });
        assert_eq!(walk(WalkError::TooManyTables(2048)).kind(), "limit_walk_tables");
        assert_eq!(walk(WalkError::TooManyMappings(1 << 19)).kind(), "limit_walk_mappings");
        assert_eq!(
            WatchError::Discover(DiscoverError::NoText { cr3: 0 }).kind(),
            "kernel_not_found"
        );
    }

    /// Where the test's RAM is mapped: page 0 a `struct module`, page 1 its text.
    const W: u64 = 0xffff_ffff_c000_0000;

    /// Guest RAM holding one module, which is unloaded and loaded again at
    /// the same base (not yet live, its text not yet relocated) the moment
    /// its text is read, when `reload` is set.
    struct Reloading {
        now: std::sync::Mutex<crate::memory::RawDump>,
        again: Vec<u8>,
        reload: std::sync::atomic::AtomicBool,
        layout: crate::memory::RamLayout,
    }

    impl GuestMemory for Reloading {
        fn read(
            &self,
            start: GuestPhysAddr,
            buf: &mut [u8],
        ) -> Result<(), crate::memory::MemoryError> {
            let mut now = self.now.lock().unwrap();
            if start.raw() == PAGE_SIZE
                && self.reload.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                *now = crate::memory::RawDump::from_bytes(self.again.clone());
            }
            now.read(start, buf)
        }
        fn layout(&self) -> &crate::memory::RamLayout {
            &self.layout
        }
        fn kind(&self) -> &'static str {
            "raw-dump"
        }
    }

    struct Window;

    impl AddressSpace for Window {
        fn image_pages(&self) -> &[Mapping] {
            &[]
        }
        fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, Perms)> {
            let page = gva.raw().checked_sub(W)? / PAGE_SIZE;
            (page < 2).then(|| {
                (
                    GuestPhysAddr(page * PAGE_SIZE),
                    Perms { writable: false, user: false, executable: true },
                )
            })
        }
    }

    fn lab_profile() -> Profile {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles/6.1.0-56-cloud-amd64.profile");
        Profile::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// Two pages seen through [`Window`]: a `struct module` named `name` in
    /// state `state` at `W`, and its text, every byte `text`, at `W` + 4 KiB.
    fn module_ram(profile: &Profile, name: &[u8], state: u32, text: u8) -> Vec<u8> {
        let off = |k: &str| usize::try_from(profile.offset(k).unwrap()).unwrap();
        let mut ram = vec![text; 2 * PAGE_BYTES];
        ram[..PAGE_BYTES].fill(0);
        ram[off("module.state")..][..4].copy_from_slice(&state.to_le_bytes());
        ram[off("module.name")..][..name.len()].copy_from_slice(name);
        ram[off("module.core_layout.base")..][..8].copy_from_slice(&(W + PAGE_SIZE).to_le_bytes());
        ram
    }

    #[test]
    fn a_module_loaded_again_under_the_read_is_not_a_changed_text() {
        let profile = lab_profile();
        let image = |state: u32, text: u8| module_ram(&profile, b"churn", state, text);
        let md = semantic::Module {
            name: "churn".into(),
            addr: W,
            base: W + PAGE_SIZE,
            size: PAGE_SIZE,
            text_size: PAGE_SIZE,
            state: semantic::MODULE_LIVE,
            init: (0, 0),
        };
        let m =
            semantic::Matched { profile: &profile, modules: vec![md], slide: 0, idt_slide: None };
        let mem = Reloading {
            now: std::sync::Mutex::new(crate::memory::RawDump::from_bytes(image(0, 0xcc))),
            // Coming (1), and its text as it is before relocation.
            again: image(1, 0x90),
            reload: false.into(),
            layout: crate::memory::RamLayout::flat(2 * PAGE_SIZE, "raw-dump").unwrap(),
        };
        let (mut known, mut not_live, mut events) =
            (HashMap::new(), NotLive::default(), Vec::new());
        let now = std::time::Instant::now();
        let found =
            protect_modules((&mut known, &mut not_live), &mut events, &m, &mem, &Window, now);
        assert!(found.is_empty() && events.len() == 1 && events[0].loaded, "{found:?} {events:?}");

        mem.reload.store(true, std::sync::atomic::Ordering::SeqCst);
        let found =
            protect_modules((&mut known, &mut not_live), &mut events, &m, &mem, &Window, now);
        assert!(found.is_empty(), "a reload under the read taken for a change: {found:?}");
        assert!(events.is_empty(), "{events:?}");

        // Once live with other text at the same base, it is a change.
        *mem.now.lock().unwrap() = crate::memory::RawDump::from_bytes(image(0, 0x90));
        let found =
            protect_modules((&mut known, &mut not_live), &mut events, &m, &mem, &Window, now);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].detail.contains("page 0 of the text of module churn changed"),
            "{found:?}"
        );
    }

    /// A module that claims to be unloading: reported once it has stayed so
    /// past the grace, and compared with its old text if it turns live again.
    #[test]
    fn a_module_that_stays_unloading_or_rewrites_itself_meanwhile_is_caught() {
        let profile = lab_profile();
        let image = |state: u32, text: u8| {
            crate::memory::RawDump::from_bytes(module_ram(&profile, b"sly\0", state, text))
        };
        // `None`: not in the module list.
        let matched = |state: Option<u32>| semantic::Matched {
            profile: &profile,
            modules: state
                .map(|state| semantic::Module {
                    name: "sly".into(),
                    addr: W,
                    base: W + PAGE_SIZE,
                    size: PAGE_SIZE,
                    text_size: PAGE_SIZE,
                    state,
                    init: (0, 0),
                })
                .into_iter()
                .collect(),
            slide: 0,
            idt_slide: None,
        };
        let going = semantic::MODULE_GOING;
        let (mut known, mut events) = (HashMap::new(), Vec::new());
        let mut not_live = NotLive { since: HashMap::new(), grace: Duration::from_secs(60) };
        // `u32::MAX` as the state: not listed.
        let t0 = std::time::Instant::now();
        let mut check = |state: u32, mem: &crate::memory::RawDump, at: u64| {
            let m = matched((state != u32::MAX).then_some(state));
            let now = t0 + Duration::from_secs(at);
            let found =
                protect_modules((&mut known, &mut not_live), &mut events, &m, mem, &Window, now);
            (found, events.clone())
        };

        let (found, ev) = check(semantic::MODULE_LIVE, &image(0, 0xcc), 0);
        assert!(found.is_empty() && ev.len() == 1 && ev[0].loaded, "{found:?} {ev:?}");
        // Unloading, its text rewritten: not compared, and not yet reported.
        let (found, ev) = check(going, &image(going, 0x90), 1);
        assert!(found.is_empty(), "{found:?}");
        assert!(ev.is_empty(), "an unloading module still listed is not gone: {ev:?}");
        let (found, _) = check(going, &image(going, 0x90), 59);
        assert!(found.is_empty(), "reported within the grace: {found:?}");
        // Live again with other text: the text it had is what it is held to.
        let (found, ev) = check(semantic::MODULE_LIVE, &image(0, 0x90), 60);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].detail.contains("page 0 of the text of module sly changed"), "{found:?}");
        assert!(ev.is_empty(), "{ev:?}");

        // Unloading again, and staying so: reported once the grace is over,
        // timed from when it last changed state.
        let (found, _) = check(going, &image(going, 0x90), 100);
        assert!(found.is_empty(), "{found:?}");
        let (found, _) = check(going, &image(going, 0x90), 159);
        assert!(found.is_empty(), "{found:?}");
        let (found, _) = check(going, &image(going, 0x90), 161);
        assert_eq!(found.len(), 1, "{found:?}");
        let f = &found[0];
        assert_eq!((f.region.as_str(), f.severity), ("module:sly", Severity::Violation));
        assert!(f.detail.contains("module sly has been unloading for 61 s"), "{}", f.detail);
        assert_eq!((f.gva, f.gpa), (GuestVirtAddr(W + PAGE_SIZE), GuestPhysAddr(PAGE_SIZE)));
        assert_eq!((f.before.as_str(), f.after.as_str()), ("live", "unloading"));

        // Gone from the list: an unload, and nothing more to report.
        let (found, ev) = check(u32::MAX, &image(going, 0x90), 200);
        assert!(found.is_empty() && ev.len() == 1 && !ev[0].loaded, "{found:?} {ev:?}");
        let (found, ev) = check(going, &image(going, 0x90), 201);
        assert!(found.is_empty() && ev.is_empty(), "counted from before it left: {found:?}");

        // Claiming to be loading (a new instance at the same base, for all
        // the list says) does not wipe the slate either: live again with
        // other text, it is a change, and no unload or load was seen.
        let (found, ev) = check(semantic::MODULE_LIVE, &image(0, 0xcc), 300);
        assert!(found.is_empty() && ev.len() == 1 && ev[0].loaded, "{found:?} {ev:?}");
        let coming = semantic::MODULE_COMING;
        let (found, ev) = check(coming, &image(coming, 0x90), 301);
        assert!(found.is_empty() && ev.is_empty(), "{found:?} {ev:?}");
        let (found, ev) = check(semantic::MODULE_LIVE, &image(0, 0x90), 302);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].detail.contains("page 0 of the text of module sly changed"), "{found:?}");
        assert!(ev.is_empty(), "{ev:?}");
        // Gone from the list for one check, then back with other text: a
        // real unload and load, and the new text is the new reference.
        let (found, ev) = check(u32::MAX, &image(0, 0x90), 400);
        assert!(found.is_empty() && ev.len() == 1 && !ev[0].loaded, "{found:?} {ev:?}");
        let (found, ev) = check(semantic::MODULE_LIVE, &image(0, 0xcc), 401);
        assert!(found.is_empty() && ev.len() == 1 && ev[0].loaded, "{found:?} {ev:?}");
    }
}
