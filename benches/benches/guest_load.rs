//! What the daemon costs the guest it watches: a CPU- and memory-bound
//! workload inside a real lab guest (libvirt, QEMU), timed with the daemon
//! checking that guest in full every second and with the daemon stopped, in
//! alternating rounds so that drift hits both alike. One daemon runs
//! throughout; for the unchecked rounds it is frozen with SIGSTOP (it
//! checks nothing, holds no lock), and thawed with SIGCONT for the checked
//! ones, which start once it has checked again.
//!
//!   cargo bench -p vigil-bench --bench guest_load [-- --rounds 8]
//!
//! Needs the lab (lab/setup.sh, libvirtd running) and builds the release
//! `vigil` binary. The workload: a busybox shell counting loop (CPU) and
//! SHA-256 over 64 MiB streamed through a pipe (memory), about 5 s a round
//! under TCG, timed by the guest's clock. Reported: each round's time both
//! ways, the slowdown per pair of rounds, and its mean, median and spread,
//! with a 95 % confidence interval of the mean (also every 25 pairs, so
//! that a long run shows where it stands).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vigil_bench::arg;

const WORKLOAD: &str = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; \
                        dd if=/dev/zero bs=64k count=1024 2>/dev/null | sha256sum >/dev/null";

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

fn full_checks(port: u16, domain: &str) -> f64 {
    let want = format!("vigil_checks_total{{domain=\"{domain}\",scope=\"full\"}} ");
    metrics(port)
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
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

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, var.sqrt())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rounds = usize::try_from(arg("--rounds", 8)).unwrap();
    let vigil = vigil_binary();
    let lab = vigil_lab::Lab::open().unwrap_or_else(|e| panic!("{e}"));
    let mut g =
        lab.start("bench-load", vigil_lab::Memory::Shared).unwrap_or_else(|e| panic!("{e}"));

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "profiles = [\"{}/guest-profiles\"]\n[domains]\ninclude = [\"{}\"]\n[schedule]\nhot_interval = \"1s\"\nfull_interval = \"1s\"\nsettle = \"3s\"\nattach_retry = \"1s\"\n",
        repo().display(),
        g.name
    );
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
    g.run(WORKLOAD).unwrap(); // warm up the guest's caches

    // Timed by the guest's own clock, so that the serial console's round
    // trip is not part of it.
    let timed = format!(
        "a=$(cut -d' ' -f1 /proc/uptime); {WORKLOAD}; b=$(cut -d' ' -f1 /proc/uptime); echo \"took $a $b\""
    );
    let run = |g: &mut vigil_lab::Guest| {
        let out = g.run(&timed).unwrap();
        let times: Vec<f64> = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("took "))
            .map(|t| t.split_whitespace().filter_map(|v| v.parse().ok()).collect())
            .unwrap_or_default();
        assert_eq!(times.len(), 2, "no timing in the guest's answer {out:?}");
        times[1] - times[0]
    };
    let daemon = start_daemon();
    let pid = daemon.id();
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
        let before = full_checks(port, &name);
        let deadline = Instant::now() + Duration::from_secs(30);
        while full_checks(port, &name) <= before {
            assert!(Instant::now() < deadline, "the thawed daemon did not check {name}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    freeze();

    let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut checks_on = 0.0;
    println!(
        "guest_load: {rounds} rounds in {} (TCG), the daemon checking it in full every second",
        g.name
    );
    println!("{:>6} {:>12} {:>12} {:>10}", "round", "stopped s", "checking s", "slowdown");
    for i in 0..rounds {
        // Alternate which goes first, so that a trend cancels out.
        let mut pair = [0.0f64; 2];
        for which in if i % 2 == 0 { [0, 1] } else { [1, 0] } {
            if which == 0 {
                pair[0] = run(&mut g);
            } else {
                thaw();
                let before = full_checks(port, &name);
                pair[1] = run(&mut g);
                checks_on += full_checks(port, &name) - before;
                freeze();
            }
        }
        let slowdown = pair[1] / pair[0] - 1.0;
        println!("{:>6} {:>12.3} {:>12.3} {:>9.2}%", i + 1, pair[0], pair[1], 100.0 * slowdown);
        off.push(pair[0]);
        on.push(pair[1]);
        ratios.push(slowdown);
        if (i + 1) % 25 == 0 && i + 1 < rounds {
            let (mr, sr) = mean_sd(&ratios);
            let half = 1.96 * sr / (ratios.len() as f64).sqrt();
            println!(
                "  after {} pairs: mean {:.2} % (95 % interval {:.2} to {:.2} %)",
                ratios.len(),
                100.0 * mr,
                100.0 * (mr - half),
                100.0 * (mr + half)
            );
        }
    }
    signal(&daemon, "-CONT");
    stop_daemon(daemon);
    g.destroy();
    let (mo, so) = mean_sd(&off);
    let (mn, sn) = mean_sd(&on);
    let (mr, sr) = mean_sd(&ratios);
    let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let median = vigil_bench::percentile(&mut ratios.clone(), 0.5);
    // Normal approximation: the mean's 95 % interval is 1.96 standard errors.
    let half = 1.96 * sr / (rounds as f64).sqrt();
    println!("stopped:  mean {mo:.3} s, sd {so:.3} s");
    println!(
        "checking: mean {mn:.3} s, sd {sn:.3} s ({checks_on:.0} full checks during those rounds)"
    );
    println!(
        "slowdown: mean {:.2} % (95 % interval {:.2} to {:.2} %), median {:.2} %, sd {:.2} %, min {:.2} %, max {:.2} % over {rounds} pairs (target <= 1 %)",
        100.0 * mr,
        100.0 * (mr - half),
        100.0 * (mr + half),
        100.0 * median,
        100.0 * sr,
        100.0 * lo,
        100.0 * hi
    );
}
