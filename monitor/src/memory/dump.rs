//! A raw memory dump: a file whose byte at offset N is guest-physical N.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{GuestMemory, MemoryError, RamLayout, len_u64};
use crate::addr::GuestPhysAddr;

enum Backing {
    File(File),
    Bytes(Vec<u8>),
}

/// A flat guest-physical image, in a file or in memory (for tests).
pub struct RawDump {
    backing: Backing,
    layout: RamLayout,
}

impl RawDump {
    /// Opens a raw dump file.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let layout = RamLayout::flat(len, "raw-dump").map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {e}", path.display()))
        })?;
        Ok(Self { backing: Backing::File(file), layout })
    }

    /// Wraps bytes already in memory. Panics on an empty image (a test helper).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        let layout = RamLayout::flat(len_u64(&bytes), "raw-dump").expect("a non-empty image");
        Self { backing: Backing::Bytes(bytes), layout }
    }
}

impl GuestMemory for RawDump {
    fn read(&self, start: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = len_u64(buf);
        if !self.layout.contains(start, len) {
            return Err(MemoryError::NotRam { start, len });
        }
        match &self.backing {
            Backing::File(f) => f
                .read_exact_at(buf, start.raw())
                .map_err(|source| MemoryError::Io { start, len, source }),
            Backing::Bytes(b) => {
                // In range: checked against the layout, which is the image's length.
                let from =
                    usize::try_from(start.raw()).map_err(|_| MemoryError::NotRam { start, len })?;
                buf.copy_from_slice(&b[from..from + buf.len()]);
                Ok(())
            }
        }
    }

    fn slice(&self, start: GuestPhysAddr, len: u64) -> Option<&[u8]> {
        let Backing::Bytes(b) = &self.backing else { return None };
        if !self.layout.contains(start, len) {
            return None;
        }
        let from = usize::try_from(start.raw()).ok()?;
        b.get(from..from.checked_add(usize::try_from(len).ok()?)?)
    }

    fn layout(&self) -> &RamLayout {
        &self.layout
    }

    fn kind(&self) -> &'static str {
        "raw-dump"
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::type_complexity)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn file_and_bytes_read_alike_and_refuse_out_of_range() {
        let bytes: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes).unwrap();
        let from_file = RawDump::open(f.path()).unwrap();
        let in_mem = RawDump::from_bytes(bytes.clone());
        for src in [&from_file, &in_mem] {
            let mut buf = [0u8; 100];
            src.read(GuestPhysAddr(5000), &mut buf).unwrap();
            assert_eq!(&buf[..], &bytes[5000..5100]);
            let mut past = [0u8; 2];
            assert!(matches!(
                src.read(GuestPhysAddr(3 * 4096 - 1), &mut past),
                Err(MemoryError::NotRam { .. })
            ));
        }
    }

    #[test]
    fn empty_dump_file_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(RawDump::open(f.path()).is_err());
    }
}
