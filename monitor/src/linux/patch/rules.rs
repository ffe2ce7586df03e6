//! What the kernel writes at each kind of site, and the judgement of a
//! changed page against its original, run by run.

use super::*;

/// A protected page whose content differs from the baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedPage {
    pub region: String,
    /// Index of the page in its region.
    pub index: u64,
    pub gva: u64,
    pub gpa: GuestPhysAddr,
}

/// A patch site found changed and accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patched {
    pub addr: u64,
    pub kind: PatchKind,
    pub bytes: Vec<u8>,
    /// Caught in the middle of the kernel's `int3`-guarded rewrite, or (a
    /// static call site) still calling what its key held a moment ago.
    pub in_flight: bool,
    /// A static call site's key.
    pub key: Option<u64>,
}

/// What [`verify_pages`] found.
#[derive(Debug, Default)]
pub struct Verdicts {
    pub accepted: Vec<Patched>,
    pub violations: Vec<Finding>,
    /// Pages judged wholly the kernel's patching: address, BLAKE3 of the
    /// bytes judged, and the sites accepted on them.
    pub clean: Vec<(u64, [u8; 32], Vec<Patched>)>,
    /// Of the violations, those where a site the kernel patches through a
    /// record (a static call, an ftrace entry or ftrace's own call) holds
    /// the instruction the kernel writes there (a call; a static tail call's
    /// jmp) to a target the record does not name: what the
    /// kernel's own update looks like between writing the record and the
    /// last site, and what is judged again for longer before it is believed.
    /// As (site, bytes).
    pub disagreements: Vec<(u64, Vec<u8>)>,
}

/// Where a relative branch of `b` (at `addr`) lands: `call`/`jmp rel32`, `jmp rel8`.
pub(super) fn rel_target(addr: u64, b: &[u8]) -> Option<u64> {
    match (b.first()?, b.len()) {
        (&(CALL | JMP32), 5) => Some(addr.wrapping_add(5).wrapping_add_signed(i32_at(b, 1))),
        (&JMP8, 2) => {
            Some(addr.wrapping_add(2).wrapping_add_signed(i64::from(i8::from_le_bytes([b[1]]))))
        }
        _ => None,
    }
}

/// The encodings the kernel writes at one site.
pub(super) struct Forms<'a> {
    pub(super) fixed: &'a [&'a [u8]],
    pub(super) ops: &'a [u8],
    pub(super) target_ok: &'a dyn Fn(u64) -> bool,
}

impl Forms<'_> {
    pub(super) fn holds(&self, addr: u64, b: &[u8]) -> bool {
        self.fixed.contains(&b)
            || (self.ops.contains(&b[0])
                && rel_target(addr, b).is_some_and(|t| (self.target_ok)(t)))
    }

    /// `cur` is one of the forms, or the kernel's rewrite of the site is in
    /// flight: `int3` first, then the tail of the old or the new form.
    pub(super) fn admits(&self, addr: u64, cur: &[u8], orig: &[u8]) -> Result<bool, ()> {
        if self.holds(addr, cur) {
            return Ok(false);
        }
        if cur[0] == INT3 {
            let tail = &cur[1..];
            let poked = self.ops.iter().any(|&op| {
                let mut b = cur.to_vec();
                b[0] = op;
                self.holds(addr, &b)
            });
            if orig[1..] == *tail || self.fixed.iter().any(|f| f[1..] == *tail) || poked {
                return Ok(true);
            }
        }
        Err(())
    }
}

pub(super) fn describe(addr: u64, b: &[u8], name: &dyn Fn(u64) -> String) -> String {
    match (b[0], rel_target(addr, b)) {
        (CALL, Some(t)) => format!("call {t:#x} ({})", name(t)),
        (JMP32 | JMP8, Some(t)) => format!("jmp {t:#x} ({})", name(t)),
        _ if b == NOP5 || b == NOP2 => "a NOP".into(),
        _ => format!("bytes {}", hex(b)),
    }
}

pub(super) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl PatchTables {
    /// Whether a function entry's `call` (`b`, at `addr`) may be to a
    /// trampoline ftrace made and has yet to record: only memory in the
    /// module area outside every listed module's text can be one. A call
    /// into kernel text or a module's text is never an update in flight.
    pub(super) fn may_be_trampoline(&self, addr: u64, b: &[u8]) -> bool {
        rel_target(addr, b).is_some_and(|t| {
            crate::linux::semantic::MODULES.contains(&t)
                && !self.module_text.iter().any(|&(s, e)| (s..e).contains(&t))
        })
    }

    pub(super) fn site_len(&self, site: Site, orig: &[u8], cur: &[u8]) -> usize {
        match site {
            Site::JumpLabel { .. } => {
                let two = |b: &[u8]| b[..2] == NOP2 || b[0] == JMP8;
                let five = |b: &[u8]| b == NOP5 || b[0] == JMP32;
                if two(orig) || (!five(orig) && two(cur)) { 2 } else { 5 }
            }
            _ => 5,
        }
    }

    /// Judges the bytes now at one site: the kind of patch (and whether it
    /// is in flight), or why the kernel never writes them.
    pub(super) fn judge(
        &self,
        addr: u64,
        site: Site,
        cur: &[u8],
        orig: &[u8],
        name: &dyn Fn(u64) -> String,
    ) -> Result<bool, String> {
        let was = |t: u64| rel_target(addr, orig) == Some(t);
        let now = describe(addr, cur, name);
        match site {
            Site::JumpLabel { target, .. } => {
                let ok = |t: u64| t == target;
                let (fixed, ops): (&[&[u8]], &[u8]) =
                    if cur.len() == 2 { (&[&NOP2], &[JMP8]) } else { (&[&NOP5], &[JMP32]) };
                Forms { fixed, ops, target_ok: &ok }.admits(addr, cur, orig).map_err(|()| {
                    format!(
                        "a jump-label site may hold a NOP or a jmp to its target {target:#x} ({}); it holds {now}",
                        name(target)
                    )
                })
            }
            Site::StaticCall { key, tail } => {
                self.judge_static(addr, Some(key), tail, cur, orig, &was, &now, name)
            }
            Site::StaticTramp { key } => {
                self.judge_static(addr, key, true, cur, orig, &was, &now, name)
            }
            Site::Fentry => {
                let ok = |t: u64| {
                    self.ftrace_callers.contains(&t) || self.direct_calls.contains(&(addr, t))
                };
                Forms { fixed: &[&NOP5], ops: &[CALL], target_ok: &ok }.admits(addr, cur, orig).map_err(
                    |()| {
                        format!(
                            "an ftrace function entry may hold a NOP or a call to ftrace's caller, a registered ftrace trampoline or its direct call; it holds {now}"
                        )
                    },
                )
            }
            Site::FtraceCall => {
                let ok = |t: u64| self.ftrace_funcs.contains(&t);
                Forms { fixed: &[], ops: &[CALL], target_ok: &ok }.admits(addr, cur, orig).map_err(|()| {
                    format!("ftrace's call site may call only a registered ftrace ops function; it holds {now}")
                })
            }
        }
    }

    /// A static call site (or trampoline, always a tail call): a call (jmp)
    /// to the key's function or the baseline's, or the forms for no
    /// function; in flight, a call to a function the key held when read in
    /// the last [`RECORD_GRACE`] (the key is updated before its sites): a
    /// site that lags longer is a violation.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn judge_static(
        &self,
        addr: u64,
        key: Option<u64>,
        tail: bool,
        cur: &[u8],
        orig: &[u8],
        was: &dyn Fn(u64) -> bool,
        now: &str,
        name: &dyn Fn(u64) -> String,
    ) -> Result<bool, String> {
        let func = key.and_then(|k| self.key_funcs.get(&k).copied());
        let settled = |t: u64| Some(t) == func || was(t) || (tail && Some(t) == self.return_thunk);
        let lately = |t: u64| key.is_some_and(|k| self.recent_key_funcs.contains(&(k, t)));
        let ok = |t: u64| settled(t) || lately(t);
        let (fixed, ops): (&[&[u8]], &[u8]) =
            if tail { (&[&RET5], &[JMP32]) } else { (&[&NOP5, &XOR5RAX], &[CALL]) };
        let in_flight =
            Forms { fixed, ops, target_ok: &ok }.admits(addr, cur, orig).map_err(|()| {
                format!(
                    "a static call {} may {} only its key's function{}; it holds {now}",
                    if tail { "trampoline or tail call" } else { "site" },
                    if tail { "jump to" } else { "call" },
                    func.map(|f| format!(" {f:#x} ({})", name(f))).unwrap_or_default()
                )
            })?;
        let lagging = ops.contains(&cur[0]) && rel_target(addr, cur).is_some_and(|t| !settled(t));
        Ok(in_flight || lagging)
    }

    /// Judges a registered kprobe's bytes: `int3` over the first byte, or
    /// (optimised) a `jmp` into a detour buffer.
    pub(super) fn judge_kprobe(
        &self,
        addr: u64,
        cur: &[u8],
        orig: &[u8],
        name: &dyn Fn(u64) -> String,
    ) -> Result<bool, String> {
        if cur.len() == 1 {
            return if cur[0] == INT3 {
                Ok(false)
            } else {
                Err(format!("a kprobe site holds {}", hex(cur)))
            };
        }
        let ok = |t: u64| self.optinsn.iter().any(|&(s, e)| (s..e).contains(&t));
        Forms { fixed: &[], ops: &[JMP32], target_ok: &ok }.admits(addr, cur, orig).map_err(|()| {
            format!(
                "an optimised kprobe may hold a jmp into a kprobe detour buffer; it holds {}",
                describe(addr, cur, name)
            )
        })
    }
}

/// A run of changed bytes at `start` (`c`, as they are now) that no unit of
/// `units` covers in full: a violation, or, between a module's functions
/// (padding a module reloaded at the same base need not reproduce), an
/// information finding. `None` when the units cover it.
fn unexplained(
    tables: &PatchTables,
    units: &[(u64, usize, Option<Site>)],
    start: u64,
    c: &[u8],
    name: &dyn Fn(u64) -> String,
) -> Option<(Severity, String)> {
    let end = start + c.len() as u64;
    let first =
        (start..end).find(|b| !units.iter().any(|&(a, l, _)| (a..a + l as u64).contains(b)))?;
    let in_module = tables.module_text.iter().any(|&(a, b)| a <= start && end <= b);
    let in_function = tables.module_functions.iter().any(|&(a, b)| a < end && start < b);
    if in_module && !in_function {
        return Some((
            Severity::Info,
            format!(
                "{} byte(s) at {start:#x} changed between the module's functions (alignment the loader leaves as it found it; the module reloaded at the same address?)",
                c.len()
            ),
        ));
    }
    let detail = if c.len() == 1 && c[0] == INT3 {
        format!("an int3 at {first:#x} where no kprobe is registered")
    } else {
        format!(
            "{} byte(s) at {start:#x} changed where the kernel patches nothing (no jump label, static call, ftrace entry or kprobe there); now {}",
            c.len(),
            describe(start, c, name)
        )
    };
    Some((Severity::Violation, detail))
}

impl Site {
    /// The instruction the kernel writes when it updates this site through
    /// its record (a static call's key, an ftrace ops): a call, or a static
    /// tail call's or trampoline's jmp. `None` for a jump label (its target
    /// is fixed, no record update explains another).
    fn update_op(self) -> Option<u8> {
        match self {
            Site::StaticCall { tail: false, .. } | Site::Fentry | Site::FtraceCall => Some(CALL),
            Site::StaticCall { tail: true, .. } | Site::StaticTramp { .. } => Some(JMP32),
            Site::JumpLabel { .. } => None,
        }
    }
}

impl PatchTables {
    /// The units that could explain a run of changed bytes `[start, end)`:
    /// the sites and registered kprobes that overlap it, as (address,
    /// length, site; `None` for a kprobe).
    fn units_over<M: GuestMemory + ?Sized>(
        &self,
        text: &Text<'_, M>,
        start: u64,
        end: u64,
    ) -> Vec<(u64, usize, Option<Site>)> {
        let mut units: Vec<(u64, usize, Option<Site>)> = Vec::new();
        for (&a, &site) in self.sites.range(start.saturating_sub(MAX_SITE - 1)..end) {
            let (Some(o), Some(c)) = (text.then(a, 5), text.now(a, 5)) else { continue };
            let len = self.site_len(site, &o, &c);
            if a + len as u64 > start {
                units.push((a, len, Some(site)));
            }
        }
        for a in start.saturating_sub(MAX_SITE - 1)..end {
            if self.kprobes.contains_key(&a) && !units.iter().any(|u| u.0 == a) {
                let (Some(o), Some(c)) = (text.then(a, 5), text.now(a, 5)) else { continue };
                let len = if c[1..] == o[1..] { 1 } else { 5 };
                units.push((a, len, None));
            }
        }
        units
    }
}

/// Bytes of guest text, now or as baselined, by virtual address.
pub(super) struct Text<'a, M: GuestMemory + ?Sized> {
    pub(super) mem: &'a M,
    pub(super) space: &'a dyn AddressSpace,
    pub(super) original: &'a dyn Fn(u64) -> Option<Vec<u8>>,
    /// The page being judged: its address, bytes now and original bytes.
    pub(super) page: (u64, &'a [u8], &'a [u8]),
}

impl<M: GuestMemory + ?Sized> Text<'_, M> {
    pub(super) fn now(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let (base, cur, _) = self.page;
        match within(base, addr, len) {
            Some(r) => Some(cur[r].to_vec()),
            None => read_virt(self.mem, self.space, addr, len).map(|(b, _)| b),
        }
    }

    pub(super) fn then(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let (base, _, orig) = self.page;
        if let Some(r) = within(base, addr, len) {
            return Some(orig[r].to_vec());
        }
        let mut out = Vec::with_capacity(len);
        let mut a = addr;
        while out.len() < len {
            let page = a & !(PAGE_SIZE - 1);
            let bytes = (self.original)(page)?;
            let off = usize::try_from(a - page).ok()?;
            let n = (bytes.len().checked_sub(off)?).min(len - out.len());
            out.extend_from_slice(bytes.get(off..off + n)?);
            a += n as u64;
            if n == 0 {
                return None;
            }
        }
        Some(out)
    }
}

pub(super) fn within(base: u64, addr: u64, len: usize) -> Option<std::ops::Range<usize>> {
    let off = usize::try_from(addr.checked_sub(base)?).ok()?;
    let end = off.checked_add(len)?;
    (end <= usize::try_from(PAGE_SIZE).ok()?).then_some(off..end)
}

/// Runs of differing bytes between two equal-length buffers, as offsets.
pub(super) fn diff_runs(a: &[u8], b: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            let s = i;
            while i < a.len() && a[i] != b[i] {
                i += 1;
            }
            runs.push((s, i));
        } else {
            i += 1;
        }
    }
    runs
}

/// Most runs of changed bytes examined on one page: more is no patching.
pub(super) const MAX_RUNS_PER_PAGE: usize = 512;

/// Compares each changed page with its original (from `original`, by page
/// address) and accepts the difference only where the kernel's own patching
/// explains every byte of it. `name` names addresses in details.
pub fn verify_pages<M: GuestMemory + ?Sized>(
    tables: &PatchTables,
    pages: &[ChangedPage],
    mem: &M,
    space: &dyn AddressSpace,
    original: &dyn Fn(u64) -> Option<Vec<u8>>,
    name: &dyn Fn(u64) -> String,
) -> Verdicts {
    let mut out = Verdicts::default();
    let mut judged: HashSet<u64> = HashSet::new();
    // Sites judged a violation or in flight, as [start, end): a site that
    // crosses into the next page is judged once, with the first page, and
    // the other page must not be taken as judged clean on its own.
    let mut unsettled: Vec<(u64, u64)> = Vec::new();
    for p in pages {
        // The page where the address maps now: a module unloaded and loaded
        // again at its base since the page was found changed has its text
        // in other frames, and the old frame may already hold anything.
        let now_at = space.translate(GuestVirtAddr(p.gva)).map(|(gpa, _)| gpa);
        let p = &ChangedPage { gpa: now_at.unwrap_or(p.gpa), ..p.clone() };
        let violation = |at: u64, detail: String, before: String, after: String| {
            let gpa = GuestPhysAddr(p.gpa.raw().wrapping_add(at.wrapping_sub(p.gva)));
            let mut f = Finding::new(
                &p.region,
                FindingKind::Content,
                Severity::Violation,
                GuestVirtAddr(at),
                gpa,
            )
            .saying(detail, before, after);
            f.page = Some(p.index);
            f
        };
        let mut cur = vec![0u8; crate::addr::PAGE_BYTES];
        if now_at.is_none() {
            out.violations.push(violation(
                p.gva,
                format!("page {} of {} changed and is no longer mapped", p.index, p.region),
                String::new(),
                String::new(),
            ));
            continue;
        }
        if let Err(e) = mem.read(p.gpa, &mut cur) {
            out.violations.push(violation(
                p.gva,
                format!("page {} of {} changed and cannot be read again: {e}", p.index, p.region),
                String::new(),
                String::new(),
            ));
            continue;
        }
        let Some(orig) = original(p.gva).filter(|o| o.len() == cur.len()) else {
            out.violations.push(violation(
                p.gva,
                format!("page {} of {} changed, and no original bytes are kept to tell a kernel patch from an attack", p.index, p.region),
                String::new(),
                String::new(),
            ));
            continue;
        };
        let text = Text { mem, space, original, page: (p.gva, &cur, &orig) };
        let runs = diff_runs(&orig, &cur);
        let (violations_before, accepted_before) = (out.violations.len(), out.accepted.len());
        if runs.len() > MAX_RUNS_PER_PAGE {
            out.violations.push(violation(
                p.gva,
                format!("page {} of {} changed in {} places: more than the kernel's patching ever changes on one page", p.index, p.region, runs.len()),
                String::new(),
                String::new(),
            ));
            continue;
        }
        for (s, e) in runs {
            let (start, end) = (p.gva + s as u64, p.gva + e as u64);
            let units = tables.units_over(&text, start, end);
            let (o, c) = (&orig[s..e], &cur[s..e]);
            if let Some((severity, detail)) = unexplained(tables, &units, start, c, name) {
                let mut f = violation(start, detail, hex(o), hex(c));
                f.severity = severity;
                out.violations.push(f);
                continue;
            }
            for (a, len, site) in units {
                if !judged.insert(a) {
                    continue;
                }
                let (Some(o), Some(c)) = (text.then(a, len), text.now(a, len)) else {
                    out.violations.push(violation(
                        a,
                        format!("the patch site at {a:#x} cannot be read"),
                        String::new(),
                        String::new(),
                    ));
                    continue;
                };
                if o == c {
                    continue;
                }
                let verdict = match site {
                    Some(site) => tables.judge(a, site, &c, &o, name).map(|f| (site.kind(), f)),
                    None => tables.judge_kprobe(a, &c, &o, name).map(|f| (PatchKind::Kprobe, f)),
                };
                match verdict {
                    Ok((kind, in_flight)) => {
                        let key = match site {
                            Some(Site::StaticCall { key, .. }) => Some(key),
                            Some(Site::StaticTramp { key }) => key,
                            _ => None,
                        };
                        if in_flight {
                            unsettled.push((a, a + len as u64));
                        }
                        out.accepted.push(Patched { addr: a, kind, bytes: c, in_flight, key })
                    }
                    Err(why) => {
                        // The instruction the kernel's update writes at a
                        // site patched through a record: any other is no
                        // update in flight.
                        let op = site.and_then(Site::update_op);
                        if op.is_some()
                            && c.first() == op.as_ref()
                            && (site != Some(Site::Fentry) || tables.may_be_trampoline(a, &c))
                        {
                            out.disagreements.push((a, c.clone()));
                        }
                        unsettled.push((a, a + len as u64));
                        out.violations.push(violation(a, why, hex(&o), hex(&c)));
                    }
                }
            }
        }
        // Pages with any finding (info too), or a site in flight, are judged
        // again at every check.
        if out.violations.len() == violations_before
            && !out.accepted[accepted_before..].iter().any(|u| u.in_flight)
        {
            let units = out.accepted[accepted_before..].to_vec();
            out.clean.push((p.gva, *blake3::hash(&cur).as_bytes(), units));
        }
    }
    out.clean.retain(|(gva, ..)| !unsettled.iter().any(|&(a, e)| a < gva + PAGE_SIZE && *gva < e));
    out
}
