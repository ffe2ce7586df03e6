//! The reference check of a whole kernel (issue 25), once per boot, against
//! a plain read of the same pages, over the captured lab guest.
//!
//!   lab/capture.sh && cargo bench -p vigil-bench --bench reference [-- --rounds 5]
//!
//! The reference is made from the lab's 6.1 image as `vigil profile build`
//! makes it and stored in a temporary directory beside a copy of the
//! committed profile. Reported, as medians of `--rounds` runs:
//!
//! - `plain read`: every text and rodata page read from the capture into a
//!   buffer (the reference);
//! - `compare`: `verify_pages`, the image at the guest's slide against
//!   those pages with every differing run judged by its rewrite site;
//! - `prove`: what a new boot's first baseline pays: the reference file read
//!   and decompressed, its sites listed, the comparison, and the kernel's
//!   records read to judge the run-time sites.

use std::time::Instant;

use vigil::linux::patch::WallClock;
use vigil::linux::reference::{BootWritten, ReferenceFile, Rewrites, prove, verify_pages};
use vigil::linux::region::Region;
use vigil::memory::GuestMemory;
use vigil_bench::{Capture, arg, percentile, start};

fn main() {
    if !start(include_str!("reference.rs"), &["--rounds"]) {
        return;
    }
    let rounds = arg("--rounds", 5).max(1);
    let cap = Capture::load();
    let mut regs =
        vigil::qemu::dump_registers(&cap.core.cpu_notes).expect("the capture's vCPU notes");
    for r in &mut regs {
        r.efer = cap.baseline.registers.iter().find(|o| o.index == r.index).map_or(0, |o| o.efer);
    }
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles");
    let (profiles, _) = vigil::linux::profile::load_dir(&[repo.into()]);
    let mut view = vigil::linux::discover(&cap.core, &regs).expect("the kernel in the capture");
    vigil::linux::layout::bound_view(&profiles, &cap.core, &mut view).expect("layout bounds");
    let m = vigil::linux::semantic::match_profile(
        &profiles,
        &cap.core,
        &view,
        view.identification.image_base,
    )
    .expect("the committed profile matches the captured kernel");
    let release = m.profile.release.clone();

    // The reference, as `vigil profile build` stores it, beside a profile copy.
    let lab = vigil_lab::Lab::open().unwrap_or_else(|e| panic!("{e}"));
    let image = std::fs::read(vigil_lab::Kernel::V6_1.dir(&lab.dir).join("vmlinuz")).unwrap();
    let (vmlinux, _) = vigil::linux::image::vmlinux(&image).unwrap();
    let at = |n: &str| m.profile.symbol(n).unwrap().addr;
    let r = vigil::linux::reference::Reference::from_vmlinux(
        &vmlinux,
        (at("__start_rodata"), at("__end_rodata")),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stored = ReferenceFile::write(&r).unwrap();
    let path = dir.path().join(format!("{release}.reference"));
    std::fs::write(&path, &stored).unwrap();
    let mut w = Rewrites::of(&r).unwrap();
    w.add_run_time(&r, m.profile).unwrap();

    let pages: Vec<_> = view
        .regions
        .iter()
        .filter(|g| Region::Text.is(&g.name) || Region::Rodata.is(&g.name))
        .flat_map(|g| g.pages.iter().map(|p| p.gpa))
        .collect();
    let mut buf = vec![0u8; pages.len() * vigil::addr::PAGE_BYTES];
    let time = |f: &mut dyn FnMut()| -> f64 {
        let mut v: Vec<f64> = (0..rounds)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect();
        percentile(&mut v, 0.5)
    };
    let plain = time(&mut || {
        for (gpa, b) in pages.iter().zip(buf.chunks_exact_mut(vigil::addr::PAGE_BYTES)) {
            cap.core.read(*gpa, b).unwrap();
        }
        std::hint::black_box(&buf);
    });
    let syms = m.profile.symbols();
    let slide = m.slide;
    let names = |a: u64| {
        let a = a.wrapping_sub(slide);
        let here: Vec<&str> = syms[syms.partition_point(|s| s.addr < a)..]
            .iter()
            .take_while(|s| s.addr == a)
            .map(|s| s.name.as_str())
            .collect();
        vigil::linux::reference::telling_name(&here).map(str::to_owned)
    };
    let slot = |a: u64| {
        vigil::linux::semantic::read_virt(&cap.core, &view, a, 8)
            .map(|(b, _)| u64::from_le_bytes(b[..8].try_into().unwrap()))
    };
    let boot = BootWritten::of(m.profile);
    let mut refused = 0;
    let compare = time(&mut || {
        let v = verify_pages(&r, &w, &cap.core, &view.regions, slide, (&names, &slot), &boot);
        refused = v
            .differences
            .iter()
            .filter(|j| j.judgement == vigil::linux::reference::Judgement::Refused)
            .count();
    });
    let mut state = String::new();
    let proved = time(&mut || {
        let p = prove(&cap.core, &view, &profiles, Some(&path), &WallClock);
        state = p.check.state.as_str().to_owned();
    });
    let mib = buf.len() as f64 / f64::from(1 << 20);
    println!(
        "reference check of {release}: {} pages ({mib:.1} MiB) of text and rodata, {rounds} rounds",
        pages.len()
    );
    println!("  reference stored: {} bytes; {} rewrite sites", stored.len(), w.sites.len());
    println!("  plain read   {:>9.2} ms", plain * 1e3);
    println!(
        "  compare      {:>9.2} ms   {:>6.1} x plain read ({refused} refused runs)",
        compare * 1e3,
        compare / plain
    );
    println!(
        "  prove        {:>9.2} ms   {:>6.1} x plain read (reference {state})",
        proved * 1e3,
        proved / plain
    );
}
