//! Connection-tracking state machine, shared by the XDP program and the reference model.
//!
//! A simplified netfilter `nf_conntrack_proto_tcp`: no window tracking, loose pickup of
//! mid-stream TCP (netfilter's default `nf_conntrack_tcp_loose=1`), idle timeouts per state with
//! netfilter's defaults.
use crate::maps::TIMEOUT_SLOTS;

/// Flow states; the discriminant indexes the timeout table.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    TcpSynSent = 0,
    TcpSynRecv = 1,
    TcpEstablished = 2,
    TcpFinWait = 3,
    TcpTimeWait = 4,
    TcpClose = 5,
    UdpUnreplied = 6,
    UdpReplied = 7,
    Icmp = 8,
    Other = 9,
}

impl State {
    pub const ALL: [State; TIMEOUT_SLOTS] = [
        State::TcpSynSent,
        State::TcpSynRecv,
        State::TcpEstablished,
        State::TcpFinWait,
        State::TcpTimeWait,
        State::TcpClose,
        State::UdpUnreplied,
        State::UdpReplied,
        State::Icmp,
        State::Other,
    ];

    #[inline(always)]
    pub const fn from_u8(v: u8) -> State {
        match v {
            0 => State::TcpSynSent,
            1 => State::TcpSynRecv,
            2 => State::TcpEstablished,
            3 => State::TcpFinWait,
            4 => State::TcpTimeWait,
            5 => State::TcpClose,
            6 => State::UdpUnreplied,
            7 => State::UdpReplied,
            8 => State::Icmp,
            _ => State::Other,
        }
    }

    /// Name used by natctl, config keys and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            State::TcpSynSent => "tcp_syn_sent",
            State::TcpSynRecv => "tcp_syn_recv",
            State::TcpEstablished => "tcp_established",
            State::TcpFinWait => "tcp_fin_wait",
            State::TcpTimeWait => "tcp_time_wait",
            State::TcpClose => "tcp_close",
            State::UdpUnreplied => "udp_unreplied",
            State::UdpReplied => "udp_replied",
            State::Icmp => "icmp",
            State::Other => "other",
        }
    }

    /// netfilter's default idle timeout for this state, in seconds.
    pub const fn default_timeout_secs(self) -> u64 {
        match self {
            State::TcpSynSent => 120,
            State::TcpSynRecv => 60,
            State::TcpEstablished => 432_000,
            State::TcpFinWait => 120,
            State::TcpTimeWait => 120,
            State::TcpClose => 10,
            State::UdpUnreplied => 30,
            State::UdpReplied => 120,
            State::Icmp => 30,
            State::Other => 600,
        }
    }
}

/// TCP flag bits of byte 13 of the TCP header (RFC 9293).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// FIN seen from the originator / from the responder ([`crate::FlowState::fins`]).
pub const FIN_ORIG: u8 = 1;
pub const FIN_REPLY: u8 = 2;

use crate::proto::{ICMP as PROTO_ICMP, TCP as PROTO_TCP, UDP as PROTO_UDP};

/// The ICMP queries netfilter tracks (nf_conntrack_proto_icmp.c: echo, timestamp, information,
/// address mask): for a request or reply type, `(request type, reply type)`.
#[inline(always)]
pub const fn icmp_query(ty: u8) -> Option<(u8, u8)> {
    match ty {
        8 | 0 => Some((8, 0)),
        13 | 14 => Some((13, 14)),
        15 | 16 => Some((15, 16)),
        17 | 18 => Some((17, 18)),
        _ => None,
    }
}

/// Whether `ty` is the request of an ICMP query (the only ICMP message that opens a flow).
#[inline(always)]
pub const fn icmp_request(ty: u8) -> bool {
    matches!(icmp_query(ty), Some((req, _)) if req == ty)
}

/// State of a flow opened by this packet, or `None` if it must not open one (a bare TCP RST).
#[inline(always)]
pub const fn initial(proto: u8, tcp_flags: u8) -> Option<State> {
    match proto {
        PROTO_TCP => {
            if tcp_flags & TCP_RST != 0 {
                None
            } else if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                Some(State::TcpSynSent)
            } else {
                Some(State::TcpEstablished)
            }
        }
        PROTO_UDP => Some(State::UdpUnreplied),
        PROTO_ICMP => Some(State::Icmp),
        _ => Some(State::Other),
    }
}

/// Next state and FIN bits after a packet of a tracked flow; `reply` = it travels from the
/// responder to the originator. `None`: the packet does not belong to this flow but starts a
/// new one in the other direction (a SYN from the responder once the flow is closed, as
/// netfilter treats it), so it must be judged as new.
#[inline(always)]
pub const fn next(
    state: State,
    fins: u8,
    proto: u8,
    tcp_flags: u8,
    reply: bool,
) -> Option<(State, u8)> {
    match proto {
        PROTO_TCP => next_tcp(state, fins, tcp_flags, reply),
        PROTO_UDP => {
            if reply {
                Some((State::UdpReplied, fins))
            } else {
                Some((state, fins))
            }
        }
        _ => Some((state, fins)),
    }
}

#[inline(always)]
const fn next_tcp(state: State, fins: u8, f: u8, reply: bool) -> Option<(State, u8)> {
    if f & TCP_RST != 0 {
        return Some((State::TcpClose, fins));
    }
    let syn = f & TCP_SYN != 0;
    let ack = f & TCP_ACK != 0;
    let closed = matches!(state, State::TcpTimeWait | State::TcpClose);
    if syn && !ack {
        // On a closed or time-wait flow a SYN, from either side, starts a new connection that
        // is judged afresh (the firewall decides again), as netfilter treats it; otherwise it
        // is a retransmission (or a simultaneous open) and changes nothing.
        return if closed { None } else { Some((state, fins)) };
    }
    if f & TCP_FIN != 0 {
        let fins = fins | if reply { FIN_REPLY } else { FIN_ORIG };
        let s = if fins == FIN_ORIG | FIN_REPLY {
            State::TcpTimeWait
        } else {
            State::TcpFinWait
        };
        return Some((s, fins));
    }
    Some(match state {
        State::TcpSynSent if syn && ack && reply => (State::TcpSynRecv, fins),
        State::TcpSynRecv if ack && !syn && !reply => (State::TcpEstablished, fins),
        _ => (state, fins),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_way_handshake_and_close() {
        let s = initial(6, TCP_SYN).unwrap();
        assert_eq!(s, State::TcpSynSent);
        let (s, f) = next(s, 0, 6, TCP_SYN | TCP_ACK, true).unwrap();
        assert_eq!(s, State::TcpSynRecv);
        let (s, f) = next(s, f, 6, TCP_ACK, false).unwrap();
        assert_eq!(s, State::TcpEstablished);
        let (s, f) = next(s, f, 6, TCP_FIN | TCP_ACK, false).unwrap();
        assert_eq!(s, State::TcpFinWait);
        let (s, f) = next(s, f, 6, TCP_FIN | TCP_ACK, true).unwrap();
        assert_eq!((s, f), (State::TcpTimeWait, 3));
        // A SYN from either side on a closed flow is a new connection, not this one.
        assert_eq!(next(s, f, 6, TCP_SYN, true), None);
        assert_eq!(next(s, f, 6, TCP_SYN, false), None);
        let (s, _) = next(State::TcpEstablished, 0, 6, TCP_RST, true).unwrap();
        assert_eq!(s, State::TcpClose);
        assert_eq!(next(s, 0, 6, TCP_SYN, false), None);
    }

    #[test]
    fn loose_pickup_and_no_flow_from_rst() {
        assert_eq!(initial(6, TCP_ACK), Some(State::TcpEstablished));
        assert_eq!(initial(6, TCP_RST | TCP_ACK), None);
        assert_eq!(initial(17, 0), Some(State::UdpUnreplied));
        assert_eq!(
            next(State::UdpUnreplied, 0, 17, 0, true).unwrap().0,
            State::UdpReplied
        );
        assert_eq!(initial(47, 0), Some(State::Other));
    }

    #[test]
    fn timeouts_cover_every_slot() {
        for (i, s) in State::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
            assert_eq!(State::from_u8(i as u8), *s);
            assert!(s.default_timeout_secs() > 0);
        }
    }
}
