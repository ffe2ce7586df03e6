//! kallsyms: the kernel's own compressed symbol table, found without symbols
//! in a vmlinux's `.rodata` (or any copy of it, such as guest memory).
//!
//! Linux 6.1 lays the tables out in this order, each aligned to 8 bytes:
//!
//! ```text
//!  kallsyms_offsets        u32 × N   (signed: >= 0 absolute per-CPU, < 0 base - 1 - off)
//!  kallsyms_relative_base  u64
//!  kallsyms_num_syms       u32       N
//!  kallsyms_names          N × [len, token bytes...]   (len > 0x7f takes two bytes)
//!  kallsyms_markers        u32 × ceil(N / 256)          offset of every 256th name
//!  kallsyms_seqs_of_names  3 bytes × N                  (6.2 on, and later 6.1 stables)
//!  kallsyms_token_table    256 NUL-terminated tokens
//!  kallsyms_token_index    u16 × 256                    offset of each token
//! ```
//!
//! Later kernels (6.12 among them) keep the same tables and encoding but
//! move the offsets and the relative base after the token index:
//!
//! ```text
//!  kallsyms_num_syms, kallsyms_names, kallsyms_markers,
//!  kallsyms_token_table, kallsyms_token_index,
//!  kallsyms_offsets, kallsyms_relative_base, kallsyms_seqs_of_names
//! ```
//!
//! Both are tried; the one whose base is a kernel address and whose
//! addresses rise with the symbol order (the tables are sorted) is taken.
//!
//! The token table is found first: unused byte values stand for themselves,
//! so the tokens for '0'..'9' are the strings "0".."9" in a row. Every other
//! table is then found from its neighbour and checked against it.

use std::collections::HashMap;

use crate::integrity::check::{Deadline, OUT_OF_TIME};

/// Most symbols believed (a Debian kernel has about 150,000).
const MAX_SYMS: usize = 1 << 19;
/// Longest name a kernel gives a symbol (`KSYM_NAME_LEN` since 6.1), its
/// type byte included.
const MAX_NAME: usize = 512 + 1;
/// Most bytes of names decoded in all (a Debian kernel's come to about
/// 5 MiB): each encoded byte may stand for a token of up to 63 bytes, so a
/// planted table could otherwise decode to gigabytes.
const MAX_NAME_BYTES: usize = 32 << 20;
/// Most places that look like a token table tried: guest memory can plant
/// the pattern anywhere, and each try scans megabytes.
const MAX_CANDIDATES: usize = 32;
const DIGITS: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    /// The `nm`-style type: `T`/`t` text, `D`/`d` data, `R`/`r` rodata, ...
    pub kind: char,
    /// The address as linked (before any KASLR slide).
    pub addr: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KallsymsError {
    #[error("no kallsyms token table found")]
    NoTokenTable,
    #[error("kallsyms tables found but inconsistent: {0}")]
    Inconsistent(String),
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..off.checked_add(2)?).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off.checked_add(4)?).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    b.get(off..off.checked_add(8)?).map(|s| u64::from_le_bytes(s.try_into().expect("8 bytes")))
}

fn align_up(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// The 256 tokens, their offsets in the table, and where the table ends.
type TokenTable<'a> = (Vec<&'a [u8]>, Vec<usize>, usize);

/// The token table starting at `start`.
fn tokens_at(b: &[u8], start: usize) -> Option<TokenTable<'_>> {
    let mut toks = Vec::with_capacity(256);
    let mut offs = Vec::with_capacity(256);
    let mut p = start;
    for _ in 0..256 {
        let len = b.get(p..)?.iter().take(64).position(|&c| c == 0)?;
        if len == 0 {
            return None;
        }
        offs.push(p - start);
        toks.push(&b[p..p + len]);
        p += len + 1;
    }
    Some((toks, offs, p))
}

/// A table found in a byte image: where, and what it says.
#[derive(Debug)]
pub struct Tables {
    pub symbols: Vec<Symbol>,
    /// Offset of `kallsyms_token_table` in the image searched.
    pub token_table: usize,
    pub relative_base: u64,
}

fn decode_name(name: &[u8], tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() * 3);
    for &c in name {
        out.extend_from_slice(tokens[usize::from(c)]);
    }
    out
}

/// Reads name `i` starting at `p`: its token bytes and where the next begins.
fn name_at(b: &[u8], p: usize) -> Option<(&[u8], usize)> {
    let first = *b.get(p)?;
    let (len, body) = if first & 0x80 != 0 {
        (usize::from(first & 0x7f) | (usize::from(*b.get(p + 1)?) << 7), p + 2)
    } else {
        (usize::from(first), p + 1)
    };
    if len == 0 {
        return None;
    }
    Some((b.get(body..body + len)?, body + len))
}

/// Finds and decodes the kallsyms tables in `image` (typically `.rodata`).
pub fn find(image: &[u8]) -> Result<Tables, KallsymsError> {
    let mut last = KallsymsError::NoTokenTable;
    let mut from = 0;
    let mut tries = 0;
    while let Some(hit) =
        image.get(from..).and_then(|rest| rest.windows(DIGITS.len()).position(|w| w == DIGITS))
    {
        let digits = from + hit;
        from = digits + 1;
        tries += 1;
        if tries > MAX_CANDIDATES {
            return Err(KallsymsError::Inconsistent(format!(
                "more than {MAX_CANDIDATES} token-table look-alikes; giving up"
            )));
        }
        if Deadline::passed() {
            return Err(KallsymsError::Inconsistent(OUT_OF_TIME.into()));
        }
        match try_at(image, digits) {
            Ok(t) => return Ok(t),
            Err(e) => last = e,
        }
    }
    Err(last)
}

fn try_at(b: &[u8], digits: usize) -> Result<Tables, KallsymsError> {
    let bad = |r: &str| KallsymsError::Inconsistent(r.to_owned());
    // Walk back 0x30 tokens from "0" to the table's start.
    let mut start = digits;
    for _ in 0..0x30 {
        if start < 2 || b[start - 1] != 0 {
            return Err(KallsymsError::NoTokenTable);
        }
        let prev_end = start - 1;
        let prev_start = b[..prev_end].iter().rposition(|&c| c == 0).map_or(0, |z| z + 1);
        if prev_start == prev_end || prev_end - prev_start > 64 {
            return Err(KallsymsError::NoTokenTable);
        }
        start = prev_start;
    }
    let (tokens, offs, end) = tokens_at(b, start).ok_or(KallsymsError::NoTokenTable)?;
    // The token index follows, aligned; it must say where every token is.
    let index_at = (end..end + 16)
        .find(|&p| (0..256).all(|i| u16_at(b, p + 2 * i).map(usize::from) == Some(offs[i])))
        .ok_or_else(|| bad("no token index matches the token table"))?;
    // The markers come before the token table: right before it, or (from
    // 6.2, and in later 6.1 stable kernels) before kallsyms_seqs_of_names,
    // 3 bytes a symbol. Find a u32 run rising from 0 in plausible steps.
    let (markers_at, markers) =
        find_markers(b, start).ok_or_else(|| bad("no markers before the token table"))?;
    if markers.len() < 2 {
        return Err(bad("fewer than 257 symbols"));
    }
    let names_len_max = markers_at;
    // num_syms sits 4 or 8 bytes before the names; try the aligned places.
    let lo = (markers.len() - 1) * 256 + 1;
    let hi = markers.len() * 256;
    let search_from = markers_at.saturating_sub(64 << 20);
    let mut q = markers_at.saturating_sub(8) & !3;
    let mut steps = 0usize;
    while q > search_from {
        q -= 4;
        steps += 1;
        if Deadline::stops(steps) {
            return Err(bad(OUT_OF_TIME));
        }
        let Some(n) = u32_at(b, q).map(|v| v as usize) else { break };
        if n < lo || n > hi {
            continue;
        }
        for names in [q + 4, align_up(q + 4, 8)] {
            if let Some(t) = decode_all(b, names, n, (&markers, markers_at), &tokens) {
                // 6.1: offsets and base before the count. Later: after the
                // token index.
                let before = (q & !7).checked_sub(8).and_then(|base_at| {
                    Some((base_at.checked_sub(align_up(n.checked_mul(4)?, 8))?, base_at))
                });
                let after = align_up(index_at + 512, 8);
                let after = Some((after, align_up(after + 4 * n, 8)));
                let addrs = [before, after]
                    .into_iter()
                    .flatten()
                    .find_map(|(offsets_at, base_at)| addresses(b, offsets_at, base_at, n))
                    .ok_or_else(|| bad("no symbol addresses agree with the names"))?;
                let (relative_base, addrs) = addrs;
                let symbols = t
                    .into_iter()
                    .zip(addrs)
                    .map(|((name, kind), addr)| Symbol { name, kind, addr })
                    .collect();
                return Ok(Tables { symbols, token_table: start, relative_base });
            }
        }
        if q < names_len_max.saturating_sub(64 << 20) {
            break;
        }
    }
    Err(bad("no symbol count and names agree with the markers"))
}

/// The relative base at `base_at` and the `n` addresses that the offsets
/// at `offsets_at` give with it; `None` unless the base is a kernel address
/// and the addresses never fall (the tables are sorted by address).
fn addresses(b: &[u8], offsets_at: usize, base_at: usize, n: usize) -> Option<(u64, Vec<u64>)> {
    let relative_base = u64_at(b, base_at)?;
    if relative_base < 0xffff_8000_0000_0000 {
        return None;
    }
    let raw = b.get(offsets_at..offsets_at.checked_add(n.checked_mul(4)?)?)?;
    let mut out = Vec::with_capacity(n);
    let mut last = 0u64;
    for c in raw.chunks_exact(4) {
        let off = u32::from_le_bytes(c.try_into().expect("4 bytes"));
        // Read as i32: >= 0 is an absolute (per-CPU) value, < 0 is
        // `relative_base - 1 - off`, which is `relative_base + !off`.
        let addr = if off & 0x8000_0000 == 0 {
            u64::from(off)
        } else {
            relative_base.wrapping_add(u64::from(!off))
        };
        if addr < last {
            return None;
        }
        last = addr;
        out.push(addr);
    }
    // Symbols below the base are per-CPU offsets, which come first (a few
    // hundred of them); some must lie at or above it: zeros read as
    // offsets are not believed.
    let above = out.iter().any(|&a| a >= relative_base);
    above.then_some((relative_base, out))
}

/// Looks back from the token table at `tokens` for the markers array.
fn find_markers(b: &[u8], tokens: usize) -> Option<(usize, Vec<u32>)> {
    let step_ok = |d: u32| (256..=256 * 256).contains(&d);
    let floor = tokens.saturating_sub(16 << 20);
    let mut p = tokens & !3;
    while p > floor {
        p -= 4;
        if u32_at(b, p)? != 0 || !u32_at(b, p + 4).is_some_and(step_ok) {
            continue;
        }
        let mut markers = vec![0u32];
        let mut q = p + 4;
        while q + 4 <= tokens {
            let v = u32_at(b, q)?;
            let last = *markers.last().expect("one at least");
            if v <= last || !step_ok(v - last) || markers.len() > MAX_SYMS / 256 {
                break;
            }
            markers.push(v);
            q += 4;
        }
        let k = markers.len();
        let gap = tokens - q;
        if gap < 8 || (gap >= 3 * 256 * (k - 1) && gap <= 3 * 256 * k + 8) {
            return Some((p, markers));
        }
    }
    None
}

/// Decodes `n` names at `names`, checking them against the markers and the
/// markers' position. `None` if anything disagrees, or a name is longer
/// than a kernel's, or the names come to more than [`MAX_NAME_BYTES`].
fn decode_all(
    b: &[u8],
    names: usize,
    n: usize,
    (markers, markers_at): (&[u32], usize),
    tokens: &[&[u8]],
) -> Option<Vec<(String, char)>> {
    decode_within(b, names, n, (markers, markers_at), tokens, MAX_NAME_BYTES)
}

/// [`decode_all`], with at most `max_bytes` of names in all.
fn decode_within(
    b: &[u8],
    names: usize,
    n: usize,
    (markers, markers_at): (&[u32], usize),
    tokens: &[&[u8]],
    max_bytes: usize,
) -> Option<Vec<(String, char)>> {
    // Cheap test first: name 256 must start where the second marker says.
    let mut p = names;
    for _ in 0..256 {
        p = name_at(b, p)?.1;
    }
    if p - names != markers[1] as usize {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    let mut total = 0usize;
    p = names;
    for i in 0..n {
        if i % 256 == 0 && p - names != *markers.get(i / 256)? as usize {
            return None;
        }
        let (name, next) = name_at(b, p)?;
        let full = decode_name(name, tokens);
        total += full.len();
        if full.len() > MAX_NAME || total > max_bytes {
            return None;
        }
        let (&kind, rest) = full.split_first()?;
        out.push((String::from_utf8_lossy(rest).into_owned(), char::from(kind)));
        p = next;
    }
    // The names end at the markers, give or take alignment.
    (p <= markers_at && markers_at - p < 8).then_some(out)
}

/// The symbols of a vmlinux ELF, read from its `.rodata`.
pub fn from_vmlinux(elf: &[u8]) -> Result<Vec<Symbol>, String> {
    use object::{Object, ObjectSection};
    let file = object::File::parse(elf).map_err(|e| format!("not an ELF file: {e}"))?;
    let rodata = file.section_by_name(".rodata").ok_or("the ELF has no .rodata section")?;
    let data = rodata.data().map_err(|e| format!(".rodata: {e}"))?;
    let t = find(data).map_err(|e| e.to_string())?;
    Ok(t.symbols)
}

/// Looks symbols up by name.
pub fn by_name(symbols: &[Symbol]) -> HashMap<&str, &Symbol> {
    symbols.iter().map(|s| (s.name.as_str(), s)).collect()
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// Where scripts/kallsyms.c puts the tables.
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        /// 6.1: offsets and base first; no seqs_of_names.
        Early,
        /// 6.1 later stables and 6.2 on: the same, with seqs_of_names
        /// between the markers and the tokens.
        EarlySeqs,
        /// 6.12: offsets, base and seqs_of_names after the token index.
        Late,
    }

    /// Lays out kallsyms tables the way scripts/kallsyms.c does, from a
    /// symbol list, with a token table in which every byte stands for itself
    /// except a few that stand for common pairs.
    fn build(symbols: &[(u64, char, String)], base: u64, layout: Layout) -> (Vec<u8>, usize) {
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        // Bytes below '0' never occur in names: let them stand for pairs.
        let pairs: [&[u8]; 6] = [b"_t", b"ex", b"sy", b"s_", b"in", b"__"];
        for (i, p) in pairs.iter().enumerate() {
            tokens[i + 1] = p.to_vec();
        }
        tokens[0] = b"??".to_vec();
        let encode = |s: &[u8]| -> Vec<u8> {
            let mut out = Vec::new();
            let mut i = 0;
            while i < s.len() {
                if let Some(k) = pairs.iter().position(|p| s[i..].starts_with(p)) {
                    out.push(k as u8 + 1);
                    i += 2;
                } else {
                    out.push(s[i]);
                    i += 1;
                }
            }
            out
        };
        let pad8 = |v: &mut Vec<u8>| {
            while !v.len().is_multiple_of(8) {
                v.push(0);
            }
        };
        let offsets_and_base = |img: &mut Vec<u8>| {
            for (addr, _, _) in symbols {
                let off: i32 =
                    if *addr < 0x10_0000 { *addr as i32 } else { -((addr - base) as i32) - 1 };
                img.extend_from_slice(&off.to_le_bytes());
            }
            pad8(img);
            img.extend_from_slice(&base.to_le_bytes());
        };
        let seqs_of_names = |img: &mut Vec<u8>| {
            for i in 0..symbols.len() as u32 {
                img.extend_from_slice(&i.to_be_bytes()[1..]);
            }
            pad8(img);
        };
        let mut img = vec![0xeeu8; 40]; // unrelated bytes before
        pad8(&mut img);
        if !matches!(layout, Layout::Late) {
            offsets_and_base(&mut img);
        }
        img.extend_from_slice(&(symbols.len() as u32).to_le_bytes());
        pad8(&mut img);
        let names_at = img.len();
        let mut markers = Vec::new();
        for (i, (_, kind, name)) in symbols.iter().enumerate() {
            if i % 256 == 0 {
                markers.push((img.len() - names_at) as u32);
            }
            let mut full = vec![*kind as u8];
            full.extend_from_slice(&encode(name.as_bytes()));
            if full.len() > 0x7f {
                img.push(0x80 | (full.len() & 0x7f) as u8);
                img.push((full.len() >> 7) as u8);
            } else {
                img.push(full.len() as u8);
            }
            img.extend_from_slice(&full);
        }
        pad8(&mut img);
        for m in &markers {
            img.extend_from_slice(&m.to_le_bytes());
        }
        pad8(&mut img);
        if matches!(layout, Layout::EarlySeqs) {
            seqs_of_names(&mut img);
        }
        let token_at = img.len();
        let mut offs = Vec::new();
        for t in &tokens {
            offs.push((img.len() - token_at) as u16);
            img.extend_from_slice(t);
            img.push(0);
        }
        pad8(&mut img);
        for o in offs {
            img.extend_from_slice(&o.to_le_bytes());
        }
        if matches!(layout, Layout::Late) {
            pad8(&mut img);
            offsets_and_base(&mut img);
            seqs_of_names(&mut img);
        }
        img.extend(vec![0xeeu8; 40]);
        (img, token_at)
    }

    fn symbols(n: usize) -> Vec<(u64, char, String)> {
        let mut v: Vec<(u64, char, String)> = (0..n)
            .map(|i| {
                (
                    0xffff_ffff_8100_0000 + 16 * i as u64,
                    if i % 3 == 0 { 't' } else { 'T' },
                    format!("__x64_sys_thing_{i}_in_text"),
                )
            })
            .collect();
        v.insert(0, (0x1000, 'A', "cpu_debug_store".into())); // a per-CPU absolute
        v.push((0xffff_ffff_8200_0000, 'D', format!("long_{}", "x".repeat(200)))); // a "big" name
        v
    }

    #[test]
    fn finds_generated_tables_in_each_layout() {
        use Layout::*;
        for (n, layout) in
            [(300, Early), (1000, EarlySeqs), (5000, EarlySeqs), (300, Late), (5000, Late)]
        {
            let syms = symbols(n);
            let (img, token_at) = build(&syms, 0xffff_ffff_8100_0000, layout);
            let t = find(&img).unwrap_or_else(|e| panic!("{n} symbols, {layout:?}: {e}"));
            assert_eq!(t.token_table, token_at);
            let got: Vec<(u64, char, String)> =
                t.symbols.into_iter().map(|s| (s.addr, s.kind, s.name)).collect();
            assert_eq!(got, syms);
        }
    }

    #[test]
    fn damaged_generated_tables_are_refused() {
        let syms = symbols(1000);
        let (img, token_at) = build(&syms, 0xffff_ffff_8100_0000, Layout::EarlySeqs);
        // Token index wrong.
        let mut b = img.clone();
        let idx = b.len() - 40 - 2 * 200;
        b[idx] ^= 1;
        assert!(find(&b).is_err());
        // A name's length byte changed: names no longer meet the markers.
        let mut b = img.clone();
        let first_name = b.windows(4).position(|w| w == [b'c', b'p', b'u', b'_']).unwrap() - 2;
        b[first_name] += 1;
        assert!(find(&b).is_err());
        // Cut anywhere: never a panic.
        for cut in (0..img.len()).step_by(97) {
            let _ = find(&img[..cut]);
        }
        assert!(find(&img[..token_at]).is_err());
        // Late layout: an offset that breaks the address order, or a base
        // that is no kernel address, and the addresses are not believed.
        let (img, _) = build(&syms, 0xffff_ffff_8100_0000, Layout::Late);
        let base = 0xffff_ffff_8100_0000u64.to_le_bytes();
        let base_at = img.windows(8).position(|w| w == base).unwrap();
        let offsets_at = base_at - (4 * syms.len()).next_multiple_of(8);
        let mut b = img.clone();
        b[offsets_at + 4 * 500..offsets_at + 4 * 504].copy_from_slice(&[0xfd; 16]);
        let e = find(&b).unwrap_err().to_string();
        assert!(e.contains("addresses"), "{e}");
        let mut b = img.clone();
        b[base_at + 7] = 0;
        let e = find(&b).unwrap_err().to_string();
        assert!(e.contains("addresses"), "{e}");
        // Zeros where the offsets are: sorted, yet no kernel address.
        let mut b = img.clone();
        b[offsets_at..offsets_at + 4 * syms.len()].fill(0);
        let e = find(&b).unwrap_err().to_string();
        assert!(e.contains("addresses"), "{e}");
        assert!(find(&img).is_ok());
    }

    /// Names are bounded one by one (a kernel's longest) and in all (a
    /// planted table of long tokens would decode to gigabytes).
    #[test]
    fn decoded_names_are_bounded_each_and_in_all() {
        let mut syms = symbols(1000);
        let (img, _) = build(&syms, 0xffff_ffff_8100_0000, Layout::EarlySeqs);
        let t = find(&img).unwrap();
        let all: usize = t.symbols.iter().map(|s| s.name.len() + 1).sum();
        // The same tables, allowed one byte less than their names come to.
        let names = img.windows(4).position(|w| w == [b'c', b'p', b'u', b'_']).unwrap() - 2;
        let (tokens, _, _) = tokens_at(&img, t.token_table).unwrap();
        let (markers_at, markers) = find_markers(&img, t.token_table).unwrap();
        let n = syms.len();
        assert!(decode_within(&img, names, n, (&markers, markers_at), &tokens, all).is_some());
        assert!(decode_within(&img, names, n, (&markers, markers_at), &tokens, all - 1).is_none());
        // A name longer than a kernel's is no kallsyms.
        syms.push((0xffff_ffff_8200_1000, 'D', "y".repeat(MAX_NAME)));
        let (img, _) = build(&syms, 0xffff_ffff_8100_0000, Layout::EarlySeqs);
        assert!(find(&img).is_err());
    }

    #[test]
    fn planted_look_alikes_are_bounded() {
        // Many copies of a real token table and index (as a hostile guest
        // could plant) end the search after a fixed number of tries.
        let (img, token_at) = build(&symbols(300), 0xffff_ffff_8100_0000, Layout::Early);
        let table = &img[token_at..img.len() - 40];
        let mut b = Vec::new();
        for _ in 0..100 {
            b.extend_from_slice(&[0xaa; 64]);
            b.extend_from_slice(table);
        }
        let e = find(&b).unwrap_err().to_string();
        assert!(e.contains("look-alikes"), "{e}");
    }

    /// The search stops at the check's deadline, saying so, and finds the
    /// tables without one.
    #[test]
    fn the_search_stops_at_the_deadline() {
        use crate::integrity::check::Deadline;
        let (img, _) = build(&symbols(1000), 0xffff_ffff_8100_0000, Layout::EarlySeqs);
        let past = Deadline {
            at: std::time::Instant::now() - std::time::Duration::from_secs(1),
            limit: std::time::Duration::from_secs(30),
        };
        let entered = Deadline::enter(Some(past));
        let e = find(&img).unwrap_err().to_string();
        assert!(e.contains(OUT_OF_TIME), "{e}");
        // Within one candidate, the search for the symbol count stops too.
        let digits = img.windows(DIGITS.len()).position(|w| w == DIGITS).unwrap();
        let e = try_at(&img, digits).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains(OUT_OF_TIME), "{e}");
        drop(entered);
        assert!(try_at(&img, digits).is_ok());
        assert!(find(&img).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_around_a_digit_run_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..3000), at in 0usize..3000) {
            let mut b = bytes;
            let at = at.min(b.len());
            b.splice(at..at, DIGITS.iter().copied());
            let _ = find(&b);
        }
    }
}
