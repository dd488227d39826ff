//! The fast path's image of a desired state: every firewall entry the XDP program looks up,
//! and the plan of map writes that turns one image into another.
use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
    net::Ipv4Addr,
};

use nat_common::RuleBits;

use crate::{
    cidr::Cidr,
    firewall::compile,
    state::{DesiredState, Diff, Mapping},
};

/// One LPM entry of the firewall maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entry {
    /// `FW_SRC`: (public IP, source prefix).
    FwSrc(Ipv4Addr, Cidr),
    /// `FW_SVC`: (public IP, protocol, service value, service prefix length).
    FwSvc(Ipv4Addr, u8, u16, u8),
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
        for r in state.ingress_rules() {
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
                .egress_rules()
                .map(|r| (r.slot, &r.rule.service, r.rule.cidrs.as_slice())),
        );
        entries.extend(c.addrs.into_iter().map(|(cidr, b)| (Entry::EgDst(cidr), b)));
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

/// The writes that turn `old` into `new`, each with the write that undoes it, in an order that
/// never exposes a half-applied change: new and changed firewall entries first (inert until a
/// mapping uses them; each rule keeps its slot, so each entry is either its old or its new
/// self), the egress default, mapping removals, mapping additions, then stale entries.
pub fn plan(
    old_state: &DesiredState,
    old: &Tables,
    new_state: &DesiredState,
    new: &Tables,
) -> Vec<(Op, Op)> {
    let mut ops = Vec::new();
    for (e, b) in &new.entries {
        match old.entries.get(e) {
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
    for (e, b) in &old.entries {
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
