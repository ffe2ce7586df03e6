//! What the QEMU monitor says, parsed strictly: vCPU registers (`info registers
//! -a`), the guest-physical RAM layout (`info mtree -f`, `info ramblock`), host
//! addresses of RAM blocks (`gpa2hva`) and vCPU threads (`query-cpus-fast`);
//! and the vCPU state QEMU writes into memory dumps.
//!
//! The monitor is trusted (QEMU is), but its text format is not a stable
//! interface, so every parser refuses what it does not recognise instead of
//! guessing, and is bounded in the input it accepts.

mod dump;
mod layout;
mod registers;

pub use dump::dump_registers;
pub use layout::{
    RamBlockInfo, parse_gpa2hva, parse_mtree_ram, parse_query_cpus_thread_ids, parse_ramblocks,
};
pub use registers::parse_registers;

/// Longest monitor reply any parser accepts.
pub const MAX_REPLY: usize = 4 << 20;

/// Why monitor output was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("monitor reply is {0} bytes, more than the {MAX_REPLY} accepted")]
    TooLong(usize),
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("{0}")]
    Missing(String),
}

fn check_len(text: &str) -> Result<(), ParseError> {
    if text.len() > MAX_REPLY { Err(ParseError::TooLong(text.len())) } else { Ok(()) }
}

fn hex_u64(s: &str) -> Option<u64> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}
