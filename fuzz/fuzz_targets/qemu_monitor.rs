//! What QEMU's monitor and /proc answer, as vigil parses it: registers,
//! RAM blocks, the memory tree, gpa2hva, vCPU threads, process maps. The
//! first byte picks the parser ('0' to '5' in the seeds); the RAM ranges of
//! a memory tree must name known blocks and fit the address space.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::qemu;

/// The lab guest's `info ramblock`, for the memory tree parser.
const RAMBLOCKS: &str = include_str!("../seeds/qemu_monitor/ramblock.txt");

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    match which % 6 {
        0 => {
            if let Ok(regs) = qemu::parse_registers(text) {
                assert!(!regs.is_empty() && regs.len() <= text.len(), "{} vCPUs", regs.len());
            }
        }
        1 => {
            if let Ok(blocks) = qemu::parse_ramblocks(text) {
                assert!(blocks.iter().all(|b| !b.name.is_empty()));
            }
        }
        2 => {
            let blocks = qemu::parse_ramblocks(&RAMBLOCKS[1..]).expect("the seed's table parses");
            if let Ok(ranges) = qemu::parse_mtree_ram(text, &blocks) {
                for r in &ranges {
                    assert!(blocks.iter().any(|b| b.name == r.block), "{r:?} names no block");
                    assert!(r.len > 0 && r.start.checked_add(r.len - 1).is_some(), "{r:?}");
                }
                // Overlapping or otherwise bad ranges are refused, not a panic.
                let _ = vigil::memory::RamLayout::new(ranges);
            }
        }
        3 => {
            let _ = qemu::parse_gpa2hva(text);
        }
        4 => {
            if let Ok(ids) = qemu::parse_query_cpus_thread_ids(text) {
                assert!(ids.iter().all(|&t| t > 0), "{ids:?}");
            }
        }
        _ => {
            let _ = vigil::memory::parse_maps(text);
        }
    }
});
