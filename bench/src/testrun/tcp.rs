//! The hot pair's TCP flows: opened by a three-way handshake through the program, then
//! measured with the remote's data segments (see [`super::measure::Scenario::TcpEstablished`]).
//!
//! The guest of each mapping of the pair (H1 behind H0, H0 behind H1) connects from
//! [`DPORT`] to [`SRC`]:[`REMOTE_PORT`], as the UDP flows of the pair do to SRC:[`SPORT`]: a
//! segment from SRC:REMOTE_PORT to H0:DPORT is the reply direction of the first flow, is
//! rewritten to H1:DPORT, and is then the reply direction of the second, whose rewrite leads
//! back to H0. The program does not
//! touch sequence numbers, so every repetition carries the same ones.
use std::net::Ipv4Addr;

use anyhow::{Context as _, ensure};
use nat_common::{
    ENTRY_ACKED, ENTRY_FAST, ENTRY_PENDING, ENTRY_SEQ, Event, FlowEntry, FlowTuple, Reason,
    conntrack::{ASSURED, State},
    proto,
};

use super::{
    runs::{Expect, Frames},
    setup::{Bed, DPORT, H0, H1, SPORT, SRC},
};
use crate::frame::{TCP_ACK, TCP_PSH, TCP_SYN, Tcp};

/// The remote's TCP port. Not [`SPORT`]: the breakdown (section 1b) uses the UDP hot flow's
/// tuple as TCP as a flow no table holds.
pub const REMOTE_PORT: u16 = 443;
const _: () = assert!(REMOTE_PORT != SPORT);

/// Initial sequence numbers of the guests' connections and of the remote's answers.
pub const GUEST_ISN: u32 = 0x1000_0000;
pub const REMOTE_ISN: u32 = 0x2000_0000;
/// Payload bytes of a measured segment: 14 + 20 + 20 + 6 = 60 bytes, the UDP rows' frame
/// size.
pub const PAYLOAD: usize = 6;

impl Frames {
    /// A segment from the remote ([`SRC`]:[`REMOTE_PORT`]) to `dst`:[`DPORT`], arriving on pub0.
    pub fn tcp_inbound(
        &self,
        dst: Ipv4Addr,
        seq: u32,
        ack: u32,
        flags: u8,
        payload: usize,
    ) -> Vec<u8> {
        Tcp {
            dst_mac: self.pub0_mac,
            src_mac: self.pub1_mac,
            src: SRC,
            dst,
            sport: REMOTE_PORT,
            dport: DPORT,
            ttl: 255,
            seq,
            ack,
            flags,
            payload,
        }
        .build()
    }

    /// A guest's segment from `guest`:[`DPORT`] to [`SRC`]:[`REMOTE_PORT`], arriving on gst0.
    fn tcp_outbound(&self, guest: Ipv4Addr, seq: u32, ack: u32, flags: u8) -> Vec<u8> {
        Tcp {
            dst_mac: self.gst0_mac,
            src_mac: self.gst1_mac,
            src: guest,
            dst: SRC,
            sport: DPORT,
            dport: REMOTE_PORT,
            ttl: 255,
            seq,
            ack,
            flags,
            payload: 0,
        }
        .build()
    }

    /// The remote's in-order data segment `k` (PSH|ACK, [`PAYLOAD`] bytes) after the
    /// handshake, to `dst`: it starts `k` segments after the remote's first data byte and
    /// acknowledges everything the guest sent.
    pub fn tcp_data(&self, dst: Ipv4Addr, k: u32) -> Vec<u8> {
        let seq = REMOTE_ISN
            .wrapping_add(1)
            .wrapping_add(k.wrapping_mul(PAYLOAD as u32));
        self.tcp_inbound(dst, seq, GUEST_ISN + 1, TCP_PSH | TCP_ACK, PAYLOAD)
    }
}

/// The lengths of the measured TCP and UDP frames (as built, for the report).
pub fn frame_lens() -> (usize, usize) {
    let f = Frames {
        pub0_mac: [0; 6],
        pub1_mac: [0; 6],
        gst0_mac: [0; 6],
        gst1_mac: [0; 6],
    };
    (
        f.tcp_data(H0, 0).len(),
        f.inbound(SRC, SPORT, H0, DPORT).len(),
    )
}

/// The key of the reply direction's entry whose packets arrive from the remote to `public`.
fn reply_key(public: Ipv4Addr) -> FlowTuple {
    FlowTuple::new(
        u32::from_ne_bytes(SRC.octets()),
        u32::from_ne_bytes(public.octets()),
        REMOTE_PORT.to_be(),
        DPORT.to_be(),
        proto::TCP,
    )
}

impl Bed {
    /// Opens the hot pair's TCP flows the way a connection opens: the guest's SYN, the
    /// remote's SYN/ACK, the guest's ACK, each step checked against the counters; then checks
    /// in `FLOWS` that each flow is ESTABLISHED and assured and its reply entry may take the
    /// fast path.
    pub fn seed_tcp(&mut self) -> anyhow::Result<()> {
        // (guest, public) of each flow.
        let pair = [(H1, H0), (H0, H1)];
        let (pub0, gst0) = (self.pub0, self.gst0);
        let f = self.frames;
        let steps = [
            (
                "guests' SYNs",
                Reason::OutboundForwarded,
                vec![(Event::ConntrackMiss, 2), (Event::ConntrackCreate, 2)],
            ),
            (
                "remote's SYN/ACKs",
                Reason::InboundForwarded,
                vec![(Event::ConntrackHit, 2), (Event::RouteResolved, 2)],
            ),
            (
                "guests' ACKs",
                Reason::OutboundForwarded,
                vec![(Event::ConntrackHit, 2)],
            ),
        ];
        for (i, (step, reason, events)) in steps.into_iter().enumerate() {
            let before = self.counters()?;
            match i {
                0 => self.walk_by(gst0, 2, 1, |k| {
                    f.tcp_outbound(pair[k as usize].0, GUEST_ISN, 0, TCP_SYN)
                })?,
                1 => self.walk_by(pub0, 2, 1, |k| {
                    let ack = GUEST_ISN + 1;
                    f.tcp_inbound(pair[k as usize].1, REMOTE_ISN, ack, TCP_SYN | TCP_ACK, 0)
                })?,
                _ => self.walk_by(gst0, 2, 1, |k| {
                    f.tcp_outbound(pair[k as usize].0, GUEST_ISN + 1, REMOTE_ISN + 1, TCP_ACK)
                })?,
            };
            self.check(
                &format!("opening the hot pair's TCP flows: {step}"),
                &before,
                2,
                &Expect {
                    reason,
                    events: &events,
                },
            )?;
        }
        for (_, public) in pair {
            let (reply, orig) = self.tcp_entries(public)?;
            ensure!(
                reply.flags & ENTRY_FAST != 0 && reply.flags & ENTRY_PENDING == 0,
                "TCP flow to {public}: its reply entry may not take the fast path (flags {:#x})",
                reply.flags
            );
            ensure!(
                orig.state == State::TcpEstablished as u8 && orig.ct_flags & ASSURED != 0,
                "TCP flow to {public}: state {:?}, conntrack flags {:#x}, not ESTABLISHED and \
                 assured",
                State::from_u8(orig.state),
                orig.ct_flags
            );
        }
        Ok(())
    }

    /// The hot pair's TCP flow reached through `public`: its reply and original entries in
    /// `FLOWS`, as natd reads them (merged with their slots, where fast packets note their
    /// segments).
    pub fn tcp_entries(&mut self, public: Ipv4Addr) -> anyhow::Result<(FlowEntry, FlowEntry)> {
        let reply = self
            .dp
            .flow_entry(&reply_key(public))?
            .with_context(|| format!("TCP flow to {public}: no reply entry in FLOWS"))?;
        let orig = self
            .dp
            .flow_entry(&reply.peer)?
            .with_context(|| format!("TCP flow to {public}: no original entry in FLOWS"))?;
        Ok((reply, orig))
    }

    /// Fails unless the reply entry of the flow through `public` noted the remote's segments
    /// up to `seq_end` (and the guest's data acknowledged): the window note ran.
    pub fn check_tcp_note(&mut self, public: Ipv4Addr, seq_end: u32) -> anyhow::Result<()> {
        let (reply, _) = self.tcp_entries(public)?;
        let want = ENTRY_SEQ | ENTRY_ACKED;
        ensure!(
            reply.flags & want == want
                && reply.seq_end == seq_end
                && reply.max_ack == GUEST_ISN + 1,
            "TCP flow to {public}: the reply entry noted sequence end {:#x} and acknowledgment \
             {:#x} (flags {:#x}), expected {seq_end:#x} and {:#x}",
            reply.seq_end,
            reply.max_ack,
            reply.flags,
            GUEST_ISN + 1
        );
        Ok(())
    }
}
