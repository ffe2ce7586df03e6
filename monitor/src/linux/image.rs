//! Vendor kernel images: from a `vmlinuz` (x86 bzImage) to the `vmlinux` ELF
//! inside it, whichever of gzip, xz, LZ4 (legacy frames) or zstd compressed it.
//!
//! ```text
//!  vmlinuz:  [ real-mode setup: (setup_sects + 1) * 512 bytes ][ protected-mode part ........ ]
//!                         header at 0x1f1: setup_sects,          payload_offset/length (0x248/0x24c)
//!                         "HdrS" at 0x202, version at 0x206      point into the protected-mode part
//! ```
//!
//! The image is trusted input (the vendor's file) but it is still parsed as
//! hostile: every offset is checked and the output is bounded.

use std::io::{Read, Write};

/// Largest decompressed kernel accepted.
pub const MAX_VMLINUX: usize = 512 << 20;
/// An LZ4 legacy frame's blocks decompress to 8 MiB each at most.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("not a bzImage: {0}")]
    NotBzImage(String),
    #[error("payload compressed with an unsupported method (starts {0})")]
    Unsupported(String),
    #[error("{method} payload is corrupt: {reason}")]
    Corrupt { method: &'static str, reason: String },
    #[error("the decompressed kernel is larger than {MAX_VMLINUX} bytes")]
    TooLarge,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..off + 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The compressed payload of a bzImage.
pub fn payload(image: &[u8]) -> Result<&[u8], ImageError> {
    let bad = |r: &str| ImageError::NotBzImage(r.to_owned());
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err(bad("no \"HdrS\" boot header at 0x202"));
    }
    let version = u16_at(image, 0x206).ok_or_else(|| bad("truncated header"))?;
    if version < 0x208 {
        return Err(bad(&format!("boot protocol {version:#x} predates payload fields (2.08)")));
    }
    let setup_sects = match image.get(0x1f1).copied().ok_or_else(|| bad("truncated header"))? {
        0 => 4,
        n => usize::from(n),
    };
    let pm = (setup_sects + 1) * 512;
    let off = u32_at(image, 0x248).ok_or_else(|| bad("truncated header"))? as usize;
    let len = u32_at(image, 0x24c).ok_or_else(|| bad("truncated header"))? as usize;
    let start = pm.checked_add(off).ok_or_else(|| bad("payload offset overflows"))?;
    let end = start.checked_add(len).ok_or_else(|| bad("payload length overflows"))?;
    image
        .get(start..end)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| bad("payload lies outside the file"))
}

/// A writer that refuses to grow past [`MAX_VMLINUX`].
struct Bounded(Vec<u8>);

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_VMLINUX {
            return Err(std::io::Error::other("output limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn read_bounded(mut r: impl Read, method: &'static str) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_VMLINUX as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ImageError::Corrupt { method, reason: e.to_string() })?;
    if n > MAX_VMLINUX {
        return Err(ImageError::TooLarge);
    }
    Ok(out)
}

fn lz4_legacy(data: &[u8]) -> Result<Vec<u8>, ImageError> {
    let corrupt = |r: String| ImageError::Corrupt { method: "lz4", reason: r };
    let mut out = Vec::new();
    let mut pos = 4; // past the magic
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while pos + 4 <= data.len() {
        let size = u32_at(data, pos).expect("checked") as usize;
        if data[pos..pos + 4] == LZ4_LEGACY_MAGIC {
            pos += 4; // concatenated frames
            continue;
        }
        if size == 0 || pos + 4 + size > data.len() {
            break; // the kernel's 4-byte size trailer, or the end
        }
        let n = lz4_flex::block::decompress_into(&data[pos + 4..pos + 4 + size], &mut block)
            .map_err(|e| corrupt(format!("block at {pos:#x}: {e}")))?;
        if out.len() + n > MAX_VMLINUX {
            return Err(ImageError::TooLarge);
        }
        out.extend_from_slice(&block[..n]);
        pos += 4 + size;
    }
    if out.is_empty() {
        return Err(corrupt("no blocks".into()));
    }
    Ok(out)
}

/// Runs a third-party decoder so that a panic inside it (lzma-rs 0.3.0
/// overflows on some xz footers, for one) becomes a corrupt-payload error
/// rather than taking the daemon's task down with it.
fn contained<T>(
    method: &'static str,
    decode: impl FnOnce() -> Result<T, ImageError>,
) -> Result<T, ImageError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).unwrap_or_else(|panic| {
        let what = crate::panic_message(&*panic);
        Err(ImageError::Corrupt { method, reason: format!("the decoder panicked ({what})") })
    })
}

/// Decompresses a payload by its magic; an ELF is returned as it is.
pub fn decompress(payload: &[u8]) -> Result<(Vec<u8>, &'static str), ImageError> {
    let head = |n: usize| payload.get(..n).unwrap_or(payload);
    if head(4) == b"\x7fELF" {
        return Ok((payload.to_vec(), "none"));
    }
    if head(2) == [0x1f, 0x8b] {
        let out =
            contained("gzip", || read_bounded(flate2::read::GzDecoder::new(payload), "gzip"))?;
        return Ok((out, "gzip"));
    }
    if head(6) == [0xfd, b'7', b'z', b'X', b'Z', 0] {
        return contained("xz", || {
            let mut out = Bounded(Vec::new());
            let mut input = std::io::BufReader::new(payload);
            match lzma_rs::xz_decompress(&mut input, &mut out) {
                Ok(()) => {}
                Err(lzma_rs::error::Error::IoError(e)) if e.to_string() == "output limit" => {
                    return Err(ImageError::TooLarge);
                }
                // The kernel appends 4 bytes of size after the xz stream.
                Err(_) if !out.0.is_empty() => {}
                Err(e) => return Err(ImageError::Corrupt { method: "xz", reason: e.to_string() }),
            }
            Ok((out.0, "xz"))
        });
    }
    if head(4) == LZ4_LEGACY_MAGIC {
        return Ok((contained("lz4", || lz4_legacy(payload))?, "lz4"));
    }
    if head(4) == [0x28, 0xb5, 0x2f, 0xfd] {
        let out = contained("zstd", || {
            let dec = ruzstd::decoding::StreamingDecoder::new(payload)
                .map_err(|e| ImageError::Corrupt { method: "zstd", reason: e.to_string() })?;
            read_bounded(dec, "zstd")
        })?;
        return Ok((out, "zstd"));
    }
    let hex: String = head(6).iter().map(|b| format!("{b:02x}")).collect();
    Err(ImageError::Unsupported(hex))
}

/// The vmlinux ELF of a vmlinuz (or of a vmlinux, returned as it is), and
/// the compression it had.
pub fn vmlinux(image: &[u8]) -> Result<(Vec<u8>, &'static str), ImageError> {
    if image.starts_with(b"\x7fELF") {
        return Ok((image.to_vec(), "none"));
    }
    let (out, method) = decompress(payload(image)?)?;
    if !out.starts_with(b"\x7fELF") {
        return Err(ImageError::Corrupt {
            method,
            reason: "the payload is not an ELF file".into(),
        });
    }
    Ok((out, method))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn elf_like(n: usize) -> Vec<u8> {
        let mut v = b"\x7fELF".to_vec();
        v.extend((0..n).map(|i| (i % 7) as u8 * (i % 13) as u8));
        v
    }

    /// A minimal bzImage around `payload`.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512];
        img[0x1f1] = 4;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&0x100u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend(vec![0u8; 0x100]);
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn every_supported_method_round_trips() {
        let elf = elf_like(300_000);
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(&elf).unwrap();
            e.finish().unwrap()
        };
        let xz = {
            let mut out = Vec::new();
            lzma_rs::xz_compress(&mut std::io::BufReader::new(&elf[..]), &mut out).unwrap();
            out.extend_from_slice(&(elf.len() as u32).to_le_bytes()); // the kernel's trailer
            out
        };
        let zst = ruzstd::encoding::compress_to_vec(
            &elf[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let lz4 = {
            let mut out = LZ4_LEGACY_MAGIC.to_vec();
            for chunk in elf.chunks(LZ4_LEGACY_BLOCK / 64) {
                let c = lz4_flex::block::compress(chunk);
                out.extend_from_slice(&(c.len() as u32).to_le_bytes());
                out.extend_from_slice(&c);
            }
            out.extend_from_slice(&(elf.len() as u32).to_le_bytes());
            out
        };
        for (payload, method) in [(gz, "gzip"), (xz, "xz"), (zst, "zstd"), (lz4, "lz4")] {
            let (out, m) = vmlinux(&bzimage(&payload)).unwrap();
            assert_eq!(m, method);
            assert_eq!(out, elf, "{method}");
        }
        assert_eq!(vmlinux(&elf).unwrap().1, "none");
    }

    #[test]
    fn malformed_images_are_refused() {
        assert!(matches!(vmlinux(b""), Err(ImageError::NotBzImage(_))));
        assert!(matches!(vmlinux(&[0u8; 4096]), Err(ImageError::NotBzImage(_))));
        let mut img = bzimage(b"BZh91AY&SY");
        assert!(matches!(vmlinux(&img), Err(ImageError::Unsupported(_))));
        // Payload pointing past the end.
        img[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(vmlinux(&img), Err(ImageError::NotBzImage(_))));
        // Truncated and garbled compressed data.
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&elf_like(10_000)).unwrap();
        let gz = e.finish().unwrap();
        assert!(vmlinux(&bzimage(&gz[..gz.len() / 2])).is_err());
        let mut lz4 = LZ4_LEGACY_MAGIC.to_vec();
        lz4.extend_from_slice(&16u32.to_le_bytes());
        lz4.extend_from_slice(&[0xff; 16]);
        assert!(vmlinux(&bzimage(&lz4)).is_err());
        // A payload that is not an ELF.
        let zst = ruzstd::encoding::compress_to_vec(
            &b"not an elf"[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert!(matches!(vmlinux(&bzimage(&zst)), Err(ImageError::Corrupt { .. })));
    }

    /// Found by the kernel_image fuzz target: an xz footer whose backward
    /// size is `u32::MAX`, on which lzma-rs 0.3.0 adds with overflow (a
    /// panic where overflow checks are on, as in tests and fuzzing).
    #[test]
    fn a_decoder_panic_is_a_corrupt_payload() {
        let input =
            include_bytes!("../../../fuzz/regressions/kernel_image/lzma-rs-xz-add-overflow.bin");
        match decompress(input) {
            Err(ImageError::Corrupt { method: "xz", .. }) => {}
            other => panic!("expected a corrupt xz payload, got {other:?}"),
        }
        assert!(vmlinux(&bzimage(input)).is_err());
        let caught = contained("test", || -> Result<(), ImageError> { panic!("inside") });
        assert_eq!(
            caught,
            Err(ImageError::Corrupt {
                method: "test",
                reason: "the decoder panicked (inside)".into()
            })
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2000), magic in 0usize..5) {
            let magics: [&[u8]; 5] = [b"\x1f\x8b", b"\xfd7zXZ\0", &LZ4_LEGACY_MAGIC, b"\x28\xb5\x2f\xfd", b""];
            let mut p = magics[magic].to_vec();
            p.extend(bytes);
            let _ = vmlinux(&bzimage(&p));
        }
    }
}
