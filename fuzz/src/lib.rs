//! Oracles the fuzz targets share: what must hold for any state natd accepts, beyond "no
//! panic". natd persists every accepted state and must restore exactly it at the next start
//! (else a payload it accepted today stops it from starting tomorrow), and the plan of map
//! writes between two states must lead from one to the other and its undo back. They need
//! natd's library (feature `natd`, on by default).
#![cfg(feature = "natd")]
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use nat_api::Cidr;
use nat_common::RuleBits;
use nat_userspace::{
    netfilter,
    persist::Snapshot,
    policy_routing::{RoutePlan, SourceRule},
    state::{DesiredState, Mapping},
    tables::{Entry, Op, Tables, plan},
};

/// The fast path's content as the map writes leave it: mappings, firewall entries and the
/// egress default.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Image {
    mappings: BTreeMap<Ipv4Addr, Ipv4Addr>,
    entries: HashMap<Entry, RuleBits>,
    egress_default_deny: bool,
    egress_closed: bool,
}

impl Image {
    fn of(state: &DesiredState) -> Self {
        let t = Tables::of(state);
        Self {
            mappings: state.mappings().map(|m| (m.public, m.private)).collect(),
            entries: t.entries,
            egress_default_deny: t.egress_default_deny,
            egress_closed: t.egress_closed,
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::AddMapping(Mapping { public, private }) => {
                self.mappings.insert(public, private);
            }
            Op::RemoveMapping(m) => {
                self.mappings.remove(&m.public);
            }
            Op::Set(e, b) => {
                self.entries.insert(e, b);
            }
            Op::Unset(e) => {
                self.entries.remove(&e);
            }
            Op::EgressDefaultDeny(d) => {
                self.egress_default_deny = d;
                self.egress_closed = false;
            }
            Op::EgressClosed => self.egress_closed = true,
        }
    }
}

/// Panics unless `after`, a state natd accepted on top of `before`, survives persistence
/// (JSON and back, validated as at start) unchanged, the plan from `before` writes exactly
/// `after`'s image and its undo restores `before`'s, and both render as nftables text.
pub fn check_accepted(before: &DesiredState, after: &DesiredState) {
    let snap = Snapshot::of(after, 1, 0);
    let json = serde_json::to_vec(&snap).expect("a snapshot serializes");
    let back: Snapshot = serde_json::from_slice(&json).expect("a snapshot parses back");
    let restored = back
        .state()
        .unwrap_or_else(|e| panic!("an accepted state does not restore: {e}"));
    assert_eq!(
        &restored, after,
        "the state restored differs from the one saved"
    );

    let ops = plan(before, &Tables::of(before), after, &Tables::of(after));
    let mut image = Image::of(before);
    for (op, _) in &ops {
        image.apply(op);
    }
    assert_eq!(
        image,
        Image::of(after),
        "the plan does not lead to the new state"
    );
    for (_, undo) in ops.iter().rev() {
        image.apply(undo);
    }
    assert_eq!(
        image,
        Image::of(before),
        "undoing the plan does not restore the old state"
    );

    // Every mapping routed by one source rule, so the routing marks render too.
    let rule = SourceRule {
        priority: 100,
        source: Cidr::ANY,
        table: 101,
    };
    let routes = RoutePlan::of(after.mappings(), &[rule], &[]);
    let ifaces = (["eth2".to_string()], ["eth0".to_string()]);
    // Every public IP homed on the one public interface, as natd finds it there.
    let homes: netfilter::Homes = after
        .mappings()
        .map(|m| (m.public, ifaces.0[0].clone()))
        .collect();
    // Both kinds of kernel: with a DCCP tracker (6.1) and without (6.18).
    for dccp in [true, false] {
        let trackers = netfilter::KernelTrackers { dccp };
        let _ = netfilter::render(&ifaces.0, &ifaces.1, after, &routes, &homes, trackers);
    }
}

/// A state with a couple of mappings (and an ingress rule) for payloads to change.
pub fn base_state() -> DesiredState {
    let mut s = DesiredState::default();
    for (p, v) in [
        ("203.0.113.100", "10.1.1.10"),
        ("203.0.113.101", "10.1.1.11"),
    ] {
        let m = Mapping {
            public: p.parse().expect("address"),
            private: v.parse().expect("address"),
        };
        s.add_mapping(m).expect("a valid mapping");
    }
    let payload = r#"{"type":"firewallrules","rules":[{"id":5,"src_ip":"203.0.113.100",
        "protocol":"tcp","src_port_range":[22,22],"source_cidr_list":["198.51.100.0/24"],
        "traffic_type":"Ingress"}]}"#;
    let p = nat_userspace::cloudstack::parse(payload).expect("a valid payload");
    nat_userspace::cloudstack::apply(&p, &mut s).expect("applies");
    s
}
