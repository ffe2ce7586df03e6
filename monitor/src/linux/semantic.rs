//! Semantic checks with a guest profile: the KASLR slide found two ways and
//! compared, every syscall table entry and every IDT gate compared with
//! where the kernel put it, and addresses named by symbol.

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use crate::integrity::{AddressSpace, EntryRef, Finding, FindingKind, Severity};
use crate::memory::GuestMemory;
use crate::x86::Mapping;
use crate::x86::VcpuRegisters;

use super::profile::Profile;

/// The regions the semantic checks report under.
pub const REGIONS: &[&str] =
    &["kaslr", "sys_call_table", "ia32_sys_call_table", "idt-vectors", "module-area"];

/// Most modules believed in a module list.
const MAX_MODULES: usize = 4096;
/// Pages of a BPF program pack (`BPF_PROG_PACK_SIZE`, 2 MiB).
const BPF_PACK_PAGES: u64 = 512;
/// Walks of the module list tried before its failure is believed. The
/// guest loads and unloads modules while vigil walks the list, so a walk can
/// reach a module that is freed (its pages unmapped) between two reads; a
/// walk from the head again no longer meets it.
const MODULE_WALKS: usize = 3;
/// `MODULE_NAME_LEN` on 64-bit.
const MODULE_NAME_LEN: usize = 56;

/// A module as the guest's module list has it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Module {
    pub name: String,
    /// Guest virtual address of its `struct module`.
    #[serde(skip)]
    pub addr: u64,
    /// Guest virtual address of its code and read-only data.
    pub base: u64,
    pub size: u64,
    pub text_size: u64,
    /// `enum module_state`: 0 live, 1 coming, 2 going, 3 unformed.
    pub state: u32,
    /// Its init text (base, size): executable while its init function runs,
    /// freed after (the kernel clears these first). (0, 0) when none.
    #[serde(skip)]
    pub init: (u64, u64),
}

/// Init text larger than this is not believed.
const MAX_INIT_TEXT: u64 = 64 << 20;

impl Module {
    /// Whether `start..end` lies in its core allocation, or, while it is
    /// not yet live, its init text (a live module's init text is freed:
    /// fields that still name some are not believed).
    pub fn holds(&self, start: u64, end: u64) -> bool {
        let within = |base: u64, size: u64| base <= start && end <= base.saturating_add(size);
        let loading = matches!(self.state, MODULE_COMING | MODULE_UNFORMED);
        within(self.base, self.size)
            || (loading && self.init.1 > 0 && within(self.init.0, self.init.1))
    }
}

/// `MODULE_STATE_LIVE`: loaded, initialised, its text final.
pub const MODULE_LIVE: u32 = 0;
/// `MODULE_STATE_COMING`: its init function runs.
pub const MODULE_COMING: u32 = 1;
/// `MODULE_STATE_GOING`: its exit function runs, or it failed to load.
pub const MODULE_GOING: u32 = 2;
/// `MODULE_STATE_UNFORMED`: still being set up by the loader.
pub const MODULE_UNFORMED: u32 = 3;

/// A module state as `/proc/modules` would word it.
pub fn module_state_name(state: u32) -> &'static str {
    match state {
        MODULE_LIVE => "live",
        MODULE_COMING => "loading",
        MODULE_GOING => "unloading",
        3 => "unformed",
        _ => "in an unknown state",
    }
}

/// Where loadable modules live on x86-64 (MODULES_VADDR..MODULES_END).
pub const MODULES: std::ops::Range<u64> = 0xffff_ffff_c000_0000..0xffff_ffff_ff00_0000;

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

/// A guest matched to a profile.
pub struct Matched<'p> {
    pub profile: &'p Profile,
    /// The module list, once walked.
    pub modules: Vec<Module>,
    /// KASLR slide from the W^X walk: where the image is mapped less `_text`.
    pub slide: u64,
    /// KASLR slide from the IDT: vector 0's handler less its symbol.
    pub idt_slide: Option<u64>,
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

/// Walks the guest's module list (`modules`, a `list_head`), bounded and
/// loop-safe. The list is guest data: names are checked, sizes bounded.
pub fn walk_modules<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<Module>, String> {
    let p = m.profile;
    let need = |k: &str| {
        p.offset(k).ok_or_else(|| format!("the profile has no offset {k} (no BTF in the image?)"))
    };
    let (list, name) = (need("module.list")?, need("module.name")?);
    let (base, size, text) = module_layout(p)?;
    let init_at = module_init_layout(p);
    let head = m.expect("modules").ok_or("the profile has no symbol modules")?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut next = read_u64(mem, space, head).ok_or("the module list head is not readable")?;
    while next != head {
        if !seen.insert(next) || out.len() >= MAX_MODULES {
            return Err(format!("the module list loops or is longer than {MAX_MODULES}"));
        }
        let md = next.wrapping_sub(list);
        let (raw, _) = read_virt(mem, space, md.wrapping_add(name), MODULE_NAME_LEN)
            .ok_or("a module's name is not readable")?;
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        let nm = &raw[..end];
        if nm.is_empty() || !nm.iter().all(|c| c.is_ascii_graphic()) {
            return Err(format!("a module at {md:#x} has no valid name"));
        }
        out.push(Module {
            name: String::from_utf8_lossy(nm).into_owned(),
            addr: md,
            base: read_u64(mem, space, md.wrapping_add(base))
                .ok_or("a module's base is not readable")?,
            size: u64::from(
                read_u32(mem, space, md.wrapping_add(size))
                    .ok_or("a module's size is not readable")?,
            ),
            text_size: u64::from(
                read_u32(mem, space, md.wrapping_add(text))
                    .ok_or("a module's text size is not readable")?,
            ),
            state: p
                .offset("module.state")
                .and_then(|o| read_u32(mem, space, md.wrapping_add(o)))
                .unwrap_or(MODULE_LIVE),
            init: init_at
                .and_then(|(b, s)| {
                    let base = read_u64(mem, space, md.wrapping_add(b))?;
                    let size = u64::from(read_u32(mem, space, md.wrapping_add(s))?);
                    Some((base, size))
                })
                .filter(|&(_, size)| size <= MAX_INIT_TEXT)
                .unwrap_or((0, 0)),
        });
        next = read_u64(mem, space, next).ok_or("the module list breaks off")?;
    }
    Ok(out)
}

/// Where `struct module` keeps its code's base, the size the module's
/// executable pages may span from it, and its text size. Up to 6.3 the
/// core layout holds text, read-only data and data in one allocation; from
/// 6.4 `mem[MOD_TEXT]` holds the text alone.
fn module_layout(p: &super::profile::Profile) -> Result<(u64, u64, u64), String> {
    let core = ["base", "size", "text_size"].map(|f| p.offset(&format!("module.core_layout.{f}")));
    if let [Some(base), Some(size), Some(text)] = core {
        return Ok((base, size, text));
    }
    match (p.offset("module.mem.base"), p.offset("module.mem.size")) {
        (Some(base), Some(size)) => Ok((base, size, size)),
        _ => Err("the profile has neither module.core_layout nor module.mem offsets \
                  (no BTF in the image?)"
            .into()),
    }
}

/// Where `struct module` keeps its init text's base and size: up to 6.3
/// `init_layout` (text first), from 6.4 `mem[MOD_INIT_TEXT]`, the fifth
/// `struct module_memory`.
fn module_init_layout(p: &super::profile::Profile) -> Option<(u64, u64)> {
    if let (Some(b), Some(s)) =
        (p.offset("module.init_layout.base"), p.offset("module.init_layout.text_size"))
    {
        return Some((b, s));
    }
    const MOD_INIT_TEXT: u64 = 4;
    let stride = p.offset("module_memory.#size")?;
    let skip = MOD_INIT_TEXT.checked_mul(stride)?;
    Some((
        p.offset("module.mem.base")?.checked_add(skip)?,
        p.offset("module.mem.size")?.checked_add(skip)?,
    ))
}

/// [`walk_modules`], walked again from the head when a walk fails, up to
/// [`MODULE_WALKS`] times: a failure is believed only when it repeats, so a
/// module unloaded under the walk is not taken for a broken list.
pub fn walk_modules_settled<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<Module>, String> {
    let mut failure = String::new();
    for _ in 0..MODULE_WALKS {
        match walk_modules(m, mem, space) {
            Ok(list) => return Ok(list),
            Err(e) => failure = e,
        }
    }
    Err(format!("{failure} (in each of {MODULE_WALKS} walks)"))
}

/// Whether `md` is still, now, the live module the list walk found: its
/// `struct module` read again says the same name and base, and live. A
/// module unloaded since the walk is not (its state changes before its
/// memory is freed), nor one loaded again at the same base and not yet live.
pub fn still_live<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    md: &Module,
) -> bool {
    let p = m.profile;
    let (Some(name), Ok((base, _, _))) = (p.offset("module.name"), module_layout(p)) else {
        return false;
    };
    let live = match p.offset("module.state") {
        Some(o) => read_u32(mem, space, md.addr.wrapping_add(o)) == Some(MODULE_LIVE),
        None => true,
    };
    let named = read_virt(mem, space, md.addr.wrapping_add(name), MODULE_NAME_LEN).is_some_and(
        |(raw, _)| {
            let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            raw[..end] == *md.name.as_bytes()
        },
    );
    live && named && read_u64(mem, space, md.addr.wrapping_add(base)) == Some(md.base)
}

/// Executable pages of the module area that belong to no listed module, as
/// runs `(start, pages)`.
fn unlisted_runs(
    space: &dyn AddressSpace,
    modules: &[Module],
    known: &[Mapping],
    recognized: &[super::patch::ExecRange],
) -> Vec<(u64, u64, GuestPhysAddr)> {
    let mut runs: Vec<(u64, u64, GuestPhysAddr)> = Vec::new();
    let known: std::collections::HashSet<(u64, u64)> =
        known.iter().map(|k| (k.gva.raw(), k.gpa.raw())).collect();
    for mp in space.exec_outside_image() {
        let (s, e) = (mp.gva.raw(), mp.gva.raw().saturating_add(mp.size));
        if modules.iter().any(|md| md.holds(s, e))
            || known.contains(&(s, mp.gpa.raw()))
            || recognized.iter().any(|r| {
                r.start & !(PAGE_SIZE - 1) <= s
                    && e <= r.end.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
            })
        {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.0 + r.1 * PAGE_SIZE == s => r.1 += mp.size / PAGE_SIZE,
            _ => runs.push((s, mp.size / PAGE_SIZE, mp.gpa)),
        }
    }
    runs
}

/// GDT entries Linux x86-64 uses (asm/segment.h): kernel code, 32-bit
/// kernel code, kernel data, user 32-bit code, user data, user 64-bit code,
/// the TSS (two slots).
const GDT_KERNEL32_CS: usize = 1;
const GDT_KERNEL_CS: usize = 2;
const GDT_KERNEL_DS: usize = 3;
const GDT_USER32_CS: usize = 4;
const GDT_USER_DS: usize = 5;
const GDT_USER_CS: usize = 6;
const GDT_TSS: usize = 8;

/// What is wrong with the descriptors of one GDT, judged against the layout
/// Linux sets up: each finding names the entry and the reason.
pub fn gdt_problems(gdt: &[u8]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let entry = |i: usize| {
        gdt.get(i * 8..i * 8 + 8).map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
    };
    let access = |d: u64| ((d >> 40) & 0xff) as u8;
    let present = |d: u64| access(d) & 0x80 != 0;
    let dpl = |d: u64| (access(d) >> 5) & 3;
    let is_segment = |d: u64| access(d) & 0x10 != 0; // S: code/data, not system
    let is_code = |d: u64| is_segment(d) && access(d) & 0x08 != 0;
    let long = |d: u64| (d >> 53) & 1 == 1;
    let want = |out: &mut Vec<(usize, String)>, i: usize, ok: bool, what: &str| {
        if !ok {
            out.push((i, format!("entry {i} (selector {:#x}) is not {what}", i * 8)));
        }
    };
    let n = gdt.len() / 8;
    if n <= GDT_TSS + 1 {
        out.push((0, format!("only {n} entries: too short for Linux's layout")));
        return out;
    }
    let e = |i| entry(i).unwrap_or(0);
    let kcs = e(GDT_KERNEL_CS);
    want(
        &mut out,
        GDT_KERNEL_CS,
        present(kcs) && is_code(kcs) && dpl(kcs) == 0 && long(kcs),
        "64-bit ring-0 code",
    );
    let kds = e(GDT_KERNEL_DS);
    want(
        &mut out,
        GDT_KERNEL_DS,
        present(kds) && is_segment(kds) && !is_code(kds) && dpl(kds) == 0,
        "ring-0 data",
    );
    let ucs = e(GDT_USER_CS);
    want(
        &mut out,
        GDT_USER_CS,
        present(ucs) && is_code(ucs) && dpl(ucs) == 3 && long(ucs),
        "64-bit ring-3 code",
    );
    let u32cs = e(GDT_USER32_CS);
    want(
        &mut out,
        GDT_USER32_CS,
        is_code(u32cs) && dpl(u32cs) == 3 && !long(u32cs),
        "32-bit ring-3 code",
    );
    let uds = e(GDT_USER_DS);
    want(&mut out, GDT_USER_DS, is_segment(uds) && !is_code(uds) && dpl(uds) == 3, "ring-3 data");
    let tss = e(GDT_TSS);
    let tss_type = access(tss) & 0x0f;
    want(
        &mut out,
        GDT_TSS,
        present(tss) && !is_segment(tss) && (tss_type == 9 || tss_type == 11) && dpl(tss) == 0,
        "a 64-bit TSS",
    );
    // Nothing else may be a gate, or ring-0 code.
    let mut i = 1;
    while i < n {
        let d = e(i);
        if present(d) && !is_segment(d) {
            let t = access(d) & 0x0f;
            if matches!(t, 0x4 | 0xc | 0x6 | 0x7 | 0xe | 0xf) {
                out.push((
                    i,
                    format!(
                        "entry {i} (selector {:#x}) is a gate (type {t:#x}): a way into ring 0",
                        i * 8
                    ),
                ));
            } else if i != GDT_TSS && !(i == GDT_TSS + 2 && t == 2) {
                out.push((i, format!("entry {i} (selector {:#x}) is an unexpected system descriptor (type {t:#x})", i * 8)));
            }
            i += 2; // system descriptors take two slots in long mode
            continue;
        }
        if present(d) && is_code(d) && dpl(d) == 0 && i != GDT_KERNEL_CS && i != GDT_KERNEL32_CS {
            out.push((
                i,
                format!("entry {i} (selector {:#x}) is an extra ring-0 code segment", i * 8),
            ));
        }
        i += 1;
    }
    out
}

/// The GDT entries of 32-bit thread-local storage (`GDT_ENTRY_TLS_MIN` to
/// `_MAX` on x86-64): the kernel writes the running task's
/// `set_thread_area` descriptors there at every task switch.
const GDT_TLS: std::ops::RangeInclusive<usize> = 12..=14;

/// Whether descriptor `d` is one `set_thread_area` can install (the
/// kernel's `tls_desc_okay` and `fill_ldt`): empty, or a 32-bit ring-3 data
/// segment (S set, DPL 3, not code, L clear, D/B set), present or not.
fn user_tls_descriptor(d: u64) -> bool {
    let access = ((d >> 40) & 0xff) as u8;
    let (long, big) = ((d >> 53) & 1 == 1, (d >> 54) & 1 == 1);
    d == 0 || (access & 0x10 != 0 && (access >> 5) & 3 == 3 && access & 0x08 == 0 && !long && big)
}

/// Takes the content findings of GDT pages (regions `gdt-cpuN`) whose only
/// change is in the TLS entries, each now empty or a ring-3 segment, and
/// reports them as info: a task with 32-bit TLS was switched to. Any other
/// change of a GDT page stays a violation. `regs` (the baseline's) give each
/// GDT's base within its page; `original` the page as the baseline kept it.
/// The page is read again to be judged: only when it still hashes to what
/// the check found (one-page regions) is the judgement of the same bytes.
pub fn review_gdt_pages<M: GuestMemory + ?Sized>(
    report: &mut crate::integrity::Report,
    mem: &M,
    regs: &[crate::x86::VcpuRegisters],
    original: &dyn Fn(u64) -> Option<Vec<u8>>,
) {
    let taken = report.take_violations(|f| {
        f.kind == FindingKind::Content && f.region.starts_with("gdt-cpu") && f.page.is_some()
    });
    let pages: Vec<(String, u64)> =
        report.regions.iter().map(|r| (r.name.clone(), r.pages)).collect();
    let one_page = |region: &str| pages.iter().any(|(n, p)| n == region && *p == 1);
    let mut keep = Vec::new();
    let mut info = Vec::new();
    for f in taken {
        let base = f
            .region
            .strip_prefix("gdt-cpu")
            .and_then(|n| n.parse::<u32>().ok())
            .and_then(|n| regs.iter().find(|r| r.index == n))
            .map(|r| r.gdtr_base);
        let page = f.gva.raw() & !(PAGE_SIZE - 1);
        let mut cur = vec![0u8; crate::addr::PAGE_BYTES];
        let tls_only = base.is_some_and(|base| {
            let gpa = GuestPhysAddr(f.gpa.raw() & !(PAGE_SIZE - 1));
            let Some(orig) = original(page).filter(|o| o.len() == cur.len()) else { return false };
            if mem.read(gpa, &mut cur).is_err() || !one_page(&f.region) {
                return false;
            }
            if blake3::hash(&cur).to_hex().as_str() != f.after {
                return false; // changed since the check: judged at the next
            }
            // Where the TLS entries lie in this page (the table may start
            // in an earlier page of the region).
            let first = i128::from(base) + 8 * *GDT_TLS.start() as i128 - i128::from(page);
            let last = first + 8 * GDT_TLS.clone().count() as i128;
            let changed = orig.iter().zip(&cur).enumerate().filter(|(_, (a, b))| a != b);
            let mut any = false;
            for (i, _) in changed {
                any = true;
                if !(first..last).contains(&(i as i128)) {
                    return false;
                }
            }
            any && (first..last).step_by(8).all(|at| {
                usize::try_from(at)
                    .ok()
                    .and_then(|at| cur.get(at..at + 8))
                    .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
                    .is_some_and(user_tls_descriptor)
            })
        });
        if tls_only {
            let mut i = f.clone();
            i.severity = Severity::Info;
            i.detail = format!(
                "{}: only its 32-bit TLS entries (12-14) changed, to ring-3 segments: a task that \
                 called set_thread_area runs on this CPU",
                f.region
            );
            info.push(i);
        } else {
            keep.push(f);
        }
    }
    report.add_findings(keep);
    report.add_findings(info);
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
    region: &str,
    gva: u64,
    gpa: GuestPhysAddr,
    detail: String,
    before: String,
    after: String,
) -> Finding {
    Finding::new(region, FindingKind::Pointer, Severity::Violation, GuestVirtAddr(gva), gpa)
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
                "kaslr",
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

    // The module list first, so that addresses in modules get names.
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
                    "module-area",
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
            "module-area",
            0,
            GuestPhysAddr(0),
            format!("the module list cannot be walked: {e}"),
            String::new(),
            String::new(),
        )),
    }

    // Syscall tables.
    for (table, list, addrs) in p.syscall_tables() {
        let (Some(base), false) = (m.expect(table), list.is_empty()) else { continue };
        let Some((bytes, _)) = read_virt(mem, space, base, list.len() * 8) else {
            out.push(pointer(
                table,
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
                    table,
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

    // GDT descriptors of every vCPU.
    for cpu in regs.iter().filter(|r| r.in_long_mode()) {
        let len = (usize::try_from(cpu.gdtr_limit).unwrap_or(0) + 1).min(64 * 1024);
        let Some((gdt, gpa)) = read_virt(mem, space, cpu.gdtr_base, len) else { continue };
        for (i, why) in gdt_problems(&gdt) {
            let mut f = pointer(
                "gdt-descriptors",
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

    // IDT gates, once per distinct IDT.
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
                        "idt-vectors",
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
    out
}

/// The image layout symbols kept of the guest's kallsyms.
const LAYOUT_SYMBOLS: [&str; 4] = ["_text", "_etext", "__start_rodata", "__end_rodata"];

/// Symbols read from the guest's own kallsyms tables (in its rodata), for
/// naming addresses when no profile matches. Lower trust: the guest could
/// have forged them.
pub struct GuestSymbols {
    /// Code symbols at run-time addresses, sorted.
    code: Vec<(u64, String)>,
    /// The image's layout symbols (`_text`, `_etext`, `__start_rodata`,
    /// `__end_rodata`) that were found, at run-time addresses.
    layout: Vec<(&'static str, u64)>,
}

impl GuestSymbols {
    /// Reads the rodata region's pages (as the kernel model found them) and
    /// looks for kallsyms in them.
    pub fn read<M: GuestMemory + ?Sized>(
        mem: &M,
        rodata: &crate::integrity::RegionLayout,
    ) -> Option<Self> {
        let first = rodata.pages.first()?.gva.raw();
        let last = rodata.pages.last()?.gva.raw();
        let span = usize::try_from(last.checked_sub(first)? + PAGE_SIZE).ok()?;
        // Real rodata is about 10 MiB; the guest decides this span.
        if span > 64 << 20 {
            return None;
        }
        let mut buf = vec![0u8; span];
        for p in &rodata.pages {
            let off = usize::try_from(p.gva.raw() - first).ok()?;
            mem.read(p.gpa, &mut buf[off..off + crate::addr::PAGE_BYTES]).ok()?;
        }
        let t = super::kallsyms::find(&buf).ok()?;
        let layout = LAYOUT_SYMBOLS
            .iter()
            .filter_map(|&n| t.symbols.iter().find(|s| s.name == n).map(|s| (n, s.addr)))
            .collect();
        let mut code: Vec<(u64, String)> = t
            .symbols
            .into_iter()
            .filter(|s| matches!(s.kind, 'T' | 't'))
            .map(|s| (s.addr, s.name))
            .collect();
        code.sort();
        Some(Self { code, layout })
    }

    /// The run-time address of a layout symbol, as the guest's kallsyms say.
    pub fn layout_symbol(&self, name: &str) -> Option<u64> {
        self.layout.iter().find(|(n, _)| *n == name).map(|&(_, a)| a)
    }

    pub fn len(&self) -> usize {
        self.code.len()
    }

    pub fn is_empty(&self) -> bool {
        self.code.is_empty()
    }

    /// `symbol+0xoff (kernel text, from guest memory)` for a run-time address.
    pub fn locate(&self, gva: u64) -> Option<String> {
        let i = self.code.partition_point(|(a, _)| *a <= gva).checked_sub(1)?;
        let (addr, name) = &self.code[i];
        let off = gva - addr;
        // Past the last symbol by more than a large function: not text.
        (off < 1 << 20)
            .then(|| format!("{name}+{off:#x} (kernel text, named from guest memory: lower trust)"))
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// The GDT of a lab guest's vCPU 0 (6.1, x86-64), as read from it.
    fn linux_gdt() -> Vec<u8> {
        let entries: [u64; 16] = [
            0,
            0x00cf_9b00_0000_ffff, // KERNEL32_CS
            0x00af_9b00_0000_ffff, // KERNEL_CS
            0x00cf_9300_0000_ffff, // KERNEL_DS
            0x00cf_fb00_0000_ffff, // USER32_CS
            0x00cf_f300_0000_ffff, // USER_DS
            0x00af_fb00_0000_ffff, // USER_CS
            0,
            0x0000_8b00_3000_4087, // TSS (low), busy, base 0xfffffe0000003000
            0x0000_0000_ffff_fe00, // TSS (high)
            0,
            0,
            0,
            0,
            0,
            0x0040_f500_0000_0000, // CPUNODE
        ];
        entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }

    /// A GDT page whose TLS entries a task switch rewrote is info; any
    /// other change, or a TLS entry that is no ring-3 segment, a violation.
    #[test]
    fn tls_entries_of_a_gdt_page_may_change_and_nothing_else() {
        use crate::integrity::baseline::{Baseline, DomainId};
        use crate::integrity::{Identification, PageSpec, RegionKind, RegionLayout};
        use crate::x86::Perms;
        const GDT_VA: u64 = 0xffff_fe00_0000_1000;
        const GDT_PA: u64 = 0x3000;
        let mut ram = vec![0u8; 4 * 4096];
        ram[GDT_PA as usize..][..128].copy_from_slice(&linux_gdt());
        let page = Mapping {
            gva: GuestVirtAddr(GDT_VA),
            gpa: GuestPhysAddr(GDT_PA),
            size: 4096,
            perms: Perms { writable: true, user: false, executable: false },
        };
        struct Space(Vec<Mapping>);
        impl AddressSpace for Space {
            fn image_pages(&self) -> &[Mapping] {
                &[]
            }
            fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, crate::x86::Perms)> {
                self.0.iter().find(|m| m.gva == gva).map(|m| (m.gpa, m.perms))
            }
        }
        let space = Space(vec![page]);
        let regs = vec![VcpuRegisters {
            index: 0,
            cr0: 0x8005_0033,
            cr3: 0x1000,
            cr4: 0x0075_1eb0,
            efer: 0xd01,
            idtr_base: 0,
            idtr_limit: 0xfff,
            gdtr_base: GDT_VA,
            gdtr_limit: 0x7f,
        }];
        let regions = vec![RegionLayout {
            name: "gdt-cpu0".into(),
            kind: RegionKind::DescriptorTable,
            pages: vec![PageSpec { gva: page.gva, gpa: page.gpa, perms: page.perms }],
        }];
        let id = Identification {
            method: "test".into(),
            vcpu: 0,
            cr3: 0x1000,
            paging: "4-level".into(),
            image_base: GuestVirtAddr(GDT_VA),
            image_base_gpa: GuestPhysAddr(GDT_PA),
            text_pages: 0,
            rodata_pages: 0,
            bounds: String::new(),
        };
        let dom = DomainId { name: "g".into(), uuid: "u".into() };
        let mem = crate::memory::RawDump::from_bytes(ram.clone());
        let (b, originals) =
            Baseline::build_keeping(&mem, dom, id, regs.clone(), &space, &regions).unwrap();
        let judge = |entries: &[(usize, u64)]| {
            let mut now = ram.clone();
            for &(i, v) in entries {
                now[GDT_PA as usize + 8 * i..][..8].copy_from_slice(&v.to_le_bytes());
            }
            let mem = crate::memory::RawDump::from_bytes(now);
            let mut r = crate::integrity::check::check(&b, &mem, &space, &regs).unwrap();
            review_gdt_pages(&mut r, &mem, &b.registers, &|gva| originals.page(gva));
            (r.violations.len(), r.info.len())
        };
        let user_data = 0x00cf_f300_0000_ffffu64; // ring-3 data, as set_thread_area makes
        assert_eq!(judge(&[]), (0, 0));
        assert_eq!(judge(&[(12, user_data)]), (0, 1));
        assert_eq!(judge(&[(12, user_data), (13, user_data ^ 0x1234), (14, user_data)]), (0, 1));
        assert_eq!(judge(&[(12, 0x00cf_9300_0000_ffff)]), (1, 0), "a ring-0 segment in TLS");
        assert_eq!(
            judge(&[(12, 0x00cf_fb00_0000_ffff)]),
            (1, 0),
            "ring-3 code: never from set_thread_area"
        );
        assert_eq!(judge(&[(12, 0x00af_f300_0000_ffff)]), (1, 0), "a 64-bit (L) data segment");
        assert_eq!(judge(&[(12, 0x004f_7300_0000_ffff)]), (0, 1), "not present: seg_not_present");
        assert_eq!(judge(&[(13, 0x0000_8c00_0010_0000)]), (1, 0), "a call gate in TLS");
        assert_eq!(judge(&[(12, user_data), (6, 0)]), (1, 0), "and the user code segment");
        assert_eq!(judge(&[(15, user_data)]), (1, 0), "CPUNODE is no TLS entry");
    }

    #[test]
    fn linux_gdt_is_sane_and_tampering_is_named() {
        assert_eq!(gdt_problems(&linux_gdt()), vec![]);
        let set = |i: usize, v: u64| {
            let mut g = linux_gdt();
            g[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            g
        };
        // A call gate to ring 0 in a free slot.
        let p = gdt_problems(&set(12, 0xffff_ec00_0010_1234));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].1.contains("is a gate"), "{p:?}");
        // User code made ring 0.
        assert!(gdt_problems(&set(6, 0x00af_9b00_0000_ffff)).iter().any(|(i, _)| *i == 6));
        // Kernel code made 32-bit.
        assert!(gdt_problems(&set(2, 0x00cf_9b00_0000_ffff)).iter().any(|(i, _)| *i == 2));
        // An extra ring-0 code segment in a TLS slot.
        assert!(
            gdt_problems(&set(13, 0x00af_9b00_0000_ffff))
                .iter()
                .any(|(_, w)| w.contains("extra ring-0 code"))
        );
        // Truncated tables do not panic.
        for n in 0..linux_gdt().len() {
            let _ = gdt_problems(&linux_gdt()[..n]);
        }
    }

    /// The lab kernel's profile, for its offsets of `struct module`.
    fn lab_profile() -> Profile {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles/6.1.0-56-cloud-amd64.profile");
        Profile::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// Interrupt entry stubs: 8 bytes apart on 6.1, 16 on the 6.12 build
    /// (IBT puts an ENDBR in each); the first system vector follows from
    /// where the spurious stubs start.
    #[test]
    fn entry_stub_size_and_first_system_vector_come_from_the_profile() {
        assert_eq!(entry_stubs(&lab_profile()), (8, 0xec));
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../guest-profiles/6.12.111+deb12-cloud-amd64.profile"
        );
        let p612 = Profile::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(entry_stubs(&p612), (16, 0xeb));
    }

    /// A module's init text is its own while it loads: found through
    /// `init_layout` on 6.1 and `mem[MOD_INIT_TEXT]` on 6.12.
    #[test]
    fn module_init_text_is_found_in_either_layout_and_held_by_its_module() {
        let p61 = lab_profile();
        let text_size = p61.offset("module.init_layout.text_size").unwrap();
        assert_eq!(module_init_layout(&p61), Some((400, text_size)));
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../guest-profiles/6.12.111+deb12-cloud-amd64.profile"
        );
        let p612 = Profile::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        let (base, size) =
            (p612.offset("module.mem.base").unwrap(), p612.offset("module.mem.size").unwrap());
        assert_eq!(module_init_layout(&p612), Some((base + 4 * 72, size + 4 * 72)));
        let md = Module {
            name: "m".into(),
            addr: 0,
            base: 0xffff_ffff_c000_0000,
            size: 0x3000,
            text_size: 0x1000,
            state: MODULE_COMING,
            init: (0xffff_ffff_c000_8000, 0x1000),
        };
        assert!(md.holds(0xffff_ffff_c000_1000, 0xffff_ffff_c000_2000));
        assert!(md.holds(0xffff_ffff_c000_8000, 0xffff_ffff_c000_9000));
        assert!(!md.holds(0xffff_ffff_c000_9000, 0xffff_ffff_c000_a000));
        let live = Module { state: MODULE_LIVE, ..md.clone() };
        assert!(!live.holds(0xffff_ffff_c000_8000, 0xffff_ffff_c000_9000), "live: init is freed");
        let done = Module { init: (0, 0), ..md };
        assert!(!done.holds(0xffff_ffff_c000_8000, 0xffff_ffff_c000_9000), "init cleared");
    }

    /// Where the test's four pages of RAM are mapped.
    const W: u64 = 0xffff_8880_0100_0000;

    /// Guest RAM whose module list loses module B, and B's second page its
    /// mapping, the moment B's name is read: an unload under the walk.
    struct Unloading {
        before: crate::memory::RawDump,
        after: crate::memory::RawDump,
        b_name: GuestPhysAddr,
        unloaded: std::cell::Cell<bool>,
    }

    impl GuestMemory for Unloading {
        fn read(
            &self,
            start: GuestPhysAddr,
            buf: &mut [u8],
        ) -> Result<(), crate::memory::MemoryError> {
            let now = if self.unloaded.get() { &self.after } else { &self.before };
            now.read(start, buf)?;
            if start == self.b_name {
                self.unloaded.set(true);
            }
            Ok(())
        }
        fn layout(&self) -> &crate::memory::RamLayout {
            self.before.layout()
        }
        fn kind(&self) -> &'static str {
            "raw-dump"
        }
    }

    impl AddressSpace for Unloading {
        fn image_pages(&self) -> &[Mapping] {
            &[]
        }
        fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, crate::x86::Perms)> {
            let page = gva.raw().checked_sub(W)? / PAGE_SIZE;
            let mapped = if self.unloaded.get() { 3 } else { 4 };
            (page < mapped).then(|| {
                (
                    GuestPhysAddr(page * PAGE_SIZE),
                    crate::x86::Perms { writable: true, user: false, executable: false },
                )
            })
        }
    }

    #[test]
    fn a_module_unloaded_under_the_walk_is_not_a_broken_list() {
        let profile = lab_profile();
        let off = |k: &str| profile.offset(k).unwrap();
        let head_sym = profile.symbol("modules").unwrap().addr;
        let m = Matched {
            profile: &profile,
            modules: Vec::new(),
            slide: W.wrapping_sub(head_sym & !0xfff),
            idt_slide: None,
        };
        let head = m.expect("modules").unwrap();
        // A in page 1; B straddles pages 2 and 3: its name in 2, its layout in 3.
        let a = W + 0x1000;
        let b = W + 0x3000 - off("module.name") - MODULE_NAME_LEN as u64;
        assert!(b + off("module.core_layout.base") >= W + 0x3000, "B's layout is not in page 3");
        let mut ram = vec![0u8; 4 * 4096];
        let put = |ram: &mut Vec<u8>, gva: u64, bytes: &[u8]| {
            let at = usize::try_from(gva - W).unwrap();
            ram[at..at + bytes.len()].copy_from_slice(bytes);
        };
        put(&mut ram, head, &(a + off("module.list")).to_le_bytes());
        for (md, name, next) in [(a, "a_mod", b + off("module.list")), (b, "b_mod", head)] {
            put(&mut ram, md + off("module.name"), name.as_bytes());
            put(&mut ram, md + off("module.list"), &next.to_le_bytes());
            put(
                &mut ram,
                md + off("module.core_layout.base"),
                &0xffff_ffff_c000_0000u64.to_le_bytes(),
            );
            put(&mut ram, md + off("module.core_layout.size"), &0x1000u32.to_le_bytes());
        }
        let before = ram.clone();
        // Unloaded: A leads back to the head.
        put(&mut ram, a + off("module.list"), &head.to_le_bytes());
        let ram_after = ram;
        let fresh = || Unloading {
            before: crate::memory::RawDump::from_bytes(before.clone()),
            after: crate::memory::RawDump::from_bytes(ram_after.clone()),
            b_name: GuestPhysAddr(b - W + off("module.name")),
            unloaded: std::cell::Cell::new(false),
        };

        let g = fresh();
        let once = walk_modules(&m, &g, &g).unwrap_err();
        assert!(once.contains("base is not readable"), "{once}");
        let g = fresh();
        let names: Vec<String> =
            walk_modules_settled(&m, &g, &g).unwrap().into_iter().map(|md| md.name).collect();
        assert_eq!(names, ["a_mod"]);

        // A list that stays broken is reported after the last walk.
        let g = fresh();
        g.unloaded.set(true);
        let mut broken = ram_after.clone();
        put(&mut broken, a + off("module.list"), &(W + 0x3000 + off("module.list")).to_le_bytes());
        let g = Unloading { after: crate::memory::RawDump::from_bytes(broken), ..g };
        let e = walk_modules_settled(&m, &g, &g).unwrap_err();
        assert!(e.contains(&format!("in each of {MODULE_WALKS} walks")), "{e}");
    }

    #[test]
    fn a_module_is_still_live_only_while_its_struct_says_so() {
        let profile = lab_profile();
        let off = |k: &str| profile.offset(k).unwrap();
        let m = Matched {
            profile: &profile,
            modules: Vec::new(),
            slide: W.wrapping_sub(profile.symbol("modules").unwrap().addr & !0xfff),
            idt_slide: None,
        };
        let md = Module {
            name: "a_mod".into(),
            addr: W + 0x1000,
            base: 0xffff_ffff_c000_0000,
            size: 0x1000,
            text_size: 0x1000,
            state: MODULE_LIVE,
            init: (0, 0),
        };
        let with = |state: u32, name: &str, base: u64| {
            let mut ram = vec![0u8; 4 * 4096];
            let mut put = |at: u64, b: &[u8]| {
                let i = usize::try_from(md.addr - W + at).unwrap();
                ram[i..i + b.len()].copy_from_slice(b);
            };
            put(off("module.state"), &state.to_le_bytes());
            put(off("module.name"), name.as_bytes());
            put(off("module.core_layout.base"), &base.to_le_bytes());
            let g = Unloading {
                before: crate::memory::RawDump::from_bytes(ram.clone()),
                after: crate::memory::RawDump::from_bytes(ram),
                b_name: GuestPhysAddr(u64::MAX),
                unloaded: std::cell::Cell::new(false),
            };
            still_live(&m, &g, &g, &md)
        };
        assert!(with(MODULE_LIVE, "a_mod", md.base));
        assert!(!with(2, "a_mod", md.base), "going");
        assert!(!with(1, "a_mod", md.base), "coming: loaded again, not yet live");
        assert!(!with(MODULE_LIVE, "b_mod", md.base), "another module");
        assert!(!with(MODULE_LIVE, "a_mod_x", md.base), "a longer name");
        assert!(!with(MODULE_LIVE, "a_mod", md.base + 0x1000), "another base");
        let gone = Module { addr: W + 0x5000, ..md.clone() };
        let g = Unloading {
            before: crate::memory::RawDump::from_bytes(vec![0; 4 * 4096]),
            after: crate::memory::RawDump::from_bytes(vec![0; 4 * 4096]),
            b_name: GuestPhysAddr(u64::MAX),
            unloaded: std::cell::Cell::new(false),
        };
        assert!(!still_live(&m, &g, &g, &gone), "freed: its struct unmapped");
    }

    #[test]
    fn gates_decode() {
        let mut g = [0u8; 16];
        let addr = 0xffff_ffff_81c0_09b0u64;
        g[0..2].copy_from_slice(&(addr as u16).to_le_bytes());
        g[6..8].copy_from_slice(&((addr >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((addr >> 32) as u32).to_le_bytes());
        assert_eq!(gate_target(&g), None, "not present");
        g[5] = 0x8e;
        assert_eq!(gate_target(&g), Some(addr));
    }
}
