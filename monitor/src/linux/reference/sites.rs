//! The places the kernel rewrites its own text at boot, from the image's
//! tables. Each table lists sites as 32-bit offsets from the entry itself
//! (or, for paravirt, 64-bit addresses); the tables live in init data and
//! are gone from a running guest, which is why the reference keeps them.

use super::{Reference, ReferenceError};

/// What rewrites a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RewriteKind {
    /// An alternative (`.altinstructions`): the original instruction, or a
    /// replacement chosen by CPU feature, padded with NOPs.
    Alternative { replacement: u64, replacement_len: u8 },
    /// A paravirt call site (`.parainstructions`, before 6.8).
    Paravirt,
    /// An alternative flagged `ALT_FLAG_DIRECT_CALL` (6.8 on): the
    /// indirect call through a paravirt op's slot becomes a direct call to
    /// what the slot holds, or NOPs.
    DirectCall,
    /// A call or jump through a retpoline thunk (`.retpoline_sites`).
    Retpoline,
    /// A jump to the return thunk (`.return_sites`).
    Return,
    /// A `lock` prefix (`.smp_locks`).
    Lock,
    /// An `endbr64` the kernel may seal (`.ibt_endbr_seal`).
    Endbr,
    /// A call that call-depth tracking may redirect (`.call_sites`).
    CallDepth,
    /// The immediate of a run-time constant, set at boot: `USER_PTR_MAX`
    /// (8 bytes), another `runtime_ptr_*` (8 bytes of a kernel data
    /// address), or a `runtime_shift_*` (a 1-byte shift count).
    RuntimeConst(ConstKind),
    /// A function entry ftrace patches (`__mcount_loc`): NOP at boot, then
    /// calls while tracing.
    Ftrace,
    /// ftrace's call of the tracer function in its caller (`ftrace_call`,
    /// `ftrace_regs_call`).
    FtraceCall,
    /// A jump label (`__jump_table`): a NOP or a jump to `target`.
    JumpLabel { target: u64 },
    /// A static call site (`.static_call_sites`): a call to its key's
    /// function, a NOP, or (for a tail call) a `ret`.
    StaticCall,
}

impl RewriteKind {
    /// Whether the kernel rewrites such a site while it runs, not only at
    /// boot: its form then depends on the kernel's records now.
    pub fn at_run_time(self) -> bool {
        matches!(
            self,
            RewriteKind::Ftrace
                | RewriteKind::FtraceCall
                | RewriteKind::JumpLabel { .. }
                | RewriteKind::StaticCall
        )
    }

    /// A short name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            RewriteKind::Alternative { .. } => "alternative",
            RewriteKind::Paravirt => "paravirt",
            RewriteKind::DirectCall => "direct call",
            RewriteKind::Retpoline => "retpoline",
            RewriteKind::Return => "return thunk",
            RewriteKind::Lock => "lock prefix",
            RewriteKind::Endbr => "endbr seal",
            RewriteKind::CallDepth => "call depth",
            RewriteKind::RuntimeConst(_) => "run-time constant",
            RewriteKind::Ftrace => "ftrace",
            RewriteKind::FtraceCall => "ftrace's call",
            RewriteKind::JumpLabel { .. } => "jump label",
            RewriteKind::StaticCall => "static call",
        }
    }
}

/// Which run-time constant a site holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConstKind {
    /// `USER_PTR_MAX`: the highest user address, by paging mode (and LAM).
    UserPtrMax,
    /// A pointer to kernel data (`dentry_hashtable`): below the kernel image.
    KernelData,
    /// A shift count (`d_hash_shift`).
    Shift,
}

/// One site: its link address, how many bytes may change, and by what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RewriteSite {
    pub addr: u64,
    pub len: u8,
    pub kind: RewriteKind,
}

/// Every boot-time rewrite site of a kernel, sorted by address.
#[derive(Debug, Clone, Default)]
pub struct Rewrites {
    pub sites: Vec<RewriteSite>,
    /// Tables the image has none of (no such section).
    pub absent: Vec<&'static str>,
}

/// Longest instruction a site rewrites.
/// Longest site: its length is one byte (6.12 has alternatives of 43 bytes).
const MAX_SITE: u8 = u8::MAX;

impl Rewrites {
    /// Reads the rewrite tables of `r`, checking that every site lies in the
    /// text and every replacement in `.altinstr_replacement`.
    pub fn of(r: &Reference) -> Result<Self, ReferenceError> {
        let bad = |t: &str, why: String| ReferenceError::Elf(format!("{t}: {why}"));
        let text = r.section(".text").ok_or(ReferenceError::Missing(".text"))?;
        let in_text =
            |a: u64, len: u8| a >= text.addr && a.saturating_add(u64::from(len)) <= text.end();
        let mut out = Rewrites::default();
        // A thunk site is one instruction (a call, jump or conditional jump).
        let insn_len = |a: u64| -> Option<u8> {
            let off = usize::try_from(a.checked_sub(text.addr)?).ok()?;
            let bytes = text.bytes.get(off..(off + 15).min(text.bytes.len()))?;
            let i =
                iced_x86::Decoder::with_ip(64, bytes, a, iced_x86::DecoderOptions::NONE).decode();
            (!i.is_invalid()).then(|| u8::try_from(i.len()).ok()).flatten()
        };
        let mut rel_table = |name: &'static str,
                             len: Option<u8>,
                             kind: RewriteKind|
         -> Result<(), ReferenceError> {
            let Some(s) = r.section(name) else {
                out.absent.push(name);
                return Ok(());
            };
            for (i, c) in s.bytes.chunks_exact(4).enumerate() {
                let entry = s.addr + 4 * i as u64;
                let off = i64::from(i32::from_le_bytes(c.try_into().expect("4 bytes")));
                let a = entry.wrapping_add(off.cast_unsigned());
                // Sites in init text are gone after boot: not compared.
                if in_text(a, 1) {
                    let len = len.or_else(|| insn_len(a)).ok_or_else(|| {
                        bad(name, format!("no instruction decodes at site {a:#x}"))
                    })?;
                    out.sites.push(RewriteSite { addr: a, len, kind });
                }
            }
            Ok(())
        };
        rel_table(".retpoline_sites", None, RewriteKind::Retpoline)?;
        rel_table(".return_sites", None, RewriteKind::Return)?;
        rel_table(".smp_locks", Some(1), RewriteKind::Lock)?;
        rel_table(".ibt_endbr_seal", Some(4), RewriteKind::Endbr)?;
        rel_table(".call_sites", None, RewriteKind::CallDepth)?;
        // Each entry: the distance from itself to the immediate.
        for s in r
            .sections
            .iter()
            .filter(|s| super::RUNTIME_CONSTS.iter().any(|p| s.name.starts_with(p)))
        {
            let (len, kind) = match s.name.as_str() {
                "runtime_ptr_USER_PTR_MAX" => (8, ConstKind::UserPtrMax),
                n if n.starts_with("runtime_ptr_") => (8, ConstKind::KernelData),
                _ => (1, ConstKind::Shift),
            };
            for (i, c) in s.bytes.chunks_exact(4).enumerate() {
                let entry = s.addr + 4 * i as u64;
                let off = i64::from(i32::from_le_bytes(c.try_into().expect("4 bytes")));
                let a = entry.wrapping_add(off.cast_unsigned());
                if in_text(a, len) {
                    out.sites.push(RewriteSite {
                        addr: a,
                        len,
                        kind: RewriteKind::RuntimeConst(kind),
                    });
                }
            }
        }
        match r.section(".parainstructions") {
            None => out.absent.push(".parainstructions"),
            Some(s) => {
                // struct paravirt_patch_site { u8 *instr; u8 type; u8 len; }: 16 bytes.
                if !s.bytes.len().is_multiple_of(16) {
                    return Err(bad(".parainstructions", format!("{} bytes", s.bytes.len())));
                }
                for c in s.bytes.chunks_exact(16) {
                    // The pointer is relocated: read it as linked.
                    let a = u64::from_le_bytes(c[..8].try_into().expect("8 bytes"));
                    let len = c[9];
                    if in_text(a, len) {
                        out.sites.push(RewriteSite { addr: a, len, kind: RewriteKind::Paravirt });
                    }
                }
            }
        }
        match (r.section(".altinstructions"), r.section(".altinstr_replacement")) {
            (Some(alt), Some(repl)) => out.sites.extend(alternatives(alt, repl, &in_text)?),
            (None, _) => out.absent.push(".altinstructions"),
            (Some(_), None) => return Err(ReferenceError::Missing(".altinstr_replacement")),
        }
        out.sites.sort();
        Ok(out)
    }

    /// Adds the sites the kernel patches while it runs, from the profile:
    /// ftrace's function entries, and the jump table and static call sites
    /// the reference's read-only data holds (link addresses).
    pub fn add_run_time(
        &mut self,
        r: &Reference,
        p: &crate::linux::profile::Profile,
    ) -> Result<(), ReferenceError> {
        let text = r.section(".text").ok_or(ReferenceError::Missing(".text"))?;
        let in_text = |a: u64| a >= text.addr && a.saturating_add(5) <= text.end();
        for &a in p.fentry.iter().filter(|&&a| in_text(a)) {
            self.sites.push(RewriteSite { addr: a, len: 5, kind: RewriteKind::Ftrace });
        }
        let span = |start: &str, stop: &str| -> Option<(u64, Vec<u8>)> {
            let (a, b) = (p.symbol(start)?.addr, p.symbol(stop)?.addr);
            let len = usize::try_from(b.checked_sub(a)?).ok()?;
            Some((a, r.expected(a, len, 0)?))
        };
        if let Some((base, bytes)) = span("__start___jump_table", "__stop___jump_table") {
            let entries = crate::linux::patch::parse_jump_entries(&bytes, base)
                .map_err(|e| ReferenceError::Elf(format!("__jump_table: {e}")))?;
            for e in entries.iter().filter(|e| in_text(e.code)) {
                // The image holds a 2- or 5-byte form; so does the site later.
                let first = text.bytes[usize::try_from(e.code - text.addr).unwrap_or(0)];
                let len = if matches!(first, 0xeb | 0x66) { 2 } else { 5 };
                self.sites.push(RewriteSite {
                    addr: e.code,
                    len,
                    kind: RewriteKind::JumpLabel { target: e.target },
                });
            }
        } else {
            self.absent.push("__jump_table");
        }
        // ftrace's own calls of the tracer (`call ftrace_stub` in the image).
        for name in ["ftrace_call", "ftrace_regs_call"] {
            if let Some(s) = p.symbol(name).filter(|s| in_text(s.addr)) {
                self.sites.push(RewriteSite {
                    addr: s.addr,
                    len: 5,
                    kind: RewriteKind::FtraceCall,
                });
            }
        }
        // Static call trampolines: a jump to the key's function, or `ret`.
        for s in p.symbols().iter().filter(|s| s.name.starts_with("__SCT__") && in_text(s.addr)) {
            self.sites.push(RewriteSite { addr: s.addr, len: 5, kind: RewriteKind::StaticCall });
        }
        if let Some((base, bytes)) = span("__start_static_call_sites", "__stop_static_call_sites") {
            let sites = crate::linux::patch::parse_static_call_sites(&bytes, base)
                .map_err(|e| ReferenceError::Elf(format!(".static_call_sites: {e}")))?;
            for s in sites.iter().filter(|s| in_text(s.addr)) {
                self.sites.push(RewriteSite {
                    addr: s.addr,
                    len: 5,
                    kind: RewriteKind::StaticCall,
                });
            }
        } else {
            self.absent.push(".static_call_sites");
        }
        self.sites.sort();
        Ok(())
    }

    /// The sites whose bytes overlap `[addr, addr + len)`.
    pub fn overlapping(&self, addr: u64, len: u64) -> impl Iterator<Item = &RewriteSite> {
        let end = addr.saturating_add(len);
        let from =
            self.sites.partition_point(|s| s.addr.saturating_add(u64::from(MAX_SITE)) <= addr);
        self.sites[from..]
            .iter()
            .take_while(move |s| s.addr < end)
            .filter(move |s| s.addr.saturating_add(u64::from(s.len)) > addr)
    }
}

/// `.altinstructions` entries: `s32 instr, s32 repl, (u16 cpuid | u32
/// ft_flags), u8 instrlen, u8 replacementlen` — 12 bytes before 6.3, 14
/// after (the flags in the high half of `ft_flags`). The size is the one
/// under which every entry is sound.
fn alternatives(
    alt: &super::Section,
    repl: &super::Section,
    in_text: &dyn Fn(u64, u8) -> bool,
) -> Result<Vec<RewriteSite>, ReferenceError> {
    let mut why = Vec::new();
    for size in [12usize, 14] {
        match alternatives_sized(alt, repl, in_text, size) {
            Ok(sites) => return Ok(sites),
            Err(e) => why.push(format!("as {size}-byte entries: {e}")),
        }
    }
    Err(ReferenceError::Elf(format!(".altinstructions: {}", why.join("; "))))
}

/// The flag of an alternative whose original is an indirect call through a
/// paravirt op's slot, made direct at boot.
const ALT_FLAG_DIRECT_CALL: u16 = 1 << 1;

fn alternatives_sized(
    alt: &super::Section,
    repl: &super::Section,
    in_text: &dyn Fn(u64, u8) -> bool,
    size: usize,
) -> Result<Vec<RewriteSite>, String> {
    if !alt.bytes.len().is_multiple_of(size) {
        return Err(format!("{} bytes", alt.bytes.len()));
    }
    let mut out = Vec::new();
    for (i, c) in alt.bytes.chunks_exact(size).enumerate() {
        let entry = alt.addr + (i * size) as u64;
        let rel = |o: usize| {
            let v = i64::from(i32::from_le_bytes(c[o..o + 4].try_into().expect("4 bytes")));
            (entry + o as u64).wrapping_add(v.cast_unsigned())
        };
        let (site, replacement) = (rel(0), rel(4));
        let (len, replacement_len) = (c[size - 2], c[size - 1]);
        if replacement_len > len {
            return Err(format!("entry {i}: {len} bytes replaced by {replacement_len}"));
        }
        let in_repl = replacement >= repl.addr
            && replacement.saturating_add(u64::from(replacement_len)) <= repl.end();
        // A replacement of nothing (pure NOP padding) may point anywhere.
        if replacement_len > 0 && !in_repl && !in_text(replacement, replacement_len) {
            return Err(format!("entry {i}: replacement at {replacement:#x} is in no code"));
        }
        let flags = if size == 14 { u16::from_le_bytes([c[10], c[11]]) } else { 0 };
        let kind = if flags & ALT_FLAG_DIRECT_CALL != 0 {
            RewriteKind::DirectCall
        } else {
            RewriteKind::Alternative { replacement, replacement_len }
        };
        if in_text(site, len) {
            out.push(RewriteSite { addr: site, len, kind });
        }
    }
    Ok(out)
}
