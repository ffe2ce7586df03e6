//! What the benchmarks share: the lab guest `lab/capture.sh` captured, and
//! in-process guests made of copies of its memory (no libvirt, no QEMU), so
//! that a hundred of them fit on one machine.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vigil::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_BYTES};
use vigil::integrity::Baseline;
use vigil::integrity::baseline::Run;
use vigil::memory::{ElfCore, GuestMemory, MemoryError, RamLayout};
use vigil::watch::{Guest, GuestError};
use vigil::x86::VcpuRegisters;

pub mod paired;

/// A lab guest as `lab/capture.sh` left it.
pub struct Capture {
    pub dir: PathBuf,
    pub baseline_path: PathBuf,
    pub baseline: Baseline,
    pub core: ElfCore,
    /// Every page a full check hashes: (virtual, physical).
    pub pages: Vec<(GuestVirtAddr, GuestPhysAddr)>,
    /// The same pages' bytes, one after the other, in this process.
    pub image: Vec<u8>,
}

impl Capture {
    /// Loads the capture from `$VIGIL_CAPTURE` or `/var/lib/vigil-lab/capture`;
    /// panics saying how to make one when it is missing.
    pub fn load() -> Capture {
        let dir = std::env::var_os("VIGIL_CAPTURE")
            .map_or_else(|| PathBuf::from("/var/lib/vigil-lab/capture"), PathBuf::from);
        let missing = |what: &str| -> ! {
            panic!(
                "{}: {what} missing: run lab/capture.sh first (as root; it boots a lab guest) or set VIGIL_CAPTURE",
                dir.display()
            )
        };
        let baseline_path = std::fs::read_dir(dir.join("baselines"))
            .unwrap_or_else(|_| missing("baselines/"))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "json"))
            .unwrap_or_else(|| missing("baselines/*.json"));
        let baseline = Baseline::load(&baseline_path).unwrap();
        let core = ElfCore::open(&dir.join("guest.core")).unwrap_or_else(|_| missing("guest.core"));
        let pages: Vec<_> =
            baseline.regions.iter().flat_map(|r| r.pages.iter().map(|p| (p.gva, p.gpa))).collect();
        let mut image = vec![0u8; pages.len() * PAGE_BYTES];
        for ((_, gpa), buf) in pages.iter().zip(image.chunks_exact_mut(PAGE_BYTES)) {
            core.read(*gpa, buf).unwrap();
        }
        Capture { dir, baseline_path, baseline, core, pages, image }
    }

    pub fn bytes(&self) -> u64 {
        self.image.len() as u64
    }
}

/// The captured RAM in memfds, one per RAM block, as QEMU keeps a guest's
/// RAM: the source of every in-process guest's copy.
pub struct RamFiles {
    pub layout: RamLayout,
    /// Block name, memfd, length.
    pub blocks: Vec<(String, File, u64)>,
}

impl RamFiles {
    pub fn new(core: &ElfCore) -> RamFiles {
        let layout = core.layout().clone();
        let mut ends: BTreeMap<String, u64> = BTreeMap::new();
        for r in layout.ranges() {
            let e = ends.entry(r.block.clone()).or_default();
            *e = (*e).max(r.block_offset + r.len);
        }
        let mut blocks = Vec::new();
        for (name, len) in ends {
            // SAFETY: a NUL-terminated name and no flags; the result is checked.
            let fd = unsafe { libc::memfd_create(c"vigil-bench-ram".as_ptr(), 0) };
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a new descriptor that nothing else owns.
            let file = unsafe { File::from_raw_fd(fd) };
            file.set_len(len).unwrap();
            let mut at = Vec::new();
            for r in layout.ranges().iter().filter(|r| r.block == name) {
                let mut buf = vec![0u8; usize::try_from(r.len).unwrap()];
                core.read(r.start, &mut buf).unwrap();
                at.push((r.block_offset, buf));
            }
            for (off, buf) in at {
                std::os::unix::fs::FileExt::write_all_at(&file, &buf, off).unwrap();
            }
            blocks.push((name, file, len));
        }
        RamFiles { layout, blocks }
    }

    /// A private copy-on-write mapping of the RAM: reads share the pages
    /// with every other copy; a write (a poke) copies only its page.
    pub fn copy(&self) -> Arc<RamCopy> {
        let blocks = self
            .blocks
            .iter()
            .map(|(name, file, _)| {
                // SAFETY: the memfd is this process's own and is never
                // truncated; the private mapping sees writes only through
                // `RamCopy::poke`.
                let map = unsafe { memmap2::MmapOptions::new().map_copy(file) }.unwrap();
                (name.clone(), memmap2::MmapRaw::from(map))
            })
            .collect();
        Arc::new(RamCopy { layout: self.layout.clone(), blocks })
    }
}

/// One in-process guest's RAM.
pub struct RamCopy {
    layout: RamLayout,
    blocks: Vec<(String, memmap2::MmapRaw)>,
}

impl RamCopy {
    fn place(&self, start: GuestPhysAddr, len: u64) -> Option<*mut u8> {
        let r = self.layout.find(start, len)?;
        let (_, map) = self.blocks.iter().find(|(n, _)| *n == r.block)?;
        let off = usize::try_from(r.block_offset + (start.raw() - r.start.raw())).ok()?;
        let end = off.checked_add(usize::try_from(len).ok()?)?;
        // SAFETY: `off` lies inside the mapping (checked just below with
        // `end`), so the pointer stays in one allocation.
        (end <= map.len()).then(|| unsafe { map.as_mut_ptr().add(off) })
    }

    /// Writes one byte, as the guest would. Call only while no check runs.
    pub fn poke(&self, at: GuestPhysAddr, byte: u8) -> u8 {
        let p = self.place(at, 1).expect("poke inside RAM");
        // SAFETY: `p` is inside the mapping; the benchmark pokes only
        // between checks, so no slice of this page is alive.
        unsafe {
            let old = p.read_volatile();
            p.write_volatile(byte);
            old
        }
    }
}

impl GuestMemory for RamCopy {
    fn read(&self, start: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = buf.len() as u64;
        let p = self.place(start, len).ok_or(MemoryError::NotRam { start, len })?;
        // SAFETY: `place` checked the range lies inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    fn slice(&self, start: GuestPhysAddr, len: u64) -> Option<&[u8]> {
        let p = self.place(start, len)?;
        // SAFETY: inside the mapping, which lives as long as `self`; it is
        // written only by `poke`, between checks.
        Some(unsafe { std::slice::from_raw_parts(p, usize::try_from(len).ok()?) })
    }

    fn layout(&self) -> &RamLayout {
        &self.layout
    }

    fn kind(&self) -> &'static str {
        "bench-copy"
    }
}

/// A guest of the fleet: a name, the captured registers and a RAM copy.
pub struct FleetGuest {
    pub name: String,
    pub uuid: String,
    pub registers: Vec<VcpuRegisters>,
    pub ram: Arc<RamCopy>,
}

impl Guest for FleetGuest {
    fn name(&self) -> &str {
        &self.name
    }
    fn uuid(&self) -> &str {
        &self.uuid
    }
    fn ensure_running(&self) -> Result<(), GuestError> {
        Ok(())
    }
    fn registers(&self) -> Result<Vec<VcpuRegisters>, GuestError> {
        Ok(self.registers.clone())
    }
    /// The benchmark's own process runs every bench guest, for as long as
    /// it lives: one run each, never reset.
    fn run(&self) -> Result<Run, GuestError> {
        Ok(Run {
            host_booted: 0,
            incoming: false,
            ticks_per_second: 100,
            pid: i32::try_from(std::process::id()).unwrap_or(0),
            started: 0,
        })
    }
    fn open_memory(&self) -> Result<Box<dyn GuestMemory + Send + Sync>, GuestError> {
        Ok(Box::new(self.ram.clone()))
    }
    fn memory_bytes(&self) -> Result<u64, GuestError> {
        Ok(self.ram.layout().total())
    }
    fn dump_memory(&self, _: &Path) -> Result<(), GuestError> {
        Err(GuestError::Memory(format!("{}: a bench guest has no memory dump", self.name).into()))
    }
}

/// The number after `name` on the command line, or `default` when `name`
/// is not given. A value missing or not a whole number stops the
/// benchmark: an hour's run on a default nobody asked for is an hour lost.
pub fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    number_after(&args, name, default).unwrap_or_else(|e| panic!("{e}"))
}

fn number_after(args: &[String], name: &str, default: u64) -> Result<u64, String> {
    let Some(i) = args.iter().position(|a| a == name) else { return Ok(default) };
    match args.get(i + 1) {
        Some(v) => v.parse().map_err(|_| format!("{name} {v}: give a whole number")),
        None => Err(format!("{name} needs a whole number after it")),
    }
}

/// The word after `name` on the command line, one of `choices`; the first
/// of them when `name` is not given. Any other word stops the benchmark.
pub fn choice(name: &str, choices: &[&'static str]) -> &'static str {
    let args: Vec<String> = std::env::args().collect();
    word_after(&args, name, choices).unwrap_or_else(|e| panic!("{e}"))
}

fn word_after(
    args: &[String],
    name: &str,
    choices: &[&'static str],
) -> Result<&'static str, String> {
    let Some(i) = args.iter().position(|a| a == name) else { return Ok(choices[0]) };
    let given = args.get(i + 1).map_or("", String::as_str);
    let known = choices.iter().find(|c| **c == given).copied();
    known.ok_or_else(|| format!("{name} {given}: give one of {}", choices.join(", ")))
}

/// What a benchmark run by hand does before it reads its flags. `--list`
/// (criterion's protocol, which `cargo bench` uses to enumerate) and
/// `--help` (`-h`) end the run: the latter prints `source`'s leading `//!`
/// lines, the benchmark's own description. A flag not in `known` stops the
/// run, so that a misspelt `--round 400` does not run the default 8.
/// Returns whether to go on.
pub fn start(source: &str, known: &[&str]) -> bool {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return false;
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", description(source));
        return false;
    }
    if let Some(unknown) = unknown_flag(&args, known) {
        panic!("{unknown}: not a flag of this benchmark (--help lists them)");
    }
    true
}

fn description(source: &str) -> String {
    let doc = source.lines().map_while(|l| l.strip_prefix("//!"));
    doc.map(|l| l.strip_prefix(' ').unwrap_or(l)).collect::<Vec<_>>().join("\n")
}

/// The first argument that looks like a flag and is neither in `known` nor
/// `--bench`, which cargo adds.
fn unknown_flag(args: &[String], known: &[&str]) -> Option<String> {
    let mut flags = args.iter().skip(1).filter(|a| a.starts_with("--"));
    flags.find(|a| *a != "--bench" && !known.contains(&a.as_str())).cloned()
}

/// Median and other percentiles of `v` (sorted in place).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // 0 <= p <= 1
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn a_flag_takes_its_number_or_the_default_when_absent() {
        let a = args("bench --bench --rounds 400 --blocks 2");
        assert_eq!(number_after(&a, "--rounds", 8), Ok(400));
        assert_eq!(number_after(&a, "--blocks", 0), Ok(2));
        assert_eq!(number_after(&a, "--per-second", 1), Ok(1));
    }

    #[test]
    fn a_bad_or_missing_number_is_refused_by_name() {
        let e = number_after(&args("bench --rounds four"), "--rounds", 8).unwrap_err();
        assert!(e.contains("--rounds four"), "{e}");
        let e = number_after(&args("bench --rounds"), "--rounds", 8).unwrap_err();
        assert!(e.contains("--rounds needs"), "{e}");
        assert!(number_after(&args("bench --rounds -3"), "--rounds", 8).is_err());
    }

    #[test]
    fn a_word_flag_takes_one_of_its_choices() {
        let choices = ["grind", "shell"];
        assert_eq!(word_after(&args("bench --blocks 2"), "--workload", &choices), Ok("grind"));
        assert_eq!(
            word_after(&args("bench --workload shell"), "--workload", &choices),
            Ok("shell")
        );
        let e = word_after(&args("bench --workload sh"), "--workload", &choices).unwrap_err();
        assert_eq!(e, "--workload sh: give one of grind, shell");
        assert!(word_after(&args("bench --workload"), "--workload", &choices).is_err());
    }

    #[test]
    fn an_unknown_flag_is_named_and_cargo_s_own_passes() {
        let known = ["--rounds", "--record"];
        assert_eq!(unknown_flag(&args("bench --bench --rounds 4 --record f"), &known), None);
        let a = args("bench --bench --round 400");
        assert_eq!(unknown_flag(&a, &known).as_deref(), Some("--round"));
    }

    #[test]
    fn the_description_is_the_leading_doc_comment() {
        let src = "//! First line.\n//!\n//!   indented\nuse x;\n//! not this\n";
        assert_eq!(description(src), "First line.\n\n  indented");
    }
}
