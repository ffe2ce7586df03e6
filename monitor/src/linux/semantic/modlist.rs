//! The guest's module list: walked bounded and loop-safe, each entry's
//! state and text, and executable module-area memory no module holds.

use super::*;

/// Most modules believed in a module list.
pub(super) const MAX_MODULES: usize = 4096;
/// Pages of a BPF program pack (`BPF_PROG_PACK_SIZE`, 2 MiB).
pub(super) const BPF_PACK_PAGES: u64 = 512;
/// Walks of the module list tried before its failure is believed. The
/// guest loads and unloads modules while vigil walks the list, so a walk can
/// reach a module that is freed (its pages unmapped) between two reads; a
/// walk from the head again no longer meets it.
pub(super) const MODULE_WALKS: usize = 3;
/// `MODULE_NAME_LEN` on 64-bit.
pub(super) const MODULE_NAME_LEN: usize = 56;

/// A module as the guest's module list has it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Module {
    pub name: String,
    /// Guest virtual address of its `struct module`.
    #[serde(skip)]
    pub addr: u64,
    /// Guest virtual address of its code and read-only data.
    pub base: u64,
    pub size: u64,
    pub text_size: u64,
    /// `enum module_state`: 0 live, 1 coming, 2 going, 3 unformed.
    pub state: u32,
    /// Its init text (base, size): executable while its init function runs,
    /// freed after (the kernel clears these first). (0, 0) when none.
    #[serde(skip)]
    pub init: (u64, u64),
    /// Its writable data (base, size): within the core allocation up to
    /// 6.3, `mem[MOD_DATA]` from 6.4. (0, 0) when unknown.
    #[serde(skip)]
    pub data: (u64, u64),
}

/// Init text larger than this is not believed.
pub(super) const MAX_INIT_TEXT: u64 = 64 << 20;

impl Module {
    /// Whether `start..end` lies in its core allocation, or, while it is
    /// not yet live, its init text (a live module's init text is freed:
    /// fields that still name some are not believed).
    pub fn holds(&self, start: u64, end: u64) -> bool {
        let within = |base: u64, size: u64| base <= start && end <= base.saturating_add(size);
        let loading = matches!(self.state, MODULE_COMING | MODULE_UNFORMED);
        within(self.base, self.size)
            || (loading && self.init.1 > 0 && within(self.init.0, self.init.1))
    }

    /// Whether `at` lies in its writable data (where it keeps records it
    /// registers with the kernel, its `struct module` among them).
    pub fn data_holds(&self, at: u64) -> bool {
        (self.data.0..self.data.0.saturating_add(self.data.1)).contains(&at)
    }
}

/// `MODULE_STATE_LIVE`: loaded, initialised, its text final.
pub const MODULE_LIVE: u32 = 0;
/// `MODULE_STATE_COMING`: its init function runs.
pub const MODULE_COMING: u32 = 1;
/// `MODULE_STATE_GOING`: its exit function runs, or it failed to load.
pub const MODULE_GOING: u32 = 2;
/// `MODULE_STATE_UNFORMED`: still being set up by the loader.
pub const MODULE_UNFORMED: u32 = 3;

/// A module state as `/proc/modules` would word it.
pub fn module_state_name(state: u32) -> &'static str {
    match state {
        MODULE_LIVE => "live",
        MODULE_COMING => "loading",
        MODULE_GOING => "unloading",
        3 => "unformed",
        _ => "in an unknown state",
    }
}

/// Where loadable modules live on x86-64 (MODULES_VADDR..MODULES_END).
pub const MODULES: std::ops::Range<u64> = 0xffff_ffff_c000_0000..0xffff_ffff_ff00_0000;

/// Walks the guest's module list (`modules`, a `list_head`), bounded and
/// loop-safe. The list is guest data: names are checked, sizes bounded.
pub fn walk_modules<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<Module>, String> {
    let p = m.profile;
    let need = |k: &str| {
        p.offset(k).ok_or_else(|| format!("the profile has no offset {k} (no BTF in the image?)"))
    };
    let (list, name) = (need("module.list")?, need("module.name")?);
    let (base, size, text) = module_layout(p)?;
    let init_at = module_init_layout(p);
    let data_at = module_data_layout(p);
    let head = m.expect("modules").ok_or("the profile has no symbol modules")?;
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut next = read_u64(mem, space, head).ok_or("the module list head is not readable")?;
    while next != head {
        if !seen.insert(next) || out.len() >= MAX_MODULES {
            return Err(format!("the module list loops or is longer than {MAX_MODULES}"));
        }
        if crate::integrity::check::Deadline::stops(seen.len()) {
            return Err(crate::integrity::check::OUT_OF_TIME.into());
        }
        let md = next.wrapping_sub(list);
        // A (base, size) pair of the module's, believed up to MAX_INIT_TEXT.
        let slot = |at: Option<(u64, u64)>| {
            at.and_then(|(b, s)| {
                let base = read_u64(mem, space, md.wrapping_add(b))?;
                let size = u64::from(read_u32(mem, space, md.wrapping_add(s))?);
                Some((base, size))
            })
            .filter(|&(_, size)| size <= MAX_INIT_TEXT)
            .unwrap_or((0, 0))
        };
        let (raw, _) = read_virt(mem, space, md.wrapping_add(name), MODULE_NAME_LEN)
            .ok_or("a module's name is not readable")?;
        let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
        let nm = &raw[..end];
        if nm.is_empty() || !nm.iter().all(|c| c.is_ascii_graphic()) {
            return Err(format!("a module at {md:#x} has no valid name"));
        }
        out.push(Module {
            name: String::from_utf8_lossy(nm).into_owned(),
            addr: md,
            base: read_u64(mem, space, md.wrapping_add(base))
                .ok_or("a module's base is not readable")?,
            size: u64::from(
                read_u32(mem, space, md.wrapping_add(size))
                    .ok_or("a module's size is not readable")?,
            ),
            text_size: u64::from(
                read_u32(mem, space, md.wrapping_add(text))
                    .ok_or("a module's text size is not readable")?,
            ),
            state: p
                .offset("module.state")
                .and_then(|o| read_u32(mem, space, md.wrapping_add(o)))
                .unwrap_or(MODULE_LIVE),
            init: slot(init_at),
            data: slot(data_at),
        });
        next = read_u64(mem, space, next).ok_or("the module list breaks off")?;
    }
    Ok(out)
}

/// Where `struct module` keeps its code's base, the size the module's
/// executable pages may span from it, and its text size. Up to 6.3 the
/// core layout holds text, read-only data and data in one allocation; from
/// 6.4 `mem[MOD_TEXT]` holds the text alone.
pub(super) fn module_layout(p: &crate::linux::profile::Profile) -> Result<(u64, u64, u64), String> {
    let core = ["base", "size", "text_size"].map(|f| p.offset(&format!("module.core_layout.{f}")));
    if let [Some(base), Some(size), Some(text)] = core {
        return Ok((base, size, text));
    }
    match (p.offset("module.mem.base"), p.offset("module.mem.size")) {
        (Some(base), Some(size)) => Ok((base, size, size)),
        _ => Err("the profile has neither module.core_layout nor module.mem offsets \
                  (no BTF in the image?)"
            .into()),
    }
}

/// Where `struct module` keeps its init text's base and size: up to 6.3
/// `init_layout` (text first), from 6.4 `mem[MOD_INIT_TEXT]`, the fifth
/// `struct module_memory`.
pub(super) fn module_init_layout(p: &crate::linux::profile::Profile) -> Option<(u64, u64)> {
    const MOD_INIT_TEXT: u64 = 4;
    layout_of(p, ("module.init_layout.base", "module.init_layout.text_size"), MOD_INIT_TEXT)
}

/// Where `struct module` keeps its writable data's base and size: up to
/// 6.3 the core layout (all of it), from 6.4 `mem[MOD_DATA]`, the second
/// `struct module_memory`.
pub(super) fn module_data_layout(p: &crate::linux::profile::Profile) -> Option<(u64, u64)> {
    const MOD_DATA: u64 = 1;
    layout_of(p, ("module.core_layout.base", "module.core_layout.size"), MOD_DATA)
}

/// The offsets of a base and a size in `struct module`: the two members
/// named in `old` (up to 6.3), else those of `mem[index]` (from 6.4).
fn layout_of(
    p: &crate::linux::profile::Profile,
    old: (&str, &str),
    index: u64,
) -> Option<(u64, u64)> {
    if let (Some(b), Some(s)) = (p.offset(old.0), p.offset(old.1)) {
        return Some((b, s));
    }
    let skip = index.checked_mul(p.offset("module_memory.#size")?)?;
    Some((
        p.offset("module.mem.base")?.checked_add(skip)?,
        p.offset("module.mem.size")?.checked_add(skip)?,
    ))
}

/// [`walk_modules`], walked again from the head when a walk fails, up to
/// [`MODULE_WALKS`] times: a failure is believed only when it repeats, so a
/// module unloaded under the walk is not taken for a broken list.
pub fn walk_modules_settled<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
) -> Result<Vec<Module>, String> {
    let mut failure = String::new();
    for _ in 0..MODULE_WALKS {
        match walk_modules(m, mem, space) {
            Ok(list) => return Ok(list),
            Err(e) => failure = e,
        }
    }
    Err(format!("{failure} (in each of {MODULE_WALKS} walks)"))
}

/// Whether `md` is still, now, the live module the list walk found: its
/// `struct module` read again says the same name and base, and live. A
/// module unloaded since the walk is not (its state changes before its
/// memory is freed), nor one loaded again at the same base and not yet live.
pub fn still_live<M: GuestMemory + ?Sized>(
    m: &Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    md: &Module,
) -> bool {
    let p = m.profile;
    let (Some(name), Ok((base, _, _))) = (p.offset("module.name"), module_layout(p)) else {
        return false;
    };
    let live = match p.offset("module.state") {
        Some(o) => read_u32(mem, space, md.addr.wrapping_add(o)) == Some(MODULE_LIVE),
        None => true,
    };
    let named = read_virt(mem, space, md.addr.wrapping_add(name), MODULE_NAME_LEN).is_some_and(
        |(raw, _)| {
            let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            raw[..end] == *md.name.as_bytes()
        },
    );
    live && named && read_u64(mem, space, md.addr.wrapping_add(base)) == Some(md.base)
}

/// Executable pages of the module area that belong to no listed module, as
/// runs `(start, pages)`.
pub(super) fn unlisted_runs(
    space: &dyn AddressSpace,
    modules: &[Module],
    known: &[Mapping],
    recognized: &[crate::linux::patch::ExecRange],
) -> Vec<(u64, u64, GuestPhysAddr)> {
    let mut runs: Vec<(u64, u64, GuestPhysAddr)> = Vec::new();
    let known: std::collections::HashSet<(u64, u64)> =
        known.iter().map(|k| (k.gva.raw(), k.gpa.raw())).collect();
    for (i, mp) in space.exec_outside_image().into_iter().enumerate() {
        // Pages times (modules and records): long on a forged module area.
        // Cut short, the check fails as over time after this stage.
        if crate::integrity::check::Deadline::stops(i) {
            break;
        }
        let (s, e) = (mp.gva.raw(), mp.gva.raw().saturating_add(mp.size));
        if modules.iter().any(|md| md.holds(s, e))
            || known.contains(&(s, mp.gpa.raw()))
            || recognized.iter().any(|r| {
                r.start & !(PAGE_SIZE - 1) <= s
                    && e <= r.end.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
            })
        {
            continue;
        }
        match runs.last_mut() {
            Some(r) if r.0 + r.1 * PAGE_SIZE == s => r.1 += mp.size / PAGE_SIZE,
            _ => runs.push((s, mp.size / PAGE_SIZE, mp.gpa)),
        }
    }
    runs
}
