//! TCP window tracking after netfilter's `tcp_in_window` (itself after Guido van Rooij's "Real
//! Stateful TCP Packet Filtering in IP Filter"), and the option parsing it needs.
//!
//! Per direction ([`TcpDir`], the sender's view): `td_end` = highest `seq + len` sent,
//! `td_maxend` = highest `ack + window` the other side allowed, `td_maxwin` = largest window
//! (scaled) plus SACK slack, `td_maxack` = highest ACK sent. A segment is in the window when
//! `seq <= sender.td_maxend`, `seq + len >= sender.td_end - receiver.td_maxwin`,
//! `ack <= receiver.td_end` and `ack >= receiver.td_end - max(66000, sender.td_maxwin)`.
//!
//! Work per packet: read seq, ack, window, flags and the payload length; a dozen compares; at
//! most four of the `td_*` fields written, each only when it grows. Options are read on SYN
//! and SYN/ACK only ([`parse_options`]); SACK blocks ([`sack_edge`]) only once both ends
//! announced SACK, and a caller may pass `sack = ack` instead (stricter on the lower ACK bound,
//! laxer nowhere else but in how far `td_maxend` grows).
use super::{Config, Dir, Packet, State, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, tcp::TcpConn};

/// [`TcpDir::flags`]: the sender announced window scaling.
pub const WINDOW_SCALE: u8 = 0x01;
/// [`TcpDir::flags`]: the sender announced SACK.
pub const SACK_PERM: u8 = 0x02;
/// [`TcpDir::flags`]: the sender closed first (sent the FIN that started FIN_WAIT).
pub const CLOSE_INIT: u8 = 0x04;
/// [`TcpDir::flags`]: out-of-window segments from this sender are accepted (pickups).
pub const BE_LIBERAL: u8 = 0x08;
/// [`TcpDir::flags`]: the sender has data the other side has not acknowledged.
pub const DATA_UNACKNOWLEDGED: u8 = 0x10;
/// [`TcpDir::flags`]: `td_maxack` holds an ACK this sender sent.
pub const MAXACK_SET: u8 = 0x20;

/// netfilter's `struct ip_ct_tcp_state`: what is known of one direction's sender.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpDir {
    pub td_end: u32,
    pub td_maxend: u32,
    pub td_maxwin: u32,
    pub td_maxack: u32,
    /// Window scale shift (RFC 7323), 0..=14.
    pub td_scale: u8,
    /// [`WINDOW_SCALE`], [`SACK_PERM`], [`CLOSE_INIT`], [`BE_LIBERAL`],
    /// [`DATA_UNACKNOWLEDGED`], [`MAXACK_SET`].
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<TcpDir>() == 20);

/// The options of a segment that tracking uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOpts {
    /// The segment has option bytes at all (netfilter leaves the sender's scale and flags
    /// alone when it has none).
    pub present: bool,
    /// Window scale option (capped at 14).
    pub wscale: Option<u8>,
    pub sack_perm: bool,
}

impl TcpOpts {
    pub const NONE: TcpOpts = TcpOpts {
        present: false,
        wscale: None,
        sack_perm: false,
    };
}

const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_WINDOW: u8 = 3;
const OPT_SACK_PERM: u8 = 4;
const OPT_SACK: u8 = 5;
const OPT_TIMESTAMP: u8 = 8;
/// RFC 7323's largest shift.
const MAX_WSCALE: u8 = 14;

/// Window scale and SACK-permitted from the option bytes (after the 20-byte header), as
/// netfilter's `tcp_options` reads them: stops at EOL or at a malformed option.
#[inline(always)]
pub fn parse_options(opts: &[u8]) -> TcpOpts {
    let mut o = TcpOpts {
        present: !opts.is_empty(),
        ..TcpOpts::NONE
    };
    let mut i = 0;
    // At most 40 option bytes; every round consumes at least one.
    while i < opts.len() && i < 40 {
        match opts[i] {
            OPT_EOL => break,
            OPT_NOP => i += 1,
            kind => {
                let Some(&size) = opts.get(i + 1) else { break };
                let size = size as usize;
                if size < 2 || size > opts.len() - i {
                    break;
                }
                if kind == OPT_SACK_PERM && size == 2 {
                    o.sack_perm = true;
                } else if kind == OPT_WINDOW && size == 3 {
                    o.wscale = Some(if opts[i + 2] > MAX_WSCALE {
                        MAX_WSCALE
                    } else {
                        opts[i + 2]
                    });
                }
                i += size;
            }
        }
    }
    o
}

/// The highest right edge of the first SACK option's blocks if it is beyond `ack`, else
/// `ack` (netfilter's `tcp_sack`).
#[inline(always)]
pub fn sack_edge(opts: &[u8], ack: u32) -> u32 {
    let mut sack = ack;
    // Timestamps alone, the common case.
    if opts.len() == 12 && opts[..4] == [OPT_NOP, OPT_NOP, OPT_TIMESTAMP, 10] {
        return sack;
    }
    let mut i = 0;
    while i < opts.len() && i < 40 {
        match opts[i] {
            OPT_EOL => break,
            OPT_NOP => i += 1,
            kind => {
                let Some(&size) = opts.get(i + 1) else { break };
                let size = size as usize;
                if size < 2 || size > opts.len() - i {
                    break;
                }
                if kind == OPT_SACK && size >= 10 && (size - 2).is_multiple_of(8) {
                    let mut b = i + 2;
                    while b + 8 <= i + size {
                        let right = u32::from_be_bytes([
                            opts[b + 4],
                            opts[b + 5],
                            opts[b + 6],
                            opts[b + 7],
                        ]);
                        if after(right, sack) {
                            sack = right;
                        }
                        b += 8;
                    }
                    return sack;
                }
                i += size;
            }
        }
    }
    sack
}

/// Sequence-space `a < b` (RFC 1982).
#[inline(always)]
pub const fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Sequence-space `a > b`.
#[inline(always)]
pub const fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// `seq + len`, counting SYN and FIN as one each.
#[inline(always)]
pub const fn segment_end(p: &Packet) -> u32 {
    p.seq
        .wrapping_add(p.len)
        .wrapping_add((p.tcp_flags & TCP_SYN != 0) as u32)
        .wrapping_add((p.tcp_flags & TCP_FIN != 0) as u32)
}

/// Result of the window check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    Accept,
    Ignore,
    Invalid,
}

/// Sets up a sender from its SYN or SYN/ACK (`tcp_init_sender`).
#[inline(always)]
pub(super) fn init_sender(c: &mut TcpConn, dir: Dir, p: &Packet, end: u32) {
    let s = &mut c.seen[dir as usize];
    s.td_end = end;
    s.td_maxend = end;
    s.td_maxwin = if p.win == 0 { 1 } else { p.win as u32 };
    apply_options(s, &p.opts);
    // RFC 7323: scaling only if both ends announce it.
    let both = c.seen[0].flags & c.seen[1].flags & WINDOW_SCALE != 0;
    if matches!(dir, Dir::Reply) && !both {
        c.seen[0].td_scale = 0;
        c.seen[1].td_scale = 0;
    }
}

/// netfilter's `tcp_options` applied to a sender: scale and option flags replaced (liberal
/// mode kept) when the segment has options.
#[inline(always)]
pub(super) fn apply_options(s: &mut TcpDir, o: &TcpOpts) {
    if !o.present {
        return;
    }
    s.td_scale = 0;
    s.flags &= BE_LIBERAL;
    if o.sack_perm {
        s.flags |= SACK_PERM;
    }
    if let Some(w) = o.wscale {
        s.td_scale = w;
        s.flags |= WINDOW_SCALE;
    }
}

/// The largest ACK lag accepted below the receiver's `td_end`.
#[inline(always)]
const fn max_ack_window(s: &TcpDir) -> u32 {
    if s.td_maxwin > 66_000 {
        s.td_maxwin
    } else {
        66_000
    }
}

/// netfilter's `tcp_in_window`: checks the segment against the windows seen and updates them.
/// `state` is the flow's stored state (before this packet).
#[inline(always)]
pub fn in_window(c: &mut TcpConn, state: State, dir: Dir, p: &Packet, cfg: &Config) -> Window {
    if cfg.tcp_no_window_check {
        return Window::Accept;
    }
    let (d, r) = (dir as usize, dir.other() as usize);
    let syn = p.tcp_flags & TCP_SYN != 0;
    let has_ack = p.tcp_flags & TCP_ACK != 0;
    let rst = p.tcp_flags & TCP_RST != 0;
    let mut seq = p.seq;
    let mut ack = p.ack;
    let mut sack = if c.seen[r].flags & SACK_PERM != 0 {
        p.sack
    } else {
        p.ack
    };
    let mut win = p.win as u32;
    let mut end = segment_end(p);

    if c.seen[d].td_maxwin == 0 {
        if syn {
            init_sender(c, dir, p, end);
            if !has_ack {
                // Simultaneous open.
                return Window::Accept;
            }
        } else {
            // Mid-connection: learn what we can from this segment.
            let s = &mut c.seen[d];
            s.td_end = end;
            let swin = win << s.td_scale;
            s.td_maxwin = if swin == 0 { 1 } else { swin };
            s.td_maxend = end.wrapping_add(s.td_maxwin);
            let rcv = &mut c.seen[r];
            if rcv.td_maxwin == 0 {
                rcv.td_end = sack;
                rcv.td_maxend = sack;
            } else if sack == rcv.td_end.wrapping_add(1) {
                // Likely the answer to a keepalive.
                rcv.td_end = rcv.td_end.wrapping_add(1);
            }
        }
    } else if syn
        && after(end, c.seen[d].td_end)
        && matches!(state, State::TcpSynSent | State::TcpSynRecv)
    {
        // A reinitialised connection (RFC 793): set up this direction again.
        init_sender(c, dir, p, end);
        if matches!(dir, Dir::Reply) && !has_ack {
            return Window::Accept;
        }
    }

    if !has_ack || (rst && ack == 0) {
        // No ACK (or a stack that sends RST|ACK with ack 0): take it as acknowledging all.
        ack = c.seen[r].td_end;
        sack = ack;
    }
    if rst && seq == 0 && matches!(state, State::TcpSynSent) {
        // RST answering a SYN.
        seq = c.seen[d].td_end;
        end = seq;
    }

    let liberal = c.seen[d].flags & BE_LIBERAL != 0 || cfg.tcp_be_liberal;
    let verdict = |w: Window| if liberal { Window::Accept } else { w };
    let (s, rcv) = (c.seen[d], c.seen[r]);
    if !before(seq, s.td_maxend.wrapping_add(1)) {
        let overshot = end.wrapping_sub(s.td_maxend).wrapping_add(1);
        let ack_ok = after(
            sack,
            rcv.td_end.wrapping_sub(max_ack_window(&s)).wrapping_sub(1),
        );
        let in_recv_win =
            rcv.td_maxwin != 0 && after(end, s.td_end.wrapping_sub(rcv.td_maxwin).wrapping_sub(1));
        if in_recv_win
            && ack_ok
            && overshot <= rcv.td_maxwin
            && before(sack, rcv.td_end.wrapping_add(1))
        {
            // More than the receiver allowed: let the ACK for it update us later.
            c.seen[d].td_end = end;
            c.seen[d].flags |= DATA_UNACKNOWLEDGED;
            return verdict(Window::Ignore);
        }
        return verdict(Window::Invalid);
    }
    if !before(sack, rcv.td_end.wrapping_add(1)) {
        // ACKs data never seen.
        return verdict(Window::Invalid);
    }
    let in_recv_win =
        rcv.td_maxwin == 0 || after(end, s.td_end.wrapping_sub(rcv.td_maxwin).wrapping_sub(1));
    if !in_recv_win {
        // Retransmission of acknowledged data.
        return verdict(Window::Ignore);
    }
    if !after(
        sack,
        rcv.td_end.wrapping_sub(max_ack_window(&s)).wrapping_sub(1),
    ) {
        // A much delayed ACK.
        return verdict(Window::Ignore);
    }

    if !syn {
        win <<= s.td_scale;
    }
    let swin = win.wrapping_add(sack.wrapping_sub(ack));
    let s = &mut c.seen[d];
    if s.td_maxwin < swin {
        s.td_maxwin = swin;
    }
    if after(end, s.td_end) {
        s.td_end = end;
        s.flags |= DATA_UNACKNOWLEDGED;
    }
    if has_ack {
        if s.flags & MAXACK_SET == 0 {
            s.td_maxack = ack;
            s.flags |= MAXACK_SET;
        } else if after(ack, s.td_maxack) {
            s.td_maxack = ack;
        }
    }
    let sender_maxend = s.td_maxend;
    let rcv = &mut c.seen[r];
    if rcv.td_maxwin != 0 && after(end, sender_maxend) {
        rcv.td_maxwin = rcv.td_maxwin.wrapping_add(end.wrapping_sub(sender_maxend));
    }
    if after(sack.wrapping_add(win), rcv.td_maxend.wrapping_sub(1)) {
        rcv.td_maxend = sack.wrapping_add(win);
        if win == 0 {
            rcv.td_maxend = rcv.td_maxend.wrapping_add(1);
        }
    }
    if ack == rcv.td_end {
        rcv.flags &= !DATA_UNACKNOWLEDGED;
    }

    // Retransmission detector (pure ACKs only).
    if super::tcp::index(p.tcp_flags) == super::tcp::Index::Ack {
        if c.last_dir == dir as u8
            && c.last_seq == seq
            && c.last_ack == ack
            && c.last_end == end
            && c.last_win == p.win
        {
            c.retrans = c.retrans.wrapping_add(1);
        } else {
            c.last_dir = dir as u8;
            c.last_seq = seq;
            c.last_ack = ack;
            c.last_end = end;
            c.last_win = p.win;
            c.retrans = 0;
        }
    }
    Window::Accept
}
