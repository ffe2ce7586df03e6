//! The kernel as its vendor built it: what its text and read-only data must
//! hold at any KASLR slide, and where it rewrites itself at boot.
//!
//! An x86 `vmlinuz` decompresses to the stripped `vmlinux` ELF followed by
//! the relocation table its decompressor applies when it places the kernel
//! at a random address:
//!
//! ```text
//!  [ vmlinux ELF ............ ][ 0 | 64-bit ... | 0 | inverse 32-bit ... | 0 | 32-bit ... ]
//!                               each entry the low 32 bits of a link address (sign-extended)
//! ```
//!
//! A 64-bit entry gets the slide added, a 32-bit one the slide added to its
//! low 32 bits, an inverse one the slide subtracted. [`Reference`] keeps the
//! sections a check compares (text, read-only data) and the tables that
//! say where the kernel rewrites itself (alternatives, paravirt, retpoline
//! and return thunks, lock prefixes, IBT seals, call-depth sites), with the
//! relocations inside them, and gives any range's expected bytes at a slide.
//!
//! The image is the vendor's (trusted); it is still parsed with bounds, and
//! the stored form is read back as untrusted input.

mod compare;
mod forms;
mod proof;
mod sites;
mod store;
mod verify;

pub use compare::{Difference, differences};
pub use forms::{Forms, Judgement, Op, effective, judge, telling_name};
pub use proof::{Proof, load, prove, reference_path};
pub use sites::{ConstKind, RewriteKind, RewriteSite, Rewrites};
pub use store::{FORMAT, ReferenceFile};
pub use verify::{BootWritten, Judged, Verification, verify_pages};

/// A section the reference keeps: its link address and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    pub name: String,
    pub addr: u64,
    pub bytes: Vec<u8>,
}

impl Section {
    fn end(&self) -> u64 {
        self.addr.saturating_add(self.bytes.len() as u64)
    }
}

/// The relocations of the kept sections, as sorted link addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Relocs {
    /// 64-bit absolute addresses: slide added.
    pub abs64: Vec<u64>,
    /// 32-bit sign-extended absolute addresses: slide added.
    pub abs32: Vec<u64>,
    /// 32-bit values that hold a distance to a per-CPU symbol: slide
    /// subtracted.
    pub inv32: Vec<u64>,
}

/// Why a reference could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("the kernel image: {0}")]
    Image(#[from] super::image::ImageError),
    #[error("the vmlinux ELF: {0}")]
    Elf(String),
    #[error("the relocation table after the vmlinux ELF: {0}")]
    Relocs(String),
    #[error("the kernel image has no section {0}")]
    Missing(&'static str),
    #[error("{0}")]
    Store(String),
}

/// Sections whose bytes the checks compare: text, and the read-only data
/// region (every section from `.rodata` to the first writable data after it).
const TEXT: &str = ".text";
/// Tables of boot-time rewrite sites, each kept whole.
pub(crate) const SITE_TABLES: [&str; 8] = [
    ".altinstructions",
    ".altinstr_replacement",
    ".parainstructions",
    ".retpoline_sites",
    ".return_sites",
    ".smp_locks",
    ".ibt_endbr_seal",
    ".call_sites",
];
/// Tables of run-time constants (6.10 on): an instruction's immediate the
/// kernel sets once at boot, one table per constant.
pub(crate) const RUNTIME_CONSTS: [&str; 2] = ["runtime_ptr_", "runtime_shift_"];
/// Most bytes of sections kept, all together.
const MAX_KEPT: u64 = 192 << 20;
/// Most relocation entries read.
const MAX_RELOCS: usize = 1 << 21;

/// The kernel's text and read-only data as linked, where it rewrites itself
/// at boot, and how it is relocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// Sorted by address; none overlap.
    pub sections: Vec<Section>,
    pub relocs: Relocs,
}

impl Reference {
    /// Reads the reference out of a decompressed `vmlinux` with its
    /// relocation table after it, keeping the text, the read-only data
    /// from `rodata_start` to `rodata_end` (link addresses, from the
    /// profile) and the rewrite tables.
    pub fn from_vmlinux(
        vmlinux: &[u8],
        (rodata_start, rodata_end): (u64, u64),
    ) -> Result<Self, ReferenceError> {
        use object::{Object, ObjectSection};
        let file = object::File::parse(vmlinux).map_err(|e| ReferenceError::Elf(e.to_string()))?;
        let elf_end = elf_end(&file, vmlinux.len())?;
        let mut sections = Vec::new();
        let mut kept = 0u64;
        for s in file.sections() {
            let name = s.name().map_err(|e| ReferenceError::Elf(e.to_string()))?;
            let (addr, size) = (s.address(), s.size());
            let in_rodata = addr >= rodata_start && addr < rodata_end && size > 0;
            let table =
                SITE_TABLES.contains(&name) || RUNTIME_CONSTS.iter().any(|p| name.starts_with(p));
            if name != TEXT && !in_rodata && !table {
                continue;
            }
            if s.kind() == object::SectionKind::UninitializedData {
                continue;
            }
            kept = kept.saturating_add(size);
            if kept > MAX_KEPT {
                return Err(ReferenceError::Elf(format!(
                    "more than {MAX_KEPT} bytes of sections to keep"
                )));
            }
            let bytes = s.data().map_err(|e| ReferenceError::Elf(format!("{name}: {e}")))?;
            // A section running past __end_rodata is cut there.
            let keep =
                if in_rodata { bytes.len().min(len_to(addr, rodata_end)) } else { bytes.len() };
            sections.push(Section { name: name.to_owned(), addr, bytes: bytes[..keep].to_vec() });
        }
        if !sections.iter().any(|s| s.name == TEXT) {
            return Err(ReferenceError::Missing(".text"));
        }
        sections.sort_by_key(|s| s.addr);
        if let Some(w) = sections.windows(2).find(|w| w[0].end() > w[1].addr) {
            return Err(ReferenceError::Elf(format!(
                "sections {} and {} overlap",
                w[0].name, w[1].name
            )));
        }
        let all = parse_relocs(&vmlinux[elf_end..])?;
        let mut r = Reference { sections, relocs: Relocs::default() };
        r.relocs = Relocs {
            abs64: r.kept_relocs(all.abs64, 8),
            abs32: r.kept_relocs(all.abs32, 4),
            inv32: r.kept_relocs(all.inv32, 4),
        };
        Ok(r)
    }

    /// The relocations of `list` that fall wholly in a kept section, sorted.
    fn kept_relocs(&self, mut list: Vec<u64>, width: u64) -> Vec<u64> {
        list.retain(|&a| self.section_at(a).is_some_and(|s| a + width <= s.end()));
        list.sort_unstable();
        list.dedup();
        list
    }

    /// The kept section holding link address `a`.
    pub fn section_at(&self, a: u64) -> Option<&Section> {
        let i = self.sections.partition_point(|s| s.addr <= a);
        let s = self.sections.get(i.checked_sub(1)?)?;
        (a < s.end()).then_some(s)
    }

    /// A kept section by name.
    pub fn section(&self, name: &str) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// The `len` bytes at link address `addr` as the kernel holds them
    /// once placed `slide` bytes above its link address, before it rewrites
    /// anything: `None` unless one kept section holds them all.
    pub fn expected(&self, addr: u64, len: usize, slide: u64) -> Option<Vec<u8>> {
        let s = self.section_at(addr)?;
        let off = usize::try_from(addr - s.addr).ok()?;
        let mut out = s.bytes.get(off..off.checked_add(len)?)?.to_vec();
        let end = addr.checked_add(len as u64)?;
        // An entry starting up to 7 bytes before the range reaches into it.
        let from = addr.saturating_sub(7);
        let mut apply = |list: &[u64], width: usize, f: &dyn Fn(&[u8]) -> Vec<u8>| {
            let i = list.partition_point(|&a| a < from);
            for &a in list[i..].iter().take_while(|&&a| a < end) {
                let Some(so) = a.checked_sub(s.addr).and_then(|o| usize::try_from(o).ok()) else {
                    continue;
                };
                let Some(whole) = s.bytes.get(so..so + width) else { continue };
                let new = f(whole);
                for (k, b) in new.iter().enumerate() {
                    let at = a + k as u64;
                    if let Some(o) = at.checked_sub(addr).and_then(|o| usize::try_from(o).ok())
                        && let Some(slot) = out.get_mut(o)
                    {
                        *slot = *b;
                    }
                }
            }
        };
        apply(&self.relocs.abs64, 8, &|w| {
            let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            v.wrapping_add(slide).to_le_bytes().to_vec()
        });
        // A 32-bit entry takes the slide's low half, as the decompressor adds it.
        let low = (slide & 0xffff_ffff) as u32;
        apply(&self.relocs.abs32, 4, &|w| {
            let v = u32::from_le_bytes(w.try_into().expect("4 bytes"));
            v.wrapping_add(low).to_le_bytes().to_vec()
        });
        apply(&self.relocs.inv32, 4, &|w| {
            let v = u32::from_le_bytes(w.try_into().expect("4 bytes"));
            v.wrapping_sub(low).to_le_bytes().to_vec()
        });
        Some(out)
    }

    /// Bytes kept, all sections together.
    pub fn bytes(&self) -> u64 {
        self.sections.iter().map(|s| s.bytes.len() as u64).sum()
    }
}

fn len_to(addr: u64, end: u64) -> usize {
    usize::try_from(end.saturating_sub(addr)).unwrap_or(usize::MAX)
}

/// Where the ELF file ends (its last section, program or section header),
/// which is where the relocation table starts.
fn elf_end(file: &object::File<'_>, total: usize) -> Result<usize, ReferenceError> {
    use object::read::elf::{FileHeader, ProgramHeader, SectionHeader};
    let object::File::Elf64(elf) = file else {
        return Err(ReferenceError::Elf("not a 64-bit ELF".into()));
    };
    let e = object::Endianness::Little;
    let h = elf.elf_header();
    let mut end =
        h.e_shoff(e).saturating_add(u64::from(h.e_shnum(e)) * u64::from(h.e_shentsize(e)));
    end =
        end.max(h.e_phoff(e).saturating_add(u64::from(h.e_phnum(e)) * u64::from(h.e_phentsize(e))));
    for s in elf.elf_section_table().iter() {
        if s.sh_type(e) != object::elf::SHT_NOBITS {
            end = end.max(s.sh_offset(e).saturating_add(s.sh_size(e)));
        }
    }
    for p in elf.elf_program_headers() {
        end = end.max(p.p_offset(e).saturating_add(p.p_filesz(e)));
    }
    usize::try_from(end)
        .ok()
        .filter(|&n| n <= total)
        .ok_or_else(|| ReferenceError::Elf(format!("it claims {end} bytes; the file has {total}")))
}

/// The relocation table: `[0][64-bit..][0][inverse 32-bit..][0][32-bit..]`,
/// each entry the low half of a link address.
fn parse_relocs(table: &[u8]) -> Result<Relocs, ReferenceError> {
    let bad = |r: String| ReferenceError::Relocs(r);
    if table.is_empty() {
        return Err(bad(
            "there is none: the image was not built relocatable (CONFIG_RELOCATABLE)".into()
        ));
    }
    if !table.len().is_multiple_of(4) {
        return Err(bad(format!("{} bytes, not a whole number of entries", table.len())));
    }
    let n = table.len() / 4;
    if n > MAX_RELOCS {
        return Err(bad(format!("{n} entries, more than the {MAX_RELOCS} read")));
    }
    let v: Vec<u32> =
        table.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
    let stops: Vec<usize> =
        v.iter().enumerate().filter(|(_, x)| **x == 0).map(|(i, _)| i).collect();
    if stops.len() != 3 || stops[0] != 0 {
        return Err(bad(format!(
            "{} end marks where 3 are expected (the first at its start)",
            stops.len()
        )));
    }
    let addr = |x: &u32| i64::from(x.cast_signed()).cast_unsigned();
    Ok(Relocs {
        abs64: v[1..stops[1]].iter().map(addr).collect(),
        inv32: v[stops[1] + 1..stops[2]].iter().map(addr).collect(),
        abs32: v[stops[2] + 1..].iter().map(addr).collect(),
    })
}

#[cfg(test)]
mod tests;
