//! What a watcher keeps between checks: sites accepted, records seen
//! lately, sites whose records and bytes disagree for now.

use super::*;

/// Counts, by kind, the sites whose accepted bytes changed since `previous`
/// (sites patched, re-patched or restored; in-flight states do not count),
/// and makes `previous` the current state. `covered` says of an address
/// whether this check verified it (`Some(true)`), whether it is protected
/// text this check did not look at (`Some(false)`: its state is kept), or
/// neither (`None`: its module is gone, the state is dropped).
pub fn account(
    previous: &mut HashMap<u64, Patched>,
    accepted: &[Patched],
    covered: &dyn Fn(u64) -> Option<bool>,
) -> BTreeMap<PatchKind, u64> {
    let mut counts = BTreeMap::new();
    let mut next = HashMap::new();
    for p in accepted {
        if p.in_flight {
            if let Some(old) = previous.get(&p.addr) {
                next.insert(p.addr, old.clone());
            }
            continue;
        }
        if previous.get(&p.addr).map(|o| &o.bytes) != Some(&p.bytes) {
            *counts.entry(p.kind).or_insert(0) += 1;
        }
        next.insert(p.addr, p.clone());
    }
    for (a, old) in previous.iter() {
        if next.contains_key(a) || accepted.iter().any(|p| p.addr == *a) {
            continue;
        }
        match covered(*a) {
            // Restored to the baseline's bytes.
            Some(true) => *counts.entry(old.kind).or_insert(0) += 1,
            Some(false) => {
                next.insert(*a, old.clone());
            }
            None => {}
        }
    }
    *previous = next;
    counts
}

/// What a watcher remembers between checks: the sites it accepted, and the
/// patch records it saw lately. The kernel drops some records before it has
/// undone their patches (ftrace unlists an ops, then restores the function
/// entries; an optimised kprobe is unregistered, then un-optimised by a
/// worker), so a record seen within [`RECORD_GRACE`] still counts.
#[derive(Debug, Default, Clone)]
pub struct PatchMemory {
    pub sites: HashMap<u64, Patched>,
    /// Changed pages judged wholly the kernel's patching, by address: the
    /// BLAKE3 of their bytes then, and the sites accepted on them. A page
    /// still holding those bytes is not judged again; one that changed in any
    /// way is (and a page back to its original drops out).
    pub(super) accepted_pages: HashMap<u64, ([u8; 32], Vec<Patched>)>,
    pub(super) callers: HashMap<u64, std::time::Instant>,
    /// ftrace direct calls read lately: (function entry, what it calls).
    pub(super) direct: HashMap<(u64, u64), std::time::Instant>,
    pub(super) funcs: HashMap<u64, std::time::Instant>,
    pub(super) kprobes: HashMap<u64, (u32, std::time::Instant)>,
    pub(super) optinsn: HashMap<(u64, u64), std::time::Instant>,
    /// Functions static call keys held when read lately (or their settled
    /// sites called), by key, the latest [`KEY_FUNCS_KEPT`] of each.
    pub(super) key_funcs: HashMap<u64, Vec<(u64, std::time::Instant)>>,
    /// The site map last made, kept while the tables read the same.
    pub(super) site_memo: SiteMemo,
    /// How long a site whose bytes disagree with its record is held (not
    /// reported, judged again at every later check) before it is believed
    /// (see [`PatchMemory::hold_disagreements`]); `None` for an examination
    /// with no later check, which waits instead.
    pub(super) hold: Option<std::time::Duration>,
    /// Sites seen disagreeing with their records: when first, when last.
    pub(super) pending: HashMap<u64, Pending>,
    /// Sites held by the last review.
    pub held: u64,
    /// When the earliest hold of the last review ends: a check then settles it.
    pub held_until: Option<std::time::Instant>,
    /// Sites seen held by an `int3` of a rewrite in flight at every check
    /// since: when first (see [`super::review::INT3_HOLD`]).
    pub(super) int3_since: HashMap<u64, std::time::Instant>,
}

/// A site seen disagreeing with its record.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pending {
    pub(super) first: std::time::Instant,
    pub(super) last: std::time::Instant,
}

impl PatchMemory {
    /// Host memory this memory holds, the site map kept with it too.
    pub fn held_bytes(&self) -> u64 {
        use crate::memory::held;
        let patched = |p: &Patched| held::vec(&p.bytes);
        let accepted: u64 = self
            .accepted_pages
            .values()
            .map(|(_, ps)| held::vec(ps) + ps.iter().map(patched).sum::<u64>())
            .sum();
        held::map(&self.sites)
            + self.sites.values().map(patched).sum::<u64>()
            + held::map(&self.accepted_pages)
            + accepted
            + held::map(&self.callers)
            + held::map(&self.direct)
            + held::map(&self.funcs)
            + held::map(&self.kprobes)
            + held::map(&self.optinsn)
            + held::map(&self.key_funcs)
            + self.key_funcs.values().map(held::vec).sum::<u64>()
            + held::map(&self.pending)
            + held::map(&self.int3_since)
            + self.site_memo.held_bytes()
    }

    /// Remembers that key `k` held (or a settled site of it called) `f` at
    /// `now`.
    pub(super) fn remember_key_func(&mut self, k: u64, f: u64, now: std::time::Instant) {
        if f == 0 || (self.key_funcs.len() >= MAX_RECENT_KEYS && !self.key_funcs.contains_key(&k)) {
            return;
        }
        let fs = self.key_funcs.entry(k).or_default();
        fs.retain(|&(g, _)| g != f);
        fs.push((f, now));
        if fs.len() > KEY_FUNCS_KEPT {
            fs.remove(0);
        }
    }

    /// A memory for checks that follow one another: disagreements are held
    /// for `hold` instead of waited for.
    pub fn holding(hold: std::time::Duration) -> Self {
        PatchMemory { hold: Some(hold), ..PatchMemory::default() }
    }

    /// A copy that holds nothing: an examination that shows every change
    /// as it is (a diff) waits for the kernel instead.
    pub fn unheld(&self) -> Self {
        PatchMemory { hold: None, ..self.clone() }
    }

    /// Holds back, of `v`'s violations, the record disagreements (see
    /// [`Verdicts::disagreements`]) of sites first seen disagreeing less
    /// than the hold ago: the kernel moves a record on and then rewrites
    /// its sites, which a loaded guest takes seconds to do, and vigil must
    /// neither alarm on that nor stall its checks waiting. A held site's
    /// page is not taken as judged, so every later check judges it again;
    /// the site is reported by the first check at or after the end of its
    /// hold if it still disagrees. Its first sighting is kept until it has
    /// agreed for [`PENDING_FORGET`], so a hook that comes and goes is
    /// reported as one that stayed. A full memory holds no new site.
    pub(super) fn hold_disagreements(&mut self, v: &mut Verdicts, now: std::time::Instant) {
        self.held = 0;
        self.held_until = None;
        let Some(hold) = self.hold else { return };
        self.pending.retain(|_, p| now.saturating_duration_since(p.last) < PENDING_FORGET);
        let sites: HashSet<u64> = v.disagreements.iter().map(|(a, _)| *a).collect();
        v.violations.retain_mut(|f| {
            let a = f.gva.raw();
            if f.severity != Severity::Violation || !sites.contains(&a) {
                return true;
            }
            if !self.pending.contains_key(&a) && self.pending.len() >= MAX_PENDING {
                return true;
            }
            let p = self.pending.entry(a).or_insert(Pending { first: now, last: now });
            p.last = now;
            let until = p.first + hold;
            if now >= until {
                f.detail = format!(
                    "{} (so for {:.1} s: longer than the kernel takes to update its sites)",
                    f.detail,
                    now.saturating_duration_since(p.first).as_secs_f64()
                );
                return true;
            }
            self.held += 1;
            self.held_until = Some(self.held_until.map_or(until, |u| u.min(until)));
            false
        });
    }
}

/// How long after it last disagreed a site's first disagreement is kept.
pub(super) const PENDING_FORGET: std::time::Duration = std::time::Duration::from_secs(60);
/// At most this many sites are remembered disagreeing; past it a new
/// disagreement is reported at once.
pub(super) const MAX_PENDING: usize = 4096;

/// How long a patch record still counts after the kernel dropped it.
pub const RECORD_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl PatchTables {
    /// Adds the records `memory` saw within the grace period, and remembers
    /// this reading's.
    pub(super) fn merge_recent(&mut self, memory: &mut PatchMemory, now: std::time::Instant) {
        let fresh = |t: &std::time::Instant| now.duration_since(*t) < RECORD_GRACE;
        memory.callers.retain(|_, t| fresh(t));
        memory.direct.retain(|_, t| fresh(t));
        memory.funcs.retain(|_, t| fresh(t));
        memory.kprobes.retain(|_, (_, t)| fresh(t));
        memory.optinsn.retain(|_, t| fresh(t));
        memory.key_funcs.retain(|_, fs| {
            fs.retain(|(_, t)| fresh(t));
            !fs.is_empty()
        });
        for &c in &self.ftrace_callers {
            memory.callers.insert(c, now);
        }
        for &f in &self.ftrace_funcs {
            memory.funcs.insert(f, now);
        }
        for &d in &self.direct_calls {
            memory.direct.insert(d, now);
        }
        for (&a, &flags) in &self.kprobes {
            memory.kprobes.insert(a, (flags, now));
        }
        for &r in &self.optinsn {
            memory.optinsn.insert(r, now);
        }
        for (&k, &f) in &self.key_funcs {
            memory.remember_key_func(k, f, now);
        }
        self.recent_key_funcs.extend(
            memory.key_funcs.iter().flat_map(|(&k, fs)| fs.iter().map(move |&(f, _)| (k, f))),
        );
        self.ftrace_callers.extend(memory.callers.keys());
        self.direct_calls.extend(memory.direct.keys());
        self.ftrace_funcs.extend(memory.funcs.keys());
        for (&a, &(flags, _)) in &memory.kprobes {
            self.kprobes.entry(a).or_insert(flags);
        }
        for &r in memory.optinsn.keys() {
            if !self.optinsn.contains(&r) {
                self.optinsn.push(r);
            }
        }
    }
}

/// At most this many keys' recent functions are remembered, and this many
/// functions of each: a guest that rewrites its keys faster than the kernel
/// does only pushes out what it wrote before.
pub(super) const MAX_RECENT_KEYS: usize = 1 << 14;
pub(super) const KEY_FUNCS_KEPT: usize = 4;
