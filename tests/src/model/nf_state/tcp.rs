//! `tcp_new`, `tcp_error`'s flag check and `nf_conntrack_tcp_packet`, following the C.
use super::{
    Kept, NfConn, Ret, Seg, TCP_ACK_SET, TCP_CONNTRACKS, TCP_FIN_SET, TCP_NONE_SET, TCP_RST_SET,
    TCP_SYN_SET, TCP_SYNACK_SET, Timer, length_ns,
    names::*,
    window::{
        IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_CLOSE_INIT, IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED,
        IP_CT_TCP_FLAG_MAXACK_SET, IP_CT_TCP_FLAG_SACK_PERM, IP_CT_TCP_FLAG_WINDOW_SCALE,
        IpCtTcpState, NFCT_TCP_ACCEPT, NFCT_TCP_IGNORE, NFCT_TCP_INVALID, before,
        segment_seq_plus_len, tcp_in_window, tcp_options,
    },
};

const TCPHDR_FIN: u8 = 0x01;
const TCPHDR_SYN: u8 = 0x02;
const TCPHDR_RST: u8 = 0x04;
const TCPHDR_PSH: u8 = 0x08;
const TCPHDR_ACK: u8 = 0x10;
const TCPHDR_URG: u8 = 0x20;
const TCPHDR_ECE: u8 = 0x40;
const TCPHDR_CWR: u8 = 0x80;

/// `IP_CT_EXP_CHALLENGE_ACK`, `IP_CT_TCP_SIMULTANEOUS_OPEN` (in `last_flags`).
pub const IP_CT_EXP_CHALLENGE_ACK: u8 = 0x40;
pub const IP_CT_TCP_SIMULTANEOUS_OPEN: u8 = 0x80;

/// `struct ip_ct_tcp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpCtTcp {
    pub seen: [IpCtTcpState; 2],
    pub state: u8,
    pub last_dir: u8,
    pub retrans: u8,
    pub last_index: u8,
    pub last_seq: u32,
    pub last_ack: u32,
    pub last_end: u32,
    pub last_win: u16,
    pub last_wscale: u8,
    pub last_flags: u8,
}

impl IpCtTcp {
    /// A flow in `state` of which nothing else is known.
    pub fn forgotten(state: u8) -> IpCtTcp {
        let mut t = IpCtTcp {
            seen: [IpCtTcpState::default(); 2],
            state,
            last_dir: 0,
            retrans: 0,
            last_index: 0,
            last_seq: 0,
            last_ack: 0,
            last_end: 0,
            last_win: 0,
            last_wscale: 0,
            last_flags: 0,
        };
        t.forget_last();
        t
    }

    /// Drops what was noted of the last packet (as `tcp_new` leaves it).
    pub fn forget_last(&mut self) {
        *self = IpCtTcp {
            last_dir: 0,
            retrans: 0,
            last_index: TCP_NONE_SET as u8,
            last_seq: 0,
            last_ack: 0,
            last_end: 0,
            last_win: 0,
            last_wscale: 0,
            last_flags: 0,
            ..*self
        };
    }
}

/// `get_conntrack_index`.
pub fn get_conntrack_index(flags: u8) -> usize {
    if flags & TCPHDR_RST != 0 {
        TCP_RST_SET
    } else if flags & TCPHDR_SYN != 0 {
        if flags & TCPHDR_ACK != 0 {
            TCP_SYNACK_SET
        } else {
            TCP_SYN_SET
        }
    } else if flags & TCPHDR_FIN != 0 {
        TCP_FIN_SET
    } else if flags & TCPHDR_ACK != 0 {
        TCP_ACK_SET
    } else {
        TCP_NONE_SET
    }
}

/// `tcp_valid_flags`, indexed by the flags without PSH, ECE and CWR.
fn tcp_valid_flags(flags: u8) -> bool {
    let f = flags & !(TCPHDR_ECE | TCPHDR_CWR | TCPHDR_PSH);
    [
        TCPHDR_SYN,
        TCPHDR_SYN | TCPHDR_URG,
        TCPHDR_SYN | TCPHDR_ACK,
        TCPHDR_RST,
        TCPHDR_RST | TCPHDR_ACK,
        TCPHDR_FIN | TCPHDR_ACK,
        TCPHDR_FIN | TCPHDR_ACK | TCPHDR_URG,
        TCPHDR_ACK,
        TCPHDR_ACK | TCPHDR_URG,
    ]
    .contains(&f)
}

/// `tcp_new` (after `tcp_error`), netfilter's defaults (`nf_conntrack_tcp_loose=1`).
pub fn tcp_new(th: &Seg) -> Option<IpCtTcp> {
    if !tcp_valid_flags(th.flags) {
        return None;
    }
    let new_state = TCP_CONNTRACKS[0][get_conntrack_index(th.flags)][sNO as usize];
    if new_state >= sIV {
        return None;
    }
    let mut t = IpCtTcp::forgotten(sNO);
    let s0 = &mut t.seen[0];
    s0.td_end = segment_seq_plus_len(th);
    s0.td_maxwin = u32::from(th.window);
    if s0.td_maxwin == 0 {
        s0.td_maxwin = 1;
    }
    if new_state == sSS {
        s0.td_maxend = s0.td_end;
        tcp_options(th, s0);
    } else {
        s0.td_maxend = s0.td_end.wrapping_add(s0.td_maxwin);
        t.seen[0].flags = IP_CT_TCP_FLAG_SACK_PERM | IP_CT_TCP_FLAG_BE_LIBERAL;
        t.seen[1].flags = IP_CT_TCP_FLAG_SACK_PERM | IP_CT_TCP_FLAG_BE_LIBERAL;
    }
    t.last_index = TCP_NONE_SET as u8;
    Some(t)
}

/// `nf_conntrack_tcp_established`.
fn established(ct: &NfConn, t: &IpCtTcp) -> bool {
    t.state == sES && ct.assured
}

/// `tcp_can_early_drop`.
fn can_early_drop(t: &IpCtTcp) -> bool {
    [sFW, sLA, sTW, sCL, sCW].contains(&t.state)
}

/// `nf_tcp_handle_invalid`: whether the timer is to be lowered to UNACK's.
fn handle_invalid(ct: &NfConn, t: &mut IpCtTcp, dir: usize, index: usize) -> bool {
    if !ct.assured || !(index == TCP_RST_SET || index == TCP_FIN_SET) {
        return false;
    }
    if usize::from(t.last_dir) != dir
        && (usize::from(t.last_index) == TCP_FIN_SET || usize::from(t.last_index) == TCP_RST_SET)
    {
        return true;
    }
    t.last_index = index as u8;
    t.last_dir = dir as u8;
    false
}

/// `nf_conntrack_tcp_packet` on the flow `ct` whose TCP part is `t`.
// The `switch (new_state)` of the C, case by case.
#[allow(clippy::collapsible_match)]
pub fn nf_conntrack_tcp_packet(
    ct: &mut NfConn,
    t: &mut IpCtTcp,
    dir: usize,
    th: &Seg,
    kept: &Kept,
    timeouts_ns: &[u64],
) -> Ret {
    let no_window_check = !kept.tcp_window;
    if !tcp_valid_flags(th.flags) {
        return Ret::Invalid(false);
    }
    let mut old_state = t.state;
    let index = get_conntrack_index(th.flags);
    // The product: a SYN on a closed flow is a new flow, whichever side sends it.
    if index == TCP_SYN_SET && (old_state == sTW || old_state == sCL) {
        return Ret::New;
    }
    let mut new_state = TCP_CONNTRACKS[dir][index][old_state as usize];
    let mut in_window = false;
    match new_state {
        sSS => {}
        sIG => {
            if index == TCP_SYNACK_SET
                && usize::from(t.last_index) == TCP_SYN_SET
                && usize::from(t.last_dir) != dir
                && th.ack_seq == t.last_end
            {
                old_state = sSS;
                new_state = sSR;
                let ld = usize::from(t.last_dir);
                t.seen[ld].td_end = t.last_end;
                t.seen[ld].td_maxend = t.last_end;
                t.seen[ld].td_maxwin = if t.last_win == 0 {
                    1
                } else {
                    u32::from(t.last_win)
                };
                t.seen[ld].td_scale = t.last_wscale;
                t.last_flags &= !IP_CT_EXP_CHALLENGE_ACK;
                t.seen[ld].flags = t.last_flags;
                let s = &mut t.seen[dir];
                *s = IpCtTcpState {
                    flags: s.flags & IP_CT_TCP_FLAG_BE_LIBERAL,
                    ..IpCtTcpState::default()
                };
            } else {
                t.last_index = index as u8;
                t.last_dir = dir as u8;
                t.last_seq = th.seq;
                t.last_end = segment_seq_plus_len(th);
                t.last_win = th.window;
                if index == TCP_SYN_SET && dir == 0 {
                    let mut seen = IpCtTcpState::default();
                    t.last_flags = 0;
                    t.last_wscale = 0;
                    tcp_options(th, &mut seen);
                    if seen.flags & IP_CT_TCP_FLAG_WINDOW_SCALE != 0 {
                        t.last_flags |= IP_CT_TCP_FLAG_WINDOW_SCALE;
                        t.last_wscale = seen.td_scale;
                    }
                    if seen.flags & IP_CT_TCP_FLAG_SACK_PERM != 0 {
                        t.last_flags |= IP_CT_TCP_FLAG_SACK_PERM;
                    }
                    if old_state == sLA {
                        t.last_flags |= IP_CT_EXP_CHALLENGE_ACK;
                    }
                }
                if old_state == sSS && index == TCP_ACK_SET && dir == 1 {
                    t.last_ack = th.ack_seq;
                }
                return Ret::Ignore;
            }
        }
        sIV => return Ret::Invalid(false),
        sTW => {
            if old_state == sLA
                && index == TCP_ACK_SET
                && usize::from(t.last_dir) != dir
                && usize::from(t.last_index) == TCP_SYN_SET
                && t.last_flags & IP_CT_EXP_CHALLENGE_ACK != 0
            {
                t.last_flags &= !IP_CT_EXP_CHALLENGE_ACK;
                return Ret::Ignore;
            }
        }
        sS2 => t.last_flags |= IP_CT_TCP_SIMULTANEOUS_OPEN,
        sSR => {
            if dir == 1 && index == TCP_ACK_SET && t.last_flags & IP_CT_TCP_SIMULTANEOUS_OPEN != 0 {
                new_state = sES;
            }
        }
        sCL if index == TCP_RST_SET => 'close: {
            if can_early_drop(t) {
                in_window = true;
                break 'close;
            }
            let other = &t.seen[1 - dir];
            if other.flags & IP_CT_TCP_FLAG_MAXACK_SET != 0
                && usize::from(t.last_index) != TCP_SYN_SET
            {
                let seq = th.seq;
                if seq == 0 && !established(ct, t) {
                    break 'close;
                }
                // nf_conntrack_tcp_ignore_invalid_rst=0.
                if before(seq, other.td_maxack) {
                    return Ret::Invalid(false);
                }
                if !established(ct, t) || seq == other.td_maxack {
                    break 'close;
                }
                if usize::from(t.last_index) == TCP_ACK_SET
                    && usize::from(t.last_dir) == dir
                    && seq == t.last_end
                {
                    break 'close;
                }
                new_state = old_state;
            }
            if ((ct.seen_reply && usize::from(t.last_index) == TCP_SYN_SET)
                || (!ct.assured && usize::from(t.last_index) == TCP_ACK_SET))
                && th.ack_seq == t.last_end
            {
                in_window = true;
                break 'close;
            }
            if old_state == sSS
                && usize::from(t.last_index) == TCP_ACK_SET
                && t.last_dir == 1
                && th.seq == t.last_ack
            {
                in_window = true;
            }
        }
        _ => {}
    }
    if !in_window {
        match tcp_in_window(t, dir, index, th, no_window_check) {
            NFCT_TCP_IGNORE => return Ret::Ignore,
            NFCT_TCP_INVALID => return Ret::Invalid(handle_invalid(ct, t, dir, index)),
            NFCT_TCP_ACCEPT => {}
            other => unreachable!("tcp_in_window returned {other}"),
        }
    }
    // in_window:
    t.last_index = index as u8;
    t.last_dir = dir as u8;
    t.state = new_state;
    if old_state != new_state && new_state == sFW {
        t.seen[dir].flags |= IP_CT_TCP_FLAG_CLOSE_INIT;
    }
    let len = |tm: u8| length_ns(timeouts_ns, Timer::Tcp(tm));
    let mut timeout = if t.retrans >= 3 && len(new_state) > len(RETRANS) {
        RETRANS
    } else if index == TCP_RST_SET {
        sCL
    } else if (t.seen[0].flags | t.seen[1].flags) & IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED != 0
        && len(new_state) > len(UNACK)
    {
        UNACK
    } else if !no_window_check && t.last_win == 0 && len(new_state) > len(RETRANS) {
        RETRANS
    } else {
        new_state
    };
    if !ct.seen_reply {
        if th.flags & TCPHDR_RST != 0 {
            return Ret::Close;
        }
        if index == TCP_SYN_SET && old_state == sSS {
            return Ret::Accept(None);
        }
        if new_state == sES && len(timeout) > len(UNACK) {
            timeout = UNACK;
        }
    } else if !ct.assured && (old_state == sSR || old_state == sES) && new_state == sES {
        ct.assured = true;
    }
    Ret::Accept(Some(Timer::Tcp(timeout)))
}
