//! The reference model of the XDP program: the translation spec written out in plain Rust over
//! a byte slice, independently of `nat-ebpf` (big-endian field reads, its own RFC 1624
//! arithmetic on big-endian words, its own route table standing in for `bpf_fib_lookup` in
//! `fib`).
//!
//! A frame first meets the flow table (`table`): a packet of a flow that is assured and in a
//! state the packet cannot change takes its direction's rewrite and route as they are (the
//! established path, `paths`); other packets of a flow advance its state by netfilter's rules
//! and resolve the route where it is stale (the tracked path). A packet of no flow is
//! classified (`newflow`): on a public interface a frame to a mapped public IP is inbound
//! (DNAT), one to a mapped private address is dropped; on a guest interface a frame to a mapped
//! public IP is hairpin (`hairpin`), one from a mapped private IP is outbound (SNAT) when its
//! route leaves through a public interface. [`Leg`] and [`Path`] record which way it went.
//!
//! Invariants it encodes: every frame ends with exactly one [`Reason`]; a pass leaves the frame
//! byte-for-byte untouched and counts no mapping; a drop leaves it untouched (and a policy drop
//! counts the mapping's `denied`); a redirect rewrites addresses (and ports where a hairpin flow
//! had to take another), every checksum covering them, TTL and MACs, and counts exactly one
//! mapping; a flow opens only for a frame that is redirected.
mod fib;
mod hairpin;
mod newflow;
pub mod nf_state;
mod paths;
pub mod policy;
pub mod table;

use std::{collections::HashMap, net::Ipv4Addr};

use nat_common::Reason;

pub use self::{
    fib::{Fib, Hop, Iface},
    policy::{Events, Facts, Flow, Kept, Kind, NO_PEER, PolicyModel, Quoted, Rules, Seg, Tracked},
    table::{DirView, Tuple},
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

/// Which way through the program a frame went: the flow direction it belonged to, or how it
/// was classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Leg {
    /// Public ingress to a mapped public IP (DNAT), or a packet of a flow translated that way.
    Inbound,
    /// Guest ingress from a mapped private IP (SNAT), or a packet of a flow translated so.
    Outbound,
    /// Guest ingress to a mapped public IP (DNAT + SNAT to the router's guest address).
    HairpinForward,
    /// The reply direction of a hairpin flow.
    HairpinReply,
}

/// Which part of the program decided a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Path {
    /// The established path: the flow's cached rewrite and route, no state machine.
    Fast,
    /// A packet of a live flow through the state machine (ESTABLISHED).
    Established,
    /// An ICMP error quoting a live flow (RELATED).
    Related,
    /// Allowed by an ingress rule or the egress policy.
    Rule,
    /// Dropped.
    Denied,
    /// Hairpin: every source port tried is held by a live flow (passed).
    Collision,
}

/// The program's configuration (its maps) plus the environment's route table, and the state
/// the program keeps (flow table).
#[derive(Clone, Debug, Default)]
pub struct Model {
    /// `IFACES`: ifindex -> role and address.
    pub ifaces: HashMap<u32, IfaceRole>,
    /// `NAT_IN`: public -> private.
    pub nat_in: HashMap<Ipv4Addr, Ipv4Addr>,
    /// `NAT_IN`'s owning interface of a public IP (new inbound flows arriving on another
    /// public interface are dropped); absent: any.
    pub owner: HashMap<Ipv4Addr, u32>,
    /// `NAT_OUT`: private -> public.
    pub nat_out: HashMap<Ipv4Addr, Ipv4Addr>,
    pub fib: Fib,
    /// The route generation (`CONFIG`): a direction resolved under another resolves again.
    pub route_gen: u32,
    /// `--policy kernel` (`CONFIG`): a mapped packet of no flow is the kernel's to judge
    /// (`KernelDecides`). Flows under this policy come only from the tc learner, which the
    /// model does not run, so its flow table stays as it was.
    pub kernel_policy: bool,
    /// Rules, flow table and timeouts.
    pub policy: PolicyModel,
    /// The leg of the last frame (`None`: it did not get that far).
    pub last_leg: Option<Leg>,
    /// Which part of the policy decided the last frame (`None`: it did not get that far).
    pub last_path: Option<Path>,
    /// The last frame was a TCP RST or FIN outside the window its flow has shown (INVALID).
    pub last_out_of_window: bool,
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

/// What an ICMP error's translation rewrites besides the outer address: the quoted address
/// (offset) and the quoted transport checksum, if whole.
#[derive(Debug)]
struct ErrorEdit {
    addr: usize,
    inner: Option<Csum>,
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

/// A frame dropped, `denied` counted on `key` if a mapping's policy dropped it.
fn dropped(reason: Reason, frame: &[u8], key: Option<(Direction, Ipv4Addr)>) -> Outcome {
    Outcome {
        action: XDP_DROP,
        reason,
        frame: frame.to_vec(),
        counted: None,
        denied: key,
        events: Events::default(),
    }
}

impl Model {
    /// Runs one frame arriving on `ingress` at time `now` (CLOCK_MONOTONIC, ns) through the spec.
    pub fn run(&mut self, ingress: u32, frame: &[u8], now: u64) -> Outcome {
        let mut events = Events::default();
        self.last_leg = None;
        self.last_path = None;
        self.last_out_of_window = false;
        let mut out = self
            .decide(ingress, frame, now, &mut events)
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

    /// Parse, then the flow the packet belongs to (established or tracked path), else the
    /// classification of a new packet; `Err` is the reason to pass the frame untouched.
    fn decide(
        &mut self,
        ingress: u32,
        f: &[u8],
        now: u64,
        ev: &mut Events,
    ) -> Result<Outcome, Reason> {
        let ip = parse_ip(f)?;
        let facts = transport(f, &ip)?;
        let mut may_open = true;
        if let Some(key) = tuple_of(&ip, &facts) {
            if self.policy.conntrack.table.find(&key).is_some() {
                if let Some(out) = self.fast(f, &ip, &facts, &key, ingress, now, ev) {
                    return Ok(out);
                }
                match self.tracked(f, &ip, &facts, &key, ingress, now, ev)? {
                    paths::Tracked::Done(out) => return Ok(out),
                    paths::Tracked::New => {}
                    paths::Tracked::Invalid => may_open = false,
                }
            } else {
                // No flow has this key.
                ev.bump(nat_common::Event::ConntrackMiss);
            }
        }
        self.classify(f, &ip, &facts, ingress, may_open, now, ev)
    }

    /// The next hop to `dst` through an interface of role `want`, the router's address on
    /// that interface and the interface's MTU.
    fn route(
        &self,
        dst: Ipv4Addr,
        tot_len: usize,
        want: u32,
    ) -> Result<(Hop, Ipv4Addr, u16), Reason> {
        let hop = self.fib.lookup(dst, tot_len as u16)?;
        match self.ifaces.get(&hop.ifindex) {
            Some(i) if i.role == want => Ok((hop, i.addr, self.fib.mtu(hop.ifindex))),
            _ => Err(Reason::WrongEgress),
        }
    }
}

/// The key a packet has in the flow table: TCP, UDP, UDP-Lite and DCCP by ports, an ICMP
/// query by identifier and type, other protocols without ports; none for other ICMP messages.
fn tuple_of(ip: &Ip, f: &Facts) -> Option<Tuple> {
    let (sport, dport) = match ip.proto {
        6 | 17 | 33 | 136 => (f.sport, f.dport),
        1 => {
            let (ty, _) = f.icmp?;
            nf_state::icmp_inverse(ty)?;
            (f.sport, u16::from(ty))
        }
        _ => (0, 0),
    };
    Some(Tuple {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        proto: ip.proto,
    })
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

/// Transport sanity and what the flow table and the policy look at (ports, TCP flags and
/// header facts, ICMP type/code); an ICMP error's quote is read by [`quote`] once its mapping
/// is known.
fn transport(f: &[u8], ip: &Ip) -> Result<Facts, Reason> {
    let (proto, l4_len) = (ip.proto, ip.l4_len());
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
    match proto {
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
        }
        // UDP-Lite (RFC 3828 §3.1): the length field is the checksum coverage, 0 for the
        // whole datagram or 8 up to its length; the checksum is mandatory (netfilter's
        // `udplite_error` deems a zero checksum or a bad coverage INVALID).
        136 => {
            if !holds(L4, 8) || l4_len < 8 {
                return Err(Reason::Malformed);
            }
            let coverage = be16(f, L4 + 4) as usize;
            if (coverage != 0 && coverage < 8) || coverage > l4_len || be16(f, L4 + 6) == 0 {
                return Err(Reason::Malformed);
            }
            (facts.sport, facts.dport) = (be16(f, L4), be16(f, L4 + 2));
        }
        // DCCP (RFC 4340 §5.1): the generic header (12 bytes at least), its data offset in
        // words within the packet, CsCov (low nibble of byte 5) within the packet, and no
        // reserved type (10-15): netfilter's `dccp_error`.
        33 => {
            if !holds(L4, 12) || l4_len < 12 {
                return Err(Reason::Malformed);
            }
            let doff = f[L4 + 4] as usize * 4;
            let cscov = (f[L4 + 5] & 0x0f) as usize;
            let ty = (f[L4 + 8] >> 1) & 0x0f;
            if doff < 12 || doff > l4_len || (cscov > 0 && (cscov - 1) * 4 > l4_len) || ty >= 10 {
                return Err(Reason::Malformed);
            }
            (facts.sport, facts.dport) = (be16(f, L4), be16(f, L4 + 2));
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
        }
        _ => {}
    }
    Ok(facts)
}

/// Whether the frame is an ICMP error (destination unreachable, time exceeded, parameter
/// problem: RFC 792), whose quote must be read.
fn is_error(f: &Facts) -> bool {
    f.proto == 1 && matches!(f.icmp, Some((3 | 11 | 12, _)))
}

/// An ICMP error about the mapping: its quoted IP header is whole, without options, and has
/// the mapping's address `old` on the right side (source inbound, destination outbound).
fn quote(f: &[u8], ip: &Ip, inbound: bool, old: Ipv4Addr) -> Result<(ErrorEdit, Quoted), Reason> {
    let l4_len = ip.l4_len();
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
        17 | 136 if quoted >= 8 => Some(Csum {
            at: EMB_L4 + 6,
            udp: true,
        }),
        // netfilter's `dccp_manip_pkt` updates the checksum only with the whole header.
        33 if quoted >= 12 => Some(Csum {
            at: EMB_L4 + 6,
            udp: false,
        }),
        _ => None,
    };
    // The quoted packet's ports as it travelled; a query's identifier and type.
    let ports = match inner_proto {
        _ if quoted < 8 => None,
        6 | 17 | 33 | 136 => Some((be16(f, EMB_L4), be16(f, EMB_L4 + 2))),
        1 => nf_state::icmp_inverse(f[EMB_L4]).map(|_| (be16(f, EMB_L4 + 4), u16::from(f[EMB_L4]))),
        _ => None,
    };
    let q = Quoted {
        remote,
        proto: inner_proto,
        ports,
    };
    Ok((ErrorEdit { addr, inner }, q))
}

/// The rewrite of a packet keyed `from` into `to` on its way to `hop`: addresses, the ports
/// (TCP, UDP, UDP-Lite, DCCP) or an ICMP query's identifier, each checksum over every word
/// that changed (one RFC 1624 update per checksum; UDP-Lite's, like UDP's, never becomes 0),
/// the TTL and the MACs.
fn rewrite(out: &mut [u8], from: &Tuple, to: &Tuple, hop: &Hop) {
    let old = [from.saddr.octets(), from.daddr.octets()].concat();
    let new = [to.saddr.octets(), to.daddr.octets()].concat();
    match from.proto {
        6 | 17 | 33 | 136 => {
            let at = if from.proto == 6 { L4 + 16 } else { L4 + 6 };
            let old_l4 = [
                &old[..],
                &from.sport.to_be_bytes(),
                &from.dport.to_be_bytes(),
            ]
            .concat();
            let new_l4 = [&new[..], &to.sport.to_be_bytes(), &to.dport.to_be_bytes()].concat();
            put16(out, L4, to.sport);
            put16(out, L4 + 2, to.dport);
            let c = be16(out, at);
            let c = if matches!(from.proto, 17 | 136) {
                update_udp(c, &old_l4, &new_l4)
            } else {
                update(c, &old_l4, &new_l4)
            };
            put16(out, at, c);
        }
        // The ICMP checksum covers no address: only a changed identifier touches it.
        1 if from.sport != to.sport => {
            put16(out, L4 + 4, to.sport);
            let c = update(
                be16(out, L4 + 2),
                &from.sport.to_be_bytes(),
                &to.sport.to_be_bytes(),
            );
            put16(out, L4 + 2, c);
        }
        _ => {}
    }
    let ttl_word = [out[ETH + 8], out[ETH + 9]];
    out[ETH + 8] -= 1;
    out[ETH + 12..ETH + 20].copy_from_slice(&new);
    let old_hdr = [&ttl_word[..], &old].concat();
    let new_hdr = [&[out[ETH + 8], out[ETH + 9]][..], &new].concat();
    let c = update(be16(out, ETH + 10), &old_hdr, &new_hdr);
    put16(out, ETH + 10, c);
    out[0..6].copy_from_slice(&hop.dmac);
    out[6..12].copy_from_slice(&hop.smac);
}

/// An ICMP error's translation: `old` -> `new` in the outer header (destination if inbound,
/// source if outbound) and in the quote, with the quote's IP and transport checksums, the
/// ICMP checksum over every word that changed, the TTL and the MACs.
fn rewrite_error(
    out: &mut [u8],
    edit: &ErrorEdit,
    inbound: bool,
    old: Ipv4Addr,
    new: Ipv4Addr,
    hop: &Hop,
) {
    let (o, n) = (old.octets(), new.octets());
    let icmp_at = L4 + 2;
    let mut icmp = be16(out, icmp_at);
    out[edit.addr..edit.addr + 4].copy_from_slice(&n);
    icmp = update(icmp, &o, &n);
    let ip_at = EMB_IP + 10;
    let c = be16(out, ip_at);
    let c2 = update(c, &o, &n);
    put16(out, ip_at, c2);
    icmp = update(icmp, &c.to_be_bytes(), &c2.to_be_bytes());
    if let Some(ic) = edit.inner {
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
