//! The kernel's own text patching, told apart from an attacker's.
//!
//! A running Linux rewrites its text: jump labels flip between a NOP and a
//! `jmp` to one target, static calls re-point a `call`, ftrace turns function
//! entries into calls to its caller or a trampoline and back, kprobes place
//! `int3` (or, optimised, a `jmp` into a detour buffer). Each of these has a
//! record the kernel keeps: the jump table and static call sites (in
//! read-only-after-init data, validated against the profile's digest), the
//! ftrace records (validated against the profile's list of patchable
//! function entries), the registered kprobes and the ftrace ops.
//!
//! [`PatchTables::read`] reads those records from guest memory, bounded and
//! checked; [`verify_pages`] compares each changed page with its original,
//! splits the difference into runs and accepts a run only when it lies on
//! known sites and each site holds an encoding the kernel writes there, with
//! the site's legitimate target. Everything else is a violation.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use crate::integrity::{AddressSpace, Finding, FindingKind, Severity};
use crate::memory::GuestMemory;

use super::semantic::{Matched, Module, read_u32, read_u64, read_virt};

pub const NOP2: [u8; 2] = [0x66, 0x90];
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const INT3: u8 = 0xcc;
const CALL: u8 = 0xe8;
const JMP32: u8 = 0xe9;
const JMP8: u8 = 0xeb;
/// `xor %eax,%eax` padded to five bytes: a static call to `__static_call_return0`.
const XOR5RAX: [u8; 5] = [0x2e, 0x2e, 0x2e, 0x31, 0xc0];
/// `ret` padded with `int3`: a static call with no function, as a tail call.
const RET5: [u8; 5] = [0xc3, 0xcc, 0xcc, 0xcc, 0xcc];

const MAX_TABLE_ENTRIES: usize = 1 << 18;
const MAX_TABLE_BYTES: u64 = 16 << 20;
const MAX_FTRACE_PAGES: usize = 1 << 14;
const MAX_FTRACE_RECORDS: usize = 1 << 20;
const MAX_LIST: usize = 1 << 14;
/// `KPROBE_TABLE_SIZE` (1 << KPROBE_HASH_BITS) in 6.1.
const KPROBE_TABLE_SIZE: u64 = 64;
/// `KPROBE_FLAG_FTRACE`: the probe uses ftrace, not `int3`.
const KPROBE_FLAG_FTRACE: u32 = 8;
const KPROBE_FLAG_GONE: u32 = 1;
/// `BPF_PROG_PACK_SIZE` with one NUMA node: 2 MiB.
const BPF_PACK_SIZE: u64 = 2 << 20;
/// Largest executable allocation believed from a kernel record.
const MAX_EXEC_RANGE: u64 = 64 << 20;
/// Longest site: `jmp`/`call rel32`.
const MAX_SITE: u64 = 5;

/// What kind of kernel patching a change is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchKind {
    JumpLabel,
    StaticCall,
    Ftrace,
    Kprobe,
}

impl PatchKind {
    pub const ALL: [PatchKind; 4] =
        [PatchKind::JumpLabel, PatchKind::StaticCall, PatchKind::Ftrace, PatchKind::Kprobe];

    pub fn as_str(self) -> &'static str {
        match self {
            PatchKind::JumpLabel => "jump_label",
            PatchKind::StaticCall => "static_call",
            PatchKind::Ftrace => "ftrace",
            PatchKind::Kprobe => "kprobe",
        }
    }
}

/// One `struct jump_entry`, made absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpEntry {
    pub code: u64,
    pub target: u64,
    pub key: u64,
    /// The branch's default direction (bit 0 of the key).
    pub branch: bool,
}

fn i32_at(b: &[u8], off: usize) -> i64 {
    i64::from(i32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes")))
}

/// Parses a `__jump_table` of relative entries (`s32 code, s32 target, long
/// key`) that lies at `base`.
pub fn parse_jump_entries(bytes: &[u8], base: u64) -> Result<Vec<JumpEntry>, String> {
    if !bytes.len().is_multiple_of(16) || bytes.len() / 16 > MAX_TABLE_ENTRIES {
        return Err(format!("{} bytes is no table of 16-byte entries", bytes.len()));
    }
    Ok(bytes
        .chunks_exact(16)
        .zip(0u64..)
        .map(|(e, i)| {
            let at = base.wrapping_add(i * 16);
            let key = i64::from_le_bytes(e[8..16].try_into().expect("8 bytes"));
            JumpEntry {
                code: at.wrapping_add_signed(i32_at(e, 0)),
                target: at.wrapping_add(4).wrapping_add_signed(i32_at(e, 4)),
                key: at.wrapping_add(8).wrapping_add_signed(key & !3),
                branch: key & 1 != 0,
            }
        })
        .collect())
}

/// One `struct static_call_site`, made absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticCallSite {
    pub addr: u64,
    pub key: u64,
    /// A tail call (`jmp`), not a `call`.
    pub tail: bool,
}

/// Parses `.static_call_sites` (`s32 addr, s32 key`) that lies at `base`.
pub fn parse_static_call_sites(bytes: &[u8], base: u64) -> Result<Vec<StaticCallSite>, String> {
    if !bytes.len().is_multiple_of(8) || bytes.len() / 8 > MAX_TABLE_ENTRIES {
        return Err(format!("{} bytes is no table of 8-byte entries", bytes.len()));
    }
    Ok(bytes
        .chunks_exact(8)
        .zip(0u64..)
        .map(|(e, i)| {
            let at = base.wrapping_add(i * 8);
            let key = i32_at(e, 4);
            StaticCallSite {
                addr: at.wrapping_add_signed(i32_at(e, 0)),
                key: at.wrapping_add(4).wrapping_add_signed(key & !3),
                tail: key & 1 != 0,
            }
        })
        .collect())
}

fn digest(mut rows: Vec<[u64; 3]>) -> (u64, String) {
    rows.sort_unstable();
    let mut h = blake3::Hasher::new();
    for r in &rows {
        for v in r {
            h.update(&v.to_le_bytes());
        }
    }
    (rows.len() as u64, h.finalize().to_hex().to_string())
}

/// Count and digest of a jump table, at link-time addresses (`slide`
/// removed), independent of the order the kernel sorted it into and of the
/// flags it set at boot.
pub fn jump_table_digest(entries: &[JumpEntry], slide: u64) -> (u64, String) {
    digest(
        entries
            .iter()
            .map(|e| {
                [
                    e.code.wrapping_sub(slide),
                    e.target.wrapping_sub(slide),
                    e.key.wrapping_sub(slide) | u64::from(e.branch),
                ]
            })
            .collect(),
    )
}

/// Count and digest of the static call sites, as [`jump_table_digest`].
pub fn static_call_digest(sites: &[StaticCallSite], slide: u64) -> (u64, String) {
    digest(
        sites
            .iter()
            .map(|s| [s.addr.wrapping_sub(slide), s.key.wrapping_sub(slide), u64::from(s.tail)])
            .collect(),
    )
}

/// A place in text the kernel patches, and what it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Site {
    /// A NOP or a `jmp` to `target` (2 or 5 bytes), switched by `key`.
    JumpLabel { target: u64, key: u64 },
    /// A `call` (or, as a tail call, `jmp`) to the static call key's function.
    StaticCall { key: u64, tail: bool },
    /// A static call trampoline: `jmp` to the key's function, or a return.
    StaticTramp { key: Option<u64> },
    /// A patchable function entry: a NOP or a `call` to an ftrace caller or
    /// trampoline.
    Fentry,
    /// The `call` inside ftrace's caller that ftrace points at the ops' function.
    FtraceCall,
}

impl Site {
    fn kind(self) -> PatchKind {
        match self {
            Site::JumpLabel { .. } => PatchKind::JumpLabel,
            Site::StaticCall { .. } | Site::StaticTramp { .. } => PatchKind::StaticCall,
            Site::Fentry | Site::FtraceCall => PatchKind::Ftrace,
        }
    }
}

/// Executable memory outside modules that the kernel keeps a record of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRange {
    pub start: u64,
    pub end: u64,
    pub what: &'static str,
}

/// The site map a [`PatchTables`] reads its sites from, shared with the
/// watch's [`SiteMemo`].
#[derive(Debug, Default)]
struct SiteSet(std::sync::Arc<SiteMap>);

impl std::ops::Deref for SiteSet {
    type Target = BTreeMap<u64, Site>;
    fn deref(&self) -> &Self::Target {
        &self.0.sites
    }
}

#[cfg(test)]
impl SiteSet {
    fn insert(&mut self, addr: u64, site: Site) {
        std::sync::Arc::make_mut(&mut self.0).sites.insert(addr, site);
    }
}

/// The patch records of one guest, read at one moment.
#[derive(Debug, Default)]
pub struct PatchTables {
    sites: SiteSet,
    /// Registered kprobes that place `int3`: address to flags.
    kprobes: HashMap<u64, u32>,
    /// What a function entry may call: ftrace's callers and ops trampolines.
    ftrace_callers: HashSet<u64>,
    /// What ftrace's own call sites may call: ops functions and ftrace's stubs.
    ftrace_funcs: HashSet<u64>,
    /// Function each static call key holds now.
    key_funcs: HashMap<u64, u64>,
    /// (key, function) pairs read within [`RECORD_GRACE`]: the kernel
    /// writes a key, then its sites one by one, so a site may still call
    /// what its key held a moment ago.
    recent_key_funcs: HashSet<(u64, u64)>,
    return_thunk: Option<u64>,
    /// Optimised kprobes' detour buffers.
    optinsn: Vec<(u64, u64)>,
    /// Listed modules' text, and the functions in it (from their symbol
    /// tables): bytes of module text outside every function are alignment
    /// gaps that the loader leaves as it found them.
    module_text: Vec<(u64, u64)>,
    module_functions: Vec<(u64, u64)>,
    /// Records that could not be read or do not match the profile:
    /// (is it a violation, what).
    pub problems: Vec<(Severity, String)>,
}

/// Reads a `list_head` list from `head`, calling `each` with every entry's
/// `list_head` address; bounded and loop-safe.
fn walk_list<M: GuestMemory + ?Sized>(
    mem: &M,
    space: &dyn AddressSpace,
    head: u64,
    mut each: impl FnMut(u64),
) -> Result<(), String> {
    let mut seen = HashSet::new();
    let mut next =
        read_u64(mem, space, head).ok_or_else(|| format!("list at {head:#x} unreadable"))?;
    while next != head {
        if !seen.insert(next) || seen.len() > MAX_LIST {
            return Err(format!("list at {head:#x} loops or is longer than {MAX_LIST}"));
        }
        each(next);
        next = read_u64(mem, space, next).ok_or_else(|| format!("list at {head:#x} breaks off"))?;
    }
    Ok(())
}

fn need(m: &Matched<'_>, path: &str) -> Result<u64, String> {
    m.profile.offset(path).ok_or_else(|| format!("the profile has no offset {path}"))
}

fn sym(m: &Matched<'_>, name: &str) -> Result<u64, String> {
    m.expect(name).ok_or_else(|| format!("the profile has no symbol {name}"))
}

/// Executable allocations the kernel records outside modules: ftrace ops
/// trampolines, kprobe instruction slots, BPF program packs and BPF images.
/// Returns the ranges, and what could not be read.
pub fn exec_ranges<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> (Vec<ExecRange>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let push = |start: u64, len: u64, what: &'static str, out: &mut Vec<ExecRange>| {
        if start != 0 && len > 0 && len <= MAX_EXEC_RANGE {
            out.push(ExecRange { start, end: start.saturating_add(len), what });
        }
    };
    // ftrace ops trampolines: of the ops registered now, and of every ops
    // whose trampoline is still allocated (ftrace keeps a static ops'
    // trampoline after it unregisters it, on ftrace_ops_trampoline_list).
    if let Err(e) = ftrace_ops(m, mem, space).map(|ops| {
        for o in ops {
            push(o.trampoline, o.trampoline_size, "an ftrace trampoline", &mut out);
        }
    }) {
        problems.push(format!("ftrace ops: {e}"));
    }
    if let Err(e) = trampoline_ops(m, mem, space).map(|ops| {
        for o in ops {
            push(o.trampoline, o.trampoline_size, "an ftrace trampoline", &mut out);
        }
    }) {
        problems.push(format!("ftrace trampolines: {e}"));
    }
    // kprobe instruction slots, plain and optimised.
    for (cache, what) in [
        ("kprobe_insn_slots", "a kprobe instruction slot page"),
        ("kprobe_optinsn_slots", "a kprobe optimisation buffer page"),
    ] {
        if let Err(e) = slot_pages(m, mem, space, cache).map(|pages| {
            for p in pages {
                push(p, PAGE_SIZE, what, &mut out);
            }
        }) {
            problems.push(format!("{cache}: {e}"));
        }
    }
    // BPF program packs and every BPF image with a kallsyms entry.
    let packs = (|| -> Result<(), String> {
        let (list, ptr) = (need(m, "bpf_prog_pack.list")?, need(m, "bpf_prog_pack.ptr")?);
        let mut found = Vec::new();
        walk_list(mem, space, sym(m, "pack_list")?, |e| found.push(e.wrapping_sub(list)))?;
        for p in found {
            if let Some(at) = read_u64(mem, space, p.wrapping_add(ptr)) {
                push(at, BPF_PACK_SIZE, "a BPF program pack", &mut out);
            }
        }
        Ok(())
    })();
    if let Err(e) = packs {
        problems.push(format!("BPF program packs: {e}"));
    }
    let ksyms = (|| -> Result<(), String> {
        let (lnode, start, end) =
            (need(m, "bpf_ksym.lnode")?, need(m, "bpf_ksym.start")?, need(m, "bpf_ksym.end")?);
        let mut found = Vec::new();
        walk_list(mem, space, sym(m, "bpf_kallsyms")?, |e| found.push(e.wrapping_sub(lnode)))?;
        for k in found {
            if let (Some(s), Some(e)) = (
                read_u64(mem, space, k.wrapping_add(start)),
                read_u64(mem, space, k.wrapping_add(end)),
            ) {
                push(s, e.saturating_sub(s), "a BPF image", &mut out);
            }
        }
        Ok(())
    })();
    if let Err(e) = ksyms {
        problems.push(format!("BPF images: {e}"));
    }
    (out, problems)
}

struct Ops {
    func: u64,
    trampoline: u64,
    trampoline_size: u64,
}

fn ftrace_ops<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<Ops>, String> {
    let (next_off, func_off, tramp_off, size_off) = (
        need(m, "ftrace_ops.next")?,
        need(m, "ftrace_ops.func")?,
        need(m, "ftrace_ops.trampoline")?,
        need(m, "ftrace_ops.trampoline_size")?,
    );
    let end = sym(m, "ftrace_list_end")?;
    let mut ops = Vec::new();
    let mut seen = HashSet::new();
    let mut at =
        read_u64(mem, space, sym(m, "ftrace_ops_list")?).ok_or("ftrace_ops_list unreadable")?;
    while at != end && at != 0 {
        if !seen.insert(at) || seen.len() > MAX_LIST {
            return Err("the ops list loops or is too long".into());
        }
        ops.push(Ops {
            func: read_u64(mem, space, at.wrapping_add(func_off)).unwrap_or(0),
            trampoline: read_u64(mem, space, at.wrapping_add(tramp_off)).unwrap_or(0),
            trampoline_size: u64::from(
                read_u32(mem, space, at.wrapping_add(size_off)).unwrap_or(0),
            ),
        });
        at = read_u64(mem, space, at.wrapping_add(next_off)).ok_or("the ops list breaks off")?;
    }
    Ok(ops)
}

/// The ops on `ftrace_ops_trampoline_list`: every ops with an allocated trampoline.
fn trampoline_ops<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<Ops>, String> {
    let (list, tramp_off, size_off) = (
        need(m, "ftrace_ops.list")?,
        need(m, "ftrace_ops.trampoline")?,
        need(m, "ftrace_ops.trampoline_size")?,
    );
    let mut entries = Vec::new();
    walk_list(mem, space, sym(m, "ftrace_ops_trampoline_list")?, |e| {
        entries.push(e.wrapping_sub(list))
    })?;
    Ok(entries
        .into_iter()
        .map(|o| Ops {
            func: 0,
            trampoline: read_u64(mem, space, o.wrapping_add(tramp_off)).unwrap_or(0),
            trampoline_size: u64::from(read_u32(mem, space, o.wrapping_add(size_off)).unwrap_or(0)),
        })
        .collect())
}

fn slot_pages<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    cache: &str,
) -> Result<Vec<u64>, String> {
    let (pages, list, insns) = (
        need(m, "kprobe_insn_cache.pages")?,
        need(m, "kprobe_insn_page.list")?,
        need(m, "kprobe_insn_page.insns")?,
    );
    let mut entries = Vec::new();
    walk_list(mem, space, sym(m, cache)?.wrapping_add(pages), |e| {
        entries.push(e.wrapping_sub(list))
    })?;
    Ok(entries.into_iter().filter_map(|p| read_u64(mem, space, p.wrapping_add(insns))).collect())
}

fn read_span<M: GuestMemory + ?Sized>(
    mem: &M,
    space: &dyn AddressSpace,
    start: u64,
    len: u64,
) -> Result<Vec<u8>, String> {
    if len > MAX_TABLE_BYTES {
        return Err(format!("{len} bytes is implausibly long"));
    }
    read_virt(mem, space, start, usize::try_from(len).map_err(|e| e.to_string())?)
        .map(|(b, _)| b)
        .ok_or_else(|| format!("{len} bytes at {start:#x} are not readable"))
}

/// A table as read from guest memory: where it starts, and its bytes.
type RawTable = (u64, Vec<u8>);
/// A module's jump entries and static call sites, as read (none when it has none).
type ModuleTables = (Option<RawTable>, Option<RawTable>);

/// What the site map is made from, as read: the kernel's jump table and
/// static call sites, each listed module's two tables, and the ftrace
/// records' addresses. Errors are kept as the reason to report.
struct SiteInputs {
    kernel_jumps: Result<RawTable, String>,
    kernel_calls: Result<RawTable, String>,
    /// One per module of `m.modules`: its jump entries and static call sites.
    modules: Vec<Result<ModuleTables, String>>,
    ftrace: Result<Vec<u64>, String>,
}

impl SiteInputs {
    fn read<M: GuestMemory + ?Sized>(m: &Matched<'_>, mem: &M, space: &dyn AddressSpace) -> Self {
        let span = |a: &str, b: &str| -> Result<RawTable, String> {
            let (s, e) = (sym(m, a)?, sym(m, b)?);
            Ok((
                s,
                read_span(mem, space, s, e.checked_sub(s).ok_or("table ends before it starts")?)?,
            ))
        };
        Self {
            kernel_jumps: span("__start___jump_table", "__stop___jump_table"),
            kernel_calls: span("__start_static_call_sites", "__stop_static_call_sites"),
            modules: m.modules.iter().map(|md| module_tables(m, mem, space, md)).collect(),
            ftrace: ftrace_records(m, mem, space),
        }
    }

    /// A digest of everything the site map depends on: these inputs, the
    /// profile, the slide, and where the modules' text is.
    fn digest(&self, m: &Matched<'_>) -> [u8; 32] {
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
struct SiteMap {
    sites: BTreeMap<u64, Site>,
    /// Static call keys, whose functions are read anew each time.
    keys: Vec<u64>,
    problems: Vec<(Severity, String)>,
}

impl SiteMap {
    fn build(m: &Matched<'_>, inputs: &SiteInputs) -> Self {
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
                    } else if super::semantic::MODULES.contains(&ip) {
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
    /// The site map of `inputs`: the one kept when they are what it was
    /// made from, else a new one (then kept).
    fn get(&mut self, m: &Matched<'_>, inputs: &SiteInputs) -> std::sync::Arc<SiteMap> {
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
                for o in ops {
                    if o.trampoline != 0 {
                        t.ftrace_callers.insert(o.trampoline);
                    }
                    if o.func != 0 {
                        t.ftrace_funcs.insert(o.func);
                    }
                }
            }
            Err(e) => info(&mut t, format!("ftrace ops: {e}")),
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
fn validated<T>(
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

    /// Addresses of registered `int3` kprobes.
    pub fn kprobe_addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.kprobes.keys().copied()
    }
}

/// A module's jump entries and static call sites, as read.
fn module_tables<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    md: &Module,
) -> Result<ModuleTables, String> {
    let at = md.addr;
    let (je, nje, sc, nsc) = (
        need(m, "module.jump_entries")?,
        need(m, "module.num_jump_entries")?,
        need(m, "module.static_call_sites")?,
        need(m, "module.num_static_call_sites")?,
    );
    let u32_field = |off: u64| read_u32(mem, space, at.wrapping_add(off)).ok_or("unreadable");
    let u64_field = |off: u64| read_u64(mem, space, at.wrapping_add(off)).ok_or("unreadable");
    let table = |count: u64, entry: u64, base: u64| -> Result<Option<RawTable>, String> {
        if count == 0 {
            return Ok(None);
        }
        Ok(Some((base, read_span(mem, space, base, count.saturating_mul(entry))?)))
    };
    let jumps = table(u64::from(u32_field(nje)?), 16, u64_field(je)?)?;
    let calls = table(u64::from(u32_field(nsc)?), 8, u64_field(sc)?)?;
    Ok((jumps, calls))
}

/// `STT_FUNC` symbols of a module, as address ranges.
fn module_functions<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    md: &Module,
) -> Result<Vec<(u64, u64)>, String> {
    const SYM: usize = 24;
    const STT_FUNC: u8 = 2;
    let (ks_off, tab_off, n_off) = (
        need(m, "module.kallsyms")?,
        need(m, "mod_kallsyms.symtab")?,
        need(m, "mod_kallsyms.num_symtab")?,
    );
    let ks = read_u64(mem, space, md.addr.wrapping_add(ks_off)).ok_or("kallsyms unreadable")?;
    let tab = read_u64(mem, space, ks.wrapping_add(tab_off)).ok_or("symtab unreadable")?;
    let n = u64::from(read_u32(mem, space, ks.wrapping_add(n_off)).ok_or("num_symtab unreadable")?);
    if n > 1 << 16 {
        return Err(format!("{n} symbols is implausible"));
    }
    let bytes = read_span(mem, space, tab, n * SYM as u64)?;
    Ok(bytes
        .chunks_exact(SYM)
        .filter(|s| s[4] & 0xf == STT_FUNC)
        .filter_map(|s| {
            let value = u64::from_le_bytes(s[8..16].try_into().expect("8 bytes"));
            let size = u64::from_le_bytes(s[16..24].try_into().expect("8 bytes"));
            (size > 0 && size < 1 << 24).then(|| (value, value.saturating_add(size)))
        })
        .collect())
}

fn ftrace_records<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<u64>, String> {
    let (next_off, recs_off, index_off, ip_off, size) = (
        need(m, "ftrace_page.next")?,
        need(m, "ftrace_page.records")?,
        need(m, "ftrace_page.index")?,
        need(m, "dyn_ftrace.ip")?,
        need(m, "dyn_ftrace.#size")?,
    );
    if !(8..=256).contains(&size) || ip_off + 8 > size {
        return Err(format!("implausible dyn_ftrace size {size}"));
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut pg = read_u64(mem, space, sym(m, "ftrace_pages_start")?)
        .ok_or("ftrace_pages_start unreadable")?;
    while pg != 0 {
        if !seen.insert(pg) || seen.len() > MAX_FTRACE_PAGES {
            return Err("the ftrace page list loops or is too long".into());
        }
        let recs = read_u64(mem, space, pg.wrapping_add(recs_off))
            .ok_or("a page's records pointer unreadable")?;
        let n = u64::from(
            read_u32(mem, space, pg.wrapping_add(index_off)).ok_or("a page's count unreadable")?,
        );
        if out.len() as u64 + n > MAX_FTRACE_RECORDS as u64 {
            return Err(format!("more than {MAX_FTRACE_RECORDS} records"));
        }
        if n > 0 {
            let bytes = read_span(mem, space, recs, n * size)?;
            let step = usize::try_from(size).expect("checked above");
            let ip = usize::try_from(ip_off).expect("checked above");
            out.extend(
                bytes
                    .chunks_exact(step)
                    .map(|r| u64::from_le_bytes(r[ip..ip + 8].try_into().expect("8 bytes"))),
            );
        }
        pg = read_u64(mem, space, pg.wrapping_add(next_off))
            .ok_or("the ftrace page list breaks off")?;
    }
    Ok(out)
}

fn kprobes<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<HashMap<u64, u32>, String> {
    let (hlist, addr_off, flags_off) =
        (need(m, "kprobe.hlist")?, need(m, "kprobe.addr")?, need(m, "kprobe.flags")?);
    let table = sym(m, "kprobe_table")?;
    let mut out = HashMap::new();
    let mut seen = HashSet::new();
    for i in 0..KPROBE_TABLE_SIZE {
        let mut node = read_u64(mem, space, table + i * 8).ok_or("kprobe_table unreadable")?;
        while node != 0 {
            if !seen.insert(node) || seen.len() > MAX_LIST {
                return Err("a kprobe chain loops or is too long".into());
            }
            let kp = node.wrapping_sub(hlist);
            let addr =
                read_u64(mem, space, kp.wrapping_add(addr_off)).ok_or("a kprobe is unreadable")?;
            let flags = read_u32(mem, space, kp.wrapping_add(flags_off)).unwrap_or(0);
            if flags & (KPROBE_FLAG_FTRACE | KPROBE_FLAG_GONE) == 0 {
                out.insert(addr, flags);
            }
            node = read_u64(mem, space, node).ok_or("a kprobe chain breaks off")?;
        }
    }
    Ok(out)
}

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
    /// record (a static call, an ftrace entry or ftrace's own call) holds a
    /// well-formed call or jmp that the record does not name: what the
    /// kernel's own update looks like between writing the record and the
    /// last site, and what is judged again for longer before it is believed.
    /// As (site, bytes).
    pub disagreements: Vec<(u64, Vec<u8>)>,
}

/// Where a relative branch of `b` (at `addr`) lands: `call`/`jmp rel32`, `jmp rel8`.
fn rel_target(addr: u64, b: &[u8]) -> Option<u64> {
    match (b.first()?, b.len()) {
        (&(CALL | JMP32), 5) => Some(addr.wrapping_add(5).wrapping_add_signed(i32_at(b, 1))),
        (&JMP8, 2) => {
            Some(addr.wrapping_add(2).wrapping_add_signed(i64::from(i8::from_le_bytes([b[1]]))))
        }
        _ => None,
    }
}

/// The encodings the kernel writes at one site.
struct Forms<'a> {
    fixed: &'a [&'a [u8]],
    ops: &'a [u8],
    target_ok: &'a dyn Fn(u64) -> bool,
}

impl Forms<'_> {
    fn holds(&self, addr: u64, b: &[u8]) -> bool {
        self.fixed.contains(&b)
            || (self.ops.contains(&b[0])
                && rel_target(addr, b).is_some_and(|t| (self.target_ok)(t)))
    }

    /// `cur` is one of the forms, or the kernel's rewrite of the site is in
    /// flight: `int3` first, then the tail of the old or the new form.
    fn admits(&self, addr: u64, cur: &[u8], orig: &[u8]) -> Result<bool, ()> {
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

fn describe(addr: u64, b: &[u8], name: &dyn Fn(u64) -> String) -> String {
    match (b[0], rel_target(addr, b)) {
        (CALL, Some(t)) => format!("call {t:#x} ({})", name(t)),
        (JMP32 | JMP8, Some(t)) => format!("jmp {t:#x} ({})", name(t)),
        _ if b == NOP5 || b == NOP2 => "a NOP".into(),
        _ => format!("bytes {}", hex(b)),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl PatchTables {
    fn site_len(&self, site: Site, orig: &[u8], cur: &[u8]) -> usize {
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
    fn judge(
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
                let ok = |t: u64| self.ftrace_callers.contains(&t);
                Forms { fixed: &[&NOP5], ops: &[CALL], target_ok: &ok }.admits(addr, cur, orig).map_err(
                    |()| {
                        format!(
                            "an ftrace function entry may hold a NOP or a call to ftrace's caller or a registered ftrace trampoline; it holds {now}"
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
    fn judge_static(
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
    fn judge_kprobe(
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

/// Bytes of guest text, now or as baselined, by virtual address.
struct Text<'a, M: GuestMemory + ?Sized> {
    mem: &'a M,
    space: &'a dyn AddressSpace,
    original: &'a dyn Fn(u64) -> Option<Vec<u8>>,
    /// The page being judged: its address, bytes now and original bytes.
    page: (u64, &'a [u8], &'a [u8]),
}

impl<M: GuestMemory + ?Sized> Text<'_, M> {
    fn now(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        let (base, cur, _) = self.page;
        match within(base, addr, len) {
            Some(r) => Some(cur[r].to_vec()),
            None => read_virt(self.mem, self.space, addr, len).map(|(b, _)| b),
        }
    }

    fn then(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
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

fn within(base: u64, addr: u64, len: usize) -> Option<std::ops::Range<usize>> {
    let off = usize::try_from(addr.checked_sub(base)?).ok()?;
    let end = off.checked_add(len)?;
    (end <= usize::try_from(PAGE_SIZE).ok()?).then_some(off..end)
}

/// Runs of differing bytes between two equal-length buffers, as offsets.
fn diff_runs(a: &[u8], b: &[u8]) -> Vec<(usize, usize)> {
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
const MAX_RUNS_PER_PAGE: usize = 512;

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
    for p in pages {
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
            // The units that could explain the run: sites and kprobes that overlap it.
            let mut units: Vec<(u64, usize, Option<Site>)> = Vec::new();
            for (&a, &site) in tables.sites.range(start.saturating_sub(MAX_SITE - 1)..end) {
                let (Some(o), Some(c)) = (text.then(a, 5), text.now(a, 5)) else { continue };
                let len = tables.site_len(site, &o, &c);
                if a + len as u64 > start {
                    units.push((a, len, Some(site)));
                }
            }
            for a in start.saturating_sub(MAX_SITE - 1)..end {
                if tables.kprobes.contains_key(&a) && !units.iter().any(|u| u.0 == a) {
                    let (Some(o), Some(c)) = (text.then(a, 5), text.now(a, 5)) else { continue };
                    let len = if c[1..] == o[1..] { 1 } else { 5 };
                    units.push((a, len, None));
                }
            }
            let uncovered = (start..end)
                .find(|b| !units.iter().any(|&(a, l, _)| (a..a + l as u64).contains(b)));
            let in_module = tables.module_text.iter().any(|&(a, b)| a <= start && end <= b);
            let in_function = tables.module_functions.iter().any(|&(a, b)| a < end && start < b);
            if uncovered.is_some() && in_module && !in_function {
                let (o, c) = (&orig[s..e], &cur[s..e]);
                let mut f = violation(
                    start,
                    format!(
                        "{} byte(s) at {start:#x} changed between the module's functions (alignment the loader leaves as it found it; the module reloaded at the same address?)",
                        e - s
                    ),
                    hex(o),
                    hex(c),
                );
                f.severity = Severity::Info;
                out.violations.push(f);
                continue;
            }
            if let Some(first) = uncovered {
                let (o, c) = (&orig[s..e], &cur[s..e]);
                let detail = if e - s == 1 && c[0] == INT3 {
                    format!("an int3 at {first:#x} where no kprobe is registered")
                } else {
                    format!(
                        "{} byte(s) at {start:#x} changed where the kernel patches nothing (no jump label, static call, ftrace entry or kprobe there); now {}",
                        e - s,
                        describe(start, c, name)
                    )
                };
                out.violations.push(violation(start, detail, hex(o), hex(c)));
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
                        out.accepted.push(Patched { addr: a, kind, bytes: c, in_flight, key })
                    }
                    Err(why) => {
                        let by_record = matches!(
                            site,
                            Some(
                                Site::StaticCall { .. }
                                    | Site::StaticTramp { .. }
                                    | Site::Fentry
                                    | Site::FtraceCall
                            )
                        );
                        if by_record && matches!(c.first(), Some(&(CALL | JMP32))) {
                            out.disagreements.push((a, c.clone()));
                        }
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
    out
}

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
    accepted_pages: HashMap<u64, ([u8; 32], Vec<Patched>)>,
    callers: HashMap<u64, std::time::Instant>,
    funcs: HashMap<u64, std::time::Instant>,
    kprobes: HashMap<u64, (u32, std::time::Instant)>,
    optinsn: HashMap<(u64, u64), std::time::Instant>,
    /// Functions static call keys held when read lately (or their settled
    /// sites called), by key, the latest [`KEY_FUNCS_KEPT`] of each.
    key_funcs: HashMap<u64, Vec<(u64, std::time::Instant)>>,
    /// The site map last made, kept while the tables read the same.
    site_memo: SiteMemo,
    /// Sites whose record disagreement was already given the slow window,
    /// and when: a site is given it once in [`SLOW_MEMORY`] whatever bytes
    /// it holds, so that a guest can neither make every check wait nor keep
    /// a hook (with a new target each time) that leaves for a moment in
    /// every window. Full, it gives no new window.
    slow_judged: HashMap<u64, std::time::Instant>,
    /// When a site was last given the slow window again within its
    /// [`SLOW_MEMORY`] (the kernel updates the same static call or ftrace
    /// site again and again on a busy guest): one such window in
    /// [`REPEAT_SPACING`], whatever site: sites given their window lately
    /// make checks wait at most one window a minute. (A site not given one
    /// yet is not spaced: up to [`MAX_SLOW_JUDGED`] in [`SLOW_MEMORY`].)
    slow_repeated: Option<std::time::Instant>,
    /// Time spent waiting in slow windows since last taken: a pause, not
    /// work, for the CPU budget.
    pub waited: std::time::Duration,
}

impl PatchMemory {
    /// Remembers that key `k` held (or a settled site of it called) `f` at
    /// `now`.
    fn remember_key_func(&mut self, k: u64, f: u64, now: std::time::Instant) {
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
    fn opens_slow_window(
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
    fn merge_recent(&mut self, memory: &mut PatchMemory, now: std::time::Instant) {
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
const MAX_RECENT_KEYS: usize = 1 << 14;
const KEY_FUNCS_KEPT: usize = 4;

/// Times a disagreement between records and text is judged again.
const RETRIES: u32 = 3;
/// Pause before the first new judgement (doubled, tripled after).
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(25);
/// How long, all told, violations that are all record disagreements (see
/// [`Verdicts::disagreements`]) are judged again, every [`SLOW_PAUSE`]:
/// the kernel finishes its own update within this even when the guest runs
/// slowly (a guest under TCG with the function tracer on every function
/// takes seconds to patch a static call's sites); an attacker's call stays.
const SLOW_WINDOW: std::time::Duration = std::time::Duration::from_secs(4);
const SLOW_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);
/// How long a disagreement given the slow window is remembered, and how
/// many at most.
const SLOW_MEMORY: std::time::Duration = std::time::Duration::from_secs(600);
const MAX_SLOW_JUDGED: usize = 4096;
/// A site already given the slow window within [`SLOW_MEMORY`] is given it
/// again at most once in this long (over all sites of a guest).
const REPEAT_SPACING: std::time::Duration = std::time::Duration::from_secs(60);

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

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
mod tests {
    use super::*;
    use crate::integrity::baseline::tests::{Fake, TEXT_VA};
    use crate::memory::RawDump;

    const A: u64 = TEXT_VA + 0x100; // a site on text page 0
    const CALLER: u64 = TEXT_VA + 0x3000;

    fn rel(op: u8, at: u64, to: u64) -> Vec<u8> {
        let mut b = vec![op];
        b.extend_from_slice(&(to.wrapping_sub(at + 5) as i64 as i32).to_le_bytes());
        b
    }

    /// A fake guest whose text page 0 holds NOP5 at A, and its originals.
    fn guest() -> (Fake, Vec<u8>) {
        let mut f = Fake::new();
        write(&mut f, A, &NOP5);
        let mut orig = vec![0u8; 4096];
        f.mem.read(GuestPhysAddr(0x2000), &mut orig).unwrap();
        (f, orig)
    }

    fn write(f: &mut Fake, va: u64, bytes: &[u8]) {
        let mut all = vec![0u8; f.mem.layout().total() as usize];
        f.mem.read(GuestPhysAddr(0), &mut all).unwrap();
        let at = 0x2000 + (va - TEXT_VA) as usize;
        all[at..at + bytes.len()].copy_from_slice(bytes);
        f.mem = RawDump::from_bytes(all);
    }

    fn verify(t: &PatchTables, f: &Fake, orig: &[u8]) -> Verdicts {
        let page = ChangedPage {
            region: "kernel-text".into(),
            index: 0,
            gva: TEXT_VA,
            gpa: GuestPhysAddr(0x2000),
        };
        let original = |gva: u64| (gva == TEXT_VA).then(|| orig.to_vec());
        verify_pages(t, &[page], &f.mem, f, &original, &|a| format!("{a:#x}"))
    }

    fn tables(site: Site) -> PatchTables {
        let mut t = PatchTables::default();
        t.sites.insert(A, site);
        t.ftrace_callers.insert(CALLER);
        t
    }

    /// The site map is made once for tables that read the same, and anew
    /// when any of them reads differently.
    #[test]
    fn the_site_map_is_kept_while_its_tables_read_the_same() {
        let mut profile = crate::linux::profile::tests::sample();
        let entry = 0xffff_ffff_8100_1000;
        profile.fentry = vec![entry];
        let m =
            Matched { profile: &profile, modules: Vec::new(), slide: 0x20_0000, idt_slide: None };
        let inputs = |ips: Vec<u64>| SiteInputs {
            kernel_jumps: Err("unreadable".into()),
            kernel_calls: Err("unreadable".into()),
            modules: Vec::new(),
            ftrace: Ok(ips),
        };
        let mut memo = SiteMemo::default();
        let first = memo.get(&m, &inputs(vec![entry + m.slide]));
        assert!(first.sites.get(&(entry + m.slide)) == Some(&Site::Fentry));
        assert!(std::sync::Arc::ptr_eq(&first, &memo.get(&m, &inputs(vec![entry + m.slide]))));
        // A forged record: a new map, which says so.
        let forged = memo.get(&m, &inputs(vec![entry + m.slide, 0xffff_ffff_8100_0007]));
        assert!(!std::sync::Arc::ptr_eq(&first, &forged));
        assert!(
            forged.problems.iter().any(|(s, p)| *s == Severity::Violation && p.contains("forged"))
        );
        // The same inputs under another slide, or with a table unreadable for
        // another reason, are other inputs.
        let other = Matched {
            slide: 0x40_0000,
            ..Matched { profile: &profile, modules: Vec::new(), slide: 0, idt_slide: None }
        };
        let a = inputs(vec![entry + m.slide]);
        assert_ne!(a.digest(&m), a.digest(&other));
        let mut b = inputs(vec![entry + m.slide]);
        b.kernel_jumps = Err("unreadabl".into());
        assert_ne!(a.digest(&m), b.digest(&m));
        // Through the whole read: a memo gives the same tables as none.
        let read = |memo: &mut SiteMemo| {
            let t = PatchTables { sites: SiteSet(memo.get(&m, &a)), ..PatchTables::default() };
            (t.site_count(), t.is_site(entry + m.slide, PatchKind::Ftrace))
        };
        assert_eq!(read(&mut SiteMemo::default()), (1, true));
        assert_eq!(read(&mut memo), (1, true));
    }

    #[test]
    fn a_jump_label_may_jump_only_to_its_target() {
        let target = TEXT_VA + 0x180;
        let t = tables(Site::JumpLabel { target, key: 0 });
        let (mut f, orig) = guest();
        write(&mut f, A, &rel(JMP32, A, target));
        let v = verify(&t, &f, &orig);
        assert!(v.violations.is_empty(), "{:#?}", v.violations);
        assert_eq!(
            v.accepted,
            [Patched {
                addr: A,
                kind: PatchKind::JumpLabel,
                bytes: rel(JMP32, A, target),
                in_flight: false,
                key: None
            }]
        );

        // Mid-rewrite: int3, then the jmp's tail.
        let mut poked = rel(JMP32, A, target);
        poked[0] = INT3;
        write(&mut f, A, &poked);
        let v = verify(&t, &f, &orig);
        assert!(v.violations.is_empty() && v.accepted[0].in_flight, "{v:#?}");

        // Mimicry: a jmp elsewhere.
        write(&mut f, A, &rel(JMP32, A, A + 5));
        let v = verify(&t, &f, &orig);
        assert_eq!(v.violations.len(), 1);
        assert!(v.violations[0].detail.contains("jump-label site"), "{}", v.violations[0].detail);
        assert!(
            v.disagreements.is_empty(),
            "a jump label's target is fixed: no update explains it"
        );
        assert_eq!(v.violations[0].gva, GuestVirtAddr(A));
        assert_eq!(v.violations[0].before, "0f1f440000");
    }

    #[test]
    fn two_byte_jump_labels() {
        let target = A + 0x20;
        let t = tables(Site::JumpLabel { target, key: 0 });
        let (mut f, _) = guest();
        write(&mut f, A, &[0x66, 0x90, 0x90, 0x90, 0x90]);
        let mut orig = vec![0u8; 4096];
        f.mem.read(GuestPhysAddr(0x2000), &mut orig).unwrap();
        write(&mut f, A, &[JMP8, 0x1e]);
        assert!(verify(&t, &f, &orig).violations.is_empty());
        write(&mut f, A, &[JMP8, 0x1f]);
        assert_eq!(verify(&t, &f, &orig).violations.len(), 1);
    }

    #[test]
    fn a_function_entry_may_call_only_ftrace() {
        let t = tables(Site::Fentry);
        let (mut f, orig) = guest();
        write(&mut f, A, &rel(CALL, A, CALLER));
        let v = verify(&t, &f, &orig);
        assert!(v.violations.is_empty(), "{:#?}", v.violations);
        assert_eq!(v.accepted[0].kind, PatchKind::Ftrace);
        // The page is clean: remembered by the hash of exactly the bytes judged.
        let mut now = vec![0u8; 4096];
        f.mem.read(GuestPhysAddr(0x2000), &mut now).unwrap();
        assert_eq!(v.clean, [(TEXT_VA, *blake3::hash(&now).as_bytes(), v.accepted.clone())]);
        write(&mut f, A, &rel(CALL, A, CALLER + 16));
        let v = verify(&t, &f, &orig);
        assert!(v.violations[0].detail.contains("ftrace function entry"), "{:#?}", v.violations);
        assert!(v.clean.is_empty());
        // An inline hook's jmp over the entry is no ftrace form either.
        write(&mut f, A, &rel(JMP32, A, CALLER));
        assert_eq!(verify(&t, &f, &orig).violations.len(), 1);
    }

    #[test]
    fn static_calls_follow_their_key() {
        let (func, other, key) = (TEXT_VA + 0x2000, TEXT_VA + 0x2100, 0x1234);
        let mut t = tables(Site::StaticCall { key, tail: false });
        t.key_funcs.insert(key, func);
        let (mut f, orig) = guest();
        write(&mut f, A, &rel(CALL, A, func));
        assert!(verify(&t, &f, &orig).violations.is_empty());
        write(&mut f, A, &XOR5RAX);
        assert!(verify(&t, &f, &orig).violations.is_empty());
        write(&mut f, A, &rel(CALL, A, other));
        let v = verify(&t, &f, &orig);
        assert!(v.violations[0].detail.contains("static call"));
        // A call the key does not name: a disagreement, judged again for
        // longer (the kernel writes the key before the sites).
        assert_eq!(v.disagreements, [(A, rel(CALL, A, other))]);
        write(&mut f, A, &[0xcc, 0x90, 0x90, 0x90, 0x90]);
        assert!(
            verify(&t, &f, &orig).disagreements.is_empty(),
            "no call: no update of the kernel's"
        );
        // A trampoline returns when the key has no function.
        let mut t = tables(Site::StaticTramp { key: Some(key) });
        t.key_funcs.insert(key, 0);
        write(&mut f, A, &RET5);
        assert!(verify(&t, &f, &orig).violations.is_empty());
    }

    #[test]
    fn a_static_call_site_may_still_call_what_its_key_held_a_moment_ago() {
        let (func, before, other, key, key_b) =
            (TEXT_VA + 0x2000, TEXT_VA + 0x2100, TEXT_VA + 0x2200, 0x1234, 0x5678);
        let mut memory = PatchMemory::default();
        let t0 = std::time::Instant::now();
        let read = |f: u64, memory: &mut PatchMemory, at: std::time::Instant| {
            let mut t = tables(Site::StaticCall { key, tail: false });
            t.key_funcs.insert(key, f);
            t.key_funcs.insert(key_b, other);
            t.merge_recent(memory, at);
            t
        };
        // Read while the key held `before`; then the key moves to `func`
        // and the site has not followed yet: in flight.
        read(before, &mut memory, t0);
        let t = read(func, &mut memory, t0 + std::time::Duration::from_secs(2));
        let (mut f, orig) = guest();
        write(&mut f, A, &rel(CALL, A, before));
        let v = verify(&t, &f, &orig);
        assert!(v.violations.is_empty(), "{:#?}", v.violations);
        assert!(v.accepted[0].in_flight && v.accepted[0].key == Some(key), "{v:#?}");
        assert!(v.clean.is_empty(), "a page with a site in flight is judged again");
        // The key's function now: settled.
        write(&mut f, A, &rel(CALL, A, func));
        let v = verify(&t, &f, &orig);
        assert!(v.violations.is_empty() && !v.accepted[0].in_flight, "{v:#?}");
        // Another key's function, even one held lately: refused.
        write(&mut f, A, &rel(CALL, A, other));
        assert_eq!(verify(&t, &f, &orig).violations.len(), 1);
        // What the key held longer ago than the grace is forgotten.
        let t = read(func, &mut memory, t0 + RECORD_GRACE + std::time::Duration::from_secs(1));
        write(&mut f, A, &rel(CALL, A, before));
        assert!(verify(&t, &f, &orig).violations[0].detail.contains("static call"));
    }

    #[test]
    fn recent_key_functions_are_bounded_per_key_and_in_all() {
        let mut memory = PatchMemory::default();
        let t0 = std::time::Instant::now();
        for f in 1..=10u64 {
            memory.remember_key_func(7, 0x1000 * f, t0);
        }
        let kept: Vec<u64> = memory.key_funcs[&7].iter().map(|&(f, _)| f).collect();
        assert_eq!(kept, [0x7000, 0x8000, 0x9000, 0xa000], "the latest {KEY_FUNCS_KEPT}");
        memory.remember_key_func(7, 0x8000, t0);
        assert_eq!(memory.key_funcs[&7].last().unwrap().0, 0x8000, "seen again: the latest");
        assert_eq!(memory.key_funcs[&7].len(), KEY_FUNCS_KEPT);
        for k in 0..2 * MAX_RECENT_KEYS as u64 {
            memory.remember_key_func(0x10_0000 + k, 0x1000, t0);
        }
        assert_eq!(memory.key_funcs.len(), MAX_RECENT_KEYS);
        memory.remember_key_func(7, 0xb000, t0);
        assert_eq!(memory.key_funcs[&7].last().unwrap().0, 0xb000, "a key kept still learns");
        memory.remember_key_func(9, 0, t0);
        assert!(!memory.key_funcs.contains_key(&9), "no function is no call target");
    }

    #[test]
    fn the_slow_window_is_once_per_site_and_then_spaced() {
        let mut memory = PatchMemory::default();
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        let d = |a: u64| vec![(a, rel(CALL, a, TEXT_VA))];
        assert!(!memory.opens_slow_window(&[], t0), "nothing disagrees");
        // A site not given it: given, and marked as the review does.
        assert!(memory.opens_slow_window(&d(A), t0));
        memory.slow_judged.insert(A, t0);
        // Given lately: once more, then not again within the spacing.
        assert!(memory.opens_slow_window(&d(A), at(1)));
        assert!(!memory.opens_slow_window(&d(A), at(2)));
        // Another site not given it yet still is.
        assert!(memory.opens_slow_window(&d(A + 16), at(3)));
        memory.slow_judged.insert(A + 16, at(3));
        assert!(!memory.opens_slow_window(&d(A + 16), at(30)));
        assert!(memory.opens_slow_window(&d(A), at(1) + REPEAT_SPACING));
        // Past SLOW_MEMORY a site counts as not given it: a window though
        // the spacing was just taken.
        assert!(memory.opens_slow_window(&d(A + 16), at(598)));
        assert!(!memory.opens_slow_window(&d(A + 16), at(599)), "the spacing is taken");
        assert!(memory.opens_slow_window(&d(A), at(1) + SLOW_MEMORY));
        // A full memory gives none.
        let mut full = PatchMemory::default();
        for a in 0..MAX_SLOW_JUDGED as u64 {
            full.slow_judged.insert(TEXT_VA + 0x10_0000 + a, t0);
        }
        assert!(!full.opens_slow_window(&d(A), t0));
    }

    #[test]
    fn changes_off_every_site_are_violations() {
        let t = tables(Site::Fentry);
        let (mut f, orig) = guest();
        write(&mut f, A + 0x40, &[INT3]);
        let v = verify(&t, &f, &orig);
        assert!(v.violations[0].detail.contains("no kprobe is registered"), "{:#?}", v.violations);
        write(&mut f, A + 0x80, &[0x90, 0x90]);
        let v = verify(&t, &f, &orig);
        assert_eq!(v.violations.len(), 2);
        assert!(v.violations[1].detail.contains("patches nothing"));
        // A site's change with a change beside it: the neighbour is caught.
        let (mut f, orig) = guest();
        write(&mut f, A, &rel(CALL, A, CALLER));
        write(&mut f, A + 5, &[0xcc]);
        let v = verify(&t, &f, &orig);
        assert_eq!(v.violations.len(), 1, "{v:#?}");
        assert_eq!(v.violations[0].gva, GuestVirtAddr(A + 5));
    }

    #[test]
    fn kprobes_place_int3_or_jump_to_a_detour_buffer() {
        let mut t = PatchTables::default();
        t.kprobes.insert(A, 0);
        t.optinsn.push((TEXT_VA + 0x3000, TEXT_VA + 0x4000));
        let (mut f, orig) = guest();
        write(&mut f, A, &[INT3]);
        let v = verify(&t, &f, &orig);
        assert!(v.violations.is_empty() && v.accepted[0].kind == PatchKind::Kprobe, "{v:#?}");
        write(&mut f, A, &rel(JMP32, A, TEXT_VA + 0x3040));
        assert!(verify(&t, &f, &orig).violations.is_empty());
        write(&mut f, A, &rel(JMP32, A, TEXT_VA + 0x1040));
        assert!(verify(&t, &f, &orig).violations[0].detail.contains("optimised kprobe"));
    }

    #[test]
    fn a_page_rewritten_wholesale_is_refused_without_looking_further() {
        let t = tables(Site::Fentry);
        let (mut f, orig) = guest();
        let noise: Vec<u8> =
            (0..2048u32).map(|i| if i % 2 == 0 { 0xab } else { orig[i as usize] }).collect();
        write(&mut f, TEXT_VA, &noise);
        let v = verify(&t, &f, &orig);
        assert_eq!(v.violations.len(), 1);
        assert!(v.violations[0].detail.contains("places"), "{}", v.violations[0].detail);
    }

    #[test]
    fn accounting_counts_changes_and_restores_once() {
        let p = |addr, b: u8, in_flight| Patched {
            addr,
            kind: PatchKind::JumpLabel,
            bytes: vec![b],
            in_flight,
            key: None,
        };
        let mut prev = HashMap::new();
        let all = |_| Some(true);
        assert_eq!(
            account(&mut prev, &[p(1, 1, false), p(2, 1, false)], &all)[&PatchKind::JumpLabel],
            2
        );
        assert!(
            account(&mut prev, &[p(1, 1, false), p(2, 1, false)], &all).is_empty(),
            "nothing changed"
        );
        // Site 1 mid-rewrite (not counted), site 2 restored (counted).
        assert_eq!(account(&mut prev, &[p(1, 2, true)], &all)[&PatchKind::JumpLabel], 1);
        assert_eq!(prev[&1].bytes, [1], "an in-flight state keeps the last settled one");
        // Not looked at: kept; gone with its module: dropped silently.
        assert!(account(&mut prev, &[], &|_| Some(false)).is_empty());
        assert!(prev.contains_key(&1));
        assert!(account(&mut prev, &[], &|_| None).is_empty());
        assert!(prev.is_empty());
    }

    #[test]
    fn tables_parse_to_absolute_addresses_and_digest_without_order() {
        let base = 0xffff_ffff_8200_0000u64;
        let mut b = Vec::new();
        for (code, target, key) in
            [(-0x100_0000i32, -0x0ff_ff00i32, 0x10_0001i64), (-0x100_0010, -0x100_0000, 0x10_0002)]
        {
            b.extend_from_slice(&code.to_le_bytes());
            b.extend_from_slice(&target.to_le_bytes());
            b.extend_from_slice(&key.to_le_bytes());
        }
        let e = parse_jump_entries(&b, base).unwrap();
        assert_eq!(
            e[0],
            JumpEntry {
                code: base - 0x100_0000,
                target: base + 4 - 0x0ff_ff00,
                key: base + 8 + 0x10_0000,
                branch: true
            }
        );
        assert!(!e[1].branch, "bit 1 (init) is no branch flag");
        let mut swapped = e.clone();
        swapped.reverse();
        assert_eq!(jump_table_digest(&e, 0), jump_table_digest(&swapped, 0));
        let slid: Vec<JumpEntry> = e
            .iter()
            .map(|x| JumpEntry {
                code: x.code + 0x40_0000,
                target: x.target + 0x40_0000,
                key: x.key + 0x40_0000,
                ..*x
            })
            .collect();
        assert_eq!(jump_table_digest(&slid, 0x40_0000), jump_table_digest(&e, 0));
        assert_ne!(jump_table_digest(&e[..1], 0), jump_table_digest(&e, 0));
        assert!(parse_jump_entries(&b[..20], base).is_err());
        let s = parse_static_call_sites(&[0x10, 0, 0, 0, 0x21, 0, 0, 0], base).unwrap();
        assert_eq!(s[0], StaticCallSite { addr: base + 0x10, key: base + 4 + 0x20, tail: true });
        assert!(parse_static_call_sites(&[0; 7], base).is_err());
    }

    proptest::proptest! {
        #[test]
        fn hostile_tables_and_text_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512), at in 0usize..4000) {
            let _ = parse_jump_entries(&bytes, u64::MAX - 64);
            let _ = parse_static_call_sites(&bytes, 0);
            let t = tables(Site::JumpLabel { target: A + 7, key: 0 });
            let (mut f, orig) = guest();
            let n = bytes.len().min(4096 - at);
            write(&mut f, TEXT_VA + at as u64, &bytes[..n]);
            let _ = verify(&t, &f, &orig);
        }
    }
}
