//! End to end: natd on a client -- router -- guest topology of network namespaces (see
//! `nat_tests::topology`), traffic from real sockets and `ping`, and natctl, natd and nftables
//! checked from the outside. Each test builds its own namespaces and natd and removes them when
//! it ends, also on failure, so the tests run in parallel. They need root and fail without it.
//!
//! Every check is on something observed: the peer address a socket saw, the bytes it received,
//! the addresses of ICMP packets a namespace received, natctl's counters and the router's
//! nftables table and XDP attachment.
//!
//! Every mapped public IP is default-deny inbound: a test that sends traffic to P first allows
//! it ([`ONE_MAPPING_OPEN`], or `natctl firewall add` after a `mapping add`). The firewall
//! itself is tested in `e2e_firewall.rs`.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use anyhow::Context as _;
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, Natctl, Natd, NftMaps, PUBLIC_ADDR, ROUTER_GUEST_IF, ROUTER_PUBLIC_IF,
    ScratchDir, Topology,
    fastpath::{self, Arrived},
    observe::{
        ICMP_ECHO_REQUEST, IcmpSniffer, Probe, ProbeSender, ping, tcp_exchange, udp_bind,
        udp_exchange, udp_probe,
    },
    policy,
};
use nat_userspace::api::{MappingStatus, StatsReport};

/// natd's config for the one mapping most tests use: P 203.0.113.10 <-> V 10.0.0.10, no
/// ingress rules (P answers nothing it was not asked by the guest).
const ONE_MAPPING: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n";
/// [`ONE_MAPPING`] with ingress rules allowing every TCP, UDP and ICMP packet to P from
/// anywhere: the plain static NAT, open to everything.
const ONE_MAPPING_OPEN: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n\
                                [[rule]]\npublic = \"203.0.113.10\"\nproto = \"tcp\"\n\
                                [[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\n\
                                [[rule]]\npublic = \"203.0.113.10\"\nproto = \"icmp\"\n";
/// A config that maps 203.0.113.10 twice.
const DUPLICATE_PUBLIC: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n\
                                [[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.11\"\n";
/// natd that is expected to fail must do so within this time.
const NATD_FAILS: Duration = nat_tests::topology::process::NATD_START;

fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

/// Packets counted under verdict reason `name`.
fn reason(stats: &StatsReport, name: &str) -> u64 {
    policy::reason(stats, name).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The counters of the mapping of P.
fn mapping_of_p(list: &[MappingStatus]) -> MappingStatus {
    list.iter()
        .find(|m| m.public == PUBLIC_ADDR)
        .cloned()
        .unwrap_or_else(|| panic!("no mapping of {PUBLIC_ADDR} in {list:?}"))
}

/// The mappings natctl lists, without counters.
fn pairs(natctl: &Natctl) -> anyhow::Result<Vec<(Ipv4Addr, Ipv4Addr)>> {
    Ok(natctl
        .mappings()?
        .iter()
        .map(|m| (m.public, m.private))
        .collect())
}

/// Fails unless `probe` was answered by the router's "network unreachable" (no route to P).
fn assert_unreachable(probe: Probe, when: &str) {
    match probe {
        Probe::Rejected(e) if e.raw_os_error() == Some(libc::ENETUNREACH) => {}
        other => panic!("{when}: expected \"network unreachable\" from the router, got {other:?}"),
    }
}

/// The nft maps natd's table must hold for exactly the mappings in `list`.
fn expected_nft(list: &[(Ipv4Addr, Ipv4Addr)]) -> NftMaps {
    NftMaps::from([
        ("dnat_v4".to_string(), list.to_vec()),
        (
            "snat_v4".to_string(),
            list.iter().map(|&(p, v)| (v, p)).collect(),
        ),
    ])
}

/// Pings P from the client, UDP and TCP to P: each reaches the guest addressed to V from the
/// client's own address, and each answer reaches the client from P.
#[test]
fn inbound_traffic_reaches_the_guest_from_the_clients_address() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING_OPEN))?;
    let natctl = natd.natctl()?;
    let before = natctl.stats()?;

    let sniffer = IcmpSniffer::open_in(&topo.guest)?;
    let p = ping(&topo.client, PUBLIC_ADDR, 3, 56)?;
    assert_eq!((p.transmitted, p.received), (3, 3), "{}", p.output);
    assert_eq!(p.reply_from, [PUBLIC_ADDR; 3], "{}", p.output);
    let requests = sniffer.collect(3, |s| s.icmp_type == ICMP_ECHO_REQUEST);
    assert_eq!(
        requests.len(),
        3,
        "echo requests the guest received: {requests:?}"
    );
    for r in &requests {
        assert_eq!((r.src, r.dst), (CLIENT_ADDR, GUEST_ADDR), "{r:?}");
    }

    let udp = udp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 7000),
        &topo.client,
        at(PUBLIC_ADDR, 7000),
        512,
    )?;
    assert_eq!(udp.server_saw.ip(), CLIENT_ADDR, "{udp:?}");
    assert_eq!(udp.server_len, 512);
    assert_eq!(udp.client_saw, at(PUBLIC_ADDR, 7000).into(), "{udp:?}");

    let tcp = tcp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 8080),
        &topo.client,
        at(PUBLIC_ADDR, 8080),
        256 * 1024,
    )?;
    assert_eq!(tcp.server_peer.ip(), CLIENT_ADDR, "{tcp:?}");
    assert_eq!(tcp.server_local, at(GUEST_ADDR, 8080).into(), "{tcp:?}");
    assert_eq!(
        (tcp.server_received, tcp.client_confirmed),
        (256 * 1024, 256 * 1024)
    );

    // Everything the guest got came through the fast path, and so did every answer.
    let arrived = Arrivals {
        way: requests.len() as u64 + 1 + tcp.server_segs_in,
        back: u64::from(p.received) + 1 + tcp.client_segs_in,
    };
    assert_fast_path(&before, &natctl.stats()?, Dir::Inbound, &arrived);
    Ok(())
}

/// The guest pings the client, and opens UDP and TCP to it: the client sees P as the source,
/// and the answers reach the guest from the client's address.
#[test]
fn outbound_traffic_reaches_the_client_from_the_public_address() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let before = natctl.stats()?;

    let sniffer = IcmpSniffer::open_in(&topo.client)?;
    let p = ping(&topo.guest, CLIENT_ADDR, 3, 56)?;
    assert_eq!((p.transmitted, p.received), (3, 3), "{}", p.output);
    assert_eq!(p.reply_from, [CLIENT_ADDR; 3], "{}", p.output);
    let requests = sniffer.collect(3, |s| s.icmp_type == ICMP_ECHO_REQUEST);
    assert_eq!(
        requests.len(),
        3,
        "echo requests the client received: {requests:?}"
    );
    for r in &requests {
        assert_eq!((r.src, r.dst), (PUBLIC_ADDR, CLIENT_ADDR), "{r:?}");
    }

    let udp = udp_exchange(
        &topo.client,
        at(CLIENT_ADDR, 7000),
        &topo.guest,
        at(CLIENT_ADDR, 7000),
        512,
    )?;
    assert_eq!(udp.server_saw.ip(), PUBLIC_ADDR, "{udp:?}");
    assert_eq!(udp.client_saw, at(CLIENT_ADDR, 7000).into(), "{udp:?}");

    let tcp = tcp_exchange(
        &topo.client,
        at(CLIENT_ADDR, 8080),
        &topo.guest,
        at(CLIENT_ADDR, 8080),
        256 * 1024,
    )?;
    assert_eq!(tcp.server_peer.ip(), PUBLIC_ADDR, "{tcp:?}");
    assert_eq!(
        (tcp.server_received, tcp.client_confirmed),
        (256 * 1024, 256 * 1024)
    );

    let arrived = Arrivals {
        way: requests.len() as u64 + 1 + tcp.server_segs_in,
        back: u64::from(p.received) + 1 + tcp.client_segs_in,
    };
    assert_fast_path(&before, &natctl.stats()?, Dir::Outbound, &arrived);
    Ok(())
}

/// Datagrams larger than the link MTU arrive as fragments, which the XDP program passes to the
/// kernel (reason `fragment`); nftables translates them after reassembly.
#[test]
fn fragmented_traffic_takes_the_slow_path_and_still_arrives() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING_OPEN))?;
    let natctl = natd.natctl()?;
    let before = natctl.stats()?;

    let inbound = udp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 7000),
        &topo.client,
        at(PUBLIC_ADDR, 7000),
        4000,
    )?;
    assert_eq!(inbound.server_saw.ip(), CLIENT_ADDR, "{inbound:?}");
    assert_eq!(inbound.server_len, 4000);
    assert_eq!(
        inbound.client_saw,
        at(PUBLIC_ADDR, 7000).into(),
        "{inbound:?}"
    );
    assert_eq!(inbound.client_len, 4000);

    let outbound = udp_exchange(
        &topo.client,
        at(CLIENT_ADDR, 7001),
        &topo.guest,
        at(CLIENT_ADDR, 7001),
        4000,
    )?;
    assert_eq!(outbound.server_saw.ip(), PUBLIC_ADDR, "{outbound:?}");
    assert_eq!((outbound.server_len, outbound.client_len), (4000, 4000));

    let sniffer = IcmpSniffer::open_in(&topo.guest)?;
    let p = ping(&topo.client, PUBLIC_ADDR, 3, 3000)?;
    assert_eq!((p.transmitted, p.received), (3, 3), "{}", p.output);
    assert_eq!(p.reply_from, [PUBLIC_ADDR; 3], "{}", p.output);
    let requests = sniffer.collect(3, |s| s.icmp_type == ICMP_ECHO_REQUEST);
    assert_eq!(
        requests.len(),
        3,
        "echo requests the guest received: {requests:?}"
    );
    for r in &requests {
        // 20 bytes of IPv4 header, 8 of ICMP, 3000 of data: reassembled whole.
        assert_eq!(
            (r.src, r.dst, r.ip_len),
            (CLIENT_ADDR, GUEST_ADDR, 3028),
            "{r:?}"
        );
    }

    let after = natctl.stats()?;
    // Each 4000-byte datagram crosses the router as 3 fragments, 4 datagrams in all; each
    // 3028-byte echo request or reply as 3, 6 in all.
    let fragments = reason(&after, "fragment") - reason(&before, "fragment");
    assert!(fragments >= 30, "fragment grew by {fragments}");
    Ok(())
}

/// `natctl mapping add` and `del` change what natd translates while it runs; `del` leaves the
/// public IP's rules, inactive.
#[test]
fn mapping_add_and_del_take_effect_at_runtime() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let mut natd = Natd::start(&topo, None)?;
    let natctl = natd.natctl()?;
    let listener = udp_bind(&topo.guest, at(GUEST_ADDR, 7000))?;
    let target = at(PUBLIC_ADDR, 7000);

    // Unmapped, P has no route in the router: it answers "unreachable", the guest gets nothing.
    assert_unreachable(udp_probe(&listener, &topo.client, target)?, "before add");
    assert_eq!(topo.nft_maps()?, Some(expected_nft(&[])));

    let out = natctl.ok(&["mapping", "add", "203.0.113.10", "10.0.0.10"])?;
    assert!(out.contains("203.0.113.10 -> 10.0.0.10"), "{out}");
    let rule = natctl.firewall_add(PUBLIC_ADDR, &["--proto", "udp", "--ports", "7000"])?;
    let probe = udp_probe(&listener, &topo.client, target)?;
    match probe {
        Probe::Delivered(from) => assert_eq!(from.ip(), CLIENT_ADDR),
        Probe::Rejected(e) => panic!("after add, the datagram was rejected: {e}"),
    }
    assert_eq!(pairs(&natctl)?, [(PUBLIC_ADDR, GUEST_ADDR)]);
    assert_eq!(
        topo.nft_maps()?,
        Some(expected_nft(&[(PUBLIC_ADDR, GUEST_ADDR)]))
    );

    let out = natctl.ok(&["mapping", "del", "203.0.113.10"])?;
    assert!(out.contains("203.0.113.10 -> 10.0.0.10"), "{out}");
    assert_unreachable(udp_probe(&listener, &topo.client, target)?, "after del");
    assert_eq!(pairs(&natctl)?, []);
    assert_eq!(topo.nft_maps()?, Some(expected_nft(&[])));
    // The rule stays with its public IP, inactive until the IP is mapped again (as on
    // CloudStack's router, whose firewall rules do not follow its static NAT).
    assert_eq!(
        natctl.firewall_states()?,
        (vec![], vec![rule]),
        "rule {rule} is not listed inactive"
    );
    let nft = topo.nft_text()?.unwrap_or_default();
    assert!(
        !nft.contains(&format!("rule {rule}\"")),
        "inactive rule {rule} in nftables: {nft}"
    );

    assert!(natd.is_running()?, "natd exited:\n{}", natd.log_text());
    // Starting with nothing installs nothing, so it is no change (the generation counts
    // changes, across restarts too).
    assert_eq!(
        natctl.stats()?.generation,
        3,
        "mapping add, firewall add, mapping del"
    );
    Ok(())
}

/// `natctl status` counts the flows `natctl conntrack list` lists (not the count of the last
/// collection, which ran before they existed), and dates the last change in RFC 3339 UTC, the
/// date `date -u` gives for the seconds `status --json` reports.
#[test]
fn status_counts_the_listed_flows_and_dates_the_last_change() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING_OPEN))?;
    let natctl = natd.natctl()?;
    const FLOWS: u16 = 3;
    for i in 0..FLOWS {
        let seen = udp_exchange(
            &topo.guest,
            at(GUEST_ADDR, 7000 + i),
            &topo.client,
            at(PUBLIC_ADDR, 7000 + i),
            64,
        )?;
        assert_eq!(seen.server_saw.ip(), CLIENT_ADDR, "{seen:?}");
    }
    natctl.ok(&["mapping", "add", "203.0.113.11", "10.0.0.11"])?;
    let listed = natctl.flows()?.flows.len();
    let status: serde_json::Value = serde_json::from_str(&natctl.ok(&["status", "--json"])?)?;
    assert!(
        listed >= usize::from(FLOWS),
        "conntrack list: {listed} flows"
    );
    assert_eq!(status["flows"].as_u64(), Some(listed as u64), "{status}");

    let applied_at = status["applied_at"]
        .as_u64()
        .with_context(|| format!("status --json: no applied_at: {status}"))?;
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{applied_at}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()?;
    let date = String::from_utf8(out.stdout)?.trim().to_string();
    let text = natctl.ok(&["status"])?;
    assert!(
        text.contains(&format!("flows          {listed} of ")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("generation") && l.ends_with(&format!("(last change {date})"))),
        "no `last change {date}` in:\n{text}"
    );
    Ok(())
}

/// Revoking a static NAT keeps what netfilter keeps: a flow already translated runs on with its
/// binding (here one the slow path translated: its first datagram was fragmented, so the
/// router's conntrack holds its DNAT), a new flow is refused at once, and `natctl conntrack
/// flush` ends the old one. (Formerly the mapping's removal cut its flows, unlike a CloudStack
/// router.)
#[test]
fn mapping_del_keeps_established_flows_until_flushed() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING_OPEN))?;
    let listener = udp_bind(&topo.guest, at(GUEST_ADDR, 7000))?;
    let mut flow = ProbeSender::new(&topo.client, at(PUBLIC_ADDR, 7000))?;
    match flow.probe(&listener, 4000)? {
        Probe::Delivered(from) => assert_eq!(from.ip(), CLIENT_ADDR),
        Probe::Rejected(e) => panic!("with the mapping, the datagram was rejected: {e}"),
    }
    let natctl = natd.natctl()?;
    natctl.ok(&["mapping", "del", "203.0.113.10"])?;
    assert_eq!(topo.nft_maps()?, Some(expected_nft(&[])));
    // Same socket, so the same 5-tuple as the translated datagram: still the flow's.
    match flow.probe(&listener, 32)? {
        Probe::Delivered(from) => assert_eq!(from.ip(), CLIENT_ADDR),
        Probe::Rejected(e) => panic!("the established flow was cut by the revoke: {e}"),
    }
    // A new flow to the revoked address is refused.
    let mut other = ProbeSender::new(&topo.client, at(PUBLIC_ADDR, 7000))?;
    assert_unreachable(other.probe(&listener, 32)?, "a new flow after del");
    natctl.ok(&["conntrack", "flush"])?;
    assert_unreachable(flow.probe(&listener, 32)?, "the old flow after the flush");
    Ok(())
}

/// Each refused natctl command exits 1 (refused) naming the problem, and changes nothing: not
/// natctl's list, not nftables, not what is translated.
#[test]
fn refused_commands_change_nothing() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING_OPEN))?;
    let natctl = natd.natctl()?;
    let state = || -> anyhow::Result<_> {
        Ok((
            pairs(&natctl)?,
            topo.nft_table()?
                .context("natd's nftables table is missing")?,
            natctl.stats()?.generation,
        ))
    };
    let before = state()?;
    assert_eq!(before.0, [(PUBLIC_ADDR, GUEST_ADDR)]);

    let existing = "203.0.113.10 -> 10.0.0.10";
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["mapping", "add", "203.0.113.10", "10.0.0.11"],
            &["public IP 203.0.113.10 is already mapped", existing],
        ),
        (
            &["mapping", "add", "203.0.113.11", "10.0.0.10"],
            &["private IP 10.0.0.10 is already mapped", existing],
        ),
        (
            &["mapping", "add", "10.0.0.10", "10.0.0.12"],
            &["10.0.0.10 is already used", existing],
        ),
        (
            &["mapping", "add", "0.0.0.0", "10.0.0.5"],
            &["public IP 0.0.0.0 is not a unicast IPv4 address"],
        ),
        (
            &["mapping", "add", "224.0.0.1", "10.0.0.5"],
            &["public IP 224.0.0.1 is not a unicast IPv4 address (multicast)"],
        ),
        (
            &["mapping", "add", "203.0.113.11", "255.255.255.255"],
            &["private IP 255.255.255.255 is not a unicast IPv4 address (broadcast)"],
        ),
        (
            &["mapping", "del", "203.0.113.99"],
            &["public IP 203.0.113.99 is not mapped"],
        ),
        (
            &["mapping", "add", "203.0.113.300", "10.0.0.5"],
            &["203.0.113.300"],
        ),
    ];
    for (args, expected) in cases {
        let out = natctl.run(args)?;
        assert!(
            !out.status.success(),
            "`natctl {}` succeeded",
            args.join(" ")
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "`natctl {}`: {}",
            args.join(" "),
            out.stderr
        );
        for text in *expected {
            assert!(
                out.stderr.contains(text),
                "`natctl {}`: stderr lacks {text:?}: {}",
                args.join(" "),
                out.stderr
            );
        }
        assert_eq!(state()?, before, "after `natctl {}`", args.join(" "));
    }

    // And the mapping still translates.
    let udp = udp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 7000),
        &topo.client,
        at(PUBLIC_ADDR, 7000),
        64,
    )?;
    assert_eq!(udp.server_saw.ip(), CLIENT_ADDR, "{udp:?}");
    Ok(())
}

/// Without natd, natctl says natd is not running (and exits 3, natd not reached): no socket,
/// or a socket nobody listens on.
#[test]
fn natctl_without_natd_says_it_is_not_running() -> anyhow::Result<()> {
    let dir = ScratchDir::unique("xsn-e2e-")?;
    let absent = dir.path().join("absent.sock");
    let stale = dir.path().join("stale.sock");
    // A socket file whose listener is gone, as a killed natd leaves it.
    drop(std::os::unix::net::UnixListener::bind(&stale)?);

    for (socket, args) in [
        (&absent, &["stats"][..]),
        (
            &absent,
            &["mapping", "add", "203.0.113.10", "10.0.0.10"][..],
        ),
        (&stale, &["mapping", "list"][..]),
    ] {
        let out = Natctl::new(socket)?.run(args)?;
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        assert!(out.stderr.contains("natd is not running"), "{out:?}");
        assert!(
            out.stderr.contains(&*socket.to_string_lossy()),
            "stderr does not name the socket: {out:?}"
        );
    }
    Ok(())
}

/// natd refuses a config mapping one public IP twice, naming the entry, and an interface that
/// does not exist, naming it; if attaching fails after the nftables table was installed, natd
/// removes it. In no case does anything stay behind.
#[test]
fn natd_refuses_bad_config_and_interfaces_and_leaves_nothing() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let config = topo.dir.path().join("duplicate.toml");
    std::fs::write(&config, DUPLICATE_PUBLIC)?;
    let config = config.to_string_lossy().into_owned();
    let socket = topo.dir.path().join("natd.sock");
    let socket_arg = socket.to_string_lossy().into_owned();

    let cases: &[(&[&str], &[&str])] = &[
        (
            &[
                "--public-iface",
                ROUTER_PUBLIC_IF,
                "--guest-iface",
                ROUTER_GUEST_IF,
                "--config",
                &config,
            ],
            &[
                "mapping #2 (203.0.113.10 -> 10.0.0.11)",
                "public IP 203.0.113.10 is already mapped: 203.0.113.10 -> 10.0.0.10",
            ],
        ),
        (
            &["--public-iface", "nope0", "--guest-iface", ROUTER_GUEST_IF],
            &["interface nope0 does not exist"],
        ),
        (
            &["--public-iface", ROUTER_PUBLIC_IF, "--guest-iface", "nope1"],
            &["interface nope1 does not exist"],
        ),
        // The loopback device has no native XDP: the attach fails after pub0's succeeded and
        // after the nftables table went in.
        (
            &["--public-iface", ROUTER_PUBLIC_IF, "--guest-iface", "lo"],
            &[
                "cannot attach XDP to lo in native mode",
                "run natd with --xdp-mode generic",
            ],
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args
            .iter()
            .copied()
            .chain(["--socket", &socket_arg])
            .collect();
        let (status, output) = Natd::run_to_exit(&topo, &args, NATD_FAILS)?;
        let what = format!("natd {}", args.join(" "));
        assert!(!status.success(), "`{what}` succeeded:\n{output}");
        for text in *expected {
            assert!(
                output.contains(text),
                "`{what}`: output lacks {text:?}:\n{output}"
            );
        }
        assert_eq!(topo.nft_table()?, None, "`{what}` left its nftables table");
        for dev in [ROUTER_PUBLIC_IF, ROUTER_GUEST_IF] {
            let link = topo.router_link(dev)?;
            assert!(!link.contains("xdp"), "`{what}` left XDP on {dev}:\n{link}");
        }
        assert!(!socket.exists(), "`{what}` left {}", socket.display());
    }
    Ok(())
}

/// On SIGTERM natd detaches XDP from both interfaces, removes its nftables table and its
/// socket, and exits 0.
#[test]
fn natd_cleans_up_on_sigterm() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let mut natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    for dev in [ROUTER_PUBLIC_IF, ROUTER_GUEST_IF] {
        let link = topo.router_link(dev)?;
        assert!(
            link.contains("prog/xdp"),
            "no XDP on {dev} while natd runs:\n{link}"
        );
    }
    assert_eq!(
        topo.nft_maps()?,
        Some(expected_nft(&[(PUBLIC_ADDR, GUEST_ADDR)]))
    );

    let status = natd.terminate()?;
    assert!(
        status.success(),
        "natd exited with {status}:\n{}",
        natd.log_text()
    );
    for dev in [ROUTER_PUBLIC_IF, ROUTER_GUEST_IF] {
        let link = topo.router_link(dev)?;
        assert!(!link.contains("xdp"), "XDP left on {dev}:\n{link}");
    }
    assert_eq!(topo.nft_table()?, None, "nftables table left behind");
    assert!(!natd.socket().exists(), "control socket left behind");
    let out = natd.natctl()?.run(&["stats"])?;
    assert!(
        !out.status.success() && out.stderr.contains("natd is not running"),
        "{out:?}"
    );
    Ok(())
}

/// Which way the traffic of a test was opened.
#[derive(Clone, Copy)]
enum Dir {
    Inbound,
    Outbound,
}

/// Packets the receivers counted: `way` at the far end of the opened direction (echo
/// requests, the datagram, TCP segments), `back` at the opener (echo replies, the answer,
/// TCP segments).
struct Arrivals {
    way: u64,
    back: u64,
}

/// The fast path carried everything that arrived both ways (see `topology::fastpath`): the
/// forwarded reason of each direction and P's mapping counted at least the packets that
/// arrived, and no pass reason grew.
fn assert_fast_path(before: &StatsReport, after: &StatsReport, dir: Dir, arrived: &Arrivals) {
    let (way, back) = match dir {
        Dir::Inbound => ("inbound_forwarded", "outbound_forwarded"),
        Dir::Outbound => ("outbound_forwarded", "inbound_forwarded"),
    };
    fastpath::carried(
        before,
        after,
        &[
            Arrived::new(way, arrived.way, "packets at the far end"),
            Arrived::new(back, arrived.back, "answers at the opener"),
        ],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let (m0, m) = (
        mapping_of_p(&before.mappings).counters,
        mapping_of_p(&after.mappings).counters,
    );
    let (inbound, outbound) = match dir {
        Dir::Inbound => (arrived.way, arrived.back),
        Dir::Outbound => (arrived.back, arrived.way),
    };
    assert!(
        m.inbound_packets - m0.inbound_packets >= inbound
            && m.outbound_packets - m0.outbound_packets >= outbound,
        "P's mapping counted fewer than the {inbound} packets in and {outbound} out that \
         arrived: before {m0:?}, after {m:?}"
    );
    assert!(
        m.inbound_bytes > m0.inbound_bytes && m.outbound_bytes > m0.outbound_bytes,
        "mapping counters: before {m0:?}, after {m:?}"
    );
}
