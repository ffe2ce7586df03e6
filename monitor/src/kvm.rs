//! KVM's own statistics of a domain, as libvirt gives them.
//!
//! A host process other than QEMU gets nothing from KVM's file descriptors:
//! KVM answers a VM's and a vCPU's ioctls, its binary statistics ones among
//! them, only in the process that created the VM (taken with
//! `pidfd_getfd`, they answer `EIO`). QEMU reads the statistics for its
//! monitor's `query-stats`, and libvirt (8.9 on) passes them on in its
//! domain statistics: `vm.NAME.TYPE` for the VM, `vcpu.N.NAME.TYPE` for
//! each vCPU, TYPE being `sum` (cumulative), `cur` (instant) or `max`
//! (peak). A TCG guest has none. These come from the host's kernel, never
//! from the guest, so their names may be label values.

use std::collections::BTreeMap;

use crate::sys::virt::{DomainStats, TypedValue};

/// How many distinct statistics of one scope (VM or vCPU) one domain may
/// have: KVM has about 20 of the VM and 40 of a vCPU.
pub const MAX_STATS: usize = 256;

/// The longest statistic name kept (KVM's are under 40 bytes).
const MAX_NAME: usize = 64;

/// What a statistic's value means over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Grows for as long as the VM runs: a count, or nanoseconds spent.
    Cumulative,
    /// A value now.
    Current,
    /// The highest value seen.
    Peak,
}

impl Kind {
    fn from_suffix(s: &str) -> Option<Self> {
        match s {
            "sum" => Some(Kind::Cumulative),
            "cur" => Some(Kind::Current),
            "max" => Some(Kind::Peak),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Cumulative => "cumulative",
            Kind::Current => "current",
            Kind::Peak => "peak",
        }
    }
}

/// Statistics by KVM's name and their kind.
pub type StatMap = BTreeMap<(String, Kind), u64>;

/// One domain's KVM statistics: the VM's, and its vCPUs' taken together
/// (cumulative and current ones summed over the vCPUs, peaks the highest).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvmStats {
    pub vm: StatMap,
    pub vcpu: StatMap,
    /// The vCPUs that had any.
    pub vcpus: u64,
}

impl KvmStats {
    /// True for a domain KVM does not run (TCG), or whose QEMU was busy.
    pub fn is_empty(&self) -> bool {
        self.vm.is_empty() && self.vcpu.is_empty()
    }
}

/// A statistic name as KVM spells them: lower-case letters, digits and
/// underscores.
fn kvm_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A statistic's value as a count: KVM's yes-or-no ones (a vCPU in guest
/// mode, blocking) come as booleans, 1 for yes, so that summed over the
/// vCPUs they count them.
fn unsigned(v: &TypedValue) -> Option<u64> {
    match *v {
        TypedValue::UInt(u) => Some(u),
        TypedValue::Int(i) => u64::try_from(i).ok(),
        TypedValue::Bool(b) => Some(u64::from(b)),
        _ => None,
    }
}

/// The KVM statistics among a domain's libvirt statistics. libvirt's own
/// per-vCPU ones (`vcpu.N.state`, `vcpu.N.time`, ...) have no type suffix
/// and are left out; so are names not like KVM's, values neither unsigned
/// nor boolean, and
/// statistics past [`MAX_STATS`] of a scope.
pub(crate) fn from_domain_stats(d: &DomainStats) -> KvmStats {
    let mut out = KvmStats::default();
    let mut vcpus = std::collections::BTreeSet::new();
    for (name, value) in &d.params {
        let Some(value) = unsigned(value) else { continue };
        let parts: Vec<&str> = name.split('.').collect();
        let (scope, stat, kind) = match parts[..] {
            ["vm", stat, kind] => (None, stat, kind),
            ["vcpu", n, stat, kind] => match n.parse::<u32>() {
                Ok(n) => (Some(n), stat, kind),
                Err(_) => continue,
            },
            _ => continue,
        };
        let Some(kind) = Kind::from_suffix(kind) else { continue };
        if !kvm_name(stat) {
            continue;
        }
        let map = if scope.is_some() { &mut out.vcpu } else { &mut out.vm };
        let key = (stat.to_owned(), kind);
        if !map.contains_key(&key) && map.len() >= MAX_STATS {
            continue;
        }
        if let Some(n) = scope {
            vcpus.insert(n);
        }
        let slot = map.entry(key).or_insert(0);
        *slot = match (scope, kind) {
            // One vCPU's peak is the domain's if highest.
            (Some(_), Kind::Peak) => (*slot).max(value),
            (Some(_), _) => slot.saturating_add(value),
            // The VM's own: one value (a repeat replaces).
            (None, _) => value,
        };
    }
    out.vcpus = vcpus.len() as u64;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(params: &[(&str, TypedValue)]) -> DomainStats {
        DomainStats {
            uuid: "u".into(),
            name: "d".into(),
            params: params.iter().map(|(n, v)| ((*n).to_owned(), v.clone())).collect(),
        }
    }

    #[test]
    fn vcpu_statistics_are_summed_and_peaks_taken_the_highest() {
        use TypedValue::*;
        let s = from_domain_stats(&stats(&[
            ("vcpu.current", UInt(2)),
            ("vcpu.0.state", Int(1)),
            ("vcpu.0.time", UInt(5_000_000)),
            ("vcpu.0.exits.sum", UInt(100)),
            ("vcpu.1.exits.sum", UInt(50)),
            ("vcpu.0.guest_mode.cur", Bool(true)),
            ("vcpu.1.guest_mode.cur", Bool(false)),
            ("vcpu.0.blocking.cur", Bool(true)),
            ("vcpu.1.blocking.cur", Bool(true)),
            ("vcpu.0.halt_poll_fail_ns.max", UInt(7)),
            ("vcpu.1.halt_poll_fail_ns.max", UInt(9)),
            ("vm.remote_tlb_flush.sum", UInt(3)),
            ("vm.pages_4k.cur", UInt(4096)),
            ("vm.max_mmu_page_hash_collisions.max", UInt(2)),
        ]));
        let vcpu = |n: &str, k| s.vcpu.get(&(n.to_owned(), k)).copied();
        let vm = |n: &str, k| s.vm.get(&(n.to_owned(), k)).copied();
        assert_eq!(vcpu("exits", Kind::Cumulative), Some(150));
        // Yes-or-no statistics count the vCPUs for which they hold.
        assert_eq!(vcpu("guest_mode", Kind::Current), Some(1));
        assert_eq!(vcpu("blocking", Kind::Current), Some(2));
        assert_eq!(vcpu("halt_poll_fail_ns", Kind::Peak), Some(9));
        assert_eq!(vm("remote_tlb_flush", Kind::Cumulative), Some(3));
        assert_eq!(vm("pages_4k", Kind::Current), Some(4096));
        assert_eq!(vm("max_mmu_page_hash_collisions", Kind::Peak), Some(2));
        // libvirt's own per-vCPU figures are not KVM's.
        assert_eq!(s.vcpu.len(), 4);
        assert_eq!(s.vm.len(), 3);
        assert_eq!(s.vcpus, 2);
    }

    #[test]
    fn a_tcg_domain_has_none() {
        use TypedValue::*;
        let s = from_domain_stats(&stats(&[
            ("vcpu.current", UInt(1)),
            ("vcpu.maximum", UInt(1)),
            ("vcpu.0.state", Int(1)),
            ("vcpu.0.time", UInt(9)),
            ("vcpu.0.wait", UInt(0)),
            ("vcpu.0.delay", UInt(0)),
        ]));
        assert!(s.is_empty());
        assert_eq!(s.vcpus, 0);
    }

    #[test]
    fn odd_names_and_values_are_left_out() {
        use TypedValue::*;
        let s = from_domain_stats(&stats(&[
            ("vcpu.x.exits.sum", UInt(1)),
            ("vcpu.-1.exits.sum", UInt(1)),
            ("vcpu.0.Exits.sum", UInt(1)),
            ("vcpu.0.exits.avg", UInt(1)),
            ("vcpu.0.exits.sum.more", UInt(1)),
            ("vcpu.0..sum", UInt(1)),
            ("vcpu.0.exits.sum", Int(-1)),
            ("vcpu.0.exits.sum", Double(1.0)),
            ("vcpu.0.exits.sum", Str("1".into())),
            ("vm.a b.sum", UInt(1)),
            ("vm.exits", UInt(1)),
            ("", UInt(1)),
            ("...", UInt(1)),
        ]));
        assert!(s.is_empty(), "{s:?}");
        let long = format!("vm.{}.sum", "a".repeat(MAX_NAME + 1));
        assert!(from_domain_stats(&stats(&[(&long, UInt(1))])).is_empty());
    }

    #[test]
    fn sums_saturate_and_each_scope_is_bounded() {
        let mut params: Vec<(String, TypedValue)> =
            (0..2).map(|n| (format!("vcpu.{n}.exits.sum"), TypedValue::UInt(u64::MAX))).collect();
        for i in 0..(MAX_STATS + 50) {
            params.push((format!("vm.s{i}.sum"), TypedValue::UInt(1)));
            params.push((format!("vcpu.0.s{i}.cur"), TypedValue::UInt(1)));
        }
        let d = DomainStats { uuid: "u".into(), name: "d".into(), params };
        let s = from_domain_stats(&d);
        assert_eq!(s.vcpu.get(&("exits".to_owned(), Kind::Cumulative)), Some(&u64::MAX));
        assert_eq!(s.vm.len(), MAX_STATS);
        assert_eq!(s.vcpu.len(), MAX_STATS);
    }
}
