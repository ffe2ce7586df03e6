//! A memory source that misbehaves on purpose, for tests of what vigil does
//! when guest memory does: reads of a range that fail, reads that come back
//! short, and a mapping that goes away (QEMU killed in mid-scan). The plan
//! is shared, so a test changes it while a watch holds the source.

use std::sync::{Arc, Mutex};

use super::{GuestMemory, MemoryError, RamLayout};
use crate::addr::GuestPhysAddr;

/// What [`Faulty`] does wrong, from now on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Reads touching `[start, start + len)` fail with an I/O error.
    pub fail: Option<(GuestPhysAddr, u64)>,
    /// Reads touching this range come back short (half their length).
    pub short: Option<(GuestPhysAddr, u64)>,
    /// Every read fails, as when the RAM mapping is gone.
    pub gone: bool,
}

/// A shared, changeable [`Faults`] plan.
pub type FaultPlan = Arc<Mutex<Faults>>;

/// `inner`, failing as its plan says.
pub struct Faulty<M> {
    inner: M,
    plan: FaultPlan,
}

impl<M> Faulty<M> {
    pub fn new(inner: M, plan: FaultPlan) -> Self {
        Self { inner, plan }
    }

    fn plan(&self) -> Faults {
        self.plan.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

fn touches(range: Option<(GuestPhysAddr, u64)>, start: GuestPhysAddr, len: u64) -> bool {
    range.is_some_and(|(s, l)| {
        start.raw() < s.raw().saturating_add(l) && s.raw() < start.raw().saturating_add(len)
    })
}

impl<M: GuestMemory> GuestMemory for Faulty<M> {
    fn read(&self, start: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let f = self.plan();
        let len = buf.len() as u64;
        if f.gone || touches(f.fail, start, len) {
            let why = if f.gone { "the RAM mapping is gone" } else { "injected read error" };
            return Err(MemoryError::Io { start, len, source: std::io::Error::other(why) });
        }
        if touches(f.short, start, len) {
            return Err(MemoryError::Short { start, len, got: len / 2 });
        }
        self.inner.read(start, buf)
    }

    fn slice(&self, start: GuestPhysAddr, len: u64) -> Option<&[u8]> {
        let f = self.plan();
        if f.gone || touches(f.fail, start, len) || touches(f.short, start, len) {
            return None; // so that the reader falls back to `read`, which fails
        }
        self.inner.slice(start, len)
    }

    fn layout(&self) -> &RamLayout {
        self.inner.layout()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RawDump;

    #[test]
    fn reads_fail_as_planned_and_recover_when_the_plan_clears() {
        let plan = FaultPlan::default();
        let m = Faulty::new(RawDump::from_bytes(vec![7u8; 4 * 4096]), plan.clone());
        let mut page = [0u8; 4096];
        assert!(m.read(GuestPhysAddr(4096), &mut page).is_ok() && page[0] == 7);
        plan.lock().unwrap().fail = Some((GuestPhysAddr(4096 + 100), 1));
        assert!(matches!(m.read(GuestPhysAddr(4096), &mut page), Err(MemoryError::Io { .. })));
        assert!(m.read(GuestPhysAddr(0), &mut page).is_ok(), "other pages still read");
        assert!(m.slice(GuestPhysAddr(4096), 4096).is_none());
        *plan.lock().unwrap() = Faults { short: Some((GuestPhysAddr(0), 1)), ..Faults::default() };
        assert!(matches!(m.read(GuestPhysAddr(0), &mut page), Err(MemoryError::Short { .. })));
        *plan.lock().unwrap() = Faults { gone: true, ..Faults::default() };
        assert!(m.read(GuestPhysAddr(8192), &mut page).is_err());
        *plan.lock().unwrap() = Faults::default();
        assert!(m.read(GuestPhysAddr(8192), &mut page).is_ok());
    }
}
