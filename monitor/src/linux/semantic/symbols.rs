//! Names from the guest's own kallsyms, when no profile matches (lower
//! trust: a rootkit can rewrite them).

use super::*;

/// The image layout symbols kept of the guest's kallsyms.
pub(super) const LAYOUT_SYMBOLS: [&str; 4] = ["_text", "_etext", "__start_rodata", "__end_rodata"];

/// Symbols read from the guest's own kallsyms tables (in its rodata), for
/// naming addresses when no profile matches. Lower trust: the guest could
/// have forged them.
pub struct GuestSymbols {
    /// Code symbols at run-time addresses, sorted.
    pub(super) code: Vec<(u64, String)>,
    /// The image's layout symbols (`_text`, `_etext`, `__start_rodata`,
    /// `__end_rodata`) that were found, at run-time addresses.
    pub(super) layout: Vec<(&'static str, u64)>,
}

impl GuestSymbols {
    /// Host memory the names hold.
    pub fn held_bytes(&self) -> u64 {
        use crate::memory::held;
        held::vec(&self.code) + self.code.iter().map(|(_, n)| held::string(n)).sum::<u64>()
    }

    /// Reads the rodata region's pages (as the kernel model found them) and
    /// looks for kallsyms in them.
    pub fn read<M: GuestMemory + ?Sized>(
        mem: &M,
        rodata: &crate::integrity::RegionLayout,
    ) -> Option<Self> {
        let first = rodata.pages.first()?.gva.raw();
        let last = rodata.pages.last()?.gva.raw();
        let span = usize::try_from(last.checked_sub(first)? + PAGE_SIZE).ok()?;
        // Real rodata is about 10 MiB; the guest decides this span.
        if span > 64 << 20 {
            return None;
        }
        let mut buf = vec![0u8; span];
        for p in &rodata.pages {
            let off = usize::try_from(p.gva.raw() - first).ok()?;
            mem.read(p.gpa, &mut buf[off..off + crate::addr::PAGE_BYTES]).ok()?;
        }
        let t = crate::linux::kallsyms::find(&buf).ok()?;
        let layout = LAYOUT_SYMBOLS
            .iter()
            .filter_map(|&n| t.symbols.iter().find(|s| s.name == n).map(|s| (n, s.addr)))
            .collect();
        let mut code: Vec<(u64, String)> = t
            .symbols
            .into_iter()
            .filter(|s| matches!(s.kind, 'T' | 't'))
            .map(|s| (s.addr, s.name))
            .collect();
        code.sort();
        Some(Self { code, layout })
    }

    /// The run-time address of a layout symbol, as the guest's kallsyms say.
    pub fn layout_symbol(&self, name: &str) -> Option<u64> {
        self.layout.iter().find(|(n, _)| *n == name).map(|&(_, a)| a)
    }

    pub fn len(&self) -> usize {
        self.code.len()
    }

    pub fn is_empty(&self) -> bool {
        self.code.is_empty()
    }

    /// `symbol+0xoff (kernel text, from guest memory)` for a run-time address.
    pub fn locate(&self, gva: u64) -> Option<String> {
        let i = self.code.partition_point(|(a, _)| *a <= gva).checked_sub(1)?;
        let (addr, name) = &self.code[i];
        let off = gva - addr;
        // Past the last symbol by more than a large function: not text.
        (off < 1 << 20)
            .then(|| format!("{name}+{off:#x} (kernel text, named from guest memory: lower trust)"))
    }
}
