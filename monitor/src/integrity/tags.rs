//! The steady-state fast path: every baseline page's NH tag (see [`nh`]),
//! so that a check computes BLAKE3 only for the pages whose tag differs.
//!
//! Tags are of the baseline's bytes, never of whatever memory holds when
//! they are made: a page's tag comes from memory only when its BLAKE3
//! value there is the baseline's, otherwise from the baseline's originals
//! (`.pages`), otherwise it is unknown and the page always takes the BLAKE3
//! path. Tags belong to one baseline: a check with another baseline's
//! regions ignores them.

use super::nh::{self, Key, Tag};
use super::{AddressSpace, Baseline, Originals, tree};
use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_BYTES};
use crate::memory::GuestMemory;

/// The tags of one baseline's pages, region by region.
pub struct PageTags {
    key: Key,
    regions: Vec<RegionTags>,
}

struct RegionTags {
    root: [u8; 32],
    tags: Vec<Option<Tag>>,
}

/// Where a [`PageTags`] got its tags from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TagSources {
    pub memory: usize,
    pub originals: usize,
    pub unknown: usize,
}

impl PageTags {
    /// Host memory the tags hold.
    pub fn held_bytes(&self) -> u64 {
        self.regions.iter().map(|r| crate::memory::held::vec(&r.tags) + 32).sum()
    }

    /// Tags every page of `baseline` with `key`.
    pub fn build<M: GuestMemory + ?Sized>(
        key: Key,
        baseline: &Baseline,
        mem: &M,
        space: &dyn AddressSpace,
        originals: &Originals,
    ) -> (Self, TagSources) {
        let mut sources = TagSources::default();
        let mut buf = [0u8; PAGE_BYTES];
        let regions = baseline
            .regions
            .iter()
            .map(|r| {
                let tags = r
                    .pages
                    .iter()
                    .zip(0u64..)
                    .map(|(p, i)| {
                        let holds_baseline = |bytes: &[u8]| {
                            bytes.len() == PAGE_BYTES
                                && tree::page_value(i, bytes, r.bytes) == p.value
                        };
                        let in_memory = space.translate(p.gva).is_some_and(|(gpa, _)| {
                            gpa == p.gpa && mem.read(gpa, &mut buf).is_ok()
                        });
                        if in_memory && holds_baseline(&buf) {
                            sources.memory += 1;
                            return key.tag_slice(&buf);
                        }
                        match originals.page(p.gva.raw()) {
                            Some(o) if holds_baseline(&o) => {
                                sources.originals += 1;
                                key.tag_slice(&o)
                            }
                            _ => {
                                sources.unknown += 1;
                                None
                            }
                        }
                    })
                    .collect();
                RegionTags { root: r.root, tags }
            })
            .collect();
        (Self { key, regions }, sources)
    }

    /// The tags of region `index` of a baseline whose region has `root`
    /// (`None` when these tags are of another baseline).
    fn region(&self, index: usize, root: &[u8; 32]) -> Option<&[Option<Tag>]> {
        self.regions.get(index).filter(|t| &t.root == root).map(|t| t.tags.as_slice())
    }
}

/// Checks the pages `reads` (index in region, virtual, physical) of region
/// `region_index` against their tags. Returns the reads whose tag differs
/// or is unknown: only those need hashing. `None` when the tags do not
/// belong to this region, or a page cannot be read (the caller's BLAKE3
/// path then reads and reports it).
pub fn untagged_or_changed<M: GuestMemory + ?Sized>(
    tags: &PageTags,
    region_index: usize,
    root: &[u8; 32],
    mem: &M,
    reads: &[(u64, GuestVirtAddr, GuestPhysAddr)],
) -> Option<Vec<(u64, GuestVirtAddr, GuestPhysAddr)>> {
    let expected = tags.region(region_index, root)?;
    let want = |index: u64| expected.get(usize::try_from(index).ok()?).copied().flatten();
    let mut slow = Vec::new();
    let mut judge = |read: (u64, GuestVirtAddr, GuestPhysAddr), page: &[u8; PAGE_BYTES]| {
        let expected = want(read.0);
        if expected.is_none() || Some(tags.key.tag(page)) != expected {
            slow.push(read);
        }
    };
    super::read_in_runs(mem, reads, |run, bytes| {
        for (&read, page) in run.iter().zip(bytes.as_chunks::<PAGE_BYTES>().0) {
            judge(read, page);
        }
    })
    .ok()?;
    Some(slow)
}

/// The chance that a change of one page escapes its tag, as a power of two
/// (for reports): one in 2^this.
#[allow(clippy::cast_possible_truncation)] // PASSES is 2
pub const ESCAPE_BITS: u32 = 32 * nh::PASSES as u32;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::baseline::tests::{Copying, Fake};
    use crate::memory::RawDump;

    fn reads(b: &Baseline, region: usize) -> Vec<(u64, GuestVirtAddr, GuestPhysAddr)> {
        b.regions[region].pages.iter().zip(0u64..).map(|(p, i)| (i, p.gva, p.gpa)).collect()
    }

    /// The fast path itself: nothing to hash on an unchanged guest, exactly
    /// the written page after a write, and no answer for another baseline.
    #[test]
    fn only_changed_or_untagged_pages_are_left_to_hash() {
        let f = Fake::new();
        let b = f.baseline();
        let (tags, _) =
            PageTags::build(Key::random().unwrap(), &b, &f.mem, &f, &Originals::default());
        let text = reads(&b, 0);
        let root = b.regions[0].root;
        assert_eq!(untagged_or_changed(&tags, 0, &root, &f.mem, &text), Some(vec![]));
        let mut bytes = vec![0u8; usize::try_from(f.mem.layout().total()).unwrap()];
        f.mem.read(GuestPhysAddr(0), &mut bytes).unwrap();
        let at = usize::try_from(text[2].2.raw()).unwrap() + 100;
        bytes[at] ^= 0x40;
        let poked = RawDump::from_bytes(bytes);
        assert_eq!(untagged_or_changed(&tags, 0, &root, &poked, &text), Some(vec![text[2]]));
        // The same through a source that cannot lend its bytes in place.
        assert_eq!(untagged_or_changed(&tags, 0, &root, &Copying(&f.mem), &text), Some(vec![]));
        assert_eq!(
            untagged_or_changed(&tags, 0, &root, &Copying(&poked), &text),
            Some(vec![text[2]])
        );
        // Pages out of physical order are judged each against its own tag.
        let shuffled: Vec<_> = text.iter().rev().copied().collect();
        assert_eq!(untagged_or_changed(&tags, 0, &root, &poked, &shuffled), Some(vec![text[2]]));
        assert_eq!(untagged_or_changed(&tags, 0, &[9; 32], &f.mem, &text), None);
        assert_eq!(untagged_or_changed(&tags, 7, &root, &f.mem, &text), None);
        // A page with no tag (its baseline bytes were nowhere) is hashed.
        let (late, from) =
            PageTags::build(Key::random().unwrap(), &b, &poked, &f, &Originals::default());
        assert_eq!(from.unknown, 1);
        assert_eq!(untagged_or_changed(&late, 0, &root, &f.mem, &text), Some(vec![text[2]]));
    }
}
