//! A reference as a file beside its profile (`RELEASE.reference`): gzip
//! over a small binary form, read back with every count and length bounded.
//!
//! ```text
//! "vigil-kernel-reference 1\n"
//! u32 sections, then each: u16 name length, name, u64 address, u64 length, bytes
//! u32 count and u64 addresses, for 64-bit, 32-bit and inverse 32-bit relocations
//! ```
//! All integers little-endian.

use std::io::{Read, Write};

use super::{MAX_KEPT, MAX_RELOCS, Reference, ReferenceError, Relocs, Section};

pub const FORMAT: &str = "vigil-kernel-reference 1";
/// Most sections a stored reference may have.
const MAX_SECTIONS: u32 = 256;
/// Largest stored reference, decompressed.
const MAX_STORED: u64 = MAX_KEPT + 3 * 8 * MAX_RELOCS as u64 + 64 * 1024;

/// A reference as stored: what [`Reference`] is, as bytes.
pub struct ReferenceFile;

impl ReferenceFile {
    /// The reference, compressed; refused if it is larger than one can be
    /// read back.
    pub fn write(r: &Reference) -> Result<Vec<u8>, ReferenceError> {
        let too = |what: &str| ReferenceError::Store(format!("too many {what} to store"));
        let count = |n: usize, what: &str, most: usize| {
            u32::try_from(n).ok().filter(|_| n <= most).ok_or_else(|| too(what))
        };
        let mut raw = Vec::with_capacity(usize::try_from(r.bytes()).unwrap_or(0) + 1024);
        raw.extend_from_slice(FORMAT.as_bytes());
        raw.push(b'\n');
        raw.extend_from_slice(
            &count(r.sections.len(), "sections", MAX_SECTIONS as usize)?.to_le_bytes(),
        );
        for s in &r.sections {
            let name_len =
                u16::try_from(s.name.len()).map_err(|_| too("bytes of a section name"))?;
            raw.extend_from_slice(&name_len.to_le_bytes());
            raw.extend_from_slice(s.name.as_bytes());
            raw.extend_from_slice(&s.addr.to_le_bytes());
            raw.extend_from_slice(&(s.bytes.len() as u64).to_le_bytes());
            raw.extend_from_slice(&s.bytes);
        }
        for list in [&r.relocs.abs64, &r.relocs.abs32, &r.relocs.inv32] {
            raw.extend_from_slice(&count(list.len(), "relocations", MAX_RELOCS)?.to_le_bytes());
            for a in list {
                raw.extend_from_slice(&a.to_le_bytes());
            }
        }
        if raw.len() as u64 > MAX_STORED {
            return Err(too("bytes"));
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&raw).map_err(|e| ReferenceError::Store(e.to_string()))?;
        gz.finish().map_err(|e| ReferenceError::Store(e.to_string()))
    }

    /// Reads a stored reference back, refusing what is not one.
    pub fn read(stored: &[u8]) -> Result<Reference, ReferenceError> {
        let bad = |why: String| ReferenceError::Store(why);
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(stored)
            .take(MAX_STORED + 1)
            .read_to_end(&mut raw)
            .map_err(|e| bad(format!("not a gzip stream: {e}")))?;
        if raw.len() as u64 > MAX_STORED {
            return Err(bad(format!("larger than {MAX_STORED} bytes decompressed")));
        }
        let mut c = Cursor { b: &raw, at: 0 };
        let head = c.take(FORMAT.len() + 1)?;
        if head != [FORMAT.as_bytes(), b"\n"].concat() {
            let shown = String::from_utf8_lossy(&head[..head.len().min(40)]).into_owned();
            return Err(bad(format!("starts {shown:?}, not {FORMAT:?}")));
        }
        let n = c.u32()?;
        if n > MAX_SECTIONS {
            return Err(bad(format!("{n} sections, more than {MAX_SECTIONS}")));
        }
        let mut sections = Vec::new();
        for _ in 0..n {
            let name_len = usize::from(c.u16()?);
            let name = String::from_utf8(c.take(name_len)?.to_vec())
                .map_err(|_| bad("a section name is not UTF-8".into()))?;
            let addr = c.u64()?;
            let len = usize::try_from(c.u64()?).map_err(|_| bad("a section is too long".into()))?;
            let bytes = c.take(len)?.to_vec();
            sections.push(Section { name, addr, bytes });
        }
        let mut lists = Vec::new();
        for _ in 0..3 {
            let n = c.u32()? as usize;
            if n > MAX_RELOCS {
                return Err(bad(format!("{n} relocations, more than {MAX_RELOCS}")));
            }
            let mut list = Vec::with_capacity(n.min(c.left() / 8));
            for _ in 0..n {
                list.push(c.u64()?);
            }
            lists.push(list);
        }
        if c.left() != 0 {
            return Err(bad(format!("{} bytes after its end", c.left())));
        }
        let inv32 = lists.pop().unwrap_or_default();
        let abs32 = lists.pop().unwrap_or_default();
        let abs64 = lists.pop().unwrap_or_default();
        let mut r = Reference { sections, relocs: Relocs::default() };
        if !r.sections.is_sorted_by_key(|s| s.addr)
            || r.sections.windows(2).any(|w| w[0].end() > w[1].addr)
        {
            return Err(bad("its sections are out of order or overlap".into()));
        }
        // Relocations outside the sections are dropped, as when made.
        r.relocs = Relocs {
            abs64: r.kept_relocs(abs64, 8),
            abs32: r.kept_relocs(abs32, 4),
            inv32: r.kept_relocs(inv32, 4),
        };
        Ok(r)
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ReferenceError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| {
            ReferenceError::Store(format!("cut short at byte {} ({n} more wanted)", self.at))
        })?;
        let out = &self.b[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn left(&self) -> usize {
        self.b.len() - self.at
    }

    fn u16(&mut self) -> Result<u16, ReferenceError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, ReferenceError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, ReferenceError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}
