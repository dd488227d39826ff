//! The example payloads in sequence, idempotence, no-ops, and what each kind of rule does.
//! Refusals are in `refusals.rs`.
use std::net::Ipv4Addr;

use super::*;
use crate::{
    cidr::Cidr,
    firewall::{EgressRule, IngressRule, PortRange, Proto, Service},
    state::{DesiredState, Mapping},
};

pub(super) const STATICNAT: &str = include_str!("../../tests/data/cloudstack/staticnat_rules.json");
pub(super) const FIREWALL: &str = include_str!("../../tests/data/cloudstack/firewall_rules.json");
pub(super) const EGRESS: &str = include_str!("../../tests/data/cloudstack/egress_rules.json");
const EGRESS_PER_VM: &str = include_str!("../../tests/data/cloudstack/egress_rules_per_vm.json");
const FIREWALL_REVOKE: &str =
    include_str!("../../tests/data/cloudstack/firewall_rules_revoke.json");
const STATICNAT_REVOKE: &str =
    include_str!("../../tests/data/cloudstack/staticnat_rules_revoke.json");

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn map(p: &str, v: &str) -> Mapping {
    Mapping {
        public: ip(p),
        private: ip(v),
    }
}

fn cidrs(list: &[&str]) -> Vec<Cidr> {
    list.iter().map(|c| c.parse().unwrap()).collect()
}

fn svc(proto: Proto, ports: Option<(u16, u16)>, icmp: Option<(u8, Option<u8>)>) -> Service {
    Service {
        proto,
        ports: ports.map(|(first, last)| PortRange { first, last }),
        icmp_type: icmp.map(|(t, _)| t),
        icmp_code: icmp.and_then(|(_, c)| c),
    }
}

fn ing(id: u64, public: &str, service: Service, from: &[&str]) -> IngressRule {
    IngressRule {
        id,
        public: ip(public),
        service,
        cidrs: cidrs(from),
    }
}

fn egr(id: u64, service: Service, from: &[&str], to: &[&str]) -> EgressRule {
    EgressRule {
        id,
        service,
        cidrs: cidrs(to),
        sources: cidrs(from),
    }
}

/// Everything CloudStack's router would have: mappings, ingress rules, egress default and
/// egress exception rules.
#[derive(Debug, PartialEq)]
struct Seen {
    mappings: Vec<Mapping>,
    ingress: Vec<IngressRule>,
    egress_default_allow: bool,
    egress: Vec<EgressRule>,
}

fn seen(s: &DesiredState) -> Seen {
    Seen {
        mappings: s.mappings().collect(),
        ingress: s.ingress_rules().map(|r| r.rule.clone()).collect(),
        egress_default_allow: s.egress_default_allow(),
        egress: s.egress_rules().map(|r| r.rule.clone()).collect(),
    }
}

/// The caller's pattern: apply to a clone, keep it only on success.
pub(super) fn step(state: &mut DesiredState, text: &str) -> Result<Summary, CloudStackError> {
    let payload = parse(text)?;
    let mut new = state.clone();
    let summary = apply(&payload, &mut new)?;
    *state = new;
    Ok(summary)
}

/// Applies `text` through the caller's pattern, checks the state is untouched, and returns
/// the error message.
pub(super) fn refused(state: &DesiredState, text: &str) -> String {
    let mut s = state.clone();
    let e = step(&mut s, text).unwrap_err();
    assert_eq!(&s, state, "a refused payload changed the state");
    e.to_string()
}

/// A firewall payload of `rules` (JSON objects, comma-separated).
pub(super) fn fw(rules: &str) -> String {
    format!(r#"{{"type":"firewallrules","rules":[{rules}]}}"#)
}

fn lines(s: &Summary) -> Vec<String> {
    s.lines().collect()
}

pub(super) fn state_after(texts: &[&str]) -> DesiredState {
    let mut s = DesiredState::default();
    for t in texts {
        step(&mut s, t).unwrap();
    }
    s
}

#[test]
fn example_payloads_in_sequence_give_the_routers_state() {
    let mut s = DesiredState::default();
    let tcp22 = svc(Proto::Tcp, Some((22, 22)), None);
    let udp5000 = svc(Proto::Udp, Some((5000, 5100)), None);
    let echo = svc(Proto::Icmp, None, Some((8, Some(0))));
    let any_icmp = svc(Proto::Icmp, None, None);
    let smtp = svc(Proto::Tcp, Some((25, 25)), None);

    let sum = step(&mut s, STATICNAT).unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1: mapping added: 203.0.113.100 -> 10.1.1.10",
            "rule #2: mapping added: 203.0.113.101 -> 10.1.1.11"
        ]
    );
    let after_nat = Seen {
        mappings: vec![
            map("203.0.113.100", "10.1.1.10"),
            map("203.0.113.101", "10.1.1.11"),
        ],
        ingress: vec![],
        egress_default_allow: true,
        egress: vec![],
    };
    assert_eq!(seen(&s), after_nat);

    let sum = step(&mut s, FIREWALL).unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 11): ingress rule 11 added",
            "rule #2 (id 12): ingress rule 12 added",
            "rule #3 (id 13): ingress rule 13 added",
            "rule #4 (id 14): ingress rule 14 added"
        ]
    );
    let after_fw = Seen {
        ingress: vec![
            ing(11, "203.0.113.100", tcp22.clone(), &["198.51.100.0/24"]),
            ing(12, "203.0.113.100", udp5000.clone(), &["0.0.0.0/0"]),
            ing(13, "203.0.113.100", echo.clone(), &["0.0.0.0/0"]),
            ing(
                14,
                "203.0.113.101",
                any_icmp.clone(),
                &["192.0.2.0/25", "192.0.2.128/25"],
            ),
        ],
        ..after_nat
    };
    assert_eq!(seen(&s), after_fw);

    let sum = step(&mut s, EGRESS).unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 21): egress rule 21 added (a drop exception to a default of allow)",
            "rule #2 (id 22): egress rule 22 added: the default rule (allow by default)",
            "rule #2 (id 22): egress default policy allow, unchanged (default rule 22)"
        ]
    );
    // Default allow, so rule 21 is a DENY exception: tcp/25 to anywhere.
    let after_egress = Seen {
        egress_default_allow: true,
        egress: vec![egr(21, smtp.clone(), &["10.1.1.0/24"], &["0.0.0.0/0"])],
        ..after_fw
    };
    assert_eq!(seen(&s), after_egress);

    let sum = step(&mut s, FIREWALL_REVOKE).unwrap();
    assert_eq!(lines(&sum), ["rule #1 (id 11): ingress rule 11 removed"]);
    let mut after_revoke = after_egress;
    after_revoke.ingress.remove(0);
    assert_eq!(seen(&s), after_revoke);

    let sum = step(&mut s, STATICNAT_REVOKE).unwrap();
    assert_eq!(
        lines(&sum),
        ["rule #1: mapping removed: 203.0.113.101 -> 10.1.1.11; \
             its ingress rules [14] stay, inactive until it is mapped again"]
    );
    // The router's firewall databag still holds rule 14: it is kept, inactive.
    let last = Seen {
        mappings: vec![map("203.0.113.100", "10.1.1.10")],
        ingress: vec![
            ing(12, "203.0.113.100", udp5000, &["0.0.0.0/0"]),
            ing(13, "203.0.113.100", echo, &["0.0.0.0/0"]),
            ing(
                14,
                "203.0.113.101",
                any_icmp,
                &["192.0.2.0/25", "192.0.2.128/25"],
            ),
        ],
        egress_default_allow: true,
        egress: vec![egr(21, smtp, &["10.1.1.0/24"], &["0.0.0.0/0"])],
    };
    assert_eq!(seen(&s), last);
    let active: Vec<u64> = s.active_ingress_rules().map(|r| r.rule.id).collect();
    assert_eq!(active, [12, 13]);
    assert_eq!(sum.to_string(), "1 mapping removed");
}

#[test]
fn reapplying_each_example_changes_nothing() {
    let files = [
        STATICNAT,
        FIREWALL,
        EGRESS,
        FIREWALL_REVOKE,
        STATICNAT_REVOKE,
    ];
    let mut s = DesiredState::default();
    for f in files {
        step(&mut s, f).unwrap();
        let before = s.clone();
        let again = step(&mut s, f).unwrap();
        assert_eq!(s, before, "re-applying {f}");
        assert!(!again.changed(), "{again}: {:?}", again.changes);
    }
    // Replaying the whole history onto its result is a no-op as well.
    let end = s.clone();
    for f in files {
        step(&mut s, f).unwrap();
    }
    assert_eq!(s, end);
}

#[test]
fn no_ops_are_reported() {
    let mut s = state_after(&[STATICNAT, FIREWALL]);
    let sum = step(&mut s, STATICNAT).unwrap();
    assert_eq!(
        lines(&sum)[0],
        "rule #1: mapping 203.0.113.100 -> 10.1.1.10 already present"
    );
    assert_eq!(sum.to_string(), "2 mappings already present");
    let sum = step(&mut s, FIREWALL).unwrap();
    assert_eq!(
        lines(&sum)[0],
        "rule #1 (id 11): ingress rule 11 already present, kept as it is"
    );
    step(&mut s, STATICNAT_REVOKE).unwrap();
    let sum = step(&mut s, STATICNAT_REVOKE).unwrap();
    assert_eq!(
        lines(&sum),
        ["rule #1: revoke: 203.0.113.101 has no mapping, nothing to do"]
    );
    let gone =
        r#"{"type":"firewallrules","rules":[{"id":14,"revoked":true,"traffic_type":"Ingress"}]}"#;
    // Rule 14 outlived its IP's static NAT; revoked, it is gone, and a second revoke is a no-op.
    step(&mut s, gone).unwrap();
    let sum = step(&mut s, gone).unwrap();
    assert_eq!(
        lines(&sum),
        ["rule #1 (id 14): revoke: no rule 14, nothing to do"]
    );
    assert_eq!(sum.to_string(), "1 revoke of an unknown rule");
    assert!(!sum.changed());
}

#[test]
fn a_known_id_is_kept_even_when_its_fields_differ() {
    let mut s = state_after(&[STATICNAT, FIREWALL]);
    let before = s.clone();
    let other = FIREWALL.replace("[22,22]", "[2222,2222]");
    let sum = step(&mut s, &other).unwrap();
    assert_eq!(s, before);
    assert_eq!(
        sum.changes[0].1,
        Change::RuleKept {
            kind: RuleKind::Ingress,
            id: 11,
            differs: true
        }
    );
    assert_eq!(
        lines(&sum)[0],
        "rule #1 (id 11): ingress rule 11 already present, kept as it is \
         (the payload's fields differ from it)"
    );
    assert_eq!(
        sum.changes[1].1,
        Change::RuleKept {
            kind: RuleKind::Ingress,
            id: 12,
            differs: false
        }
    );
}

#[test]
fn unknown_fields_absent_rules_and_nulls_are_accepted() {
    let mut s = DesiredState::default();
    let text = r#"{"type":"staticnatrules","new_field":{"x":1},"rules":[{"revoke":false,
        "source_ip_address":"203.0.113.100","destination_ip_address":"10.1.1.10",
        "protocol":null,"source_port_range":"0:0","should_apply_cross_network_snat":false}]}"#;
    step(&mut s, text).unwrap();
    assert_eq!(s.private_of(ip("203.0.113.100")), Some(ip("10.1.1.10")));
    let before = s.clone();
    let sum = step(&mut s, r#"{"type":"firewallrules"}"#).unwrap();
    assert!(sum.changes.is_empty());
    assert_eq!(sum.to_string(), "no change");
    assert_eq!(s, before);
}

#[test]
fn egress_default_deny_makes_the_rules_allow_exceptions() {
    let mut s = state_after(&[STATICNAT]);
    let text = fw(r#"
        {"id":41,"src_ip":"","protocol":"udp","src_port_range":[53,53],"source_cidr_list":["10.1.1.0/24"],
         "dest_cidr_list":["198.51.100.53/32","0.0.0.0/0"],"traffic_type":"Egress","guest_cidr":"10.1.1.0/24","default_egress_policy":false},
        {"id":42,"src_ip":"","protocol":"icmp","icmp_type":-1,"icmp_code":-1,"source_cidr_list":["0.0.0.0/0"],
         "dest_cidr_list":["198.51.100.0/24"],"traffic_type":"Egress","guest_cidr":"10.1.1.0/24","default_egress_policy":false},
        {"id":43,"protocol":"all","source_cidr_list":["10.1.0.0/16"],"dest_cidr_list":["192.0.2.0/24"],
         "traffic_type":"Egress","guest_cidr":"10.1.1.0/24","default_egress_policy":false},
        {"id":44,"protocol":"all","source_cidr_list":[],"traffic_type":"Egress","default_egress_policy":false}"#);
    let sum = step(&mut s, &text).unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 41): egress rule 41 added (an accept exception to a default of deny)",
            "rule #2 (id 42): egress rule 42 added (an accept exception to a default of deny)",
            "rule #3 (id 43): egress rule 43 added (an accept exception to a default of deny)",
            "rule #4 (id 44): egress rule 44 added: the default rule (deny by default)",
            "rule #4 (id 44): egress default policy: allow -> deny (default rule 44)"
        ]
    );
    assert_eq!(sum.to_string(), "4 rules added, 1 egress default changed");
    let got = seen(&s);
    assert!(!got.egress_default_allow);
    assert_eq!(
        got.egress,
        [
            // 0.0.0.0/0 among the destinations is skipped, as the router's destination
            // ipset skips it: the rule is for the other destinations only.
            egr(
                41,
                svc(Proto::Udp, Some((53, 53)), None),
                &["10.1.1.0/24"],
                &["198.51.100.53/32"]
            ),
            egr(
                42,
                svc(Proto::Icmp, None, None),
                &["0.0.0.0/0"],
                &["198.51.100.0/24"]
            ),
            egr(
                43,
                svc(Proto::All, None, None),
                &["10.1.0.0/16"],
                &["192.0.2.0/24"]
            ),
        ]
    );
    // A rule for one guest only.
    let text = fw(
        r#"{"id":45,"protocol":"tcp","source_cidr_list":["10.1.1.10/32"],
        "traffic_type":"Egress","default_egress_policy":false}"#,
    );
    step(&mut s, &text).unwrap();
    assert_eq!(s.egress_rules().count(), 4);
    // Revoking by id, then the rule is gone.
    let text = fw(r#"{"id":43,"revoked":true,"traffic_type":"Egress"}"#);
    let sum = step(&mut s, &text).unwrap();
    assert_eq!(lines(&sum), ["rule #1 (id 43): egress rule 43 removed"]);
    assert!(s.egress_rules().all(|r| r.rule.id != 43));
}

/// The router's `cs_firewallrules.merge` reads `id` and `revoked` alone and deletes the id from
/// its databag (one for ingress and egress rules), so neither `traffic_type` nor any other
/// field of a revoke matters.
#[test]
fn a_revoke_needs_only_the_id() {
    let mut s = state_after(&[STATICNAT, FIREWALL, EGRESS]);
    let text = fw(
        r#"{"id":12,"revoked":true,"traffic_type":"Ingress","protocol":"gre","src_port_range":[0]}"#,
    );
    let sum = step(&mut s, &text).unwrap();
    assert_eq!(lines(&sum), ["rule #1 (id 12): ingress rule 12 removed"]);
    let text = fw(
        r#"{"id":13,"revoked":true},{"id":21,"revoked":true,"traffic_type":"Ingress"},
                     {"id":14,"revoked":true,"traffic_type":"Sideways"}"#,
    );
    let sum = step(&mut s, &text).unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 13): ingress rule 13 removed",
            "rule #2 (id 21): egress rule 21 removed",
            "rule #3 (id 14): ingress rule 14 removed",
        ]
    );
    let ids: Vec<u64> = s.ingress_rules().map(|r| r.rule.id).collect();
    assert_eq!(ids, [11]);
    assert_eq!(s.egress_rules().count(), 0);
    let text = r#"{"type":"staticnatrules","rules":[{"revoke":true,"source_ip_address":"203.0.113.100"}]}"#;
    let sum = step(&mut s, text).unwrap();
    assert_eq!(
        lines(&sum),
        ["rule #1: mapping removed: 203.0.113.100 -> 10.1.1.10; \
             its ingress rules [11] stay, inactive until it is mapped again"]
    );
}

/// The firewall databag is independent of the static NAT one: rules of an IP without static
/// NAT are kept (inactive), come into force with its static NAT, and outlive its revoke.
#[test]
fn firewall_rules_before_their_static_nat_take_effect_with_it() {
    let mut s = DesiredState::default();
    let sum = step(&mut s, FIREWALL).unwrap();
    assert_eq!(
        lines(&sum)[0],
        "rule #1 (id 11): ingress rule 11 added, inactive: 203.0.113.100 has no static NAT (yet)"
    );
    assert_eq!(sum.to_string(), "4 inactive rules added (no static NAT)");
    assert!(sum.changed());
    assert_eq!(s.ingress_rules().count(), 4);
    assert_eq!(s.active_ingress_rules().count(), 0);
    let sum = step(&mut s, STATICNAT).unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1: mapping added: 203.0.113.100 -> 10.1.1.10; \
             its ingress rules [11, 12, 13] are in force",
            "rule #2: mapping added: 203.0.113.101 -> 10.1.1.11; its ingress rules [14] are in force"
        ]
    );
    assert_eq!(s, state_after(&[STATICNAT, FIREWALL]));
    step(&mut s, STATICNAT_REVOKE).unwrap();
    let active: Vec<u64> = s.active_ingress_rules().map(|r| r.rule.id).collect();
    assert_eq!(active, [11, 12, 13]);
    // Granted again (as CloudStack does without resending the rules): in force again.
    step(&mut s, STATICNAT).unwrap();
    assert_eq!(s.active_ingress_rules().count(), 4);
}

/// As the router's databag merge: an entry for an IP mapped to another guest replaces the
/// mapping (its revoke never arrived), keeping the IP's rules.
#[test]
fn a_static_nat_entry_replaces_the_mapping_of_its_ip() {
    let mut s = state_after(&[STATICNAT, FIREWALL]);
    let text = r#"{"type":"staticnatrules","rules":[
        {"source_ip_address":"203.0.113.101","destination_ip_address":"10.1.1.21"}]}"#;
    let sum = step(&mut s, text).unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1: mapping replaced: 203.0.113.101 -> 10.1.1.21 (was -> 10.1.1.11); \
             its ingress rules [14] apply to 10.1.1.21"
        ]
    );
    assert_eq!(sum.to_string(), "1 mapping replaced");
    assert_eq!(
        s.mappings().collect::<Vec<_>>(),
        [
            map("203.0.113.100", "10.1.1.10"),
            map("203.0.113.101", "10.1.1.21")
        ]
    );
    assert_eq!(s.active_ingress_rules().count(), 4);
    // Re-pointing to a guest that another public IP maps stays a refusal (one-to-one).
    let text = r#"{"type":"staticnatrules","rules":[
        {"source_ip_address":"203.0.113.101","destination_ip_address":"10.1.1.10"}]}"#;
    let e = refused(&s, text);
    assert!(
        e.contains("destination_ip_address") && e.contains("203.0.113.100 -> 10.1.1.10"),
        "{e}"
    );
}

/// A guest moved to another public IP in one payload, its new static NAT before the revoke of
/// its old one, ends mapped by the new IP as on the router (which merges entry by entry and
/// configures the result); natd's mappings stay one-to-one at each step.
#[test]
fn a_guest_moves_to_another_public_ip_within_one_payload() {
    let mut s = state_after(&[STATICNAT, FIREWALL]);
    let text = r#"{"type":"staticnatrules","rules":[
        {"source_ip_address":"203.0.113.102","destination_ip_address":"10.1.1.10"},
        {"source_ip_address":"203.0.113.100","destination_ip_address":"10.1.1.10","revoke":true}]}"#;
    let sum = step(&mut s, text).unwrap();
    let got = lines(&sum);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got.iter()
            .any(|l| l.starts_with("rule #2: mapping removed: 203.0.113.100 -> 10.1.1.10")),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|l| l.starts_with("rule #1: mapping added: 203.0.113.102 -> 10.1.1.10")),
        "{got:?}"
    );
    assert_eq!(
        s.mappings().collect::<Vec<_>>(),
        [
            map("203.0.113.101", "10.1.1.11"),
            map("203.0.113.102", "10.1.1.10")
        ]
    );
    // Without the revoke, or with the old IP named again before it, the guest would be
    // mapped twice: refused, nothing changed.
    let s = state_after(&[STATICNAT, FIREWALL]);
    for text in [
        r#"{"type":"staticnatrules","rules":[
            {"source_ip_address":"203.0.113.102","destination_ip_address":"10.1.1.10"}]}"#,
        r#"{"type":"staticnatrules","rules":[
            {"source_ip_address":"203.0.113.102","destination_ip_address":"10.1.1.10"},
            {"source_ip_address":"203.0.113.100","destination_ip_address":"10.1.1.10"},
            {"source_ip_address":"203.0.113.100","revoke":true}]}"#,
    ] {
        let e = refused(&s, text);
        assert!(
            e.contains("rule #1") && e.contains("203.0.113.100 -> 10.1.1.10"),
            "{e}"
        );
    }
}

/// `source_cidr_list` of an egress rule limits it to those guests (the router's source ipset),
/// down to one VM's /32.
#[test]
fn egress_rules_per_vm_keep_their_sources() {
    let mut s = state_after(&[STATICNAT]);
    let sum = step(&mut s, EGRESS_PER_VM).unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 41): egress rule 41 added (an accept exception to a default of deny)",
            "rule #2 (id 42): egress rule 42 added: the default rule (deny by default)",
            "rule #2 (id 42): egress default policy: allow -> deny (default rule 42)"
        ]
    );
    let got = seen(&s);
    assert!(!got.egress_default_allow);
    assert_eq!(
        got.egress,
        [egr(
            41,
            svc(Proto::Udp, Some((123, 123)), None),
            &["10.1.1.25/32", "10.1.1.26/32"],
            &["0.0.0.0/0"]
        )]
    );
    let again = step(&mut s, EGRESS_PER_VM).unwrap();
    assert!(!again.changed(), "{again}");
}

/// natd's own ids (natctl, config file) are above CloudStack's: a payload cannot name one, and
/// a rule natctl added before a payload never takes the payload's id.
#[test]
fn natd_ids_and_cloudstack_ids_never_meet() {
    let mut s = state_after(&[STATICNAT]);
    let tcp = svc(Proto::Tcp, Some((80, 80)), None);
    let mine = s
        .add_ingress(None, ip("203.0.113.100"), tcp, vec![])
        .unwrap();
    assert_eq!(mine, crate::state::LOCAL_RULE_IDS + 1);
    // CloudStack's rules 11..14 all arrive, none is taken for natctl's.
    let sum = step(&mut s, FIREWALL).unwrap();
    assert_eq!(sum.to_string(), "4 rules added");
    let next = s
        .add_egress(None, svc(Proto::Udp, None, None), vec![])
        .unwrap();
    assert_eq!(next, mine + 1);
    let text = fw(&format!(
        r#"{{"id":{mine},"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"udp"}}"#
    ));
    let e = refused(&s, &text);
    assert!(
        e.starts_with(&format!(
            "rule #1 (id {mine}): id: {mine} is in the range natd gives"
        )),
        "{e}"
    );
}

#[test]
fn rules_apply_in_order_within_a_payload() {
    let mut s = DesiredState::default();
    let text = r#"{"type":"staticnatrules","rules":[
        {"source_ip_address":"203.0.113.100","destination_ip_address":"10.1.1.10"},
        {"revoke":true,"source_ip_address":"203.0.113.100"},
        {"source_ip_address":"203.0.113.100","destination_ip_address":"10.1.1.20"}]}"#;
    step(&mut s, text).unwrap();
    assert_eq!(
        s.mappings().collect::<Vec<_>>(),
        [map("203.0.113.100", "10.1.1.20")]
    );
    // A rule id seen twice: the second is kept.
    let text = fw(
        r#"{"id":11,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp","source_cidr_list":["0.0.0.0/0"]},
                     {"id":11,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"udp","source_cidr_list":["0.0.0.0/0"]}"#,
    );
    let sum = step(&mut s, &text).unwrap();
    assert_eq!(
        lines(&sum)[1],
        "rule #2 (id 11): ingress rule 11 already present, kept as it is \
         (the payload's fields differ from it)"
    );
    assert_eq!(
        s.ingress_rules()
            .map(|r| r.rule.service.proto)
            .collect::<Vec<_>>(),
        [Proto::Tcp]
    );
}

#[test]
fn payload_serialises_back_to_the_same_shape() {
    for text in [
        STATICNAT,
        FIREWALL,
        EGRESS,
        FIREWALL_REVOKE,
        STATICNAT_REVOKE,
    ] {
        let p = parse(text).unwrap();
        let back = serde_json::to_string(&p).unwrap();
        assert_eq!(parse(&back).unwrap(), p);
        assert_eq!(p.type_name(), &text[9..9 + p.type_name().len()]);
    }
    assert_eq!(parse(FIREWALL).unwrap().len(), 4);
}

/// A re-sent id is kept as the router keeps it: its databag entry is not replaced and the new
/// fields are never read, so the re-sent rule may say anything (even a malformed value, or the
/// other traffic type) without the payload failing.
#[test]
fn a_re_sent_id_is_kept_whatever_its_fields_say() {
    let mut s = state_after(&[STATICNAT, FIREWALL, EGRESS]);
    let before = s.clone();
    let text = fw(
        r#"{"id":11,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"gre",
                      "src_port_range":[0,70000],"source_cidr_list":["bogus"]},
                     {"id":12,"revoked":false},
                     {"id":21,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp",
                      "source_cidr_list":["0.0.0.0/0"]},
                     {"id":13,"traffic_type":"Egress","protocol":"all"}"#,
    );
    let sum = step(&mut s, &text).unwrap();
    assert_eq!(s, before);
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 11): ingress rule 11 already present, kept as it is \
             (the payload's fields differ from it)",
            "rule #2 (id 12): ingress rule 12 already present, kept as it is \
             (the payload's fields differ from it)",
            "rule #3 (id 21): egress rule 21 already present, kept as it is \
             (the payload's fields differ from it)",
            "rule #4 (id 13): ingress rule 13 already present, kept as it is \
             (the payload's fields differ from it)",
        ]
    );
    assert!(!sum.changed());
}

/// configure.py writes one ACCEPT per `source_cidr_list` entry into FIREWALL_<ip> (which ends
/// in DROP): an ingress rule with an empty list opens nothing on the router, so natd must not
/// open the port to everyone.
#[test]
fn an_ingress_rule_with_an_empty_source_cidr_list_allows_nothing() {
    let mut s = state_after(&[STATICNAT]);
    let text = fw(
        r#"{"id":31,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp",
                      "src_port_range":[80,80],"source_cidr_list":[],"revoked":false}"#,
    );
    let sum = step(&mut s, &text).unwrap();
    assert_eq!(s.ingress_rules().count(), 0);
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 31): ingress rule 31 to 203.0.113.100 has an empty source_cidr_list and \
          allows nothing (as on the router); not installed"
        ]
    );
    assert_eq!(
        sum.to_string(),
        "1 rule allowing nothing (empty source_cidr_list)"
    );
    assert!(!sum.changed());
    // Egress: an empty source_cidr_list is every guest (no source ipset match on the router).
    let text = fw(
        r#"{"id":32,"traffic_type":"Egress","protocol":"tcp","src_port_range":[25,25],
                      "source_cidr_list":[],"default_egress_policy":true}"#,
    );
    step(&mut s, &text).unwrap();
    let r = &s.egress_rules().next().unwrap().rule;
    assert_eq!(r.sources, cidrs(&["0.0.0.0/0"]));
}

/// configure.py skips each `0.0.0.0/0` of `dest_cidr_list` and puts the other entries in the
/// rule's destination ipset, so a list holding both restricts the rule to the others.
#[test]
fn an_egress_destination_of_0_0_0_0_slash_0_is_skipped_not_anywhere() {
    let mut s = DesiredState::default();
    let text = fw(
        r#"{"id":51,"traffic_type":"Egress","protocol":"tcp","src_port_range":[25,25],
                      "source_cidr_list":["10.1.1.0/24"],"dest_cidr_list":["0.0.0.0/0","192.0.2.0/24"],
                      "default_egress_policy":true},
                     {"id":52,"traffic_type":"Egress","protocol":"udp","src_port_range":[53,53],
                      "source_cidr_list":["10.1.1.0/24"],"dest_cidr_list":["0.0.0.0/0"],
                      "default_egress_policy":true}"#,
    );
    step(&mut s, &text).unwrap();
    let dests: Vec<Vec<Cidr>> = s.egress_rules().map(|r| r.rule.cidrs.clone()).collect();
    assert_eq!(
        dests,
        [cidrs(&["192.0.2.0/24"]), cidrs(&["0.0.0.0/0"])],
        "rule 51 to 192.0.2.0/24 only, rule 52 anywhere"
    );
}

/// The egress exceptions in force (what natd compiles into the fast path and its nftables
/// table).
fn in_force(s: &DesiredState) -> Vec<u64> {
    s.active_egress_rules().map(|r| r.rule.id).collect()
}

/// configure.py appends the default egress rule (ACCEPT under allow) to the router's chain:
/// revoked, the chain ends without it and the FORWARD policy drops. Rule 21, a DROP exception
/// added under allow, then changes nothing (everything is dropped), and acts again once a
/// default rule says allow.
#[test]
fn revoking_the_default_egress_rule_denies_egress() {
    let mut s = state_after(&[STATICNAT, FIREWALL, EGRESS]);
    assert!(s.egress_default_allow());
    assert_eq!(in_force(&s), [21]);
    let before_compiled = crate::tables::Tables::of(&s);

    let sum = step(&mut s, &fw(r#"{"id":22,"revoked":true}"#)).unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 22): egress rule 22 removed",
            "rule #1 (id 22): egress default policy: allow -> deny (no default egress rule: \
             the router's chain ends in its FORWARD policy, drop); egress rules [21] not in \
             force (exceptions to a default of allow)"
        ]
    );
    assert!(!s.egress_default_allow());
    assert!(in_force(&s).is_empty());
    // Held all the same (the router's databag keeps it), and compiled nowhere.
    assert_eq!(s.egress_rules().count(), 1);
    let compiled = crate::tables::Tables::of(&s);
    assert!(compiled.egress_default_deny);
    assert_eq!(
        compiled,
        crate::tables::Tables::of(&state_without_egress(&s))
    );

    // CloudStack's own default rule (built in memory by the management server, id 0).
    let sum = step(
        &mut s,
        &fw(r#"{"id":0,"protocol":"all","source_cidr_list":[],"traffic_type":"Egress","default_egress_policy":true}"#),
    )
    .unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 0): egress rule 0 added: the default rule (allow by default)",
            "rule #1 (id 0): egress default policy: deny -> allow (default rule 0)"
        ]
    );
    assert_eq!(in_force(&s), [21]);
    assert_eq!(crate::tables::Tables::of(&s), before_compiled);
}

/// `s` without its egress exception rules.
fn state_without_egress(s: &DesiredState) -> DesiredState {
    let mut t = s.clone();
    let ids: Vec<u64> = t.egress_rules().map(|r| r.rule.id).collect();
    for id in ids {
        t.remove_egress(id).unwrap();
    }
    t
}

/// The router never reads a known id again (`cs_firewallrules.merge`), its
/// `default_egress_policy` included: re-sent under the other policy, the rules keep acting
/// as they were added.
#[test]
fn a_re_sent_egress_rule_keeps_the_policy_it_came_with() {
    let mut s = state_after(&[STATICNAT, FIREWALL, EGRESS]);
    let flipped = EGRESS.replace(
        "\"default_egress_policy\":true",
        "\"default_egress_policy\":false",
    );
    assert_ne!(flipped, EGRESS);
    let sum = step(&mut s, &flipped).unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 21): egress rule 21 already present, kept as it is (the payload's \
             fields differ from it)",
            "rule #2 (id 22): egress rule 22 already present, kept as it is (the payload's \
             fields differ from it)"
        ]
    );
    assert!(s.egress_default_allow());
    assert_eq!(in_force(&s), [21]);
}

/// Without a default egress rule the router's chain ends in the FORWARD policy's DROP: an
/// exception added under allow (a DROP) leaves everything denied; one added under deny (an
/// ACCEPT) is in force. Rules under both policies may come in one payload (the router reads
/// each rule's own), and the default rule decides which ones act.
#[test]
fn egress_rules_act_by_the_default_rules_held() {
    let mut s = state_after(&[STATICNAT]);
    assert!(
        s.egress_default_allow(),
        "natd's own default before CloudStack speaks"
    );
    let sum = step(
        &mut s,
        &fw(r#"{"id":23,"traffic_type":"Egress","protocol":"udp","src_port_range":[53,53],"default_egress_policy":true},
               {"id":24,"traffic_type":"Egress","protocol":"tcp","src_port_range":[443,443],"default_egress_policy":false}"#),
    )
    .unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 23): egress rule 23 added (a drop exception to a default of allow)",
            "rule #2 (id 24): egress rule 24 added (an accept exception to a default of deny)",
            "rule #2 (id 24): egress default policy: allow -> deny (no default egress rule: \
             the router's chain ends in its FORWARD policy, drop); egress rules [23] not in \
             force (exceptions to a default of allow)"
        ]
    );
    assert_eq!(in_force(&s), [24]);

    step(
        &mut s,
        &fw(r#"{"id":25,"protocol":"all","source_cidr_list":[],"traffic_type":"Egress","default_egress_policy":true}"#),
    )
    .unwrap();
    assert!(s.egress_default_allow());
    assert_eq!(in_force(&s), [23]);

    // Two default rules that disagree: the router's chain meets the first it appended; natd
    // takes the stricter.
    step(
        &mut s,
        &fw(r#"{"id":26,"protocol":"all","source_cidr_list":[],"traffic_type":"Egress","default_egress_policy":false}"#),
    )
    .unwrap();
    assert!(!s.egress_default_allow());
    assert_eq!(in_force(&s), [24]);
    step(&mut s, &fw(r#"{"id":26,"revoked":true}"#)).unwrap();
    assert!(s.egress_default_allow());
    assert_eq!(in_force(&s), [23]);
}

/// The router installs a rule per id (each with its own ipsets), so a rule saying what
/// another says is no error, and revoking one leaves the other in force.
#[test]
fn an_egress_rule_may_repeat_another_under_a_new_id() {
    let mut s = state_after(&[STATICNAT, FIREWALL, EGRESS]);
    let again = EGRESS.replace("\"id\":21", "\"id\":31");
    assert_ne!(again, EGRESS);
    let sum = step(&mut s, &again).unwrap();
    assert_eq!(
        lines(&sum)[0],
        "rule #1 (id 31): egress rule 31 added (a drop exception to a default of allow)"
    );
    assert_eq!(in_force(&s), [21, 31]);
    step(&mut s, &fw(r#"{"id":21,"revoked":true}"#)).unwrap();
    assert_eq!(in_force(&s), [31]);
    let rule = &s.egress_rules().next().unwrap().rule;
    assert_eq!(
        (rule.service.proto, rule.sources.clone()),
        (Proto::Tcp, cidrs(&["10.1.1.0/24"]))
    );
}

/// configure.py builds `-p all -m all` for each source CIDR of an ingress rule with protocol
/// `all` (nothing for an empty list); iptables refuses it and configure.py only logs it, so
/// FIREWALL_<ip> still ends in DROP: the rule opens nothing and the payload's other rules
/// apply. natd accepts it and installs nothing for it.
#[test]
fn an_ingress_rule_for_all_protocols_allows_nothing_and_the_rest_applies() {
    let mut s = state_after(&[STATICNAT]);
    let text = fw(
        r#"{"id":31,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"all",
                      "source_cidr_list":["198.51.100.0/24"],"revoked":false},
                     {"id":32,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"ALL",
                      "source_cidr_list":[]},
                     {"id":33,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp",
                      "src_port_range":[80,80],"source_cidr_list":["0.0.0.0/0"]}"#,
    );
    let sum = step(&mut s, &text).unwrap();
    let ids: Vec<u64> = s.ingress_rules().map(|r| r.rule.id).collect();
    assert_eq!(ids, [33]);
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 31): ingress rule 31 to 203.0.113.100 has protocol all, which allows \
             nothing in an ingress rule (as on the router); not installed",
            "rule #2 (id 32): ingress rule 32 to 203.0.113.100 has protocol all, which allows \
             nothing in an ingress rule (as on the router); not installed",
            "rule #3 (id 33): ingress rule 33 added",
        ]
    );
    assert_eq!(
        sum.to_string(),
        "1 rule added, 2 rules allowing nothing (ingress protocol all)"
    );
    // As for an empty source_cidr_list, natd does not hold the id (see `apply::ingress`): a
    // later revoke finds nothing to remove, and a re-send allows nothing again.
    let before = s.clone();
    let sum = step(&mut s, &text).unwrap();
    assert_eq!(s, before);
    assert!(!sum.changed());
    let sum = step(&mut s, &fw(r#"{"id":31,"revoked":true}"#)).unwrap();
    assert_eq!(
        lines(&sum),
        ["rule #1 (id 31): revoke: no rule 31, nothing to do"]
    );
    assert_eq!(s, before);
    // Its other fields are still read: a malformed one refuses the payload.
    let e = refused(
        &s,
        &fw(
            r#"{"id":34,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"all",
                 "source_cidr_list":["198.51.100.0/33"]}"#,
        ),
    );
    assert!(
        e.starts_with("rule #1 (id 34): source_cidr_list[0]: "),
        "{e}"
    );
    // Egress `all` still means every protocol.
    let text = fw(
        r#"{"id":35,"traffic_type":"Egress","protocol":"all","source_cidr_list":["10.1.1.0/24"],
                      "default_egress_policy":false}"#,
    );
    step(&mut s, &text).unwrap();
    let r = &s.egress_rules().next().unwrap().rule;
    assert_eq!((r.id, r.service.proto), (35, Proto::All));
}

/// configure.py generates the same iptables rule for two ingress rules that say the same under
/// two ids; `CsNetfilter.compare` keeps one copy, and revoking one id keeps it, as the other id
/// still generates it. natd keeps both ids (each with a slot of its own) and the traffic
/// allowed until both are revoked.
#[test]
fn a_duplicate_ingress_rule_under_a_new_id_is_kept_until_both_are_revoked() {
    let mut s = state_after(&[STATICNAT, FIREWALL]);
    // Rule 12: udp 5000-5100 to 203.0.113.100 from 0.0.0.0/0; 41 says the same (the list in
    // another order and spelling), 42 the same to 203.0.113.99, which has no static NAT.
    let text = fw(
        r#"{"id":41,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"udp",
                      "src_port_range":[5000,5100],"source_cidr_list":["0.0.0.0/0","0.0.0.0/0"]},
                     {"id":42,"traffic_type":"Ingress","src_ip":"203.0.113.99","protocol":"udp",
                      "src_port_range":[5000,5100],"source_cidr_list":["0.0.0.0/0"]},
                     {"id":43,"traffic_type":"Ingress","src_ip":"203.0.113.99","protocol":"udp",
                      "src_port_range":[5000,5100],"source_cidr_list":["0.0.0.0/0"]}"#,
    );
    let sum = step(&mut s, &text).unwrap();
    assert_eq!(
        lines(&sum),
        [
            "rule #1 (id 41): ingress rule 41 added; it allows what rule 12 allows, which stays \
             allowed until both are revoked (as on the router)",
            "rule #2 (id 42): ingress rule 42 added, inactive: 203.0.113.99 has no static NAT \
             (yet)",
            "rule #3 (id 43): ingress rule 43 added, inactive: 203.0.113.99 has no static NAT \
             (yet); it allows what rule 42 allows, which stays allowed until both are revoked \
             (as on the router)",
        ]
    );
    assert_eq!(
        sum.to_string(),
        "1 rule added, 2 inactive rules added (no static NAT)"
    );
    let udp = svc(Proto::Udp, Some((5000, 5100)), None);
    let rule = |id| ing(id, "203.0.113.100", udp.clone(), &["0.0.0.0/0"]);
    let of = |s: &DesiredState, id| {
        s.ingress_rules()
            .find(|r| r.rule.id == id)
            .map(|r| (r.slot, r.rule.clone()))
    };
    let (slot12, r12) = of(&s, 12).unwrap();
    let (slot41, r41) = of(&s, 41).unwrap();
    assert_eq!((r12, r41), (rule(12), rule(41)));
    assert_ne!(slot12, slot41, "each rule has its own slot");
    // Persisted and restored as they are.
    let snap = crate::persist::Snapshot::of(&s, 1, 0);
    assert_eq!(snap.state().unwrap(), s);
    // Re-sent: both kept. natctl still refuses a third (an operator's duplicate is a mistake).
    let before = s.clone();
    assert!(!step(&mut s, &text).unwrap().changed());
    assert_eq!(s, before);
    let e = s
        .clone()
        .add_ingress(
            None,
            ip("203.0.113.100"),
            udp.clone(),
            cidrs(&["0.0.0.0/0"]),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            crate::state::StateError::DuplicateRule { existing: 12, .. }
        ),
        "{e}"
    );
    // Revoking 12 keeps 41: the fast path still has an entry for the traffic.
    let tables = |s: &DesiredState| {
        let mut keys: Vec<_> = crate::tables::Tables::of(s).entries.into_keys().collect();
        keys.sort_by_key(|e| format!("{e:?}"));
        keys
    };
    let all = tables(&s);
    step(&mut s, &fw(r#"{"id":12,"revoked":true}"#)).unwrap();
    assert_eq!(of(&s, 41), Some((slot41, rule(41))));
    assert_eq!(
        s.active_ingress_rules()
            .filter(|r| r.rule.service == udp)
            .count(),
        1
    );
    assert_eq!(tables(&s), all, "every entry stays, with rule 41's bit");
    // Revoking 41 too closes it.
    step(&mut s, &fw(r#"{"id":41,"revoked":true}"#)).unwrap();
    assert!(s.active_ingress_rules().all(|r| r.rule.service != udp));
    assert_ne!(tables(&s), all);
}
