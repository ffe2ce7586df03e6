//! What a watcher keeps between checks: sites accepted, records seen
//! lately, slow windows given.

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
    pub(super) funcs: HashMap<u64, std::time::Instant>,
    pub(super) kprobes: HashMap<u64, (u32, std::time::Instant)>,
    pub(super) optinsn: HashMap<(u64, u64), std::time::Instant>,
    /// Functions static call keys held when read lately (or their settled
    /// sites called), by key, the latest [`KEY_FUNCS_KEPT`] of each.
    pub(super) key_funcs: HashMap<u64, Vec<(u64, std::time::Instant)>>,
    /// The site map last made, kept while the tables read the same.
    pub(super) site_memo: SiteMemo,
    /// Sites whose record disagreement was already given the slow window,
    /// and when: a site is given it once in [`SLOW_MEMORY`] whatever bytes
    /// it holds, so that a guest can neither make every check wait nor keep
    /// a hook (with a new target each time) that leaves for a moment in
    /// every window. Full, it gives no new window.
    pub(super) slow_judged: HashMap<u64, std::time::Instant>,
    /// When a site was last given the slow window again within its
    /// [`SLOW_MEMORY`] (the kernel updates the same static call or ftrace
    /// site again and again on a busy guest): one such window in
    /// [`REPEAT_SPACING`], whatever site: sites given their window lately
    /// make checks wait at most one window a minute. (A site not given one
    /// yet is not spaced: up to [`MAX_SLOW_JUDGED`] in [`SLOW_MEMORY`].)
    pub(super) slow_repeated: Option<std::time::Instant>,
    /// Time spent waiting in slow windows since last taken: a pause, not
    /// work, for the CPU budget.
    pub waited: std::time::Duration,
}

impl PatchMemory {
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

    /// Whether disagreements that outlasted the quick re-reads get the slow
    /// window: one not given it within [`SLOW_MEMORY`] does; when all were,
    /// one window in [`REPEAT_SPACING`] is given again (taken from the
    /// spacing). None when the memory of sites is full.
    pub(super) fn opens_slow_window(
        &mut self,
        disagreements: &[(u64, Vec<u8>)],
        now: std::time::Instant,
    ) -> bool {
        self.slow_judged.retain(|_, t| now.saturating_duration_since(*t) < SLOW_MEMORY);
        if disagreements.is_empty() || self.slow_judged.len() >= MAX_SLOW_JUDGED {
            return false;
        }
        if disagreements.iter().any(|(a, _)| !self.slow_judged.contains_key(a)) {
            return true;
        }
        if self.slow_repeated.is_none_or(|t| now.saturating_duration_since(t) >= REPEAT_SPACING) {
            self.slow_repeated = Some(now);
            return true;
        }
        false
    }
}

/// How long a patch record still counts after the kernel dropped it.
pub const RECORD_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

impl PatchTables {
    /// Adds the records `memory` saw within the grace period, and remembers
    /// this reading's.
    pub(super) fn merge_recent(&mut self, memory: &mut PatchMemory, now: std::time::Instant) {
        let fresh = |t: &std::time::Instant| now.duration_since(*t) < RECORD_GRACE;
        memory.callers.retain(|_, t| fresh(t));
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
