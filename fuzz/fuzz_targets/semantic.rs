//! The semantic checks over guest memory the input fills, with the lab
//! kernel's profile: the KASLR slide from IDT vector 0, the module list and
//! hidden-module search, every syscall table entry and IDT gate. The input's
//! 16 pages are mapped where those live: eight at the module list head, two
//! at the syscall table, one at the IDT (the vCPU's IDTR). The pass ends
//! and its findings are bounded by what it looks at.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use vigil::addr::{GuestPhysAddr, GuestVirtAddr};
use vigil::integrity::AddressSpace;
use vigil::linux::profile::Profile;
use vigil::linux::semantic::{Matched, check};
use vigil::memory::RawDump;
use vigil::x86::VcpuRegisters;
use vigil::x86::{Mapping, Perms};

const PAGE: u64 = 4096;
const PAGES: usize = 16;
/// Where the module list head's page and the seven after it are mapped.
const LIST: u64 = 0xffff_8880_0100_0000;
/// Where the IDT is (cpu_entry_area, as Linux places it).
const IDT: u64 = 0xffff_fe00_0000_0000;

static PROFILE: LazyLock<Profile> = LazyLock::new(|| {
    let path =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles/6.1.0-56-cloud-amd64.profile");
    Profile::parse(&std::fs::read_to_string(path).expect("the lab profile")).expect("it parses")
});

/// Virtual page -> RAM page, for the few pages mapped.
struct Pages(Vec<(u64, u64)>);

impl AddressSpace for Pages {
    fn image_pages(&self) -> &[Mapping] {
        &[]
    }
    fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, Perms)> {
        let page = gva.raw() & !(PAGE - 1);
        let &(_, ram) = self.0.iter().find(|&&(va, _)| va == page)?;
        let rw = Perms { writable: true, user: false, executable: false };
        Some((GuestPhysAddr(ram * PAGE + (gva.raw() & (PAGE - 1))), rw))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut ram = vec![0u8; PAGES * PAGE as usize];
    let n = data.len().min(ram.len());
    ram[..n].copy_from_slice(&data[..n]);
    let mem = RawDump::from_bytes(ram);
    let profile = &*PROFILE;
    let sym = |name: &str| profile.symbol(name).expect("the lab profile names it").addr;
    // Page-aligned, as KASLR's: the list head keeps its offset in its page.
    let slide = LIST.wrapping_sub(sym("modules") & !(PAGE - 1));
    let table = sym("sys_call_table").wrapping_add(slide) & !(PAGE - 1);
    let mut map: Vec<(u64, u64)> = (0..8).map(|i| (LIST + i * PAGE, i)).collect();
    map.extend([(table, 8), (table + PAGE, 9), (IDT, 10)]);
    let space = Pages(map);
    let regs = [VcpuRegisters {
        index: 0,
        cr0: 0x8005_0033,
        cr3: 0,
        cr4: 0x0075_0ef0,
        efer: 0xd01,
        idtr_base: IDT,
        idtr_limit: 0xfff,
        gdtr_base: 0,
        gdtr_limit: 0x7f,
    }];
    let mut m = Matched { profile, modules: Vec::new(), slide, idt_slide: None, reads: Default::default() };
    let findings = check(&mut m, &mem, &space, &regs, &[], None);
    // At most one a syscall, one a gate, the slide, the module list, and
    // whatever the two tables' pages add in unreadable-entry reports.
    let bound = profile.syscall_tables().iter().map(|t| t.1.len()).sum::<usize>() + 256 + 64;
    assert!(findings.len() <= bound, "{} findings (bound {bound})", findings.len());
    assert!(m.modules.len() <= 4096);
});
