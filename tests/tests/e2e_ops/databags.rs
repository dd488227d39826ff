//! CloudStack payloads merged as the router merges them into its databags, seen on the wire:
//! a firewall payload that arrives before its IP's static NAT takes effect with the static NAT
//! (fast path and nftables); a static NAT entry for an IP mapped to another guest moves the IP
//! to the new guest; an egress rule with a source CIDR (one VM) blocks that guest and not
//! another, in the fast path and in the slow path, from a payload and from natctl; a revoked
//! default egress rule denies egress; an ingress rule for protocol `all` opens nothing and a
//! repeated one stays until both ids go; and a CloudStack rule id never taken by one natctl
//! gave.
use std::net::Ipv4Addr;

use anyhow::Context as _;
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, Natctl, Natd, NatdOptions, Netns, PUBLIC_ADDR, ROUTER_GUEST_IF,
    ROUTER_PUBLIC_IF, Topology,
    attempt::{
        TcpAttempt, assert_no_connection, assert_no_datagram, tcp_listen, udp_receive, udp_send,
    },
    links::{GUEST2_ADDR, GUEST2_LINK, ROUTER_GUEST2_IF},
    observe::{payload, tcp_exchange, udp_bind, udp_exchange},
    policy::Way,
};

use super::at;

/// The second guest's public address.
const PUBLIC2_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);

/// Writes `text` to `name` in the test's directory and applies it with natctl.
fn apply(topo: &Topology, natctl: &Natctl, name: &str, text: &str) -> anyhow::Result<String> {
    let path = topo.dir.path().join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    natctl.ok(&["apply", &path.display().to_string()])
}

fn static_nat(pairs: &[(Ipv4Addr, Ipv4Addr)]) -> String {
    let rules: Vec<serde_json::Value> = pairs
        .iter()
        .map(|(p, v)| {
            serde_json::json!({"revoke": false, "source_ip_address": p.to_string(),
                               "destination_ip_address": v.to_string()})
        })
        .collect();
    serde_json::json!({"type": "staticnatrules", "rules": rules}).to_string()
}

/// A TCP connection from the client to `PUBLIC_ADDR:port` reaches the guest, from the
/// client's own address.
fn tcp_reaches_the_guest(topo: &Topology, port: u16) -> anyhow::Result<()> {
    let tcp = tcp_exchange(
        &topo.guest,
        at(GUEST_ADDR, port),
        &topo.client,
        at(PUBLIC_ADDR, port),
        64,
    )?;
    assert_eq!(tcp.server_peer.ip(), CLIENT_ADDR);
    Ok(())
}

/// A datagram from the client to `PUBLIC_ADDR:port` reaches the guest, from the client's own
/// address, and the guest's answer comes back.
fn udp_reaches_the_guest(topo: &Topology, port: u16) -> anyhow::Result<()> {
    let udp = udp_exchange(
        &topo.guest,
        at(GUEST_ADDR, port),
        &topo.client,
        at(PUBLIC_ADDR, port),
        64,
    )?;
    assert_eq!(udp.server_saw.ip(), CLIENT_ADDR);
    Ok(())
}

/// natd serving the topology's guest, mapped from `PUBLIC_ADDR` by a static NAT payload.
fn one_guest_mapped(topo: &Topology) -> anyhow::Result<(Natd, Natctl)> {
    let natd = Natd::start(topo, None)?;
    let natctl = natd.natctl()?;
    apply(
        topo,
        &natctl,
        "nat.json",
        &static_nat(&[(PUBLIC_ADDR, GUEST_ADDR)]),
    )?;
    Ok((natd, natctl))
}

/// natd serving the topology's guest and a second guest on gst1 (10.0.1.10).
fn two_guests(topo: &Topology) -> anyhow::Result<(Natd, Netns)> {
    let guest2 = topo.add_guest("guest2", GUEST2_LINK)?;
    let natd = Natd::start_with(
        topo,
        &NatdOptions {
            public_ifaces: vec![ROUTER_PUBLIC_IF.into()],
            guest_ifaces: vec![ROUTER_GUEST_IF.into(), ROUTER_GUEST2_IF.into()],
            ..NatdOptions::default()
        },
    )?;
    Ok((natd, guest2))
}

/// CloudStack sends the firewall rules of an IP whenever they change, also before the IP's
/// static NAT (and never again for it): rule 11 (tcp 5000) and 12 (udp 7000) are kept,
/// listed inactive and absent from nftables, then opened by the static NAT payload: TCP
/// through the fast path, a fragmented UDP datagram through nftables; what no rule allows
/// stays closed.
#[test]
fn a_firewall_payload_before_its_static_nat_takes_effect_with_it() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, None)?;
    let natctl = natd.natctl()?;
    let fw = serde_json::json!({"type": "firewallrules", "rules": [
        {"id": 11, "traffic_type": "Ingress", "src_ip": PUBLIC_ADDR.to_string(),
         "protocol": "tcp", "src_port_range": [5000, 5000], "source_cidr_list": ["0.0.0.0/0"],
         "revoked": false},
        {"id": 12, "traffic_type": "Ingress", "src_ip": PUBLIC_ADDR.to_string(),
         "protocol": "udp", "src_port_range": [7000, 7000], "source_cidr_list": ["198.51.100.0/24"],
         "revoked": false}]})
    .to_string();
    let out = apply(&topo, &natctl, "fw.json", &fw)?;
    assert!(out.contains("2 inactive rules added"), "{out}");
    assert_eq!(natctl.firewall_states()?, (vec![], vec![11, 12]));
    let nft = topo.nft_table()?.context("no nftables table")?;
    assert!(
        !nft.contains("rule 11"),
        "an inactive rule in nftables: {nft}"
    );

    apply(
        &topo,
        &natctl,
        "nat.json",
        &static_nat(&[(PUBLIC_ADDR, GUEST_ADDR)]),
    )?;
    assert_eq!(natctl.firewall_states()?, (vec![11, 12], vec![]));
    tcp_reaches_the_guest(&topo, 5000)?;
    // 4000 bytes: fragments, which the XDP program passes to the kernel, whose nftables mirror
    // must hold rule 12 now.
    let udp = udp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 7000),
        &topo.client,
        at(PUBLIC_ADDR, 7000),
        4000,
    )?;
    assert_eq!(
        (udp.server_saw.ip(), udp.client_saw.ip()),
        (CLIENT_ADDR.into(), PUBLIC_ADDR.into())
    );
    let listener = udp_bind(&topo.guest, at(GUEST_ADDR, 7001))?;
    natctl.dropped(PUBLIC_ADDR, Way::In, "a datagram to udp 7001", || {
        udp_send(&topo.client, None, at(PUBLIC_ADDR, 7001), b"closed")
    })?;
    assert_no_datagram(&listener)
}

/// A static NAT entry for an IP mapped to another guest replaces the mapping, as the router's
/// databag merge does when the revoke never arrived: traffic to the IP reaches the new guest,
/// under the IP's ingress rules.
#[test]
fn a_static_nat_entry_for_a_mapped_ip_moves_it_to_the_new_guest() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let (natd, guest2) = two_guests(&topo)?;
    let natctl = natd.natctl()?;
    apply(
        &topo,
        &natctl,
        "nat.json",
        &static_nat(&[(PUBLIC_ADDR, GUEST_ADDR)]),
    )?;
    natctl.firewall_add(PUBLIC_ADDR, &["--proto", "tcp", "--ports", "5000"])?;
    let to_guest = tcp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 5000),
        &topo.client,
        at(PUBLIC_ADDR, 5000),
        64,
    )?;
    assert_eq!(to_guest.server_peer.ip(), CLIENT_ADDR);

    let out = apply(
        &topo,
        &natctl,
        "moved.json",
        &static_nat(&[(PUBLIC_ADDR, GUEST2_ADDR)]),
    )?;
    assert!(out.contains("1 mapping replaced"), "{out}");
    let pairs: Vec<_> = natctl
        .mappings()?
        .iter()
        .map(|m| (m.public, m.private))
        .collect();
    assert_eq!(pairs, [(PUBLIC_ADDR, GUEST2_ADDR)]);
    let to_guest2 = tcp_exchange(
        &guest2,
        at(GUEST2_ADDR, 5000),
        &topo.client,
        at(PUBLIC_ADDR, 5000),
        64,
    )?;
    assert_eq!(to_guest2.server_peer.ip(), CLIENT_ADDR);
    // And the new guest's own traffic leaves as the IP.
    let out = udp_exchange(
        &topo.client,
        at(CLIENT_ADDR, 7000),
        &guest2,
        at(CLIENT_ADDR, 7000),
        64,
    )?;
    assert_eq!(out.server_saw.ip(), PUBLIC_ADDR);
    Ok(())
}

/// From `ns`, a datagram to the client's `port` that the egress policy drops, counted on the
/// mapping of `public` (fast path); then a fragmented one (slow path: nftables), followed by a
/// fragmented marker to `marker_port` on the same path, which must arrive while the dropped one
/// did not.
fn egress_blocked(
    topo: &Topology,
    natctl: &Natctl,
    (ns, public): (&Netns, Ipv4Addr),
    port: u16,
    marker_port: u16,
) -> anyhow::Result<()> {
    let blocked = udp_bind(&topo.client, at(CLIENT_ADDR, port))?;
    natctl.dropped(public, Way::Out, &format!("a datagram to {port}"), || {
        udp_send(ns, None, at(CLIENT_ADDR, port), b"blocked")
    })?;
    let marker = udp_bind(&topo.client, at(CLIENT_ADDR, marker_port))?;
    udp_send(ns, None, at(CLIENT_ADDR, port), &payload(4000))?;
    udp_send(ns, None, at(CLIENT_ADDR, marker_port), &payload(4000))?;
    let (got, from) = udp_receive(&marker)?;
    assert_eq!((got.len(), from.ip()), (4000, public.into()));
    assert_no_datagram(&blocked)
}

/// From `ns`, small and fragmented datagrams to the client's `port` arrive from `public`.
fn egress_passes(
    topo: &Topology,
    (ns, public): (&Netns, Ipv4Addr),
    port: u16,
) -> anyhow::Result<()> {
    for len in [64, 4000] {
        let seen = udp_exchange(
            &topo.client,
            at(CLIENT_ADDR, port),
            ns,
            at(CLIENT_ADDR, port),
            len,
        )?;
        assert_eq!(seen.server_saw.ip(), public, "{len} bytes");
    }
    Ok(())
}

/// An egress rule with a source CIDR (CloudStack's `source_cidr_list`, one VM's /32) applies
/// to that guest only: with the default allow, its DENY exception blocks the one guest and not
/// the other, in the fast path and in the slow path; the same from `natctl egress add --src`.
#[test]
fn an_egress_rule_for_one_guest_blocks_it_and_not_the_other() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let (natd, guest2) = two_guests(&topo)?;
    let natctl = natd.natctl()?;
    apply(
        &topo,
        &natctl,
        "nat.json",
        &static_nat(&[(PUBLIC_ADDR, GUEST_ADDR), (PUBLIC2_ADDR, GUEST2_ADDR)]),
    )?;
    let egress = serde_json::json!({"type": "firewallrules", "rules": [
        {"id": 41, "traffic_type": "Egress", "src_ip": "", "protocol": "udp",
         "src_port_range": [5001, 5001], "source_cidr_list": [format!("{GUEST_ADDR}/32")],
         "dest_cidr_list": ["0.0.0.0/0"], "guest_cidr": "10.0.0.0/16",
         "default_egress_policy": true, "revoked": false},
        {"id": 42, "traffic_type": "Egress", "src_ip": "", "protocol": "all",
         "source_cidr_list": [], "dest_cidr_list": [], "guest_cidr": "10.0.0.0/16",
         "default_egress_policy": true, "revoked": false}]})
    .to_string();
    apply(&topo, &natctl, "egress.json", &egress)?;
    let listed = natctl.egress()?;
    assert_eq!(listed.rules.len(), 1, "{listed:?}");
    assert_eq!(
        listed.rules[0].sources,
        [format!("{GUEST_ADDR}/32").parse()?]
    );
    let (first, second) = ((&topo.guest, PUBLIC_ADDR), (&guest2, PUBLIC2_ADDR));
    egress_blocked(&topo, &natctl, first, 5001, 5003)?;
    egress_passes(&topo, second, 5001)?;

    natctl.egress_add(&[
        "--proto",
        "udp",
        "--ports",
        "5002",
        "--src",
        &format!("{GUEST2_ADDR}/32"),
    ])?;
    egress_blocked(&topo, &natctl, second, 5002, 5003)?;
    egress_passes(&topo, first, 5002)?;
    Ok(())
}

/// The router builds each egress rule's action from the rule's own `default_egress_policy`
/// and ends its chain with the default rule: revoked, the chain ends in the FORWARD policy's
/// DROP. Rule 41 (udp 5001, a DROP exception added under allow) then denies nothing more, and
/// rule 43 (udp 5003, an ACCEPT exception added under deny) comes into force; a new default
/// rule (id 0, as the management server builds it) that says allow turns both back. Seen on
/// the wire, in the fast path (its drop counters) and in nftables (fragmented datagrams, with
/// a marker on an allowed port that must arrive).
#[test]
fn a_revoked_default_egress_rule_denies_egress_as_on_the_router() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let (_natd, natctl) = one_guest_mapped(&topo)?;
    let rule = |id: u64, port: u16, under: bool| {
        serde_json::json!({"id": id, "traffic_type": "Egress", "src_ip": "", "protocol": "udp",
            "src_port_range": [port, port], "source_cidr_list": [format!("{GUEST_ADDR}/32")],
            "dest_cidr_list": ["0.0.0.0/0"], "default_egress_policy": under, "revoked": false})
    };
    let default = |id: u64| {
        serde_json::json!({"id": id, "traffic_type": "Egress", "src_ip": "", "protocol": "all",
            "source_cidr_list": [], "dest_cidr_list": [], "default_egress_policy": true,
            "revoked": false})
    };
    let egress = serde_json::json!({"type": "firewallrules",
        "rules": [rule(41, 5001, true), default(42), rule(43, 5003, false)]})
    .to_string();
    apply(&topo, &natctl, "egress.json", &egress)?;
    assert_eq!(natctl.egress()?.inactive, [43]);
    let guest = (&topo.guest, PUBLIC_ADDR);
    egress_passes(&topo, guest, 5002)?;
    egress_blocked(&topo, &natctl, guest, 5001, 5003)?;

    let revoke = r#"{"type":"firewallrules","rules":[{"id":42,"revoked":true}]}"#;
    let out = apply(&topo, &natctl, "revoke.json", revoke)?;
    assert!(out.contains("egress default changed"), "{out}");
    let listed = natctl.egress()?;
    assert!(!listed.default_allow);
    assert_eq!(listed.inactive, [41], "{listed:?}");
    egress_blocked(&topo, &natctl, guest, 5002, 5003)?;
    egress_blocked(&topo, &natctl, guest, 5001, 5003)?;

    let again = serde_json::json!({"type": "firewallrules", "rules": [default(0)]}).to_string();
    apply(&topo, &natctl, "default.json", &again)?;
    let listed = natctl.egress()?;
    assert!(listed.default_allow);
    assert_eq!(listed.inactive, [43], "{listed:?}");
    egress_passes(&topo, guest, 5002)?;
    egress_blocked(&topo, &natctl, guest, 5001, 5003)?;
    Ok(())
}

/// On the router an ingress rule with protocol `all` opens nothing (iptables refuses the
/// `-p all -m all` it is given) while the payload's other rules apply, and a rule repeated
/// under a new id keeps its one iptables rule until both ids are revoked. Seen on the wire:
/// tcp 5000 (rules 11 and 12) and udp 7000 (rule 14) open, udp 7001 (only rule 13, `all`,
/// would open it) dropped by the fast path; tcp 5000 still open with rule 11 revoked, closed
/// with rule 12 revoked too.
#[test]
fn ingress_all_opens_nothing_and_a_repeated_rule_stays_until_both_ids_go() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let (_natd, natctl) = one_guest_mapped(&topo)?;
    let rule = |id: u64, proto: &str, port: u16| {
        let mut r = serde_json::json!({"id": id, "traffic_type": "Ingress",
            "src_ip": PUBLIC_ADDR.to_string(), "protocol": proto,
            "source_cidr_list": ["0.0.0.0/0"], "revoked": false});
        if proto != "all" {
            r["src_port_range"] = serde_json::json!([port, port]);
        }
        r
    };
    let fw = serde_json::json!({"type": "firewallrules", "rules": [
        rule(11, "tcp", 5000), rule(12, "tcp", 5000), rule(13, "all", 0), rule(14, "udp", 7000)]})
    .to_string();
    let out = apply(&topo, &natctl, "fw.json", &fw)?;
    let (mut active, inactive) = natctl.firewall_states()?;
    active.sort();
    assert_eq!((active, inactive), (vec![11, 12, 14], vec![]), "{out}");
    tcp_reaches_the_guest(&topo, 5000)?;
    udp_reaches_the_guest(&topo, 7000)?;
    let closed = |port: u16| -> anyhow::Result<()> {
        let listener = udp_bind(&topo.guest, at(GUEST_ADDR, port))?;
        natctl.dropped(
            PUBLIC_ADDR,
            Way::In,
            &format!("a datagram to udp {port}"),
            || udp_send(&topo.client, None, at(PUBLIC_ADDR, port), b"closed"),
        )?;
        assert_no_datagram(&listener)
    };
    // What rule 13 (`all`) alone would open.
    closed(7001)?;

    apply(
        &topo,
        &natctl,
        "revoke11.json",
        r#"{"type":"firewallrules","rules":[{"id":11,"revoked":true}]}"#,
    )?;
    tcp_reaches_the_guest(&topo, 5000)?;
    apply(
        &topo,
        &natctl,
        "revoke12.json",
        r#"{"type":"firewallrules","rules":[{"id":12,"revoked":true}]}"#,
    )?;
    let (active, _) = natctl.firewall_states()?;
    assert_eq!(active, [14]);
    // Last: its SYN retransmissions would be counted as drops too.
    let listener = tcp_listen(&topo.guest, at(GUEST_ADDR, 5000))?;
    let attempt = natctl.dropped(PUBLIC_ADDR, Way::In, "a SYN to tcp 5000", || {
        TcpAttempt::start(&topo.client, None, at(PUBLIC_ADDR, 5000))
    })?;
    assert!(!attempt.is_connected()?, "the TCP connection was made");
    assert_no_connection(&listener)
}

/// natctl's rules take ids of natd's own range, so a CloudStack rule that arrives later never
/// finds its id taken (natd keeps a known id as it is, as the router does): here CloudStack's
/// rule 1 opens tcp 5000 after natctl added a rule of its own.
#[test]
fn a_cloudstack_rule_never_meets_an_id_natctl_gave() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let (_natd, natctl) = one_guest_mapped(&topo)?;
    let mine = natctl.firewall_add(PUBLIC_ADDR, &["--proto", "udp", "--ports", "7000"])?;
    let fw = serde_json::json!({"type": "firewallrules", "rules": [
        {"id": 1, "traffic_type": "Ingress", "src_ip": PUBLIC_ADDR.to_string(),
         "protocol": "tcp", "src_port_range": [5000, 5000], "source_cidr_list": ["0.0.0.0/0"],
         "revoked": false}]})
    .to_string();
    let out = apply(&topo, &natctl, "fw.json", &fw)?;
    assert!(out.contains("1 rule added"), "{out}");
    let (mut active, _) = natctl.firewall_states()?;
    active.sort();
    assert_eq!(active, [1, mine]);
    tcp_reaches_the_guest(&topo, 5000)?;
    udp_reaches_the_guest(&topo, 7000)?;
    Ok(())
}
