//! Where the kernel patches: the site map made from the tables (kept while
//! they read the same), and the records read at one moment.

use super::*;

/// A table as read from guest memory: where it starts, and its bytes.
pub(super) type RawTable = (u64, Vec<u8>);
/// A module's jump entries and static call sites, as read (none when it has none).
pub(super) type ModuleTables = (Option<RawTable>, Option<RawTable>);

/// What the site map is made from, as read: the kernel's jump table and
/// static call sites, each listed module's two tables, and the ftrace
/// records' addresses. Errors are kept as the reason to report.
pub(super) struct SiteInputs {
    pub(super) kernel_jumps: Result<RawTable, String>,
    pub(super) kernel_calls: Result<RawTable, String>,
    /// One per module of `m.modules`: its jump entries and static call sites.
    pub(super) modules: Vec<Result<ModuleTables, String>>,
    pub(super) ftrace: Result<Vec<u64>, String>,
}

impl SiteInputs {
    pub(super) fn read<M: GuestMemory + ?Sized>(
        m: &Matched<'_>,
        mem: &M,
        space: &dyn AddressSpace,
    ) -> Self {
        let span = |a: &str, b: &str, entry: u64| -> Result<RawTable, String> {
            let (s, e) = (sym(m, a)?, sym(m, b)?);
            let len = e.checked_sub(s).ok_or("table ends before it starts")?;
            let what = format!("the kernel's {}", a.trim_start_matches("__start_"));
            Ok((s, read_counted(m, (mem, space), (s, len), len / entry, &what)?))
        };
        // The kernel's own first, then the modules' (a guest listing
        // thousands of modules spends the budget on them, not on these).
        let kernel_jumps = span("__start___jump_table", "__stop___jump_table", 16);
        let kernel_calls = span("__start_static_call_sites", "__stop_static_call_sites", 8);
        let ftrace = ftrace_records(m, mem, space);
        Self {
            kernel_jumps,
            kernel_calls,
            modules: m.modules.iter().map(|md| module_tables(m, mem, space, md)).collect(),
            ftrace,
        }
    }

    /// A digest of everything the site map depends on: these inputs, the
    /// profile, the slide, and where the modules' text is.
    pub(super) fn digest(&self, m: &Matched<'_>) -> [u8; 32] {
        /// Each field length-prefixed, so that no two inputs hash alike.
        struct Fields(blake3::Hasher);
        impl Fields {
            fn bytes(&mut self, b: &[u8]) {
                self.0.update(&(b.len() as u64).to_le_bytes());
                self.0.update(b);
            }
            fn table(&mut self, t: Option<&RawTable>) {
                match t {
                    Some((base, b)) => {
                        self.bytes(&base.to_le_bytes());
                        self.bytes(b);
                    }
                    None => self.bytes(b"none"),
                }
            }
            fn read<T>(&mut self, r: &Result<T, String>, each: impl FnOnce(&mut Self, &T)) {
                match r {
                    Ok(v) => each(self, v),
                    Err(e) => self.bytes(e.as_bytes()),
                }
            }
        }
        let mut h = Fields(blake3::Hasher::new());
        h.bytes(m.profile.release.as_bytes());
        h.bytes(m.profile.banner.as_bytes());
        h.bytes(&m.slide.to_le_bytes());
        h.read(&self.kernel_jumps, |h, t| h.table(Some(t)));
        h.read(&self.kernel_calls, |h, t| h.table(Some(t)));
        for (md, tables) in m.modules.iter().zip(&self.modules) {
            h.bytes(md.name.as_bytes());
            h.bytes(&md.base.to_le_bytes());
            h.bytes(&md.text_size.to_le_bytes());
            h.read(tables, |h, (j, c)| {
                h.table(j.as_ref());
                h.table(c.as_ref());
            });
        }
        h.read(&self.ftrace, |h, ips| {
            h.bytes(&(ips.len() as u64).to_le_bytes());
            for ip in ips {
                h.0.update(&ip.to_le_bytes());
            }
        });
        *h.0.finalize().as_bytes()
    }
}

/// The patch sites of a guest, made from its [`SiteInputs`]: the part of
/// reading the records that costs (tens of thousands of entries, each
/// placed in the kernel's text), kept between reads while its inputs stay
/// the same.
#[derive(Debug, Default, Clone)]
pub(super) struct SiteMap {
    pub(super) sites: BTreeMap<u64, Site>,
    /// Static call keys, whose functions are read anew each time.
    pub(super) keys: Vec<u64>,
    pub(super) problems: Vec<(Severity, String)>,
}

impl SiteMap {
    pub(super) fn build(m: &Matched<'_>, inputs: &SiteInputs) -> Self {
        let mut t = SiteMap::default();
        let slide = m.slide;
        let mut jumps = validated(
            &mut t.problems,
            m,
            "jump_table",
            "jump table",
            inputs.kernel_jumps.clone().and_then(|(base, b)| parse_jump_entries(&b, base)),
            |e| jump_table_digest(e, slide),
        );
        let mut calls = validated(
            &mut t.problems,
            m,
            "static_call_sites",
            "static call sites",
            inputs.kernel_calls.clone().and_then(|(base, b)| parse_static_call_sites(&b, base)),
            |e| static_call_digest(e, slide),
        );
        for (md, tables) in m.modules.iter().zip(&inputs.modules) {
            let parsed = tables.clone().and_then(|(j, c)| {
                if let Some((base, b)) = j {
                    jumps.extend(parse_jump_entries(&b, base)?);
                }
                if let Some((base, b)) = c {
                    calls.extend(parse_static_call_sites(&b, base)?);
                }
                Ok(())
            });
            if let Err(e) = parsed {
                t.problems.push((Severity::Info, format!("module {}: {e}", md.name)));
            }
        }

        let in_module = |a: u64| {
            m.modules.iter().any(|md| (md.base..md.base.saturating_add(md.text_size)).contains(&a))
        };
        let in_text = |a: u64| m.profile.symbolize(a.wrapping_sub(slide)).is_some() || in_module(a);
        for e in &jumps {
            if in_text(e.code) {
                t.sites.insert(e.code, Site::JumpLabel { target: e.target, key: e.key });
            }
        }
        let mut keys = HashSet::new();
        for s in &calls {
            if in_text(s.addr) {
                t.sites.insert(s.addr, Site::StaticCall { key: s.key, tail: s.tail });
                keys.insert(s.key);
            }
        }
        // Static call trampolines, named `__SCT__x` with key `__SCK__x`.
        for s in m.profile.symbols().iter().filter(|s| s.name.starts_with("__SCT__")) {
            let key = m.expect(&format!("__SCK__{}", &s.name["__SCT__".len()..]));
            t.sites.insert(s.addr.wrapping_add(slide), Site::StaticTramp { key });
            keys.extend(key);
        }
        t.keys = keys.into_iter().collect();
        t.keys.sort_unstable();

        // ftrace: its records, validated against the profile's function entries.
        match &inputs.ftrace {
            Ok(ips) => {
                let mut strays = 0usize;
                let mut first = None;
                for &ip in ips {
                    let kernel_ok = m.profile.fentry.binary_search(&ip.wrapping_sub(slide)).is_ok();
                    if kernel_ok || in_module(ip) {
                        t.sites.entry(ip).or_insert(Site::Fentry);
                    } else if crate::linux::semantic::MODULES.contains(&ip) {
                        // A module coming or going: its text is protected by
                        // nothing that would use the record.
                    } else {
                        strays += 1;
                        first.get_or_insert(ip);
                    }
                }
                if strays > 0 {
                    t.problems.push((
                        Severity::Violation,
                        format!(
                            "{strays} ftrace record(s) outside the module area name no function entry the profile has (first at {:#x}): records were forged",
                            first.unwrap_or(0)
                        ),
                    ));
                }
            }
            Err(e) => t.problems.push((Severity::Info, format!("ftrace records: {e}"))),
        }
        for name in ["ftrace_call", "ftrace_regs_call"] {
            if let Some(a) = m.expect(name) {
                t.sites.insert(a, Site::FtraceCall);
            }
        }
        t
    }
}

/// The site map a watch made last, and the digest of what it was made from.
#[derive(Debug, Default, Clone)]
pub struct SiteMemo(Option<([u8; 32], std::sync::Arc<SiteMap>)>);

impl SiteMemo {
    /// Host memory the kept site map holds.
    pub(super) fn held_bytes(&self) -> u64 {
        use crate::memory::held;
        self.0.as_ref().map_or(0, |(_, m)| {
            held::btree(&m.sites)
                + held::vec(&m.keys)
                + held::vec(&m.problems)
                + m.problems.iter().map(|(_, p)| held::string(p)).sum::<u64>()
        })
    }

    /// The site map of `inputs`: the one kept when they are what it was
    /// made from, else a new one (then kept).
    pub(super) fn get(&mut self, m: &Matched<'_>, inputs: &SiteInputs) -> std::sync::Arc<SiteMap> {
        let digest = inputs.digest(m);
        match &self.0 {
            Some((d, map)) if *d == digest => map.clone(),
            _ => {
                let map = std::sync::Arc::new(SiteMap::build(m, inputs));
                self.0 = Some((digest, map.clone()));
                map
            }
        }
    }
}

impl PatchTables {
    /// Reads every patch record of the guest: the kernel's and its modules'
    /// (`m.modules`, walked before) jump tables and static call sites, the
    /// ftrace records and ops, the kprobes.
    pub fn read<M: GuestMemory + ?Sized>(
        m: &Matched<'_>,
        mem: &M,
        space: &dyn AddressSpace,
    ) -> Self {
        Self::read_with(m, mem, space, &mut SiteMemo::default())
    }

    /// [`Self::read`], with the site map taken from `memo` when the tables it
    /// is made from read the same as when it was made. Every record is
    /// still read each time; only the work of placing unchanged ones is
    /// saved.
    pub fn read_with<M: GuestMemory + ?Sized>(
        m: &Matched<'_>,
        mem: &M,
        space: &dyn AddressSpace,
        memo: &mut SiteMemo,
    ) -> Self {
        // What an earlier reading of these tables held is dropped by now.
        m.reads.begin_pass();
        let map = memo.get(m, &SiteInputs::read(m, mem, space));
        let mut t = PatchTables {
            sites: SiteSet(map.clone()),
            problems: map.problems.clone(),
            ..PatchTables::default()
        };
        let info = |t: &mut PatchTables, what: String| t.problems.push((Severity::Info, what));

        for md in &m.modules {
            let text = (md.base, md.base.saturating_add(md.text_size));
            t.module_text.push(text);
            match module_functions(m, mem, space, md) {
                Ok(f) => t
                    .module_functions
                    .extend(f.into_iter().filter(|&(s, _)| (text.0..text.1).contains(&s))),
                // Without its symbols, all of a module's text counts as code.
                Err(_) => t.module_functions.push(text),
            }
        }
        for &k in &map.keys {
            if let Some(f) = read_u64(mem, space, k) {
                t.key_funcs.insert(k, f);
            }
        }
        t.return_thunk = m.expect("__x86_return_thunk");

        for name in ["ftrace_caller", "ftrace_regs_caller"] {
            t.ftrace_callers.extend(m.expect(name));
        }
        for name in [
            "ftrace_stub",
            "ftrace_ops_list_func",
            "arch_ftrace_ops_list_func",
            "ftrace_ops_assist_func",
            "ftrace_pid_func",
        ] {
            t.ftrace_funcs.extend(m.expect(name));
        }
        match ftrace_ops(m, mem, space) {
            Ok(ops) => {
                // A trampoline is believed only as ftrace makes one (the
                // hook inventory reports an ops that names another).
                let callers = crate::linux::hooks::callers(m, mem, space);
                for o in ops {
                    if o.trampoline != 0 && genuine(m, mem, space, &o, &callers) {
                        t.ftrace_callers.insert(o.trampoline);
                    }
                    if o.func != 0 {
                        t.ftrace_funcs.insert(o.func);
                    }
                }
            }
            Err(e) => info(&mut t, format!("ftrace ops: {e}")),
        }
        match crate::linux::hooks::accepted_direct_calls(m, mem, space) {
            Ok(calls) => t.direct_calls.extend(calls),
            Err(e) => info(&mut t, format!("ftrace direct calls: {e}")),
        }

        // kprobes.
        match kprobes(m, mem, space) {
            Ok(list) => t.kprobes = list,
            Err(e) => info(&mut t, format!("kprobes: {e}")),
        }
        if let Ok(pages) = slot_pages(m, mem, space, "kprobe_optinsn_slots") {
            t.optinsn = pages.into_iter().map(|p| (p, p.saturating_add(PAGE_SIZE))).collect();
        }
        t
    }
}

/// The entries of a kernel table read from guest memory, if they are the
/// ones the profile's digest names; otherwise none, and why.
pub(super) fn validated<T>(
    problems: &mut Vec<(Severity, String)>,
    m: &Matched<'_>,
    table: &str,
    what: &str,
    read: Result<Vec<T>, String>,
    digest: impl Fn(&[T]) -> (u64, String),
) -> Vec<T> {
    let entries = match read {
        Ok(e) => e,
        Err(e) => {
            problems.push((Severity::Info, format!("the kernel's {what}: {e}")));
            return Vec::new();
        }
    };
    let got = digest(&entries);
    match m.profile.table(table) {
        Some((n, d)) if (n, d) == (got.0, got.1.as_str()) => entries,
        Some((n, _)) => {
            problems.push((
                Severity::Violation,
                format!(
                    "the kernel's {what} ({} entries) differ from the profile's ({n} entries): its records were altered",
                    got.0
                ),
            ));
            Vec::new()
        }
        None => {
            problems.push((Severity::Info, format!("the profile has no digest of the {what}")));
            Vec::new()
        }
    }
}

impl PatchTables {
    /// Number of patch sites known (for reports and tests).
    pub fn site_count(&self) -> usize {
        self.sites.len()
    }

    /// Whether `addr` is a known patch site of `kind`.
    pub fn is_site(&self, addr: u64, kind: PatchKind) -> bool {
        self.sites.get(&addr).is_some_and(|s| s.kind() == kind)
    }

    /// Whether any known site (or kprobe) covers a byte of `[start, end)`.
    pub fn touches(&self, start: u64, end: u64) -> bool {
        self.sites.range(start.saturating_sub(MAX_SITE - 1)..end).next().is_some()
            || (start.saturating_sub(MAX_SITE - 1)..end).any(|a| self.kprobes.contains_key(&a))
    }

    /// Jump-label sites, their targets and keys (for tests and diagnostics).
    pub fn jump_labels(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.sites.iter().filter_map(|(&a, s)| match s {
            Site::JumpLabel { target, key } => Some((a, *target, *key)),
            _ => None,
        })
    }

    /// Static call sites that are no tail calls, and their keys (for tests
    /// and diagnostics).
    pub fn static_calls(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.sites.iter().filter_map(|(&a, s)| match s {
            Site::StaticCall { key, tail: false } => Some((a, *key)),
            _ => None,
        })
    }

    /// Addresses of registered `int3` kprobes.
    pub fn kprobe_addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.kprobes.keys().copied()
    }
}
