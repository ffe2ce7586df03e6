//! A check's report as the Linux layer gives it: the integrity engine's
//! findings (which know nothing of Linux) with what the kernel model adds,
//! the profile it matched, the modules it listed and the patches it
//! accepted. Serialised as one flat object, as `vigil check --json` prints.

use std::collections::BTreeMap;

use crate::integrity::Report;

/// What the kernel model learnt in one check, beyond findings.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelFacts {
    /// The guest profile the kernel matched, if any (semantic checks ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Modules in the guest's module list, when a profile let vigil walk it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    /// Kernel patches accepted by this check, by kind (`jump_label`,
    /// `static_call`, `ftrace`, `kprobe`): sites whose bytes changed since the
    /// last check (or, without one, since the baseline).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub patches: BTreeMap<String, u64>,
    /// Sites that differ from the baseline now, every one a patch the
    /// kernel makes.
    #[serde(skip_serializing_if = "is_zero")]
    pub patched_sites: u64,
    /// Patch sites whose bytes disagree with their records, held for now:
    /// the kernel may be between updating a record and its sites. Each is
    /// judged again at every check and reported if it still disagrees when
    /// its hold ends.
    #[serde(skip_serializing_if = "is_zero")]
    pub pending_sites: u64,
    /// The baseline compared with the vendor's image when it was taken:
    /// `verified`, `mismatch` (its mismatches are among the violations) or
    /// `unavailable`; absent for baselines of earlier versions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The hooks read, counted by mechanism and owner (see
    /// [`crate::linux::hooks::Inventory::counts`]); absent when not read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Vec<crate::linux::hooks::HookCount>>,
    /// Bytes of the guest's tables and records (and what parsing them
    /// made) this check held, drawn from its budget (`limits.guest_memory`);
    /// 0 when no profile matched.
    #[serde(skip_serializing_if = "is_zero")]
    pub guest_memory: u64,
    /// Bytes the watch held from the check before (its baseline, original
    /// pages and page tags, modules' text, patch sites, hooks, symbols),
    /// counted against the same budget first.
    #[serde(skip_serializing_if = "is_zero")]
    pub guest_memory_held: u64,
    /// The budget, in bytes.
    #[serde(skip_serializing_if = "is_zero")]
    pub guest_memory_limit: u64,
    /// The first read the budget refused: that table, and any read after
    /// it past the budget, went unread (a change to the sites they list is
    /// then judged as a write no record explains).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_memory_refused: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The engine's report of one check and the kernel model's facts.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KernelReport {
    #[serde(flatten)]
    pub check: Report,
    #[serde(flatten)]
    pub kernel: KernelFacts,
}

impl KernelReport {
    /// A report with no kernel facts yet.
    pub fn of(check: Report) -> Self {
        KernelReport { check, kernel: KernelFacts::default() }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::integrity::check::Scope;

    /// A report with no finding, for tests.
    pub(crate) fn report() -> Report {
        Report {
            domain: "g".into(),
            uuid: "u".into(),
            baseline_created: "b".into(),
            checked: "c".into(),
            source: "s".into(),
            intact: true,
            violations: Vec::new(),
            info: Vec::new(),
            regions: Vec::new(),
            scope: Scope::Full,
            bytes_verified: 4096,
        }
    }

    #[test]
    fn the_kernel_facts_sit_beside_the_findings_in_one_object() {
        let mut r = KernelReport::of(report());
        let bare = serde_json::to_value(&r).unwrap();
        assert_eq!(bare, serde_json::to_value(report()).unwrap(), "empty facts add no key");
        r.kernel.profile = Some("6.1".into());
        r.kernel.patches.insert("ftrace".into(), 3);
        r.kernel.pending_sites = 1;
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["domain"], "g");
        assert_eq!(v["bytes_verified"], 4096);
        assert_eq!(v["profile"], "6.1");
        assert_eq!(v["patches"]["ftrace"], 3);
        assert_eq!(v["pending_sites"], 1);
        assert!(v.get("patched_sites").is_none() && v.get("modules").is_none());
        assert!(v.get("check").is_none() && v.get("kernel").is_none(), "flattened: {v}");
    }
}
