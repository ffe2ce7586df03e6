//! Forensic diffs: for every change a check found, what was there, what is
//! there now, what the code does on both sides and where its branches go.
//!
//! Built from a check's report (its findings already judged: violation,
//! information, or a patch the kernel's records allow), the baseline's
//! original pages and the guest's memory now. JSON schema `vigil-diff 1`
//! (see the README); [`render_text`] for terminals.

use std::fmt::Write as _;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, OpKind};

use crate::addr::{GuestVirtAddr, PAGE_SIZE};
use crate::integrity::{AddressSpace, EntryRef, Finding, FindingKind, Originals, Report, Severity};
use crate::memory::GuestMemory;

use super::hooks::{HookRecord, Inventory, compare};
use super::patch::Patched;
use super::semantic::read_virt;

pub const SCHEMA: &str = "vigil-diff";
pub const VERSION: u32 = 1;
/// Bytes of context shown around a changed range, each side.
const CONTEXT: u64 = 16;
/// Farthest back a disassembly starts, from the function's start.
const MAX_DECODE_BACK: u64 = 64 * 1024;
/// Most runs of changed bytes listed for one page of read-only data.
const MAX_RUNS_PER_PAGE: usize = 16;

/// How a change was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Violation,
    Info,
    /// A patch the kernel's own records allow (jump label, static call, ftrace, kprobe).
    AcceptedPatch,
}

/// One instruction, decoded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Insn {
    #[serde(with = "crate::addr::hex_addr")]
    pub addr: u64,
    pub bytes: String,
    pub text: String,
    /// Where a branch or call goes, by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A changed run of bytes: both sides, as hex and decoded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bytes {
    #[serde(with = "crate::addr::hex_addr")]
    pub start: u64,
    pub len: u64,
    pub before: String,
    pub after: String,
    /// Context around the run, from `context_start`, both sides.
    #[serde(with = "crate::addr::hex_addr")]
    pub context_start: u64,
    pub context_before: String,
    pub context_after: String,
    /// Instructions covering the run and one each side (code regions only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disasm_before: Vec<Insn>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disasm_after: Vec<Insn>,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    pub region: String,
    pub kind: FindingKind,
    pub verdict: Verdict,
    /// The rule behind the verdict, in words.
    pub rule: String,
    pub gva: GuestVirtAddr,
    pub gpa: crate::addr::GuestPhysAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<Bytes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entry: Option<EntryRef>,
}

/// A whole diff.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Diff {
    pub format: String,
    pub version: u32,
    pub domain: String,
    pub uuid: String,
    pub baseline: String,
    pub baseline_created: String,
    pub checked: String,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    pub intact: bool,
    pub violations: usize,
    /// BLAKE3 of what changed (see [`digest`]): the same for two diffs of
    /// a guest that did not change meanwhile, whenever and however read;
    /// what `vigil accept --diff-digest` is checked against. Empty in a
    /// diff from a vigil that did not make one.
    #[serde(default)]
    pub digest: String,
    pub changes: Vec<Change>,
    /// The baseline's code and read-only data regions, page by page (for
    /// the HTML page map): region name and page addresses. In JSON, runs
    /// of consecutive pages: `[{"region", "runs": [["0x<first page>", pages], ...]}]`.
    #[serde(default, with = "page_runs")]
    pub map: Vec<(String, Vec<u64>)>,
    /// Hooks of the guest kernel now that the baseline had not, and those
    /// it had that are gone (see [`crate::linux::hooks::compare`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks_added: Vec<HookRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks_removed: Vec<HookRecord>,
    /// Why hooks were not compared (or not all read), when so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks_note: Option<String>,
}

/// The page map as runs of consecutive pages, to keep the JSON small.
mod page_runs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error};

    use crate::addr::PAGE_SIZE;
    use crate::addr::hex_addr::{from_hex, to_hex};

    /// Pages a map may list when read back (more than any kernel image has).
    const MAX_PAGES: u64 = 1 << 20;

    #[derive(Serialize, Deserialize)]
    struct Region {
        region: String,
        runs: Vec<(String, u64)>,
    }

    pub fn serialize<S: Serializer>(map: &[(String, Vec<u64>)], s: S) -> Result<S::Ok, S::Error> {
        let regions: Vec<Region> = map
            .iter()
            .map(|(name, pages)| {
                let mut runs: Vec<(u64, u64)> = Vec::new();
                for &p in pages {
                    match runs.last_mut() {
                        Some((start, n)) if *start + *n * PAGE_SIZE == p => *n += 1,
                        _ => runs.push((p, 1)),
                    }
                }
                Region {
                    region: name.clone(),
                    runs: runs.into_iter().map(|(a, n)| (to_hex(a), n)).collect(),
                }
            })
            .collect();
        regions.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(String, Vec<u64>)>, D::Error> {
        let regions = Vec::<Region>::deserialize(d)?;
        let mut total = 0u64;
        let mut out = Vec::new();
        for r in regions {
            let mut pages = Vec::new();
            for (start, n) in r.runs {
                let a = from_hex(&start).ok_or_else(|| {
                    D::Error::custom(format!("page map: {start:?} is no address"))
                })?;
                total = total.saturating_add(n);
                if total > MAX_PAGES {
                    return Err(D::Error::custom(format!("page map: more than {MAX_PAGES} pages")));
                }
                for i in 0..n {
                    let p = i
                        .checked_mul(PAGE_SIZE)
                        .and_then(|o| a.checked_add(o))
                        .ok_or_else(|| D::Error::custom("page map: a run passes 2^64"))?;
                    pages.push(p);
                }
            }
            out.push((r.region, pages));
        }
        Ok(out)
    }
}

impl Diff {
    /// A diff of `changes` found by `report` against `baseline` (kept at
    /// `baseline_path`), with the baseline's page map.
    /// `hooks`, the guest's hooks now (none: not read), are compared with
    /// the baseline's.
    pub fn of(
        report: &super::KernelReport,
        baseline: &crate::integrity::Baseline,
        baseline_path: &str,
        source: String,
        changes: Vec<Change>,
        hooks: Option<&Inventory>,
    ) -> Self {
        use crate::integrity::RegionKind;
        let (report, profile) = (&report.check, report.kernel.profile.clone());
        let (hooks_added, hooks_removed, hooks_note) = match (&baseline.hooks, hooks) {
            (None, _) => (
                Vec::new(),
                Vec::new(),
                Some("the baseline keeps no hooks (taken without a matching profile, or by an earlier vigil): hooks not compared".to_owned()),
            ),
            (Some(_), None) => (
                Vec::new(),
                Vec::new(),
                Some("the guest's hooks were not read (no profile matches its kernel): hooks not compared".to_owned()),
            ),
            (Some(then), Some(now)) => {
                let (added, removed) = compare(then, &now.summaries());
                let note = (!now.unread.is_empty()).then(|| {
                    format!("some hook records were not read: {}", now.unread.join("; "))
                });
                (added, removed, note)
            }
        };
        Diff {
            format: SCHEMA.into(),
            version: VERSION,
            domain: report.domain.clone(),
            uuid: report.uuid.clone(),
            baseline: baseline_path.into(),
            baseline_created: baseline.created.clone(),
            checked: report.checked.clone(),
            source,
            profile,
            intact: report.intact,
            violations: report.violations.len(),
            digest: digest(report),
            changes,
            map: baseline
                .regions
                .iter()
                .filter(|r| matches!(r.kind, RegionKind::Code | RegionKind::ReadOnlyData))
                .map(|r| (r.name.clone(), r.pages.iter().map(|p| p.gva.raw()).collect()))
                .collect(),
            hooks_added,
            hooks_removed,
            hooks_note,
        }
    }
}

/// What the digest hashes first: a new canonical form gives new digests.
const DIGEST_FORM: &[u8] = b"vigil-diff-digest 1\n";

/// One finding as the digest sees it: what changed, where, from what to
/// what, and the verdict. Not its sentence (`rule`), which may say how long
/// something has lasted, nor its symbol, a name looked up for people.
#[derive(serde::Serialize)]
struct Canonical<'a> {
    severity: Severity,
    region: &'a str,
    kind: FindingKind,
    gva: u64,
    gpa: u64,
    page: Option<u64>,
    vcpu: Option<u32>,
    register: Option<&'a str>,
    before: &'a str,
    after: &'a str,
    /// Pointer tables: the entry, and where it should and does point.
    entry: Option<(&'a str, u64, u64, u64)>,
}

/// The digest of a diff: BLAKE3 (hex) over the domain's UUID and every
/// violation and information finding of `report` in a canonical form, one
/// JSON line each, sorted. A finding's `before` and `after` are the bytes of
/// a judged run, or the hashes of a whole page, mapping, permissions or
/// register value, so any byte that changes again changes the digest; the
/// time, the memory source, the baseline's path and the rules' wording do
/// not. Patches the kernel's own records allow are left out: the kernel
/// makes them as it runs, and an accept does not decide on them (each is
/// judged against the records again afterwards). Every finding counts,
/// whichever regions a diff then shows: an accept takes them all.
pub fn digest(report: &Report) -> String {
    let mut lines: Vec<String> = report
        .violations
        .iter()
        .chain(&report.info)
        .map(|f| {
            let c = Canonical {
                severity: f.severity,
                region: &f.region,
                kind: f.kind,
                gva: f.gva.raw(),
                gpa: f.gpa.raw(),
                page: f.page,
                vcpu: f.vcpu,
                register: f.register.as_deref(),
                before: &f.before,
                after: &f.after,
                entry: f.entry.as_ref().map(|e| (e.table.as_str(), e.index, e.expected, e.found)),
            };
            serde_json::to_string(&c).expect("a finding serialises")
        })
        .collect();
    lines.sort_unstable();
    let mut h = blake3::Hasher::new();
    h.update(DIGEST_FORM);
    h.update(serde_json::to_string(&report.uuid).expect("a string serialises").as_bytes());
    for l in &lines {
        h.update(b"\n");
        h.update(l.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// What names addresses for a diff: `locate` says where an address lies,
/// `function_start` where the function holding it starts (a known
/// instruction boundary to decode from).
pub struct Namer<'a> {
    pub locate: &'a dyn Fn(u64) -> String,
    pub function_start: &'a dyn Fn(u64) -> Option<u64>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.len().is_multiple_of(2) || s.len() > 2 * crate::addr::PAGE_BYTES {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The original bytes `[start, start+len)`, from the baseline's pages.
fn original(originals: &Originals, start: u64, len: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut a = start;
    let end = start.checked_add(len)?;
    while a < end {
        let page = a & !(PAGE_SIZE - 1);
        let bytes = originals.page(page)?;
        let off = usize::try_from(a - page).ok()?;
        let n = usize::try_from((page + PAGE_SIZE).min(end) - a).ok()?;
        out.extend_from_slice(bytes.get(off..off + n)?);
        a += n as u64;
    }
    Some(out)
}

/// Decodes `code` (at `base`), keeping the instructions that overlap
/// `[from, to)` and one on each side.
fn disasm(code: &[u8], base: u64, from: u64, to: u64, namer: &Namer<'_>) -> Vec<Insn> {
    let mut dec = Decoder::with_ip(64, code, base, DecoderOptions::NONE);
    let mut fmt = IntelFormatter::new();
    let mut all: Vec<Instruction> = Vec::new();
    let mut insn = Instruction::default();
    while dec.can_decode() {
        dec.decode_out(&mut insn);
        let end = insn.next_ip();
        all.push(insn);
        if end > to + CONTEXT {
            break;
        }
    }
    let first = all.iter().position(|i| i.next_ip() > from).unwrap_or(all.len()).saturating_sub(1);
    let last = all.iter().rposition(|i| i.ip() < to).map_or(first, |l| (l + 2).min(all.len()));
    all[first..last.max(first)]
        .iter()
        .map(|i| {
            let mut text = String::new();
            fmt.format(i, &mut text);
            let off = usize::try_from(i.ip() - base).unwrap_or(0);
            let len = i.len();
            let target = (i.op_count() > 0
                && matches!(
                    i.op0_kind(),
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                ))
            .then(|| (namer.locate)(i.near_branch_target()));
            Insn { addr: i.ip(), bytes: hex(code.get(off..off + len).unwrap_or(&[])), text, target }
        })
        .collect()
}

/// Both sides of the run `[start, start+len)`, with context and, for code,
/// disassembly.
#[allow(clippy::too_many_arguments)]
fn bytes_of<M: GuestMemory + ?Sized>(
    start: u64,
    len: u64,
    code: bool,
    mem: &M,
    space: &dyn AddressSpace,
    originals: &Originals,
    module_original: &dyn Fn(u64, u64) -> Option<Vec<u8>>,
    namer: &Namer<'_>,
) -> Option<Bytes> {
    let then = |a: u64, n: u64| original(originals, a, n).or_else(|| module_original(a, n));
    let now = |a: u64, n: u64| read_virt(mem, space, a, usize::try_from(n).ok()?).map(|(b, _)| b);
    let (before, after) = (then(start, len)?, now(start, len)?);
    // Context from a 16-byte line before the run, or from the run itself
    // where nothing is known before it (the start of a module's text).
    let cend = (start + len + CONTEXT).div_ceil(CONTEXT) * CONTEXT;
    let mut cstart = start.saturating_sub(CONTEXT) & !(CONTEXT - 1);
    let (cb, ca) = match (then(cstart, cend - cstart), now(cstart, cend - cstart)) {
        (Some(b), Some(a)) => (b, a),
        _ => {
            cstart = start;
            (
                then(start, cend - start).unwrap_or_default(),
                now(start, cend - start).unwrap_or_default(),
            )
        }
    };
    let (mut db, mut da) = (Vec::new(), Vec::new());
    if code {
        // Decode from the function's start, else from the context's, else
        // from the run's (a patch site is an instruction boundary).
        let to = start + len;
        let starts = [
            (namer.function_start)(start).filter(|&f| f <= start && start - f <= MAX_DECODE_BACK),
            Some(cstart),
            Some(start),
        ];
        for from in starts.into_iter().flatten() {
            let span = to + 2 * CONTEXT - from;
            if let (Some(b), Some(a)) = (then(from, span), now(from, span)) {
                db = disasm(&b, from, start, to, namer);
                da = disasm(&a, from, start, to, namer);
                break;
            }
        }
    }
    Some(Bytes {
        start,
        len,
        before: hex(&before),
        after: hex(&after),
        context_start: cstart,
        context_before: hex(&cb),
        context_after: hex(&ca),
        disasm_before: db,
        disasm_after: da,
    })
}

/// Every change of `report` (and the accepted patches), with its bytes.
/// `is_code` tells code regions; `module_original` gives a module's
/// original text bytes (the daemon keeps them; elsewhere none).
#[allow(clippy::too_many_arguments)]
pub fn changes<M: GuestMemory + ?Sized>(
    report: &Report,
    accepted: &[Patched],
    mem: &M,
    space: &dyn AddressSpace,
    originals: &Originals,
    module_original: &dyn Fn(u64, u64) -> Option<Vec<u8>>,
    is_code: &dyn Fn(&str) -> bool,
    namer: &Namer<'_>,
) -> Vec<Change> {
    let mut out = Vec::new();
    let base = |f: &Finding, verdict: Verdict| Change {
        region: f.region.clone(),
        kind: f.kind,
        verdict,
        rule: f.detail.clone(),
        gva: f.gva,
        gpa: f.gpa,
        symbol: f.symbol.clone(),
        bytes: None,
        entry: f.entry.clone(),
    };
    for f in report.violations.iter().chain(&report.info) {
        let verdict =
            if f.severity == Severity::Violation { Verdict::Violation } else { Verdict::Info };
        let code = is_code(&f.region);
        // A reference mismatch carries the image's bytes and the guest's.
        if f.kind == FindingKind::Reference {
            let mut c = base(f, verdict);
            if let (Some(b), Some(a)) = (unhex(&f.before), unhex(&f.after)) {
                let (start, to) = (f.gva.raw(), f.gva.raw() + a.len() as u64);
                let listing =
                    |x: &[u8]| if code { disasm(x, start, start, to, namer) } else { Vec::new() };
                c.bytes = Some(Bytes {
                    start,
                    len: a.len() as u64,
                    before: f.before.clone(),
                    after: f.after.clone(),
                    context_start: start,
                    context_before: f.before.clone(),
                    context_after: f.after.clone(),
                    disasm_before: listing(&b),
                    disasm_after: listing(&a),
                });
            }
            out.push(c);
            continue;
        }
        if f.kind != FindingKind::Content || f.page.is_none() {
            out.push(base(f, verdict));
            continue;
        }
        // A judged run carries its bytes; a page found changed by its hash
        // alone (evidence: two page hashes), its runs.
        let page_level =
            f.detail.starts_with("page ") && f.before.len() == 64 && f.after.len() == 64;
        if let (false, Some(b), Some(_)) = (page_level, unhex(&f.before), unhex(&f.after)) {
            let mut c = base(f, verdict);
            c.bytes = bytes_of(
                f.gva.raw(),
                b.len() as u64,
                code,
                mem,
                space,
                originals,
                module_original,
                namer,
            );
            out.push(c);
            continue;
        }
        let page = f.gva.raw() & !(PAGE_SIZE - 1);
        let (Some(then), Some((now, _))) = (
            original(originals, page, PAGE_SIZE),
            read_virt(mem, space, page, crate::addr::PAGE_BYTES),
        ) else {
            out.push(base(f, verdict));
            continue;
        };
        let mut runs = Vec::new();
        let mut i = 0;
        while i < then.len() {
            if then[i] == now[i] {
                i += 1;
                continue;
            }
            let s = i;
            // Runs closer than the context merge.
            while i < then.len()
                && (then[i] != now[i]
                    || then[i..].iter().zip(&now[i..]).take(4).any(|(a, b)| a != b))
            {
                i += 1;
            }
            runs.push((s, i));
        }
        for &(s, e) in runs.iter().take(MAX_RUNS_PER_PAGE) {
            let mut c = base(f, verdict);
            c.gva = GuestVirtAddr(page + s as u64);
            c.gpa = crate::addr::GuestPhysAddr(f.gpa.raw() + s as u64);
            c.symbol = Some((namer.locate)(page + s as u64));
            c.bytes = bytes_of(
                page + s as u64,
                (e - s) as u64,
                code,
                mem,
                space,
                originals,
                module_original,
                namer,
            );
            out.push(c);
        }
        if runs.len() > MAX_RUNS_PER_PAGE {
            let mut c = base(f, verdict);
            c.rule = format!("{} more changed runs on this page", runs.len() - MAX_RUNS_PER_PAGE);
            out.push(c);
        }
    }
    for p in accepted {
        let Some((_, gpa)) = read_virt(mem, space, p.addr, 1) else { continue };
        out.push(Change {
            region: "kernel-text".into(),
            kind: FindingKind::Content,
            verdict: Verdict::AcceptedPatch,
            rule: format!(
                "a {} patch the kernel's records allow{}",
                p.kind.as_str().replace('_', " "),
                if p.in_flight { " (caught mid-rewrite)" } else { "" }
            ),
            gva: GuestVirtAddr(p.addr),
            gpa,
            symbol: Some((namer.locate)(p.addr)),
            bytes: bytes_of(
                p.addr,
                p.bytes.len() as u64,
                true,
                mem,
                space,
                originals,
                module_original,
                namer,
            ),
            entry: None,
        });
    }
    out
}

/// Whether to colour text output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    Yes,
    No,
}

fn paint(c: Colour, code: &str, s: &str) -> String {
    match c {
        Colour::Yes => format!("\x1b[{code}m{s}\x1b[0m"),
        Colour::No => s.to_owned(),
    }
}

fn spaced(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap_or("??"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The diff for a terminal: violations first, each with its rule, bytes and
/// code on both sides; then information; then accepted patches, one line each.
pub fn render_text(d: &Diff, colour: Colour, max_accepted: usize) -> String {
    let mut s = String::new();
    let verdict =
        if d.intact { paint(colour, "32", "INTACT") } else { paint(colour, "1;31", "VIOLATIONS") };
    let _ = writeln!(
        s,
        "{verdict}: domain {} ({}), {} violation(s); baseline {} of {}, read {} through {}",
        d.domain, d.uuid, d.violations, d.baseline, d.baseline_created, d.checked, d.source
    );
    if let Some(p) = &d.profile {
        let _ = writeln!(s, "guest profile {p}");
    }
    if !d.digest.is_empty() {
        // What an operator copies to accept exactly this state and no other.
        let _ = writeln!(s, "diff digest {}", d.digest);
        if d.source.starts_with("live") {
            let _ = writeln!(
                s,
                "  to accept this state after review: vigil accept {} --diff-digest {} --reason \"...\"",
                d.domain, d.digest
            );
        }
    }
    for want in [Verdict::Violation, Verdict::Info] {
        for c in d.changes.iter().filter(|c| c.verdict == want) {
            let (tag, code) = match want {
                Verdict::Violation => ("VIOLATION", "1;31"),
                _ => ("INFO", "33"),
            };
            let _ = writeln!(
                s,
                "\n{} {} {} {}{}",
                paint(colour, code, tag),
                c.region,
                c.gva,
                c.gpa,
                c.symbol.as_ref().map(|n| format!("  {n}")).unwrap_or_default()
            );
            let _ = writeln!(s, "  rule:   {}", c.rule);
            if let Some(e) = &c.entry {
                let _ = writeln!(s, "  entry:  {}[{}]", e.table, e.index);
                let _ = writeln!(s, "  was:    {:#x}  {}", e.expected, e.expected_symbol);
                let _ =
                    writeln!(s, "  now:    {:#x}  {}", e.found, paint(colour, "1", &e.found_owner));
            }
            if let Some(b) = &c.bytes {
                let _ = writeln!(s, "  before: {}", spaced(&b.before));
                let _ = writeln!(s, "  after:  {}", paint(colour, "1", &spaced(&b.after)));
                for (sign, list, code) in
                    [("-", &b.disasm_before, "31"), ("+", &b.disasm_after, "32")]
                {
                    for i in list {
                        let line = format!(
                            "  {sign} {:#018x}  {:<22} {:<40}{}",
                            i.addr,
                            i.bytes,
                            i.text,
                            i.target.as_ref().map(|t| format!(" -> {t}")).unwrap_or_default()
                        );
                        let changed = i.addr < b.start + b.len
                            && i.addr + (i.bytes.len() as u64 / 2) > b.start;
                        let _ = writeln!(
                            s,
                            "{}",
                            if changed { paint(colour, code, &line) } else { line }
                        );
                    }
                }
            }
        }
    }
    for (title, sign, code, list) in [
        ("HOOKS ADDED SINCE THE BASELINE", "+", "1", &d.hooks_added),
        ("HOOKS GONE SINCE THE BASELINE", "-", "0", &d.hooks_removed),
    ] {
        if !list.is_empty() {
            let _ = writeln!(s, "\n{title} ({}):", list.len());
            for h in list {
                let _ = writeln!(s, "  {sign} {}", paint(colour, code, &h.to_string()));
            }
        }
    }
    if let Some(note) = &d.hooks_note {
        let _ = writeln!(s, "\nhooks: {note}");
    }
    let accepted: Vec<&Change> =
        d.changes.iter().filter(|c| c.verdict == Verdict::AcceptedPatch).collect();
    if !accepted.is_empty() {
        let _ = writeln!(s, "\n{} accepted kernel patch(es):", accepted.len());
        for c in accepted.iter().take(max_accepted) {
            let now = c
                .bytes
                .as_ref()
                .and_then(|b| b.disasm_after.iter().find(|i| i.addr == b.start))
                .map(|i| {
                    format!(
                        "{}{}",
                        i.text,
                        i.target.as_ref().map(|t| format!(" -> {t}")).unwrap_or_default()
                    )
                })
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "  {} {}  {}  {}",
                c.gva,
                c.symbol.as_deref().unwrap_or(""),
                c.rule.trim_start_matches("a ").trim_end_matches(" the kernel's records allow"),
                now
            );
        }
        if accepted.len() > max_accepted {
            let _ = writeln!(
                s,
                "  ... and {} more (--format json lists every one)",
                accepted.len() - max_accepted
            );
        }
    }
    s
}

/// Escapes text for HTML (symbols and rules may hold guest-chosen names).
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c if c.is_control() => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}\
code,pre,td.m{font-family:ui-monospace,monospace}\
.bad{color:#b00020}.ok{color:#1b7f3b}.info{color:#8a6d00}\
.map{display:flex;flex-wrap:wrap;gap:1px;max-width:100%;margin:.5em 0 1em}\
.map i,.map a{display:block;width:6px;height:6px;background:#cfd8dc}\
.map a.violation{background:#d32f2f}.map a.accepted-patch{background:#1976d2}.map a.info{background:#f9a825}\
article{border-left:4px solid #cfd8dc;padding:.2em 1em;margin:1em 0}\
article.violation{border-color:#d32f2f}article.accepted-patch{border-color:#1976d2}article.info{border-color:#f9a825}\
table{border-collapse:collapse}td{padding:0 .6em;vertical-align:top}\
tr.was td{color:#8e2430}tr.now td{color:#1b5e20}tr.hit td{font-weight:bold}\
.legend span{display:inline-block;width:10px;height:10px;margin:0 .3em 0 1em}";

/// One self-contained HTML page: the verdict, a map of the kernel image's
/// pages coloured by verdict (each changed page leads to its changes), and
/// every change with its rule, bytes and code.
pub fn render_html(d: &Diff) -> String {
    let mut s = String::new();
    let title = format!("vigil diff: {}", d.domain);
    let _ = write!(
        s,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>\n",
        esc(&title)
    );
    let _ = writeln!(s, "<h1>{}</h1>", esc(&title));
    let verdict = if d.intact {
        "<p class=\"ok\" id=\"verdict\">INTACT: no violation</p>".to_owned()
    } else {
        format!("<p class=\"bad\" id=\"verdict\">VIOLATIONS: {}</p>", d.violations)
    };
    let _ = writeln!(s, "{verdict}");
    let _ = writeln!(
        s,
        "<table><tr><td>domain</td><td>{} ({})</td></tr><tr><td>baseline</td><td>{} of {}</td></tr><tr><td>read</td><td>{} through {}</td></tr><tr><td>guest profile</td><td>{}</td></tr><tr><td>diff digest</td><td class=\"m\" id=\"digest\">{}</td></tr></table>",
        esc(&d.domain),
        esc(&d.uuid),
        esc(&d.baseline),
        esc(&d.baseline_created),
        esc(&d.checked),
        esc(&d.source),
        esc(d.profile.as_deref().unwrap_or("none")),
        esc(&d.digest)
    );

    // The page map: each page's worst verdict, leading to its first change.
    let mut by_page: std::collections::HashMap<u64, (Verdict, usize)> =
        std::collections::HashMap::new();
    for (i, c) in d.changes.iter().enumerate() {
        let page = c.gva.raw() & !(PAGE_SIZE - 1);
        let e = by_page.entry(page).or_insert((c.verdict, i));
        let rank = |v: Verdict| match v {
            Verdict::Violation => 2,
            Verdict::Info => 1,
            Verdict::AcceptedPatch => 0,
        };
        if rank(c.verdict) > rank(e.0) {
            *e = (c.verdict, i);
        }
    }
    let _ = writeln!(
        s,
        "<h2>Kernel image pages</h2><p class=\"legend\"><span style=\"background:#cfd8dc\"></span>intact<span style=\"background:#1976d2\"></span>accepted kernel patch<span style=\"background:#d32f2f\"></span>violation<span style=\"background:#f9a825\"></span>information</p>"
    );
    for (region, pages) in &d.map {
        let _ = writeln!(
            s,
            "<h3>{} ({} pages)</h3><div class=\"map\" id=\"map-{}\">",
            esc(region),
            pages.len(),
            esc(region)
        );
        for &p in pages {
            match by_page.get(&p) {
                Some((v, i)) => {
                    let class = serde_json::to_value(v)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    let _ = write!(s, "<a class=\"{class}\" href=\"#c{i}\" title=\"{p:#x}\"></a>");
                }
                None => s.push_str("<i></i>"),
            }
        }
        s.push_str("\n</div>\n");
    }

    let _ = writeln!(s, "<h2>Changes</h2>");
    if d.changes.is_empty() {
        let _ = writeln!(s, "<p>None: the guest is as in the baseline.</p>");
    }
    for (i, c) in d.changes.iter().enumerate() {
        let (class, tag) = match c.verdict {
            Verdict::Violation => ("violation", "VIOLATION"),
            Verdict::Info => ("info", "INFO"),
            Verdict::AcceptedPatch => ("accepted-patch", "ACCEPTED PATCH"),
        };
        let _ = writeln!(
            s,
            "<article id=\"c{i}\" class=\"{class}\"><h3>{tag} {} <code>{}</code> (physical <code>{}</code>) {}</h3><p class=\"rule\">{}</p>",
            esc(&c.region),
            c.gva,
            c.gpa,
            c.symbol.as_deref().map(|n| format!("<code>{}</code>", esc(n))).unwrap_or_default(),
            esc(&c.rule)
        );
        if let Some(e) = &c.entry {
            let _ = writeln!(
                s,
                "<table class=\"entry\"><tr><td>entry</td><td class=\"m\">{}[{}]</td></tr><tr class=\"was\"><td>was</td><td class=\"m\">{:#x} {}</td></tr><tr class=\"now\"><td>now</td><td class=\"m\">{:#x} {}</td></tr></table>",
                esc(&e.table),
                e.index,
                e.expected,
                esc(&e.expected_symbol),
                e.found,
                esc(&e.found_owner)
            );
        }
        if let Some(b) = &c.bytes {
            let _ = writeln!(
                s,
                "<pre class=\"hex\">before {}\nafter  {}</pre>",
                esc(&spaced(&b.before)),
                esc(&spaced(&b.after))
            );
            if !b.disasm_before.is_empty() || !b.disasm_after.is_empty() {
                s.push_str("<table class=\"disasm\">");
                for (sign, class, list) in
                    [("\u{2212}", "was", &b.disasm_before), ("+", "now", &b.disasm_after)]
                {
                    for insn in list {
                        let hit = insn.addr < b.start + b.len
                            && insn.addr + (insn.bytes.len() as u64 / 2) > b.start;
                        let _ = write!(
                            s,
                            "<tr class=\"{class}{}\"><td>{sign}</td><td class=\"m\">{:#x}</td><td class=\"m\">{}</td><td class=\"m\">{}</td><td>{}</td></tr>",
                            if hit { " hit" } else { "" },
                            insn.addr,
                            esc(&insn.bytes),
                            esc(&insn.text),
                            insn.target
                                .as_deref()
                                .map(|t| format!("&rarr; {}", esc(t)))
                                .unwrap_or_default()
                        );
                    }
                }
                s.push_str("</table>\n");
            }
        }
        s.push_str("</article>\n");
    }
    for (title, id, list) in [
        ("Hooks added since the baseline", "hooks-added", &d.hooks_added),
        ("Hooks gone since the baseline", "hooks-removed", &d.hooks_removed),
    ] {
        if !list.is_empty() {
            let _ = writeln!(s, "<h2 id=\"{id}\">{title} ({})</h2><ul>", list.len());
            for h in list {
                let _ = writeln!(s, "<li><code>{}</code></li>", esc(&h.to_string()));
            }
            s.push_str("</ul>\n");
        }
    }
    if let Some(note) = &d.hooks_note {
        let _ = writeln!(s, "<p class=\"rule\">hooks: {}</p>", esc(note));
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests;
