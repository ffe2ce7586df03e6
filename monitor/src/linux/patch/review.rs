//! The patch-aware review of one check: changed text pages judged against
//! the records, judged again while the kernel's own update is in flight.

use super::*;

/// Times a disagreement between records and text is judged again.
pub(super) const RETRIES: u32 = 3;
/// Pause before the first new judgement (doubled, tripled after).
pub(super) const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(25);
/// How long, all told, violations that are all record disagreements (see
/// [`Verdicts::disagreements`]) are judged again, every [`SLOW_PAUSE`]:
/// the kernel finishes its own update within this even when the guest runs
/// slowly (a guest under TCG with the function tracer on every function
/// takes seconds to patch a static call's sites); an attacker's call stays.
pub(super) const SLOW_WINDOW: std::time::Duration = std::time::Duration::from_secs(4);
pub(super) const SLOW_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);
/// How long a disagreement given the slow window is remembered, and how
/// many at most.
pub(super) const SLOW_MEMORY: std::time::Duration = std::time::Duration::from_secs(600);
pub(super) const MAX_SLOW_JUDGED: usize = 4096;
/// A site already given the slow window within [`SLOW_MEMORY`] is given it
/// again at most once in this long (over all sites of a guest).
pub(super) const REPEAT_SPACING: std::time::Duration = std::time::Duration::from_secs(60);

/// Region name for findings about the patch records themselves.
pub const TABLES_REGION: &str = "patch-tables";

/// The patch-aware review of a check: every content violation on a text
/// page (`is_text` names the regions) is judged again against the kernel's
/// patch records, read only when there is something to judge. Accepted
/// patches are counted into the report against what `memory` accepted
/// before (see [`account`]), and returned;
/// `covered` says which addresses this check's scope verified.
#[allow(clippy::too_many_arguments)]
pub fn review<M: GuestMemory + ?Sized>(
    report: &mut crate::integrity::Report,
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    original: &dyn Fn(u64) -> Option<Vec<u8>>,
    memory: &mut PatchMemory,
    is_text: &dyn Fn(&str) -> bool,
    covered: &dyn Fn(u64) -> Option<bool>,
) -> Vec<Patched> {
    let taken = report.take_violations(|f| {
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
        match memory.accepted_pages.get(&p.gva) {
            Some((h, units))
                if mem.read(p.gpa, &mut cur).is_ok() && blake3::hash(&cur).as_bytes() == h =>
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
        // Violations that are all records and sites disagreeing in the way
        // the kernel's own update passes through are judged again for
        // longer, up to SLOW_WINDOW.
        let mut round = 0;
        let mut slow = false;
        let started = std::time::Instant::now();
        let (tables, mut v) = loop {
            let mut tables = PatchTables::read_with(m, mem, space, &mut memory.site_memo);
            tables.merge_recent(memory, std::time::Instant::now());
            let name = |a: u64| m.locate(a);
            let v = verify_pages(&tables, &pages, mem, space, original, &name);
            let violations = v.violations.iter().filter(|f| f.severity == Severity::Violation);
            let clean = violations.clone().count() == 0
                && !tables.problems.iter().any(|(sev, _)| *sev == Severity::Violation);
            let updating = !clean
                && violations.count() == v.disagreements.len()
                && !tables.problems.iter().any(|(sev, _)| *sev == Severity::Violation);
            if round == RETRIES && updating {
                slow = memory.opens_slow_window(&v.disagreements, std::time::Instant::now());
            }
            if slow {
                // Each disagreement seen in the slow window has had it.
                let now = std::time::Instant::now();
                for (a, _) in &v.disagreements {
                    if memory.slow_judged.len() < MAX_SLOW_JUDGED {
                        memory.slow_judged.entry(*a).or_insert(now);
                    }
                }
            }
            if clean || (round >= RETRIES && !(slow && updating && started.elapsed() < SLOW_WINDOW))
            {
                break (tables, v);
            }
            round += 1;
            if round > RETRIES {
                memory.waited += SLOW_PAUSE;
            }
            std::thread::sleep(if round <= RETRIES { RETRY_PAUSE * round } else { SLOW_PAUSE });
        };
        for f in &mut v.violations {
            if let Some(module) = f.region.strip_prefix("module:") {
                f.detail = format!(
                    "the text of module {module} changed after it was loaded: {}",
                    f.detail
                );
            }
        }
        report.add_findings(v.violations);
        let problems = tables
            .problems
            .iter()
            .map(|(sev, what)| {
                Finding::new(
                    TABLES_REGION,
                    FindingKind::Pointer,
                    *sev,
                    GuestVirtAddr(0),
                    GuestPhysAddr(0),
                )
                .saying(what.clone(), String::new(), String::new())
            })
            .collect();
        report.add_findings(problems);
        accepted.extend(v.accepted);
        for (gva, h, units) in v.clean {
            memory.accepted_pages.insert(gva, (h, units));
        }
        for f in report.violations.iter().filter(|f| is_text(&f.region)) {
            memory.accepted_pages.remove(&(f.gva.raw() & !(PAGE_SIZE - 1)));
        }
    }
    // A settled static call site calls what its key held: remembered as the
    // key's (so that the site still counts while the kernel moves the key on
    // and then the site), even when the key itself was not read again.
    let now = std::time::Instant::now();
    for u in accepted.iter().filter(|u| !u.in_flight) {
        if let (Some(k), Some(t)) = (u.key, rel_target(u.addr, &u.bytes)) {
            memory.remember_key_func(k, t, now);
        }
    }
    report.patched_sites = accepted.len() as u64;
    for (kind, n) in account(&mut memory.sites, &accepted, covered) {
        report.patches.insert(kind.as_str().to_owned(), n);
    }
    accepted
}
