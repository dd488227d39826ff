//! The fast path's image of a desired state: every firewall entry the XDP program looks up
//! (the ingress rules of mapped public IPs only: an inactive rule has no entry), and the plan of
//! map writes that turns one image into another without an instant at which a packet is
//! matched by a rule that neither image has (see [`plan`]).
use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
    net::Ipv4Addr,
};

use nat_common::RuleBits;

use crate::{
    cidr::Cidr,
    firewall::{compile, compile_addrs},
    state::{DesiredState, Diff, Mapping},
};

/// One LPM entry of the firewall maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// `FW_SRC`: (public IP, source prefix).
    FwSrc(Ipv4Addr, Cidr),
    /// `FW_SVC`: (public IP, protocol, service value, service prefix length).
    FwSvc(Ipv4Addr, u8, u16, u8),
    /// `EG_SRC`: guest source prefix.
    EgSrc(Cidr),
    /// `EG_DST`: destination prefix.
    EgDst(Cidr),
    /// `EG_SVC`: (protocol or every protocol, service value, service prefix length).
    EgSvc(Option<u8>, u16, u8),
}

/// One write to the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AddMapping(Mapping),
    RemoveMapping(Mapping),
    Set(Entry, RuleBits),
    Unset(Entry),
    EgressDefaultDeny(bool),
}

/// Every firewall entry of a state, and the egress default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    pub entries: HashMap<Entry, RuleBits>,
    pub egress_default_deny: bool,
}

impl Default for Tables {
    fn default() -> Self {
        Tables::of(&DesiredState::default())
    }
}

impl Tables {
    pub fn of(state: &DesiredState) -> Self {
        let mut entries = HashMap::new();
        let mut by_public: BTreeMap<Ipv4Addr, Vec<_>> = BTreeMap::new();
        for r in state.active_ingress_rules() {
            by_public.entry(r.rule.public).or_default().push(r);
        }
        for (public, rules) in by_public {
            let c = compile(
                rules
                    .iter()
                    .map(|r| (r.slot, &r.rule.service, r.rule.cidrs.as_slice())),
            );
            entries.extend(
                c.addrs
                    .into_iter()
                    .map(|(cidr, b)| (Entry::FwSrc(public, cidr), b)),
            );
            for ((proto, value, len), b) in c.services {
                // Ingress rules always name a protocol (validated).
                if let Some(proto) = proto {
                    entries.insert(Entry::FwSvc(public, proto, value, len), b);
                }
            }
        }
        let c = compile(
            state
                .active_egress_rules()
                .map(|r| (r.slot, &r.rule.service, r.rule.cidrs.as_slice())),
        );
        entries.extend(c.addrs.into_iter().map(|(cidr, b)| (Entry::EgDst(cidr), b)));
        let sources = compile_addrs(
            state
                .active_egress_rules()
                .map(|r| (r.slot, r.rule.sources.as_slice())),
        );
        entries.extend(sources.into_iter().map(|(cidr, b)| (Entry::EgSrc(cidr), b)));
        entries.extend(
            c.services
                .into_iter()
                .map(|((p, v, l), b)| (Entry::EgSvc(p, v, l), b)),
        );
        Tables {
            entries,
            egress_default_deny: !state.egress_default_allow(),
        }
    }
}

/// Which rule set an entry belongs to: one public IP's ingress rules (`Some`), or the egress
/// rules (`None`). Slots are per set.
fn set_of(e: &Entry) -> Option<Ipv4Addr> {
    match e {
        Entry::FwSrc(p, _) | Entry::FwSvc(p, ..) => Some(*p),
        Entry::EgSrc(_) | Entry::EgDst(_) | Entry::EgSvc(..) => None,
    }
}

/// Slots that hold one rule in `old` and another in `new`, by rule set: a rule freed and its
/// slot given to a new rule in the same change.
fn reused_slots(old: &DesiredState, new: &DesiredState) -> HashMap<Option<Ipv4Addr>, RuleBits> {
    let mut out: HashMap<Option<Ipv4Addr>, RuleBits> = HashMap::new();
    let ingress: HashMap<_, _> = old
        .active_ingress_rules()
        .map(|r| ((r.rule.public, r.slot), &r.rule))
        .collect();
    for r in new.active_ingress_rules() {
        if ingress
            .get(&(r.rule.public, r.slot))
            .is_some_and(|o| **o != r.rule)
        {
            out.entry(Some(r.rule.public)).or_default().set(r.slot);
        }
    }
    let egress: HashMap<_, _> = old
        .active_egress_rules()
        .map(|r| (r.slot, &r.rule))
        .collect();
    for r in new.active_egress_rules() {
        if egress.get(&r.slot).is_some_and(|o| **o != r.rule) {
            out.entry(None).or_default().set(r.slot);
        }
    }
    out
}

fn without(b: &RuleBits, gone: &RuleBits) -> RuleBits {
    let mut out = *b;
    for (w, g) in out.bits.iter_mut().zip(gone.bits) {
        *w &= !g;
    }
    out
}

/// The writes that turn `old` into `new`, each with the write that undoes it, in an order that
/// never exposes a half-applied change:
/// 1. the bits of reused slots (a rule freed and its slot given to another in this change) are
///    cleared from every old entry, so that no instant pairs the old rule's addresses with the
///    new rule's service;
/// 2. new and changed firewall entries (inert until a mapping uses them; every other rule keeps
///    its slot, so each entry is either its old or its new self);
/// 3. the egress default, mapping removals, mapping additions;
/// 4. stale entries.
///
/// At every instant each lookup then returns a subset of the bits its old or its new image
/// returns, and a bit present in two dimensions belongs to the same rule in both: a packet
/// matches only what the old or the new rules match.
pub fn plan(
    old_state: &DesiredState,
    old: &Tables,
    new_state: &DesiredState,
    new: &Tables,
) -> Vec<(Op, Op)> {
    let mut ops = Vec::new();
    let reused = reused_slots(old_state, new_state);
    let mut current = old.entries.clone();
    for (e, b) in &old.entries {
        if let Some(gone) = reused.get(&set_of(e))
            && b.intersects(gone)
        {
            let cleared = without(b, gone);
            ops.push((Op::Set(*e, cleared), Op::Set(*e, *b)));
            current.insert(*e, cleared);
        }
    }
    for (e, b) in &new.entries {
        match current.get(e) {
            Some(ob) if ob == b => {}
            Some(ob) => ops.push((Op::Set(*e, *b), Op::Set(*e, *ob))),
            None => ops.push((Op::Set(*e, *b), Op::Unset(*e))),
        }
    }
    if old.egress_default_deny != new.egress_default_deny {
        ops.push((
            Op::EgressDefaultDeny(new.egress_default_deny),
            Op::EgressDefaultDeny(old.egress_default_deny),
        ));
    }
    let diff = Diff::between(old_state, new_state);
    ops.extend(
        diff.removed
            .iter()
            .map(|m| (Op::RemoveMapping(*m), Op::AddMapping(*m))),
    );
    ops.extend(
        diff.added
            .iter()
            .map(|m| (Op::AddMapping(*m), Op::RemoveMapping(*m))),
    );
    for (e, b) in &current {
        if !new.entries.contains_key(e) {
            ops.push((Op::Unset(*e), Op::Set(*e, *b)));
        }
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::{Proto, Service};

    fn st() -> DesiredState {
        let mut s = DesiredState::default();
        s.add_mapping(Mapping {
            public: "203.0.113.1".parse().unwrap(),
            private: "10.0.0.1".parse().unwrap(),
        })
        .unwrap();
        s
    }

    #[test]
    fn plan_orders_entries_around_mappings_and_undoes() {
        let old = DesiredState::default();
        let mut new = st();
        let tcp = Service {
            proto: Proto::Tcp,
            ports: Some("22".parse().unwrap()),
            icmp_type: None,
            icmp_code: None,
        };
        new.add_ingress(
            None,
            "203.0.113.1".parse().unwrap(),
            tcp,
            vec!["198.51.100.0/24".parse().unwrap()],
        )
        .unwrap();
        let (ot, nt) = (Tables::of(&old), Tables::of(&new));
        let ops = plan(&old, &ot, &new, &nt);
        let first_mapping = ops
            .iter()
            .position(|(o, _)| matches!(o, Op::AddMapping(_)))
            .unwrap();
        assert!(
            ops[..first_mapping]
                .iter()
                .all(|(o, _)| matches!(o, Op::Set(..)))
        );
        assert!(
            ops.iter()
                .any(|(o, _)| matches!(o, Op::Set(Entry::FwSvc(_, 6, 22, 16), _)))
        );
        // Going back removes the mapping before the entries.
        let back = plan(&new, &nt, &old, &ot);
        let rm = back
            .iter()
            .position(|(o, _)| matches!(o, Op::RemoveMapping(_)))
            .unwrap();
        assert!(
            back[rm + 1..]
                .iter()
                .all(|(o, _)| matches!(o, Op::Unset(_)))
        );
        assert_eq!(back.len(), ops.len());
    }
}

#[cfg(test)]
mod transitions;
