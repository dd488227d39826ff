//! Hairpin NAT in the model, CloudStack-style: a guest V2 sending to a mapped public IP P1 (of
//! guest V1) reaches V1 from R, the router's address on V1's interface; V1's answers to R go
//! back to V2 from P1 (the flow's reply direction). P1's ingress firewall decides, with V2 as
//! the source. V2's source port (an ICMP query: its identifier) is kept unless another live
//! flow already answers on that port from V1 to R; then the first free one of a fixed sequence
//! is taken (`nat_common::flow::hairpin_port`'s, written out again here), and if none is free
//! the kernel gets the packet. ICMP errors about hairpinned packets are the kernel's too.
use std::net::Ipv4Addr;

use nat_common::{ROLE_GUEST, Reason};

use super::{
    Direction, Events, Facts, Ip, Model, Outcome, Path, dropped, is_error, newflow::Way,
    table::Tuple, tuple_of,
};

/// Attempts at a free port, the sender's own first.
const TRIES: u32 = 8;

/// The source port (host order) the `attempt`-th try takes for a sender's port `sport`.
fn port(sport: u16, attempt: u32) -> u16 {
    if attempt == 0 {
        return sport;
    }
    (1024 + (u32::from(sport) + attempt * 7919) % 64512) as u16
}

impl Model {
    /// Guest ingress to `ip.daddr` = P1, which `NAT_IN` maps to `v1`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn hairpin(
        &mut self,
        f: &[u8],
        ip: &Ip,
        facts: &Facts,
        ingress: u32,
        v1: Ipv4Addr,
        may_open: bool,
        now: u64,
        ev: &mut Events,
    ) -> Result<Outcome, Reason> {
        let p1 = ip.daddr;
        if is_error(facts) {
            return Err(Reason::IcmpErrorUnrelated);
        }
        if !self.policy.rules.ingress_allows(p1, facts) {
            self.last_path = Some(Path::Denied);
            return Ok(dropped(
                Reason::InboundDenied,
                f,
                Some((Direction::Inbound, p1)),
            ));
        }
        self.last_path = Some(Path::Rule);
        if ip.ttl <= 1 {
            return Err(Reason::TtlExpired);
        }
        // V2 -> V1 must leave through a guest interface on which the router has an address,
        // the new source.
        let (hop, r, mtu) = self.route(v1, ip.tot_len, ROLE_GUEST)?;
        if r.is_unspecified() {
            return Err(Reason::WrongEgress);
        }
        let key = tuple_of(ip, facts);
        let (sport, dport) = match key {
            Some(k) => (k.sport, k.dport),
            None => (facts.sport, facts.dport),
        };
        let mut chosen = sport;
        if let Some(k) = key
            && may_open
            && self.policy.conntrack.opens(facts, now).is_some()
        {
            chosen = self.free_port(&k, r, v1, now)?;
        }
        let to = Tuple {
            saddr: r,
            daddr: v1,
            sport: chosen,
            dport,
            proto: ip.proto,
        };
        self.open_and_translate(
            f,
            facts,
            key,
            to,
            Way::Hairpin,
            ingress,
            (hop, mtu),
            (p1, v1),
            may_open,
            now,
            ev,
        )
    }

    /// The first port whose answer key (V1 -> R) no live flow holds; a stale flow holding it
    /// is removed. Protocols without ports get one try.
    fn free_port(&mut self, k: &Tuple, r: Ipv4Addr, v1: Ipv4Addr, now: u64) -> Result<u16, Reason> {
        let tries = if matches!(k.proto, 6 | 17 | 33 | 136 | 1) {
            TRIES
        } else {
            1
        };
        for attempt in 0..tries {
            let p = port(k.sport, attempt);
            let answer = Tuple {
                saddr: r,
                daddr: v1,
                sport: p,
                dport: k.dport,
                proto: k.proto,
            }
            .reply();
            match self.policy.conntrack.table.find(&answer) {
                None => return Ok(p),
                Some(_) if !self.live(&answer, now) => {
                    self.policy.conntrack.table.remove(&answer);
                    return Ok(p);
                }
                Some(_) => {}
            }
        }
        self.last_path = Some(Path::Collision);
        Err(Reason::HairpinCollision)
    }
}
