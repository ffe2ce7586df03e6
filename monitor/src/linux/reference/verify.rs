//! A running kernel's text and read-only data against its reference.

use std::collections::HashMap;

use super::{
    Difference, Forms, Judgement, Reference, RewriteKind, RewriteSite, Rewrites, differences, judge,
};
use crate::addr::{GuestPhysAddr, PAGE_BYTES, PAGE_SIZE};
use crate::integrity::RegionLayout;
use crate::linux::region::Region;
use crate::memory::GuestMemory;

/// Read-only data the kernel writes while it boots (`__ro_after_init`),
/// by link address: not compared byte for byte, since the image holds what
/// it was before boot. Of it, the jump table and the static call sites,
/// which the kernel only sorts, are compared as sets of entries.
#[derive(Debug, Clone, Default)]
pub struct BootWritten {
    pub range: Option<(u64, u64)>,
    pub jump_table: Option<(u64, u64)>,
    pub static_call_sites: Option<(u64, u64)>,
    /// Buffers of raw bytes in it (each `raw_data`, to the symbol after
    /// it): their words are no pointers to judge.
    pub raw: Vec<(u64, u64)>,
}

impl BootWritten {
    /// The ranges as the profile's symbols bound them.
    pub fn of(p: &crate::linux::profile::Profile) -> Self {
        let span = |a: &str, b: &str| {
            let (a, b) = (p.symbol(a)?.addr, p.symbol(b)?.addr);
            (a <= b).then_some((a, b))
        };
        BootWritten {
            range: span("__start_ro_after_init", "__end_ro_after_init"),
            jump_table: span("__start___jump_table", "__stop___jump_table"),
            static_call_sites: span("__start_static_call_sites", "__stop_static_call_sites"),
            raw: p
                .symbols()
                .iter()
                .enumerate()
                .filter(|(_, s)| s.name == "raw_data")
                .filter_map(|(i, raw)| {
                    let next = p.symbols()[i..].iter().find(|s| s.addr > raw.addr)?;
                    Some((raw.addr, next.addr))
                })
                .collect(),
        }
    }

    /// Whether link address `a` lies in the data written at boot.
    pub fn holds(&self, a: u64) -> bool {
        self.range.is_some_and(|(s, e)| a >= s && a < e)
    }
}

/// What a comparison of the kernel's pages with the reference found.
#[derive(Debug, Default)]
pub struct Verification {
    /// Pages compared.
    pub pages: u64,
    /// Bytes of read-only data written at boot that differ from the image
    /// (outside the tables compared as sets): not judged.
    pub boot_written: u64,
    /// Entries of the jump table and static call sites compared as sets.
    pub table_entries: u64,
    /// Runs past [`MAX_RUNS`], not kept (each a mismatch unless judged).
    pub dropped: u64,
    /// Words of the other data written at boot checked as pointers: none
    /// may lead into the module area (but to a page's start), or into
    /// kernel text but where a symbol starts.
    pub boot_pointers: u64,
    /// Pages the reference does not hold (past a kept section).
    pub outside: Vec<u64>,
    /// Pages that could not be read from guest memory.
    pub unreadable: Vec<u64>,
    /// Every run of bytes that differs, by link address, judged: allowed
    /// when every byte lies on a site that holds a form the kernel writes
    /// at boot; for the patch review when some lie on sites it patches as
    /// it runs; refused otherwise.
    pub differences: Vec<Judged>,
}

/// A run of differing bytes, judged.
#[derive(Debug, Clone)]
pub struct Judged {
    pub diff: Difference,
    pub judgement: Judgement,
    /// Link address of the first byte that has that judgement (in a run
    /// that joins sites, the one to name).
    pub at: u64,
}

/// Compares the text and read-only data pages of `regions` (as the guest
/// maps them, `slide` bytes above their link addresses) with `r`; `names`
/// names code at run-time addresses (for thunks), `slot` reads a paravirt
/// op's slot; `boot` is the data written at boot, not compared byte for byte.
pub fn verify_pages<M: GuestMemory + ?Sized>(
    r: &Reference,
    w: &Rewrites,
    mem: &M,
    regions: &[RegionLayout],
    slide: u64,
    (names, slot): (super::forms::Names<'_>, super::forms::Slot<'_>),
    boot: &BootWritten,
) -> Verification {
    let mut out = Verification::default();
    let kept: Vec<&RegionLayout> =
        regions.iter().filter(|g| Region::Text.is(&g.name) || Region::Rodata.is(&g.name)).collect();
    let frames: HashMap<u64, GuestPhysAddr> =
        kept.iter().flat_map(|g| g.pages.iter().map(|p| (p.gva.raw(), p.gpa))).collect();
    // The guest's bytes at a run-time address, across pages.
    let live = |at: u64, len: usize| -> Option<Vec<u8>> {
        let mut b = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let a = at.checked_add(done as u64)?;
            let gpa = frames.get(&(a & !(PAGE_SIZE - 1)))?;
            let off = (a & (PAGE_SIZE - 1)) as usize;
            let n = (PAGE_BYTES - off).min(len - done);
            mem.read(GuestPhysAddr(gpa.raw() + off as u64), &mut b[done..done + n]).ok()?;
            done += n;
        }
        Some(b)
    };
    let replacement =
        |at: u64, len: u8| r.expected(at.wrapping_sub(slide), usize::from(len), slide);
    let forms = Forms { names, replacement: &replacement, slot };
    // Every replacement of each alternative site, at run-time addresses.
    let mut alternatives: HashMap<u64, Vec<(u64, u8)>> = HashMap::new();
    for s in &w.sites {
        if let RewriteKind::Alternative { replacement, replacement_len } = s.kind {
            alternatives
                .entry(s.addr)
                .or_default()
                .push((replacement.wrapping_add(slide), replacement_len));
        }
    }
    let judge_site = |s: &RewriteSite| -> Judgement {
        let n = usize::from(s.len);
        let ip = s.addr.wrapping_add(slide);
        let (Some(expected), Some(found)) = (r.expected(s.addr, n, slide), live(ip, n)) else {
            return Judgement::Refused;
        };
        let also = alternatives.get(&s.addr).map_or(&[][..], Vec::as_slice);
        let kind = match s.kind {
            RewriteKind::Alternative { replacement, replacement_len } => RewriteKind::Alternative {
                replacement: replacement.wrapping_add(slide),
                replacement_len,
            },
            RewriteKind::JumpLabel { target } => {
                RewriteKind::JumpLabel { target: target.wrapping_add(slide) }
            }
            k => k,
        };
        judge(kind, ip, &expected, &found, also, &forms)
    };
    let mut page = vec![0u8; PAGE_BYTES];
    for g in kept {
        for p in &g.pages {
            let link = p.gva.raw().wrapping_sub(slide);
            if mem.read(p.gpa, &mut page).is_err() {
                out.unreadable.push(link);
                continue;
            }
            let Some(found) = differences(r, w, link, &page, slide) else {
                out.outside.push(link);
                continue;
            };
            out.pages += 1;
            for d in found {
                // A run wholly in the data written at boot; one that runs
                // past its end is judged whole.
                let last = d.addr + d.found.len() as u64 - 1;
                if boot.holds(d.addr) && boot.holds(last) {
                    out.boot_written += d.found.len() as u64;
                    continue;
                }
                if out.differences.len() >= MAX_RUNS {
                    out.dropped += 1;
                    continue;
                }
                let judged: Vec<(&RewriteSite, Judgement)> =
                    d.sites.iter().map(|s| (s, judge_site(s))).collect();
                // Each differing byte takes the best judgement of the sites it lies on.
                let rank = |j: Judgement| match j {
                    Judgement::Allowed => 0,
                    Judgement::RunTime => 1,
                    Judgement::Refused => 2,
                };
                // The worst judgement, at the first byte that has it.
                let (worst, at) = (0..d.found.len())
                    .filter(|&k| d.expected[k] != d.found[k])
                    .map(|k| {
                        let b = d.addr + k as u64;
                        let j = judged
                            .iter()
                            .filter(|(s, _)| (s.addr..s.addr + u64::from(s.len)).contains(&b))
                            .map(|(_, j)| *j)
                            .min_by_key(|j| rank(*j))
                            .unwrap_or(Judgement::Refused);
                        (j, b)
                    })
                    .fold((Judgement::Allowed, d.addr), |(w, at), (j, b)| {
                        if rank(j) > rank(w) { (j, b) } else { (w, at) }
                    });
                out.differences.push(Judged { diff: d, judgement: worst, at });
            }
        }
    }
    let tables = [(boot.jump_table, 16usize), (boot.static_call_sites, 8)];
    for (span, size) in tables {
        let Some((start, end)) = span else { continue };
        let Ok(len) = usize::try_from(end - start) else { continue };
        let (Some(was), Some(now)) =
            (r.expected(start, len, slide), live(start.wrapping_add(slide), len))
        else {
            continue;
        };
        out.table_entries += (len / size) as u64;
        out.differences.extend(
            unsorted_entries(&was, &now, start, slide, size).into_iter().map(|d| Judged {
                at: d.addr,
                diff: d,
                judgement: Judgement::Refused,
            }),
        );
    }
    // The rest of the data written at boot: what it holds is the boot's,
    // but a pointer in it that leads into code must lead where code
    // starts (a function of the kernel's), never into a module (but to the
    // start of a page there: the bounds of the module area's ranges).
    if let (Some((start, end)), Some(text)) = (boot.range, r.section(".text")) {
        let not_pointers = |a: u64| {
            [boot.jump_table, boot.static_call_sites]
                .iter()
                .flatten()
                .chain(&boot.raw)
                .any(|(s, e)| a >= *s && a < *e)
        };
        let code = text.addr.wrapping_add(slide)..text.end().wrapping_add(slide);
        let mut at = start.next_multiple_of(8);
        while at + 8 <= end {
            let word = live(at.wrapping_add(slide), 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes);
            let Some(v) = word.filter(|_| !not_pointers(at)) else {
                at += 8;
                continue;
            };
            out.boot_pointers += 1;
            // Page-aligned addresses in the module area are bounds of its
            // ranges (6.12's `execmem_info`), not code.
            let into_modules = MODULE_AREA.contains(&v) && !v.is_multiple_of(PAGE_SIZE);
            // Into the text: where a function starts, or (a saved stack
            // trace's return address) just after a call in the image.
            let mid_function =
                code.contains(&v) && names(v).is_none() && !after_call(r, v.wrapping_sub(slide));
            let bad = mid_function || into_modules;
            if bad {
                let was = r.expected(at, 8, slide).unwrap_or_default();
                let diff = Difference {
                    addr: at,
                    expected: was,
                    found: v.to_le_bytes().to_vec(),
                    sites: Vec::new(),
                };
                out.differences.push(Judged { at, diff, judgement: Judgement::Refused });
            }
            at += 8;
        }
    }
    out
}

/// Whether the image's text just before `link` (a link-time address) ends
/// a call, so that `link` is a return address: `call rel32`, `call *%reg`
/// (with or without a REX prefix), `call *disp8(%reg)`, `call *disp32(%reg)`
/// and `call *rel32(%rip)`. 6.12 keeps saved stack traces in data written
/// at boot, full of such addresses.
fn after_call(r: &Reference, link: u64) -> bool {
    let Some(b) = link.checked_sub(7).and_then(|a| r.expected(a, 7, 0)) else { return false };
    let modrm = |m: u8, md: u8| m & 0xc0 == md && (m >> 3) & 7 == 2;
    b[2] == 0xe8
        || (b[5] == 0xff && modrm(b[6], 0xc0))
        || (b[4] & 0xf0 == 0x40 && b[5] == 0xff && modrm(b[6], 0xc0))
        || (b[4] == 0xff && modrm(b[5], 0x40))
        || (b[1] == 0xff && (modrm(b[2], 0x80) || b[2] == 0x15))
}

/// Most differing runs kept of one kernel: an untouched guest has about
/// 110,000 (6.12), nearly all boot-time rewrites in allowed forms.
const MAX_RUNS: usize = 400_000;

/// Where x86-64 Linux loads modules (`MODULES_VADDR` to `MODULES_END`).
const MODULE_AREA: std::ops::Range<u64> = 0xffff_ffff_c000_0000..0xffff_ffff_ff00_0000;

/// The entries of a table the kernel sorts at boot (`now`, the guest's) that
/// are not among the image's (`was`), made absolute at `slide`: each as a
/// difference at its place. A table that does not parse differs whole.
fn unsorted_entries(
    was: &[u8],
    now: &[u8],
    start: u64,
    slide: u64,
    size: usize,
) -> Vec<Difference> {
    use crate::linux::patch::{parse_jump_entries, parse_static_call_sites};
    let base = start.wrapping_add(slide);
    let rows = |b: &[u8]| -> Option<Vec<[u64; 3]>> {
        Some(match size {
            16 => parse_jump_entries(b, base)
                .ok()?
                .iter()
                .map(|e| [e.code, e.target, e.key | u64::from(e.branch)])
                .collect(),
            _ => parse_static_call_sites(b, base)
                .ok()?
                .iter()
                .map(|e| [e.addr, e.key, u64::from(e.tail)])
                .collect(),
        })
    };
    let whole = || {
        vec![Difference {
            addr: start,
            expected: was.to_vec(),
            found: now.to_vec(),
            sites: Vec::new(),
        }]
    };
    let (Some(mut expected), Some(found)) = (rows(was), rows(now)) else { return whole() };
    expected.sort_unstable();
    let mut out = Vec::new();
    for (i, row) in found.iter().enumerate() {
        match expected.binary_search(row) {
            Ok(k) => {
                expected.remove(k);
            }
            Err(_) => {
                let at = i * size;
                out.push(Difference {
                    addr: start + at as u64,
                    expected: was[at..at + size].to_vec(),
                    found: now[at..at + size].to_vec(),
                    sites: Vec::new(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0xffff_ffff_8250_0000;

    /// A jump table of `(code, target, key)` laid out from `BASE`, relative
    /// as the kernel keeps it.
    fn table(rows: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (i, (code, target, key)) in rows.iter().enumerate() {
            let at = BASE + 16 * i as u64;
            let rel32 =
                |to: u64, from: u64| i32::try_from(to.wrapping_sub(from).cast_signed()).unwrap();
            b.extend(rel32(*code, at).to_le_bytes());
            b.extend(rel32(*target, at + 4).to_le_bytes());
            b.extend(key.wrapping_sub(at + 8).to_le_bytes());
        }
        b
    }

    #[test]
    fn a_table_the_kernel_sorted_is_its_image_and_a_changed_entry_is_not() {
        let t = 0xffff_ffff_8100_0000u64;
        let k = 0xffff_ffff_8260_0000u64;
        let rows = [
            (t + 0x300, t + 0x340, k),
            (t + 0x100, t + 0x180, k + 0x10),
            (t + 0x200, t + 0x210, k),
        ];
        let was = table(&rows);
        let mut sorted = rows;
        sorted.sort();
        assert!(unsorted_entries(&was, &table(&sorted), BASE, 0, 16).is_empty());
        // One entry's target moved (a jump label made to jump elsewhere).
        let mut forged = sorted;
        forged[1].1 = t + 0x666;
        let d = unsorted_entries(&was, &table(&forged), BASE, 0, 16);
        assert_eq!(d.len(), 1, "{d:x?}");
        assert_eq!(d[0].addr, BASE + 16);
        // An entry twice in place of another: one too many of it.
        let mut doubled = sorted;
        doubled[2] = doubled[0];
        assert_eq!(unsorted_entries(&was, &table(&doubled), BASE, 0, 16).len(), 1);
        // A table that does not parse differs whole.
        assert_eq!(unsorted_entries(&was, &was[..17], BASE, 0, 16).len(), 1);
    }

    #[test]
    fn pointers_in_data_written_at_boot_lead_to_functions_or_nowhere_in_a_module() {
        use crate::addr::{GuestVirtAddr, PAGE_BYTES};
        use crate::integrity::{PageSpec, RegionKind};
        use crate::x86::Perms;
        const TEXT: u64 = 0xffff_ffff_8100_0000;
        const DATA: u64 = 0xffff_ffff_8200_0000;
        let section = |name: &str, addr: u64| super::super::Section {
            name: name.into(),
            addr,
            bytes: vec![0; PAGE_BYTES],
        };
        let mut text = section(".text", TEXT);
        text.bytes[0x40..0x45].copy_from_slice(&[0xe8, 1, 2, 3, 4]);
        text.bytes[0x60..0x62].copy_from_slice(&[0xff, 0xd0]);
        let r = Reference {
            sections: vec![text, section(".rodata", DATA)],
            relocs: super::super::Relocs::default(),
        };
        let words: [(usize, u64); 7] = [
            (0x10, 0xffff_ffff_c000_1234), // into a module's code
            (0x18, TEXT + 0x20),           // into a function, not its start
            (0x20, TEXT),                  // a function
            (0x28, 0xffff_ffff_c035_2000), // a range's bound in the module area
            (0x30, TEXT + 0x45),           // a return address: after a call rel32
            (0x38, TEXT + 0x62),           // after `call *%rax`
            (0x40, TEXT + 0x21),           // into a function, in a raw buffer
        ];
        let mut ram = vec![0u8; 2 * PAGE_BYTES];
        // The guest's text is the image's.
        ram[..PAGE_BYTES].copy_from_slice(&r.sections[0].bytes);
        for (off, v) in words {
            ram[PAGE_BYTES + off..PAGE_BYTES + off + 8].copy_from_slice(&v.to_le_bytes());
        }
        let mem = crate::memory::RawDump::from_bytes(ram);
        let perms = Perms { writable: false, user: false, executable: false };
        let region = |name: Region, gva: u64, gpa: u64| RegionLayout {
            name: name.name().into_owned(),
            kind: RegionKind::ReadOnlyData,
            pages: vec![PageSpec { gva: GuestVirtAddr(gva), gpa: GuestPhysAddr(gpa), perms }],
        };
        let regions = [region(Region::Text, TEXT, 0), region(Region::Rodata, DATA, PAGE_SIZE)];
        let names = |a: u64| (a == TEXT).then(|| "start_kernel".to_owned());
        let slot = |_: u64| None;
        let boot = BootWritten {
            range: Some((DATA, DATA + PAGE_SIZE)),
            raw: vec![(DATA + 0x40, DATA + 0x48)],
            ..BootWritten::default()
        };
        let v = verify_pages(&r, &Rewrites::default(), &mem, &regions, 0, (&names, &slot), &boot);
        let refused: Vec<u64> = v
            .differences
            .iter()
            .filter(|j| j.judgement == Judgement::Refused)
            .map(|j| j.at - DATA)
            .collect();
        assert_eq!(refused, [0x10, 0x18]);
        assert_eq!(v.boot_pointers, PAGE_SIZE / 8 - 1, "the raw buffer's word is none");
        // The words differ from the image, but data written at boot is not
        // compared byte for byte.
        assert_eq!(v.boot_written, 56);
    }
}
