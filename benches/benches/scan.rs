//! Scan cost against plain memory reads, measured in the same run.
//!
//! A guest kernel's text and rodata (about 22 MiB on the lab kernel) is made
//! up in memory; each method below reads it in full and the report gives its
//! throughput and its ratio to the reference, a plain read of the same bytes.
//!
//!   cargo bench -p vigil-bench            (or: cargo bench -p vigil-bench -- --quick)

use std::hint::black_box;
use std::time::{Duration, Instant};

use vigil::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use vigil::integrity::baseline::hash_pages;
use vigil::integrity::tree::{hash_region, region_root};
use vigil::memory::{GuestMemory, RawDump};

/// Pages of the lab kernel's text (3586) and rodata (2088).
const PAGES: u64 = 3586 + 2088;

fn median_secs(rounds: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm up
    let mut t: Vec<Duration> = (0..rounds)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    t[t.len() / 2].as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 5 } else { 31 };
    let len = usize::try_from(PAGES * PAGE_SIZE).expect("fits");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let image: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect();
    let mem = RawDump::from_bytes(image.clone());
    let pages: Vec<(GuestVirtAddr, GuestPhysAddr)> = (0..PAGES)
        .map(|i| {
            (GuestVirtAddr(0xffff_ffff_8100_0000 + i * PAGE_SIZE), GuestPhysAddr(i * PAGE_SIZE))
        })
        .collect();
    let (values, root) = hash_region(&image);

    let mut scratch = vec![0u8; len];
    let reference = median_secs(rounds, || {
        mem.read(GuestPhysAddr(0), &mut scratch).unwrap();
        black_box(&scratch);
    });
    let results = [
        (
            "engine scan: read + per-page BLAKE3 (hash_pages)",
            median_secs(rounds, || {
                black_box(hash_pages(&mem, "bench", &pages).unwrap());
            }),
        ),
        (
            "whole-region BLAKE3 (blake3::hash, one call)",
            median_secs(rounds, || {
                black_box(blake3::hash(black_box(&image)));
            }),
        ),
        (
            "merge page values into the root only",
            median_secs(rounds, || {
                black_box(region_root(&values, PAGES * PAGE_SIZE).unwrap());
            }),
        ),
    ];
    assert_eq!(blake3::hash(&image), root, "the engine's root must be plain BLAKE3");

    let gbs = |secs: f64| len as f64 / secs / 1e9;
    println!(
        "scan benchmark: {} pages ({:.1} MiB), median of {rounds} rounds",
        PAGES,
        len as f64 / (1 << 20) as f64
    );
    println!("{:52} {:>10} {:>10} {:>8}", "method", "ms", "GB/s", "ratio");
    println!(
        "{:52} {:>10.3} {:>10.2} {:>8.2}",
        "reference: plain read of the same bytes",
        reference * 1e3,
        gbs(reference),
        1.0
    );
    for (name, secs) in results {
        println!("{name:52} {:>10.3} {:>10.2} {:>8.3}", secs * 1e3, gbs(secs), reference / secs);
    }
    println!("(ratio = reference time / method time: 1.0 is memory speed)");
}
