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

use crate::linux::semantic::{Matched, Module, read_u32, read_u64, read_virt};

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
pub(crate) const MAX_EXEC_RANGE: u64 = 64 << 20;
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
    /// ftrace's direct calls: a function entry may call what its direct
    /// record names (a BPF trampoline; whose code it is, the hook
    /// inventory says).
    direct_calls: HashSet<(u64, u64)>,
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

mod reads;
mod records;
mod review;
mod rules;
mod sites;
mod state;
#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]
mod tests;

#[cfg(test)]
use self::state::*;
use self::{reads::*, records::*, rules::*, sites::*};

pub use self::reads::exec_ranges;
pub(crate) use self::reads::{need, read_counted, read_span, sym, walk_list};
pub use self::records::{
    JumpEntry, StaticCallSite, jump_table_digest, parse_jump_entries, parse_static_call_sites,
    static_call_digest,
};
pub use self::review::{
    Clock, INT3_HOLD, PENDING_HOLD, Place, Text, WallClock, judge_sites, review,
};
pub use self::rules::{ChangedPage, Patched, Verdicts, verify_pages};
pub use self::sites::SiteMemo;
pub use self::state::{PatchMemory, RECORD_GRACE, account};
