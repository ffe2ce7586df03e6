//! Vendor kernel images: a bzImage's header and payload, decompressed
//! (gzip, xz, LZ4 legacy, zstd) within vigil's bound, and an ELF at the end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Once;
use vigil::linux::image;

/// The third-party decoders vigil runs under `catch_unwind`
/// (`image::decompress`): a panic raised inside one is a corrupt payload to
/// vigil, so it must not abort the run. libfuzzer-sys's hook aborts on
/// every panic; this one lets those through and aborts on any other.
const CONTAINED: [&str; 4] = ["/lzma-rs-", "/flate2-", "/ruzstd-", "/lz4_flex-"];

fn tolerate_decoder_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let aborting = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file()).unwrap_or("");
            if !CONTAINED.iter().any(|c| file.contains(c)) {
                aborting(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    tolerate_decoder_panics();
    // As a whole image, and as a bare payload (most inputs fail the header).
    if let Ok((elf, _)) = image::vmlinux(data) {
        assert!(elf.starts_with(b"\x7fELF") && elf.len() <= image::MAX_VMLINUX);
    }
    if let Ok((out, _)) = image::decompress(data) {
        assert!(out.len() <= image::MAX_VMLINUX, "{} bytes out", out.len());
    }
});
