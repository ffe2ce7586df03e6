//! A baseline's `.pages` file (its pages' original bytes, LZ4 blocks), read
//! against the lab guest's cut baseline (the `baseline` target's seed): a
//! file is accepted only when every page it holds decompresses to the
//! bytes whose value the baseline records.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use vigil::integrity::{Baseline, Originals, tree};

static BASELINE: LazyLock<Baseline> = LazyLock::new(|| {
    Baseline::from_json(include_bytes!("../seeds/baseline/lab-guest-cut.json")).expect("the seed")
});

fuzz_target!(|data: &[u8]| {
    let b = &*BASELINE;
    let Ok(o) = Originals::from_bytes(data, b) else { return };
    for r in &b.regions {
        for (i, p) in r.pages.iter().enumerate() {
            let Some(bytes) = o.page(p.gva.raw()) else { continue };
            assert_eq!(bytes.len(), 4096, "page {:#x}", p.gva.raw());
            assert_eq!(
                tree::page_value(i as u64, &bytes, r.bytes),
                p.value,
                "page {:#x}",
                p.gva.raw()
            );
        }
    }
    assert!(o.len() <= b.regions.iter().map(|r| r.pages.len()).sum::<usize>());
});
