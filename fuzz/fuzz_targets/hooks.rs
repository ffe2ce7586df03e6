//! The hook inventory read from guest memory the input fills, with the lab
//! kernel's profile (slide 0), and the policy's verdicts. The input's 16
//! pages are mapped where the lists start and where records may lie (see
//! [`LAYOUT`]), one listed module `rk` among them: ftrace's ops list, the
//! kprobe table, the die notifier chain, BPF's kallsyms, ftrace's callers,
//! and the module's text, data and an unowned module-area page. Two fixed
//! pages follow the input: zeros, where BPF's trampoline table and the
//! kernel's tracepoints lie (none has probes), and the page of
//! `direct_functions`, which points at zeros (an empty hash). The read
//! ends, and hooks and findings are bounded.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use vigil::addr::{GuestPhysAddr, GuestVirtAddr};
use vigil::integrity::AddressSpace;
use vigil::linux::hooks::{HookPolicy, Inventory};
use vigil::linux::profile::Profile;
use vigil::linux::semantic::{Matched, Module};
use vigil::memory::RawDump;
use vigil::x86::{Mapping, Perms};

const PAGE: u64 = 4096;
const PAGES: usize = 16;
/// The module's base: its text page, then data pages.
const BASE: u64 = 0xffff_ffff_c010_0000;

static PROFILE: LazyLock<Profile> = LazyLock::new(|| {
    let path =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles/6.1.0-56-cloud-amd64.profile");
    Profile::parse(&std::fs::read_to_string(path).expect("the lab profile")).expect("it parses")
});

/// Virtual page of each input page, in order.
static LAYOUT: LazyLock<Vec<u64>> = LazyLock::new(|| {
    let sym = |n: &str| PROFILE.symbol(n).expect("the lab profile names it").addr & !(PAGE - 1);
    let mut pages = vec![
        sym("ftrace_ops_list"),
        sym("kprobe_table"),
        sym("kprobe_table") + PAGE,
        sym("die_chain"),
        sym("bpf_kallsyms"),
        sym("ftrace_caller"),
    ];
    // The module's text, data, and pages past it no module owns.
    pages.extend((0..10).map(|i| BASE + i * PAGE));
    assert_eq!(pages.len(), PAGES);
    pages
});

/// Virtual pages of the zero page: BPF's trampoline table and the span of
/// the kernel's tracepoints.
static ZEROS: LazyLock<Vec<u64>> = LazyLock::new(|| {
    let sym = |n: &str| PROFILE.symbol(n).expect("the lab profile names it").addr;
    let table = sym("trampoline_table") & !(PAGE - 1);
    let mut pages: Vec<u64> = (0..3).map(|i| table + i * PAGE).collect();
    let tps = PROFILE.symbols().iter().filter(|s| s.name.starts_with("__tracepoint_"));
    let (lo, hi) = tps.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s.addr), hi.max(s.addr)));
    pages.extend((lo & !(PAGE - 1)..=hi + PAGE).step_by(PAGE as usize));
    pages
});

/// The page of `direct_functions`, and its content.
static DIRECT: LazyLock<(u64, Vec<u8>)> = LazyLock::new(|| {
    let at = PROFILE.symbol("direct_functions").expect("the lab profile names it").addr;
    let mut page = vec![0u8; PAGE as usize];
    let off = (at % PAGE) as usize;
    page[off..off + 8].copy_from_slice(&ZEROS[0].to_le_bytes());
    (at & !(PAGE - 1), page)
});

struct Pages;

impl AddressSpace for Pages {
    fn image_pages(&self) -> &[Mapping] {
        &[]
    }
    fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, Perms)> {
        let page = gva.raw() & !(PAGE - 1);
        let i = match LAYOUT.iter().position(|&p| p == page) {
            Some(i) => i as u64,
            None if page == DIRECT.0 => PAGES as u64 + 1,
            None if ZEROS.contains(&page) => PAGES as u64,
            None => return None,
        };
        let rw = Perms { writable: true, user: false, executable: false };
        Some((GuestPhysAddr(i * PAGE), rw))
    }
}

fuzz_target!(|data: &[u8]| {
    let mut ram = vec![0u8; (PAGES + 2) * PAGE as usize];
    let n = data.len().min(PAGES * PAGE as usize);
    ram[..n].copy_from_slice(&data[..n]);
    ram[(PAGES + 1) * PAGE as usize..].copy_from_slice(&DIRECT.1);
    let mem = RawDump::from_bytes(ram);
    let rk = Module {
        name: "rk".into(),
        addr: BASE + 0x2800,
        base: BASE,
        size: 0x1000,
        text_size: 0x1000,
        state: 0,
        init: (0, 0),
        data: (BASE + 0x2000, 0x1000),
    };
    let m = Matched { profile: &PROFILE, modules: vec![rk], slide: 0, idt_slide: None, reads: Default::default() };
    let inv = Inventory::read(&m, &mem, &Pages);
    // Each hook list is bounded by 4096 records (ftrace ops, kprobes, die
    // notifiers, BPF trampolines, direct calls) and the tracepoints by the
    // profile's, BPF's kallsyms by the list walk's 16384; one unread
    // report a list.
    assert!(inv.hooks.len() <= 5 * 4096 + 8192, "{} hooks", inv.hooks.len());
    assert!(inv.bpf.len() <= 1 << 14, "{} BPF images", inv.bpf.len());
    assert!(inv.unread.len() <= 7);
    let policy = HookPolicy { allow: vec!["rk".parse().expect("a module name")] };
    let found = policy.judge(&inv);
    assert!(found.len() <= inv.hooks.len());
});
