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
/// BPF's images (a page apart from the module), and a page for hashes.
const JIT: u64 = BASE + 0x10_0000;
const EMPTY_HASH: u64 = BASE + 0x30_0000;
/// The direct map, where the kernel allocates records.
const HEAP: u64 = 0xffff_8880_0100_0000;

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
    /// The trampoline size the next ops says.
    tramp_size: u32,
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
        // Empty BPF kallsyms, no BPF trampolines, no direct calls (an
        // empty hash, as the kernel's EMPTY_HASH).
        ram.u64(sym("bpf_kallsyms"), sym("bpf_kallsyms"));
        ram.put(
            sym("trampoline_table"),
            &vec![0; usize::try_from(8 * BPF_TRAMPOLINE_TABLE).unwrap()],
        );
        ram.u64(sym("direct_functions"), EMPTY_HASH);
        ram.put(EMPTY_HASH, &[0; 64]);
        ram.put(TEXT, &[0x90; 64]);
        // The kernel's tracepoints, none with probes.
        let tps: Vec<u64> = p
            .symbols()
            .iter()
            .filter(|s| s.name.starts_with("__tracepoint_") && matches!(s.kind, 'd' | 'D'))
            .map(|s| s.addr)
            .collect();
        let (lo, hi) = (*tps.iter().min().unwrap(), *tps.iter().max().unwrap());
        ram.put(lo, &vec![0; usize::try_from(hi - lo + 0x100).unwrap()]);
        // ftrace's callers, which a trampoline is a copy of (to their
        // `_end` labels), each byte its own.
        for (name, seed) in [("ftrace_caller", 0x55u8), ("ftrace_regs_caller", 0x56)] {
            let size = sym(&format!("{name}_end")) - sym(name);
            let bytes: Vec<u8> = (0..size).map(|i| seed ^ i.to_le_bytes()[0]).collect();
            ram.put(sym(name), &bytes);
        }
        Guest { p, ram, tramp_size: 0x200 }
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
        self.ram.put(at + size, &self.tramp_size.to_le_bytes());
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

    /// Lists a BPF image `name` at `start..end` in BPF kallsyms, its
    /// `bpf_ksym` at `at`.
    fn bpf_image(&mut self, at: u64, start: u64, end: u64, name: &str) {
        let (head, lnode) = (self.sym("bpf_kallsyms"), self.off("bpf_ksym.lnode"));
        let first = u64::from_le_bytes(self.read(head, 8).try_into().unwrap());
        self.ram.u64(at + lnode, first);
        self.ram.u64(head, at + lnode);
        self.ram.u64(at + self.off("bpf_ksym.start"), start);
        self.ram.u64(at + self.off("bpf_ksym.end"), end);
        self.ram.put(at + self.off("bpf_ksym.name"), format!("{name}\0").as_bytes());
    }

    /// A BPF trampoline at `at` (its records beside it) for `func`, with
    /// image `image` and one program per `(kind, bpf_func)`.
    fn bpf_trampoline(&mut self, at: u64, func: u64, image: u64, progs: &[(usize, u64)]) {
        let o = |k: &str| self.off(k);
        let (hlist, fa, ph, cur) = (
            o("bpf_trampoline.hlist"),
            o("bpf_trampoline.func.addr"),
            o("bpf_trampoline.progs_hlist"),
            o("bpf_trampoline.cur_image"),
        );
        let (img, link, node, prog, bf) = (
            o("bpf_tramp_image.image"),
            o("bpf_tramp_link.link"),
            o("bpf_tramp_link.tramp_hlist"),
            o("bpf_link.prog"),
            o("bpf_prog.bpf_func"),
        );
        let bucket = self.sym("trampoline_table") + 8 * 7;
        let first = u64::from_le_bytes(self.read(bucket, 8).try_into().unwrap());
        self.ram.u64(at + hlist, first);
        self.ram.u64(bucket, at + hlist);
        self.ram.u64(at + fa, func);
        self.ram.put(at + ph, &[0; 24]);
        self.ram.u64(at + cur, at + 0x200);
        self.ram.u64(at + self.off("bpf_trampoline.key"), at);
        self.ram.u64(at + 0x200 + img, image);
        for (i, &(kind, f)) in progs.iter().enumerate() {
            let l = at + 0x400 + 0x100 * i as u64;
            let p = l + 0x80;
            self.ram.u64(l + node, 0);
            self.ram.u64(at + ph + 8 * kind as u64, l + node);
            self.ram.u64(l + link + prog, p);
            self.ram.u64(p + bf, f);
        }
    }

    /// Makes `direct_functions` a hash of `calls` (entry, target), at `at`.
    fn direct(&mut self, at: u64, calls: &[(u64, u64)]) {
        let o = |k: &str| self.off(k);
        let (bits, bk, count, ip, direct) = (
            o("ftrace_hash.size_bits"),
            o("ftrace_hash.buckets"),
            o("ftrace_hash.count"),
            o("ftrace_func_entry.ip"),
            o("ftrace_func_entry.direct"),
        );
        self.ram.u64(self.sym("direct_functions"), at);
        self.ram.u64(at + bits, 0);
        self.ram.u64(at + bk, at + 0x100);
        self.ram.u64(at + count, calls.len() as u64);
        let mut head = 0;
        for (i, &(i_ip, target)) in calls.iter().enumerate() {
            let e = at + 0x200 + 0x20 * i as u64;
            self.ram.u64(e, head);
            self.ram.u64(e + ip, i_ip);
            self.ram.u64(e + direct, target);
            head = e;
        }
        self.ram.u64(at + 0x100, head);
    }

    /// Writes at `at` a trampoline as ftrace makes one for the ops at
    /// `ops` calling `func`: a copy of the regs caller (or the plain one),
    /// its ops load reaching the ops pointer stored after the copy, its
    /// call to `func`, its jnz a nop. Returns its size.
    fn trampoline_copy(&mut self, at: u64, ops: u64, func: u64, regs: bool) -> u64 {
        let name = if regs { "ftrace_regs_caller" } else { "ftrace_caller" };
        let start = self.sym(name);
        let size = self.sym(&format!("{name}_end")) - start;
        let mut t = self.read(start, usize::try_from(size).unwrap());
        let off = |g: &Self, n: &str| usize::try_from(g.sym(n) - start).unwrap();
        let op = off(self, &format!("{name}_op_ptr"));
        let call = off(self, if regs { "ftrace_regs_call" } else { "ftrace_call" });
        let ptr = size + 5;
        let disp = i32::try_from(ptr).unwrap() - i32::try_from(op + 7).unwrap();
        t[op + 3..op + 7].copy_from_slice(&disp.to_le_bytes());
        let rel = i32::try_from(func.wrapping_sub(at + call as u64 + 5).cast_signed()).unwrap();
        t[call] = 0xe8;
        t[call + 1..call + 5].copy_from_slice(&rel.to_le_bytes());
        if regs {
            let j = off(self, "ftrace_regs_caller_jmp");
            t[j..j + 2].copy_from_slice(&[0x66, 0x90]);
        }
        t.extend_from_slice(&[0xc3, 0xcc, 0, 0, 0]);
        t.extend_from_slice(&ops.to_le_bytes());
        self.ram.put(at, &t);
        self.tramp_size = u32::try_from(t.len()).unwrap();
        t.len() as u64
    }

    /// The direct calls the patch review would accept.
    fn accepted(self) -> Vec<(u64, u64)> {
        let p = self.p;
        let (mem, space) = self.ram.done();
        let m = Matched {
            profile: &p,
            modules: vec![module()],
            slide: 0,
            idt_slide: None,
            reads: Default::default(),
        };
        accepted_direct_calls(&m, &mem, &space).unwrap()
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
        let m = Matched {
            profile: &p,
            modules: vec![module()],
            slide: 0,
            idt_slide: None,
            reads: Default::default(),
        };
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
fn every_modules_ftrace_hook_can_redirect_and_the_kernels_is_not_said() {
    // No flags: on x86-64 ftrace's caller still takes the instruction
    // pointer its callback sets.
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
    assert_eq!(v[0].0, Severity::Violation);
    assert!(v[0].1.contains("can redirect execution"), "{}", v[0].1);
    assert_eq!(verdicts(&inv, &["rk"])[0].0, Severity::Info);
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

    // A whole copy of the caller there, for this ops, is believed, and
    // owned by ftrace; a copy of the regs caller can redirect.
    let with_copy = |edit: &dyn Fn(&mut Guest)| {
        let mut g = Guest::new();
        g.trampoline_copy(NOWHERE, DATA, TEXT + 0x10, true);
        edit(&mut g);
        g.ops(DATA, TEXT + 0x10, 0, NOWHERE, &[]);
        g.inventory().hooks.remove(0)
    };
    let h = with_copy(&|_| ());
    assert!(h.forged.is_empty(), "{:?}", h.forged);
    assert!(matches!(h.callbacks[1].owner, Owner::Kernel { .. }));
    // A whole copy, then code of its own after it (a jump, or more bytes
    // than a return and the ops pointer).
    let h = with_copy(&|g| {
        let size = g.trampoline_copy(NOWHERE, DATA, TEXT + 0x10, true);
        g.ram.put(NOWHERE + size - 13, &[0xe9, 1, 2, 3, 4]);
    });
    assert!(h.forged[0].contains("not a return"), "{:?}", h.forged);
    let h = with_copy(&|g| g.tramp_size += 16);
    assert!(h.forged[0].contains("not a return"), "{:?}", h.forged);
    // Its first bytes a copy, then a jump of the rootkit's own.
    let h = with_copy(&|g| g.ram.put(NOWHERE + 0x20, &[0xe9, 1, 2, 3, 4]));
    assert!(h.forged[0].contains("its byte at +0x20 is not its caller's"), "{:?}", h.forged);
    // A copy made for another ops, or calling other code than the ops'.
    let h = with_copy(&|g| {
        g.trampoline_copy(NOWHERE, DATA + 0x800, TEXT + 0x10, true);
    });
    assert!(h.forged[0].contains("not its own"), "{:?}", h.forged);
    let h = with_copy(&|g| {
        g.trampoline_copy(NOWHERE, DATA, TEXT + 0x80, true);
    });
    assert!(h.forged[0].contains("its call of the ops' function goes to"), "{:?}", h.forged);
    // The plain caller copied: believed, and by its copy no redirection.
    let mut g = Guest::new();
    g.trampoline_copy(NOWHERE, DATA, TEXT + 0x10, false);
    g.ops(DATA, TEXT + 0x10, 0, NOWHERE, &[]);
    let h = &g.inventory().hooks[0];
    assert!(h.forged.is_empty(), "{h:#?}");

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
    // BPF's JIT output as a kprobe's handler: the kernel never calls it so.
    let v = verdicts(&inv, &[]);
    assert!(v[0].0 == Severity::Violation && v[0].1.contains("lies in BPF code"), "{v:?}");
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

#[test]
fn a_bpf_trampoline_is_listed_with_its_programs_and_fmod_ret_is_a_violation() {
    let mut g = Guest::new();
    let (kill, read) = (g.sym("security_task_kill"), g.sym("vfs_read"));
    let regs_caller = g.sym("ftrace_regs_caller");
    let direct_funcs = g.sym("call_direct_funcs");
    g.bpf_image(HEAP, JIT, JIT + 0x100, "bpf_prog_0123456789abcdef_deny");
    g.bpf_image(HEAP + 0x1000, JIT + 0x100, JIT + 0x200, "bpf_prog_fedcba9876543210_watch");
    g.bpf_image(HEAP + 0x2000, JIT + 0x1000, JIT + 0x2000, "bpf_trampoline_1");
    g.bpf_image(HEAP + 0x3000, JIT + 0x2000, JIT + 0x3000, "bpf_trampoline_2");
    g.bpf_trampoline(HEAP + 0x1_0000, kill, JIT + 0x1000, &[(FMOD_RET, JIT)]);
    g.bpf_trampoline(HEAP + 0x2_0000, read, JIT + 0x2000, &[(0, JIT + 0x100)]);
    // Their direct ops name ftrace's own regs caller as trampoline.
    g.direct(EMPTY_HASH + 0x1000, &[(kill, JIT + 0x1000), (read, JIT + 0x2000)]);
    g.ops(
        HEAP + 0x3_0000,
        direct_funcs,
        FL_ENABLED | FL_SAVE_REGS | FL_DIRECT,
        regs_caller,
        &[kill],
    );
    g.ops(
        HEAP + 0x4_0000,
        direct_funcs,
        FL_ENABLED | FL_SAVE_REGS | FL_DIRECT,
        regs_caller,
        &[read],
    );
    let inv = g.inventory();
    assert!(inv.unread.is_empty(), "{:?}", inv.unread);
    let bpf: Vec<&Hook> =
        inv.hooks.iter().filter(|h| h.mechanism == Mechanism::BpfTrampoline).collect();
    assert_eq!(bpf.len(), 2, "{inv:#?}");
    let deny = bpf.iter().find(|h| h.hooked == ["security_task_kill"]).unwrap();
    assert!(deny.redirects && deny.forged.is_empty(), "{deny:#?}");
    assert_eq!(deny.bpf_programs("fmod_ret"), ["deny"]);
    let watch = bpf.iter().find(|h| h.hooked == ["vfs_read"]).unwrap();
    assert!(!watch.redirects, "{watch:#?}");
    // The direct ops (ftrace's regs caller their trampoline) and the
    // direct calls to the BPF trampolines: none forged.
    for h in inv.hooks.iter().filter(|h| h.mechanism == Mechanism::Ftrace) {
        assert!(h.forged.is_empty(), "{h:#?}");
    }
    let direct: Vec<&Hook> =
        inv.hooks.iter().filter(|h| h.mechanism == Mechanism::Direct).collect();
    assert_eq!(direct.len(), 2, "{inv:#?}");
    for h in direct {
        assert!(h.forged.is_empty(), "{h:#?}");
        assert!(
            matches!(&h.callbacks[0].owner, Owner::Bpf { name } if name.starts_with("bpf_trampoline_")),
            "{h:#?}"
        );
    }
    // Only the program that returns in kill's place is said.
    let v = verdicts(&inv, &[]);
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, Severity::Violation);
    for word in
        ["BPF trampoline", "security_task_kill", "fmod_ret", "bpf_prog_0123456789abcdef_deny"]
    {
        assert!(v[0].1.contains(word), "{word} not in {}", v[0].1);
    }
    assert_eq!(verdicts(&inv, &["bpf:deny"])[0].0, Severity::Info);
    assert_eq!(verdicts(&inv, &["bpf:watch"])[0].0, Severity::Violation);
    assert_eq!(verdicts(&inv, &["deny"])[0].0, Severity::Violation, "a module name allows no BPF");
    // Counted by mechanism and owner, every pair listed.
    let counts = inv.counts();
    assert_eq!(counts.len(), Mechanism::ALL.len() * OWNER_KINDS.len());
    let count = |m: &str, o: &str| {
        counts.iter().find(|c| c.mechanism == m && c.owner == o).map(|c| c.count)
    };
    assert_eq!(count("bpf_trampoline", "bpf"), Some(2));
    assert_eq!(count("direct", "bpf"), Some(2));
    assert_eq!(count("ftrace", "kernel"), Some(2));
    assert_eq!(count("kprobe", "unknown"), Some(0));
}

#[test]
fn a_direct_call_is_judged_by_whose_code_it_calls() {
    let target = |g: &Guest| g.sym("__x64_sys_getppid");
    let with_direct = |to: u64| {
        let mut g = Guest::new();
        let (t, regs_caller, direct_funcs) =
            (target(&g), g.sym("ftrace_regs_caller"), g.sym("call_direct_funcs"));
        g.bpf_image(HEAP, JIT + 0x1000, JIT + 0x2000, "bpf_trampoline_1");
        g.direct(EMPTY_HASH + 0x1000, &[(t, to)]);
        g.ops(HEAP + 0x3_0000, direct_funcs, FL_ENABLED | FL_DIRECT, regs_caller, &[t]);
        verdicts(&g.inventory(), &[])
    };
    // A module's code called directly: a redirecting module hook.
    let v = with_direct(TEXT + 0x40);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].0 == Severity::Violation && v[0].1.contains("module rk+0x40 (direct)"), "{v:?}");
    // Nowhere known: a violation.
    let v = with_direct(NOWHERE + 0x5000);
    assert!(v[0].0 == Severity::Violation && v[0].1.contains("no kernel text"), "{v:?}");
    // A BPF trampoline image that no BPF trampoline has: forged.
    let v = with_direct(JIT + 0x1000);
    assert!(
        v[0].0 == Severity::Violation
            && v[0].1.contains("which is no BPF trampoline of this function"),
        "{v:?}"
    );
    // What the patch review accepts: a module's (judged as a hook) and a
    // BPF trampoline's of that very function, nothing nowhere or forged.
    let accepted = |bound_to: &str, to: u64| {
        let mut g = Guest::new();
        let (t, f) = (target(&g), g.sym(bound_to));
        g.bpf_image(HEAP, JIT + 0x1000, JIT + 0x2000, "bpf_trampoline_1");
        g.bpf_trampoline(HEAP + 0x1_0000, f, JIT + 0x1000, &[]);
        g.direct(EMPTY_HASH + 0x1000, &[(t, to)]);
        g.accepted()
    };
    let t = target(&Guest::new());
    assert_eq!(accepted("__x64_sys_getppid", JIT + 0x1000), [(t, JIT + 0x1000)]);
    assert!(accepted("security_task_kill", JIT + 0x1000).is_empty(), "another function's");
    assert_eq!(accepted("__x64_sys_getppid", TEXT + 0x40), [(t, TEXT + 0x40)]);
    assert!(accepted("__x64_sys_getppid", NOWHERE + 0x40).is_empty());
}

#[test]
fn a_livepatch_is_a_modules_redirecting_hook() {
    let mut g = Guest::new();
    let target = g.sym("__x64_sys_getppid");
    let handler = g.sym("klp_ftrace_handler");
    let (fops, stack, new_func, node) = (
        g.off("klp_ops.fops"),
        g.off("klp_ops.func_stack"),
        g.off("klp_func.new_func"),
        g.off("klp_func.stack_node"),
    );
    let klp = HEAP + 0x1_0000;
    let func = DATA + 0x100;
    g.ops(klp + fops, handler, FL_ENABLED | FL_SAVE_REGS | FL_IPMODIFY, 0, &[target]);
    g.ram.u64(klp + stack, func + node);
    g.ram.u64(klp + stack + 8, func + node);
    g.ram.u64(func + node, klp + stack);
    g.ram.u64(func + node + 8, klp + stack);
    g.ram.u64(func + new_func, TEXT + 0x30);
    let inv = g.inventory();
    let h = &inv.hooks[0];
    assert_eq!(h.mechanism, Mechanism::Livepatch, "{h:#?}");
    assert_eq!(h.module(), Some("rk"));
    let v = verdicts(&inv, &[]);
    assert_eq!(v[0].0, Severity::Violation);
    for word in ["livepatch", "__x64_sys_getppid", "module rk+0x30 (new_func)"] {
        assert!(v[0].1.contains(word), "{word} not in {}", v[0].1);
    }
    assert_eq!(verdicts(&inv, &["rk"])[0].0, Severity::Info);
    // Its replacement another kernel function (one that returns at once,
    // say), or BPF code: no livepatch does that.
    let mut g = Guest::new();
    let elsewhere = g.sym("ftrace_stub");
    g.ops(klp + fops, handler, FL_ENABLED | FL_SAVE_REGS | FL_IPMODIFY, 0, &[target]);
    g.ram.u64(klp + stack, func + node);
    g.ram.u64(func + node, klp + stack);
    g.ram.u64(func + new_func, elsewhere);
    let v = verdicts(&g.inventory(), &[]);
    assert!(
        v[0].0 == Severity::Violation && v[0].1.contains("not a livepatch module's code"),
        "{v:?}"
    );
}

#[test]
fn tracepoint_probes_are_listed_with_their_owners() {
    let with_probes = |probes: &[u64], end: bool| {
        let mut g = Guest::new();
        let tp = g.sym("__tracepoint_sys_enter");
        let (funcs, func, size) = (
            g.off("tracepoint.funcs"),
            g.off("tracepoint_func.func"),
            g.off("tracepoint_func.#size"),
        );
        g.ram.u64(tp + funcs, HEAP);
        for (i, &p) in probes.iter().enumerate() {
            g.ram.u64(HEAP + i as u64 * size + func, p);
        }
        if !end {
            // No null function within the bound: every entry a probe.
            for i in probes.len() as u64..MAX_PROBES + 1 {
                g.ram.u64(HEAP + i * size + func, probes[0]);
            }
        } else {
            g.ram.u64(HEAP + probes.len() as u64 * size + func, 0);
        }
        g.inventory()
    };
    let kernel = Guest::new().sym("perf_trace_sys_enter");
    let inv = with_probes(&[kernel, TEXT + 0x50], true);
    assert!(inv.unread.is_empty(), "{:?}", inv.unread);
    let h = &inv.hooks[0];
    assert_eq!(
        (h.mechanism, h.hooked.clone()),
        (Mechanism::Tracepoint, vec!["sys_enter".to_owned()])
    );
    assert_eq!(h.callbacks.len(), 2);
    assert_eq!(h.module(), Some("rk"));
    let v = verdicts(&inv, &[]);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].0 == Severity::Info && v[0].1.contains("observation only"), "{v:?}");
    // The kernel's own probe alone: not said.
    assert!(verdicts(&with_probes(&[kernel], true), &[]).is_empty());
    // A probe nowhere known, or an array with no end: violations.
    let v = verdicts(&with_probes(&[NOWHERE + 0x10], true), &[]);
    assert!(v[0].0 == Severity::Violation && v[0].1.contains("no kernel text"), "{v:?}");
    let v = verdicts(&with_probes(&[kernel], false), &[]);
    assert!(v[0].0 == Severity::Violation && v[0].1.contains("no end within 64"), "{v:?}");
}
