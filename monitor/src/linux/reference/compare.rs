//! A guest's pages against the reference: where they differ, and which
//! rewrite site (if any) each difference lies on.

use super::{Reference, RewriteSite, Rewrites};

/// Bytes that differ from the reference, in one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Link address of the first differing byte.
    pub addr: u64,
    pub expected: Vec<u8>,
    pub found: Vec<u8>,
    /// The rewrite sites the run overlaps (a byte on none of them is on no
    /// site).
    pub sites: Vec<RewriteSite>,
}

/// Differing bytes closer than this are one run.
const JOIN: u64 = 4;

/// Compares `found`, the guest's bytes at link address `addr` (the guest
/// holds them `slide` bytes higher), with the reference. `None` when the
/// reference does not hold that range.
pub fn differences(
    r: &Reference,
    w: &Rewrites,
    addr: u64,
    found: &[u8],
    slide: u64,
) -> Option<Vec<Difference>> {
    let expected = r.expected(addr, found.len(), slide)?;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (a, b)) in expected.iter().zip(found).enumerate() {
        if a == b {
            continue;
        }
        match runs.last_mut() {
            Some((_, end)) if (i - *end) as u64 <= JOIN => *end = i + 1,
            _ => runs.push((i, i + 1)),
        }
    }
    Some(
        runs.into_iter()
            .map(|(s, e)| {
                let at = addr + s as u64;
                let len = (e - s) as u64;
                Difference {
                    addr: at,
                    expected: expected[s..e].to_vec(),
                    found: found[s..e].to_vec(),
                    sites: w.overlapping(at, len).copied().collect(),
                }
            })
            .collect(),
    )
}
