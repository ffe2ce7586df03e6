//! `info registers -a`: the control and descriptor-table registers of every vCPU.

use super::{ParseError, check_len, hex_u64};
use crate::x86::VcpuRegisters;

/// Most vCPUs accepted in one reply.
const MAX_VCPUS: usize = 1024;

#[derive(Default)]
struct Partial {
    cr0: Option<u64>,
    cr3: Option<u64>,
    cr4: Option<u64>,
    efer: Option<u64>,
    idt: Option<(u64, u32)>,
    gdt: Option<(u64, u32)>,
}

fn set<T>(slot: &mut Option<T>, v: T, key: &str, line: usize) -> Result<(), ParseError> {
    if slot.replace(v).is_some() {
        return Err(ParseError::Line { line, reason: format!("{key} given twice for one vCPU") });
    }
    Ok(())
}

impl Partial {
    fn finish(self, index: u32) -> Result<VcpuRegisters, ParseError> {
        let miss = |k: &str| ParseError::Missing(format!("vCPU {index}: no {k} in the reply"));
        let (idtr_base, idtr_limit) = self.idt.ok_or_else(|| miss("IDT"))?;
        let (gdtr_base, gdtr_limit) = self.gdt.ok_or_else(|| miss("GDT"))?;
        Ok(VcpuRegisters {
            index,
            cr0: self.cr0.ok_or_else(|| miss("CR0"))?,
            cr3: self.cr3.ok_or_else(|| miss("CR3"))?,
            cr4: self.cr4.ok_or_else(|| miss("CR4"))?,
            efer: self.efer.ok_or_else(|| miss("EFER"))?,
            idtr_base,
            idtr_limit,
            gdtr_base,
            gdtr_limit,
        })
    }
}

/// Parses the reply to `info registers -a` (or plain `info registers`, which
/// has no `CPU#` header and describes one vCPU).
pub fn parse_registers(text: &str) -> Result<Vec<VcpuRegisters>, ParseError> {
    check_len(text)?;
    let mut cpus = Vec::new();
    let mut current: Option<(u32, Partial)> = None;
    for (n, raw) in text.lines().enumerate() {
        let line_no = n + 1;
        let line = raw.trim_end();
        let bad = |reason: String| ParseError::Line { line: line_no, reason };
        if let Some(rest) = line.strip_prefix("CPU#") {
            let idx: u32 =
                rest.trim().parse().map_err(|_| bad(format!("bad vCPU header {line:?}")))?;
            let expected =
                u32::try_from(cpus.len() + usize::from(current.is_some())).unwrap_or(u32::MAX);
            if idx != expected {
                return Err(bad(format!("vCPU {idx} where vCPU {expected} was expected")));
            }
            if let Some((i, p)) = current.take() {
                cpus.push(p.finish(i)?);
            }
            if cpus.len() >= MAX_VCPUS {
                return Err(bad(format!("more than {MAX_VCPUS} vCPUs")));
            }
            current = Some((idx, Partial::default()));
            continue;
        }
        let starts_cpu = line.starts_with("RAX=") || line.starts_with("EAX=");
        if starts_cpu && current.is_none() && cpus.is_empty() {
            current = Some((0, Partial::default())); // single-vCPU form
        }
        let Some((_, p)) = current.as_mut() else {
            continue;
        };
        for key in ["GDT=", "IDT="] {
            if let Some(rest) = line.strip_prefix(key) {
                let mut f = rest.split_whitespace();
                let (Some(b), Some(l), None) = (f.next(), f.next(), f.next()) else {
                    return Err(bad(format!("expected '{key} BASE LIMIT', got {line:?}")));
                };
                let base = hex_u64(b).ok_or_else(|| bad(format!("bad {key} base {b:?}")))?;
                let limit = hex_u64(l)
                    .and_then(|v| u32::try_from(v).ok())
                    .ok_or_else(|| bad(format!("bad {key} limit {l:?}")))?;
                let slot = if key == "GDT=" { &mut p.gdt } else { &mut p.idt };
                set(slot, (base, limit), key, line_no)?;
            }
        }
        if line.starts_with("CR0=") || line.starts_with("EFER=") {
            for tok in line.split_whitespace() {
                let (k, v) =
                    tok.split_once('=').ok_or_else(|| bad(format!("bad token {tok:?}")))?;
                let val = hex_u64(v).ok_or_else(|| bad(format!("bad {k} value {v:?}")))?;
                match k {
                    "CR0" => set(&mut p.cr0, val, k, line_no)?,
                    "CR3" => set(&mut p.cr3, val, k, line_no)?,
                    "CR4" => set(&mut p.cr4, val, k, line_no)?,
                    "EFER" => set(&mut p.efer, val, k, line_no)?,
                    "CR2" => {}
                    _ => return Err(bad(format!("unexpected register {k:?}"))),
                }
            }
        }
    }
    if let Some((i, p)) = current.take() {
        cpus.push(p.finish(i)?);
    }
    if cpus.is_empty() {
        return Err(ParseError::Missing("no vCPU registers in the reply".into()));
    }
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: &str = include_str!("testdata/registers-1cpu.txt");
    const TWO: &str = include_str!("testdata/registers-2cpu.txt");

    #[test]
    fn captured_single_vcpu() {
        let cpus = parse_registers(ONE).unwrap();
        assert_eq!(cpus.len(), 1);
        let c = cpus[0];
        assert_eq!(c.cr0, 0x8005_0033);
        assert_eq!(c.cr3, 0x8c1_0000);
        assert_eq!(c.cr4, 0x0075_1eb0);
        assert_eq!(c.efer, 0xd01);
        assert_eq!((c.idtr_base, c.idtr_limit), (0xffff_fe00_0000_0000, 0xfff));
        assert_eq!((c.gdtr_base, c.gdtr_limit), (0xffff_fe00_0000_1000, 0x7f));
        assert!(c.in_long_mode());
    }

    #[test]
    fn captured_two_vcpus_one_still_in_real_mode() {
        let cpus = parse_registers(TWO).unwrap();
        assert_eq!(cpus.len(), 2);
        assert!(cpus[0].in_long_mode());
        assert_eq!(cpus[1].index, 1);
        assert_eq!(cpus[1].gdtr_base, 0xf6180);
        assert!(!cpus[1].in_long_mode());
    }

    #[test]
    fn malformed_replies_are_refused() {
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "empty"),
            ("error: no such command\n".into(), "an error message"),
            (ONE.replace("CR0=80050033", "CR0=8005zz33"), "non-hex CR0"),
            (ONE.replace("EFER=0000000000000d01", ""), "no EFER"),
            (
                ONE.replace("IDT=     fffffe0000000000 00000fff", "IDT=     fffffe0000000000"),
                "IDT without limit",
            ),
            (ONE.replace("CR3=", "XX3="), "unknown register"),
            (ONE.replace("CR4=00751eb0", "CR4=00751eb0 CR4=0"), "duplicate"),
            (TWO.replace("CPU#1", "CPU#5"), "vCPU numbers out of order"),
            (ONE.replace("CPU#0", "CPU#x"), "bad header"),
            (
                ONE.replace(
                    "GDT=     fffffe0000001000 0000007f",
                    "GDT=     fffffe0000001000 1ffffffff",
                ),
                "limit too wide",
            ),
            ("x".repeat(super::super::MAX_REPLY + 1), "too long"),
        ];
        for (text, what) in cases {
            assert!(parse_registers(&text).is_err(), "accepted {what}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(s in "\\PC{0,400}") {
            let _ = parse_registers(&s);
        }

        #[test]
        fn never_panics_on_mutated_capture(pos in 0usize..4000, byte in 0u8..128) {
            let mut b = ONE.as_bytes().to_vec();
            let i = pos % b.len();
            b[i] = byte;
            if let Ok(s) = String::from_utf8(b) {
                let _ = parse_registers(&s);
            }
        }
    }
}
