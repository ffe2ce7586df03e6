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
/// `KPROBE_TABLE_SIZE` (1 << KPROBE_HASH_BITS).
const KPROBE_TABLE_SIZE: u64 = 64;
const KPROBE_FLAG_GONE: u32 = 1;
const KPROBE_FLAG_DISABLED: u32 = 2;
const KPROBE_FLAG_FTRACE: u32 = 8;
/// `TRAMPOLINE_TABLE_SIZE` of BPF's trampolines (1 << 10 on 6.1 and 6.12).
const BPF_TRAMPOLINE_TABLE: u64 = 1 << 10;
/// The programs a BPF trampoline runs, by `enum bpf_tramp_prog_type`:
/// before the function, after it, and before it with the power to skip it
/// and return what the program returns.
const BPF_TRAMP_KINDS: [&str; 3] = ["fentry", "fexit", "fmod_ret"];
/// The kind of program that decides the function's return.
const FMOD_RET: usize = 2;
/// The roles in which BPF code is called: a BPF trampoline's image and
/// programs, and a direct call to a trampoline.
const BPF_ROLES: [&str; 5] = ["trampoline", "fentry", "fexit", "fmod_ret", "direct"];
/// Most hooks of one kind read.
const MAX_HOOKS: usize = 4096;
/// Most livepatches stacked on one function (each a `klp_func`).
const MAX_KLP_STACK: usize = 64;
/// Most tracepoints of a kernel (6.12 has about 2,000), probes read on
/// one, and bytes of the kernel's tracepoints read at once.
const MAX_TRACEPOINTS: usize = 8192;
const MAX_PROBES: u64 = 64;
const MAX_TRACEPOINT_SPAN: u64 = 4 << 20;
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

impl Owner {
    /// Host memory its name holds.
    fn held_bytes(&self) -> u64 {
        match self {
            Owner::Kernel { symbol: n }
            | Owner::Module { name: n, .. }
            | Owner::Bpf { name: n } => n.len() as u64,
            Owner::Unknown => 0,
        }
    }
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
    /// A BPF trampoline: BPF programs run at a function's entry (by an
    /// ftrace direct call), after it, or in its place (`fmod_ret`).
    BpfTrampoline,
    /// A livepatch: ftrace ops whose handler sends the function to a
    /// module's replacement.
    Livepatch,
    /// Probes on a tracepoint: called with the tracepoint's arguments
    /// where the kernel traces an event; they observe.
    Tracepoint,
    /// An ftrace direct call: a function entry calls this code in place of
    /// ftrace's caller (BPF trampolines are called so).
    Direct,
}

impl Mechanism {
    /// Every mechanism, in the order [`Inventory::counts`] lists them.
    pub const ALL: [Mechanism; 8] = [
        Mechanism::Ftrace,
        Mechanism::Kprobe,
        Mechanism::Kretprobe,
        Mechanism::DieNotifier,
        Mechanism::BpfTrampoline,
        Mechanism::Livepatch,
        Mechanism::Tracepoint,
        Mechanism::Direct,
    ];

    /// Its name as a metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Mechanism::Ftrace => "ftrace",
            Mechanism::Kprobe => "kprobe",
            Mechanism::Kretprobe => "kretprobe",
            Mechanism::DieNotifier => "die_notifier",
            Mechanism::BpfTrampoline => "bpf_trampoline",
            Mechanism::Livepatch => "livepatch",
            Mechanism::Tracepoint => "tracepoint",
            Mechanism::Direct => "direct",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::Ftrace => "ftrace ops",
            Mechanism::Kprobe => "kprobe",
            Mechanism::Kretprobe => "kretprobe",
            Mechanism::DieNotifier => "die notifier",
            Mechanism::BpfTrampoline => "BPF trampoline",
            Mechanism::Livepatch => "livepatch",
            Mechanism::Tracepoint => "tracepoint",
            Mechanism::Direct => "ftrace direct call",
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

    /// The names of the BPF programs of callbacks in `role` (`vigil_lab`
    /// of `bpf_prog_<tag>_vigil_lab`).
    fn bpf_programs(&self, role: &str) -> Vec<String> {
        self.callbacks
            .iter()
            .filter(|c| c.role == role)
            .filter_map(|c| match &c.owner {
                Owner::Bpf { name } => Some(
                    name.strip_prefix("bpf_prog_")
                        .and_then(|n| n.split_once('_'))
                        .map_or(name.as_str(), |(_, n)| n)
                        .to_owned(),
                ),
                _ => None,
            })
            .collect()
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

pub use crate::integrity::baseline::HookRecord;

impl Hook {
    pub fn summary(&self) -> HookRecord {
        HookRecord {
            mechanism: self.mechanism.as_str().to_owned(),
            hooked: self.hooked_text(),
            callbacks: self.callbacks.iter().map(|c| format!("{} {}", c.role, c.owner)).collect(),
            redirects: self.redirects,
        }
    }
}

/// The hooks in `now` that `then` had not (added), and those of `then`
/// gone from `now` (removed); each sorted, a hook listed once.
pub fn compare(then: &[HookRecord], now: &[HookRecord]) -> (Vec<HookRecord>, Vec<HookRecord>) {
    let set = |l: &[HookRecord]| l.iter().cloned().collect::<std::collections::BTreeSet<_>>();
    let (then, now) = (set(then), set(now));
    (now.difference(&then).cloned().collect(), then.difference(&now).cloned().collect())
}

/// Whose a hook is, as a metric says it: its most foreign callback's owner.
pub const OWNER_KINDS: [&str; 4] = ["kernel", "bpf", "module", "unknown"];

/// How many hooks of one mechanism one kind of owner has.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HookCount {
    pub mechanism: &'static str,
    pub owner: &'static str,
    pub count: u64,
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

impl<'a, 'p> Code<'a, 'p> {
    fn new(m: &'a Matched<'p>, bpf: Vec<(u64, u64, String)>) -> Self {
        Code { m, bpf }
    }

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
    /// Host memory the inventory holds.
    pub fn held_bytes(&self) -> u64 {
        use crate::memory::held;
        let strings =
            |v: &Vec<String>| held::vec(v) + v.iter().map(|s| held::string(s)).sum::<u64>();
        let hooks: u64 = self
            .hooks
            .iter()
            .map(|h| {
                strings(&h.hooked)
                    + held::vec(&h.flags)
                    + held::vec(&h.callbacks)
                    + h.callbacks.iter().map(|c| c.owner.held_bytes()).sum::<u64>()
                    + strings(&h.forged)
            })
            .sum();
        let bpf: u64 = self.bpf.iter().map(|b| held::string(&b.name)).sum();
        held::vec(&self.hooks) + hooks + held::vec(&self.bpf) + bpf + strings(&self.unread)
    }
    /// Hooks by mechanism and owner (each of [`OWNER_KINDS`], by the most
    /// foreign of its callbacks' owners), every pair listed, zeros too:
    /// label values a guest cannot choose.
    pub fn counts(&self) -> Vec<HookCount> {
        let rank = |o: &Owner| match o {
            Owner::Kernel { .. } => 0,
            Owner::Bpf { .. } => 1,
            Owner::Module { .. } => 2,
            Owner::Unknown => 3,
        };
        let mut n = [[0u64; OWNER_KINDS.len()]; Mechanism::ALL.len()];
        for h in &self.hooks {
            let m = Mechanism::ALL.iter().position(|&m| m == h.mechanism).unwrap_or(0);
            let o = h.callbacks.iter().map(|c| rank(&c.owner)).max().unwrap_or(0);
            n[m][o] += 1;
        }
        Mechanism::ALL
            .iter()
            .enumerate()
            .flat_map(|(i, m)| {
                OWNER_KINDS.iter().enumerate().map(move |(j, o)| (i, j, m.label(), *o))
            })
            .map(|(i, j, mechanism, owner)| HookCount { mechanism, owner, count: n[i][j] })
            .collect()
    }

    /// Every hook as a baseline keeps it, sorted, each once.
    pub fn summaries(&self) -> Vec<HookRecord> {
        let mut l: Vec<HookRecord> = self.hooks.iter().map(Hook::summary).collect();
        l.sort();
        l.dedup();
        l
    }

    /// Reads the hooks of a guest whose kernel image lies at `image_base`
    /// in `space`: the profile among `profiles` that matches it, its module
    /// list walked. Says why not when no profile matches or the module list
    /// cannot be read. Also returns the profile's release.
    pub fn of_guest<M: GuestMemory + ?Sized>(
        profiles: &[super::profile::Profile],
        mem: &M,
        space: &dyn AddressSpace,
        image_base: GuestVirtAddr,
    ) -> Result<(Self, String), String> {
        let mut m = super::semantic::match_profile(profiles, mem, space, image_base).ok_or(
            "no guest profile matches the kernel, so its hook records cannot be read (build one with `vigil profile build`)",
        )?;
        m.modules = super::semantic::walk_modules_settled(&m, mem, space)
            .map_err(|e| format!("the module list: {e}"))?;
        Ok((Self::read(&m, mem, space), m.profile.release.clone()))
    }

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
        let code = Code::new(m, bpf);
        let mut filtered = Budget::default();
        // A list that breaks off keeps what was read of it before.
        let trampolines = bpf_trampolines(&code, mem, space, &mut inv.hooks)
            .map_err(|e| inv.unread.push(format!("BPF trampolines: {e}")))
            .ok();
        match direct_calls(m, mem, space) {
            Ok(calls) => {
                if let Err(e) = direct_hooks(&code, &calls, trampolines.as_deref(), &mut inv.hooks)
                {
                    inv.unread.push(format!("ftrace direct calls: {e}"));
                }
            }
            Err(e) => inv.unread.push(format!("ftrace direct calls: {e}")),
        }
        if let Err(e) = ftrace_hooks(&code, mem, space, &mut filtered, &mut inv.hooks) {
            inv.unread.push(format!("ftrace ops: {e}"));
        }
        if let Err(e) = tracepoint_hooks(&code, mem, space, &mut inv.hooks) {
            inv.unread.push(format!("tracepoints: {e}"));
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

/// A BPF trampoline, as direct calls are bound to it: the function it
/// hooks, its key (its image's name is `bpf_trampoline_KEY`), its image.
pub(crate) struct BoundTrampoline {
    func: u64,
    key: u64,
    image: Option<u64>,
}

impl BoundTrampoline {
    /// Whether a direct call at `ip` to `target` (in the BPF image `name`)
    /// is this trampoline's: `ip` is its function's ftrace site (at its
    /// start, or after an ENDBR), and `target` its image, current or the
    /// one being put in place (named after its key).
    fn binds(&self, ip: u64, target: u64, name: &str) -> bool {
        (self.func..self.func.saturating_add(16)).contains(&ip)
            && (Some(target) == self.image || name == format!("bpf_trampoline_{}", self.key))
    }
}

/// Every BPF trampoline in BPF's table: the function it hooks, its image,
/// and the programs it runs (by kind). Each a hook pushed to `out`; they
/// are also returned, to bind direct calls to.
fn bpf_trampolines<M: GuestMemory + ?Sized>(
    code: &Code<'_, '_>,
    mem: &M,
    space: &dyn AddressSpace,
    out: &mut Vec<Hook>,
) -> Result<Vec<BoundTrampoline>, String> {
    let m = code.m;
    let (hlist, func_off, key_off, progs_off, cur_off) = (
        need(m, "bpf_trampoline.hlist")?,
        need(m, "bpf_trampoline.func.addr")?,
        need(m, "bpf_trampoline.key")?,
        need(m, "bpf_trampoline.progs_hlist")?,
        need(m, "bpf_trampoline.cur_image")?,
    );
    let image_off = need(m, "bpf_tramp_image.image")?;
    let (link_off, node_off) =
        (need(m, "bpf_tramp_link.link")?, need(m, "bpf_tramp_link.tramp_hlist")?);
    let (prog_off, bpf_func_off) = (need(m, "bpf_link.prog")?, need(m, "bpf_prog.bpf_func")?);
    let heads = read_span(mem, space, sym(m, "trampoline_table")?, 8 * BPF_TRAMPOLINE_TABLE)?;
    let rd = |a: u64| read_u64(mem, space, a);
    let mut seen = HashSet::new();
    let mut step = |node: u64| -> Result<(), String> {
        if !seen.insert(node) || seen.len() > MAX_HOOKS {
            return Err(format!("a list loops or BPF's trampolines are more than {MAX_HOOKS}"));
        }
        if crate::integrity::check::Deadline::stops(seen.len()) {
            return Err(crate::integrity::check::OUT_OF_TIME.into());
        }
        Ok(())
    };
    let mut bound = Vec::new();
    for head in heads.chunks_exact(8) {
        let mut node = u64::from_le_bytes(head.try_into().expect("8 bytes"));
        while node != 0 {
            step(node)?;
            let tr = node.wrapping_sub(hlist);
            let func = rd(tr.wrapping_add(func_off))
                .ok_or_else(|| format!("BPF trampoline at {tr:#x} unreadable"))?;
            let mut hook = Hook {
                mechanism: Mechanism::BpfTrampoline,
                record: tr,
                hooked: vec![code.place(func)],
                first: func,
                every_function: false,
                flags: Vec::new(),
                callbacks: Vec::new(),
                redirects: false,
                forged: code.misplaced(tr).into_iter().collect(),
            };
            let image = rd(tr.wrapping_add(cur_off))
                .filter(|&c| c != 0)
                .and_then(|c| rd(c.wrapping_add(image_off)));
            if let Some(image) = image {
                hook.callbacks.push(code.callback("trampoline", image));
            }
            for (kind, role) in BPF_TRAMP_KINDS.iter().enumerate() {
                let mut link = rd(tr.wrapping_add(progs_off + 8 * kind as u64)).unwrap_or(0);
                while link != 0 {
                    step(link)?;
                    let prog = rd(link.wrapping_sub(node_off).wrapping_add(link_off + prog_off));
                    match prog.and_then(|p| rd(p.wrapping_add(bpf_func_off))) {
                        Some(f) => hook.callbacks.push(code.callback(role, f)),
                        None => hook
                            .forged
                            .push(format!("its {role} program at {link:#x} is unreadable")),
                    }
                    link = rd(link).ok_or_else(|| {
                        format!("BPF trampoline at {tr:#x}: its {role} list breaks off")
                    })?;
                }
            }
            // It returns in the function's place when a BPF program of its
            // fmod_ret kind says so (the kernel's own shims there, BPF
            // LSM's cgroup runners, are the kernel's).
            hook.redirects = hook.callbacks.iter().any(|c| {
                c.role == BPF_TRAMP_KINDS[FMOD_RET] && matches!(c.owner, Owner::Bpf { .. })
            });
            // Its image and programs are BPF's, or the kernel's shims.
            for c in &hook.callbacks {
                if let Owner::Module { .. } | Owner::Unknown = c.owner {
                    hook.forged.push(format!("its {} {:#x} is no BPF code", c.role, c.addr));
                }
            }
            out.push(hook);
            let key = rd(tr.wrapping_add(key_off)).unwrap_or(u64::MAX);
            bound.push(BoundTrampoline { func, key, image });
            node = rd(node).ok_or("BPF's trampoline table breaks off")?;
        }
    }
    Ok(bound)
}

/// ftrace's direct calls, each a hook of its own: the function entry, and
/// what it calls in place of ftrace's caller. A call into BPF must be the
/// image of that function's BPF trampoline (`trampolines`; not read: not
/// believed); a function with more than one is forged.
fn direct_hooks(
    code: &Code<'_, '_>,
    calls: &[(u64, u64)],
    trampolines: Option<&[BoundTrampoline]>,
    out: &mut Vec<Hook>,
) -> Result<(), String> {
    if calls.len() > MAX_HOOKS {
        return Err(format!("more than {MAX_HOOKS} direct calls: not read"));
    }
    let starts: std::collections::HashMap<&str, u64> =
        code.bpf.iter().map(|(start, _, name)| (name.as_str(), *start)).collect();
    for (i, &(ip, target)) in calls.iter().enumerate() {
        let callback = code.callback("direct", target);
        let mut forged = Vec::new();
        if calls.get(i + 1).is_some_and(|n| n.0 == ip) || (i > 0 && calls[i - 1].0 == ip) {
            forged.push("its function has more than one direct call record".to_owned());
        }
        if let Owner::Bpf { name } = &callback.owner {
            let start = starts.get(name.as_str()).copied();
            match trampolines {
                None => forged.push(format!(
                    "its call into BPF image {name} cannot be bound: BPF's trampolines were not read"
                )),
                Some(t) if start != Some(target) || !t.iter().any(|b| b.binds(ip, target, name)) => {
                    forged.push(format!(
                        "its call goes into BPF image {name}, which is no BPF trampoline of this function"
                    ));
                }
                Some(_) => {}
            }
        }
        out.push(Hook {
            mechanism: Mechanism::Direct,
            record: ip,
            hooked: vec![code.place(ip)],
            first: ip,
            every_function: false,
            flags: Vec::new(),
            callbacks: vec![callback],
            redirects: true,
            forged,
        });
    }
    Ok(())
}

/// The direct calls the patch review may accept at function entries: those
/// whose hook is no forged record and whose code is a module's (judged by
/// the hook policy) or a BPF trampoline of that function.
pub(crate) fn accepted_direct_calls<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<(u64, u64)>, String> {
    let calls = direct_calls(m, mem, space)?;
    if calls.is_empty() {
        return Ok(calls);
    }
    let code = Code::new(m, bpf_images(m, mem, space).unwrap_or_default());
    let mut scratch = Vec::new();
    let trampolines = bpf_trampolines(&code, mem, space, &mut scratch).ok();
    let mut hooks = Vec::new();
    direct_hooks(&code, &calls, trampolines.as_deref(), &mut hooks)?;
    Ok(hooks
        .iter()
        .filter(|h| h.forged.is_empty())
        .filter(|h| matches!(h.callbacks[0].owner, Owner::Module { .. } | Owner::Bpf { .. }))
        .map(|h| (h.record, h.callbacks[0].addr))
        .collect())
}

/// A livepatch's replacements of the function its ops hooks: the
/// `new_func` of each `klp_func` on its `klp_ops`' stack (the top one runs),
/// at most [`MAX_KLP_STACK`]. Each `klp_ops` has an ops of its own: one met
/// twice (in `seen`) is forged.
fn livepatch_callbacks<M: GuestMemory + ?Sized>(
    code: &Code<'_, '_>,
    mem: &M,
    space: &dyn AddressSpace,
    ops: u64,
    seen: &mut HashSet<u64>,
    hook: &mut Hook,
) -> Result<(), String> {
    let m = code.m;
    let (fops, stack) = (need(m, "klp_ops.fops")?, need(m, "klp_ops.func_stack")?);
    let (new_func, node) = (need(m, "klp_func.new_func")?, need(m, "klp_func.stack_node")?);
    let head = ops.wrapping_sub(fops).wrapping_add(stack);
    if !seen.insert(head) {
        return Err(format!("its stack at {head:#x} is another livepatch's"));
    }
    let mut at = read_u64(mem, space, head).ok_or("its stack is unreadable")?;
    let mut n = 0;
    while at != head {
        n += 1;
        if n > MAX_KLP_STACK {
            return Err(format!("its stack is longer than {MAX_KLP_STACK} or loops"));
        }
        let f = at.wrapping_sub(node);
        let a = read_u64(mem, space, f.wrapping_add(new_func))
            .ok_or_else(|| format!("its klp_func at {f:#x} is unreadable"))?;
        hook.callbacks.push(code.callback("new_func", a));
        at = read_u64(mem, space, at).ok_or("its stack breaks off")?;
    }
    Ok(())
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
    let callers = callers(m, mem, space);
    let livepatch = m.expect("klp_ftrace_handler");
    let direct_call_off = m.profile.offset("ftrace_ops.direct_call");
    let mut klp_seen = HashSet::new();
    let mut seen = HashSet::new();
    let mut at =
        read_u64(mem, space, sym(m, "ftrace_ops_list")?).ok_or("ftrace_ops_list unreadable")?;
    while at != end && at != 0 {
        if !seen.insert(at) || seen.len() > MAX_HOOKS {
            return Err(format!("the ops list loops or is longer than {MAX_HOOKS}"));
        }
        if crate::integrity::check::Deadline::stops(seen.len()) {
            return Err(crate::integrity::check::OUT_OF_TIME.into());
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
            // On x86-64 ftrace's caller takes back the instruction pointer
            // its callback leaves in `ftrace_regs` (livepatch relies on
            // it), whatever the ops' flags: every callback can redirect.
            redirects: true,
            forged: code.misplaced(at).into_iter().collect(),
        };
        if tramp != 0 {
            let owner = match trampoline(m, mem, space, (at, func), tramp, tramp_size, &callers) {
                Err(why) => {
                    hook.forged.push(why);
                    code.owner(tramp)
                }
                // ftrace's own callers (a direct ops names one).
                Ok(Trampoline::Caller) => code.owner(tramp),
                Ok(Trampoline::Copy) => {
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
        // 6.12: a direct ops' own direct call (6.1 keeps them in
        // direct_functions only, each a hook of its own).
        if let Some(d) = direct_call_off.and_then(field).filter(|&d| d != 0) {
            hook.callbacks.push(code.callback("direct", d));
        }
        if livepatch.is_some_and(|l| l == func) {
            hook.mechanism = Mechanism::Livepatch;
            if let Err(e) = livepatch_callbacks(code, mem, space, at, &mut klp_seen, &mut hook) {
                hook.forged.push(format!("its livepatch functions: {e}"));
            }
        }
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

/// One of ftrace's callers, as a trampoline ftrace makes copies it: its
/// bytes up to its `_end` label, and the three places where the copy is
/// made to differ (`create_trampoline` and `arch_ftrace_update_trampoline`).
pub(crate) struct Caller {
    bytes: Vec<u8>,
    /// The `mov` that loads the ops (`*_op_ptr`, 7 bytes): its disp32 is
    /// made to reach the ops pointer stored after the copy.
    op_ptr: usize,
    /// The call of the ops' function (`ftrace_call`, `ftrace_regs_call`).
    call: usize,
    /// The regs caller's 2-byte `jnz` to a direct call
    /// (`ftrace_regs_caller_jmp`), made a 2-byte nop.
    jnz: Option<usize>,
}

/// ftrace's two callers, as far as they can be read.
pub(crate) fn callers<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Vec<Caller> {
    let one = |name: &str, regs: bool| -> Option<Caller> {
        let at = |suffix: &str| m.expect(&format!("{name}{suffix}"));
        let start = at("")?;
        let off = |a: u64| usize::try_from(a.checked_sub(start)?).ok();
        let size = off(at("_end")?)?;
        let op_ptr = off(at("_op_ptr")?)?;
        let call = off(m.expect(if regs { "ftrace_regs_call" } else { "ftrace_call" })?)?;
        let jnz = if regs { Some(off(at("_jmp")?)?) } else { None };
        if size as u64 > MAX_TRAMPOLINE
            || op_ptr + 7 > size
            || call + 5 > size
            || jnz.is_some_and(|j| j + 2 > size)
        {
            return None;
        }
        let bytes = read_span(mem, space, start, size as u64).ok()?;
        Some(Caller { bytes, op_ptr, call, jnz })
    };
    [one("ftrace_caller", false), one("ftrace_regs_caller", true)].into_iter().flatten().collect()
}

impl Caller {
    /// Why `t`, the bytes of a trampoline at `tramp` for the ops at `ops`
    /// (as many as the ops says it has), is no copy of this caller. ftrace
    /// makes one as the caller's bytes, then a return (`ret`, with an
    /// `int3` or padding after it, or a `jmp` to the return thunk) and the
    /// ops pointer, nothing more; in the copy the ops load reaches that
    /// pointer, the call goes where `call_ok` accepts (an `int3` over its
    /// first byte is a rewrite in flight), and the regs caller's `jnz` is
    /// a nop. Any other byte that differs is not ftrace's.
    fn copied_in(
        &self,
        t: &[u8],
        tramp: u64,
        ops: u64,
        call_ok: &dyn Fn(u64) -> bool,
        return_thunk: Option<u64>,
    ) -> Result<(), String> {
        let size = self.bytes.len();
        if t.len() < size + 8 {
            return Err(format!("it is {} bytes, too short for a copy of {size}", t.len()));
        }
        let holes = [(self.op_ptr + 3, 4), (self.call, 5)]
            .into_iter()
            .chain(self.jnz.map(|j| (j, 2)))
            .collect::<Vec<_>>();
        let in_hole = |i: usize| holes.iter().any(|&(s, n)| (s..s + n).contains(&i));
        if let Some(i) = (0..size).find(|&i| !in_hole(i) && t[i] != self.bytes[i]) {
            return Err(format!("its byte at +{i:#x} is not its caller's"));
        }
        // The return and the ops pointer: all that follows the copy.
        let ptr = t.len() - 8;
        let tail = &t[size..ptr];
        let word = |i: usize| i32::from_le_bytes(t[i..i + 4].try_into().expect("4 bytes"));
        let rel = |at: usize| {
            tramp.wrapping_add(at as u64 + 5).wrapping_add(i64::from(word(at + 1)).cast_unsigned())
        };
        let returns = match tail {
            [0xc3, rest @ ..] => rest.len() <= 4 && rest.iter().all(|&b| b == 0xcc || b == 0),
            [0xe9, _, _, _, _] => return_thunk == Some(rel(size)),
            _ => false,
        };
        if !returns {
            return Err(format!(
                "after the copy it holds {} then its ops pointer, not a return",
                tail.iter().map(|b| format!("{b:02x}")).collect::<String>()
            ));
        }
        let loads = isize::try_from(word(self.op_ptr + 3))
            .ok()
            .and_then(|d| (self.op_ptr + 7).checked_add_signed(d));
        if loads != Some(ptr) {
            return Err("its ops load does not read its own ops pointer".into());
        }
        let held = u64::from_le_bytes(t[ptr..ptr + 8].try_into().expect("8 bytes"));
        if held != ops {
            return Err(format!("it loads the ops {held:#x}, not its own {ops:#x}"));
        }
        let c = self.call;
        if !matches!(t[c], 0xe8 | 0xcc) || !call_ok(rel(c)) {
            return Err(format!("its call of the ops' function goes to {:#x}", rel(c)));
        }
        if let Some(j) = self.jnz
            && t[j..j + 2] != [0x66, 0x90]
        {
            return Err("its jump to a direct call is not made a nop".into());
        }
        Ok(())
    }
}

/// How a trampoline is ftrace's: one of its callers itself (a direct ops
/// names `ftrace_regs_caller`), or a copy of one.
pub(crate) enum Trampoline {
    Caller,
    Copy,
}

/// Whether `tramp` (`size` bytes, as the ops at `ops` whose function is
/// `func` says) is a trampoline ftrace made: its own page-aligned
/// allocation of at most a page in the module area, outside every module,
/// holding a whole copy of one of ftrace's `callers` (see
/// [`Caller::copied_in`]) that loads `ops` and calls `func` (or ftrace's
/// own helpers). Otherwise why not.
#[allow(clippy::too_many_arguments)]
pub(crate) fn trampoline<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    (ops, func): (u64, u64),
    tramp: u64,
    size: u64,
    callers: &[Caller],
) -> Result<Trampoline, String> {
    if ["ftrace_caller", "ftrace_regs_caller"].iter().any(|n| m.expect(n) == Some(tramp)) {
        return Ok(Trampoline::Caller);
    }
    if !MODULES.contains(&tramp)
        || !tramp.is_multiple_of(PAGE_SIZE)
        || size == 0
        || size > MAX_TRAMPOLINE
    {
        return Err(format!(
            "its trampoline {tramp:#x} ({size} bytes) is no allocation ftrace makes (one page-aligned page at most, in the module area)"
        ));
    }
    if let Some(md) = m.modules.iter().find(|md| md.holds(tramp, tramp + 1) || md.data_holds(tramp))
    {
        return Err(format!("its trampoline {tramp:#x} lies in module {}", md.name));
    }
    let Ok(t) = read_span(mem, space, tramp, size) else {
        return Err(format!("its trampoline {tramp:#x} is not readable"));
    };
    if callers.is_empty() {
        return Err(format!(
            "its trampoline {tramp:#x} cannot be compared: ftrace's callers are not readable"
        ));
    }
    // What ftrace makes its call: the ops' function, its helpers, or
    // (while `set_ftrace_pid` swaps it) the function it saved.
    let mut targets: Vec<u64> = [
        "ftrace_ops_assist_func",
        "ftrace_ops_list_func",
        "arch_ftrace_ops_list_func",
        "ftrace_pid_func",
        "ftrace_stub",
    ]
    .iter()
    .filter_map(|n| m.expect(n))
    .collect();
    targets.push(func);
    if let Some(saved) = m
        .profile
        .offset("ftrace_ops.saved_func")
        .and_then(|o| read_u64(mem, space, ops.wrapping_add(o)))
    {
        targets.push(saved);
    }
    let call_ok = |t: u64| targets.contains(&t);
    let thunk = m.expect("__x86_return_thunk");
    let mut why = Vec::new();
    for c in callers {
        match c.copied_in(&t, tramp, ops, &call_ok, thunk) {
            Ok(()) => return Ok(Trampoline::Copy),
            Err(e) => why.push(e),
        }
    }
    Err(format!("its trampoline {tramp:#x} is no copy of ftrace's caller ({})", why.join("; or ")))
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
    let mut ips: Vec<u64> =
        hash_entries(m, mem, space, hash, None, filtered)?.into_iter().map(|(ip, _)| ip).collect();
    ips.dedup();
    Ok(ips)
}

/// The entries of an ftrace hash, (function address, its `direct` field
/// when `direct` is its offset, else 0), sorted; bounded as [`hash_ips`].
fn hash_entries<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    hash: u64,
    direct: Option<u64>,
    filtered: &mut Budget,
) -> Result<Vec<(u64, u64)>, String> {
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
    let mut entries = Vec::new();
    if !filtered.take(1 << bits) {
        return Ok(entries);
    }
    let heads = crate::linux::patch::read_counted(
        m,
        (mem, space),
        (buckets, 8 << bits),
        1 << bits,
        "a hook hash table",
    )?;
    let mut seen = HashSet::new();
    for head in heads.chunks_exact(8) {
        let mut node = u64::from_le_bytes(head.try_into().expect("8 bytes"));
        while node != 0 {
            if !seen.insert(node) {
                return Err(format!("hash at {hash:#x} loops"));
            }
            if !filtered.take(1) {
                entries.sort_unstable();
                return Ok(entries);
            }
            let entry = node.wrapping_sub(hlist_off);
            let read = |off: u64| {
                read_u64(mem, space, entry.wrapping_add(off))
                    .ok_or(format!("hash at {hash:#x}: an entry is unreadable"))
            };
            entries.push((read(ip_off)?, direct.map(read).transpose()?.unwrap_or(0)));
            node = read_u64(mem, space, node).ok_or(format!("hash at {hash:#x} breaks off"))?;
        }
    }
    entries.sort_unstable();
    Ok(entries)
}

/// ftrace's direct calls: each function entry that calls code of its own
/// (a BPF trampoline, or a module's) in place of ftrace's caller, with
/// what it calls, sorted by entry.
pub(crate) fn direct_calls<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<(u64, u64)>, String> {
    let direct = need(m, "ftrace_func_entry.direct")?;
    let hash = read_u64(mem, space, sym(m, "direct_functions")?)
        .filter(|&h| h != 0)
        .ok_or("direct_functions is unreadable or null")?;
    let mut budget = Budget::default();
    let entries = hash_entries(m, mem, space, hash, Some(direct), &mut budget)?;
    if budget.over {
        return Err(format!("more than {MAX_FILTERED} direct calls: the rest not read"));
    }
    Ok(entries)
}

/// Every tracepoint of the kernel image (by the profile's
/// `__tracepoint_NAME` symbols) that has probes, with them. Modules'
/// own tracepoints are not read.
fn tracepoint_hooks<M: GuestMemory + ?Sized>(
    code: &Code<'_, '_>,
    mem: &M,
    space: &dyn AddressSpace,
    out: &mut Vec<Hook>,
) -> Result<(), String> {
    let m = code.m;
    let (funcs_off, func_off, entry) = (
        need(m, "tracepoint.funcs")?,
        need(m, "tracepoint_func.func")?,
        need(m, "tracepoint_func.#size")?,
    );
    let tracepoints: Vec<(u64, &str)> = m
        .profile
        .symbols()
        .iter()
        .filter(|s| matches!(s.kind, 'd' | 'D'))
        .filter_map(|s| Some((s.addr.wrapping_add(m.slide), s.name.strip_prefix("__tracepoint_")?)))
        .take(MAX_TRACEPOINTS + 1)
        .collect();
    if tracepoints.len() > MAX_TRACEPOINTS {
        return Err(format!("the profile names more than {MAX_TRACEPOINTS}"));
    }
    let (Some(lo), Some(hi)) =
        (tracepoints.iter().map(|t| t.0).min(), tracepoints.iter().map(|t| t.0).max())
    else {
        return Err("the profile names none".into());
    };
    // The kernel keeps them together (its __tracepoints section): read at once.
    let len = (hi - lo).saturating_add(funcs_off + 8);
    if len > MAX_TRACEPOINT_SPAN || funcs_off > PAGE_SIZE || entry == 0 || entry > PAGE_SIZE {
        return Err(format!("they span {len} bytes, more than a kernel's"));
    }
    let all = crate::linux::patch::read_counted(m, (mem, space), (lo, len), 0, "the tracepoints")?;
    let mut probes = 0;
    for (tp, name) in tracepoints {
        let at = usize::try_from(tp - lo + funcs_off).expect("within the span");
        let funcs = u64::from_le_bytes(all[at..at + 8].try_into().expect("8 bytes"));
        if funcs == 0 {
            continue;
        }
        let mut hook = Hook {
            mechanism: Mechanism::Tracepoint,
            record: tp,
            hooked: vec![name.to_owned()],
            first: 0,
            every_function: false,
            flags: Vec::new(),
            callbacks: Vec::new(),
            redirects: false,
            forged: code.misplaced(funcs).into_iter().collect(),
        };
        // The probes, up to one whose function is null.
        let mut ended = false;
        for i in 0..MAX_PROBES {
            let f = read_u64(mem, space, funcs.wrapping_add(i * entry + func_off))
                .ok_or_else(|| format!("the probes of {name} at {funcs:#x} are unreadable"))?;
            if f == 0 {
                ended = true;
                break;
            }
            probes += 1;
            if probes > MAX_HOOKS {
                return Err(format!("more than {MAX_HOOKS} probes: the rest not read"));
            }
            hook.callbacks.push(code.callback("probe", f));
        }
        if !ended {
            hook.forged.push(format!("its probe array has no end within {MAX_PROBES}"));
        }
        out.push(hook);
    }
    Ok(())
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
                if crate::integrity::check::Deadline::stops(seen.len()) {
                    return Err(crate::integrity::check::OUT_OF_TIME.into());
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
        if crate::integrity::check::Deadline::stops(seen.len()) {
            return Err(crate::integrity::check::OUT_OF_TIME.into());
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
    /// `MODULE`, `MODULE:SYMBOL`, or `bpf:PROGRAM` (a BPF program by name).
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
                "{s:?} is no MODULE, MODULE:SYMBOL or bpf:PROGRAM (letters, digits, '_', '.', '-')"
            ));
        }
        Ok(Allowed { module: module.to_owned(), symbol: symbol.map(str::to_owned) })
    }
}

/// The allow-list entry `bpf:NAME` names a BPF program, not a module.
const BPF_ALLOW: &str = "bpf";

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

    /// Whether every one of the BPF programs `progs` (by name) is allowed
    /// (`bpf:NAME`).
    fn allows_bpf(&self, progs: &[String]) -> bool {
        !progs.is_empty()
            && progs.iter().all(|p| {
                self.allow.iter().any(|a| a.module == BPF_ALLOW && a.symbol.as_deref() == Some(p))
            })
    }

    /// Findings for the hooks of `inv`: a forged record, a callback in no
    /// known code, or a redirecting hook owned by a module not allowed are
    /// violations; other module-owned hooks are information; the kernel's
    /// own and BPF's are listed by `vigil hooks` only.
    pub fn judge(&self, inv: &Inventory) -> Vec<Finding> {
        let mut out = Vec::new();
        for h in &inv.hooks {
            // Named: the program that returns in the function's place, or
            // the first callback not the kernel's.
            let owner = h
                .callbacks
                .iter()
                .find(|c| c.role == BPF_TRAMP_KINDS[FMOD_RET])
                .or_else(|| h.callbacks.iter().find(|c| !matches!(c.owner, Owner::Kernel { .. })))
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
            } else if let Some(c) = h.callbacks.iter().find(|c| {
                matches!(c.owner, Owner::Bpf { .. }) && !BPF_ROLES.contains(&c.role)
            }) {
                // BPF's JIT output is called by BPF trampolines, direct
                // calls to them and the kernel's dispatchers, never as an
                // ftrace, kprobe, notifier or livepatch function.
                (
                    Severity::Violation,
                    format!(
                        "{what}{flags}: its {} {:#x} lies in BPF code, which the kernel never calls so",
                        c.role, c.addr
                    ),
                )
            } else if let Some(c) = h.callbacks.iter().find(|c| {
                h.mechanism == Mechanism::Livepatch
                    && c.role == "new_func"
                    && !matches!(c.owner, Owner::Module { .. })
                    && !h.hooked.iter().any(|p| {
                        matches!(&c.owner, Owner::Kernel { symbol } if p == symbol || p.starts_with(&format!("{symbol}+")))
                    })
            }) {
                // A livepatch's replacement is its module's code (or, to
                // undo one, the patched function itself).
                (
                    Severity::Violation,
                    format!(
                        "{what}{flags}: its replacement {:#x} is {}, not a livepatch module's code",
                        c.addr, c.owner
                    ),
                )
            } else if h.mechanism == Mechanism::BpfTrampoline {
                // BPF's programs: one that decides the function's return
                // (fmod_ret) hooks it as a rootkit does.
                if !h.redirects {
                    continue;
                }
                let progs = h.bpf_programs(BPF_TRAMP_KINDS[FMOD_RET]);
                if self.allows_bpf(&progs) {
                    (Severity::Info, format!("{what}: allowed by configuration"))
                } else {
                    (
                        Severity::Violation,
                        format!(
                            "{what}: a BPF program that returns in the function's place (fmod_ret) (allow it with hooks.allow = [\"bpf:{}\"] if it is a product's)",
                            progs.first().map_or("NAME", |p| p.as_str())
                        ),
                    )
                }
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
