//! An independent page-table builder for tests: lays tables out in a byte
//! buffer from a list of mappings, the way an OS would, without sharing code
//! with the walker.
#![allow(clippy::cast_possible_truncation)]

use crate::x86::Perms;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flags {
    pub rw: bool,
    pub user: bool,
    pub nx: bool,
}

impl Flags {
    pub const TEXT: Self = Self { rw: false, user: false, nx: false };
    pub const RODATA: Self = Self { rw: false, user: false, nx: true };
    pub const DATA: Self = Self { rw: true, user: false, nx: true };
    pub const USER: Self = Self { rw: true, user: true, nx: true };

    pub fn perms(self) -> Perms {
        Perms { writable: self.rw, user: self.user, executable: !self.nx }
    }
}

pub struct Builder {
    levels: u32,
    mem: Vec<u8>,
    next_free: u64,
    root: u64,
    expected: Vec<(u64, u64, u64, Flags)>,
}

impl Builder {
    /// Tables are allocated from the top half of `size` bytes of "RAM".
    pub fn new(levels: u32, size: usize) -> Self {
        let mut b = Self {
            levels,
            mem: vec![0; size],
            next_free: (size / 2) as u64,
            root: 0,
            expected: vec![],
        };
        b.root = b.alloc();
        b
    }

    /// Takes the next free table page, left empty (as PTI's user PGD right
    /// after the kernel's, when called before any mapping).
    pub fn alloc_empty_table(&mut self) -> u64 {
        self.alloc()
    }

    fn alloc(&mut self) -> u64 {
        let t = self.next_free;
        self.next_free += 4096;
        assert!((self.next_free as usize) <= self.mem.len(), "builder out of table space");
        t
    }

    fn entry_at(&self, at: u64) -> u64 {
        let i = at as usize;
        u64::from_le_bytes(self.mem[i..i + 8].try_into().unwrap())
    }

    fn set_at(&mut self, at: u64, v: u64) {
        let i = at as usize;
        self.mem[i..i + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn index(va: u64, level: u32) -> u64 {
        (va >> (12 + 9 * level)) & 0x1ff
    }

    /// Maps `len` bytes at `va` to `pa` with the largest pages alignment allows.
    pub fn map(&mut self, va: u64, pa: u64, len: u64, f: Flags) {
        let mut off = 0;
        while off < len {
            let (v, p) = (va + off, pa + off);
            let size = [1u64 << 30, 1 << 21, 1 << 12]
                .into_iter()
                .find(|&s| v % s == 0 && p % s == 0 && len - off >= s)
                .expect("4 KiB-aligned mapping");
            self.map_one(v, p, size, f);
            self.expected.push((v, p, size, f));
            off += size;
        }
        self.expected.sort_by_key(|e| e.0);
    }

    fn map_one(&mut self, va: u64, pa: u64, size: u64, f: Flags) {
        let leaf_level = match size {
            0x1000 => 0,
            0x20_0000 => 1,
            _ => 2,
        };
        // Intermediate entries are permissive (RW, and US when the leaf is a
        // user page); the leaf carries the flags, as Linux does.
        let mut table = self.root;
        for level in (leaf_level + 1..self.levels).rev() {
            let at = table + Self::index(va, level) * 8;
            let e = self.entry_at(at);
            table = if e & 1 == 0 {
                let t = self.alloc();
                self.set_at(at, t | 0x3 | if f.user { 0x4 } else { 0 });
                t
            } else {
                e & 0x000f_ffff_ffff_f000
            };
        }
        let mut leaf = pa | 1;
        if f.rw {
            leaf |= 2;
        }
        if f.user {
            leaf |= 4;
        }
        if leaf_level > 0 {
            leaf |= 1 << 7;
        }
        if f.nx {
            leaf |= 1 << 63;
        }
        self.set_at(table + Self::index(va, leaf_level) * 8, leaf);
    }

    /// Sets or clears one bit of the entry that translates `va` at `level`
    /// (0 = the page table).
    pub fn set_entry_bit(&mut self, va: u64, level: u32, bit: u32, on: bool) {
        let mut table = self.root;
        for l in (level..self.levels).rev() {
            let at = table + Self::index(va, l) * 8;
            if l == level {
                let e = self.entry_at(at);
                self.set_at(at, if on { e | 1 << bit } else { e & !(1 << bit) });
                return;
            }
            table = self.entry_at(at) & 0x000f_ffff_ffff_f000;
        }
    }

    pub fn root(&self) -> u64 {
        self.root
    }

    pub fn memory(&self) -> &[u8] {
        &self.mem
    }

    /// (va, pa, page size, flags) of every leaf, in VA order.
    pub fn expected(&self) -> &[(u64, u64, u64, Flags)] {
        &self.expected
    }
}
