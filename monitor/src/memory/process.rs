//! Guest RAM read from the QEMU process with batched `process_vm_readv`:
//! works for every QEMU guest, including libvirt's default private RAM.

use super::{GuestMemory, MemoryError, RamLayout, len_u64};
use crate::addr::GuestPhysAddr;
use crate::sys;

/// Where one RAM block sits in the QEMU process's address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMapping {
    pub name: String,
    /// Host virtual address of the block's offset 0.
    pub host_addr: u64,
    /// Bytes of the block in use.
    pub len: u64,
}

/// Reads guest RAM out of the QEMU process. Needs CAP_SYS_PTRACE.
pub struct ProcessRam {
    pid: i32,
    layout: RamLayout,
    blocks: Vec<BlockMapping>,
}

impl ProcessRam {
    /// `blocks` must name every block the layout uses.
    pub fn new(pid: i32, layout: RamLayout, blocks: Vec<BlockMapping>) -> Result<Self, String> {
        check_blocks(&layout, &blocks)?;
        Ok(Self { pid, layout, blocks })
    }

    fn host_addr(&self, start: GuestPhysAddr, len: u64) -> Result<u64, MemoryError> {
        let range = self.layout.find(start, len).ok_or(MemoryError::NotRam { start, len })?;
        let block = self
            .blocks
            .iter()
            .find(|b| b.name == range.block)
            .ok_or(MemoryError::NotRam { start, len })?;
        // Checked by `check_blocks`: the range lies inside the block.
        Ok(block.host_addr + range.block_offset + (start.raw() - range.start.raw()))
    }

    /// Reads many ranges with as few system calls as possible.
    pub fn read_batch(&self, reads: &mut [(GuestPhysAddr, &mut [u8])]) -> Result<(), MemoryError> {
        for chunk in reads.chunks_mut(sys::MAX_IOVECS) {
            let mut remote = Vec::with_capacity(chunk.len());
            for (start, buf) in chunk.iter() {
                remote.push((self.host_addr(*start, len_u64(buf))?, buf.len()));
            }
            let want: usize = chunk.iter().map(|(_, b)| b.len()).sum();
            let first = chunk[0].0;
            let mut local: Vec<&mut [u8]> = chunk.iter_mut().map(|(_, b)| &mut **b).collect();
            let got = sys::process_vm_read(self.pid, &mut local, &remote).map_err(|source| {
                MemoryError::Io { start: first, len: len_u64_usize(want), source }
            })?;
            if got != want {
                return Err(MemoryError::Short {
                    start: first,
                    len: len_u64_usize(want),
                    got: len_u64_usize(got),
                });
            }
        }
        Ok(())
    }
}

fn len_u64_usize(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Every range of the layout must fall inside a block of `blocks`.
pub(super) fn check_blocks(layout: &RamLayout, blocks: &[BlockMapping]) -> Result<(), String> {
    for r in layout.ranges() {
        let b = blocks
            .iter()
            .find(|b| b.name == r.block)
            .ok_or_else(|| format!("RAM block {:?} has no host mapping", r.block))?;
        if r.block_offset.checked_add(r.len).is_none_or(|end| end > b.len) {
            return Err(format!(
                "guest range at {} runs past the end of RAM block {:?}",
                r.start, r.block
            ));
        }
        if b.host_addr.checked_add(b.len).is_none() {
            return Err(format!("RAM block {:?} wraps the host address space", r.block));
        }
    }
    Ok(())
}

impl GuestMemory for ProcessRam {
    fn read(&self, start: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.read_batch(&mut [(start, buf)])
    }

    fn read_many(&self, reads: &mut [(GuestPhysAddr, &mut [u8])]) -> Result<(), MemoryError> {
        self.read_batch(reads)
    }

    fn layout(&self) -> &RamLayout {
        &self.layout
    }

    fn kind(&self) -> &'static str {
        "process-read"
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::type_complexity)]
mod tests {
    use super::*;
    use crate::memory::RamRange;

    #[test]
    fn reads_a_fake_guest_laid_out_in_this_process() {
        // Two guest ranges, the second at 4 GiB, backed by one "block" here.
        let block: Vec<u8> = (0..4 * 4096u32).map(|i| (i / 4096) as u8 + 1).collect();
        let layout = RamLayout::new(vec![
            RamRange { start: GuestPhysAddr(0), len: 2 * 4096, block: "b".into(), block_offset: 0 },
            RamRange {
                start: GuestPhysAddr(0x1_0000_0000),
                len: 2 * 4096,
                block: "b".into(),
                block_offset: 2 * 4096,
            },
        ])
        .unwrap();
        let blocks = vec![BlockMapping {
            name: "b".into(),
            host_addr: block.as_ptr() as u64,
            len: 4 * 4096,
        }];
        let src = ProcessRam::new(std::process::id() as i32, layout, blocks).unwrap();
        let mut a = [0u8; 4096];
        let mut b = [0u8; 4096];
        src.read_batch(&mut [
            (GuestPhysAddr(4096), &mut a[..]),
            (GuestPhysAddr(0x1_0000_1000), &mut b[..]),
        ])
        .unwrap();
        assert!(a.iter().all(|&x| x == 2));
        assert!(b.iter().all(|&x| x == 4));
        assert!(matches!(src.read(GuestPhysAddr(0x2000), &mut a), Err(MemoryError::NotRam { .. })));
    }

    #[test]
    fn layout_past_the_block_is_refused() {
        let layout = RamLayout::flat(0x3000, "b").unwrap();
        let blocks = vec![BlockMapping { name: "b".into(), host_addr: 0x1000, len: 0x2000 }];
        assert!(ProcessRam::new(1, layout.clone(), blocks).is_err());
        assert!(ProcessRam::new(1, layout, vec![]).is_err());
    }
}
