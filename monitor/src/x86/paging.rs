//! The page-table walker. Paging modes differ only in the table of constants
//! in [`PagingMode`]; one walk serves both.
//!
//! ```text
//!  63      57 56    48 47    39 38    30 29    21 20    12 11       0
//!  | sign   | PML5  | PML4  | PDPT  |  PD   |  PT   |  offset  |
//!             (5-level only)          1 GiB   2 MiB    4 KiB leaves
//! ```

use crate::addr::{GuestPhysAddr, GuestVirtAddr};
use crate::memory::{GuestMemory, MemoryError};

const PTE_PRESENT: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const PTE_NX: u64 = 1 << 63;
/// Physical address bits of an entry (MAXPHYADDR up to 52).
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
const ENTRIES: usize = 512;

/// A paging mode as a table of constants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingMode {
    /// Number of table levels.
    pub levels: u32,
    /// Levels (counted from the leaf, 0 = PT) whose entries may map a page
    /// directly with the PS bit.
    pub large_levels: &'static [u32],
}

impl PagingMode {
    pub const FOUR_LEVEL: Self = Self { levels: 4, large_levels: &[1, 2] };
    pub const FIVE_LEVEL: Self = Self { levels: 5, large_levels: &[1, 2] };

    /// The mode CR4 selects (LA57 is bit 12).
    pub fn from_cr4(cr4: u64) -> Self {
        if cr4 & super::CR4_LA57 != 0 { Self::FIVE_LEVEL } else { Self::FOUR_LEVEL }
    }

    /// Bits of virtual address translated.
    pub fn va_bits(&self) -> u32 {
        12 + 9 * self.levels
    }

    fn shift(level: u32) -> u32 {
        12 + 9 * level
    }

    /// Sign-extends a `va_bits`-wide address to its canonical form.
    fn canonical(&self, va: u64) -> u64 {
        let top = 1u64 << (self.va_bits() - 1);
        let mask = (top << 1) - 1;
        let low = va & mask;
        if low & top != 0 { low | !mask } else { low }
    }

    pub fn is_canonical(&self, va: u64) -> bool {
        self.canonical(va) == va
    }
}

/// Permissions of a mapping, accumulated over every level of the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perms {
    pub writable: bool,
    pub user: bool,
    pub executable: bool,
}

impl Perms {
    const ALL: Self = Self { writable: true, user: true, executable: true };

    fn narrow(self, entry: u64, nxe: bool) -> Self {
        Self {
            writable: self.writable && entry & PTE_RW != 0,
            user: self.user && entry & PTE_US != 0,
            executable: self.executable && !(nxe && entry & PTE_NX != 0),
        }
    }

    /// `rwx`-style text: `r-x`, `rw-`, with `u` appended for user pages.
    pub fn as_text(&self) -> String {
        format!(
            "r{}{}{}",
            if self.writable { 'w' } else { '-' },
            if self.executable { 'x' } else { '-' },
            if self.user { "u" } else { "" }
        )
    }

    /// Parses what [`Perms::as_text`] writes.
    pub fn from_text(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        let user = match b.len() {
            3 => false,
            4 if b[3] == b'u' => true,
            _ => return None,
        };
        let writable = match b[1] {
            b'w' => true,
            b'-' => false,
            _ => return None,
        };
        let executable = match b[2] {
            b'x' => true,
            b'-' => false,
            _ => return None,
        };
        (b[0] == b'r').then_some(Self { writable, user, executable })
    }

    /// Whether going from `self` to `new` grants anything `self` did not.
    pub fn loosened_by(&self, new: &Perms) -> bool {
        (new.writable && !self.writable)
            || (new.executable && !self.executable)
            || (new.user && !self.user)
    }
}

impl serde::Serialize for Perms {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_text())
    }
}

impl<'de> serde::Deserialize<'de> for Perms {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_text(&s).ok_or_else(|| {
            serde::de::Error::custom(format!("not a permission string like r-x: {s:?}"))
        })
    }
}

/// The result of translating one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub gpa: GuestPhysAddr,
    pub page_size: u64,
    pub perms: Perms,
}

/// One leaf mapping: `size` bytes at `gva` map to `gpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub gva: GuestVirtAddr,
    pub gpa: GuestPhysAddr,
    pub size: u64,
    pub perms: Perms,
}

/// What an enumeration found, including the tables it could not read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappingSet {
    pub mappings: Vec<Mapping>,
    /// Table pointers that led outside guest RAM: (first VA they cover, table address).
    pub unreadable_tables: Vec<(GuestVirtAddr, GuestPhysAddr)>,
}

/// Limits on one walk, so that hostile page tables cannot make it unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkBudget {
    /// Page tables read, at most.
    pub max_tables: usize,
    /// Leaf mappings returned, at most.
    pub max_mappings: usize,
}

impl Default for WalkBudget {
    /// Enough for a fully 4 KiB-mapped gigabyte (1 + 1 + 1 + 512 tables and
    /// 262,144 leaves) plus room.
    fn default() -> Self {
        Self { max_tables: 2048, max_mappings: 1 << 19 }
    }
}

/// Why a walk failed.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("{0} is not a canonical address for this paging mode")]
    NonCanonical(GuestVirtAddr),
    #[error("{0} is not mapped")]
    NotMapped(GuestVirtAddr),
    #[error("page table at {table} (translating {va}) is not in guest RAM")]
    TableUnreadable {
        va: GuestVirtAddr,
        table: GuestPhysAddr,
        #[source]
        source: MemoryError,
    },
    #[error("walk budget exhausted: more than {0} page tables")]
    TooManyTables(usize),
    #[error("walk budget exhausted: more than {0} mappings")]
    TooManyMappings(usize),
    #[error("range {start}..{end} is empty or not canonical")]
    BadRange { start: GuestVirtAddr, end: GuestVirtAddr },
}

/// Walks one address space (one CR3) of a guest.
pub struct Walker<'m, M: GuestMemory + ?Sized> {
    mem: &'m M,
    mode: PagingMode,
    root: GuestPhysAddr,
    /// The root table as read once, when pinned ([`Walker::pinned`]).
    pinned: Option<Box<[u64; ENTRIES]>>,
    nxe: bool,
    budget: WalkBudget,
}

impl<'m, M: GuestMemory + ?Sized> Walker<'m, M> {
    /// `cr3` may carry PCID or flag bits; only the table address is used.
    /// `nxe` is EFER.NXE: without it bit 63 is not a permission.
    pub fn new(mem: &'m M, mode: PagingMode, cr3: u64, nxe: bool) -> Self {
        Self {
            mem,
            mode,
            root: GuestPhysAddr(cr3 & PTE_ADDR),
            pinned: None,
            nxe,
            budget: WalkBudget::default(),
        }
    }

    /// Reads the root table once and walks from that copy from now on. A
    /// vCPU's CR3 may be the page table of a process that exits a moment
    /// later: its root page is then freed and reused while lower tables of
    /// the kernel half (shared by every process, never freed) stay. Walked
    /// from the copy, kernel addresses still translate as they did.
    pub fn pinned(mut self) -> Result<Self, WalkError> {
        let root = self.read_table(self.root, 0)?;
        self.pinned = Some(root);
        Ok(self)
    }

    pub fn with_budget(mut self, budget: WalkBudget) -> Self {
        self.budget = budget;
        self
    }

    fn read_table(&self, table: GuestPhysAddr, va: u64) -> Result<Box<[u64; ENTRIES]>, WalkError> {
        if table == self.root
            && let Some(root) = &self.pinned
        {
            return Ok(root.clone());
        }
        let mut bytes = [0u8; crate::addr::PAGE_BYTES];
        self.mem.read(table, &mut bytes).map_err(|source| WalkError::TableUnreadable {
            va: GuestVirtAddr(va),
            table,
            source,
        })?;
        let mut entries = Box::new([0u64; ENTRIES]);
        for (e, b) in entries.iter_mut().zip(bytes.chunks_exact(8)) {
            *e = u64::from_le_bytes(b.try_into().expect("8-byte chunk"));
        }
        Ok(entries)
    }

    fn leaf_addr(entry: u64, level: u32) -> u64 {
        entry & PTE_ADDR & !((1u64 << PagingMode::shift(level)) - 1)
    }

    /// Translates one virtual address.
    pub fn translate(&self, va: GuestVirtAddr) -> Result<Translation, WalkError> {
        if !self.mode.is_canonical(va.raw()) {
            return Err(WalkError::NonCanonical(va));
        }
        let mut table = self.root;
        let mut perms = Perms::ALL;
        for level in (0..self.mode.levels).rev() {
            let shift = PagingMode::shift(level);
            let idx = usize::try_from((va.raw() >> shift) & 0x1ff).expect("9-bit index");
            let entry = self.read_table(table, va.raw())?[idx];
            if entry & PTE_PRESENT == 0 {
                return Err(WalkError::NotMapped(va));
            }
            perms = perms.narrow(entry, self.nxe);
            if level == 0 || (entry & PTE_PS != 0 && self.mode.large_levels.contains(&level)) {
                let size = 1u64 << shift;
                let gpa = Self::leaf_addr(entry, level) | (va.raw() & (size - 1));
                return Ok(Translation { gpa: GuestPhysAddr(gpa), page_size: size, perms });
            }
            table = GuestPhysAddr(entry & PTE_ADDR);
        }
        unreachable!("level 0 always returns")
    }

    /// Every leaf mapping that starts in `[start, end)`, in address order.
    /// Tables outside RAM are skipped and listed, not fatal; exceeding the
    /// budget is.
    pub fn mappings(
        &self,
        start: GuestVirtAddr,
        end: GuestVirtAddr,
    ) -> Result<MappingSet, WalkError> {
        let m = self.mode;
        // `end` may be one past the top of the address space, written as 0.
        let end_incl = end.raw().wrapping_sub(1);
        if !m.is_canonical(start.raw()) || !m.is_canonical(end_incl) || end_incl < start.raw() {
            return Err(WalkError::BadRange { start, end });
        }
        let mut out = MappingSet::default();
        let mut tables = 0usize;
        self.enumerate(
            self.root,
            m.levels - 1,
            0,
            Perms::ALL,
            (start.raw(), end_incl),
            &mut tables,
            &mut out,
        )?;
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn enumerate(
        &self,
        table: GuestPhysAddr,
        level: u32,
        base: u64,
        perms: Perms,
        (lo, hi): (u64, u64),
        tables: &mut usize,
        out: &mut MappingSet,
    ) -> Result<(), WalkError> {
        *tables += 1;
        if *tables > self.budget.max_tables {
            return Err(WalkError::TooManyTables(self.budget.max_tables));
        }
        let entries = match self.read_table(table, self.mode.canonical(base)) {
            Ok(e) => e,
            Err(_) => {
                out.unreadable_tables.push((GuestVirtAddr(self.mode.canonical(base)), table));
                return Ok(());
            }
        };
        let shift = PagingMode::shift(level);
        let span = 1u64 << shift;
        for (idx, &entry) in entries.iter().enumerate() {
            let raw_va = base | ((idx as u64) << shift);
            let va = self.mode.canonical(raw_va);
            let va_last = va.wrapping_add(span - 1);
            if va_last < lo || va > hi || entry & PTE_PRESENT == 0 {
                continue;
            }
            let p = perms.narrow(entry, self.nxe);
            if level == 0 || (entry & PTE_PS != 0 && self.mode.large_levels.contains(&level)) {
                if va < lo {
                    continue; // a large page starting below the range
                }
                if out.mappings.len() >= self.budget.max_mappings {
                    return Err(WalkError::TooManyMappings(self.budget.max_mappings));
                }
                let gpa = GuestPhysAddr(Self::leaf_addr(entry, level));
                out.mappings.push(Mapping { gva: GuestVirtAddr(va), gpa, size: span, perms: p });
            } else {
                self.enumerate(
                    GuestPhysAddr(entry & PTE_ADDR),
                    level - 1,
                    raw_va,
                    p,
                    (lo, hi),
                    tables,
                    out,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::type_complexity)]
mod tests {
    use super::super::builder::{Builder, Flags};
    use super::*;
    use crate::memory::RawDump;

    const KTEXT: u64 = 0xffff_ffff_8100_0000;

    fn walk_all(b: &Builder, mode: PagingMode) -> Vec<Mapping> {
        let mem = RawDump::from_bytes(b.memory().to_vec());
        let w = Walker::new(&mem, mode, b.root(), true);
        let set = w.mappings(GuestVirtAddr(0), GuestVirtAddr(0)).unwrap();
        assert!(set.unreadable_tables.is_empty());
        set.mappings
    }

    #[test]
    fn agrees_with_the_builder_in_both_modes() {
        for mode in [PagingMode::FOUR_LEVEL, PagingMode::FIVE_LEVEL] {
            let mut b = Builder::new(mode.levels, 64 << 20);
            b.map(KTEXT, 0x20_0000, 2 << 20, Flags::TEXT); // one 2 MiB page
            b.map(KTEXT + (2 << 20), 0x40_0000, 4096 * 3, Flags::RODATA); // 4 KiB pages
            b.map(KTEXT + (4 << 20), 0x50_0000, 4096, Flags::DATA);
            b.map(0x40_0000_0000, 0x4000_0000, 1 << 30, Flags::USER); // one 1 GiB page
            let mem = RawDump::from_bytes(b.memory().to_vec());
            let w = Walker::new(&mem, mode, b.root(), true);
            for &(va, pa, size, flags) in b.expected() {
                for probe in [0, size / 2, size - 1] {
                    let t = w.translate(GuestVirtAddr(va + probe)).unwrap();
                    assert_eq!(t.gpa, GuestPhysAddr(pa + probe));
                    assert_eq!(t.page_size, size);
                    assert_eq!(t.perms, flags.perms());
                }
            }
            let got = walk_all(&b, mode);
            let want: Vec<_> =
                b.expected().iter().map(|&(va, pa, size, f)| (va, pa, size, f.perms())).collect();
            let got: Vec<_> =
                got.iter().map(|m| (m.gva.raw(), m.gpa.raw(), m.size, m.perms)).collect();
            assert_eq!(got, want, "mode {mode:?}");
            assert!(matches!(
                w.translate(GuestVirtAddr(KTEXT + (8 << 20))),
                Err(WalkError::NotMapped(_))
            ));
            assert!(matches!(
                w.translate(GuestVirtAddr(0x8000_0000_0000_0000)),
                Err(WalkError::NonCanonical(_))
            ));
        }
    }

    #[test]
    fn permissions_accumulate_across_levels_when_bits_flip() {
        let mut b = Builder::new(4, 16 << 20);
        b.map(KTEXT, 0x20_0000, 4096, Flags::DATA);
        let mem_of = |b: &Builder| RawDump::from_bytes(b.memory().to_vec());
        let perms = |b: &Builder| {
            let m = mem_of(b);
            Walker::new(&m, PagingMode::FOUR_LEVEL, b.root(), true)
                .translate(GuestVirtAddr(KTEXT))
                .unwrap()
                .perms
        };
        assert_eq!(perms(&b), Perms { writable: true, user: false, executable: false });
        // NX set high up covers everything below; cleared everywhere makes it executable.
        b.set_entry_bit(KTEXT, 0, 63, false);
        assert!(perms(&b).executable);
        b.set_entry_bit(KTEXT, 2, 63, true);
        assert!(!perms(&b).executable);
        b.set_entry_bit(KTEXT, 2, 63, false);
        // RW cleared at the top level makes the page read-only whatever the leaf says.
        b.set_entry_bit(KTEXT, 3, 1, false);
        assert!(!perms(&b).writable);
        b.set_entry_bit(KTEXT, 3, 1, true);
        // US must be set at every level for a user page.
        b.set_entry_bit(KTEXT, 0, 2, true);
        assert!(!perms(&b).user);
        for level in 1..4 {
            b.set_entry_bit(KTEXT, level, 2, true);
        }
        assert!(perms(&b).user);
        // Without EFER.NXE, bit 63 grants nothing and takes nothing.
        b.set_entry_bit(KTEXT, 0, 63, true);
        let m = mem_of(&b);
        assert!(
            Walker::new(&m, PagingMode::FOUR_LEVEL, b.root(), false)
                .translate(GuestVirtAddr(KTEXT))
                .unwrap()
                .perms
                .executable
        );
        // Clearing present unmaps.
        b.set_entry_bit(KTEXT, 1, 0, false);
        let m = mem_of(&b);
        assert!(
            Walker::new(&m, PagingMode::FOUR_LEVEL, b.root(), true)
                .translate(GuestVirtAddr(KTEXT))
                .is_err()
        );
    }

    #[test]
    fn perms_text_round_trips() {
        for w in [false, true] {
            for x in [false, true] {
                for u in [false, true] {
                    let p = Perms { writable: w, user: u, executable: x };
                    assert_eq!(Perms::from_text(&p.as_text()), Some(p));
                }
            }
        }
        for bad in ["", "r", "rwxx", "-wx", "rwxU", "r?x"] {
            assert_eq!(Perms::from_text(bad), None, "{bad}");
        }
        let ro = Perms { writable: false, user: false, executable: false };
        let rw = Perms { writable: true, ..ro };
        assert!(ro.loosened_by(&rw));
        assert!(!rw.loosened_by(&ro), "tightening is not loosening");
    }

    /// A pinned walker translates kernel addresses from its copy of the
    /// root table after the root page is freed and reused; an unpinned one
    /// reads the reused page.
    #[test]
    fn a_pinned_root_outlives_its_page() {
        struct Reused<'a> {
            mem: &'a RawDump,
            root: u64,
            gone: std::cell::Cell<bool>,
        }
        impl GuestMemory for Reused<'_> {
            fn read(&self, start: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
                self.mem.read(start, buf)?;
                if self.gone.get() && start.raw() == self.root {
                    buf.fill(0); // handed out again, cleared
                }
                Ok(())
            }
            fn layout(&self) -> &crate::memory::RamLayout {
                self.mem.layout()
            }
            fn kind(&self) -> &'static str {
                "reused"
            }
        }
        let mut b = Builder::new(4, 16 << 20);
        b.map(KTEXT, 0x20_0000, 4096, Flags::TEXT);
        let dump = RawDump::from_bytes(b.memory().to_vec());
        let mem = Reused { mem: &dump, root: b.root(), gone: false.into() };
        let pinned = Walker::new(&mem, PagingMode::FOUR_LEVEL, b.root(), true).pinned().unwrap();
        let plain = Walker::new(&mem, PagingMode::FOUR_LEVEL, b.root(), true);
        mem.gone.set(true);
        let t = pinned.translate(GuestVirtAddr(KTEXT + 8)).unwrap();
        assert_eq!(t.gpa, GuestPhysAddr(0x20_0008));
        assert!(
            plain.translate(GuestVirtAddr(KTEXT + 8)).is_err(),
            "the unpinned walk reads zeros"
        );
        // Pinning reads the root as it is then: a root already gone pins nothing useful.
        let late = Walker::new(&mem, PagingMode::FOUR_LEVEL, b.root(), true).pinned().unwrap();
        assert!(late.translate(GuestVirtAddr(KTEXT)).is_err());
    }

    #[test]
    fn ps_bit_turns_a_directory_entry_into_a_large_page() {
        let mut b = Builder::new(4, 16 << 20);
        b.map(KTEXT, 0x20_0000, 4096, Flags::TEXT);
        b.set_entry_bit(KTEXT, 1, 7, true); // PD entry now maps 2 MiB at the PT's address
        let mem = RawDump::from_bytes(b.memory().to_vec());
        let t = Walker::new(&mem, PagingMode::FOUR_LEVEL, b.root(), true)
            .translate(GuestVirtAddr(KTEXT + 0x1234))
            .unwrap();
        assert_eq!(t.page_size, 2 << 20);
        // PS at the PML4 level is not a large page: it is walked as a table pointer.
        let mut b = Builder::new(4, 16 << 20);
        b.map(KTEXT, 0x20_0000, 4096, Flags::TEXT);
        b.set_entry_bit(KTEXT, 3, 7, true);
        let mem = RawDump::from_bytes(b.memory().to_vec());
        let t = Walker::new(&mem, PagingMode::FOUR_LEVEL, b.root(), true)
            .translate(GuestVirtAddr(KTEXT))
            .unwrap();
        assert_eq!(t.page_size, 4096);
    }

    #[test]
    fn hostile_tables_stay_bounded() {
        // A page table whose every entry points back at itself: a loop.
        let mut mem = vec![0u8; 8192];
        for i in 0..512 {
            mem[4096 + i * 8..4096 + i * 8 + 8].copy_from_slice(&(0x1000u64 | 0x3).to_le_bytes());
        }
        let dump = RawDump::from_bytes(mem);
        let w = Walker::new(&dump, PagingMode::FOUR_LEVEL, 0x1000, true);
        let r = w.mappings(GuestVirtAddr(0), GuestVirtAddr(0x8000_0000_0000));
        assert!(
            matches!(r, Err(WalkError::TooManyTables(_)) | Err(WalkError::TooManyMappings(_))),
            "{r:?}"
        );
        // A pointer out of RAM is listed, not followed.
        let mut mem = vec![0u8; 8192];
        mem[4096..4104].copy_from_slice(&(0x7_0000_0000u64 | 0x3).to_le_bytes());
        let dump = RawDump::from_bytes(mem);
        let w = Walker::new(&dump, PagingMode::FOUR_LEVEL, 0x1000, true);
        let set = w.mappings(GuestVirtAddr(0), GuestVirtAddr(0x8000_0000_0000)).unwrap();
        assert_eq!(set.unreadable_tables, vec![(GuestVirtAddr(0), GuestPhysAddr(0x7_0000_0000))]);
        assert!(set.mappings.is_empty());
        // CR3 itself outside RAM.
        assert!(
            Walker::new(&dump, PagingMode::FOUR_LEVEL, 0x9_0000_0000, true)
                .translate(GuestVirtAddr(0))
                .is_err()
        );
    }

    proptest::proptest! {
        #[test]
        fn random_memory_never_panics_and_respects_budget(seed: u64, cr3_page in 0u64..16) {
            let mut mem = vec![0u8; 16 * 4096];
            let mut x = seed | 1;
            for chunk in mem.chunks_exact_mut(8) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                // Present entries pointing inside the buffer, with random flag bits.
                let e = (x & 0x8000_0000_0000_0fff) | ((x >> 20) % 16) << 12 | 1;
                chunk.copy_from_slice(&e.to_le_bytes());
            }
            let dump = RawDump::from_bytes(mem);
            let budget = WalkBudget { max_tables: 64, max_mappings: 4096 };
            let w = Walker::new(&dump, PagingMode::FOUR_LEVEL, cr3_page * 4096, true).with_budget(budget);
            if let Ok(set) = w.mappings(GuestVirtAddr(0xffff_8000_0000_0000), GuestVirtAddr(0)) {
                proptest::prop_assert!(set.mappings.len() <= 4096);
                for m in &set.mappings {
                    proptest::prop_assert!(PagingMode::FOUR_LEVEL.is_canonical(m.gva.raw()));
                }
            }
            let _ = w.translate(GuestVirtAddr(0xffff_ffff_8100_0000));
        }
    }
}
