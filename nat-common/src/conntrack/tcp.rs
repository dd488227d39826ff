//! TCP after netfilter's `nf_conntrack_proto_tcp.c` (v6.1): the flag class of a segment
//! (`get_conntrack_index`), the transition table (`tcp_conntracks`, written here rule by rule;
//! the reference model transcribes the array), and `nf_conntrack_tcp_packet`: what ignored
//! packets teach (SYN/ACK resynchronisation, RFC 5961 challenge ACKs), the RST checks, the
//! window check ([`super::window`]) and the choice of idle timer.
use super::{
    ASSURED, Config, Conn, Dir, Packet, SEEN_REPLY, State, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
    TCP_URG, Timeout, Verdict,
    window::{
        BE_LIBERAL, CLOSE_INIT, DATA_UNACKNOWLEDGED, MAXACK_SET, SACK_PERM, TcpDir, WINDOW_SCALE,
        Window, apply_options, before, in_window, segment_end,
    },
};

/// [`TcpConn::last_flags`]: netfilter's `IP_CT_TCP_SIMULTANEOUS_OPEN`.
pub const SIMULTANEOUS_OPEN: u8 = 0x80;
/// [`TcpConn::last_flags`]: netfilter's `IP_CT_EXP_CHALLENGE_ACK`: a SYN was let through in
/// LAST_ACK, so the next ACK may be a challenge ACK, not the last ACK.
pub const EXP_CHALLENGE_ACK: u8 = 0x40;

/// netfilter's `struct ip_ct_tcp` without its state (that is [`Conn::state`]). 60 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpConn {
    /// By [`Dir`]: the originator's and the responder's windows.
    pub seen: [TcpDir; 2],
    /// The last pure ACK (retransmission detector) or ignored packet: its sequence number...
    pub last_seq: u32,
    /// ...its ACK (or the ACK of a reply answering SYN_SENT with an ACK)...
    pub last_ack: u32,
    /// ...`seq + len`...
    pub last_end: u32,
    /// ...and window as sent.
    pub last_win: u16,
    /// [`Index`] of the last packet accepted or ignored.
    pub last_index: u8,
    /// [`Dir`] of that packet.
    pub last_dir: u8,
    /// Window scale of the last ignored SYN.
    pub last_wscale: u8,
    /// [`WINDOW_SCALE`] / [`SACK_PERM`] of the last ignored SYN, [`SIMULTANEOUS_OPEN`],
    /// [`EXP_CHALLENGE_ACK`].
    pub last_flags: u8,
    /// Identical pure ACKs in a row.
    pub retrans: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<TcpConn>() == 60);

impl TcpConn {
    /// Nothing known (also what non-TCP flows carry).
    pub const ZERO: TcpConn = TcpConn {
        seen: [TcpDir {
            td_end: 0,
            td_maxend: 0,
            td_maxwin: 0,
            td_maxack: 0,
            td_scale: 0,
            flags: 0,
            _pad: [0; 2],
        }; 2],
        last_seq: 0,
        last_ack: 0,
        last_end: 0,
        last_win: 0,
        last_index: 0,
        last_dir: 0,
        last_wscale: 0,
        last_flags: 0,
        retrans: 0,
        _pad: 0,
    };

    /// No windows and no last packet: what a caller that keeps neither passes.
    pub const FORGOTTEN: TcpConn = TcpConn {
        last_index: Index::None as u8,
        ..TcpConn::ZERO
    };
}

/// netfilter's `enum tcp_bit_set`: the row of the table a segment uses.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Index {
    Syn = 0,
    SynAck = 1,
    Fin = 2,
    Ack = 3,
    Rst = 4,
    None = 5,
}

/// `get_conntrack_index`: RST, then SYN (with or without ACK), then FIN, then ACK.
#[inline(always)]
pub const fn index(flags: u8) -> Index {
    if flags & TCP_RST != 0 {
        Index::Rst
    } else if flags & TCP_SYN != 0 {
        if flags & TCP_ACK != 0 {
            Index::SynAck
        } else {
            Index::Syn
        }
    } else if flags & TCP_FIN != 0 {
        Index::Fin
    } else if flags & TCP_ACK != 0 {
        Index::Ack
    } else {
        Index::None
    }
}

/// `tcp_error`'s flag check: the combinations a TCP may send (PSH, ECE and CWR aside).
#[inline(always)]
pub const fn valid_flags(flags: u8) -> bool {
    const S: u8 = TCP_SYN;
    const A: u8 = TCP_ACK;
    const F: u8 = TCP_FIN;
    const R: u8 = TCP_RST;
    const U: u8 = TCP_URG;
    const VALID: [u8; 9] = [S, S | U, S | A, R, R | A, F | A, F | A | U, A, A | U];
    let f = flags & (S | A | F | R | U);
    let mut i = 0;
    while i < VALID.len() {
        if VALID[i] == f {
            return true;
        }
        i += 1;
    }
    false
}

/// One cell of `tcp_conntracks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    To(State),
    /// `sIG`.
    Ignore,
    /// `sIV`.
    Invalid,
}

/// `tcp_conntracks[dir][index][state]`, row by row.
#[inline(always)]
pub const fn table(dir: Dir, index: Index, s: State) -> Cell {
    use Cell::{Ignore as IG, Invalid as IV, To};
    use State::*;
    let orig = matches!(dir, Dir::Original);
    match index {
        Index::Syn if orig => match s {
            TcpNone | TcpSynSent | TcpTimeWait | TcpClose => To(TcpSynSent),
            TcpSynSent2 => To(TcpSynSent2),
            TcpSynRecv | TcpEstablished | TcpFinWait | TcpCloseWait | TcpLastAck => IG,
            _ => IV,
        },
        Index::Syn => match s {
            TcpSynSent | TcpSynSent2 => To(TcpSynSent2),
            TcpTimeWait => To(TcpSynSent),
            _ => IV,
        },
        Index::SynAck if orig => match s {
            TcpSynRecv | TcpSynSent2 => To(TcpSynRecv),
            _ => IV,
        },
        Index::SynAck => match s {
            TcpSynSent | TcpSynSent2 => To(TcpSynRecv),
            TcpNone => IV,
            TcpSynRecv | TcpEstablished | TcpFinWait | TcpCloseWait | TcpLastAck | TcpTimeWait
            | TcpClose => IG,
            _ => IV,
        },
        Index::Fin => match s {
            TcpSynRecv | TcpEstablished => To(TcpFinWait),
            TcpFinWait | TcpCloseWait | TcpLastAck => To(TcpLastAck),
            TcpTimeWait => To(TcpTimeWait),
            TcpClose => To(TcpClose),
            _ => IV,
        },
        Index::Ack => match s {
            TcpNone if orig => To(TcpEstablished),
            TcpSynRecv if orig => To(TcpEstablished),
            TcpSynRecv => To(TcpSynRecv),
            TcpSynSent | TcpSynSent2 if !orig => IG,
            TcpEstablished => To(TcpEstablished),
            TcpFinWait | TcpCloseWait => To(TcpCloseWait),
            TcpLastAck | TcpTimeWait => To(TcpTimeWait),
            TcpClose => To(TcpClose),
            _ => IV,
        },
        Index::Rst => match s {
            TcpSynSent | TcpSynRecv | TcpEstablished | TcpFinWait | TcpCloseWait | TcpLastAck
            | TcpTimeWait | TcpClose | TcpSynSent2 => To(TcpClose),
            _ => IV,
        },
        Index::None => IV,
    }
}

/// `tcp_new`: the TCP part of a flow the originator's first segment opens, or `None` if
/// netfilter would not track it (anything but a SYN, or a mid-stream ACK when loose).
#[inline(always)]
pub fn new(p: &Packet, cfg: &Config) -> Option<TcpConn> {
    if !valid_flags(p.tcp_flags) {
        return None;
    }
    let mut c = TcpConn::FORGOTTEN;
    let end = segment_end(p);
    let win = if p.win == 0 { 1 } else { p.win as u32 };
    let s = &mut c.seen[0];
    s.td_end = end;
    s.td_maxwin = win;
    match table(Dir::Original, index(p.tcp_flags), State::TcpNone) {
        Cell::To(State::TcpSynSent) => {
            s.td_maxend = end;
            apply_options(s, &p.opts);
        }
        Cell::To(_) if cfg.tcp_loose => {
            // Picked up mid-stream: history lost, so be liberal and assume SACK.
            s.td_maxend = end.wrapping_add(win);
            c.seen[0].flags = SACK_PERM | BE_LIBERAL;
            c.seen[1].flags = SACK_PERM | BE_LIBERAL;
        }
        _ => return None,
    }
    Some(c)
}

/// ESTABLISHED and ASSURED (`nf_conntrack_tcp_established`).
#[inline(always)]
fn established(c: &Conn) -> bool {
    c.state == State::TcpEstablished as u8 && c.flags & ASSURED != 0
}

/// States whose RSTs skip every check (`tcp_can_early_drop`).
#[inline(always)]
const fn closing(s: State) -> bool {
    matches!(
        s,
        State::TcpFinWait
            | State::TcpLastAck
            | State::TcpTimeWait
            | State::TcpClose
            | State::TcpCloseWait
    )
}

/// `nf_conntrack_tcp_packet` for a segment going `dir` (before the caller marks a reply seen).
#[inline(always)]
pub fn packet<F: Fn(Timeout) -> u64>(
    conn: &mut Conn,
    dir: Dir,
    p: &Packet,
    cfg: &Config,
    timeout_of: F,
) -> Verdict {
    if !valid_flags(p.tcp_flags) {
        return Verdict::Invalid { shorten: false };
    }
    let stored = conn.state();
    let idx = index(p.tcp_flags);
    // Issue 10: a SYN on a closed flow starts a new one, from whichever side.
    if matches!(idx, Index::Syn) && matches!(stored, State::TcpTimeWait | State::TcpClose) {
        return Verdict::New;
    }
    let (old, mut new) = match table(dir, idx, stored) {
        Cell::To(s) => (stored, s),
        Cell::Invalid => return Verdict::Invalid { shorten: false },
        Cell::Ignore => {
            if !resync(&mut conn.tcp, dir, idx, p) {
                note_ignored(&mut conn.tcp, stored, dir, idx, p);
                return Verdict::Ignore;
            }
            (State::TcpSynSent, State::TcpSynRecv)
        }
    };
    let c = &mut conn.tcp;
    let mut check_window = true;
    if new == State::TcpTimeWait
        && old == State::TcpLastAck
        && matches!(idx, Index::Ack)
        && c.last_dir != dir as u8
        && c.last_index == Index::Syn as u8
        && c.last_flags & EXP_CHALLENGE_ACK != 0
    {
        // RFC 5961 challenge ACK to the SYN we let through: not the last ACK.
        c.last_flags &= !EXP_CHALLENGE_ACK;
        return Verdict::Ignore;
    } else if new == State::TcpSynSent2 {
        c.last_flags |= SIMULTANEOUS_OPEN;
    } else if new == State::TcpSynRecv
        && matches!(dir, Dir::Reply)
        && matches!(idx, Index::Ack)
        && c.last_flags & SIMULTANEOUS_OPEN != 0
    {
        new = State::TcpEstablished;
    } else if new == State::TcpClose && matches!(idx, Index::Rst) {
        match rst_check(conn, dir, p, cfg) {
            Rst::Invalid => return Verdict::Invalid { shorten: false },
            Rst::SkipWindow => check_window = false,
            Rst::Window => {}
            Rst::KeepState => {
                new = old;
                check_window = !rst_answers_let_through(conn, old, p);
            }
            Rst::Unchecked => check_window = !rst_answers_let_through(conn, old, p),
        }
    }
    if check_window {
        match in_window(&mut conn.tcp, stored, dir, p, cfg) {
            Window::Accept => {}
            Window::Ignore => return Verdict::Ignore,
            Window::Invalid => {
                let shorten = invalid_close(conn, dir, idx);
                return Verdict::Invalid { shorten };
            }
        }
    }
    let c = &mut conn.tcp;
    c.last_index = idx as u8;
    c.last_dir = dir as u8;
    if old != new && new == State::TcpFinWait {
        c.seen[dir as usize].flags |= CLOSE_INIT;
    }
    conn.state = new as u8;
    timer(conn, old, new, idx, p, cfg, timeout_of)
}

/// A SYN/ACK that acknowledges a SYN we ignored: client and server are in sync and we are
/// not; take the SYN's recorded parameters (then SYN_SENT -> SYN_RECV).
#[inline(always)]
fn resync(c: &mut TcpConn, dir: Dir, idx: Index, p: &Packet) -> bool {
    if !(matches!(idx, Index::SynAck)
        && c.last_index == Index::Syn as u8
        && c.last_dir != dir as u8
        && p.ack == c.last_end)
    {
        return false;
    }
    let l = (c.last_dir & 1) as usize;
    c.seen[l].td_end = c.last_end;
    c.seen[l].td_maxend = c.last_end;
    c.seen[l].td_maxwin = if c.last_win == 0 {
        1
    } else {
        c.last_win as u32
    };
    c.seen[l].td_scale = c.last_wscale;
    c.last_flags &= !EXP_CHALLENGE_ACK;
    c.seen[l].flags = c.last_flags;
    let d = dir as usize;
    c.seen[d] = TcpDir {
        flags: c.seen[d].flags & BE_LIBERAL,
        ..TcpDir::default()
    };
    true
}

/// What an ignored packet teaches, for a later SYN/ACK, challenge ACK or RST.
#[inline(always)]
fn note_ignored(c: &mut TcpConn, old: State, dir: Dir, idx: Index, p: &Packet) {
    c.last_index = idx as u8;
    c.last_dir = dir as u8;
    c.last_seq = p.seq;
    c.last_end = segment_end(p);
    c.last_win = p.win;
    if matches!(idx, Index::Syn) && matches!(dir, Dir::Original) {
        // A SYN the server may answer with a SYN/ACK (then we resync) or a challenge ACK.
        c.last_flags = 0;
        c.last_wscale = 0;
        if p.opts.present {
            if let Some(w) = p.opts.wscale {
                c.last_flags |= WINDOW_SCALE;
                c.last_wscale = w;
            }
            if p.opts.sack_perm {
                c.last_flags |= SACK_PERM;
            }
        }
        if old == State::TcpLastAck {
            c.last_flags |= EXP_CHALLENGE_ACK;
        }
    }
    if old == State::TcpSynSent && matches!(idx, Index::Ack) && matches!(dir, Dir::Reply) {
        // Perhaps a challenge ACK answering the SYN.
        c.last_ack = p.ack;
    }
}

/// Outcome of the RST checks that precede the window check.
enum Rst {
    Invalid,
    /// Accept without the window check.
    SkipWindow,
    /// Straight to the window check.
    Window,
    /// An in-window RST whose sequence number is not the expected one: the state stays (a
    /// challenge ACK may follow).
    KeepState,
    /// No ACK of the other side to check against.
    Unchecked,
}

/// The RST checks of `nf_conntrack_tcp_packet` against the other side's highest ACK.
#[inline(always)]
fn rst_check(conn: &Conn, dir: Dir, p: &Packet, cfg: &Config) -> Rst {
    if closing(conn.state()) {
        return Rst::SkipWindow;
    }
    let c = &conn.tcp;
    let peer = &c.seen[dir.other() as usize];
    if peer.flags & MAXACK_SET == 0 || c.last_index == Index::Syn as u8 {
        return Rst::Unchecked;
    }
    let seq = p.seq;
    if seq == 0 && !established(conn) {
        return Rst::Window;
    }
    if before(seq, peer.td_maxack) && !cfg.tcp_ignore_invalid_rst {
        return Rst::Invalid;
    }
    if !established(conn) || seq == peer.td_maxack {
        return Rst::Window;
    }
    if c.last_index == Index::Ack as u8 && c.last_dir == dir as u8 && seq == c.last_end {
        // The RST ends a train of this side's data.
        return Rst::Window;
    }
    Rst::KeepState
}

/// An RST answering a SYN or ACK we let through while out of sync, or a challenge ACK: it may
/// acknowledge what we ignored, so no window check.
#[inline(always)]
fn rst_answers_let_through(conn: &Conn, old: State, p: &Packet) -> bool {
    let c = &conn.tcp;
    let seen_reply = conn.flags & SEEN_REPLY != 0;
    let assured = conn.flags & ASSURED != 0;
    if ((seen_reply && c.last_index == Index::Syn as u8)
        || (!assured && c.last_index == Index::Ack as u8))
        && p.ack == c.last_end
    {
        return true;
    }
    old == State::TcpSynSent
        && c.last_index == Index::Ack as u8
        && c.last_dir == Dir::Reply as u8
        && p.seq == c.last_ack
}

/// `nf_tcp_handle_invalid`: out-of-window FIN/RST from both sides of an assured flow shorten
/// its timer; otherwise the first one is noted.
#[inline(always)]
fn invalid_close(conn: &mut Conn, dir: Dir, idx: Index) -> bool {
    if conn.flags & ASSURED == 0 || !matches!(idx, Index::Rst | Index::Fin) {
        return false;
    }
    let c = &mut conn.tcp;
    if c.last_dir != dir as u8
        && (c.last_index == Index::Fin as u8 || c.last_index == Index::Rst as u8)
    {
        return true;
    }
    c.last_index = idx as u8;
    c.last_dir = dir as u8;
    false
}

/// The idle timer after an accepted segment, and what an unanswered flow does differently.
#[inline(always)]
fn timer<F: Fn(Timeout) -> u64>(
    conn: &mut Conn,
    old: State,
    new: State,
    idx: Index,
    p: &Packet,
    cfg: &Config,
    timeout_of: F,
) -> Verdict {
    let c = &conn.tcp;
    let base = new.timer();
    let len = |t: Timeout| timeout_of(t);
    let unacked = (c.seen[0].flags | c.seen[1].flags) & DATA_UNACKNOWLEDGED != 0;
    let mut t = if c.retrans >= cfg.tcp_max_retrans && len(base) > len(Timeout::TcpRetrans) {
        Timeout::TcpRetrans
    } else if matches!(idx, Index::Rst) {
        Timeout::TcpClose
    } else if unacked && len(base) > len(Timeout::TcpUnack) {
        Timeout::TcpUnack
    } else if !cfg.tcp_no_window_check && c.last_win == 0 && len(base) > len(Timeout::TcpRetrans) {
        Timeout::TcpRetrans
    } else {
        base
    };
    if conn.flags & SEEN_REPLY == 0 {
        if p.tcp_flags & TCP_RST != 0 {
            // The only answer is an RST: no connection.
            return Verdict::Close;
        }
        if matches!(idx, Index::Syn) && old == State::TcpSynSent {
            // A retransmitted SYN does not keep an unanswered flow alive.
            return Verdict::Accept(None);
        }
        if new == State::TcpEstablished && len(t) > len(Timeout::TcpUnack) {
            // Picked up mid-stream and not answered yet.
            t = Timeout::TcpUnack;
        }
    } else if conn.flags & ASSURED == 0
        && matches!(old, State::TcpSynRecv | State::TcpEstablished)
        && new == State::TcpEstablished
    {
        conn.flags |= ASSURED;
    }
    Verdict::Accept(Some(t))
}
