//! The state of a vCPU that vigil reads and baselines: control registers,
//! EFER and the descriptor-table registers, with the bits of them that the
//! checks look at. The hypervisor's reply is parsed into it elsewhere
//! (`qemu`, ELF core notes).

/// CR0: paging enabled.
pub const CR0_PG: u64 = 1 << 31;
/// CR0: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR4: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// CR4: supervisor-mode execution prevention.
pub const CR4_SMEP: u64 = 1 << 20;
/// CR4: supervisor-mode access prevention.
pub const CR4_SMAP: u64 = 1 << 21;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER: no-execute bit enabled.
pub const EFER_NXE: u64 = 1 << 11;

/// The registers vigil baselines, for one vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VcpuRegisters {
    pub index: u32,
    #[serde(with = "crate::addr::hex_addr")]
    pub cr0: u64,
    #[serde(with = "crate::addr::hex_addr")]
    pub cr3: u64,
    #[serde(with = "crate::addr::hex_addr")]
    pub cr4: u64,
    #[serde(with = "crate::addr::hex_addr")]
    pub efer: u64,
    #[serde(with = "crate::addr::hex_addr")]
    pub idtr_base: u64,
    pub idtr_limit: u32,
    #[serde(with = "crate::addr::hex_addr")]
    pub gdtr_base: u64,
    pub gdtr_limit: u32,
}

impl VcpuRegisters {
    /// Whether the vCPU runs in 64-bit mode with paging: the state in which its
    /// registers describe the running kernel. A vCPU not yet brought up (still
    /// in real mode) does not.
    pub fn in_long_mode(&self) -> bool {
        self.cr0 & CR0_PG != 0 && self.efer & EFER_LMA != 0
    }
}
