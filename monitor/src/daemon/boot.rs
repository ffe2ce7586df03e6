//! Whether a watched guest booted again: the decision and its sources.
//!
//! A new baseline is what a rootkit wants most: from then on vigil protects
//! its code. So whether the guest rebooted is decided by the hypervisor, never
//! by the guest. The guest's own state (where its kernel sits now, virtually
//! and physically) is evidence that is weighed against the hypervisor's word,
//! and decides only how a move the hypervisor did not announce is reported.
//!
//! The hypervisor's word, strongest first:
//!
//! ```text
//!  reset     libvirt's reboot event for this domain since the baseline was
//!            taken (a reboot from inside, `virsh reboot`, `virsh reset`);
//!            the daemon was listening when it came
//!  new run   another QEMU process runs the guest than the one the baseline
//!            was taken under (pid and start time, host boot id): the guest
//!            was started, restored or migrated in since
//!  watched   the same QEMU process, and the daemon has listened to libvirt
//!            since it last saw the kernel where the baseline has it: had the
//!            guest been reset, the daemon would know
//!  unknown   the same QEMU process, but the daemon may have missed events:
//!            it was not running, libvirtd was unreachable, or the baseline
//!            predates vigil recording its QEMU process
//! ```
//!
//! Nothing in this module reads anything: it is the table, tested alone.

/// What the hypervisor says of the guest since its stored baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// libvirt reported a reset of the guest's QEMU process since.
    Reset,
    /// Another QEMU process (or host boot) runs the guest now.
    NewRun,
    /// The same QEMU process, listened to without a gap since.
    Watched,
    /// The same QEMU process, or no record of it, and a gap in listening.
    Unknown,
}

/// Where the guest's kernel sits now, against the stored baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The image at the same virtual and physical addresses.
    Same,
    /// At the same virtual address, backed by other guest-physical memory:
    /// what a kernel's own page tables repointed at copies look like. A
    /// reboot moves the virtual placement too, but for one chance in about
    /// 500 (the KASLR slots of the image).
    PhysicalMoved,
    /// At another virtual address as well.
    Moved,
}

/// The stored baseline of the domain, as the attach found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// No file: first sight of this domain.
    Missing,
    /// A file that cannot be used (corrupt, truncated, unreadable, another
    /// domain's).
    Unreadable,
    /// A valid baseline of this domain; where the kernel sits against it.
    Found(Placement),
}

/// What the attach does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Check against the stored baseline: the same boot, whatever the guest
    /// changed since (a moved kernel shows as `remap` findings).
    UseStored,
    /// The hypervisor confirms a new boot: a new baseline, with a `new-boot`
    /// event; `provisional` when the boot is recent enough to still be
    /// patching itself.
    NewBoot { provisional: bool },
    /// No baseline yet: trust on first use, said as such.
    FirstSight { provisional: bool },
    /// The kernel moved and the hypervisor reported no reboot: kept against
    /// the stored baseline, so every moved page is a `remap` finding and the
    /// new frames' bytes are compared with it.
    Remapped,
    /// The kernel moved, virtually too, while vigil could not have heard of a
    /// reset: a new baseline (the old one kept aside), with a warning that
    /// the reboot is not confirmed and when it must have happened.
    Unconfirmed,
    /// The stored baseline cannot be used: a critical event, the file kept
    /// aside, and a new baseline of what is there now, said to be trust on
    /// first use.
    Replace,
}

/// The decision. `recent` says whether the hypervisor started or reset the
/// guest recently enough for its kernel to still be patching itself, by the
/// hypervisor's own account (libvirt's reset event, the QEMU process's start
/// time): a provisional baseline is only ever for such a boot.
pub fn decide(signal: Signal, stored: Stored, recent: bool) -> Action {
    let fresh = recent && matches!(signal, Signal::Reset | Signal::NewRun);
    match (stored, signal) {
        // A guest seen for the first time just after its QEMU process
        // started is booting: its first baseline settles too.
        (Stored::Missing, _) => Action::FirstSight { provisional: recent },
        (Stored::Unreadable, _) => Action::Replace,
        // A reset is a reboot, wherever the new kernel chose to sit (a
        // `nokaslr` guest sits where it sat before).
        (Stored::Found(_), Signal::Reset) => Action::NewBoot { provisional: fresh },
        // A new QEMU process holding the very kernel of the baseline was
        // restored or migrated in: the same boot, writes made meanwhile
        // included.
        (Stored::Found(Placement::Same), Signal::NewRun) => Action::UseStored,
        (Stored::Found(_), Signal::NewRun) => Action::NewBoot { provisional: fresh },
        (Stored::Found(Placement::Same), Signal::Watched | Signal::Unknown) => Action::UseStored,
        (Stored::Found(Placement::PhysicalMoved), Signal::Watched | Signal::Unknown) => {
            Action::Remapped
        }
        (Stored::Found(Placement::Moved), Signal::Watched) => Action::Remapped,
        // A running kernel cannot move its own virtual placement; only a
        // new kernel (a reboot vigil did not hear of, or a kexec) can. With
        // a gap in listening vigil cannot tell them apart: it says so.
        (Stored::Found(Placement::Moved), Signal::Unknown) => Action::Unconfirmed,
    }
}

impl Signal {
    /// The hypervisor's word, from what the daemon knows: whether a reset
    /// was reported since the baseline, whether the QEMU process is the
    /// baseline's, and whether the daemon listened without a gap since it
    /// last saw this process.
    pub fn from_knowledge(reset_reported: bool, same_run: Option<bool>, listened: bool) -> Self {
        match same_run {
            Some(false) => Signal::NewRun,
            _ if reset_reported => Signal::Reset,
            Some(true) if listened => Signal::Watched,
            _ => Signal::Unknown,
        }
    }
}

impl Placement {
    /// Compares where the image sits now with the baseline, as (virtual,
    /// physical) of its first page.
    pub fn of(now: (u64, u64), then: (u64, u64)) -> Self {
        match (now.0 == then.0, now.1 == then.1) {
            (true, true) => Placement::Same,
            (true, false) => Placement::PhysicalMoved,
            (false, _) => Placement::Moved,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNALS: [Signal; 4] = [Signal::Reset, Signal::NewRun, Signal::Watched, Signal::Unknown];
    const PLACEMENTS: [Placement; 3] =
        [Placement::Same, Placement::PhysicalMoved, Placement::Moved];

    /// The whole table, written out as the README states it.
    #[test]
    fn the_decision_table() {
        use Action::*;
        use Placement::*;
        let expected = |s: Signal, p: Placement| match (s, p) {
            (Signal::Reset, _) => NewBoot { provisional: true },
            (Signal::NewRun, Same) => UseStored,
            (Signal::NewRun, _) => NewBoot { provisional: true },
            (Signal::Watched, Same) => UseStored,
            (Signal::Watched, _) => Remapped,
            (Signal::Unknown, Same) => UseStored,
            (Signal::Unknown, PhysicalMoved) => Remapped,
            (Signal::Unknown, Moved) => Unconfirmed,
        };
        for s in SIGNALS {
            for p in PLACEMENTS {
                assert_eq!(decide(s, Stored::Found(p), true), expected(s, p), "{s:?} x {p:?}");
            }
        }
    }

    /// Guest evidence alone never buys a new baseline: without a reset or a
    /// new QEMU process, a moved kernel is reported, and only a gap in
    /// listening together with a virtual move gives the warned-of new one.
    #[test]
    fn no_new_baseline_without_the_hypervisors_word() {
        for p in PLACEMENTS {
            for recent in [false, true] {
                let a = decide(Signal::Watched, Stored::Found(p), recent);
                assert!(matches!(a, Action::UseStored | Action::Remapped), "{p:?}: {a:?}");
            }
        }
        assert_eq!(
            decide(Signal::Unknown, Stored::Found(Placement::PhysicalMoved), true),
            Action::Remapped
        );
    }

    /// Provisional only for a boot the hypervisor reported, and only while
    /// it is recent.
    #[test]
    fn provisional_only_for_a_recent_boot_the_hypervisor_reported() {
        let provisional = |a: Action| {
            matches!(
                a,
                Action::NewBoot { provisional: true } | Action::FirstSight { provisional: true }
            )
        };
        for s in SIGNALS {
            for p in PLACEMENTS {
                let stored = Stored::Found(p);
                assert!(!provisional(decide(s, stored, false)), "{s:?} {p:?} not recent");
                let a = decide(s, stored, true);
                let reported =
                    matches!(s, Signal::Reset) || (s == Signal::NewRun && p != Placement::Same);
                assert_eq!(provisional(a), reported, "{s:?} {p:?}: {a:?}");
            }
            // First sight: provisional while the process's start is recent.
            for recent in [false, true] {
                assert_eq!(
                    decide(s, Stored::Missing, recent),
                    Action::FirstSight { provisional: recent }
                );
            }
            assert!(!provisional(decide(s, Stored::Unreadable, true)));
        }
    }

    /// A file that exists and cannot be used is replaced, said loudly,
    /// whatever the hypervisor says; a missing one is first sight.
    #[test]
    fn stored_state_that_cannot_be_read_is_replaced_never_first_sight() {
        for s in SIGNALS {
            assert_eq!(decide(s, Stored::Unreadable, true), Action::Replace);
            assert!(matches!(decide(s, Stored::Missing, false), Action::FirstSight { .. }));
        }
    }

    #[test]
    fn the_signal_from_what_the_daemon_knows() {
        // Another QEMU process outweighs everything.
        assert_eq!(Signal::from_knowledge(true, Some(false), true), Signal::NewRun);
        assert_eq!(Signal::from_knowledge(false, Some(false), false), Signal::NewRun);
        // A reported reset, in the same process or with no record of it.
        assert_eq!(Signal::from_knowledge(true, Some(true), true), Signal::Reset);
        assert_eq!(Signal::from_knowledge(true, None, false), Signal::Reset);
        // The same process, listened to all along.
        assert_eq!(Signal::from_knowledge(false, Some(true), true), Signal::Watched);
        // A gap, or a baseline without its process recorded.
        assert_eq!(Signal::from_knowledge(false, Some(true), false), Signal::Unknown);
        assert_eq!(Signal::from_knowledge(false, None, true), Signal::Unknown);
    }

    #[test]
    fn placement_compares_both_addresses() {
        assert_eq!(Placement::of((1, 2), (1, 2)), Placement::Same);
        assert_eq!(Placement::of((1, 3), (1, 2)), Placement::PhysicalMoved);
        assert_eq!(Placement::of((5, 2), (1, 2)), Placement::Moved);
        assert_eq!(Placement::of((5, 3), (1, 2)), Placement::Moved);
    }
}
