//! A packet of no flow: classification by ingress role and mappings, policy, route, and the
//! flow it opens.
//!
//! Public side: to a mapped public IP P is inbound: a new flow to P arriving on a public
//! interface other than P's own is dropped; an ICMP error gets in if it quotes a live flow
//! (RELATED), anything else if an ingress rule of P allows it; denied packets are dropped
//! before anything could answer them (TTL, route). To a mapped private address: dropped.
//! Guest side: to a mapped public IP is hairpin (`super::hairpin`); from a mapped private
//! address V is outbound, but only if the route leaves through a public interface (or the
//! kernel must resolve that interface's neighbour, or fragment): the egress policy judges it
//! then; the router's own addresses and other guest networks get the packet untouched.
//! TTL 1 goes to the kernel. A forwarded packet that may open a flow opens it
//! (both directions, pending; the reply direction's route is resolved by its first packet).
use std::net::Ipv4Addr;

use nat_common::{Event, ORIGIN_GUEST, ORIGIN_PUBLIC, ROLE_GUEST, ROLE_PUBLIC, Reason};

use super::{
    Direction, Events, Facts, Flow, Hop, Ip, Kind, Leg, Model, Outcome, Path, dropped, is_error,
    quote, redirected, rewrite, rewrite_error,
    table::{Dir, Rec, Tuple, Window},
    tuple_of,
};

/// Which way a new flow goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Way {
    Inbound,
    Outbound,
    Hairpin,
}

impl Model {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn classify(
        &mut self,
        f: &[u8],
        ip: &Ip,
        facts: &Facts,
        ingress: u32,
        may_open: bool,
        now: u64,
        ev: &mut Events,
    ) -> Result<Outcome, Reason> {
        let role = self.ifaces.get(&ingress).ok_or(Reason::UnknownIface)?.role;
        // `--policy kernel`: whatever involves a mapping is the kernel's to judge.
        let kernel = |leg: Leg, m: &mut Model| {
            m.last_leg = Some(leg);
            Err(Reason::KernelDecides)
        };
        if role == ROLE_PUBLIC {
            if let Some(&v) = self.nat_in.get(&ip.daddr) {
                if self.kernel_policy {
                    return kernel(Leg::Inbound, self);
                }
                self.last_leg = Some(Leg::Inbound);
                return self.inbound(f, ip, facts, ingress, v, may_open, now, ev);
            }
            if self.nat_out.contains_key(&ip.daddr) {
                if self.kernel_policy {
                    return Err(Reason::KernelDecides);
                }
                return Ok(dropped(Reason::DirectToPrivate, f, None));
            }
            return Err(Reason::Unmapped);
        }
        if let Some(&v1) = self.nat_in.get(&ip.daddr) {
            if self.kernel_policy {
                return kernel(Leg::HairpinForward, self);
            }
            self.last_leg = Some(Leg::HairpinForward);
            return self.hairpin(f, ip, facts, ingress, v1, may_open, now, ev);
        }
        let p = *self.nat_out.get(&ip.saddr).ok_or(Reason::Unmapped)?;
        if self.kernel_policy {
            return kernel(Leg::Outbound, self);
        }
        self.last_leg = Some(Leg::Outbound);
        self.outbound(f, ip, facts, ingress, p, may_open, now, ev)
    }

    /// Whether a flow direction keyed `key` exists and its flow is live.
    pub(super) fn live(&self, key: &Tuple, now: u64) -> bool {
        let ct = &self.policy.conntrack;
        ct.table.find(key).is_some_and(|r| !ct.expired(r, now))
    }

    #[allow(clippy::too_many_arguments)]
    fn inbound(
        &mut self,
        f: &[u8],
        ip: &Ip,
        facts: &Facts,
        ingress: u32,
        v: Ipv4Addr,
        may_open: bool,
        now: u64,
        ev: &mut Events,
    ) -> Result<Outcome, Reason> {
        let p = ip.daddr;
        let key = (Direction::Inbound, p);
        if self.owner.get(&p).is_some_and(|o| *o != ingress) {
            self.last_path = Some(Path::Denied);
            return Ok(dropped(Reason::WrongNetwork, f, Some(key)));
        }
        let quoted = if is_error(facts) {
            Some(quote(f, ip, true, p)?)
        } else {
            None
        };
        // The quoted P -> R left as V -> R.
        let related = quoted.as_ref().is_some_and(|(_, q)| {
            q.ports.is_some_and(|(s, d)| {
                self.live(
                    &Tuple {
                        saddr: v,
                        daddr: q.remote,
                        sport: s,
                        dport: d,
                        proto: q.proto,
                    },
                    now,
                )
            })
        });
        if !related && !self.policy.rules.ingress_allows(p, facts) {
            self.last_path = Some(Path::Denied);
            return Ok(dropped(Reason::InboundDenied, f, Some(key)));
        }
        self.last_path = Some(if related { Path::Related } else { Path::Rule });
        translatable(ip)?;
        if let Some((edit, _)) = quoted {
            let (hop, _, _) = self.route(v, ip.tot_len, ROLE_GUEST)?;
            let mut out = f.to_vec();
            rewrite_error(&mut out, &edit, true, p, v, &hop);
            return Ok(redirected(Reason::InboundForwarded, out, key));
        }
        let (hop, _, mtu) = self.route(v, ip.tot_len, ROLE_GUEST)?;
        let from = tuple_of(ip, facts);
        let to = Tuple {
            daddr: v,
            ..from.unwrap_or_else(|| plain(ip, facts))
        };
        self.open_and_translate(
            f,
            facts,
            from,
            to,
            Way::Inbound,
            ingress,
            (hop, mtu),
            (p, v),
            may_open,
            now,
            ev,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn outbound(
        &mut self,
        f: &[u8],
        ip: &Ip,
        facts: &Facts,
        ingress: u32,
        p: Ipv4Addr,
        may_open: bool,
        now: u64,
        ev: &mut Events,
    ) -> Result<Outcome, Reason> {
        let v = ip.saddr;
        let key = (Direction::Outbound, v);
        let quoted = if is_error(facts) {
            Some(quote(f, ip, false, v)?)
        } else {
            None
        };
        // The quoted R -> V came as R -> P.
        if let Some((edit, q)) = &quoted
            && q.ports.is_some_and(|(s, d)| {
                self.live(
                    &Tuple {
                        saddr: q.remote,
                        daddr: p,
                        sport: s,
                        dport: d,
                        proto: q.proto,
                    },
                    now,
                )
            })
        {
            self.last_path = Some(Path::Related);
            translatable(ip)?;
            let (hop, _, _) = self.route(ip.daddr, ip.tot_len, ROLE_PUBLIC)?;
            let mut out = f.to_vec();
            rewrite_error(&mut out, edit, false, v, p, &hop);
            return Ok(redirected(Reason::OutboundForwarded, out, key));
        }
        // Only what leaves through a public interface meets the egress policy.
        let route = match self.route(ip.daddr, ip.tot_len, ROLE_PUBLIC) {
            Ok(r) => Ok(r),
            Err(Reason::FragNeeded) => Err(Reason::FragNeeded),
            Err(Reason::NoNeighbour)
                if self
                    .fib
                    .route_dev(ip.daddr)
                    .and_then(|d| self.ifaces.get(&d))
                    .is_some_and(|i| i.role == ROLE_PUBLIC) =>
            {
                Err(Reason::NoNeighbour)
            }
            Err(e) => return Err(e),
        };
        if !self.policy.rules.egress_allows(facts) {
            self.last_path = Some(Path::Denied);
            return Ok(dropped(Reason::OutboundDenied, f, Some(key)));
        }
        self.last_path = Some(Path::Rule);
        translatable(ip)?;
        let (hop, _, mtu) = route?;
        if let Some((edit, _)) = quoted {
            let mut out = f.to_vec();
            rewrite_error(&mut out, &edit, false, v, p, &hop);
            return Ok(redirected(Reason::OutboundForwarded, out, key));
        }
        let from = tuple_of(ip, facts);
        let to = Tuple {
            saddr: p,
            ..from.unwrap_or_else(|| plain(ip, facts))
        };
        self.open_and_translate(
            f,
            facts,
            from,
            to,
            Way::Outbound,
            ingress,
            (hop, mtu),
            (p, v),
            may_open,
            now,
            ev,
        )
    }

    /// Opens the flow of a packet keyed `from` that becomes `to` (when it may open one) and
    /// translates the packet. `mapping`: (public, private) of the mapping it counts on.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn open_and_translate(
        &mut self,
        f: &[u8],
        facts: &Facts,
        from: Option<Tuple>,
        to: Tuple,
        way: Way,
        ingress: u32,
        (hop, mtu): (Hop, u16),
        (p, v): (Ipv4Addr, Ipv4Addr),
        may_open: bool,
        now: u64,
        ev: &mut Events,
    ) -> Result<Outcome, Reason> {
        let (inbound, outbound) = ((Direction::Inbound, p), (Direction::Outbound, v));
        let (reason, counted, reply_reason, reply_counted) = match way {
            Way::Inbound => (
                Reason::InboundForwarded,
                inbound,
                Reason::OutboundForwarded,
                outbound,
            ),
            Way::Outbound => (
                Reason::OutboundForwarded,
                outbound,
                Reason::InboundForwarded,
                inbound,
            ),
            Way::Hairpin => (
                Reason::HairpinForwarded,
                inbound,
                Reason::HairpinForwarded,
                outbound,
            ),
        };
        let conn = if may_open {
            self.policy.conntrack.opens(facts, now)
        } else {
            None
        };
        if let (Some(key), Some(conn)) = (from, conn) {
            let origin = if way == Way::Inbound {
                ORIGIN_PUBLIC
            } else {
                ORIGIN_GUEST
            };
            let generation = self.route_gen;
            let rec = Rec {
                flow: logical(&key, &to, way),
                origin,
                conn,
                last_seen: now,
                pending: true,
                orig_key: key,
                orig: Dir {
                    to,
                    ingress,
                    route: Some((hop, mtu, generation)),
                    counted,
                    reason,
                    due: false,
                    window: Window::default(),
                },
                reply_key: to.reply(),
                reply: Dir {
                    to: key.reply(),
                    ingress: hop.ifindex,
                    route: None,
                    counted: reply_counted,
                    reason: reply_reason,
                    due: false,
                    window: Default::default(),
                },
            };
            self.policy.conntrack.table.insert(rec);
            ev.bump(Event::ConntrackCreate);
        }
        let from = from.unwrap_or(Tuple {
            saddr: facts.saddr,
            daddr: facts.daddr,
            ..to
        });
        let mut out = f.to_vec();
        rewrite(&mut out, &from, &to, &hop);
        Ok(redirected(reason, out, counted))
    }
}

/// The key-less form of a packet of a protocol the table does not key (its ports as read).
fn plain(ip: &Ip, facts: &Facts) -> Tuple {
    Tuple {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport: facts.sport,
        dport: facts.dport,
        proto: ip.proto,
    }
}

/// TTL 1 goes to the kernel (it answers).
fn translatable(ip: &Ip) -> Result<(), Reason> {
    if ip.ttl <= 1 {
        return Err(Reason::TtlExpired);
    }
    Ok(())
}

/// A new flow in the guest's view: the private end, the remote end, their ports (an ICMP
/// query: its identifier and the type the guest sends).
fn logical(key: &Tuple, to: &Tuple, way: Way) -> Flow {
    let icmp_type = |ty: u16, from_guest: bool| {
        super::nf_state::icmp_guest_type(ty as u8, from_guest).map_or(ty, u16::from)
    };
    let (guest, remote, guest_port, remote_port, kind) = match way {
        Way::Inbound => {
            let (gp, rp) = if key.proto == 1 {
                (key.sport, icmp_type(key.dport, false))
            } else {
                (key.dport, key.sport)
            };
            (to.daddr, key.saddr, gp, rp, Kind::Nat)
        }
        Way::Outbound | Way::Hairpin => {
            let (gp, rp) = if key.proto == 1 {
                (key.sport, icmp_type(key.dport, true))
            } else {
                (key.sport, key.dport)
            };
            let kind = if way == Way::Hairpin {
                Kind::HairpinFwd
            } else {
                Kind::Nat
            };
            (key.saddr, key.daddr, gp, rp, kind)
        }
    };
    Flow {
        guest,
        remote,
        guest_port,
        remote_port,
        proto: key.proto,
        kind,
    }
}
