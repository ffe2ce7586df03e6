//! The forms of each rewrite kind, judged at real sites of the lab's two
//! vendor images (6.1 and 6.12): the reference and its sites as `vigil
//! profile build` makes and stores them, the bytes a site may hold made from the image
//! itself (a replacement of its own, a NOP, a thunk's register), and forms
//! that must fail: a replacement that `.altinstructions` lists for another
//! site, a call elsewhere, a jump out of a function's entry.
#![cfg(feature = "lab")]

mod common;

use vigil::linux::profile::Profile;
use vigil::linux::reference::{
    ConstKind, Forms, Judgement, Reference, ReferenceFile, RewriteKind, RewriteSite, Rewrites,
    judge,
};
use vigil_lab::Kernel;

struct Image {
    r: Reference,
    w: Rewrites,
    p: Profile,
}

/// The reference of a lab image as `vigil profile build` stores it.
fn image(k: Kernel) -> Image {
    let p = common::lab_profile(k);
    let path = common::profiles_with_references().join(format!("{}.reference", p.release));
    let stored = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let r = ReferenceFile::read(&stored).unwrap();
    let mut w = Rewrites::of(&r).unwrap();
    w.add_run_time(&r, &p).unwrap();
    Image { r, w, p }
}

impl Image {
    fn name(&self, a: u64) -> Option<String> {
        let syms = self.p.symbols();
        let at = &syms[syms.partition_point(|s| s.addr < a)..];
        let here: Vec<&str> =
            at.iter().take_while(|s| s.addr == a).map(|s| s.name.as_str()).collect();
        vigil::linux::reference::telling_name(&here).map(str::to_owned)
    }

    fn addr(&self, name: &str) -> u64 {
        self.p.symbol(name).unwrap_or_else(|| panic!("no symbol {name}")).addr
    }

    fn expected(&self, s: &RewriteSite) -> Vec<u8> {
        self.r.expected(s.addr, usize::from(s.len), 0).unwrap()
    }

    /// Judges `found` at site `s` (at slide 0), a paravirt slot holding `slot`.
    fn judge(&self, s: &RewriteSite, found: &[u8], slot: u64) -> Judgement {
        let names = |a: u64| self.name(a);
        let replacement = |at: u64, len: u8| self.r.expected(at, usize::from(len), 0);
        // The slot the site's `call *slot(%rip)` names holds `slot`; any other reads nothing.
        let site_slot = vigil::linux::reference::effective(&self.expected(s), s.addr, None, &names)
            .and_then(|ops| match ops.as_slice() {
                [vigil::linux::reference::Op::Relative { address, .. }] => Some(*address),
                _ => None,
            });
        let slot = |a: u64| (Some(a) == site_slot).then_some(slot);
        let f = Forms { names: &names, replacement: &replacement, slot: &slot };
        let also: Vec<(u64, u8)> = self
            .w
            .sites
            .iter()
            .filter(|o| o.addr == s.addr && o != &s)
            .filter_map(|o| match o.kind {
                RewriteKind::Alternative { replacement, replacement_len } => {
                    Some((replacement, replacement_len))
                }
                _ => None,
            })
            .collect();
        judge(s.kind, s.addr, &self.expected(s), found, &also, &f)
    }

    fn sites(&self, pick: impl Fn(&RewriteSite) -> bool) -> Vec<RewriteSite> {
        self.w.sites.iter().filter(|s| pick(s)).copied().collect()
    }
}

/// `op rel32` at `at` reaching `to`, padded with NOPs to `len`.
fn rel(op: u8, at: u64, to: u64, len: usize) -> Vec<u8> {
    let d = i32::try_from(to.wrapping_sub(at + 5).cast_signed()).unwrap();
    let mut b = vec![op];
    b.extend(d.to_le_bytes());
    b.resize(len, 0x90);
    b
}

fn padded(b: &[u8], len: usize) -> Vec<u8> {
    let mut b = b.to_vec();
    b.resize(len, 0x90);
    b
}

const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

fn every_kind(k: Kernel) {
    let img = image(k);
    let line = k.line();
    let some = |what: &str, v: Vec<RewriteSite>| -> Vec<RewriteSite> {
        assert!(!v.is_empty(), "{line}: no {what} site");
        v.into_iter().take(50).collect()
    };
    use Judgement::{Allowed, Refused, RunTime};

    // Lock prefixes: `lock`, or the `ds` prefix of a uniprocessor kernel.
    for s in some("lock", img.sites(|s| s.kind == RewriteKind::Lock)) {
        assert_eq!(img.judge(&s, &[0x3e], 0), Allowed, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &[0x90], 0), Refused, "{line} {s:x?}");
    }

    // Return thunks: `jmp __x86_return_thunk` becomes `ret`; not a jmp elsewhere.
    let elsewhere = img.addr("schedule");
    for s in some("return thunk", img.sites(|s| s.kind == RewriteKind::Return && s.len == 5)) {
        let e = img.expected(&s);
        if e[0] != 0xe9 {
            continue;
        }
        let n = usize::from(s.len);
        let mut ret = vec![0xcc; n];
        ret[0] = 0xc3;
        assert_eq!(img.judge(&s, &ret, 0), Allowed, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &rel(0xe9, s.addr, elsewhere, n), 0), Refused, "{line} {s:x?}");
    }

    // Retpolines: `call __x86_indirect_thunk_rax` becomes `call *%rax`
    // (with `lfence` or padding); not `call *%rcx`.
    let rax = img.addr("__x86_indirect_thunk_rax");
    let calls_rax = img.sites(|s| {
        s.kind == RewriteKind::Retpoline
            && s.len == 5
            && img.expected(s) == rel(0xe8, s.addr, rax, 5)
    });
    for s in some("retpoline (call via rax)", calls_rax) {
        assert_eq!(img.judge(&s, &[0xff, 0xd0, 0x0f, 0x1f, 0x00], 0), Allowed, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &[0x0f, 0xae, 0xe8, 0xff, 0xd0], 0), Allowed, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &[0xff, 0xd1, 0x0f, 0x1f, 0x00], 0), Refused, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &rel(0xe8, s.addr, elsewhere, 5), 0), Refused, "{line} {s:x?}");
    }

    // Alternatives: a replacement of the site's own, relocated; and the
    // forged site: a replacement .altinstructions lists for another site.
    let alts = img.sites(|s| {
        matches!(s.kind, RewriteKind::Alternative { replacement_len, .. } if replacement_len >= 3 && replacement_len <= s.len)
    });
    let mut checked = 0;
    for s in some("alternative", alts.clone()) {
        let RewriteKind::Alternative { replacement, replacement_len } = s.kind else { continue };
        let bytes = img.r.expected(replacement, usize::from(replacement_len), 0).unwrap();
        // Relative operands move with the replacement: only plain ones here.
        let plain = vigil::linux::reference::effective(&bytes, replacement, None, &|a| img.name(a))
            .is_some_and(|ops| {
                ops.iter().all(|o| matches!(o, vigil::linux::reference::Op::Plain(_)))
            });
        if !plain {
            continue;
        }
        let own = padded(&bytes, usize::from(s.len));
        assert_eq!(img.judge(&s, &own, 0), Allowed, "{line} {s:x?}: its own replacement");
        let others: Vec<Vec<u8>> = img
            .w
            .sites
            .iter()
            .filter(|o| o.addr == s.addr)
            .filter_map(|o| match o.kind {
                RewriteKind::Alternative { replacement, replacement_len } => {
                    img.r.expected(replacement, usize::from(replacement_len), 0)
                }
                _ => None,
            })
            .collect();
        let forged = alts.iter().find_map(|o| {
            let RewriteKind::Alternative { replacement, replacement_len } = o.kind else {
                return None;
            };
            let b = img.r.expected(replacement, usize::from(replacement_len), 0)?;
            let fits = b.len() <= usize::from(s.len) && b.len() >= 3;
            let theirs = others.iter().any(|x| x == &b) || img.expected(&s).starts_with(&b);
            let plain = vigil::linux::reference::effective(&b, replacement, None, &|a| img.name(a))
                .is_some_and(|ops| {
                    !ops.is_empty()
                        && ops.iter().all(|o| matches!(o, vigil::linux::reference::Op::Plain(_)))
                });
            (fits && !theirs && plain).then_some(b)
        });
        if let Some(forged) = forged {
            let forged = padded(&forged, usize::from(s.len));
            assert_eq!(
                img.judge(&s, &forged, 0),
                Refused,
                "{line} {s:x?}: another site's replacement {forged:02x?}"
            );
            checked += 1;
        }
    }
    assert!(checked > 0, "{line}: no alternative site to forge a replacement at");

    // Paravirt (6.1) and direct calls (6.12): `call *slot(%rip)` becomes a
    // call of what the slot holds; not of anything else.
    let pv = img.sites(|s| {
        matches!(s.kind, RewriteKind::Paravirt | RewriteKind::DirectCall)
            && s.len >= 6
            && img.expected(s)[..2] == [0xff, 0x15]
    });
    let target = img.addr("schedule");
    for s in some("paravirt or direct call", pv) {
        let n = usize::from(s.len);
        assert_eq!(img.judge(&s, &rel(0xe8, s.addr, target, n), target), Allowed, "{line} {s:x?}");
        assert_eq!(
            img.judge(&s, &rel(0xe8, s.addr, target + 16, n), target),
            Refused,
            "{line} {s:x?}"
        );
    }

    // Jump labels: a NOP or a jmp to the entry's target, nowhere else.
    for s in some(
        "jump label",
        img.sites(|s| matches!(s.kind, RewriteKind::JumpLabel { .. }) && s.len == 5),
    ) {
        let RewriteKind::JumpLabel { target } = s.kind else { continue };
        assert_eq!(img.judge(&s, &NOP5, 0), Allowed, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &rel(0xe9, s.addr, target, 5), 0), Allowed, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &rel(0xe9, s.addr, target + 1, 5), 0), Refused, "{line} {s:x?}");
    }

    // ftrace entries: a NOP, a call for the records to judge; never a jmp.
    for s in some("ftrace", img.sites(|s| s.kind == RewriteKind::Ftrace)) {
        assert_eq!(img.judge(&s, &NOP5, 0), Allowed, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &rel(0xe8, s.addr, elsewhere, 5), 0), RunTime, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &rel(0xe9, s.addr, elsewhere, 5), 0), Refused, "{line} {s:x?}");
    }

    // Static calls: `ret`, the inlined `return 0`, a call for the records
    // to judge; not other code.
    for s in some("static call", img.sites(|s| s.kind == RewriteKind::StaticCall)) {
        assert_eq!(img.judge(&s, &[0xc3, 0xcc, 0xcc, 0xcc, 0xcc], 0), Allowed, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &[0x2e, 0x2e, 0x2e, 0x31, 0xc0], 0), Allowed, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &rel(0xe8, s.addr, elsewhere, 5), 0), RunTime, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &[0x48, 0x31, 0xc0, 0x90, 0x90], 0), Refused, "{line} {s:x?}");
    }

    // IBT seals, where built.
    for s in img.sites(|s| s.kind == RewriteKind::Endbr).into_iter().take(50) {
        let sealed = match k {
            Kernel::V6_1 => [0x0f, 0x1f, 0x40, 0xd6],
            Kernel::V6_12 => [0x66, 0x0f, 0x1f, 0x00],
        };
        assert_eq!(img.judge(&s, &sealed, 0), Allowed, "{line} {s:x?}");
        assert_eq!(img.judge(&s, &[0xcc, 0x0f, 0x1f, 0x00], 0), Refused, "{line} {s:x?}");
    }

    // Run-time constants (6.10 on): USER_PTR_MAX of a paging mode, a
    // pointer below the kernel image, a shift count; not a user pointer
    // where kernel data is, nor another limit for user pointers.
    let consts = img.sites(|s| matches!(s.kind, RewriteKind::RuntimeConst(_)));
    for s in consts.iter().take(200) {
        let RewriteKind::RuntimeConst(which) = s.kind else { continue };
        let le = |v: u64| v.to_le_bytes();
        match which {
            ConstKind::UserPtrMax => {
                assert_eq!(img.judge(s, &le(0x00ff_ffff_ffff_f000), 0), Allowed, "{s:x?}");
                assert_eq!(img.judge(s, &le(0x0000_7fff_ffff_f000), 0), Allowed, "{s:x?}");
                assert_eq!(img.judge(s, &le(0xffff_ffff_ffff_f000), 0), Refused, "{s:x?}");
            }
            ConstKind::KernelData => {
                assert_eq!(img.judge(s, &le(0xff11_0000_0400_0000), 0), Allowed, "{s:x?}");
                assert_eq!(img.judge(s, &le(0x0000_7fff_0000_0000), 0), Refused, "{s:x?}");
                assert_eq!(img.judge(s, &le(0xffff_ffff_c012_3000), 0), Refused, "{s:x?}");
            }
            ConstKind::Shift => {
                assert_eq!(img.judge(s, &[20], 0), Allowed, "{s:x?}");
                assert_eq!(img.judge(s, &[200], 0), Refused, "{s:x?}");
            }
        }
    }
    if k == Kernel::V6_12 {
        for which in [ConstKind::UserPtrMax, ConstKind::KernelData, ConstKind::Shift] {
            assert!(
                consts.iter().any(|s| s.kind == RewriteKind::RuntimeConst(which)),
                "6.12: no run-time constant of kind {which:?}"
            );
        }
    }
    if k == Kernel::V6_12 {
        assert!(
            !img.sites(|s| s.kind == RewriteKind::Endbr).is_empty(),
            "6.12: no ENDBR seal site"
        );
    }
}

#[test]
fn lab_image_6_1_rewrite_kinds_allow_the_kernels_forms_and_refuse_forged_ones() {
    every_kind(Kernel::V6_1);
}

#[test]
fn lab_image_6_12_rewrite_kinds_allow_the_kernels_forms_and_refuse_forged_ones() {
    every_kind(Kernel::V6_12);
}
