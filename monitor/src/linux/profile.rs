//! Guest profiles: what vigil knows of one kernel build, made from the
//! vendor's `vmlinuz` (trusted, unlike guest memory) and kept as reviewable
//! text under `guest-profiles/`.
//!
//! ```text
//! # comments
//! format vigil-guest-profile 1
//! release 6.1.0-56-cloud-amd64
//! banner Linux version 6.1.0-56-cloud-amd64 (...) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2026-11-16)
//! source vmlinuz-6.1.0-56-cloud-amd64 blake3 <hex>
//! sym ffffffff81000000 T _text                 one line per symbol vigil uses, by address
//! syscall64 0 __x64_sys_read                   what each syscall table entry must point to
//! syscall32 0 __ia32_sys_restart_syscall
//! offset module.list 8                         a member's offset (BTF), `S.#size` a struct's size
//! table jump_table 5980 <hex>                  count and digest of a patch table (see `patch`)
//! fentry 1c10 1c50 ...                         ftrace's patchable function entries, as offsets from _text
//! ```
//!
//! Addresses are as linked; a running guest adds its KASLR slide.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::{image, kallsyms};

pub const FORMAT: &str = "vigil-guest-profile";
pub const VERSION: u32 = 1;
/// Largest profile file accepted.
pub const MAX_PROFILE: usize = 64 << 20;
const MAX_SYSCALLS: usize = 4096;
/// Most patchable function entries a profile may list.
const MAX_FENTRY: usize = 1 << 20;
/// Function entries written per `fentry` line.
const FENTRY_PER_LINE: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileSymbol {
    pub addr: u64,
    pub kind: char,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    /// The file it was read from, when read from one: its reference (see
    /// [`crate::linux::reference`]) lies beside it.
    pub file: Option<std::path::PathBuf>,
    pub release: String,
    pub banner: String,
    pub source: String,
    /// Sorted by address. Private, as are the syscall lists: the lookups
    /// below are built from them once ([`Profile::symbols`] and
    /// [`Profile::syscall_tables`] read them).
    symbols: Vec<ProfileSymbol>,
    syscalls64: Vec<(u32, String)>,
    syscalls32: Vec<(u32, String)>,
    /// Structure member offsets from the kernel's BTF, as `struct.member.path`
    /// (and sizes, as `struct.#size`).
    pub offsets: Vec<(String, u64)>,
    /// Patch tables of the image: name, entry count and digest, to validate
    /// what guest memory holds.
    pub tables: Vec<(String, u64, String)>,
    /// Link-time addresses of the function entries ftrace may patch
    /// (`__mcount_loc`), sorted.
    pub fentry: Vec<u64>,
    by_name: HashMap<String, usize>,
    /// `_text` and `_etext`, looked up once: `symbolize` runs for every
    /// table entry of every check.
    text_span: Option<(u64, u64)>,
    /// The link-time address of each syscall's handler, in the order of
    /// `syscalls64` and `syscalls32`, looked up once: every check compares
    /// each table entry with it.
    syscall_addrs: [Vec<Option<u64>>; 2],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("{0}")]
    Image(#[from] image::ImageError),
    #[error("{0}")]
    Kallsyms(String),
    #[error("the image has no {0}")]
    Missing(&'static str),
    #[error("line {line}: {reason}")]
    Syntax { line: usize, reason: String },
    #[error("the profile is larger than {MAX_PROFILE} bytes")]
    TooLarge,
}

/// Members of `struct module` the module checks read: up to 6.3 the core
/// layout (text first, then read-only data and data, in one allocation);
/// from 6.4 `mem[]`, one `struct module_memory` per kind, whose element 0
/// (`MOD_TEXT`) is the text. A build has one or the other.
pub const MODULE_FIELDS: &[&str] = &[
    "list",
    "name",
    "state",
    "core_layout.base",
    "core_layout.size",
    "core_layout.text_size",
    "core_layout.ro_size",
    "mem.base",
    "mem.size",
    "init_layout.base",
    "init_layout.text_size",
];

/// Symbols a profile keeps besides all code: what the checks read.
const DATA_SYMBOLS: &[&str] = &[
    "_text",
    "_etext",
    "__start_rodata",
    "__end_rodata",
    // Data the kernel sets during boot, read-only after it (see `reference`).
    "__start_ro_after_init",
    "__end_ro_after_init",
    "_sdata",
    "_end",
    "linux_banner",
    "sys_call_table",
    "ia32_sys_call_table",
    "x32_sys_call_table",
    "idt_table",
    "modules",
    "init_task",
    // Where the kernel's patching machinery keeps its records (see `patch`).
    "__start___jump_table",
    "__stop___jump_table",
    "__start_static_call_sites",
    "__stop_static_call_sites",
    "ftrace_pages_start",
    "ftrace_ops_list",
    "ftrace_list_end",
    "ftrace_ops_trampoline_list",
    "kprobe_table",
    "kprobe_insn_slots",
    "kprobe_optinsn_slots",
    "pack_list",
    "bpf_kallsyms",
    "x86_return_thunk",
    // Where the kernel lists its trap handlers (see `hooks`).
    "die_chain",
    // ftrace's direct calls (BPF trampolines), and BPF's trampolines.
    "direct_functions",
    "trampoline_table",
];

/// Data symbols kept by prefix: static call keys, named after their calls,
/// and tracepoints (see `hooks`).
const DATA_PREFIXES: &[&str] = &["__SCK__", "__tracepoint_"];

/// Structure members the patch-site checks read (6.1 layout), and structures
/// whose size they need.
pub const PATCH_FIELDS: &[(&str, &[&str])] = &[
    (
        "module",
        &[
            "jump_entries",
            "num_jump_entries",
            "static_call_sites",
            "num_static_call_sites",
            "kallsyms",
        ],
    ),
    ("mod_kallsyms", &["symtab", "num_symtab"]),
    ("ftrace_page", &["next", "records", "index"]),
    ("dyn_ftrace", &["ip", "flags"]),
    (
        "ftrace_ops",
        &[
            "func",
            "next",
            "flags",
            "trampoline",
            "trampoline_size",
            "list",
            "func_hash",
            "saved_func",
            "direct_call",
        ],
    ),
    ("ftrace_ops_hash", &["filter_hash", "notrace_hash"]),
    ("ftrace_hash", &["size_bits", "buckets", "count"]),
    ("ftrace_func_entry", &["hlist", "ip", "direct"]),
    ("kprobe", &["hlist", "list", "addr", "flags", "pre_handler", "post_handler"]),
    ("kretprobe", &["kp", "handler", "entry_handler"]),
    ("atomic_notifier_head", &["head"]),
    ("notifier_block", &["notifier_call", "next", "priority"]),
    ("kprobe_insn_cache", &["pages"]),
    ("kprobe_insn_page", &["list", "insns"]),
    ("bpf_prog_pack", &["list", "ptr"]),
    ("bpf_ksym", &["start", "end", "lnode", "name"]),
    ("bpf_trampoline", &["hlist", "fops", "key", "func.addr", "progs_hlist", "cur_image"]),
    ("bpf_tramp_image", &["image"]),
    ("bpf_tramp_link", &["link", "tramp_hlist"]),
    ("bpf_link", &["prog"]),
    ("bpf_prog", &["bpf_func"]),
    ("klp_ops", &["func_stack", "fops"]),
    ("klp_func", &["new_func", "stack_node"]),
    ("tracepoint", &["name", "funcs"]),
    ("tracepoint_func", &["func", "data"]),
    ("static_call_key", &["func"]),
];
pub const PATCH_SIZES: &[&str] = &["dyn_ftrace", "module_memory", "tracepoint_func"];

impl Profile {
    fn new(
        release: String,
        banner: String,
        source: String,
        mut symbols: Vec<ProfileSymbol>,
        s64: Vec<(u32, String)>,
        s32: Vec<(u32, String)>,
    ) -> Self {
        symbols.sort_by(|a, b| a.addr.cmp(&b.addr).then_with(|| a.name.cmp(&b.name)));
        let by_name: HashMap<String, usize> =
            symbols.iter().enumerate().rev().map(|(i, s)| (s.name.clone(), i)).collect();
        let at = |n: &str| by_name.get(n).map(|&i| symbols[i].addr);
        let text_span = at("_text").zip(at("_etext"));
        let syscall_addrs = [&s64, &s32].map(|l| l.iter().map(|(_, n)| at(n)).collect());
        Self {
            file: None,
            release,
            banner,
            source,
            symbols,
            syscalls64: s64,
            syscalls32: s32,
            offsets: Vec::new(),
            tables: Vec::new(),
            fentry: Vec::new(),
            by_name,
            text_span,
            syscall_addrs,
        }
    }

    /// Builds the profile of a vendor kernel image.
    pub fn build(vmlinuz: &[u8], file_name: &str) -> Result<Self, ProfileError> {
        use object::{Object, ObjectSection};
        let (elf, _) = image::vmlinux(vmlinuz)?;
        let file = object::File::parse(&*elf)
            .map_err(|e| ProfileError::Kallsyms(format!("not an ELF file: {e}")))?;
        let rodata =
            file.section_by_name(".rodata").ok_or(ProfileError::Missing(".rodata section"))?;
        let ro_addr = rodata.address();
        let ro = rodata.data().map_err(|e| ProfileError::Kallsyms(e.to_string()))?;
        let all = kallsyms::find(ro).map_err(|e| ProfileError::Kallsyms(e.to_string()))?.symbols;
        let names = kallsyms::by_name(&all);
        let at =
            |name: &'static str| names.get(name).map(|s| s.addr).ok_or(ProfileError::Missing(name));
        let read = |addr: u64, len: usize| -> Option<&[u8]> {
            let off = usize::try_from(addr.checked_sub(ro_addr)?).ok()?;
            ro.get(off..off.checked_add(len)?)
        };
        let banner_bytes = read(at("linux_banner")?, 512)
            .ok_or(ProfileError::Missing("linux_banner in .rodata"))?;
        let end =
            banner_bytes.iter().position(|&c| c == 0 || c == b'\n').unwrap_or(banner_bytes.len());
        let banner = String::from_utf8_lossy(&banner_bytes[..end]).into_owned();
        let release = banner
            .strip_prefix("Linux version ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or("")
            .to_owned();

        // Code symbols, for names of addresses; and the data the checks use.
        let mut keep: Vec<ProfileSymbol> = all
            .iter()
            .filter(|s| {
                matches!(s.kind, 'T' | 't' | 'W' | 'w')
                    || DATA_SYMBOLS.contains(&s.name.as_str())
                    || DATA_PREFIXES.iter().any(|p| s.name.starts_with(p))
            })
            .map(|s| ProfileSymbol { addr: s.addr, kind: s.kind, name: s.name.clone() })
            .collect();
        // The `raw_data` buffers (two objects of that name, 8 KiB each, on
        // 6.1 and 6.12): bytes written at boot among the data made
        // read-only after it. Each is kept with the symbol after it, its end,
        // so that the reference check does not read them as pointers (see
        // `reference::BootWritten`).
        for raw in all.iter().filter(|s| s.name == "raw_data") {
            if let Some(next) = all.iter().filter(|s| s.addr > raw.addr).min_by_key(|s| s.addr) {
                for s in [raw, next] {
                    keep.push(ProfileSymbol { addr: s.addr, kind: s.kind, name: s.name.clone() });
                }
            }
        }
        keep.sort_by(|a, b| a.addr.cmp(&b.addr).then_with(|| a.name.cmp(&b.name)));
        keep.dedup_by(|a, b| a.addr == b.addr && a.name == b.name);
        let code: HashMap<u64, &str> = all
            .iter()
            .filter(|s| matches!(s.kind, 'T' | 't'))
            .map(|s| (s.addr, s.name.as_str()))
            .collect();

        // A syscall table runs up to the next symbol after it.
        let mut sorted: Vec<u64> = all.iter().map(|s| s.addr).collect();
        sorted.sort_unstable();
        let table = |name: &'static str| -> Result<Vec<(u32, String)>, ProfileError> {
            let Ok(start) = at(name) else { return Ok(vec![]) };
            let next = sorted.iter().copied().find(|&a| a > start).unwrap_or(start);
            let n = usize::try_from((next - start) / 8).unwrap_or(0).min(MAX_SYSCALLS);
            let bytes = read(start, n * 8)
                .ok_or(ProfileError::Missing("syscall table bytes in .rodata"))?;
            // Alignment padding after the table reads as null entries.
            let used =
                bytes.chunks_exact(8).rposition(|c| c.iter().any(|&b| b != 0)).map_or(0, |i| i + 1);
            Ok(bytes[..used * 8]
                .chunks_exact(8)
                .zip(0u32..)
                .map(|(c, nr)| {
                    let target = u64::from_le_bytes(c.try_into().expect("8 bytes"));
                    (
                        nr,
                        code.get(&target)
                            .map_or_else(|| format!("{target:#x}"), |s| (*s).to_owned()),
                    )
                })
                .collect())
        };
        let s64 = table("sys_call_table")?;
        let s32 = table("ia32_sys_call_table")?;
        if s64.is_empty() {
            return Err(ProfileError::Missing("sys_call_table"));
        }
        let source = format!("{file_name} blake3 {}", blake3::hash(vmlinuz).to_hex());
        let mut p = Self::new(release, banner, source, keep, s64, s32);
        // Where struct module keeps what the module checks read (when the image has BTF).
        if let Some(btf) = file.section_by_name(".BTF").and_then(|s| s.data().ok())
            && let Ok(btf) = super::btf::Btf::parse(btf)
        {
            for path in MODULE_FIELDS {
                if let Ok(off) = btf.offset_of("module", path) {
                    p.offsets.push((format!("module.{path}"), off));
                }
            }
            for (st, members) in PATCH_FIELDS {
                for path in *members {
                    if let Ok(off) = btf.offset_of(st, path) {
                        p.offsets.push((format!("{st}.{path}"), off));
                    }
                }
            }
            for st in PATCH_SIZES {
                if let Ok(size) = btf.size_of(st) {
                    p.offsets.push((format!("{st}.#size"), size));
                }
            }
        }
        // The patch tables, read where the image links them.
        let read_any = |addr: u64, len: u64| -> Option<Vec<u8>> {
            let sec = file.sections().find(|s| {
                s.address() <= addr
                    && addr.checked_add(len).is_some_and(|e| e <= s.address() + s.size())
            })?;
            let data = sec.data().ok()?;
            let off = usize::try_from(addr - sec.address()).ok()?;
            data.get(off..off.checked_add(usize::try_from(len).ok()?)?).map(<[u8]>::to_vec)
        };
        let span = |start: &'static str, stop: &'static str| -> Option<(u64, Vec<u8>)> {
            let (a, b) = (at(start).ok()?, at(stop).ok()?);
            Some((a, read_any(a, b.checked_sub(a)?)?))
        };
        if let Some((base, bytes)) = span("__start___jump_table", "__stop___jump_table") {
            let entries = super::patch::parse_jump_entries(&bytes, base)
                .map_err(|e| ProfileError::Kallsyms(format!("__jump_table: {e}")))?;
            let (n, digest) = super::patch::jump_table_digest(&entries, 0);
            p.tables.push(("jump_table".into(), n, digest));
        }
        if let Some((base, bytes)) = span("__start_static_call_sites", "__stop_static_call_sites") {
            let sites = super::patch::parse_static_call_sites(&bytes, base)
                .map_err(|e| ProfileError::Kallsyms(format!(".static_call_sites: {e}")))?;
            let (n, digest) = super::patch::static_call_digest(&sites, 0);
            p.tables.push(("static_call_sites".into(), n, digest));
        }
        if let Some((_, bytes)) = span("__start_mcount_loc", "__stop_mcount_loc") {
            let text = p.symbol("_text").map_or(0, |s| s.addr);
            let mut f: Vec<u64> = bytes
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .filter(|&a| a >= text)
                .collect();
            f.sort_unstable();
            f.dedup();
            f.truncate(MAX_FENTRY);
            p.fentry = f;
        }
        Ok(p)
    }

    /// The profile as text.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# vigil guest profile: one kernel build. Made by `vigil profile build`; see guest-profiles/README.md."
        );
        let _ = writeln!(s, "format {FORMAT} {VERSION}");
        let _ = writeln!(s, "release {}", self.release);
        let _ = writeln!(s, "banner {}", self.banner);
        let _ = writeln!(s, "source {}", self.source);
        for (nr, name) in &self.syscalls64 {
            let _ = writeln!(s, "syscall64 {nr} {name}");
        }
        for (nr, name) in &self.syscalls32 {
            let _ = writeln!(s, "syscall32 {nr} {name}");
        }
        for (path, off) in &self.offsets {
            let _ = writeln!(s, "offset {path} {off}");
        }
        for (name, n, digest) in &self.tables {
            let _ = writeln!(s, "table {name} {n} {digest}");
        }
        let text = self.symbol("_text").map_or(0, |t| t.addr);
        for chunk in self.fentry.chunks(FENTRY_PER_LINE) {
            let offs: Vec<String> =
                chunk.iter().map(|a| format!("{:x}", a.wrapping_sub(text))).collect();
            let _ = writeln!(s, "fentry {}", offs.join(" "));
        }
        for sym in &self.symbols {
            let _ = writeln!(s, "sym {:016x} {} {}", sym.addr, sym.kind, sym.name);
        }
        s
    }

    /// Parses a profile, strictly.
    pub fn parse(text: &str) -> Result<Self, ProfileError> {
        if text.len() > MAX_PROFILE {
            return Err(ProfileError::TooLarge);
        }
        let (mut release, mut banner, mut source) = (None, None, None);
        let mut format_seen = false;
        let (mut syms, mut s64, mut s32, mut offsets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut tables, mut fentry_offs) = (Vec::new(), Vec::new());
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let bad = |r: String| ProfileError::Syntax { line: line_no, reason: r };
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            // One record a line, in printable text: a stray carriage return
            // would not survive being written out and read back.
            if line.chars().any(char::is_control) {
                return Err(bad("a control character in the line".into()));
            }
            let (key, rest) =
                line.split_once(' ').ok_or_else(|| bad(format!("no value: {line:?}")))?;
            match key {
                "format" => {
                    if rest != format!("{FORMAT} {VERSION}") {
                        return Err(bad(format!("format {rest:?} is not {FORMAT} {VERSION}")));
                    }
                    format_seen = true;
                }
                "release" => release = Some(rest.to_owned()),
                "banner" => banner = Some(rest.to_owned()),
                "source" => source = Some(rest.to_owned()),
                "syscall64" | "syscall32" => {
                    let (nr, name) = rest
                        .split_once(' ')
                        .ok_or_else(|| bad("syscall needs NUMBER NAME".into()))?;
                    let nr: u32 =
                        nr.parse().map_err(|_| bad(format!("bad syscall number {nr:?}")))?;
                    let list = if key == "syscall64" { &mut s64 } else { &mut s32 };
                    if usize::try_from(nr).ok() != Some(list.len()) || list.len() >= MAX_SYSCALLS {
                        return Err(bad(format!("syscall {nr} out of order")));
                    }
                    list.push((nr, name.to_owned()));
                }
                "offset" => {
                    let (path, off) = rest
                        .split_once(' ')
                        .ok_or_else(|| bad("offset needs PATH BYTES".into()))?;
                    let off: u64 = off.parse().map_err(|_| bad(format!("bad offset {off:?}")))?;
                    if off > 1 << 20 || path.is_empty() || offsets.len() > 512 {
                        return Err(bad(format!("implausible offset {path} {off}")));
                    }
                    offsets.push((path.to_owned(), off));
                }
                "table" => {
                    let f: Vec<&str> = rest.split(' ').collect();
                    let [name, n, digest] = f[..] else {
                        return Err(bad("table needs NAME COUNT DIGEST".into()));
                    };
                    let n: u64 = n.parse().map_err(|_| bad(format!("bad count {n:?}")))?;
                    if digest.len() != 64
                        || !digest.bytes().all(|c| c.is_ascii_hexdigit())
                        || tables.len() > 16
                    {
                        return Err(bad(format!("bad table digest {digest:?}")));
                    }
                    tables.push((name.to_owned(), n, digest.to_owned()));
                }
                "fentry" => {
                    for o in rest.split(' ') {
                        let o = u64::from_str_radix(o, 16)
                            .map_err(|_| bad(format!("bad function entry offset {o:?}")))?;
                        if fentry_offs.len() >= MAX_FENTRY || o > 1 << 32 {
                            return Err(bad("too many or implausible function entries".into()));
                        }
                        fentry_offs.push(o);
                    }
                }
                "sym" => {
                    let mut f = rest.splitn(3, ' ');
                    let (Some(a), Some(k), Some(name)) = (f.next(), f.next(), f.next()) else {
                        return Err(bad("sym needs ADDRESS KIND NAME".into()));
                    };
                    let addr = u64::from_str_radix(a, 16)
                        .map_err(|_| bad(format!("bad address {a:?}")))?;
                    let mut kc = k.chars();
                    let (Some(kind), None) = (kc.next(), kc.next()) else {
                        return Err(bad(format!("bad kind {k:?}")));
                    };
                    if name.is_empty() || name.contains(char::is_whitespace) {
                        return Err(bad(format!("bad symbol name {name:?}")));
                    }
                    syms.push(ProfileSymbol { addr, kind, name: name.to_owned() });
                }
                other => return Err(bad(format!("unknown key {other:?}"))),
            }
        }
        let missing =
            |what: &str| ProfileError::Syntax { line: 0, reason: format!("no {what} line") };
        if !format_seen {
            return Err(missing("format"));
        }
        let mut p = Self::new(
            release.ok_or_else(|| missing("release"))?,
            banner.ok_or_else(|| missing("banner"))?,
            source.ok_or_else(|| missing("source"))?,
            syms,
            s64,
            s32,
        );
        p.offsets = offsets;
        p.tables = tables;
        let Some(text) = p.symbol("_text").map(|t| t.addr) else {
            return Err(missing("_text symbol"));
        };
        if p.syscalls64.is_empty() {
            return Err(missing("syscall64"));
        }
        p.fentry = fentry_offs
            .into_iter()
            .map(|o| text.checked_add(o))
            .collect::<Option<_>>()
            .ok_or_else(|| {
                missing("fentry list inside the address space (an entry is past its end)")
            })?;
        if !p.fentry.is_sorted_by(|a, b| a < b) {
            return Err(missing("fentry list in increasing order"));
        }
        Ok(p)
    }

    /// A structure member's offset, as `module.core_layout.base`.
    pub fn offset(&self, path: &str) -> Option<u64> {
        self.offsets.iter().find(|(p, _)| p == path).map(|(_, o)| *o)
    }

    /// Digest of patch table `name`: entry count and hex digest.
    pub fn table(&self, name: &str) -> Option<(u64, &str)> {
        self.tables.iter().find(|(n, _, _)| n == name).map(|(_, c, d)| (*c, d.as_str()))
    }

    /// Each syscall table (its symbol), its entries (number, handler) and
    /// each handler's link-time address.
    #[allow(clippy::type_complexity)]
    pub fn syscall_tables(&self) -> [(&'static str, &[(u32, String)], &[Option<u64>]); 2] {
        [
            ("sys_call_table", &self.syscalls64, &self.syscall_addrs[0]),
            ("ia32_sys_call_table", &self.syscalls32, &self.syscall_addrs[1]),
        ]
    }

    /// Every symbol the profile keeps, sorted by address.
    pub fn symbols(&self) -> &[ProfileSymbol] {
        &self.symbols
    }

    pub fn symbol(&self, name: &str) -> Option<&ProfileSymbol> {
        self.by_name.get(name).map(|&i| &self.symbols[i])
    }

    /// The nearest symbol of any kind at or below link-time address `addr`
    /// (within 1 MiB), and the offset from it: names data the profile keeps.
    pub fn nearest(&self, addr: u64) -> Option<(&str, u64)> {
        let i = self.symbols.partition_point(|s| s.addr <= addr).checked_sub(1)?;
        let s = &self.symbols[i];
        (addr - s.addr < 1 << 20).then_some((s.name.as_str(), addr - s.addr))
    }

    /// The code symbol holding link-time address `addr`, and the offset into it.
    pub fn symbolize(&self, addr: u64) -> Option<(&str, u64)> {
        let (text, etext) = self.text_span?;
        if addr < text || addr >= etext {
            return None;
        }
        let i = self.symbols.partition_point(|s| s.addr <= addr).checked_sub(1)?;
        let s =
            self.symbols[..=i].iter().rev().find(|s| matches!(s.kind, 'T' | 't' | 'W' | 'w'))?;
        Some((s.name.as_str(), addr - s.addr))
    }
}

/// Loads every `*.profile` in `dirs` (missing directories are skipped, one
/// that cannot be listed is refused), in
/// order: a profile of a release already loaded from an earlier file is
/// shadowed by it and not loaded (see [`list_dirs`] to see which). Returns
/// the profiles and, for each file refused, its path and the reason.
pub fn load_dir(dirs: &[std::path::PathBuf]) -> (Vec<Profile>, Vec<(std::path::PathBuf, String)>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for found in list_dirs(dirs) {
        match found.state {
            Found::Used(p) => ok.push(*p),
            Found::Refused(why) => bad.push((found.path, why)),
            Found::Shadowed(_) => {}
        }
    }
    (ok, bad)
}

/// A profile file on the search path, and what became of it.
#[derive(Debug)]
pub struct Listed {
    pub path: std::path::PathBuf,
    pub state: Found,
}

#[derive(Debug)]
pub enum Found {
    /// Loaded and used.
    Used(Box<Profile>),
    /// A profile of a release an earlier file already gave (that file).
    Shadowed(std::path::PathBuf),
    /// Not a profile vigil can use, and why.
    Refused(String),
}

/// Every `*.profile` in `dirs` (missing directories are skipped), in
/// search order (the directories in order, each sorted by name), with
/// what became of it.
pub fn list_dirs(dirs: &[std::path::PathBuf]) -> Vec<Listed> {
    let mut out: Vec<Listed> = Vec::new();
    for found in profile_files(dirs) {
        let path = match found {
            Ok(path) => path,
            Err((dir, why)) => {
                out.push(Listed { path: dir, state: Found::Refused(why) });
                continue;
            }
        };
        let state = match read_profile(&path) {
            Err(why) => Found::Refused(why),
            Ok(p) => {
                let earlier = out.iter().find_map(|l| match &l.state {
                    Found::Used(q) if q.release == p.release => Some(l.path.clone()),
                    _ => None,
                });
                match earlier {
                    Some(by) => Found::Shadowed(by),
                    None => Found::Used(Box::new(p)),
                }
            }
        };
        out.push(Listed { path, state });
    }
    out
}

/// The `*.profile` files in `dirs`, in search order (the directories in
/// order, each sorted by name). A missing directory is skipped; one that
/// exists but cannot be listed is an error naming it, so that its profiles
/// are not lost unsaid.
pub fn profile_files(
    dirs: &[std::path::PathBuf],
) -> Vec<Result<std::path::PathBuf, (std::path::PathBuf, String)>> {
    let mut out = Vec::new();
    for dir in dirs {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.push(Err((dir.clone(), format!("the directory cannot be listed: {e}"))));
                continue;
            }
        };
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.retain(|p| p.extension().is_some_and(|e| e == "profile"));
        paths.sort();
        out.extend(paths.into_iter().map(Ok));
    }
    out
}

fn read_profile(path: &std::path::Path) -> Result<Profile, String> {
    match std::fs::metadata(path).map(|m| m.len()) {
        Ok(n) if n > MAX_PROFILE as u64 => Err(ProfileError::TooLarge.to_string()),
        Ok(_) => {
            let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
            let mut p = Profile::parse(&text).map_err(|e| e.to_string())?;
            p.file = Some(path.to_path_buf());
            Ok(p)
        }
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Along the search path, the first profile of a release is used and
    /// a later one of the same release is shadowed by it; a file that is
    /// no profile is refused, with why; a missing directory is skipped.
    #[test]
    fn earlier_directories_shadow_later_ones() {
        let (etc, built) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let text = sample().to_text();
        std::fs::write(etc.path().join("mine.profile"), &text).unwrap();
        std::fs::write(built.path().join("6.1.0-test.profile"), &text).unwrap();
        std::fs::write(built.path().join("broken.profile"), "not a profile").unwrap();
        std::fs::write(built.path().join("notes.txt"), "ignored").unwrap();
        let dirs = vec![
            etc.path().to_path_buf(),
            std::path::PathBuf::from("/nonexistent/vigil"),
            built.path().to_path_buf(),
        ];
        let listed = list_dirs(&dirs);
        assert_eq!(listed.len(), 3, "{listed:?}");
        assert!(matches!(&listed[0].state, Found::Used(p) if p.release == "6.1.0-test"));
        assert!(
            matches!(&listed[1].state, Found::Shadowed(by) if *by == etc.path().join("mine.profile"))
        );
        assert_eq!(listed[1].path, built.path().join("6.1.0-test.profile"));
        assert!(matches!(&listed[2].state, Found::Refused(_)), "{listed:?}");
        let (used, refused) = load_dir(&dirs);
        assert_eq!(used.len(), 1);
        // A directory that exists but cannot be listed is said, not skipped
        // as if missing (a file stands in for it here).
        let not_a_dir = built.path().join("notes.txt");
        let listed = list_dirs(std::slice::from_ref(&not_a_dir));
        assert!(
            matches!(&listed[..], [Listed { path, state: Found::Refused(why) }]
                if *path == not_a_dir && why.contains("cannot be listed")),
            "{listed:?}"
        );
        assert_eq!(used[0].file.as_deref(), Some(etc.path().join("mine.profile").as_path()));
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, built.path().join("broken.profile"));
    }

    pub(crate) fn sample() -> Profile {
        let syms = vec![
            ProfileSymbol { addr: 0xffff_ffff_8100_0000, kind: 'T', name: "_text".into() },
            ProfileSymbol { addr: 0xffff_ffff_8100_1000, kind: 'T', name: "__x64_sys_read".into() },
            ProfileSymbol { addr: 0xffff_ffff_8100_1040, kind: 't', name: "helper".into() },
            ProfileSymbol { addr: 0xffff_ffff_8120_0000, kind: 'T', name: "_etext".into() },
            ProfileSymbol { addr: 0xffff_ffff_8200_0000, kind: 'D', name: "sys_call_table".into() },
        ];
        Profile::new(
            "6.1.0-test".into(),
            "Linux version 6.1.0-test (x) #1 SMP".into(),
            "vmlinuz blake3 00".into(),
            syms,
            vec![(0, "__x64_sys_read".into())],
            vec![],
        )
    }

    #[test]
    fn text_round_trips_and_symbolizes() {
        let mut p = sample();
        p.tables.push(("jump_table".into(), 3, "ab".repeat(32)));
        p.fentry = (0..40).map(|i| 0xffff_ffff_8100_1000 + i * 0x40).collect();
        p.offsets.push(("dyn_ftrace.#size".into(), 16));
        let back = Profile::parse(&p.to_text()).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.table("jump_table"), Some((3, "ab".repeat(32).as_str())));
        assert_eq!(back.fentry.len(), 40);
        assert_eq!(p.symbolize(0xffff_ffff_8100_1044), Some(("helper", 4)));
        assert_eq!(p.symbolize(0xffff_ffff_8100_1000), Some(("__x64_sys_read", 0)));
        assert_eq!(p.symbolize(0xffff_ffff_8300_0000), None, "beyond _etext");
        assert_eq!(p.symbolize(0x1000), None);
        assert_eq!(p.symbol("sys_call_table").unwrap().kind, 'D');
    }

    #[test]
    fn malformed_profiles_are_refused_with_the_line() {
        let good = sample().to_text();
        for (edit, what) in [
            (
                good.replace("format vigil-guest-profile 1", "format vigil-guest-profile 9"),
                "version",
            ),
            (good.replace("format vigil-guest-profile 1\n", ""), "no format"),
            (good.replace("release 6.1.0-test\n", ""), "no release"),
            (good.replace("sym ffffffff81000000 T _text", "sym zz T _text"), "bad address"),
            (
                good.replace("sym ffffffff81000000 T _text", "sym ffffffff81000000 TT _text"),
                "bad kind",
            ),
            (good.replace("sym ffffffff81000000 T _text", "sym ffffffff81000000 T"), "no name"),
            (good.replace("sym ffffffff81000000 T _text\n", ""), "no _text"),
            (
                good.replace("syscall64 0 __x64_sys_read", "syscall64 5 __x64_sys_read"),
                "syscall order",
            ),
            (good.clone() + "nonsense here\n", "unknown key"),
            (good.clone() + "fentry 10 zz\n", "bad fentry"),
            (good.clone() + "fentry 20 10\n", "fentry out of order"),
            (good.clone() + "table jump_table 3 abc\n", "short digest"),
            (good.clone() + "table jump_table x\n", "table fields"),
            (good.clone() + "justoneword\n", "no value"),
            // Found by the profile fuzz target: a carriage return at the end
            // of a value was lost when the profile was written and read back.
            (good.replace("release 6.1.0-test", "release 6.1.0-test\r\r"), "a stray CR"),
            // Found by the profile fuzz target: an entry offset that carries
            // past the top of the address space overflowed on writing.
            (
                good.replace("sym ffffffff81000000 T _text", "sym ffffffffffffff00 T _text")
                    + "fentry 1000\n",
                "fentry past the end",
            ),
        ] {
            assert!(Profile::parse(&edit).is_err(), "accepted a profile with {what}");
        }
        let e = Profile::parse(&(good.clone() + "bogus x\n")).unwrap_err().to_string();
        assert!(e.starts_with("line "), "{e}");
        // Files with CRLF line ends still read as they did.
        assert_eq!(Profile::parse(&good.replace('\n', "\r\n")).unwrap(), sample());
    }

    proptest::proptest! {
        #[test]
        fn mutated_profiles_never_panic(pos in 0usize..2000, byte in 0u8..128) {
            let mut b = sample().to_text().into_bytes();
            let i = pos % b.len();
            b[i] = byte;
            if let Ok(t) = String::from_utf8(b) {
                let _ = Profile::parse(&t);
            }
        }
    }
}
