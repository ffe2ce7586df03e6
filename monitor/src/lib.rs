//! vigil: a host-side integrity monitor for the kernels of KVM/QEMU guests.
//!
//! Modules follow the data flow: guest memory sources ([`memory`]), x86-64
//! translation and vCPU state ([`x86`]), what the QEMU monitor says
//! ([`qemu`], parsed into `x86` types), the integrity engine ([`integrity`]),
//! the Linux kernel model ([`linux`], whose [`linux::session`] runs one
//! examination for the CLI and the daemon alike), KVM's own statistics of
//! a domain ([`kvm`], as libvirt passes them on), libvirt ([`libvirt`]) at
//! the outer edge, one guest watched from check to check ([`watch`]: attach,
//! baselines kept across boots, checks), and the daemon ([`daemon`]) over all
//! of them. [`paths`] says where state is kept by default. Each module
//! imports only those before it in this order (`tests/source_rules.rs`).
//!
//! Everything that parses guest- or file-controlled bytes is safe Rust:
//! `unsafe` is denied crate-wide and allowed in two modules only, the
//! system calls and libvirt's C API, loaded at run time (`sys`), and the
//! SIMD page tags (`integrity::nh`); a test keeps it that way.
#![deny(unsafe_code)]

pub mod addr;
pub mod daemon;
pub mod integrity;
pub mod kvm;
pub mod libvirt;
pub mod linux;
pub mod memory;
pub mod paths;
pub mod qemu;
#[allow(unsafe_code)]
mod sys;
pub mod watch;
pub mod x86;

/// The text of a caught panic (`catch_unwind`, or a task's `JoinError`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}
