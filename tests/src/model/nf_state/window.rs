//! `tcp_in_window`, `tcp_init_sender`, `tcp_options`, `tcp_sack` and the sequence helpers,
//! following the C (no NAT sequence adjustment: the product never changes payloads;
//! `nf_conntrack_tcp_be_liberal=0`).
use super::{Seg, TCP_ACK_SET, tcp::IpCtTcp};

pub const IP_CT_TCP_FLAG_WINDOW_SCALE: u8 = 0x01;
pub const IP_CT_TCP_FLAG_SACK_PERM: u8 = 0x02;
pub const IP_CT_TCP_FLAG_CLOSE_INIT: u8 = 0x04;
pub const IP_CT_TCP_FLAG_BE_LIBERAL: u8 = 0x08;
pub const IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED: u8 = 0x10;
pub const IP_CT_TCP_FLAG_MAXACK_SET: u8 = 0x20;

/// `enum nf_ct_tcp_action`.
pub const NFCT_TCP_IGNORE: u8 = 0;
pub const NFCT_TCP_INVALID: u8 = 1;
pub const NFCT_TCP_ACCEPT: u8 = 2;

const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_WINDOW: u8 = 3;
const TCPOPT_SACK_PERM: u8 = 4;
const TCPOPT_SACK: u8 = 5;
const TCPOPT_TIMESTAMP: u8 = 8;
const TCPOLEN_WINDOW: usize = 3;
const TCPOLEN_SACK_PERM: usize = 2;
const TCPOLEN_TIMESTAMP: u8 = 10;
const TCPOLEN_TSTAMP_ALIGNED: usize = 12;
const TCPOLEN_SACK_BASE: usize = 2;
const TCPOLEN_SACK_PERBLOCK: usize = 8;
const TCP_MAX_WSCALE: u8 = 14;
const MAXACKWINCONST: u32 = 66000;

/// `struct ip_ct_tcp_state`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpCtTcpState {
    pub td_end: u32,
    pub td_maxend: u32,
    pub td_maxwin: u32,
    pub td_maxack: u32,
    pub td_scale: u8,
    pub flags: u8,
}

/// `before()` of `include/net/tcp.h`.
pub fn before(seq1: u32, seq2: u32) -> bool {
    (seq1.wrapping_sub(seq2) as i32) < 0
}

/// `after()`.
pub fn after(seq2: u32, seq1: u32) -> bool {
    before(seq1, seq2)
}

/// `segment_seq_plus_len`.
pub fn segment_seq_plus_len(th: &Seg) -> u32 {
    let syn = u32::from(th.flags & 0x02 != 0);
    let fin = u32::from(th.flags & 0x01 != 0);
    th.seq
        .wrapping_add(th.len)
        .wrapping_add(syn)
        .wrapping_add(fin)
}

fn maxackwindow(sender: &IpCtTcpState) -> u32 {
    if sender.td_maxwin > MAXACKWINCONST {
        sender.td_maxwin
    } else {
        MAXACKWINCONST
    }
}

/// `tcp_options`.
pub fn tcp_options(th: &Seg, state: &mut IpCtTcpState) {
    let ptr = th.options();
    let mut length = ptr.len() as isize;
    if length == 0 {
        return;
    }
    state.td_scale = 0;
    state.flags &= IP_CT_TCP_FLAG_BE_LIBERAL;
    let mut p = 0usize;
    while length > 0 {
        let opcode = ptr[p];
        p += 1;
        match opcode {
            TCPOPT_EOL => return,
            TCPOPT_NOP => {
                length -= 1;
                continue;
            }
            _ => {
                if length < 2 {
                    return;
                }
                let opsize = ptr[p] as isize;
                p += 1;
                if opsize < 2 || opsize > length {
                    return;
                }
                if opcode == TCPOPT_SACK_PERM && opsize as usize == TCPOLEN_SACK_PERM {
                    state.flags |= IP_CT_TCP_FLAG_SACK_PERM;
                } else if opcode == TCPOPT_WINDOW && opsize as usize == TCPOLEN_WINDOW {
                    state.td_scale = ptr[p].min(TCP_MAX_WSCALE);
                    state.flags |= IP_CT_TCP_FLAG_WINDOW_SCALE;
                }
                p += opsize as usize - 2;
                length -= opsize;
            }
        }
    }
}

/// `tcp_sack`: raises `sack` to the highest right edge of the first SACK option.
pub fn tcp_sack(th: &Seg, sack: &mut u32) {
    let ptr = th.options();
    let mut length = ptr.len() as isize;
    if length == 0 {
        return;
    }
    if ptr.len() == TCPOLEN_TSTAMP_ALIGNED
        && ptr[..4] == [TCPOPT_NOP, TCPOPT_NOP, TCPOPT_TIMESTAMP, TCPOLEN_TIMESTAMP]
    {
        return;
    }
    let mut p = 0usize;
    while length > 0 {
        let opcode = ptr[p];
        p += 1;
        match opcode {
            TCPOPT_EOL => return,
            TCPOPT_NOP => {
                length -= 1;
                continue;
            }
            _ => {
                if length < 2 {
                    return;
                }
                let opsize = ptr[p] as isize;
                p += 1;
                if opsize < 2 || opsize > length {
                    return;
                }
                let size = opsize as usize;
                if opcode == TCPOPT_SACK
                    && size >= TCPOLEN_SACK_BASE + TCPOLEN_SACK_PERBLOCK
                    && (size - TCPOLEN_SACK_BASE).is_multiple_of(TCPOLEN_SACK_PERBLOCK)
                {
                    let mut i = 0;
                    while i < size - TCPOLEN_SACK_BASE {
                        let at = p + i + 4;
                        let tmp =
                            u32::from_be_bytes([ptr[at], ptr[at + 1], ptr[at + 2], ptr[at + 3]]);
                        if after(tmp, *sack) {
                            *sack = tmp;
                        }
                        i += TCPOLEN_SACK_PERBLOCK;
                    }
                    return;
                }
                p += size - 2;
                length -= opsize;
            }
        }
    }
}

/// `tcp_init_sender`.
fn tcp_init_sender(t: &mut IpCtTcp, dir: usize, th: &Seg, end: u32, win: u32) {
    let sender = &mut t.seen[dir];
    sender.td_end = end;
    sender.td_maxend = end;
    sender.td_maxwin = if win == 0 { 1 } else { win };
    tcp_options(th, sender);
    let (s, r) = (t.seen[dir].flags, t.seen[1 - dir].flags);
    if dir == 1 && !(s & IP_CT_TCP_FLAG_WINDOW_SCALE != 0 && r & IP_CT_TCP_FLAG_WINDOW_SCALE != 0) {
        t.seen[dir].td_scale = 0;
        t.seen[1 - dir].td_scale = 0;
    }
}

/// `tcp_in_window` (`nf_conntrack_tcp_no_window_check` = `no_window_check`).
pub fn tcp_in_window(
    t: &mut IpCtTcp,
    dir: usize,
    index: usize,
    th: &Seg,
    no_window_check: bool,
) -> u8 {
    if no_window_check {
        return NFCT_TCP_ACCEPT;
    }
    let (syn, ack_flag, rst) = (
        th.flags & 0x02 != 0,
        th.flags & 0x10 != 0,
        th.flags & 0x04 != 0,
    );
    let mut seq = th.seq;
    let mut ack = th.ack_seq;
    let mut sack = ack;
    let win_raw = th.window;
    let mut win = u32::from(win_raw);
    let mut end = segment_seq_plus_len(th);
    if t.seen[1 - dir].flags & IP_CT_TCP_FLAG_SACK_PERM != 0 {
        tcp_sack(th, &mut sack);
    }

    if t.seen[dir].td_maxwin == 0 {
        if syn {
            tcp_init_sender(t, dir, th, end, win);
            if !ack_flag {
                return NFCT_TCP_ACCEPT;
            }
        } else {
            let sender = &mut t.seen[dir];
            sender.td_end = end;
            let swin = win << sender.td_scale;
            sender.td_maxwin = if swin == 0 { 1 } else { swin };
            sender.td_maxend = end.wrapping_add(sender.td_maxwin);
            let receiver = &mut t.seen[1 - dir];
            if receiver.td_maxwin == 0 {
                receiver.td_end = sack;
                receiver.td_maxend = sack;
            } else if sack == receiver.td_end.wrapping_add(1) {
                receiver.td_end = receiver.td_end.wrapping_add(1);
            }
        }
    } else if syn && after(end, t.seen[dir].td_end) && (t.state == 1 || t.state == 2) {
        tcp_init_sender(t, dir, th, end, win);
        if dir == 1 && !ack_flag {
            return NFCT_TCP_ACCEPT;
        }
    }

    // No ACK, or (ACK and) RST with ack 0 from a broken stack.
    if !ack_flag || (rst && ack == 0) {
        ack = t.seen[1 - dir].td_end;
        sack = ack;
    }
    if rst && seq == 0 && t.state == 1 {
        seq = t.seen[dir].td_end;
        end = seq;
    }

    let log_invalid = |t: &IpCtTcp, ret: u8| {
        if t.seen[dir].flags & IP_CT_TCP_FLAG_BE_LIBERAL != 0 {
            NFCT_TCP_ACCEPT
        } else {
            ret
        }
    };
    let sender = t.seen[dir];
    let receiver = t.seen[1 - dir];
    let seq_ok = before(seq, sender.td_maxend.wrapping_add(1));
    if !seq_ok {
        let overshot = end.wrapping_sub(sender.td_maxend).wrapping_add(1);
        let ack_ok = after(
            sack,
            receiver
                .td_end
                .wrapping_sub(maxackwindow(&sender))
                .wrapping_sub(1),
        );
        let in_recv_win = receiver.td_maxwin != 0
            && after(
                end,
                sender
                    .td_end
                    .wrapping_sub(receiver.td_maxwin)
                    .wrapping_sub(1),
            );
        if in_recv_win
            && ack_ok
            && overshot <= receiver.td_maxwin
            && before(sack, receiver.td_end.wrapping_add(1))
        {
            t.seen[dir].td_end = end;
            t.seen[dir].flags |= IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED;
            return log_invalid(t, NFCT_TCP_IGNORE);
        }
        return log_invalid(t, NFCT_TCP_INVALID);
    }
    if !before(sack, receiver.td_end.wrapping_add(1)) {
        return log_invalid(t, NFCT_TCP_INVALID);
    }
    let in_recv_win = receiver.td_maxwin == 0
        || after(
            end,
            sender
                .td_end
                .wrapping_sub(receiver.td_maxwin)
                .wrapping_sub(1),
        );
    if !in_recv_win {
        return log_invalid(t, NFCT_TCP_IGNORE);
    }
    if !after(
        sack,
        receiver
            .td_end
            .wrapping_sub(maxackwindow(&sender))
            .wrapping_sub(1),
    ) {
        return log_invalid(t, NFCT_TCP_IGNORE);
    }

    if !syn {
        win <<= sender.td_scale;
    }
    let swin = win.wrapping_add(sack.wrapping_sub(ack));
    {
        let sender = &mut t.seen[dir];
        if sender.td_maxwin < swin {
            sender.td_maxwin = swin;
        }
        if after(end, sender.td_end) {
            sender.td_end = end;
            sender.flags |= IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED;
        }
        if ack_flag {
            if sender.flags & IP_CT_TCP_FLAG_MAXACK_SET == 0 {
                sender.td_maxack = ack;
                sender.flags |= IP_CT_TCP_FLAG_MAXACK_SET;
            } else if after(ack, sender.td_maxack) {
                sender.td_maxack = ack;
            }
        }
    }
    let sender_maxend = t.seen[dir].td_maxend;
    {
        let receiver = &mut t.seen[1 - dir];
        if receiver.td_maxwin != 0 && after(end, sender_maxend) {
            receiver.td_maxwin = receiver
                .td_maxwin
                .wrapping_add(end.wrapping_sub(sender_maxend));
        }
        if after(sack.wrapping_add(win), receiver.td_maxend.wrapping_sub(1)) {
            receiver.td_maxend = sack.wrapping_add(win);
            if win == 0 {
                receiver.td_maxend = receiver.td_maxend.wrapping_add(1);
            }
        }
        if ack == receiver.td_end {
            receiver.flags &= !IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED;
        }
    }
    if index == TCP_ACK_SET {
        if usize::from(t.last_dir) == dir
            && t.last_seq == seq
            && t.last_ack == ack
            && t.last_end == end
            && t.last_win == win_raw
        {
            t.retrans = t.retrans.wrapping_add(1);
        } else {
            t.last_dir = dir as u8;
            t.last_seq = seq;
            t.last_ack = ack;
            t.last_end = end;
            t.last_win = win_raw;
            t.retrans = 0;
        }
    }
    NFCT_TCP_ACCEPT
}
