//! Who hooks the guest kernel: an inventory of the callbacks the kernel
//! runs on an other's behalf when one of its functions or traps is reached,
//! read from the kernel's own records, each callback given an owner.
//!
//! The patch review (see `patch`) answers whether a changed byte is an
//! encoding the kernel's patching writes. It cannot say whose code then
//! runs: a module that hooks a syscall handler with `register_ftrace_function`
//! and `FTRACE_OPS_FL_IPMODIFY` writes no byte itself. This inventory says
//! it: every ftrace ops (the functions it filters, its flags, its callback
//! and trampoline), every kprobe and kretprobe (address, handlers), and the
//! die notifiers (which see every `int3` no kprobe claims). Each callback is
//! owned by a kernel function, a listed module's text, a BPF image, or
//! nothing known.
//!
//! The records are evidence, not authority. A record is believed only where
//! the kernel allocates such records (its own data, a listed module, the
//! direct map), and a callback only where code lies (kernel text, a listed
//! module's text, a recorded BPF image). An ftrace trampoline is believed
//! only as ftrace makes one: its own page-aligned allocation, a page at
//! most, starting with a copy of ftrace's caller.
//!
//! [`HookPolicy::judge`] turns the inventory into findings: a hook that can
//! redirect execution and is owned by a module (or by nothing known) is a
//! violation, unless the operator allowed that module; a module's
//! observation-only hook is information.

use std::collections::HashSet;

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use crate::integrity::{AddressSpace, Finding, FindingKind, Severity};
use crate::memory::GuestMemory;

use super::patch::{need, read_span, sym, walk_list};
use super::region::Region;
use super::semantic::{MODULES, Matched, read_u32, read_u64};

/// `FTRACE_OPS_FL_*` (the same on 6.1 and 6.12).
const FL_ENABLED: u64 = 1 << 0;
const FL_SAVE_REGS: u64 = 1 << 2;
const FL_SAVE_REGS_IF_SUPPORTED: u64 = 1 << 3;
const FL_ALLOC_TRAMP: u64 = 1 << 11;
const FL_IPMODIFY: u64 = 1 << 12;
const FL_PERMANENT: u64 = 1 << 16;
const FL_DIRECT: u64 = 1 << 17;
/// Flags named in the inventory.
const FLAG_NAMES: [(u64, &str); 7] = [
    (FL_ENABLED, "ENABLED"),
    (FL_SAVE_REGS, "SAVE_REGS"),
    (FL_SAVE_REGS_IF_SUPPORTED, "SAVE_REGS_IF_SUPPORTED"),
    (FL_ALLOC_TRAMP, "ALLOC_TRAMP"),
    (FL_IPMODIFY, "IPMODIFY"),
    (FL_PERMANENT, "PERMANENT"),
    (FL_DIRECT, "DIRECT"),
];
/// Flags with which an ops' callback is handed registers it may change,
/// the instruction pointer among them, and the change is taken.
const FL_REDIRECT: u64 = FL_SAVE_REGS | FL_SAVE_REGS_IF_SUPPORTED | FL_IPMODIFY | FL_DIRECT;
/// `KPROBE_TABLE_SIZE` (1 << KPROBE_HASH_BITS).
const KPROBE_TABLE_SIZE: u64 = 64;
const KPROBE_FLAG_GONE: u32 = 1;
const KPROBE_FLAG_DISABLED: u32 = 2;
const KPROBE_FLAG_FTRACE: u32 = 8;
/// Most hooks of one kind read.
const MAX_HOOKS: usize = 4096;
/// `FTRACE_HASH_MAX_BITS`: a filter hash has at most 4096 buckets.
const MAX_HASH_BITS: u64 = 12;
/// Most filtered functions (and hash buckets) read over all ops of one
/// guest; past it the rest of the filters are not read (said, not judged).
const MAX_FILTERED: usize = 1 << 16;
/// Hooked functions named in a finding.
const NAMED: usize = 6;
/// The largest trampoline ftrace makes (`create_trampoline` allocates one
/// page for a copy of its caller, a jump back and the ops pointer).
const MAX_TRAMPOLINE: u64 = PAGE_SIZE;
/// Bytes of ftrace's caller a trampoline starts with: its copy.
const TRAMPOLINE_PREFIX: usize = 16;

/// Whose code a callback is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Owner {
    /// A function of the kernel image (named by the profile).
    Kernel { symbol: String },
    /// A listed module's text.
    Module { name: String, offset: u64 },
    /// A BPF image the kernel lists in its BPF kallsyms.
    Bpf { name: String },
    /// No code the kernel knows of lies there.
    Unknown,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Kernel { symbol } => write!(f, "kernel {symbol}"),
            Owner::Module { name, offset } => write!(f, "module {name}+{offset:#x}"),
            Owner::Bpf { name } => write!(f, "BPF {name}"),
            Owner::Unknown => write!(f, "nowhere known"),
        }
    }
}

/// One callback of a hook: what the kernel calls, in which role.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Callback {
    pub role: &'static str,
    #[serde(serialize_with = "hex")]
    pub addr: u64,
    pub owner: Owner,
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

/// How a hook is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// An `ftrace_ops`: a callback at the entry of the functions it filters.
    Ftrace,
    /// A kprobe: handlers run at an address, before and after its instruction.
    Kprobe,
    /// A kretprobe: handlers run at a function's entry and return.
    Kretprobe,
    /// A die notifier: called for traps (`int3` among them) no one else
    /// claims, with the registers it may change.
    DieNotifier,
}

impl Mechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Ftrace => "ftrace ops",
            Mechanism::Kprobe => "kprobe",
            Mechanism::Kretprobe => "kretprobe",
            Mechanism::DieNotifier => "die notifier",
        }
    }
}

/// One hook of the guest kernel, as its record says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Hook {
    pub mechanism: Mechanism,
    /// Where its record lies.
    #[serde(serialize_with = "hex")]
    pub record: u64,
    /// The functions (or places, `symbol+off`) it hooks; empty with
    /// `every_function` for an ftrace ops with no filter, and for a die
    /// notifier (it sees traps, not functions).
    pub hooked: Vec<String>,
    /// The first hooked address, for findings.
    #[serde(skip)]
    pub first: u64,
    /// An ftrace ops with no filter: it hooks every traceable function.
    pub every_function: bool,
    pub flags: Vec<&'static str>,
    pub callbacks: Vec<Callback>,
    /// It can change where execution goes on.
    pub redirects: bool,
    /// Why its record is not believed (empty: it is).
    pub forged: Vec<String>,
}

impl Hook {
    /// The module owning a callback, if one does.
    pub fn module(&self) -> Option<&str> {
        self.callbacks.iter().find_map(|c| match &c.owner {
            Owner::Module { name, .. } => Some(name.as_str()),
            _ => None,
        })
    }

    fn unknown(&self) -> Option<&Callback> {
        self.callbacks.iter().find(|c| c.owner == Owner::Unknown)
    }

    /// What it hooks, said briefly.
    pub fn hooked_text(&self) -> String {
        if self.every_function {
            return "every traceable function".into();
        }
        if self.mechanism == Mechanism::DieNotifier {
            return "every trap no kprobe claims (int3 among them)".into();
        }
        if self.hooked.is_empty() {
            return "no function".into();
        }
        let mut s = self.hooked.iter().take(NAMED).cloned().collect::<Vec<_>>().join(", ");
        if self.hooked.len() > NAMED {
            s.push_str(&format!(" and {} more", self.hooked.len() - NAMED));
        }
        s
    }
}

/// The hooks of one guest, and what of their records could not be read.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Inventory {
    pub hooks: Vec<Hook>,
    /// The BPF images the kernel lists (programs, trampolines, dispatchers):
    /// code a hook may own. What each is attached to is not read yet.
    pub bpf: Vec<BpfImage>,
    pub unread: Vec<String>,
}

/// A BPF image the kernel lists in its BPF kallsyms.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BpfImage {
    pub name: String,
    #[serde(serialize_with = "hex")]
    pub start: u64,
    #[serde(serialize_with = "hex")]
    pub end: u64,
}

/// Where code lies in the guest, to name owners: the kernel's text (by the
/// profile), listed modules' text, BPF images.
struct Code<'a, 'p> {
    m: &'a Matched<'p>,
    bpf: Vec<(u64, u64, String)>,
}

impl Code<'_, '_> {
    fn owner(&self, addr: u64) -> Owner {
        if let Some((name, off)) = self.m.profile.symbolize(addr.wrapping_sub(self.m.slide)) {
            let symbol = if off == 0 { name.to_owned() } else { format!("{name}+{off:#x}") };
            return Owner::Kernel { symbol };
        }
        if let Some(md) = self
            .m
            .modules
            .iter()
            .find(|md| (md.base..md.base.saturating_add(md.text_size)).contains(&addr))
        {
            return Owner::Module { name: md.name.clone(), offset: addr - md.base };
        }
        // Sorted by start (see `bpf_images`): the last starting at or before.
        let i = self.bpf.partition_point(|(s, _, _)| *s <= addr);
        if let Some((_, _, name)) = i.checked_sub(1).map(|i| &self.bpf[i]).filter(|b| addr < b.1) {
            return Owner::Bpf { name: name.clone() };
        }
        Owner::Unknown
    }

    fn callback(&self, role: &'static str, addr: u64) -> Callback {
        Callback { role, addr, owner: self.owner(addr) }
    }

    /// Names a hooked address: `symbol` or `symbol+off` of the kernel, or
    /// `module NAME+off`, or the address.
    fn place(&self, addr: u64) -> String {
        match self.owner(addr) {
            Owner::Kernel { symbol } => symbol,
            Owner::Module { name, offset } => format!("{name}+{offset:#x} (module)"),
            Owner::Bpf { name } => name,
            Owner::Unknown => format!("{addr:#x}"),
        }
    }

    /// Why a record at `at` is not where the kernel keeps such records:
    /// kernel text or a module's text (code, never data), the module area
    /// outside every listed module (a hidden module), or nowhere mapped.
    fn misplaced(&self, at: u64) -> Option<String> {
        let (text, etext) = (self.m.expect("_text")?, self.m.expect("_etext")?);
        if (text..etext).contains(&at) {
            return Some(format!("its record at {at:#x} lies in kernel text"));
        }
        if MODULES.contains(&at) {
            return match self
                .m
                .modules
                .iter()
                .find(|md| md.holds(at, at.saturating_add(1)) || md.data_holds(at))
            {
                Some(md) if (md.base..md.base.saturating_add(md.text_size)).contains(&at) => {
                    Some(format!("its record at {at:#x} lies in module {}'s text", md.name))
                }
                Some(_) => None,
                None => Some(format!(
                    "its record at {at:#x} lies in the module area outside every listed module"
                )),
            };
        }
        None
    }
}

impl Inventory {
    /// Reads the hooks of the guest `m` (its module list walked before).
    pub fn read<M: GuestMemory + ?Sized>(
        m: &Matched<'_>,
        mem: &M,
        space: &dyn AddressSpace,
    ) -> Self {
        let mut inv = Inventory::default();
        let bpf = bpf_images(m, mem, space).unwrap_or_else(|e| {
            inv.unread.push(format!("BPF images: {e}"));
            Vec::new()
        });
        inv.bpf = bpf
            .iter()
            .map(|(start, end, name)| BpfImage { name: name.clone(), start: *start, end: *end })
            .collect();
        let code = Code { m, bpf };
        let mut filtered = Budget::default();
        // A list that breaks off keeps what was read of it before.
        if let Err(e) = ftrace_hooks(&code, mem, space, &mut filtered, &mut inv.hooks) {
            inv.unread.push(format!("ftrace ops: {e}"));
        }
        if let Err(e) = kprobe_hooks(&code, mem, space, &mut inv.hooks) {
            inv.unread.push(format!("kprobes: {e}"));
        }
        if let Err(e) = die_notifiers(&code, mem, space, &mut inv.hooks) {
            inv.unread.push(format!("die notifiers: {e}"));
        }
        inv
    }
}

fn flag_names(flags: u64) -> Vec<&'static str> {
    FLAG_NAMES.iter().filter(|(b, _)| flags & b != 0).map(|(_, n)| *n).collect()
}

/// BPF images the kernel lists (its BPF kallsyms), with their names.
fn bpf_images<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<(u64, u64, String)>, String> {
    let (lnode, start, end) =
        (need(m, "bpf_ksym.lnode")?, need(m, "bpf_ksym.start")?, need(m, "bpf_ksym.end")?);
    let name_off = need(m, "bpf_ksym.name").ok();
    let mut found = Vec::new();
    walk_list(mem, space, sym(m, "bpf_kallsyms")?, |e| found.push(e.wrapping_sub(lnode)))?;
    // BPF's JIT allocates in the module area, apart from modules: an entry
    // that says otherwise (or overlaps another) owns nothing.
    let module_text = |a: u64| {
        m.modules.iter().any(|md| (md.base..md.base.saturating_add(md.text_size)).contains(&a))
    };
    let mut images: Vec<(u64, u64, String)> = found
        .into_iter()
        .filter_map(|k| {
            let s = read_u64(mem, space, k.wrapping_add(start))?;
            let e = read_u64(mem, space, k.wrapping_add(end))?;
            if e <= s
                || e - s > super::patch::MAX_EXEC_RANGE
                || !MODULES.contains(&s)
                || !MODULES.contains(&(e - 1))
                || module_text(s)
                || module_text(e - 1)
            {
                return None;
            }
            let name = name_off
                .and_then(|o| read_span(mem, space, k.wrapping_add(o), 64).ok())
                .map(|b| c_string(&b))
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| format!("image at {s:#x}"));
            Some((s, e, name))
        })
        .collect();
    images.sort_by_key(|b| b.0);
    let overlapping: HashSet<usize> = images
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1].0 < w[0].1)
        .flat_map(|(i, _)| [i, i + 1])
        .collect();
    Ok(images
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !overlapping.contains(i))
        .map(|(_, b)| b)
        .collect())
}

/// A NUL-terminated name from guest bytes, printable ASCII only.
fn c_string(b: &[u8]) -> String {
    b.iter()
        .take_while(|&&c| c != 0)
        .map(|&c| if c.is_ascii_graphic() { char::from(c) } else { '?' })
        .collect()
}

/// Every ops on ftrace's list, with the functions its filter names.
fn ftrace_hooks<M: GuestMemory + ?Sized>(
    code: &Code<'_, '_>,
    mem: &M,
    space: &dyn AddressSpace,
    filtered: &mut Budget,
    out: &mut Vec<Hook>,
) -> Result<(), String> {
    let m = code.m;
    let (next_off, func_off, flags_off, tramp_off, size_off, hash_off) = (
        need(m, "ftrace_ops.next")?,
        need(m, "ftrace_ops.func")?,
        need(m, "ftrace_ops.flags")?,
        need(m, "ftrace_ops.trampoline")?,
        need(m, "ftrace_ops.trampoline_size")?,
        need(m, "ftrace_ops.func_hash")?,
    );
    let filter_off = need(m, "ftrace_ops_hash.filter_hash")?;
    let end = sym(m, "ftrace_list_end")?;
    let callers = caller_prefixes(m, mem, space);
    let regs_caller = m
        .expect("ftrace_regs_caller")
        .and_then(|a| read_span(mem, space, a, TRAMPOLINE_PREFIX as u64).ok());
    let mut seen = HashSet::new();
    let mut at =
        read_u64(mem, space, sym(m, "ftrace_ops_list")?).ok_or("ftrace_ops_list unreadable")?;
    while at != end && at != 0 {
        if !seen.insert(at) || seen.len() > MAX_HOOKS {
            return Err(format!("the ops list loops or is longer than {MAX_HOOKS}"));
        }
        let field = |off: u64| read_u64(mem, space, at.wrapping_add(off));
        let func = field(func_off).ok_or_else(|| format!("ops at {at:#x} unreadable"))?;
        let flags = field(flags_off).unwrap_or(0);
        let tramp = field(tramp_off).unwrap_or(0);
        let tramp_size = u64::from(read_u32(mem, space, at.wrapping_add(size_off)).unwrap_or(0));
        let mut hook = Hook {
            mechanism: Mechanism::Ftrace,
            record: at,
            hooked: Vec::new(),
            first: 0,
            every_function: false,
            flags: flag_names(flags),
            callbacks: vec![code.callback("func", func)],
            redirects: flags & FL_REDIRECT != 0,
            forged: code.misplaced(at).into_iter().collect(),
        };
        if tramp != 0 {
            let owner = match fake_trampoline(m, mem, space, tramp, tramp_size, &callers) {
                Some(why) => {
                    hook.forged.push(why);
                    code.owner(tramp)
                }
                None => {
                    // A copy of the caller that saves and restores all
                    // registers lets the callback move the instruction
                    // pointer, whatever the ops' flags say now.
                    if regs_caller.is_some()
                        && read_span(mem, space, tramp, TRAMPOLINE_PREFIX as u64).ok()
                            == regs_caller
                    {
                        hook.redirects = true;
                    }
                    Owner::Kernel { symbol: "ftrace trampoline (a copy of its caller)".into() }
                }
            };
            hook.callbacks.push(Callback { role: "trampoline", addr: tramp, owner });
        }
        // Its filter: what it hooks. A record ftrace never made (no hash,
        // one that cannot be read) is forged, and the list goes on.
        let ips = match field(hash_off) {
            Some(0) | None => Err("it has no function hash (ftrace gives every ops one)".into()),
            Some(h) => read_u64(mem, space, h.wrapping_add(filter_off))
                .ok_or_else(|| format!("its filter hash pointer at {h:#x} is unreadable"))
                .and_then(|hash| hash_ips(m, mem, space, hash, filtered)),
        }
        .map_err(|why| hook.forged.push(why));
        let whole = ips.is_ok() && !filtered.over;
        let ips = ips.unwrap_or_default();
        hook.first = ips.first().copied().unwrap_or(0);
        hook.hooked = ips.iter().map(|&ip| code.place(ip)).collect();
        if whole {
            hook.every_function = ips.is_empty();
        } else if filtered.over {
            // Its filter was not read whole: not taken for "every function".
            hook.hooked.push(format!("(filter not read past {MAX_FILTERED} entries in all)"));
        }
        out.push(hook);
        at = read_u64(mem, space, at.wrapping_add(next_off)).ok_or("the ops list breaks off")?;
    }
    if filtered.over {
        return Err(format!(
            "the ops' filters name more than {MAX_FILTERED} functions and buckets in all: the rest not read"
        ));
    }
    Ok(())
}

/// The first bytes of ftrace's callers, which a trampoline ftrace makes
/// starts with (it is a copy of one).
pub(crate) fn caller_prefixes<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Vec<Vec<u8>> {
    ["ftrace_caller", "ftrace_regs_caller"]
        .iter()
        .filter_map(|n| m.expect(n))
        .filter_map(|a| read_span(mem, space, a, TRAMPOLINE_PREFIX as u64).ok())
        .collect()
}

/// Why `tramp` (`size` bytes, as an ops says) is no trampoline ftrace
/// made: not its own page-aligned allocation of at most a page in the
/// module area, outside every module, or not a copy of ftrace's caller
/// (`callers`, from [`caller_prefixes`]).
pub(crate) fn fake_trampoline<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    tramp: u64,
    size: u64,
    callers: &[Vec<u8>],
) -> Option<String> {
    if !MODULES.contains(&tramp)
        || !tramp.is_multiple_of(PAGE_SIZE)
        || size == 0
        || size > MAX_TRAMPOLINE
    {
        return Some(format!(
            "its trampoline {tramp:#x} ({size} bytes) is no allocation ftrace makes (one page-aligned page at most, in the module area)"
        ));
    }
    if let Some(md) = m.modules.iter().find(|md| md.holds(tramp, tramp + 1) || md.data_holds(tramp))
    {
        return Some(format!("its trampoline {tramp:#x} lies in module {}", md.name));
    }
    let Ok(head) = read_span(mem, space, tramp, TRAMPOLINE_PREFIX as u64) else {
        return Some(format!("its trampoline {tramp:#x} is not readable"));
    };
    if callers.is_empty() {
        return Some(format!(
            "its trampoline {tramp:#x} cannot be compared: ftrace's callers are not readable"
        ));
    }
    if callers.contains(&head) {
        return None;
    }
    Some(format!(
        "its trampoline {tramp:#x} is no copy of ftrace's caller (it starts {})",
        head.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// What the filters of one guest's ops may cost to read in all: hash
/// buckets and entries, up to [`MAX_FILTERED`].
#[derive(Default)]
struct Budget {
    used: usize,
    /// Spent: a filter was left unread (or read in part).
    over: bool,
}

impl Budget {
    /// Takes `n`; false (and spent from then on) when that is more than is left.
    fn take(&mut self, n: usize) -> bool {
        if self.over || self.used.saturating_add(n) > MAX_FILTERED {
            self.over = true;
            return false;
        }
        self.used += n;
        true
    }
}

/// The function addresses of an ftrace hash (sorted), bounded: read in
/// part (or not at all) once `filtered` is spent.
fn hash_ips<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    hash: u64,
    filtered: &mut Budget,
) -> Result<Vec<u64>, String> {
    if hash == 0 {
        // ftrace gives every ops a hash when it registers it (an empty one
        // to hook every function): none at all, it never registered.
        return Err("its filter hash is null: ftrace never registered it".into());
    }
    let (bits_off, buckets_off, count_off, hlist_off, ip_off) = (
        need(m, "ftrace_hash.size_bits")?,
        need(m, "ftrace_hash.buckets")?,
        need(m, "ftrace_hash.count")?,
        need(m, "ftrace_func_entry.hlist")?,
        need(m, "ftrace_func_entry.ip")?,
    );
    let field = |off: u64| {
        read_u64(mem, space, hash.wrapping_add(off)).ok_or(format!("hash at {hash:#x} unreadable"))
    };
    let (bits, buckets, count) = (field(bits_off)?, field(buckets_off)?, field(count_off)?);
    if count == 0 || buckets == 0 {
        return Ok(Vec::new());
    }
    if bits > MAX_HASH_BITS {
        return Err(format!("hash at {hash:#x}: {bits} size bits is more than ftrace uses"));
    }
    let mut ips = Vec::new();
    if !filtered.take(1 << bits) {
        return Ok(ips);
    }
    let heads = read_span(mem, space, buckets, 8 << bits)?;
    let mut seen = HashSet::new();
    for head in heads.chunks_exact(8) {
        let mut node = u64::from_le_bytes(head.try_into().expect("8 bytes"));
        while node != 0 {
            if !seen.insert(node) {
                return Err(format!("hash at {hash:#x} loops"));
            }
            if !filtered.take(1) {
                return Ok(ips);
            }
            let entry = node.wrapping_sub(hlist_off);
            ips.push(
                read_u64(mem, space, entry.wrapping_add(ip_off))
                    .ok_or(format!("hash at {hash:#x}: an entry is unreadable"))?,
            );
            node = read_u64(mem, space, node).ok_or(format!("hash at {hash:#x} breaks off"))?;
        }
    }
    ips.sort_unstable();
    ips.dedup();
    Ok(ips)
}

/// Every kprobe in the kernel's table, an aggregate's members each on its
/// own, a kretprobe with its handlers.
fn kprobe_hooks<M: GuestMemory + ?Sized>(
    code: &Code<'_, '_>,
    mem: &M,
    space: &dyn AddressSpace,
    out: &mut Vec<Hook>,
) -> Result<(), String> {
    let m = code.m;
    let (hlist, list, addr_off, flags_off, pre_off, post_off) = (
        need(m, "kprobe.hlist")?,
        need(m, "kprobe.list")?,
        need(m, "kprobe.addr")?,
        need(m, "kprobe.flags")?,
        need(m, "kprobe.pre_handler")?,
        need(m, "kprobe.post_handler")?,
    );
    let (kp_off, handler_off, entry_off) = (
        need(m, "kretprobe.kp")?,
        need(m, "kretprobe.handler")?,
        need(m, "kretprobe.entry_handler")?,
    );
    let aggr = m.expect("aggr_pre_handler");
    let kret = m.expect("pre_handler_kretprobe");
    let table = sym(m, "kprobe_table")?;
    let mut probes = Vec::new();
    // The probes found before the table broke off are still listed.
    let walked = (|| -> Result<(), String> {
        let mut seen = HashSet::new();
        for i in 0..KPROBE_TABLE_SIZE {
            let mut node = read_u64(mem, space, table + i * 8).ok_or("kprobe_table unreadable")?;
            while node != 0 {
                if !seen.insert(node) || seen.len() > MAX_HOOKS {
                    return Err(format!("a kprobe chain loops or is longer than {MAX_HOOKS}"));
                }
                let kp = node.wrapping_sub(hlist);
                let pre = read_u64(mem, space, kp.wrapping_add(pre_off)).unwrap_or(0);
                if pre != 0 && Some(pre) == aggr {
                    // An aggregate: the probes at this address are on its list.
                    let mut members = Vec::new();
                    let listed = walk_list(mem, space, kp.wrapping_add(list), |e| {
                        members.push(e.wrapping_sub(list));
                    });
                    probes
                        .extend(members.into_iter().take(MAX_HOOKS - probes.len().min(MAX_HOOKS)));
                    listed?;
                } else if probes.len() < MAX_HOOKS {
                    probes.push(kp);
                }
                if probes.len() >= MAX_HOOKS {
                    return Err(format!("more than {MAX_HOOKS} kprobes: the first listed"));
                }
                node = read_u64(mem, space, node).ok_or("a kprobe chain breaks off")?;
            }
        }
        Ok(())
    })();
    let mut unread = walked.err();
    for kp in probes {
        let field = |off: u64| read_u64(mem, space, kp.wrapping_add(off));
        let Some(addr) = field(addr_off) else {
            unread.get_or_insert_with(|| format!("kprobe at {kp:#x} unreadable"));
            continue;
        };
        let flags = read_u32(mem, space, kp.wrapping_add(flags_off)).unwrap_or(0);
        let (pre, post) = (field(pre_off).unwrap_or(0), field(post_off).unwrap_or(0));
        let mut names = Vec::new();
        // A probe marked gone (its probed module unloaded) is listed too:
        // the flag is the guest's to set, and the handler may still run.
        if flags & KPROBE_FLAG_GONE != 0 {
            names.push("GONE");
        }
        if flags & KPROBE_FLAG_DISABLED != 0 {
            names.push("DISABLED");
        }
        if flags & KPROBE_FLAG_FTRACE != 0 {
            names.push("FTRACE");
        }
        let mut hook = Hook {
            mechanism: Mechanism::Kprobe,
            record: kp,
            hooked: vec![code.place(addr)],
            first: addr,
            every_function: false,
            flags: names,
            callbacks: Vec::new(),
            redirects: true,
            forged: code.misplaced(kp).into_iter().collect(),
        };
        if pre != 0 && Some(pre) == kret {
            // A kretprobe: its `struct kprobe` is embedded; its own
            // handlers are what runs.
            hook.mechanism = Mechanism::Kretprobe;
            let rp = kp.wrapping_sub(kp_off);
            for (role, off) in [("entry_handler", entry_off), ("handler", handler_off)] {
                match read_u64(mem, space, rp.wrapping_add(off)) {
                    Some(0) => {}
                    Some(a) => hook.callbacks.push(code.callback(role, a)),
                    None => hook.forged.push(format!("its kretprobe at {rp:#x} is unreadable")),
                }
            }
        } else {
            for (role, a) in [("pre_handler", pre), ("post_handler", post)] {
                if a != 0 {
                    hook.callbacks.push(code.callback(role, a));
                }
            }
        }
        out.push(hook);
    }
    unread.map_or(Ok(()), Err)
}

/// The notifier blocks on `die_chain`.
fn die_notifiers<M: GuestMemory + ?Sized>(
    code: &Code<'_, '_>,
    mem: &M,
    space: &dyn AddressSpace,
    out: &mut Vec<Hook>,
) -> Result<(), String> {
    let m = code.m;
    let (head_off, call_off, next_off) = (
        need(m, "atomic_notifier_head.head")?,
        need(m, "notifier_block.notifier_call")?,
        need(m, "notifier_block.next")?,
    );
    let chain = sym(m, "die_chain")?;
    let mut seen = HashSet::new();
    let mut nb =
        read_u64(mem, space, chain.wrapping_add(head_off)).ok_or("die_chain unreadable")?;
    while nb != 0 {
        if !seen.insert(nb) || seen.len() > MAX_HOOKS {
            return Err(format!("die_chain loops or is longer than {MAX_HOOKS}"));
        }
        let call = read_u64(mem, space, nb.wrapping_add(call_off))
            .ok_or_else(|| format!("notifier at {nb:#x} unreadable"))?;
        out.push(Hook {
            mechanism: Mechanism::DieNotifier,
            record: nb,
            hooked: Vec::new(),
            first: 0,
            every_function: false,
            flags: Vec::new(),
            callbacks: vec![code.callback("notifier_call", call)],
            redirects: true,
            forged: code.misplaced(nb).into_iter().collect(),
        });
        nb = read_u64(mem, space, nb.wrapping_add(next_off)).ok_or("die_chain breaks off")?;
    }
    Ok(())
}

/// A hook the operator allows: a module's, on one symbol or on any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub module: String,
    pub symbol: Option<String>,
}

impl std::str::FromStr for Allowed {
    type Err = String;
    /// `MODULE` or `MODULE:SYMBOL`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (module, symbol) = match s.split_once(':') {
            Some((m, sy)) => (m, Some(sy)),
            None => (s, None),
        };
        let ok = |t: &str| {
            !t.is_empty()
                && t.len() <= 128
                && t.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        };
        if !ok(module) || symbol.is_some_and(|sy| !ok(sy)) {
            return Err(format!(
                "{s:?} is no MODULE or MODULE:SYMBOL (letters, digits, '_', '.', '-')"
            ));
        }
        Ok(Allowed { module: module.to_owned(), symbol: symbol.map(str::to_owned) })
    }
}

/// What to make of hooks: the default policy, and the modules allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookPolicy {
    pub allow: Vec<Allowed>,
}

impl HookPolicy {
    fn allows(&self, h: &Hook) -> bool {
        let Some(module) = h.module() else { return false };
        // Every module-owned callback must be the allowed module's.
        let one_module = h.callbacks.iter().all(|c| match &c.owner {
            Owner::Module { name, .. } => name == module,
            _ => true,
        });
        one_module
            && self.allow.iter().any(|a| {
                a.module == module
                    && a.symbol.as_ref().is_none_or(|s| {
                        !h.every_function
                            && !h.hooked.is_empty()
                            && h.hooked.iter().all(|p| p == s || p.starts_with(&format!("{s}+")))
                    })
            })
    }

    /// Findings for the hooks of `inv`: a forged record, a callback in no
    /// known code, or a redirecting hook owned by a module not allowed are
    /// violations; other module-owned hooks are information; the kernel's
    /// own and BPF's are listed by `vigil hooks` only.
    pub fn judge(&self, inv: &Inventory) -> Vec<Finding> {
        let mut out = Vec::new();
        for h in &inv.hooks {
            let owner = h
                .callbacks
                .iter()
                .find(|c| !matches!(c.owner, Owner::Kernel { .. }))
                .or(h.callbacks.first());
            let owner_text =
                owner.map_or("no callback".into(), |c| format!("{} ({})", c.owner, c.role));
            let what = format!(
                "{} at {:#x} hooks {}: {}",
                h.mechanism.as_str(),
                h.record,
                h.hooked_text(),
                owner_text
            );
            let flags = if h.flags.is_empty() {
                String::new()
            } else {
                format!(" [{}]", h.flags.join("|"))
            };
            let (severity, detail) = if !h.forged.is_empty() {
                (
                    Severity::Violation,
                    format!("{what}{flags}: a forged record ({})", h.forged.join("; ")),
                )
            } else if let Some(c) = h.unknown() {
                (
                    Severity::Violation,
                    format!(
                        "{what}{flags}: its {} {:#x} lies in no kernel text, listed module or BPF image",
                        c.role, c.addr
                    ),
                )
            } else if let Some((c, symbol)) = h.callbacks.iter().find_map(|c| match &c.owner {
                // Callbacks are functions: one inside a kernel function is
                // a gadget, not the kernel's own hook.
                Owner::Kernel { symbol } if symbol.contains('+') => Some((c, symbol)),
                _ => None,
            }) {
                (
                    Severity::Violation,
                    format!(
                        "{what}{flags}: its {} {:#x} lies inside the kernel function {symbol}, where no function starts",
                        c.role, c.addr
                    ),
                )
            } else if h.module().is_none() {
                continue;
            } else if h.redirects && !self.allows(h) {
                (
                    Severity::Violation,
                    format!(
                        "{what}{flags}: a module's hook that can redirect execution (allow it with hooks.allow = [\"{}\"] if it is a product's)",
                        h.module().unwrap_or_default()
                    ),
                )
            } else if h.redirects {
                (Severity::Info, format!("{what}{flags}: allowed by configuration"))
            } else {
                (Severity::Info, format!("{what}{flags}: observation only"))
            };
            let at = if h.first != 0 { h.first } else { h.record };
            out.push(
                Finding::new(
                    &Region::Hooks.name(),
                    FindingKind::Hook,
                    severity,
                    GuestVirtAddr(at),
                    GuestPhysAddr(0),
                )
                .saying(detail, String::new(), owner_text_key(h)),
            );
        }
        out
    }
}

/// What identifies a hook across checks (the digest of its finding): its
/// mechanism, what it hooks and its callbacks' owners.
fn owner_text_key(h: &Hook) -> String {
    let owners: Vec<String> =
        h.callbacks.iter().map(|c| format!("{}={}", c.role, c.owner)).collect();
    format!("{} {} {}", h.mechanism.as_str(), h.hooked_text(), owners.join(","))
}

#[cfg(test)]
mod tests;
