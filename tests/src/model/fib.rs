//! The model's stand-in for the namespace's FIB and neighbour table, built from the same facts
//! the harness configures with `ip`, answering as `bpf_fib_lookup` does for IPv4 forwarding:
//! longest prefix match; non-unicast results are "not forwarded"; the egress MTU is checked
//! before the neighbour. The bench has no policy routing or multipath, so the source address,
//! ports and ingress interface the program passes do not change the answer.
use std::{collections::HashMap, net::Ipv4Addr};

use nat_common::Reason;

/// An interface as the route table sees it.
#[derive(Clone, Copy, Debug)]
pub struct Iface {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub mtu: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RouteKind {
    /// An address of this host (local table): not forwarded.
    Local,
    /// A subnet broadcast address (local table): not forwarded.
    Broadcast,
    /// On-link: the next hop is the destination itself.
    Connected,
    /// Via a gateway on the route's interface.
    Gateway(Ipv4Addr),
}

#[derive(Clone, Copy, Debug)]
struct Route {
    net: u32,
    len: u8,
    kind: RouteKind,
    dev: u32,
}

/// Next hop of a forwarded frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

#[derive(Clone, Debug, Default)]
pub struct Fib {
    routes: Vec<Route>,
    neighbours: HashMap<(u32, Ipv4Addr), [u8; 6]>,
    ifaces: HashMap<u32, Iface>,
}

fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

impl Fib {
    pub fn add_iface(&mut self, iface: Iface) {
        self.ifaces.insert(iface.ifindex, iface);
    }

    /// `ip addr add ADDR/LEN dev DEV`: local and broadcast routes plus the subnet route.
    pub fn add_address(&mut self, dev: u32, addr: Ipv4Addr, len: u8) {
        let a = u32::from(addr);
        self.routes.push(Route {
            net: a,
            len: 32,
            kind: RouteKind::Local,
            dev,
        });
        if len < 31 {
            let bcast = a | !mask(len);
            self.routes.push(Route {
                net: bcast,
                len: 32,
                kind: RouteKind::Broadcast,
                dev,
            });
        }
        self.add_device_route(dev, addr, len);
    }

    /// `ip route add NET/LEN dev DEV`: on-link, without an address of ours.
    pub fn add_device_route(&mut self, dev: u32, net: Ipv4Addr, len: u8) {
        self.routes.push(Route {
            net: u32::from(net) & mask(len),
            len,
            kind: RouteKind::Connected,
            dev,
        });
    }

    /// `ip route add NET/LEN via GW` (GW reachable on `dev`).
    pub fn add_gateway_route(&mut self, dev: u32, net: Ipv4Addr, len: u8, gw: Ipv4Addr) {
        let net = u32::from(net) & mask(len);
        self.routes.push(Route {
            net,
            len,
            kind: RouteKind::Gateway(gw),
            dev,
        });
    }

    /// `ip neigh add IP lladdr MAC dev DEV nud permanent`.
    pub fn add_neighbour(&mut self, dev: u32, ip: Ipv4Addr, mac: [u8; 6]) {
        self.neighbours.insert((dev, ip), mac);
    }

    /// `ip neigh del IP dev DEV`.
    pub fn remove_neighbour(&mut self, dev: u32, ip: Ipv4Addr) {
        self.neighbours.remove(&(dev, ip));
    }

    /// The link-layer address of neighbour `ip` on `dev`, if it has one.
    pub fn neighbour(&self, dev: u32, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.neighbours.get(&(dev, ip)).copied()
    }

    /// `ip route replace NET/LEN via GW dev DEV` (`gw` some) or `ip route replace NET/LEN dev
    /// DEV`: the forwarding route of that prefix is replaced (local and broadcast routes stay).
    pub fn replace_route(&mut self, dev: u32, net: Ipv4Addr, len: u8, gw: Option<Ipv4Addr>) {
        let net = u32::from(net) & mask(len);
        self.routes.retain(|r| {
            !(r.net == net
                && r.len == len
                && matches!(r.kind, RouteKind::Connected | RouteKind::Gateway(_)))
        });
        self.routes.push(Route {
            net,
            len,
            kind: gw.map_or(RouteKind::Connected, RouteKind::Gateway),
            dev,
        });
    }

    /// The MTU of interface `ifindex` (0 if unknown).
    pub fn mtu(&self, ifindex: u32) -> u16 {
        self.ifaces.get(&ifindex).map_or(0, |i| i.mtu)
    }

    /// The interface the route to `dst` leaves through, whether its neighbour is known or not
    /// (`bpf_fib_lookup` names it when it answers "no neighbour").
    pub fn route_dev(&self, dst: Ipv4Addr) -> Option<u32> {
        let d = u32::from(dst);
        let route = self
            .routes
            .iter()
            .filter(|r| d & mask(r.len) == r.net)
            .max_by_key(|r| r.len)?;
        match route.kind {
            RouteKind::Local | RouteKind::Broadcast => None,
            _ => Some(route.dev),
        }
    }

    pub fn lookup(&self, dst: Ipv4Addr, tot_len: u16) -> Result<Hop, Reason> {
        let d = u32::from(dst);
        let route = self
            .routes
            .iter()
            .filter(|r| d & mask(r.len) == r.net)
            .max_by_key(|r| r.len)
            .ok_or(Reason::NoRoute)?;
        let nh = match route.kind {
            RouteKind::Local | RouteKind::Broadcast => return Err(Reason::NoRoute),
            RouteKind::Connected => dst,
            RouteKind::Gateway(gw) => gw,
        };
        let iface = self.ifaces.get(&route.dev).ok_or(Reason::NoRoute)?;
        if tot_len > iface.mtu {
            return Err(Reason::FragNeeded);
        }
        let dmac = self
            .neighbours
            .get(&(route.dev, nh))
            .ok_or(Reason::NoNeighbour)?;
        Ok(Hop {
            ifindex: iface.ifindex,
            smac: iface.mac,
            dmac: *dmac,
        })
    }
}
