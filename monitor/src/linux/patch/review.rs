//! The patch-aware review of one check: changed text pages judged against
//! the records, judged again while the kernel's own update is in flight.

use std::time::{Duration, Instant};

use super::*;
use crate::linux::KernelReport;
use crate::linux::region::Region;

/// Times a disagreement between records and text is judged again.
pub(super) const RETRIES: u32 = 3;
/// Pause before the first new judgement (doubled, tripled after).
pub(super) const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(25);
/// For an examination with no later check (`vigil check`, `vigil diff`):
/// how long, all told, violations that are all record disagreements (see
/// [`Verdicts::disagreements`]) are judged again, every [`WAIT_PAUSE`]. The
/// kernel finishes its own update within this even when the guest runs
/// slowly; an attacker's call stays. Checks that follow one another hold
/// such sites for [`PENDING_HOLD`] instead, without waiting.
pub(super) const WAIT_WINDOW: std::time::Duration = std::time::Duration::from_secs(4);
pub(super) const WAIT_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);
/// How long checks that follow one another hold a site whose bytes disagree
/// with its record before reporting it (see
/// [`PatchMemory::hold_disagreements`]). A tracepoint's static call key is
/// set back to its iterator before its sites are patched; under TCG with
/// the guest loaded, seconds pass in between.
pub const PENDING_HOLD: std::time::Duration = std::time::Duration::from_secs(10);

/// Time as the review sees it: when it is, and a pause before records and
/// text are read again. Passed in, so that the caller (and a test) decides
/// what a pause is.
pub trait Clock {
    fn now(&self) -> Instant;
    fn pause(&self, how_long: Duration);
}

/// The host's clock: a pause sleeps the thread.
pub struct WallClock;

impl Clock for WallClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn pause(&self, how_long: Duration) {
        std::thread::sleep(how_long)
    }
}

/// The guest's text as the review needs it.
pub trait Text {
    /// Whether a region holds code (kernel text, a module's text).
    fn is_text(&self, region: &str) -> bool;
    /// The page at `gva` as it was: the baseline's original, or a module's
    /// text as first seen.
    fn original(&self, gva: u64) -> Option<Vec<u8>>;
    /// Whether this check verified the text at `a`: `Some(true)` yes,
    /// `Some(false)` a text page this scope skipped, `None` not text.
    fn covered(&self, a: u64) -> Option<bool>;
}

/// The patch-aware review of a check: every content violation on a text
/// page of `text` is judged again against the kernel's patch records, read
/// only when there is something to judge. Accepted patches are counted into
/// the report's kernel facts against what `memory` accepted before (see
/// [`account`]), and returned.
pub fn review<M: GuestMemory + ?Sized>(
    report: &mut KernelReport,
    m: &Matched<'_>,
    (mem, space): (&M, &dyn AddressSpace),
    text: &dyn Text,
    memory: &mut PatchMemory,
    clock: &dyn Clock,
) -> Vec<Patched> {
    let is_text = |region: &str| text.is_text(region);
    let original = |gva: u64| text.original(gva);
    let covered = |a: u64| text.covered(a);
    let findings = &mut report.check;
    memory.held = 0;
    memory.held_until = None;
    let taken = findings.take_violations(|f| {
        f.kind == FindingKind::Content && f.page.is_some() && is_text(&f.region)
    });
    let pages: Vec<ChangedPage> = taken
        .iter()
        .map(|f| ChangedPage {
            region: f.region.clone(),
            index: f.page.unwrap_or(0),
            gva: f.gva.raw() & !(PAGE_SIZE - 1),
            gpa: GuestPhysAddr(f.gpa.raw() & !(PAGE_SIZE - 1)),
        })
        .collect();
    // Pages still as accepted at an earlier check are not judged again.
    let mut accepted = Vec::new();
    let mut fresh = Vec::new();
    for p in pages {
        let mut cur = vec![0u8; crate::addr::PAGE_BYTES];
        let now_at = space.translate(GuestVirtAddr(p.gva)).map(|(gpa, _)| gpa);
        match memory.accepted_pages.get(&p.gva) {
            Some((h, units))
                if now_at.is_some_and(|gpa| mem.read(gpa, &mut cur).is_ok())
                    && blake3::hash(&cur).as_bytes() == h =>
            {
                accepted.extend(units.iter().cloned());
            }
            _ => fresh.push(p),
        }
    }
    let still: HashSet<u64> = taken.iter().map(|f| f.gva.raw() & !(PAGE_SIZE - 1)).collect();
    memory.accepted_pages.retain(|gva, _| still.contains(gva) || covered(*gva) == Some(false));
    let pages = fresh;
    if !pages.is_empty() {
        // The kernel updates a record and the text it describes one after
        // the other (a static call's key before its sites; an ftrace ops
        // listed before its sites are patched, unlisted before they are
        // restored), and vigil reads them one after the other too: a
        // disagreement is judged again, records and text read anew, after a
        // pause. A write of an attacker's stays; the kernel's update ends.
        // What outlasts the quick re-reads and is all records and sites
        // disagreeing in the way the kernel's own update passes through is
        // held across checks, or, with no later check, waited for up to
        // WAIT_WINDOW.
        let may_wait = memory.hold.is_none();
        let (tables, mut v) = settle(clock, may_wait, || {
            let mut tables = PatchTables::read_with(m, mem, space, &mut memory.site_memo);
            tables.merge_recent(memory, clock.now());
            let name = |a: u64| m.locate(a);
            let v = verify_pages(&tables, &pages, mem, space, &original, &name);
            (tables, v)
        });
        // A read cut short at the check's deadline (the check fails as
        // over time, after this) leaves what is remembered as it was: its
        // tables are not the kernel's whole records.
        if crate::integrity::check::Deadline::passed() {
            return Vec::new();
        }
        if !tables.problems.iter().any(|(sev, _)| *sev == Severity::Violation) {
            memory.hold_disagreements(&mut v, clock.now());
        }
        // A module unloaded since its text was read (and perhaps loading
        // again at its base) is compared afresh at the next check, as it
        // then is: what its old frames hold now is no longer its text.
        v.violations.retain(|f| {
            Region::module_of(&f.region).is_none_or(|name| {
                m.modules.iter().any(|md| {
                    md.name == name
                        && md.base <= f.gva.raw()
                        && f.gva.raw() < md.base.saturating_add(md.text_size.max(PAGE_SIZE))
                        && crate::linux::semantic::still_live(m, mem, space, md)
                })
            })
        });
        for f in &mut v.violations {
            if let Some(module) = Region::module_of(&f.region) {
                f.detail = format!(
                    "the text of module {module} changed after it was loaded: {}",
                    f.detail
                );
            }
        }
        findings.add_findings(v.violations);
        let problems = tables
            .problems
            .iter()
            .map(|(sev, what)| {
                Finding::new(
                    &Region::PatchTables.name(),
                    FindingKind::Pointer,
                    *sev,
                    GuestVirtAddr(0),
                    GuestPhysAddr(0),
                )
                .saying(what.clone(), String::new(), String::new())
            })
            .collect();
        findings.add_findings(problems);
        accepted.extend(v.accepted);
        for (gva, h, units) in v.clean {
            memory.accepted_pages.insert(gva, (h, units));
        }
        // A site may cross into the next page: neither page stays judged.
        for f in findings.violations.iter().filter(|f| is_text(&f.region)) {
            memory.accepted_pages.remove(&(f.gva.raw() & !(PAGE_SIZE - 1)));
            memory.accepted_pages.remove(&((f.gva.raw() + MAX_SITE - 1) & !(PAGE_SIZE - 1)));
        }
    }
    stood_int3(report, (mem, space), (&taken, &covered), &mut accepted, memory, clock);
    // A settled static call site calls what its key held: remembered as the
    // key's (so that the site still counts while the kernel moves the key on
    // and then the site), even when the key itself was not read again.
    let now = clock.now();
    for u in accepted.iter().filter(|u| !u.in_flight) {
        if let (Some(k), Some(t)) = (u.key, rel_target(u.addr, &u.bytes)) {
            memory.remember_key_func(k, t, now);
        }
    }
    report.kernel.patched_sites = accepted.len() as u64;
    report.kernel.pending_sites = memory.held;
    for (kind, n) in account(&mut memory.sites, &accepted, &covered) {
        report.kernel.patches.insert(kind.as_str().to_owned(), n);
    }
    accepted
}

/// How long an `int3` may stand over a patch site as the first byte of the
/// kernel's rewrite (`text_poke_bp`), which takes it away within
/// microseconds, before it is a violation: an `int3` that stays is a trap
/// someone handles (a die notifier redirecting it, say).
pub const INT3_HOLD: Duration = Duration::from_secs(2);

/// Takes out of `accepted` the sites held by an `int3` of a rewrite in
/// flight for [`INT3_HOLD`] or longer, each a violation: across checks, one
/// seen so at every check that looked at it since at least that long; in a one-shot
/// examination, one still so after a pause that long. A site seen so for
/// the first time is looked at again when the hold ends (`held_until`).
pub(super) fn stood_int3<M: GuestMemory + ?Sized>(
    report: &mut KernelReport,
    (mem, space): (&M, &dyn AddressSpace),
    (taken, covered): (&[Finding], &dyn Fn(u64) -> Option<bool>),
    accepted: &mut Vec<Patched>,
    memory: &mut PatchMemory,
    clock: &dyn Clock,
) {
    let trapped: HashSet<u64> = accepted
        .iter()
        .filter(|u| u.in_flight && u.bytes.first() == Some(&INT3))
        .map(|u| u.addr)
        .collect();
    let mut stood: Vec<(u64, Duration)> = Vec::new();
    if memory.hold.is_none() {
        if !trapped.is_empty() {
            clock.pause(INT3_HOLD);
            stood = trapped
                .iter()
                .filter(|&&a| read_virt(mem, space, a, 1).is_some_and(|(b, _)| b[0] == INT3))
                .map(|&a| (a, INT3_HOLD))
                .collect();
        }
    } else {
        let now = clock.now();
        // Kept while seen so, or while on text this check's scope skipped.
        memory.int3_since.retain(|a, _| trapped.contains(a) || covered(*a) == Some(false));
        for &a in &trapped {
            if memory.int3_since.len() >= super::state::MAX_PENDING
                && !memory.int3_since.contains_key(&a)
            {
                // A memory full of standing int3s: no hold for more.
                stood.push((a, Duration::ZERO));
                continue;
            }
            let first = *memory.int3_since.entry(a).or_insert(now);
            let age = now.saturating_duration_since(first);
            if age >= INT3_HOLD {
                stood.push((a, age));
            } else {
                let until = first + INT3_HOLD;
                memory.held_until = Some(memory.held_until.map_or(until, |u| u.min(until)));
            }
        }
    }
    if stood.is_empty() {
        return;
    }
    let gone: HashSet<u64> = stood.iter().map(|(a, _)| *a).collect();
    accepted.retain(|u| !gone.contains(&u.addr));
    let found = stood.into_iter().map(|(a, age)| {
        let page = a & !(PAGE_SIZE - 1);
        let (region, gpa) = taken
            .iter()
            .find(|f| f.gva.raw() & !(PAGE_SIZE - 1) == page)
            .map(|f| (f.region.clone(), f.gpa.raw() & !(PAGE_SIZE - 1)))
            .unwrap_or_else(|| (Region::Text.name().into_owned(), 0));
        let held = if age.is_zero() { "at two checks".to_owned() } else { format!("for {:.1} s", age.as_secs_f64()) };
        Finding::new(
            &region,
            FindingKind::Content,
            Severity::Violation,
            GuestVirtAddr(a),
            GuestPhysAddr(gpa.wrapping_add(a - page)),
        )
        .saying(
            format!(
                "an int3 has stood on the patch site at {a:#x} {held}: the kernel's own rewrite takes it away within microseconds, so this is a trap someone handles (see `vigil hooks` for die notifiers)"
            ),
            String::new(),
            "cc".into(),
        )
    });
    report.check.add_findings(found.collect());
}

/// Judges single places the kernel patches as it runs, each given by its
/// run-time address and its bytes before the kernel patched it (for the
/// reference check: the vendor's image), against the kernel's records:
/// ftrace entries and ftrace's own calls, jump labels, static calls, and
/// registered kprobes (`kprobe: true`: the place is a kprobe's or nothing).
/// Returns the places whose bytes are no form the records allow, each with
/// why, and any record found forged (at address 0).
///
/// A place that disagrees is judged again, records and bytes read anew,
/// until it agrees once or `window` has passed on `clock`: the kernel ends
/// its own update (a tracepoint's static call key set before its sites, a
/// tracer unregistered before its sites are restored) within it; an
/// attacker's write stays.
pub fn judge_sites<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    (mem, space): (&M, &dyn AddressSpace),
    places: &[Place],
    window: Duration,
    clock: &dyn Clock,
) -> Vec<(u64, String)> {
    let mut memo = SiteMemo::default();
    let started = clock.now();
    let name = |a: u64| m.locate(a);
    // Each place's bytes as last seen: the ones compared first; read anew
    // only after a judgement against them failed.
    let mut left: Vec<(&Place, Vec<u8>)> = places.iter().map(|p| (p, p.now.clone())).collect();
    loop {
        let tables = PatchTables::read_with(m, mem, space, &mut memo);
        let forged: Vec<(u64, String)> = tables
            .problems
            .iter()
            .filter(|(sev, _)| *sev == Severity::Violation)
            .map(|(_, what)| (0, what.clone()))
            .collect();
        let mut failed = Vec::new();
        let mut still = Vec::new();
        for (place, cur) in left {
            let (addr, orig) = (place.addr, &place.orig);
            let n = orig.len().min(cur.len());
            let judged = match (tables.sites.get(&addr).copied(), place.kprobe) {
                (Some(site), false) => tables.judge(addr, site, &cur[..n], &orig[..n], &name),
                (None, false) => Err("no record of the kernel names this site".into()),
                (_, true) if !tables.kprobes.contains_key(&addr) => {
                    Err("no kprobe is registered here".into())
                }
                (_, true) => {
                    let k = if cur.first() == Some(&INT3) { 1 } else { n.min(5) };
                    tables.judge_kprobe(addr, &cur[..k], &orig[..k], &name)
                }
            };
            // The kernel's rewrite in flight (`int3` first) is no settled
            // form: judged again, and a failure if it outlasts the window.
            let why = match judged {
                Ok(false) => continue,
                Ok(true) => "an int3 over the site for as long as it was judged: no rewrite of the kernel's lasts that long".to_owned(),
                Err(why) => why,
            };
            failed.push((addr, why));
            let again = read_virt(mem, space, addr, orig.len()).map(|(b, _)| b).unwrap_or(cur);
            still.push((place, again));
        }
        let waited = clock.now().saturating_duration_since(started);
        if (failed.is_empty() && forged.is_empty()) || waited >= window {
            return forged.into_iter().chain(failed).collect();
        }
        left = still;
        clock.pause(WAIT_PAUSE);
    }
}

/// A place [`judge_sites`] judges: its run-time address, its bytes before
/// the kernel patched it and as they were found, and whether it is a
/// kprobe's (or nothing).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Place {
    pub addr: u64,
    pub orig: Vec<u8>,
    pub now: Vec<u8>,
    pub kprobe: bool,
}

/// Judges (`judge`: records and text read anew) until the judgement is
/// clean, or the quick re-reads ([`RETRIES`]) are spent and, if `may_wait`
/// (no later check will look again), the violations are no longer all
/// record disagreements or [`WAIT_WINDOW`] has passed on `clock`. Forged
/// records end it at once after the re-reads: nothing the kernel is doing.
pub(super) fn settle(
    clock: &dyn Clock,
    may_wait: bool,
    mut judge: impl FnMut() -> (PatchTables, Verdicts),
) -> (PatchTables, Verdicts) {
    let mut round = 0;
    let started = clock.now();
    loop {
        let (tables, v) = judge();
        let forged = tables.problems.iter().any(|(sev, _)| *sev == Severity::Violation);
        let violations = v.violations.iter().filter(|f| f.severity == Severity::Violation);
        let clean = violations.clone().count() == 0 && !forged;
        let updating = !clean && violations.count() == v.disagreements.len() && !forged;
        let waits =
            may_wait && updating && clock.now().saturating_duration_since(started) < WAIT_WINDOW;
        if clean || (round >= RETRIES && !waits) {
            return (tables, v);
        }
        round += 1;
        clock.pause(if round <= RETRIES { RETRY_PAUSE * round } else { WAIT_PAUSE });
    }
}
