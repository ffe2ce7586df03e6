//! Whether a watched guest booted again: the decision and its sources.
//!
//! A new baseline is what a rootkit wants most: from then on vigil protects
//! its code. So whether the guest rebooted is decided by the hypervisor, never
//! by the guest. The guest's own state (whether its kernel's code still sits
//! at the baseline's addresses and frames) is evidence weighed against the
//! hypervisor's word: it tells a restored guest from another save, and words
//! a move the hypervisor did not announce.
//!
//! The hypervisor's word, strongest first:
//!
//! ```text
//!  reset     libvirt's reboot event for this domain since the baseline was
//!            taken (a reboot from inside, `virsh reboot`, `virsh reset`);
//!            the daemon was listening when it came
//!  booted    another QEMU process runs the guest than the one the baseline
//!            was taken under, and it booted the guest from its firmware
//!  incoming  another QEMU process, which received the guest's memory
//!            (`-incoming`: a restore or an incoming migration)
//!  watched   the same QEMU process, and the daemon has listened to libvirt
//!            since it last attached it: had the guest been reset, the
//!            daemon would know
//!  unknown   the same QEMU process, but the daemon may have missed events:
//!            it was not running, or libvirtd was unreachable
//! ```
//!
//! Nothing in this module reads anything: it is the table, tested alone.

use crate::integrity::check::CodePlacement;

/// What the hypervisor says of the guest since its stored baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// libvirt reported a reset of the guest since.
    Reset,
    /// A new QEMU process booted the guest from its firmware.
    Booted,
    /// A new QEMU process received the guest's memory (restore, migration).
    Incoming,
    /// The same QEMU process, listened to without a gap since.
    Watched,
    /// The same QEMU process, with a gap in listening since.
    Unknown,
}

/// Where the guest's kernel code sits now, against the stored baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Every code page at its address, on its frame, most with their bytes
    /// (the kernel patches a few pages of its own text as it runs; the
    /// checks judge those bytes as any other change).
    Same,
    /// The same kernel, changed: most code pages still hold the baseline's
    /// bytes at their addresses (some or all on other frames: what a
    /// kernel's own page tables repointed at copies look like), or most
    /// still map their baseline frames (bytes written in place).
    PhysicalMoved,
    /// Most of the baseline's code is gone from its addresses, bytes and
    /// frames both: another kernel, or one at another virtual address. A
    /// running kernel cannot do this to itself; a new boot (or a kexec) does.
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
    /// changed since.
    UseStored,
    /// The hypervisor confirms a new boot: a new baseline, with a `new-boot`
    /// event; `provisional` when the boot is recent enough to still be
    /// patching itself.
    NewBoot { provisional: bool },
    /// No baseline yet: trust on first use, said as such.
    FirstSight { provisional: bool },
    /// The kernel moved pages and the hypervisor reported no reboot: kept
    /// against the stored baseline, so every moved page is a `remap`
    /// finding and the new frames' bytes are compared with it.
    Remapped,
    /// Another kernel, while vigil could not have heard of a reset: a new
    /// baseline (the old one kept aside), with a warning that the reboot is
    /// not confirmed.
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
    use Placement::*;
    let fresh = recent && matches!(signal, Signal::Reset | Signal::Booted);
    match (stored, signal) {
        // A guest seen for the first time just after its QEMU process
        // started is booting: its first baseline settles too.
        (Stored::Missing, _) => Action::FirstSight { provisional: fresh },
        (Stored::Unreadable, _) => Action::Replace,
        // A reset or a boot from firmware is a new kernel, wherever it chose
        // to sit (a `nokaslr` guest sits where it sat before).
        (Stored::Found(_), Signal::Reset | Signal::Booted) => {
            Action::NewBoot { provisional: fresh }
        }
        // Memory received from a save or another host: the baseline's own
        // kernel is the same boot (writes made meanwhile are caught); another
        // kernel came from another save.
        (Stored::Found(Same), Signal::Incoming) => Action::UseStored,
        (Stored::Found(PhysicalMoved), Signal::Incoming) => Action::Remapped,
        (Stored::Found(Moved), Signal::Incoming) => Action::NewBoot { provisional: false },
        (Stored::Found(Same), Signal::Watched | Signal::Unknown) => Action::UseStored,
        (Stored::Found(PhysicalMoved), Signal::Watched | Signal::Unknown) => Action::Remapped,
        (Stored::Found(Moved), Signal::Watched) => Action::Remapped,
        // Only a new kernel moves all the code; with a gap in listening
        // vigil cannot tell a reboot it did not hear of from a kexec: it
        // says so.
        (Stored::Found(Moved), Signal::Unknown) => Action::Unconfirmed,
    }
}

impl Signal {
    /// The hypervisor's word, from what the daemon knows: whether a reset
    /// was reported since the baseline, whether the QEMU process is the
    /// baseline's (unknown for a baseline that does not record it) and if
    /// not whether it received the guest's memory, and whether the daemon
    /// has listened to libvirt without a gap since it last attached this
    /// very process.
    pub fn from_knowledge(
        reset_reported: bool,
        same_run: Option<bool>,
        incoming: bool,
        listened: bool,
    ) -> Self {
        match same_run {
            Some(false) if incoming => Signal::Incoming,
            Some(false) => Signal::Booted,
            _ if reset_reported => Signal::Reset,
            _ if listened => Signal::Watched,
            _ => Signal::Unknown,
        }
    }
}

impl Placement {
    /// Judges the evidence: all code on its frames with its bytes is the
    /// same; most of it holding its bytes at its addresses, or most of it on
    /// its frames, is the same kernel changed (a guest that wants "another
    /// kernel" must take both its bytes and its frames away from more than
    /// half its own running code); anything less is another kernel.
    pub fn of(code: CodePlacement) -> Self {
        let most = |n: u64| n.saturating_mul(2) > code.pages;
        if code.same_frames == code.pages && most(code.same_bytes) {
            Placement::Same
        } else if most(code.same_bytes) || most(code.same_frames) {
            Placement::PhysicalMoved
        } else {
            Placement::Moved
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIGNALS: [Signal; 5] =
        [Signal::Reset, Signal::Booted, Signal::Incoming, Signal::Watched, Signal::Unknown];
    const PLACEMENTS: [Placement; 3] =
        [Placement::Same, Placement::PhysicalMoved, Placement::Moved];

    /// The whole table, written out as the README states it.
    #[test]
    fn the_decision_table() {
        use Action::*;
        use Placement::*;
        let expected = |s: Signal, p: Placement, recent: bool| match (s, p) {
            (Signal::Reset | Signal::Booted, _) => NewBoot { provisional: recent },
            (Signal::Incoming, Same) => UseStored,
            (Signal::Incoming, PhysicalMoved) => Remapped,
            (Signal::Incoming, Moved) => NewBoot { provisional: false },
            (Signal::Watched, Same) => UseStored,
            (Signal::Watched, _) => Remapped,
            (Signal::Unknown, Same) => UseStored,
            (Signal::Unknown, PhysicalMoved) => Remapped,
            (Signal::Unknown, Moved) => Unconfirmed,
        };
        for s in SIGNALS {
            for p in PLACEMENTS {
                for recent in [false, true] {
                    assert_eq!(
                        decide(s, Stored::Found(p), recent),
                        expected(s, p, recent),
                        "{s:?} x {p:?}, recent {recent}"
                    );
                }
            }
        }
    }

    /// Guest evidence alone never buys a new baseline while vigil listens:
    /// in the same QEMU process without a reported reset, whatever the
    /// kernel did, it is checked against the stored baseline. Only a gap in
    /// listening with all the code gone from its addresses gives the
    /// warned-of new one.
    #[test]
    fn no_new_baseline_without_the_hypervisors_word() {
        for p in PLACEMENTS {
            for recent in [false, true] {
                let a = decide(Signal::Watched, Stored::Found(p), recent);
                assert!(matches!(a, Action::UseStored | Action::Remapped), "{p:?}: {a:?}");
                let a = decide(Signal::Unknown, Stored::Found(p), recent);
                let expected =
                    if p == Placement::Moved { Action::Unconfirmed } else { Action::UseStored };
                assert!(a == expected || a == Action::Remapped, "{p:?}: {a:?}");
                // A restore or migration keeps the stored baseline unless all
                // the code is another kernel's.
                let a = decide(Signal::Incoming, Stored::Found(p), recent);
                assert_eq!(
                    matches!(a, Action::NewBoot { .. }),
                    p == Placement::Moved,
                    "{p:?}: {a:?}"
                );
            }
        }
    }

    /// Provisional only for a reset or a boot the hypervisor reported, and
    /// only while it is recent.
    #[test]
    fn provisional_only_for_a_recent_boot_the_hypervisor_reported() {
        let provisional = |a: Action| {
            matches!(
                a,
                Action::NewBoot { provisional: true } | Action::FirstSight { provisional: true }
            )
        };
        for s in SIGNALS {
            let booted = matches!(s, Signal::Reset | Signal::Booted);
            for stored in [
                Stored::Missing,
                Stored::Unreadable,
                Stored::Found(Placement::Same),
                Stored::Found(Placement::Moved),
            ] {
                assert!(!provisional(decide(s, stored, false)), "{s:?} {stored:?} not recent");
                let a = decide(s, stored, true);
                let expected = booted && stored != Stored::Unreadable;
                assert_eq!(provisional(a), expected, "{s:?} {stored:?}: {a:?}");
            }
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
        let k = Signal::from_knowledge;
        // Another QEMU process outweighs everything; how it got the guest
        // says which.
        assert_eq!(k(true, Some(false), false, true), Signal::Booted);
        assert_eq!(k(false, Some(false), true, false), Signal::Incoming);
        // A reported reset, in the same process or with no record of it.
        assert_eq!(k(true, Some(true), false, true), Signal::Reset);
        assert_eq!(k(true, None, false, false), Signal::Reset);
        // The same process (or a baseline without one recorded), listened
        // to all along.
        assert_eq!(k(false, Some(true), false, true), Signal::Watched);
        assert_eq!(k(false, None, false, true), Signal::Watched);
        // A gap.
        assert_eq!(k(false, Some(true), false, false), Signal::Unknown);
        assert_eq!(k(false, None, true, false), Signal::Unknown);
    }

    #[test]
    fn placement_weighs_frames_and_bytes_of_all_the_code() {
        let at = |same_frames, same_bytes| {
            Placement::of(CodePlacement { pages: 100, same_frames, same_bytes })
        };
        assert_eq!(at(100, 100), Placement::Same);
        // A few pages' bytes changed in place (the kernel's own patching, or
        // a write the checks then judge): on its frames, the same.
        assert_eq!(at(100, 99), Placement::Same);
        assert_eq!(at(100, 51), Placement::Same);
        // One page on a copy.
        assert_eq!(at(99, 100), Placement::PhysicalMoved);
        // Every page on a copy: the same kernel, moved.
        assert_eq!(at(0, 100), Placement::PhysicalMoved);
        assert_eq!(at(0, 51), Placement::PhysicalMoved);
        // Bytes written in place on most pages (padding between functions,
        // say): still on its frames, the same kernel changed.
        assert_eq!(at(100, 50), Placement::PhysicalMoved);
        assert_eq!(at(100, 10), Placement::PhysicalMoved);
        assert_eq!(at(51, 0), Placement::PhysicalMoved);
        // Most of the code gone from its addresses: another kernel.
        assert_eq!(at(0, 50), Placement::Moved);
        assert_eq!(at(0, 0), Placement::Moved);
        assert_eq!(at(30, 10), Placement::Moved);
        assert_eq!(at(50, 50), Placement::Moved);
    }
}
