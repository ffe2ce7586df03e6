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
    // A vCPU's state is a note of its own; its registers read or are refused.
    assert!(core.cpu_notes.len() <= data.len() / 12, "{} vCPU notes", core.cpu_notes.len());
    let notes: usize = core.cpu_notes.iter().map(Vec::len).sum();
    assert!(notes <= data.len(), "{notes} bytes of notes from {} bytes", data.len());
    if let Ok(regs) = vigil::qemu::dump_registers(&core.cpu_notes) {
        assert_eq!(regs.len(), core.cpu_notes.len());
    }
});
