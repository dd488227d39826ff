//! IPv4 prefixes (CIDR notation, RFC 4632).
use std::{fmt, net::Ipv4Addr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 prefix; host bits are always zero (they are cleared on parse, as CloudStack does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: Ipv4Addr,
    len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IPv4 CIDR (expected A.B.C.D/N with N in 0..=32, or A.B.C.D)")]
pub struct CidrError(pub String);

impl Cidr {
    pub const ANY: Cidr = Cidr {
        addr: Ipv4Addr::UNSPECIFIED,
        len: 0,
    };

    pub fn new(addr: Ipv4Addr, len: u8) -> Option<Self> {
        (len <= 32).then(|| Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & Self::mask(len)),
            len,
        })
    }

    fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// Prefix length in bits.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn is_any(&self) -> bool {
        self.len == 0
    }

    /// Whether `self` contains all of `other`.
    pub fn contains(&self, other: &Cidr) -> bool {
        self.len <= other.len
            && u32::from(other.addr) & Self::mask(self.len) == u32::from(self.addr)
    }

    /// Whether `self` contains the address `addr`.
    pub fn holds(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & Self::mask(self.len) == u32::from(self.addr)
    }

    /// The prefix of length `len` (<= self.len) that contains `self`.
    pub fn truncate(&self, len: u8) -> Cidr {
        Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & Self::mask(len)),
            len,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrError(s.to_string());
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().map_err(|_| err())?),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| err())?;
        Cidr::new(addr, len).ok_or_else(err)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_normalize_contain() {
        let c: Cidr = "198.51.100.7/24".parse().unwrap();
        assert_eq!(c.to_string(), "198.51.100.0/24");
        assert_eq!("192.0.2.1".parse::<Cidr>().unwrap().prefix_len(), 32);
        for bad in [
            "192.0.2.0/33",
            "192.0.2/24",
            "x/1",
            "192.0.2.0/",
            "192.0.2.0/-1",
            "",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!(Cidr::ANY.contains(&c));
        assert!(c.contains(&"198.51.100.128/25".parse().unwrap()));
        assert!(!c.contains(&"198.51.0.0/16".parse().unwrap()));
        assert_eq!(c.truncate(16).to_string(), "198.51.0.0/16");
    }
}
