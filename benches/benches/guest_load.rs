//! What the daemon costs the guest it watches: a CPU- and memory-bound
//! workload inside a real lab guest (libvirt, QEMU), timed with the daemon
//! checking that guest every second (in full every `--full-interval`
//! seconds, 1 unless given; `--per-second N` divides both intervals by N)
//! and with the daemon stopped, in
//! alternating rounds so that drift hits both alike. One daemon runs
//! throughout; for the unchecked rounds it is frozen with SIGSTOP (it
//! checks nothing, holds no lock), and thawed with SIGCONT for the checked
//! ones, which start once it has checked again (between two unchecked
//! rounds in a row it is thawed for one check too, so that libvirtd keeps
//! its connection). Every round starts the same idle gap after the last
//! one ended (1.5 s divided by `--per-second`, at least 0.5 s), checked
//! or not: a guest that rested longer seemed to run its next round slower.
//!
//!   cargo bench -p vigil-bench --bench guest_load [-- --rounds 8 --full-interval 1 --per-second 1]
//!
//! Needs the lab (lab/setup.sh, libvirtd running) and builds the release
//! `vigil` binary. The workload (`--workload`): `grind` (the default), the
//! lab's own program (lab/initramfs/grind.c) streaming through 64 MiB,
//! reading it at random and mixing integers, the same work every round,
//! about 4 s under TCG and timed by itself; or `shell`, the first
//! workload, a busybox shell counting loop (CPU) and SHA-256 over 64 MiB
//! streamed through a pipe (memory), about 5 s, timed by the guest's
//! /proc/uptime. A round's time is the guest's (the lab guest's clock is
//! its timer ticks, 4 ms apart); grind's rounds are timed by the host too,
//! around the console's round trip, and reported both ways, so that a
//! guest clock slowed by late ticks would show. Reported: each round's time both
//! ways, the slowdown per pair of rounds (checked over unchecked), and
//! three estimates of it with 95 % intervals: the Hodges-Lehmann estimate
//! (signed-rank interval) and the median (sign-test interval) of the
//! pairs' log ratios, which rank the rare rounds a second slower instead of
//! averaging them, and the slowdown of the total time, checked over
//! unchecked (normal interval; until 2026-12-02 the mean of the pairs'
//! ratios, which noise alone raises by about the square of each time's
//! spread: see `paired::ratio_of_totals`); every 25 pairs too, so
//! that a long run shows where it stands. Also the host CPU each side
//! spends per second of round: the daemon, libvirtd, QEMU's vCPU thread and
//! its other threads.
//!
//! `--blocks S` (1 to 10) measures with less noise: `grind -f` runs in the
//! guest throughout, never idle, counting its units of work in a page the
//! host finds in the guest's RAM (through QEMU's /proc/PID/mem) and reads
//! at the edges of blocks of S seconds, the daemon frozen in one block and
//! thawed in the other of each pair (off on, on off, ...: the thawed
//! daemon checks as it is due, a check it missed while frozen at once).
//! A pair is then the host's milliseconds per thousand units in each; a
//! pair takes about 2S s, and `--rounds` counts pairs. With `--workload
//! shell` the shell workload runs instead, cut into units of a 128th and
//! looping, each unit counted in a tmpfs file whose page the host finds
//! the same way. The checks a
//! second the checking blocks saw are reported: more than the schedule's,
//! for the missed checks caught up.
//!
//! `--shipped` runs the daemon with the shipped configuration file
//! (systemd/vigil.toml) unchanged but for the domain it watches, and the
//! lab kernel's profile placed where its default search path looks; the
//! interval flags then cannot be given, and the record's first line says
//! so.
//!
//! `--record FILE` appends each pair to FILE as it is measured and reports
//! on every pair the file holds, so that one measurement can be taken in
//! several runs (a file written by another method is refused; a relative
//! FILE is taken from the repository's root); with
//! `--rounds 0` it only reports on them, with no guest.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vigil_bench::paired::{self, Estimate};
use vigil_bench::{arg, choice};

/// The first line of a `--record` file: pairs are pooled only with pairs
/// measured the same way.
const RECORD_HEADER: &str = "# guest_load pairs (stopped s, checking s): one daemon frozen and thawed, \
                             rounds timed by the guest after equal idle gaps, workload v1";

/// The first line of a `--record` file of grind's rounds, whose lines
/// hold the host's times of the pair after the guest's.
const GRIND_HEADER: &str = "# guest_load pairs (stopped s, checking s by the guest; stopped s, checking s by the host): \
                            one daemon frozen and thawed, rounds after equal idle gaps, workload grind 10 v1";

/// The first line of files recorded before every round began after the
/// same idle gap (until 2026-12-02): reported with `--rounds 0`, never
/// added to. A checked round then began as soon as the thawed daemon had
/// checked, which took up to a check interval when its check was not yet
/// due, while an unchecked one began at once; a guest left idle longer
/// seemed to run its next round slower (benches/README.md), which would
/// count against checking.
const UNEQUAL_GAPS_HEADER: &str = "# guest_load pairs (stopped s, checking s): one daemon frozen and thawed, \
                                   rounds timed by the guest, workload v1";

/// How long the guest idles between one round's end and the next one's
/// start, checked or not: longer than the wait for a thawed daemon's
/// check, so that every round begins after the same rest.
fn idle_gap(rate: u64) -> Duration {
    Duration::from_millis(1500 / rate).max(Duration::from_millis(500))
}

const WORKLOAD: &str = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; \
                        dd if=/dev/zero bs=64k count=1024 2>/dev/null | sha256sum >/dev/null";

/// grind's passes a round: about 4 s under TCG here.
const GRIND: &str = "grind 10";

/// The first line of a `--record` file of `--blocks`: each line holds the
/// host's milliseconds per thousand units of grind's work in a block with
/// the daemon stopped and in the one beside it with the daemon checking.
const BLOCKS_HEADER: &str = "# guest_load blocks (stopped, checking: host ms per 1000 units of work): \
                             one daemon frozen and thawed in alternate blocks, grind -f running throughout \
                             and read in guest memory by the host, workload grind-stream v1";

/// The same for `--workload shell --blocks S`: the first workload in small
/// units, run for ever, counting them in a tmpfs file's page.
const SHELL_BLOCKS_HEADER: &str = "# guest_load blocks (stopped, checking: host ms per 1000 units of work): \
                                   one daemon frozen and thawed in alternate blocks, a shell loop running \
                                   throughout and counting in a tmpfs page read in guest memory by the host, \
                                   workload shell-stream v1";

/// The first workload cut into units of a 128th (a counting loop of 780,
/// SHA-256 over 512 KiB through a pipe), for ever: after each the count
/// is written in decimal, after the nonce's two words, at the start of
/// /tmp/progress, a page of the guest's page cache. `{N}` and `{M}` are
/// the nonce and its complement as printf escapes.
const SHELL_STREAM: &str = "(n=0; while :; do i=0; while [ $i -lt 780 ]; do i=$((i+1)); done; \
                            dd if=/dev/zero bs=64k count=8 2>/dev/null | sha256sum >/dev/null; \
                            n=$((n+1)); printf '{N}{M}%020d' $n 1<>/tmp/progress; done) \
                            </dev/null >/dev/null 2>&1 &";

/// A measured pair (stopped, checking): as the record's header says, the
/// guest's times of two rounds (and for grind the host's too), or the
/// host's time per unit of work in two blocks.
#[derive(Clone, Copy)]
struct Pair {
    times: (f64, f64),
    host: Option<(f64, f64)>,
}

/// A workload's progress page in the guest's RAM (`grind -f`'s, or the
/// shell loop's file), found by its nonce and read through QEMU's
/// /proc/PID/mem (a page can move: the guest kernel may migrate it, and
/// then it is found again).
struct Progress {
    mem: std::fs::File,
    /// QEMU's mapping of the guest's RAM: start and length.
    ram: (u64, u64),
    nonce: u64,
    /// The count is 20 decimal digits (the shell's), not a word.
    decimal: bool,
    at: Option<u64>,
}

/// A nonce that no page holds by chance (from the time), whose bytes and
/// their complements are neither 0 nor printf's `%` or a backslash.
fn nonce() -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let mut x = (now.as_secs() << 30) ^ u64::from(now.subsec_nanos());
    let mut bytes = [0u8; 8];
    for b in &mut bytes {
        // 0x30 to 0x7a, less the backslash; complements 0x85 to 0xcf.
        *b = 0x30 + (x % 0x4a) as u8;
        if *b == b'\\' {
            *b = b'a';
        }
        x = x / 0x4a + 0x9e37_79b9;
    }
    u64::from_le_bytes(bytes)
}

/// `v`'s bytes in memory order as printf's octal escapes.
fn printf_escapes(v: u64) -> String {
    v.to_le_bytes().iter().map(|b| format!("\\{b:03o}")).collect()
}

impl Progress {
    fn open(qemu: u32, nonce: u64, decimal: bool) -> Self {
        let maps = std::fs::read_to_string(format!("/proc/{qemu}/maps")).unwrap();
        // The guest's RAM: QEMU's largest shared memfd mapping.
        let ram = maps
            .lines()
            .filter(|l| {
                l.contains("memfd:")
                    && l.split_whitespace().nth(1).is_some_and(|p| p.ends_with('s'))
            })
            .filter_map(|l| {
                let (a, b) = l.split_whitespace().next()?.split_once('-')?;
                let a = u64::from_str_radix(a, 16).ok()?;
                Some((a, u64::from_str_radix(b, 16).ok()? - a))
            })
            .max_by_key(|r| r.1)
            .expect("no shared memfd mapping in QEMU: is the lab guest's memory shared?");
        let mem = std::fs::File::open(format!("/proc/{qemu}/mem")).unwrap();
        Self { mem, ram, nonce, decimal, at: None }
    }

    /// The count in the page at `at`, if it starts with the nonce.
    fn read(&self, at: u64) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mut w = [0u8; 36];
        self.mem.read_exact_at(&mut w, at).ok()?;
        let word = |i: usize| u64::from_le_bytes(w[8 * i..8 * i + 8].try_into().unwrap());
        if word(0) != self.nonce || word(1) != !self.nonce {
            return None;
        }
        if self.decimal {
            std::str::from_utf8(&w[16..36]).ok()?.parse().ok()
        } else {
            Some(word(2))
        }
    }

    /// Units of work done so far, looking for the page if it moved.
    fn units(&mut self) -> Option<u64> {
        if let Some(u) = self.at.and_then(|at| self.read(at)) {
            return Some(u);
        }
        use std::os::unix::fs::FileExt;
        let mut chunk = vec![0u8; 1 << 20];
        let (start, len) = self.ram;
        self.at = (0..len).step_by(chunk.len()).find_map(|off| {
            self.mem.read_exact_at(&mut chunk, start + off).ok()?;
            chunk
                .chunks_exact(4096)
                .position(|page| {
                    page[..8] == self.nonce.to_le_bytes()
                        && page[8..16] == (!self.nonce).to_le_bytes()
                })
                .map(|p| start + off + 4096 * p as u64)
        });
        self.read(self.at?)
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The release `vigil`, built now.
fn vigil_binary() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let ok = Command::new(cargo)
        .args(["build", "--release", "--quiet", "-p", "vigil", "--bin", "vigil"])
        .current_dir(repo())
        .status()
        .expect("running cargo");
    assert!(ok.success(), "building vigil failed");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo().join("target"), PathBuf::from);
    target.join("release/vigil")
}

fn metrics(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Checks of `domain` so far, (hot, full).
fn checks(port: u16, domain: &str) -> (f64, f64) {
    let text = metrics(port);
    let count = |scope: &str| {
        let want = format!("vigil_checks_total{{domain=\"{domain}\",scope=\"{scope}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&want))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (count("hot"), count("full"))
}

fn full_checks(port: u16, domain: &str) -> f64 {
    checks(port, domain).1
}

/// The first line of a `--record` file for full checks every `full`
/// check intervals, `rate` intervals a second.
fn record_header(method: &str, full: u64, rate: u64) -> String {
    let mut h = method.to_string();
    if full != 1 {
        h += &format!("; full checks every {full} s");
    }
    if rate != 1 {
        h += &format!("; time compressed {rate} times");
    }
    h
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
}

/// The state letter of process `pid` (`R`, `S`, `T`...), from /proc.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: the state follows its closing parenthesis.
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Mean and standard deviation (0 for a single value).
fn mean_sd(v: &[f64]) -> (f64, f64) {
    paired::mean(v).map_or((v.iter().sum::<f64>() / v.len() as f64, 0.0), |(e, sd)| (e.value, sd))
}

/// `--record FILE`'s pairs so far (none if it does not exist yet), which
/// must have been measured under one of `headers`. A line holds the
/// guest's two times, then for grind the host's two.
fn recorded(path: &Path, headers: &[&String]) -> Vec<Pair> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("reading {}: {e}", path.display()),
    };
    let mut lines = text.lines();
    let first = lines.next().unwrap_or("");
    assert!(
        headers.iter().any(|h| first == h.as_str()),
        "{}: its first line is {first:?}, not {:?}: pairs measured another way cannot be pooled with these",
        path.display(),
        headers[0]
    );
    lines
        .enumerate()
        .map(|(i, l)| {
            let v: Vec<f64> = l.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            assert!(
                v.len() == 2 || v.len() == 4,
                "{} line {}: not two or four times: {l:?}",
                path.display(),
                i + 2
            );
            Pair { times: (v[0], v[1]), host: (v.len() == 4).then(|| (v[2], v[3])) }
        })
        .collect()
}

/// A slowdown estimate of log ratios, as a percentage with its interval.
fn percent(e: Option<Estimate>) -> String {
    let p = |x: f64| 100.0 * x.exp_m1();
    e.map_or_else(
        || "(too few pairs)".to_string(),
        |e| format!("{:+.2} % (95 % interval {:+.2} to {:+.2} %)", p(e.value), p(e.low), p(e.high)),
    )
}

/// The three estimates of the slowdown over `pairs` (stopped, checking).
fn slowdown(pairs: &[(f64, f64)]) -> String {
    let logs: Vec<f64> = pairs.iter().map(|(off, on)| (on / off).ln()).collect();
    let ratios: Vec<f64> = pairs.iter().map(|(off, on)| on / off - 1.0).collect();
    let total = paired::ratio_of_totals(pairs).map_or_else(
        || "(too few pairs)".to_string(),
        |e| {
            format!(
                "{:+.2} % (95 % interval {:+.2} to {:+.2} %)",
                100.0 * e.value,
                100.0 * e.low,
                100.0 * e.high
            )
        },
    );
    let sd = paired::mean(&ratios).map_or(0.0, |(_, sd)| sd);
    format!(
        "Hodges-Lehmann {}\n  median {}\n  total time {total}, sd per pair {:.2} %",
        percent(paired::hodges_lehmann(&logs)),
        percent(paired::median(&logs)),
        100.0 * sd
    )
}

/// CPU time (user and system, in seconds) of a process or thread, from its
/// /proc stat file; 0 if it is gone.
fn cpu_seconds(stat_path: &str) -> f64 {
    // SAFETY: sysconf only reads a constant.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    std::fs::read_to_string(stat_path)
        .ok()
        .and_then(|s| {
            let f: Vec<u64> = s
                .rsplit_once(") ")?
                .1
                .split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|v| v.parse().ok())
                .collect();
            (f.len() == 2).then(|| (f[0] + f[1]) as f64 / tick)
        })
        .unwrap_or(0.0)
}

/// Host CPU seconds so far of: the daemon, libvirtd, QEMU's vCPU threads,
/// QEMU's other threads.
fn host_cpu(daemon: u32, qemu: u32) -> [f64; 4] {
    let libvirtd = std::fs::read_to_string("/run/libvirtd.pid").unwrap_or_default();
    let mut out = [
        cpu_seconds(&format!("/proc/{daemon}/stat")),
        cpu_seconds(&format!("/proc/{}/stat", libvirtd.trim())),
        0.0,
        0.0,
    ];
    let tasks = std::fs::read_dir(format!("/proc/{qemu}/task")).into_iter().flatten().flatten();
    for t in tasks {
        let dir = t.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let used = cpu_seconds(&dir.join("stat").to_string_lossy());
        out[if comm.starts_with("CPU ") { 2 } else { 3 }] += used;
    }
    out
}

fn main() {
    let flags = [
        "--rounds",
        "--full-interval",
        "--per-second",
        "--workload",
        "--blocks",
        "--record",
        "--shipped",
    ];
    if !vigil_bench::start(include_str!("guest_load.rs"), &flags) {
        return;
    }
    let rounds = usize::try_from(arg("--rounds", 8)).unwrap();
    // Hot checks (registers, tables) run every second; full ones every
    // `--full-interval` seconds (the shipped configuration says 1).
    let full_every = arg("--full-interval", 1).max(1);
    // `--per-second N` divides both intervals by N: ten checks a second
    // cost the guest about ten times what one does, which a few dozen
    // pairs can tell from the noise where one check a second needs
    // hundreds (attribution, not the target's measurement).
    let rate = arg("--per-second", 1).clamp(1, 100);
    let grind = choice("--workload", &["grind", "shell"]) == "grind";
    // `--blocks S`: the workload runs throughout and the daemon is frozen
    // and thawed in blocks of S seconds.
    let block_s = arg("--blocks", 0).min(10);
    // `--shipped`: the schedule is the shipped file's, not the flags'.
    let shipped = std::env::args().any(|a| a == "--shipped");
    assert!(
        !shipped || (full_every == 1 && rate == 1),
        "--shipped runs the shipped schedule: leave out --full-interval and --per-second"
    );
    let blocks =
        record_header(if grind { BLOCKS_HEADER } else { SHELL_BLOCKS_HEADER }, full_every, rate)
            + &format!("; blocks of {block_s} s")
            + if shipped { "; the shipped configuration file" } else { "" };
    let header = if block_s > 0 {
        blocks.clone()
    } else {
        record_header(if grind { GRIND_HEADER } else { RECORD_HEADER }, full_every, rate)
    };
    let args: Vec<String> = std::env::args().collect();
    let record = args
        .iter()
        .position(|a| a == "--record")
        // cargo runs benchmarks in the package's directory: a relative
        // name is taken from the repository's root instead.
        .map(|i| repo().join(args.get(i + 1).expect("--record needs a file name")));
    let unequal = record_header(UNEQUAL_GAPS_HEADER, full_every, rate);
    let shell = record_header(RECORD_HEADER, full_every, rate);
    let grinds = record_header(GRIND_HEADER, full_every, rate);
    // Any file can be reported on; files of the earlier method are not
    // added to.
    let accepted =
        if rounds == 0 { vec![&blocks, &grinds, &shell, &unequal] } else { vec![&header] };
    let mut pairs = record.as_deref().map(|p| recorded(p, &accepted)).unwrap_or_default();
    let earlier = pairs.len();
    if rounds == 0 {
        // Only the report on the pairs recorded.
        assert!(!pairs.is_empty(), "--rounds 0 reports on a --record file's pairs; none given");
        report(&pairs, pairs.len());
        return;
    }
    let mut record_file = record.as_deref().map(|path| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        if earlier == 0 {
            writeln!(f, "{header}").unwrap();
        }
        f
    });
    let vigil = vigil_binary();
    let lab = vigil_lab::Lab::open().unwrap_or_else(|e| panic!("{e}"));
    let mut g =
        lab.start("bench-load", vigil_lab::Memory::Shared).unwrap_or_else(|e| panic!("{e}"));

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = if shipped {
        let file = std::fs::read_to_string(repo().join("systemd/vigil.toml")).unwrap();
        let only = file.replace("include = [\"*\"]", &format!("include = [\"{}\"]", g.name));
        assert!(only.contains(&g.name), "systemd/vigil.toml: its [domains] include changed");
        // The lab kernel's profile where the default search path looks
        // (STATE_DIR/guest-profiles).
        let profiles = dir.path().join("guest-profiles");
        std::fs::create_dir_all(&profiles).unwrap();
        for p in std::fs::read_dir(repo().join("guest-profiles")).unwrap() {
            let p = p.unwrap().path();
            if p.extension().is_none_or(|e| e != "profile") {
                continue;
            }
            std::fs::copy(&p, profiles.join(p.file_name().unwrap())).unwrap();
        }
        only
    } else {
        format!(
            "profiles = [\"{}/guest-profiles\"]\n[domains]\ninclude = [\"{}\"]\n[schedule]\nhot_interval = \"{}ms\"\nfull_interval = \"{}ms\"\nsettle = \"3s\"\nattach_retry = \"1s\"\n",
            repo().display(),
            g.name,
            1000 / rate,
            1000 * full_every / rate
        )
    };
    std::fs::write(dir.path().join("vigil.toml"), config).unwrap();
    let name = g.name.clone();
    // The child is handed back to the caller, which stops and waits for it.
    #[allow(clippy::zombie_processes)]
    let start_daemon = || -> Child {
        let mut child = Command::new(&vigil)
            .arg("--state-dir")
            .arg(dir.path())
            .arg("--control-socket")
            .arg(dir.path().join("control.sock"))
            .arg("daemon")
            .arg("--config")
            .arg(dir.path().join("vigil.toml"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Checking: two full checks counted (the first one's baseline settled).
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            std::thread::sleep(Duration::from_millis(250));
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && full_checks(port, &name) >= 2.0
            {
                return child;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon did not start checking {name} in 2 minutes");
            }
        }
    };
    let stop_daemon = |mut c: Child| {
        signal(&c, "-TERM");
        let _ = c.wait();
    };
    // The first start takes the baseline and lets the new boot settle.
    let first = start_daemon();
    std::thread::sleep(Duration::from_secs(8));
    stop_daemon(first);
    g.run(if grind { GRIND } else { WORKLOAD }).unwrap(); // warm up the guest's caches

    // Timed by the guest's own clock, so that the serial console's round
    // trip is not part of it.
    let timed = format!(
        "a=$(cut -d' ' -f1 /proc/uptime); {WORKLOAD}; b=$(cut -d' ' -f1 /proc/uptime); echo \"took $a $b\""
    );
    // The guest's time of a round, and for grind the host's.
    let run = |g: &mut vigil_lab::Guest| -> (f64, Option<f64>) {
        if grind {
            let start = Instant::now();
            let out = g.run(GRIND).unwrap();
            let host = start.elapsed().as_secs_f64();
            let ns: u64 = out
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no timing in grind's answer {out:?}"));
            return (ns as f64 / 1e9, Some(host));
        }
        let out = g.run(&timed).unwrap();
        let times: Vec<f64> = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("took "))
            .map(|t| t.split_whitespace().filter_map(|v| v.parse().ok()).collect())
            .unwrap_or_default();
        assert_eq!(times.len(), 2, "no timing in the guest's answer {out:?}");
        (times[1] - times[0], None)
    };
    let daemon = start_daemon();
    let pid = daemon.id();
    let qemu: u32 = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", g.name))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .expect("QEMU's pid file under /run/libvirt/qemu");
    let freeze = || {
        signal(&daemon, "-STOP");
        // Stopped ('T') before the round starts, else the round is not unchecked.
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_state(pid) != Some('T') {
            assert!(Instant::now() < deadline, "the daemon did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let thaw = || {
        // Metrics cannot be read from a frozen daemon: the count is taken
        // after SIGCONT, and the round starts once it has grown.
        signal(&daemon, "-CONT");
        let total = || {
            let (hot, full) = checks(port, &name);
            hot + full
        };
        let before = total();
        let deadline = Instant::now() + Duration::from_secs(30);
        while total() <= before {
            assert!(
                Instant::now() < deadline,
                "the thawed daemon did not check {name} in 30 s (one frozen for about 30 s has lost its libvirt connection to libvirtd's keepalive)"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    freeze();
    if block_s > 0 {
        let nonce = nonce();
        let workload = if grind {
            format!("grind -f {nonce} </dev/null >/dev/null 2>&1 &")
        } else {
            SHELL_STREAM
                .replace("{N}", &printf_escapes(nonce))
                .replace("{M}", &printf_escapes(!nonce))
        };
        g.run(&workload).unwrap();
        let mut progress = Progress::open(qemu, nonce, !grind);
        // The units done and when; None if the page is lost for 5 s.
        let mut sample = || {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Some(u) = progress.units() {
                    return Some((Instant::now(), u));
                }
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        let found = Instant::now() + Duration::from_secs(30);
        while sample().is_none_or(|(_, u)| u == 0) {
            assert!(
                Instant::now() < found,
                "the workload's progress page not found in {}'s RAM",
                g.name
            );
        }
        std::thread::sleep(Duration::from_secs(3)); // the workload past its start
        let block = Duration::from_secs(block_s);
        println!(
            "guest_load: {rounds} pairs of {block_s} s blocks in {} (TCG), {} running throughout; the daemon checking it {rate} times a second, in full every {full_every} of those{}",
            g.name,
            if grind { "grind -f" } else { "the shell loop" },
            if earlier > 0 { format!("; {earlier} pairs recorded before") } else { String::new() }
        );
        println!("{:>6} {:>12} {:>12} {:>10}", "pair", "stopped", "checking", "slowdown");
        println!("{:>6} {:>25}", "", "(ms per 1000 units)");
        let mut cpu = [[0.0f64; 4]; 2];
        let mut seconds = [0.0f64; 2];
        let (mut lost, mut thawed) = (0usize, false);
        // Checks counted at each freeze (a frozen daemon answers nothing,
        // and a request inside a block would be part of it), over the
        // checking blocks' seconds since the first count.
        let (mut checks_on, mut counted_s, mut last_count) = (0.0, 0.0, None);
        for i in 0..rounds {
            // off on, on off, off on...: a trend cancels, and each block
            // has the other kind beside it.
            let mut pair = [0.0f64; 2];
            let mut whole = true;
            for which in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
                if which == 1 && !thawed {
                    signal(&daemon, "-CONT");
                    thawed = true;
                } else if which == 0 && thawed {
                    let (hot, full) = checks(port, &name);
                    if let Some(last) = last_count {
                        checks_on += hot + full - last;
                    }
                    last_count = Some(hot + full);
                    freeze();
                    thawed = false;
                }
                let cpu_before = host_cpu(pid, qemu);
                let start = sample();
                std::thread::sleep(block);
                let (Some((t0, u0)), Some((t1, u1))) = (start, sample()) else {
                    whole = false;
                    continue;
                };
                let cpu_after = host_cpu(pid, qemu);
                let took = (t1 - t0).as_secs_f64();
                (0..4).for_each(|k| cpu[which][k] += cpu_after[k] - cpu_before[k]);
                seconds[which] += took;
                if which == 1 && last_count.is_some() {
                    counted_s += took;
                }
                pair[which] = 1e6 * took / (u1 - u0).max(1) as f64;
            }
            if !whole {
                lost += 1;
                continue;
            }
            let ratio = pair[1] / pair[0] - 1.0;
            println!("{:>6} {:>12.2} {:>12.2} {:>9.2}%", i + 1, pair[0], pair[1], 100.0 * ratio);
            pairs.push(Pair { times: (pair[0], pair[1]), host: None });
            if let Some(f) = record_file.as_mut() {
                writeln!(f, "{} {}", pair[0], pair[1]).unwrap();
            }
            if (i + 1) % 25 == 0 && i + 1 < rounds {
                let times: Vec<_> = pairs.iter().map(|p| p.times).collect();
                println!(
                    "  after {} pairs: {}",
                    pairs.len(),
                    slowdown(&times).replace('\n', "\n   ")
                );
            }
        }
        if let (true, Some(last)) = (thawed, last_count) {
            let (hot, full) = checks(port, &name);
            checks_on += hot + full - last;
        }
        signal(&daemon, "-CONT");
        stop_daemon(daemon);
        g.destroy();
        println!("this run, {} pairs ({lost} not counted):", rounds - lost);
        println!(
            "  {checks_on:.0} checks in {counted_s:.0} s of checking blocks (all but the first): {:.2} a second",
            checks_on / counted_s
        );
        for (k, who) in
            ["the daemon", "libvirtd", "QEMU's vCPU", "QEMU's other threads"].iter().enumerate()
        {
            println!(
                "  host CPU of {who:<21} stopped {:7.1} ms/s, checking {:7.1} ms/s",
                1000.0 * cpu[0][k] / seconds[0],
                1000.0 * cpu[1][k] / seconds[1]
            );
        }
        report(&pairs, earlier);
        return;
    }

    let (mut off, mut on) = (Vec::new(), Vec::new());
    let (mut hot_on, mut full_on) = (0.0, 0.0);
    // Host CPU seconds per side (stopped, checking), as `host_cpu` orders them.
    let mut cpu = [[0.0f64; 4]; 2];
    println!(
        "guest_load: {rounds} rounds in {} (TCG), the daemon checking it {rate} times a second, in full every {full_every} of those{}",
        g.name,
        if earlier > 0 { format!("; {earlier} pairs recorded before") } else { String::new() }
    );
    println!(
        "{:>6} {:>12} {:>12} {:>10}{}",
        "round",
        "stopped s",
        "checking s",
        "slowdown",
        if grind { "  (then the same timed by the host)" } else { "" }
    );
    // Whether the round before was unchecked (the daemon still frozen).
    let mut frozen_a_round = false;
    // Every round starts `gap` after the last one ended, whatever was done
    // meanwhile (freezing at once, or waiting for a thawed daemon's check):
    // how long the guest idled before a round may change how fast it runs.
    let gap = idle_gap(rate);
    let mut last_end = Instant::now();
    // Rounds that began later than `gap` (a slow check or metrics read),
    // and the longest rest before one.
    let (mut late, mut longest) = (0usize, Duration::ZERO);
    let mut rest = |last_end: Instant| {
        let idle = last_end.elapsed();
        if idle < gap {
            std::thread::sleep(gap - idle);
        } else {
            late += 1;
            longest = longest.max(idle);
        }
    };
    for i in 0..rounds {
        // Alternate which goes first, so that a trend cancels out.
        let mut pair = [0.0f64; 2];
        let mut host = [None; 2];
        for which in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            if which == 0 {
                if frozen_a_round {
                    // Two unchecked rounds in a row: frozen through both, a
                    // daemon answers none of libvirtd's keepalives, which
                    // drops it after about 30 s (5 missed, 5 s apart) once
                    // rounds take over 12 s. It runs a check between them.
                    thaw();
                    freeze();
                }
                frozen_a_round = true;
                rest(last_end);
                let before = host_cpu(pid, qemu);
                (pair[0], host[0]) = run(&mut g);
                last_end = Instant::now();
                let after = host_cpu(pid, qemu);
                (0..4).for_each(|k| cpu[0][k] += after[k] - before[k]);
            } else {
                frozen_a_round = false;
                thaw();
                rest(last_end);
                let before = checks(port, &name);
                let cpu_before = host_cpu(pid, qemu);
                (pair[1], host[1]) = run(&mut g);
                last_end = Instant::now();
                let cpu_after = host_cpu(pid, qemu);
                (0..4).for_each(|k| cpu[1][k] += cpu_after[k] - cpu_before[k]);
                let after = checks(port, &name);
                hot_on += after.0 - before.0;
                full_on += after.1 - before.1;
                freeze();
            }
        }
        let ratio = pair[1] / pair[0] - 1.0;
        let host = host[0].zip(host[1]);
        let by_host = host.map_or(String::new(), |(a, b)| {
            format!(" {a:>12.3} {b:>12.3} {:>9.2}%", 100.0 * (b / a - 1.0))
        });
        println!(
            "{:>6} {:>12.3} {:>12.3} {:>9.2}%{by_host}",
            i + 1,
            pair[0],
            pair[1],
            100.0 * ratio
        );
        off.push(pair[0]);
        on.push(pair[1]);
        pairs.push(Pair { times: (pair[0], pair[1]), host });
        if let Some(f) = record_file.as_mut() {
            match host {
                Some((a, b)) => writeln!(f, "{} {} {a} {b}", pair[0], pair[1]),
                None => writeln!(f, "{} {}", pair[0], pair[1]),
            }
            .unwrap();
        }
        if (i + 1) % 25 == 0 && i + 1 < rounds {
            let times: Vec<_> = pairs.iter().map(|p| p.times).collect();
            println!("  after {} pairs: {}", pairs.len(), slowdown(&times).replace('\n', "\n   "));
        }
    }
    signal(&daemon, "-CONT");
    stop_daemon(daemon);
    g.destroy();
    let (mo, so) = mean_sd(&off);
    let (mn, sn) = mean_sd(&on);
    println!("this run, {rounds} pairs:");
    println!(
        "  every round began {} ms after the last one ended{}",
        gap.as_millis(),
        if late > 0 {
            format!(" but {late}, which waited longer (at most {} ms)", longest.as_millis())
        } else {
            String::new()
        }
    );
    println!("  stopped:  mean {mo:.3} s, sd {so:.3} s");
    println!(
        "  checking: mean {mn:.3} s, sd {sn:.3} s ({full_on:.0} full and {hot_on:.0} hot checks during those rounds)"
    );
    let per_second = |side: usize, k: usize, total: f64| 1000.0 * cpu[side][k] / total;
    let (t_off, t_on) = (off.iter().sum::<f64>(), on.iter().sum::<f64>());
    for (k, who) in
        ["the daemon", "libvirtd", "QEMU's vCPU", "QEMU's other threads"].iter().enumerate()
    {
        println!(
            "  host CPU of {who:<21} stopped {:7.1} ms/s, checking {:7.1} ms/s",
            per_second(0, k, t_off),
            per_second(1, k, t_on)
        );
    }
    report(&pairs, earlier);
}

/// The slowdown over every pair, `earlier` of them from before this run.
fn report(all: &[Pair], earlier: usize) {
    let pairs: Vec<(f64, f64)> = all.iter().map(|p| p.times).collect();
    let ratios: Vec<f64> = pairs.iter().map(|(a, b)| b / a - 1.0).collect();
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    println!(
        "slowdown over {} pairs{} (target <= 1 %; per pair min {:+.2} %, max {:+.2} %):\n  {}",
        pairs.len(),
        if earlier > 0 { format!(" ({earlier} recorded before this run)") } else { String::new() },
        100.0 * lo,
        100.0 * hi,
        slowdown(&pairs)
    );
    let host: Option<Vec<(f64, f64)>> = all.iter().map(|p| p.host).collect();
    if let Some(host) = host {
        println!(
            "the same rounds timed by the host (the console's round trip and grind's start included):"
        );
        println!("  {}", slowdown(&host));
    }
}
