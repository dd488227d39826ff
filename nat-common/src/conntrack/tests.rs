//! netfilter's documented transitions, walked with real sequence numbers and windows.
use super::{
    tcp::{Cell, Index, table},
    window::{DATA_UNACKNOWLEDGED, WINDOW_SCALE},
    *,
};

const TCP: u8 = 6;
const UDP: u8 = 17;
const UDPLITE: u8 = 136;
const DCCP: u8 = 33;
const ICMP: u8 = 1;
const O: Dir = Dir::Original;
const R: Dir = Dir::Reply;
const NF: Config = Config::NETFILTER;

fn secs(t: Timeout) -> u64 {
    t.default_secs()
}

/// A segment: flags, seq, ack, window, payload length.
fn seg(tcp_flags: u8, seq: u32, ack: u32, win: u16, len: u32) -> Packet {
    Packet {
        tcp_flags,
        seq,
        ack,
        sack: ack,
        win,
        len,
        ..Packet::default()
    }
}

fn go(c: &mut Conn, dir: Dir, p: Packet) -> Verdict {
    packet(c, TCP, dir, &p, &NF, secs)
}

/// Client 10000 -> server 50000, both windows 64000, no options; ESTABLISHED and ASSURED.
fn established() -> Conn {
    let mut c = open(TCP, &seg(TCP_SYN, 10_000, 0, 64_000, 0), &NF, secs).expect("syn opens");
    assert_eq!(c.state(), State::TcpSynSent);
    assert_eq!(c.timer, Timeout::TcpSynSent as u8);
    let v = go(&mut c, R, seg(TCP_SYN | TCP_ACK, 50_000, 10_001, 64_000, 0));
    assert_eq!(v, Verdict::Accept(Some(Timeout::TcpSynRecv)));
    assert_eq!(c.state(), State::TcpSynRecv);
    assert_eq!(c.flags, SEEN_REPLY);
    let v = go(&mut c, O, seg(TCP_ACK, 10_001, 50_001, 64_000, 0));
    assert_eq!(v, Verdict::Accept(Some(Timeout::TcpEstablished)));
    assert_eq!(c.state(), State::TcpEstablished);
    assert_eq!(c.flags, SEEN_REPLY | ASSURED);
    c
}

#[test]
fn the_table_is_netfilters() {
    // tcp_conntracks of v6.1, as printed in nf_conntrack_proto_tcp.c.
    #[allow(non_upper_case_globals)]
    const sIV: u8 = 10;
    #[allow(non_upper_case_globals)]
    const sIG: u8 = 11;
    let (no, ss, sr, es, fw, cw, la, tw, cl, s2) = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9);
    let nf: [[[u8; 10]; 6]; 2] = [
        [
            [ss, ss, sIG, sIG, sIG, sIG, sIG, ss, ss, s2],
            [sIV, sIV, sr, sIV, sIV, sIV, sIV, sIV, sIV, sr],
            [sIV, sIV, fw, fw, la, la, la, tw, cl, sIV],
            [es, sIV, es, es, cw, cw, tw, tw, cl, sIV],
            [sIV, cl, cl, cl, cl, cl, cl, cl, cl, cl],
            [sIV; 10],
        ],
        [
            [sIV, s2, sIV, sIV, sIV, sIV, sIV, ss, sIV, s2],
            [sIV, sr, sIG, sIG, sIG, sIG, sIG, sIG, sIG, sr],
            [sIV, sIV, fw, fw, la, la, la, tw, cl, sIV],
            [sIV, sIG, sr, es, cw, cw, tw, tw, cl, sIG],
            [sIV, cl, cl, cl, cl, cl, cl, cl, cl, cl],
            [sIV; 10],
        ],
    ];
    let _ = no;
    let rows = [
        Index::Syn,
        Index::SynAck,
        Index::Fin,
        Index::Ack,
        Index::Rst,
        Index::None,
    ];
    for (d, dir) in [O, R].into_iter().enumerate() {
        for (i, index) in rows.into_iter().enumerate() {
            for s in 0..10u8 {
                let state = State::from_u8(s).expect("tcp state");
                let want = match nf[d][i][s as usize] {
                    10 => Cell::Invalid,
                    11 => Cell::Ignore,
                    n => Cell::To(State::from_u8(n).expect("tcp state")),
                };
                assert_eq!(
                    table(dir, index, state),
                    want,
                    "{dir:?} {index:?} {state:?}"
                );
            }
        }
    }
}

#[test]
fn flag_classes_and_impossible_flags() {
    assert_eq!(tcp::index(TCP_RST | TCP_SYN), Index::Rst);
    assert_eq!(tcp::index(TCP_SYN | TCP_ACK | TCP_PSH), Index::SynAck);
    assert_eq!(tcp::index(TCP_FIN | TCP_ACK), Index::Fin);
    assert_eq!(tcp::index(TCP_PSH | TCP_ACK), Index::Ack);
    assert_eq!(tcp::index(TCP_PSH), Index::None);
    for ok in [
        TCP_SYN,
        TCP_SYN | TCP_ACK,
        TCP_RST | TCP_ACK,
        TCP_FIN | TCP_ACK,
        TCP_ACK,
    ] {
        assert!(tcp::valid_flags(ok | TCP_PSH | 0xc0), "{ok:#x}");
    }
    for bad in [
        0,
        TCP_FIN,
        TCP_SYN | TCP_FIN,
        TCP_SYN | TCP_RST,
        TCP_SYN | TCP_ACK | TCP_URG,
    ] {
        assert!(!tcp::valid_flags(bad), "{bad:#x}");
    }
    let mut c = established();
    assert_eq!(
        go(&mut c, O, seg(TCP_SYN | TCP_FIN, 10_001, 0, 100, 0)),
        Verdict::Invalid { shorten: false }
    );
    assert_eq!(c.state(), State::TcpEstablished);
}

#[test]
fn handshake_data_and_close_from_the_originator() {
    let mut c = established();
    // Data the server has not acknowledged yet: the UNACK timer.
    let v = go(
        &mut c,
        O,
        seg(TCP_PSH | TCP_ACK, 10_001, 50_001, 64_000, 100),
    );
    assert_eq!(v, Verdict::Accept(Some(Timeout::TcpUnack)));
    assert_ne!(c.tcp.seen[0].flags & DATA_UNACKNOWLEDGED, 0);
    let v = go(&mut c, R, seg(TCP_ACK, 50_001, 10_101, 64_000, 0));
    assert_eq!(v, Verdict::Accept(Some(Timeout::TcpEstablished)));
    let steps = [
        (O, TCP_FIN | TCP_ACK, 10_101, 50_001, State::TcpFinWait),
        (R, TCP_ACK, 50_001, 10_102, State::TcpCloseWait),
        (R, TCP_FIN | TCP_ACK, 50_001, 10_102, State::TcpLastAck),
        (O, TCP_ACK, 10_102, 50_002, State::TcpTimeWait),
    ];
    for (dir, f, sq, ak, want) in steps {
        let v = go(&mut c, dir, seg(f, sq, ak, 64_000, 0));
        assert!(matches!(v, Verdict::Accept(Some(_))), "{want:?}: {v:?}");
        assert_eq!(c.state(), want);
    }
    assert_eq!(c.timer, Timeout::TcpTimeWait as u8);
    assert_ne!(c.tcp.seen[0].flags & window::CLOSE_INIT, 0);
    // A new SYN on TIME_WAIT, from either side, is a new flow.
    let mut again = c;
    assert_eq!(go(&mut again, O, seg(TCP_SYN, 99, 0, 100, 0)), Verdict::New);
    assert_eq!(go(&mut c, R, seg(TCP_SYN, 99, 0, 100, 0)), Verdict::New);
}

#[test]
fn close_from_the_responder() {
    let mut c = established();
    let steps = [
        (R, TCP_FIN | TCP_ACK, 50_001, 10_001, State::TcpFinWait),
        (O, TCP_ACK, 10_001, 50_002, State::TcpCloseWait),
        (O, TCP_FIN | TCP_ACK, 10_001, 50_002, State::TcpLastAck),
        (R, TCP_ACK, 50_002, 10_002, State::TcpTimeWait),
    ];
    for (dir, f, sq, ak, want) in steps {
        go(&mut c, dir, seg(f, sq, ak, 64_000, 0));
        assert_eq!(c.state(), want);
    }
    assert_ne!(c.tcp.seen[1].flags & window::CLOSE_INIT, 0);
    assert_eq!(c.tcp.seen[0].flags & window::CLOSE_INIT, 0);
}

#[test]
fn simultaneous_open() {
    let mut c = open(TCP, &seg(TCP_SYN, 10_000, 0, 64_000, 0), &NF, secs).expect("syn");
    go(&mut c, R, seg(TCP_SYN, 50_000, 0, 64_000, 0));
    assert_eq!(c.state(), State::TcpSynSent2);
    go(&mut c, O, seg(TCP_SYN | TCP_ACK, 10_000, 50_001, 64_000, 0));
    assert_eq!(c.state(), State::TcpSynRecv);
    // The other SYN/ACK is a retransmission in SYN_RECV: ignored.
    let v = go(&mut c, R, seg(TCP_SYN | TCP_ACK, 50_000, 10_001, 64_000, 0));
    assert_eq!(v, Verdict::Ignore);
    // The responder's ACK completes it (the table alone would stay in SYN_RECV).
    go(&mut c, R, seg(TCP_ACK, 50_001, 10_001, 64_000, 0));
    assert_eq!(c.state(), State::TcpEstablished);
}

#[test]
fn syn_ack_retransmission_is_ignored() {
    let mut c = open(TCP, &seg(TCP_SYN, 10_000, 0, 64_000, 0), &NF, secs).expect("syn");
    go(&mut c, R, seg(TCP_SYN | TCP_ACK, 50_000, 10_001, 64_000, 0));
    let before = c;
    let v = go(&mut c, R, seg(TCP_SYN | TCP_ACK, 50_000, 10_001, 64_000, 0));
    assert_eq!(v, Verdict::Ignore);
    assert_eq!((c.state, c.timer), (before.state, before.timer));
    // A retransmitted SYN of an unanswered flow does not restart its timer.
    let mut c = open(TCP, &seg(TCP_SYN, 10_000, 0, 64_000, 0), &NF, secs).expect("syn");
    let v = go(&mut c, O, seg(TCP_SYN, 10_000, 0, 64_000, 0));
    assert_eq!(v, Verdict::Accept(None));
    assert_eq!(c.state(), State::TcpSynSent);
}

#[test]
fn rst_in_and_out_of_the_window() {
    // Exactly at the other side's highest ACK: closes.
    let mut c = established();
    let v = go(&mut c, R, seg(TCP_RST, 50_001, 0, 0, 0));
    assert_eq!(v, Verdict::Accept(Some(Timeout::TcpClose)));
    assert_eq!(c.state(), State::TcpClose);
    // Below what the other side acknowledged: invalid, nothing changes.
    let mut c = established();
    let v = go(&mut c, R, seg(TCP_RST, 40_000, 0, 0, 0));
    assert_eq!(v, Verdict::Invalid { shorten: false });
    assert_eq!(c.state(), State::TcpEstablished);
    // Far beyond the window (a blind guess): invalid.
    let mut c = established();
    let v = go(&mut c, R, seg(TCP_RST, 50_001 + 1_000_000, 0, 0, 0));
    assert_eq!(v, Verdict::Invalid { shorten: false });
    assert_eq!(c.state(), State::TcpEstablished);
    // In the window but not the expected number: state stays (RFC 5961 challenge ACK), only
    // the timer drops to CLOSE's.
    let mut c = established();
    let v = go(&mut c, R, seg(TCP_RST, 50_101, 0, 0, 0));
    assert_eq!(v, Verdict::Accept(Some(Timeout::TcpClose)));
    assert_eq!(c.state(), State::TcpEstablished);
    // The only answer to a SYN is an RST: the flow is deleted.
    let mut c = open(TCP, &seg(TCP_SYN, 10_000, 0, 64_000, 0), &NF, secs).expect("syn");
    let v = go(&mut c, R, seg(TCP_RST | TCP_ACK, 0, 10_001, 0, 0));
    assert_eq!(v, Verdict::Close);
}

#[test]
fn fin_out_of_the_window_changes_nothing() {
    let mut c = established();
    let v = go(
        &mut c,
        R,
        seg(TCP_FIN | TCP_ACK, 50_001 + 1_000_000, 10_001, 100, 0),
    );
    assert_eq!(v, Verdict::Invalid { shorten: false });
    assert_eq!(c.state(), State::TcpEstablished);
    // Then one from the other side too: the assured flow's timer is shortened.
    let v = go(&mut c, O, seg(TCP_RST, 10_001 + 2_000_000, 0, 0, 0));
    assert_eq!(v, Verdict::Invalid { shorten: true });
    assert_eq!(c.state(), State::TcpEstablished);
    // In the window it closes.
    let v = go(&mut c, R, seg(TCP_FIN | TCP_ACK, 50_001, 10_001, 100, 0));
    assert!(matches!(v, Verdict::Accept(_)));
    assert_eq!(c.state(), State::TcpFinWait);
}

#[test]
fn syn_on_close_is_new_from_either_side() {
    let mut c = established();
    go(&mut c, O, seg(TCP_RST, 10_001, 0, 0, 0));
    assert_eq!(c.state(), State::TcpClose);
    let closed = c;
    assert_eq!(go(&mut c, O, seg(TCP_SYN, 7, 0, 100, 0)), Verdict::New);
    let mut c = closed;
    assert_eq!(go(&mut c, R, seg(TCP_SYN, 7, 0, 100, 0)), Verdict::New);
    // Anything else on CLOSE stays in CLOSE.
    let mut c = closed;
    go(&mut c, R, seg(TCP_ACK, 50_001, 10_001, 100, 0));
    assert_eq!(c.state(), State::TcpClose);
}

#[test]
fn loose_pickup() {
    let ack = seg(TCP_PSH | TCP_ACK, 777, 888, 1000, 10);
    let c = open(TCP, &ack, &NF, secs).expect("picked up");
    assert_eq!(c.state(), State::TcpEstablished);
    // No pure ACK seen yet (netfilter's last_win is 0): the RETRANS timer caps it.
    assert_eq!(c.timer, Timeout::TcpRetrans as u8);
    assert_eq!(c.flags, 0);
    let strict = Config {
        tcp_loose: false,
        ..NF
    };
    assert_eq!(open(TCP, &ack, &strict, secs), None);
    for f in [
        TCP_RST,
        TCP_RST | TCP_ACK,
        TCP_FIN | TCP_ACK,
        TCP_SYN | TCP_ACK,
        TCP_PSH,
    ] {
        assert_eq!(open(TCP, &seg(f, 1, 2, 3, 0), &NF, secs), None, "{f:#x}");
    }
    // Picked-up flows are liberal: a reply far from anything seen is still accepted.
    let mut c = c;
    let v = go(&mut c, R, seg(TCP_ACK, 3_000_000_000, 787, 1000, 0));
    assert!(matches!(v, Verdict::Accept(Some(_))), "{v:?}");
    assert_eq!(c.flags, SEEN_REPLY);
    // Assured with the next packet after the answer.
    go(&mut c, O, seg(TCP_ACK, 787, 3_000_000_000, 1000, 0));
    assert_eq!(c.flags, SEEN_REPLY | ASSURED);
}

#[test]
fn window_scale_needs_both_ends() {
    let syn = Packet {
        opts: parse_options(&[1, 3, 3, 7, 1, 1, 4, 2]),
        ..seg(TCP_SYN, 10_000, 0, 64_000, 0)
    };
    assert_eq!(syn.opts.wscale, Some(7));
    assert!(syn.opts.sack_perm);
    let mut c = open(TCP, &syn, &NF, secs).expect("syn");
    assert_eq!(c.tcp.seen[0].td_scale, 7);
    // The SYN/ACK has no window scale: neither side scales.
    let synack = Packet {
        opts: parse_options(&[2, 4, 5, 180]),
        ..seg(TCP_SYN | TCP_ACK, 50_000, 10_001, 64_000, 0)
    };
    go(&mut c, R, synack);
    assert_eq!((c.tcp.seen[0].td_scale, c.tcp.seen[1].td_scale), (0, 0));
    assert_eq!(c.tcp.seen[1].flags & WINDOW_SCALE, 0);
}

#[test]
fn options_and_sack() {
    assert_eq!(parse_options(&[]), TcpOpts::NONE);
    assert_eq!(parse_options(&[3, 3, 20]).wscale, Some(14));
    // A truncated option stops parsing.
    assert_eq!(parse_options(&[1, 3, 3]).wscale, None);
    let mut opts = [
        1u8, 1, 5, 18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    opts[8..12].copy_from_slice(&500u32.to_be_bytes());
    opts[16..20].copy_from_slice(&900u32.to_be_bytes());
    assert_eq!(sack_edge(&opts, 100), 900);
    assert_eq!(sack_edge(&opts, 1000), 1000);
}

/// UDP, and UDP-Lite alike (netfilter tracks both with `nf_conntrack_udp_packet`).
#[test]
fn udp_replied_after_two_seconds() {
    let early = Packet {
        udp_stream: false,
        ..Packet::default()
    };
    let late = Packet {
        udp_stream: true,
        ..Packet::default()
    };
    for proto in [UDP, UDPLITE] {
        let mut c = open(proto, &early, &NF, secs).expect("udp opens");
        assert_eq!((c.state(), c.timer), (State::UdpUnreplied, 11));
        let v = packet(&mut c, proto, R, &early, &NF, secs);
        assert_eq!(v, Verdict::Accept(Some(Timeout::UdpUnreplied)));
        assert_eq!((c.state(), c.flags), (State::UdpReplied, SEEN_REPLY));
        let v = packet(&mut c, proto, O, &early, &NF, secs);
        assert_eq!(v, Verdict::Accept(Some(Timeout::UdpUnreplied)));
        assert_eq!(c.flags, SEEN_REPLY | ASSURED);
        let v = packet(&mut c, proto, O, &late, &NF, secs);
        assert_eq!(v, Verdict::Accept(Some(Timeout::UdpReplied)));
    }
}

/// DCCP: the generic tracker (one timeout, replied but never assured).
#[test]
fn dccp_is_tracked_generically() {
    let p = Packet::default();
    let mut c = open(DCCP, &p, &NF, secs).expect("dccp opens");
    assert_eq!((c.state(), c.timer), (State::Other, Timeout::Other as u8));
    let v = packet(&mut c, DCCP, R, &p, &NF, secs);
    assert_eq!(v, Verdict::Accept(Some(Timeout::Other)));
    let v = packet(&mut c, DCCP, O, &p, &NF, secs);
    assert_eq!(v, Verdict::Accept(Some(Timeout::Other)));
    assert_eq!((c.state(), c.flags), (State::Other, SEEN_REPLY));
}

#[test]
fn icmp_queries() {
    for (req, rep) in [(8, 0), (13, 14), (15, 16), (17, 18)] {
        assert_eq!(icmp_query(req), Some((req, rep)));
        assert_eq!(icmp_query(rep), Some((req, rep)));
        assert!(icmp_opens(req));
        assert!(!icmp_opens(rep));
        // The guest's request and the remote's reply name one flow...
        assert_eq!(icmp_flow_type(req, true), icmp_flow_type(rep, false));
        // ...and a remote's request with the same identifier another.
        assert_ne!(icmp_flow_type(req, true), icmp_flow_type(req, false));
        assert_eq!(icmp_flow_type(req, false), icmp_flow_type(rep, true));
    }
    for other in [3, 4, 5, 9, 10, 11, 12, 19, 255] {
        assert_eq!(icmp_query(other), None);
        assert!(!icmp_opens(other));
    }
    let mut c = open(ICMP, &Packet::default(), &NF, secs).expect("icmp");
    assert_eq!(c.state(), State::Icmp);
    let v = packet(&mut c, ICMP, R, &Packet::default(), &NF, secs);
    assert_eq!(v, Verdict::Accept(Some(Timeout::Icmp)));
    assert_eq!(c.flags, SEEN_REPLY);
}

#[test]
fn without_window_checks_only_flags_count() {
    let cfg = Config {
        tcp_no_window_check: true,
        ..NF
    };
    let f = Packet::flags_only;
    let mut c = open(TCP, &f(TCP_SYN), &cfg, secs).expect("syn");
    for (dir, flags, want) in [
        (R, TCP_SYN | TCP_ACK, State::TcpSynRecv),
        (O, TCP_ACK, State::TcpEstablished),
        (R, TCP_RST, State::TcpClose),
    ] {
        let mut t = Conn {
            tcp: TcpConn::FORGOTTEN,
            ..c
        };
        assert!(matches!(
            packet(&mut t, TCP, dir, &f(flags), &cfg, secs),
            Verdict::Accept(_)
        ));
        c = t;
        assert_eq!(c.state(), want);
    }
}

#[test]
fn timeouts_and_states_cover_their_slots() {
    for (i, t) in Timeout::ALL.iter().enumerate() {
        assert_eq!(*t as usize, i);
        assert_eq!(Timeout::from_u8(i as u8), Some(*t));
        assert!(t.default_secs() > 0);
    }
    assert_eq!(Timeout::from_u8(Timeout::COUNT as u8), None);
    for (i, s) in State::ALL.iter().enumerate() {
        assert_eq!(State::from_u8(i as u8), Some(*s));
    }
    assert_eq!(State::from_u8(14), None);
}
