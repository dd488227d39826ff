//! Hairpin NAT in the model, CloudStack-style: a guest V2 sending to a mapped public IP P1 (of
//! guest V1) reaches V1 from R, the router's address on V1's interface, with V2's ports; V1's
//! replies to R go back to V2 from P1. P1's ingress firewall decides, with V2 as the source.
//!
//! Two table entries per flow: the forward leg {V2, P1, sport, dport} holds the state (origin
//! guest), the reply binding {V1, R, dport, sport} names V2 and its port and follows the
//! forward leg's state and age. A binding of another live sender is a collision: the kernel
//! translates that packet (its NAT can pick another port). ICMP errors about hairpinned
//! packets are the kernel's too.
use std::net::Ipv4Addr;

use nat_common::{ROLE_GUEST, Reason};

use super::{
    Direction, Events, Flow, Found, Ip, Kind, L4Edit, Leg, Model, Outcome, Path, Tracked, dropped,
    redirected, transport,
};

impl Model {
    /// Guest ingress to `ip.daddr` = P1, which `NAT_IN` maps to `v1`.
    pub(super) fn hairpin_forward(
        &mut self,
        f: &[u8],
        ip: &Ip,
        v1: Ipv4Addr,
        now: u64,
        ev: &mut Events,
    ) -> Result<Outcome, Reason> {
        self.last_leg = Some(Leg::HairpinForward);
        let (v2, p1) = (ip.saddr, ip.daddr);
        if ip.ttl <= 1 {
            return Err(Reason::TtlExpired);
        }
        // Parsed as an inbound packet to P1 (an error must quote P1 as its source).
        let (edit, facts) = transport(f, ip.proto, ip.l4_len(), true, p1)?;
        if facts.quoted.is_some() {
            return Err(Reason::IcmpErrorUnrelated);
        }
        // The route comes first here: V2 -> V1 must leave through a guest interface on which
        // the router has an address, the new source.
        let (hop, r) = self.route(v1, ip.tot_len, ROLE_GUEST)?;
        if r.is_unspecified() {
            return Err(Reason::WrongEgress);
        }
        let fwd = Flow {
            guest: v2,
            remote: p1,
            guest_port: facts.sport,
            remote_port: facts.dport,
            proto: ip.proto,
            kind: Kind::HairpinFwd,
        };
        let rev = Flow {
            guest: v1,
            remote: r,
            guest_port: facts.dport,
            remote_port: facts.sport,
            proto: ip.proto,
            kind: Kind::HairpinRev,
        };
        let ct = &mut self.policy.conntrack;
        let found = ct.track(&fwd, &facts, true, now, ev);
        if found == Found::Hit {
            ct.refresh(&rev, &fwd, now);
            self.last_path = Some(Path::Established);
        } else {
            if ct
                .live_entry(&rev, now)
                .is_some_and(|b| b.peer != (v2, facts.sport))
            {
                self.last_path = Some(Path::Collision);
                return Err(Reason::HairpinCollision);
            }
            if !self.policy.rules.ingress_allows(p1, &facts) {
                self.last_path = Some(Path::Denied);
                let key = (Direction::Inbound, p1);
                return Ok(dropped(Reason::InboundDenied, f, key));
            }
            self.last_path = Some(Path::Rule);
            // A packet INVALID for its flow neither joins nor replaces it.
            let ct = &mut self.policy.conntrack;
            if found == Found::Miss
                && let Some(t) = ct.open(fwd, &facts, true, now, ev)
            {
                let binding = Tracked::binding(t.state, (v2, facts.sport)).with_timer(t.timer);
                ct.put(rev, binding, now);
            }
        }
        let mut out = f.to_vec();
        rewrite_both(&mut out, &edit, (v2, r), (p1, v1), &hop);
        let key = (Direction::Inbound, p1);
        Ok(redirected(Reason::HairpinForwarded, out, key))
    }

    /// Guest ingress to the router's own address `ip.daddr` = R on that interface: a hairpin
    /// reply from `ip.saddr` = V1 if a binding names the sender; `Ok(None)` if none does (the
    /// frame is then classified as outbound).
    pub(super) fn hairpin_reply(
        &mut self,
        f: &[u8],
        ip: &Ip,
        now: u64,
        ev: &mut Events,
    ) -> Result<Option<Outcome>, Reason> {
        let (v1, r) = (ip.saddr, ip.daddr);
        // Parsed as an outbound packet of V1 before anything else.
        let (edit, facts) = transport(f, ip.proto, ip.l4_len(), false, v1)?;
        let rev = Flow {
            guest: v1,
            remote: r,
            guest_port: facts.sport,
            remote_port: facts.dport,
            proto: ip.proto,
            kind: Kind::HairpinRev,
        };
        // Any binding, live or not: the forward leg's state decides.
        let Some(binding) = self.policy.conntrack.entry(&rev) else {
            return Ok(None);
        };
        self.last_leg = Some(Leg::HairpinReply);
        let (v2, v2_port) = binding.peer;
        if facts.quoted.is_some() {
            return Err(Reason::IcmpErrorUnrelated);
        }
        if ip.ttl <= 1 {
            return Err(Reason::TtlExpired);
        }
        let p1 = *self.nat_out.get(&v1).ok_or(Reason::Unmapped)?;
        let fwd = Flow {
            guest: v2,
            remote: p1,
            guest_port: v2_port,
            remote_port: facts.sport,
            proto: ip.proto,
            kind: Kind::HairpinFwd,
        };
        let ct = &mut self.policy.conntrack;
        if ct.track(&fwd, &facts, false, now, ev) != Found::Hit {
            self.last_path = Some(Path::Stale);
            return Err(Reason::Unmapped);
        }
        self.last_path = Some(Path::Established);
        ct.refresh(&rev, &fwd, now);
        let (hop, _) = self.route(v2, ip.tot_len, ROLE_GUEST)?;
        let mut out = f.to_vec();
        rewrite_both(&mut out, &edit, (v1, p1), (r, v2), &hop);
        let key = (Direction::Outbound, v1);
        Ok(Some(redirected(Reason::HairpinForwarded, out, key)))
    }
}

/// Rewrites source `src.0 -> src.1` and destination `dst.0 -> dst.1`: the transport checksum
/// over the pseudo-header (one RFC 1624 update over all four changed words), the IP checksum
/// for both addresses and the TTL, and the MACs.
fn rewrite_both(
    out: &mut [u8],
    edit: &L4Edit,
    src: (Ipv4Addr, Ipv4Addr),
    dst: (Ipv4Addr, Ipv4Addr),
    hop: &super::Hop,
) {
    let old = [src.0.octets(), dst.0.octets()].concat();
    let new = [src.1.octets(), dst.1.octets()].concat();
    match *edit {
        L4Edit::Pseudo(c) => {
            let v = super::be16(out, c.at);
            let v2 = if c.udp {
                super::update_udp(v, &old, &new)
            } else {
                super::update(v, &old, &new)
            };
            super::put16(out, c.at, v2);
        }
        L4Edit::None => {}
        L4Edit::IcmpError { .. } => unreachable!("hairpin passes ICMP errors"),
    }
    let ip = super::ETH;
    let ttl_word = [out[ip + 8], out[ip + 9]];
    let old_hdr = [&ttl_word[..], &old].concat();
    out[ip + 8] -= 1;
    out[ip + 12..ip + 20].copy_from_slice(&new);
    let new_hdr = [&[out[ip + 8], out[ip + 9]][..], &new].concat();
    let c = super::update(super::be16(out, ip + 10), &old_hdr, &new_hdr);
    super::put16(out, ip + 10, c);
    out[0..6].copy_from_slice(&hop.dmac);
    out[6..12].copy_from_slice(&hop.smac);
}
