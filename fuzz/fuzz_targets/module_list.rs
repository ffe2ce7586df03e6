//! The guest's module list, walked as vigil walks it, over 64 KiB of RAM the
//! input fills, mapped at a fixed kernel address, with the lab kernel's
//! profile (its BTF offsets of `struct module`) and the list head placed in
//! that RAM: the walk ends, within its bound, and every module it returns
//! lies in the RAM and has a printable name.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use vigil::addr::{GuestPhysAddr, GuestVirtAddr};
use vigil::integrity::AddressSpace;
use vigil::linux::profile::Profile;
use vigil::linux::semantic::{Matched, walk_modules};
use vigil::memory::RawDump;
use vigil::x86::{Mapping, Perms};

/// Where the input's RAM is mapped, and how long it is.
const WINDOW: u64 = 0xffff_8880_0100_0000;
const RAM: usize = 64 << 10;

static PROFILE: LazyLock<Profile> = LazyLock::new(|| {
    let path =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles/6.1.0-56-cloud-amd64.profile");
    Profile::parse(&std::fs::read_to_string(path).expect("the lab profile")).expect("it parses")
});

/// The RAM at `WINDOW`, read-write, nothing else mapped.
struct Window;

impl AddressSpace for Window {
    fn image_pages(&self) -> &[Mapping] {
        &[]
    }
    fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, Perms)> {
        let off = gva.raw().checked_sub(WINDOW).filter(|&o| o < RAM as u64)?;
        Some((GuestPhysAddr(off), Perms { writable: true, user: false, executable: false }))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut ram = vec![0u8; RAM];
    let n = data.len().min(RAM);
    ram[..n].copy_from_slice(&data[..n]);
    let mem = RawDump::from_bytes(ram);
    let profile = &*PROFILE;
    let modules = profile.symbol("modules").expect("the profile names the list head").addr;
    let m = Matched {
        profile,
        modules: Vec::new(),
        // Page-aligned, as KASLR's: the head keeps its offset in its page.
        slide: WINDOW.wrapping_sub(modules & !0xfff),
        idt_slide: None,
        reads: Default::default(),
    };
    let Ok(list) = walk_modules(&m, &mem, &Window) else { return };
    assert!(list.len() <= 4096, "{} modules", list.len());
    for md in &list {
        assert!((WINDOW..WINDOW + RAM as u64).contains(&md.addr), "{md:?} outside the RAM");
        assert!(!md.name.is_empty() && md.name.bytes().all(|c| c.is_ascii_graphic()), "{md:?}");
    }
});
