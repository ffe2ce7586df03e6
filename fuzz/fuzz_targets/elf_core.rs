//! ELF core dumps (`virsh dump --memory-only`, and evidence bundles): the
//! RAM layout read from the program headers, QEMU's register notes, and
//! reads through it that stay inside the file.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use vigil::addr::GuestPhysAddr;
use vigil::memory::{ElfCore, GuestMemory};

fuzz_target!(|data: &[u8]| {
    let mut f = tempfile::NamedTempFile::new().expect("a temporary file");
    f.write_all(data).expect("writing it");
    let Ok(core) = ElfCore::open(f.path()) else { return };
    // Every range of the layout reads, at its first and last byte.
    for r in core.layout().ranges() {
        let mut b = [0u8; 1];
        core.read(r.start, &mut b).unwrap_or_else(|e| panic!("{r:?} start: {e}"));
        let last = GuestPhysAddr(r.start.raw() + (r.len - 1));
        core.read(last, &mut b).unwrap_or_else(|e| panic!("{r:?} end: {e}"));
    }
    // A vCPU's registers come from a note of its own, hundreds of bytes long.
    assert!(core.registers.len() <= data.len() / 64, "{} vCPUs", core.registers.len());
});
