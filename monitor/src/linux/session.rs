//! One examination of a guest's kernel against its baseline, the same for
//! `vigil check` and `vigil diff` (a fresh session each time) and for the
//! daemon (one session per watched domain, kept from check to check):
//! pages, mappings and registers against the baseline; then, with a
//! profile, the semantic checks, the module-area records, module text and
//! the kernel's patch records, and names; without one, names from the
//! guest's own kallsyms. The session keeps what one check leaves the next:
//! patch sites accepted, records seen lately, modules' text, unlisted memory
//! seen before.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use crate::integrity::check::{CheckError, Deadline, Scope, check_tagged};
use crate::integrity::tags::PageTags;
use crate::integrity::{
    AddressSpace, Baseline, Finding, FindingKind, Originals, RegionKind, Severity,
};
use crate::memory::GuestMemory;
use crate::x86::VcpuRegisters;
use crate::x86::{Mapping, Perms};

use super::diff::{self, Change, Namer};
use super::hooks::{HookPolicy, Inventory};
use super::modules::{KnownModules, ModuleEvent, NotLive, protect_modules};
use super::patch::{self, PatchMemory, RECORD_GRACE, WallClock};
use super::profile::Profile;
use super::region::Region;
use super::{DiscoverError, KernelReport, KernelView, discover, semantic};

/// How long executable module-area memory that no record accounts for must
/// stay so, seen at every check meanwhile, before a session that lives
/// across checks reports it. The kernel maps some memory executable a moment
/// before it records it (a kprobe slot page, an ftrace trampoline) and frees
/// some a while after it drops the record (a module's init text goes after
/// an RCU grace period, from a workqueue): seconds, in a slow guest.
const UNLISTED_PERSIST: Duration = Duration::from_secs(8);

/// Module loads and unloads kept for the daemon between two checks it
/// takes them from, at most: checks that keep failing while modules churn
/// keep the first this many.
pub const MAX_MODULE_EVENTS: usize = 4096;

/// Pages of the module area a record accounted for lately, kept at most
/// (two module areas' worth): past it a page recognized now is not kept for
/// the next checks' grace, and is judged by the records those read.
const MAX_RECOGNIZED: usize = 1 << 19;

/// What one check leaves for the next, for one guest.
#[derive(Default)]
pub struct KernelSession {
    /// Whether checks follow one another (the daemon): module text is
    /// compared with what it was, and unlisted executable memory is reported
    /// once it persisted. A one-shot session (the CLI) reports such memory at
    /// once and has no module text to compare.
    across_checks: bool,
    /// Patch sites accepted by the last checks, and patch records seen lately.
    patch: PatchMemory,
    /// Live modules' text, kept when first seen. Kept in memory: a restarted
    /// daemon protects modules from when it sees them again.
    modules: KnownModules,
    /// Modules seen loaded or unloaded since these were last taken (by the
    /// checks since, a stopped one too), at most [`MAX_MODULE_EVENTS`].
    pub module_events: Vec<ModuleEvent>,
    /// Listed modules that are not live, and for how long.
    modules_not_live: NotLive,
    /// Executable pages of the module area that a kernel record (the module
    /// list, an ftrace trampoline, a kprobe slot, a BPF image) accounted for,
    /// as (virtual, physical), with when a record last did. The kernel drops
    /// a record some time before it frees the memory (an RCU grace period
    /// apart), so such a page stays accounted for up to [`RECORD_GRACE`].
    recognized: HashMap<(u64, u64), Instant>,
    /// Unlisted executable runs seen by the last check, as (virtual,
    /// physical) of their start, with when first seen in a row: reported
    /// once seen for [`UNLISTED_PERSIST`].
    unlisted_seen: HashMap<(u64, u64), Instant>,
    /// Names from the guest's own kallsyms, read once when no profile
    /// matches and something needs naming (lower trust).
    guest_symbols: Option<Option<semantic::GuestSymbols>>,
    /// What to make of hooks (the modules allowed to hook).
    pub hook_policy: HookPolicy,
    /// The hooks the last examination read (none: no profile matched).
    pub hooks: Option<Inventory>,
    /// What one examination may hold of the guest's tables and records
    /// (`None`: [`semantic::ReadBudget::DEFAULT`]).
    guest_memory: Option<u64>,
}

/// How to examine.
#[derive(Clone, Copy)]
pub struct How<'a> {
    pub scope: Scope,
    /// The baseline pages' NH tags (see [`check_tagged`]).
    pub tags: Option<&'a PageTags>,
    /// Whether to make every change's bytes and code, as `vigil diff` shows
    /// them. Such an examination leaves the session as it was, but for the
    /// records and modules it saw.
    pub changes: bool,
    /// The time, and pauses while the kernel finishes patching a site.
    pub clock: &'a dyn patch::Clock,
    /// When to stop, between stages (`None`: never).
    pub deadline: Option<Deadline>,
}

/// What an examination found.
pub struct Examined {
    pub report: KernelReport,
    /// The changes, with their bytes (when asked for).
    pub changes: Vec<Change>,
    /// Said to the operator, not findings (no profile matched, ...).
    pub warnings: Vec<String>,
    /// The hooks read, when a profile matched (one-shot examinations only;
    /// a session keeps them in [`KernelSession::hooks`]).
    pub hooks: Option<Inventory>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExamineError {
    #[error("kernel not found")]
    Discover(#[from] DiscoverError),
    #[error(transparent)]
    Check(#[from] CheckError),
}

/// Examines `mem` against `baseline` (and its `originals`) once, as
/// `vigil check` and `vigil diff` do: a fresh session, judging hooks by
/// `hooks`.
pub fn examine_once<M: GuestMemory + ?Sized>(
    baseline: &Baseline,
    originals: &Originals,
    mem: &M,
    regs: &[VcpuRegisters],
    profiles: &[Profile],
    with_changes: bool,
    hooks: &HookPolicy,
) -> Result<Examined, ExamineError> {
    let view = discover(mem, regs)?;
    let how = How {
        scope: Scope::Full,
        tags: None,
        changes: with_changes,
        clock: &WallClock,
        deadline: None,
    };
    let mut session = KernelSession::one_shot();
    session.hook_policy = hooks.clone();
    let mut e = session.examine((baseline, originals), mem, (&view, regs), profiles, how)?;
    e.hooks = session.hooks.take();
    Ok(e)
}

impl KernelSession {
    /// A session for one examination.
    pub fn one_shot() -> Self {
        KernelSession::default()
    }

    /// A session that follows a guest from check to check; modules may stay
    /// loading or unloading for `module_grace`.
    pub fn across_checks(module_grace: Duration) -> Self {
        let mut s = KernelSession {
            across_checks: true,
            patch: PatchMemory::holding(patch::PENDING_HOLD),
            ..KernelSession::default()
        };
        s.modules_not_live.grace = module_grace;
        s
    }

    /// How long a listed module may stay loading or unloading (its text
    /// unchecked) before that is a violation.
    pub fn set_module_grace(&mut self, grace: Duration) {
        self.modules_not_live.grace = grace;
    }

    /// Bytes of the guest's tables and records one examination may hold
    /// (`limits.guest_memory`).
    pub fn set_guest_memory(&mut self, bytes: u64) {
        self.guest_memory = Some(bytes);
    }

    /// Host memory the session holds from check to check, by what holds it:
    /// the modules' text kept whole (and their page hashes), and the rest.
    pub fn held_bytes(&self) -> (u64, u64) {
        use crate::memory::held;
        let text: u64 = self.modules.values().map(|t| held::vec(&t.bytes)).sum();
        let modules: u64 = held::map(&self.modules)
            + self
                .modules
                .iter()
                .map(|((n, _), t)| held::string(n) + held::vec(&t.hashes))
                .sum::<u64>()
            + held::map(&self.modules_not_live.since)
            + self.modules_not_live.since.keys().map(|(n, _)| held::string(n)).sum::<u64>()
            + held::vec(&self.module_events)
            + self.module_events.iter().map(|e| held::string(&e.name)).sum::<u64>();
        let symbols = match &self.guest_symbols {
            Some(Some(g)) => g.held_bytes(),
            _ => 0,
        };
        let rest = modules
            + self.patch.held_bytes()
            + held::map(&self.recognized)
            + held::map(&self.unlisted_seen)
            + symbols
            + self.hooks.as_ref().map_or(0, Inventory::held_bytes);
        (text, rest)
    }

    /// Module text kept whole, in bytes, across the domain's modules.
    pub fn set_module_text(&mut self, bytes: u64) {
        self.modules_not_live.keep = bytes;
    }

    /// When a patch site held by the last examination (its bytes disagree
    /// with its record, the kernel perhaps still updating it) is to be
    /// judged for the last time: a full check is due then. Taken: each
    /// examination's answer is given once.
    pub fn take_patch_hold_end(&mut self) -> Option<Instant> {
        self.patch.held_until.take()
    }

    /// Forgets what was accepted and known under an earlier baseline:
    /// patch sites, and modules (each live one is taken up anew at the next
    /// check, its text as it is then its reference, a module-loaded event
    /// each).
    pub fn new_baseline(&mut self) {
        self.patch = match self.across_checks {
            true => PatchMemory::holding(patch::PENDING_HOLD),
            false => PatchMemory::default(),
        };
        self.modules.clear();
        self.modules_not_live.since.clear();
    }

    /// Examines the guest (`mem`, its kernel `view` and vCPU registers)
    /// against `baseline` and its `originals`.
    pub fn examine<M: GuestMemory + ?Sized>(
        &mut self,
        (baseline, originals): (&Baseline, &Originals),
        mem: &M,
        (view, regs): (&KernelView<'_, M>, &[VcpuRegisters]),
        profiles: &[Profile],
        how: How<'_>,
    ) -> Result<Examined, CheckError> {
        // Loops over guest data (list walks, the kallsyms search) stop at
        // the deadline too, and the stage after them fails the check.
        let _running = Deadline::enter(how.deadline);
        // One budget per domain: what the watch holds from check to check
        // is counted first; the modules' text kept whole and this
        // examination's reads share the rest.
        let limit = self.guest_memory.unwrap_or(semantic::ReadBudget::DEFAULT);
        let (text, rest) = self.held_bytes();
        let held = text
            + rest
            + baseline.held_bytes()
            + originals.held_bytes()
            + how.tags.map_or(0, PageTags::held_bytes);
        // Module text kept whole leaves a quarter of the budget to the
        // reads, so that a guest's many modules do not make its kernel's
        // own tables go unread.
        self.modules_not_live.room = (limit - limit / 4).saturating_sub(held - text);
        // Read again below when a profile matches; never an earlier check's
        // (counted above: it is held until then).
        self.hooks = None;
        let mut r = KernelReport::of(check_tagged(baseline, mem, view, regs, how.scope, how.tags)?);
        r.kernel.guest_memory_held = held;
        r.kernel.guest_memory_limit = limit;
        Deadline::check(how.deadline, "the page and mapping check")?;
        // What differed from the vendor's image when the baseline was taken
        // stays a violation at every check: it was never good.
        if let Some(rc) = &baseline.reference {
            r.kernel.reference = Some(rc.state.as_str().to_owned());
            r.check.add_findings(rc.mismatches.clone());
        }
        semantic::review_gdt_pages(&mut r.check, mem, &baseline.registers, &|gva| {
            originals.page(gva)
        });
        let code: Vec<&str> = baseline
            .regions
            .iter()
            .filter(|g| g.kind == RegionKind::Code)
            .map(|g| g.name.as_str())
            .collect();
        let is_code = |region: &str| code.contains(&region) || Region::is_module(region);
        let mut warnings = Vec::new();
        let mut changes = Vec::new();
        // Syscall tables and IDT gates are small: both scopes check them.
        match semantic::match_profile(profiles, mem, view, view.identification.image_base) {
            Some(mut m) => {
                m.reads = semantic::ReadBudget::new(limit).holding(held);
                let (found, now) = self.records(&mut m, baseline, (mem, view, regs), how);
                Deadline::check(how.deadline, "the kernel's records and hooks")?;
                r.kernel.profile = Some(m.profile.release.clone());
                r.check.add_findings(found);
                if self.across_checks {
                    let mut seen = Vec::new();
                    let found = protect_modules(
                        (&mut self.modules, &mut self.modules_not_live),
                        &mut seen,
                        &m,
                        mem,
                        view,
                        now,
                    );
                    // Kept until taken, so that a check stopped after this
                    // (its time ran out) loses no load or unload.
                    let room = MAX_MODULE_EVENTS.saturating_sub(self.module_events.len());
                    self.module_events.extend(seen.into_iter().take(room));
                    Deadline::check(how.deadline, "the modules' text")?;
                    r.check.add_findings(found);
                }
                if originals.is_empty() {
                    warnings.push(
                        "the baseline's original pages are missing: kernel patches cannot be told from attacks"
                            .into(),
                    );
                }
                let mut scratch;
                let state = if how.changes {
                    // A diff shows every change as it is: nothing held.
                    scratch = self.patch.unheld();
                    &mut scratch
                } else {
                    &mut self.patch
                };
                let text = CheckedText::new(baseline, originals, &self.modules, how.scope);
                let accepted = patch::review(&mut r, &m, (mem, view), &text, state, how.clock);
                Deadline::check(how.deadline, "the patch review")?;
                r.kernel.guest_memory = m.reads.used();
                r.kernel.guest_memory_refused = m.reads.refused();
                if let Some(why) = &r.kernel.guest_memory_refused {
                    warnings.push(format!(
                        "the guest's tables and records pass the memory budget ({why}): those past it went unread"
                    ));
                }
                r.check.symbolize(|gva| m.symbol_of(gva));
                if how.changes {
                    let locate = |a: u64| {
                        let here = m.locate(a);
                        match m.profile.nearest(a.wrapping_sub(m.slide)) {
                            Some((name, off)) if here == "nowhere known" => {
                                format!("{name}+{off:#x} (kernel data)")
                            }
                            _ => here,
                        }
                    };
                    let start = |a: u64| {
                        m.profile.symbolize(a.wrapping_sub(m.slide)).map(|(_, off)| a - off)
                    };
                    let namer = Namer { locate: &locate, function_start: &start };
                    let modules = &self.modules;
                    let module_original = |a: u64, n: u64| {
                        modules.iter().find_map(|((_, base), t)| {
                            let off = usize::try_from(a.checked_sub(*base)?).ok()?;
                            t.bytes
                                .get(off..off.checked_add(usize::try_from(n).ok()?)?)
                                .map(<[u8]>::to_vec)
                        })
                    };
                    changes = diff::changes(
                        &r.check,
                        &accepted,
                        mem,
                        view,
                        originals,
                        &module_original,
                        &is_code,
                        &namer,
                    );
                }
                r.kernel.modules = m.modules.iter().map(|md| md.name.clone()).collect();
                r.kernel.hooks = self.hooks.as_ref().map(Inventory::counts);
                for region in semantic::regions() {
                    r.check.cover(&region.name());
                }
            }
            None => {
                warnings.push(
                    "no guest profile matches the kernel: page, mapping and register checks only"
                        .into(),
                );
                // Names from the guest's own kallsyms (read once), marked
                // as lower trust.
                if !r.check.intact || how.changes {
                    let syms = self.guest_symbols.get_or_insert_with(|| {
                        view.regions
                            .iter()
                            .find(|g| g.kind == RegionKind::ReadOnlyData)
                            .and_then(|ro| semantic::GuestSymbols::read(mem, ro))
                    });
                    if let Some(syms) = syms {
                        name_text_changes(&mut r.check, mem, originals, &is_code, &|a| {
                            syms.locate(a)
                        });
                        r.check.symbolize(|gva| syms.locate(gva));
                    } else if Deadline::passed() {
                        // Stopped, not absent: looked for again next time.
                        self.guest_symbols = None;
                    }
                    Deadline::check(how.deadline, "naming from the guest's kallsyms")?;
                }
                if how.changes {
                    let syms = self.guest_symbols.as_ref().and_then(Option::as_ref);
                    let locate = |a: u64| {
                        syms.and_then(|s| s.locate(a)).unwrap_or_else(|| format!("{a:#x}"))
                    };
                    let start = |_: u64| None;
                    let namer = Namer { locate: &locate, function_start: &start };
                    let no_module = |_: u64, _: u64| None;
                    changes = diff::changes(
                        &r.check,
                        &[],
                        mem,
                        view,
                        originals,
                        &no_module,
                        &is_code,
                        &namer,
                    );
                }
            }
        }
        Ok(Examined { report: r, changes, warnings, hooks: None })
    }

    /// The semantic checks (syscall tables, IDT, module list) with what the
    /// kernel's records say of executable memory in the module area: memory
    /// a record accounts for now or did lately is known; a session across
    /// checks reports unlisted memory once it persisted. Also returns when
    /// the records were read.
    fn records<M: GuestMemory + ?Sized>(
        &mut self,
        m: &mut semantic::Matched<'_>,
        baseline: &Baseline,
        (mem, view, regs): (&M, &KernelView<'_, M>, &[VcpuRegisters]),
        how: How<'_>,
    ) -> (Vec<Finding>, Instant) {
        let mut known = crate::integrity::baseline::expand_runs(&baseline.exec_outside_image)
            .unwrap_or_default();
        let now = how.clock.now();
        self.recognized.retain(|_, seen| now.duration_since(*seen) < RECORD_GRACE);
        known.extend(self.recognized.keys().map(|&(gva, gpa)| Mapping {
            gva: GuestVirtAddr(gva),
            gpa: GuestPhysAddr(gpa),
            size: PAGE_SIZE,
            perms: Perms { writable: false, user: false, executable: true },
        }));
        let (ranges, unread) = patch::exec_ranges(m, mem, view);
        let mut found = semantic::check(m, mem, view, regs, &known, Some(&ranges));
        if Deadline::passed() {
            // Cut short: the check fails as over time after this, and what
            // is remembered from check to check stays as it was.
            return (found, now);
        }
        if self.across_checks && !how.changes {
            let before = std::mem::take(&mut self.unlisted_seen);
            found.retain(|f| {
                if f.kind != FindingKind::Unlisted || f.severity != Severity::Violation {
                    return true;
                }
                let key = (f.gva.raw(), f.gpa.raw());
                let first = before.get(&key).copied().unwrap_or(now);
                self.unlisted_seen.insert(key, first);
                now.duration_since(first) >= UNLISTED_PERSIST
            });
        }
        // What the records accounted for, for the next checks' `known`.
        if self.across_checks {
            for mp in view.exec_outside_image() {
                let (s, e) = (mp.gva.raw(), mp.gva.raw().saturating_add(mp.size));
                let recorded = ranges.iter().any(|x| x.start & !(PAGE_SIZE - 1) <= s && s < x.end)
                    || m.modules.iter().any(|md| md.holds(s, e));
                let key = (s, mp.gpa.raw());
                // Bounded: a guest moving its module area to new frames at
                // every check would add a module area's worth each time.
                if recorded
                    && (self.recognized.len() < MAX_RECOGNIZED
                        || self.recognized.contains_key(&key))
                {
                    self.recognized.insert(key, now);
                }
            }
        }
        found.extend(unread.into_iter().map(unreadable_records));
        let inventory = Inventory::read(m, mem, view);
        found.extend(self.hook_policy.judge(&inventory));
        found.extend(inventory.unread.iter().map(|what| unreadable_hooks(what)));
        self.hooks = Some(inventory);
        (found, now)
    }
}

/// Where in a changed page of code the change lies: each changed page with
/// its original kept is compared byte by byte with what it holds now, the
/// finding named by its first changed byte (not the page's first symbol)
/// and its detail given the changed span. With no profile, nothing else
/// says which function a write hit.
fn name_text_changes<M: GuestMemory + ?Sized>(
    check: &mut crate::integrity::check::Report,
    mem: &M,
    originals: &Originals,
    is_code: &dyn Fn(&str) -> bool,
    locate: &dyn Fn(u64) -> Option<String>,
) {
    for f in check.violations.iter_mut() {
        if f.kind != FindingKind::Content || f.page.is_none() || !is_code(&f.region) {
            continue;
        }
        let Some(was) = originals.page(f.gva.raw()) else { continue };
        let mut now = vec![0u8; crate::addr::PAGE_BYTES];
        if mem.read(f.gpa, &mut now).is_err() || was.len() != now.len() {
            continue;
        }
        let differs = |i: &usize| was[*i] != now[*i];
        let (Some(first), Some(last)) =
            ((0..now.len()).find(differs), (0..now.len()).rev().find(differs))
        else {
            continue;
        };
        let at = f.gva.raw() + first as u64;
        if let Some(name) = locate(at) {
            f.symbol = Some(name);
        }
        f.detail.push_str(&format!(
            "; bytes {at:#x}..{:#x} differ ({} of them)",
            f.gva.raw() + last as u64 + 1,
            (first..=last).filter(differs).count()
        ));
    }
}

/// The guest's text as a check's patch review sees it: the baseline's code
/// regions and original pages, and the text of modules as first seen.
struct CheckedText<'a> {
    /// Text pages, sorted (a binary search per look-up, no hashing).
    pages: Vec<u64>,
    code_regions: Vec<&'a str>,
    modules: &'a KnownModules,
    originals: &'a Originals,
    full: bool,
}

impl<'a> CheckedText<'a> {
    fn new(
        baseline: &'a Baseline,
        originals: &'a Originals,
        modules: &'a KnownModules,
        scope: Scope,
    ) -> Self {
        let code = || baseline.regions.iter().filter(|g| g.kind == RegionKind::Code);
        let mut pages: Vec<u64> =
            code().flat_map(|g| g.pages.iter().map(|p| p.gva.raw())).collect();
        pages.sort_unstable();
        CheckedText {
            pages,
            code_regions: code().map(|g| g.name.as_str()).collect(),
            modules,
            originals,
            full: scope == Scope::Full,
        }
    }

    /// The module text holding `a`, and `a`'s offset in it.
    fn in_module(&self, a: u64) -> Option<(&'a super::modules::ModuleText, usize)> {
        self.modules.iter().find_map(|((_, base), t)| {
            let off = usize::try_from(a.checked_sub(*base)?).ok()?;
            (off < t.bytes.len()).then_some((t, off))
        })
    }
}

impl patch::Text for CheckedText<'_> {
    fn is_text(&self, region: &str) -> bool {
        Region::is_module(region) || self.code_regions.contains(&region)
    }

    fn original(&self, gva: u64) -> Option<Vec<u8>> {
        self.originals.page(gva).or_else(|| {
            let (t, off) = self.in_module(gva)?;
            t.bytes.get(off..off.checked_add(crate::addr::PAGE_BYTES)?).map(<[u8]>::to_vec)
        })
    }

    fn covered(&self, a: u64) -> Option<bool> {
        if self.pages.binary_search(&(a & !(PAGE_SIZE - 1))).is_ok() {
            Some(self.full)
        } else {
            self.in_module(a).map(|_| true)
        }
    }
}

fn unreadable_hooks(what: &str) -> Finding {
    Finding::new(
        &Region::Hooks.name(),
        FindingKind::Hook,
        Severity::Info,
        GuestVirtAddr(0),
        GuestPhysAddr(0),
    )
    .saying(format!("hook records not read: {what}"), String::new(), String::new())
}

fn unreadable_records(what: String) -> Finding {
    Finding::new(
        &Region::PatchTables.name(),
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
