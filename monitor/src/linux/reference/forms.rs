//! The forms a boot-time rewrite site may hold, and the judgement of a
//! site's bytes against them.
//!
//! Code is compared by what it does, not byte for byte: each site is
//! decoded and reduced to its effective instructions. NOPs and `lfence` are
//! dropped, so is `int3` padding after an unconditional transfer, and a
//! site ends at a `jmp` to its end (what follows never runs); branch and RIP-relative
//! targets are absolute; a jump to a return thunk is a `ret`, and a call
//! or jump through a retpoline thunk is the indirect call or jump it
//! stands for. Two encodings the kernel may choose between then compare
//! equal, and one that does anything else does not.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind};

use super::{ConstKind, RewriteKind};

/// One effective instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `ret`, or a jump to a return thunk.
    Ret,
    /// A call or jump through a register: directly, or through the
    /// retpoline thunk for that register.
    Indirect { call: bool, register: String },
    /// Any other near branch, to its absolute target.
    Branch { mnemonic: Mnemonic, target: u64 },
    /// An instruction with a RIP-relative memory operand: its code, the
    /// absolute address, and its bytes but the displacement.
    Relative { code: Code, address: u64, rest: Vec<u8> },
    /// Anything else, by its bytes.
    Plain(Vec<u8>),
}

/// Names of code at run-time addresses, to tell thunks by.
pub type Names<'a> = &'a dyn Fn(u64) -> Option<String>;
/// The guest's 8 bytes at a run-time address (a paravirt op's slot).
pub type Slot<'a> = &'a dyn Fn(u64) -> Option<u64>;

/// The register a retpoline thunk stands for, from its name
/// (`__x86_indirect_thunk_r11`, `__x86_indirect_its_thunk_rax`, ...).
fn thunk_register(name: &str) -> Option<String> {
    const REGISTERS: [&str; 16] = [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
    let is_thunk = name.starts_with("__x86_indirect_") && name.contains("_thunk_");
    let register = name.rsplit('_').next().filter(|r| REGISTERS.contains(r))?;
    is_thunk.then(|| register.to_owned())
}

/// Of the names of one address, the one that tells what the code there is:
/// a thunk's for its register or a return thunk's (the first thunk of an
/// array also bears the array's name), else the first.
pub fn telling_name<'n>(names: &[&'n str]) -> Option<&'n str> {
    names
        .iter()
        .find(|n| thunk_register(n).is_some() || is_return_thunk(n))
        .or(names.first())
        .copied()
}

fn is_return_thunk(name: &str) -> bool {
    name.ends_with("return_thunk") || name == "__x86_return_skl"
}

/// Decodes `bytes` at run-time address `ip` into effective instructions.
/// Targets inside `moved` (start, length, new start) are taken as moved:
/// a replacement decoded where it is kept is compared as where it goes.
/// `None` when the bytes do not decode into whole instructions.
pub fn effective(
    bytes: &[u8],
    ip: u64,
    moved: Option<(u64, u64, u64)>,
    names: Names<'_>,
) -> Option<Vec<Op>> {
    let end = ip.checked_add(bytes.len() as u64)?;
    let relocate = |t: u64| match moved {
        Some((from, len, to)) if t >= from && t < from.saturating_add(len) => to + (t - from),
        _ => t,
    };
    let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let mut all: Vec<(Instruction, usize)> = Vec::new();
    let mut at = 0usize;
    while d.can_decode() {
        let i = d.decode();
        if i.is_invalid() {
            return None;
        }
        all.push((i, at));
        at += i.len();
    }
    let mut out = Vec::new();
    let mut ended = false;
    for (i, off) in &all {
        let raw = &bytes[*off..*off + i.len()];
        match i.mnemonic() {
            Mnemonic::Nop | Mnemonic::Lfence => continue,
            Mnemonic::Int3 if ended => continue,
            _ => {}
        }
        let branch = matches!(
            i.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        );
        if branch {
            let target = relocate(i.near_branch_target());
            // A jump to the site's end: what lies after it in the site
            // (padding, or an earlier form's leftovers) never runs.
            if i.mnemonic() == Mnemonic::Jmp && target == end {
                break;
            }
            let name = names(target);
            let op = match (i.mnemonic(), name.as_deref()) {
                (Mnemonic::Jmp, Some(n)) if is_return_thunk(n) => Op::Ret,
                (m @ (Mnemonic::Jmp | Mnemonic::Call), Some(n)) if thunk_register(n).is_some() => {
                    Op::Indirect {
                        call: m == Mnemonic::Call,
                        register: thunk_register(n).unwrap_or_default(),
                    }
                }
                (m, _) => Op::Branch { mnemonic: m, target },
            };
            ended = matches!(op, Op::Ret | Op::Indirect { call: false, .. })
                || matches!(op, Op::Branch { mnemonic: Mnemonic::Jmp, .. });
            out.push(op);
            continue;
        }
        if matches!(i.mnemonic(), Mnemonic::Ret) {
            out.push(Op::Ret);
            ended = true;
            continue;
        }
        if matches!(i.mnemonic(), Mnemonic::Call | Mnemonic::Jmp)
            && i.op0_kind() == OpKind::Register
        {
            let call = i.mnemonic() == Mnemonic::Call;
            out.push(Op::Indirect {
                call,
                register: format!("{:?}", i.op0_register()).to_lowercase(),
            });
            ended = !call;
            continue;
        }
        if i.is_ip_rel_memory_operand() {
            // Offsets are known to the decoder that just decoded it.
            let mut again = Decoder::with_ip(64, raw, i.ip(), DecoderOptions::NONE);
            let same = again.decode();
            let c = again.get_constant_offsets(&same);
            let mut rest = raw.to_vec();
            if c.has_displacement() {
                let (o, n) = (c.displacement_offset(), c.displacement_size());
                if o.checked_add(n).is_none_or(|e| e > rest.len()) {
                    return None;
                }
                rest.drain(o..o + n);
            }
            out.push(Op::Relative {
                code: i.code(),
                address: relocate(i.ip_rel_memory_address()),
                rest,
            });
            ended = false;
            continue;
        }
        out.push(Op::Plain(raw.to_vec()));
        ended = false;
    }
    Some(out)
}

/// `endbr64`, and the 4-byte NOPs the kernel seals an unused one with
/// (`nopl -42(%rax)` in 6.1, `nopw (%rax)` later).
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
const ENDBR_SEALED: [[u8; 4]; 2] = [[0x0f, 0x1f, 0x40, 0xd6], [0x66, 0x0f, 0x1f, 0x00]];
const LOCK: u8 = 0xf0;
const INT3: u8 = 0xcc;
/// `xor %eax,%eax` padded to 5 bytes with segment prefixes.
const STATIC_RET0: [u8; 5] = [0x2e, 0x2e, 0x2e, 0x31, 0xc0];
const DS: u8 = 0x3e;

/// What a judgement of one site needs besides its bytes.
pub struct Forms<'a> {
    pub names: Names<'a>,
    /// The relocated bytes of a replacement, by run-time address and length.
    pub replacement: &'a dyn Fn(u64, u8) -> Option<Vec<u8>>,
    pub slot: Slot<'a>,
}

/// A site's bytes, judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// A form the kernel writes there at boot.
    Allowed,
    /// A site the kernel patches as it runs (ftrace, jump label, static
    /// call) in a form only its records can tell right: for the patch review.
    RunTime,
    /// No form the kernel writes there.
    Refused,
}

impl Judgement {
    pub fn name(self) -> &'static str {
        match self {
            Judgement::Allowed => "allowed",
            Judgement::RunTime => "patched at run time",
            Judgement::Refused => "refused",
        }
    }
}

/// What the kernel writes for a paravirt op whose slot holds a native
/// function (6.1's `native_patch`), by the function's name.
const NATIVE: [(&str, &[u8]); 10] = [
    ("native_irq_disable", &[0xfa]),
    ("native_irq_enable", &[0xfb]),
    ("native_restore_fl", &[0x57, 0x9d]),
    ("native_save_fl", &[0x9c, 0x58]),
    ("native_read_cr2", &[0x0f, 0x20, 0xd0]),
    ("native_read_cr3", &[0x0f, 0x20, 0xd8]),
    ("native_write_cr3", &[0x0f, 0x22, 0xdf]),
    ("native_wbinvd", &[0x0f, 0x09]),
    ("native_queued_spin_unlock", &[0xc6, 0x07, 0x00]),
    ("__native_queued_spin_unlock", &[0xc6, 0x07, 0x00]),
];

/// Whether `found`, the bytes of a site of kind `kind` at run-time `ip`,
/// is a form the kernel writes there, given `expected` (the image's bytes,
/// relocated) and `also` (other replacements of the same site).
pub fn judge(
    kind: RewriteKind,
    ip: u64,
    expected: &[u8],
    found: &[u8],
    also: &[(u64, u8)],
    f: &Forms<'_>,
) -> Judgement {
    let yes = |b: bool| if b { Judgement::Allowed } else { Judgement::Refused };
    if expected == found {
        return Judgement::Allowed;
    }
    let now = || effective(found, ip, None, f.names);
    let was = || effective(expected, ip, None, f.names);
    match kind {
        RewriteKind::Lock => {
            yes(found.len() == 1 && expected == [LOCK] && matches!(found[0], LOCK | DS))
        }
        RewriteKind::Endbr => {
            yes(expected == ENDBR64 && ENDBR_SEALED.iter().any(|s| found == s.as_slice()))
        }
        RewriteKind::Alternative { replacement, replacement_len } => {
            let Some(now) = now() else { return Judgement::Refused };
            if was().as_ref() == Some(&now) {
                return Judgement::Allowed;
            }
            yes(std::iter::once((replacement, replacement_len)).chain(also.iter().copied()).any(
                |(at, len)| {
                    (f.replacement)(at, len).is_some_and(|b| {
                        let moved = Some((at, u64::from(len), ip));
                        effective(&b, at, moved, f.names).is_some_and(|r| r == now)
                    })
                },
            ))
        }
        RewriteKind::Retpoline | RewriteKind::Return => {
            let now = now();
            yes(now.is_some() && was() == now)
        }
        RewriteKind::Paravirt | RewriteKind::DirectCall => yes(paravirt(ip, expected, found, f)),
        RewriteKind::JumpLabel { target } => match now() {
            Some(ops) if ops.is_empty() => Judgement::Allowed,
            Some(ops) if ops == [Op::Branch { mnemonic: Mnemonic::Jmp, target }] => {
                Judgement::Allowed
            }
            _ => Judgement::Refused,
        },
        // A traced function calls a tracer, a static call its key's
        // function: which is the records' to say. Any other form (a jump
        // out of a function's entry) is nothing the kernel writes; an
        // `int3` first is the kernel's patching in flight, or not.
        RewriteKind::FtraceCall => match now().as_deref() {
            Some([Op::Branch { mnemonic: Mnemonic::Call, .. }]) => Judgement::RunTime,
            _ if found.first() == Some(&INT3) => Judgement::RunTime,
            _ => Judgement::Refused,
        },
        RewriteKind::Ftrace | RewriteKind::StaticCall => {
            if found.first() == Some(&INT3) {
                return Judgement::RunTime;
            }
            match now().as_deref() {
                Some([]) => Judgement::Allowed,
                Some([Op::Ret]) if kind == RewriteKind::StaticCall => Judgement::Allowed,
                // A call of `__static_call_return0`, inlined: `xor %eax,%eax`.
                Some([Op::Plain(b)]) if kind == RewriteKind::StaticCall && b == &STATIC_RET0 => {
                    Judgement::Allowed
                }
                Some([Op::Branch { mnemonic: Mnemonic::Call, .. }]) => Judgement::RunTime,
                Some([Op::Branch { mnemonic: Mnemonic::Jmp, .. }])
                    if kind == RewriteKind::StaticCall =>
                {
                    Judgement::RunTime
                }
                _ => Judgement::Refused,
            }
        }
        // Data, not code: USER_PTR_MAX for 4- or 5-level paging or LAM; a
        // kernel address below the image (the direct map, vmalloc); a shift.
        RewriteKind::RuntimeConst(which) => {
            let v = found.iter().rev().fold(0u64, |v, b| (v << 8) | u64::from(*b));
            yes(match (which, found.len()) {
                (ConstKind::Shift, 1) => v < 64,
                (ConstKind::UserPtrMax, 8) => [47, 56, 63].iter().any(|b| v == (1u64 << b) - 4096),
                (ConstKind::KernelData, 8) => {
                    (0xff00_0000_0000_0000..0xffff_ffff_8000_0000).contains(&v)
                }
                _ => false,
            })
        }
        // Call-depth thunks are only patched in under `retbleed=stuff`.
        RewriteKind::CallDepth => Judgement::Refused,
    }
}

/// A paravirt site: `call *slot(%rip)` in the image. The kernel writes a
/// direct call to what the slot holds, or for a native op its instruction,
/// padded with NOPs; for an op that does nothing, NOPs.
fn paravirt(ip: u64, expected: &[u8], found: &[u8], f: &Forms<'_>) -> bool {
    let Some(was) = effective(expected, ip, None, f.names) else { return false };
    let [Op::Relative { code: Code::Call_rm64, address, .. }] = was.as_slice() else {
        return false;
    };
    let Some(target) = (f.slot)(*address) else { return false };
    // The slot is the guest's: what it holds must at least be where one of
    // the kernel's functions starts.
    let Some(name) = (f.names)(target) else { return false };
    let Some(now) = effective(found, ip, None, f.names) else { return false };
    if now == [Op::Branch { mnemonic: Mnemonic::Call, target }] {
        return true;
    }
    if matches!(name.as_str(), "paravirt_nop" | "_paravirt_nop" | "x86_nop" | "nop_func") {
        return now.is_empty();
    }
    let name = name.trim_start_matches("__raw_callee_save_").trim_start_matches("pv_");
    NATIVE.iter().any(|(n, insn)| {
        (*n == name || n.trim_start_matches("__") == name)
            && effective(insn, ip, None, f.names).is_some_and(|i| i == now)
    })
}
