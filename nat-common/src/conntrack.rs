//! Connection tracking as Linux netfilter (v6.1) keeps it: TCP after `nf_conntrack_proto_tcp.c`
//! (the `tcp_conntracks` table, `get_conntrack_index`, `tcp_in_window`, the RST checks and the
//! timeouts of `nf_conntrack_tcp_packet`), UDP and UDP-Lite after `nf_conntrack_proto_udp.c`
//! (which tracks both alike, same states and timeouts), ICMP queries after
//! `nf_conntrack_proto_icmp.c`, everything else with the generic tracker's one timeout.
//!
//! DCCP is tracked by the generic tracker too (state [`State::Other`], its one timeout,
//! never ASSURED), keyed by its ports: netfilter's `nf_conntrack_proto_dccp.c` runs a state
//! machine (REQUEST 240 s, OPEN 12 h, ASSURED after the handshake's ACK), and recent kernels
//! (6.18 among them) have no DCCP tracker at all (the generic one, without ports). The generic timeout
//! (600 s) lies within the state machine's range and the flow is never INVALID, so what
//! netfilter lets through is let through; an idle DCCP flow ends sooner than in OPEN.
//! Plain functions over plain `#[repr(C)]` data ([`Conn`]), `no_std`, for the XDP program and
//! for host tests; the reference model in `nat-tests` has its own, independent encoding.
//!
//! One deviation, on purpose (issue 10): a SYN on a TIME_WAIT or CLOSE flow, from either side,
//! is [`Verdict::New`]: the old flow is over and the firewall judges the packet as a new one.
//! netfilter 6.1 does so when a FIN was seen or the RST came from the SYN's sender; otherwise it
//! lets an originator's SYN pass inside the dead flow and marks a responder's SYN INVALID.
//!
//! What a flow keeps and when it changes (see [`tcp`] and [`window`] for the details):
//! - every packet of every protocol: [`Conn::state`], [`Conn::flags`], [`Conn::timer`] (a few
//!   bytes, written only when they change) and the caller's last-seen time;
//! - every TCP packet, unless [`Config::tcp_no_window_check`]: the window of both directions
//!   ([`TcpDir`]: `td_end`, `td_maxend`, `td_maxwin`, `td_maxack`, each written only when it
//!   grows) and, for pure ACKs, the retransmission detector (`last_seq`, `last_ack`,
//!   `last_end`, `last_win`, `retrans`), plus `last_index`/`last_dir`;
//! - TCP SYN, SYN/ACK (window scale and SACK-permitted options, window re-initialisation),
//!   FIN (`CLOSE_INIT`) and RST (sequence checks against `td_maxack`) only.
//!
//! A caller (the XDP program) keeps a [`Conn`] and the last-seen time per flow, and:
//! - on a packet without a live flow that its policy admits: [`open`] (ICMP only for a
//!   request, [`icmp_opens`]; the key names the query with [`icmp_flow_type`]); store the
//!   `Conn`, last seen now;
//! - on a packet of a live flow (live: idle time within the length of [`Conn::timer`]):
//!   [`packet`], store the `Conn` back whatever the verdict, then per [`Verdict`]: `Accept(Some)`
//!   last seen now; `Accept(None)` and `Ignore` forward it as part of the flow; `Invalid` judge
//!   it by the rules, never open or replace the flow with it (`shorten`: see there); `New`
//!   judge it as a new flow, which replaces this one if admitted; `Close` forward it, delete
//!   the flow;
//! - fills [`Packet`] with the TCP header's flags, seq, ack, window and the payload length,
//!   the options parsed ([`parse_options`]) when SYN is set, `sack` ([`sack_edge`], or `ack`);
//!   for UDP whether two seconds passed since the flow's first packet.
mod icmp;
pub mod tcp;
#[cfg(test)]
mod tests;
pub mod window;

pub use self::{
    icmp::{icmp_flow_type, icmp_opens, icmp_query},
    tcp::TcpConn,
    window::{TcpDir, TcpOpts, parse_options, sack_edge},
};

/// What a flow is; stored as `u8`. TCP states carry netfilter's `enum tcp_conntrack` numbers.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum State {
    /// netfilter's initial TCP state; a stored flow is never in it.
    TcpNone = 0,
    TcpSynSent = 1,
    TcpSynRecv = 2,
    TcpEstablished = 3,
    TcpFinWait = 4,
    TcpCloseWait = 5,
    TcpLastAck = 6,
    TcpTimeWait = 7,
    TcpClose = 8,
    /// SYN from both sides (simultaneous open).
    TcpSynSent2 = 9,
    UdpUnreplied = 10,
    UdpReplied = 11,
    /// An ICMP query (echo, timestamp, information, address mask) and its replies.
    Icmp = 12,
    /// Any other protocol (netfilter's generic tracker).
    Other = 13,
}

impl State {
    pub const ALL: [State; 14] = [
        State::TcpNone,
        State::TcpSynSent,
        State::TcpSynRecv,
        State::TcpEstablished,
        State::TcpFinWait,
        State::TcpCloseWait,
        State::TcpLastAck,
        State::TcpTimeWait,
        State::TcpClose,
        State::TcpSynSent2,
        State::UdpUnreplied,
        State::UdpReplied,
        State::Icmp,
        State::Other,
    ];

    /// (A `match`, not an index into [`State::ALL`]: the BPF verifier must see the bound.)
    #[inline(always)]
    pub const fn from_u8(v: u8) -> Option<State> {
        Some(match v {
            0 => State::TcpNone,
            1 => State::TcpSynSent,
            2 => State::TcpSynRecv,
            3 => State::TcpEstablished,
            4 => State::TcpFinWait,
            5 => State::TcpCloseWait,
            6 => State::TcpLastAck,
            7 => State::TcpTimeWait,
            8 => State::TcpClose,
            9 => State::TcpSynSent2,
            10 => State::UdpUnreplied,
            11 => State::UdpReplied,
            12 => State::Icmp,
            13 => State::Other,
            _ => return None,
        })
    }

    /// Name used by natctl and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            State::TcpNone => "tcp_none",
            State::TcpSynSent => "tcp_syn_sent",
            State::TcpSynRecv => "tcp_syn_recv",
            State::TcpEstablished => "tcp_established",
            State::TcpFinWait => "tcp_fin_wait",
            State::TcpCloseWait => "tcp_close_wait",
            State::TcpLastAck => "tcp_last_ack",
            State::TcpTimeWait => "tcp_time_wait",
            State::TcpClose => "tcp_close",
            State::TcpSynSent2 => "tcp_syn_sent2",
            State::UdpUnreplied => "udp_unreplied",
            State::UdpReplied => "udp_replied",
            State::Icmp => "icmp",
            State::Other => "other",
        }
    }

    /// The idle timer of this state when nothing shortens it (netfilter's `timeouts[state]`;
    /// its unused `timeouts[NONE]` is SYN_SENT's).
    pub const fn timer(self) -> Timeout {
        match self {
            State::TcpNone | State::TcpSynSent => Timeout::TcpSynSent,
            State::TcpSynRecv => Timeout::TcpSynRecv,
            State::TcpEstablished => Timeout::TcpEstablished,
            State::TcpFinWait => Timeout::TcpFinWait,
            State::TcpCloseWait => Timeout::TcpCloseWait,
            State::TcpLastAck => Timeout::TcpLastAck,
            State::TcpTimeWait => Timeout::TcpTimeWait,
            State::TcpClose => Timeout::TcpClose,
            State::TcpSynSent2 => Timeout::TcpSynSent2,
            State::UdpUnreplied => Timeout::UdpUnreplied,
            State::UdpReplied => Timeout::UdpReplied,
            State::Icmp => Timeout::Icmp,
            State::Other => Timeout::Other,
        }
    }
}

/// Idle timers ("timeouts"), one configurable slot each; a flow stores the one its last
/// packet chose ([`Conn::timer`]). netfilter's `tcp_timeouts` (with `RETRANS` and `UNACK`),
/// `udp_timeouts`, the ICMP and the generic timeout.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Timeout {
    TcpSynSent = 0,
    TcpSynRecv,
    TcpEstablished,
    TcpFinWait,
    TcpCloseWait,
    TcpLastAck,
    TcpTimeWait,
    TcpClose,
    TcpSynSent2,
    /// Three retransmissions without progress, or a zero window.
    TcpRetrans,
    /// Data not yet acknowledged, or a picked-up flow that got no answer yet.
    TcpUnack,
    /// No reply seen, or a reply within two seconds of the first packet.
    UdpUnreplied,
    /// netfilter's `udp_timeout_stream`: replied and still active after two seconds.
    UdpReplied,
    Icmp,
    Other,
}

impl Timeout {
    pub const COUNT: usize = Timeout::Other as usize + 1;

    pub const ALL: [Timeout; Timeout::COUNT] = [
        Timeout::TcpSynSent,
        Timeout::TcpSynRecv,
        Timeout::TcpEstablished,
        Timeout::TcpFinWait,
        Timeout::TcpCloseWait,
        Timeout::TcpLastAck,
        Timeout::TcpTimeWait,
        Timeout::TcpClose,
        Timeout::TcpSynSent2,
        Timeout::TcpRetrans,
        Timeout::TcpUnack,
        Timeout::UdpUnreplied,
        Timeout::UdpReplied,
        Timeout::Icmp,
        Timeout::Other,
    ];

    /// (A `match`, not an index into [`Timeout::ALL`]: the BPF verifier must see the bound.)
    #[inline(always)]
    pub const fn from_u8(v: u8) -> Option<Timeout> {
        Some(match v {
            0 => Timeout::TcpSynSent,
            1 => Timeout::TcpSynRecv,
            2 => Timeout::TcpEstablished,
            3 => Timeout::TcpFinWait,
            4 => Timeout::TcpCloseWait,
            5 => Timeout::TcpLastAck,
            6 => Timeout::TcpTimeWait,
            7 => Timeout::TcpClose,
            8 => Timeout::TcpSynSent2,
            9 => Timeout::TcpRetrans,
            10 => Timeout::TcpUnack,
            11 => Timeout::UdpUnreplied,
            12 => Timeout::UdpReplied,
            13 => Timeout::Icmp,
            14 => Timeout::Other,
            _ => return None,
        })
    }

    /// Config key (`[conntrack] timeouts`), natctl and metrics name.
    pub const fn name(self) -> &'static str {
        match self {
            Timeout::TcpSynSent => "tcp_syn_sent",
            Timeout::TcpSynRecv => "tcp_syn_recv",
            Timeout::TcpEstablished => "tcp_established",
            Timeout::TcpFinWait => "tcp_fin_wait",
            Timeout::TcpCloseWait => "tcp_close_wait",
            Timeout::TcpLastAck => "tcp_last_ack",
            Timeout::TcpTimeWait => "tcp_time_wait",
            Timeout::TcpClose => "tcp_close",
            Timeout::TcpSynSent2 => "tcp_syn_sent2",
            Timeout::TcpRetrans => "tcp_retrans",
            Timeout::TcpUnack => "tcp_unack",
            Timeout::UdpUnreplied => "udp_unreplied",
            Timeout::UdpReplied => "udp_replied",
            Timeout::Icmp => "icmp",
            Timeout::Other => "other",
        }
    }

    /// netfilter's default, in seconds (`nf_conntrack_*_timeout*` sysctls).
    pub const fn default_secs(self) -> u64 {
        match self {
            Timeout::TcpSynSent => 120,
            Timeout::TcpSynRecv => 60,
            Timeout::TcpEstablished => 432_000,
            Timeout::TcpFinWait => 120,
            Timeout::TcpCloseWait => 60,
            Timeout::TcpLastAck => 30,
            Timeout::TcpTimeWait => 120,
            Timeout::TcpClose => 10,
            Timeout::TcpSynSent2 => 120,
            Timeout::TcpRetrans => 300,
            Timeout::TcpUnack => 300,
            Timeout::UdpUnreplied => 30,
            Timeout::UdpReplied => 120,
            Timeout::Icmp => 30,
            Timeout::Other => 600,
        }
    }
}

/// [`Conn::flags`]: netfilter's `IPS_SEEN_REPLY`: a packet of the reply direction was accepted.
pub const SEEN_REPLY: u8 = 1;
/// [`Conn::flags`]: netfilter's `IPS_ASSURED`: TCP reached ESTABLISHED with an answer, or UDP
/// saw packets after a reply. (What early drop must spare.)
pub const ASSURED: u8 = 2;

/// TCP flag bits of byte 13 of the TCP header (RFC 9293).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;

/// Which way a packet goes: from the flow's originator (netfilter's `IP_CT_DIR_ORIGINAL`) or
/// from the responder (`IP_CT_DIR_REPLY`). Also the index into [`TcpConn::seen`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dir {
    Original = 0,
    Reply = 1,
}

impl Dir {
    #[inline(always)]
    pub const fn of(reply: bool) -> Dir {
        if reply { Dir::Reply } else { Dir::Original }
    }

    #[inline(always)]
    pub const fn other(self) -> Dir {
        match self {
            Dir::Original => Dir::Reply,
            Dir::Reply => Dir::Original,
        }
    }
}

/// What a packet of a tracked flow is to the flow. Whatever the verdict, store the [`Conn`]
/// back (netfilter notes the last packet even when it changes nothing else).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Part of the flow (ESTABLISHED): keep the new state; restart the idle timer with the
    /// given slot, or leave it running (`None`: a retransmitted SYN that got no answer yet).
    Accept(Option<Timeout>),
    /// netfilter's IGNORE (`sIG`, or a stale segment): part of the flow, forwarded with it,
    /// but state and idle timer stay as they were.
    Ignore,
    /// netfilter's INVALID (`sIV`, out of the window, impossible flags): not part of the flow,
    /// which stays as it was; the packet can neither advance it nor replace it. `shorten`:
    /// restart the timer with [`Timeout::TcpUnack`] if at least 120 s and more than that slot
    /// remain (out-of-window FIN/RST from both sides of an assured flow).
    Invalid { shorten: bool },
    /// The flow is over and this packet starts a new one: judge it as new (a SYN on TIME_WAIT
    /// or CLOSE).
    New,
    /// Part of the flow, which ends with it: forward it and delete the flow (an RST that is
    /// the only answer the flow ever got).
    Close,
}

/// netfilter's TCP tracking sysctls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `nf_conntrack_tcp_loose`: pick up mid-stream connections.
    pub tcp_loose: bool,
    /// `nf_conntrack_tcp_be_liberal`: only out-of-window RSTs are INVALID.
    pub tcp_be_liberal: bool,
    /// `nf_conntrack_tcp_no_window_check`: no sequence or window checks at all.
    pub tcp_no_window_check: bool,
    /// `nf_conntrack_tcp_ignore_invalid_rst`.
    pub tcp_ignore_invalid_rst: bool,
    /// `nf_conntrack_tcp_max_retrans`.
    pub tcp_max_retrans: u8,
}

impl Config {
    /// netfilter's defaults.
    pub const NETFILTER: Config = Config {
        tcp_loose: true,
        tcp_be_liberal: false,
        tcp_no_window_check: false,
        tcp_ignore_invalid_rst: false,
        tcp_max_retrans: 3,
    };
}

/// The facts of one packet tracking looks at. Only TCP fields matter for TCP; `udp_stream`
/// only for UDP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Packet {
    /// Byte 13 of the TCP header.
    pub tcp_flags: u8,
    pub seq: u32,
    pub ack: u32,
    /// The highest right edge of the SACK blocks ([`sack_edge`]), or `ack`.
    pub sack: u32,
    /// The window field as sent (unscaled).
    pub win: u16,
    /// TCP payload length.
    pub len: u32,
    /// The options ([`parse_options`]); only SYN and SYN/ACK need them.
    pub opts: TcpOpts,
    /// UDP: more than two seconds have passed since the flow's first packet.
    pub udp_stream: bool,
}

impl Packet {
    /// A TCP packet known only by its flags (enough with [`Config::tcp_no_window_check`]).
    pub const fn flags_only(tcp_flags: u8) -> Packet {
        Packet {
            tcp_flags,
            seq: 0,
            ack: 0,
            sack: 0,
            win: 0,
            len: 0,
            opts: TcpOpts::NONE,
            udp_stream: true,
        }
    }
}

/// What netfilter keeps of a flow beyond its addresses (`struct nf_conn`'s status bits, the
/// timeout it chose, `ct->proto.tcp`). 64 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    /// [`State`] as `u8`.
    pub state: u8,
    /// [`SEEN_REPLY`] | [`ASSURED`].
    pub flags: u8,
    /// [`Timeout`] as `u8`: the idle timer the last packet started.
    pub timer: u8,
    pub _pad: u8,
    /// TCP only (zeroed otherwise).
    pub tcp: TcpConn,
}
const _: () = assert!(core::mem::size_of::<Conn>() == 64);

impl Conn {
    /// A flow in `state` with `flags` whose TCP history is unknown (no windows, nothing noted
    /// of the last packet): what a caller that keeps only state and flags passes.
    pub const fn forgotten(state: State, flags: u8, timer: Timeout) -> Conn {
        Conn {
            state: state as u8,
            flags,
            timer: timer as u8,
            _pad: 0,
            tcp: TcpConn::FORGOTTEN,
        }
    }

    #[inline(always)]
    pub const fn state(&self) -> State {
        match State::from_u8(self.state) {
            Some(s) => s,
            None => State::Other,
        }
    }
}

const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_UDPLITE: u8 = 136;

/// The flow a first packet opens (from the originator), or `None` if it cannot open one (TCP
/// that netfilter would not track as new: RST, FIN, SYN/ACK, impossible flags, mid-stream
/// without [`Config::tcp_loose`]). ICMP: the caller opens only for a request
/// ([`icmp_opens`]). `timeout_of` gives the configured length of each slot (any unit).
#[inline(always)]
pub fn open<F: Fn(Timeout) -> u64>(
    proto: u8,
    pkt: &Packet,
    cfg: &Config,
    timeout_of: F,
) -> Option<Conn> {
    let state = match proto {
        PROTO_TCP => {
            let mut c = Conn {
                state: State::TcpNone as u8,
                flags: 0,
                timer: Timeout::TcpSynSent as u8,
                _pad: 0,
                tcp: tcp::new(pkt, cfg)?,
            };
            return match tcp::packet(&mut c, Dir::Original, pkt, cfg, timeout_of) {
                Verdict::Accept(t) => {
                    c.timer = t.unwrap_or(c.state().timer()) as u8;
                    Some(c)
                }
                _ => None,
            };
        }
        PROTO_UDP | PROTO_UDPLITE => State::UdpUnreplied,
        PROTO_ICMP => State::Icmp,
        _ => State::Other,
    };
    Some(Conn {
        tcp: TcpConn::ZERO,
        ..Conn::forgotten(state, 0, state.timer())
    })
}

/// A packet of a tracked flow going `dir`.
#[inline(always)]
pub fn packet<F: Fn(Timeout) -> u64>(
    c: &mut Conn,
    proto: u8,
    dir: Dir,
    pkt: &Packet,
    cfg: &Config,
    timeout_of: F,
) -> Verdict {
    let v = match proto {
        PROTO_TCP => tcp::packet(c, dir, pkt, cfg, timeout_of),
        PROTO_UDP | PROTO_UDPLITE => {
            // nf_conntrack_udp_packet (nf_conntrack_udplite_packet alike): the stream timer once a reply was seen and two seconds
            // have passed; ASSURED from the first packet after a reply.
            let timer = if c.flags & SEEN_REPLY == 0 {
                Timeout::UdpUnreplied
            } else {
                c.flags |= ASSURED;
                if pkt.udp_stream {
                    Timeout::UdpReplied
                } else {
                    Timeout::UdpUnreplied
                }
            };
            Verdict::Accept(Some(timer))
        }
        _ => Verdict::Accept(Some(c.state().timer())),
    };
    if let Verdict::Accept(Some(t)) = v {
        c.timer = t as u8;
    }
    // nf_conntrack_in marks the reply seen once the protocol accepted a reply packet.
    if matches!(v, Verdict::Accept(_) | Verdict::Ignore) && matches!(dir, Dir::Reply) {
        c.flags |= SEEN_REPLY;
        if matches!(proto, PROTO_UDP | PROTO_UDPLITE) {
            c.state = State::UdpReplied as u8;
        }
    }
    v
}
