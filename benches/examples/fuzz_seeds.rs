//! Seeds for the fuzz targets that read guest memory, cut from a real lab
//! guest (the capture `lab/capture.sh` leaves; see fuzz/README.md):
//!
//!   cargo run --release -p vigil-bench --example fuzz_seeds -- fuzz/seeds
//!
//! - `page_walk/lab-kernel-image.bin`: the guest's page tables for the
//!   kernel image (the tables on the image's path from CR3 down to its
//!   page directory, and the first page tables under that), moved into the target's
//!   16 pages of RAM with their pointers to each other rewritten, behind
//!   the target's 9-byte header (CR3, flags).
//! - `patch_tables/lab-jump-table.bin`, `lab-static-call-sites.bin`: the
//!   first 4 KiB of the kernel's jump table and static call sites, behind
//!   the 8-byte address they were read from.
//! - `baseline/lab-guest-cut.json`: the guest's baseline cut to three pages
//!   a region and three runs of each mapping list, its roots merged anew.
//! - `originals/lab-guest-cut.pages`: that cut baseline's `.pages` file, the
//!   guest's original bytes of its pages.
//! - `gdt/lab-gdt.bin`: the guest's GDT page as its memory holds it.
//! - `elf_core/lab-core-cut.elf`: the capture's ELF core (libvirt's
//!   memory-only dump) with its QEMU register notes whole and its first
//!   RAM segment cut to 8 KiB, the others left out.
//! - `module_list/two-modules.bin`: the target's 64 KiB of RAM holding a
//!   list head and two `struct module`s laid out by the lab profile's BTF
//!   offsets (made, not read: the capture's guest has no module loaded).
//! - `semantic/lab-tables.bin`: the semantic target's 16 pages: the module
//!   list pages as above, then the guest's own syscall table and IDT page,
//!   their pointers moved from the guest's KASLR slide to the target's.
//! - `kallsyms/lab-512-symbols.bin`: the lab kernel's kallsyms tables (from
//!   its `.rodata`) cut to their first 512 symbols: offsets, relative base,
//!   count, names, two markers, then the real token table and index.
//! - `btf/lab-btf-cut.bin`: the lab kernel's own BTF (from the vmlinux in
//!   `/var/lib/vigil-lab/vmlinuz`), its types cut after 16 KiB at a type's
//!   end and its strings after 64 KiB, the header saying so.

use std::collections::BTreeMap;
use std::path::PathBuf;

use vigil::addr::{GuestPhysAddr, PAGE_BYTES};
use vigil::memory::GuestMemory;
use vigil_bench::Capture;

/// The fuzz target's RAM, in pages.
const PAGES: usize = 16;
const ADDR: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1;
const LARGE: u64 = 1 << 7;
const IMAGE: u64 = 0xffff_ffff_8000_0000;
const CR4_LA57: u64 = 1 << 12;

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "fuzz/seeds".into()));
    let cap = Capture::load();
    let regs = &cap.baseline.registers[0];
    let read = |gpa: u64| {
        let mut page = vec![0u8; PAGE_BYTES];
        cap.core.read(GuestPhysAddr(gpa), &mut page).expect("a table in the captured RAM");
        page
    };
    let entry =
        |page: &[u8], i: usize| u64::from_le_bytes(page[8 * i..8 * i + 8].try_into().unwrap());
    let next = |page: &[u8], i: usize| {
        let e = entry(page, i);
        assert!(e & PRESENT != 0 && e & LARGE == 0, "no table on the image's path: {e:#x}");
        e & ADDR
    };

    // The tables on the image's path, top (PML5 or PML4) down to the page
    // directory, then the page tables under it.
    let levels: u32 = if regs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
    let index = |level: u32| ((IMAGE >> (12 + 9 * level)) & 0x1ff) as usize;
    let mut path = vec![regs.cr3 & ADDR & !(1 << 12)];
    for level in (2..levels).rev() {
        let table = read(*path.last().unwrap());
        path.push(next(&table, index(level)));
    }
    let pd = read(*path.last().unwrap());
    let mut tables: BTreeMap<u64, usize> = BTreeMap::new();
    for (slot, &at) in path.iter().enumerate() {
        tables.insert(at, slot);
    }
    for i in 0..512 {
        let e = entry(&pd, i);
        if e & PRESENT != 0 && e & LARGE == 0 && tables.len() < PAGES {
            let n = tables.len();
            tables.entry(e & ADDR).or_insert(n);
        }
    }
    // Copy each into its slot, pointing table entries at the copies. Leaf
    // entries keep their addresses: the walk never reads what they map.
    let mut ram = vec![0u8; PAGES * PAGE_BYTES];
    for (&at, &slot) in &tables {
        let mut page = read(at);
        if path.contains(&at) {
            for i in 0..512 {
                let e = entry(&page, i);
                if let Some(&s) =
                    tables.get(&(e & ADDR)).filter(|_| e & PRESENT != 0 && e & LARGE == 0)
                {
                    let moved = (e & !ADDR) | ((s as u64) << 12);
                    page[8 * i..8 * i + 8].copy_from_slice(&moved.to_le_bytes());
                }
            }
        }
        ram[slot * PAGE_BYTES..(slot + 1) * PAGE_BYTES].copy_from_slice(&page);
    }
    // Header: CR3 (slot 0, with the guest's flag bits), flags: the guest's
    // paging levels and NXE, CR3 taken as given, the image range.
    let cr3 = regs.cr3 & !ADDR;
    let nxe = regs.efer & (1 << 11) != 0;
    let flags = u8::from(levels == 5) | if nxe { 2 } else { 0 } | 4;
    let mut seed = cr3.to_le_bytes().to_vec();
    seed.push(flags);
    seed.extend_from_slice(&ram);
    write(&out, "page_walk", "lab-kernel-image.bin", &seed);
    println!("page_walk: {} tables of the kernel image's mapping", tables.len());

    // The patch tables, from the profile's symbols and the guest's slide.
    let (profiles, _) = vigil::linux::profile::load_dir(&[concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../guest-profiles"
    )
    .into()]);
    let view = vigil::linux::discover(&cap.core, &cap.baseline.registers).unwrap();
    let m = vigil::linux::semantic::match_profile(
        &profiles,
        &cap.core,
        &view,
        view.identification.image_base,
    )
    .expect("the capture matches the committed profile");
    for (name, symbol) in [
        ("lab-jump-table.bin", "__start___jump_table"),
        ("lab-static-call-sites.bin", "__start_static_call_sites"),
    ] {
        let at = m.expect(symbol).expect("the profile names the table");
        let (bytes, _) =
            vigil::linux::semantic::read_virt(&cap.core, &view, at, PAGE_BYTES).expect("readable");
        let mut seed = at.to_le_bytes().to_vec();
        seed.extend_from_slice(&bytes);
        write(&out, "patch_tables", name, &seed);
    }
    println!("patch_tables: 4 KiB of each table");

    let mut cut = cap.baseline.clone();
    for r in &mut cut.regions {
        r.pages.truncate(3);
        r.bytes = r.pages.len() as u64 * PAGE_BYTES as u64;
        let values: Vec<_> = r.pages.iter().map(|p| p.value).collect();
        r.root = *vigil::integrity::tree::region_root(&values, r.bytes).unwrap().as_bytes();
    }
    cut.image_mapping.truncate(3);
    cut.exec_outside_image.truncate(2);
    write(&out, "baseline", "lab-guest-cut.json", &serde_json::to_vec_pretty(&cut).unwrap());
    println!("baseline: {} regions of up to 3 pages", cut.regions.len());
    let mut originals = vigil::integrity::Originals::default();
    for p in cut.regions.iter().flat_map(|r| &r.pages) {
        originals.insert(p.gva.raw(), &read(p.gpa.raw()));
    }
    let tmp = tempfile::NamedTempFile::new().unwrap();
    originals.save(tmp.path()).unwrap();
    write(&out, "originals", "lab-guest-cut.pages", &std::fs::read(tmp.path()).unwrap());
    println!("originals: {} pages", originals.len());

    let gdt =
        cap.baseline.regions.iter().find(|r| r.name.starts_with("gdt")).expect("a GDT region");
    write(&out, "gdt", "lab-gdt.bin", &read(gdt.pages[0].gpa.raw()));
    println!("gdt: the page of {}", gdt.name);

    write(&out, "elf_core", "lab-core-cut.elf", &cut_core(&cap.dir.join("guest.core")));
    println!("elf_core: notes and 8 KiB of RAM");

    let vmlinuz =
        std::fs::read("/var/lib/vigil-lab/vmlinuz").expect("the lab's kernel (lab/setup.sh)");
    let (elf, _) = vigil::linux::image::vmlinux(&vmlinuz).unwrap();
    let btf = {
        use object::{Object, ObjectSection};
        let file = object::File::parse(&*elf).unwrap();
        file.section_by_name(".BTF").expect("a .BTF section").data().unwrap().to_vec()
    };
    let rodata = {
        use object::{Object, ObjectSection};
        let file = object::File::parse(&*elf).unwrap();
        file.section_by_name(".rodata").expect("a .rodata section").data().unwrap().to_vec()
    };
    write(&out, "kallsyms", "lab-512-symbols.bin", &cut_kallsyms(&rodata, 512));
    println!("kallsyms: 512 symbols of the lab kernel's");

    let (seed, types) = cut_btf(&btf, 16 << 10, 64 << 10);
    write(&out, "btf", "lab-btf-cut.bin", &seed);
    println!("btf: {types} types of the lab kernel's");

    let list = module_list(&profiles[0]);
    write(&out, "module_list", "two-modules.bin", &list);
    println!("module_list: a head and two modules");

    // The semantic target: its list pages, then the real tables, moved.
    const LIST: u64 = 0xffff_8880_0100_0000;
    let fuzz_slide = LIST.wrapping_sub(m.profile.symbol("modules").unwrap().addr & !0xfff);
    let moved = |a: u64| a.wrapping_sub(m.slide).wrapping_add(fuzz_slide);
    let mut pages = list[..8 * PAGE_BYTES].to_vec();
    let table = m.expect("sys_call_table").unwrap();
    let (mut sct, _) =
        vigil::linux::semantic::read_virt(&cap.core, &view, table & !0xfff, 2 * PAGE_BYTES)
            .expect("the syscall table's pages");
    let first = usize::try_from(table & 0xfff).unwrap();
    for i in 0..m.profile.syscall_tables()[0].1.len() {
        let at = first + 8 * i;
        let e = u64::from_le_bytes(sct[at..at + 8].try_into().unwrap());
        sct[at..at + 8].copy_from_slice(&moved(e).to_le_bytes());
    }
    pages.extend_from_slice(&sct);
    let (mut idt, _) =
        vigil::linux::semantic::read_virt(&cap.core, &view, regs.idtr_base, PAGE_BYTES)
            .expect("the IDT");
    for g in idt.chunks_exact_mut(16) {
        let target = u64::from(u16::from_le_bytes([g[0], g[1]]))
            | u64::from(u16::from_le_bytes([g[6], g[7]])) << 16
            | u64::from(u32::from_le_bytes(g[8..12].try_into().unwrap())) << 32;
        if g[5] & 0x80 != 0 {
            // A gate splits its target: bits 0-15, 16-31, 32-63.
            let t = moved(target).to_le_bytes();
            g[0..2].copy_from_slice(&t[0..2]);
            g[6..8].copy_from_slice(&t[2..4]);
            g[8..12].copy_from_slice(&t[4..8]);
        }
    }
    pages.extend_from_slice(&idt);
    write(&out, "semantic", "lab-tables.bin", &pages);
    println!("semantic: the list pages, the syscall table and the IDT");
}

/// The module_list target's RAM: the list head at its offset in its page
/// (the targets map that page first), and two modules at 0x1000 and 0x3000,
/// their fields where the profile's offsets put them.
fn module_list(p: &vigil::linux::profile::Profile) -> Vec<u8> {
    const WINDOW: u64 = 0xffff_8880_0100_0000;
    let off = |k: &str| usize::try_from(p.offset(k).expect("a module offset")).unwrap();
    let mut ram = vec![0u8; 64 << 10];
    let mut put = |at: usize, b: &[u8]| ram[at..at + b.len()].copy_from_slice(b);
    let head = usize::try_from(p.symbol("modules").expect("the list head").addr & 0xfff).unwrap();
    let (a, b) = (0x1000usize, 0x3000usize);
    let node = |m: usize| WINDOW + (m + off("module.list")) as u64;
    put(head, &node(a).to_le_bytes());
    for (m, next, name, base) in [
        (a, node(b), "vigil_lab_hook", 0xffff_ffff_c000_0000u64),
        (b, WINDOW + head as u64, "virtio_net", 0xffff_ffff_c001_0000),
    ] {
        put(m + off("module.list"), &next.to_le_bytes());
        put(m + off("module.name"), name.as_bytes());
        put(m + off("module.core_layout.base"), &base.to_le_bytes());
        put(m + off("module.core_layout.size"), &0x6000u32.to_le_bytes());
        put(m + off("module.core_layout.text_size"), &0x2000u32.to_le_bytes());
    }
    ram
}

/// `btf` with its first types up to `type_bytes` and its first
/// `string_bytes` of strings; returns the blob and how many types it holds.
fn cut_btf(btf: &[u8], type_bytes: usize, string_bytes: usize) -> (Vec<u8>, usize) {
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let (hdr_len, type_off, type_len, str_off, str_len) =
        (u32_at(btf, 4), u32_at(btf, 8), u32_at(btf, 12), u32_at(btf, 16), u32_at(btf, 20));
    let types = &btf[hdr_len + type_off..hdr_len + type_off + type_len];
    // Whole types only: each is 12 bytes and what its kind adds.
    let (mut p, mut n) = (0, 0);
    while p < types.len() {
        let info = u32_at(types, p + 4);
        let (kind, vlen) = ((info >> 24) & 0x1f, info & 0xffff);
        let extra = match kind {
            1 | 14 | 17 => 4,
            3 => 12,
            4 | 5 | 15 | 19 => 12 * vlen,
            6 | 13 => 8 * vlen,
            _ => 0,
        };
        if p + 12 + extra > type_bytes {
            break;
        }
        p += 12 + extra;
        n += 1;
    }
    let strings = &btf[hdr_len + str_off..hdr_len + str_off + str_len.min(string_bytes)];
    let mut out = btf[..hdr_len].to_vec();
    for (at, v) in [(8, 0), (12, p), (16, p), (20, strings.len())] {
        out[at..at + 4].copy_from_slice(&u32::try_from(v).unwrap().to_le_bytes());
    }
    out.extend_from_slice(&types[..p]);
    out.extend_from_slice(strings);
    (out, n)
}

/// The ELF core at `path` with its note segments and the first 8 KiB of its
/// first load segment, in a file of their own.
fn cut_core(path: &std::path::Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    const PT_LOAD: u32 = 1;
    const PT_NOTE: u32 = 4;
    const PHDR: usize = 56;
    let file = std::fs::File::open(path).unwrap();
    let at = |off: u64, len: usize| {
        let mut b = vec![0u8; len];
        file.read_exact_at(&mut b, off).unwrap();
        b
    };
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let mut head = at(0, 64);
    let (phoff, phnum) = (u64_at(&head, 0x20), usize::from(u16_at(&head, 0x38)));
    let phdrs = at(phoff, phnum * PHDR);
    let mut kept: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut load_kept = false;
    for ph in phdrs.chunks_exact(PHDR) {
        let (kind, offset, filesz) = (u32_at(ph, 0), u64_at(ph, 8), u64_at(ph, 32));
        let mut ph = ph.to_vec();
        let len = match kind {
            PT_NOTE => filesz,
            PT_LOAD if !load_kept => {
                load_kept = true;
                filesz.min(8192)
            }
            _ => continue,
        };
        ph[32..40].copy_from_slice(&len.to_le_bytes()); // p_filesz
        if kind == PT_LOAD {
            ph[40..48].copy_from_slice(&len.to_le_bytes()); // p_memsz
        }
        kept.push((ph, at(offset, usize::try_from(len).unwrap())));
    }
    head[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    head[0x38..0x3a].copy_from_slice(&u16::try_from(kept.len()).unwrap().to_le_bytes());
    let mut offset = (64 + kept.len() * PHDR) as u64;
    let mut out = head;
    for (ph, data) in &mut kept {
        ph[8..16].copy_from_slice(&offset.to_le_bytes()); // p_offset
        offset += data.len() as u64;
        out.extend_from_slice(ph);
    }
    for (_, data) in &kept {
        out.extend_from_slice(data);
    }
    out
}

fn write(out: &std::path::Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = out.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// The kallsyms tables of `rodata` with only their first `keep` symbols
/// (257 to 512, so two markers): laid out as the kernel lays them out, with
/// no `kallsyms_seqs_of_names`.
fn cut_kallsyms(rodata: &[u8], keep: usize) -> Vec<u8> {
    let u32_at = |o: usize| u32::from_le_bytes(rodata[o..o + 4].try_into().unwrap());
    let tables = vigil::linux::kallsyms::find(rodata).expect("the lab kernel's kallsyms");
    let n = tables.symbols.len();
    let tokens = tables.token_table;
    // The token table and its index: 256 NUL-terminated tokens, then 256
    // u16 offsets, aligned.
    let mut end = tokens;
    for _ in 0..256 {
        end += rodata[end..].iter().position(|&c| c == 0).unwrap() + 1;
    }
    let index = end.next_multiple_of(2);
    let token_part = &rodata[tokens..index + 512];
    // The markers: a u32 run from 0 in steps of names' lengths, n/256 of
    // them rounded up, somewhere before the token table.
    let k = n.div_ceil(256);
    let markers_at = (0..tokens - 4 * k)
        .rev()
        .step_by(4)
        .map(|p| p & !3)
        .find(|&p| u32_at(p) == 0 && (1..k).all(|i| u32_at(p + 4 * i) > u32_at(p + 4 * (i - 1))))
        .expect("the markers");
    // The names end at the markers; the count sits before the names.
    let names_len = usize::try_from(u32_at(markers_at + 4 * (k - 1))).unwrap();
    let num_at = (0..markers_at)
        .rev()
        .step_by(4)
        .map(|p| p & !3)
        .find(|&p| u32_at(p) as usize == n && markers_at - p >= names_len)
        .expect("the symbol count");
    let names_at = if u32_at(num_at + 4) == 0 { (num_at + 8) & !7 } else { num_at + 4 };
    let base_at = (num_at & !7) - 8;
    let offsets_at = base_at - (n * 4).next_multiple_of(8);
    assert!(keep.is_multiple_of(256) && keep / 256 < k, "keep a multiple of 256, fewer than {n}");
    let cut_names = usize::try_from(u32_at(markers_at + 4 * (keep / 256))).unwrap();
    let mut out = rodata[offsets_at..offsets_at + 4 * keep].to_vec();
    out.resize(out.len().next_multiple_of(8), 0);
    out.extend_from_slice(&rodata[base_at..base_at + 8]);
    out.extend_from_slice(&u32::try_from(keep).unwrap().to_le_bytes());
    if names_at != num_at + 4 {
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out.extend_from_slice(&rodata[names_at..names_at + cut_names]);
    out.resize(out.len().next_multiple_of(4), 0);
    for i in 0..keep / 256 {
        out.extend_from_slice(&u32_at(markers_at + 4 * i).to_le_bytes());
    }
    out.extend_from_slice(token_part);
    out
}
