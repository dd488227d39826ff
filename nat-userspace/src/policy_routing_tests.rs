//! Which kernel rules natd mirrors or owns, and the plan it makes of them (no socket needed).
use std::net::IpAddr;

use super::*;

/// `from SOURCE/LEN lookup TABLE priority PRIORITY` as the kernel dumps it.
fn from_rule(source: &str, len: u8, table: u32, priority: u32) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.action = RuleAction::ToTable;
    m.header.src_len = len;
    m.header.table = if table > 255 { 0 } else { table as u8 };
    m.attributes.extend([
        RuleAttribute::Source(IpAddr::V4(source.parse().unwrap())),
        RuleAttribute::Priority(priority),
        RuleAttribute::Table(table),
        RuleAttribute::Protocol(RouteProtocol::Boot),
    ]);
    m
}

fn mapping(public: &str, private: &str) -> Mapping {
    Mapping {
        public: public.parse().unwrap(),
        private: private.parse().unwrap(),
    }
}

#[test]
fn a_source_only_rule_is_mirrored() {
    assert_eq!(
        source_rule(&from_rule("203.0.113.20", 32, 102, 32765)),
        Some(SourceRule {
            priority: 32765,
            source: "203.0.113.20/32".parse().unwrap(),
            table: 102,
        })
    );
    // CloudStack's `from NETWORK lookup Table_eth3`, table 103 named in rt_tables.
    let mut cs = from_rule("192.0.2.0", 24, 103, 32764);
    cs.attributes
        .retain(|a| !matches!(a, RuleAttribute::Table(_)));
    assert_eq!(
        source_rule(&cs).map(|r| (r.source.to_string(), r.table)),
        Some(("192.0.2.0/24".to_string(), 103))
    );
}

#[test]
fn rules_with_other_selectors_or_actions_are_not_mirrored() {
    let base = || from_rule("203.0.113.0", 24, 101, 100);
    let mut with_iif = base();
    with_iif
        .attributes
        .push(RuleAttribute::Iifname("pub0".into()));
    let mut with_mark = base();
    with_mark.attributes.push(RuleAttribute::FwMark(0x66));
    let mut to_dst = base();
    to_dst.header.dst_len = 8;
    let mut not_from = base();
    not_from.header.flags = RuleFlags::Invert;
    let mut blackhole = base();
    blackhole.header.action = RuleAction::Blackhole;
    let from_all = from_rule("0.0.0.0", 0, 254, 32766);
    for (what, m) in [
        ("iif", with_iif),
        ("fwmark", with_mark),
        ("to", to_dst),
        ("not from", not_from),
        ("blackhole", blackhole),
        ("from all", from_all),
    ] {
        assert_eq!(source_rule(&m), None, "{what}");
        assert_eq!(ours(&m), None, "{what}");
    }
}

#[test]
fn natd_knows_its_own_rules_by_protocol_and_mask() {
    let mut m = RuleMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.action = RuleAction::ToTable;
    m.header.table = 101;
    m.attributes.extend([
        RuleAttribute::Priority(100),
        RuleAttribute::FwMark(route_mark(3)),
        RuleAttribute::FwMask(ROUTE_MARK_MASK),
        RuleAttribute::Protocol(RouteProtocol::from(RULE_PROTOCOL)),
    ]);
    let rule = MarkRule {
        priority: 100,
        mark: route_mark(3),
        table: 101,
    };
    assert_eq!(ours(&m), Some(rule));
    assert_eq!(
        rule.to_string(),
        "priority 100 fwmark 0x3000000/0x3f000000 lookup 101 protocol 167"
    );
    // Someone else's rule with the same mark but another protocol is not natd's.
    let mut other = m.clone();
    other
        .attributes
        .retain(|a| !matches!(a, RuleAttribute::Protocol(_)));
    other
        .attributes
        .push(RuleAttribute::Protocol(RouteProtocol::Static));
    assert_eq!(ours(&other), None);
}

#[test]
fn each_mapping_follows_the_first_rule_holding_its_public_ip() {
    let rules = [
        SourceRule {
            priority: 300,
            source: "203.0.113.0/24".parse().unwrap(),
            table: 100,
        },
        SourceRule {
            priority: 200,
            source: "203.0.113.20/32".parse().unwrap(),
            table: 102,
        },
        SourceRule {
            priority: 250,
            source: "10.0.0.0/8".parse().unwrap(),
            table: 110,
        },
    ];
    let plan = RoutePlan::of(
        [
            mapping("203.0.113.10", "10.0.0.10"),
            mapping("203.0.113.20", "10.0.0.20"),
            mapping("198.51.100.9", "10.0.0.9"),
        ],
        &rules,
        &[],
    );
    let got: Vec<_> = plan
        .groups
        .iter()
        .map(|g| (g.rule, g.mappings.clone()))
        .collect();
    assert_eq!(
        got,
        [
            (
                MarkRule {
                    priority: 200,
                    mark: route_mark(1),
                    table: 102
                },
                vec![mapping("203.0.113.20", "10.0.0.20")]
            ),
            (
                MarkRule {
                    priority: 300,
                    mark: route_mark(2),
                    table: 100
                },
                vec![mapping("203.0.113.10", "10.0.0.10")]
            ),
        ]
    );
    // The rule `from 10.0.0.0/8` holds a private address, not a public IP: not mirrored.
    assert_eq!(plan.mark_rules().len(), 2);
    assert!(plan.unmarked.is_empty());
}

#[test]
fn beyond_the_marks_the_field_holds_mappings_are_left_unmarked() {
    let rules: Vec<SourceRule> = (0..70u32)
        .map(|i| SourceRule {
            priority: 1000 + i,
            source: Cidr::new(std::net::Ipv4Addr::new(203, 0, 113, i as u8), 32).unwrap(),
            table: 200 + i,
        })
        .collect();
    let mappings: Vec<Mapping> = (0..70u8)
        .map(|i| mapping(&format!("203.0.113.{i}"), &format!("10.0.1.{i}")))
        .collect();
    let plan = RoutePlan::of(mappings, &rules, &[]);
    assert_eq!(plan.groups.len(), MAX_ROUTE_MARKS as usize);
    assert_eq!(plan.unmarked.len(), 70 - MAX_ROUTE_MARKS as usize);
    assert_eq!(
        plan.groups.last().map(|g| g.rule.mark),
        Some(ROUTE_MARK_MASK)
    );
}

#[test]
fn no_rules_no_plan() {
    let plan = RoutePlan::of([mapping("203.0.113.10", "10.0.0.10")], &[], &[]);
    assert_eq!(plan, RoutePlan::default());
}

#[test]
fn rules_of_one_priority_and_table_share_a_mark() {
    // CloudStack's router: one `from NETWORK lookup Table_ethN` per public network, here
    // two prefixes of one network's table.
    let rule = |source: &str| SourceRule {
        priority: 32764,
        source: source.parse().unwrap(),
        table: 102,
    };
    let plan = RoutePlan::of(
        [
            mapping("192.0.2.10", "10.0.0.10"),
            mapping("198.51.100.20", "10.0.0.20"),
        ],
        &[rule("192.0.2.0/24"), rule("198.51.100.0/24")],
        &[],
    );
    assert_eq!(plan.groups.len(), 1, "{plan:?}");
    assert_eq!(plan.groups[0].rule.mark, route_mark(1));
    assert_eq!(plan.groups[0].mappings.len(), 2);
    assert_eq!(plan.groups[0].sources.len(), 2);
}

#[test]
fn a_mark_keeps_its_table_while_natd_has_a_rule_for_it() {
    let rules = [
        SourceRule {
            priority: 32765,
            source: "203.0.113.10/32".parse().unwrap(),
            table: 101,
        },
        SourceRule {
            priority: 32764,
            source: "203.0.113.20/32".parse().unwrap(),
            table: 102,
        },
    ];
    let maps = [
        mapping("203.0.113.10", "10.0.0.10"),
        mapping("203.0.113.20", "10.0.0.20"),
    ];
    // Installed when only the rule of 203.0.113.10 existed: it holds mark 1.
    let existing = [MarkRule {
        priority: 32765,
        mark: route_mark(1),
        table: 101,
    }];
    let plan = RoutePlan::of(maps, &rules, &existing);
    let marks: Vec<_> = plan
        .groups
        .iter()
        .map(|g| (g.rule.table, g.rule.mark))
        .collect();
    assert_eq!(marks, [(102, route_mark(2)), (101, route_mark(1))]);
    // Without natd's rules the marks follow the priorities.
    let fresh = RoutePlan::of(maps, &rules, &[]);
    assert_eq!(fresh.groups[0].rule.mark, route_mark(1));
    assert_eq!(fresh.groups[0].rule.table, 102);
}
