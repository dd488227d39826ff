//! The two ways a packet of a known flow goes through the model.
//!
//! Established path: the flow is assured, its state is one a packet without SYN, FIN or RST
//! leaves as it is (TCP ESTABLISHED, replied UDP, other protocols), the packet carries none of
//! those flags, arrives where its direction expects it, fits the route's MTU, has a TTL above 1
//! and the direction's route was resolved under the current route generation: the direction's
//! rewrite is applied as it is, with no state machine. Once its liveness check is due, a flow
//! found expired takes the tracked path instead.
//!
//! Tracked path: a packet arriving on the other side of the router than its direction expects
//! is judged afresh (but cannot open or replace a flow); an expired flow is gone; otherwise
//! netfilter's answer (a SYN on a closed flow ends it and is judged as new; INVALID leaves the
//! flow and the packet is judged by the rules without opening one). A flow that became assured
//! is now so. TTL 1 goes to the kernel (the state has advanced). The direction's route is
//! resolved again if it never was, the route generation moved, the packet is larger than its
//! MTU or it arrived on another interface of its side; a failure passes the packet.
use nat_common::{Event, ROLE_GUEST, ROLE_PUBLIC, Reason, conntrack::State};

use super::{
    Events, Facts, Ip, Leg, Model, Outcome, Path, XDP_REDIRECT,
    nf_state::Ret,
    redirected, rewrite,
    table::{Tuple, Window},
};

/// What became of a packet of a known flow on the tracked path.
pub enum Tracked {
    Done(Outcome),
    /// Judged as a new packet (its flow is gone, or it came from the other side).
    New,
    /// INVALID for its flow: judged by the rules, opens nothing.
    Invalid,
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

/// Whether a flow in `state` keeps its state under a packet without SYN, FIN or RST.
fn stable(state: State) -> bool {
    matches!(
        state,
        State::TcpEstablished | State::UdpReplied | State::Icmp | State::Other
    )
}

impl Model {
    fn leg_of(reason: Reason) -> Leg {
        match reason {
            Reason::InboundForwarded => Leg::Inbound,
            Reason::OutboundForwarded => Leg::Outbound,
            _ => Leg::HairpinForward,
        }
    }

    /// The established path, or `None` for the tracked path.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fast(
        &mut self,
        f: &[u8],
        ip: &Ip,
        facts: &Facts,
        key: &Tuple,
        ingress: u32,
        now: u64,
        ev: &mut Events,
    ) -> Option<Outcome> {
        let generation = self.route_gen;
        let ct = &mut self.policy.conntrack;
        let rec = ct.table.find(key)?;
        let (d, orig) = rec.dir(key);
        let (state, _, _) = rec.encoded();
        let (hop, mtu, resolved) = d.route?;
        if rec.pending
            || !stable(state)
            || d.ingress != ingress
            || (ip.proto == 6 && facts.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0)
            || resolved != generation
            || ip.ttl <= 1
            || ip.tot_len > usize::from(mtu)
        {
            return None;
        }
        if d.due {
            if ct.expired(rec, now) {
                return None;
            }
            let rec = ct.table.find_mut(key)?;
            rec.last_seen = now;
            rec.dir_mut(orig).due = false;
        }
        if ip.proto == 6 {
            let s = &facts.seg;
            let rec = ct.table.find_mut(key)?;
            rec.dir_mut(orig)
                .window
                .note(s.seq, s.ack_seq, s.len, s.flags);
        }
        let rec = ct.table.find(key)?;
        let (d, _) = rec.dir(key);
        let (to, counted, reason) = (d.to, d.counted, d.reason);
        let mut out = f.to_vec();
        rewrite(&mut out, key, &to, &hop);
        ev.bump(Event::FastPath);
        self.last_leg = Some(if orig {
            Self::leg_of(reason)
        } else if reason == Reason::HairpinForwarded {
            Leg::HairpinReply
        } else {
            Self::leg_of(reason)
        });
        self.last_path = Some(Path::Fast);
        Some(redirected(reason, out, counted))
    }

    /// The tracked path.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn tracked(
        &mut self,
        f: &[u8],
        ip: &Ip,
        facts: &Facts,
        key: &Tuple,
        ingress: u32,
        now: u64,
        ev: &mut Events,
    ) -> Result<Tracked, Reason> {
        let role = |ifindex: u32| self.ifaces.get(&ifindex).map_or(0, |i| i.role);
        let ct = &self.policy.conntrack;
        let Some(rec) = ct.table.find(key) else {
            return Ok(Tracked::New);
        };
        let (d, orig) = rec.dir(key);
        if d.ingress != ingress && role(d.ingress) != role(ingress) {
            return Ok(Tracked::Invalid);
        }
        if ct.expired(rec, now) {
            self.policy.conntrack.table.remove(key);
            ev.bump(Event::ConntrackExpired);
            ev.bump(Event::ConntrackMiss);
            return Ok(Tracked::New);
        }
        let s = &facts.seg;
        if ip.proto == 6 && s.flags & (TCP_FIN | TCP_RST) != 0 && s.flags & TCP_SYN == 0 {
            let (sender, receiver) = if orig {
                (&rec.orig.window, &rec.reply.window)
            } else {
                (&rec.reply.window, &rec.orig.window)
            };
            if !Window::allows(sender, receiver, s.seq, s.len, s.flags) {
                self.last_out_of_window = true;
                ev.bump(Event::ConntrackMiss);
                return Ok(Tracked::Invalid);
            }
        }
        let (kept, timeouts) = (ct.kept, ct.timeouts_ns);
        let mut rec = *rec;
        let ret = rec.conn.packet(!orig, &facts.seg, &kept, &timeouts, now);
        match ret {
            Ret::New => {
                self.policy.conntrack.table.remove(key);
                ev.bump(Event::ConntrackMiss);
                return Ok(Tracked::New);
            }
            Ret::Invalid(_) => {
                ev.bump(Event::ConntrackMiss);
                return Ok(Tracked::Invalid);
            }
            Ret::Accept(Some(_)) => rec.last_seen = now,
            Ret::Accept(None) | Ret::Ignore | Ret::Close => {}
        }
        ev.bump(Event::ConntrackHit);
        if rec.pending && rec.conn.assured {
            rec.pending = false;
        }
        let close = ret == Ret::Close;
        let reason = rec.dir(key).0.reason;
        self.last_leg = Some(if !orig && reason == Reason::HairpinForwarded {
            Leg::HairpinReply
        } else {
            Self::leg_of(reason)
        });
        self.last_path = Some(Path::Established);
        self.policy.conntrack.table.insert(rec);
        if ip.ttl <= 1 {
            return Err(Reason::TtlExpired);
        }
        let generation = self.route_gen;
        let d = *rec.dir(key).0;
        let stale = match d.route {
            Some((_, mtu, g)) => g != generation || ip.tot_len > usize::from(mtu),
            None => true,
        };
        let (hop, mtu) = if stale || d.ingress != ingress {
            let want = if d.reason == Reason::OutboundForwarded {
                ROLE_PUBLIC
            } else {
                ROLE_GUEST
            };
            match self.route(d.to.daddr, ip.tot_len, want) {
                Ok((hop, _, mtu)) => {
                    let r = self
                        .policy
                        .conntrack
                        .table
                        .find_mut(key)
                        .expect("just inserted");
                    let dm = r.dir_mut(orig);
                    dm.route = Some((hop, mtu, generation));
                    dm.ingress = ingress;
                    ev.bump(Event::RouteResolved);
                    (hop, mtu)
                }
                Err(reason) => {
                    if close {
                        self.policy.conntrack.table.remove(key);
                    }
                    return Err(reason);
                }
            }
        } else {
            let (hop, mtu, _) = d.route.expect("resolved");
            (hop, mtu)
        };
        let _ = mtu;
        if ip.proto == 6
            && let Some(r) = self.policy.conntrack.table.find_mut(key)
        {
            let s = &facts.seg;
            r.dir_mut(orig)
                .window
                .note(s.seq, s.ack_seq, s.len, s.flags);
        }
        let mut out = f.to_vec();
        rewrite(&mut out, key, &d.to, &hop);
        if close {
            self.policy.conntrack.table.remove(key);
        }
        let out = Outcome {
            action: XDP_REDIRECT,
            ..redirected(d.reason, out, d.counted)
        };
        Ok(Tracked::Done(out))
    }
}
