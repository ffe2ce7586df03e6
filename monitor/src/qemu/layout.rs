//! The RAM layout: `info mtree -f` (which guest-physical ranges are RAM, and
//! at which offset of which memory region) checked against `info ramblock`
//! (which RAM blocks exist), plus `gpa2hva` and `query-cpus-fast`.

use super::{ParseError, check_len, hex_u64};
use crate::addr::GuestPhysAddr;
use crate::memory::RamRange;

/// Most ranges or blocks accepted.
const MAX_ENTRIES: usize = 4096;

/// One line of `info ramblock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlockInfo {
    pub name: String,
    pub used: u64,
}

/// Parses `info ramblock`.
pub fn parse_ramblocks(text: &str) -> Result<Vec<RamBlockInfo>, ParseError> {
    check_len(text)?;
    let mut blocks = Vec::new();
    let mut header = false;
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.is_empty() {
            continue;
        }
        if f.first() == Some(&"Block") {
            header = true;
            continue;
        }
        let bad =
            |reason: &str| ParseError::Line { line: n + 1, reason: format!("{reason}: {line:?}") };
        if !header {
            return Err(bad("expected the 'Block Name' header first"));
        }
        // name, psize value, psize unit, offset, used, total
        if f.len() != 6 {
            return Err(bad("expected 6 columns"));
        }
        let used = hex_u64(f[4]).ok_or_else(|| bad("bad Used column"))?;
        if blocks.len() >= MAX_ENTRIES {
            return Err(bad("too many RAM blocks"));
        }
        blocks.push(RamBlockInfo { name: f[0].to_owned(), used });
    }
    if blocks.is_empty() {
        return Err(ParseError::Missing("no RAM blocks in 'info ramblock'".into()));
    }
    Ok(blocks)
}

/// Parses `info mtree -f` and returns the RAM ranges of the system address
/// space (the flat view that lists `AS "memory"`), keeping only ranges backed
/// by one of `blocks`. Device regions, I/O and ROM images are left out.
pub fn parse_mtree_ram(text: &str, blocks: &[RamBlockInfo]) -> Result<Vec<RamRange>, ParseError> {
    check_len(text)?;
    let mut in_system = false;
    let mut in_header = false;
    let mut seen_system = false;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        let bad =
            |reason: &str| ParseError::Line { line: n + 1, reason: format!("{reason}: {line:?}") };
        if t.starts_with("FlatView #") {
            if seen_system {
                break;
            }
            in_header = true;
            in_system = false;
            continue;
        }
        if t.starts_with("AS \"") {
            if in_header && t.starts_with("AS \"memory\"") {
                in_system = true;
                seen_system = true;
            }
            continue;
        }
        if t.starts_with("Root memory region") || t.is_empty() || t == "No rendered FlatView" {
            in_header = false;
            continue;
        }
        if !in_system {
            continue;
        }
        // 0000000000100000-000000001fffffff (prio 0, ram): pc.ram @0000000000100000 KVM
        let (range, rest) = t.split_once(' ').ok_or_else(|| bad("no range"))?;
        let (s, e) = range.split_once('-').ok_or_else(|| bad("bad range"))?;
        let start = hex_u64(s).ok_or_else(|| bad("bad range start"))?;
        let last = hex_u64(e).ok_or_else(|| bad("bad range end"))?;
        if last < start {
            return Err(bad("range ends before it starts"));
        }
        let (attrs, name_part) = rest.split_once("): ").ok_or_else(|| bad("no region name"))?;
        let kind = attrs.rsplit(", ").next().unwrap_or("");
        if kind != "ram" {
            continue;
        }
        let mut words = name_part.split_whitespace();
        let name = words.next().ok_or_else(|| bad("no region name"))?;
        let offset = match words.next() {
            Some(w) if w.starts_with('@') => {
                hex_u64(&w[1..]).ok_or_else(|| bad("bad region offset"))?
            }
            _ => 0,
        };
        if !blocks.iter().any(|b| b.name == name) {
            continue;
        }
        // The whole 64-bit space is one byte too long to count.
        let len = (last - start).checked_add(1).ok_or_else(|| bad("range covers every address"))?;
        if out.len() >= MAX_ENTRIES {
            return Err(bad("too many RAM ranges"));
        }
        out.push(RamRange {
            start: GuestPhysAddr(start),
            len,
            block: name.to_owned(),
            block_offset: offset,
        });
    }
    if out.is_empty() {
        return Err(ParseError::Missing(
            "no RAM ranges in the system address space of 'info mtree -f'".into(),
        ));
    }
    Ok(out)
}

/// Parses `gpa2hva`'s reply: `Host virtual address for 0x.. (pc.ram) is 0x..`.
/// Returns the block name and the host address.
pub fn parse_gpa2hva(text: &str) -> Result<(String, u64), ParseError> {
    check_len(text)?;
    let t = text.trim();
    let bad = || ParseError::Line { line: 1, reason: format!("unexpected gpa2hva reply {t:?}") };
    let rest = t.strip_prefix("Host virtual address for ").ok_or_else(bad)?;
    let (_, rest) = rest.split_once(" (").ok_or_else(bad)?;
    let (name, rest) = rest.split_once(") is ").ok_or_else(bad)?;
    let hva = hex_u64(rest).ok_or_else(bad)?;
    Ok((name.to_owned(), hva))
}

/// Parses the reply to QMP `query-cpus-fast` and returns the vCPU thread ids.
pub fn parse_query_cpus_thread_ids(json: &str) -> Result<Vec<i32>, ParseError> {
    check_len(json)?;
    let bad = |r: &str| ParseError::Line { line: 1, reason: r.to_owned() };
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(&format!("not JSON: {e}")))?;
    let cpus =
        v.get("return").and_then(|r| r.as_array()).ok_or_else(|| bad("no 'return' array"))?;
    let ids: Vec<i32> = cpus
        .iter()
        .map(|c| {
            c.get("thread-id")
                .and_then(|t| t.as_i64())
                .and_then(|t| i32::try_from(t).ok())
                .filter(|&t| t > 0)
        })
        .collect::<Option<_>>()
        .ok_or_else(|| bad("a vCPU without a valid thread-id"))?;
    if ids.is_empty() {
        return Err(bad("no vCPUs"));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RamLayout;

    const MTREE_512M: &str = include_str!("testdata/mtree-512m.txt");
    const MTREE_5G: &str = include_str!("testdata/mtree-5g.txt");
    const RAMBLOCK_5G: &str = include_str!("testdata/ramblock-5g.txt");

    #[test]
    fn ramblocks() {
        let b = parse_ramblocks(RAMBLOCK_5G).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(b[0], RamBlockInfo { name: "pc.ram".into(), used: 0x1_4000_0000 });
    }

    #[test]
    fn layout_of_a_guest_above_4g_is_split() {
        let blocks = parse_ramblocks(RAMBLOCK_5G).unwrap();
        let ranges = parse_mtree_ram(MTREE_5G, &blocks).unwrap();
        let layout = RamLayout::new(ranges).unwrap();
        // ROM-typed stretches of pc.ram (option ROM space) are left out.
        let high = layout.find(GuestPhysAddr(0x1_0000_0000), 0x1000).unwrap();
        assert_eq!(high.block_offset, 0xc000_0000);
        assert_eq!(high.len, 0x8000_0000);
        assert!(layout.contains(GuestPhysAddr(0x10_0000), 0xbff0_0000));
        assert!(!layout.contains(GuestPhysAddr(0xc000_0000), 1), "the PCI hole is not RAM");
        assert_eq!(layout.total(), 0xc000_0000 + 0x8000_0000 - 0x2_5000 - 0x1_0000);
    }

    #[test]
    fn layout_of_a_small_guest() {
        let blocks = vec![RamBlockInfo { name: "pc.ram".into(), used: 0x2000_0000 }];
        let layout = RamLayout::new(parse_mtree_ram(MTREE_512M, &blocks).unwrap()).unwrap();
        assert_eq!(layout.ranges().last().unwrap().end(), 0x2000_0000);
    }

    #[test]
    fn gpa2hva_and_cpus() {
        let (name, hva) = parse_gpa2hva(include_str!("testdata/gpa2hva.txt")).unwrap();
        assert_eq!((name.as_str(), hva), ("pc.ram", 0x7f8d_4fff_f000));
        assert!(parse_gpa2hva("No memory is mapped at address 0xd0000000").is_err());
        assert_eq!(
            parse_query_cpus_thread_ids(include_str!("testdata/cpus-fast.json")).unwrap(),
            vec![7748, 7749]
        );
        assert!(parse_query_cpus_thread_ids(r#"{"return":[{"thread-id":-1}]}"#).is_err());
        assert!(parse_query_cpus_thread_ids(r#"{"error":{}}"#).is_err());
    }

    #[test]
    fn malformed_layouts_are_refused() {
        let blocks = parse_ramblocks(RAMBLOCK_5G).unwrap();
        for (text, what) in [
            (
                MTREE_5G.replace(
                    "0000000100000000-000000017fffffff",
                    "0000000100000000-00000000000fffff",
                ),
                "reversed",
            ),
            (MTREE_5G.replace("pc.ram @00000000c0000000", "pc.ram @zz"), "bad offset"),
            (
                MTREE_5G.replace("(prio 0, ram): pc.ram @0000000000100000", "(prio 0, ram) pc.ram"),
                "no name",
            ),
            (String::from("FlatView #0\n AS \"io\", root: io\n"), "no system view"),
            // Seen while writing the qemu_monitor fuzz target's invariants:
            // the length of a range over every address overflowed.
            (
                MTREE_5G.replace(
                    "0000000100000000-000000017fffffff",
                    "0000000000000000-ffffffffffffffff",
                ),
                "every address",
            ),
        ] {
            assert!(parse_mtree_ram(&text, &blocks).is_err(), "accepted {what}");
        }
        assert!(parse_ramblocks("pc.ram 4 KiB 0x0 0x1 0x1").is_err(), "no header");
        assert!(parse_ramblocks("Block Name\npc.ram 4 KiB 0x0 0xzz 0x1").is_err());
    }

    proptest::proptest! {
        #[test]
        fn mtree_never_panics(pos in 0usize..100_000, byte in 0u8..128) {
            let mut b = MTREE_5G.as_bytes().to_vec();
            let i = pos % b.len();
            b[i] = byte;
            if let Ok(s) = String::from_utf8(b) {
                let blocks = [RamBlockInfo { name: "pc.ram".into(), used: 1 << 33 }];
                if let Ok(r) = parse_mtree_ram(&s, &blocks) {
                    let _ = RamLayout::new(r);
                }
            }
        }
    }
}
