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
        data: (0, 0),
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
    fn read(&self, start: GuestPhysAddr, buf: &mut [u8]) -> Result<(), crate::memory::MemoryError> {
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
        reads: Default::default(),
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
        put(&mut ram, md + off("module.core_layout.base"), &0xffff_ffff_c000_0000u64.to_le_bytes());
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
        reads: Default::default(),
    };
    let md = Module {
        name: "a_mod".into(),
        addr: W + 0x1000,
        base: 0xffff_ffff_c000_0000,
        size: 0x1000,
        text_size: 0x1000,
        state: MODULE_LIVE,
        init: (0, 0),
        data: (0, 0),
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

/// What the watch holds from check to check is counted against the
/// domain's budget first; the reads share the rest, and a refusal says
/// both.
#[test]
fn what_the_watch_holds_is_counted_before_the_reads() {
    let b = ReadBudget::new(10 << 20).holding(8 << 20);
    assert_eq!(b.held(), 8 << 20);
    assert!(b.take(1 << 20, "table 1").is_ok());
    let e = b.take(2 << 20, "table 2").unwrap_err();
    assert!(e.starts_with("table 2:") && e.contains("limits.guest_memory"), "{e}");
    assert!(
        e.contains(&format!("{} bytes held by this reading, {} across checks", 1 << 20, 8 << 20)),
        "{e}"
    );
    assert_eq!(b.refused().as_deref(), Some(e.as_str()));
    // Held past the budget already: nothing is read.
    assert!(ReadBudget::new(10 << 20).holding(11 << 20).take(1, "table").is_err());
    assert!(ReadBudget::new(10 << 20).take(10 << 20, "table").is_ok());
}

/// The guest's banner is found across a page boundary, cut at the first
/// byte that is not printable and at 256 bytes, and absent when the guest
/// wrote none, or made it run on to the region's end, or when a page
/// cannot be read: guest data, bounded and never trusted for a verdict.
#[test]
fn the_guest_banner_is_bounded_and_found_across_pages() {
    use crate::integrity::{PageSpec, RegionKind, RegionLayout};
    use crate::x86::Perms;
    let region = |pages: u64| RegionLayout {
        name: "kernel-rodata".into(),
        kind: RegionKind::ReadOnlyData,
        pages: (0..pages)
            .map(|i| PageSpec {
                gva: GuestVirtAddr(0xffff_ffff_8200_0000 + i * 4096),
                gpa: GuestPhysAddr(i * 4096),
                perms: Perms { writable: false, user: false, executable: false },
            })
            .collect(),
    };
    let with = |at: usize, text: &[u8]| {
        let mut ram = vec![0u8; 3 * 4096];
        ram[at..at + text.len()].copy_from_slice(text);
        crate::memory::RawDump::from_bytes(ram)
    };
    let line = b"Linux version 6.1.0-56-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\n";
    // Across the first page boundary.
    let mem = with(4096 - 20, line);
    let got = guest_banner(&mem, &region(3)).unwrap();
    assert_eq!(got.as_bytes(), &line[..line.len() - 1]);
    // None at all.
    assert_eq!(guest_banner(&with(0, b"nothing here"), &region(3)), None);
    // Cut at 256 bytes, and at a byte that is not printable.
    let mut long = b"Linux version ".to_vec();
    long.extend(std::iter::repeat_n(b'x', 1000));
    assert_eq!(guest_banner(&with(100, &long), &region(3)).unwrap().len(), 256);
    let got = guest_banner(&with(100, b"Linux version 6.1\x01\xffrest"), &region(3)).unwrap();
    assert_eq!(got, "Linux version 6.1");
    // Running on to the region's end: no line is made up.
    let mut tail = vec![0u8; 3 * 4096];
    tail[3 * 4096 - 30..].copy_from_slice(&long[..30]);
    let mem = crate::memory::RawDump::from_bytes(tail);
    assert_eq!(guest_banner(&mem, &region(3)), None);
    // A page past the guest's RAM: nothing, not a panic.
    assert_eq!(guest_banner(&with(0, b""), &region(5)), None);
}
