//! Desired state: the mappings natd should have installed, the firewall rules, and the rules
//! that make a change to it valid (as CloudStack's management server validates static NAT).
//! Pure: no I/O.
//!
//! As on CloudStack's router, whose firewall databag is independent of its static NAT one, an
//! ingress rule belongs to a public IP whether or not that IP is mapped: it is *active* (in the
//! fast path and nftables) while the IP has a mapping, and kept, *inactive*, while it has none.
//! Rule ids natd assigns itself (natctl, config file) start at [`LOCAL_RULE_IDS`], above any id
//! CloudStack's database hands out, so the two never collide.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use serde::{Deserialize, Serialize};

use crate::{
    cidr::Cidr,
    firewall::{EgressRule, IngressRule, Proto, RuleError, Service, normalize_cidrs},
};

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
    #[error("{0}")]
    Rule(#[from] RuleError),
    #[error("rule {existing} already allows {what}")]
    DuplicateRule { existing: u64, what: String },
    #[error("rule id {0} is already in use")]
    RuleIdInUse(u64),
    #[error("public IP {public} already has {limit} ingress rules, the most it can have")]
    TooManyIngressRules { public: Ipv4Addr, limit: usize },
    #[error("the guest network already has {limit} egress rules, the most it can have")]
    TooManyEgressRules { limit: usize },
    #[error("rule {id} cannot have slot {slot} (taken or out of range)")]
    BadSlot { id: u64, slot: usize },
    #[error("no {kind} rule has id {id}")]
    NoSuchRule { kind: &'static str, id: u64 },
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

/// The first rule id natd assigns itself; every id below is CloudStack's (its database's
/// auto-increment ids never come near 10^15). Below 2^53, so JSON readers that hold numbers
/// as doubles (jq, JavaScript) keep natd's ids exact.
pub const LOCAL_RULE_IDS: u64 = 1_000_000_000_000_000;

/// One static NAT mapping, public P <-> private V (nat-api's, at its old path).
pub use nat_api::spec::Mapping;

/// A rule and the bit it owns in the XDP program's rule bitmaps (stable while it exists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slotted<R> {
    pub slot: usize,
    #[serde(flatten)]
    pub rule: R,
}

/// The whole desired state. Consistent by construction: every mutation goes through a method
/// that validates it first (one-to-one mappings, no duplicate rules but the identical ingress
/// rules CloudStack may send under two ids, slots within the program's limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredState {
    by_public: BTreeMap<Ipv4Addr, Ipv4Addr>,
    by_private: BTreeMap<Ipv4Addr, Ipv4Addr>,
    ingress: BTreeMap<u64, Slotted<IngressRule>>,
    /// The guest network's default egress policy: true = allow by default. Set by natctl or
    /// the config, and by CloudStack's default egress rules ([`Self::settle_egress_default`]).
    egress_default_allow: bool,
    egress: BTreeMap<u64, Slotted<EgressRule>>,
    /// The `default_egress_policy` each CloudStack exception rule (by id) was added under. The
    /// router gives each rule its own action (DROP under allow, ACCEPT under deny) and never
    /// changes it, so a rule acts only while the default is the one it was added under
    /// ([`Self::active_egress_rules`]); rules of natd's own are exceptions to any default.
    egress_under: BTreeMap<u64, bool>,
    /// CloudStack's default egress rules held (protocol `all`, no sources), by id: their
    /// `default_egress_policy`. The router appends each as the chain's last rule (ACCEPT or
    /// DROP); without one, its chain ends and the packet meets the FORWARD policy, DROP.
    egress_defaults: BTreeMap<u64, bool>,
}

impl Default for DesiredState {
    /// No mappings, no rules, egress allowed by default (until told otherwise, guests reach
    /// the internet as they did without natd).
    fn default() -> Self {
        Self {
            by_public: BTreeMap::new(),
            by_private: BTreeMap::new(),
            ingress: BTreeMap::new(),
            egress_default_allow: true,
            egress: BTreeMap::new(),
            egress_under: BTreeMap::new(),
            egress_defaults: BTreeMap::new(),
        }
    }
}

/// Lowest slot not in `used`, if below `limit`.
fn free_slot(used: impl Iterator<Item = usize>, limit: usize) -> Option<usize> {
    let mut taken = vec![false; limit];
    for s in used {
        if let Some(t) = taken.get_mut(s) {
            *t = true;
        }
    }
    taken.iter().position(|t| !t)
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

    /// The public IP mapped to `private`, if any.
    pub fn public_of(&self, private: Ipv4Addr) -> Option<Ipv4Addr> {
        self.by_private.get(&private).copied()
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

    /// Removes the mapping of `public` and returns it. The ingress rules of `public` stay,
    /// inactive until it is mapped again.
    pub fn remove_mapping(&mut self, public: Ipv4Addr) -> Result<Mapping, StateError> {
        let private = self
            .by_public
            .remove(&public)
            .ok_or(StateError::NotMapped(public))?;
        self.by_private.remove(&private);
        Ok(Mapping { public, private })
    }

    /// Every ingress rule, active or not.
    pub fn ingress_rules(&self) -> impl Iterator<Item = &Slotted<IngressRule>> + '_ {
        self.ingress.values()
    }

    /// Whether `rule` is in force: its public IP is mapped.
    pub fn is_active(&self, rule: &IngressRule) -> bool {
        self.by_public.contains_key(&rule.public)
    }

    /// The ingress rules in force: those of mapped public IPs.
    pub fn active_ingress_rules(&self) -> impl Iterator<Item = &Slotted<IngressRule>> + '_ {
        self.ingress.values().filter(|r| self.is_active(&r.rule))
    }

    /// Every egress exception rule held, in force or not.
    pub fn egress_rules(&self) -> impl Iterator<Item = &Slotted<EgressRule>> + '_ {
        self.egress.values()
    }

    /// Whether egress rule `id` is in force: natd's own rules always, a CloudStack rule while
    /// the default is the one it was added under (under the other default the router's rule
    /// does what the default does: a DROP exception under deny, an ACCEPT one under allow).
    pub fn is_egress_active(&self, id: u64) -> bool {
        self.egress_under
            .get(&id)
            .is_none_or(|&under| under == self.egress_default_allow)
    }

    /// The egress rules in force (see [`Self::is_egress_active`]).
    pub fn active_egress_rules(&self) -> impl Iterator<Item = &Slotted<EgressRule>> + '_ {
        self.egress
            .values()
            .filter(|r| self.is_egress_active(r.rule.id))
    }

    /// The ids of the egress rules held but not in force.
    pub fn inactive_egress_ids(&self) -> BTreeSet<u64> {
        self.egress
            .keys()
            .copied()
            .filter(|&id| !self.is_egress_active(id))
            .collect()
    }

    /// The `default_egress_policy` CloudStack exception rules were added under, by id.
    pub fn egress_under(&self) -> &BTreeMap<u64, bool> {
        &self.egress_under
    }

    /// CloudStack's default egress rules held, by id: their `default_egress_policy`.
    pub fn egress_defaults(&self) -> &BTreeMap<u64, bool> {
        &self.egress_defaults
    }

    /// Holds CloudStack's default egress rule `id` (saying `allow`). The default follows
    /// once the caller settles it ([`Self::settle_egress_default`], after a whole payload).
    pub fn add_egress_default(&mut self, id: u64, allow: bool) -> Result<(), StateError> {
        self.check_id(id)?;
        self.egress_defaults.insert(id, allow);
        Ok(())
    }

    /// Drops CloudStack's default egress rule `id`; what it said. The default follows once
    /// the caller settles it.
    pub fn remove_egress_default(&mut self, id: u64) -> Result<bool, StateError> {
        self.egress_defaults
            .remove(&id)
            .ok_or(StateError::NoSuchRule { kind: "egress", id })
    }

    /// The default as CloudStack's router ends up with it: allow only if the default rules
    /// held all say allow (one of them DROP, or none: the chain's end drops); then each
    /// CloudStack exception acts or not by the default it was added under.
    pub fn settle_egress_default(&mut self) {
        self.egress_default_allow =
            !self.egress_defaults.is_empty() && self.egress_defaults.values().all(|&a| a);
    }

    pub fn egress_default_allow(&self) -> bool {
        self.egress_default_allow
    }

    pub fn set_egress_default_allow(&mut self, allow: bool) {
        self.egress_default_allow = allow;
    }

    /// The next id of natd's own range: above every id natd gave so far (and still holds).
    fn next_id(&self) -> u64 {
        let max = self
            .ingress
            .keys()
            .chain(self.egress.keys())
            .chain(self.egress_defaults.keys())
            .copied()
            .filter(|&id| id >= LOCAL_RULE_IDS)
            .max()
            .unwrap_or(LOCAL_RULE_IDS);
        max + 1
    }

    fn check_id(&self, id: u64) -> Result<(), StateError> {
        if self.ingress.contains_key(&id)
            || self.egress.contains_key(&id)
            || self.egress_defaults.contains_key(&id)
        {
            return Err(StateError::RuleIdInUse(id));
        }
        Ok(())
    }

    /// Adds an ingress rule (`id` None: natd picks the next free one of its own range) and
    /// returns its id. The public IP need not be mapped: the rule is then inactive. A rule
    /// allowing exactly what another rule of the IP allows is refused (natctl, config file:
    /// the operator is told which rule already does it).
    pub fn add_ingress(
        &mut self,
        id: Option<u64>,
        public: Ipv4Addr,
        service: Service,
        cidrs: Vec<Cidr>,
    ) -> Result<u64, StateError> {
        let cidrs = self.check_ingress(public, &service, cidrs)?;
        if let Some(existing) = self.same_ingress(public, &service, &cidrs) {
            return Err(StateError::DuplicateRule {
                existing,
                what: format!("{service} to {public} from {}", join(&cidrs)),
            });
        }
        let id = id.unwrap_or_else(|| self.next_id());
        self.insert_ingress(id, public, service, cidrs)?;
        Ok(id)
    }

    /// Adds ingress rule `id` even when another rule of the IP allows exactly the same, as
    /// CloudStack's router does (configure.py generates the same iptables rule for both ids,
    /// `CsNetfilter.compare` keeps one copy, and the traffic stays allowed until both ids are
    /// revoked). Returns the id of the lowest such other rule, if any.
    ///
    /// The duplicate is a rule of its own with its own slot, not an alias of the first: the
    /// fast path's bitmaps already hold overlapping rules (an identical one is the extreme
    /// case), so both set their bits in the same entries and revoking either clears only its
    /// own bit; nftables gets one `accept` per rule; the persisted file lists both.
    pub fn add_ingress_beside_duplicates(
        &mut self,
        id: u64,
        public: Ipv4Addr,
        service: Service,
        cidrs: Vec<Cidr>,
    ) -> Result<Option<u64>, StateError> {
        let cidrs = self.check_ingress(public, &service, cidrs)?;
        let same = self.same_ingress(public, &service, &cidrs);
        self.insert_ingress(id, public, service, cidrs)?;
        Ok(same)
    }

    /// Validates an ingress rule's parts and returns its sources, normalized.
    fn check_ingress(
        &self,
        public: Ipv4Addr,
        service: &Service,
        cidrs: Vec<Cidr>,
    ) -> Result<Vec<Cidr>, StateError> {
        service.validate()?;
        if service.proto == Proto::All {
            return Err(RuleError::AllInIngress.into());
        }
        check_unicast("public IP", public)?;
        Ok(normalize_cidrs(cidrs))
    }

    /// The id of the (lowest-id) ingress rule of `public` allowing exactly this, if any.
    fn same_ingress(&self, public: Ipv4Addr, service: &Service, cidrs: &[Cidr]) -> Option<u64> {
        self.ingress
            .values()
            .find(|r| {
                r.rule.public == public && r.rule.service == *service && r.rule.cidrs == cidrs
            })
            .map(|r| r.rule.id)
    }

    /// Inserts a validated ingress rule in the IP's lowest free slot.
    fn insert_ingress(
        &mut self,
        id: u64,
        public: Ipv4Addr,
        service: Service,
        cidrs: Vec<Cidr>,
    ) -> Result<(), StateError> {
        self.check_id(id)?;
        let limit = nat_common::MAX_RULES_PER_IP;
        let used = self
            .ingress
            .values()
            .filter(|r| r.rule.public == public)
            .map(|r| r.slot);
        let slot =
            free_slot(used, limit).ok_or(StateError::TooManyIngressRules { public, limit })?;
        let rule = IngressRule {
            id,
            public,
            service,
            cidrs,
        };
        self.ingress.insert(id, Slotted { slot, rule });
        Ok(())
    }

    pub fn remove_ingress(&mut self, id: u64) -> Result<IngressRule, StateError> {
        self.ingress
            .remove(&id)
            .map(|r| r.rule)
            .ok_or(StateError::NoSuchRule {
                kind: "ingress",
                id,
            })
    }

    /// Adds an egress exception rule for every guest and returns its id.
    pub fn add_egress(
        &mut self,
        id: Option<u64>,
        service: Service,
        cidrs: Vec<Cidr>,
    ) -> Result<u64, StateError> {
        self.add_egress_from(id, service, cidrs, Vec::new())
    }

    /// Adds an egress exception rule for the guests in `sources` (empty: every guest) to the
    /// destinations `cidrs` (empty: anywhere) and returns its id.
    pub fn add_egress_from(
        &mut self,
        id: Option<u64>,
        service: Service,
        cidrs: Vec<Cidr>,
        sources: Vec<Cidr>,
    ) -> Result<u64, StateError> {
        self.insert_egress(id, service, cidrs, sources, false)
    }

    fn insert_egress(
        &mut self,
        id: Option<u64>,
        service: Service,
        cidrs: Vec<Cidr>,
        sources: Vec<Cidr>,
        duplicate_ok: bool,
    ) -> Result<u64, StateError> {
        service.validate()?;
        let cidrs = normalize_cidrs(cidrs);
        let sources = normalize_cidrs(sources);
        if let Some(dup) = self.egress.values().find(|r| {
            !duplicate_ok
                && r.rule.service == service
                && r.rule.cidrs == cidrs
                && r.rule.sources == sources
        }) {
            return Err(StateError::DuplicateRule {
                existing: dup.rule.id,
                what: format!("{service} from {} to {}", join(&sources), join(&cidrs)),
            });
        }
        let id = id.unwrap_or_else(|| self.next_id());
        self.check_id(id)?;
        let limit = nat_common::MAX_EGRESS_RULES;
        let slot = free_slot(self.egress.values().map(|r| r.slot), limit)
            .ok_or(StateError::TooManyEgressRules { limit })?;
        self.egress.insert(
            id,
            Slotted {
                slot,
                rule: EgressRule {
                    id,
                    service,
                    cidrs,
                    sources,
                },
            },
        );
        Ok(id)
    }

    /// Adds CloudStack's egress exception rule `id`, added under the default `under` (its
    /// `default_egress_policy`). Unlike natd's own rules, one may say what another says: the
    /// router installs both (each matches its own ipsets).
    pub fn add_egress_under(
        &mut self,
        id: u64,
        service: Service,
        cidrs: Vec<Cidr>,
        sources: Vec<Cidr>,
        under: bool,
    ) -> Result<(), StateError> {
        self.insert_egress(Some(id), service, cidrs, sources, true)?;
        self.egress_under.insert(id, under);
        Ok(())
    }

    pub fn remove_egress(&mut self, id: u64) -> Result<EgressRule, StateError> {
        let r = self
            .egress
            .remove(&id)
            .map(|r| r.rule)
            .ok_or(StateError::NoSuchRule { kind: "egress", id })?;
        self.egress_under.remove(&id);
        Ok(r)
    }

    /// Rebuilds a state from its persisted parts, validating everything as a change would and
    /// keeping each rule's id and slot (the pinned maps were written with them).
    pub fn from_parts(
        mappings: &[Mapping],
        ingress: &[Slotted<IngressRule>],
        egress_default_allow: bool,
        egress: &[Slotted<EgressRule>],
        egress_under: &BTreeMap<u64, bool>,
        egress_defaults: &BTreeMap<u64, bool>,
    ) -> Result<Self, StateError> {
        let mut s = Self::default();
        for m in mappings {
            s.add_mapping(*m)?;
        }
        for r in ingress {
            // Identical rules under two ids come from CloudStack payloads (see
            // `add_ingress_beside_duplicates`) and are restored as they were.
            let id = r.rule.id;
            s.add_ingress_beside_duplicates(
                id,
                r.rule.public,
                r.rule.service.clone(),
                r.rule.cidrs.clone(),
            )?;
            s.move_slot(true, id, r.slot)?;
        }
        for r in egress {
            let under = egress_under.get(&r.rule.id).copied();
            let id = s.insert_egress(
                Some(r.rule.id),
                r.rule.service.clone(),
                r.rule.cidrs.clone(),
                r.rule.sources.clone(),
                under.is_some(),
            )?;
            if let Some(under) = under {
                s.egress_under.insert(id, under);
            }
            s.move_slot(false, id, r.slot)?;
        }
        for (&id, &allow) in egress_defaults {
            s.check_id(id)?;
            s.egress_defaults.insert(id, allow);
        }
        // As it was left (natctl may have set it since CloudStack's default rules did).
        s.egress_default_allow = egress_default_allow;
        Ok(s)
    }

    /// Gives rule `id` the slot `slot` if it is free among its peers (same public IP for
    /// ingress, all egress rules) and below the limit.
    fn move_slot(&mut self, ingress: bool, id: u64, slot: usize) -> Result<(), StateError> {
        let bad = StateError::BadSlot { id, slot };
        if ingress {
            let public = self
                .ingress
                .get(&id)
                .map(|r| r.rule.public)
                .ok_or(bad.clone())?;
            let taken = self
                .ingress
                .values()
                .any(|r| r.rule.id != id && r.rule.public == public && r.slot == slot);
            match self.ingress.get_mut(&id) {
                Some(r) if !taken && slot < nat_common::MAX_RULES_PER_IP => r.slot = slot,
                _ => return Err(bad),
            }
        } else {
            let taken = self
                .egress
                .values()
                .any(|r| r.rule.id != id && r.slot == slot);
            match self.egress.get_mut(&id) {
                Some(r) if !taken && slot < nat_common::MAX_EGRESS_RULES => r.slot = slot,
                _ => return Err(bad),
            }
        }
        Ok(())
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

fn join(cidrs: &[Cidr]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
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
