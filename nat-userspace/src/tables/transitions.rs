//! Every intermediate state of a plan: after each write, a packet is let in to a mapped public
//! IP only if the old or the new rules let it in, and a guest's packet is let out only if the
//! old or the new policy lets it out (exceptions that allow or deny, a change of the egress
//! default included). A rule freed and its slot reused in the same change must
//! never pair the old rule's addresses with the new rule's service.
use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;

use super::*;
use crate::firewall::{PortRange, Proto, Service};

/// What the fast path holds after some of a plan's writes, looked up as the XDP program does:
/// longest prefix in each dimension, then the bitmaps must share a bit.
#[derive(Debug, Clone)]
struct Image {
    mapped: BTreeSet<Ipv4Addr>,
    entries: HashMap<Entry, RuleBits>,
    egress_default_deny: bool,
    egress_closed: bool,
}

/// A packet the image decides on: source, destination (public IP for ingress), protocol and
/// the 16-bit service value (port, or ICMP type << 8 | code).
type Probe = (Ipv4Addr, Ipv4Addr, u8, u16);

fn mask(len: u8) -> u16 {
    if len == 0 {
        0
    } else {
        u16::MAX << (16 - u16::from(len))
    }
}

fn host(a: Ipv4Addr) -> Cidr {
    Cidr::new(a, 32).unwrap()
}

impl Image {
    fn of(state: &DesiredState) -> Self {
        let t = Tables::of(state);
        Image {
            mapped: state.mappings().map(|m| m.public).collect(),
            entries: t.entries,
            egress_default_deny: t.egress_default_deny,
            egress_closed: t.egress_closed,
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::AddMapping(m) => {
                self.mapped.insert(m.public);
            }
            Op::RemoveMapping(m) => {
                self.mapped.remove(&m.public);
            }
            Op::Set(e, b) => {
                self.entries.insert(e, b);
            }
            Op::Unset(e) => {
                self.entries.remove(&e);
            }
            Op::EgressDefaultDeny(deny) => {
                self.egress_default_deny = deny;
                self.egress_closed = false;
            }
            Op::EgressClosed => self.egress_closed = true,
        }
    }

    fn longest(&self, key: impl Fn(u8) -> Entry, max: u8) -> Option<RuleBits> {
        (0..=max)
            .rev()
            .find_map(|l| self.entries.get(&key(l)).copied())
    }

    fn ingress(&self, (src, public, proto, value): Probe) -> bool {
        if !self.mapped.contains(&public) {
            return false;
        }
        let a = self.longest(|l| Entry::FwSrc(public, host(src).truncate(l)), 32);
        let s = self.longest(|l| Entry::FwSvc(public, proto, value & mask(l), l), 16);
        matches!((a, s), (Some(a), Some(s)) if a.intersects(&s))
    }

    fn egress(&self, (src, dst, proto, value): Probe) -> bool {
        let s = self.longest(|l| Entry::EgSrc(host(src).truncate(l)), 32);
        let d = self.longest(|l| Entry::EgDst(host(dst).truncate(l)), 32);
        let v = self
            .longest(|l| Entry::EgSvc(Some(proto), value & mask(l), l), 16)
            .or_else(|| self.entries.get(&Entry::EgSvc(None, 0, 0)).copied());
        matches!((s, d, v), (Some(s), Some(d), Some(v)) if s.intersects3(&d, &v))
    }

    /// Whether the program lets the guest's new flow out, as `policy::egress_allows` decides.
    fn egress_allows(&self, p: Probe) -> bool {
        !self.egress_closed && self.egress_default_deny == self.egress(p)
    }
}

const P1: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const P2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn remote_cidrs() -> Vec<Cidr> {
    [
        "0.0.0.0/0",
        "198.51.100.0/24",
        "198.51.100.0/25",
        "198.51.100.128/25",
        "198.51.100.7/32",
        "192.0.2.0/24",
    ]
    .iter()
    .map(|c| c.parse().unwrap())
    .collect()
}

fn guest_cidrs() -> Vec<Cidr> {
    ["0.0.0.0/0", "10.0.0.0/24", "10.0.0.5/32", "10.0.0.8/29"]
        .iter()
        .map(|c| c.parse().unwrap())
        .collect()
}

fn services(egress: bool) -> Vec<Service> {
    let s = |proto, ports: Option<(u16, u16)>, icmp: Option<u8>| Service {
        proto,
        ports: ports.map(|(first, last)| PortRange { first, last }),
        icmp_type: icmp,
        icmp_code: None,
    };
    let mut v = vec![
        s(Proto::Tcp, Some((22, 22)), None),
        s(Proto::Tcp, Some((80, 90)), None),
        s(Proto::Tcp, None, None),
        s(Proto::Udp, Some((53, 53)), None),
        s(Proto::Icmp, None, Some(8)),
        s(Proto::Icmp, None, None),
    ];
    if egress {
        v.push(s(Proto::All, None, None));
    }
    v
}

fn probes(ingress: bool) -> Vec<Probe> {
    let remotes = ["198.51.100.7", "198.51.100.200", "192.0.2.1", "10.9.9.9"];
    let guests = ["10.0.0.5", "10.0.0.9", "10.1.0.1"];
    let svcs = [
        (6, 22),
        (6, 85),
        (6, 443),
        (17, 53),
        (1, 0x0800),
        (1, 0),
        (47, 0),
    ];
    let mut out = Vec::new();
    for (proto, value) in svcs {
        if ingress {
            for r in remotes {
                for p in [P1, P2] {
                    out.push((ip(r), p, proto, value));
                }
            }
        } else {
            for g in guests {
                for r in remotes {
                    out.push((ip(g), ip(r), proto, value));
                }
            }
        }
    }
    out
}

/// Applies the plan from `old` to `new` one write at a time and checks each intermediate
/// image against both ends; then checks that it ends at `new`.
fn check_every_step(old: &DesiredState, new: &DesiredState) -> Result<(), String> {
    let (first, last) = (Image::of(old), Image::of(new));
    let ops = plan(old, &Tables::of(old), new, &Tables::of(new));
    let mut image = first.clone();
    for (i, (op, _)) in ops.iter().enumerate() {
        image.apply(op);
        for p in probes(true) {
            if image.ingress(p) && !first.ingress(p) && !last.ingress(p) {
                return Err(format!(
                    "after write #{i} ({op:?}), {p:?} is let in though neither the old nor the \
                     new rules let it in; plan: {ops:#?}"
                ));
            }
        }
        for p in probes(false) {
            if image.egress_allows(p) && !first.egress_allows(p) && !last.egress_allows(p) {
                return Err(format!(
                    "after write #{i} ({op:?}), egress {p:?} is let out though neither the old \
                     nor the new policy lets it out; plan: {ops:#?}"
                ));
            }
        }
    }
    if image.entries != last.entries
        || image.mapped != last.mapped
        || (image.egress_default_deny, image.egress_closed)
            != (last.egress_default_deny, last.egress_closed)
    {
        return Err("the plan does not end at the new state".into());
    }
    Ok(())
}

fn mapped(publics: &[Ipv4Addr]) -> DesiredState {
    let mut s = DesiredState::default();
    for (i, p) in publics.iter().enumerate() {
        s.add_mapping(Mapping {
            public: *p,
            private: Ipv4Addr::new(10, 0, 0, 10 + i as u8),
        })
        .unwrap();
    }
    s
}

/// The case the plan must get right: rule A (ssh from 198.51.100.0/24) is deleted and rule B
/// (http from 192.0.2.0/24) added in one change; B takes A's slot. Written in any order that
/// sets B's service before A's sources are gone, 198.51.100.7 could open http for an instant.
#[test]
fn a_reused_slot_never_pairs_old_sources_with_the_new_service() {
    let svc = services(false);
    let mut old = mapped(&[P1]);
    let a = old
        .add_ingress(
            None,
            P1,
            svc[0].clone(),
            vec!["198.51.100.0/24".parse().unwrap()],
        )
        .unwrap();
    old.add_ingress(None, P1, svc[4].clone(), vec![Cidr::ANY])
        .unwrap();
    let mut new = old.clone();
    new.remove_ingress(a).unwrap();
    new.add_ingress(
        None,
        P1,
        svc[1].clone(),
        vec!["192.0.2.0/24".parse().unwrap()],
    )
    .unwrap();
    let slot = |s: &DesiredState, port| {
        s.ingress_rules()
            .find(|r| r.rule.service.ports.is_some_and(|p| p.first == port))
            .map(|r| r.slot)
    };
    assert_eq!(slot(&old, 22), slot(&new, 80), "B reuses A's slot");
    check_every_step(&old, &new).unwrap();

    // The same for egress rules (guest sources, destinations, service), exceptions that allow
    // (the deny default: the pair would let out) and exceptions that deny.
    for allow in [false, true] {
        let mut old = mapped(&[P1]);
        old.set_egress_default_allow(allow);
        let a = old
            .add_egress_from(
                None,
                svc[0].clone(),
                vec!["198.51.100.0/24".parse().unwrap()],
                vec!["10.0.0.5/32".parse().unwrap()],
            )
            .unwrap();
        let mut new = old.clone();
        new.remove_egress(a).unwrap();
        new.add_egress_from(
            None,
            svc[1].clone(),
            vec!["192.0.2.0/24".parse().unwrap()],
            vec!["10.0.0.8/29".parse().unwrap()],
        )
        .unwrap();
        check_every_step(&old, &new).unwrap();
    }
}

type IngressSpec = (bool, usize, Vec<usize>);
type EgressSpec = (usize, Vec<usize>, Vec<usize>);

fn ingress_spec() -> impl Strategy<Value = IngressSpec> {
    (
        any::<bool>(),
        0..services(false).len(),
        prop::collection::vec(0..remote_cidrs().len(), 0..3),
    )
}

fn egress_spec() -> impl Strategy<Value = EgressSpec> {
    (
        0..services(true).len(),
        prop::collection::vec(0..remote_cidrs().len(), 0..3),
        prop::collection::vec(0..guest_cidrs().len(), 0..3),
    )
}

fn add_rules(s: &mut DesiredState, ingress: &[IngressSpec], egress: &[EgressSpec]) {
    let (rc, gc) = (remote_cidrs(), guest_cidrs());
    for (second, svc, cidrs) in ingress {
        let public = if *second { P2 } else { P1 };
        let cidrs = cidrs.iter().map(|&i| rc[i]).collect();
        // Identical ingress rules under two ids are kept, as from a CloudStack payload.
        let id = s.ingress_rules().map(|r| r.rule.id).max().unwrap_or(0) + 1;
        let _ = s.add_ingress_beside_duplicates(id, public, services(false)[*svc].clone(), cidrs);
    }
    for (svc, dests, sources) in egress {
        let dests = dests.iter().map(|&i| rc[i]).collect();
        let sources = sources.iter().map(|&i| gc[i]).collect();
        let _ = s.add_egress_from(None, services(true)[*svc].clone(), dests, sources);
    }
}

/// CloudStack's egress rules, each added under a default (`true`: allow).
fn add_cloudstack_egress(s: &mut DesiredState, egress: &[(EgressSpec, bool)]) {
    let (rc, gc) = (remote_cidrs(), guest_cidrs());
    for ((svc, dests, sources), under) in egress {
        let dests = dests.iter().map(|&i| rc[i]).collect();
        let sources = sources.iter().map(|&i| gc[i]).collect();
        let id = s.egress_rules().map(|r| r.rule.id).max().unwrap_or(0) + 1;
        let _ = s.add_egress_under(id, services(true)[*svc].clone(), dests, sources, *under);
    }
}

/// The router's default egress rule revoked: egress goes from allow (the rules added under it
/// are DROP exceptions) to deny (the rules added under deny are ACCEPT exceptions, the others
/// out of force). An exception of either default acts under the other as its opposite, so no
/// write may pair the new default with the old exceptions or the old default with the new.
#[test]
fn a_change_of_egress_default_never_lets_out_what_neither_policy_does() {
    let svc = services(true);
    let mut old = mapped(&[P1]);
    old.add_egress_default(1, true).unwrap();
    let web = vec!["198.51.100.0/24".parse().unwrap()];
    // Under allow: no ssh anywhere, no http to 198.51.100.0/24.
    old.add_egress_under(2, svc[0].clone(), vec![], vec![], true)
        .unwrap();
    old.add_egress_under(3, svc[1].clone(), web.clone(), vec![], true)
        .unwrap();
    // Under deny: dns only.
    old.add_egress_under(4, svc[3].clone(), vec![], vec![], false)
        .unwrap();
    old.settle_egress_default();
    let mut new = old.clone();
    new.remove_egress_default(1).unwrap();
    new.settle_egress_default();
    let (first, last) = (Image::of(&old), Image::of(&new));
    let ssh = (ip("10.0.0.5"), ip("192.0.2.1"), 6, 22);
    let dns = (ip("10.0.0.5"), ip("192.0.2.1"), 17, 53);
    assert!(!first.egress_allows(ssh) && !last.egress_allows(ssh));
    assert!(first.egress_allows(dns) && last.egress_allows(dns));
    check_every_step(&old, &new).unwrap();
    // And back: the default rule sent again.
    check_every_step(&new, &old).unwrap();
}

/// Two ingress rules allowing the same (CloudStack sent it under two ids) each have a slot of
/// their own; revoking one never stops, even for an instant, what the other still allows.
#[test]
fn revoking_one_of_two_identical_rules_keeps_the_traffic_at_every_step() {
    let svc = services(false);
    let from = vec!["198.51.100.0/24".parse().unwrap()];
    let mut old = mapped(&[P1]);
    old.add_ingress_beside_duplicates(12, P1, svc[3].clone(), from.clone())
        .unwrap();
    let same = old
        .add_ingress_beside_duplicates(16, P1, svc[3].clone(), from)
        .unwrap();
    assert_eq!(same, Some(12));
    let slots: BTreeSet<usize> = old.ingress_rules().map(|r| r.slot).collect();
    assert_eq!(slots.len(), 2, "one slot each");
    let mut new = old.clone();
    new.remove_ingress(12).unwrap();
    check_every_step(&old, &new).unwrap();
    let (first, last) = (Image::of(&old), Image::of(&new));
    let dns = (ip("198.51.100.7"), P1, 17, 53);
    assert!(first.ingress(dns) && last.ingress(dns));
    let mut image = first.clone();
    for (op, _) in plan(&old, &Tables::of(&old), &new, &Tables::of(&new)) {
        image.apply(&op);
        for p in probes(true) {
            assert!(
                image.ingress(p) || !(first.ingress(p) && last.ingress(p)),
                "after {op:?}, {p:?} is refused though both ends let it in"
            );
        }
    }
    // Revoking the other one too closes it.
    let mut none = new.clone();
    none.remove_ingress(16).unwrap();
    check_every_step(&new, &none).unwrap();
    assert!(!Image::of(&none).ingress(dns));
}

proptest! {
    // Each case checks about 200 probes after every write of a plan: fewer cases than the
    // default keep the unit tests quick.
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random rule sets, some rules deleted and others added in one change (so freed slots are
    /// reused), mappings added, removed or re-pointed, the egress default kept or turned over:
    /// no intermediate image matches a packet that neither end matches, or lets out one that
    /// neither end lets out.
    #[test]
    fn no_intermediate_state_matches_what_neither_end_matches(
        old_ingress in prop::collection::vec(ingress_spec(), 0..6),
        old_egress in prop::collection::vec(egress_spec(), 0..5),
        keep in any::<u16>(),
        new_ingress in prop::collection::vec(ingress_spec(), 0..4),
        new_egress in prop::collection::vec(egress_spec(), 0..3),
        cloudstack_egress in prop::collection::vec((egress_spec(), any::<bool>()), 0..4),
        old_allow in any::<bool>(),
        flip in any::<bool>(),
        old_p2 in any::<bool>(),
        new_p2 in any::<bool>(),
        repoint in any::<bool>(),
    ) {
        let mut old = mapped(if old_p2 { &[P1, P2][..] } else { &[P1][..] });
        add_rules(&mut old, &old_ingress, &old_egress);
        add_cloudstack_egress(&mut old, &cloudstack_egress);
        old.set_egress_default_allow(old_allow);
        let mut new = old.clone();
        let ids: Vec<(bool, u64)> = new
            .ingress_rules()
            .map(|r| (true, r.rule.id))
            .chain(new.egress_rules().map(|r| (false, r.rule.id)))
            .collect();
        for (i, (ingress, id)) in ids.into_iter().enumerate() {
            if keep & (1 << (i % 16)) == 0 {
                if ingress {
                    new.remove_ingress(id).unwrap();
                } else {
                    new.remove_egress(id).unwrap();
                }
            }
        }
        add_rules(&mut new, &new_ingress, &new_egress);
        new.set_egress_default_allow(old_allow != flip);
        if new_p2 != old_p2 {
            if new_p2 {
                new.add_mapping(Mapping { public: P2, private: ip("10.0.0.20") }).unwrap();
            } else {
                new.remove_mapping(P2).unwrap();
            }
        }
        if repoint {
            new.remove_mapping(P1).unwrap();
            new.add_mapping(Mapping { public: P1, private: ip("10.0.0.30") }).unwrap();
        }
        check_every_step(&old, &new).map_err(TestCaseError::fail)?;
    }
}
