//! Page-table walks over arbitrary guest memory and CR3: within budget,
//! in address order, inside the range asked for, and each leaf the walk
//! lists translates, one address at a time, to the same place.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::addr::{GuestVirtAddr, PAGE_BYTES};
use vigil::memory::RawDump;
use vigil::x86::{PagingMode, WalkBudget, Walker};

/// Guest RAM: this many pages, filled from the input.
const PAGES: usize = 16;
const CR4_LA57: u64 = 1 << 12;

fuzz_target!(|data: &[u8]| {
    let Some((head, body)) = data.split_first_chunk::<9>() else { return };
    let flags = head[8];
    // CR3 mostly inside RAM (else the walk fails at once), with its flag bits.
    let raw = u64::from_le_bytes(head[..8].try_into().unwrap());
    let cr3 = if flags & 4 == 0 { (raw % PAGES as u64) << 12 | (raw >> 52) } else { raw };
    let mut ram = vec![0u8; PAGES * PAGE_BYTES];
    let n = body.len().min(ram.len());
    ram[..n].copy_from_slice(&body[..n]);
    let mem = RawDump::from_bytes(ram);
    let mode = PagingMode::from_cr4(if flags & 1 != 0 { CR4_LA57 } else { 0 });
    let budget = WalkBudget { max_tables: 64, max_mappings: 8192 };
    let walker = Walker::new(&mem, mode, cr3, flags & 2 != 0).with_budget(budget);
    // The kernel image's gigabyte, or the first gigabyte of user space.
    let (start, end) = if flags & 8 == 0 {
        (0xffff_ffff_8000_0000u64, 0xffff_ffff_c000_0000u64)
    } else {
        (0, 1 << 30)
    };
    let Ok(set) = walker.mappings(GuestVirtAddr(start), GuestVirtAddr(end)) else { return };
    assert!(set.mappings.len() <= budget.max_mappings, "over budget: {}", set.mappings.len());
    for pair in set.mappings.windows(2) {
        assert!(pair[0].gva.raw() + pair[0].size <= pair[1].gva.raw(), "out of order: {pair:?}");
    }
    // Every leaf is checked for its place; at most 64 of them, spread over
    // the list, are translated again (each translation reads every level).
    let step = set.mappings.len().div_ceil(64).max(1);
    for (i, m) in set.mappings.iter().enumerate() {
        assert!((start..end).contains(&m.gva.raw()), "{m:?} outside {start:#x}..{end:#x}");
        assert!(m.size.is_power_of_two() && m.gva.raw() % m.size == 0, "{m:?}");
        if i % step == 0 {
            let t = walker.translate(m.gva);
            let t = t.unwrap_or_else(|e| panic!("{m:?} does not translate: {e}"));
            assert_eq!((t.gpa, t.page_size, t.perms), (m.gpa, m.size, m.perms), "{m:?}");
        }
    }
});
