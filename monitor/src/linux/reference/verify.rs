//! A running kernel's text and read-only data against its reference.

use std::collections::HashMap;

use super::{
    Difference, Forms, Judgement, Reference, RewriteKind, RewriteSite, Rewrites, differences, judge,
};
use crate::addr::{GuestPhysAddr, PAGE_BYTES, PAGE_SIZE};
use crate::integrity::RegionLayout;
use crate::linux::region::Region;
use crate::memory::GuestMemory;

/// What a comparison of the kernel's pages with the reference found.
#[derive(Debug, Default)]
pub struct Verification {
    /// Pages compared.
    pub pages: u64,
    /// Pages the reference does not hold (past a kept section).
    pub outside: Vec<u64>,
    /// Pages that could not be read from guest memory.
    pub unreadable: Vec<u64>,
    /// Every run of bytes that differs, by link address, judged: allowed
    /// when every byte lies on a site that holds a form the kernel writes
    /// at boot; for the patch review when some lie on sites it patches as
    /// it runs; refused otherwise.
    pub differences: Vec<(Difference, Judgement)>,
}

/// Compares the text and read-only data pages of `regions` (as the guest
/// maps them, `slide` bytes above their link addresses) with `r`; `names`
/// names code at run-time addresses (for thunks).
pub fn verify_pages<M: GuestMemory + ?Sized>(
    r: &Reference,
    w: &Rewrites,
    mem: &M,
    regions: &[RegionLayout],
    slide: u64,
    names: &dyn Fn(u64) -> Option<String>,
    slot: &dyn Fn(u64) -> Option<u64>,
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
    let judge_site = |s: &RewriteSite| -> Judgement {
        let n = usize::from(s.len);
        let ip = s.addr.wrapping_add(slide);
        let (Some(expected), Some(found)) = (r.expected(s.addr, n, slide), live(ip, n)) else {
            return Judgement::Refused;
        };
        let also: Vec<(u64, u8)> = w
            .sites
            .iter()
            .filter(|o| o.addr == s.addr && o != &s)
            .filter_map(|o| match o.kind {
                RewriteKind::Alternative { replacement, replacement_len } => {
                    Some((replacement.wrapping_add(slide), replacement_len))
                }
                _ => None,
            })
            .collect();
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
        judge(kind, ip, &expected, &found, &also, &forms)
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
                let judged: Vec<(&RewriteSite, Judgement)> =
                    d.sites.iter().map(|s| (s, judge_site(s))).collect();
                // Each differing byte takes the best judgement of the sites it lies on.
                let rank = |j: Judgement| match j {
                    Judgement::Allowed => 0,
                    Judgement::RunTime => 1,
                    Judgement::Refused => 2,
                };
                let worst = (0..d.found.len())
                    .filter(|&k| d.expected[k] != d.found[k])
                    .map(|k| {
                        let b = d.addr + k as u64;
                        judged
                            .iter()
                            .filter(|(s, _)| (s.addr..s.addr + u64::from(s.len)).contains(&b))
                            .map(|(_, j)| *j)
                            .min_by_key(|j| rank(*j))
                            .unwrap_or(Judgement::Refused)
                    })
                    .max_by_key(|j| rank(*j))
                    .unwrap_or(Judgement::Allowed);
                out.differences.push((d, worst));
            }
        }
    }
    out
}
