//! The reference model of the XDP program: the translation spec written out in plain Rust over
//! a byte slice, independently of `nat-ebpf` (big-endian field reads, its own RFC 1624
//! arithmetic on big-endian words, its own route table standing in for `bpf_fib_lookup` in
//! `fib`).
//!
//! Classification: on a public interface a frame to a mapped public IP is inbound (DNAT); on a
//! guest interface, in this order, a frame to a mapped public IP is a hairpin forward, one to
//! the router's address on that interface is a hairpin reply if a binding names it (`hairpin`),
//! and one from a mapped private IP is outbound (SNAT). [`Leg`] records which.
//!
//! Invariants it encodes: every frame ends with exactly one [`Reason`]; a pass leaves the frame
//! byte-for-byte untouched and counts no mapping; a drop (policy) leaves it untouched and counts
//! the mapping's `denied`; a redirect rewrites addresses, every checksum covering them, TTL and
//! MACs, and counts exactly one mapping; a flow opens only for a frame that is redirected. The
//! policy stage (firewall, egress, connection tracking) is in [`policy`].
mod fib;
mod hairpin;
pub mod nf_state;
pub mod policy;

use std::{collections::HashMap, net::Ipv4Addr};

use nat_common::{ROLE_GUEST, ROLE_PUBLIC, Reason};

pub use self::{
    fib::{Fib, Hop, Iface},
    policy::{
        Admit, Events, Facts, Flow, Found, Kept, Kind, NO_PEER, Path, PolicyModel, Quoted, Rules,
        Seg, Tracked,
    },
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

/// Which mapping table a frame used: `NAT_IN` (inbound) or `NAT_OUT` (outbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Inbound,
    Outbound,
}

/// What happened to one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// XDP action ([`XDP_PASS`], [`XDP_DROP`] or [`XDP_REDIRECT`]).
    pub action: u32,
    /// The one `STATS` slot the frame bumped.
    pub reason: Reason,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// The mapping whose packet and byte counters moved (key of `NAT_IN` or `NAT_OUT`), if any.
    pub counted: Option<(Direction, Ipv4Addr)>,
    /// The mapping whose `denied` counter moved, if any.
    pub denied: Option<(Direction, Ipv4Addr)>,
    /// The conntrack events the frame caused.
    pub events: Events,
}

impl Outcome {
    /// Equal but for the events (golden cases that leave them to the model comparison).
    pub fn same_verdict(&self, other: &Outcome) -> bool {
        Outcome {
            events: other.events,
            ..self.clone()
        } == *other
    }
}

/// An `IFACES` entry: the interface's role and the router's address on it (unspecified: 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceRole {
    pub role: u32,
    pub addr: Ipv4Addr,
}

/// Which way through the program a frame went (set once classification has chosen it; for a
/// hairpin reply, once a binding was found).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Leg {
    /// Public ingress to a mapped public IP (DNAT).
    Inbound,
    /// Guest ingress from a mapped private IP (SNAT).
    Outbound,
    /// Guest ingress to a mapped public IP (DNAT + SNAT to the router's guest address).
    HairpinForward,
    /// Guest ingress to the router's address on that interface, with a reply binding.
    HairpinReply,
}

/// The program's configuration (its maps) plus the environment's route table, and the state
/// the program keeps (connection table).
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// `IFACES`: ifindex -> role and address.
    pub ifaces: HashMap<u32, IfaceRole>,
    /// `NAT_IN`: public -> private.
    pub nat_in: HashMap<Ipv4Addr, Ipv4Addr>,
    /// `NAT_OUT`: private -> public.
    pub nat_out: HashMap<Ipv4Addr, Ipv4Addr>,
    pub fib: Fib,
    /// Rules, connection table and timeouts.
    pub policy: PolicyModel,
    /// The leg of the last frame (`None`: it did not get that far).
    pub last_leg: Option<Leg>,
    /// Which part of the policy decided the last frame (`None`: it did not get that far).
    pub last_path: Option<Path>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn addr_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// RFC 1624 eqn. 3, `HC' = ~(~HC + ~m + m')`, over the big-endian words of `old` -> `new`.
fn update(check: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u32::from(!check);
    for w in old.chunks(2) {
        sum += u32::from(!u16::from_be_bytes([w[0], w[1]]));
    }
    for w in new.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// [`update`] with the UDP rules of RFC 768: 0 (no checksum) stays 0, a computed 0 is 0xFFFF.
fn update_udp(check: u16, old: &[u8], new: &[u8]) -> u16 {
    if check == 0 {
        return 0;
    }
    match update(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// A checksum (big-endian offset) covering the translated address and whether UDP rules apply.
#[derive(Clone, Copy, Debug)]
struct Csum {
    at: usize,
    udp: bool,
}

/// What the transport layer of a translated frame needs rewritten.
#[derive(Debug)]
enum L4Edit {
    None,
    Pseudo(Csum),
    IcmpError { addr: usize, inner: Option<Csum> },
}

const ETH: usize = 14;
const L4: usize = ETH + 20;
const EMB_IP: usize = L4 + 8;
const EMB_L4: usize = EMB_IP + 20;

/// The IPv4 header fields every leg needs, from a frame step 2 accepted.
#[derive(Clone, Copy, Debug)]
struct Ip {
    tot_len: usize,
    ttl: u8,
    proto: u8,
    saddr: Ipv4Addr,
    daddr: Ipv4Addr,
}

impl Ip {
    fn l4_len(&self) -> usize {
        self.tot_len - 20
    }
}

/// A redirected frame counted on `key`.
fn redirected(reason: Reason, frame: Vec<u8>, key: (Direction, Ipv4Addr)) -> Outcome {
    Outcome {
        action: XDP_REDIRECT,
        reason,
        frame,
        counted: Some(key),
        denied: None,
        events: Events::default(),
    }
}

/// A frame dropped by policy, `denied` counted on `key`.
fn dropped(reason: Reason, frame: &[u8], key: (Direction, Ipv4Addr)) -> Outcome {
    Outcome {
        action: XDP_DROP,
        reason,
        frame: frame.to_vec(),
        counted: None,
        denied: Some(key),
        events: Events::default(),
    }
}

impl Model {
    /// Runs one frame arriving on `ingress` at time `now` (CLOCK_MONOTONIC, ns) through the spec.
    pub fn run(&mut self, ingress: u32, frame: &[u8], now: u64) -> Outcome {
        let mut events = Events::default();
        self.last_leg = None;
        self.last_path = None;
        let mut out = self
            .translate(ingress, frame, now, &mut events)
            .unwrap_or_else(|reason| Outcome {
                action: XDP_PASS,
                reason,
                frame: frame.to_vec(),
                counted: None,
                denied: None,
                events: Events::default(),
            });
        out.events = events;
        out
    }

    /// Steps 1 to 3 of the spec, then the chosen leg; `Err` is the reason to pass the frame
    /// untouched.
    fn translate(
        &mut self,
        ingress: u32,
        f: &[u8],
        now: u64,
        events: &mut Events,
    ) -> Result<Outcome, Reason> {
        // 1. Interface.
        let iface = *self.ifaces.get(&ingress).ok_or(Reason::UnknownIface)?;
        // 2. Ethernet and IPv4 sanity.
        let ip = parse_ip(f)?;
        // 3. Classify. Public side: only DNAT. Guest side, in this order: to a mapped public
        // IP is hairpin; to the router's own address on this interface may be a hairpin reply
        // (if a binding exists); otherwise a mapped source goes out.
        if iface.role == ROLE_PUBLIC {
            let new = *self.nat_in.get(&ip.daddr).ok_or(Reason::Unmapped)?;
            return self.one_way(f, &ip, true, new, now, events);
        }
        if let Some(&v1) = self.nat_in.get(&ip.daddr) {
            return self.hairpin_forward(f, &ip, v1, now, events);
        }
        if !iface.addr.is_unspecified()
            && ip.daddr == iface.addr
            && let Some(out) = self.hairpin_reply(f, &ip, now, events)?
        {
            return Ok(out);
        }
        let new = *self.nat_out.get(&ip.saddr).ok_or(Reason::Unmapped)?;
        self.one_way(f, &ip, false, new, now, events)
    }

    /// Steps 4 to 8 for inbound (DNAT `ip.daddr` -> `new`) or outbound (SNAT `ip.saddr` ->
    /// `new`) translation.
    fn one_way(
        &mut self,
        f: &[u8],
        ip: &Ip,
        inbound: bool,
        new: Ipv4Addr,
        now: u64,
        events: &mut Events,
    ) -> Result<Outcome, Reason> {
        let (dir, old) = if inbound {
            self.last_leg = Some(Leg::Inbound);
            (Direction::Inbound, ip.daddr)
        } else {
            self.last_leg = Some(Leg::Outbound);
            (Direction::Outbound, ip.saddr)
        };
        // 4. TTL.
        if ip.ttl <= 1 {
            return Err(Reason::TtlExpired);
        }
        // 5. Transport.
        let (edit, facts) = transport(f, ip.proto, ip.l4_len(), inbound, old)?;
        // 6. Policy, before the route: a denied frame is dropped untouched.
        let (public, private) = if inbound { (old, new) } else { (new, old) };
        let (path, verdict) = self
            .policy
            .check(&facts, inbound, public, private, now, events);
        self.last_path = Some(path);
        let admit = match verdict {
            Ok(a) => a,
            Err(reason) => return Ok(dropped(reason, f, (dir, old))),
        };
        // 7. Route. The lookup also gets the (translated) source, which only multipath hashing
        // and policy rules would look at; the test namespace has neither.
        let dst = if inbound { new } else { ip.daddr };
        let want = if inbound { ROLE_GUEST } else { ROLE_PUBLIC };
        let (hop, _) = self.route(dst, ip.tot_len, want)?;
        // A flow opens only for a packet that is forwarded.
        if let Admit::Open(flow) = admit {
            self.policy
                .conntrack
                .open(flow, &facts, !inbound, now, events);
        }
        // 8. Rewrite.
        let mut out = f.to_vec();
        rewrite(&mut out, &edit, inbound, old, new, &hop);
        let reason = if inbound {
            Reason::InboundForwarded
        } else {
            Reason::OutboundForwarded
        };
        Ok(redirected(reason, out, (dir, old)))
    }

    /// The next hop to `dst` through an interface of role `want`, and the router's address on
    /// that interface.
    fn route(&self, dst: Ipv4Addr, tot_len: usize, want: u32) -> Result<(Hop, Ipv4Addr), Reason> {
        let hop = self.fib.lookup(dst, tot_len as u16)?;
        match self.ifaces.get(&hop.ifindex) {
            Some(i) if i.role == want => Ok((hop, i.addr)),
            _ => Err(Reason::WrongEgress),
        }
    }
}

/// Step 2 of the spec: Ethernet and IPv4 sanity, in the order the reasons are checked.
fn parse_ip(f: &[u8]) -> Result<Ip, Reason> {
    if f.len() < ETH || be16(f, 12) != 0x0800 {
        return Err(Reason::NotIpv4);
    }
    if f.len() < L4 {
        return Err(Reason::Malformed);
    }
    let (version, ihl) = (f[ETH] >> 4, (f[ETH] & 0x0f) as usize);
    if version != 4 || ihl < 5 {
        return Err(Reason::Malformed);
    }
    let tot_len = be16(f, ETH + 2) as usize;
    if tot_len < ihl * 4 || ETH + tot_len > f.len() {
        return Err(Reason::Malformed);
    }
    if ihl > 5 {
        return Err(Reason::IpOptions);
    }
    if be16(f, ETH + 6) & 0x3fff != 0 {
        return Err(Reason::Fragment);
    }
    Ok(Ip {
        tot_len,
        ttl: f[ETH + 8],
        proto: f[ETH + 9],
        saddr: addr_at(f, ETH + 12),
        daddr: addr_at(f, ETH + 16),
    })
}

/// Step 5 of the spec: transport sanity, which checksums the translation touches, and what
/// the policy looks at (ports, TCP flags, ICMP type/code, the quoted packet of an error).
fn transport(
    f: &[u8],
    proto: u8,
    l4_len: usize,
    inbound: bool,
    old: Ipv4Addr,
) -> Result<(L4Edit, Facts), Reason> {
    let holds = |at: usize, n: usize| f.len() >= at + n;
    let mut facts = Facts {
        proto,
        saddr: addr_at(f, ETH + 12),
        daddr: addr_at(f, ETH + 16),
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        seg: Seg {
            flags: 0,
            seq: 0,
            ack_seq: 0,
            window: 0,
            len: 0,
            options: [0; 40],
            options_len: 0,
        },
        icmp: None,
        quoted: None,
    };
    let edit = match proto {
        6 => {
            if !holds(L4, 20) || l4_len < 20 {
                return Err(Reason::Malformed);
            }
            let doff = (f[L4 + 12] >> 4) as usize * 4;
            if doff < 20 || doff > l4_len {
                return Err(Reason::Malformed);
            }
            (facts.sport, facts.dport) = (be16(f, L4), be16(f, L4 + 2));
            facts.tcp_flags = f[L4 + 13];
            let word = |at: usize| u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]]);
            facts.seg.flags = facts.tcp_flags;
            facts.seg.seq = word(L4 + 4);
            facts.seg.ack_seq = word(L4 + 8);
            facts.seg.window = be16(f, L4 + 14);
            facts.seg.len = (l4_len - doff) as u32;
            facts.seg.options_len = doff - 20;
            facts.seg.options[..doff - 20].copy_from_slice(&f[L4 + 20..L4 + doff]);
            L4Edit::Pseudo(Csum {
                at: L4 + 16,
                udp: false,
            })
        }
        17 => {
            if !holds(L4, 8) || l4_len < 8 {
                return Err(Reason::Malformed);
            }
            let ulen = be16(f, L4 + 4) as usize;
            if ulen < 8 || ulen > l4_len {
                return Err(Reason::Malformed);
            }
            (facts.sport, facts.dport) = (be16(f, L4), be16(f, L4 + 2));
            L4Edit::Pseudo(Csum {
                at: L4 + 6,
                udp: true,
            })
        }
        1 => {
            if !holds(L4, 8) || l4_len < 8 {
                return Err(Reason::Malformed);
            }
            facts.icmp = Some((f[L4], f[L4 + 1]));
            // A query (RFC 792, RFC 950): the identifier stands in for both ports.
            if nf_state::icmp_inverse(f[L4]).is_some() {
                facts.sport = be16(f, L4 + 4);
                facts.dport = facts.sport;
            }
            if matches!(f[L4], 3 | 11 | 12) {
                let (edit, quoted) = icmp_error(f, l4_len, inbound, old)?;
                facts.quoted = Some(quoted);
                edit
            } else {
                L4Edit::None
            }
        }
        _ => L4Edit::None,
    };
    Ok((edit, facts))
}

/// An ICMP error about the mapping: its embedded IP header is whole, without options, and has
/// the mapping's address on the right side (source inbound, destination outbound).
fn icmp_error(
    f: &[u8],
    l4_len: usize,
    inbound: bool,
    old: Ipv4Addr,
) -> Result<(L4Edit, Quoted), Reason> {
    if f.len() < EMB_IP + 20 || l4_len < 28 {
        return Err(Reason::IcmpErrorUnrelated);
    }
    let (emb, addr, remote) = if inbound {
        (
            addr_at(f, EMB_IP + 12),
            EMB_IP + 12,
            addr_at(f, EMB_IP + 16),
        )
    } else {
        (
            addr_at(f, EMB_IP + 16),
            EMB_IP + 16,
            addr_at(f, EMB_IP + 12),
        )
    };
    if f[EMB_IP] != 0x45 || emb != old {
        return Err(Reason::IcmpErrorUnrelated);
    }
    let quoted = l4_len - 28;
    let inner_proto = f[EMB_IP + 9];
    let inner = match inner_proto {
        6 if quoted >= 18 => Some(Csum {
            at: EMB_L4 + 16,
            udp: false,
        }),
        17 if quoted >= 8 => Some(Csum {
            at: EMB_L4 + 6,
            udp: true,
        }),
        _ => None,
    };
    // The quoted packet went guest -> remote (inbound error) or remote -> guest (outbound).
    let ports = match inner_proto {
        _ if quoted < 8 => None,
        6 | 17 => {
            let (src, dst) = (be16(f, EMB_L4), be16(f, EMB_L4 + 2));
            Some(if inbound { (src, dst) } else { (dst, src) })
        }
        // A query: its identifier and the type the guest sends in its flow (the quoted packet
        // came from the guest for an inbound error).
        1 => nf_state::icmp_guest_type(f[EMB_L4], inbound)
            .map(|ty| (be16(f, EMB_L4 + 4), u16::from(ty))),
        _ => None,
    };
    let q = Quoted {
        remote,
        proto: inner_proto,
        ports,
    };
    Ok((L4Edit::IcmpError { addr, inner }, q))
}

/// Step 8 of the spec on a frame every check accepted.
fn rewrite(out: &mut [u8], edit: &L4Edit, inbound: bool, old: Ipv4Addr, new: Ipv4Addr, hop: &Hop) {
    let (o, n) = (old.octets(), new.octets());
    match *edit {
        L4Edit::None => {}
        L4Edit::Pseudo(c) => {
            let v = be16(out, c.at);
            let v2 = if c.udp {
                update_udp(v, &o, &n)
            } else {
                update(v, &o, &n)
            };
            put16(out, c.at, v2);
        }
        L4Edit::IcmpError { addr, inner } => {
            let icmp_at = L4 + 2;
            let mut icmp = be16(out, icmp_at);
            out[addr..addr + 4].copy_from_slice(&n);
            icmp = update(icmp, &o, &n);
            let ip_at = EMB_IP + 10;
            let c = be16(out, ip_at);
            let c2 = update(c, &o, &n);
            put16(out, ip_at, c2);
            icmp = update(icmp, &c.to_be_bytes(), &c2.to_be_bytes());
            if let Some(ic) = inner {
                let c = be16(out, ic.at);
                let c2 = if ic.udp {
                    update_udp(c, &o, &n)
                } else {
                    update(c, &o, &n)
                };
                put16(out, ic.at, c2);
                icmp = update(icmp, &c.to_be_bytes(), &c2.to_be_bytes());
            }
            put16(out, icmp_at, icmp);
        }
    }
    let csum_at = ETH + 10;
    let mut ip = be16(out, csum_at);
    let addr = if inbound { ETH + 16 } else { ETH + 12 };
    out[addr..addr + 4].copy_from_slice(&n);
    ip = update(ip, &o, &n);
    let ttl_word = [out[ETH + 8], out[ETH + 9]];
    let ttl_word2 = [ttl_word[0] - 1, ttl_word[1]];
    out[ETH + 8] = ttl_word2[0];
    ip = update(ip, &ttl_word, &ttl_word2);
    put16(out, csum_at, ip);
    out[0..6].copy_from_slice(&hop.dmac);
    out[6..12].copy_from_slice(&hop.smac);
}
