//! Translation of rtnetlink notifications into [`KernelEvent`]s (no socket needed).
use super::*;

fn link(index: u32, name: Option<&str>) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.attributes
        .extend(name.map(|n| LinkAttribute::IfName(n.into())));
    m
}

fn names(pairs: &[(u32, &str)]) -> BTreeMap<u32, String> {
    pairs.iter().map(|&(i, n)| (i, n.to_string())).collect()
}

#[test]
fn links_are_added_changed_and_removed_with_their_names() {
    let mut links = names(&[(1, "lo")]);
    let added = translate(
        RouteNetlinkMessage::NewLink(link(7, Some("pub0"))),
        &mut links,
    );
    assert_eq!(
        added,
        Some(KernelEvent::LinkAdded {
            ifindex: 7,
            name: "pub0".into()
        })
    );
    // A change without IFLA_IFNAME keeps the known name.
    let changed = translate(RouteNetlinkMessage::NewLink(link(7, None)), &mut links);
    assert_eq!(
        changed,
        Some(KernelEvent::LinkChanged {
            ifindex: 7,
            name: "pub0".into()
        })
    );
    let renamed = translate(
        RouteNetlinkMessage::NewLink(link(7, Some("eth2"))),
        &mut links,
    );
    assert_eq!(
        renamed,
        Some(KernelEvent::LinkChanged {
            ifindex: 7,
            name: "eth2".into()
        })
    );
    let removed = translate(RouteNetlinkMessage::DelLink(link(7, None)), &mut links);
    assert_eq!(
        removed,
        Some(KernelEvent::LinkRemoved {
            ifindex: 7,
            name: "eth2".into()
        })
    );
    assert_eq!(links, names(&[(1, "lo")]));
    // Created again: added, with a new ifindex.
    let again = translate(
        RouteNetlinkMessage::NewLink(link(8, Some("eth2"))),
        &mut links,
    );
    assert!(matches!(
        again,
        Some(KernelEvent::LinkAdded { ifindex: 8, .. })
    ));
}

#[test]
fn a_resync_reports_what_changed_while_notifications_were_lost() {
    let before = names(&[(1, "lo"), (5, "pub0"), (6, "gst0")]);
    let now = names(&[(1, "lo"), (6, "guest"), (9, "pub0")]);
    assert_eq!(
        link_differences(&before, &now),
        vec![
            KernelEvent::LinkRemoved {
                ifindex: 5,
                name: "pub0".into()
            },
            KernelEvent::LinkChanged {
                ifindex: 6,
                name: "guest".into()
            },
            KernelEvent::LinkAdded {
                ifindex: 9,
                name: "pub0".into()
            },
        ]
    );
    assert!(link_differences(&now, &now).is_empty());
}

#[test]
fn ipv4_routes_are_reported_with_table_destination_and_next_hop() {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.table = 254;
    m.header.destination_prefix_length = 24;
    m.attributes = vec![
        RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(203, 0, 113, 0))),
        RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(198, 51, 100, 1))),
        RouteAttribute::Oif(3),
        RouteAttribute::Table(1000),
    ];
    let mut links = BTreeMap::new();
    assert_eq!(
        translate(RouteNetlinkMessage::DelRoute(m.clone()), &mut links),
        Some(KernelEvent::RouteChanged {
            table: 1000,
            dst: Ipv4Addr::new(203, 0, 113, 0),
            prefix: 24,
            oif: Some(3),
            gateway: Some(Ipv4Addr::new(198, 51, 100, 1)),
            removed: true,
        })
    );
    m.header.address_family = AddressFamily::Inet6;
    assert_eq!(
        translate(RouteNetlinkMessage::NewRoute(m), &mut links),
        None
    );
}

#[test]
fn ipv4_neighbours_carry_state_and_link_layer_address() {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = 4;
    m.header.state = NeighbourState::Reachable;
    m.attributes = vec![
        NeighbourAttribute::Destination(NeighbourAddress::Inet(Ipv4Addr::new(10, 0, 0, 10))),
        NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 1]),
    ];
    let mut links = BTreeMap::new();
    assert_eq!(
        translate(RouteNetlinkMessage::NewNeighbour(m.clone()), &mut links),
        Some(KernelEvent::NeighbourChanged {
            ifindex: 4,
            addr: Ipv4Addr::new(10, 0, 0, 10),
            lladdr: Some([2, 0, 0, 0, 0, 1]),
            state: NeighbourState::Reachable,
            removed: false,
        })
    );
    // Bridge FDB entries share the group; they are not neighbours of the fast path.
    m.header.family = AddressFamily::Bridge;
    assert_eq!(
        translate(RouteNetlinkMessage::NewNeighbour(m), &mut links),
        None
    );
}

#[test]
fn ipv4_addresses_prefer_the_local_address_and_keep_the_label() {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.index = 5;
    m.header.prefix_len = 32;
    m.attributes = vec![
        AddressAttribute::Address(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2))),
        AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
        AddressAttribute::Label("pub0:xnat".into()),
    ];
    let mut links = BTreeMap::new();
    assert_eq!(
        translate(RouteNetlinkMessage::NewAddress(m), &mut links),
        Some(KernelEvent::AddressChanged {
            ifindex: 5,
            addr: Ipv4Addr::new(192, 0, 2, 1),
            prefix: 32,
            label: Some("pub0:xnat".into()),
            removed: false,
        })
    );
}

#[test]
fn ipv4_policy_rules_are_reported_with_priority_and_table() {
    let mut m = RuleMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.table = 101;
    m.attributes = vec![RuleAttribute::Priority(32765)];
    let mut links = BTreeMap::new();
    assert_eq!(
        translate(RouteNetlinkMessage::NewRule(m.clone()), &mut links),
        Some(KernelEvent::RuleChanged {
            priority: 32765,
            table: 101,
            protocol: 0,
            removed: false,
        })
    );
    m.attributes.push(RuleAttribute::Table(1000));
    m.attributes.push(RuleAttribute::Protocol(167.into()));
    assert_eq!(
        translate(RouteNetlinkMessage::DelRule(m.clone()), &mut links),
        Some(KernelEvent::RuleChanged {
            priority: 32765,
            table: 1000,
            protocol: 167,
            removed: true,
        })
    );
    m.header.family = AddressFamily::Inet6;
    assert_eq!(translate(RouteNetlinkMessage::NewRule(m), &mut links), None);
}
