//! Two encodings of netfilter's connection tracking must agree: `nat_common::conntrack` (what
//! the XDP program runs: the table written rule by rule, `#[repr(C)]` data) and the reference
//! model's `nf_state` (netfilter's array and C control flow transcribed). Random TCP segment
//! sequences (flags, direction, sequence and acknowledgement numbers near and far from the
//! windows both sides have seen, windows, payload lengths, options) and UDP exchanges go
//! through both, with everything kept and with only what the program keeps today; after every
//! packet the verdict, state, status bits, timer and (TCP) every window and last-packet field
//! must be the same. Host only. `NAT_PROPTEST_CASES` scales the number of sequences (default
//! 4 000).
use std::collections::BTreeSet;

use nat_common::conntrack::{
    self as nc, Config, Conn, Dir, Packet, State, Timeout, Verdict, icmp_flow_type, icmp_opens,
    icmp_query,
    tcp::{Cell, Index, table},
};
use nat_tests::model::nf_state::{
    self, IpCtTcp, Kept, L4, NfConn, Ret, Seg, TCP_CONNTRACKS, Timer, icmp_guest_type,
    icmp_inverse, icmp_valid_new, names::*,
};
use proptest::{
    collection::vec,
    prelude::*,
    test_runner::{Config as RunConfig, TestCaseError, TestRunner},
};

const TCP: u8 = 6;
const UDP: u8 = 17;

/// How a segment's sequence or acknowledgement number is chosen from what was seen.
#[derive(Clone, Copy, Debug)]
enum Num {
    /// The sender's `td_end` (seq) or the receiver's `td_end` (ack), plus a small delta.
    Edge(i32),
    /// The other side's `td_maxack` plus a small delta (RSTs).
    MaxAck(i32),
    /// Near the sender's `td_maxend`.
    MaxEnd(i32),
    /// Near what was noted of the last packet (`last_end`).
    LastEnd(i32),
    /// Anywhere.
    Any(u32),
    Zero,
}

#[derive(Clone, Copy, Debug)]
enum Opts {
    None,
    /// Window scale `n` and SACK permitted.
    ScaleSack(u8),
    SackPerm,
    /// A SACK block whose right edge is the ack plus this.
    SackBlock(u32),
    Timestamps,
    Truncated,
}

#[derive(Clone, Copy, Debug)]
struct Step {
    reply: bool,
    flags: u8,
    seq: Num,
    ack: Num,
    win: u16,
    len: u32,
    opts: Opts,
}

fn num() -> impl Strategy<Value = Num> {
    prop_oneof![
        6 => (-3i32..=3).prop_map(Num::Edge),
        2 => (-2000i32..=70_000).prop_map(Num::Edge),
        2 => (-2i32..=2).prop_map(Num::MaxAck),
        2 => (-3i32..=3).prop_map(Num::MaxEnd),
        2 => (-1i32..=1).prop_map(Num::LastEnd),
        1 => any::<u32>().prop_map(Num::Any),
        1 => Just(Num::Zero),
    ]
}

fn opts() -> impl Strategy<Value = Opts> {
    prop_oneof![
        8 => Just(Opts::None),
        2 => (0u8..=16).prop_map(Opts::ScaleSack),
        1 => Just(Opts::SackPerm),
        2 => (0u32..=70_000).prop_map(Opts::SackBlock),
        1 => Just(Opts::Timestamps),
        1 => Just(Opts::Truncated),
    ]
}

/// Flag bytes: every row of the table, with PSH/URG/ECE noise and impossible combinations.
fn flags() -> impl Strategy<Value = u8> {
    const F: u8 = nc::TCP_FIN;
    const S: u8 = nc::TCP_SYN;
    const R: u8 = nc::TCP_RST;
    const P: u8 = nc::TCP_PSH;
    const A: u8 = nc::TCP_ACK;
    prop_oneof![
        4 => Just(S),
        3 => Just(S | A),
        6 => Just(A),
        4 => Just(P | A),
        4 => Just(F | A),
        3 => Just(R),
        3 => Just(R | A),
        1 => Just(S | F),
        1 => Just(P),
        1 => Just(F),
        1 => any::<u8>(),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (
        any::<bool>(),
        flags(),
        num(),
        num(),
        prop_oneof![1 => Just(0u16), 6 => any::<u16>(), 3 => Just(64_240u16)],
        prop_oneof![3 => Just(0u32), 2 => 1u32..=1460, 1 => 1461u32..=70_000],
        opts(),
    )
        .prop_map(|(reply, flags, seq, ack, win, len, opts)| Step {
            reply,
            flags,
            seq,
            ack,
            win,
            len,
            opts,
        })
}

/// The option bytes of `o` for a segment acknowledging `ack`.
fn option_bytes(o: Opts, ack: u32) -> Vec<u8> {
    match o {
        Opts::None => vec![],
        Opts::ScaleSack(n) => vec![1, 3, 3, n, 4, 2, 1, 1],
        Opts::SackPerm => vec![4, 2, 1, 1],
        Opts::SackBlock(d) => {
            let mut b = vec![1, 1, 5, 10];
            b.extend_from_slice(&ack.wrapping_sub(100).to_be_bytes());
            b.extend_from_slice(&ack.wrapping_add(d).to_be_bytes());
            b
        }
        Opts::Timestamps => vec![1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2],
        Opts::Truncated => vec![1, 3, 3],
    }
}

fn resolve(n: Num, own: u32, maxack: u32, maxend: u32, last: u32) -> u32 {
    match n {
        Num::Edge(d) => own.wrapping_add_signed(d),
        Num::MaxAck(d) => maxack.wrapping_add_signed(d),
        Num::MaxEnd(d) => maxend.wrapping_add_signed(d),
        Num::LastEnd(d) => last.wrapping_add_signed(d),
        Num::Any(v) => v,
        Num::Zero => 0,
    }
}

/// The same segment for both: nat-common's packet and the model's.
fn segment(s: &Step, c: &Conn) -> (Packet, Seg) {
    let d = usize::from(s.reply);
    let (me, other) = (&c.tcp.seen[d], &c.tcp.seen[1 - d]);
    let last = c.tcp.last_end;
    let seq = resolve(s.seq, me.td_end, other.td_maxack, me.td_maxend, last);
    let ack = resolve(s.ack, other.td_end, me.td_maxack, other.td_maxend, last);
    let bytes = option_bytes(s.opts, ack);
    let mut options = [0u8; 40];
    options[..bytes.len()].copy_from_slice(&bytes);
    let pkt = Packet {
        tcp_flags: s.flags,
        seq,
        ack,
        sack: nc::sack_edge(&bytes, ack),
        win: s.win,
        len: s.len,
        opts: nc::parse_options(&bytes),
        udp_stream: true,
    };
    let seg = Seg {
        flags: s.flags,
        seq,
        ack_seq: ack,
        window: s.win,
        len: s.len,
        options,
        options_len: bytes.len(),
    };
    (pkt, seg)
}

fn same_verdict(v: Verdict, r: Ret) -> bool {
    match (v, r) {
        (Verdict::Accept(a), Ret::Accept(b)) => a == b.map(Timer::slot),
        (Verdict::Ignore, Ret::Ignore)
        | (Verdict::New, Ret::New)
        | (Verdict::Close, Ret::Close) => true,
        (Verdict::Invalid { shorten }, Ret::Invalid(b)) => shorten == b,
        _ => false,
    }
}

/// Every field nat-common keeps equals the model's.
fn same_tcp(c: &Conn, t: &IpCtTcp) -> bool {
    let dirs = (0..2).all(|d| {
        let (a, b) = (&c.tcp.seen[d], &t.seen[d]);
        (
            a.td_end,
            a.td_maxend,
            a.td_maxwin,
            a.td_maxack,
            a.td_scale,
            a.flags,
        ) == (
            b.td_end,
            b.td_maxend,
            b.td_maxwin,
            b.td_maxack,
            b.td_scale,
            b.flags,
        )
    });
    let k = &c.tcp;
    dirs && c.state == t.state
        && (k.last_seq, k.last_ack, k.last_end, k.last_win)
            == (t.last_seq, t.last_ack, t.last_end, t.last_win)
        && (
            k.last_index,
            k.last_dir,
            k.last_wscale,
            k.last_flags,
            k.retrans,
        ) == (
            t.last_index,
            t.last_dir,
            t.last_wscale,
            t.last_flags,
            t.retrans,
        )
}

fn cases() -> u32 {
    std::env::var("NAT_PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(4_000, |n| n.clamp(500, 20_000))
}

/// Timer lengths: netfilter's defaults, or all equal (as the BPF test harness sets them).
fn timeouts(uniform: bool) -> [u64; Timeout::COUNT] {
    if uniform {
        [1_000_000_000; Timeout::COUNT]
    } else {
        [0; Timeout::COUNT]
    }
}

#[derive(Default)]
struct Seen {
    verdicts: BTreeSet<&'static str>,
    states: BTreeSet<u8>,
}

fn kind(v: Verdict) -> &'static str {
    match v {
        Verdict::Accept(Some(_)) => "accept",
        Verdict::Accept(None) => "accept without refresh",
        Verdict::Ignore => "ignore",
        Verdict::Invalid { shorten: false } => "invalid",
        Verdict::Invalid { shorten: true } => "invalid, shortened",
        Verdict::New => "new",
        Verdict::Close => "close",
    }
}

/// One TCP sequence through both. `program`: only what the program keeps today.
fn tcp_case(
    isn: u32,
    first: &Step,
    steps: &[Step],
    program: bool,
    uniform: bool,
    seen: &mut Seen,
) -> Result<(), TestCaseError> {
    let cfg = Config {
        tcp_no_window_check: program,
        ..Config::NETFILTER
    };
    let kept = if program { Kept::PROGRAM } else { Kept::ALL };
    let tmo = timeouts(uniform);
    let len = |t: Timeout| nf_state::length_ns(&tmo, Timer::of_slot(t));
    let first = Step {
        reply: false,
        seq: Num::Any(isn),
        ..*first
    };
    let (pkt, seg) = segment(
        &first,
        &Conn::forgotten(State::TcpNone, 0, Timeout::TcpSynSent),
    );
    let ours = nc::open(TCP, &pkt, &cfg, len);
    let theirs = NfConn::open(TCP, &seg, &kept, &tmo, 0);
    let (mut c, mut m) = match (ours, theirs) {
        (None, None) => return Ok(()),
        (Some(c), Some(m)) => (c, m),
        (a, b) => {
            return Err(TestCaseError::fail(format!(
                "open {first:?}: nat-common {a:?}, model {b:?}"
            )));
        }
    };
    for (i, s) in steps.iter().enumerate() {
        if program {
            c = Conn::forgotten(
                c.state(),
                c.flags,
                Timeout::from_u8(c.timer).expect("timer"),
            );
        }
        let (pkt, seg) = segment(s, &c);
        let before = (c, m);
        let v = nc::packet(&mut c, TCP, Dir::of(s.reply), &pkt, &cfg, len);
        let r = m.packet(s.reply, &seg, &kept, &tmo, 0);
        seen.verdicts.insert(kind(v));
        seen.states.insert(c.state);
        let L4::Tcp(t) = m.l4 else {
            return Err(TestCaseError::fail("the model's flow is not TCP"));
        };
        let (state, flags, timer) = m.encoded();
        let agree = same_verdict(v, r)
            && (c.state(), c.flags, c.timer) == (state, flags, timer as u8)
            && (program || same_tcp(&c, &t));
        if !agree {
            return Err(TestCaseError::fail(format!(
                "step {i} {s:?} ({pkt:?})\n  before: {:?}\n  {:?}\n  nat-common: {v:?} {c:?}\n  model: {r:?} {m:?}",
                before.0, before.1
            )));
        }
        if matches!(v, Verdict::New | Verdict::Close) {
            break;
        }
    }
    Ok(())
}

#[test]
fn tcp_machines_agree() {
    let seen = std::cell::RefCell::new(Seen::default());
    let strategy = (
        any::<u32>(),
        step(),
        vec(step(), 1..40),
        any::<bool>(),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(RunConfig::with_cases(cases()));
    let result = runner.run(&strategy, |(isn, first, steps, program, uniform)| {
        tcp_case(
            isn,
            &first,
            &steps,
            program,
            uniform,
            &mut seen.borrow_mut(),
        )
    });
    let seen = seen.into_inner();
    if let Err(e) = result {
        panic!("{e}");
    }
    // The generator must reach every outcome and every state, or it proves little.
    for k in [
        "accept",
        "accept without refresh",
        "ignore",
        "invalid",
        "new",
        "close",
    ] {
        assert!(
            seen.verdicts.contains(k),
            "no {k} verdict in {:?}",
            seen.verdicts
        );
    }
    let all: BTreeSet<u8> = (1..=9).collect();
    assert_eq!(seen.states, all, "TCP states reached");
}

#[test]
fn udp_machines_agree() {
    let strategy = vec((any::<bool>(), 0u64..1_500_000_000), 1..20);
    let mut runner = TestRunner::new(RunConfig::with_cases(cases() / 4));
    let result = runner.run(&strategy, |steps| {
        for kept in [Kept::ALL, Kept::PROGRAM] {
            let tmo = timeouts(false);
            let len = |t: Timeout| nf_state::length_ns(&tmo, Timer::of_slot(t));
            let start = 5_000_000_000u64;
            let cfg = Config::NETFILTER;
            let first = Packet {
                udp_stream: !kept.start,
                ..Packet::default()
            };
            let seg = Seg {
                flags: 0,
                seq: 0,
                ack_seq: 0,
                window: 0,
                len: 0,
                options: [0; 40],
                options_len: 0,
            };
            let mut c = nc::open(UDP, &first, &cfg, len).expect("udp opens");
            let mut m = NfConn::open(UDP, &seg, &kept, &tmo, start).expect("udp opens");
            let mut now = start;
            for (reply, dt) in &steps {
                now += dt;
                let pkt = Packet {
                    udp_stream: !kept.start || now > start + 2_000_000_000,
                    ..first
                };
                let v = nc::packet(&mut c, UDP, Dir::of(*reply), &pkt, &cfg, len);
                let r = m.packet(*reply, &seg, &kept, &tmo, now);
                prop_assert!(same_verdict(v, r), "{v:?} vs {r:?}");
                prop_assert_eq!((c.state(), c.flags, c.timer), {
                    let (s, f, t) = m.encoded();
                    (s, f, t as u8)
                });
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn tables_agree_cell_by_cell() {
    let rows = [
        Index::Syn,
        Index::SynAck,
        Index::Fin,
        Index::Ack,
        Index::Rst,
        Index::None,
    ];
    for (d, dir) in [Dir::Original, Dir::Reply].into_iter().enumerate() {
        for (i, index) in rows.into_iter().enumerate() {
            for s in sNO..=sS2 {
                let state = State::from_u8(s).expect("tcp state");
                let model = match TCP_CONNTRACKS[d][i][s as usize] {
                    n if n == sIV => Cell::Invalid,
                    n if n == sIG => Cell::Ignore,
                    n => Cell::To(State::from_u8(n).expect("tcp state")),
                };
                assert_eq!(
                    table(dir, index, state),
                    model,
                    "{dir:?} {index:?} {state:?}"
                );
            }
        }
    }
}

#[test]
fn icmp_classifications_agree() {
    for ty in 0..=255u8 {
        assert_eq!(
            icmp_query(ty).is_some(),
            icmp_inverse(ty).is_some(),
            "type {ty}"
        );
        assert_eq!(icmp_opens(ty), icmp_valid_new(ty), "type {ty}");
        for from_guest in [false, true] {
            assert_eq!(
                icmp_flow_type(ty, from_guest),
                icmp_guest_type(ty, from_guest),
                "type {ty}, from the guest: {from_guest}"
            );
        }
    }
}

#[test]
fn timers_agree() {
    for t in Timeout::ALL {
        assert_eq!(Timer::of_slot(t).slot(), t);
        assert_eq!(Timer::of_slot(t).default_secs(), t.default_secs(), "{t:?}");
    }
    for s in State::ALL {
        assert_eq!(nf_state::state_slot(s), s.timer(), "{s:?}");
    }
}
