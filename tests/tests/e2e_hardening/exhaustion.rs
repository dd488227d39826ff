//! Exhaustion: a connection table flooded with far more flows than it holds, and rule sets
//! beyond the fast path's limits. The table evicts the least recently used flows and keeps
//! admitting new ones; a change beyond a limit is refused whole, naming the limit.
use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, Natd, PUBLIC_ADDR, Topology,
    attempt::{TcpAttempt, accept, tcp_listen, udp_send},
    observe::{tcp_exchange, udp_bind},
    policy::Way,
    sock,
};

use crate::common::*;

/// Entries in the connection table of the flood test.
const TABLE: u32 = 256;
/// New flows sent into it: twenty times its size.
const FLOWS: u16 = 20 * TABLE as u16;
/// Flows sent between two checks that every one of them arrived.
const BATCH: u16 = 64;
/// The source port of the first, then idle, flow; the flood's start at `FLOOD_PORT`.
const IDLE_PORT: u16 = 20_000;
const FLOOD_PORT: u16 = 30_000;
/// How long the flood's datagrams may take to arrive.
const ARRIVAL: Duration = Duration::from_secs(5);

fn flood_config() -> String {
    format!(
        "{ONE_MAPPING}[[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\nports = \"7000\"\n\
         [[rule]]\npublic = \"203.0.113.10\"\nproto = \"tcp\"\nports = \"9000\"\n\
         [conntrack]\nsize = {TABLE}\n"
    )
}

/// Receives on `socket` until every port of `want` was seen as a source (each once), or
/// [`ARRIVAL`] passed; returns the ports seen.
fn receive_from(socket: &UdpSocket, want: &BTreeSet<u16>) -> anyhow::Result<BTreeSet<u16>> {
    let mut seen = BTreeSet::new();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + ARRIVAL;
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    while seen.len() < want.len() && Instant::now() < deadline {
        match socket.recv_from(&mut buf) {
            Ok((_, SocketAddr::V4(from))) => {
                ensure!(*from.ip() == CLIENT_ADDR, "a datagram from {from}");
                ensure!(
                    seen.insert(from.port()),
                    "two datagrams from port {}",
                    from.port()
                );
            }
            Ok((_, from)) => anyhow::bail!("a datagram from {from}"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("receiving the flood"),
        }
    }
    Ok(seen)
}

/// Pins the calling thread to the first CPU it may run on. A veth hands a frame to its peer
/// on the sending CPU, so every flow this thread sends is created in the connection table
/// from that CPU. The kernel's LRU is per CPU at its edges (each CPU keeps a small list of its
/// newest entries, evicted last): flows created on one CPU are evicted in the order they went
/// idle, which is what the test checks.
fn pin_to_one_cpu() -> anyhow::Result<()> {
    // SAFETY: plain syscalls on a zeroed, correctly sized cpu_set_t of the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        ensure!(
            libc::sched_getaffinity(0, size, &mut set) == 0,
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        let cpu = (0..libc::CPU_SETSIZE as usize)
            .find(|&c| libc::CPU_ISSET(c, &set))
            .context("no CPU to run on")?;
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        ensure!(
            libc::sched_setaffinity(0, size, &one) == 0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Sets `SO_RCVBUFFORCE` (root may exceed `rmem_max`), so no datagram is lost to a full
/// socket buffer while the test is busy sending.
fn big_receive_buffer(socket: &UdpSocket) -> anyhow::Result<()> {
    sock::set_int(
        socket,
        (libc::SOL_SOCKET, libc::SO_RCVBUFFORCE),
        8 << 20,
        "SO_RCVBUFFORCE",
    )
}

/// A connection table of 256 entries, flooded with 5,120 new UDP flows (distinct source
/// ports) while a TCP connection exchanges data every 64 of them: every flow of the flood
/// reaches the guest (new flows are admitted however full the table is), the TCP connection
/// keeps working and keeps its entry, the first flow, idle since, is evicted, the newest
/// flows are in the table, and natd reports at most 256 entries and the evictions. (All
/// traffic is sent from one CPU: see [`pin_to_one_cpu`].)
#[test]
fn a_flooded_connection_table_evicts_idle_flows_and_keeps_admitting() -> anyhow::Result<()> {
    const SENT: &str = "new flows flooded into a full table (datagrams sent)";
    const DELIVERED: &str = "flood datagrams the guest received";
    const LOST: &str = "flood datagrams lost";
    const EXCHANGES: &str = "TCP exchanges during the flood";
    const BROKEN: &str = "TCP exchanges that failed (the connection broke)";
    let mut fig = Figures::new("exhaustion");
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(&flood_config()))?;
    let natctl = natd.natctl()?;
    let guest = udp_bind(&topo.guest, at(GUEST_ADDR, 7000))?;
    big_receive_buffer(&guest)?;

    topo.client.run(|| -> anyhow::Result<()> {
        pin_to_one_cpu()?;
        let first = UdpSocket::bind(at(Ipv4Addr::UNSPECIFIED, IDLE_PORT))?;
        first.send_to(b"first", at(PUBLIC_ADDR, 7000))?;
        Ok(())
    })??;
    let got = receive_from(&guest, &[IDLE_PORT].into())?;
    ensure!(got.len() == 1, "the first datagram did not arrive");
    ensure!(
        natctl
            .flows()?
            .flows
            .iter()
            .any(|f| f.proto == 17 && f.remote_port == IDLE_PORT),
        "the first flow is not in the table"
    );

    let listener = tcp_listen(&topo.guest, at(GUEST_ADDR, 9000))?;
    let mut client = TcpAttempt::start(&topo.client, None, at(PUBLIC_ADDR, 9000))?.connected()?;
    let (mut server, peer) = accept(&listener)?;
    let tcp_port = peer.port();
    // One exchange over the connection: client -> guest -> client, compared.
    let mut exchange = |msg: &[u8], fig: &mut Figures| -> anyhow::Result<()> {
        fig.add(EXCHANGES, 1);
        let r = (|| -> anyhow::Result<()> {
            client.write_all(msg)?;
            let mut buf = vec![0u8; msg.len()];
            server.read_exact(&mut buf)?;
            server.write_all(&buf)?;
            client.read_exact(&mut buf)?;
            ensure!(buf == msg, "the TCP connection mangled {msg:?}");
            Ok(())
        })();
        fig.add(BROKEN, u64::from(r.is_err()));
        r
    };

    topo.client.run(|| -> anyhow::Result<()> {
        pin_to_one_cpu()?;
        for start in (0..FLOWS).step_by(usize::from(BATCH)) {
            let ports: BTreeSet<u16> = (start..start + BATCH).map(|i| FLOOD_PORT + i).collect();
            for &port in &ports {
                let s = UdpSocket::bind(at(Ipv4Addr::UNSPECIFIED, port))
                    .with_context(|| format!("binding port {port}"))?;
                s.send_to(format!("flow {port}").as_bytes(), at(PUBLIC_ADDR, 7000))?;
                fig.add(SENT, 1);
            }
            let got = receive_from(&guest, &ports)?;
            fig.add(DELIVERED, got.len() as u64);
            fig.set(LOST, fig.get(SENT).saturating_sub(fig.get(DELIVERED)));
            ensure!(
                got == ports,
                "flows {}..{}: {} of {} datagrams arrived (table full of older flows)",
                FLOOD_PORT + start,
                FLOOD_PORT + start + BATCH,
                got.len(),
                ports.len()
            );
            exchange(format!("batch {start}").as_bytes(), &mut fig)?;
        }
        Ok(())
    })??;

    let stats = natctl.stats()?;
    let ct = &stats.conntrack;
    fig.set(
        "connection table capacity natd reports",
        u64::from(ct.capacity),
    );
    fig.set("connection table entries after the flood", ct.entries);
    fig.set("flows created", ct.creates);
    fig.set("flows evicted", ct.evictions);
    let flows = natctl.flows()?.flows;
    let idle_kept = flows
        .iter()
        .any(|f| f.proto == 17 && f.remote_port == IDLE_PORT);
    let tcp_kept = flows
        .iter()
        .any(|f| f.proto == 6 && f.guest_port == 9000 && f.remote_port == tcp_port);
    let newest: BTreeSet<u16> = (FLOWS - 16..FLOWS).map(|i| FLOOD_PORT + i).collect();
    let listed: BTreeSet<u16> = flows
        .iter()
        .filter(|f| f.proto == 17)
        .map(|f| f.remote_port)
        .collect();
    fig.set("idle flows kept through the flood", u64::from(idle_kept));
    fig.set(
        "busy TCP connections that lost their entry",
        u64::from(!tcp_kept),
    );
    fig.set(
        "newest 16 flows missing from the table",
        newest.difference(&listed).count() as u64,
    );
    let last = exchange(b"still there", &mut fig);
    ensure!(
        ct.capacity == TABLE,
        "capacity {} (not {TABLE})",
        ct.capacity
    );
    ensure!(
        ct.entries <= u64::from(TABLE),
        "{} entries in a table of {TABLE}",
        ct.entries
    );
    ensure!(
        ct.creates >= u64::from(FLOWS) && ct.evictions > 0,
        "{} flows created, {} evicted: {ct:?}",
        ct.creates,
        ct.evictions
    );
    ensure!(
        flows.len() <= TABLE as usize,
        "{} flows listed",
        flows.len()
    );
    ensure!(
        !idle_kept,
        "the first flow, idle since, survived 20 tables' worth of new flows"
    );
    ensure!(tcp_kept, "the busy TCP connection lost its entry");
    ensure!(
        newest.is_subset(&listed),
        "the newest flows are missing from the table: {:?}",
        newest.difference(&listed).collect::<Vec<_>>()
    );
    last.context("the TCP connection broke")?;

    eprintln!(
        "{} flows delivered, {} TCP exchanges; conntrack {} entries of {}, {} created, {} \
         evicted",
        fig.get(DELIVERED),
        fig.get(EXCHANGES),
        ct.entries,
        ct.capacity,
        ct.creates,
        ct.evictions
    );
    fig.done();
    Ok(())
}

/// Q, a second mapped address (no guest behind it).
const Q: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);

/// `n` TCP ingress rules for `public`, ids from `first_id`, one port each from `first_port`.
fn tcp_rules(public: Ipv4Addr, first_id: u64, first_port: u16, n: u16) -> Vec<serde_json::Value> {
    (0..n)
        .map(|i| {
            let port = first_port + i;
            ingress_rule(
                first_id + u64::from(i),
                public,
                "tcp",
                Some((port, port)),
                &["0.0.0.0/0".to_string()],
            )
        })
        .collect()
}

/// The ingress rules natd lists, by public address.
fn rules_of(natd: &Natd, public: Ipv4Addr) -> anyhow::Result<usize> {
    Ok(natd
        .natctl()?
        .firewall_rules()?
        .iter()
        .filter(|r| r.public == public)
        .count())
}

/// A payload of one rule for Q with more source prefixes than `FW_SRC` holds (131,072 over
/// all public IPs): 131,073 distinct, non-adjacent /32s.
fn too_many_sources() -> String {
    let cidrs: Vec<String> = (0..131_073u32)
        .map(|i| {
            let [_, a, b, c] = (i * 2).to_be_bytes();
            format!("100.{}.{b}.{c}/32", 64 + a)
        })
        .collect();
    firewall_payload(vec![ingress_rule(9000, Q, "udp", None, &cidrs)])
}

/// Runs `natctl apply` on `payload`; returns its error message, or fails if natd accepted it.
/// Counts the change, and its refusal, in `fig`.
fn refused(
    topo: &Topology,
    natd: &Natd,
    name: &str,
    payload: &str,
    fig: &mut Figures,
) -> anyhow::Result<String> {
    let file = payload_file(topo, name, payload)?;
    let out = natd.natctl()?.run(&["apply", &file])?;
    fig.add(TRIED, 1);
    fig.add(REFUSED, u64::from(!out.status.success()));
    ensure!(
        !out.status.success(),
        "natd accepted {name}: {}",
        out.stdout
    );
    Ok(out.stderr)
}

const TRIED: &str = "changes beyond a fast-path limit tried";
const REFUSED: &str = "changes beyond a fast-path limit refused";
const NAMED: &str = "refusals that named the limit (and the rule)";

/// The fast path's limits: 256 ingress rules per public IP (a bit each in a 256-bit map), 256
/// egress rules, 131,072 source prefixes over all rules (`FW_SRC`). A change beyond one is
/// refused whole, naming the limit, whether it comes from natctl or from a CloudStack payload
/// and whatever else the payload held; the rules in place keep working.
#[test]
fn changes_beyond_the_fast_path_limits_are_refused_whole() -> anyhow::Result<()> {
    let mut fig = Figures::new("exhaustion");
    let topo = Topology::new()?;
    let config = format!("{ONE_MAPPING}[[mapping]]\npublic = \"{Q}\"\nprivate = \"10.0.0.11\"\n");
    let natd = Natd::start(&topo, Some(&config))?;
    let natctl = natd.natctl()?;
    let limit = "the most it can have";

    let file = payload_file(
        &topo,
        "256.json",
        &firewall_payload(tcp_rules(PUBLIC_ADDR, 1000, 1, 256)),
    )?;
    natctl.ok(&["apply", &file])?;
    ensure!(
        rules_of(&natd, PUBLIC_ADDR)? == 256,
        "256 rules were not all added"
    );
    let before = natctl.firewall_rules()?;
    let named = |fig: &mut Figures, ok: bool| fig.add(NAMED, u64::from(ok));

    let out = natctl.run(&[
        "firewall",
        "add",
        &PUBLIC_ADDR.to_string(),
        "--proto",
        "udp",
    ])?;
    fig.add(TRIED, 1);
    fig.add(REFUSED, u64::from(!out.status.success()));
    let ok = out.stderr.contains("256 ingress rules") && out.stderr.contains(limit);
    named(&mut fig, ok);
    ensure!(
        !out.status.success() && ok,
        "natctl firewall add of a 257th rule: {out:?}"
    );

    // A payload whose first rule fits (for Q) and whose second does not (for P).
    let mut rules = tcp_rules(Q, 5000, 80, 1);
    rules.extend(tcp_rules(PUBLIC_ADDR, 5001, 5001, 1));
    let msg = refused(
        &topo,
        &natd,
        "257th.json",
        &firewall_payload(rules),
        &mut fig,
    )?;
    let ok = msg.contains("rule #2 (id 5001)")
        && msg.contains("256 ingress rules")
        && msg.contains(limit);
    named(&mut fig, ok);
    ensure!(
        ok,
        "the refusal does not name the rule and the limit: {msg}"
    );
    let msg = refused(
        &topo,
        &natd,
        "300.json",
        &firewall_payload(tcp_rules(Q, 6000, 1, 300)),
        &mut fig,
    )?;
    let ok = msg.contains("rule #257") && msg.contains(limit);
    named(&mut fig, ok);
    ensure!(ok, "{msg}");

    let egress: Vec<_> = (0..257u16)
        .map(|i| {
            serde_json::json!({
                "id": 7000 + u64::from(i), "src_ip": "", "protocol": "tcp",
                "src_port_range": [i + 1, i + 1], "revoked": false,
                "source_cidr_list": [], "dest_cidr_list": ["0.0.0.0/0"],
                "traffic_type": "Egress", "default_egress_policy": true,
            })
        })
        .collect();
    let msg = refused(
        &topo,
        &natd,
        "egress.json",
        &firewall_payload(egress),
        &mut fig,
    )?;
    let ok = msg.contains("256 egress rules") && msg.contains(limit);
    named(&mut fig, ok);
    ensure!(ok, "{msg}");

    let start = Instant::now();
    let msg = refused(&topo, &natd, "fw-src.json", &too_many_sources(), &mut fig)?;
    eprintln!(
        "131,073 source prefixes refused in {:?}: {msg}",
        start.elapsed()
    );
    let ok = msg.contains("nothing changed") && msg.contains("FW_SRC");
    named(&mut fig, ok);
    ensure!(ok, "{msg}");

    let firewall_changed = natctl.firewall_rules()? != before;
    let egress_added = natctl.egress()?.rules.len();
    fig.set(
        "rule sets changed by refused changes",
        u64::from(firewall_changed) + u64::from(egress_added > 0),
    );
    ensure!(!firewall_changed, "the firewall changed");
    ensure!(egress_added == 0, "{egress_added} egress rules were added");
    // The rules in place still decide: P:200 is open, P:300 is not.
    tcp_exchange(
        &topo.guest,
        at(GUEST_ADDR, 200),
        &topo.client,
        at(PUBLIC_ADDR, 200),
        1024,
    )?;
    let listener = udp_bind(&topo.guest, at(GUEST_ADDR, 300))?;
    natctl.dropped(PUBLIC_ADDR, Way::In, "a datagram to P:300", || {
        udp_send(&topo.client, None, at(PUBLIC_ADDR, 300), b"closed")
    })?;
    nat_tests::topology::attempt::assert_no_datagram(&listener)?;
    fig.done();
    Ok(())
}

/// More source prefixes than `FW_SRC` holds are refused before anything is written, naming
/// the limit, like the other limits.
#[test]
fn source_prefixes_beyond_fw_src_are_refused_naming_the_limit() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let config = format!("[[mapping]]\npublic = \"{Q}\"\nprivate = \"10.0.0.11\"\n");
    let natd = Natd::start(&topo, Some(&config))?;
    let mut fig = Figures::new("exhaustion");
    let msg = refused(&topo, &natd, "fw-src.json", &too_many_sources(), &mut fig)?;
    ensure!(
        msg.contains("131072") || msg.contains("131,072"),
        "the refusal does not name FW_SRC's limit: {msg}"
    );
    fig.done();
    Ok(())
}
