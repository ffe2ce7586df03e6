//! The guest-physical RAM layout: which ranges are RAM, and where each one sits
//! inside a QEMU RAM block.
//!
//! ```text
//!  guest-physical                      RAM block "pc.ram"
//!  0x0000_0000 +----------------+      +----------------+ offset 0
//!              | below 4 GiB    | ---> |                |
//!  0xc000_0000 +----------------+      +----------------+ offset 0xc000_0000
//!              | PCI hole       |      |                |
//!  0x1_0000_0000 +--------------+ ---> |                |
//!              | above 4 GiB    |      +----------------+
//! ```

use crate::addr::GuestPhysAddr;

/// One contiguous guest-physical range backed by a RAM block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamRange {
    pub start: GuestPhysAddr,
    pub len: u64,
    /// QEMU's name of the RAM block (`pc.ram`, a memory backend id, ...).
    pub block: String,
    /// Offset of `start` inside that block.
    pub block_offset: u64,
}

impl RamRange {
    /// The end of the range, exclusive. Layouts are validated so this cannot
    /// overflow.
    pub fn end(&self) -> u64 {
        self.start.raw() + self.len
    }
}

/// Why a layout was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("RAM range at {start} of length {len:#x} is empty or wraps around")]
    BadRange { start: GuestPhysAddr, len: u64 },
    #[error("RAM ranges at {first} and {second} overlap")]
    Overlap { first: GuestPhysAddr, second: GuestPhysAddr },
    #[error("no RAM ranges")]
    Empty,
}

/// Sorted, non-overlapping RAM ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamLayout {
    ranges: Vec<RamRange>,
}

impl RamLayout {
    /// Validates and sorts `ranges`. Adjacent ranges of the same block at
    /// consecutive offsets are merged.
    pub fn new(mut ranges: Vec<RamRange>) -> Result<Self, LayoutError> {
        if ranges.is_empty() {
            return Err(LayoutError::Empty);
        }
        for r in &ranges {
            if r.len == 0
                || r.start.checked_add(r.len).is_none()
                || r.block_offset.checked_add(r.len).is_none()
            {
                return Err(LayoutError::BadRange { start: r.start, len: r.len });
            }
        }
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<RamRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            if let Some(last) = merged.last_mut() {
                if r.start.raw() < last.end() {
                    return Err(LayoutError::Overlap { first: last.start, second: r.start });
                }
                if r.start.raw() == last.end()
                    && r.block == last.block
                    && r.block_offset == last.block_offset + last.len
                {
                    last.len += r.len;
                    continue;
                }
            }
            merged.push(r);
        }
        Ok(Self { ranges: merged })
    }

    /// A single range from guest-physical 0, as a raw dump has.
    pub fn flat(len: u64, block: &str) -> Result<Self, LayoutError> {
        Self::new(vec![RamRange {
            start: GuestPhysAddr(0),
            len,
            block: block.to_owned(),
            block_offset: 0,
        }])
    }

    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total bytes of RAM.
    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// The range holding `[start, start + len)` entirely, if one does.
    pub fn find(&self, start: GuestPhysAddr, len: u64) -> Option<&RamRange> {
        self.find_index(start, len).map(|i| &self.ranges[i])
    }

    /// The index in [`Self::ranges`] of the range [`Self::find`] finds.
    pub fn find_index(&self, start: GuestPhysAddr, len: u64) -> Option<usize> {
        let end = start.checked_add(len)?.raw();
        let idx = self.ranges.partition_point(|r| r.end() <= start.raw());
        let r = self.ranges.get(idx)?;
        (r.start <= start && end <= r.end()).then_some(idx)
    }

    /// Whether `[start, start + len)` lies inside RAM.
    pub fn contains(&self, start: GuestPhysAddr, len: u64) -> bool {
        self.find(start, len).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u64, len: u64, off: u64) -> RamRange {
        RamRange { start: GuestPhysAddr(start), len, block: "pc.ram".into(), block_offset: off }
    }

    #[test]
    fn split_below_and_above_4g() {
        let l = RamLayout::new(vec![
            range(0x1_0000_0000, 0x4000_0000, 0xc000_0000),
            range(0, 0xc000_0000, 0),
        ])
        .unwrap();
        assert_eq!(l.ranges().len(), 2);
        assert_eq!(l.total(), 0x1_0000_0000);
        assert_eq!(l.find(GuestPhysAddr(0x1_0000_1000), 0x1000).unwrap().block_offset, 0xc000_0000);
        assert!(
            !l.contains(GuestPhysAddr(0xbfff_f000), 0x2000),
            "a read across the hole is refused"
        );
        assert!(!l.contains(GuestPhysAddr(0xd000_0000), 1));
        assert!(!l.contains(GuestPhysAddr(u64::MAX), 2));
    }

    #[test]
    fn adjacent_pieces_of_one_block_merge() {
        let l =
            RamLayout::new(vec![range(0, 0xc3000, 0), range(0xc3000, 0x1000, 0xc3000)]).unwrap();
        assert_eq!(l.ranges().len(), 1);
        assert!(l.contains(GuestPhysAddr(0xc2000), 0x2000));
    }

    #[test]
    fn malformed_layouts_are_refused() {
        assert_eq!(RamLayout::new(vec![]), Err(LayoutError::Empty));
        assert!(matches!(RamLayout::new(vec![range(0, 0, 0)]), Err(LayoutError::BadRange { .. })));
        assert!(matches!(
            RamLayout::new(vec![range(u64::MAX - 1, 4, 0)]),
            Err(LayoutError::BadRange { .. })
        ));
        assert!(matches!(
            RamLayout::new(vec![range(0, 0x2000, 0), range(0x1000, 0x2000, 0x5000)]),
            Err(LayoutError::Overlap { .. })
        ));
    }
}
