//! The model on netfilter's documented transitions, everything kept, default timeouts.
use super::*;

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const ALL: Kept = Kept::ALL;
const DEFAULTS: [u64; 15] = [0; 15];

fn seg(flags: u8, seq: u32, ack_seq: u32) -> Seg {
    Seg {
        flags,
        seq,
        ack_seq,
        window: 64_000,
        len: 0,
        options: [0; 40],
        options_len: 0,
    }
}

fn tcp_state(c: &NfConn) -> u8 {
    match c.l4 {
        L4::Tcp(t) => t.state,
        _ => panic!("not tcp"),
    }
}

/// Client 10000, server 50000: SYN, SYN/ACK, ACK.
fn established() -> NfConn {
    let mut c = NfConn::open(6, &seg(SYN, 10_000, 0), &ALL, &DEFAULTS, 0).expect("syn");
    assert_eq!(tcp_state(&c), sSS);
    let r = c.packet(true, &seg(SYN | ACK, 50_000, 10_001), &ALL, &DEFAULTS, 0);
    assert_eq!(r, Ret::Accept(Some(Timer::Tcp(sSR))));
    let r = c.packet(false, &seg(ACK, 10_001, 50_001), &ALL, &DEFAULTS, 0);
    assert_eq!(r, Ret::Accept(Some(Timer::Tcp(sES))));
    assert!(c.seen_reply && c.assured);
    c
}

#[test]
fn handshake_close_and_reopen() {
    let mut c = established();
    for (reply, flags, seq, ack, want) in [
        (false, FIN | ACK, 10_001, 50_001, sFW),
        (true, ACK, 50_001, 10_002, sCW),
        (true, FIN | ACK, 50_001, 10_002, sLA),
        (false, ACK, 10_002, 50_002, sTW),
    ] {
        c.packet(reply, &seg(flags, seq, ack), &ALL, &DEFAULTS, 0);
        assert_eq!(tcp_state(&c), want);
    }
    assert_eq!(
        c.packet(true, &seg(SYN, 1, 0), &ALL, &DEFAULTS, 0),
        Ret::New
    );
}

#[test]
fn blind_rst_is_invalid_in_window_rst_closes() {
    let mut c = established();
    let blind = c.packet(true, &seg(RST, 50_001 + 3_000_000, 0), &ALL, &DEFAULTS, 0);
    assert_eq!(blind, Ret::Invalid(false));
    assert_eq!(tcp_state(&c), sES);
    let stale = c.packet(true, &seg(RST, 49_000, 0), &ALL, &DEFAULTS, 0);
    assert_eq!(stale, Ret::Invalid(false));
    let exact = c.packet(true, &seg(RST, 50_001, 0), &ALL, &DEFAULTS, 0);
    assert_eq!(exact, Ret::Accept(Some(Timer::Tcp(sCL))));
    assert_eq!(tcp_state(&c), sCL);
}

#[test]
fn what_the_program_keeps_counts_flags_only() {
    let mut c = established();
    // Without windows a blind RST closes the flow (netfilter with no window check).
    let r = c.packet(true, &seg(RST, 7, 0), &Kept::PROGRAM, &DEFAULTS, 0);
    assert_eq!(r, Ret::Accept(Some(Timer::Tcp(sCL))));
}

#[test]
fn icmp_queries_and_udp() {
    assert_eq!(icmp_inverse(13), Some(14));
    assert_eq!(icmp_inverse(3), None);
    assert!(icmp_valid_new(17) && !icmp_valid_new(18));
    assert_eq!(icmp_guest_type(8, false), Some(0));
    let mut u = NfConn::open(17, &seg(0, 0, 0), &ALL, &DEFAULTS, 100).expect("udp");
    u.packet(true, &seg(0, 0, 0), &ALL, &DEFAULTS, 200);
    let early = u.packet(false, &seg(0, 0, 0), &ALL, &DEFAULTS, 300);
    assert_eq!(early, Ret::Accept(Some(Timer::Udp(UDP_CT_UNREPLIED))));
    let late = u.packet(false, &seg(0, 0, 0), &ALL, &DEFAULTS, 3_000_000_000);
    assert_eq!(late, Ret::Accept(Some(Timer::Udp(UDP_CT_REPLIED))));
    assert_eq!(
        u.encoded(),
        (State::UdpReplied, SEEN_REPLY | ASSURED, Timeout::UdpReplied)
    );
}
