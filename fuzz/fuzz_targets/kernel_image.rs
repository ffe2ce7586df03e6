//! Vendor kernel images: a bzImage's header and payload, decompressed
//! (gzip, xz, LZ4 legacy, zstd) within vigil's bound, and an ELF at the end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::linux::image;

fuzz_target!(|data: &[u8]| {
    // As a whole image, and as a bare payload (most inputs fail the header).
    if let Ok((elf, _)) = image::vmlinux(data) {
        assert!(elf.starts_with(b"\x7fELF") && elf.len() <= image::MAX_VMLINUX);
    }
    if let Ok((out, _)) = image::decompress(data) {
        assert!(out.len() <= image::MAX_VMLINUX, "{} bytes out", out.len());
    }
});
