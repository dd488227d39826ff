//! Rendering tests of the kernel-path parts of natd's table: the fast path's mark, the drop of
//! what the public side addresses to a private address, the routing marks, the ingress rules
//! judged before routing, and each public IP taken only on its own public interface.
use nat_common::marks::{FASTPATH_MARK, route_mark};

use super::*;
use crate::policy_routing::SourceRule;

/// A plan that routes the mappings of `state` in 203.0.113.0/25 by table 101 (priority 100)
/// and those in 203.0.113.128/25 by table 1102 (priority 200).
pub fn plan(state: &DesiredState) -> RoutePlan {
    RoutePlan::of(
        state.mappings(),
        &[
            SourceRule {
                priority: 200,
                source: "203.0.113.128/25".parse().unwrap(),
                table: 1102,
            },
            SourceRule {
                priority: 100,
                source: "203.0.113.0/25".parse().unwrap(),
                table: 101,
            },
        ],
        &[],
    )
}

fn two_networks() -> DesiredState {
    let mut s = DesiredState::default();
    for (p, v) in [
        ("203.0.113.10", "10.0.0.10"),
        ("203.0.113.11", "10.0.0.11"),
        ("203.0.113.200", "10.0.0.20"),
        ("198.51.100.7", "10.0.0.30"),
    ] {
        s.add_mapping(Mapping {
            public: p.parse().unwrap(),
            private: v.parse().unwrap(),
        })
        .unwrap();
    }
    s
}

/// The lines of chain `name` in `table` (without the chain's braces).
fn chain<'a>(table: &'a str, name: &str) -> Vec<&'a str> {
    let start = format!("\tchain {name} {{\n");
    let at = table
        .find(&start)
        .unwrap_or_else(|| panic!("no chain {name} in {table}"));
    table[at + start.len()..]
        .lines()
        .take_while(|l| *l != "\t}")
        .map(str::trim)
        .collect()
}

#[test]
fn what_the_fast_path_marked_is_accepted_before_any_rule() {
    let r = render(
        &["eth2".into()],
        &["eth0".into()],
        &two_networks(),
        &RoutePlan::default(),
        &Homes::new(),
        KernelTrackers::default(),
    );
    let forward = chain(&r, "forward");
    assert_eq!(
        forward[..2],
        [
            "type filter hook forward priority filter; policy accept;",
            "meta mark and 0x40000000 == 0x40000000 accept",
        ],
        "{r}"
    );
    assert_eq!(FASTPATH_MARK, 0x4000_0000);
}

#[test]
fn what_the_public_side_addresses_to_a_private_address_is_dropped_before_nat() {
    let r = render(
        &["eth2".into(), "eth3".into()],
        &["eth0".into()],
        &two_networks(),
        &RoutePlan::default(),
        &Homes::new(),
        KernelTrackers::default(),
    );
    assert_eq!(
        chain(&r, "route"),
        [
            "type filter hook prerouting priority -140; policy accept;",
            "iifname { \"eth2\", \"eth3\" } ip daddr @privates drop",
        ],
        "{r}"
    );
    // No routing marks without mirrored rules.
    assert!(!r.contains("route_in") && !r.contains("mark_1"), "{r}");
}

#[test]
fn plans_group_mappings_by_the_first_rule_that_holds_their_public_ip() {
    let p = plan(&two_networks());
    let groups: Vec<_> = p
        .groups
        .iter()
        .map(|g| {
            (
                g.rule.priority,
                g.rule.table,
                g.rule.mark,
                g.mappings
                    .iter()
                    .map(|m| m.private.to_string())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            (
                100,
                101,
                route_mark(1),
                vec!["10.0.0.10".to_string(), "10.0.0.11".to_string()]
            ),
            (200, 1102, route_mark(2), vec!["10.0.0.20".to_string()]),
        ]
    );
    // 198.51.100.7 is in no rule's prefix: routed as before, and not "unmarked".
    assert!(p.unmarked.is_empty());
}

#[test]
fn renders_routing_marks_for_new_connections_and_guest_side_packets() {
    let s = two_networks();
    let r = render(
        &["eth2".into()],
        &["eth0".into()],
        &s,
        &plan(&s),
        &Homes::new(),
        KernelTrackers::default(),
    );
    assert_eq!(
        chain(&r, "route"),
        [
            "type filter hook prerouting priority -140; policy accept;",
            "iifname { \"eth2\" } ip daddr @privates drop",
            "ct state new iifname { \"eth2\" } ip daddr vmap @route_in",
            "ct state new iifname { \"eth0\" } ip daddr != @publics ip saddr vmap @route_out",
            "iifname { \"eth0\" } ct mark and 0x3f000000 vmap { 0x1000000 : jump mark_1, \
             0x2000000 : jump mark_2 }",
            "meta l4proto udplite ct state untracked iifname { \"eth0\" } ip daddr != @publics \
             ip saddr vmap @mark_out",
        ],
        "{r}"
    );
    assert_eq!(
        chain(&r, "route_2"),
        ["ct mark set ct mark and 0xc0ffffff or 0x2000000"]
    );
    assert_eq!(
        chain(&r, "mark_1"),
        ["meta mark set meta mark and 0xc0ffffff or 0x1000000"]
    );
    assert!(
        r.contains(
            "\tmap route_in { type ipv4_addr : verdict; elements = { 203.0.113.10 : jump \
             route_1, 203.0.113.11 : jump route_1, 203.0.113.200 : jump route_2 } }\n"
        ),
        "{r}"
    );
    assert!(
        r.contains(
            "\tmap route_out { type ipv4_addr : verdict; elements = { 10.0.0.10 : jump \
             route_1, 10.0.0.11 : jump route_1, 10.0.0.20 : jump route_2 } }\n"
        ),
        "{r}"
    );
    // UDP-Lite translated statelessly has no connection: marked by its private source.
    assert!(
        r.contains(
            "\tmap mark_out { type ipv4_addr : verdict; elements = { 10.0.0.10 : jump \
             mark_1, 10.0.0.11 : jump mark_1, 10.0.0.20 : jump mark_2 } }\n"
        ),
        "{r}"
    );
    // The chains and maps the route chain refers to come before it.
    let route = r.find("\tchain route {").unwrap();
    assert!(r.find("\tchain mark_2 {").unwrap() < route, "{r}");
    assert!(r.find("\tmap route_out {").unwrap() < route, "{r}");
}

#[test]
fn ingress_rules_judge_before_the_kernel_routes_and_a_public_ip_is_taken_only_at_home() {
    let homes = Homes::from([
        ("203.0.113.10".parse().unwrap(), "eth2".to_string()),
        ("203.0.113.11".parse().unwrap(), "eth3".to_string()),
    ]);
    let r = render(
        &["eth2".into(), "eth3".into()],
        &["eth0".into()],
        &two_networks(),
        &RoutePlan::default(),
        &homes,
        KernelTrackers::default(),
    );
    assert_eq!(
        chain(&r, "judge"),
        [
            "type filter hook prerouting priority -90; policy accept;",
            "meta mark and 0x40000000 == 0x40000000 accept",
            "iifname { \"eth2\", \"eth3\" } ct original ip daddr @publics jump ingress",
            "iifname { \"eth0\" } ct original ip daddr @publics jump ingress",
        ],
        "{r}"
    );
    assert!(
        !chain(&r, "forward").iter().any(|l| l.contains("ingress")),
        "{r}"
    );
    assert_eq!(
        chain(&r, "route")[2..],
        [
            "ct state new iifname { \"eth2\", \"eth3\" } ip daddr @homed ip daddr . iifname != @homes \
          drop"
        ],
        "{r}"
    );
    assert!(
        r.contains(
            "\tset homes { type ipv4_addr . ifname; elements = { 203.0.113.10 . \"eth2\", \
             203.0.113.11 . \"eth3\" }; }\n"
        ),
        "{r}"
    );
    assert!(
        r.contains("\tset homed { type ipv4_addr; elements = { 203.0.113.10, 203.0.113.11 }; }\n"),
        "{r}"
    );
}
