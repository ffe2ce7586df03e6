//! vigil: a host-side integrity monitor for the kernels of KVM/QEMU guests.
//!
//! Modules follow the data flow: guest memory sources ([`memory`]), what the
//! QEMU monitor says ([`qemu`]), x86-64 translation ([`x86`]), the Linux kernel
//! model ([`linux`]), the integrity engine ([`integrity`]), and libvirt
//! ([`libvirt`]) at the outer edge.
//!
//! Everything that parses guest- or file-controlled bytes is safe Rust:
//! `unsafe` is denied crate-wide and allowed in two modules only, the
//! system calls (`sys`) and the SIMD page tags (`integrity::nh`); a test
//! keeps it that way.
#![deny(unsafe_code)]

pub mod addr;
pub mod daemon;
pub mod integrity;
pub mod libvirt;
pub mod linux;
pub mod memory;
pub mod qemu;
#[allow(unsafe_code)]
mod sys;
pub mod x86;

/// The text of a caught panic (`catch_unwind`, or a task's `JoinError`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}
