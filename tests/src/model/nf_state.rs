//! The model's own connection-tracking semantics, written from Linux netfilter v6.1
//! (`nf_conntrack_proto_tcp.c`, `nf_conntrack_proto_udp.c` for UDP and UDP-Lite alike,
//! `nf_conntrack_proto_icmp.c`, `nf_conntrack_core.c`'s SEEN_REPLY, the generic tracker, which
//! the product uses for DCCP with its ports) and never from
//! `nat_common::conntrack`: the TCP table is netfilter's array as printed there, with its own
//! `sNO`/`sSS`/... names; timeouts are netfilter's tables; the C control flow of
//! `nf_conntrack_tcp_packet` and `tcp_in_window` is followed step by step ([`tcp`],
//! [`window`]). `nat_common` supplies only the encoding the program stores (state, flag and
//! timer numbers), which [`NfConn::encoded`] maps to.
//!
//! The product's one deviation, as issue 10 asks: a SYN on a TIME_WAIT or CLOSE flow, from
//! either side, starts a new flow that the firewall judges ([`Ret::New`]).
//!
//! [`Kept`] says which of netfilter's per-flow data the model keeps, so that the differential
//! tests hold the model to what the XDP program keeps today (state, two status bits, timer)
//! while host tests and the agreement proptest run it with everything.
// netfilter's own names for its states (`sNO`, `sSS`...), also in patterns.
#![allow(non_upper_case_globals)]
mod tcp;
mod window;

use nat_common::conntrack::{ASSURED, SEEN_REPLY, State, Timeout};

pub use self::{tcp::IpCtTcp, window::IpCtTcpState};

/// `enum tcp_conntrack`, under the names `nf_conntrack_proto_tcp.c` gives them.
pub mod names {
    pub const sNO: u8 = 0;
    pub const sSS: u8 = 1;
    pub const sSR: u8 = 2;
    pub const sES: u8 = 3;
    pub const sFW: u8 = 4;
    pub const sCW: u8 = 5;
    pub const sLA: u8 = 6;
    pub const sTW: u8 = 7;
    pub const sCL: u8 = 8;
    pub const sS2: u8 = 9;
    /// `TCP_CONNTRACK_MAX`: invalid.
    pub const sIV: u8 = 10;
    /// `TCP_CONNTRACK_IGNORE`.
    pub const sIG: u8 = 11;
    /// `TCP_CONNTRACK_RETRANS`, `TCP_CONNTRACK_UNACK`: timeout slots only.
    pub const RETRANS: u8 = 12;
    pub const UNACK: u8 = 13;
}
use names::*;

/// `enum tcp_bit_set`.
pub const TCP_SYN_SET: usize = 0;
pub const TCP_SYNACK_SET: usize = 1;
pub const TCP_FIN_SET: usize = 2;
pub const TCP_ACK_SET: usize = 3;
pub const TCP_RST_SET: usize = 4;
pub const TCP_NONE_SET: usize = 5;

/// `tcp_conntracks[dir][index][state]` of v6.1, transcribed.
#[rustfmt::skip]
pub const TCP_CONNTRACKS: [[[u8; 10]; 6]; 2] = [
    [
/* ORIGINAL */
/*             sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2 */
/* syn    */ [ sSS, sSS, sIG, sIG, sIG, sIG, sIG, sSS, sSS, sS2 ],
/* synack */ [ sIV, sIV, sSR, sIV, sIV, sIV, sIV, sIV, sIV, sSR ],
/* fin    */ [ sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV ],
/* ack    */ [ sES, sIV, sES, sES, sCW, sCW, sTW, sTW, sCL, sIV ],
/* rst    */ [ sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL ],
/* none   */ [ sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV ],
    ],
    [
/* REPLY */
/*             sNO, sSS, sSR, sES, sFW, sCW, sLA, sTW, sCL, sS2 */
/* syn    */ [ sIV, sS2, sIV, sIV, sIV, sIV, sIV, sSS, sIV, sS2 ],
/* synack */ [ sIV, sSR, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sSR ],
/* fin    */ [ sIV, sIV, sFW, sFW, sLA, sLA, sLA, sTW, sCL, sIV ],
/* ack    */ [ sIV, sIG, sSR, sES, sCW, sCW, sTW, sTW, sCL, sIG ],
/* rst    */ [ sIV, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL, sCL ],
/* none   */ [ sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV, sIV ],
    ],
];

const SECS: u64 = 1;
const MINS: u64 = 60 * SECS;
const DAYS: u64 = 24 * 60 * MINS;

/// `tcp_timeouts` in seconds, by `enum tcp_conntrack` (slot 0 is SYN_SENT's, as
/// `nf_conntrack_tcp_init_net` sets it; 10 and 11 are never timers).
pub const TCP_TIMEOUTS: [u64; 14] = [
    2 * MINS,
    2 * MINS,
    60 * SECS,
    5 * DAYS,
    2 * MINS,
    60 * SECS,
    30 * SECS,
    2 * MINS,
    10 * SECS,
    2 * MINS,
    0,
    0,
    5 * MINS,
    5 * MINS,
];
/// `udp_timeouts`: `UDP_CT_UNREPLIED`, `UDP_CT_REPLIED`.
pub const UDP_TIMEOUTS: [u64; 2] = [30 * SECS, 120 * SECS];
pub const UDP_CT_UNREPLIED: usize = 0;
pub const UDP_CT_REPLIED: usize = 1;
/// `nf_ct_icmp_timeout`, `nf_ct_generic_timeout`.
pub const ICMP_TIMEOUT: u64 = 30 * SECS;
pub const GENERIC_TIMEOUT: u64 = 600 * SECS;

/// ICMP `invmap`: request <-> reply, as `type + 1` (0 = not a query).
const ICMP_INVMAP: [u8; 19] = {
    let mut m = [0u8; 19];
    m[8] = 1;
    m[0] = 8 + 1;
    m[13] = 14 + 1;
    m[14] = 13 + 1;
    m[15] = 16 + 1;
    m[16] = 15 + 1;
    m[17] = 18 + 1;
    m[18] = 17 + 1;
    m
};
/// ICMP `valid_new`: the types that may open a flow.
const ICMP_VALID_NEW: [bool; 18] = {
    let mut v = [false; 18];
    v[8] = true;
    v[13] = true;
    v[15] = true;
    v[17] = true;
    v
};

/// The counterpart type of an ICMP query message (`invmap`), `None` if not a query.
pub fn icmp_inverse(ty: u8) -> Option<u8> {
    match ICMP_INVMAP.get(ty as usize) {
        Some(&n) if n != 0 => Some(n - 1),
        _ => None,
    }
}

/// Whether an ICMP message of type `ty` may open a flow.
pub fn icmp_valid_new(ty: u8) -> bool {
    ICMP_VALID_NEW.get(ty as usize).copied().unwrap_or(false)
}

/// The type the guest sends in the flow of a query message `ty` (the flow is named by it and
/// the identifier): `ty` from the guest, its inverse to the guest.
pub fn icmp_guest_type(ty: u8, from_guest: bool) -> Option<u8> {
    let inv = icmp_inverse(ty)?;
    Some(if from_guest { ty } else { inv })
}

/// The timer slot of `state` when nothing shortens it (netfilter's `timeouts[state]`).
pub fn state_slot(state: State) -> Timeout {
    match state {
        State::UdpUnreplied => Timer::Udp(UDP_CT_UNREPLIED),
        State::UdpReplied => Timer::Udp(UDP_CT_REPLIED),
        State::Icmp => Timer::Icmp,
        State::Other => Timer::Generic,
        tcp => Timer::Tcp(tcp as u8),
    }
    .slot()
}

/// Which of netfilter's per-flow data the model keeps between packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    /// Both directions' windows (`seen[]`): without them the model runs as netfilter with
    /// `nf_conntrack_tcp_no_window_check=1`.
    pub tcp_window: bool,
    /// What netfilter notes of the last packet (`last_index`, `last_dir`, `last_seq`,
    /// `last_ack`, `last_end`, `last_win`, `last_wscale`, `last_flags`, `retrans`).
    pub tcp_last: bool,
    /// When the flow's first packet was seen (UDP's two-second stream rule); without it every
    /// UDP flow is past its first two seconds.
    pub start: bool,
}

impl Kept {
    /// Everything netfilter keeps.
    pub const ALL: Kept = Kept {
        tcp_window: true,
        tcp_last: true,
        start: true,
    };
    /// What the XDP program keeps today: state, SEEN_REPLY, ASSURED, the timer.
    pub const PROGRAM: Kept = Kept {
        tcp_window: false,
        tcp_last: false,
        start: false,
    };
}

impl Default for Kept {
    /// The program's (the differential tests compare the model with it).
    fn default() -> Self {
        Kept::PROGRAM
    }
}

/// An idle timer: `Tcp(enum tcp_conntrack or RETRANS/UNACK)`, `Udp(UDP_CT_*)`, ICMP, generic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    Tcp(u8),
    Udp(usize),
    Icmp,
    Generic,
}

impl Timer {
    /// netfilter's default length, in seconds.
    pub fn default_secs(self) -> u64 {
        match self {
            Timer::Tcp(i) => TCP_TIMEOUTS[i as usize],
            Timer::Udp(i) => UDP_TIMEOUTS[i],
            Timer::Icmp => ICMP_TIMEOUT,
            Timer::Generic => GENERIC_TIMEOUT,
        }
    }

    /// The program's configuration slot for this timer.
    pub fn slot(self) -> Timeout {
        match self {
            Timer::Tcp(sNO | sSS) => Timeout::TcpSynSent,
            Timer::Tcp(sSR) => Timeout::TcpSynRecv,
            Timer::Tcp(sES) => Timeout::TcpEstablished,
            Timer::Tcp(sFW) => Timeout::TcpFinWait,
            Timer::Tcp(sCW) => Timeout::TcpCloseWait,
            Timer::Tcp(sLA) => Timeout::TcpLastAck,
            Timer::Tcp(sTW) => Timeout::TcpTimeWait,
            Timer::Tcp(sCL) => Timeout::TcpClose,
            Timer::Tcp(sS2) => Timeout::TcpSynSent2,
            Timer::Tcp(RETRANS) => Timeout::TcpRetrans,
            Timer::Tcp(UNACK) => Timeout::TcpUnack,
            Timer::Tcp(n) => panic!("tcp_conntrack {n} is not a timer"),
            Timer::Udp(UDP_CT_UNREPLIED) => Timeout::UdpUnreplied,
            Timer::Udp(_) => Timeout::UdpReplied,
            Timer::Icmp => Timeout::Icmp,
            Timer::Generic => Timeout::Other,
        }
    }

    /// The timer of a stored slot.
    pub fn of_slot(t: Timeout) -> Timer {
        match t {
            Timeout::TcpSynSent => Timer::Tcp(sSS),
            Timeout::TcpSynRecv => Timer::Tcp(sSR),
            Timeout::TcpEstablished => Timer::Tcp(sES),
            Timeout::TcpFinWait => Timer::Tcp(sFW),
            Timeout::TcpCloseWait => Timer::Tcp(sCW),
            Timeout::TcpLastAck => Timer::Tcp(sLA),
            Timeout::TcpTimeWait => Timer::Tcp(sTW),
            Timeout::TcpClose => Timer::Tcp(sCL),
            Timeout::TcpSynSent2 => Timer::Tcp(sS2),
            Timeout::TcpRetrans => Timer::Tcp(RETRANS),
            Timeout::TcpUnack => Timer::Tcp(UNACK),
            Timeout::UdpUnreplied => Timer::Udp(UDP_CT_UNREPLIED),
            Timeout::UdpReplied => Timer::Udp(UDP_CT_REPLIED),
            Timeout::Icmp => Timer::Icmp,
            Timeout::Other => Timer::Generic,
        }
    }
}

/// The per-protocol part of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp(IpCtTcp),
    /// `stream_ts`: two seconds after the first packet (ns).
    Udp {
        stream_ts: u64,
    },
    Icmp,
    Generic,
}

/// A flow as netfilter keeps it: status bits, the running timer, the protocol's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NfConn {
    pub seen_reply: bool,
    pub assured: bool,
    pub timer: Timer,
    pub l4: L4,
}

/// What a packet is to its flow (the protocol handler's return value, product-wise).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ret {
    /// `NF_ACCEPT` after a refresh with this timer, or without one (`None`).
    Accept(Option<Timer>),
    /// `NF_ACCEPT` without touching state or timer.
    Ignore,
    /// `-NF_ACCEPT`: not part of the flow; `true`: `nf_tcp_handle_invalid` lowers the timer.
    Invalid(bool),
    /// Closed flow, new connection (the product's rule for SYNs on TIME_WAIT/CLOSE).
    New,
    /// `nf_ct_kill` of an unanswered flow whose answer is an RST; the RST passes.
    Close,
}

/// The TCP facts of a segment: what `nf_conntrack_proto_tcp.c` reads from the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Byte 13 of the header.
    pub flags: u8,
    pub seq: u32,
    pub ack_seq: u32,
    pub window: u16,
    /// Payload bytes (`skb->len - dataoff - doff * 4`).
    pub len: u32,
    /// The option bytes (`doff * 4 - 20` of them).
    pub options: [u8; 40],
    pub options_len: usize,
}

impl Seg {
    pub fn options(&self) -> &[u8] {
        &self.options[..self.options_len]
    }
}

/// The configured length of a timer in ns (`timeouts_ns` by slot, 0 = netfilter's default).
pub fn length_ns(timeouts_ns: &[u64], t: Timer) -> u64 {
    match timeouts_ns.get(t.slot() as usize) {
        Some(&n) if n != 0 => n,
        _ => t.default_secs() * 1_000_000_000,
    }
}

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_UDPLITE: u8 = 136;
const IPPROTO_ICMP: u8 = 1;

impl NfConn {
    /// The first packet of a flow at `now` (`init_conntrack`, the protocol's `new`, then its
    /// packet handler). ICMP: the caller opens only for [`icmp_valid_new`] types.
    pub fn open(
        proto: u8,
        seg: &Seg,
        kept: &Kept,
        timeouts_ns: &[u64],
        now: u64,
    ) -> Option<NfConn> {
        let mut ct = NfConn {
            seen_reply: false,
            assured: false,
            timer: Timer::Generic,
            l4: L4::Generic,
        };
        match proto {
            IPPROTO_TCP => {
                ct.l4 = L4::Tcp(tcp::tcp_new(seg)?);
                ct.timer = Timer::Tcp(sSS);
            }
            IPPROTO_UDP | IPPROTO_UDPLITE => {
                ct.l4 = L4::Udp {
                    stream_ts: now + 2_000_000_000,
                };
                ct.timer = Timer::Udp(UDP_CT_UNREPLIED);
            }
            IPPROTO_ICMP => {
                ct.l4 = L4::Icmp;
                ct.timer = Timer::Icmp;
            }
            _ => {}
        }
        match ct.packet(false, seg, kept, timeouts_ns, now) {
            Ret::Accept(_) => Some(ct),
            _ => None,
        }
    }

    /// A packet of this flow, from the responder if `reply`, at `now`.
    pub fn packet(
        &mut self,
        reply: bool,
        seg: &Seg,
        kept: &Kept,
        timeouts_ns: &[u64],
        now: u64,
    ) -> Ret {
        let dir = usize::from(reply);
        let ret = match &mut self.l4 {
            L4::Tcp(t) => {
                if !kept.tcp_window {
                    t.seen = [IpCtTcpState::default(); 2];
                }
                if !kept.tcp_last {
                    t.forget_last();
                }
                let mut t2 = *t;
                let ret = tcp::nf_conntrack_tcp_packet(self, &mut t2, dir, seg, kept, timeouts_ns);
                self.l4 = L4::Tcp(t2);
                ret
            }
            L4::Udp { stream_ts } => {
                // nf_conntrack_udp_packet.
                let stream_ts = *stream_ts;
                let timer = if self.seen_reply {
                    self.assured = true;
                    if !kept.start || now > stream_ts {
                        Timer::Udp(UDP_CT_REPLIED)
                    } else {
                        Timer::Udp(UDP_CT_UNREPLIED)
                    }
                } else {
                    Timer::Udp(UDP_CT_UNREPLIED)
                };
                Ret::Accept(Some(timer))
            }
            L4::Icmp => Ret::Accept(Some(Timer::Icmp)),
            L4::Generic => Ret::Accept(Some(Timer::Generic)),
        };
        if let Ret::Accept(Some(t)) = ret {
            self.timer = t;
        }
        // nf_conntrack_in: a reply the protocol accepted marks the flow replied.
        if matches!(ret, Ret::Accept(_) | Ret::Ignore) && dir == 1 {
            self.seen_reply = true;
        }
        ret
    }

    /// A flow known only by what the program stores (state, status bits, timer).
    pub fn from_encoded(state: State, flags: u8, timer: Timeout) -> NfConn {
        let l4 = match state {
            State::UdpUnreplied | State::UdpReplied => L4::Udp { stream_ts: 0 },
            State::Icmp => L4::Icmp,
            State::Other => L4::Generic,
            tcp => L4::Tcp(IpCtTcp::forgotten(tcp as u8)),
        };
        NfConn {
            seen_reply: flags & SEEN_REPLY != 0,
            assured: flags & ASSURED != 0,
            timer: Timer::of_slot(timer),
            l4,
        }
    }

    /// What the program stores of this flow: state, status bits, timer slot.
    pub fn encoded(&self) -> (State, u8, Timeout) {
        let state = match self.l4 {
            L4::Tcp(t) => match t.state {
                sNO => State::TcpNone,
                sSS => State::TcpSynSent,
                sSR => State::TcpSynRecv,
                sES => State::TcpEstablished,
                sFW => State::TcpFinWait,
                sCW => State::TcpCloseWait,
                sLA => State::TcpLastAck,
                sTW => State::TcpTimeWait,
                sCL => State::TcpClose,
                sS2 => State::TcpSynSent2,
                n => panic!("tcp_conntrack {n} stored"),
            },
            L4::Udp { .. } if self.seen_reply => State::UdpReplied,
            L4::Udp { .. } => State::UdpUnreplied,
            L4::Icmp => State::Icmp,
            L4::Generic => State::Other,
        };
        let flags =
            if self.seen_reply { SEEN_REPLY } else { 0 } | if self.assured { ASSURED } else { 0 };
        (state, flags, self.timer.slot())
    }
}

#[cfg(test)]
mod tests;
