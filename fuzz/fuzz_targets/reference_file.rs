//! A stored kernel reference (`RELEASE.reference`, gzip over a binary
//! form) read back, its rewrite sites listed, and bytes asked of it at a
//! slide: a file refused says why; one accepted never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::linux::reference::{ReferenceFile, Rewrites};

fuzz_target!(|data: &[u8]| {
    let Ok(r) = ReferenceFile::read(data) else { return };
    let sites = Rewrites::of(&r).map(|w| w.sites).unwrap_or_default();
    for s in sites.iter().take(64) {
        let _ = r.expected(s.addr, usize::from(s.len), 0x1e00_0000);
    }
    for s in &r.sections {
        let _ = r.expected(s.addr, s.bytes.len().min(4096), 0x1e00_0000);
        let _ = r.expected(s.addr.wrapping_add(s.bytes.len() as u64).wrapping_sub(3), 8, 0);
    }
});
