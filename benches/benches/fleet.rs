//! A hundred guests on one core: the daemon's check of every guest, in
//! full, once a second each, with the daemon's jitter, on one thread, for
//! a while; writes (an `int3`) into random guests' kernel text meanwhile,
//! each timed until a check reports it. The writes land, in turn, on a
//! random text byte, a function's first byte, an ftrace entry, a jump label
//! site and a static call site (the kernel's patch sites, where a write in
//! the form of the kernel's own rewrite must still be seen).
//!
//!   lab/capture.sh && cargo bench -p vigil-bench --bench fleet \
//!       [-- --guests 100 --seconds 30 --writes-per-minute 60 --originals memory|disk --workers 2 --deadline 5]
//!
//! Exits 1, naming each write, when a write went unseen for `--deadline`
//! seconds (default 5: an `int3` on a patch site is held 2 s as the
//! kernel's rewrite in flight, then seen at the next check).
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

/// A place to write: guest-physical, virtual, name.
type Place = (GuestPhysAddr, u64, String);

/// Where the benchmark writes: each kind's places.
struct Targets(Vec<(&'static str, Vec<Place>)>);

impl Targets {
    /// The places of the captured guest: text bytes (picked at random when
    /// written), function entries, ftrace entries, jump label sites and
    /// static call sites, each on a page the baseline's text holds.
    fn of(cap: &Capture, profiles: &[vigil::linux::profile::Profile]) -> Self {
        use vigil::addr::GuestVirtAddr;
        use vigil::integrity::AddressSpace;
        use vigil::linux::semantic;
        let regs = &cap.baseline.registers;
        let view = vigil::linux::discover(&cap.core, regs).unwrap();
        let mut m =
            semantic::match_profile(profiles, &cap.core, &view, view.identification.image_base)
                .expect("a profile matches the captured guest");
        m.modules = semantic::walk_modules_settled(&m, &cap.core, &view).unwrap_or_default();
        let text = cap.baseline.regions.iter().find(|r| r.name == "kernel-text").unwrap();
        let pages: std::collections::HashSet<u64> =
            text.pages.iter().map(|p| p.gva.raw()).collect();
        let place = |gva: u64| -> Option<Place> {
            let page = gva & !0xfff;
            if !pages.contains(&page) {
                return None;
            }
            let (gpa, _) = view.translate(GuestVirtAddr(page))?;
            let name = m.symbol_of(gva).unwrap_or_else(|| format!("{gva:#x}"));
            Some((GuestPhysAddr(gpa.raw() + (gva - page)), gva, name))
        };
        let slide = m.slide;
        let functions = m
            .profile
            .symbols()
            .iter()
            .filter(|s| matches!(s.kind, 'T' | 't') && !s.name.starts_with("__pfx_"))
            .filter_map(|s| place(s.addr.wrapping_add(slide)))
            .collect();
        let fentries =
            m.profile.fentry.iter().filter_map(|a| place(a.wrapping_add(slide))).collect();
        let tables = vigil::linux::patch::PatchTables::read(&m, &cap.core, &view);
        let labels = tables.jump_labels().filter_map(|(a, _, _)| place(a)).collect();
        let calls = tables.static_calls().filter_map(|(a, _)| place(a)).collect();
        let bytes = text.pages.iter().map(|p| (p.gpa, p.gva.raw(), String::new())).collect();
        let all = Targets(vec![
            ("text byte", bytes),
            ("function entry", functions),
            ("ftrace entry", fentries),
            ("jump label", labels),
            ("static call", calls),
        ]);
        for (kind, places) in &all.0 {
            assert!(!places.is_empty(), "no {kind} to write at in the captured guest");
        }
        all
    }

    /// A place to write, picked with `r` (uniform in [0, 1)): the kind, then
    /// one of its places (a text byte: a random byte of a random page).
    fn pick(&self, r: &dyn Fn() -> f64) -> (usize, GuestPhysAddr, u64, String) {
        let k = (r() * self.0.len() as f64) as usize % self.0.len();
        let places = &self.0[k].1;
        let (gpa, gva, name) = &places[(r() * places.len() as f64) as usize % places.len()];
        if k == 0 {
            let off = (r() * 4000.0) as u64 + 16;
            return (k, GuestPhysAddr(gpa.raw() + off), gva + off, format!("{:#x}", gva + off));
        }
        (k, *gpa, *gva, name.clone())
    }
}

/// The next event: a guest's check, or a write into a guest.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Check(usize),
    Poke,
}

fn main() {
    let flags =
        ["--guests", "--seconds", "--writes-per-minute", "--workers", "--originals", "--deadline"];
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
    // A write unseen this long fails the run.
    let deadline = Duration::from_secs(arg("--deadline", 5));
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
    let targets = Targets::of(&cap, &profiles);
    let shared: std::sync::Arc<[vigil::linux::profile::Profile]> = profiles.clone().into();

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
            // One copy for all guests, as the daemon shares its profiles.
            profiles: shared.clone(),
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
    /// A write waiting to be seen: when, where, the byte it replaced, and
    /// its kind and place (for the report).
    #[derive(Clone)]
    struct Write {
        at: Instant,
        gpa: GuestPhysAddr,
        old: u8,
        kind: usize,
        gva: u64,
        name: String,
    }
    type Pending = Option<Write>;
    let fleet: Vec<std::sync::Mutex<(Watched, std::sync::Arc<vigil_bench::RamCopy>, Pending)>> =
        fleet.into_iter().map(|(w, copy)| std::sync::Mutex::new((w, copy, None))).collect();
    #[derive(Default)]
    struct Tally {
        latencies: Vec<f64>,
        /// Latencies by kind of place.
        by_kind: std::collections::BTreeMap<usize, Vec<f64>>,
        /// Writes seen later than the deadline, or not at all.
        overdue: Vec<String>,
        durations: Vec<f64>,
        late: Vec<f64>,
        checks: u64,
    }
    let tally = std::sync::Mutex::new(Tally::default());
    let cpu0 = cpu_time();
    let overdue = |tally: &std::sync::Mutex<Tally>, i: usize, w: &Write, seen: Option<Duration>| {
        let what = format!(
            "guest {i}: {} at {:#x} ({}, gpa {}) {}",
            targets.0[w.kind].0,
            w.gva,
            w.name,
            w.gpa,
            match seen {
                Some(after) => format!("seen only after {:.2} s", after.as_secs_f64()),
                None => format!("unseen after {:.2} s", w.at.elapsed().as_secs_f64()),
            }
        );
        tally.lock().unwrap().overdue.push(what);
    };
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
                        let (kind, gpa, gva, name) = targets.pick(&rand);
                        let old = g.1.poke(gpa, 0xcc);
                        if old != 0xcc {
                            g.2 = Some(Write { at: Instant::now(), gpa, old, kind, gva, name });
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
                    if let Some(w) = g.2.clone() {
                        if r.check
                            .violations
                            .iter()
                            .any(|f| vigil::linux::region::Region::Text.is(&f.region))
                        {
                            seen = Some((w.kind, w.at.elapsed()));
                            g.1.poke(w.gpa, w.old);
                            g.2 = None;
                        }
                        if seen.is_none_or(|(_, after)| after > deadline)
                            && w.at.elapsed() > deadline
                        {
                            overdue(&tally, i, &w, seen.map(|(_, a)| a));
                            if seen.is_none() {
                                // Reported once: put back, looked for no more.
                                g.1.poke(w.gpa, w.old);
                                g.2 = None;
                            }
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
                    if let Some((kind, after)) = seen {
                        t.latencies.push(after.as_secs_f64());
                        t.by_kind.entry(kind).or_default().push(after.as_secs_f64());
                    }
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
    let Tally { mut latencies, mut by_kind, mut overdue, mut durations, mut late, checks } =
        tally.into_inner().unwrap();
    let pending: Vec<Pending> = fleet.iter().map(|g| g.lock().unwrap().2.clone()).collect();
    // Writes still unseen at the end, older than the deadline, failed too.
    let now = end.min(Instant::now());
    for (i, w) in pending.iter().enumerate() {
        if let Some(w) = w.as_ref().filter(|w| now - w.at > deadline) {
            overdue.push(format!(
                "guest {i}: {} at {:#x} ({}, gpa {}) unseen at the end, {:.2} s after it",
                targets.0[w.kind].0,
                w.gva,
                w.name,
                w.gpa,
                (now - w.at).as_secs_f64()
            ));
        }
    }
    let wall = start.elapsed().min(Duration::from_secs(seconds));
    let cpu = cpu_time() - cpu0;
    let missed = pending.iter().filter(|p| p.is_some()).count();
    let unseen_ages: Vec<String> = pending
        .iter()
        .flatten()
        .map(|w| format!("{} {:.2} s before the end", w.gpa, (now - w.at).as_secs_f64()))
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
    for (k, lat) in &mut by_kind {
        println!(
            "    {}: {} writes, p50 {:.3} s, p99 {:.3} s, max {:.3} s",
            targets.0[*k].0,
            lat.len(),
            percentile(lat, 0.5),
            percentile(lat, 0.99),
            percentile(lat, 1.0)
        );
    }
    if !unseen_ages.is_empty() {
        println!("  unseen writes (younger than the deadline): {}", unseen_ages.join(", "));
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
    if !overdue.is_empty() {
        overdue.sort();
        println!(
            "FAILED: {} write(s) not seen within {:.0} s:\n  {}",
            overdue.len(),
            deadline.as_secs_f64(),
            overdue.join("\n  ")
        );
        std::process::exit(1);
    }
    println!("  every write seen within {:.0} s", deadline.as_secs_f64());
}
