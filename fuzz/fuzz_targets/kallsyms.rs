//! kallsyms tables found in arbitrary bytes (as in a kernel's `.rodata`):
//! bounded, and every symbol decoded has a name.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = vigil::linux::kallsyms::find(data) {
        assert!(
            t.symbols.len() <= data.len(),
            "{} symbols from {} bytes",
            t.symbols.len(),
            data.len()
        );
        assert!(t.symbols.iter().all(|s| !s.name.is_empty()));
    }
});
