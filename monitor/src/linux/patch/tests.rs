use super::*;
use crate::integrity::baseline::tests::{Fake, TEXT_VA};
use crate::memory::RawDump;

const A: u64 = TEXT_VA + 0x100; // a site on text page 0
const CALLER: u64 = TEXT_VA + 0x3000;

fn rel(op: u8, at: u64, to: u64) -> Vec<u8> {
    let mut b = vec![op];
    b.extend_from_slice(&(to.wrapping_sub(at + 5) as i64 as i32).to_le_bytes());
    b
}

/// A fake guest whose text page 0 holds NOP5 at A, and its originals.
fn guest() -> (Fake, Vec<u8>) {
    let mut f = Fake::new();
    write(&mut f, A, &NOP5);
    let mut orig = vec![0u8; 4096];
    f.mem.read(GuestPhysAddr(0x2000), &mut orig).unwrap();
    (f, orig)
}

fn write(f: &mut Fake, va: u64, bytes: &[u8]) {
    let mut all = vec![0u8; f.mem.layout().total() as usize];
    f.mem.read(GuestPhysAddr(0), &mut all).unwrap();
    let at = 0x2000 + (va - TEXT_VA) as usize;
    all[at..at + bytes.len()].copy_from_slice(bytes);
    f.mem = RawDump::from_bytes(all);
}

fn verify(t: &PatchTables, f: &Fake, orig: &[u8]) -> Verdicts {
    let page = ChangedPage {
        region: "kernel-text".into(),
        index: 0,
        gva: TEXT_VA,
        gpa: GuestPhysAddr(0x2000),
    };
    let original = |gva: u64| (gva == TEXT_VA).then(|| orig.to_vec());
    verify_pages(t, &[page], &f.mem, f, &original, &|a| format!("{a:#x}"))
}

fn tables(site: Site) -> PatchTables {
    let mut t = PatchTables::default();
    t.sites.insert(A, site);
    t.ftrace_callers.insert(CALLER);
    t
}

/// The site map is made once for tables that read the same, and anew
/// when any of them reads differently.
#[test]
fn the_site_map_is_kept_while_its_tables_read_the_same() {
    let mut profile = crate::linux::profile::tests::sample();
    let entry = 0xffff_ffff_8100_1000;
    profile.fentry = vec![entry];
    let m = Matched {
        profile: &profile,
        modules: Vec::new(),
        slide: 0x20_0000,
        idt_slide: None,
        reads: Default::default(),
    };
    let inputs = |ips: Vec<u64>| SiteInputs {
        kernel_jumps: Err("unreadable".into()),
        kernel_calls: Err("unreadable".into()),
        modules: Vec::new(),
        ftrace: Ok(ips),
    };
    let mut memo = SiteMemo::default();
    let first = memo.get(&m, &inputs(vec![entry + m.slide]));
    assert!(first.sites.get(&(entry + m.slide)) == Some(&Site::Fentry));
    assert!(std::sync::Arc::ptr_eq(&first, &memo.get(&m, &inputs(vec![entry + m.slide]))));
    // A forged record: a new map, which says so.
    let forged = memo.get(&m, &inputs(vec![entry + m.slide, 0xffff_ffff_8100_0007]));
    assert!(!std::sync::Arc::ptr_eq(&first, &forged));
    assert!(forged.problems.iter().any(|(s, p)| *s == Severity::Violation && p.contains("forged")));
    // The same inputs under another slide, or with a table unreadable for
    // another reason, are other inputs.
    let other = Matched {
        slide: 0x40_0000,
        ..Matched {
            profile: &profile,
            modules: Vec::new(),
            slide: 0,
            idt_slide: None,
            reads: Default::default(),
        }
    };
    let a = inputs(vec![entry + m.slide]);
    assert_ne!(a.digest(&m), a.digest(&other));
    let mut b = inputs(vec![entry + m.slide]);
    b.kernel_jumps = Err("unreadabl".into());
    assert_ne!(a.digest(&m), b.digest(&m));
    // Through the whole read: a memo gives the same tables as none.
    let read = |memo: &mut SiteMemo| {
        let t = PatchTables { sites: SiteSet(memo.get(&m, &a)), ..PatchTables::default() };
        (t.site_count(), t.is_site(entry + m.slide, PatchKind::Ftrace))
    };
    assert_eq!(read(&mut SiteMemo::default()), (1, true));
    assert_eq!(read(&mut memo), (1, true));
}

#[test]
fn a_jump_label_may_jump_only_to_its_target() {
    let target = TEXT_VA + 0x180;
    let t = tables(Site::JumpLabel { target, key: 0 });
    let (mut f, orig) = guest();
    write(&mut f, A, &rel(JMP32, A, target));
    let v = verify(&t, &f, &orig);
    assert!(v.violations.is_empty(), "{:#?}", v.violations);
    assert_eq!(
        v.accepted,
        [Patched {
            addr: A,
            kind: PatchKind::JumpLabel,
            bytes: rel(JMP32, A, target),
            in_flight: false,
            key: None
        }]
    );

    // Mid-rewrite: int3, then the jmp's tail.
    let mut poked = rel(JMP32, A, target);
    poked[0] = INT3;
    write(&mut f, A, &poked);
    let v = verify(&t, &f, &orig);
    assert!(v.violations.is_empty() && v.accepted[0].in_flight, "{v:#?}");

    // Mimicry: a jmp elsewhere.
    write(&mut f, A, &rel(JMP32, A, A + 5));
    let v = verify(&t, &f, &orig);
    assert_eq!(v.violations.len(), 1);
    assert!(v.violations[0].detail.contains("jump-label site"), "{}", v.violations[0].detail);
    assert!(v.disagreements.is_empty(), "a jump label's target is fixed: no update explains it");
    assert_eq!(v.violations[0].gva, GuestVirtAddr(A));
    assert_eq!(v.violations[0].before, "0f1f440000");
}

#[test]
fn two_byte_jump_labels() {
    let target = A + 0x20;
    let t = tables(Site::JumpLabel { target, key: 0 });
    let (mut f, _) = guest();
    write(&mut f, A, &[0x66, 0x90, 0x90, 0x90, 0x90]);
    let mut orig = vec![0u8; 4096];
    f.mem.read(GuestPhysAddr(0x2000), &mut orig).unwrap();
    write(&mut f, A, &[JMP8, 0x1e]);
    assert!(verify(&t, &f, &orig).violations.is_empty());
    write(&mut f, A, &[JMP8, 0x1f]);
    assert_eq!(verify(&t, &f, &orig).violations.len(), 1);
}

#[test]
fn a_function_entry_may_call_only_ftrace() {
    let t = tables(Site::Fentry);
    let (mut f, orig) = guest();
    write(&mut f, A, &rel(CALL, A, CALLER));
    let v = verify(&t, &f, &orig);
    assert!(v.violations.is_empty(), "{:#?}", v.violations);
    assert_eq!(v.accepted[0].kind, PatchKind::Ftrace);
    // The page is clean: remembered by the hash of exactly the bytes judged.
    let mut now = vec![0u8; 4096];
    f.mem.read(GuestPhysAddr(0x2000), &mut now).unwrap();
    assert_eq!(v.clean, [(TEXT_VA, *blake3::hash(&now).as_bytes(), v.accepted.clone())]);
    write(&mut f, A, &rel(CALL, A, CALLER + 16));
    let v = verify(&t, &f, &orig);
    assert!(v.violations[0].detail.contains("ftrace function entry"), "{:#?}", v.violations);
    assert!(v.clean.is_empty());
    // An inline hook's jmp over the entry is no ftrace form either, nor
    // an update of ftrace's in flight (the kernel writes calls there).
    write(&mut f, A, &rel(JMP32, A, CALLER));
    let v = verify(&t, &f, &orig);
    assert_eq!(v.violations.len(), 1);
    assert!(v.disagreements.is_empty(), "{:?}", v.disagreements);
    // A call into kernel text (or a module's) is never a trampoline ftrace
    // has yet to record; a call into the module area outside every module
    // may be one.
    write(&mut f, A, &rel(CALL, A, CALLER + 16));
    assert!(verify(&t, &f, &orig).disagreements.is_empty(), "a call into kernel text");
    write(&mut f, A, &rel(CALL, A, NEW_TRAMPOLINE));
    assert_eq!(verify(&t, &f, &orig).disagreements.len(), 1, "a call to a new trampoline");
    let mut t = t;
    t.module_text.push((NEW_TRAMPOLINE & !0xfff, (NEW_TRAMPOLINE & !0xfff) + 0x1000));
    assert!(verify(&t, &f, &orig).disagreements.is_empty(), "a call into a module's text");
}

/// ftrace's direct call: a function entry may call what its own direct
/// record names, and no other entry may.
#[test]
fn a_function_entry_may_call_its_direct_record_only() {
    let mut t = tables(Site::Fentry);
    let other = A + 0x40;
    t.sites.insert(other, Site::Fentry);
    t.direct_calls.insert((A, NEW_TRAMPOLINE));
    let (mut f, _) = guest();
    write(&mut f, other, &NOP5);
    let mut orig = vec![0u8; 4096];
    f.mem.read(GuestPhysAddr(0x2000), &mut orig).unwrap();
    write(&mut f, A, &rel(CALL, A, NEW_TRAMPOLINE));
    let v = verify(&t, &f, &orig);
    assert!(v.violations.is_empty() && v.disagreements.is_empty(), "{v:#?}");
    assert_eq!(v.accepted[0].kind, PatchKind::Ftrace);
    write(&mut f, other, &rel(CALL, other, NEW_TRAMPOLINE));
    let v = verify(&t, &f, &orig);
    assert!(
        v.accepted.iter().all(|p| p.addr != other) && v.violations.len() == 1,
        "another entry's call to it is no direct call: {v:#?}"
    );
}

/// Where ftrace could have made a trampoline: the module area.
const NEW_TRAMPOLINE: u64 = 0xffff_ffff_c010_0040;

#[test]
fn static_calls_follow_their_key() {
    let (func, other, key) = (TEXT_VA + 0x2000, TEXT_VA + 0x2100, 0x1234);
    let mut t = tables(Site::StaticCall { key, tail: false });
    t.key_funcs.insert(key, func);
    let (mut f, orig) = guest();
    write(&mut f, A, &rel(CALL, A, func));
    assert!(verify(&t, &f, &orig).violations.is_empty());
    write(&mut f, A, &XOR5RAX);
    assert!(verify(&t, &f, &orig).violations.is_empty());
    write(&mut f, A, &rel(CALL, A, other));
    let v = verify(&t, &f, &orig);
    assert!(v.violations[0].detail.contains("static call"));
    // A call the key does not name: a disagreement, judged again for
    // longer (the kernel writes the key before the sites).
    assert_eq!(v.disagreements, [(A, rel(CALL, A, other))]);
    write(&mut f, A, &[0xcc, 0x90, 0x90, 0x90, 0x90]);
    assert!(verify(&t, &f, &orig).disagreements.is_empty(), "no call: no update of the kernel's");
    // A trampoline returns when the key has no function.
    let mut t = tables(Site::StaticTramp { key: Some(key) });
    t.key_funcs.insert(key, 0);
    write(&mut f, A, &RET5);
    assert!(verify(&t, &f, &orig).violations.is_empty());
}

#[test]
fn a_static_call_site_may_still_call_what_its_key_held_a_moment_ago() {
    let (func, before, other, key, key_b) =
        (TEXT_VA + 0x2000, TEXT_VA + 0x2100, TEXT_VA + 0x2200, 0x1234, 0x5678);
    let mut memory = PatchMemory::default();
    let t0 = std::time::Instant::now();
    let read = |f: u64, memory: &mut PatchMemory, at: std::time::Instant| {
        let mut t = tables(Site::StaticCall { key, tail: false });
        t.key_funcs.insert(key, f);
        t.key_funcs.insert(key_b, other);
        t.merge_recent(memory, at);
        t
    };
    // Read while the key held `before`; then the key moves to `func`
    // and the site has not followed yet: in flight.
    read(before, &mut memory, t0);
    let t = read(func, &mut memory, t0 + std::time::Duration::from_secs(2));
    let (mut f, orig) = guest();
    write(&mut f, A, &rel(CALL, A, before));
    let v = verify(&t, &f, &orig);
    assert!(v.violations.is_empty(), "{:#?}", v.violations);
    assert!(v.accepted[0].in_flight && v.accepted[0].key == Some(key), "{v:#?}");
    assert!(v.clean.is_empty(), "a page with a site in flight is judged again");
    // The key's function now: settled.
    write(&mut f, A, &rel(CALL, A, func));
    let v = verify(&t, &f, &orig);
    assert!(v.violations.is_empty() && !v.accepted[0].in_flight, "{v:#?}");
    // Another key's function, even one held lately: refused.
    write(&mut f, A, &rel(CALL, A, other));
    assert_eq!(verify(&t, &f, &orig).violations.len(), 1);
    // What the key held longer ago than the grace is forgotten.
    let t = read(func, &mut memory, t0 + RECORD_GRACE + std::time::Duration::from_secs(1));
    write(&mut f, A, &rel(CALL, A, before));
    assert!(verify(&t, &f, &orig).violations[0].detail.contains("static call"));
}

#[test]
fn recent_key_functions_are_bounded_per_key_and_in_all() {
    let mut memory = PatchMemory::default();
    let t0 = std::time::Instant::now();
    for f in 1..=10u64 {
        memory.remember_key_func(7, 0x1000 * f, t0);
    }
    let kept: Vec<u64> = memory.key_funcs[&7].iter().map(|&(f, _)| f).collect();
    assert_eq!(kept, [0x7000, 0x8000, 0x9000, 0xa000], "the latest {KEY_FUNCS_KEPT}");
    memory.remember_key_func(7, 0x8000, t0);
    assert_eq!(memory.key_funcs[&7].last().unwrap().0, 0x8000, "seen again: the latest");
    assert_eq!(memory.key_funcs[&7].len(), KEY_FUNCS_KEPT);
    for k in 0..2 * MAX_RECENT_KEYS as u64 {
        memory.remember_key_func(0x10_0000 + k, 0x1000, t0);
    }
    assert_eq!(memory.key_funcs.len(), MAX_RECENT_KEYS);
    memory.remember_key_func(7, 0xb000, t0);
    assert_eq!(memory.key_funcs[&7].last().unwrap().0, 0xb000, "a key kept still learns");
    memory.remember_key_func(9, 0, t0);
    assert!(!memory.key_funcs.contains_key(&9), "no function is no call target");
}

/// Verdicts with a violation at each of `sites`, of which `disagree` are
/// record disagreements.
fn verdicts(sites: &[u64], disagree: &[u64]) -> Verdicts {
    let mut v = Verdicts::default();
    for &a in sites {
        let f = Finding::new(
            "kernel-text",
            FindingKind::Content,
            Severity::Violation,
            GuestVirtAddr(a),
            GuestPhysAddr(0),
        )
        .saying(
            "a static call site may call only its key's function".into(),
            String::new(),
            String::new(),
        );
        v.violations.push(f);
        if disagree.contains(&a) {
            v.disagreements.push((a, rel(CALL, a, TEXT_VA)));
        }
    }
    v
}

fn reported(v: &Verdicts) -> Vec<u64> {
    v.violations.iter().map(|f| f.gva.raw()).collect()
}

#[test]
fn a_disagreeing_site_is_held_then_reported_and_its_first_sighting_kept() {
    let t0 = std::time::Instant::now();
    let at = |s: u64| t0 + std::time::Duration::from_secs(s);
    let hold = PENDING_HOLD;
    let mut memory = PatchMemory::holding(hold);
    // A disagreement is held; a violation of another kind is not.
    let mut v = verdicts(&[A, A + 0x40], &[A]);
    memory.hold_disagreements(&mut v, t0);
    assert_eq!(reported(&v), [A + 0x40]);
    assert_eq!((memory.held, memory.held_until), (1, Some(t0 + hold)));
    // Still disagreeing before the hold ends: still held.
    let mut v = verdicts(&[A], &[A]);
    memory.hold_disagreements(&mut v, at(9));
    assert!(v.violations.is_empty());
    // At its end: reported, saying for how long.
    let mut v = verdicts(&[A], &[A]);
    memory.hold_disagreements(&mut v, t0 + hold);
    assert_eq!(reported(&v), [A]);
    assert!(v.violations[0].detail.contains("so for 10.0 s"), "{}", v.violations[0].detail);
    assert_eq!((memory.held, memory.held_until), (0, None));
    // A hook that left for a while and came back is reported at once: its
    // first sighting is kept while it was last seen within PENDING_FORGET.
    let mut v = verdicts(&[A], &[A]);
    memory
        .hold_disagreements(&mut v, t0 + hold + PENDING_FORGET - std::time::Duration::from_secs(1));
    assert_eq!(reported(&v), [A]);
    // Once it has agreed for PENDING_FORGET it is held anew.
    let later = t0 + hold + 3 * PENDING_FORGET;
    let mut v = verdicts(&[A], &[A]);
    memory.hold_disagreements(&mut v, later);
    assert!(v.violations.is_empty());
    assert_eq!(memory.held_until, Some(later + hold));
    // An information finding is never held.
    let mut v = verdicts(&[A + 0x80], &[A + 0x80]);
    v.violations[0].severity = Severity::Info;
    memory.hold_disagreements(&mut v, later);
    assert_eq!(reported(&v), [A + 0x80]);
}

#[test]
fn nothing_is_held_without_a_later_check_or_room_to_remember() {
    let t0 = std::time::Instant::now();
    let mut once = PatchMemory::default();
    let mut v = verdicts(&[A], &[A]);
    once.hold_disagreements(&mut v, t0);
    assert_eq!(reported(&v), [A], "a one-shot examination waits instead");
    assert_eq!(
        reported(&{
            let mut v = verdicts(&[A], &[A]);
            PatchMemory::holding(PENDING_HOLD).unheld().hold_disagreements(&mut v, t0);
            v
        }),
        [A],
        "a diff holds nothing"
    );
    // A guest that makes more sites disagree than are remembered gets the
    // new ones reported at once; those remembered stay held.
    let mut full = PatchMemory::holding(PENDING_HOLD);
    let many: Vec<u64> = (0..MAX_PENDING as u64).map(|i| TEXT_VA + 0x10_0000 + 16 * i).collect();
    let mut v = verdicts(&many, &many);
    full.hold_disagreements(&mut v, t0);
    assert!(v.violations.is_empty());
    assert_eq!(full.held, MAX_PENDING as u64);
    let mut v = verdicts(&[A, many[7]], &[A, many[7]]);
    full.hold_disagreements(&mut v, t0);
    assert_eq!(reported(&v), [A]);
}

#[test]
fn changes_off_every_site_are_violations() {
    let t = tables(Site::Fentry);
    let (mut f, orig) = guest();
    write(&mut f, A + 0x40, &[INT3]);
    let v = verify(&t, &f, &orig);
    assert!(v.violations[0].detail.contains("no kprobe is registered"), "{:#?}", v.violations);
    write(&mut f, A + 0x80, &[0x90, 0x90]);
    let v = verify(&t, &f, &orig);
    assert_eq!(v.violations.len(), 2);
    assert!(v.violations[1].detail.contains("patches nothing"));
    // A site's change with a change beside it: the neighbour is caught.
    let (mut f, orig) = guest();
    write(&mut f, A, &rel(CALL, A, CALLER));
    write(&mut f, A + 5, &[0xcc]);
    let v = verify(&t, &f, &orig);
    assert_eq!(v.violations.len(), 1, "{v:#?}");
    assert_eq!(v.violations[0].gva, GuestVirtAddr(A + 5));
}

#[test]
fn kprobes_place_int3_or_jump_to_a_detour_buffer() {
    let mut t = PatchTables::default();
    t.kprobes.insert(A, 0);
    t.optinsn.push((TEXT_VA + 0x3000, TEXT_VA + 0x4000));
    let (mut f, orig) = guest();
    write(&mut f, A, &[INT3]);
    let v = verify(&t, &f, &orig);
    assert!(v.violations.is_empty() && v.accepted[0].kind == PatchKind::Kprobe, "{v:#?}");
    write(&mut f, A, &rel(JMP32, A, TEXT_VA + 0x3040));
    assert!(verify(&t, &f, &orig).violations.is_empty());
    write(&mut f, A, &rel(JMP32, A, TEXT_VA + 0x1040));
    assert!(verify(&t, &f, &orig).violations[0].detail.contains("optimised kprobe"));
}

#[test]
fn a_page_rewritten_wholesale_is_refused_without_looking_further() {
    let t = tables(Site::Fentry);
    let (mut f, orig) = guest();
    let noise: Vec<u8> =
        (0..2048u32).map(|i| if i % 2 == 0 { 0xab } else { orig[i as usize] }).collect();
    write(&mut f, TEXT_VA, &noise);
    let v = verify(&t, &f, &orig);
    assert_eq!(v.violations.len(), 1);
    assert!(v.violations[0].detail.contains("places"), "{}", v.violations[0].detail);
}

#[test]
fn accounting_counts_changes_and_restores_once() {
    let p = |addr, b: u8, in_flight| Patched {
        addr,
        kind: PatchKind::JumpLabel,
        bytes: vec![b],
        in_flight,
        key: None,
    };
    let mut prev = HashMap::new();
    let all = |_| Some(true);
    assert_eq!(
        account(&mut prev, &[p(1, 1, false), p(2, 1, false)], &all)[&PatchKind::JumpLabel],
        2
    );
    assert!(
        account(&mut prev, &[p(1, 1, false), p(2, 1, false)], &all).is_empty(),
        "nothing changed"
    );
    // Site 1 mid-rewrite (not counted), site 2 restored (counted).
    assert_eq!(account(&mut prev, &[p(1, 2, true)], &all)[&PatchKind::JumpLabel], 1);
    assert_eq!(prev[&1].bytes, [1], "an in-flight state keeps the last settled one");
    // Not looked at: kept; gone with its module: dropped silently.
    assert!(account(&mut prev, &[], &|_| Some(false)).is_empty());
    assert!(prev.contains_key(&1));
    assert!(account(&mut prev, &[], &|_| None).is_empty());
    assert!(prev.is_empty());
}

#[test]
fn tables_parse_to_absolute_addresses_and_digest_without_order() {
    let base = 0xffff_ffff_8200_0000u64;
    let mut b = Vec::new();
    for (code, target, key) in
        [(-0x100_0000i32, -0x0ff_ff00i32, 0x10_0001i64), (-0x100_0010, -0x100_0000, 0x10_0002)]
    {
        b.extend_from_slice(&code.to_le_bytes());
        b.extend_from_slice(&target.to_le_bytes());
        b.extend_from_slice(&key.to_le_bytes());
    }
    let e = parse_jump_entries(&b, base).unwrap();
    assert_eq!(
        e[0],
        JumpEntry {
            code: base - 0x100_0000,
            target: base + 4 - 0x0ff_ff00,
            key: base + 8 + 0x10_0000,
            branch: true
        }
    );
    assert!(!e[1].branch, "bit 1 (init) is no branch flag");
    let mut swapped = e.clone();
    swapped.reverse();
    assert_eq!(jump_table_digest(&e, 0), jump_table_digest(&swapped, 0));
    let slid: Vec<JumpEntry> = e
        .iter()
        .map(|x| JumpEntry {
            code: x.code + 0x40_0000,
            target: x.target + 0x40_0000,
            key: x.key + 0x40_0000,
            ..*x
        })
        .collect();
    assert_eq!(jump_table_digest(&slid, 0x40_0000), jump_table_digest(&e, 0));
    assert_ne!(jump_table_digest(&e[..1], 0), jump_table_digest(&e, 0));
    assert!(parse_jump_entries(&b[..20], base).is_err());
    let s = parse_static_call_sites(&[0x10, 0, 0, 0, 0x21, 0, 0, 0], base).unwrap();
    assert_eq!(s[0], StaticCallSite { addr: base + 0x10, key: base + 4 + 0x20, tail: true });
    assert!(parse_static_call_sites(&[0; 7], base).is_err());
}

proptest::proptest! {
    #[test]
    fn hostile_tables_and_text_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512), at in 0usize..4000) {
        let _ = parse_jump_entries(&bytes, u64::MAX - 64);
        let _ = parse_static_call_sites(&bytes, 0);
        let t = tables(Site::JumpLabel { target: A + 7, key: 0 });
        let (mut f, orig) = guest();
        let n = bytes.len().min(4096 - at);
        write(&mut f, TEXT_VA + at as u64, &bytes[..n]);
        let _ = verify(&t, &f, &orig);
    }
}

/// A site that crosses into the next page is judged once, with its first
/// page; neither page is taken as judged clean while it is a violation (or
/// held), or the second page would be cached with the hook's bytes and
/// never judged again once the first page is put back.
#[test]
fn a_site_across_two_pages_keeps_both_unjudged_clean() {
    let site = TEXT_VA + 0x1000 - 2;
    let mut t = PatchTables::default();
    t.sites.insert(site, Site::Fentry);
    t.ftrace_callers.insert(CALLER);
    let mut f = Fake::new();
    write(&mut f, site, &NOP5);
    let mut orig = vec![0u8; 2 * 4096];
    f.mem.read(GuestPhysAddr(0x2000), &mut orig).unwrap();
    let pages: Vec<ChangedPage> = (0..2u64)
        .map(|i| ChangedPage {
            region: "kernel-text".into(),
            index: i,
            gva: TEXT_VA + i * 4096,
            gpa: GuestPhysAddr(0x2000 + i * 4096),
        })
        .collect();
    let original = |gva: u64| {
        let i = usize::try_from(gva.checked_sub(TEXT_VA)?).ok()? / 4096;
        orig.get(i * 4096..(i + 1) * 4096).map(<[u8]>::to_vec)
    };
    let judge = |f: &Fake| verify_pages(&t, &pages, &f.mem, f, &original, &|a| format!("{a:#x}"));
    // The kernel's call to its caller: both pages clean.
    write(&mut f, site, &rel(CALL, site, CALLER));
    let v = judge(&f);
    assert!(v.violations.is_empty(), "{:#?}", v.violations);
    assert_eq!(v.clean.len(), 2);
    // A call elsewhere: a violation (a disagreement), and neither page clean.
    write(&mut f, site, &rel(CALL, site, NEW_TRAMPOLINE));
    let v = judge(&f);
    assert_eq!(v.violations.len(), 1, "{:#?}", v.violations);
    assert_eq!(v.disagreements.len(), 1);
    assert!(
        v.clean.is_empty(),
        "pages taken as judged: {:x?}",
        v.clean.iter().map(|c| c.0).collect::<Vec<_>>()
    );
}

/// A clock that moves only when paused, and remembers each pause.
struct StepClock {
    start: std::time::Instant,
    pauses: std::cell::RefCell<Vec<std::time::Duration>>,
}

impl StepClock {
    fn new() -> Self {
        StepClock { start: std::time::Instant::now(), pauses: Default::default() }
    }
}

impl Clock for StepClock {
    fn now(&self) -> std::time::Instant {
        self.start + self.pauses.borrow().iter().sum::<std::time::Duration>()
    }
    fn pause(&self, how_long: std::time::Duration) {
        self.pauses.borrow_mut().push(how_long);
    }
}

/// The re-reads of a disagreement: quick ones, then (with no later check)
/// the wait, all on the clock passed in, never slept.
#[test]
fn a_disagreement_is_judged_again_on_the_clock_it_is_given() {
    use super::review::{RETRIES, RETRY_PAUSE, WAIT_PAUSE, WAIT_WINDOW, settle};
    let ms = std::time::Duration::from_millis;
    let judged = |c: &StepClock, may_wait: bool, v: &dyn Fn(usize) -> Verdicts| {
        let mut n = 0;
        let (t, out) = settle(c, may_wait, || {
            n += 1;
            (PatchTables::default(), v(n))
        });
        (n, t, out)
    };
    // Clean at once: judged once, no pause.
    let c = StepClock::new();
    let (n, _, v) = judged(&c, true, &|_| Verdicts::default());
    assert_eq!((n, c.pauses.borrow().len(), v.violations.len()), (1, 0, 0));
    // The kernel finishes its update at the second look.
    let c = StepClock::new();
    let (n, _, v) =
        judged(&c, true, &|n| if n < 2 { verdicts(&[A], &[A]) } else { Verdicts::default() });
    assert_eq!((n, v.violations.len()), (2, 0));
    assert_eq!(*c.pauses.borrow(), [RETRY_PAUSE]);
    // A disagreement that stays, held by a later check: the quick re-reads only.
    let c = StepClock::new();
    let (n, _, v) = judged(&c, false, &|_| verdicts(&[A], &[A]));
    assert_eq!((n, reported(&v)), (RETRIES as usize + 1, vec![A]));
    assert_eq!(*c.pauses.borrow(), [RETRY_PAUSE, RETRY_PAUSE * 2, RETRY_PAUSE * 3]);
    // With no later check: waited for up to WAIT_WINDOW, every WAIT_PAUSE.
    let c = StepClock::new();
    let (n, _, v) = judged(&c, true, &|_| verdicts(&[A], &[A]));
    let waited: std::time::Duration = c.pauses.borrow().iter().sum();
    assert!(waited >= WAIT_WINDOW && waited < WAIT_WINDOW + WAIT_PAUSE, "{waited:?}");
    assert!(c.pauses.borrow()[RETRIES as usize..].iter().all(|p| *p == WAIT_PAUSE));
    assert_eq!(n, c.pauses.borrow().len() + 1);
    assert_eq!(reported(&v), vec![A]);
    assert!(waited > ms(3000), "the wait is not cut short: {waited:?}");
    // A violation that is no disagreement, or forged records: no wait.
    let c = StepClock::new();
    let (n, _, _) = judged(&c, true, &|_| verdicts(&[A, A + 8], &[A]));
    assert_eq!(n, RETRIES as usize + 1);
    let c = StepClock::new();
    let mut n = 0;
    let (t, _) = settle(&c, true, || {
        n += 1;
        let mut t = PatchTables::default();
        t.problems.push((Severity::Violation, "forged".into()));
        (t, Verdicts::default())
    });
    assert_eq!((n, t.problems.len()), (RETRIES as usize + 1, 1));
}

/// An int3 of a rewrite in flight over a site: across checks, reported at
/// the first check at or past [`INT3_HOLD`] after it was first seen (and a
/// check asked for then); forgotten once gone, and kept over checks that
/// skipped its page. One-shot: looked at again after a pause that long.
#[test]
fn an_int3_that_stands_over_a_site_is_a_violation_on_the_clock() {
    use super::review::stood_int3;
    let (mut f, _) = guest();
    write(&mut f, A, &[INT3, 0x1f, 0x44, 0x00, 0x00]);
    let report = || crate::linux::KernelReport::of(crate::linux::report::tests::report());
    let taken = [Finding::new(
        "kernel-text",
        FindingKind::Content,
        Severity::Violation,
        GuestVirtAddr(TEXT_VA),
        GuestPhysAddr(0x2000),
    )];
    let in_flight = || {
        vec![Patched {
            addr: A,
            kind: PatchKind::Ftrace,
            bytes: vec![INT3, 0x1f, 0x44, 0x00, 0x00],
            in_flight: true,
            key: None,
        }]
    };
    let c = StepClock::new();
    let mut memory = PatchMemory::holding(PENDING_HOLD);
    let looked = |_: u64| Some(true);
    let skipped = |_: u64| Some(false);
    let check = |memory: &mut PatchMemory, covered: &dyn Fn(u64) -> Option<bool>, seen: bool| {
        let mut r = report();
        let mut accepted = if seen { in_flight() } else { Vec::new() };
        stood_int3(&mut r, (&f.mem, &f), (&taken, covered), &mut accepted, memory, &c);
        (r.check.violations, accepted)
    };
    // First seen: accepted as in flight, and a check asked for at the hold's end.
    let (v, accepted) = check(&mut memory, &looked, true);
    assert!(v.is_empty() && accepted.len() == 1);
    assert_eq!(memory.held_until, Some(c.now() + INT3_HOLD));
    // A check that skipped the page keeps the sighting; one short of the
    // hold still accepts it.
    memory.held_until = None;
    c.pause(INT3_HOLD / 2);
    assert!(check(&mut memory, &skipped, false).0.is_empty());
    assert!(check(&mut memory, &looked, true).0.is_empty());
    c.pause(INT3_HOLD / 2);
    let (v, accepted) = check(&mut memory, &looked, true);
    assert_eq!(v.len(), 1, "{v:#?}");
    assert!(accepted.is_empty());
    assert_eq!(v[0].gva.raw(), A);
    assert!(
        v[0].detail.contains("an int3 has stood") && v[0].detail.contains("2.0 s"),
        "{}",
        v[0].detail
    );
    // Gone at a check that looked: forgotten, so a new one starts afresh.
    assert!(check(&mut memory, &looked, false).0.is_empty());
    c.pause(INT3_HOLD * 3);
    assert!(check(&mut memory, &looked, true).0.is_empty());
    // One-shot: a pause of the hold, then the byte read again.
    let mut once = PatchMemory::default();
    let before = c.pauses.borrow().len();
    let (v, _) = check(&mut once, &looked, true);
    assert_eq!(c.pauses.borrow()[before..], [INT3_HOLD]);
    assert_eq!(v.len(), 1, "still there after the pause");
}

/// A changed page is read where its address maps when it is judged, not
/// in the frame it was found in: a module unloaded and loaded again at its
/// base has its text in new frames, and the old one may hold anything (a
/// page table, in the lab). An address no longer mapped is a violation.
#[test]
fn a_changed_page_is_judged_in_the_frame_it_is_mapped_to_now() {
    let (f, orig) = guest();
    let t = tables(Site::Fentry);
    let original = |gva: u64| (gva == TEXT_VA).then(|| orig.to_vec());
    let judge = |gva: u64, gpa: u64| {
        let page =
            ChangedPage { region: "module:churn".into(), index: 0, gva, gpa: GuestPhysAddr(gpa) };
        verify_pages(&t, &[page], &f.mem, &f, &original, &|a| format!("{a:#x}"))
    };
    // Found changed in frame 0x8000, which now holds other bytes; the
    // address maps to 0x2000, as it was.
    let mut stale = vec![0u8; 4096];
    f.mem.read(GuestPhysAddr(0x8000), &mut stale).unwrap();
    assert_ne!(stale, orig, "the stale frame must differ for this test to mean anything");
    let v = judge(TEXT_VA, 0x8000);
    assert!(v.violations.is_empty(), "{:#?}", v.violations);
    assert_eq!(v.clean.len(), 1);
    // Not mapped any more: a violation that says so.
    let v = judge(TEXT_VA + 10 * 4096, 0x2000);
    assert_eq!(v.violations.len(), 1, "{:#?}", v.violations);
    assert!(v.violations[0].detail.contains("no longer mapped"), "{}", v.violations[0].detail);
}

/// Whole-table reads of one examination draw from one budget: past it a
/// read is refused, naming the table and `limits.guest_memory`, whatever
/// each table's own bound, and what was taken never passes the budget.
#[test]
fn whole_table_reads_share_one_budget() {
    let (f, _) = guest();
    let profile = crate::linux::profile::tests::sample();
    // Each read: a page, listing 256 entries.
    let cost = 4096 + 256 * PARSED_ENTRY;
    let m = Matched {
        profile: &profile,
        modules: Vec::new(),
        slide: 0,
        idt_slide: None,
        reads: crate::linux::semantic::ReadBudget::new(3 * cost + cost / 2),
    };
    let mut read = 0;
    for i in 0..10 {
        match read_counted(&m, (&f.mem, &f), (TEXT_VA, 4096), 256, &format!("table {i}")) {
            Ok(b) => {
                assert_eq!(b.len(), 4096);
                read += 1;
            }
            Err(e) => assert!(
                e.starts_with(&format!("table {i}:")) && e.contains("limits.guest_memory"),
                "{e}"
            ),
        }
    }
    assert_eq!(read, 3);
    assert_eq!(m.reads.used(), 3 * cost);
    assert!(m.reads.refused().is_some_and(|e| e.starts_with("table 3:")));
    // A table that cannot be read gives its charge back.
    m.reads.begin_pass();
    let nowhere = 0x7000_0000_0000;
    assert!(read_counted(&m, (&f.mem, &f), (nowhere, 4096), 256, "nowhere").is_err());
    for i in 0..3 {
        assert!(read_counted(&m, (&f.mem, &f), (TEXT_VA, 4096), 256, &format!("t{i}")).is_ok());
    }
    // A new reading of the same tables starts afresh; the peak stays.
    m.reads.begin_pass();
    assert!(read_counted(&m, (&f.mem, &f), (TEXT_VA, 4096), 256, "again").is_ok());
    assert_eq!(m.reads.used(), 3 * cost);
    // A table past its own bound is refused before it is charged.
    let e = read_counted(&m, (&f.mem, &f), (TEXT_VA, MAX_TABLE_BYTES + 1), 0, "huge").unwrap_err();
    assert!(e.contains("implausibly long"), "{e}");
}

/// A list walk stops at the check's deadline (asked every 256 entries),
/// saying so, and walks the whole list without one: a forged list of the
/// most entries allowed, each read through the page tables, cannot hold a
/// check past its time limit.
#[test]
fn a_list_walk_stops_at_the_deadline() {
    use crate::integrity::check::{Deadline, OUT_OF_TIME};
    use crate::x86::{Mapping, Perms};
    struct Identity;
    impl AddressSpace for Identity {
        fn image_pages(&self) -> &[Mapping] {
            &[]
        }
        fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, Perms)> {
            let perms = Perms { writable: true, user: false, executable: false };
            (gva.raw() < 1 << 20).then_some((GuestPhysAddr(gva.raw()), perms))
        }
    }
    // Nodes 64 bytes apart, each pointing at the next; the last at the head.
    let nodes = MAX_LIST as u64;
    let mut ram = vec![0u8; 1 << 20];
    for i in 0..nodes {
        let next = if i + 1 == nodes { 0 } else { (i + 1) * 64 };
        ram[(i * 64) as usize..][..8].copy_from_slice(&next.to_le_bytes());
    }
    let mem = RawDump::from_bytes(ram);
    let mut seen = 0u64;
    walk_list(&mem, &Identity, 0, |_| seen += 1).unwrap();
    assert_eq!(seen, nodes - 1);
    let past = Deadline {
        at: std::time::Instant::now() - std::time::Duration::from_secs(1),
        limit: std::time::Duration::from_secs(30),
    };
    let entered = Deadline::enter(Some(past));
    let mut seen = 0u64;
    let e = walk_list(&mem, &Identity, 0, |_| seen += 1).unwrap_err();
    assert_eq!(e, OUT_OF_TIME);
    assert!(seen < 256, "{seen} entries walked past the deadline");
    drop(entered);
    assert!(!Deadline::passed(), "the deadline outlived its guard");
}
