//! GDT descriptors: which a Linux x86-64 kernel installs, and which of a
//! changed GDT page are a process's own TLS entries.

use super::*;

/// GDT entries Linux x86-64 uses (asm/segment.h): kernel code, 32-bit
/// kernel code, kernel data, user 32-bit code, user data, user 64-bit code,
/// the TSS (two slots).
pub(super) const GDT_KERNEL32_CS: usize = 1;
pub(super) const GDT_KERNEL_CS: usize = 2;
pub(super) const GDT_KERNEL_DS: usize = 3;
pub(super) const GDT_USER32_CS: usize = 4;
pub(super) const GDT_USER_DS: usize = 5;
pub(super) const GDT_USER_CS: usize = 6;
pub(super) const GDT_TSS: usize = 8;

/// What is wrong with the descriptors of one GDT, judged against the layout
/// Linux sets up: each finding names the entry and the reason.
pub fn gdt_problems(gdt: &[u8]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let entry = |i: usize| {
        gdt.get(i * 8..i * 8 + 8).map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
    };
    let access = |d: u64| ((d >> 40) & 0xff) as u8;
    let present = |d: u64| access(d) & 0x80 != 0;
    let dpl = |d: u64| (access(d) >> 5) & 3;
    let is_segment = |d: u64| access(d) & 0x10 != 0; // S: code/data, not system
    let is_code = |d: u64| is_segment(d) && access(d) & 0x08 != 0;
    let long = |d: u64| (d >> 53) & 1 == 1;
    let want = |out: &mut Vec<(usize, String)>, i: usize, ok: bool, what: &str| {
        if !ok {
            out.push((i, format!("entry {i} (selector {:#x}) is not {what}", i * 8)));
        }
    };
    let n = gdt.len() / 8;
    if n <= GDT_TSS + 1 {
        out.push((0, format!("only {n} entries: too short for Linux's layout")));
        return out;
    }
    let e = |i| entry(i).unwrap_or(0);
    let kcs = e(GDT_KERNEL_CS);
    want(
        &mut out,
        GDT_KERNEL_CS,
        present(kcs) && is_code(kcs) && dpl(kcs) == 0 && long(kcs),
        "64-bit ring-0 code",
    );
    let kds = e(GDT_KERNEL_DS);
    want(
        &mut out,
        GDT_KERNEL_DS,
        present(kds) && is_segment(kds) && !is_code(kds) && dpl(kds) == 0,
        "ring-0 data",
    );
    let ucs = e(GDT_USER_CS);
    want(
        &mut out,
        GDT_USER_CS,
        present(ucs) && is_code(ucs) && dpl(ucs) == 3 && long(ucs),
        "64-bit ring-3 code",
    );
    let u32cs = e(GDT_USER32_CS);
    want(
        &mut out,
        GDT_USER32_CS,
        is_code(u32cs) && dpl(u32cs) == 3 && !long(u32cs),
        "32-bit ring-3 code",
    );
    let uds = e(GDT_USER_DS);
    want(&mut out, GDT_USER_DS, is_segment(uds) && !is_code(uds) && dpl(uds) == 3, "ring-3 data");
    let tss = e(GDT_TSS);
    let tss_type = access(tss) & 0x0f;
    want(
        &mut out,
        GDT_TSS,
        present(tss) && !is_segment(tss) && (tss_type == 9 || tss_type == 11) && dpl(tss) == 0,
        "a 64-bit TSS",
    );
    // Nothing else may be a gate, or ring-0 code.
    let mut i = 1;
    while i < n {
        let d = e(i);
        if present(d) && !is_segment(d) {
            let t = access(d) & 0x0f;
            if matches!(t, 0x4 | 0xc | 0x6 | 0x7 | 0xe | 0xf) {
                out.push((
                    i,
                    format!(
                        "entry {i} (selector {:#x}) is a gate (type {t:#x}): a way into ring 0",
                        i * 8
                    ),
                ));
            } else if i != GDT_TSS && !(i == GDT_TSS + 2 && t == 2) {
                out.push((i, format!("entry {i} (selector {:#x}) is an unexpected system descriptor (type {t:#x})", i * 8)));
            }
            i += 2; // system descriptors take two slots in long mode
            continue;
        }
        if present(d) && is_code(d) && dpl(d) == 0 && i != GDT_KERNEL_CS && i != GDT_KERNEL32_CS {
            out.push((
                i,
                format!("entry {i} (selector {:#x}) is an extra ring-0 code segment", i * 8),
            ));
        }
        i += 1;
    }
    out
}

/// The GDT entries of 32-bit thread-local storage (`GDT_ENTRY_TLS_MIN` to
/// `_MAX` on x86-64): the kernel writes the running task's
/// `set_thread_area` descriptors there at every task switch.
pub(super) const GDT_TLS: std::ops::RangeInclusive<usize> = 12..=14;

/// Whether descriptor `d` is one `set_thread_area` can install (the
/// kernel's `tls_desc_okay` and `fill_ldt`): empty, or a 32-bit ring-3 data
/// segment (S set, DPL 3, not code, L clear, D/B set), present or not.
pub(super) fn user_tls_descriptor(d: u64) -> bool {
    let access = ((d >> 40) & 0xff) as u8;
    let (long, big) = ((d >> 53) & 1 == 1, (d >> 54) & 1 == 1);
    d == 0 || (access & 0x10 != 0 && (access >> 5) & 3 == 3 && access & 0x08 == 0 && !long && big)
}

/// Takes the content findings of GDT pages (regions `gdt-cpuN`) whose only
/// change is in the TLS entries, each now empty or a ring-3 segment, and
/// reports them as info: a task with 32-bit TLS was switched to. Any other
/// change of a GDT page stays a violation. `regs` (the baseline's) give each
/// GDT's base within its page; `original` the page as the baseline kept it.
/// The page is read again to be judged: only when it still hashes to what
/// the check found (one-page regions) is the judgement of the same bytes.
pub fn review_gdt_pages<M: GuestMemory + ?Sized>(
    report: &mut crate::integrity::Report,
    mem: &M,
    regs: &[crate::x86::VcpuRegisters],
    original: &dyn Fn(u64) -> Option<Vec<u8>>,
) {
    let taken = report.take_violations(|f| {
        f.kind == FindingKind::Content && f.region.starts_with("gdt-cpu") && f.page.is_some()
    });
    let pages: Vec<(String, u64)> =
        report.regions.iter().map(|r| (r.name.clone(), r.pages)).collect();
    let one_page = |region: &str| pages.iter().any(|(n, p)| n == region && *p == 1);
    let mut keep = Vec::new();
    let mut info = Vec::new();
    for f in taken {
        let base = f
            .region
            .strip_prefix("gdt-cpu")
            .and_then(|n| n.parse::<u32>().ok())
            .and_then(|n| regs.iter().find(|r| r.index == n))
            .map(|r| r.gdtr_base);
        let page = f.gva.raw() & !(PAGE_SIZE - 1);
        let mut cur = vec![0u8; crate::addr::PAGE_BYTES];
        let tls_only = base.is_some_and(|base| {
            let gpa = GuestPhysAddr(f.gpa.raw() & !(PAGE_SIZE - 1));
            let Some(orig) = original(page).filter(|o| o.len() == cur.len()) else { return false };
            if mem.read(gpa, &mut cur).is_err() || !one_page(&f.region) {
                return false;
            }
            if blake3::hash(&cur).to_hex().as_str() != f.after {
                return false; // changed since the check: judged at the next
            }
            // Where the TLS entries lie in this page (the table may start
            // in an earlier page of the region).
            let first = i128::from(base) + 8 * *GDT_TLS.start() as i128 - i128::from(page);
            let last = first + 8 * GDT_TLS.clone().count() as i128;
            let changed = orig.iter().zip(&cur).enumerate().filter(|(_, (a, b))| a != b);
            let mut any = false;
            for (i, _) in changed {
                any = true;
                if !(first..last).contains(&(i as i128)) {
                    return false;
                }
            }
            any && (first..last).step_by(8).all(|at| {
                usize::try_from(at)
                    .ok()
                    .and_then(|at| cur.get(at..at + 8))
                    .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")))
                    .is_some_and(user_tls_descriptor)
            })
        });
        if tls_only {
            let mut i = f.clone();
            i.severity = Severity::Info;
            i.detail = format!(
                "{}: only its 32-bit TLS entries (12-14) changed, to ring-3 segments: a task that \
                 called set_thread_area runs on this CPU",
                f.region
            );
            info.push(i);
        } else {
            keep.push(f);
        }
    }
    report.add_findings(keep);
    report.add_findings(info);
}
