//! Guest memory sources: where guest-physical bytes come from.
//!
//! Owns the one consumer-side trait, [`GuestMemory`], and its implementations:
//! a shared RAM mapping ([`SharedRam`]), `process_vm_readv` on the QEMU process
//! ([`ProcessRam`]) and a raw dump file ([`RawDump`]). Sources only read and
//! describe; how the layout was learned (the QEMU monitor) lives in `qemu`, and
//! choosing a source for a domain lives in `libvirt`.

mod dump;
mod elfcore;
pub mod faults;
pub mod held;
mod layout;
mod mapped;
mod process;

pub use dump::RawDump;
pub use elfcore::{DumpError, ElfCore, is_elf};
pub use layout::{LayoutError, RamLayout, RamRange};
pub use mapped::SharedRam;
pub use mapped::{MapsEntry, SharedRamError, parse_maps};
pub use process::{BlockMapping, ProcessRam};

use crate::addr::GuestPhysAddr;

/// Why guest memory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest-physical range {start}..+{len:#x} is not backed by guest RAM")]
    NotRam { start: GuestPhysAddr, len: u64 },
    #[error("reading guest-physical {start}..+{len:#x} failed")]
    Io {
        start: GuestPhysAddr,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("short read at guest-physical {start}: {got:#x} of {len:#x} bytes")]
    Short { start: GuestPhysAddr, len: u64, got: u64 },
}

/// A read-only view of a guest's physical memory.
///
/// ```
/// use vigil::addr::GuestPhysAddr;
/// use vigil::memory::{GuestMemory, RawDump};
///
/// let mut image = vec![0u8; 8192];
/// image[4096] = 0xcc;
/// let dump = RawDump::from_bytes(image);
/// let mut byte = [0u8; 1];
/// dump.read(GuestPhysAddr(4096), &mut byte).unwrap();
/// assert_eq!(byte[0], 0xcc);
/// ```
pub trait GuestMemory {
    /// Fills `buf` with the bytes at `start`. The whole range must be RAM.
    fn read(&self, start: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MemoryError>;

    /// Fills each buffer with the bytes at its address. Sources that can batch
    /// (one system call for many ranges) override this.
    fn read_many(&self, reads: &mut [(GuestPhysAddr, &mut [u8])]) -> Result<(), MemoryError> {
        for (start, buf) in reads.iter_mut() {
            self.read(*start, buf)?;
        }
        Ok(())
    }

    /// The bytes at `start` in place, without copying, for sources that
    /// map guest RAM (`None` for the others, and outside RAM). The guest may
    /// change them while they are looked at: read each byte once.
    fn slice(&self, start: GuestPhysAddr, len: u64) -> Option<&[u8]> {
        let _ = (start, len);
        None
    }

    /// Where RAM is in guest-physical space.
    fn layout(&self) -> &RamLayout;

    /// A short name for reports: `shared-mapping`, `process-read`, `raw-dump`.
    fn kind(&self) -> &'static str;
}

/// Pointers to a source are sources: `&T`, `Box<T>`, `Arc<T>`.
macro_rules! forward_guest_memory {
    ($($ptr:ty),*) => {$(
        impl<T: GuestMemory + ?Sized> GuestMemory for $ptr {
            fn read(&self, start: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
                (**self).read(start, buf)
            }
            fn read_many(
                &self,
                reads: &mut [(GuestPhysAddr, &mut [u8])],
            ) -> Result<(), MemoryError> {
                (**self).read_many(reads)
            }
            fn slice(&self, start: GuestPhysAddr, len: u64) -> Option<&[u8]> {
                (**self).slice(start, len)
            }
            fn layout(&self) -> &RamLayout {
                (**self).layout()
            }
            fn kind(&self) -> &'static str {
                (**self).kind()
            }
        }
    )*};
}
forward_guest_memory!(&T, Box<T>, std::sync::Arc<T>);

fn len_u64(buf: &[u8]) -> u64 {
    u64::try_from(buf.len()).unwrap_or(u64::MAX)
}
