//! TCP state changes only from inside the window a flow has shown, as netfilter's
//! `tcp_in_window`: a blind, spoofed RST or FIN with a connection's 4-tuple but a sequence
//! number far from the connection's is INVALID, and the flow stays ESTABLISHED and carries the
//! connection's data on the fast path; an RST at the connection's next sequence number ends
//! the flow. Sequence numbers are learned from the segments each end received (`TcpTap`).
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddrV4, TcpStream},
};

use anyhow::{Context as _, bail, ensure};
use nat_tests::{
    packet::{TCP_ACK, TCP_FIN, TCP_RST},
    topology::{
        CLIENT_ADDR, GUEST_ADDR, Natctl, Natd, PUBLIC_ADDR, Topology,
        attempt::{TcpAttempt, accept, expect_bytes, tcp_listen},
        fastpath::{self, Arrived},
        tcp_tap::{Segment, TcpTap},
    },
};
use nat_userspace::api::FlowInfo;

use super::{ONE_MAPPING, at};

/// The guest's port, which a rule opens to TCP.
const PORT: u16 = 8080;
/// How far from the connection's own numbers a blind segment's sequence number lies.
const FAR: u32 = 1 << 30;
/// Request/answer rounds that show the connection still carries data both ways.
const ROUNDS: u64 = 10;

/// Which end of the connection a spoofed segment claims to come from.
#[derive(Clone, Copy, Debug)]
enum Side {
    /// The remote on the public side (the connection's opener).
    Public,
    /// The guest.
    Guest,
}

/// A connection from the client to P:`PORT`, admitted by a rule and accepted by the guest,
/// with a tap on the client's and the guest's address.
struct Conn {
    remote: TcpStream,
    guest: TcpStream,
    remote_addr: SocketAddrV4,
    client_tap: TcpTap,
    guest_tap: TcpTap,
}

impl Conn {
    fn open(topo: &Topology, natctl: &Natctl, remote_port: u16) -> anyhow::Result<Self> {
        natctl.firewall_add(
            PUBLIC_ADDR,
            &["--proto", "tcp", "--ports", &PORT.to_string()],
        )?;
        let client_tap = TcpTap::open_in(&topo.client, CLIENT_ADDR)?;
        let guest_tap = TcpTap::open_in(&topo.guest, GUEST_ADDR)?;
        let listener = tcp_listen(&topo.guest, at(GUEST_ADDR, PORT))?;
        let remote_addr = at(CLIENT_ADDR, remote_port);
        let remote = TcpAttempt::start_from(&topo.client, remote_addr, at(PUBLIC_ADDR, PORT))?
            .connected()?;
        let (guest, peer) = accept(&listener)?;
        ensure!(peer == remote_addr.into(), "the guest accepted {peer}");
        Ok(Self {
            remote,
            guest,
            remote_addr,
            client_tap,
            guest_tap,
        })
    }

    /// `rounds` exchanges, each a request the remote sends and the guest reads, then an answer
    /// the guest sends and the remote reads: at least `rounds` segments arrive each way.
    fn ping_pong(&mut self, rounds: u64) -> anyhow::Result<()> {
        for i in 0..rounds {
            let (ping, pong) = (format!("ping {i:03}"), format!("pong {i:03}"));
            self.remote.write_all(ping.as_bytes())?;
            expect_bytes(&mut self.guest, ping.as_bytes()).context("at the guest")?;
            self.guest.write_all(pong.as_bytes())?;
            expect_bytes(&mut self.remote, pong.as_bytes()).context("at the remote")?;
        }
        Ok(())
    }

    /// The sequence numbers the remote and the guest send next, from the segments each
    /// received from the other (the guest's arrive at the client from P).
    fn next_seqs(&mut self) -> anyhow::Result<(u32, u32)> {
        let remote = self
            .guest_tap
            .next_seq(self.remote_addr, at(GUEST_ADDR, PORT))?;
        let guest = self
            .client_tap
            .next_seq(at(PUBLIC_ADDR, PORT), self.remote_addr)?;
        Ok((remote, guest))
    }

    /// The sequence number `side` sends next and the one the other side sends next, from
    /// the connection's own segments (learn them before spoofing: a forged segment would count
    /// as the connection's).
    fn numbers(&mut self, side: Side) -> anyhow::Result<(u32, u32)> {
        let (remote, guest) = self.next_seqs()?;
        Ok(match side {
            Side::Public => (remote, guest),
            Side::Guest => (guest, remote),
        })
    }

    /// Sends, as `side`, a segment with `flags`, `seq` and `ack`, and waits until it reached
    /// the other end: the XDP program has handled it.
    fn spoof(&mut self, side: Side, flags: u8, (seq, ack): (u32, u32)) -> anyhow::Result<()> {
        let remote = self.remote_addr;
        let what =
            format!("the spoofed segment (flags {flags:#04x}, seq {seq:#010x}) from {side:?}");
        let arrived = |s: &Segment| s.flags == flags && s.seq == seq;
        match side {
            Side::Public => {
                let to = at(PUBLIC_ADDR, PORT);
                self.client_tap.send(remote.port(), to, flags, (seq, ack))?;
                self.guest_tap
                    .wait_for(&what, |s| s.is(remote, at(GUEST_ADDR, PORT)) && arrived(s))?;
            }
            Side::Guest => {
                self.guest_tap.send(PORT, remote, flags, (seq, ack))?;
                self.client_tap
                    .wait_for(&what, |s| s.is(at(PUBLIC_ADDR, PORT), remote) && arrived(s))?;
            }
        }
        Ok(())
    }

    /// This connection's flow as `natctl conntrack list --json` shows it, if listed.
    fn flow(&self, natctl: &Natctl) -> anyhow::Result<Option<FlowInfo>> {
        let flows = natctl.flows()?.flows;
        let mine: Vec<&FlowInfo> = flows
            .iter()
            .filter(|f| {
                (f.proto, f.guest, f.guest_port, f.remote, f.remote_port)
                    == (6, GUEST_ADDR, PORT, CLIENT_ADDR, self.remote_addr.port())
            })
            .collect();
        match mine.as_slice() {
            [] => Ok(None),
            [f] => Ok(Some((*f).clone())),
            _ => bail!("more than one flow of the connection: {flows:#?}"),
        }
    }

    /// Fails unless this connection's flow is listed as ESTABLISHED; `when` names the moment.
    fn assert_established(&self, natctl: &Natctl, when: &str) -> anyhow::Result<()> {
        let flow = self.flow(natctl)?;
        ensure!(
            flow.as_ref().map(|f| f.state.as_str()) == Some("tcp_established"),
            "{when}: the connection's flow is {flow:?}, not tcp_established"
        );
        Ok(())
    }
}

/// The body of the blind-spoof tests: an ACK|RST and then an ACK|FIN, each with the 4-tuple of
/// `side` and a sequence number [`FAR`] beyond the one `side` sends next, reach the other end
/// (the rules admit them as packets of no flow), and leave the flow ESTABLISHED; then the
/// connection carries `ROUNDS` requests and answers, all forwarded by the fast path.
fn blind_spoofs_leave_the_flow(side: Side, remote_port: u16) -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let mut conn = Conn::open(&topo, &natctl, remote_port)?;
    conn.ping_pong(3)?;
    conn.assert_established(&natctl, "before the spoofed segments")?;

    let (own, peer) = conn.numbers(side)?;
    for (flags, name) in [(TCP_ACK | TCP_RST, "RST"), (TCP_ACK | TCP_FIN, "FIN")] {
        conn.spoof(side, flags, (own.wrapping_add(FAR), peer))?;
        conn.assert_established(&natctl, &format!("after a blind {name} from {side:?}"))?;
    }

    let before = natctl.stats()?;
    conn.ping_pong(ROUNDS)?;
    fastpath::carried(
        &before,
        &natctl.stats()?,
        &[
            Arrived::new("inbound_forwarded", ROUNDS, "requests at the guest"),
            Arrived::new("outbound_forwarded", ROUNDS, "answers at the remote"),
        ],
    )?;
    conn.assert_established(&natctl, "after the data that followed")
}

/// A remote's connection to the guest through P exchanges data; then the public side sends,
/// as the remote, an RST and a FIN whose sequence numbers lie 2^30 beyond the remote's: both
/// reach the guest (P's rule admits them), whose stack ignores them, and the flow stays
/// ESTABLISHED in `natctl conntrack list`; the connection then carries data both ways on the
/// fast path.
#[test]
fn a_blind_rst_from_the_public_side_does_not_end_a_guest_connection() -> anyhow::Result<()> {
    blind_spoofs_leave_the_flow(Side::Public, 40100)
}

/// As above, with the RST and FIN forged in the guest's namespace, as the guest, 2^30 beyond
/// the guest's sequence number: they reach the remote (the egress policy allows all), and the
/// flow stays ESTABLISHED and carries the connection on.
#[test]
fn a_blind_rst_from_the_guest_side_does_not_end_the_connection() -> anyhow::Result<()> {
    blind_spoofs_leave_the_flow(Side::Guest, 40300)
}

/// A remote's connection to the guest through P exchanges data; then the public side sends,
/// as the remote, an ACK|RST at exactly the remote's next sequence number: the guest's
/// connection is reset by it, and `natctl conntrack list` shows the flow closed (or no longer
/// lists it).
#[test]
fn an_rst_in_the_window_ends_the_flow() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start(&topo, Some(ONE_MAPPING))?;
    let natctl = natd.natctl()?;
    let mut conn = Conn::open(&topo, &natctl, 40200)?;
    conn.ping_pong(3)?;
    conn.assert_established(&natctl, "before the RST")?;

    let numbers = conn.numbers(Side::Public)?;
    conn.spoof(Side::Public, TCP_ACK | TCP_RST, numbers)?;
    let mut buf = [0u8; 16];
    match conn.guest.read(&mut buf) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => bail!("the guest's end read {other:?} after the in-window RST"),
    }
    let flow = conn.flow(&natctl)?;
    ensure!(
        flow.as_ref().is_none_or(|f| f.state == "tcp_close"),
        "after the in-window RST the connection's flow is {flow:?}, not closed"
    );
    Ok(())
}
