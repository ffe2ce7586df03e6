//! Kernel discovery by page permissions.
//!
//! x86-64 Linux maps its image at `__START_KERNEL_map` (0xffffffff80000000),
//! shifted by the KASLR slide, inside the 1 GiB below the module area. With
//! strict kernel RWX, code is read-only and executable, rodata (and
//! `__ro_after_init`) read-only and not executable, the rest writable and not
//! executable. Walking that gigabyte from CR3 and sorting its pages by
//! permission finds the kernel's text and rodata with no symbols at all. The
//! IDT and each vCPU's GDT are found through IDTR and GDTR.

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use crate::integrity::{AddressSpace, Identification, PageSpec, RegionKind, RegionLayout};
use crate::memory::GuestMemory;
use crate::x86::VcpuRegisters;
use crate::x86::{Mapping, PagingMode, Perms, WalkError, Walker};

/// Start of the kernel image mapping.
pub const IMAGE_START: GuestVirtAddr = GuestVirtAddr(0xffff_ffff_8000_0000);
/// End of the kernel image mapping (start of the module area).
pub const IMAGE_END: GuestVirtAddr = GuestVirtAddr(0xffff_ffff_c000_0000);

use super::region::Region;
use crate::x86::EFER_NXE;
/// With page-table isolation the user half of a PGD pair is the kernel's plus
/// one page; CR3 may hold either while a vCPU runs user code.
const PTI_USER_PGD_BIT: u64 = 1 << 12;
/// The top-level table's address in CR3 (below: PCID or cache flags; bit 63:
/// no-flush).
const CR3_TABLE: u64 = 0x000f_ffff_ffff_f000;
/// Descriptor tables bigger than this are not believed.
const MAX_TABLE_BYTES: u64 = 64 * 1024;

/// Why the kernel could not be found.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error(
        "no vCPU is in 64-bit mode with paging on: the guest is not (yet) running a 64-bit kernel"
    )]
    NoLongModeCpu,
    #[error("walking the kernel image mapping from CR3 {cr3:#x} failed")]
    Walk {
        cr3: u64,
        #[source]
        source: WalkError,
    },
    #[error(
        "kernel not found: no read-only executable pages between {IMAGE_START} and {IMAGE_END} (CR3 {cr3:#x}); \
         is this a Linux guest with strict kernel RWX?"
    )]
    NoText { cr3: u64 },
    #[error("guest memory cannot be read at the page-table root {cr3:#x} (is QEMU's RAM gone?)")]
    Unreadable {
        cr3: u64,
        #[source]
        source: crate::memory::MemoryError,
    },
    #[error("{table} of vCPU {vcpu} at {base} is not mapped")]
    TableUnmapped { table: &'static str, vcpu: u32, base: GuestVirtAddr },
    #[error("{table} of vCPU {vcpu} has an implausible limit {limit:#x}")]
    TableLimit { table: &'static str, vcpu: u32, limit: u32 },
}

/// A guest kernel as found in memory.
pub struct KernelView<'m, M: GuestMemory + ?Sized> {
    pub identification: Identification,
    pub registers: Vec<VcpuRegisters>,
    /// Every leaf mapping of the kernel image range, 4 KiB granular.
    pub image_pages: Vec<Mapping>,
    pub regions: Vec<RegionLayout>,
    /// Table pointers of the image range that led outside RAM.
    pub unreadable_tables: Vec<(GuestVirtAddr, GuestPhysAddr)>,
    walker: Walker<'m, M>,
    /// Where the last translation was found in `image_pages`: callers
    /// mostly translate pages in address order, so the next one is close.
    hint: std::cell::Cell<usize>,
}

impl<M: GuestMemory + ?Sized> AddressSpace for KernelView<'_, M> {
    fn image_pages(&self) -> &[Mapping] {
        &self.image_pages
    }

    fn exec_outside_image(&self) -> Vec<Mapping> {
        let area = super::semantic::MODULES;
        split_pages(&self.mappings_in(GuestVirtAddr(area.start), GuestVirtAddr(area.end)))
            .into_iter()
            .filter(|m| m.perms.executable && !m.perms.user)
            .collect()
    }

    fn mappings_in(&self, start: GuestVirtAddr, end: GuestVirtAddr) -> Vec<Mapping> {
        self.walker.mappings(start, end).map(|s| s.mappings).unwrap_or_default()
    }

    fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, Perms)> {
        // `image_pages` is in address order: the page after the last one
        // found, else a binary search; no hashing.
        let va = gva.raw();
        let h = self.hint.get();
        let near = [h, h + 1]
            .into_iter()
            .find(|&i| self.image_pages.get(i).is_some_and(|m| m.gva.raw() == va));
        if let Some(i) =
            near.or_else(|| self.image_pages.binary_search_by_key(&va, |m| m.gva.raw()).ok())
        {
            self.hint.set(i);
            let m = &self.image_pages[i];
            return Some((m.gpa, m.perms));
        }
        if (IMAGE_START..IMAGE_END).contains(&gva) {
            return None; // the image was enumerated whole
        }
        self.walker.translate(gva).ok().map(|t| (t.gpa, t.perms))
    }
}

/// Splits leaf mappings into 4 KiB pages.
fn split_pages(mappings: &[Mapping]) -> Vec<Mapping> {
    // Reserved up front, up to a million pages (more still fits, slower).
    let pages = mappings.iter().fold(0u64, |n, m| n.saturating_add(m.size / PAGE_SIZE));
    let mut out = Vec::with_capacity(usize::try_from(pages.min(1 << 20)).unwrap_or(0));
    for m in mappings {
        for off in (0..m.size).step_by(crate::addr::PAGE_BYTES) {
            // Both sides stay inside the leaf the walker returned (aligned, in range).
            out.push(Mapping {
                gva: GuestVirtAddr(m.gva.raw() + off),
                gpa: GuestPhysAddr(m.gpa.raw() + off),
                size: PAGE_SIZE,
                perms: m.perms,
            });
        }
    }
    out
}

/// Table pointers that led outside RAM: (first VA covered, table address).
type Unreadable = Vec<(GuestVirtAddr, GuestPhysAddr)>;

fn walk_image<M: GuestMemory + ?Sized>(
    walker: &Walker<'_, M>,
    cr3: u64,
) -> Result<(Vec<Mapping>, Unreadable), DiscoverError> {
    let set = walker
        .mappings(IMAGE_START, IMAGE_END)
        .map_err(|source| DiscoverError::Walk { cr3, source })?;
    Ok((split_pages(&set.mappings), set.unreadable_tables))
}

fn is_text(p: &Perms) -> bool {
    !p.writable && p.executable && !p.user
}

fn is_rodata(p: &Perms) -> bool {
    !p.writable && !p.executable && !p.user
}

/// Finds the kernel of a guest from its vCPU registers.
pub fn discover<'m, M: GuestMemory + ?Sized>(
    mem: &'m M,
    registers: &[VcpuRegisters],
) -> Result<KernelView<'m, M>, DiscoverError> {
    let cpu = registers.iter().find(|r| r.in_long_mode()).ok_or(DiscoverError::NoLongModeCpu)?;
    let mode = PagingMode::from_cr4(cpu.cr4);
    let nxe = cpu.efer & EFER_NXE != 0;

    // Walk the CR3 as given and, in case it is PTI's user half, its kernel twin;
    // keep whichever maps more kernel code.
    // Each walker reads its root table once (see `Walker::pinned`): the CR3
    // may be that of a process freed under the check.
    let mut best: Option<(u64, Vec<Mapping>, Unreadable, Walker<'m, M>)> = None;
    let mut last_err = None;
    let table = cpu.cr3 & CR3_TABLE;
    for cr3 in [table, table & !PTI_USER_PGD_BIT] {
        if best.as_ref().is_some_and(|b| b.0 == cr3) {
            continue;
        }
        let walked = Walker::new(mem, mode, cr3, nxe)
            .pinned()
            .map_err(|source| DiscoverError::Walk { cr3, source })
            .and_then(|w| walk_image(&w, cr3).map(|r| (r, w)));
        match walked {
            Ok(((pages, bad), walker)) => {
                let text = pages.iter().filter(|p| is_text(&p.perms)).count();
                if best
                    .as_ref()
                    .is_none_or(|b| b.1.iter().filter(|p| is_text(&p.perms)).count() < text)
                {
                    best = Some((cr3, pages, bad, walker));
                }
            }
            Err(e) => last_err = Some(e),
        }
    }
    // No kernel text, and not even the root table reads: the memory is what
    // failed, not the kernel (QEMU killed, its mapping gone).
    let root_unreadable = || {
        let mut probe = [0u8; 8];
        mem.read(crate::addr::GuestPhysAddr(table), &mut probe)
            .err()
            .map(|source| DiscoverError::Unreadable { cr3: table, source })
    };
    let Some((cr3, mut image_pages, unreadable_tables, walker)) = best else {
        return Err(root_unreadable()
            .or(last_err)
            .unwrap_or(DiscoverError::NoText { cr3: cpu.cr3 }));
    };
    // The walk yields address order already; `translate` relies on it.
    image_pages.sort_by_key(|m| m.gva.raw());
    let spec = |m: &Mapping| PageSpec { gva: m.gva, gpa: m.gpa, perms: m.perms };
    let text: Vec<PageSpec> = image_pages.iter().filter(|m| is_text(&m.perms)).map(spec).collect();
    let rodata: Vec<PageSpec> =
        image_pages.iter().filter(|m| is_rodata(&m.perms)).map(spec).collect();
    if text.is_empty() {
        return Err(root_unreadable().unwrap_or(DiscoverError::NoText { cr3 }));
    }
    let first = image_pages[0];
    let identification = Identification {
        method: "wx-page-walk".into(),
        vcpu: cpu.index,
        cr3,
        paging: format!("{}-level", mode.levels),
        image_base: first.gva,
        image_base_gpa: first.gpa,
        text_pages: text.len() as u64,
        rodata_pages: rodata.len() as u64,
        bounds: String::new(),
    };
    let mut regions = vec![
        RegionLayout { name: Region::Text.to_string(), kind: RegionKind::Code, pages: text },
        RegionLayout {
            name: Region::Rodata.to_string(),
            kind: RegionKind::ReadOnlyData,
            pages: rodata,
        },
    ];

    let mut idt_bases: Vec<u64> = Vec::new();
    for r in registers.iter().filter(|r| r.in_long_mode()) {
        if !idt_bases.contains(&r.idtr_base) {
            let cpu = (!idt_bases.is_empty()).then_some(r.index);
            let name = Region::Idt { cpu }.to_string();
            idt_bases.push(r.idtr_base);
            regions.push(table_region(&walker, name, "IDT", r.index, r.idtr_base, r.idtr_limit)?);
        }
        regions.push(table_region(
            &walker,
            Region::Gdt { cpu: r.index }.to_string(),
            "GDT",
            r.index,
            r.gdtr_base,
            r.gdtr_limit,
        )?);
    }

    Ok(KernelView {
        identification,
        registers: registers.to_vec(),
        image_pages,
        regions,
        unreadable_tables,
        walker,
        hint: std::cell::Cell::new(0),
    })
}

/// The whole pages holding a descriptor table of `limit + 1` bytes at `base`.
fn table_region<M: GuestMemory + ?Sized>(
    walker: &Walker<'_, M>,
    name: String,
    table: &'static str,
    vcpu: u32,
    base: u64,
    limit: u32,
) -> Result<RegionLayout, DiscoverError> {
    let len = u64::from(limit) + 1;
    if len > MAX_TABLE_BYTES {
        return Err(DiscoverError::TableLimit { table, vcpu, limit });
    }
    let unmapped = || DiscoverError::TableUnmapped { table, vcpu, base: GuestVirtAddr(base) };
    let start = GuestVirtAddr(base).page_floor();
    let end = base.checked_add(len).ok_or_else(unmapped)?;
    let mut pages = Vec::new();
    let mut va = start.raw();
    while va < end {
        let t = walker.translate(GuestVirtAddr(va)).map_err(|_| unmapped())?;
        pages.push(PageSpec { gva: GuestVirtAddr(va), gpa: t.gpa.page_floor(), perms: t.perms });
        va = va.checked_add(PAGE_SIZE).ok_or_else(unmapped)?;
    }
    Ok(RegionLayout { name, kind: RegionKind::DescriptorTable, pages })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RawDump;
    use crate::x86::builder::{Builder, Flags};

    /// Why the walk budget is not an operator's setting: the two ranges vigil
    /// walks (the image mapping, 1 GiB, and the module area, 1008 MiB) fit
    /// in the default budget even when every entry of every table is present
    /// and 4 KiB-mapped, with every table aliased so the walk visits each
    /// entry's subtree again (515 tables, 262,144 leaves at most). So
    /// `limit_walk_*` can only be a bug's symptom, never a real guest's.
    #[test]
    fn the_default_walk_budget_holds_the_worst_page_tables_of_the_ranges_walked() {
        let mut mem = vec![0u8; 6 * 4096];
        for (table, next) in [(1u64, 2u64), (2, 3), (3, 4), (4, 5)] {
            for i in 0..512 {
                let at = usize::try_from(table * 4096).unwrap() + i * 8;
                mem[at..at + 8].copy_from_slice(&((next * 4096) | 0x3).to_le_bytes());
            }
        }
        let dump = RawDump::from_bytes(mem);
        let walker = Walker::new(&dump, PagingMode::FOUR_LEVEL, 0x1000, true);
        for (start, end) in [
            (IMAGE_START, IMAGE_END),
            (
                GuestVirtAddr(super::super::semantic::MODULES.start),
                GuestVirtAddr(super::super::semantic::MODULES.end),
            ),
        ] {
            let set = walker.mappings(start, end).unwrap_or_else(|e| panic!("{start}..{end}: {e}"));
            let pages = (end.raw() - start.raw()) / 4096;
            assert_eq!(set.mappings.iter().map(|m| m.size / 4096).sum::<u64>(), pages);
        }
    }

    const KTEXT: u64 = 0xffff_ffff_9a00_0000;
    const CEA_IDT: u64 = 0xffff_fe00_0000_0000;
    const CEA_GDT: u64 = 0xffff_fe00_0000_1000;

    /// A guest laid out like x86-64 Linux: 2 MiB of text, rodata and data in
    /// the image mapping, IDT and GDT in the CPU entry area.
    fn guest(pti_user_cr3: bool, levels: u32) -> (RawDump, VcpuRegisters, u64) {
        let mut b = Builder::new(levels, 64 << 20);
        let user_pgd = b.alloc_empty_table();
        b.map(KTEXT, 0x100_0000, 2 << 20, Flags::TEXT);
        b.map(KTEXT + (2 << 20), 0x120_0000, 5 * 4096, Flags::RODATA);
        b.map(KTEXT + (2 << 20) + 5 * 4096, 0x120_5000, 3 * 4096, Flags::DATA);
        b.map(CEA_IDT, 0x120_5000, 4096, Flags::RODATA); // the IDT page aliases a data page
        b.map(CEA_GDT, 0x130_0000, 4096, Flags::RODATA);
        let cr3 = if pti_user_cr3 { user_pgd | 0x805 } else { b.root() };
        let regs = VcpuRegisters {
            index: 0,
            cr0: 0x8005_0033,
            cr3,
            // The lab guest's CR4, with LA57 (bit 12) as `levels` says.
            cr4: if levels == 5 { 0x0075_1eb0 } else { 0x0075_0eb0 },
            efer: 0xd01,
            idtr_base: CEA_IDT,
            idtr_limit: 0xfff,
            gdtr_base: CEA_GDT,
            gdtr_limit: 0x7f,
        };
        (RawDump::from_bytes(b.memory().to_vec()), regs, b.root())
    }

    #[test]
    fn finds_text_rodata_and_descriptor_tables_by_permission() {
        for levels in [4, 5] {
            finds_kernel_with(levels);
        }
    }

    fn finds_kernel_with(levels: u32) {
        let (mem, regs, root) = guest(false, levels);
        let v = discover(&mem, &[regs]).unwrap();
        assert_eq!(v.identification.paging, format!("{levels}-level"));
        let names: Vec<_> = v.regions.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["kernel-text", "kernel-rodata", "idt", "gdt-cpu0"]);
        assert_eq!(v.regions[0].pages.len(), 512, "a 2 MiB text page is 512 pages");
        assert_eq!(v.regions[0].pages[1].gpa, GuestPhysAddr(0x100_1000));
        assert_eq!(v.regions[1].pages.len(), 5);
        assert_eq!(v.regions[2].pages[0].gpa, GuestPhysAddr(0x120_5000));
        assert_eq!(v.regions[3].pages[0].gpa, GuestPhysAddr(0x130_0000));
        assert_eq!(v.image_pages.len(), 512 + 5 + 3, "data pages are part of the mapping");
        assert_eq!(v.identification.image_base, GuestVirtAddr(KTEXT));
        assert_eq!(v.identification.cr3, root);
        assert_eq!(v.translate(GuestVirtAddr(CEA_GDT)).unwrap().0, GuestPhysAddr(0x130_0000));
        assert!(v.translate(GuestVirtAddr(KTEXT + (16 << 20))).is_none());
    }

    #[test]
    fn pti_user_cr3_leads_to_the_kernel_page_tables() {
        let (mem, regs, root) = guest(true, 4);
        let v = discover(&mem, &[regs]).unwrap();
        assert_eq!(v.identification.cr3, root & !0xfff);
        assert_eq!(v.regions[0].pages.len(), 512);
    }

    /// Memory that cannot be read at all (QEMU's RAM mapping gone) is said
    /// to be that, not a missing kernel.
    #[test]
    fn unreadable_memory_is_not_a_missing_kernel() {
        use crate::memory::faults::{FaultPlan, Faults, Faulty};
        let (mem, regs, _) = guest(false, 4);
        let plan = FaultPlan::default();
        let faulty = Faulty::new(mem, plan.clone());
        assert!(discover(&faulty, &[regs]).is_ok());
        *plan.lock().unwrap() = Faults { gone: true, ..Faults::default() };
        let e = discover(&faulty, &[regs]).err().expect("no kernel in memory that cannot be read");
        assert!(matches!(e, DiscoverError::Unreadable { .. }), "{e}");
    }

    #[test]
    fn refuses_what_is_not_a_running_kernel() {
        let (mem, regs, _) = guest(false, 4);
        let real_mode = VcpuRegisters { cr0: 0x11, efer: 0, ..regs };
        assert!(matches!(discover(&mem, &[real_mode]), Err(DiscoverError::NoLongModeCpu)));
        let huge_idt = VcpuRegisters { idtr_limit: 0x10_0000, ..regs };
        assert!(matches!(discover(&mem, &[huge_idt]), Err(DiscoverError::TableLimit { .. })));
        let stray_gdt = VcpuRegisters { gdtr_base: 0xffff_fe00_0010_0000, ..regs };
        assert!(matches!(
            discover(&mem, &[stray_gdt]),
            Err(DiscoverError::TableUnmapped { table: "GDT", .. })
        ));
        let wrapping = VcpuRegisters { idtr_base: u64::MAX - 10, ..regs };
        assert!(discover(&mem, &[wrapping]).is_err());
        let empty = VcpuRegisters { cr3: 0x20_0000, ..regs }; // an all-zero table
        assert!(matches!(discover(&mem, &[empty]), Err(DiscoverError::NoText { .. })));
        let outside = VcpuRegisters { cr3: 0x40_0000_0000, ..regs };
        assert!(discover(&mem, &[outside]).is_err());
    }
}
