//! The kernel's patch tables as bytes: jump entries and static call sites
//! parsed to absolute addresses, and digests that do not depend on order or
//! slide.

use super::*;

/// One `struct jump_entry`, made absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpEntry {
    pub code: u64,
    pub target: u64,
    pub key: u64,
    /// The branch's default direction (bit 0 of the key).
    pub branch: bool,
}

pub(super) fn i32_at(b: &[u8], off: usize) -> i64 {
    i64::from(i32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes")))
}

/// Parses a `__jump_table` of relative entries (`s32 code, s32 target, long
/// key`) that lies at `base`.
pub fn parse_jump_entries(bytes: &[u8], base: u64) -> Result<Vec<JumpEntry>, String> {
    if !bytes.len().is_multiple_of(16) || bytes.len() / 16 > MAX_TABLE_ENTRIES {
        return Err(format!("{} bytes is no table of 16-byte entries", bytes.len()));
    }
    Ok(bytes
        .chunks_exact(16)
        .zip(0u64..)
        .map(|(e, i)| {
            let at = base.wrapping_add(i * 16);
            let key = i64::from_le_bytes(e[8..16].try_into().expect("8 bytes"));
            JumpEntry {
                code: at.wrapping_add_signed(i32_at(e, 0)),
                target: at.wrapping_add(4).wrapping_add_signed(i32_at(e, 4)),
                key: at.wrapping_add(8).wrapping_add_signed(key & !3),
                branch: key & 1 != 0,
            }
        })
        .collect())
}

/// One `struct static_call_site`, made absolute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticCallSite {
    pub addr: u64,
    pub key: u64,
    /// A tail call (`jmp`), not a `call`.
    pub tail: bool,
}

/// Parses `.static_call_sites` (`s32 addr, s32 key`) that lies at `base`.
pub fn parse_static_call_sites(bytes: &[u8], base: u64) -> Result<Vec<StaticCallSite>, String> {
    if !bytes.len().is_multiple_of(8) || bytes.len() / 8 > MAX_TABLE_ENTRIES {
        return Err(format!("{} bytes is no table of 8-byte entries", bytes.len()));
    }
    Ok(bytes
        .chunks_exact(8)
        .zip(0u64..)
        .map(|(e, i)| {
            let at = base.wrapping_add(i * 8);
            let key = i32_at(e, 4);
            StaticCallSite {
                addr: at.wrapping_add_signed(i32_at(e, 0)),
                key: at.wrapping_add(4).wrapping_add_signed(key & !3),
                tail: key & 1 != 0,
            }
        })
        .collect())
}

pub(super) fn digest(mut rows: Vec<[u64; 3]>) -> (u64, String) {
    rows.sort_unstable();
    let mut h = blake3::Hasher::new();
    for r in &rows {
        for v in r {
            h.update(&v.to_le_bytes());
        }
    }
    (rows.len() as u64, h.finalize().to_hex().to_string())
}

/// Count and digest of a jump table, at link-time addresses (`slide`
/// removed), independent of the order the kernel sorted it into and of the
/// flags it set at boot.
pub fn jump_table_digest(entries: &[JumpEntry], slide: u64) -> (u64, String) {
    digest(
        entries
            .iter()
            .map(|e| {
                [
                    e.code.wrapping_sub(slide),
                    e.target.wrapping_sub(slide),
                    e.key.wrapping_sub(slide) | u64::from(e.branch),
                ]
            })
            .collect(),
    )
}

/// Count and digest of the static call sites, as [`jump_table_digest`].
pub fn static_call_digest(sites: &[StaticCallSite], slide: u64) -> (u64, String) {
    digest(
        sites
            .iter()
            .map(|s| [s.addr.wrapping_sub(slide), s.key.wrapping_sub(slide), u64::from(s.tail)])
            .collect(),
    )
}
