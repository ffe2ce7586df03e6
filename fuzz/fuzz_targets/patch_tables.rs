//! The kernel's jump table and static call sites as read from guest
//! memory: one entry per 16 or 8 bytes, and digests that do not depend on
//! where the image was placed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::linux::patch;

fuzz_target!(|data: &[u8]| {
    let Some((head, table)) = data.split_first_chunk::<8>() else { return };
    let base = u64::from_le_bytes(*head);
    if let Ok(entries) = patch::parse_jump_entries(table, base) {
        assert_eq!(entries.len(), table.len() / 16);
        let (n, d) = patch::jump_table_digest(&entries, 0);
        assert_eq!(n, entries.len() as u64);
        // Moving the table and its targets together (KASLR) keeps the digest.
        let slide = 0x20_0000;
        if let Ok(moved) = patch::parse_jump_entries(table, base.wrapping_add(slide)) {
            assert_eq!(patch::jump_table_digest(&moved, slide), (n, d));
        }
    }
    if let Ok(sites) = patch::parse_static_call_sites(table, base) {
        assert_eq!(sites.len(), table.len() / 8);
        let (n, _) = patch::static_call_digest(&sites, 0);
        assert_eq!(n, sites.len() as u64);
    }
});
