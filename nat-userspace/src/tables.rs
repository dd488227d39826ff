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
    /// No new egress flow until the next [`Op::EgressDefaultDeny`] (see [`plan`]).
    EgressClosed,
}

/// Every firewall entry of a state, and the egress default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    pub entries: HashMap<Entry, RuleBits>,
    pub egress_default_deny: bool,
    /// Egress is closed (`nat_common::EGRESS_CLOSED`): found so in the pinned maps of a natd
    /// that stopped while turning the default over; never so in a state's own tables.
    pub egress_closed: bool,
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
            egress_closed: false,
        }
    }

    /// The value of `NatConfig::egress_default_deny` these tables mean.
    pub fn egress_mode(&self) -> u32 {
        egress_mode(self.egress_closed, self.egress_default_deny)
    }
}

/// The value of `NatConfig::egress_default_deny` for egress `closed` or under the default
/// (`deny` or allow); what [`Op::EgressClosed`] and [`Op::EgressDefaultDeny`] write.
pub fn egress_mode(closed: bool, deny: bool) -> u32 {
    match (closed, deny) {
        (true, _) => nat_common::EGRESS_CLOSED,
        (false, true) => nat_common::EGRESS_DENY,
        (false, false) => nat_common::EGRESS_ALLOW,
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

/// The bits the LPM lookup of `key`'s own prefix returns from `entries` (the longest entry of
/// its map holding it; empty if none). Egress entries only.
fn lookup(entries: &HashMap<Entry, RuleBits>, key: &Entry) -> RuleBits {
    let found = match *key {
        Entry::EgSrc(c) => (0..=c.prefix_len())
            .rev()
            .find_map(|l| entries.get(&Entry::EgSrc(c.truncate(l)))),
        Entry::EgDst(c) => (0..=c.prefix_len())
            .rev()
            .find_map(|l| entries.get(&Entry::EgDst(c.truncate(l)))),
        Entry::EgSvc(Some(p), v, len) => (0..=len)
            .rev()
            .find_map(|l| {
                let mask = u16::MAX.checked_shl(16 - u32::from(l)).unwrap_or(0);
                entries.get(&Entry::EgSvc(Some(p), v & mask, l))
            })
            .or_else(|| entries.get(&Entry::EgSvc(None, 0, 0))),
        Entry::EgSvc(None, ..) => entries.get(&Entry::EgSvc(None, 0, 0)),
        Entry::FwSrc(..) | Entry::FwSvc(..) => None,
    };
    found.copied().unwrap_or_default()
}

/// The writes that turn `old` into `new`, each with the write that undoes it, in an order that
/// never exposes a half-applied change.
///
/// Rules that allow (ingress rules; egress exceptions under the deny default):
/// 1. the bits of reused slots (a rule freed and its slot given to another in this change) are
///    cleared from every old entry, so that no instant pairs the old rule's addresses with the
///    new rule's service;
/// 2. new and changed entries (ingress entries are inert until a mapping uses them; every other
///    rule keeps its slot, so each entry is either its old or its new self);
/// 3. mapping removals, mapping additions;
/// 4. stale entries.
///
/// At every instant each lookup then returns a subset of the bits its old or its new image
/// returns, and a bit present in two dimensions belongs to the same rule in both: a packet
/// matches only what the old or the new rules match.
///
/// Rules that deny (egress exceptions under the allow default) need the converse, a packet
/// matched by the old and the new rules matched at every instant: in step 2 every egress entry
/// of either image takes what the old and the new lookups of its prefix return together (a
/// reused slot's bit then pairs the old rule's addresses with the new rule's service, which
/// only denies more), and in step 4 each takes its new bits or goes. Every lookup then
/// returns a superset of its old image's until step 4, and of its new image's from then on.
///
/// An egress exception means the opposite under the other default, so a change of default is
/// never written beside the exceptions: egress is closed first and the new default is written
/// last. In between, a guest opens no new flow (established flows go on).
pub fn plan(
    old_state: &DesiredState,
    old: &Tables,
    new_state: &DesiredState,
    new: &Tables,
) -> Vec<(Op, Op)> {
    let mut ops = Vec::new();
    let closing = !old.egress_closed && old.egress_default_deny != new.egress_default_deny;
    if closing {
        ops.push((
            Op::EgressClosed,
            Op::EgressDefaultDeny(old.egress_default_deny),
        ));
    }
    // Egress exceptions that deny, in force before, during and after the change.
    let denying = !closing && !old.egress_closed && !new.egress_default_deny;
    let grows = |e: &Entry| denying && set_of(e).is_none();
    let reused = reused_slots(old_state, new_state);
    let mut current = old.entries.clone();
    for (e, b) in &old.entries {
        if let Some(gone) = reused.get(&set_of(e))
            && !grows(e)
            && b.intersects(gone)
        {
            let cleared = without(b, gone);
            ops.push((Op::Set(*e, cleared), Op::Set(*e, *b)));
            current.insert(*e, cleared);
        }
    }
    let mut wanted: Vec<(Entry, RuleBits)> = new
        .entries
        .iter()
        .filter(|(e, _)| !grows(e))
        .map(|(e, b)| (*e, *b))
        .collect();
    if denying {
        let keys: std::collections::HashSet<Entry> = old
            .entries
            .keys()
            .chain(new.entries.keys())
            .filter(|e| set_of(e).is_none())
            .copied()
            .collect();
        for e in keys {
            let mut b = lookup(&old.entries, &e);
            b.union(&lookup(&new.entries, &e));
            wanted.push((e, b));
        }
    }
    for (e, b) in wanted {
        match current.get(&e) {
            Some(ob) if *ob == b => {}
            Some(ob) => ops.push((Op::Set(e, b), Op::Set(e, *ob))),
            None => ops.push((Op::Set(e, b), Op::Unset(e))),
        }
        current.insert(e, b);
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
        match new.entries.get(e) {
            Some(nb) if nb == b => {}
            Some(nb) => ops.push((Op::Set(*e, *nb), Op::Set(*e, *b))),
            None => ops.push((Op::Unset(*e), Op::Set(*e, *b))),
        }
    }
    if closing || old.egress_closed {
        ops.push((
            Op::EgressDefaultDeny(new.egress_default_deny),
            Op::EgressClosed,
        ));
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

#[cfg(test)]
mod closed {
    use super::*;

    /// Pins left closed by a natd that stopped while turning the default over: the plan to the
    /// same state rewrites the entries it needs and ends by opening egress, with the undo
    /// closing it again.
    #[test]
    fn tables_found_closed_are_opened_by_the_next_plan() {
        let s = DesiredState::default();
        let mut found = Tables::of(&s);
        found.egress_closed = true;
        assert_eq!(found.egress_mode(), nat_common::EGRESS_CLOSED);
        let ops = plan(&s, &found, &s, &Tables::of(&s));
        assert_eq!(
            ops,
            vec![(Op::EgressDefaultDeny(false), Op::EgressClosed)],
            "only egress is opened"
        );
        // Turning the default over closes first, opens last.
        let mut deny = s.clone();
        deny.set_egress_default_allow(false);
        let ops = plan(&s, &Tables::of(&s), &deny, &Tables::of(&deny));
        assert_eq!(
            ops.first(),
            Some(&(Op::EgressClosed, Op::EgressDefaultDeny(false)))
        );
        assert_eq!(
            ops.last(),
            Some(&(Op::EgressDefaultDeny(true), Op::EgressClosed))
        );
    }
}
