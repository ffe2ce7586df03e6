use super::*;
use crate::integrity::baseline::tests::{Fake, TEXT_VA};
use crate::memory::RawDump;
use crate::x86::Mapping;

fn run(f: &Fake, b: &Baseline, regs: &[VcpuRegisters]) -> Report {
    check(b, &f.mem, f, regs).unwrap()
}

fn poke(f: &mut Fake, gpa: usize, byte: u8) {
    let mut bytes = vec![0u8; f.mem.layout().total() as usize];
    f.mem.read(GuestPhysAddr(0), &mut bytes).unwrap();
    bytes[gpa] = byte;
    f.mem = RawDump::from_bytes(bytes);
}

#[test]
fn unchanged_guest_is_intact() {
    let f = Fake::new();
    let b = f.baseline();
    let r = run(&f, &b, &Fake::registers());
    assert!(r.intact && r.violations.is_empty() && r.info.is_empty(), "{r:#?}");
    assert!(r.regions.iter().all(|s| s.intact));
    assert_eq!(r.regions[0].baseline_root, r.regions[0].current_root);
}

#[test]
fn a_write_is_localised_to_its_page() {
    let mut f = Fake::new();
    let b = f.baseline();
    poke(&mut f, 0x2000 + 2 * 4096 + 5, 0xcc); // text page 2
    let r = run(&f, &b, &Fake::registers());
    assert!(!r.intact);
    assert_eq!(r.violations.len(), 1);
    let v = &r.violations[0];
    assert_eq!((v.region.as_str(), v.kind, v.page), ("kernel-text", FindingKind::Content, Some(2)));
    assert_eq!(v.gva, GuestVirtAddr(TEXT_VA + 2 * 4096));
    assert_eq!(v.gpa, GuestPhysAddr(0x2000 + 2 * 4096));
    let rodata = r.regions.iter().find(|s| s.name == "kernel-rodata").unwrap();
    assert!(rodata.intact, "untouched regions stay intact");
}

/// Without tags a region is hashed whole first: that hash is its root
/// from either kind of source, any write changes it, and a region not
/// read in full has none.
#[test]
fn a_region_hashed_whole_is_its_root() {
    use crate::integrity::baseline::tests::Copying;
    let mut f = Fake::new();
    let b = f.baseline();
    let reads =
        |r: &crate::integrity::baseline::RegionRecord| -> Vec<(u64, GuestVirtAddr, GuestPhysAddr)> {
            r.pages.iter().zip(0u64..).map(|(p, i)| (i, p.gva, p.gpa)).collect()
        };
    for r in &b.regions {
        let all = reads(r);
        assert_eq!(region_hash(&f.mem, &all, r.bytes), Some(r.root), "{}", r.name);
        assert_eq!(region_hash(&Copying(&f.mem), &all, r.bytes), Some(r.root), "{}", r.name);
        assert_eq!(region_hash(&f.mem, &all[1..], r.bytes), None, "{}", r.name);
    }
    poke(&mut f, 0x2000 + 2 * 4096 + 5, 0xcc); // text page 2
    let text = &b.regions[0];
    assert_ne!(region_hash(&f.mem, &reads(text), text.bytes), Some(text.root));
    assert_ne!(region_hash(&Copying(&f.mem), &reads(text), text.bytes), Some(text.root));
}

/// Reads through a copying source, counted.
struct Counting<'a>(&'a RawDump, std::sync::atomic::AtomicUsize);

impl GuestMemory for Counting<'_> {
    fn read(&self, start: GuestPhysAddr, buf: &mut [u8]) -> Result<(), crate::memory::MemoryError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.read(start, buf)
    }
    fn layout(&self) -> &crate::memory::RamLayout {
        self.0.layout()
    }
    fn kind(&self) -> &'static str {
        "counting"
    }
}

/// A check without tags hashes an intact region whole, in physical runs
/// (one read for the fake's contiguous text), and goes page by page only
/// in a region that changed: the changed check reads at least one more
/// time per text page than the intact one. (With the whole pass dropped,
/// both read page by page and the counts match: tried, and this fails.)
#[test]
fn an_intact_region_is_read_whole_and_only_a_changed_one_page_by_page() {
    let mut f = Fake::new();
    let b = f.baseline();
    let reads = |f: &Fake| {
        let counting = Counting(&f.mem, 0.into());
        let r = check(&b, &counting, f, &Fake::registers()).unwrap();
        (r.intact, counting.1.into_inner())
    };
    let (intact, quiet) = reads(&f);
    assert!(intact);
    poke(&mut f, 0x2000 + 2 * 4096 + 5, 0xcc); // text page 2
    let (intact, busy) = reads(&f);
    assert!(!intact);
    let text_pages = b.regions[0].pages.len();
    assert!(
        busy >= quiet + text_pages,
        "intact check: {quiet} reads; with text page 2 changed: {busy}; text has {text_pages} pages"
    );
}

/// The report of a check with tags, which must equal one without.
fn run_tagged(f: &Fake, b: &Baseline, tags: &crate::integrity::tags::PageTags) -> Report {
    let regs = Fake::registers();
    let mut with = check_tagged(b, &f.mem, f, &regs, Scope::Full, Some(tags)).unwrap();
    let mut without = check(b, &f.mem, f, &regs).unwrap();
    with.checked.clear();
    without.checked.clear();
    assert_eq!(format!("{with:?}"), format!("{without:?}"), "tags changed the report");
    with
}

fn key() -> crate::integrity::nh::Key {
    crate::integrity::nh::Key::random().unwrap()
}

#[test]
fn tags_skip_unchanged_pages_and_still_catch_every_write() {
    use crate::integrity::tags::{PageTags, TagSources};
    let mut f = Fake::new();
    let b = f.baseline();
    let none = crate::integrity::Originals::default();
    let (tags, from) = PageTags::build(key(), &b, &f.mem, &f, &none);
    let pages = b.regions.iter().map(|r| r.pages.len()).sum();
    assert_eq!(from, TagSources { memory: pages, originals: 0, unknown: 0 });
    assert!(run_tagged(&f, &b, &tags).intact);
    poke(&mut f, 0x2000 + 2 * 4096 + 5, 0xcc); // text page 2
    let r = run_tagged(&f, &b, &tags);
    assert_eq!((r.violations.len(), r.violations[0].page), (1, Some(2)));

    // Tags made after the write: that page's tag is unknown without
    // the originals (so it is hashed), and from the originals with them.
    let (late, from) = PageTags::build(key(), &b, &f.mem, &f, &none);
    assert_eq!((from.memory, from.unknown), (pages - 1, 1));
    assert_eq!(run_tagged(&f, &b, &late).violations.len(), 1);
    let mut originals = crate::integrity::Originals::default();
    let fresh = Fake::new();
    for p in b.regions.iter().flat_map(|r| &r.pages) {
        let mut page = vec![0u8; 4096];
        fresh.mem.read(p.gpa, &mut page).unwrap();
        originals.insert(p.gva.raw(), &page);
    }
    let (late, from) = PageTags::build(key(), &b, &f.mem, &f, &originals);
    assert_eq!((from.memory, from.originals, from.unknown), (pages - 1, 1, 0));
    assert_eq!(run_tagged(&f, &b, &late).violations.len(), 1);

    // Tags of another baseline are not used (the report is still right).
    poke(&mut f, 0x2000 + 2 * 4096 + 5, 0x90);
    let other = f.baseline();
    assert!(run_tagged(&f, &other, &tags).intact);
}

#[test]
fn remap_and_permission_changes() {
    let mut f = Fake::new();
    let b = f.baseline();
    // Text page 1 remapped to a copy elsewhere (same bytes): a remap, not content.
    let mut bytes = vec![0u8; f.mem.layout().total() as usize];
    f.mem.read(GuestPhysAddr(0), &mut bytes).unwrap();
    let (src, dst) = (0x3000usize, 0xa000usize);
    let page: Vec<u8> = bytes[src..src + 4096].to_vec();
    bytes[dst..dst + 4096].copy_from_slice(&page);
    f.mem = RawDump::from_bytes(bytes);
    f.pages[1].gpa = GuestPhysAddr(dst as u64);
    // Text page 3 made writable: loosened. Rodata page 0 made... already
    // read-only; make text page 0 non-executable: tightened (info).
    f.pages[3].perms.writable = true;
    f.pages[0].perms.executable = false;
    let r = run(&f, &b, &Fake::registers());
    let kinds: Vec<_> = r.violations.iter().map(|v| (v.kind, v.page)).collect();
    assert!(kinds.contains(&(FindingKind::Remap, Some(1))), "{kinds:?}");
    assert!(kinds.contains(&(FindingKind::Permission, Some(3))), "{kinds:?}");
    assert!(
        !r.violations.iter().any(|v| v.kind == FindingKind::Content),
        "identical copy is not a content change"
    );
    assert_eq!(r.info.len(), 1);
    assert_eq!((r.info[0].kind, r.info[0].page), (FindingKind::Permission, Some(0)));
}

#[test]
fn pages_remapped_outside_ram_or_unmapped_are_violations_not_errors() {
    let mut f = Fake::new();
    let b = f.baseline();
    f.pages[1].gpa = GuestPhysAddr(0x7_0000_0000); // far outside the fake's RAM
    f.pages.remove(2); // text page 2 unmapped
    let r = run(&f, &b, &Fake::registers());
    let got: Vec<_> =
        r.violations.iter().map(|v| (v.kind, v.page, v.detail.contains("not guest RAM"))).collect();
    assert_eq!(got, [(FindingKind::Remap, Some(1), true), (FindingKind::Remap, Some(2), false)]);
    let text = r.regions.iter().find(|s| s.name == "kernel-text").unwrap();
    assert!(text.current_root.starts_with("unavailable"));
    assert_eq!(text.changed_pages, 2);
}

#[test]
fn new_executable_page_in_the_image_is_a_violation() {
    let mut f = Fake::new();
    let b = f.baseline();
    f.pages.push(Mapping {
        gva: GuestVirtAddr(TEXT_VA + 10 * 4096),
        gpa: GuestPhysAddr(0xe000),
        size: 4096,
        perms: Perms { writable: true, user: false, executable: true },
    });
    let r = run(&f, &b, &Fake::registers());
    assert_eq!(r.violations.len(), 1);
    assert_eq!(
        (r.violations[0].region.as_str(), r.violations[0].kind),
        (IMAGE_REGION, FindingKind::Remap)
    );
}

/// A guest that maps the image anew page by page makes at most
/// MAX_IMAGE_FINDINGS findings and one that counts the rest, a violation
/// when any of the rest is one.
#[test]
fn findings_of_the_image_mapping_are_bounded_and_the_rest_counted() {
    let mut f = Fake::new();
    let b = f.baseline();
    let extra = MAX_IMAGE_FINDINGS + 100;
    for i in 0..extra as u64 {
        f.pages.push(Mapping {
            gva: GuestVirtAddr(TEXT_VA + (16 + i) * 4096),
            gpa: GuestPhysAddr(0xe000),
            size: 4096,
            perms: Perms { writable: true, user: false, executable: true },
        });
    }
    let r = run(&f, &b, &Fake::registers());
    let image: Vec<&Finding> = r.violations.iter().filter(|v| v.region == IMAGE_REGION).collect();
    assert_eq!(image.len(), MAX_IMAGE_FINDINGS + 1);
    let last = image.last().unwrap();
    assert!(last.detail.starts_with("and 100 more pages of the kernel image"), "{}", last.detail);
}

/// Harmless findings past the bound do not crowd a violation out: each
/// severity has its own.
#[test]
fn info_findings_of_the_image_mapping_leave_room_for_violations() {
    let mut f = Fake::new();
    let b = f.baseline();
    let ro = Perms { writable: false, user: false, executable: false };
    for i in 0..(MAX_IMAGE_FINDINGS + 10) as u64 {
        f.pages.push(Mapping {
            gva: GuestVirtAddr(TEXT_VA + (16 + i) * 4096),
            gpa: GuestPhysAddr(0xe000),
            size: 4096,
            perms: ro,
        });
    }
    let last = TEXT_VA + (16 + MAX_IMAGE_FINDINGS as u64 + 10) * 4096;
    f.pages.push(Mapping {
        gva: GuestVirtAddr(last),
        gpa: GuestPhysAddr(0xe000),
        size: 4096,
        perms: Perms { writable: false, user: false, executable: true },
    });
    let r = run(&f, &b, &Fake::registers());
    assert!(
        r.violations
            .iter()
            .any(|v| v.gva == GuestVirtAddr(last) && v.detail.contains("newly mapped")),
        "the executable page was crowded out: {} violations",
        r.violations.len()
    );
}

/// A rodata page left out of the region (a freed gap) is not content:
/// its reuse is no violation; made executable, it is one. A baseline
/// bounded in place (a tail dropped) is the one built bounded.
#[test]
fn a_gap_page_left_out_of_rodata_is_checked_for_mapping_not_content() {
    let mut f = Fake::new();
    let gap = GuestVirtAddr(TEXT_VA + 5 * 4096); // the last rodata page
    let mut narrow = f.regions();
    narrow[1].pages.pop();
    let b = Baseline::build(
        &f.mem,
        f.baseline().domain,
        f.identification(),
        Fake::registers(),
        &f,
        &narrow,
    )
    .unwrap();
    poke(&mut f, 0x2000 + 5 * 4096 + 9, 0x90); // the allocator reuses it
    let r = run(&f, &b, &Fake::registers());
    assert!(r.intact, "{r:#?}");
    poke(&mut f, 0x2000 + 4 * 4096 + 9, 0x90); // a rodata page proper
    let r = run(&f, &b, &Fake::registers());
    assert_eq!(r.violations.len(), 1, "{r:#?}");
    assert_eq!(r.violations[0].region, "kernel-rodata");
    let mut f = Fake::new();
    f.pages[5].perms.executable = true;
    let r = run(&f, &b, &Fake::registers());
    assert_eq!(r.violations.len(), 1, "{r:#?}");
    let v = &r.violations[0];
    assert_eq!((v.region.as_str(), v.kind, v.gva), (IMAGE_REGION, FindingKind::Permission, gap));

    // keep_head: only a head of two pages or more is kept in place.
    let f = Fake::new();
    let mut b = f.baseline();
    let mut other = b.clone();
    assert_eq!(other.keep_head("kernel-text", |gva| gva != GuestVirtAddr(TEXT_VA)), None);
    assert_eq!(other, b, "not a head: nothing changed");
    assert_eq!(other.keep_head("kernel-rodata", |gva| gva != gap), None, "one page left");
    let last_text = GuestVirtAddr(TEXT_VA + 3 * 4096);
    assert_eq!(b.keep_head("kernel-text", |gva| gva != last_text), Some(1));
    let mut narrow = f.regions();
    narrow[0].pages.pop();
    let built = Baseline::build(
        &f.mem,
        b.domain.clone(),
        f.identification(),
        Fake::registers(),
        &f,
        &narrow,
    )
    .unwrap();
    assert_eq!(b.regions, built.regions);
}

#[test]
fn register_weakening_is_reported_per_vcpu() {
    let f = Fake::new();
    let b = f.baseline();
    let mut regs = Fake::registers();
    regs[0].cr0 &= !CR0_WP;
    regs[0].cr4 &= !CR4_SMEP;
    regs[0].efer &= !EFER_NXE;
    regs[0].idtr_base += 0x1000;
    regs[0].cr3 = 0x5000; // CR3 changes all the time: not a finding
    let r = run(&f, &b, &regs);
    let names: Vec<_> = r.violations.iter().map(|v| v.register.clone().unwrap()).collect();
    assert_eq!(names, ["CR0.WP", "CR4.SMEP", "EFER.NXE", "IDTR"]);
    assert!(r.violations.iter().all(|v| v.kind == FindingKind::Register && v.vcpu == Some(0)));
    // Bits that get set are no weakening.
    let mut regs = Fake::registers();
    regs[0].cr4 |= CR4_SMAP;
    assert!(run(&f, &b, &regs).intact);
}

#[test]
fn hot_scope_covers_tables_and_registers_only() {
    let mut f = Fake::new();
    let b = f.baseline();
    poke(&mut f, 0x2000 + 5, 0xcc); // text page 0
    let hot =
        |f: &Fake, regs: &[VcpuRegisters]| check_scoped(&b, &f.mem, f, regs, Scope::Hot).unwrap();
    let r = hot(&f, &Fake::registers());
    assert!(r.intact, "text is not in the hot scope");
    assert!(r.regions.iter().all(|s| s.name == REGISTER_REGION), "{:?}", r.regions);
    assert_eq!(r.bytes_verified, 0);
    let mut regs = Fake::registers();
    regs[0].cr0 &= !CR0_WP;
    assert_eq!(hot(&f, &regs).violations.len(), 1);
    let full = run(&f, &b, &Fake::registers());
    assert_eq!(full.bytes_verified, 6 * 4096);
    assert!(!full.intact);
}

/// The evidence of a move: frames and bytes, page by page.
#[test]
fn code_placement_tells_frames_from_bytes() {
    let mut f = Fake::new();
    let b = f.baseline();
    let all = code_placement(&b, &f.mem, &f);
    assert_eq!(all, CodePlacement { pages: 4, same_frames: 4, same_bytes: 4 });
    // One text page's bytes changed in place.
    poke(&mut f, 0x2000 + 7, 0xcc);
    assert_eq!(code_placement(&b, &f.mem, &f).same_bytes, 3);
    // Two text pages pointed at other frames holding the same bytes
    // (copies: the fake's memory repeats every 2 KiB), one unmapped.
    f.pages[1].gpa = GuestPhysAddr(0xa000);
    f.pages[2].gpa = GuestPhysAddr(0xb000);
    f.pages.remove(3);
    let p = code_placement(&b, &f.mem, &f);
    assert_eq!((p.pages, p.same_frames, p.same_bytes), (4, 1, 2));
    // A copy that differs holds other bytes.
    poke(&mut f, 0xb000 + 9, 0xcc);
    assert_eq!(code_placement(&b, &f.mem, &f).same_bytes, 1);
}

#[test]
fn a_kernel_moved_whole_is_every_page_a_remap_never_another_boot() {
    // Take a baseline of a bigger fake, then move every page.
    let mut f = Fake::new();
    for i in 6..12u64 {
        f.pages.insert(
            4,
            Mapping {
                gva: GuestVirtAddr(TEXT_VA + (i + 20) * 4096),
                gpa: GuestPhysAddr(0x8000 + (i - 6) * 4096),
                size: 4096,
                perms: f.pages[0].perms,
            },
        );
    }
    f.pages.sort_by_key(|m| m.gva);
    let mut regions = f.regions();
    regions[0].pages = f
        .pages
        .iter()
        .filter(|m| m.perms.executable)
        .map(|m| crate::integrity::PageSpec { gva: m.gva, gpa: m.gpa, perms: m.perms })
        .collect();
    let domain = super::super::baseline::DomainId { name: "fake".into(), uuid: "u".into() };
    let b = Baseline::build(&f.mem, domain, f.identification(), Fake::registers(), &f, &regions)
        .unwrap();
    // Move every page to other frames holding the same bytes (copies),
    // and write an int3 into one copy: the guest's own page tables say
    // nothing about a reboot, so every page is a remap and the copy's
    // change a content finding.
    let total = f.mem.layout().total() as usize;
    let mut bytes = vec![0u8; 2 * total];
    f.mem.read(GuestPhysAddr(0), &mut bytes[..total]).unwrap();
    let mut hooked = None;
    for (i, m) in f.pages.iter_mut().enumerate() {
        let (from, to) = (m.gpa.raw() as usize, total + i * 4096);
        bytes.copy_within(from..from + 4096, to);
        m.gpa = GuestPhysAddr(to as u64);
        if m.perms.executable && hooked.is_none() {
            bytes[to + 100..to + 108].fill(0xcc);
            hooked = Some(m.gpa);
        }
    }
    f.mem = RawDump::from_bytes(bytes);
    let hooked = hooked.unwrap();
    let r = check(&b, &f.mem, &f, &Fake::registers()).unwrap();
    for m in &f.pages {
        assert!(
            r.violations
                .iter()
                .any(|v| v.kind == FindingKind::Remap && v.gva == m.gva && v.gpa == m.gpa),
            "no remap of {} to {}: {:#?}",
            m.gva,
            m.gpa,
            r.violations
        );
    }
    let content: Vec<_> = r.violations.iter().filter(|v| v.kind == FindingKind::Content).collect();
    assert_eq!(content.len(), 1, "{content:#?}");
    assert_eq!(content[0].gpa, hooked);
    assert!(!r.intact);
}

/// A deadline passes once its time is over and names the stage just done;
/// no deadline never does.
#[test]
fn a_deadline_stops_after_the_stage_that_ran_past_it() {
    assert!(Deadline::check(None, "any").is_ok());
    let ahead = Deadline::after(std::time::Duration::from_secs(3600));
    assert!(Deadline::check(Some(ahead), "the first stage").is_ok());
    let past = Deadline { at: std::time::Instant::now(), limit: std::time::Duration::ZERO };
    match Deadline::check(Some(past), "the second stage") {
        Err(e @ CheckError::OverTime { stage: "the second stage", .. }) => {
            assert!(e.to_string().starts_with("stopped after the second stage"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}
