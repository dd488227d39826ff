//! Random sequences of well-formed payloads: whatever is accepted or refused, the state stays
//! one-to-one, gives each public IP's rules distinct slots (identical rules under two ids too),
//! keeps ingress and egress ids apart, and ends up with each rule's last word in the payload.
use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::state::DesiredState;

fn public(i: u8) -> String {
    format!("203.0.113.{i}")
}

fn private(i: u8) -> String {
    format!("10.0.0.{i}")
}

fn static_nat_rule() -> impl Strategy<Value = StaticNatRule> {
    (prop::bool::weighted(0.3), 1u8..=4, 1u8..=4).prop_map(|(revoke, p, v)| StaticNatRule {
        revoke: Some(revoke),
        source_ip_address: Some(public(p)),
        destination_ip_address: Some(private(v)),
    })
}

fn cidr() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "0.0.0.0/0",
        "198.51.100.0/24",
        "198.51.100.0/25",
        "192.0.2.7/32",
        "10.1.1.0/24",
    ])
    .prop_map(str::to_string)
}

fn firewall_rule(default_allow: bool) -> impl Strategy<Value = FirewallRule> {
    (
        1u64..=8,
        prop::bool::ANY,
        prop::bool::weighted(0.25),
        prop::sample::select(vec!["tcp", "udp", "icmp", "all"]),
        prop::option::of((1i64..100, 0i64..10)),
        prop::option::of((-1i64..4, -1i64..2)),
        1u8..=4,
        prop::collection::vec(cidr(), 0..3),
        prop::collection::vec(cidr(), 0..3),
    )
        .prop_map(
            move |(id, ingress, revoked, proto, ports, icmp, ip, sources, dests)| {
                // An ingress rule saying `all` allows nothing; egress `all` is every protocol.
                let src_ip = if ingress { public(ip) } else { String::new() };
                let icmp_type = icmp.map(|(t, _)| t);
                FirewallRule {
                    id: Some(id),
                    traffic_type: Some(if ingress { "Ingress" } else { "Egress" }.to_string()),
                    revoked: Some(revoked),
                    src_ip: Some(src_ip),
                    protocol: Some(proto.to_string()),
                    src_port_range: ports.map(|(a, n)| vec![a, a + n]),
                    icmp_type,
                    icmp_code: icmp.and_then(|(t, c)| (t >= 0).then_some(c)),
                    source_cidr_list: Some(sources),
                    dest_cidr_list: Some(dests),
                    default_egress_policy: Some(default_allow),
                }
            },
        )
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        prop::collection::vec(static_nat_rule(), 1..4)
            .prop_map(|rules| Payload::StaticNat { rules }),
        prop::bool::ANY
            .prop_flat_map(|allow| prop::collection::vec(firewall_rule(allow), 1..5))
            .prop_map(|rules| Payload::Firewall { rules }),
    ]
}

fn check_invariants(s: &DesiredState) -> Result<(), TestCaseError> {
    let publics: BTreeSet<_> = s.mappings().map(|m| m.public).collect();
    let privates: BTreeSet<_> = s.mappings().map(|m| m.private).collect();
    prop_assert_eq!(publics.len(), s.len());
    prop_assert_eq!(privates.len(), s.len(), "a private IP is mapped twice");
    prop_assert!(
        publics.is_disjoint(&privates),
        "an IP is public and private"
    );
    let mut slots = BTreeSet::new();
    for r in s.ingress_rules() {
        prop_assert!(
            slots.insert((r.rule.public, r.slot)),
            "ingress rule {} shares slot {} of {}",
            r.rule.id,
            r.slot,
            r.rule.public
        );
        prop_assert_eq!(s.is_active(&r.rule), publics.contains(&r.rule.public));
    }
    let ingress: BTreeSet<_> = s.ingress_rules().map(|r| r.rule.id).collect();
    let egress: BTreeSet<_> = s.egress_rules().map(|r| r.rule.id).collect();
    let defaults: BTreeSet<_> = s.egress_defaults().keys().copied().collect();
    prop_assert!(
        ingress.is_disjoint(&egress),
        "an id is both ingress and egress"
    );
    prop_assert!(
        defaults.is_disjoint(&ingress) && defaults.is_disjoint(&egress),
        "a default egress rule's id is another rule's"
    );
    prop_assert!(
        s.egress_under().keys().all(|id| egress.contains(id)),
        "the policy of an egress rule natd does not hold"
    );
    // The router's chain: allow by default only if every default rule held says allow.
    if !defaults.is_empty() {
        prop_assert_eq!(
            s.egress_default_allow(),
            s.egress_defaults().values().all(|&a| a)
        );
    }
    Ok(())
}

/// Everything of a state but the rules' slots (which a revoke and re-add may move).
fn rules_of(s: &DesiredState) -> impl PartialEq + std::fmt::Debug {
    (
        s.mappings().collect::<Vec<_>>(),
        s.ingress_rules()
            .map(|r| r.rule.clone())
            .collect::<Vec<_>>(),
        s.egress_default_allow(),
        s.egress_rules().map(|r| r.rule.clone()).collect::<Vec<_>>(),
        s.egress_under().clone(),
        s.egress_defaults().clone(),
    )
}

/// After an accepted payload each public IP / rule id ends as the payload's last rule for it
/// says.
fn check_last_word(p: &Payload, s: &DesiredState) -> Result<(), TestCaseError> {
    match p {
        Payload::StaticNat { rules } => {
            let mut last = BTreeMap::new();
            for r in rules {
                last.insert(r.source_ip_address.clone(), r);
            }
            for r in last.values() {
                let public = r
                    .source_ip_address
                    .as_deref()
                    .unwrap_or_default()
                    .parse()
                    .unwrap();
                let want = if r.revoke == Some(true) {
                    None
                } else {
                    r.destination_ip_address
                        .as_deref()
                        .map(|d| d.parse().unwrap())
                };
                prop_assert_eq!(s.private_of(public), want);
            }
        }
        Payload::Firewall { rules } => {
            let mut last = BTreeMap::new();
            for r in rules {
                last.insert(r.id, r);
            }
            for (id, r) in last {
                let id = id.unwrap_or_default();
                let ingress = s.ingress_rules().any(|x| x.rule.id == id);
                let egress = s.egress_rules().any(|x| x.rule.id == id)
                    || s.egress_defaults().contains_key(&id);
                let default_rule = r.protocol.as_deref() == Some("all")
                    && r.source_cidr_list.as_ref().is_none_or(Vec::is_empty);
                if r.revoked == Some(true) {
                    prop_assert!(!ingress && !egress, "revoked id {} still there", id);
                } else if r.traffic_type.as_deref() == Some("Ingress") {
                    // Kept whether or not its IP has static NAT (inactive without), and beside
                    // an identical rule of another id; a known id (of either kind) stays as it
                    // is, whatever the payload says; an empty source_cidr_list or protocol
                    // `all` allows nothing and installs nothing.
                    let nothing = r.source_cidr_list.as_ref().is_some_and(Vec::is_empty)
                        || r.protocol.as_deref() == Some("all");
                    prop_assert!(ingress || egress || nothing, "ingress id {} missing", id);
                } else if !default_rule {
                    prop_assert!(egress || ingress, "egress id {} missing", id);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn random_payload_sequences_keep_the_state_consistent(
        payloads in prop::collection::vec(payload(), 1..12),
    ) {
        let mut state = DesiredState::default();
        for p in &payloads {
            // Through JSON, as natd receives it.
            let text = serde_json::to_string(p).unwrap();
            let parsed = parse(&text).unwrap();
            prop_assert_eq!(&parsed, p);
            let mut new = state.clone();
            match apply(&parsed, &mut new) {
                Ok(_) => {
                    check_invariants(&new)?;
                    check_last_word(p, &new)?;
                    // Re-applying an accepted payload, if accepted again, changes nothing
                    // but perhaps the slots of rules it revokes and adds again.
                    let mut again = new.clone();
                    if apply(&parsed, &mut again).is_ok() {
                        prop_assert_eq!(rules_of(&again), rules_of(&new));
                    }
                    state = new;
                }
                Err(e) => {
                    prop_assert!(matches!(e, CloudStackError::Rule { .. }), "{}", e);
                    prop_assert!(e.to_string().starts_with("rule #"), "{}", e);
                }
            }
            check_invariants(&state)?;
        }
    }
}
