//! Estimates of the host memory a structure holds, for the per-domain
//! budget (`limits.guest_memory`). Each counts what the structure's
//! allocations can hold (capacity, not length), so that an estimate is not
//! below what the allocator gave; a map's entries are counted with one
//! control byte each, as hashbrown lays them out.

use std::collections::{BTreeMap, HashMap};
use std::mem::size_of;

/// A hash map's table: its buckets (a capacity is 7/8 of them, past 8).
pub fn map<K, V, S>(m: &HashMap<K, V, S>) -> u64 {
    let buckets = (m.capacity() as u64 * 8).div_ceil(7);
    buckets * (size_of::<(K, V)>() as u64 + 1)
}

/// A B-tree map's nodes: entries half full at worst, and a node's links.
pub fn btree<K, V>(m: &BTreeMap<K, V>) -> u64 {
    m.len() as u64 * (2 * size_of::<(K, V)>() as u64 + 8)
}

/// A vector's buffer.
pub fn vec<T>(v: &Vec<T>) -> u64 {
    v.capacity() as u64 * size_of::<T>() as u64
}

/// A string's buffer.
pub fn string(s: &str) -> u64 {
    s.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_grow_with_what_is_held() {
        let mut m: HashMap<u64, [u8; 32]> = HashMap::new();
        assert_eq!(map(&m), 0);
        m.extend((0..1000u64).map(|i| (i, [0; 32])));
        // At least a bucket of 41 bytes per 7/8 of the capacity.
        assert!(map(&m) >= m.capacity() as u64 * 8 / 7 * 41, "{}", map(&m));
        assert!(map(&m) >= 1000 * 41 * 8 / 7, "{}", map(&m));
        let b: BTreeMap<u64, u64> = (0..100).map(|i| (i, i)).collect();
        assert_eq!(btree(&b), 100 * 40);
        let v: Vec<u32> = Vec::with_capacity(10);
        assert_eq!(vec(&v), 40);
        assert_eq!(string("abc"), 3);
    }
}
