//! Per-page BLAKE3 values that merge into a region's root.
//!
//! A region is a run of bytes cut into 4 KiB pages (the last may be shorter).
//! Each page is hashed on its own as a BLAKE3 subtree at its offset in the
//! region (`hazmat::set_input_offset`), giving a chaining value; the values
//! merge, split where BLAKE3 splits (`left_subtree_len`), into exactly
//! `blake3::hash` of the region's bytes. So a changed page is found by
//! comparing page values, and a region root can be checked with `b3sum`.
//!
//! ```text
//!          root = merge_root(L, R)
//!          /                     \
//!   L = merge(p0, p1)       R = p2        (3 pages: split at 2 pages, 8 KiB)
//!    /        \
//!  p0          p1
//! ```
//!
//! A region of one page has no tree: its value is its root hash.

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};

use crate::addr::PAGE_SIZE;

const PAGE: usize = crate::addr::PAGE_BYTES;

/// A page's value: a BLAKE3 chaining value, or the root hash for a region of
/// one page.
pub type PageValue = [u8; 32];

/// Hashes page `index` of a region of `region_len` bytes.
///
/// `bytes` must be the page's full length within the region (4096, or less
/// for the last page).
pub fn page_value(index: u64, bytes: &[u8], region_len: u64) -> PageValue {
    debug_assert!(!bytes.is_empty() && bytes.len() <= PAGE);
    if region_len <= PAGE_SIZE {
        return *blake3::hash(bytes).as_bytes();
    }
    let mut h = blake3::Hasher::new();
    h.set_input_offset(index * PAGE_SIZE);
    h.update(bytes);
    h.finalize_non_root()
}

/// Why page values did not make a root.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TreeError {
    #[error("a region of {len} bytes has {want} pages, not {got}")]
    PageCount { len: u64, want: u64, got: usize },
}

/// The number of pages in a region of `len` bytes.
pub fn page_count(len: u64) -> u64 {
    len.div_ceil(PAGE_SIZE)
}

/// Merges page values into the region's root hash, which equals
/// `blake3::hash` of the region's bytes.
pub fn region_root(values: &[PageValue], region_len: u64) -> Result<blake3::Hash, TreeError> {
    let want = page_count(region_len);
    if region_len == 0 || u64::try_from(values.len()).ok() != Some(want) {
        return Err(TreeError::PageCount { len: region_len, want, got: values.len() });
    }
    if region_len <= PAGE_SIZE {
        return Ok(blake3::Hash::from_bytes(values[0]));
    }
    let split = left_subtree_len(region_len);
    let (l, r) = split_at(values, split);
    let left = merge(l, split);
    let right = merge(r, region_len - split);
    Ok(merge_subtrees_root(&left, &right, Mode::Hash))
}

fn split_at(values: &[PageValue], bytes: u64) -> (&[PageValue], &[PageValue]) {
    // `bytes` is a power of two of at least one page when the span exceeds a
    // page, so it falls on a page boundary.
    let pages = usize::try_from(bytes / PAGE_SIZE).expect("page count fits usize");
    values.split_at(pages)
}

fn merge(values: &[PageValue], span: u64) -> ChainingValue {
    if span <= PAGE_SIZE {
        return values[0];
    }
    let split = left_subtree_len(span);
    let (l, r) = split_at(values, split);
    merge_subtrees_non_root(&merge(l, split), &merge(r, span - split), Mode::Hash)
}

/// Hashes a whole region held in memory: its page values and its root.
pub fn hash_region(bytes: &[u8]) -> (Vec<PageValue>, blake3::Hash) {
    let len = u64::try_from(bytes.len()).expect("length fits u64");
    let values: Vec<PageValue> =
        bytes.chunks(PAGE).zip(0u64..).map(|(page, i)| page_value(i, page, len)).collect();
    let root = region_root(&values, len).expect("values made for this length");
    (values, root)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::type_complexity)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn root_equals_plain_blake3_for_every_shape() {
        // Odd page counts, a short last page, one page, part of a page.
        for len in [
            1,
            100,
            1024,
            4096,
            4097,
            8192,
            3 * 4096,
            5 * 4096 + 7,
            7 * 4096,
            13 * 4096 - 1,
            64 * 4096,
            1000 * 4096 + 5,
        ] {
            let data = bytes(len, 3);
            let (_, root) = hash_region(&data);
            assert_eq!(root, blake3::hash(&data), "len {len}");
        }
    }

    #[test]
    fn a_changed_byte_changes_exactly_its_page() {
        let mut data = bytes(9 * 4096, 1);
        let (before, root_before) = hash_region(&data);
        data[5 * 4096 + 17] ^= 0x40;
        let (after, root_after) = hash_region(&data);
        let changed: Vec<usize> = (0..9).filter(|&i| before[i] != after[i]).collect();
        assert_eq!(changed, vec![5]);
        assert_ne!(root_before, root_after);
        assert_eq!(root_after, blake3::hash(&data));
    }

    #[test]
    fn wrong_page_counts_are_refused() {
        let (values, _) = hash_region(&bytes(3 * 4096, 0));
        assert!(region_root(&values, 2 * 4096).is_err());
        assert!(region_root(&values, 4 * 4096).is_err());
        assert!(region_root(&values[..0], 0).is_err());
        assert!(region_root(&values, 3 * 4096 - 1).is_ok(), "short last page is the same count");
    }

    proptest::proptest! {
        #[test]
        fn root_matches_for_random_lengths(len in 1usize..40_000, seed: u8) {
            let data = bytes(len, seed);
            proptest::prop_assert_eq!(hash_region(&data).1, blake3::hash(&data));
        }
    }
}
