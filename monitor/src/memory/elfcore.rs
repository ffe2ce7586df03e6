//! An ELF core of guest memory, as `virsh dump --memory-only` (QEMU's
//! `dump-guest-memory`) writes it: `PT_LOAD` segments whose physical address
//! is guest-physical, and per vCPU a `QEMU` note with its registers.
//!
//! The file is input like guest memory: every header is checked against the
//! file's length, counts are bounded, and what cannot be believed is refused
//! with the reason.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{GuestMemory, MemoryError, RamLayout, RamRange, len_u64};
use crate::addr::GuestPhysAddr;

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const MAX_PHDRS: u64 = 4096;
/// Most bytes of notes read, in all segments together.
const MAX_NOTES: u64 = 1 << 20;

/// Why a dump file was refused.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("{path}: cannot read")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Guest memory from an ELF core file.
pub struct ElfCore {
    file: File,
    layout: RamLayout,
    /// The `QEMU` notes' contents: each vCPU's state, in vCPU order, as
    /// QEMU writes it (`qemu::dump_registers` reads the registers in it).
    pub cpu_notes: Vec<Vec<u8>>,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().expect("2 bytes"))
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Whether the file starts like an ELF file.
pub fn is_elf(path: &Path) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    let f = File::open(path)?;
    Ok(f.read_at(&mut magic, 0)? == 4 && magic == *b"\x7fELF")
}

impl ElfCore {
    pub fn open(path: &Path) -> Result<Self, DumpError> {
        let shown = path.display().to_string();
        let io = |source| DumpError::Io { path: shown.clone(), source };
        let bad = |reason: String| DumpError::Invalid { path: shown.clone(), reason };
        let file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let read = |off: u64, len: u64| -> Result<Vec<u8>, DumpError> {
            let end = off.checked_add(len).filter(|&e| e <= size).ok_or_else(|| {
                bad(format!("{len} bytes at offset {off:#x} run past the end of the file ({size} bytes): truncated?"))
            })?;
            let mut buf = vec![0u8; usize::try_from(end - off).map_err(|e| bad(e.to_string()))?];
            file.read_exact_at(&mut buf, off).map_err(io)?;
            Ok(buf)
        };
        let h = read(0, 64)?;
        if h.starts_with(b"KDUMP") {
            return Err(bad(
                "a kdump-compressed dump, which vigil does not read: take it with `virsh dump --memory-only --format elf`".into(),
            ));
        }
        if h[..4] != *b"\x7fELF" {
            return Err(bad("not an ELF file".into()));
        }
        if h[4] != 2 || h[5] != 1 {
            return Err(bad("not a 64-bit little-endian ELF file".into()));
        }
        if u16_at(&h, 16) != 4 {
            return Err(bad(format!("ELF type {} is not a core file", u16_at(&h, 16))));
        }
        let (phoff, phentsize, phnum) =
            (u64_at(&h, 32), u64::from(u16_at(&h, 54)), u64::from(u16_at(&h, 56)));
        if phentsize != 56 || phnum == 0 || phnum > MAX_PHDRS {
            return Err(bad(format!(
                "{phnum} program headers of {phentsize} bytes: not a memory dump"
            )));
        }
        let ph = read(phoff, phnum * 56)?;
        let mut ranges = Vec::new();
        let mut cpu_notes = Vec::new();
        let mut note_bytes = 0u64;
        for (i, p) in ph.chunks_exact(56).enumerate() {
            let (kind, offset, paddr, filesz) =
                (u32_at(p, 0), u64_at(p, 8), u64_at(p, 24), u64_at(p, 32));
            match kind {
                PT_LOAD if filesz > 0 => {
                    if offset.checked_add(filesz).is_none_or(|e| e > size) {
                        return Err(bad(format!(
                            "segment {i} (guest-physical {paddr:#x}, {filesz:#x} bytes at offset {offset:#x}) runs past the end of the file ({size} bytes): truncated?"
                        )));
                    }
                    ranges.push(RamRange {
                        start: GuestPhysAddr(paddr),
                        len: filesz,
                        block: format!("elf-load-{i}"),
                        block_offset: offset,
                    });
                }
                PT_NOTE => {
                    note_bytes = note_bytes.saturating_add(filesz);
                    if note_bytes > MAX_NOTES {
                        return Err(bad(format!(
                            "{note_bytes} bytes of notes (this segment {filesz}) are implausible"
                        )));
                    }
                    cpu_notes.extend(
                        qemu_notes(&read(offset, filesz)?)
                            .map_err(|r| bad(format!("notes: {r}")))?,
                    );
                }
                _ => {}
            }
        }
        let layout =
            RamLayout::new(ranges).map_err(|e| bad(format!("its memory segments: {e}")))?;
        Ok(Self { file, layout, cpu_notes })
    }
}

/// The descriptors of the `QEMU` notes of a note segment, each bounded by
/// the segment.
fn qemu_notes(b: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let pad = |n: usize| n.checked_add(3).map(|v| v & !3);
    while at + 12 <= b.len() {
        let (namesz, descsz) = (u32_at(b, at) as usize, u32_at(b, at + 4) as usize);
        let name_at = at + 12;
        let desc_at =
            pad(namesz).and_then(|n| name_at.checked_add(n)).ok_or("a note's name is too long")?;
        let end = pad(descsz).and_then(|d| desc_at.checked_add(d)).ok_or("a note is too long")?;
        if end > b.len() + 3 || desc_at + descsz > b.len() {
            return Err(format!("a note at {at:#x} runs past its segment"));
        }
        if &b[name_at..name_at + namesz] == b"QEMU\0" {
            out.push(b[desc_at..desc_at + descsz].to_vec());
        }
        at = end;
    }
    Ok(out)
}

impl GuestMemory for ElfCore {
    fn read(&self, start: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = len_u64(buf);
        let r = self.layout.find(start, len).ok_or(MemoryError::NotRam { start, len })?;
        let off = r.block_offset + (start.raw() - r.start.raw());
        self.file.read_exact_at(buf, off).map_err(|source| MemoryError::Io { start, len, source })
    }

    fn layout(&self) -> &RamLayout {
        &self.layout
    }

    fn kind(&self) -> &'static str {
        "elf-core"
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// A core with one 3-page LOAD at guest-physical 0x1000 and one QEMU note
    /// of 440 bytes, each byte its offset's low byte.
    pub fn core() -> Vec<u8> {
        let mut note = Vec::new();
        note.extend_from_slice(&5u32.to_le_bytes());
        note.extend_from_slice(&440u32.to_le_bytes());
        note.extend_from_slice(&0u32.to_le_bytes());
        note.extend_from_slice(b"QEMU\0\0\0\0");
        note.extend((0..440u32).map(|i| i as u8));
        let notes_at = 64 + 2 * 56;
        let load_at = (notes_at + note.len()) as u64;
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16] = 4;
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54] = 56;
        b[56] = 2;
        let phdr = |kind: u32, off: u64, paddr: u64, size: u64| {
            let mut p = vec![0u8; 56];
            p[..4].copy_from_slice(&kind.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[24..32].copy_from_slice(&paddr.to_le_bytes());
            p[32..40].copy_from_slice(&size.to_le_bytes());
            p
        };
        b.extend(phdr(PT_NOTE, notes_at as u64, 0, note.len() as u64));
        b.extend(phdr(PT_LOAD, load_at, 0x1000, 3 * 4096));
        b.extend(note);
        b.extend((0..3 * 4096u32).map(|i| (i % 251) as u8));
        b
    }

    fn open(bytes: &[u8]) -> Result<ElfCore, DumpError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("core");
        std::fs::write(&p, bytes).unwrap();
        ElfCore::open(&p)
    }

    #[test]
    fn segments_and_cpu_notes_are_read() {
        let c = open(&core()).unwrap();
        assert_eq!(c.cpu_notes.len(), 1);
        assert_eq!((c.cpu_notes[0].len(), c.cpu_notes[0][439]), (440, 439u32 as u8));
        let mut b = [0u8; 4];
        c.read(GuestPhysAddr(0x1000 + 251), &mut b).unwrap();
        assert_eq!(b, [0, 1, 2, 3]);
        assert!(c.read(GuestPhysAddr(0x0), &mut b).is_err(), "below the segment is no RAM");
        assert!(c.read(GuestPhysAddr(0x3ffe), &mut b).is_err(), "past the segment's end");
    }

    #[test]
    fn malformed_cores_are_refused_with_the_reason() {
        let good = core();
        let mut not_core = good.clone();
        not_core[16] = 2;
        let mut huge_load = good.clone();
        huge_load[64 + 56 + 32..64 + 56 + 40].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let mut bad_note = good.clone();
        bad_note[64 + 2 * 56 + 4..64 + 2 * 56 + 8].copy_from_slice(&100_000u32.to_le_bytes());
        for (bytes, why) in [
            ([b"KDUMP   ".to_vec(), vec![0; 100]].concat(), "kdump-compressed"),
            (vec![1; 100], "not an ELF"),
            (good[..100].to_vec(), "past the end"),
            (good[..good.len() - 10].to_vec(), "truncated"),
            (not_core, "not a core"),
            (huge_load, "truncated"),
            (bad_note, "runs past its segment"),
        ] {
            let e = open(&bytes).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(why), "expected {why:?}: {e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn mutated_cores_never_panic(pos in 0usize..700, byte: u8) {
            let mut b = core();
            b[pos] = byte;
            if let Ok(c) = open(&b) {
                let mut buf = [0u8; 64];
                let _ = c.read(GuestPhysAddr(0x1000), &mut buf);
            }
        }
    }
}
