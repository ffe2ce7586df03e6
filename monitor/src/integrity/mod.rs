//! The integrity engine: regions of pages, their BLAKE3 values and roots,
//! baselines, and the comparison of a fresh reading with a baseline.
//!
//! It knows regions, pages, mappings and registers as data, and nothing of
//! Linux: the kernel model decides which pages form which region.

pub mod baseline;
pub mod check;
#[allow(unsafe_code)]
pub mod nh;
pub mod originals;
pub mod tags;
pub mod tree;

pub use baseline::{Baseline, BaselineError, ReferenceCheck, ReferenceState};
pub use check::{EntryRef, Finding, FindingKind, Report, Severity};
pub use originals::Originals;

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_BYTES, PAGE_SIZE};
use crate::memory::{GuestMemory, MemoryError};
use crate::x86::{Mapping, Perms};

/// A page to read: (index in its region, virtual, physical).
pub type PageRead = (u64, GuestVirtAddr, GuestPhysAddr);

/// Hands `visit` the pages `reads`, in order, a run of physically
/// consecutive pages at a time with their bytes (4096 a page): lent in
/// place in one piece where the source maps RAM, else copied in batches of
/// up to 64 pages. Stops at the first read that fails.
pub(crate) fn read_in_runs<M: GuestMemory + ?Sized>(
    mem: &M,
    reads: &[PageRead],
    mut visit: impl FnMut(&[PageRead], &[u8]),
) -> Result<(), MemoryError> {
    const BATCH: usize = 64;
    let mut buf = Vec::new();
    let mut rest = reads;
    while let Some(first) = rest.first() {
        let run = 1 + rest
            .windows(2)
            .take_while(|w| w[1].2.raw() == w[0].2.raw().wrapping_add(PAGE_SIZE))
            .count();
        let (this, next) = rest.split_at(run);
        rest = next;
        if let Some(bytes) = mem.slice(first.2, PAGE_SIZE * this.len() as u64) {
            visit(this, bytes);
            continue;
        }
        for batch in this.chunks(BATCH) {
            buf.resize(batch.len() * PAGE_BYTES, 0);
            let mut rs: Vec<(GuestPhysAddr, &mut [u8])> =
                batch.iter().zip(buf.chunks_exact_mut(PAGE_BYTES)).map(|(r, b)| (r.2, b)).collect();
            mem.read_many(&mut rs)?;
            visit(batch, &buf);
        }
    }
    Ok(())
}

/// What a region is for; decides nothing in the engine but is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegionKind {
    /// Executable, read-only code.
    Code,
    /// Read-only data.
    ReadOnlyData,
    /// A descriptor table a CPU register points at.
    DescriptorTable,
}

/// One 4 KiB page of a region, as the kernel model found it mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSpec {
    pub gva: GuestVirtAddr,
    pub gpa: GuestPhysAddr,
    pub perms: Perms,
}

/// A region to protect: whole 4 KiB pages in the order they are hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionLayout {
    pub name: String,
    pub kind: RegionKind,
    pub pages: Vec<PageSpec>,
}

/// How the kernel model found the kernel, recorded in baselines.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identification {
    /// `wx-page-walk`: classified by page permissions, no symbols.
    pub method: String,
    /// The vCPU whose CR3 was walked.
    pub vcpu: u32,
    #[serde(with = "crate::addr::hex_addr")]
    pub cr3: u64,
    pub paging: String,
    /// Lowest mapped address of the image: the KASLR virtual placement.
    pub image_base: GuestVirtAddr,
    /// Guest-physical address behind `image_base`: the physical placement.
    pub image_base_gpa: GuestPhysAddr,
    pub text_pages: u64,
    pub rodata_pages: u64,
    /// What bounded the code and read-only regions (the kernel's own layout,
    /// and from where); empty when only page permissions classed them.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bounds: String,
}

impl Identification {
    /// Names one boot of a guest: where KASLR put the image, virtually and
    /// physically. A reboot almost always moves both.
    pub fn boot_key(&self) -> String {
        format!("{:x}-{:x}", self.image_base.raw(), self.image_base_gpa.raw())
    }
}

/// A fresh view of the guest's address space, as the kernel model walked it.
pub trait AddressSpace {
    /// Every 4 KiB page mapped in the kernel image range, in address order.
    fn image_pages(&self) -> &[Mapping];
    /// Where page-aligned `gva` maps now, and with which permissions.
    fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, Perms)>;
    /// Executable kernel memory outside the image that the kernel model
    /// knows of (module code, JIT images): recorded in baselines so that what
    /// was there when the guest was trusted is told from what came later.
    fn exec_outside_image(&self) -> Vec<Mapping> {
        Vec::new()
    }
    /// Every leaf mapping in `[start, end)` (bounded; empty when the walk fails).
    fn mappings_in(&self, _start: GuestVirtAddr, _end: GuestVirtAddr) -> Vec<Mapping> {
        Vec::new()
    }
}
