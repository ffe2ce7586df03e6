//! One full check with everything vigil knows of the guest's kernel, as
//! `vigil check` and `vigil diff` (live or on a dump) make it: pages,
//! mappings and registers against the baseline, then, with a profile, the
//! semantic checks and the kernel's patch records; without one, names from
//! the guest's own kallsyms.

use crate::integrity::check::{CheckError, check};
use crate::integrity::{Baseline, Originals, RegionKind, Report};
use crate::memory::GuestMemory;
use crate::qemu::VcpuRegisters;

use super::diff::{Change, Namer, changes};
use super::patch::{self, PatchMemory};
use super::profile::Profile;
use super::{DiscoverError, discover, semantic};

#[derive(Debug, thiserror::Error)]
pub enum ExamineError {
    #[error("kernel not found")]
    Discover(#[from] DiscoverError),
    #[error(transparent)]
    Check(#[from] CheckError),
}

/// What an examination found.
pub struct Examined {
    pub report: Report,
    /// The changes, with their bytes (when asked for).
    pub changes: Vec<Change>,
    /// Said to the operator, not findings (no profile matched, ...).
    pub warnings: Vec<String>,
}

/// Examines `mem` against `baseline` (and its `originals`).
pub fn examine<M: GuestMemory + ?Sized>(
    baseline: &Baseline,
    originals: &Originals,
    mem: &M,
    regs: &[VcpuRegisters],
    profiles: &[Profile],
    with_changes: bool,
) -> Result<Examined, ExamineError> {
    let view = discover(mem, regs)?;
    let mut report = check(baseline, mem, &view, regs)?;
    semantic::review_gdt_pages(&mut report, mem, &baseline.registers, &|gva| originals.page(gva));
    let mut warnings = Vec::new();
    let code: Vec<&str> = baseline
        .regions
        .iter()
        .filter(|r| r.kind == RegionKind::Code)
        .map(|r| r.name.as_str())
        .collect();
    let is_code = |region: &str| code.contains(&region) || region.starts_with("module:");
    let no_module = |_: u64, _: u64| None;
    let mut out = Vec::new();
    match semantic::match_profile(profiles, mem, &view, view.identification.image_base) {
        Some(mut m) => {
            let known = crate::integrity::baseline::expand_runs(&baseline.exec_outside_image)
                .unwrap_or_default();
            let (ranges, _) = patch::exec_ranges(&m, mem, &view);
            let found = semantic::check(&mut m, mem, &view, regs, &known, Some(&ranges));
            report.profile = Some(m.profile.release.clone());
            report.add_findings(found);
            if originals.is_empty() {
                warnings.push(
                    "the baseline's original pages are missing: kernel patches cannot be told from attacks".into(),
                );
            }
            let accepted = patch::review(
                &mut report,
                &m,
                mem,
                &view,
                &|gva| originals.page(gva),
                &mut PatchMemory::default(),
                &|region| code.contains(&region),
                &|_| Some(true),
            );
            report.symbolize(|gva| m.symbol_of(gva));
            report.modules = m.modules.iter().map(|md| md.name.clone()).collect();
            for region in semantic::REGIONS {
                report.cover(region);
            }
            if with_changes {
                let locate = |a: u64| {
                    let here = m.locate(a);
                    match m.profile.nearest(a.wrapping_sub(m.slide)) {
                        Some((name, off)) if here == "nowhere known" => {
                            format!("{name}+{off:#x} (kernel data)")
                        }
                        _ => here,
                    }
                };
                let start =
                    |a: u64| m.profile.symbolize(a.wrapping_sub(m.slide)).map(|(_, off)| a - off);
                let namer = Namer { locate: &locate, function_start: &start };
                out = changes(
                    &report, &accepted, mem, &view, originals, &no_module, &is_code, &namer,
                );
            }
        }
        None => {
            warnings.push(
                "no guest profile matches the kernel: page, mapping and register checks only"
                    .into(),
            );
            let syms = if report.intact && !with_changes {
                None
            } else {
                view.regions
                    .iter()
                    .find(|r| r.kind == RegionKind::ReadOnlyData)
                    .and_then(|ro| semantic::GuestSymbols::read(mem, ro))
            };
            if let Some(syms) = &syms {
                report.symbolize(|gva| syms.locate(gva));
            }
            if with_changes {
                let locate = |a: u64| {
                    syms.as_ref().and_then(|s| s.locate(a)).unwrap_or_else(|| format!("{a:#x}"))
                };
                let start = |_: u64| None;
                let namer = Namer { locate: &locate, function_start: &start };
                out = changes(&report, &[], mem, &view, originals, &no_module, &is_code, &namer);
            }
        }
    }
    Ok(Examined { report, changes: out, warnings })
}
