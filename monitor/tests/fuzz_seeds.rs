//! The fuzz targets' seeds (fuzz/seeds, cut from a real lab guest) are what
//! their parsers accept: a seed the format has moved away from would leave
//! its target fuzzing error paths only.

use std::path::{Path, PathBuf};

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds").join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{}: no seeds", dir.display());
    out
}

fn text(p: &Path, b: &[u8]) -> String {
    String::from_utf8(b.to_vec()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn qemu_monitor_seeds_parse_with_the_parser_their_first_byte_picks() {
    let all = seeds("qemu_monitor");
    let blocks = all.iter().find(|(p, _)| p.ends_with("ramblock.txt")).unwrap();
    let blocks = vigil::qemu::parse_ramblocks(&text(&blocks.0, &blocks.1)[1..]).unwrap();
    let mut picked = [false; 6];
    for (p, b) in &all {
        let t = text(p, b);
        let (which, body) = t.split_at(1);
        let which: usize = which.parse().unwrap_or_else(|_| panic!("{}: no selector", p.display()));
        picked[which] = true;
        let e = |e: vigil::qemu::ParseError| e.to_string();
        let parsed: Result<usize, String> = match which {
            0 => vigil::qemu::parse_registers(body).map(|r| r.len()).map_err(e),
            1 => vigil::qemu::parse_ramblocks(body).map(|r| r.len()).map_err(e),
            2 => vigil::qemu::parse_mtree_ram(body, &blocks).map(|r| r.len()).map_err(e),
            3 => vigil::qemu::parse_gpa2hva(body).map(|_| 1).map_err(e),
            4 => vigil::qemu::parse_query_cpus_thread_ids(body).map(|r| r.len()).map_err(e),
            5 => vigil::memory::parse_maps(body).map(|r| r.len()),
            _ => panic!("{}: selector {which}", p.display()),
        };
        let n = parsed.unwrap_or_else(|err| panic!("{}: {err}", p.display()));
        assert!(n > 0, "{}: nothing parsed", p.display());
    }
    assert_eq!(picked, [true; 6], "a seed for every parser");
}

#[test]
fn profile_and_config_seeds_parse() {
    for (p, b) in seeds("profile") {
        vigil::linux::profile::Profile::parse(&text(&p, &b))
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    for (p, b) in seeds("config") {
        let name = p.display().to_string();
        let raw = vigil::daemon::config::Settings::parse(&name, &text(&p, &b)).unwrap();
        vigil::daemon::config::Settings::validate(&name, raw, &Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn memory_seeds_hold_tables_the_parsers_take() {
    for (p, b) in seeds("patch_tables") {
        let (base, table) = b.split_at(8);
        let base = u64::from_le_bytes(base.try_into().unwrap());
        let n = if p.to_string_lossy().contains("jump") {
            vigil::linux::patch::parse_jump_entries(table, base).map(|e| e.len())
        } else {
            vigil::linux::patch::parse_static_call_sites(table, base).map(|e| e.len())
        };
        assert!(n.unwrap_or_else(|e| panic!("{}: {e}", p.display())) > 0);
    }
    for (p, b) in seeds("page_walk") {
        assert_eq!(b.len(), 9 + 16 * 4096, "{}: the target's header and 16 pages", p.display());
        // Walked as the target walks it: the guest's own kernel image mapping.
        let cr3 = u64::from_le_bytes(b[..8].try_into().unwrap());
        let mode = vigil::x86::PagingMode::from_cr4(if b[8] & 1 != 0 { 1 << 12 } else { 0 });
        let mem = vigil::memory::RawDump::from_bytes(b[9..].to_vec());
        let w = vigil::x86::Walker::new(&mem, mode, cr3, b[8] & 2 != 0);
        let set = w
            .mappings(
                vigil::addr::GuestVirtAddr(0xffff_ffff_8000_0000),
                vigil::addr::GuestVirtAddr(0xffff_ffff_c000_0000),
            )
            .unwrap();
        assert!(set.mappings.len() > 512, "{}: {} mappings", p.display(), set.mappings.len());
    }
}

#[test]
fn baseline_and_control_seeds_parse() {
    for (p, b) in seeds("baseline") {
        vigil::integrity::Baseline::from_json(&b)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let cut = &seeds("baseline")[0].1;
    let cut = vigil::integrity::Baseline::from_json(cut).unwrap();
    for (p, b) in seeds("originals") {
        let o = vigil::integrity::Originals::from_bytes(&b, &cut)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(o.len(), cut.regions.iter().map(|r| r.pages.len()).sum::<usize>());
    }
    for (p, b) in seeds("reference_file") {
        let r = vigil::linux::reference::ReferenceFile::read(&b)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let w = vigil::linux::reference::Rewrites::of(&r)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(!w.sites.is_empty(), "{}: no rewrite site to fuzz from", p.display());
    }
    for (p, b) in seeds("control_request") {
        vigil::daemon::control::parse_request(&text(&p, &b))
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
}

#[test]
fn image_core_and_gdt_seeds_are_what_the_lab_guest_has() {
    for (p, b) in seeds("kernel_image") {
        let name = p.display().to_string();
        if name.contains("payload.") {
            let (elf, _) =
                vigil::linux::image::decompress(&b).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(elf.starts_with(b"\x7fELF"), "{name}");
        } else {
            // The head of the lab's vmlinuz: its boot header parses, and
            // the payload it points to lies past the cut.
            let e = vigil::linux::image::payload(&b).unwrap_err().to_string();
            assert!(e.contains("payload"), "{name}: {e}");
        }
    }
    for (p, _) in seeds("elf_core") {
        let core =
            vigil::memory::ElfCore::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(
            !vigil::qemu::dump_registers(&core.cpu_notes).unwrap().is_empty()
                && !vigil::memory::GuestMemory::layout(&core).ranges().is_empty()
        );
    }
    for (p, b) in seeds("kallsyms") {
        let t = vigil::linux::kallsyms::find(&b).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(t.symbols.len(), 512, "{}", p.display());
    }
    for (p, b) in seeds("btf") {
        vigil::linux::btf::Btf::parse(&b).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    for (p, b) in seeds("gdt") {
        let problems = vigil::linux::semantic::gdt_problems(&b);
        assert!(problems.is_empty(), "{}: {problems:?}", p.display());
    }
}

/// Guest pages mapped to pages of a seed's RAM, as the targets map them.
struct Pages(Vec<(u64, u64)>);

const LIST: u64 = 0xffff_8880_0100_0000;
const IDT: u64 = 0xffff_fe00_0000_0000;

impl vigil::integrity::AddressSpace for Pages {
    fn image_pages(&self) -> &[vigil::x86::Mapping] {
        &[]
    }
    fn translate(
        &self,
        gva: vigil::addr::GuestVirtAddr,
    ) -> Option<(vigil::addr::GuestPhysAddr, vigil::x86::Perms)> {
        let page = gva.raw() & !0xfff;
        let &(_, ram) = self.0.iter().find(|&&(va, _)| va == page)?;
        let rw = vigil::x86::Perms { writable: true, user: false, executable: false };
        Some((vigil::addr::GuestPhysAddr(ram * 4096 + (gva.raw() & 0xfff)), rw))
    }
}

fn lab_profile() -> vigil::linux::profile::Profile {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-profiles");
    let (mut profiles, bad) = vigil::linux::profile::load_dir(&[dir]);
    assert!(bad.is_empty(), "{bad:?}");
    profiles.remove(0)
}

#[test]
fn module_list_seed_walks_to_its_two_modules() {
    let profile = lab_profile();
    let slide = LIST.wrapping_sub(profile.symbol("modules").unwrap().addr & !0xfff);
    let m = vigil::linux::semantic::Matched {
        profile: &profile,
        modules: Vec::new(),
        slide,
        idt_slide: None,
        reads: Default::default(),
    };
    let window = Pages((0..16).map(|i| (LIST + i * 4096, i)).collect());
    for (p, b) in seeds("module_list") {
        let mem = vigil::memory::RawDump::from_bytes(b);
        let list = vigil::linux::semantic::walk_modules(&m, &mem, &window)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let names: Vec<_> = list.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["vigil_lab_hook", "virtio_net"], "{}", p.display());
    }
}

/// The semantic seed is the lab guest's syscall table and IDT, moved to the
/// target's slide: the checks find nothing wrong with them.
#[test]
fn semantic_seed_holds_the_guests_tables_intact() {
    let profile = lab_profile();
    let slide = LIST.wrapping_sub(profile.symbol("modules").unwrap().addr & !0xfff);
    let table = profile.symbol("sys_call_table").unwrap().addr.wrapping_add(slide) & !0xfff;
    let mut map: Vec<(u64, u64)> = (0..8).map(|i| (LIST + i * 4096, i)).collect();
    map.extend([(table, 8), (table + 4096, 9), (IDT, 10)]);
    let space = Pages(map);
    let regs = [vigil::x86::VcpuRegisters {
        index: 0,
        cr0: 0x8005_0033,
        cr3: 0,
        cr4: 0x0075_0ef0,
        efer: 0xd01,
        idtr_base: IDT,
        idtr_limit: 0xfff,
        gdtr_base: 0,
        gdtr_limit: 0x7f,
    }];
    for (p, mut b) in seeds("semantic") {
        b.resize(16 * 4096, 0);
        let mem = vigil::memory::RawDump::from_bytes(b);
        let mut m = vigil::linux::semantic::Matched {
            profile: &profile,
            modules: Vec::new(),
            slide,
            idt_slide: None,
            reads: Default::default(),
        };
        let findings = vigil::linux::semantic::check(&mut m, &mem, &space, &regs, &[], None);
        let bad: Vec<_> = findings
            .iter()
            .filter(|f| f.severity == vigil::integrity::Severity::Violation)
            .collect();
        assert!(bad.is_empty(), "{}: {bad:#?}", p.display());
        assert_eq!(m.idt_slide, Some(slide), "{}", p.display());
        assert_eq!(m.modules.len(), 2, "{}", p.display());
    }
}

/// The hooks seed, mapped as the target maps it (fuzz/fuzz_targets/hooks.rs),
/// holds a module's IPMODIFY ftrace hook of getppid, a forged ops, a
/// module's kprobe and a module's die notifier: each a hook the policy
/// judges, so the target fuzzes the whole reader, not its error paths.
#[test]
fn hooks_seed_holds_a_hook_of_each_kind() {
    use vigil::linux::hooks::{HookPolicy, Inventory, Mechanism};
    let path =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles/6.1.0-56-cloud-amd64.profile");
    let profile =
        vigil::linux::profile::Profile::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
    let base = 0xffff_ffff_c010_0000u64;
    let sym = |n: &str| profile.symbol(n).unwrap().addr & !0xfff;
    let mut layout = vec![
        sym("ftrace_ops_list"),
        sym("kprobe_table"),
        sym("kprobe_table") + 4096,
        sym("die_chain"),
        sym("bpf_kallsyms"),
        sym("ftrace_caller"),
    ];
    layout.extend((0..10).map(|i| base + i * 4096));
    let mut space = Pages(layout.into_iter().zip(0..).collect());
    // As the fuzz target: zeros where BPF's trampoline table and the
    // tracepoints lie, and direct_functions pointing at zeros.
    let table = sym("trampoline_table");
    space.0.extend((0..3).map(|i| (table + i * 4096, 16)));
    let tps: Vec<u64> = profile
        .symbols()
        .iter()
        .filter(|s| s.name.starts_with("__tracepoint_"))
        .map(|s| s.addr & !0xfff)
        .collect();
    let (lo, hi) = (*tps.iter().min().unwrap(), *tps.iter().max().unwrap());
    space.0.extend((lo..=hi + 4096).step_by(4096).map(|p| (p, 16)));
    let direct = profile.symbol("direct_functions").unwrap().addr;
    space.0.insert(0, (direct & !0xfff, 17));
    let rk = vigil::linux::semantic::Module {
        name: "rk".into(),
        addr: base + 0x2800,
        base,
        size: 0x1000,
        text_size: 0x1000,
        state: 0,
        init: (0, 0),
        data: (base + 0x2000, 0x1000),
    };
    let m = vigil::linux::semantic::Matched {
        profile: &profile,
        modules: vec![rk],
        slide: 0,
        idt_slide: None,
        reads: Default::default(),
    };
    for (p, mut b) in seeds("hooks") {
        b.resize(18 * 4096, 0);
        let off = 17 * 4096 + usize::try_from(direct & 0xfff).unwrap();
        b[off..off + 8].copy_from_slice(&table.to_le_bytes());
        let mem = vigil::memory::RawDump::from_bytes(b);
        let inv = Inventory::read(&m, &mem, &space);
        assert!(inv.unread.is_empty(), "{}: {:?}", p.display(), inv.unread);
        let kinds: Vec<Mechanism> = inv.hooks.iter().map(|h| h.mechanism).collect();
        assert_eq!(
            kinds,
            [Mechanism::Ftrace, Mechanism::Ftrace, Mechanism::Kprobe, Mechanism::DieNotifier],
            "{}",
            p.display()
        );
        assert_eq!(inv.hooks[0].hooked, ["__x64_sys_getppid"], "{}", p.display());
        assert!(!inv.hooks[1].forged.is_empty(), "{}: the second ops is forged", p.display());
        let found = HookPolicy::default().judge(&inv);
        assert_eq!(found.len(), 4, "{}: {found:#?}", p.display());
    }
}
