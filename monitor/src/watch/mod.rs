//! One watched guest's blocking work: attach (find the kernel, load or
//! take its baseline, decide from what is stored whether this is the boot it
//! was taken of: [`boot`]), check, re-baseline. The daemon runs it on tokio's
//! blocking pool, one per domain, and the fleet bench a hundred of them; the
//! memory source stays open between checks.

pub mod boot;

use std::path::{Path, PathBuf};

use crate::integrity::baseline::{DomainId, Run};
use crate::integrity::check::{CheckError, Scope};
use crate::integrity::tags::PageTags;
use crate::integrity::{Baseline, BaselineError};
use crate::libvirt::{GuestDomain, Hypervisor, LibvirtError, SourceChoice, error_chain};
use crate::linux::KernelReport;
use crate::linux::patch::WallClock;
use crate::linux::region::Region;

use crate::integrity::Originals;
use crate::linux::diff::{Change, Diff};
pub use crate::linux::modules::{MODULE_GRACE, ModuleEvent};
use crate::linux::profile::Profile;
use crate::linux::session::{How, KernelSession};
use crate::linux::{DiscoverError, KernelView, discover, layout};
use crate::memory::GuestMemory;

/// Why a domain could not be attached or checked.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Guest(#[from] GuestError),
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
    /// The check was stopped at its time limit.
    #[error("{0}")]
    OverTime(String),
}

impl WatchError {
    /// A short, stable name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            WatchError::Guest(GuestError::Gone(_)) => "domain_lost",
            WatchError::Guest(GuestError::Memory(_)) => "memory_unreadable",
            WatchError::Guest(GuestError::Hypervisor(_)) => "libvirt",
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
            WatchError::OverTime(_) => "limit_check_time",
        }
    }

    pub fn domain_gone(&self) -> bool {
        matches!(self, WatchError::Guest(GuestError::Gone(_)))
    }

    pub fn message(&self) -> String {
        error_chain(self)
    }
}

/// How an attach found its baseline, as [`boot::decide`] chose.
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
/// (see [`boot`]).
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
    fn ensure_running(&self) -> Result<(), GuestError>;
    fn registers(&self) -> Result<Vec<crate::x86::VcpuRegisters>, GuestError>;
    /// The hypervisor's run of the guest (its emulator process).
    fn run(&self) -> Result<Run, GuestError>;
    /// Whether the guest is paused (an emulator started `-incoming` is
    /// paused until its memory has all arrived).
    fn paused(&self) -> bool {
        false
    }
    fn open_memory(&self) -> Result<Box<dyn GuestMemory + Send + Sync>, GuestError>;
    /// The guest's memory size, for evidence limits.
    fn memory_bytes(&self) -> Result<u64, GuestError>;
    /// Writes the guest's memory to `path` as an ELF core (evidence).
    fn dump_memory(&self, path: &Path) -> Result<(), GuestError>;
}

impl Guest for GuestDomain {
    fn name(&self) -> &str {
        &self.name
    }
    fn uuid(&self) -> &str {
        &self.uuid
    }
    fn ensure_running(&self) -> Result<(), GuestError> {
        Ok(GuestDomain::ensure_running(self)?)
    }
    fn registers(&self) -> Result<Vec<crate::x86::VcpuRegisters>, GuestError> {
        Ok(GuestDomain::registers(self)?)
    }
    fn run(&self) -> Result<Run, GuestError> {
        Ok(GuestDomain::run(self)?)
    }
    fn paused(&self) -> bool {
        self.state_text() == "paused"
    }
    fn open_memory(&self) -> Result<Box<dyn GuestMemory + Send + Sync>, GuestError> {
        Ok(GuestDomain::open_memory(self, SourceChoice::Auto)?)
    }
    fn memory_bytes(&self) -> Result<u64, GuestError> {
        Ok(GuestDomain::memory_bytes(self)?)
    }
    fn dump_memory(&self, path: &Path) -> Result<(), GuestError> {
        Ok(GuestDomain::dump_memory(self, path)?)
    }
}

/// Why a guest could not give what was asked, whatever the hypervisor
/// (libvirt's errors, a bench's or a test's own), as the watch tells them
/// apart; the message is the cause's own.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The guest no longer runs, or is no longer there.
    #[error(transparent)]
    Gone(BoxError),
    /// Its memory cannot be read.
    #[error(transparent)]
    Memory(BoxError),
    /// The hypervisor failed otherwise.
    #[error(transparent)]
    Hypervisor(BoxError),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl From<LibvirtError> for GuestError {
    fn from(e: LibvirtError) -> Self {
        match e {
            LibvirtError::NotRunning { .. } | LibvirtError::NoDomain(_) => {
                GuestError::Gone(Box::new(e))
            }
            LibvirtError::Memory { .. } => GuestError::Memory(Box::new(e)),
            _ => GuestError::Hypervisor(Box::new(e)),
        }
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
    /// What one check leaves the next: patch sites accepted, records seen
    /// lately, modules' text, unlisted memory seen before.
    pub(crate) session: KernelSession,
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
    /// How long a check may run (see [`Watched::set_time_limit`]).
    time_limit: Option<std::time::Duration>,
}

use crate::paths::baseline_path;

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
) -> Result<(Vec<crate::x86::VcpuRegisters>, KernelView<'m, Memory>), WatchError> {
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
    // Proved against the vendor's image: what the guest held before vigil
    // first looked is not taken on trust where a reference exists.
    let proof = crate::linux::reference::prove(mem, &view, profiles, None, &WallClock);
    baseline.reference = Some(proof.check);
    // The hooks now, to show in a diff those added since (none kept
    // without a profile: a diff then says hooks are not compared).
    baseline.hooks = crate::linux::hooks::Inventory::of_guest(
        profiles,
        mem,
        &view,
        view.identification.image_base,
    )
    .ok()
    .map(|(inventory, _)| inventory.summaries());
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
    let dropped = stored.keep_head(&Region::Rodata.name(), |g| !b.in_gap(g)).ok_or_else(|| {
        format!(
            "the stored baseline predates layout bounds and its rodata pages in the freed gaps \
                 ({}) are not its tail: they stay protected by content until the next baseline",
            b.describe()
        )
    })?;
    stored.kernel.bounds = b.describe();
    stored.kernel.rodata_pages =
        stored.region(&Region::Rodata.name()).map_or(0, |r| r.pages.len() as u64);
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
            session: KernelSession::across_checks(MODULE_GRACE),
            tags: None,
            originals_on_disk: false,
            register_snapshots: 0,
            problems: Vec::new(),
            run: None,
            provisional_left: None,
            profiles: std::sync::Arc::from(Vec::new()),
            bounds: Err("not yet bounded".into()),
            time_limit: None,
        }
    }

    /// Finds the kernel of a running domain and decides, from what the
    /// hypervisor says (`known`, and the domain's QEMU process now) and where
    /// the kernel sits, whether to check against its stored baseline or take
    /// a new one ([`boot::decide`]). Problems with the stored state
    /// are in [`Watched::problems`] afterwards.
    pub fn attach(
        hv: &Hypervisor,
        uuid: &str,
        state_dir: &Path,
        known: &Knowledge,
        settings: AttachSettings,
    ) -> Result<(Self, Attached), WatchError> {
        let dom = hv.domain(uuid).map_err(GuestError::from)?;
        Self::attach_guest(Box::new(dom), state_dir, known, settings)
    }

    /// [`Watched::attach`] for any [`Guest`].
    pub fn attach_guest(
        dom: Box<dyn Guest>,
        state_dir: &Path,
        known: &Knowledge,
        settings: AttachSettings,
    ) -> Result<(Self, Attached), WatchError> {
        use self::boot::{Action, Placement, Signal, Stored, decide};
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
        let mut attached = attached_as(action, signal, &run, found.as_ref(), (then, now));
        let (baseline, originals, bounds) = match (&attached, found) {
            (Attached::Stored | Attached::Remapped { .. }, Some(mut stored)) => {
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
                let (originals, problem) =
                    stored_originals(&path, &stored, settings.originals_on_disk, dom.name())?;
                problems.extend(problem);
                // Bounded after its files are read as stored (the pages file
                // holds the pages the baseline had).
                let bounds = bound_stored(&mut stored, &*mem, &view, &settings.profiles);
                drop(view);
                (stored, originals, bounds)
            }
            _ => {
                drop(view);
                // The new baseline is read before anything stored is moved:
                // should the read fail, the next attach finds the same files
                // and decides (and says) the same.
                let (baseline, originals, bounds) =
                    take_baseline(&*dom, &*mem, run.clone(), &mut snapshots, &settings.profiles)?;
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
                (baseline, originals, bounds)
            }
        };
        let mut w = Self::new(dom, mem, baseline, path, originals);
        w.originals_on_disk = settings.originals_on_disk;
        w.register_snapshots = snapshots;
        w.problems = problems;
        w.run = Some(run);
        w.profiles = settings.profiles;
        w.bounds = bounds;
        // Only a new baseline of a new boot or first sight is provisional.
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
        self.session.set_module_grace(grace);
    }

    /// How long a check may run before it stops between two of its stages
    /// (`schedule.check_timeout`); `None`: as long as it takes.
    pub fn set_time_limit(&mut self, limit: Option<std::time::Duration>) {
        self.time_limit = limit;
    }

    /// Bytes of the guest's tables and records one check may hold (see
    /// `limits.guest_memory`).
    pub fn set_guest_memory(&mut self, bytes: u64) {
        self.session.set_guest_memory(bytes);
    }

    /// Baseline pages whose original bytes were not kept for want of room
    /// ([`crate::integrity::originals::MAX_HELD`]): kept as hashes only.
    pub fn originals_left_out(&self) -> usize {
        self.originals.left_out()
    }

    /// Module text kept whole, in bytes (see `limits.module_text`).
    pub fn set_module_text(&mut self, bytes: u64) {
        self.session.set_module_text(bytes);
    }

    /// vCPU register snapshots asked for since the last call (checks,
    /// baselines, failures alike): each is a libvirt and QEMU round trip,
    /// and more than one per check, attach and baseline means snapshots
    /// taken again.
    pub fn take_register_snapshots(&mut self) -> u64 {
        std::mem::take(&mut self.register_snapshots)
    }

    /// When a patch site the last check held is judged for the last time
    /// (see [`KernelSession::take_patch_hold_end`]), once.
    pub fn take_patch_hold_end(&mut self) -> Option<std::time::Instant> {
        self.session.take_patch_hold_end()
    }

    /// Compares the guest with the baseline over `scope`.
    pub fn check(
        &mut self,
        scope: Scope,
        profiles: &[Profile],
    ) -> Result<KernelReport, WatchError> {
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
            format!("live {}", report.check.source),
            changes,
            self.session.hooks.as_ref(),
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
    ) -> Result<KernelReport, WatchError> {
        match self.check_open(scope, profiles, changes) {
            Err(e) if !e.domain_gone() => match self.dom.ensure_running() {
                Err(gone @ GuestError::Gone(_)) => Err(gone.into()),
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
    ) -> Result<KernelReport, WatchError> {
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
        let how = How {
            scope,
            tags: self.tags.as_ref(),
            changes: changes.is_some(),
            clock: &WallClock,
            deadline: self.time_limit.map(crate::integrity::check::Deadline::after),
        };
        let examined = self
            .session
            .examine((&self.baseline, &self.originals), mem, (&view, &regs), profiles, how)
            .map_err(|e| match e {
                CheckError::Read(e) => WatchError::Baseline(e),
                e @ CheckError::OverTime { .. } => WatchError::OverTime(e.to_string()),
            })?;
        self.profile = examined.report.kernel.profile.clone();
        if let Some(out) = changes {
            *out = examined.changes;
        }
        Ok(examined.report)
    }
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
        self.tags = None;
        self.session.new_baseline();
        Ok(())
    }

    pub fn pages(&self) -> impl Iterator<Item = (&str, u64)> {
        self.baseline.regions.iter().map(|r| (r.name.as_str(), r.pages.len() as u64))
    }
}

/// How an attach that `decide` gave `action` (on `signal`) found its
/// baseline, said for the operator. `boots` is the stored baseline's boot
/// and the guest's now.
fn attached_as(
    action: boot::Action,
    signal: boot::Signal,
    run: &Run,
    found: Option<&Baseline>,
    (then, now): (String, String),
) -> Attached {
    use self::boot::{Action, Signal};
    match action {
        Action::UseStored => Attached::Stored,
        Action::Remapped => Attached::Remapped { then, now },
        Action::NewBoot { .. } => Attached::NewBoot {
            why: match signal {
                Signal::Reset => "libvirt reported a reset of the guest".into(),
                Signal::Incoming => format!(
                    "a new {run} received the guest's memory holding another kernel than the baseline's \
                     (restored or migrated from another save)"
                ),
                _ => match found.and_then(|b| b.run.as_ref()) {
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
    }
}

/// The original pages kept beside the stored baseline at `path`. Without
/// them the baseline still protects but cannot tell the kernel's patches
/// from an attack: that is a problem to report, and a file that exists but
/// cannot be used is kept aside.
fn stored_originals(
    path: &Path,
    stored: &Baseline,
    on_disk: bool,
    name: &str,
) -> Result<(Originals, Option<StateProblem>), WatchError> {
    let pages = Originals::path_for(path);
    let loaded = if on_disk {
        Originals::load_indexed(&pages, stored)
    } else {
        Originals::load(&pages, stored)
    };
    match loaded {
        Ok(o) => Ok((o, None)),
        Err(e) => {
            let missing = matches!(&e, BaselineError::Open { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound);
            let kept = if missing {
                "the file is missing".into()
            } else {
                format!("the file is kept as {}", keep_aside(&pages)?.display())
            };
            let problem = StateProblem {
                file: pages.display().to_string(),
                detail: format!(
                    "the original pages of {name}'s baseline cannot be used: {}; {kept}. Until the \
                     next baseline, the kernel's own patches cannot be told from attacks: every \
                     change to its text is reported as a violation",
                    error_chain(&e)
                ),
            };
            Ok((Originals::default(), Some(problem)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86::WalkError;

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
}
