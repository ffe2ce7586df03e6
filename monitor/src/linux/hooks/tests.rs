//! The inventory read from generated guest memory laid out as the lab's
//! 6.1 kernel lays out its records (offsets and symbols from its profile),
//! and the policy's verdicts.

use std::collections::HashMap;

use super::*;
use crate::addr::GuestVirtAddr;
use crate::linux::profile::Profile;
use crate::linux::semantic::Module;
use crate::memory::RawDump;
use crate::x86::{Mapping, Perms};

fn lab_profile() -> Profile {
    let path =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles/6.1.0-56-cloud-amd64.profile");
    Profile::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Guest memory built page by page at chosen virtual addresses.
#[derive(Default)]
struct Ram {
    bytes: Vec<u8>,
    pages: HashMap<u64, u64>,
}

impl Ram {
    fn page(&mut self, gva: u64) -> usize {
        let page = gva & !(PAGE_SIZE - 1);
        let next = self.bytes.len() as u64;
        let gpa = *self.pages.entry(page).or_insert(next);
        if gpa == next {
            self.bytes.resize(self.bytes.len() + 4096, 0);
        }
        usize::try_from(gpa + (gva - page)).unwrap()
    }

    fn put(&mut self, gva: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let at = self.page(gva + i as u64);
            self.bytes[at] = *b;
        }
    }

    fn u64(&mut self, gva: u64, v: u64) {
        self.put(gva, &v.to_le_bytes());
    }

    fn done(self) -> (RawDump, Space) {
        (RawDump::from_bytes(self.bytes), Space(self.pages))
    }
}

struct Space(HashMap<u64, u64>);

impl AddressSpace for Space {
    fn image_pages(&self) -> &[Mapping] {
        &[]
    }
    fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, Perms)> {
        self.0
            .get(&gva.page_floor().raw())
            .map(|&p| (GuestPhysAddr(p), Perms { writable: true, user: false, executable: false }))
    }
}

const BASE: u64 = 0xffff_ffff_c010_0000;
/// The module's text, its data (records), and a page nothing owns.
const TEXT: u64 = BASE;
const DATA: u64 = BASE + 0x2000;
const NOWHERE: u64 = BASE + 0x20_0000;

fn module() -> Module {
    Module {
        name: "rk".into(),
        addr: DATA + 0x800,
        base: BASE,
        size: 0x1000,
        text_size: 0x1000,
        state: 0,
        init: (0, 0),
        data: (DATA, 0x1000),
    }
}

/// A guest with the kernel's hook lists empty (ftrace's ends at
/// `ftrace_list_end`, no kprobes, no die notifiers).
struct Guest {
    p: Profile,
    ram: Ram,
}

impl Guest {
    fn new() -> Self {
        let p = lab_profile();
        let mut ram = Ram::default();
        let sym = |n: &str| p.symbol(n).unwrap().addr;
        ram.u64(sym("ftrace_ops_list"), sym("ftrace_list_end"));
        for i in 0..64 {
            ram.u64(sym("kprobe_table") + i * 8, 0);
        }
        let head = p.offset("atomic_notifier_head.head").unwrap();
        ram.u64(sym("die_chain") + head, 0);
        // Empty BPF kallsyms.
        ram.u64(sym("bpf_kallsyms"), sym("bpf_kallsyms"));
        ram.put(TEXT, &[0x90; 64]);
        // ftrace's callers, which a trampoline is a copy of.
        ram.put(sym("ftrace_caller"), &[0x55; 16]);
        ram.put(sym("ftrace_regs_caller"), &[0x56; 16]);
        Guest { p, ram }
    }

    fn sym(&self, n: &str) -> u64 {
        self.p.symbol(n).unwrap_or_else(|| panic!("no {n}")).addr
    }

    fn off(&self, k: &str) -> u64 {
        self.p.offset(k).unwrap_or_else(|| panic!("no {k}"))
    }

    /// Links an ftrace ops at `at` first on ftrace's list, filtering `ips`
    /// (none: every function), with its hash at `at + 0x400`.
    fn ops(&mut self, at: u64, func: u64, flags: u64, tramp: u64, ips: &[u64]) {
        let list = self.sym("ftrace_ops_list");
        let first = u64::from_le_bytes(self.read(list, 8).try_into().unwrap());
        let (hash, buckets, entries) = (at + 0x400, at + 0x500, at + 0x600);
        let o = |k: &str| self.off(k);
        let (next, f, fl, tr, size, fh, filter) = (
            o("ftrace_ops.next"),
            o("ftrace_ops.func"),
            o("ftrace_ops.flags"),
            o("ftrace_ops.trampoline"),
            o("ftrace_ops.trampoline_size"),
            o("ftrace_ops.func_hash"),
            o("ftrace_ops_hash.filter_hash"),
        );
        let (bits, bk, count, ip_off) = (
            o("ftrace_hash.size_bits"),
            o("ftrace_hash.buckets"),
            o("ftrace_hash.count"),
            o("ftrace_func_entry.ip"),
        );
        self.ram.u64(at + next, first);
        self.ram.u64(at + f, func);
        self.ram.u64(at + fl, flags);
        self.ram.u64(at + tr, tramp);
        self.ram.put(at + size, &0x100u32.to_le_bytes());
        // func_hash points at a hash pair beside the ops.
        self.ram.u64(at + fh, at + 0x300);
        self.ram.u64(at + 0x300 + filter, hash);
        self.ram.u64(hash + bits, 0);
        self.ram.u64(hash + bk, buckets);
        self.ram.u64(hash + count, ips.len() as u64);
        // One bucket: the entries chained.
        let mut head = 0;
        for (i, ip) in ips.iter().enumerate() {
            let e = entries + i as u64 * 0x20;
            self.ram.u64(e, head);
            self.ram.u64(e + ip_off, *ip);
            head = e;
        }
        self.ram.u64(buckets, head);
        self.ram.u64(list, at);
    }

    /// Hangs a kprobe at `at` on bucket 0 of the kprobe table.
    fn kprobe(&mut self, at: u64, addr: u64, pre: u64) {
        let table = self.sym("kprobe_table");
        let first = u64::from_le_bytes(self.read(table, 8).try_into().unwrap());
        let hlist = self.off("kprobe.hlist");
        self.ram.u64(at + hlist, first);
        self.ram.u64(at + self.off("kprobe.addr"), addr);
        self.ram.u64(at + self.off("kprobe.pre_handler"), pre);
        self.ram.u64(at + self.off("kprobe.post_handler"), 0);
        self.ram.put(at + self.off("kprobe.flags"), &0u32.to_le_bytes());
        self.ram.u64(table, at + hlist);
    }

    fn die_notifier(&mut self, at: u64, call: u64) {
        let head = self.sym("die_chain") + self.off("atomic_notifier_head.head");
        let first = u64::from_le_bytes(self.read(head, 8).try_into().unwrap());
        self.ram.u64(at + self.off("notifier_block.notifier_call"), call);
        self.ram.u64(at + self.off("notifier_block.next"), first);
        self.ram.u64(head, at);
    }

    fn read(&mut self, gva: u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| {
                let at = self.ram.page(gva + i as u64);
                self.ram.bytes[at]
            })
            .collect()
    }

    fn inventory(self) -> Inventory {
        let p = self.p;
        let (mem, space) = self.ram.done();
        let m = Matched { profile: &p, modules: vec![module()], slide: 0, idt_slide: None };
        Inventory::read(&m, &mem, &space)
    }
}

fn verdicts(inv: &Inventory, allow: &[&str]) -> Vec<(Severity, String)> {
    let policy = HookPolicy { allow: allow.iter().map(|a| a.parse().unwrap()).collect() };
    policy.judge(inv).into_iter().map(|f| (f.severity, f.detail)).collect()
}

#[test]
fn a_modules_ipmodify_ftrace_hook_is_a_violation_unless_allowed() {
    let mut g = Guest::new();
    let target = g.sym("__x64_sys_getppid");
    g.ops(DATA, TEXT + 0x10, FL_ENABLED | FL_SAVE_REGS | FL_IPMODIFY, 0, &[target]);
    let inv = g.inventory();
    assert!(inv.unread.is_empty(), "{:?}", inv.unread);
    let h = &inv.hooks[0];
    assert_eq!(
        (h.mechanism, h.redirects, h.hooked.clone()),
        (Mechanism::Ftrace, true, vec!["__x64_sys_getppid".to_owned()])
    );
    assert_eq!(h.callbacks[0].owner, Owner::Module { name: "rk".into(), offset: 0x10 });
    let v = verdicts(&inv, &[]);
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].0, Severity::Violation);
    for word in ["__x64_sys_getppid", "module rk+0x10", "ftrace ops", "IPMODIFY"] {
        assert!(v[0].1.contains(word), "{word} not in {}", v[0].1);
    }
    // Allowed: information. Allowed on another function: still a violation.
    assert_eq!(verdicts(&inv, &["rk"])[0].0, Severity::Info);
    assert_eq!(verdicts(&inv, &["rk:__x64_sys_getppid"])[0].0, Severity::Info);
    assert_eq!(verdicts(&inv, &["rk:__x64_sys_kill"])[0].0, Severity::Violation);
    assert_eq!(verdicts(&inv, &["other"])[0].0, Severity::Violation);
}

#[test]
fn a_modules_observing_ftrace_hook_is_information_and_the_kernels_is_not_said() {
    let mut g = Guest::new();
    let target = g.sym("__x64_sys_getppid");
    let tracer = g.sym("function_trace_call");
    g.ops(DATA, TEXT + 0x10, FL_ENABLED, 0, &[target]);
    g.ops(DATA + 0x800, tracer, FL_ENABLED | FL_SAVE_REGS, 0, &[]);
    let inv = g.inventory();
    assert_eq!(inv.hooks.len(), 2, "{inv:#?}");
    assert!(inv.hooks[0].every_function, "the tracer's ops filters nothing");
    assert_eq!(inv.hooks[1].hooked, ["__x64_sys_getppid"], "the module's ops filters one");
    let v = verdicts(&inv, &[]);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, Severity::Info);
    assert!(v[0].1.contains("observation only"), "{}", v[0].1);
}

#[test]
fn a_forged_ops_is_a_violation_whatever_is_allowed() {
    // Its trampoline is the module's own code, not a copy ftrace made.
    let mut g = Guest::new();
    g.ops(DATA, TEXT + 0x10, 0, TEXT, &[g.sym("__x64_sys_getppid")]);
    let inv = g.inventory();
    assert!(inv.hooks[0].forged[0].contains("lies in module rk"), "{:?}", inv.hooks[0].forged);
    let v = verdicts(&inv, &["rk"]);
    assert_eq!(v[0].0, Severity::Violation);
    assert!(v[0].1.contains("forged record"), "{}", v[0].1);

    // A trampoline of its own page in the module area, but no copy of
    // ftrace's caller.
    let mut g = Guest::new();
    g.ram.put(NOWHERE, &[0xcc; 32]);
    g.ops(DATA, TEXT + 0x10, 0, NOWHERE, &[]);
    let forged = &g.inventory().hooks[0].forged;
    assert!(forged[0].contains("no copy of ftrace's caller"), "{forged:?}");

    // A copy of the caller there is believed, and owned by ftrace.
    let mut g = Guest::new();
    let caller = g.sym("ftrace_regs_caller");
    let copy = g.read(caller, 16);
    g.ram.put(NOWHERE, &copy);
    g.ops(DATA, TEXT + 0x10, 0, NOWHERE, &[]);
    let inv = g.inventory();
    assert!(inv.hooks[0].forged.is_empty(), "{:?}", inv.hooks[0].forged);
    assert!(matches!(inv.hooks[0].callbacks[1].owner, Owner::Kernel { .. }));

    // Linked in the module's text, or with no hash: never ftrace's.
    let mut g = Guest::new();
    g.ops(TEXT + 0x100, TEXT + 0x10, 0, 0, &[]);
    assert!(g.inventory().hooks[0].forged[0].contains("module rk's text"));
    let mut g = Guest::new();
    g.ops(DATA, TEXT + 0x10, 0, 0, &[]);
    let fh = g.off("ftrace_ops.func_hash");
    g.ram.u64(DATA + fh, 0);
    let inv = g.inventory();
    assert!(inv.hooks[0].forged[0].contains("no function hash"), "{:?}", inv.hooks[0].forged);
}

#[test]
fn a_callback_inside_a_kernel_function_is_a_violation() {
    let mut g = Guest::new();
    let gadget = g.sym("kprobe_dispatcher") + 0x37;
    g.kprobe(DATA, g.sym("__x64_sys_getppid"), gadget);
    let v = verdicts(&g.inventory(), &["rk"]);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, Severity::Violation);
    assert!(v[0].1.contains("inside the kernel function kprobe_dispatcher+0x37"), "{}", v[0].1);
}

#[test]
fn a_bpf_image_owns_only_module_area_memory_apart_from_modules() {
    // bpf_kallsyms with one entry, whose range is given.
    let with_image = |start: u64, end: u64| {
        let mut g = Guest::new();
        let (head, lnode) = (g.sym("bpf_kallsyms"), g.off("bpf_ksym.lnode"));
        let k = DATA + 0x800;
        g.ram.u64(head, k + lnode);
        g.ram.u64(k + lnode, head);
        g.ram.u64(k + g.off("bpf_ksym.start"), start);
        g.ram.u64(k + g.off("bpf_ksym.end"), end);
        g.ram.put(k + g.off("bpf_ksym.name"), b"bpf_prog_1234_probe\0");
        g.kprobe(DATA, g.sym("__x64_sys_getppid"), NOWHERE + 0x40);
        g.inventory()
    };
    let inv = with_image(NOWHERE, NOWHERE + 0x100);
    assert_eq!(inv.bpf.len(), 1);
    assert_eq!(inv.bpf[0].name, "bpf_prog_1234_probe");
    assert_eq!(inv.hooks[0].callbacks[0].owner, Owner::Bpf { name: "bpf_prog_1234_probe".into() });
    assert!(verdicts(&inv, &[]).is_empty(), "a BPF program's hook is not said");
    // An entry claiming kernel text or a module's text owns nothing.
    let text = Guest::new().sym("kprobe_dispatcher");
    assert!(with_image(text, text + 0x100).bpf.is_empty());
    assert!(with_image(TEXT, TEXT + 0x100).bpf.is_empty());
}

#[test]
fn a_callback_in_no_known_code_is_a_violation() {
    let mut g = Guest::new();
    g.ops(DATA, NOWHERE + 0x40, 0, 0, &[]);
    let inv = g.inventory();
    assert_eq!(inv.hooks[0].callbacks[0].owner, Owner::Unknown);
    let v = verdicts(&inv, &["rk"]);
    assert_eq!(v[0].0, Severity::Violation);
    assert!(v[0].1.contains("no kernel text, listed module or BPF image"), "{}", v[0].1);
}

#[test]
fn kprobes_and_die_notifiers_of_modules_can_redirect() {
    let mut g = Guest::new();
    let target = g.sym("__x64_sys_getppid");
    g.kprobe(DATA, target, TEXT + 0x20);
    g.kprobe(DATA + 0x200, target + 4, g.sym("kprobe_dispatcher"));
    g.die_notifier(DATA + 0x400, TEXT + 0x30);
    g.die_notifier(DATA + 0x500, g.sym("kprobe_exceptions_notify"));
    let inv = g.inventory();
    assert!(inv.unread.is_empty(), "{:?}", inv.unread);
    assert_eq!(inv.hooks.len(), 4, "{inv:#?}");
    let v = verdicts(&inv, &[]);
    assert_eq!(v.len(), 2, "{v:?}");
    assert!(v.iter().all(|(s, _)| *s == Severity::Violation));
    assert!(v.iter().any(|(_, d)| d.contains("kprobe") && d.contains("__x64_sys_getppid")));
    assert!(v.iter().any(|(_, d)| d.contains("die notifier") && d.contains("int3")));
    assert!(verdicts(&inv, &["rk"]).iter().all(|(s, _)| *s == Severity::Info));
}

#[test]
fn an_aggregate_kprobe_lists_each_probe_and_a_kretprobe_its_handlers() {
    let mut g = Guest::new();
    let target = g.sym("__x64_sys_getppid");
    // The aggregate in the table, two probes on its list.
    let aggr = DATA;
    g.kprobe(aggr, target, g.sym("aggr_pre_handler"));
    let list = g.off("kprobe.list");
    let (a, b) = (DATA + 0x200, DATA + 0x400);
    g.ram.u64(aggr + list, a + list);
    g.ram.u64(a + list, b + list);
    g.ram.u64(b + list, aggr + list);
    for (kp, pre) in [(a, TEXT + 0x20), (b, g.sym("pre_handler_kretprobe"))] {
        g.ram.u64(kp + g.off("kprobe.addr"), target);
        g.ram.u64(kp + g.off("kprobe.pre_handler"), pre);
    }
    // b is a kretprobe's kprobe: its handlers are the module's.
    let rp = b - g.off("kretprobe.kp");
    g.ram.u64(rp + g.off("kretprobe.handler"), TEXT + 0x40);
    g.ram.u64(rp + g.off("kretprobe.entry_handler"), 0);
    let inv = g.inventory();
    let kinds: Vec<Mechanism> = inv.hooks.iter().map(|h| h.mechanism).collect();
    assert_eq!(kinds, [Mechanism::Kprobe, Mechanism::Kretprobe], "{inv:#?}");
    assert_eq!(inv.hooks[1].callbacks[0].role, "handler");
    assert_eq!(inv.hooks[1].callbacks[0].owner, Owner::Module { name: "rk".into(), offset: 0x40 });
}

#[test]
fn hostile_lists_are_bounded_errors_not_hangs() {
    // An ops list that loops.
    let mut g = Guest::new();
    g.ops(DATA, TEXT, 0, 0, &[]);
    let next = g.off("ftrace_ops.next");
    g.ram.u64(DATA + next, DATA);
    let inv = g.inventory();
    assert!(inv.unread.iter().any(|u| u.contains("loops")), "{:?}", inv.unread);

    // A hash with more buckets than ftrace makes, and one whose chain loops.
    let mut g = Guest::new();
    g.ops(DATA, TEXT, 0, 0, &[0xffff_ffff_8100_0000]);
    let bits = g.off("ftrace_hash.size_bits");
    g.ram.u64(DATA + 0x400 + bits, 40);
    let forged = &g.inventory().hooks[0].forged;
    assert!(forged[0].contains("size bits"), "{forged:?}");
    let mut g = Guest::new();
    g.ops(DATA, TEXT, 0, 0, &[0xffff_ffff_8100_0000]);
    g.ram.u64(DATA + 0x600, DATA + 0x600);
    let forged = &g.inventory().hooks[0].forged;
    assert!(forged[0].contains("loops"), "{forged:?}");

    // A kprobe chain that loops, a die chain that loops.
    let mut g = Guest::new();
    g.kprobe(DATA, 0, TEXT);
    let hlist = g.off("kprobe.hlist");
    g.ram.u64(DATA + hlist, DATA + hlist);
    g.die_notifier(DATA + 0x400, TEXT);
    let next = g.off("notifier_block.next");
    g.ram.u64(DATA + 0x400 + next, DATA + 0x400);
    let inv = g.inventory();
    assert_eq!(inv.unread.len(), 2, "{:?}", inv.unread);
    assert!(inv.unread.iter().all(|u| u.contains("loops")), "{:?}", inv.unread);
    // What was read before a list broke off is still listed and judged.
    assert_eq!(inv.hooks.len(), 2, "{inv:#?}");
    assert_eq!(verdicts(&inv, &[]).len(), 2);
}

#[test]
fn the_filters_are_read_within_a_budget_and_the_rest_is_said() {
    // Hashes of 4096 buckets each: the budget runs out after 16 ops.
    let mut g = Guest::new();
    let bits = g.off("ftrace_hash.size_bits");
    for i in 0..20u64 {
        let at = BASE + 0x1_0000 + i * 0x2000;
        g.ops(at, TEXT, 0, 0, &[0xffff_ffff_8100_0000]);
        g.ram.u64(at + 0x400 + bits, 12);
    }
    // (each ops' record lies in unowned module-area memory: forged, but read)
    let inv = g.inventory();
    assert_eq!(inv.hooks.len(), 20);
    assert!(inv.unread.iter().any(|u| u.contains("the rest not read")), "{:?}", inv.unread);
    let unread =
        inv.hooks.iter().filter(|h| h.hooked.iter().any(|p| p.contains("not read"))).count();
    assert!(unread > 0 && unread < 20, "{unread} of 20 filters unread");
    assert!(inv.hooks.iter().all(|h| !h.every_function), "an unread filter is no empty one");
}

#[test]
fn allowed_modules_parse_and_refuse_what_names_none() {
    let a: Allowed = "falcon_lsm".parse().unwrap();
    assert_eq!((a.module.as_str(), a.symbol), ("falcon_lsm", None));
    let a: Allowed = "agent:__x64_sys_kill".parse().unwrap();
    assert_eq!(a.symbol.as_deref(), Some("__x64_sys_kill"));
    for bad in ["", ":x", "a:", "a b", "a:b:c", "mod\n"] {
        assert!(bad.parse::<Allowed>().is_err(), "{bad:?} accepted");
    }
}
