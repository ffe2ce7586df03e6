//! The Grafana dashboard (`deploy/grafana/vigil.json`) against the metrics
//! the daemon exports: every series a panel's query names is one the daemon
//! has, every label it groups or filters by is one that series carries, and
//! the panels cover what an operator looks at first.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/grafana/vigil.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The sample names the daemon exports, each with the labels it carries,
/// from its own OpenMetrics text: a counter's samples end in `_total`, a
/// histogram's in `_bucket`, `_sum` and `_count` (`le` on the buckets).
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    use vigil::daemon::metrics::*;
    let m = Metrics::new();
    // A sample in each family with labels, so that their label names show
    // (a family with none exports only its type).
    let s = |v: &str| v.to_owned();
    let dom = DomainLabels { domain: s("d") };
    let kind = KindLabels { kind: s("k") };
    m.checks.get_or_create(&CheckLabels { domain: s("d"), scope: s("full") }).inc();
    m.check_duration.get_or_create(&ScopeLabels { scope: s("full") }).observe(0.1);
    m.pages_protected.get_or_create(&RegionLabels { domain: s("d"), region: s("r") }).set(1);
    m.violations
        .get_or_create(&ViolationLabels { domain: s("d"), region: s("r"), kind: s("k") })
        .inc();
    m.events.get_or_create(&kind).inc();
    m.errors.get_or_create(&kind).inc();
    m.patches.get_or_create(&PatchLabels { domain: s("d"), kind: s("k") }).inc();
    m.hooks.get_or_create(&HookLabels { domain: s("d"), mechanism: s("m"), owner: s("o") }).set(1);
    for f in [&m.bytes_verified, &m.evidence_saved, &m.register_snapshots] {
        f.get_or_create(&dom).inc();
    }
    m.last_check.get_or_create(&dom).set(1.0);
    for f in [
        &m.patched_sites,
        &m.pending_sites,
        &m.reference_verified,
        &m.open_violations,
        &m.guest_memory,
    ] {
        f.get_or_create(&dom).set(1);
    }
    // KVM's statistics of a domain KVM runs, one of each scope and kind.
    let mut kvm = vigil::kvm::KvmStats { vcpus: 1, ..Default::default() };
    for kind in [vigil::kvm::Kind::Cumulative, vigil::kvm::Kind::Current, vigil::kvm::Kind::Peak] {
        kvm.vm.insert((s("s"), kind), 1);
        kvm.vcpu.insert((s("s"), kind), 1);
    }
    m.kvm.replace([(s("d"), kvm)].into_iter().collect());
    let text = m.encode();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            let samples: Vec<String> = match kind {
                "counter" => vec![format!("{name}_total")],
                "histogram" => {
                    ["_bucket", "_sum", "_count"].iter().map(|s| format!("{name}{s}")).collect()
                }
                "info" => vec![format!("{name}_info")],
                _ => vec![name.to_owned()],
            };
            for s in samples {
                out.entry(s).or_default();
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let (name, labels) = match line.split_once('{') {
                Some((n, rest)) => (n, rest.split_once('}').map_or("", |(l, _)| l)),
                None => (line.split(' ').next().unwrap(), ""),
            };
            let set = out.entry(name.to_owned()).or_default();
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                set.insert(pair.split('=').next().unwrap().to_owned());
            }
        }
    }
    out
}

/// Every query of every panel, with its panel's title.
fn queries(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        let title = p["title"].as_str().unwrap_or("?").to_owned();
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((title.clone(), t["expr"].as_str().expect("an expr").to_owned()));
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["definition"].as_str() {
            out.push((format!("variable {}", v["name"]), q.to_owned()));
        }
    }
    out
}

/// The `vigil_...` names a query uses.
fn names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("vigil_") {
        let tail = &rest[at..];
        let end =
            tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        out.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The label names a query groups by (`by (...)`) or matches on (`{l=...}`).
fn labels(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("by (") {
        let tail = &rest[at + 4..];
        let end = tail.find(')').unwrap_or(tail.len());
        out.extend(tail[..end].split(',').map(|l| l.trim().to_owned()).filter(|l| !l.is_empty()));
        rest = &tail[end..];
    }
    let mut rest = expr;
    while let Some(at) = rest.find('{') {
        let tail = &rest[at + 1..];
        let end = tail.find('}').unwrap_or(tail.len());
        for m in tail[..end].split(',') {
            let name: String =
                m.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.push(name);
            }
        }
        rest = &tail[end..];
    }
    out
}

#[test]
fn every_panel_names_a_metric_the_daemon_exports() {
    let d = dashboard();
    let have = exported();
    assert!(have.contains_key("vigil_violations_total"), "{have:#?}");
    let qs = queries(&d);
    assert!(qs.len() >= 15, "{} queries", qs.len());
    let mut bad = Vec::new();
    for (title, expr) in &qs {
        let used = names(expr);
        if used.is_empty() {
            bad.push(format!("{title}: {expr} names no vigil metric"));
        }
        for n in &used {
            let Some(carries) = have.get(n) else {
                bad.push(format!("{title}: {n} is not exported"));
                continue;
            };
            // `le` is a histogram bucket's; `domain` filters apply to the
            // metric they follow, each checked here against every name used.
            for l in labels(expr) {
                if l != "le" && !carries.contains(&l) && used.iter().all(|u| !have[u].contains(&l))
                {
                    bad.push(format!("{title}: label {l} is on none of {used:?}"));
                }
            }
        }
    }
    assert!(bad.is_empty(), "{bad:#?}\nexported: {:#?}", have.keys().collect::<Vec<_>>());
}

#[test]
fn the_panels_cover_what_an_operator_looks_at_first() {
    let d = dashboard();
    let all: Vec<String> = queries(&d).into_iter().map(|(_, e)| e).collect();
    for needed in [
        "vigil_domains_attached",
        "vigil_violations_total",
        "vigil_open_violations",
        "vigil_check_duration_seconds_bucket",
        "vigil_budget_used_ratio",
        "vigil_errors_total",
        "vigil_patches_accepted_total",
        "vigil_guest_memory_bytes",
    ] {
        assert!(
            all.iter().any(|e| names(e).iter().any(|n| n == needed)),
            "no panel shows {needed}"
        );
    }
    let panels = d["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids repeat");
    for p in panels.iter().filter(|p| p["type"] != "row") {
        assert!(!p["targets"].as_array().unwrap().is_empty(), "{} has no query", p["title"]);
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
    }
}

/// The checks above can fail: a query naming a metric the daemon does not
/// export is caught, as is a label it does not carry.
#[test]
fn a_panel_naming_a_missing_metric_or_label_would_be_caught() {
    let have = exported();
    assert!(names("rate(vigil_no_such_thing_total[5m])").iter().any(|n| !have.contains_key(n)));
    let carries = &have["vigil_errors_total"];
    assert!(labels("sum by (domain) (vigil_errors_total)").iter().any(|l| !carries.contains(l)));
    assert_eq!(labels("sum by (kind) (vigil_errors_total{kind=~\"a\"})"), ["kind", "kind"]);
}
