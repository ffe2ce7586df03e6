//! The original bytes of a baseline's pages, kept beside the baseline so that
//! a later difference can be looked at byte by byte: to tell the kernel's own
//! patching from an attack, and to show what was there.
//!
//! File `<baseline>.pages`: the magic line `vigil-pages 1`, then per page its
//! virtual address (u64 LE), the length of its LZ4 block (u32 LE) and the
//! block. Written atomically; read back only when every page decompresses to
//! 4 KiB whose value is the one the baseline holds for it.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::baseline::{Baseline, BaselineError};
use super::tree;
use crate::addr::PAGE_BYTES;

const MAGIC: &[u8] = b"vigil-pages 1\n";
/// Longest compressed page accepted (LZ4's worst case for 4 KiB, rounded up).
const MAX_BLOCK: usize = 8192;
/// Most pages a file may hold.
const MAX_PAGES: usize = 1 << 20;

/// Original page bytes by virtual address, LZ4-compressed: in memory, or
/// left in the file and read when a page is asked for
/// ([`Originals::load_indexed`]).
/// Most compressed bytes of original pages held in memory for one baseline
/// (a kernel's text and rodata come to some 10 to 25 MiB): a guest mapping
/// its whole image executable would otherwise have a gigabyte kept. Pages
/// past it are kept as hashes only.
pub const MAX_HELD: usize = 96 << 20;

#[derive(Debug, Default, Clone)]
pub struct Originals {
    pages: HashMap<u64, Vec<u8>>,
    /// Compressed bytes in `pages`.
    held: usize,
    /// Most bytes `pages` may hold (`None`: [`MAX_HELD`]).
    limit: Option<usize>,
    /// Pages not kept for want of room.
    left_out: usize,
    /// For pages left in the file: where each block is, and what the page
    /// must hash to (the file is checked again at every read).
    on_disk: Option<OnDisk>,
}

#[derive(Debug, Clone)]
struct OnDisk {
    file: std::sync::Arc<std::fs::File>,
    path: String,
    index: HashMap<u64, Block>,
}

#[derive(Debug, Clone, Copy)]
struct Block {
    offset: u64,
    len: u32,
    page: u64,
    region_len: u64,
    value: [u8; 32],
}

impl Originals {
    /// Where the originals of the baseline at `baseline` are kept.
    pub fn path_for(baseline: &Path) -> PathBuf {
        baseline.with_extension("pages")
    }

    /// Originals holding at most `limit` compressed bytes in memory.
    pub fn with_limit(limit: usize) -> Self {
        Self { limit: Some(limit), ..Self::default() }
    }

    /// Keeps the page at `gva`, unless that would pass the memory limit:
    /// then it is counted as left out.
    pub fn insert(&mut self, gva: u64, bytes: &[u8]) {
        let block = lz4_flex::block::compress_prepend_size(bytes);
        let was = self.pages.get(&gva).map_or(0, Vec::len);
        if self.held - was + block.len() > self.limit.unwrap_or(MAX_HELD) {
            // Not an older original in its place either.
            if self.pages.remove(&gva).is_some() {
                self.held -= was;
            }
            self.left_out += 1;
            return;
        }
        self.held = self.held - was + block.len();
        self.pages.insert(gva, block);
    }

    /// Host memory these originals hold: the compressed pages, or the
    /// index of those left in their file.
    pub fn held_bytes(&self) -> u64 {
        use crate::memory::held;
        let on_disk = self.on_disk.as_ref().map_or(0, |d| held::map(&d.index));
        self.held as u64 + held::map(&self.pages) + on_disk
    }

    /// Pages [`Originals::insert`] left out for want of room.
    pub fn left_out(&self) -> usize {
        self.left_out
    }

    /// The original bytes of the page at `gva`.
    pub fn page(&self, gva: u64) -> Option<Vec<u8>> {
        if let Some(d) = &self.on_disk {
            return d.page(gva);
        }
        decompress_page(self.pages.get(&gva)?)
    }

    pub fn len(&self) -> usize {
        self.on_disk.as_ref().map_or(self.pages.len(), |d| d.index.len())
    }

    /// Whether the pages are left in the file (read when asked for).
    pub fn is_on_disk(&self) -> bool {
        self.on_disk.is_some()
    }

    /// Like [`Originals::load`], but keeps only an index in memory (about
    /// 60 bytes a page instead of the compressed page, some 2.3 KB): each
    /// page asked for later is read from the file, decompressed and checked
    /// against the baseline's value again (a file changed since is then
    /// treated as missing). The file is read and checked once, through the
    /// handle that is kept.
    pub fn load_indexed(path: &Path, baseline: &Baseline) -> Result<Self, BaselineError> {
        let shown = path.display().to_string();
        let (file, bytes) = read_bounded(path)?;
        let mut index = HashMap::new();
        parse(&bytes, baseline, |gva, offset, block, (page, region_len, value)| {
            let len = u32::try_from(block.len()).expect("blocks are at most MAX_BLOCK");
            index.insert(gva, Block { offset, len, page, region_len, value }).is_none()
        })
        .map_err(|reason| BaselineError::Invalid { path: shown.clone(), reason })?;
        Ok(Self {
            on_disk: Some(OnDisk { file: std::sync::Arc::new(file), path: shown, index }),
            ..Self::default()
        })
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held in memory (compressed; 0 when the pages are on disk).
    pub fn compressed_bytes(&self) -> usize {
        self.pages.values().map(Vec::len).sum()
    }

    /// Writes the file atomically (temporary file, sync, rename).
    pub fn save(&self, path: &Path) -> Result<(), BaselineError> {
        let shown = path.display().to_string();
        if let Some(d) = &self.on_disk {
            // Pages left in a file: that file already is the saved form.
            if d.path != shown {
                std::fs::copy(&d.path, path)
                    .map_err(|source| BaselineError::Write { path: shown.clone(), source })?;
            }
            return Ok(());
        }
        let werr = |source| BaselineError::Write { path: shown.clone(), source };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".vigil-pages.{}.tmp", std::process::id()));
        let mut keys: Vec<&u64> = self.pages.keys().collect();
        keys.sort();
        let mut out = Vec::with_capacity(MAGIC.len() + self.compressed_bytes() + keys.len() * 12);
        out.extend_from_slice(MAGIC);
        for k in keys {
            let block = &self.pages[k];
            out.extend_from_slice(&k.to_le_bytes());
            out.extend_from_slice(
                &u32::try_from(block.len()).expect("a compressed page").to_le_bytes(),
            );
            out.extend_from_slice(block);
        }
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(&out).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(werr(e));
        }
        Ok(())
    }

    /// Reads the originals of `baseline` from `path`, checking every page
    /// against the value the baseline holds for it.
    pub fn load(path: &Path, baseline: &Baseline) -> Result<Self, BaselineError> {
        let (_, bytes) = read_bounded(path)?;
        Self::from_bytes(&bytes, baseline)
            .map_err(|reason| BaselineError::Invalid { path: path.display().to_string(), reason })
    }

    /// Parses and checks the file's bytes against `baseline`.
    pub fn from_bytes(bytes: &[u8], baseline: &Baseline) -> Result<Self, String> {
        let mut out = Originals::default();
        parse(bytes, baseline, |gva, _, block, _| out.pages.insert(gva, block.to_vec()).is_none())?;
        out.held = out.compressed_bytes();
        Ok(out)
    }
}

/// A page from its block: the size the block states must be one page, and
/// exactly that much is decompressed (the size comes from the file, and a
/// decoder trusting it would allocate what it says: found by fuzzing).
fn decompress_page(block: &[u8]) -> Option<Vec<u8>> {
    let (size, body) = block.split_first_chunk::<4>()?;
    if u32::from_le_bytes(*size) as usize != PAGE_BYTES {
        return None;
    }
    let mut page = vec![0u8; PAGE_BYTES];
    let n = lz4_flex::block::decompress_into(body, &mut page).ok()?;
    (n == PAGE_BYTES).then_some(page)
}

/// Opens a pages file and reads it whole through that handle, refusing one
/// larger than any baseline's.
fn read_bounded(path: &Path) -> Result<(std::fs::File, Vec<u8>), BaselineError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let open = |source| BaselineError::Open { path: shown.clone(), source };
    let mut file = std::fs::File::open(path).map_err(open)?;
    let size = file.metadata().map_err(open)?.len();
    if size > (MAX_PAGES * (MAX_BLOCK + 12)) as u64 {
        return Err(BaselineError::TooLarge { path: shown, size });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.read_to_end(&mut bytes).map_err(open)?;
    Ok((file, bytes))
}

/// Walks a pages file's bytes, checking every page against `baseline`, and
/// hands each to `keep` with its block's offset in the file and what the
/// baseline says of it; `keep` returns false for a page seen before.
fn parse(
    bytes: &[u8],
    baseline: &Baseline,
    mut keep: impl FnMut(u64, u64, &[u8], (u64, u64, [u8; 32])) -> bool,
) -> Result<(), String> {
    let rest = bytes.strip_prefix(MAGIC).ok_or("not a vigil pages file (bad magic line)")?;
    let expected = expected_values(baseline);
    let mut at = 0usize;
    let mut pages = 0usize;
    while at < rest.len() {
        let head = rest
            .get(at..at + 12)
            .ok_or_else(|| format!("truncated at byte {}", at + MAGIC.len()))?;
        let gva = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
        if len > MAX_BLOCK {
            return Err(format!(
                "page {gva:#x}: a {len}-byte block is longer than any compressed page"
            ));
        }
        let block =
            rest.get(at + 12..at + 12 + len).ok_or_else(|| format!("page {gva:#x}: truncated"))?;
        let page = decompress_page(block)
            .ok_or_else(|| format!("page {gva:#x}: does not decompress to one page"))?;
        let &(index, region_len, value) = expected
            .get(&gva)
            .ok_or_else(|| format!("page {gva:#x} is in no region of the baseline"))?;
        if tree::page_value(index, &page, region_len) != value {
            return Err(format!("page {gva:#x} does not match the baseline's value for it"));
        }
        pages += 1;
        let offset = (MAGIC.len() + at + 12) as u64;
        if !keep(gva, offset, block, (index, region_len, value)) || pages > MAX_PAGES {
            return Err(format!("page {gva:#x} appears twice, or too many pages"));
        }
        at += 12 + len;
    }
    Ok(())
}

/// Each baseline page's (index in its region, region length, value), by address.
fn expected_values(baseline: &Baseline) -> HashMap<u64, (u64, u64, [u8; 32])> {
    baseline
        .regions
        .iter()
        .flat_map(|r| {
            r.pages.iter().zip(0u64..).map(move |(p, i)| (p.gva.raw(), (i, r.bytes, p.value)))
        })
        .collect()
}

impl OnDisk {
    fn page(&self, gva: u64) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let b = self.index.get(&gva)?;
        let mut block = vec![0u8; b.len as usize];
        self.file.read_exact_at(&mut block, b.offset).ok()?;
        let page = decompress_page(&block)?;
        (tree::page_value(b.page, &page, b.region_len) == b.value).then_some(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::baseline::tests::{Fake, TEXT_VA};

    fn taken() -> (Baseline, Originals) {
        let f = Fake::new();
        let domain = crate::integrity::baseline::DomainId { name: "fake".into(), uuid: "u".into() };
        Baseline::build_keeping(
            &f.mem,
            domain,
            f.identification(),
            Fake::registers(),
            &f,
            &f.regions(),
        )
        .unwrap()
    }

    #[test]
    fn every_page_is_kept_and_read_back_checked() {
        let (b, o) = taken();
        assert_eq!(o.len(), 6);
        let f = Fake::new();
        let mut page = vec![0u8; PAGE_BYTES];
        crate::memory::GuestMemory::read(&f.mem, crate::addr::GuestPhysAddr(0x3000), &mut page)
            .unwrap();
        assert_eq!(o.page(TEXT_VA + 0x1000).unwrap(), page);
        let dir = tempfile::tempdir().unwrap();
        let path = Originals::path_for(&dir.path().join("x.json"));
        assert!(path.ends_with("x.pages"));
        o.save(&path).unwrap();
        let back = Originals::load(&path, &b).unwrap();
        assert_eq!(back.page(TEXT_VA + 0x1000).unwrap(), page);
    }

    #[test]
    fn pages_left_on_disk_read_the_same_and_are_checked_again() {
        let (b, o) = taken();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pages");
        o.save(&path).unwrap();
        let d = Originals::load_indexed(&path, &b).unwrap();
        assert!(d.is_on_disk() && d.compressed_bytes() == 0);
        assert_eq!(d.len(), o.len());
        for p in b.regions.iter().flat_map(|r| &r.pages) {
            assert_eq!(d.page(p.gva.raw()), o.page(p.gva.raw()));
        }
        assert_eq!(d.page(0x1234_5000), None);
        // Saving elsewhere copies the file; the copy loads.
        let copy = dir.path().join("y.pages");
        d.save(&copy).unwrap();
        assert!(Originals::load(&copy, &b).is_ok());
        // A file changed after loading: its pages are no longer believed.
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - 2] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let changed = b
            .regions
            .iter()
            .flat_map(|r| &r.pages)
            .filter(|p| d.page(p.gva.raw()).is_none())
            .count();
        assert!(changed >= 1);
    }

    #[test]
    fn a_file_that_does_not_match_the_baseline_is_refused() {
        let (b, o) = taken();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.pages");
        o.save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        // Another page's bytes under a page's address.
        let mut other = Originals::default();
        other.insert(TEXT_VA, &[7u8; PAGE_BYTES]);
        other.save(&path).unwrap();
        let e = Originals::load(&path, &b).unwrap_err().to_string();
        assert!(e.contains("does not match the baseline"), "{e}");
        for (bytes, why) in [
            (b"not pages".to_vec(), "bad magic"),
            (good[..good.len() - 3].to_vec(), "truncated"),
            ([good.clone(), vec![1, 2, 3]].concat(), "truncated"),
        ] {
            let e = Originals::from_bytes(&bytes, &b).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        // Found by the originals fuzz target: a block stating a 4 GiB page
        // made the decoder allocate 4 GiB. This pins the refusal; the fuzz
        // target's allocation limit is what would see the allocation again.
        let mut huge = good.clone();
        let first_block = b"vigil-pages 1\n".len() + 12;
        huge[first_block..first_block + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = Originals::from_bytes(&huge, &b).unwrap_err();
        assert!(e.contains("does not decompress to one page"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn mutated_files_never_panic(pos in 0usize..100_000, byte: u8) {
            let (b, o) = taken();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.pages");
            o.save(&path).unwrap();
            let mut bytes = std::fs::read(&path).unwrap();
            let i = pos % bytes.len();
            bytes[i] = byte;
            let _ = Originals::from_bytes(&bytes, &b);
        }
    }

    /// Original pages held in memory are bounded: past the limit a page is
    /// left out (counted), and what is held never passes it.
    #[test]
    fn originals_held_in_memory_are_bounded() {
        // Pages that do not compress: each block a little over 4 KiB.
        let page = |i: u64| -> Vec<u8> {
            let mut h = blake3::Hasher::new();
            h.update(&i.to_le_bytes());
            let mut out = vec![0u8; 4096];
            h.finalize_xof().fill(&mut out);
            out
        };
        let mut o = Originals::with_limit(10 * 4096);
        for i in 0..20u64 {
            o.insert(0x1000 * i, &page(i));
        }
        assert!(o.compressed_bytes() <= 10 * 4096, "{}", o.compressed_bytes());
        assert_eq!(o.len() + o.left_out(), 20);
        assert!(o.left_out() >= 10, "{}", o.left_out());
        assert_eq!(o.page(0), Some(page(0)), "the first pages kept whole");
        assert_eq!(o.page(0x1000 * 19), None, "the last left out");
        // A page kept again takes its own room, not more.
        let before = o.compressed_bytes();
        o.insert(0, &page(0));
        assert_eq!(o.compressed_bytes(), before);
    }
}
