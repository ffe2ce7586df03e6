//! One watched domain's blocking work: attach (find the kernel, load or
//! take its baseline), check, re-baseline. Runs on tokio's blocking pool; the
//! memory source stays open between checks.

use std::path::{Path, PathBuf};

use crate::integrity::baseline::DomainId;
use crate::integrity::check::{CheckError, Report, Scope, check_scoped};
use crate::integrity::{Baseline, BaselineError};
use crate::libvirt::{GuestDomain, Hypervisor, LibvirtError, SourceChoice, error_chain};
use std::collections::HashMap;

use crate::addr::{GuestVirtAddr, PAGE_SIZE};
use crate::integrity::baseline::to_hex;
use crate::integrity::{AddressSpace, Finding, FindingKind, Severity};
use crate::linux::profile::Profile;
use crate::linux::{DiscoverError, discover, semantic};
use crate::memory::GuestMemory;

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
    DifferentBoot(String),
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
            WatchError::Discover(_) => "kernel_not_found",
            WatchError::Baseline(BaselineError::Read { .. }) => "memory_unreadable",
            WatchError::Baseline(_) => "baseline_file",
            WatchError::DifferentBoot(_) => "different_boot",
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

/// How an attach found its baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// The stored baseline is of this very boot: checked against, not replaced.
    Stored,
    /// A new baseline was taken (first sight, or a new boot).
    New,
}

/// A domain being watched.
pub struct Watched {
    pub dom: GuestDomain,
    mem: Option<Box<dyn GuestMemory + Send + Sync>>,
    pub baseline: Baseline,
    pub path: PathBuf,
    /// The guest profile the kernel matched at the last check, if any.
    pub profile: Option<String>,
    /// Live modules' text, hashed page by page when first seen: (name, base)
    /// to page hashes. Kept in memory: a restarted daemon protects modules
    /// from when it sees them again.
    modules: HashMap<(String, u64), Vec<[u8; 32]>>,
    /// Modules seen loaded or unloaded by the last check.
    pub module_events: Vec<ModuleEvent>,
    /// Names from the guest's own kallsyms, read once when no profile
    /// matches and something needs naming (lower trust).
    guest_symbols: Option<Option<semantic::GuestSymbols>>,
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

/// Where a domain's baseline is kept (the same place `vigil baseline` uses).
pub fn baseline_path(state_dir: &Path, uuid: &str) -> PathBuf {
    state_dir.join("baselines").join(format!("{uuid}.json"))
}

fn take_baseline(
    dom: &GuestDomain,
    mem: &(dyn GuestMemory + Send + Sync),
) -> Result<Baseline, WatchError> {
    let regs = dom.registers()?;
    let view = discover(mem, &regs)?;
    let id = DomainId { name: dom.name.clone(), uuid: dom.uuid.clone() };
    Ok(Baseline::build(mem, id, view.identification.clone(), regs, &view, &view.regions)?)
}

impl Watched {
    /// Finds the kernel of a running domain and loads its stored baseline if
    /// it is of the current boot, or takes and stores a new one.
    pub fn attach(
        hv: &Hypervisor,
        uuid: &str,
        state_dir: &Path,
    ) -> Result<(Self, Attached), WatchError> {
        let dom = hv.domain(uuid)?;
        dom.ensure_running()?;
        let mem = dom.open_memory(SourceChoice::Auto)?;
        let regs = dom.registers()?;
        let view = discover(&*mem, &regs)?;
        let boot = view.identification.boot_key();
        let path = baseline_path(state_dir, &dom.uuid);
        if let Ok(stored) = Baseline::load(&path)
            && stored.domain.uuid == dom.uuid
            && stored.kernel.boot_key() == boot
        {
            drop(view);
            return Ok((
                Self {
                    dom,
                    mem: Some(mem),
                    baseline: stored,
                    path,
                    profile: None,
                    modules: HashMap::new(),
                    module_events: Vec::new(),
                    guest_symbols: None,
                },
                Attached::Stored,
            ));
        }
        drop(view);
        let baseline = take_baseline(&dom, &*mem)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| BaselineError::Write {
                path: dir.display().to_string(),
                source,
            })?;
        }
        baseline.save(&path)?;
        Ok((
            Self {
                dom,
                mem: Some(mem),
                baseline,
                path,
                profile: None,
                modules: HashMap::new(),
                module_events: Vec::new(),
                guest_symbols: None,
            },
            Attached::New,
        ))
    }

    pub fn boot(&self) -> String {
        self.baseline.kernel.boot_key()
    }

    /// Compares the guest with the baseline over `scope`.
    pub fn check(&mut self, scope: Scope, profiles: &[Profile]) -> Result<Report, WatchError> {
        let r = self.check_inner(scope, profiles);
        if r.is_err() {
            self.mem = None; // re-open on the next check
        }
        r
    }

    fn check_inner(&mut self, scope: Scope, profiles: &[Profile]) -> Result<Report, WatchError> {
        self.dom.ensure_running()?;
        if self.mem.is_none() {
            self.mem = Some(self.dom.open_memory(SourceChoice::Auto)?);
        }
        let mem = self.mem.as_deref().expect("opened above");
        let regs = self.dom.registers()?;
        let view = discover(mem, &regs)?;
        match check_scoped(&self.baseline, mem, &view, &regs, view.identification.image_base, scope)
        {
            Ok(mut r) => {
                // Syscall tables and IDT gates are small: both scopes check them.
                self.profile = None;
                if let Some(mut m) =
                    semantic::match_profile(profiles, mem, &view, view.identification.image_base)
                {
                    let known =
                        crate::integrity::baseline::expand_runs(&self.baseline.exec_outside_image)
                            .unwrap_or_default();
                    let found = semantic::check(&mut m, mem, &view, &regs, &known);
                    self.profile = Some(m.profile.release.clone());
                    r.profile = self.profile.clone();
                    r.add_findings(found);
                    let module_findings = protect_modules(
                        &mut self.modules,
                        &mut self.module_events,
                        &m.modules,
                        mem,
                        &view,
                    );
                    r.add_findings(module_findings);
                    r.symbolize(|gva| m.symbol_of(gva));
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
            Err(e @ CheckError::DifferentBoot { .. }) => {
                Err(WatchError::DifferentBoot(e.to_string()))
            }
            Err(CheckError::Read(e)) => Err(WatchError::Baseline(e)),
        }
    }
}

/// Hashes the text of live modules first seen now, compares the text of
/// those seen before, and notes loads and unloads in `events`.
fn protect_modules(
    known: &mut HashMap<(String, u64), Vec<[u8; 32]>>,
    events: &mut Vec<ModuleEvent>,
    list: &[semantic::Module],
    mem: &(dyn GuestMemory + Send + Sync),
    space: &dyn AddressSpace,
) -> Vec<Finding> {
    let mut out = Vec::new();
    events.clear();
    let live: Vec<&semantic::Module> =
        list.iter().filter(|m| m.state == semantic::MODULE_LIVE).collect();
    let gone: Vec<(String, u64)> = known
        .keys()
        .filter(|(n, b)| !live.iter().any(|m| &m.name == n && m.base == *b))
        .cloned()
        .collect();
    for key in gone {
        let pages = known.remove(&key).map_or(0, |v| v.len() as u64);
        events.push(ModuleEvent { loaded: false, name: key.0, base: key.1, text_pages: pages });
    }
    for m in live {
        let pages = m.text_size.div_ceil(PAGE_SIZE).min(MAX_MODULE_PAGES);
        let mut hashes = Vec::with_capacity(pages as usize);
        let mut places = Vec::with_capacity(pages as usize);
        for i in 0..pages {
            let va = m.base + i * PAGE_SIZE;
            match semantic::read_virt(mem, space, va, crate::addr::PAGE_BYTES) {
                Some((bytes, gpa)) => {
                    hashes.push(*blake3::hash(&bytes).as_bytes());
                    places.push((va, gpa));
                }
                None => break,
            }
        }
        let key = (m.name.clone(), m.base);
        match known.get(&key) {
            None => {
                events.push(ModuleEvent {
                    loaded: true,
                    name: m.name.clone(),
                    base: m.base,
                    text_pages: hashes.len() as u64,
                });
                known.insert(key, hashes);
            }
            Some(old) => {
                for (i, (h, (va, gpa))) in hashes.iter().zip(&places).enumerate() {
                    if old.get(i) != Some(h) {
                        out.push(Finding {
                            region: format!("module:{}", m.name),
                            kind: FindingKind::Content,
                            severity: Severity::Violation,
                            gva: GuestVirtAddr(*va),
                            gpa: *gpa,
                            page: Some(i as u64),
                            vcpu: None,
                            register: None,
                            detail: format!(
                                "page {i} of the text of module {} changed after it was loaded",
                                m.name
                            ),
                            before: old.get(i).map(|h| to_hex(h)).unwrap_or_default(),
                            after: to_hex(h),
                            symbol: None,
                        });
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
            self.mem = Some(self.dom.open_memory(SourceChoice::Auto)?);
        }
        let baseline = take_baseline(&self.dom, self.mem.as_deref().expect("opened above"))?;
        baseline.save(&self.path)?;
        self.baseline = baseline;
        Ok(())
    }

    pub fn pages(&self) -> impl Iterator<Item = (&str, u64)> {
        self.baseline.regions.iter().map(|r| (r.name.as_str(), r.pages.len() as u64))
    }
}
