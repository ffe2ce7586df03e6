//! The hot path against references measured in the same run, over a real
//! lab guest captured by `lab/capture.sh` (see `benches/README.md`).
//!
//!   lab/capture.sh && cargo bench -p vigil-bench --bench hotpath
//!
//! Criterion measures every method; the table at the end gives each one's
//! median throughput and its ratio to its reference (method time over
//! reference time, inverted: 1.0 is as fast as the reference).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use sha2::Digest;
use vigil::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use vigil::integrity::check::{Scope, check_tagged, region_hash};
use vigil::integrity::nh::{Key, Tag};
use vigil::integrity::tags::untagged_or_changed;
use vigil::integrity::tree;
use vigil::memory::{BlockMapping, GuestMemory, ProcessRam, SharedRam};
use vigil::x86::{PagingMode, Walker};
use vigil_bench::{Capture, RamFiles, percentile};

const PAGE: usize = vigil::addr::PAGE_BYTES;
/// Pages per `read_many` batch, as the engine reads.
const BATCH: usize = 64;

/// Per-iteration times of every method, by name, from criterion's own runs.
static TIMES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Times `f` for criterion and keeps the per-iteration times for the table.
fn measure(c: &mut Criterion, group: &str, name: &str, bytes: u64, mut f: impl FnMut()) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            let e = t.elapsed();
            TIMES
                .lock()
                .unwrap()
                .entry(format!("{group}/{name}"))
                .or_default()
                .push(e.as_secs_f64() / iters as f64);
            e
        });
    });
    g.finish();
}

/// The captured RAM in a shared memfd mapping of this process, as QEMU
/// keeps a guest's RAM, opened through both of vigil's live sources.
struct Ram {
    shared: SharedRam,
    process: ProcessRam,
    _maps: Vec<memmap2::MmapMut>,
}

impl Ram {
    fn new(files: &RamFiles) -> Ram {
        let (mut blocks, mut maps) = (Vec::new(), Vec::new());
        for (name, file, len) in &files.blocks {
            // SAFETY: a shared mapping of this process's own memfd, which
            // nothing truncates while the benchmark runs.
            let map = unsafe { memmap2::MmapMut::map_mut(file) }.unwrap();
            blocks.push(BlockMapping {
                name: name.clone(),
                host_addr: map.as_ptr() as u64,
                len: *len,
            });
            maps.push(map);
        }
        let pid = i32::try_from(std::process::id()).unwrap();
        Ram {
            shared: SharedRam::open(pid, files.layout.clone(), &blocks).unwrap(),
            process: ProcessRam::new(pid, files.layout.clone(), blocks).unwrap(),
            _maps: maps,
        }
    }
}

/// Reads every page through `mem` in batches, handing each to `f`.
fn read_all<M: GuestMemory + ?Sized>(
    mem: &M,
    pages: &[(GuestVirtAddr, GuestPhysAddr)],
    bufs: &mut [[u8; PAGE]],
    mut f: impl FnMut(usize, &[u8; PAGE]),
) {
    let mut i = 0;
    for batch in pages.chunks(BATCH) {
        let mut reads: Vec<(GuestPhysAddr, &mut [u8])> =
            batch.iter().zip(bufs.iter_mut()).map(|(&(_, gpa), b)| (gpa, &mut b[..])).collect();
        mem.read_many(&mut reads).unwrap();
        for b in bufs.iter().take(batch.len()) {
            f(i, b);
            i += 1;
        }
    }
}

/// The reference for verification: touching every byte once, as fast as
/// the machine reads (a wide add over the words, with AVX2 where the CPU
/// has it, as the NH engine uses).
fn plain_read(bytes: &[u8]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { plain_read_avx2(bytes) };
    }
    plain_read_words(bytes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn plain_read_avx2(bytes: &[u8]) -> u64 {
    plain_read_words(bytes)
}

#[inline(always)]
fn plain_read_words(bytes: &[u8]) -> u64 {
    let mut acc = [0u64; 8];
    for c in bytes.chunks_exact(64) {
        for (a, w) in acc.iter_mut().zip(c.chunks_exact(8)) {
            *a = a.wrapping_add(u64::from_le_bytes(w.try_into().unwrap()));
        }
    }
    acc.iter().fold(0, |x, &y| x.wrapping_add(y))
}

fn tags_of(key: &Key, image: &[u8]) -> Vec<Tag> {
    image.chunks_exact(PAGE).map(|p| key.tag(p.try_into().unwrap())).collect()
}

fn main() {
    let cap = Capture::load();
    let ram = Ram::new(&RamFiles::new(&cap.core));
    let bytes = cap.bytes();
    let n = cap.pages.len();
    let mut c = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    // Sources: the protected set read into page buffers, as the engine reads.
    let mut bufs = vec![[0u8; PAGE]; BATCH];
    let in_process_copy = || {
        for (chunk, batch) in cap.image.chunks(BATCH * PAGE).zip(0..) {
            for (src, dst) in chunk.chunks_exact(PAGE).zip(bufs.iter_mut()) {
                dst.copy_from_slice(src);
            }
            black_box((&bufs, batch));
        }
    };
    let mut bufs3 = vec![[0u8; PAGE]; BATCH];
    let mut source_read = |source: &dyn GuestMemory| {
        read_all(source, &cap.pages, &mut bufs3, |_, b| {
            black_box(b);
        });
    };
    measure(&mut c, "sources", "reference-in-process-copy", bytes, in_process_copy);
    measure(&mut c, "sources", "shared-mapping", bytes, || source_read(&ram.shared));
    measure(&mut c, "sources", "process-vm-readv", bytes, || source_read(&ram.process));
    let mut bufs2 = vec![[0u8; PAGE]; BATCH];

    // Verification of the protected set in steady state.
    let key = Key::random().unwrap();
    let tags = tags_of(&key, &cap.image);
    let values: Vec<_> = cap
        .image
        .chunks_exact(PAGE)
        .enumerate()
        .map(|(i, p)| tree::page_value(i as u64, p, bytes))
        .collect();
    let sip = std::hash::RandomState::new();
    let sips: Vec<u64> =
        cap.image.chunks_exact(PAGE).map(|p| std::hash::BuildHasher::hash_one(&sip, p)).collect();
    let shas: Vec<[u8; 32]> =
        cap.image.chunks_exact(PAGE).map(|p| sha2::Sha256::digest(p).into()).collect();
    let plain = || {
        black_box(plain_read(black_box(&cap.image)));
    };
    measure(&mut c, "verify", "reference-plain-read", bytes, plain);
    measure(&mut c, "verify", "blake3-whole-buffer", bytes, || {
        black_box(blake3::hash(black_box(&cap.image)));
    });
    measure(&mut c, "verify", "blake3-per-page", bytes, || {
        let bad = cap
            .image
            .chunks_exact(PAGE)
            .zip(&values)
            .enumerate()
            .filter(|(i, (p, v))| tree::page_value(*i as u64, p, bytes) != **v)
            .count();
        assert_eq!(bad, 0);
    });
    measure(&mut c, "verify", "sha256-per-page", bytes, || {
        let bad = cap
            .image
            .chunks_exact(PAGE)
            .zip(&shas)
            .filter(|(p, s)| <[u8; 32]>::from(sha2::Sha256::digest(p)) != **s)
            .count();
        assert_eq!(bad, 0);
    });
    measure(&mut c, "verify", "siphash13-per-page", bytes, || {
        let bad = cap
            .image
            .chunks_exact(PAGE)
            .zip(&sips)
            .filter(|(p, s)| std::hash::BuildHasher::hash_one(&sip, p) != **s)
            .count();
        assert_eq!(bad, 0);
    });
    let in_process: Vec<&[u8; PAGE]> =
        cap.image.chunks_exact(PAGE).map(|p| p.try_into().unwrap()).collect();
    let regs = cap.baseline.registers.clone();
    let none = vigil::integrity::Originals::default();
    let view = vigil::linux::discover(&ram.shared, &regs).unwrap();
    let (page_tags, from) = vigil::integrity::tags::PageTags::build(
        key.clone(),
        &cap.baseline,
        &ram.shared,
        &view,
        &none,
    );
    assert_eq!(from.unknown, 0, "the capture differs from its baseline: run lab/capture.sh again");
    drop(view);
    measure(&mut c, "verify", "nh-tags-in-process", bytes, || {
        let bad = in_process.iter().zip(&tags).filter(|(p, t)| key.tag(p) != **t).count();
        assert_eq!(bad, 0);
    });
    // The engine's own fast path (tags::untagged_or_changed), region by
    // region, over the shared mapping in place.
    let region_reads: Vec<Vec<_>> = cap
        .baseline
        .regions
        .iter()
        .map(|r| r.pages.iter().zip(0u64..).map(|(p, i)| (i, p.gva, p.gpa)).collect())
        .collect();
    let nh_in_place = || {
        for (i, (r, reads)) in cap.baseline.regions.iter().zip(&region_reads).enumerate() {
            let slow = untagged_or_changed(&page_tags, i, &r.root, &ram.shared, reads);
            assert_eq!(slow.map(|s| s.len()), Some(0));
        }
    };
    measure(&mut c, "verify", "nh-tags-shared-mapping-in-place", bytes, nh_in_place);
    // BLAKE3-only verification: each region hashed whole, in place, and
    // compared with its root (pages are hashed one by one only on a mismatch).
    let blake3_in_place = || {
        for (r, reads) in cap.baseline.regions.iter().zip(&region_reads) {
            assert_eq!(region_hash(&ram.shared, reads, r.bytes), Some(r.root));
        }
    };
    measure(&mut c, "verify", "blake3-regions-shared-mapping-in-place", bytes, blake3_in_place);
    measure(&mut c, "verify", "nh-tags-shared-mapping-copied", bytes, || {
        let mut bad = 0;
        read_all(&ram.shared, &cap.pages, &mut bufs2, |i, b| {
            bad += usize::from(key.tag(b) != tags[i])
        });
        assert_eq!(bad, 0);
    });

    // The engine's whole comparison of the guest with its baseline, as the
    // daemon's full check runs it (kernel found anew from the registers,
    // every mapping and page compared), with and without tags.
    measure(&mut c, "verify", "engine-discover-kernel", bytes, || {
        black_box(vigil::linux::discover(&ram.shared, &regs).unwrap());
    });
    let engine = |t: Option<&vigil::integrity::tags::PageTags>| {
        let view = vigil::linux::discover(&ram.shared, &regs).unwrap();
        let r = check_tagged(&cap.baseline, &ram.shared, &view, &regs, Scope::Full, t).unwrap();
        assert!(r.intact, "{:?}", r.violations.first());
    };
    measure(&mut c, "verify", "engine-full-check-blake3", bytes, || engine(None));
    measure(&mut c, "verify", "engine-full-check-tagged", bytes, || engine(Some(&page_tags)));

    // Localising a changed page and the incremental update after an
    // accepted patch: the page's BLAKE3 value, merged into the region root.
    let text = cap.baseline.regions.iter().find(|r| r.name == "kernel-text").unwrap();
    let text_values: Vec<_> = text.pages.iter().map(|p| p.value).collect();
    let mut page = [0u8; PAGE];
    cap.core.read(text.pages[7].gpa, &mut page).unwrap();
    page[100] ^= 0xcc;
    measure(&mut c, "update", "one-page-tag-miss-then-blake3", PAGE_SIZE, || {
        let t = key.tag(&page);
        assert_ne!(t, tags[0]);
        black_box(tree::page_value(7, &page, text.bytes));
    });
    let mut merged = text_values.clone();
    measure(&mut c, "update", "merge-into-region-root", text.bytes, || {
        merged[7] = tree::page_value(7, &page, text.bytes);
        black_box(tree::region_root(&merged, text.bytes).unwrap());
    });

    // Walking the kernel image's mapping from the captured CR3.
    let regs = &cap.baseline.registers[0];
    let walker = Walker::new(
        &cap.core,
        PagingMode::from_cr4(regs.cr4),
        regs.cr3,
        regs.efer & (1 << 11) != 0,
    );
    let image_start = GuestVirtAddr(0xffff_ffff_8000_0000);
    let image_end = GuestVirtAddr(0xffff_ffff_c000_0000);
    let mapped = walker.mappings(image_start, image_end).unwrap();
    measure(&mut c, "walk", "kernel-image-mapping", bytes, || {
        black_box(walker.mappings(image_start, image_end).unwrap());
    });

    c.final_summary();
    report(&cap, n, &key, mapped.mappings.len());

    // The targets' ratios once more, each method timed alternately with its
    // reference, so that the machine's changes of speed hit both alike, and
    // every reference reading the very memory its method reads (the shared
    // mapping, in place), so that both find the caches alike.
    let mapped: Vec<&[u8]> = cap
        .pages
        .iter()
        .map(|&(_, gpa)| ram.shared.slice(gpa, PAGE_SIZE).expect("the capture's pages are RAM"))
        .collect();
    let plain_in_place = || {
        for p in &mapped {
            black_box(plain_read(black_box(p)));
        }
    };
    let mut bufs4 = vec![[0u8; PAGE]; BATCH];
    let mut copy_in_place = || {
        for batch in mapped.chunks(BATCH) {
            for (src, dst) in batch.iter().zip(bufs4.iter_mut()) {
                dst.copy_from_slice(src);
            }
            black_box(&bufs4);
        }
    };
    let whole = {
        let mut v = Vec::with_capacity(mapped.len() * PAGE);
        mapped.iter().for_each(|p| v.extend_from_slice(p));
        v
    };
    let blake3_whole = || {
        black_box(blake3::hash(black_box(&whole)));
    };
    let pairs: Vec<Paired> = vec![
        paired("NH tags, shared mapping in place", "plain read", 400, plain_in_place, nh_in_place),
        paired("engine full check, tagged", "plain read", 300, plain_in_place, || {
            engine(Some(&page_tags))
        }),
        paired(
            "BLAKE3 regions, shared mapping in place",
            "whole-buffer BLAKE3",
            60,
            blake3_whole,
            blake3_in_place,
        ),
        paired("engine full check, BLAKE3 only", "whole-buffer BLAKE3", 40, blake3_whole, || {
            engine(None)
        }),
        paired("shared-mapping source", "in-process copy", 300, &mut copy_in_place, || {
            source_read(&ram.shared)
        }),
        paired("process_vm_readv source", "in-process copy", 200, &mut copy_in_place, || {
            source_read(&ram.process)
        }),
    ];
    println!();
    println!(
        "paired: each method alternated with its reference, ratio per pair (reference time over method time)"
    );
    println!(
        "{:36} {:>22} {:>6} {:>7} {:>7} {:>7}",
        "method", "reference", "pairs", "p25", "median", "p75"
    );
    for p in pairs {
        println!(
            "{:36} {:>22} {:>6} {:>7.3} {:>7.3} {:>7.3}",
            p.method, p.reference, p.pairs, p.p25, p.median, p.p75
        );
    }
}

/// Ratios of a method to its reference, measured alternately.
struct Paired {
    method: &'static str,
    reference: &'static str,
    pairs: usize,
    p25: f64,
    median: f64,
    p75: f64,
}

/// Times `reference` and `method` alternately (which goes first alternates
/// too), `pairs` times after a warm-up, and gives the spread of the ratios.
fn paired(
    method: &'static str,
    reference: &'static str,
    pairs: usize,
    mut reference_fn: impl FnMut(),
    mut method_fn: impl FnMut(),
) -> Paired {
    let time = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    };
    for _ in 0..pairs / 10 + 1 {
        reference_fn();
        method_fn();
    }
    let mut ratios: Vec<f64> = (0..pairs)
        .map(|i| {
            let (r, m) = if i % 2 == 0 {
                let r = time(&mut reference_fn);
                (r, time(&mut method_fn))
            } else {
                let m = time(&mut method_fn);
                (time(&mut reference_fn), m)
            };
            r / m
        })
        .collect();
    Paired {
        method,
        reference,
        pairs,
        p25: percentile(&mut ratios, 0.25),
        median: percentile(&mut ratios, 0.5),
        p75: percentile(&mut ratios, 0.75),
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The table: medians, throughput, and ratios to each group's reference.
fn report(cap: &Capture, n: usize, key: &Key, mappings: usize) {
    let times = TIMES.lock().unwrap();
    let t = |name: &str| times.get(name).map(|v| median(v));
    let bytes = cap.bytes() as f64;
    println!();
    println!(
        "hot path: {n} pages ({:.1} MiB) of a lab guest captured in {}, NH engine {}",
        bytes / f64::from(1 << 20),
        cap.dir.display(),
        key.engine()
    );
    println!("{:48} {:>10} {:>10} {:>9}  reference", "method", "median ms", "GB/s", "ratio");
    let rows = [
        ("sources/reference-in-process-copy", "sources/reference-in-process-copy", bytes),
        ("sources/shared-mapping", "sources/reference-in-process-copy", bytes),
        ("sources/process-vm-readv", "sources/reference-in-process-copy", bytes),
        ("verify/reference-plain-read", "verify/reference-plain-read", bytes),
        ("verify/nh-tags-in-process", "verify/reference-plain-read", bytes),
        ("verify/nh-tags-shared-mapping-in-place", "verify/reference-plain-read", bytes),
        ("verify/nh-tags-shared-mapping-copied", "verify/reference-plain-read", bytes),
        ("verify/engine-full-check-tagged", "verify/reference-plain-read", bytes),
        ("verify/engine-full-check-blake3", "verify/reference-plain-read", bytes),
        ("verify/engine-full-check-blake3", "verify/blake3-whole-buffer", bytes),
        ("verify/blake3-regions-shared-mapping-in-place", "verify/blake3-whole-buffer", bytes),
        ("verify/engine-discover-kernel", "", 0.0),
        ("verify/blake3-whole-buffer", "verify/reference-plain-read", bytes),
        ("verify/blake3-per-page", "verify/reference-plain-read", bytes),
        ("verify/blake3-per-page", "verify/blake3-whole-buffer", bytes),
        ("verify/sha256-per-page", "verify/reference-plain-read", bytes),
        ("verify/siphash13-per-page", "verify/reference-plain-read", bytes),
        ("update/one-page-tag-miss-then-blake3", "", PAGE_SIZE as f64),
        ("update/merge-into-region-root", "", 0.0),
        ("walk/kernel-image-mapping", "", 0.0),
    ];
    for (name, reference, b) in rows {
        let Some(m) = t(name) else { continue };
        let ratio = if reference.is_empty() {
            String::new()
        } else {
            format!("{:.3}", t(reference).unwrap_or(f64::NAN) / m)
        };
        let gbs = if b > 0.0 { format!("{:.2}", b / m / 1e9) } else { String::new() };
        println!(
            "{name:48} {:>10.3} {gbs:>10} {ratio:>9}  {}",
            m * 1e3,
            reference.rsplit('/').next().unwrap_or("")
        );
    }
    println!("(ratio = reference median / method median; 1.0 is as fast as the reference)");
    println!("(the walk found {mappings} leaf mappings in the kernel image range)");
}
