//! The bench's surroundings changed between packets, in the namespace (what `bpf_fib_lookup`
//! answers), the program's maps and the model alike: a neighbour's link-layer address replaced
//! or the neighbour deleted, the route to 192.0.2.0/24 moved to another gateway (one without a
//! neighbour entry, or one behind an interface natd does not manage), 10.0.2.0/24 moved to
//! another guest interface, natd's route generation bump, and a mapping removed as natd
//! removes one (its `NAT_IN`/`NAT_OUT` entries go, its established flows run on) and installed
//! again. [`Harness::reset_env`] puts everything back as the bench starts.
//!
//! natd bumps the route generation on every route, neighbour, address and link change it hears
//! of, a moment after the change; a change without a bump is what packets meet in that moment
//! (flow entries keep the route they resolved).
use std::net::Ipv4Addr;

use anyhow::Context as _;
use aya::maps::HashMap;
use nat_common::{MAP_NAT_IN, MAP_NAT_OUT, NatValue};

use super::*;

/// A second gateway on the public link.
pub const PUB_GW2: Ipv4Addr = ip(198, 51, 100, 4);
pub const PUB_GW2_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x04];
/// V6's link-layer address on gsb0 (used once 10.0.2.0/24 is routed there).
pub const V6_GSB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x26];
/// Link-layer addresses a neighbour may move to.
pub const MOVED_MACS: [[u8; 6]; 2] = [[2, 0, 0, 0, 1, 1], [2, 0, 0, 0, 1, 2]];

/// A managed interface of the bench.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dev {
    Pub0,
    Gst0,
    Gsb0,
    Gsn0,
}

impl Dev {
    pub fn link(self, t: &Topology) -> Link {
        match self {
            Dev::Pub0 => t.pub0,
            Dev::Gst0 => t.gst0,
            Dev::Gsb0 => t.gsb0,
            Dev::Gsn0 => t.gsn0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dev::Pub0 => "pub0",
            Dev::Gst0 => "gst0",
            Dev::Gsb0 => "gsb0",
            Dev::Gsn0 => "gsn0",
        }
    }
}

/// The neighbours a change may touch: device, address and link-layer address at the start.
pub const NEIGHBOURS: [(Dev, Ipv4Addr, [u8; 6]); 8] = [
    (Dev::Pub0, PUB_GW, PUB_GW_MAC),
    (Dev::Pub0, PUB_GW2, PUB_GW2_MAC),
    (Dev::Gst0, V1, V1_MAC),
    (Dev::Gst0, V2, V2_MAC),
    (Dev::Gst0, V4, V4_MAC),
    (Dev::Gsb0, V5, V5_MAC),
    (Dev::Gsn0, V6, V6_MAC),
    (Dev::Gsb0, V6, V6_GSB_MAC),
];

/// Where the route to 192.0.2.0/24 ([`REMOTE_NET`]) points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteVia {
    /// [`PUB_GW`], as the bench starts.
    Gateway,
    /// [`PUB_GW2`].
    Gateway2,
    /// [`PUB_NO_NEIGH`]: on the public link, no neighbour entry.
    NoNeighbour,
    /// [`OTH_HOST`] on oth0, which natd does not manage.
    Unmanaged,
}

/// One change between two packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// `ip neigh replace ADDR lladdr MAC dev DEV nud permanent`, or `ip neigh del ADDR dev
    /// DEV` (`mac` none).
    Neighbour {
        dev: Dev,
        addr: Ipv4Addr,
        mac: Option<[u8; 6]>,
    },
    /// `ip route replace 192.0.2.0/24 via ...`.
    Remote(RemoteVia),
    /// `ip route replace 10.0.2.0/24 dev gsb0` (true) or `dev gsn0` (false, the start).
    GuestNetOnGsb(bool),
    /// natd's answer to any of the above: every flow resolves its route on its next packet.
    Bump,
    /// natd removes the mapping of this public IP (the pair of the bench's [`NAT_IN`] and
    /// [`NAT_OUT`] it is part of).
    MappingGone(Ipv4Addr),
    /// ... and installs it again (with its old counter slot).
    MappingBack(Ipv4Addr),
}

/// The private address the bench maps `public` to (inbound or outbound).
pub fn private_of(public: Ipv4Addr) -> Option<Ipv4Addr> {
    pair(public).ok().map(|(v, _, _)| v)
}

/// The pair `public` belongs to, and whether each half is in `NAT_IN` / `NAT_OUT`.
fn pair(public: Ipv4Addr) -> anyhow::Result<(Ipv4Addr, bool, bool)> {
    let inbound = NAT_IN.iter().find(|(p, _)| *p == public).map(|(_, v)| *v);
    let outbound = NAT_OUT.iter().find(|(_, p)| *p == public).map(|(v, _)| *v);
    let private = inbound
        .or(outbound)
        .with_context(|| format!("{public} is not a public IP of the bench"))?;
    Ok((private, inbound.is_some(), outbound == Some(private)))
}

impl Harness {
    /// Applies `c` to the namespace, the program's maps and the model.
    pub fn change(&self, c: &Change) -> anyhow::Result<()> {
        self.env_changed.set(true);
        match *c {
            Change::Neighbour { dev, addr, mac } => {
                let ifindex = dev.link(&self.topo).ifindex;
                let (a, d) = (addr.to_string(), dev.name());
                match mac {
                    Some(m) => {
                        let s = mac_str(m);
                        let args = ["neigh", "replace", &a, "lladdr", &s, "dev", d];
                        self._netns
                            .ip(&[&args[..], &["nud", "permanent"]].concat())?;
                        self.model.borrow_mut().fib.add_neighbour(ifindex, addr, m);
                    }
                    None => {
                        let mut model = self.model.borrow_mut();
                        if model.fib.neighbour(ifindex, addr).is_some() {
                            self._netns.ip(&["neigh", "del", &a, "dev", d])?;
                            model.fib.remove_neighbour(ifindex, addr);
                        }
                    }
                }
            }
            Change::Remote(via) => {
                let (dev, name, gw) = match via {
                    RemoteVia::Gateway => (self.topo.pub0, "pub0", PUB_GW),
                    RemoteVia::Gateway2 => (self.topo.pub0, "pub0", PUB_GW2),
                    RemoteVia::NoNeighbour => (self.topo.pub0, "pub0", PUB_NO_NEIGH),
                    RemoteVia::Unmanaged => (self.topo.oth0, "oth0", OTH_HOST),
                };
                let (net, gw_s) = (format!("{REMOTE_NET}/24"), gw.to_string());
                self._netns
                    .ip(&["route", "replace", &net, "via", &gw_s, "dev", name])?;
                self.model
                    .borrow_mut()
                    .fib
                    .replace_route(dev.ifindex, REMOTE_NET, 24, Some(gw));
            }
            Change::GuestNetOnGsb(on_gsb) => {
                let dev = if on_gsb { Dev::Gsb0 } else { Dev::Gsn0 };
                let net = format!("{GSN_NET}/24");
                self._netns
                    .ip(&["route", "replace", &net, "dev", dev.name()])?;
                let ifindex = dev.link(&self.topo).ifindex;
                self.model
                    .borrow_mut()
                    .fib
                    .replace_route(ifindex, GSN_NET, 24, None);
            }
            Change::Bump => self.bump_route_gen()?,
            Change::MappingGone(p) => self.set_mapping(p, false)?,
            Change::MappingBack(p) => self.set_mapping(p, true)?,
        }
        Ok(())
    }

    /// Removes (`present` false) or installs the mapping of `public` in program and model.
    fn set_mapping(&self, public: Ipv4Addr, present: bool) -> anyhow::Result<()> {
        let (private, inbound, outbound) = pair(public)?;
        let slot = self
            .slots
            .iter()
            .find(|(_, pv)| **pv == (public, private))
            .map(|(s, _)| *s)
            .with_context(|| format!("no slot for {public} <-> {private}"))?;
        let mut ebpf = self.ebpf.borrow_mut();
        let mut model = self.model.borrow_mut();
        let installed = (
            model.nat_in.contains_key(&public),
            model.nat_out.contains_key(&private),
        );
        for (name, on, there, k, addr) in [
            (MAP_NAT_IN, inbound, installed.0, public, private),
            (MAP_NAT_OUT, outbound, installed.1, private, public),
        ] {
            // (aya reports deleting a missing key as a failed syscall.)
            if !on || (!present && !there) {
                continue;
            }
            let mut m: HashMap<_, u32, NatValue> = ebpf
                .map_mut(name)
                .with_context(|| format!("no map {name}"))?
                .try_into()?;
            if present {
                let value = NatValue {
                    addr: key(addr),
                    slot,
                    // As natd writes it: `NAT_IN` names the interface owning the public IP.
                    ifindex: if name == MAP_NAT_IN {
                        self.topo.pub0.ifindex
                    } else {
                        0
                    },
                    ..NatValue::default()
                };
                m.insert(key(k), value, 0)?;
            } else {
                m.remove(&key(k))?;
            }
        }
        if inbound {
            match present {
                true => model.nat_in.insert(public, private),
                false => model.nat_in.remove(&public),
            };
        }
        if outbound {
            match present {
                true => model.nat_out.insert(private, public),
                false => model.nat_out.remove(&private),
            };
        }
        Ok(())
    }

    /// Puts neighbours, routes and mappings back as the bench starts (nothing to do if no
    /// change was made since the last reset). The route generation stays where it is.
    pub fn reset_env(&self) -> anyhow::Result<()> {
        if !self.env_changed.replace(false) {
            return Ok(());
        }
        let mut script = String::new();
        for (dev, addr, mac) in NEIGHBOURS {
            script += &format!(
                "neigh replace {addr} lladdr {} dev {} nud permanent\n",
                mac_str(mac),
                dev.name()
            );
        }
        script += &format!("route replace {REMOTE_NET}/24 via {PUB_GW} dev pub0\n");
        script += &format!("route replace {GSN_NET}/24 dev gsn0\n");
        self._netns.ip_batch(&script)?;
        let fib = model_for(&self.topo).fib;
        self.model.borrow_mut().fib = fib;
        for (p, _) in NAT_IN {
            self.set_mapping(p, true)?;
        }
        for (_, p) in NAT_OUT {
            self.set_mapping(p, true)?;
        }
        Ok(())
    }
}
