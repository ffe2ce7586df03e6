//! Where the kernel's text and read-only data end, by the kernel's own
//! layout rather than by page permissions.
//!
//! Discovery classes the image's pages by permission: read-only executable
//! is text, read-only not executable is rodata. After boot Linux frees the
//! gaps between text and rodata and between rodata and data
//! (`free_kernel_image_pages`) and unmaps them from the image mapping only
//! when PTI is on. On hosts whose CPUs need no PTI the freed frames stay
//! mapped read-only in the image while the page allocator hands them out
//! through the direct map: their content changes with no attack at all.
//! So text is `_text` up to `_etext`, and rodata `__start_rodata` up to
//! `__end_rodata` (which on x86-64 takes in `__ro_after_init` data), whole
//! pages; what lies outside is checked for its mapping and permissions
//! only (a gap page made executable is still a violation), not content.
//!
//! The bounds come from the profile (the vendor's image: trusted), else
//! from the guest's own kallsyms (guest data: lower trust, and said so),
//! else none: every page of the permission class is kept, as before.

use crate::addr::{GuestVirtAddr, PAGE_SIZE};
use crate::integrity::RegionLayout;

use super::discover::{IMAGE_END, IMAGE_START};
use super::region::Region;

/// Text or rodata larger than this is not believed (a 6.12 cloud kernel
/// has 16 MiB of text and 11 MiB of rodata).
const MAX_SPAN: u64 = 256 << 20;

/// Where bounds were read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A guest profile (the release is named).
    Profile(String),
    /// The guest's own kallsyms tables.
    GuestKallsyms,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Profile(release) => write!(f, "the profile of {release}"),
            Source::GuestKallsyms => f.write_str("the guest's own kallsyms (lower trust)"),
        }
    }
}

/// The run-time bounds of text and rodata, page-aligned (end exclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounds {
    pub text: (u64, u64),
    pub rodata: (u64, u64),
    pub source: Source,
}

/// How many pages of each region bounds dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub text: usize,
    pub rodata: usize,
}

fn page_down(a: u64) -> u64 {
    a & !(PAGE_SIZE - 1)
}

fn page_up(a: u64) -> Option<u64> {
    a.checked_add(PAGE_SIZE - 1).map(page_down)
}

impl Bounds {
    /// Bounds from the run-time addresses of `_text`, `_etext`,
    /// `__start_rodata` and `__end_rodata` (`at` looks them up), checked to
    /// be in order, inside the image mapping and of believable size.
    pub fn from_symbols(at: impl Fn(&str) -> Option<u64>, source: Source) -> Result<Self, String> {
        let get = |n: &str| at(n).ok_or_else(|| format!("no symbol {n}"));
        let (text, etext, ro, ero) =
            (get("_text")?, get("_etext")?, get("__start_rodata")?, get("__end_rodata")?);
        let text = (page_down(text), page_up(etext).ok_or("_etext overflows")?);
        let rodata = (page_down(ro), page_up(ero).ok_or("__end_rodata overflows")?);
        let inside = |a: u64| (IMAGE_START.raw()..=IMAGE_END.raw()).contains(&a);
        if !(text.0 < text.1 && text.1 <= rodata.0 && rodata.0 < rodata.1) {
            return Err(format!(
                "out of order: text {:#x}..{:#x}, rodata {:#x}..{:#x}",
                text.0, text.1, rodata.0, rodata.1
            ));
        }
        if !inside(text.0) || !inside(rodata.1) {
            return Err(format!(
                "outside the kernel image mapping: {:#x}..{:#x}",
                text.0, rodata.1
            ));
        }
        if text.1 - text.0 > MAX_SPAN || rodata.1 - rodata.0 > MAX_SPAN {
            return Err(format!("larger than {} MiB", MAX_SPAN >> 20));
        }
        Ok(Self { text, rodata, source })
    }

    /// Pages of text and rodata the bounds span.
    pub fn pages(&self) -> (u64, u64) {
        ((self.text.1 - self.text.0) / PAGE_SIZE, (self.rodata.1 - self.rodata.0) / PAGE_SIZE)
    }

    /// Whether a `kernel-rodata` page (as permissions class it) is one of
    /// the freed gaps, to be left out of content checks: between text's end
    /// and `__start_rodata`, or from `__end_rodata` to the next 2 MiB. Only
    /// those: pages inside the bounds, or outside the image's layout
    /// altogether, stay (so bounds that lie can take at most the 2 MiB
    /// around rodata's ends out of protection).
    fn is_gap(&self, gva: u64) -> bool {
        let data = self.rodata.1.next_multiple_of(2 << 20);
        (self.text.1..self.rodata.0).contains(&gva) || (self.rodata.1..data).contains(&gva)
    }

    /// Keeps, of `kernel-rodata`, the pages inside the bounds when they
    /// come from a profile (the vendor's image: pages the kernel made
    /// read-only elsewhere, such as 6.12's `idt_table`, are protected by
    /// their own regions); when they come from the guest, only the freed
    /// gap pages go. Text is left whole: a read-only executable page past
    /// `_etext` is executable memory, and its content stays protected (its
    /// count is returned, for the event).
    pub fn apply(&self, regions: &mut [RegionLayout]) -> Dropped {
        let trusted = matches!(self.source, Source::Profile(_));
        let mut dropped = Dropped::default();
        for r in regions {
            match Region::parse(&r.name) {
                Some(Region::Text) => {
                    dropped.text = r
                        .pages
                        .iter()
                        .filter(|p| !(self.text.0..self.text.1).contains(&p.gva.raw()))
                        .count();
                }
                Some(Region::Rodata) => {
                    let before = r.pages.len();
                    r.pages.retain(|p| {
                        let gva = p.gva.raw();
                        if trusted {
                            (self.rodata.0..self.rodata.1).contains(&gva)
                        } else {
                            !self.is_gap(gva)
                        }
                    });
                    dropped.rodata = before - r.pages.len();
                }
                _ => {}
            }
        }
        dropped
    }

    /// Whether `gva` lies in one of the image's freed gaps: between text
    /// and rodata, or after rodata up to the next 2 MiB (where data starts).
    pub fn in_gap(&self, gva: GuestVirtAddr) -> bool {
        self.is_gap(gva.raw())
    }

    /// One line for events and reports.
    pub fn describe(&self) -> String {
        let (t, r) = self.pages();
        format!(
            "text {:#x}..{:#x} ({t} pages) and rodata {:#x}..{:#x} ({r} pages), from {}",
            self.text.0, self.text.1, self.rodata.0, self.rodata.1, self.source
        )
    }
}

/// The bounds of the kernel in `space` from the first profile whose banner
/// the guest holds (the vendor's image: trusted), or why there are none.
pub fn from_profile<M: crate::memory::GuestMemory + ?Sized>(
    profiles: &[super::profile::Profile],
    mem: &M,
    space: &dyn crate::integrity::AddressSpace,
    image_base: GuestVirtAddr,
) -> Result<Bounds, String> {
    let m = super::semantic::match_profile(profiles, mem, space, image_base)
        .ok_or("no guest profile matches")?;
    let at = |n: &str| m.profile.symbol(n).map(|s| s.addr.wrapping_add(m.slide));
    Bounds::from_symbols(at, Source::Profile(m.profile.release.clone()))
        .map_err(|e| format!("the profile of {}: {e}", m.profile.release))
}

/// The bounds of the kernel in `space`: from the first profile whose banner
/// the guest holds, else from the guest's kallsyms (read from the pages
/// discovery classed as rodata). The error says why there are none.
pub fn find<M: crate::memory::GuestMemory + ?Sized>(
    profiles: &[super::profile::Profile],
    mem: &M,
    space: &dyn crate::integrity::AddressSpace,
    image_base: GuestVirtAddr,
    regions: &[RegionLayout],
) -> Result<Bounds, String> {
    let mut why = Vec::new();
    match from_profile(profiles, mem, space, image_base) {
        Ok(b) => return Ok(b),
        Err(e) => why.push(e),
    }
    let rodata = regions.iter().find(|r| Region::Rodata.is(&r.name));
    match rodata.and_then(|r| super::semantic::GuestSymbols::read(mem, r)) {
        Some(g) => match Bounds::from_symbols(|n| g.layout_symbol(n), Source::GuestKallsyms) {
            Ok(b) => return Ok(b),
            Err(e) => why.push(format!("the guest's kallsyms: {e}")),
        },
        None => why.push("the guest's kallsyms were not found".to_owned()),
    }
    Err(why.join("; "))
}

/// Bounds the text and rodata regions of `view` by [`find`], and records
/// by what in its identification; says so for events (with how many pages
/// were left out), or why there were no bounds.
pub fn bound_view<M: crate::memory::GuestMemory + ?Sized>(
    profiles: &[super::profile::Profile],
    mem: &M,
    view: &mut super::KernelView<'_, M>,
) -> Result<String, String> {
    let b = find(profiles, mem, &*view, view.identification.image_base, &view.regions)?;
    let dropped = b.apply(&mut view.regions);
    let count = |region: Region| {
        view.regions.iter().find(|r| region.is(&r.name)).map_or(0, |r| r.pages.len() as u64)
    };
    view.identification.text_pages = count(Region::Text);
    view.identification.rodata_pages = count(Region::Rodata);
    view.identification.bounds = b.describe();
    let text_past = if dropped.text > 0 {
        format!(
            "; {} executable page(s) past _etext (freed, yet executable) stay protected",
            dropped.text
        )
    } else {
        String::new()
    };
    Ok(format!(
        "{}; {} rodata page(s) in the freed gaps checked for mapping only{text_past}",
        b.describe(),
        dropped.rodata
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::GuestPhysAddr;
    use crate::integrity::{PageSpec, RegionKind};
    use crate::x86::Perms;

    /// The 6.1 lab build's layout, slid by 0x1c00_0000.
    fn symbols(name: &str) -> Option<u64> {
        let slide = 0x1c00_0000;
        Some(
            match name {
                "_text" => 0xffff_ffff_8100_0000u64,
                "_etext" => 0xffff_ffff_81e0_1ef2,
                "__start_rodata" => 0xffff_ffff_8200_0000,
                "__end_rodata" => 0xffff_ffff_8282_7000,
                _ => return None,
            } + slide,
        )
    }

    fn region(name: &str, kind: RegionKind, from: u64, to: u64) -> RegionLayout {
        let ro = Perms { writable: false, user: false, executable: kind == RegionKind::Code };
        let pages = (from..to)
            .step_by(4096)
            .map(|a| PageSpec {
                gva: GuestVirtAddr(a),
                gpa: GuestPhysAddr(a & 0xfff_ffff),
                perms: ro,
            })
            .collect();
        RegionLayout { name: name.into(), kind, pages }
    }

    #[test]
    fn regions_end_where_the_layout_says_and_gaps_are_named() {
        let b = Bounds::from_symbols(symbols, Source::Profile("6.1".into())).unwrap();
        let s = 0x1c00_0000;
        assert_eq!(b.text, (0xffff_ffff_8100_0000 + s, 0xffff_ffff_81e0_2000 + s));
        assert_eq!(b.pages(), (0xe02, 0x827));
        // As permissions class them: text runs into the text/rodata gap,
        // rodata into the rodata/data gap (up to the next 2 MiB).
        let mut regions = vec![
            region("kernel-text", RegionKind::Code, b.text.0, 0xffff_ffff_81e1_0000 + s),
            region(
                "kernel-rodata",
                RegionKind::ReadOnlyData,
                b.rodata.0,
                0xffff_ffff_82a0_0000 + s,
            ),
            region(
                "idt",
                RegionKind::DescriptorTable,
                0xffff_fe00_0000_0000,
                0xffff_fe00_0000_1000,
            ),
        ];
        let text_pages = regions[0].pages.len();
        let dropped = b.apply(&mut regions);
        assert_eq!(dropped, Dropped { text: 0xe, rodata: 0x1d9 });
        assert_eq!(regions[0].pages.len(), text_pages, "executable pages all stay");
        assert_eq!(regions[1].pages.len() as u64, b.pages().1);
        // Bounds from the guest: rodata pages before the text's end (no
        // gap) or past the 2 MiB after __end_rodata stay, whatever the
        // bounds say.
        let b = Bounds { source: Source::GuestKallsyms, ..b };
        let mut odd = vec![region(
            "kernel-rodata",
            RegionKind::ReadOnlyData,
            b.text.0,
            0xffff_ffff_82c0_0000 + s,
        )];
        let all = odd[0].pages.len();
        let dropped = b.apply(&mut odd);
        assert_eq!(dropped.rodata, 0x1fe + 0x1d9, "the two gaps only");
        assert_eq!(odd[0].pages.len(), all - 0x1fe - 0x1d9);
        assert_eq!(regions[2].pages.len(), 1, "other regions untouched");
        assert!(b.in_gap(GuestVirtAddr(0xffff_ffff_81e0_2000 + s)));
        assert!(b.in_gap(GuestVirtAddr(0xffff_ffff_8282_7000 + s)));
        assert!(b.in_gap(GuestVirtAddr(0xffff_ffff_829f_f000 + s)));
        assert!(!b.in_gap(GuestVirtAddr(0xffff_ffff_82a0_0000 + s)), "data");
        assert!(!b.in_gap(GuestVirtAddr(0xffff_ffff_81e0_1000 + s)), "the last text page");
        assert!(b.describe().contains("own kallsyms (lower trust)"), "{}", b.describe());
    }

    #[test]
    fn implausible_bounds_are_refused() {
        let with = |name: &'static str, v: u64| {
            move |n: &str| if n == name { Some(v) } else { symbols(n) }
        };
        let src = || Source::GuestKallsyms;
        assert!(Bounds::from_symbols(|_| None, src()).unwrap_err().contains("no symbol _text"));
        // rodata before text's end, text empty, outside the image, too big.
        assert!(Bounds::from_symbols(with("_etext", 0xffff_ffff_ff00_0000), src()).is_err());
        assert!(Bounds::from_symbols(with("_etext", 0xffff_ffff_9d00_0000), src()).is_err());
        assert!(Bounds::from_symbols(with("_text", 0xffff_8880_0000_0000), src()).is_err());
        assert!(Bounds::from_symbols(with("__end_rodata", u64::MAX), src()).is_err());
        let e = Bounds::from_symbols(with("_text", 0xffff_ffff_8000_0000), src()).unwrap_err();
        assert!(e.contains("larger"), "{e}");
    }
}
