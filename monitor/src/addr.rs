//! Address types: one newtype per address space, so that a guest-physical
//! address can never be passed where a guest-virtual one is expected.
//!
//! Arithmetic is checked and named as such; there are no `+`/`-` operators.

use std::fmt;

/// Size of the smallest x86-64 page, and the unit of hashing.
pub const PAGE_SIZE: u64 = 4096;
/// [`PAGE_SIZE`] for buffer lengths.
pub const PAGE_BYTES: usize = 4096;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            pub const fn raw(self) -> u64 {
                self.0
            }

            /// `self + offset`, or `None` on overflow.
            pub fn checked_add(self, offset: u64) -> Option<Self> {
                self.0.checked_add(offset).map(Self)
            }

            /// `self - other`, or `None` if `other` is above `self`.
            pub fn checked_offset_from(self, other: Self) -> Option<u64> {
                self.0.checked_sub(other.0)
            }

            /// The start of the 4 KiB page holding this address.
            pub const fn page_floor(self) -> Self {
                Self(self.0 & !(PAGE_SIZE - 1))
            }

            /// Offset of this address inside its 4 KiB page.
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:#x})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#018x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address_type!(
    /// An address in the guest's physical address space.
    GuestPhysAddr
);
address_type!(
    /// An address in a guest's virtual address space (which one depends on the
    /// page tables it is translated through).
    GuestVirtAddr
);

/// Serialises an address as a `0x`-prefixed hex string, the form used in
/// baselines and reports.
pub mod hex_addr {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn to_hex(v: u64) -> String {
        format!("{v:#x}")
    }

    pub fn from_hex(s: &str) -> Option<u64> {
        let digits = s.strip_prefix("0x")?;
        if digits.is_empty() || digits.len() > 16 {
            return None;
        }
        u64::from_str_radix(digits, 16).ok()
    }

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(*v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        from_hex(&s).ok_or_else(|| D::Error::custom(format!("not a 0x-prefixed hex u64: {s:?}")))
    }
}

macro_rules! serde_as_hex {
    ($name:ident) => {
        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                hex_addr::serialize(&self.0, s)
            }
        }
        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                hex_addr::deserialize(d).map($name)
            }
        }
    };
}
serde_as_hex!(GuestPhysAddr);
serde_as_hex!(GuestVirtAddr);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_arithmetic_refuses_overflow() {
        assert_eq!(GuestPhysAddr(u64::MAX).checked_add(1), None);
        assert_eq!(GuestPhysAddr(1).checked_offset_from(GuestPhysAddr(2)), None);
        assert_eq!(GuestVirtAddr(0x1234).page_floor(), GuestVirtAddr(0x1000));
        assert_eq!(GuestVirtAddr(0x1234).page_offset(), 0x234);
    }

    #[test]
    fn hex_round_trip_and_malformed() {
        assert_eq!(hex_addr::from_hex("0xffffffff81000000"), Some(0xffff_ffff_8100_0000));
        for bad in ["", "0x", "123", "0xzz", "0x11112222333344445", "-0x1"] {
            assert_eq!(hex_addr::from_hex(bad), None, "{bad:?}");
        }
        let json = serde_json::to_string(&GuestPhysAddr(0x1000)).unwrap();
        assert_eq!(json, "\"0x1000\"");
        assert_eq!(serde_json::from_str::<GuestPhysAddr>(&json).unwrap(), GuestPhysAddr(0x1000));
        assert!(serde_json::from_str::<GuestPhysAddr>("4096").is_err());
    }
}
