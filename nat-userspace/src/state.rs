//! Desired state: the mappings natd should have installed, and the rules that make a change to
//! it valid (as CloudStack's management server validates static NAT). Pure: no I/O.
use std::{collections::BTreeMap, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

/// Why a change to the desired state is refused. Each names the offending field and value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("{field} {addr} is not a unicast IPv4 address ({why})")]
    NotUnicast {
        field: &'static str,
        addr: Ipv4Addr,
        why: &'static str,
    },
    #[error("public and private address are the same ({0})")]
    SameAddress(Ipv4Addr),
    #[error("public IP {public} is already mapped: {public} -> {existing_private}")]
    PublicInUse {
        public: Ipv4Addr,
        existing_private: Ipv4Addr,
    },
    #[error(
        "private IP {private} is already mapped to another public IP: {existing_public} -> {private}"
    )]
    PrivateInUse {
        private: Ipv4Addr,
        existing_public: Ipv4Addr,
    },
    #[error(
        "{field} {addr} is already used as the {other} address of mapping {public} -> {private}"
    )]
    CrossUse {
        field: &'static str,
        addr: Ipv4Addr,
        other: &'static str,
        public: Ipv4Addr,
        private: Ipv4Addr,
    },
    #[error("public IP {0} is not mapped")]
    NotMapped(Ipv4Addr),
    #[error("mapping table is full ({limit} mappings)")]
    TooMany { limit: u32 },
}

/// Refuses what is not a host unicast address: RFC 1122 "this network" (0/8), loopback (127/8),
/// multicast (224/4), reserved and limited broadcast (240/4, 255.255.255.255).
pub fn check_unicast(field: &'static str, addr: Ipv4Addr) -> Result<(), StateError> {
    let why = if addr.is_unspecified() || addr.octets()[0] == 0 {
        "unspecified / this network"
    } else if addr.is_broadcast() {
        "broadcast"
    } else if addr.is_loopback() {
        "loopback"
    } else if addr.is_multicast() {
        "multicast"
    } else if addr.octets()[0] >= 240 {
        "reserved"
    } else {
        return Ok(());
    };
    Err(StateError::NotUnicast { field, addr, why })
}

/// One static NAT mapping, public P <-> private V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    pub public: Ipv4Addr,
    pub private: Ipv4Addr,
}

/// The whole desired state. One-to-one by construction: every mutation goes through
/// [`DesiredState::add_mapping`], which keeps the reverse index consistent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    by_public: BTreeMap<Ipv4Addr, Ipv4Addr>,
    by_private: BTreeMap<Ipv4Addr, Ipv4Addr>,
}

impl DesiredState {
    pub fn mappings(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.by_public
            .iter()
            .map(|(&public, &private)| Mapping { public, private })
    }

    pub fn len(&self) -> usize {
        self.by_public.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_public.is_empty()
    }

    pub fn private_of(&self, public: Ipv4Addr) -> Option<Ipv4Addr> {
        self.by_public.get(&public).copied()
    }

    /// Adds `m` if it keeps the state one-to-one; otherwise says which mapping is in the way.
    pub fn add_mapping(&mut self, m: Mapping) -> Result<(), StateError> {
        check_unicast("public IP", m.public)?;
        check_unicast("private IP", m.private)?;
        if m.public == m.private {
            return Err(StateError::SameAddress(m.public));
        }
        if let Some(&existing_private) = self.by_public.get(&m.public) {
            return Err(StateError::PublicInUse {
                public: m.public,
                existing_private,
            });
        }
        if let Some(&existing_public) = self.by_private.get(&m.private) {
            return Err(StateError::PrivateInUse {
                private: m.private,
                existing_public,
            });
        }
        if let Some(&public) = self.by_private.get(&m.public) {
            return Err(StateError::CrossUse {
                field: "public IP",
                addr: m.public,
                other: "private",
                public,
                private: m.public,
            });
        }
        if let Some(&private) = self.by_public.get(&m.private) {
            return Err(StateError::CrossUse {
                field: "private IP",
                addr: m.private,
                other: "public",
                public: m.private,
                private,
            });
        }
        let limit = nat_common::MAX_MAPPINGS;
        if self.by_public.len() >= limit as usize {
            return Err(StateError::TooMany { limit });
        }
        self.by_public.insert(m.public, m.private);
        self.by_private.insert(m.private, m.public);
        Ok(())
    }

    /// Removes the mapping of `public` and returns it.
    pub fn remove_mapping(&mut self, public: Ipv4Addr) -> Result<Mapping, StateError> {
        let private = self
            .by_public
            .remove(&public)
            .ok_or(StateError::NotMapped(public))?;
        self.by_private.remove(&private);
        Ok(Mapping { public, private })
    }

    /// Builds a state from a list, refusing the first entry that does not fit (by position).
    pub fn from_mappings(list: &[Mapping]) -> Result<Self, (usize, StateError)> {
        let mut s = Self::default();
        for (i, m) in list.iter().enumerate() {
            s.add_mapping(*m).map_err(|e| (i, e))?;
        }
        Ok(s)
    }
}

/// What changes between two states: mappings to remove, then mappings to add.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub removed: Vec<Mapping>,
    pub added: Vec<Mapping>,
}

impl Diff {
    pub fn between(old: &DesiredState, new: &DesiredState) -> Self {
        let removed = old
            .mappings()
            .filter(|m| new.private_of(m.public) != Some(m.private))
            .collect();
        let added = new
            .mappings()
            .filter(|m| old.private_of(m.public) != Some(m.private))
            .collect();
        Diff { removed, added }
    }

    pub fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, v: &str) -> Mapping {
        Mapping {
            public: p.parse().unwrap(),
            private: v.parse().unwrap(),
        }
    }

    #[test]
    fn one_to_one_is_enforced_and_names_the_existing_mapping() {
        let mut s = DesiredState::default();
        s.add_mapping(m("203.0.113.10", "10.0.0.10")).unwrap();
        let e = s.add_mapping(m("203.0.113.10", "10.0.0.11")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "public IP 203.0.113.10 is already mapped: 203.0.113.10 -> 10.0.0.10"
        );
        let e = s.add_mapping(m("203.0.113.11", "10.0.0.10")).unwrap_err();
        assert!(e.to_string().contains("203.0.113.10 -> 10.0.0.10"), "{e}");
        let e = s.add_mapping(m("10.0.0.10", "10.0.0.12")).unwrap_err();
        assert!(matches!(e, StateError::CrossUse { .. }), "{e}");
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn only_unicast_addresses() {
        let mut s = DesiredState::default();
        for bad in [
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "127.0.0.1",
            "240.0.0.1",
            "0.1.2.3",
        ] {
            let e = s.add_mapping(m(bad, "10.0.0.1")).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("public IP {bad} ")),
                "{e}"
            );
            let e = s.add_mapping(m("203.0.113.1", bad)).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("private IP {bad} ")),
                "{e}"
            );
        }
        assert!(s.add_mapping(m("203.0.113.1", "203.0.113.1")).is_err());
        assert!(s.is_empty());
    }

    #[test]
    fn remove_and_diff() {
        let a = DesiredState::from_mappings(&[
            m("203.0.113.1", "10.0.0.1"),
            m("203.0.113.2", "10.0.0.2"),
        ])
        .unwrap();
        let mut b = a.clone();
        b.remove_mapping("203.0.113.1".parse().unwrap()).unwrap();
        b.add_mapping(m("203.0.113.3", "10.0.0.1")).unwrap();
        let d = Diff::between(&a, &b);
        assert_eq!(d.removed, vec![m("203.0.113.1", "10.0.0.1")]);
        assert_eq!(d.added, vec![m("203.0.113.3", "10.0.0.1")]);
        assert!(Diff::between(&b, &b).is_empty());
        assert_eq!(
            b.remove_mapping("203.0.113.9".parse().unwrap()),
            Err(StateError::NotMapped("203.0.113.9".parse().unwrap()))
        );
    }

    #[test]
    fn from_mappings_reports_position() {
        let e = DesiredState::from_mappings(&[
            m("203.0.113.1", "10.0.0.1"),
            m("203.0.113.1", "10.0.0.2"),
        ])
        .unwrap_err();
        assert_eq!(e.0, 1);
    }
}
