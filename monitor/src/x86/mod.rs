//! x86-64: address translation (4- and 5-level paging with 4 KiB, 2 MiB and
//! 1 GiB pages, permissions accumulated along the walk, every walk bounded)
//! and the vCPU state the checks read.
//!
//! Owns page-table walking only; which ranges matter (the kernel image, the
//! IDT) is the Linux kernel model's business.

#[cfg(test)]
pub(crate) mod builder;
mod paging;
mod regs;

pub use paging::{
    Mapping, MappingSet, PagingMode, Perms, Translation, WalkBudget, WalkError, Walker,
};
pub use regs::{CR0_PG, CR0_WP, CR4_LA57, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_NXE, VcpuRegisters};
