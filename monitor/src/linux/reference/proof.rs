//! A running kernel proved against its vendor's image: the reference check
//! of a boot's first baseline, and of `vigil verify`.
//!
//! Every text and read-only data page is compared with the image at the
//! guest's slide (see [`verify_pages`]). A byte that differs off every
//! rewrite site, or on one in a form the kernel never writes there, is a
//! mismatch. A site the kernel patches as it runs (ftrace, static calls)
//! holding a call is judged as the patch review judges a change since a
//! baseline, with the image's bytes as the original: by the kernel's
//! records, read from the guest and checked. What the guest wrote before
//! vigil first looked is judged the same as what it writes later.

use std::collections::HashMap;
use std::path::PathBuf;

use super::{BootWritten, Judgement, ReferenceFile, Rewrites, Verification, verify_pages};
use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use crate::integrity::{
    AddressSpace, Finding, FindingKind, ReferenceCheck, ReferenceState, Severity,
};
use crate::linux::patch;
use crate::linux::region::Region;
use crate::linux::semantic::{self, Matched};
use crate::linux::{KernelView, profile::Profile};
use crate::memory::GuestMemory;

/// Largest reference file read (the 6.12 image's is 12 MB).
const MAX_FILE: u64 = 128 << 20;
/// Places judged by the kernel's records, at most.
const MAX_PLACES: usize = 131_072;
/// Mismatches reported one by one; past this, one finding says how many more.
const MAX_FINDINGS: usize = 256;

/// Where the reference of a profile lies: beside it, of the same name,
/// `.reference` for `.profile` (as `vigil profile build` writes it).
pub fn reference_path(p: &Profile) -> Option<PathBuf> {
    p.file.as_ref().map(|f| f.with_extension("reference"))
}

/// Reads the reference at `path` with the rewrite sites of profile `p`.
pub fn load(path: &std::path::Path, p: &Profile) -> Result<(super::Reference, Rewrites), String> {
    let size = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.len();
    if size > MAX_FILE {
        return Err(format!("{}: {size} bytes, more than a reference holds", path.display()));
    }
    let stored = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let r = ReferenceFile::read(&stored).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = Rewrites::of(&r).map_err(|e| format!("{}: {e}", path.display()))?;
    w.add_run_time(&r, p).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((r, w))
}

/// What a proof found: the outcome as a baseline records it, and the
/// comparison's counts.
pub struct Proof {
    pub check: ReferenceCheck,
    pub verification: Option<Verification>,
}

/// Proves the kernel of `view` against the reference beside the profile it
/// matches (or the one at `path`).
pub fn prove<M: GuestMemory + ?Sized>(
    mem: &M,
    view: &KernelView<'_, M>,
    profiles: &[Profile],
    path: Option<&std::path::Path>,
    clock: &dyn patch::Clock,
) -> Proof {
    let unavailable =
        |why: String| Proof { check: ReferenceCheck::unavailable(why), verification: None };
    let base = view.identification.image_base;
    let Some(m) = semantic::match_profile(profiles, mem, view, base) else {
        return unavailable(
            "no guest profile matches the kernel: nothing to compare it with".into(),
        );
    };
    let Some(path) = path.map(std::path::Path::to_path_buf).or_else(|| reference_path(m.profile))
    else {
        return unavailable(format!(
            "the profile of {} was not read from a file",
            m.profile.release
        ));
    };
    if !path.exists() {
        return unavailable(format!(
            "no reference of {} at {} (`vigil profile build` writes it beside the profile)",
            m.profile.release,
            path.display()
        ));
    }
    let (r, w) = match load(&path, m.profile) {
        Ok(rw) => rw,
        Err(why) => return unavailable(format!("the reference could not be read: {why}")),
    };
    let slide = m.slide;
    let syms = m.profile.symbols();
    // Several symbols may name one address: a thunk's name is the one that counts.
    let names = |a: u64| {
        let a = a.wrapping_sub(slide);
        let at = &syms[syms.partition_point(|s| s.addr < a)..];
        let here: Vec<&str> =
            at.iter().take_while(|s| s.addr == a).map(|s| s.name.as_str()).collect();
        super::telling_name(&here).map(str::to_owned)
    };
    let slot = |a: u64| {
        semantic::read_virt(mem, view, a, 8)
            .and_then(|(b, _)| b.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes))
    };
    let boot = BootWritten::of(m.profile);
    let v = verify_pages(&r, &w, mem, &view.regions, slide, (&names, &slot), &boot);
    let mut mismatches = Vec::new();
    let place = Places::of(view);
    // Sites patched at run time, judged by the kernel's records with the
    // image's bytes as their original.
    let run_time: Vec<&super::Judged> =
        v.differences.iter().filter(|j| j.judgement == Judgement::RunTime).collect();
    // Places for the kernel's records to judge: sites patched at run time,
    // and the first byte of every refused run in text (a kprobe's, or an
    // attacker's).
    let mut places: Vec<patch::Place> = Vec::new();
    // The bytes of `[link, link + n)` as found: the run's where it differs.
    let found_at = |d: &super::Difference, link: u64, n: usize| -> Option<Vec<u8>> {
        let mut b = r.expected(link, n, slide)?;
        for (k, x) in b.iter_mut().enumerate() {
            let off = (link + k as u64).checked_sub(d.addr).and_then(|o| usize::try_from(o).ok());
            if let Some(f) = off.and_then(|o| d.found.get(o)) {
                *x = *f;
            }
        }
        Some(b)
    };
    // (A refused run may hold a run-time site too: a kprobe beside a traced
    // function's entry.)
    let judged_by_records = v.differences.iter().filter(|j| j.judgement != Judgement::Allowed);
    for j in judged_by_records {
        for site in j.diff.sites.iter().filter(|s| s.kind.at_run_time()) {
            let n = usize::from(site.len);
            if let (Some(orig), Some(now)) =
                (r.expected(site.addr, n, slide), found_at(&j.diff, site.addr, n))
            {
                places.push(patch::Place {
                    addr: site.addr.wrapping_add(slide),
                    orig,
                    now,
                    kprobe: false,
                });
            }
        }
    }
    let refused: Vec<&super::Judged> =
        v.differences.iter().filter(|j| j.judgement == Judgement::Refused).collect();
    let in_text = |a: u64| {
        r.section(".text").is_some_and(|t| a >= t.addr && a < t.addr + t.bytes.len() as u64)
    };
    // A refused run in text may be a kprobe's: an `int3`, or an optimised
    // probe's 5-byte jump, at its first refused byte and nothing after.
    let probe_len = |j: &super::Judged| {
        let first = j.at.checked_sub(j.diff.addr).and_then(|o| usize::try_from(o).ok());
        if first.and_then(|o| j.diff.found.get(o)) == Some(&0xcc) { 1 } else { 5 }
    };
    let probe_sized = |j: &super::Judged| {
        in_text(j.at) && j.diff.addr + j.diff.found.len() as u64 <= j.at + probe_len(j)
    };
    let mut probed: Vec<u64> = Vec::new();
    for j in refused.iter().filter(|j| probe_sized(j)) {
        if let (Some(orig), Some(now)) = (r.expected(j.at, 5, slide), found_at(&j.diff, j.at, 5)) {
            places.push(patch::Place { addr: j.at.wrapping_add(slide), orig, now, kprobe: true });
            probed.push(j.at);
        }
    }
    places.sort();
    places.dedup();
    // Past this many, places are not judged, and that is a mismatch (a
    // full tracer patches about 40,000 function entries).
    let unjudged = places.len().saturating_sub(MAX_PLACES);
    places.truncate(MAX_PLACES);
    if unjudged > 0 {
        mismatches.push(
            Finding::new(
                &Region::Text.name(),
                FindingKind::Reference,
                Severity::Violation,
                GuestVirtAddr(0),
                GuestPhysAddr(0),
            )
            .saying(
                format!("{unjudged} changed site(s) past the {MAX_PLACES} the kernel's records are asked about were not judged"),
                String::new(),
                String::new(),
            ),
        );
    }
    let space: &dyn AddressSpace = view;
    let failed = patch::judge_sites(&m, (mem, space), &places, patch::PENDING_HOLD, clock);
    let failed_at: std::collections::HashSet<u64> = failed.iter().map(|(a, _)| *a).collect();
    // A refused run is a kprobe's when a kprobe the records allow covers it.
    let kprobed = |j: &super::Judged| {
        probed.contains(&j.at) && !failed_at.contains(&j.at.wrapping_add(slide))
    };
    for j in refused.into_iter().filter(|j| !kprobed(j)) {
        let why = if boot.holds(j.at) {
            "is data written at boot holding a pointer into a module's memory, or into kernel text where no function starts"
        } else {
            "is no form the kernel writes there"
        };
        mismatches.push(mismatch(&m, &place, j.at.wrapping_add(slide), &j.diff, slide, why));
    }
    for (at, why) in failed {
        // A kprobe place that failed: its run is reported above.
        if at != 0 && probed.contains(&at.wrapping_sub(slide)) {
            continue;
        }
        let on_run_time = v.differences.iter().find(|j| {
            let start = j.diff.addr.wrapping_add(slide);
            at >= start && at - start < j.diff.found.len() as u64
        });
        let why =
            format!("is not as the kernel's records allow at a site it patches as it runs ({why})");
        match (at, on_run_time) {
            (0, _) => mismatches.push(
                Finding::new(
                    &Region::PatchTables.name(),
                    FindingKind::Reference,
                    Severity::Violation,
                    GuestVirtAddr(0),
                    GuestPhysAddr(0),
                )
                .saying(why, String::new(), String::new()),
            ),
            (_, Some(j)) => mismatches.push(mismatch(&m, &place, at, &j.diff, slide, &why)),
            // A refused run's first byte, not a kprobe: reported above.
            (_, None) => {}
        }
    }
    if mismatches.len() > MAX_FINDINGS {
        let more = mismatches.len() - MAX_FINDINGS;
        mismatches.truncate(MAX_FINDINGS);
        mismatches.push(
            Finding::new(
                &Region::Text.name(),
                FindingKind::Reference,
                Severity::Violation,
                GuestVirtAddr(0),
                GuestPhysAddr(0),
            )
            .saying(
                format!("{more} more run(s) of bytes differ from the vendor's image"),
                String::new(),
                String::new(),
            ),
        );
    }
    let detail = format!(
        "{} page(s) of text and read-only data compared with the image of {} at slide {slide:#x} ({}): \
         {} run(s) in boot-time rewrite forms, {} at run-time patch sites; {} entries of the jump table \
         and static call sites compared as sets; {} byte(s) of the other data written at boot \
         (ro_after_init) differ, not compared byte for byte, its {} words checked as pointers; {} page(s) outside the image's sections, {} unreadable",
        v.pages,
        m.profile.release,
        path.display(),
        v.differences.iter().filter(|j| j.judgement == Judgement::Allowed).count(),
        run_time.len(),
        v.table_entries,
        v.boot_written,
        v.boot_pointers,
        v.outside.len(),
        v.unreadable.len(),
    );
    if v.dropped > 0 {
        mismatches.push(
            Finding::new(
                &Region::Text.name(),
                FindingKind::Reference,
                Severity::Violation,
                GuestVirtAddr(0),
                GuestPhysAddr(0),
            )
            .saying(
                format!(
                    "{} more run(s) differ from the vendor's image than are judged one by one",
                    v.dropped
                ),
                String::new(),
                String::new(),
            ),
        );
    }
    let state = if mismatches.is_empty() && v.unreadable.is_empty() {
        ReferenceState::Verified
    } else if mismatches.is_empty() {
        ReferenceState::Unavailable
    } else {
        ReferenceState::Mismatch
    };
    Proof { check: ReferenceCheck { state, detail, mismatches }, verification: Some(v) }
}

/// Where the kernel's text and rodata pages lie: region, index, frame.
struct Places(HashMap<u64, (String, u64, GuestPhysAddr)>);

impl Places {
    fn of<M: GuestMemory + ?Sized>(view: &KernelView<'_, M>) -> Self {
        let mut out = HashMap::new();
        for g in
            view.regions.iter().filter(|g| Region::Text.is(&g.name) || Region::Rodata.is(&g.name))
        {
            for (i, p) in g.pages.iter().enumerate() {
                out.insert(p.gva.raw(), (g.name.clone(), i as u64, p.gpa));
            }
        }
        Places(out)
    }

    fn page(&self, gva: u64) -> Option<(String, u64, GuestPhysAddr)> {
        self.0.get(&(gva & !(PAGE_SIZE - 1))).cloned()
    }
}

/// A finding for a run of bytes that is no allowed form, named at `at`
/// (run-time address): a function and offset, or a syscall table entry.
fn mismatch(
    m: &Matched<'_>,
    place: &Places,
    at: u64,
    d: &super::Difference,
    slide: u64,
    why: &str,
) -> Finding {
    let (region, index, gpa) =
        place.page(at).unwrap_or_else(|| (Region::Text.name().into_owned(), 0, GuestPhysAddr(0)));
    let frame = GuestPhysAddr(gpa.raw() + (at & (PAGE_SIZE - 1)));
    let link = at.wrapping_sub(slide);
    let name = syscall_entry(m.profile, link).or_else(|| {
        m.profile
            .nearest(link)
            .map(|(n, off)| if off == 0 { n.to_owned() } else { format!("{n}+{off:#x}") })
    });
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    // The bytes from `at` on: where the finding points.
    let skip = usize::try_from(at.wrapping_sub(d.addr.wrapping_add(slide)))
        .ok()
        .filter(|&k| k < d.found.len())
        .unwrap_or(0);
    let (expected, found) = (&d.expected[skip..], &d.found[skip..]);
    let what = if Region::Text.is(&region) { "kernel text" } else { "read-only data" };
    let mut f = Finding::new(
        &region,
        FindingKind::Reference,
        Severity::Violation,
        GuestVirtAddr(at),
        frame,
    )
    .saying(
        format!(
            "{what} at {} {why}: {} byte(s) differ from the vendor's image",
            name.as_deref().unwrap_or("an unnamed address"),
            found.len()
        ),
        hex(expected),
        hex(found),
    );
    f.page = Some(index);
    f.symbol = name.map(|n| format!("{n} ({what})"));
    f
}

/// `sys_call_table[N]` (or the ia32 table's) for a link address in one.
fn syscall_entry(p: &Profile, link: u64) -> Option<String> {
    p.syscall_tables().into_iter().find_map(|(table, list, _)| {
        let start = p.symbol(table)?.addr;
        let entries = list.iter().map(|(nr, _)| u64::from(*nr) + 1).max()?;
        let off = link.checked_sub(start)?;
        let nr = off / 8;
        (nr < entries).then(|| match list.iter().find(|(n, _)| u64::from(*n) == nr) {
            Some((_, name)) => format!("{table}[{nr}] ({name})"),
            None => format!("{table}[{nr}]"),
        })
    })
}
