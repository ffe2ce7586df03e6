#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::cast_sign_loss)]

use super::*;

const TEXT_AT: u64 = 0xffff_ffff_8100_0000;
const RODATA_AT: u64 = 0xffff_ffff_8200_0000;
const SLIDE: u64 = 0x1e00_0000;

/// A 64-bit little-endian ELF holding `sections` (name, address, bytes),
/// each a PROGBITS section, with `tail` after it, as a vmlinuz's payload
/// has its relocation table.
pub(crate) fn elf(sections: &[(&str, u64, Vec<u8>)], tail: &[u8]) -> Vec<u8> {
    let mut names = vec![0u8];
    let mut name_at = Vec::new();
    for (n, _, _) in sections {
        name_at.push(names.len() as u32);
        names.extend_from_slice(n.as_bytes());
        names.push(0);
    }
    let shstrtab_name = names.len() as u32;
    names.extend_from_slice(b".shstrtab\0");
    let mut out = vec![0u8; 64];
    let mut offsets = Vec::new();
    for (_, _, b) in sections {
        offsets.push(out.len() as u64);
        out.extend_from_slice(b);
    }
    let names_at = out.len() as u64;
    out.extend_from_slice(&names);
    while !out.len().is_multiple_of(8) {
        out.push(0);
    }
    let shoff = out.len() as u64;
    let shdr = |name: u32, typ: u32, flags: u64, addr: u64, off: u64, size: u64| {
        let mut h = Vec::with_capacity(64);
        h.extend_from_slice(&name.to_le_bytes());
        h.extend_from_slice(&typ.to_le_bytes());
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&addr.to_le_bytes());
        h.extend_from_slice(&off.to_le_bytes());
        h.extend_from_slice(&size.to_le_bytes());
        h.extend_from_slice(&[0u8; 8]); // link, info
        h.extend_from_slice(&1u64.to_le_bytes()); // align
        h.extend_from_slice(&0u64.to_le_bytes()); // entsize
        h
    };
    out.extend(shdr(0, 0, 0, 0, 0, 0));
    for (i, (_, addr, b)) in sections.iter().enumerate() {
        out.extend(shdr(name_at[i], 1, 2, *addr, offsets[i], b.len() as u64));
    }
    out.extend(shdr(shstrtab_name, 3, 0, 0, names_at, names.len() as u64));
    let shnum = sections.len() as u16 + 2;
    let h = &mut out[..64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // 64-bit
    h[5] = 1; // little-endian
    h[6] = 1;
    h[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    h[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    h[20..24].copy_from_slice(&1u32.to_le_bytes());
    h[40..48].copy_from_slice(&shoff.to_le_bytes());
    h[52..54].copy_from_slice(&64u16.to_le_bytes());
    h[58..60].copy_from_slice(&64u16.to_le_bytes());
    h[60..62].copy_from_slice(&shnum.to_le_bytes());
    h[62..64].copy_from_slice(&(shnum - 1).to_le_bytes());
    out.extend_from_slice(tail);
    out
}

/// A relocation table: `[0][64..][0][inverse 32..][0][32..]`.
pub(crate) fn relocs(abs64: &[u64], inv32: &[u64], abs32: &[u64]) -> Vec<u8> {
    let mut t = Vec::new();
    for list in [abs64, inv32, abs32] {
        t.extend_from_slice(&0u32.to_le_bytes());
        for a in list {
            t.extend_from_slice(&(*a as u32).to_le_bytes());
        }
    }
    t
}

fn sample() -> Vec<u8> {
    let mut text = vec![0x90u8; 0x2000];
    // mov $sym, %rax (32-bit sign-extended absolute) at +0x10: its imm32.
    text[0x10..0x13].copy_from_slice(&[0x48, 0xc7, 0xc0]);
    text[0x13..0x17].copy_from_slice(&((TEXT_AT + 0x1000) as u32).to_le_bytes());
    // An inverse 32-bit value at +0x20.
    text[0x20..0x24].copy_from_slice(&0x1000u32.to_le_bytes());
    let mut rodata = vec![0u8; 0x1000];
    // A pointer to text at +0x8 (64-bit absolute).
    rodata[0x8..0x10].copy_from_slice(&(TEXT_AT + 0x40).to_le_bytes());
    let table = relocs(&[RODATA_AT + 0x8], &[TEXT_AT + 0x20], &[TEXT_AT + 0x13]);
    elf(
        &[
            (".text", TEXT_AT, text),
            (".rodata", RODATA_AT, rodata),
            (".data", RODATA_AT + 0x10_0000, vec![1; 64]),
            (
                ".smp_locks",
                RODATA_AT + 0x20_0000,
                (0x30i32 - 0x20_0000 - 0x100_0000).to_le_bytes().to_vec(),
            ),
        ],
        &table,
    )
}

#[test]
fn expected_bytes_are_the_image_relocated_by_the_slide() {
    let r = Reference::from_vmlinux(&sample(), (RODATA_AT, RODATA_AT + 0x1000)).unwrap();
    let names: Vec<&str> = r.sections.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, [".text", ".rodata", ".smp_locks"], ".data is not kept");
    assert_eq!((r.relocs.abs64.len(), r.relocs.abs32.len(), r.relocs.inv32.len()), (1, 1, 1));
    let at = |a: u64, n: usize| r.expected(a, n, SLIDE).unwrap();
    let imm = u32::from_le_bytes(at(TEXT_AT + 0x13, 4).try_into().unwrap());
    assert_eq!(imm, (TEXT_AT + SLIDE + 0x1000) as u32);
    assert_eq!(at(TEXT_AT + 0x20, 4), (0x1000u32.wrapping_sub(SLIDE as u32)).to_le_bytes());
    let ptr = u64::from_le_bytes(at(RODATA_AT + 0x8, 8).try_into().unwrap());
    assert_eq!(ptr, TEXT_AT + SLIDE + 0x40);
    // A range that starts inside a relocated value gets its relocated tail.
    let whole = at(TEXT_AT + 0x10, 16);
    assert_eq!(at(TEXT_AT + 0x15, 4), whole[5..9]);
    // Slide 0: the image as linked. Out of every section: nothing.
    assert_eq!(
        r.expected(TEXT_AT + 0x13, 4, 0).unwrap(),
        ((TEXT_AT + 0x1000) as u32).to_le_bytes()
    );
    assert!(r.expected(TEXT_AT + 0x1ffe, 4, SLIDE).is_none(), "runs past .text");
    assert!(r.expected(RODATA_AT + 0x10_0000, 4, SLIDE).is_none());
}

#[test]
fn a_stored_reference_reads_back_the_same_and_a_bad_one_is_refused() {
    let r = Reference::from_vmlinux(&sample(), (RODATA_AT, RODATA_AT + 0x1000)).unwrap();
    let stored = ReferenceFile::write(&r).unwrap();
    assert_eq!(ReferenceFile::read(&stored).unwrap(), r);
    let raw = |r: &Reference| {
        let mut v = Vec::new();
        flate2::read::GzDecoder::new(&ReferenceFile::write(r).unwrap()[..])
            .read_to_end(&mut v)
            .unwrap();
        v
    };
    let gz = |raw: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(raw).unwrap();
        e.finish().unwrap()
    };
    use std::io::{Read, Write};
    let good = raw(&r);
    let mut other = good.clone();
    other[..6].copy_from_slice(b"vigil?");
    let mut huge = good.clone();
    let n = FORMAT.len() + 1;
    huge[n..n + 4].copy_from_slice(&100_000u32.to_le_bytes());
    for (bytes, why) in [
        (b"not gzip".to_vec(), "not a gzip"),
        (gz(&other), "not \"vigil-kernel-reference 1\""),
        (gz(&good[..good.len() - 3]), "cut short"),
        (gz(&[good.clone(), vec![0]].concat()), "after its end"),
        (gz(&huge), "more than 256"),
    ] {
        let e = ReferenceFile::read(&bytes).unwrap_err().to_string();
        assert!(e.contains(why), "expected {why:?}: {e}");
    }
}

#[test]
fn a_relocation_table_is_three_lists_or_refused() {
    let ok = parse_relocs(&relocs(&[RODATA_AT], &[], &[TEXT_AT, TEXT_AT + 4])).unwrap();
    assert_eq!(
        (ok.abs64, ok.inv32, ok.abs32),
        (vec![RODATA_AT], vec![], vec![TEXT_AT, TEXT_AT + 4])
    );
    for (t, why) in [
        (vec![], "not built relocatable"),
        (vec![0, 0, 0], "whole number"),
        (relocs(&[], &[], &[])[4..].to_vec(), "end marks"),
        ([relocs(&[], &[], &[]), vec![0; 4]].concat(), "end marks"),
    ] {
        let e = parse_relocs(&t).unwrap_err().to_string();
        assert!(e.contains(why), "{why}: {e}");
    }
    // The image without a table after it.
    let bare = elf(&[(".text", TEXT_AT, vec![0x90; 16])], &[]);
    let e = Reference::from_vmlinux(&bare, (RODATA_AT, RODATA_AT)).unwrap_err().to_string();
    assert!(e.contains("CONFIG_RELOCATABLE"), "{e}");
}

#[test]
fn rewrite_sites_come_from_their_tables() {
    let r = Reference::from_vmlinux(&sample(), (RODATA_AT, RODATA_AT + 0x1000)).unwrap();
    let w = Rewrites::of(&r).unwrap();
    assert_eq!(w.sites, [RewriteSite { addr: TEXT_AT + 0x30, len: 1, kind: RewriteKind::Lock }]);
    assert!(w.absent.contains(&".altinstructions") && w.absent.contains(&".return_sites"));
    assert_eq!(w.overlapping(TEXT_AT + 0x2c, 8).count(), 1);
    assert_eq!(w.overlapping(TEXT_AT + 0x31, 8).count(), 0);
}

mod forms {
    use super::super::{Forms, Judgement, Op, RewriteKind, effective, judge as judged};

    const SITE: u64 = 0xffff_ffff_9100_1000;
    const RETURN_THUNK: u64 = 0xffff_ffff_9200_0000;
    const THUNK_RAX: u64 = 0xffff_ffff_9200_0040;
    const THUNK_R11: u64 = 0xffff_ffff_9200_0100;
    const REPLACEMENTS: u64 = 0xffff_ffff_9300_0000;
    const TARGET: u64 = 0xffff_ffff_9100_8000;

    fn names(a: u64) -> Option<String> {
        match a {
            RETURN_THUNK => Some("__x86_return_thunk".into()),
            THUNK_RAX => Some("__x86_indirect_thunk_rax".into()),
            THUNK_R11 => Some("__x86_indirect_thunk_r11".into()),
            _ => None,
        }
    }

    /// `op rel32` at `at` to `to`.
    fn rel(op: &[u8], at: u64, to: u64) -> Vec<u8> {
        let end = at + op.len() as u64 + 4;
        [op, &(to.wrapping_sub(end) as i32).to_le_bytes()].concat()
    }

    /// The replacement kept at REPLACEMENTS: `stac` (3 bytes), then at +3 a
    /// call to TARGET (5 bytes).
    fn replacement(at: u64, len: u8) -> Option<Vec<u8>> {
        let all = [vec![0x0f, 0x01, 0xcb], rel(&[0xe8], REPLACEMENTS + 3, TARGET)].concat();
        let off = usize::try_from(at.checked_sub(REPLACEMENTS)?).ok()?;
        all.get(off..off + usize::from(len)).map(<[u8]>::to_vec)
    }

    fn judge(kind: RewriteKind, expected: &[u8], found: &[u8], also: &[(u64, u8)]) -> bool {
        let f = Forms { names: &names, replacement: &replacement, slot: &|_| None };
        judged(kind, SITE, expected, found, also, &f) == Judgement::Allowed
    }

    #[test]
    fn code_is_compared_by_what_it_does() {
        let e = |b: &[u8]| effective(b, SITE, None, &names).unwrap();
        // A jump to the return thunk is a `ret`; padding after it goes.
        assert_eq!(e(&rel(&[0xe9], SITE, RETURN_THUNK)), [Op::Ret]);
        assert_eq!(e(&[0xc3, 0xcc, 0xcc, 0xcc, 0xcc]), [Op::Ret]);
        // A retpoline thunk is the indirect call it stands for; lfence and NOPs go.
        let rax = Op::Indirect { call: true, register: "rax".into() };
        assert_eq!(e(&rel(&[0xe8], SITE, THUNK_RAX)), std::slice::from_ref(&rax));
        assert_eq!(e(&[0x0f, 0xae, 0xe8, 0xff, 0xd0]), std::slice::from_ref(&rax));
        assert_eq!(e(&[0xff, 0xd0, 0x0f, 0x1f, 0x00]), [rax]);
        // A short jump over int3 padding to the end is nothing at all.
        assert_eq!(e(&[0xeb, 0x04, 0xcc, 0xcc, 0xcc, 0xcc]), []);
        // int3 that would run (not after a transfer) stays.
        assert_eq!(e(&[0x90, 0xcc, 0x90]), [Op::Plain(vec![0xcc])]);
        // Bytes that end inside an instruction do not decode.
        assert!(effective(&[0xe8, 0x00, 0x00], SITE, None, &names).is_none());
    }

    #[test]
    fn return_and_retpoline_sites_take_the_kernels_forms_only() {
        let ret_site = rel(&[0xe9], SITE, RETURN_THUNK);
        assert!(judge(RewriteKind::Return, &ret_site, &[0xc3, 0xcc, 0xcc, 0xcc, 0xcc], &[]));
        assert!(!judge(RewriteKind::Return, &ret_site, &rel(&[0xe9], SITE, TARGET), &[]));
        assert!(!judge(RewriteKind::Return, &ret_site, &[0xcc, 0xcc, 0xcc, 0xcc, 0xcc], &[]));
        let call_rax = rel(&[0xe8], SITE, THUNK_RAX);
        assert!(judge(RewriteKind::Retpoline, &call_rax, &[0x0f, 0xae, 0xe8, 0xff, 0xd0], &[]));
        assert!(judge(RewriteKind::Retpoline, &call_rax, &[0xff, 0xd0, 0x0f, 0x1f, 0x00], &[]));
        // Another register, or a jump where there was a call: not the kernel's.
        assert!(!judge(RewriteKind::Retpoline, &call_rax, &[0xff, 0xd1, 0x0f, 0x1f, 0x00], &[]));
        assert!(!judge(RewriteKind::Retpoline, &call_rax, &[0xff, 0xe0, 0x0f, 0x1f, 0x00], &[]));
        let call_r11 = rel(&[0xe8], SITE, THUNK_R11);
        assert!(judge(RewriteKind::Retpoline, &call_r11, &[0x41, 0xff, 0xd3, 0x66, 0x90], &[]));
    }

    #[test]
    fn an_alternative_holds_its_original_or_one_of_its_replacements() {
        let alt =
            |at: u64, len: u8| RewriteKind::Alternative { replacement: at, replacement_len: len };
        let nops = [0x0f, 0x1f, 0x44, 0x00, 0x00, 0x90, 0x90, 0x90];
        let stac = alt(REPLACEMENTS, 3);
        assert!(judge(stac, &nops, &[0x0f, 0x01, 0xcb, 0x0f, 0x1f, 0x44, 0x00, 0x00], &[]));
        // The original, its padding made other NOPs.
        assert!(judge(stac, &nops, &[0xeb, 0x06, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc], &[]));
        // clac is no replacement of this site.
        assert!(!judge(stac, &nops, &[0x0f, 0x01, 0xca, 0x0f, 0x1f, 0x44, 0x00, 0x00], &[]));
        // A call in a replacement is fixed up to reach the same target from the site.
        let call = alt(REPLACEMENTS + 3, 5);
        let mut found = rel(&[0xe8], SITE, TARGET);
        found.extend([0x0f, 0x1f, 0x00]);
        assert!(judge(call, &nops, &found, &[]));
        assert!(
            judge(stac, &nops, &found, &[(REPLACEMENTS + 3, 5)]),
            "the site's other replacement"
        );
        let mut forged = rel(&[0xe8], SITE, TARGET + 0x10);
        forged.extend([0x0f, 0x1f, 0x00]);
        assert!(!judge(call, &nops, &forged, &[]), "a call elsewhere is no replacement");
        assert!(!judge(stac, &nops, &found, &[]), "a replacement of another site");
    }

    #[test]
    fn lock_prefixes_and_endbr_seals() {
        assert!(judge(RewriteKind::Lock, &[0xf0], &[0x3e], &[]));
        assert!(!judge(RewriteKind::Lock, &[0xf0], &[0xcc], &[]));
        let endbr = [0xf3, 0x0f, 0x1e, 0xfa];
        assert!(judge(RewriteKind::Endbr, &endbr, &[0x0f, 0x1f, 0x40, 0xd6], &[]));
        assert!(!judge(RewriteKind::Endbr, &endbr, &[0xcc, 0x1f, 0x40, 0xd6], &[]));
    }
}
