//! Shared guest RAM mapped directly: for domains whose RAM is a memfd or file
//! backend with `access mode='shared'`. The QEMU process's mapping is opened
//! through `/proc/PID/map_files/` and mapped read-only here: no copy on the
//! way in, and no contention with QEMU.

use std::fs::File;
use std::path::PathBuf;

use memmap2::Mmap;

use super::process::{BlockMapping, check_blocks};
use super::{GuestMemory, MemoryError, RamLayout, len_u64};
use crate::addr::GuestPhysAddr;
use crate::sys;

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub path: String,
}

impl MapsEntry {
    pub fn is_shared_file(&self) -> bool {
        self.perms.as_bytes().get(3) == Some(&b's') && self.path.starts_with('/')
    }
}

/// Parses `/proc/PID/maps`; malformed lines are an error naming the line.
pub fn parse_maps(text: &str) -> Result<Vec<MapsEntry>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let bad = || format!("line {}: malformed maps entry {line:?}", n + 1);
        let mut f = line.splitn(6, ' ');
        let range = f.next().ok_or_else(bad)?;
        let perms = f.next().ok_or_else(bad)?;
        let offset = f.next().ok_or_else(bad)?;
        let _dev = f.next().ok_or_else(bad)?;
        let _inode = f.next().ok_or_else(bad)?;
        let path = f.next().unwrap_or("").trim().to_owned();
        let (s, e) = range.split_once('-').ok_or_else(bad)?;
        let start = u64::from_str_radix(s, 16).map_err(|_| bad())?;
        let end = u64::from_str_radix(e, 16).map_err(|_| bad())?;
        let offset = u64::from_str_radix(offset, 16).map_err(|_| bad())?;
        if end <= start || perms.len() != 4 {
            return Err(bad());
        }
        out.push(MapsEntry { start, end, perms: perms.to_owned(), offset, path });
    }
    Ok(out)
}

/// The shared file mapping that covers a block's host range entirely, if any.
pub fn shared_mapping_for<'a>(
    maps: &'a [MapsEntry],
    block: &BlockMapping,
) -> Option<&'a MapsEntry> {
    let end = block.host_addr.checked_add(block.len)?;
    maps.iter().find(|m| m.start <= block.host_addr && end <= m.end && m.is_shared_file())
}

struct MappedBlock {
    name: String,
    map: Mmap,
}

/// Guest RAM read through read-only mappings of QEMU's shared RAM blocks.
pub struct SharedRam {
    layout: RamLayout,
    blocks: Vec<MappedBlock>,
    /// For each range of the layout, the index of its block in `blocks`
    /// (looked up once, not by name at every read).
    block_of: Vec<usize>,
}

/// Why a shared mapping could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SharedRamError {
    #[error("reading /proc/{pid}/maps")]
    Maps {
        pid: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("/proc/{pid}/maps: {reason}")]
    BadMaps { pid: i32, reason: String },
    #[error("RAM block {block:?} is not a shared file mapping in process {pid}")]
    NotShared { pid: i32, block: String },
    #[error("opening or mapping {path}")]
    Map {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Blocks(String),
}

impl SharedRam {
    /// Whether every block used by `layout` is a shared file mapping in `pid`.
    pub fn available(pid: i32, blocks: &[BlockMapping]) -> Result<bool, SharedRamError> {
        let maps = read_maps(pid)?;
        Ok(blocks.iter().all(|b| shared_mapping_for(&maps, b).is_some()))
    }

    /// Maps every block used by `layout` from the QEMU process `pid`.
    pub fn open(
        pid: i32,
        layout: RamLayout,
        blocks: &[BlockMapping],
    ) -> Result<Self, SharedRamError> {
        check_blocks(&layout, blocks).map_err(SharedRamError::Blocks)?;
        let maps = read_maps(pid)?;
        let mut mapped = Vec::new();
        for b in blocks.iter().filter(|b| layout.ranges().iter().any(|r| r.block == b.name)) {
            let m = shared_mapping_for(&maps, b)
                .ok_or_else(|| SharedRamError::NotShared { pid, block: b.name.clone() })?;
            let path = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
            let map_err = |source| SharedRamError::Map { path: path.clone(), source };
            let file = File::open(&path).map_err(map_err)?;
            let offset = m.offset + (b.host_addr - m.start);
            let len = usize::try_from(b.len)
                .map_err(|_| SharedRamError::Blocks(format!("block {:?} too large", b.name)))?;
            let map = sys::map_readonly(&file, offset, len).map_err(map_err)?;
            mapped.push(MappedBlock { name: b.name.clone(), map });
        }
        let block_of = layout
            .ranges()
            .iter()
            .map(|r| mapped.iter().position(|b| b.name == r.block))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| SharedRamError::Blocks("a RAM range names no mapped block".into()))?;
        Ok(Self { layout, blocks: mapped, block_of })
    }
}

fn read_maps(pid: i32) -> Result<Vec<MapsEntry>, SharedRamError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|source| SharedRamError::Maps { pid, source })?;
    parse_maps(&text).map_err(|reason| SharedRamError::BadMaps { pid, reason })
}

impl GuestMemory for SharedRam {
    fn read(&self, start: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = len_u64(buf);
        let src = self.slice(start, len).ok_or(MemoryError::NotRam { start, len })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn slice(&self, start: GuestPhysAddr, len: u64) -> Option<&[u8]> {
        let index = self.layout.find_index(start, len)?;
        let range = &self.layout.ranges()[index];
        let block = &self.blocks[*self.block_of.get(index)?];
        let from = usize::try_from(range.block_offset + (start.raw() - range.start.raw())).ok()?;
        block.map.get(from..from.checked_add(usize::try_from(len).ok()?)?)
    }

    fn layout(&self) -> &RamLayout {
        &self.layout
    }

    fn kind(&self) -> &'static str {
        "shared-mapping"
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::type_complexity)]
mod tests {
    use super::*;

    const MAPS: &str = "\
7fd34727c000-7fd347fff000 rw-p 00000000 00:00 0 
7fd347fff000-7fd367fff000 rw-s 00000000 00:01 7                          /memfd:memory-backend-memfd (deleted)
7fd367fff000-7fd368000000 r--p 00001000 08:01 1234                       /usr/bin/qemu-system-x86_64
";

    #[test]
    fn finds_the_memfd_block() {
        let maps = parse_maps(MAPS).unwrap();
        assert_eq!(maps.len(), 3);
        let b = BlockMapping { name: "pc.ram".into(), host_addr: 0x7fd347fff000, len: 0x2000_0000 };
        assert_eq!(
            shared_mapping_for(&maps, &b).unwrap().path,
            "/memfd:memory-backend-memfd (deleted)"
        );
        let private = BlockMapping { name: "x".into(), host_addr: 0x7fd34727c000, len: 0x1000 };
        assert!(
            shared_mapping_for(&maps, &private).is_none(),
            "private anonymous RAM is not shared"
        );
        let too_long =
            BlockMapping { name: "y".into(), host_addr: 0x7fd347fff000, len: 0x2000_1000 };
        assert!(shared_mapping_for(&maps, &too_long).is_none());
    }

    #[test]
    fn malformed_maps_are_refused() {
        for bad in
            ["zz-10 rw-p 0 00:00 0", "10-5 rw-p 0 00:00 0", "10-20 rw-p", "10-20 rw 0 00:00 0"]
        {
            assert!(parse_maps(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn maps_own_shared_memory() {
        // A shared file mapping in this very process stands in for QEMU's.
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 256) as u8).collect();
        f.write_all(&data).unwrap();
        let ours = sys::map_readonly(f.as_file(), 0, 8192).unwrap();
        let block = BlockMapping { name: "blk".into(), host_addr: ours.as_ptr() as u64, len: 8192 };
        let pid = std::process::id() as i32;
        let layout = RamLayout::flat(8192, "blk").unwrap();
        let ram = SharedRam::open(pid, layout, std::slice::from_ref(&block)).unwrap();
        let mut buf = [0u8; 16];
        ram.read(GuestPhysAddr(4100), &mut buf).unwrap();
        assert_eq!(&buf[..], &data[4100..4116]);
        assert!(ram.read(GuestPhysAddr(8190), &mut buf).is_err());
    }
}
