//! Baseline files: a baseline that parses and validates is written back
//! and read again unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::integrity::Baseline;

fuzz_target!(|data: &[u8]| {
    let Ok(b) = Baseline::from_json(data) else { return };
    let json = serde_json::to_vec_pretty(&b).expect("a valid baseline serialises");
    let again = Baseline::from_json(&json).expect("a written baseline reads back");
    assert_eq!(again, b);
});
