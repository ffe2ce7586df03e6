//! Guest reads of the kernel's records of executable memory and patching:
//! ftrace ops and records, kprobes, module tables and symbols; bounded,
//! loop-safe lists.

use super::*;

/// Reads a `list_head` list from `head`, calling `each` with every entry's
/// `list_head` address; bounded and loop-safe.
pub(crate) fn walk_list<M: GuestMemory + ?Sized>(
    mem: &M,
    space: &dyn AddressSpace,
    head: u64,
    mut each: impl FnMut(u64),
) -> Result<(), String> {
    let mut seen = HashSet::new();
    let mut next =
        read_u64(mem, space, head).ok_or_else(|| format!("list at {head:#x} unreadable"))?;
    while next != head {
        if !seen.insert(next) || seen.len() > MAX_LIST {
            return Err(format!("list at {head:#x} loops or is longer than {MAX_LIST}"));
        }
        if crate::integrity::check::Deadline::stops(seen.len()) {
            return Err(crate::integrity::check::OUT_OF_TIME.into());
        }
        each(next);
        next = read_u64(mem, space, next).ok_or_else(|| format!("list at {head:#x} breaks off"))?;
    }
    Ok(())
}

pub(crate) fn need(m: &Matched<'_>, path: &str) -> Result<u64, String> {
    m.profile.offset(path).ok_or_else(|| format!("the profile has no offset {path}"))
}

pub(crate) fn sym(m: &Matched<'_>, name: &str) -> Result<u64, String> {
    m.expect(name).ok_or_else(|| format!("the profile has no symbol {name}"))
}

/// Executable allocations the kernel records outside modules: ftrace ops
/// trampolines, kprobe instruction slots, BPF program packs and BPF images.
/// Returns the ranges, and what could not be read.
pub fn exec_ranges<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> (Vec<ExecRange>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let push = |start: u64, len: u64, what: &'static str, out: &mut Vec<ExecRange>| {
        if start != 0 && len > 0 && len <= MAX_EXEC_RANGE {
            out.push(ExecRange { start, end: start.saturating_add(len), what });
        }
    };
    // ftrace ops trampolines: of the ops registered now, and of every ops
    // whose trampoline is still allocated (ftrace keeps a static ops'
    // trampoline after it unregisters it, on ftrace_ops_trampoline_list).
    // Each is believed only as ftrace makes one: a page at most, a copy of
    // its caller.
    let callers = crate::linux::hooks::callers(m, mem, space);
    if let Err(e) = ftrace_ops(m, mem, space).map(|ops| {
        for o in ops.iter().filter(|o| genuine(m, mem, space, o, &callers)) {
            push(o.trampoline, o.trampoline_size, "an ftrace trampoline", &mut out);
        }
    }) {
        problems.push(format!("ftrace ops: {e}"));
    }
    if let Err(e) = trampoline_ops(m, mem, space).map(|ops| {
        for o in ops.iter().filter(|o| genuine(m, mem, space, o, &callers)) {
            push(o.trampoline, o.trampoline_size, "an ftrace trampoline", &mut out);
        }
    }) {
        problems.push(format!("ftrace trampolines: {e}"));
    }
    // kprobe instruction slots, plain and optimised.
    for (cache, what) in [
        ("kprobe_insn_slots", "a kprobe instruction slot page"),
        ("kprobe_optinsn_slots", "a kprobe optimisation buffer page"),
    ] {
        if let Err(e) = slot_pages(m, mem, space, cache).map(|pages| {
            for p in pages {
                push(p, PAGE_SIZE, what, &mut out);
            }
        }) {
            problems.push(format!("{cache}: {e}"));
        }
    }
    // BPF program packs and every BPF image with a kallsyms entry.
    let packs = (|| -> Result<(), String> {
        let (list, ptr) = (need(m, "bpf_prog_pack.list")?, need(m, "bpf_prog_pack.ptr")?);
        let mut found = Vec::new();
        walk_list(mem, space, sym(m, "pack_list")?, |e| found.push(e.wrapping_sub(list)))?;
        for p in found {
            if let Some(at) = read_u64(mem, space, p.wrapping_add(ptr)) {
                push(at, BPF_PACK_SIZE, "a BPF program pack", &mut out);
            }
        }
        Ok(())
    })();
    if let Err(e) = packs {
        problems.push(format!("BPF program packs: {e}"));
    }
    let ksyms = (|| -> Result<(), String> {
        let (lnode, start, end) =
            (need(m, "bpf_ksym.lnode")?, need(m, "bpf_ksym.start")?, need(m, "bpf_ksym.end")?);
        let mut found = Vec::new();
        walk_list(mem, space, sym(m, "bpf_kallsyms")?, |e| found.push(e.wrapping_sub(lnode)))?;
        for k in found {
            if let (Some(s), Some(e)) = (
                read_u64(mem, space, k.wrapping_add(start)),
                read_u64(mem, space, k.wrapping_add(end)),
            ) {
                push(s, e.saturating_sub(s), "a BPF image", &mut out);
            }
        }
        Ok(())
    })();
    if let Err(e) = ksyms {
        problems.push(format!("BPF images: {e}"));
    }
    (out, problems)
}

/// Whether an ops' trampoline is one ftrace made (see
/// [`crate::linux::hooks::trampoline`]).
pub(super) fn genuine<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    o: &Ops,
    callers: &[crate::linux::hooks::Caller],
) -> bool {
    crate::linux::hooks::trampoline(
        m,
        mem,
        space,
        (o.at, o.func),
        o.trampoline,
        o.trampoline_size,
        callers,
    )
    .is_ok()
}

pub(super) struct Ops {
    /// Where its record lies.
    pub(super) at: u64,
    pub(super) func: u64,
    pub(super) trampoline: u64,
    pub(super) trampoline_size: u64,
}

pub(super) fn ftrace_ops<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<Ops>, String> {
    let (next_off, func_off, tramp_off, size_off) = (
        need(m, "ftrace_ops.next")?,
        need(m, "ftrace_ops.func")?,
        need(m, "ftrace_ops.trampoline")?,
        need(m, "ftrace_ops.trampoline_size")?,
    );
    let end = sym(m, "ftrace_list_end")?;
    let mut ops = Vec::new();
    let mut seen = HashSet::new();
    let mut at =
        read_u64(mem, space, sym(m, "ftrace_ops_list")?).ok_or("ftrace_ops_list unreadable")?;
    while at != end && at != 0 {
        if !seen.insert(at) || seen.len() > MAX_LIST {
            return Err("the ops list loops or is too long".into());
        }
        if crate::integrity::check::Deadline::stops(seen.len()) {
            return Err(crate::integrity::check::OUT_OF_TIME.into());
        }
        ops.push(Ops {
            at,
            func: read_u64(mem, space, at.wrapping_add(func_off)).unwrap_or(0),
            trampoline: read_u64(mem, space, at.wrapping_add(tramp_off)).unwrap_or(0),
            trampoline_size: u64::from(
                read_u32(mem, space, at.wrapping_add(size_off)).unwrap_or(0),
            ),
        });
        at = read_u64(mem, space, at.wrapping_add(next_off)).ok_or("the ops list breaks off")?;
    }
    Ok(ops)
}

/// The ops on `ftrace_ops_trampoline_list`: every ops with an allocated trampoline.
pub(super) fn trampoline_ops<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<Ops>, String> {
    let (list, func_off, tramp_off, size_off) = (
        need(m, "ftrace_ops.list")?,
        need(m, "ftrace_ops.func")?,
        need(m, "ftrace_ops.trampoline")?,
        need(m, "ftrace_ops.trampoline_size")?,
    );
    let mut entries = Vec::new();
    walk_list(mem, space, sym(m, "ftrace_ops_trampoline_list")?, |e| {
        entries.push(e.wrapping_sub(list))
    })?;
    Ok(entries
        .into_iter()
        .map(|o| Ops {
            at: o,
            func: read_u64(mem, space, o.wrapping_add(func_off)).unwrap_or(0),
            trampoline: read_u64(mem, space, o.wrapping_add(tramp_off)).unwrap_or(0),
            trampoline_size: u64::from(read_u32(mem, space, o.wrapping_add(size_off)).unwrap_or(0)),
        })
        .collect())
}

pub(super) fn slot_pages<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    cache: &str,
) -> Result<Vec<u64>, String> {
    let (pages, list, insns) = (
        need(m, "kprobe_insn_cache.pages")?,
        need(m, "kprobe_insn_page.list")?,
        need(m, "kprobe_insn_page.insns")?,
    );
    let mut entries = Vec::new();
    walk_list(mem, space, sym(m, cache)?.wrapping_add(pages), |e| {
        entries.push(e.wrapping_sub(list))
    })?;
    Ok(entries.into_iter().filter_map(|p| read_u64(mem, space, p.wrapping_add(insns))).collect())
}

pub(crate) fn read_span<M: GuestMemory + ?Sized>(
    mem: &M,
    space: &dyn AddressSpace,
    start: u64,
    len: u64,
) -> Result<Vec<u8>, String> {
    if len > MAX_TABLE_BYTES {
        return Err(format!("{len} bytes is implausibly long"));
    }
    read_virt(mem, space, start, usize::try_from(len).map_err(|e| e.to_string())?)
        .map(|(b, _)| b)
        .ok_or_else(|| format!("{len} bytes at {start:#x} are not readable"))
}

/// What one parsed table entry may come to in memory at most: its parsed
/// form (32 bytes, in a vector that may have twice the room), a copy of its
/// raw bytes while the map is made, and its place in the site map.
pub(super) const PARSED_ENTRY: u64 = 128;

/// [`read_span`] of a table of `entries` entries, drawn from the
/// examination's [`ReadBudget`](crate::linux::semantic::ReadBudget): its
/// bytes and what parsing them makes. Refused past the budget, as a table
/// that cannot be read.
pub(crate) fn read_counted<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    (mem, space): (&M, &dyn AddressSpace),
    (start, len): (u64, u64),
    entries: u64,
    what: &str,
) -> Result<Vec<u8>, String> {
    if len > MAX_TABLE_BYTES {
        return Err(format!("{len} bytes is implausibly long"));
    }
    let charge = len.saturating_add(entries.saturating_mul(PARSED_ENTRY));
    m.reads.take(charge, what)?;
    // A table that cannot be read holds nothing: its charge comes back (a
    // list of tables pointing nowhere would spend the budget otherwise).
    read_span(mem, space, start, len).inspect_err(|_| m.reads.give_back(charge))
}

/// A module's jump entries and static call sites, as read.
pub(super) fn module_tables<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    md: &Module,
) -> Result<ModuleTables, String> {
    let at = md.addr;
    let (je, nje, sc, nsc) = (
        need(m, "module.jump_entries")?,
        need(m, "module.num_jump_entries")?,
        need(m, "module.static_call_sites")?,
        need(m, "module.num_static_call_sites")?,
    );
    let u32_field = |off: u64| read_u32(mem, space, at.wrapping_add(off)).ok_or("unreadable");
    let u64_field = |off: u64| read_u64(mem, space, at.wrapping_add(off)).ok_or("unreadable");
    let table =
        |count: u64, entry: u64, base: u64, what: &str| -> Result<Option<RawTable>, String> {
            if count == 0 {
                return Ok(None);
            }
            let what = format!("module {}'s {what}", md.name);
            let len = count.saturating_mul(entry);
            Ok(Some((base, read_counted(m, (mem, space), (base, len), count, &what)?)))
        };
    let jumps = table(u64::from(u32_field(nje)?), 16, u64_field(je)?, "jump table")?;
    let calls = table(u64::from(u32_field(nsc)?), 8, u64_field(sc)?, "static call sites")?;
    Ok((jumps, calls))
}

/// `STT_FUNC` symbols of a module, as address ranges.
pub(super) fn module_functions<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    md: &Module,
) -> Result<Vec<(u64, u64)>, String> {
    const SYM: usize = 24;
    const STT_FUNC: u8 = 2;
    let (ks_off, tab_off, n_off) = (
        need(m, "module.kallsyms")?,
        need(m, "mod_kallsyms.symtab")?,
        need(m, "mod_kallsyms.num_symtab")?,
    );
    let ks = read_u64(mem, space, md.addr.wrapping_add(ks_off)).ok_or("kallsyms unreadable")?;
    let tab = read_u64(mem, space, ks.wrapping_add(tab_off)).ok_or("symtab unreadable")?;
    let n = u64::from(read_u32(mem, space, ks.wrapping_add(n_off)).ok_or("num_symtab unreadable")?);
    if n > 1 << 16 {
        return Err(format!("{n} symbols is implausible"));
    }
    let what = format!("module {}'s symbol table", md.name);
    let bytes = read_counted(m, (mem, space), (tab, n * SYM as u64), n, &what)?;
    Ok(bytes
        .chunks_exact(SYM)
        .filter(|s| s[4] & 0xf == STT_FUNC)
        .filter_map(|s| {
            let value = u64::from_le_bytes(s[8..16].try_into().expect("8 bytes"));
            let size = u64::from_le_bytes(s[16..24].try_into().expect("8 bytes"));
            (size > 0 && size < 1 << 24).then(|| (value, value.saturating_add(size)))
        })
        .collect())
}

pub(super) fn ftrace_records<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<u64>, String> {
    let (next_off, recs_off, index_off, ip_off, size) = (
        need(m, "ftrace_page.next")?,
        need(m, "ftrace_page.records")?,
        need(m, "ftrace_page.index")?,
        need(m, "dyn_ftrace.ip")?,
        need(m, "dyn_ftrace.#size")?,
    );
    if !(8..=256).contains(&size) || ip_off + 8 > size {
        return Err(format!("implausible dyn_ftrace size {size}"));
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut pg = read_u64(mem, space, sym(m, "ftrace_pages_start")?)
        .ok_or("ftrace_pages_start unreadable")?;
    while pg != 0 {
        if !seen.insert(pg) || seen.len() > MAX_FTRACE_PAGES {
            return Err("the ftrace page list loops or is too long".into());
        }
        if crate::integrity::check::Deadline::stops(seen.len()) {
            return Err(crate::integrity::check::OUT_OF_TIME.into());
        }
        let recs = read_u64(mem, space, pg.wrapping_add(recs_off))
            .ok_or("a page's records pointer unreadable")?;
        let n = u64::from(
            read_u32(mem, space, pg.wrapping_add(index_off)).ok_or("a page's count unreadable")?,
        );
        if out.len() as u64 + n > MAX_FTRACE_RECORDS as u64 {
            return Err(format!("more than {MAX_FTRACE_RECORDS} records"));
        }
        if n > 0 {
            let bytes = read_counted(m, (mem, space), (recs, n * size), n, "the ftrace records")?;
            let step = usize::try_from(size).expect("checked above");
            let ip = usize::try_from(ip_off).expect("checked above");
            out.extend(
                bytes
                    .chunks_exact(step)
                    .map(|r| u64::from_le_bytes(r[ip..ip + 8].try_into().expect("8 bytes"))),
            );
        }
        pg = read_u64(mem, space, pg.wrapping_add(next_off))
            .ok_or("the ftrace page list breaks off")?;
    }
    Ok(out)
}

pub(super) fn kprobes<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<HashMap<u64, u32>, String> {
    let (hlist, addr_off, flags_off) =
        (need(m, "kprobe.hlist")?, need(m, "kprobe.addr")?, need(m, "kprobe.flags")?);
    let table = sym(m, "kprobe_table")?;
    let mut out = HashMap::new();
    let mut seen = HashSet::new();
    for i in 0..KPROBE_TABLE_SIZE {
        let mut node = read_u64(mem, space, table + i * 8).ok_or("kprobe_table unreadable")?;
        while node != 0 {
            if !seen.insert(node) || seen.len() > MAX_LIST {
                return Err("a kprobe chain loops or is too long".into());
            }
            if crate::integrity::check::Deadline::stops(seen.len()) {
                return Err(crate::integrity::check::OUT_OF_TIME.into());
            }
            let kp = node.wrapping_sub(hlist);
            let addr =
                read_u64(mem, space, kp.wrapping_add(addr_off)).ok_or("a kprobe is unreadable")?;
            let flags = read_u32(mem, space, kp.wrapping_add(flags_off)).unwrap_or(0);
            if flags & (KPROBE_FLAG_FTRACE | KPROBE_FLAG_GONE) == 0 {
                out.insert(addr, flags);
            }
            node = read_u64(mem, space, node).ok_or("a kprobe chain breaks off")?;
        }
    }
    Ok(out)
}
