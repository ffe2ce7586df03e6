//! GDT descriptors as the guest's memory holds them, judged against
//! Linux's layout: every finding names an entry that exists, and an entry
//! draws at most two (its expected role, and what it is instead).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let problems = vigil::linux::semantic::gdt_problems(data);
    let entries = data.len() / 8;
    for (i, why) in &problems {
        assert!(*i < entries.max(1), "entry {i} of {entries}: {why}");
    }
    assert!(problems.len() <= 2 * entries + 1, "{} findings for {entries} entries", problems.len());
});
