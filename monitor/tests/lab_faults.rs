//! Lab tests of a watch whose guest memory misbehaves: a real guest (libvirt,
//! QEMU), read through a fault-injecting wrapper (`memory::faults`). A read
//! error, a short read or a RAM mapping that is gone makes a check fail with
//! an error that says so, never a panic or a verdict on bytes not read, and
//! the next check after the fault clears is whole again.
//!
//! Needs the lab prepared and libvirtd running (`lab/test.sh` does both).

use std::path::Path;

use vigil::addr::PAGE_SIZE;
use vigil::daemon::watch::{Guest, Watched};
use vigil::integrity::check::Scope;
use vigil::libvirt::{GuestDomain, LibvirtError};
use vigil::memory::GuestMemory;
use vigil::memory::faults::{FaultPlan, Faults, Faulty};

mod common;
use common::boot;

/// A libvirt domain whose memory is read through a [`Faulty`] wrapper.
struct FaultyGuest {
    dom: GuestDomain,
    plan: FaultPlan,
}

impl Guest for FaultyGuest {
    fn name(&self) -> &str {
        Guest::name(&self.dom)
    }
    fn uuid(&self) -> &str {
        Guest::uuid(&self.dom)
    }
    fn ensure_running(&self) -> Result<(), LibvirtError> {
        Guest::ensure_running(&self.dom)
    }
    fn registers(&self) -> Result<Vec<vigil::qemu::VcpuRegisters>, LibvirtError> {
        Guest::registers(&self.dom)
    }
    fn open_memory(&self) -> Result<Box<dyn GuestMemory + Send + Sync>, LibvirtError> {
        Ok(Box::new(Faulty::new(Guest::open_memory(&self.dom)?, self.plan.clone())))
    }
    fn memory_bytes(&self) -> Result<u64, LibvirtError> {
        Guest::memory_bytes(&self.dom)
    }
    fn dump_memory(&self, path: &Path) -> Result<(), LibvirtError> {
        Guest::dump_memory(&self.dom, path)
    }
}

#[test]
fn lab_faults_in_guest_memory_fail_a_check_and_it_recovers() {
    let g = boot("faults");
    let hv = vigil::libvirt::Hypervisor::connect("qemu:///system").unwrap();
    let plan = FaultPlan::default();
    let guest = FaultyGuest { dom: hv.domain(&g.name).unwrap(), plan: plan.clone() };
    let state = tempfile::tempdir().unwrap();
    let (mut w, _) = Watched::attach_guest(Box::new(guest), state.path(), false).unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-profiles");
    let (profiles, bad) = vigil::linux::profile::load_dir(&[dir]);
    assert!(bad.is_empty(), "{bad:?}");
    let check = |w: &mut Watched| w.check(Scope::Full, &profiles);
    check(&mut w).unwrap_or_else(|e| panic!("the first check: {e}"));

    let text = w.baseline.regions.iter().find(|r| r.name == "kernel-text").unwrap();
    let page = text.pages[text.pages.len() / 2].gpa;
    for (faults, what) in [
        (Faults { fail: Some((page, PAGE_SIZE)), ..Faults::default() }, "a read error"),
        (Faults { short: Some((page, PAGE_SIZE)), ..Faults::default() }, "a short read"),
        (Faults { gone: true, ..Faults::default() }, "the mapping gone"),
    ] {
        *plan.lock().unwrap() = faults;
        let e = match check(&mut w) {
            Ok(r) => {
                panic!("{what}: the check passed: intact {} {:?}", r.intact, r.violations.first())
            }
            Err(e) => e.to_string(),
        };
        assert!(!e.is_empty(), "{what}");
        eprintln!("{what}: {e}");
        *plan.lock().unwrap() = Faults::default();
        let r = check(&mut w).unwrap_or_else(|e| panic!("after {what}, the next check: {e}"));
        assert!(
            r.violations.iter().all(|v| v.region != "kernel-text"),
            "after {what}: {:?}",
            r.violations
        );
    }
}
