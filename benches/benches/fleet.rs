//! A hundred guests on one core: the daemon's check of every guest, in
//! full, once a second each, with the daemon's jitter, on one thread, for
//! a while; writes into random guests' kernel text meanwhile, each timed
//! until a check reports it.
//!
//!   lab/capture.sh && cargo bench -p vigil-bench --bench fleet \
//!       [-- --guests 100 --seconds 30 --writes-per-minute 60 --originals memory|disk --workers 2]
//!
//! Each guest is a copy-on-write copy of the captured lab guest's memory,
//! watched by vigil's own `Watched` (profile match, semantic checks, patch
//! review, tags) exactly as the daemon's domain tasks do; only libvirt and
//! the tokio plumbing around it are left out. Reported: the CPU that
//! thread used as a share of one core, detection latency percentiles, and
//! the daemon-side resident memory each guest adds (anonymous memory: the
//! guests' RAM copies are not the daemon's). `--originals disk` keeps the
//! baselines' original pages in their files, as the daemon's setting of
//! that name does; `--workers N` runs the checks on N threads (the daemon's
//! blocking pool has at least two).

// Random picks and percentiles are float arithmetic on small counts.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use vigil::addr::GuestPhysAddr;
use vigil::integrity::check::Scope;
use vigil::watch::Watched;
use vigil_bench::{Capture, FleetGuest, RamFiles, arg, choice, percentile};

/// RssAnon from /proc/self/status, in bytes.
fn rss_anon() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// CPU time this process used so far (user + system).
fn cpu_time() -> Duration {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct it is given.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) }, 0);
    // SAFETY: initialised by the successful call above.
    let u = unsafe { u.assume_init() };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.unsigned_abs())
            + Duration::from_micros(t.tv_usec.unsigned_abs())
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The next event: a guest's check, or a write into a guest.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Check(usize),
    Poke,
}

fn main() {
    let flags = ["--guests", "--seconds", "--writes-per-minute", "--workers", "--originals"];
    if !vigil_bench::start(include_str!("fleet.rs"), &flags) {
        return;
    }
    let guests = usize::try_from(arg("--guests", 100)).unwrap();
    let seconds = arg("--seconds", 30);
    // Writes per minute into random guests (0: none, steady state only).
    let pokes_per_minute = arg("--writes-per-minute", 60);
    // Threads running checks: the daemon's blocking pool has at least two.
    let workers = usize::try_from(arg("--workers", 2)).unwrap().max(1);
    // `--originals disk`: the baselines' original pages stay in their files.
    let on_disk = choice("--originals", &["memory", "disk"]) == "disk";
    let cap = Capture::load();
    let (profiles, _) = vigil::linux::profile::load_dir(&[concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../guest-profiles"
    )
    .into()]);
    let ram = RamFiles::new(&cap.core);
    let state = tempfile::tempdir().unwrap();
    let baselines = state.path().join("baselines");
    std::fs::create_dir_all(&baselines).unwrap();
    let pages_file = vigil::integrity::Originals::path_for(&cap.baseline_path);
    let text = cap.baseline.regions.iter().find(|r| r.name == "kernel-text").unwrap().clone();

    println!(
        "fleet: attaching {guests} guests (copies of {}), original pages {}",
        cap.dir.display(),
        if on_disk { "on disk" } else { "in memory" }
    );
    let rss_before = rss_anon();
    let attach = Instant::now();
    let mut fleet = Vec::new();
    for i in 0..guests {
        let uuid = format!("00000000-0000-4000-8000-{i:012}");
        // Each guest's stored baseline: the captured one, renamed.
        let mut b = cap.baseline.clone();
        b.domain.name = format!("fleet-{i}");
        b.domain.uuid = uuid.clone();
        let path = vigil::paths::baseline_path(state.path(), &uuid);
        b.save(&path).unwrap();
        std::fs::hard_link(&pages_file, vigil::integrity::Originals::path_for(&path)).unwrap();
        let g = FleetGuest {
            name: b.domain.name.clone(),
            uuid,
            registers: cap.baseline.registers.clone(),
            ram: ram.copy(),
        };
        let copy = g.ram.clone();
        let settings = vigil::watch::AttachSettings {
            originals_on_disk: on_disk,
            provisional_window: Duration::from_secs(60),
            profiles: profiles.clone().into(),
        };
        let known = vigil::watch::Knowledge::default();
        let (mut w, _) =
            Watched::attach_guest(Box::new(g), state.path(), &known, settings).unwrap();
        let r = w.check(Scope::Full, &profiles).unwrap();
        assert!(
            r.check.intact,
            "guest {i} is not intact at start: {:?}",
            r.check.violations.first()
        );
        fleet.push((w, copy));
    }
    let rss_after = rss_anon();
    println!("fleet: attached in {:.1} s", attach.elapsed().as_secs_f64());

    // The schedule: every guest once a second (±10 %), pokes at random
    // moments; `workers` threads take the events in deadline order, as the
    // daemon's blocking pool takes its domains' checks.
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let rand = std::sync::Mutex::new(0x9e37_79b9_7f4a_7c15u64);
    let rand = || {
        let mut seed = rand.lock().unwrap();
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut queue: BinaryHeap<std::cmp::Reverse<(Instant, Event)>> = BinaryHeap::new();
    for i in 0..guests {
        let at = start + Duration::from_secs_f64(rand());
        queue.push(std::cmp::Reverse((at, Event::Check(i))));
    }
    let poke_gap = |r: f64| Duration::from_secs_f64(60.0 / pokes_per_minute as f64 * (0.5 + r));
    if pokes_per_minute > 0 {
        queue.push(std::cmp::Reverse((start + poke_gap(rand()), Event::Poke)));
    }
    let queue = std::sync::Mutex::new(queue);
    // Each guest with the write waiting to be seen in it: (when, address, old byte).
    type Pending = Option<(Instant, GuestPhysAddr, u8)>;
    let fleet: Vec<std::sync::Mutex<(Watched, std::sync::Arc<vigil_bench::RamCopy>, Pending)>> =
        fleet.into_iter().map(|(w, copy)| std::sync::Mutex::new((w, copy, None))).collect();
    #[derive(Default)]
    struct Tally {
        latencies: Vec<f64>,
        durations: Vec<f64>,
        late: Vec<f64>,
        checks: u64,
    }
    let tally = std::sync::Mutex::new(Tally::default());
    let cpu0 = cpu_time();
    let worker = || {
        loop {
            let Some(std::cmp::Reverse((at, ev))) = queue.lock().unwrap().pop() else { return };
            if at >= end {
                return; // every later event is later still
            }
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            } else {
                tally.lock().unwrap().late.push((now - at).as_secs_f64());
            }
            match ev {
                Event::Poke => {
                    let victim = (rand() * guests as f64) as usize % guests;
                    // Under the guest's lock: never while it is being checked.
                    let mut g = fleet[victim].lock().unwrap();
                    if g.2.is_none() {
                        let page = &text.pages
                            [(rand() * text.pages.len() as f64) as usize % text.pages.len()];
                        let gpa = GuestPhysAddr(page.gpa.raw() + (rand() * 4000.0) as u64 + 16);
                        let old = g.1.poke(gpa, 0xcc);
                        if old != 0xcc {
                            g.2 = Some((Instant::now(), gpa, old));
                        } else {
                            g.1.poke(gpa, old);
                        }
                    }
                    drop(g);
                    let next = Instant::now() + poke_gap(rand());
                    queue.lock().unwrap().push(std::cmp::Reverse((next, Event::Poke)));
                }
                Event::Check(i) => {
                    let mut g = fleet[i].lock().unwrap();
                    let t = Instant::now();
                    let r = g.0.check(Scope::Full, &profiles).unwrap();
                    let took = t.elapsed().as_secs_f64();
                    let mut seen = None;
                    if let Some((poked, gpa, old)) = g.2 {
                        if r.check
                            .violations
                            .iter()
                            .any(|f| vigil::linux::region::Region::Text.is(&f.region))
                        {
                            seen = Some(poked.elapsed().as_secs_f64());
                            g.1.poke(gpa, old);
                            g.2 = None;
                        }
                    } else {
                        assert!(
                            r.check.intact,
                            "guest {i}: unexpected {:?}",
                            r.check.violations.first()
                        );
                    }
                    drop(g);
                    let mut t = tally.lock().unwrap();
                    t.durations.push(took);
                    t.checks += 1;
                    t.latencies.extend(seen);
                    drop(t);
                    let next = at + Duration::from_secs_f64(0.9 + 0.2 * rand());
                    queue.lock().unwrap().push(std::cmp::Reverse((next, Event::Check(i))));
                }
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(worker);
        }
    });
    let Tally { mut latencies, mut durations, mut late, checks } = tally.into_inner().unwrap();
    let pending: Vec<Pending> = fleet.iter().map(|g| g.lock().unwrap().2).collect();
    let wall = start.elapsed().min(Duration::from_secs(seconds));
    let cpu = cpu_time() - cpu0;
    let missed = pending.iter().filter(|p| p.is_some()).count();
    let unseen_ages: Vec<String> = pending
        .iter()
        .flatten()
        .map(|(t, gpa, _)| {
            format!("{gpa} {:.2} s before the end", (end.min(Instant::now()) - *t).as_secs_f64())
        })
        .collect();
    println!(
        "fleet: {guests} guests, {seconds} s, {checks} full checks ({:.1} per second) on {workers} thread(s)",
        checks as f64 / wall.as_secs_f64()
    );
    println!(
        "  CPU: {:.1} % of one core (target <= 25 %)",
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    );
    println!(
        "  full check: median {:.2} ms, p99 {:.2} ms",
        1e3 * percentile(&mut durations, 0.5),
        1e3 * percentile(&mut durations, 0.99)
    );
    println!(
        "  detection latency over {} writes: p50 {:.3} s, p90 {:.3} s, p99 {:.3} s, max {:.3} s (target p99 < 1.5 s); {missed} not yet seen at the end",
        latencies.len(),
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.9),
        percentile(&mut latencies, 0.99),
        percentile(&mut latencies, 1.0)
    );
    if !unseen_ages.is_empty() {
        println!("  unseen writes: {}", unseen_ages.join(", "));
    }
    println!(
        "  checks started late: {} of {checks} (p99 {:.1} ms)",
        late.iter().filter(|&&l| l > 0.010).count(),
        1e3 * percentile(&mut late, 0.99)
    );
    println!(
        "  resident memory added per guest: {:.2} MiB anonymous ({:.1} MiB for {guests})",
        (rss_after.saturating_sub(rss_before)) as f64 / guests as f64 / f64::from(1 << 20),
        (rss_after.saturating_sub(rss_before)) as f64 / f64::from(1 << 20)
    );
}
