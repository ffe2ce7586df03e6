//! What a domain's attach and checks become for the operator: events,
//! metrics and status, apart from the task's schedule and states.

use super::*;
use crate::integrity::ReferenceState;
use crate::integrity::check::Report;
use crate::linux::KernelFacts;
use crate::linux::modules::ModuleEvent;

/// Says once per attach which profile the kernel matched, or that none did.
pub(super) fn profile_notice(shared: &Shared, subject: &Subject, name: &str, kernel: &KernelFacts) {
    let s = &shared.settings;
    let (sev, detail) = match &kernel.profile {
        Some(p) => (
            AlertSeverity::Info,
            format!("{name} runs kernel {p}: syscall tables and IDT gates are checked by symbol"),
        ),
        None => (
            AlertSeverity::Warning,
            format!(
                "no guest profile in {} matches the kernel of {name}: page, mapping and register checks only; \
                 `vigil profile list` shows the kernel's banner, and a profile built with `vigil profile build \
                 VMLINUZ` is picked up within 5 s",
                s.profiles.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
        ),
    };
    shared.sink.emit(subject.event(EventKind::Notice, sev, detail));
}

/// Counts a check in the metrics: checks, duration, bytes, last time.
pub(super) fn count_check(
    m: &Metrics,
    name: &str,
    scope_name: &str,
    took: Duration,
    report: &Report,
) {
    let name = name.to_owned();
    m.checks.get_or_create(&CheckLabels { domain: name.clone(), scope: scope_name.into() }).inc();
    m.check_duration
        .get_or_create(&ScopeLabels { scope: scope_name.into() })
        .observe(took.as_secs_f64());
    m.bytes_verified
        .get_or_create(&DomainLabels { domain: name.clone() })
        .inc_by(report.bytes_verified);
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    m.last_check.get_or_create(&DomainLabels { domain: name.clone() }).set(unix);
}

/// The kernel's own accepted patches: counted, said in an info event; after
/// a full check, the sites that differ from the baseline and those held.
pub(super) fn report_patches(
    shared: &Shared,
    subject: &Subject,
    name: &str,
    report: &KernelFacts,
    full: bool,
) {
    let m = &shared.sink.metrics;
    let name = name.to_owned();
    if !report.patches.is_empty() {
        let mut parts = Vec::new();
        for (kind, n) in &report.patches {
            m.patches
                .get_or_create(&PatchLabels { domain: name.clone(), kind: kind.clone() })
                .inc_by(*n);
            parts.push(format!("{n} {kind}"));
        }
        shared.sink.emit(subject.event(
            EventKind::KernelPatched,
            AlertSeverity::Info,
            format!(
                "{name} patched its own text: {} site change(s) accepted ({}); {} site(s) differ from the baseline now",
                report.patches.values().sum::<u64>(),
                parts.join(", "),
                report.patched_sites
            ),
        ));
    }
    // The hooks, when read: every mechanism and owner kind set, zeros too.
    for c in report.hooks.iter().flatten() {
        m.hooks
            .get_or_create(&HookLabels {
                domain: name.clone(),
                mechanism: c.mechanism.into(),
                owner: c.owner.into(),
            })
            .set(i64::try_from(c.count).unwrap_or(i64::MAX));
    }
    if full {
        m.patched_sites
            .get_or_create(&DomainLabels { domain: name.clone() })
            .set(i64::try_from(report.patched_sites).unwrap_or(i64::MAX));
        m.pending_sites
            .get_or_create(&DomainLabels { domain: name.clone() })
            .set(i64::try_from(report.pending_sites).unwrap_or(i64::MAX));
    }
}

/// Modules the last check saw loaded or unloaded, as info events.
pub(super) fn report_module_events(shared: &Shared, subject: &Subject, events: Vec<ModuleEvent>) {
    for ev in events {
        let detail = if ev.loaded {
            format!(
                "module {} loaded at {:#x}: {} page(s) of its text protected from now on",
                ev.name, ev.base, ev.text_pages
            )
        } else {
            format!("module {} unloaded from {:#x}", ev.name, ev.base)
        };
        let kind = if ev.loaded { EventKind::ModuleLoaded } else { EventKind::ModuleUnloaded };
        shared.sink.emit(subject.event(kind, AlertSeverity::Info, detail));
    }
}

/// Says how a domain was attached: problems with its stored state, the
/// attach or new-boot event, and how its regions are bounded. A new boot
/// starts with nothing reported.
pub(super) fn announce_attach(
    shared: &Shared,
    subject: &Subject,
    name: &str,
    w: &mut Watched,
    how: &Attached,
    reported: &mut HashMap<String, String>,
) {
    for problem in std::mem::take(&mut w.problems) {
        shared.sink.error("baseline_file");
        let mut e = subject.event(
            EventKind::StateUnreadable,
            AlertSeverity::Critical,
            format!("{}: {}", problem.file, problem.detail),
        );
        e.key = problem.file;
        shared.sink.emit(e);
    }
    let (severity, mut detail) = attached_event(name, w, how);
    let kind = match how {
        Attached::Stored | Attached::Remapped { .. } => EventKind::Attached,
        _ => EventKind::NewBoot,
    };
    if let Ok(bounds) = &w.bounds {
        detail.push_str(&format!(". Regions bounded by the kernel's layout: {bounds}"));
    }
    let proved = w.baseline.reference.as_ref();
    detail.push_str(&reference_sentence(proved));
    let value = match proved.map(|r| r.state) {
        Some(ReferenceState::Verified) => 1,
        Some(ReferenceState::Mismatch) => 0,
        _ => -1,
    };
    let labels = DomainLabels { domain: name.to_owned() };
    shared.sink.metrics.reference_verified.get_or_create(&labels).set(value);
    shared.sink.emit(subject.event(kind, severity, detail));
    if w.bounds.as_ref().is_ok_and(|b| b.contains("lower trust")) {
        shared.sink.emit(subject.event(
            EventKind::Notice,
            AlertSeverity::Warning,
            format!(
                "{name}: no profile matches its kernel, so its text and rodata are bounded by the \
                 guest's own kallsyms, which a rootkit can rewrite; add a profile of this kernel \
                 (vigil profile build) to bound them by the vendor's image"
            ),
        ));
    }
    if let Err(why) = &w.bounds {
        shared.sink.emit(subject.event(
            EventKind::Notice,
            AlertSeverity::Warning,
            format!(
                "{name}: kernel text and rodata are classed by page permission only ({why}): pages \
                 the kernel freed after boot may still be protected as content, and their reuse \
                 reported. Add a profile of this kernel (vigil profile build) to bound them"
            ),
        ));
    }
    if kind == EventKind::NewBoot {
        reported.clear();
    }
}

/// Sets a newly attached domain's pages-protected gauges, and creates every
/// violation series at 0, so that Prometheus sees the first violation as an
/// increase.
pub(super) fn seed_series(shared: &Shared, name: &str, w: &Watched) {
    let name = name.to_owned();
    for (region, pages) in w.pages() {
        shared
            .sink
            .metrics
            .pages_protected
            .get_or_create(&RegionLabels { domain: name.clone(), region: region.into() })
            .set(gauge(pages));
    }
    // The open violations' series exists from the attach (at 0 if new; a
    // re-attach keeps what the last full check found until the next).
    let _ =
        shared.sink.metrics.open_violations.get_or_create(&DomainLabels { domain: name.clone() });
    // Every violation series exists from the start, at 0, so that
    // Prometheus sees the first violation as an increase.
    let regions = w
        .pages()
        .map(|(r, _)| r.to_owned())
        .map(|r| super::sink::metric_region(&r).to_owned())
        .chain([crate::integrity::check::IMAGE_REGION.to_owned(), "module".to_owned()]);
    for region in regions {
        for kind in ["content", "remap", "permission"] {
            let labels =
                ViolationLabels { domain: name.clone(), region: region.clone(), kind: kind.into() };
            let _ = shared.sink.metrics.violations.get_or_create(&labels);
        }
    }
    let labels = ViolationLabels {
        domain: name.clone(),
        region: crate::integrity::check::REGISTER_REGION.into(),
        kind: "register".into(),
    };
    let _ = shared.sink.metrics.violations.get_or_create(&labels);
}

/// What the attach event says of the baseline's proof against the vendor's image.
fn reference_sentence(proved: Option<&crate::integrity::ReferenceCheck>) -> String {
    match proved {
        None => ". Reference: unavailable (a baseline of an earlier version)".into(),
        Some(r) if r.state == ReferenceState::Mismatch => format!(
            ". Reference: MISMATCH, {} run(s) of kernel text or read-only data differ from the vendor's image \
             in forms the kernel never writes (critical `reference` violations follow): {}",
            r.mismatches.len(),
            r.detail
        ),
        Some(r) => format!(". Reference: {}: {}", r.state.as_str(), r.detail),
    }
}

/// The event an attach ends with: its severity and sentence.
pub(super) fn attached_event(name: &str, w: &Watched, how: &Attached) -> (AlertSeverity, String) {
    let path = w.path.display();
    let boot = w.boot();
    let mut settling = match w.provisional_left {
        Some(left) => format!(
            "; provisional for up to {}s while the new kernel patches itself (changes then are absorbed and listed)",
            left.as_secs()
        ),
        None => String::new(),
    };
    if w.originals_left_out() > 0 {
        settling += &format!(
            "; {} page(s) past the {} MiB of original pages held in memory are kept as hashes only (a change \
             there is a violation, the kernel's own patches too): the guest maps far more executable image than a \
             kernel has",
            w.originals_left_out(),
            crate::integrity::originals::MAX_HELD >> 20
        );
    }
    match how {
        Attached::Stored => (
            AlertSeverity::Info,
            format!("attached {name}: checking against the stored baseline of this boot ({path})"),
        ),
        Attached::Remapped { then, now } => (
            AlertSeverity::Warning,
            format!(
                "attached {name}: its kernel code is not all where the stored baseline has it (image at {now}; \
                 {then} in the baseline), and the hypervisor reported no reboot: checking against the stored \
                 baseline ({path}), so every moved page is a remap violation"
            ),
        ),
        Attached::NewBoot { why } => (
            AlertSeverity::Info,
            format!("attached {name}: new baseline of boot {boot} taken ({path}): {why}{settling}"),
        ),
        Attached::FirstSight => {
            let trust = match w.baseline.reference.as_ref().map(|r| r.state) {
                Some(ReferenceState::Verified) => "its kernel proved against the vendor's image",
                Some(ReferenceState::Mismatch) => "its kernel NOT as the vendor built it",
                _ => "trusted on first use",
            };
            (
                AlertSeverity::Info,
                format!(
                    "attached {name}: first baseline of boot {boot} taken ({path}), {trust}{settling}"
                ),
            )
        }
        Attached::Unconfirmed { then, now, why, kept } => (
            AlertSeverity::Warning,
            format!(
                "attached {name}: its kernel image moved from {then} to {now}, a new boot that the hypervisor \
                 cannot confirm: {why}. New baseline of boot {boot} taken ({path}); the earlier one: {kept}. \
                 If nobody restarted the guest while vigil was not watching, treat it as compromised"
            ),
        ),
        Attached::Replaced => (
            AlertSeverity::Warning,
            format!(
                "attached {name}: new baseline of boot {boot} taken ({path}) in place of a stored one that \
                 could not be used; trusted on first use"
            ),
        ),
    }
}

/// Says what an evidence bundle holds, as an event and in the metrics.
pub(super) fn report_evidence(shared: &Shared, subject: &alerts::Subject, out: &evidence::Outcome) {
    let m = &out.manifest;
    let files: Vec<String> =
        m.files.iter().map(|f| format!("{} ({} KiB)", f.name, f.bytes.div_ceil(1024))).collect();
    let skipped: Vec<String> =
        m.skipped.iter().map(|k| format!("{}: {}", k.what, k.reason)).collect();
    let (severity, detail) = match &out.failed {
        Some(why) => {
            (AlertSeverity::Warning, format!("evidence of {} could not be saved: {why}", m.domain))
        }
        None if skipped.is_empty() => (
            AlertSeverity::Info,
            format!(
                "evidence of {} saved in {}: {}",
                m.domain,
                out.dir.display(),
                files.join(", ")
            ),
        ),
        None => (
            AlertSeverity::Warning,
            format!(
                "evidence of {} saved in part: {}; not saved: {}",
                m.domain,
                if files.is_empty() { "nothing".into() } else { files.join(", ") },
                skipped.join("; ")
            ),
        ),
    };
    if out.failed.is_some() || !skipped.is_empty() {
        shared.sink.error("evidence");
    }
    if out.failed.is_none() {
        shared
            .sink
            .metrics
            .evidence_saved
            .get_or_create(&DomainLabels { domain: m.domain.clone() })
            .inc();
        shared.sink.metrics.evidence_bytes.set(gauge(out.total_bytes));
    }
    let mut a = subject.event(EventKind::EvidenceSaved, severity, detail);
    a.evidence = Some(out.dir.display().to_string());
    shared.sink.emit(a);
}

/// The reported groups a check could see again: those of the regions it
/// covered (a hot check does not look at text pages, so it must not call
/// their changes reverted).
pub(super) fn visible(
    reported: &HashMap<String, String>,
    report: &Report,
) -> HashMap<String, String> {
    reported
        .iter()
        .filter(|(k, _)| {
            let region = k.split('/').next().unwrap_or("");
            report.regions.iter().any(|r| r.name == region)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}
