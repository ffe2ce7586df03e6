//! The vCPU state QEMU writes into a memory dump: one `QEMU` ELF note per
//! vCPU holding its `QEMUCPUState` (target/i386/arch_dump.c, version 1).
//! EFER is not in it.

use super::ParseError;
use crate::x86::VcpuRegisters;

/// Offsets in `QEMUCPUState`: the GDT's and IDT's segment caches, then the
/// control registers CR0 to CR4.
const GDT: usize = 344;
const IDT: usize = 368;
const CR: usize = 392;
const STATE_MIN: usize = CR + 5 * 8;
/// Most vCPUs taken from one dump.
const MAX_VCPUS: usize = 1024;

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// The registers of each vCPU from its `QEMU` note, in vCPU order; EFER
/// reads as 0.
pub fn dump_registers(notes: &[Vec<u8>]) -> Result<Vec<VcpuRegisters>, ParseError> {
    if notes.len() > MAX_VCPUS {
        return Err(ParseError::Missing(format!(
            "{} QEMU CPU notes: more than the {MAX_VCPUS} vCPUs taken",
            notes.len()
        )));
    }
    let mut out = Vec::with_capacity(notes.len());
    for (index, d) in (0u32..).zip(notes) {
        if d.len() < STATE_MIN {
            return Err(ParseError::Missing(format!(
                "the QEMU CPU note of vCPU {index} is {} bytes, too short for its registers",
                d.len()
            )));
        }
        let seg = |o: usize| (u64_at(d, o + 16), u32_at(d, o + 4));
        let (gdtr_base, gdtr_limit) = seg(GDT);
        let (idtr_base, idtr_limit) = seg(IDT);
        out.push(VcpuRegisters {
            index,
            cr0: u64_at(d, CR),
            cr3: u64_at(d, CR + 24),
            cr4: u64_at(d, CR + 32),
            efer: 0,
            idtr_base,
            idtr_limit,
            gdtr_base,
            gdtr_limit,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(cr3: u64) -> Vec<u8> {
        let mut s = vec![0u8; 440];
        s[CR..CR + 8].copy_from_slice(&0x8005_0033u64.to_le_bytes());
        s[CR + 24..CR + 32].copy_from_slice(&cr3.to_le_bytes());
        s[IDT + 16..IDT + 24].copy_from_slice(&0xffff_fe00_0000_0000u64.to_le_bytes());
        s[IDT + 4..IDT + 8].copy_from_slice(&0xfffu32.to_le_bytes());
        s[GDT + 16..GDT + 24].copy_from_slice(&0xffff_fe00_0000_1000u64.to_le_bytes());
        s
    }

    #[test]
    fn each_note_is_a_vcpu_in_order() {
        let r = dump_registers(&[state(0x1234_5000), state(0x6789_a000)]).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].index, r[0].cr0, r[0].cr3), (0, 0x8005_0033, 0x1234_5000));
        assert_eq!((r[0].idtr_base, r[0].idtr_limit), (0xffff_fe00_0000_0000, 0xfff));
        assert_eq!((r[1].index, r[1].cr3, r[1].gdtr_base), (1, 0x6789_a000, 0xffff_fe00_0000_1000));
        assert_eq!(r[1].efer, 0);
    }

    #[test]
    fn short_notes_and_too_many_are_refused() {
        let e = dump_registers(&[state(0), vec![0; STATE_MIN - 1]]).unwrap_err().to_string();
        assert!(e.contains("vCPU 1") && e.contains("too short"), "{e}");
        let many = vec![state(0); MAX_VCPUS + 1];
        assert!(dump_registers(&many).unwrap_err().to_string().contains("1025 QEMU CPU notes"));
        assert!(dump_registers(&[]).unwrap().is_empty());
    }
}
