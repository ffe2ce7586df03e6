//! The Linux kernel model: finds a guest kernel's code, read-only data and
//! descriptor tables in its memory, without symbols, from the page tables.
//!
//! Owns what is Linux-specific (where the kernel image is mapped, how PTI
//! splits CR3); hands the integrity engine plain regions of pages.

pub mod btf;
pub mod diff;
mod discover;
pub mod hooks;
pub mod image;
pub mod kallsyms;
pub mod layout;
pub mod modules;
pub mod patch;
pub mod profile;
pub mod reference;
pub mod region;
pub mod report;
pub mod semantic;
pub mod session;

pub use discover::{DiscoverError, IMAGE_END, IMAGE_START, KernelView, discover};
pub use report::{KernelFacts, KernelReport};
