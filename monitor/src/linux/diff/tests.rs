use super::*;

#[test]
fn html_escapes_guest_names_and_links_the_map_to_changes() {
    let c = Change {
        region: "kernel-text".into(),
        kind: FindingKind::Content,
        verdict: Verdict::Violation,
        rule: "jmp to <script>alert(1)</script>".into(),
        gva: GuestVirtAddr(0xffff_ffff_8100_1004),
        gpa: crate::addr::GuestPhysAddr(0x1004),
        symbol: Some("evil\"name".into()),
        bytes: None,
        entry: None,
    };
    let d = Diff {
        format: SCHEMA.into(),
        version: VERSION,
        domain: "web1".into(),
        uuid: "u".into(),
        baseline: "b.json".into(),
        baseline_created: "t".into(),
        checked: "t".into(),
        source: "live".into(),
        profile: None,
        intact: false,
        violations: 1,
        digest: "d1".repeat(32),
        changes: vec![c],
        map: vec![("kernel-text".into(), vec![0xffff_ffff_8100_0000, 0xffff_ffff_8100_1000])],
        hooks_added: vec![HookRecord {
            mechanism: "ftrace ops".into(),
            hooked: "__x64_sys_kill".into(),
            callbacks: vec!["func module <b>rk+0x10".into()],
            redirects: true,
        }],
        hooks_removed: vec![],
        hooks_note: None,
    };
    let h = render_html(&d);
    assert!(h.contains("module &lt;b&gt;rk+0x10") && !h.contains("<b>rk"), "{h}");
    assert!(h.contains("id=\"hooks-added\">Hooks added since the baseline (1)"), "{h}");
    assert!(!h.contains("<script>") && h.contains("&lt;script&gt;"), "{h}");
    assert!(h.contains("evil&quot;name"));
    assert!(h.contains("<i></i><a class=\"violation\" href=\"#c0\""), "{h}");
    assert!(h.contains("<article id=\"c0\" class=\"violation\">"));
    assert!(h.contains(&format!("id=\"digest\">{}</td>", "d1".repeat(32))), "{h}");
    let saved = Diff { source: "ELF core web1.core".into(), ..d.clone() };
    let t = render_text(&saved, Colour::No, 20);
    assert!(t.contains(&format!("\ndiff digest {}\n", "d1".repeat(32))), "{t}");
    assert!(!t.contains("vigil accept"), "a saved diff is not accepted: {t}");
    let t = render_text(&d, Colour::No, 20);
    let line = format!("vigil accept web1 --diff-digest {} --reason", "d1".repeat(32));
    assert!(t.contains(&line), "{t}");
    assert!(
        t.contains(
            "HOOKS ADDED SINCE THE BASELINE (1):\n  + ftrace ops (can redirect): __x64_sys_kill: func module <b>rk+0x10\n"
        ),
        "{t}"
    );
}

/// A report of a check at `checked`, read through `source`, with these
/// findings.
fn report(checked: &str, source: &str, violations: Vec<Finding>, info: Vec<Finding>) -> Report {
    Report {
        domain: "web1".into(),
        uuid: "0f6c1a52-7d38-4bd5-9a51-0d2b3f6c9e11".into(),
        baseline_created: "2026-01-01T00:00:00Z".into(),
        checked: checked.into(),
        source: source.into(),
        intact: violations.is_empty(),
        violations,
        info,
        regions: vec![],
        scope: crate::integrity::check::Scope::Full,
        bytes_verified: 0,
    }
}

fn finding(region: &str, gva: u64, before: &str, after: &str, detail: &str) -> Finding {
    Finding {
        region: region.into(),
        kind: FindingKind::Content,
        severity: Severity::Violation,
        gva: GuestVirtAddr(gva),
        gpa: crate::addr::GuestPhysAddr(gva & 0xff_ffff),
        page: Some(3),
        vcpu: None,
        register: None,
        detail: detail.into(),
        before: before.into(),
        after: after.into(),
        symbol: None,
        entry: None,
    }
}

#[test]
fn the_digest_follows_what_changed_and_nothing_else() {
    let hook = |after: &str| {
        finding("kernel-text", 0xffff_ffff_8100_3004, "0f1f440000", after, "a jmp where a nop was")
    };
    let stuck = |secs: u32| Finding {
        region: "module:vigil_stuck".into(),
        kind: FindingKind::Unlisted,
        page: None,
        detail: format!("module vigil_stuck has been coming for {secs} s"),
        ..finding("module:vigil_stuck", 0xffff_ffff_c000_0000, "live", "coming", "")
    };
    let tightened = Finding {
        kind: FindingKind::Permission,
        severity: Severity::Info,
        ..finding("kernel-rodata", 0xffff_ffff_8200_0000, "rw-", "r--", "made read-only")
    };
    let first = report(
        "2026-01-01T10:00:00Z",
        "live shared RAM",
        vec![hook("e9fbffffff"), stuck(12)],
        vec![tightened.clone()],
    );
    let d = digest(&first);
    assert_eq!(d.len(), 64);
    assert!(d.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()), "{d}");
    // Read again later, another way, the findings listed in another
    // order and worded for their time: the same state, the same digest.
    let mut symbolised = hook("e9fbffffff");
    symbolised.symbol = Some("do_sys_open+0x4".into());
    let later = report(
        "2026-01-01T10:05:00Z",
        "ELF core /tmp/web1.core",
        vec![stuck(312), symbolised],
        vec![tightened.clone()],
    );
    assert_eq!(digest(&later), d);
    // One byte more changed: another digest.
    let rewritten = report(
        "2026-01-01T10:00:00Z",
        "live shared RAM",
        vec![hook("e9fcffffff"), stuck(12)],
        vec![tightened.clone()],
    );
    assert_ne!(digest(&rewritten), d);
    // As do a finding more or less, another verdict, another domain.
    let fewer = report(
        "2026-01-01T10:00:00Z",
        "live shared RAM",
        vec![hook("e9fbffffff")],
        vec![tightened.clone()],
    );
    assert_ne!(digest(&fewer), d);
    let judged = Finding { severity: Severity::Violation, ..tightened.clone() };
    let mut other = report(
        "2026-01-01T10:00:00Z",
        "live shared RAM",
        vec![hook("e9fbffffff"), stuck(12)],
        vec![judged],
    );
    assert_ne!(digest(&other), d);
    other.info = vec![tightened];
    assert_eq!(digest(&other), d);
    other.uuid = "another".into();
    assert_ne!(digest(&other), d);
    // An intact guest has a digest too (what accepting it accepts).
    let intact = report("t", "s", vec![], vec![]);
    assert_eq!(digest(&intact), digest(&report("u", "v", vec![], vec![])));
    assert_ne!(digest(&intact), d);
}

#[test]
fn disassembly_resolves_branch_targets_and_keeps_the_changed_range() {
    // nop; jmp +0x10; ret; int3 ...
    let code = [
        0x90, 0xe9, 0x10, 0, 0, 0, 0xc3, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc, 0xcc,
    ];
    let locate = |a: u64| format!("at {a:#x}");
    let start = |_| None;
    let namer = Namer { locate: &locate, function_start: &start };
    let d = disasm(&code, 0x1000, 0x1001, 0x1006, &namer);
    let texts: Vec<&str> = d.iter().map(|i| i.text.as_str()).collect();
    assert_eq!(texts[..3], ["nop", "jmp 0000000000001016h", "ret"], "{d:#?}");
    assert_eq!(d[1].target.as_deref(), Some("at 0x1016"));
    assert_eq!(d[1].bytes, "e910000000");
}

#[test]
fn the_page_map_travels_as_runs_and_comes_back_whole() {
    let pages = |a: u64, n: u64| (0..n).map(move |i| a + i * PAGE_SIZE);
    let text: Vec<u64> =
        pages(0xffff_ffff_8100_0000, 3).chain(pages(0xffff_ffff_8200_0000, 2)).collect();
    let d = Diff {
        format: SCHEMA.into(),
        version: VERSION,
        domain: "d".into(),
        uuid: "u".into(),
        baseline: "b".into(),
        baseline_created: String::new(),
        checked: String::new(),
        source: String::new(),
        profile: None,
        intact: true,
        violations: 0,
        digest: String::new(),
        changes: vec![],
        map: vec![("kernel-text".into(), text), ("kernel-rodata".into(), vec![])],
        hooks_added: vec![],
        hooks_removed: vec![],
        hooks_note: None,
    };
    let v = serde_json::to_value(&d).unwrap();
    assert_eq!(
        v["map"][0]["runs"],
        serde_json::json!([["0xffffffff81000000", 3], ["0xffffffff82000000", 2]])
    );
    let back: Diff = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(back.map, d.map);
    // A hostile map is refused, not expanded.
    let mut huge = v.clone();
    huge["map"][0]["runs"] = serde_json::json!([["0x1000", u64::MAX]]);
    assert!(serde_json::from_value::<Diff>(huge).is_err());
    let mut wraps = v;
    wraps["map"][0]["runs"] = serde_json::json!([["0xfffffffffffff000", 2]]);
    assert!(serde_json::from_value::<Diff>(wraps).is_err());
}

#[test]
fn hex_round_trips_and_refuses_junk() {
    assert_eq!(unhex("0f1f440000"), Some(vec![0x0f, 0x1f, 0x44, 0, 0]));
    assert_eq!(unhex("abc"), None);
    assert_eq!(unhex("zz"), None);
    assert_eq!(unhex(&"ab".repeat(4097)), None, "longer than a page");
}

#[test]
fn hooks_added_and_gone_are_compared_by_what_they_are() {
    let hook = |hooked: &str, owner: &str| HookRecord {
        mechanism: "kprobe".into(),
        hooked: hooked.into(),
        callbacks: vec![format!("pre_handler {owner}")],
        redirects: true,
    };
    let then = [hook("vfs_read", "kernel kprobe_dispatcher"), hook("a", "module m+0x10")];
    let now = [
        hook("a", "module m+0x10"),
        hook("a", "module m+0x10"),
        hook("vfs_read", "module evil+0x0"),
    ];
    let (added, removed) = compare(&then, &now);
    assert_eq!(added, [hook("vfs_read", "module evil+0x0")]);
    assert_eq!(removed, [hook("vfs_read", "kernel kprobe_dispatcher")]);
    assert_eq!(compare(&now, &now), (vec![], vec![]));
}
