//! Semantic checks with a guest profile: the KASLR slide found two ways and
//! compared, every syscall table entry and every IDT gate compared with
//! where the kernel put it, and addresses named by symbol.

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use crate::integrity::{AddressSpace, EntryRef, Finding, FindingKind, Severity};
use crate::memory::GuestMemory;
use crate::x86::Mapping;
use crate::x86::VcpuRegisters;

use super::profile::Profile;
use super::region::Region;

/// The regions the semantic checks report under.
pub fn regions() -> [Region; 5] {
    [
        Region::Kaslr,
        Region::SyscallTable("sys_call_table".into()),
        Region::SyscallTable("ia32_sys_call_table".into()),
        Region::IdtVectors,
        Region::ModuleArea,
    ]
}

/// Exception vectors and the entry stub Linux 6.1 installs for each.
const EXCEPTIONS: &[(u8, &str)] = &[
    (0, "asm_exc_divide_error"),
    (1, "asm_exc_debug"),
    (2, "asm_exc_nmi"),
    (3, "asm_exc_int3"),
    (4, "asm_exc_overflow"),
    (5, "asm_exc_bounds"),
    (6, "asm_exc_invalid_op"),
    (7, "asm_exc_device_not_available"),
    (8, "asm_exc_double_fault"),
    (9, "asm_exc_coproc_segment_overrun"),
    (10, "asm_exc_invalid_tss"),
    (11, "asm_exc_segment_not_present"),
    (12, "asm_exc_stack_segment"),
    (13, "asm_exc_general_protection"),
    (14, "asm_exc_page_fault"),
    (15, "asm_spurious_interrupt_bug"),
    (16, "asm_exc_coprocessor_error"),
    (17, "asm_exc_alignment_check"),
    (18, "asm_exc_machine_check"),
    (19, "asm_exc_simd_coprocessor_error"),
    (20, "asm_exc_virtualization_exception"),
    (21, "asm_exc_control_protection"),
    (29, "asm_exc_vmm_communication"),
];

/// The per-domain budget of host memory (`limits.guest_memory`) as one
/// examination draws on it: what the watch holds from check to check (the
/// baseline and its original pages, modules' text, patch sites, hooks,
/// symbols: `held`) is counted first, and the tables, records and symbols
/// the examination reads whole (patch tables, ftrace records, module symbol
/// tables, hook tables) share the rest. Each table is bounded alone, and
/// this bounds their sum, so that a guest listing thousands of modules with
/// huge tables cannot make the host hold gigabytes. Past it, a read is
/// refused (its reader treats the table as unreadable) and the first
/// refusal is kept to be said.
#[derive(Debug)]
pub struct ReadBudget {
    limit: u64,
    /// Held by the watch across checks, counted against `limit` first.
    held: u64,
    /// Taken by the reading under way (see [`ReadBudget::begin_pass`]).
    used: std::sync::atomic::AtomicU64,
    /// The most any reading took.
    peak: std::sync::atomic::AtomicU64,
    refused: std::sync::Mutex<Option<String>>,
}

impl ReadBudget {
    /// The default per domain (`limits.guest_memory`): a lab guest's watch
    /// holds some 17 MiB (its baseline, original pages and tags, patch
    /// sites) and reads well under 1 MiB of tables; a distribution guest's
    /// larger kernel and its modules' text (usually a few MiB) fit with
    /// room to spare.
    pub const DEFAULT: u64 = 64 << 20;

    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            held: 0,
            used: 0.into(),
            peak: 0.into(),
            refused: std::sync::Mutex::new(None),
        }
    }

    /// This budget, `held` bytes of it already held across checks.
    pub fn holding(self, held: u64) -> Self {
        Self { held, ..self }
    }

    /// Takes `bytes` for `what`, or refuses (and keeps the first refusal).
    pub fn take(&self, bytes: u64, what: &str) -> Result<(), String> {
        use std::sync::atomic::Ordering::SeqCst;
        let taken = self.used.fetch_update(SeqCst, SeqCst, |used| {
            used.checked_add(bytes).filter(|&after| after.saturating_add(self.held) <= self.limit)
        });
        match taken {
            Ok(before) => {
                self.peak.fetch_max(before + bytes, SeqCst);
                Ok(())
            }
            Err(used) => {
                let why = format!(
                    "{what}: {bytes} more bytes would pass the guest memory budget of {} MiB (limits.guest_memory; \
                     {used} bytes held by this reading, {} across checks)",
                    self.limit >> 20,
                    self.held
                );
                self.refused.lock().expect("budget lock").get_or_insert_with(|| why.clone());
                Err(why)
            }
        }
    }

    /// Gives back `bytes` taken for a read that held nothing in the end.
    pub fn give_back(&self, bytes: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        let _ = self.used.fetch_update(SeqCst, SeqCst, |used| Some(used.saturating_sub(bytes)));
    }

    /// A new reading of the same tables begins, replacing the last one
    /// (which its readers have dropped): what that one took is free again.
    /// A check that waits for the kernel to finish patching reads them
    /// several times over.
    pub fn begin_pass(&self) {
        self.used.store(0, std::sync::atomic::Ordering::SeqCst);
    }

    /// The most bytes one reading held.
    pub fn used(&self) -> u64 {
        self.peak.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes held across checks, counted first.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// The first read refused, if any was.
    pub fn refused(&self) -> Option<String> {
        self.refused.lock().expect("budget lock").clone()
    }
}

impl Default for ReadBudget {
    fn default() -> Self {
        Self::new(Self::DEFAULT)
    }
}

/// A guest matched to a profile.
pub struct Matched<'p> {
    pub profile: &'p Profile,
    /// The module list, once walked.
    pub modules: Vec<Module>,
    /// KASLR slide from the W^X walk: where the image is mapped less `_text`.
    pub slide: u64,
    /// KASLR slide from the IDT: vector 0's handler less its symbol.
    pub idt_slide: Option<u64>,
    /// What this examination's whole-table reads may hold.
    pub reads: ReadBudget,
}

impl Matched<'_> {
    /// Names a guest virtual address inside kernel text: `symbol+0xoff`.
    pub fn symbol_of(&self, gva: u64) -> Option<String> {
        self.profile.symbolize(gva.wrapping_sub(self.slide)).map(|(name, off)| {
            if off == 0 {
                format!("{name} (kernel text)")
            } else {
                format!("{name}+{off:#x} (kernel text)")
            }
        })
    }

    /// Names a guest virtual address: `symbol+0xoff`, a module-area address, or nothing known.
    pub fn locate(&self, gva: u64) -> String {
        match self.profile.symbolize(gva.wrapping_sub(self.slide)) {
            Some((name, 0)) => format!("{name} (kernel text)"),
            Some((name, off)) => format!("{name}+{off:#x} (kernel text)"),
            None => match self
                .modules
                .iter()
                .find(|md| (md.base..md.base.saturating_add(md.size)).contains(&gva))
            {
                Some(md) => format!("module {}+{:#x}", md.name, gva - md.base),
                None if MODULES.contains(&gva) => "the module area (no listed module)".into(),
                None => "nowhere known".into(),
            },
        }
    }

    /// Where symbol `name` of the profile lies in this guest.
    pub fn expect(&self, name: &str) -> Option<u64> {
        self.profile.symbol(name).map(|s| s.addr.wrapping_add(self.slide))
    }
}

pub(crate) fn read_u64(
    mem: &(impl GuestMemory + ?Sized),
    space: &dyn AddressSpace,
    gva: u64,
) -> Option<u64> {
    read_virt(mem, space, gva, 8).map(|(b, _)| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

pub(crate) fn read_u32(
    mem: &(impl GuestMemory + ?Sized),
    space: &dyn AddressSpace,
    gva: u64,
) -> Option<u32> {
    read_virt(mem, space, gva, 4).map(|(b, _)| u32::from_le_bytes(b.try_into().expect("4 bytes")))
}

/// Reads `len` bytes at `gva` through the guest's page tables.
pub fn read_virt(
    mem: &(impl GuestMemory + ?Sized),
    space: &dyn AddressSpace,
    gva: u64,
    len: usize,
) -> Option<(Vec<u8>, GuestPhysAddr)> {
    let mut out = Vec::with_capacity(len);
    let mut first_gpa = None;
    let mut va = gva;
    while out.len() < len {
        let page = GuestVirtAddr(va).page_floor();
        let (gpa, _) = space.translate(page)?;
        let off = GuestVirtAddr(va).page_offset();
        let n = usize::try_from(PAGE_SIZE - off).ok()?.min(len - out.len());
        let mut buf = vec![0u8; n];
        let at = gpa.checked_add(off)?;
        mem.read(at, &mut buf).ok()?;
        first_gpa.get_or_insert(at);
        out.extend_from_slice(&buf);
        va = va.checked_add(n as u64)?;
    }
    Some((out, first_gpa?))
}

/// The `Linux version ...` line in the guest's read-only data, as the
/// guest wrote it (evidence, not identity: a profile matches by its own
/// banner at its own address), for telling an operator which kernel a
/// guest without a profile runs. At most 256 printable bytes.
pub fn guest_banner<M: GuestMemory + ?Sized>(
    mem: &M,
    rodata: &crate::integrity::RegionLayout,
) -> Option<String> {
    const START: &[u8] = b"Linux version ";
    let mut tail: Vec<u8> = Vec::new();
    for p in &rodata.pages {
        let mut page = vec![0u8; crate::addr::PAGE_BYTES];
        mem.read(p.gpa, &mut page).ok()?;
        // The line may cross from the last page into this one.
        let mut window = std::mem::take(&mut tail);
        window.extend_from_slice(&page);
        if let Some(at) = window.windows(START.len()).position(|w| w == START) {
            let line: Vec<u8> = window[at..]
                .iter()
                .copied()
                .take_while(|&c| c == b' ' || c.is_ascii_graphic())
                .take(256)
                .collect();
            if at + line.len() < window.len() {
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
        }
        tail = window[window.len().saturating_sub(256 + START.len())..].to_vec();
    }
    None
}

/// Finds the profile whose banner the guest's `linux_banner` holds.
pub fn match_profile<'p, M: GuestMemory + ?Sized>(
    profiles: &'p [Profile],
    mem: &M,
    space: &dyn AddressSpace,
    image_base: GuestVirtAddr,
) -> Option<Matched<'p>> {
    profiles.iter().find_map(|p| {
        let slide = image_base.raw().wrapping_sub(p.symbol("_text")?.addr);
        let banner_at = p.symbol("linux_banner")?.addr.wrapping_add(slide);
        let (bytes, _) = read_virt(mem, space, banner_at, p.banner.len())?;
        (bytes == p.banner.as_bytes()).then_some(Matched {
            profile: p,
            modules: Vec::new(),
            slide,
            idt_slide: None,
            reads: ReadBudget::default(),
        })
    })
}

/// The size of each interrupt entry stub (8 bytes, 16 with IBT's ENDBR
/// in 6.2 on) and the first system vector, from the profile:
/// `irq_entries_start` holds a stub for each external vector from 32 up to
/// the first system vector, `spurious_entries_start` one for each from
/// there to 255, and the symbol after it ends them.
fn entry_stubs(p: &Profile) -> (u64, u8) {
    let (Some(irq), Some(spurious)) =
        (p.symbol("irq_entries_start"), p.symbol("spurious_entries_start"))
    else {
        return (8, 0xec);
    };
    let syms = p.symbols();
    let after = syms.partition_point(|s| s.addr <= spurious.addr);
    let end = syms.get(after).map_or(0, |s| s.addr);
    let total = end.wrapping_sub(irq.addr);
    for stride in [8u64, 16, 32] {
        let before = spurious.addr.wrapping_sub(irq.addr);
        if total == 224 * stride && before % stride == 0 {
            let first = 32 + before / stride;
            if let Ok(first) = u8::try_from(first) {
                return (stride, first);
            }
        }
    }
    (8, 0xec)
}

fn gate_target(g: &[u8]) -> Option<u64> {
    // 16-byte gate: offset 0..15 at 0, 16..31 at 6, 32..63 at 8; present bit 47.
    let present = g[5] & 0x80 != 0;
    present.then(|| {
        u64::from(u16::from_le_bytes([g[0], g[1]]))
            | u64::from(u16::from_le_bytes([g[6], g[7]])) << 16
            | u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]])) << 32
    })
}

fn with_entry(entry: EntryRef, mut f: Finding) -> Finding {
    f.entry = Some(entry);
    f
}

fn pointer(
    region: Region,
    gva: u64,
    gpa: GuestPhysAddr,
    detail: String,
    before: String,
    after: String,
) -> Finding {
    Finding::new(&region.name(), FindingKind::Pointer, Severity::Violation, GuestVirtAddr(gva), gpa)
        .saying(detail, before, after)
}

/// Every semantic finding: KASLR disagreement, hidden modules, syscall table
/// entries, IDT gates. `known_exec` is the executable memory outside the
/// image that the baseline recorded (there when the guest was trusted);
/// `recognized`, the executable allocations the kernel keeps records of
/// (ftrace trampolines, kprobe slots, BPF images: see
/// [`super::patch::exec_ranges`]), when they could be read.
pub fn check<M: GuestMemory + ?Sized>(
    m: &mut Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    regs: &[VcpuRegisters],
    known_exec: &[Mapping],
    recognized: Option<&[super::patch::ExecRange]>,
) -> Vec<Finding> {
    let mut out = Vec::new();
    check_slide(m, mem, space, regs, &mut out);
    // The module list first, so that addresses in modules get names.
    check_module_area(m, mem, space, (known_exec, recognized), &mut out);
    check_syscall_tables(m, mem, space, &mut out);
    check_gdts(mem, space, regs, &mut out);
    check_idts(m, mem, space, regs, &mut out);
    out
}

/// The KASLR slide a second way, from IDT vector 0's handler: it must
/// agree with the page tables'.
fn check_slide<M: GuestMemory + ?Sized>(
    m: &mut Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    regs: &[VcpuRegisters],
    out: &mut Vec<Finding>,
) {
    let p = m.profile;
    // The slide a second way: vector 0's handler.
    let cpu = regs.iter().find(|r| r.in_long_mode());
    if let (Some(cpu), Some(de)) = (cpu, p.symbol("asm_exc_divide_error"))
        && let Some((g, gpa)) = read_virt(mem, space, cpu.idtr_base, 16)
        && let Some(t) = gate_target(&g)
    {
        let idt_slide = t.wrapping_sub(de.addr);
        m.idt_slide = Some(idt_slide);
        if idt_slide != m.slide {
            out.push(pointer(
                Region::Kaslr,
                cpu.idtr_base,
                gpa,
                format!(
                    "the KASLR slide from the page tables ({:#x}) and from IDT vector 0 ({idt_slide:#x}) disagree: \
                     vector 0 points to {}",
                    m.slide,
                    m.locate(t)
                ),
                format!("{:#x}", m.slide),
                format!("{idt_slide:#x}"),
            ));
        }
    }
}

/// Executable module-area memory that no listed module (nor, with
/// `recognized`, another kernel record) accounts for; walks the module list
/// into `m.modules`.
fn check_module_area<M: GuestMemory + ?Sized>(
    m: &mut Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    (known_exec, recognized): (&[Mapping], Option<&[super::patch::ExecRange]>),
    out: &mut Vec<Finding>,
) {
    match walk_modules_settled(m, mem, space) {
        Ok(list) => {
            for (start, pages, gpa) in
                unlisted_runs(space, &list, known_exec, recognized.unwrap_or(&[]))
            {
                // Without the kernel's records of BPF program packs (2 MiB of
                // executable module-area memory), runs of that shape are
                // reported as information only.
                let bpf_shaped = pages == BPF_PACK_PAGES && recognized.is_none();
                let detail = if bpf_shaped {
                    format!(
                        "{pages} pages (2 MiB) of executable kernel memory at {start:#x} belong to no listed module: shaped like a BPF program pack"
                    )
                } else {
                    format!(
                        "{pages} page(s) of executable kernel memory at {start:#x} belong to no listed module (a hidden module?)"
                    )
                };
                let mut f = pointer(
                    Region::ModuleArea,
                    start,
                    gpa,
                    detail,
                    "no executable memory".into(),
                    format!("{pages} page(s) executable"),
                );
                f.kind = FindingKind::Unlisted;
                if bpf_shaped {
                    f.severity = Severity::Info;
                }
                out.push(f);
            }
            m.modules = list;
        }
        Err(e) => out.push(pointer(
            Region::ModuleArea,
            0,
            GuestPhysAddr(0),
            format!("the module list cannot be walked: {e}"),
            String::new(),
            String::new(),
        )),
    }
}

/// Every syscall table entry against the profile's symbol for it.
fn check_syscall_tables<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    out: &mut Vec<Finding>,
) {
    let p = m.profile;
    for (table, list, addrs) in p.syscall_tables() {
        let (Some(base), false) = (m.expect(table), list.is_empty()) else { continue };
        let Some((bytes, _)) = read_virt(mem, space, base, list.len() * 8) else {
            out.push(pointer(
                Region::SyscallTable(table.into()),
                base,
                GuestPhysAddr(0),
                format!("{table} is not mapped"),
                String::new(),
                String::new(),
            ));
            continue;
        };
        for (((nr, name), c), addr) in list.iter().zip(bytes.chunks_exact(8)).zip(addrs) {
            let found = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            let Some(expected) = addr.map(|a| a.wrapping_add(m.slide)) else { continue };
            if found != expected {
                let entry = base + u64::from(*nr) * 8;
                let gpa = space
                    .translate(GuestVirtAddr(entry).page_floor())
                    .map_or(GuestPhysAddr(0), |(g, _)| {
                        GuestPhysAddr(g.raw() + GuestVirtAddr(entry).page_offset())
                    });
                let call = name.trim_start_matches("__x64_sys_").trim_start_matches("__ia32_sys_");
                let eref = EntryRef {
                    table: table.to_string(),
                    index: u64::from(*nr),
                    expected,
                    expected_symbol: name.clone(),
                    found,
                    found_owner: m.locate(found),
                };
                out.push(with_entry(eref, pointer(
                    Region::SyscallTable(table.into()),
                    entry,
                    gpa,
                    format!(
                        "{table}[{nr}] ({call}) points to {found:#x} in {}, not to {name} ({expected:#x})",
                        m.locate(found)
                    ),
                    format!("{name} {expected:#x}"),
                    format!("{found:#x} {}", m.locate(found)),
                )));
            }
        }
    }
}

/// GDT descriptors of every vCPU.
fn check_gdts<M: GuestMemory + ?Sized>(
    mem: &M,
    space: &dyn AddressSpace,
    regs: &[VcpuRegisters],
    out: &mut Vec<Finding>,
) {
    for cpu in regs.iter().filter(|r| r.in_long_mode()) {
        let len = (usize::try_from(cpu.gdtr_limit).unwrap_or(0) + 1).min(64 * 1024);
        let Some((gdt, gpa)) = read_virt(mem, space, cpu.gdtr_base, len) else { continue };
        for (i, why) in gdt_problems(&gdt) {
            let mut f = pointer(
                Region::GdtDescriptors,
                cpu.gdtr_base + i as u64 * 8,
                GuestPhysAddr(gpa.raw() + i as u64 * 8),
                format!("GDT of vCPU {}: {why}", cpu.index),
                "Linux's descriptor".into(),
                format!(
                    "{:#018x}",
                    gdt.get(i * 8..i * 8 + 8)
                        .map_or(0, |e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
                ),
            );
            f.vcpu = Some(cpu.index);
            out.push(f);
        }
    }
}

/// IDT gates, once per distinct IDT: exceptions to their handlers, other
/// vectors to the entry stubs.
fn check_idts<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    regs: &[VcpuRegisters],
    out: &mut Vec<Finding>,
) {
    let p = m.profile;
    let image = (m.expect("_text"), m.expect("_end"));
    let in_image = |t: u64| matches!(image, (Some(a), Some(b)) if (a..b).contains(&t));
    let irq = p.symbol("irq_entries_start").map(|s| s.addr.wrapping_add(m.slide));
    let spurious = p.symbol("spurious_entries_start").map(|s| s.addr.wrapping_add(m.slide));
    let (stride, first_system) = entry_stubs(p);
    let mut seen = Vec::new();
    for cpu in regs.iter().filter(|r| r.in_long_mode()) {
        if seen.contains(&cpu.idtr_base) {
            continue;
        }
        seen.push(cpu.idtr_base);
        let n = (usize::try_from(cpu.idtr_limit).unwrap_or(0) + 1).min(256 * 16) / 16;
        let Some((idt, idt_gpa)) = read_virt(mem, space, cpu.idtr_base, n * 16) else { continue };
        for (v, g) in idt.chunks_exact(16).enumerate() {
            let Some(target) = gate_target(g) else { continue };
            let vector = u8::try_from(v).expect("at most 256 gates");
            let named = EXCEPTIONS.iter().find(|(x, _)| *x == vector).map(|(_, n)| *n);
            let expected = named.and_then(|n| m.expect(n));
            let ok = match expected {
                Some(e) => target == e,
                None if vector >= 32 => {
                    let stub = |first: u8, start: u64| {
                        vector >= first && target == start + u64::from(vector - first) * stride
                    };
                    (vector < first_system && irq.is_some_and(|i| stub(32, i)))
                        || spurious.is_some_and(|s| stub(first_system, s))
                        || m.profile.symbolize(target.wrapping_sub(m.slide)).is_some_and(
                            |(s, off)| {
                                off == 0 && (s.starts_with("asm_") || s.starts_with("entry_"))
                            },
                        )
                }
                // Reserved exception vectors keep the early boot handlers
                // (in .init.text, freed after boot): judged only by staying
                // inside the kernel image.
                None => in_image(target),
            };
            if !ok {
                let want = match (named, expected) {
                    (Some(n), Some(e)) => format!("{n} {e:#x}"),
                    _ => "an interrupt entry stub".into(),
                };
                let gate = cpu.idtr_base + u64::from(vector) * 16;
                let entry = EntryRef {
                    table: "idt".into(),
                    index: u64::from(vector),
                    expected: expected.unwrap_or(0),
                    expected_symbol: named.unwrap_or("an interrupt entry stub").to_owned(),
                    found: target,
                    found_owner: m.locate(target),
                };
                out.push(with_entry(
                    entry,
                    pointer(
                        Region::IdtVectors,
                        gate,
                        GuestPhysAddr(idt_gpa.raw() + u64::from(vector) * 16),
                        format!(
                            "IDT vector {vector} points to {target:#x} in {}, not to {want}",
                            m.locate(target)
                        ),
                        want.clone(),
                        format!("{target:#x} {}", m.locate(target)),
                    ),
                ));
            }
        }
    }
}

mod gdt;
mod modlist;
mod symbols;
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests;

pub use self::gdt::*;
pub use self::modlist::*;
pub use self::symbols::*;
