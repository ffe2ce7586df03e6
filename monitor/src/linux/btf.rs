//! BTF, the kernel's own type information (`.BTF` in vmlinux): just enough of
//! it to find the offsets of structure members, such as where `struct module`
//! keeps its list links and its code's address, without debug packages.
//!
//! ```text
//!  header: magic 0xeb9f, version, flags, hdr_len, type_off, type_len, str_off, str_len
//!  types:  [name_off u32][info u32: kind << 24 | vlen][size_or_type u32][kind-specific...]
//!  STRUCT/UNION members: [name_off u32][type u32][offset u32 (bits; with kind_flag, low 24)]
//! ```
//! Type ids start at 1, in the order the types appear.

const MAGIC: u16 = 0xeb9f;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
/// Most types believed.
const MAX_TYPES: usize = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("not BTF: {0}")]
    Header(String),
    #[error("BTF type {id} is malformed: {reason}")]
    Type { id: usize, reason: String },
    #[error("no struct {0} in BTF")]
    NoStruct(String),
    #[error("struct {st} has no member {member}")]
    NoMember { st: String, member: String },
}

#[derive(Debug, Clone, Copy)]
struct Ty {
    name_off: u32,
    kind: u32,
    kind_flag: bool,
    vlen: usize,
    size_or_type: u32,
    /// Where the kind-specific data starts in the type section.
    extra: usize,
}

/// A parsed type section.
pub struct Btf<'a> {
    types: Vec<Ty>,
    data: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off.checked_add(4)?).map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")))
}

impl<'a> Btf<'a> {
    pub fn parse(b: &'a [u8]) -> Result<Self, BtfError> {
        let hdr = |r: &str| BtfError::Header(r.to_owned());
        if b.get(0..2).map(|m| u16::from_le_bytes([m[0], m[1]])) != Some(MAGIC) {
            return Err(hdr("bad magic"));
        }
        let field = |i: usize| {
            u32_at(b, 4 + 4 * i).map(|v| v as usize).ok_or_else(|| hdr("truncated header"))
        };
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off)?;
            b.get(start..start.checked_add(len)?)
        };
        let data =
            section(type_off, type_len).ok_or_else(|| hdr("type section outside the data"))?;
        let strings =
            section(str_off, str_len).ok_or_else(|| hdr("string section outside the data"))?;
        let mut types =
            vec![Ty { name_off: 0, kind: 0, kind_flag: false, vlen: 0, size_or_type: 0, extra: 0 }]; // id 0: void
        let mut p = 0;
        while p < data.len() {
            let id = types.len();
            let bad = |r: &str| BtfError::Type { id, reason: r.to_owned() };
            if id > MAX_TYPES {
                return Err(bad("too many types"));
            }
            let name_off = u32_at(data, p).ok_or_else(|| bad("truncated"))?;
            let info = u32_at(data, p + 4).ok_or_else(|| bad("truncated"))?;
            let size_or_type = u32_at(data, p + 8).ok_or_else(|| bad("truncated"))?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = p + 12;
            let extra_len = match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                2 | 7..=12 | 16 | 18 => 0, // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG
                3 => 12,                   // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,        // ENUM, FUNC_PROTO
                _ => return Err(bad(&format!("unknown kind {kind}"))),
            };
            p = extra
                .checked_add(extra_len)
                .filter(|&e| e <= data.len())
                .ok_or_else(|| bad("runs past the section"))?;
            types.push(Ty {
                name_off,
                kind,
                kind_flag: info & 0x8000_0000 != 0,
                vlen,
                size_or_type,
                extra,
            });
        }
        Ok(Self { types, data, strings })
    }

    fn name(&self, off: u32) -> &'a str {
        let s = self.strings.get(off as usize..).unwrap_or(&[]);
        let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    fn find_struct(&self, name: &str) -> Option<usize> {
        self.types
            .iter()
            .position(|t| t.kind == KIND_STRUCT && t.vlen > 0 && self.name(t.name_off) == name)
    }

    /// Byte offset of `member` in struct `st`, and the member's type id.
    fn member(&self, id: usize, st: &str, member: &str) -> Result<(u64, usize), BtfError> {
        self.member_at_depth(id, st, member, 0)
    }

    fn member_at_depth(
        &self,
        id: usize,
        st: &str,
        member: &str,
        depth: u32,
    ) -> Result<(u64, usize), BtfError> {
        if depth > 8 {
            return Err(BtfError::NoMember { st: st.into(), member: member.into() });
        }
        let t = self.types.get(id).ok_or_else(|| BtfError::NoStruct(st.into()))?;
        for i in 0..t.vlen {
            let at = t.extra + 12 * i;
            let (Some(n), Some(ty), Some(off)) =
                (u32_at(self.data, at), u32_at(self.data, at + 4), u32_at(self.data, at + 8))
            else {
                break;
            };
            let bits = if t.kind_flag { off & 0x00ff_ffff } else { off };
            if self.name(n) == member {
                return Ok((u64::from(bits / 8), ty as usize));
            }
            // Anonymous struct/union members: look inside.
            if n == 0
                && let Some(inner) = self.types.get(ty as usize)
                && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Ok((o, t2)) = self.member_at_depth(ty as usize, st, member, depth + 1)
            {
                return Ok((u64::from(bits / 8) + o, t2));
            }
        }
        Err(BtfError::NoMember { st: st.into(), member: member.into() })
    }

    /// Byte offset of a member path such as `core_layout.base` in struct `st`;
    /// through an array member, its first element (`mem.base` is `mem[0].base`).
    pub fn offset_of(&self, st: &str, path: &str) -> Result<u64, BtfError> {
        let mut id = self.find_struct(st).ok_or_else(|| BtfError::NoStruct(st.into()))?;
        let mut total = 0;
        for part in path.split('.') {
            let (off, ty) = self.member(id, st, part)?;
            total += off;
            id = self.resolve(ty);
        }
        Ok(total)
    }

    /// Size in bytes of struct `st`.
    pub fn size_of(&self, st: &str) -> Result<u64, BtfError> {
        let id = self.find_struct(st).ok_or_else(|| BtfError::NoStruct(st.into()))?;
        Ok(u64::from(self.types[id].size_or_type))
    }

    /// Follows typedefs and qualifiers to the type they name, and arrays to
    /// their element type (a path through an array names its element 0).
    fn resolve(&self, mut id: usize) -> usize {
        for _ in 0..32 {
            match self.types.get(id) {
                Some(t) if matches!(t.kind, 8..=11 | 18) => id = t.size_or_type as usize,
                Some(t) if t.kind == KIND_ARRAY => match u32_at(self.data, t.extra) {
                    Some(elem) => id = elem as usize,
                    None => break,
                },
                _ => break,
            }
        }
        id
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// A BTF blob: int, struct inner { long a; long b; },
    /// struct outer { int x; struct inner in; struct inner arr[3]; }.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0inner\0a\0b\0outer\0x\0in\0arr\0".to_vec();
        let s = |name: &str| {
            strings
                .windows(name.len() + 2)
                .position(|w| {
                    w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0
                })
                .unwrap() as u32
                + 1
        };
        let mut t = Vec::new();
        let mut ty = |name_off: u32, kind: u32, vlen: u32, sz: u32, extra: &[u32]| {
            t.extend_from_slice(&name_off.to_le_bytes());
            t.extend_from_slice(&((kind << 24) | vlen).to_le_bytes());
            t.extend_from_slice(&sz.to_le_bytes());
            for e in extra {
                t.extend_from_slice(&e.to_le_bytes());
            }
        };
        ty(s("int"), 1, 0, 8, &[64]); // id 1
        ty(s("inner"), 4, 2, 16, &[s("a"), 1, 0, s("b"), 1, 64]); // id 2
        ty(s("outer"), 4, 3, 72, &[s("x"), 1, 0, s("in"), 2, 64, s("arr"), 4, 192]); // id 3
        ty(0, 3, 0, 0, &[2, 1, 3]); // id 4: struct inner [3]
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [24u32, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn member_paths() {
        let b = blob();
        let btf = Btf::parse(&b).unwrap();
        assert_eq!(btf.offset_of("outer", "x").unwrap(), 0);
        assert_eq!(btf.offset_of("outer", "in.b").unwrap(), 8 + 8);
        assert_eq!((btf.size_of("outer").unwrap(), btf.size_of("inner").unwrap()), (72, 16));
        // Through an array, its first element (as module.mem.base is mem[0].base).
        assert_eq!(btf.offset_of("outer", "arr.b").unwrap(), 24 + 8);
        assert!(btf.offset_of("outer", "arr.c").is_err());
        assert_eq!(btf.offset_of("inner", "b").unwrap(), 8);
        assert!(matches!(btf.offset_of("outer", "y"), Err(BtfError::NoMember { .. })));
        assert!(matches!(btf.offset_of("nope", "x"), Err(BtfError::NoStruct(_))));
    }

    #[test]
    fn malformed_btf_is_refused() {
        let b = blob();
        assert!(Btf::parse(&b[..10]).is_err());
        assert!(Btf::parse(&[0u8; 64]).is_err());
        let mut bad_kind = b.clone();
        bad_kind[24 + 7] = 0x1f; // kind 31
        assert!(Btf::parse(&bad_kind).is_err());
        let mut long_vlen = b.clone();
        long_vlen[24 + 4] = 0xff; // int with a huge vlen is fine, a struct is not
        long_vlen[24 + 16 + 4] = 0xff;
        assert!(Btf::parse(&long_vlen).is_err());
        // A struct whose anonymous member is itself: bounded, not a stack overflow.
        let mut selfref = b.clone();
        let x_name = 24 + 16 + 12 + 24 + 12; // outer's first member's name_off
        selfref[x_name..x_name + 4].copy_from_slice(&0u32.to_le_bytes());
        selfref[x_name + 4..x_name + 8].copy_from_slice(&3u32.to_le_bytes());
        let btf = Btf::parse(&selfref).unwrap();
        assert!(btf.offset_of("outer", "nothing").is_err());
        for cut in 0..b.len() {
            let _ = Btf::parse(&b[..cut]).map(|t| t.offset_of("outer", "in.b"));
        }
    }

    proptest::proptest! {
        #[test]
        fn mutated_btf_never_panics(pos in 0usize..200, byte: u8) {
            let mut b = blob();
            let i = pos % b.len();
            b[i] = byte;
            if let Ok(t) = Btf::parse(&b) {
                let _ = t.offset_of("outer", "in.b");
            }
        }
    }
}
