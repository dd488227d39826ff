//! Kernel events over rtnetlink: links, IPv4 routes, IPv4 neighbours, IPv4 addresses and IPv4
//! policy rules, as typed [`KernelEvent`]s, instead of polling.
//!
//! # Use
//!
//! ```no_run
//! # async fn f(daemon: &mut nat_userspace::daemon::Daemon) {
//! use nat_userspace::kernel_events::KernelEvents;
//! // Inside a tokio runtime; events are of the calling thread's network namespace.
//! let mut events = KernelEvents::subscribe().await.expect("netlink");
//! while let Some(ev) = events.next().await {
//!     daemon.on_kernel_event(ev);
//! }
//! # }
//! ```
//!
//! natd hands every event to [`crate::daemon::Daemon::on_kernel_event`].
//!
//! # Guarantees
//! - One netlink socket subscribed to the groups `RTNLGRP_LINK`, `RTNLGRP_IPV4_ROUTE`,
//!   `RTNLGRP_NEIGH`, `RTNLGRP_IPV4_IFADDR` and `RTNLGRP_IPV4_RULE`; a background task turns its messages into
//!   events, in the kernel's order. Dropping [`KernelEvents`] ends the task and closes the socket.
//! - Links: the watcher knows the links of the namespace (one dump while subscribing, kept up
//!   to date by the events). [`KernelEvent::LinkAdded`] is a link it did not know,
//!   [`KernelEvent::LinkChanged`] one it knew (flags, state or name changed; a link created while
//!   [`KernelEvents::subscribe`] runs may be reported as changed), [`KernelEvent::LinkRemoved`]
//!   a link deleted (or moved to another namespace). A consumer that acts on a name treats
//!   added and changed alike.
//! - Neighbours: the IPv4 neighbour entries there are when subscribing are reported first, as
//!   [`KernelEvent::NeighbourChanged`] (and again right after each [`KernelEvent::Lost`]), so
//!   the consumer knows the link-layer address of every neighbour, not only of those that
//!   change later: a neighbour the router resolved before natd started that then moves to
//!   another MAC, or goes, is a change like any other.
//! - Routes, neighbours, addresses and rules are IPv4 only (the fast path's family): bridge FDB and IPv6
//!   neighbours, IPv6 routes and addresses are not reported.
//! - Nothing is lost silently: when the kernel dropped notifications because the socket's
//!   buffer was full (`ENOBUFS`), or the socket failed and was opened again, the task reports the
//!   link differences it finds by a new dump, then [`KernelEvent::Lost`], then the neighbour
//!   entries there are: the consumer must re-read whatever it derives from routes or
//!   addresses.
//! - Backpressure: events wait in a bounded queue; a consumer slower than the kernel makes the
//!   socket's buffer overflow, which ends in [`KernelEvent::Lost`], never in unbounded memory.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use log::warn;
use rtnetlink::{
    Handle, MulticastGroup,
    packet_core::{NetlinkMessage, NetlinkPayload},
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::{AddressAttribute, AddressMessage},
        link::{LinkAttribute, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage},
        route::{RouteAddress, RouteAttribute, RouteMessage},
        rule::{RuleAttribute, RuleMessage},
    },
    sys::{AsyncSocket as _, SocketAddr},
};
use tokio::{sync::mpsc, task::JoinHandle};

pub use rtnetlink::packet_route::neighbour::NeighbourState;

/// Events waiting for the consumer; beyond that the socket's own buffer fills.
const QUEUE: usize = 1024;
/// Receive buffer of the netlink socket (the kernel doubles it): room for bursts of
/// neighbour and route changes.
const SOCKET_BUFFER: usize = 4 << 20;
/// Wait before opening the socket again after it failed.
const RETRY: Duration = Duration::from_secs(1);

/// What changed in the kernel's view of the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelEvent {
    /// A link the watcher did not know (created, or moved into the namespace).
    LinkAdded { ifindex: u32, name: String },
    /// A known link changed: flags (up, down, carrier), attributes or its name (`name` is the
    /// new one).
    LinkChanged { ifindex: u32, name: String },
    /// A link was deleted or left the namespace; `name` is its last known name.
    LinkRemoved { ifindex: u32, name: String },
    /// An IPv4 route was added, replaced (`removed: false`) or deleted.
    RouteChanged {
        table: u32,
        /// Destination prefix (`0.0.0.0/0` for a default route).
        dst: Ipv4Addr,
        prefix: u8,
        /// Output interface of a single-path route.
        oif: Option<u32>,
        gateway: Option<Ipv4Addr>,
        removed: bool,
    },
    /// An IPv4 neighbour (ARP) entry was created, changed state or link-layer address, or
    /// was deleted.
    NeighbourChanged {
        ifindex: u32,
        addr: Ipv4Addr,
        lladdr: Option<[u8; 6]>,
        state: NeighbourState,
        removed: bool,
    },
    /// An IPv4 address was added to or removed from a link.
    AddressChanged {
        ifindex: u32,
        addr: Ipv4Addr,
        prefix: u8,
        label: Option<String>,
        removed: bool,
    },
    /// An IPv4 policy routing rule was added or deleted.
    RuleChanged {
        priority: u32,
        /// The table it looks up (0 for other actions).
        table: u32,
        /// Who made it (`ip rule ... protocol`; 0 if unspecified).
        protocol: u8,
        removed: bool,
    },
    /// Notifications were lost (socket buffer overflow, or the socket was opened again):
    /// links were re-read and their differences reported before this, and the neighbour
    /// entries there are follow it; routes and addresses must be re-read by whoever depends
    /// on them.
    Lost,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelEventsError {
    #[error("cannot open the rtnetlink socket for kernel events: {0}")]
    Socket(#[source] std::io::Error),
    #[error("cannot list the links: {0}")]
    Links(#[source] rtnetlink::Error),
    #[error("cannot list the neighbours: {0}")]
    Neighbours(#[source] rtnetlink::Error),
}

/// A subscription to kernel events; dropping it ends the background task.
pub struct KernelEvents {
    rx: mpsc::Receiver<KernelEvent>,
    task: JoinHandle<()>,
}

impl KernelEvents {
    /// Subscribes, reads the links and neighbours there are, and starts the background task:
    /// the neighbours come first, then every change after this returns is reported (a link
    /// created while it runs may be reported as changed rather than added). Needs a tokio
    /// runtime.
    pub async fn subscribe() -> Result<Self, KernelEventsError> {
        let conn = Connection::open()?;
        let links = dump_links(&conn.handle).await?;
        let neighbours = dump_neighbours(&conn.handle).await?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(conn, links, neighbours, tx));
        Ok(Self { rx, task })
    }

    /// The next event; `None` only once the task has ended (it does not end by itself).
    pub async fn next(&mut self) -> Option<KernelEvent> {
        self.rx.recv().await
    }
}

impl Drop for KernelEvents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Messages = UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>;

/// An open, subscribed socket: its driver task, a handle for requests and the notifications.
struct Connection {
    driver: JoinHandle<()>,
    handle: Handle,
    messages: Messages,
}

impl Connection {
    fn open() -> Result<Self, KernelEventsError> {
        let (mut conn, handle, messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Neigh,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv4Rule,
        ])
        .map_err(KernelEventsError::Socket)?;
        if let Err(e) = conn.socket_mut().socket_mut().set_rx_buf_sz(SOCKET_BUFFER) {
            warn!("kernel events: socket buffer left at its default: {e}");
        }
        let driver = tokio::spawn(conn);
        Ok(Self {
            driver,
            handle,
            messages,
        })
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The background task: reports the neighbours there were, then translates notifications
/// until the consumer goes; opens the socket again if it fails.
async fn run(
    mut conn: Connection,
    mut links: BTreeMap<u32, String>,
    neighbours: Vec<KernelEvent>,
    tx: mpsc::Sender<KernelEvent>,
) {
    for ev in neighbours {
        if tx.send(ev).await.is_err() {
            return;
        }
    }
    loop {
        while let Some((msg, _)) = conn.messages.next().await {
            let events = match msg.payload {
                NetlinkPayload::Overrun(_) => {
                    warn!("kernel events: notifications lost (socket buffer full); re-reading");
                    resync(&conn.handle, &mut links).await
                }
                NetlinkPayload::InnerMessage(m) => translate(m, &mut links).into_iter().collect(),
                _ => Vec::new(),
            };
            for ev in events {
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
        // The socket failed (its driver ended): open another one and catch up.
        warn!("kernel events: the netlink socket closed; opening it again");
        conn = loop {
            if tx.is_closed() {
                return;
            }
            match Connection::open() {
                Ok(c) => break c,
                Err(e) => {
                    warn!("kernel events: {e}");
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        for ev in resync(&conn.handle, &mut links).await {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
}

/// Re-reads the links after lost notifications: their differences, then [`KernelEvent::Lost`],
/// then the neighbours there are.
async fn resync(handle: &Handle, links: &mut BTreeMap<u32, String>) -> Vec<KernelEvent> {
    let mut out = Vec::new();
    match dump_links(handle).await {
        Ok(now) => {
            out = link_differences(links, &now);
            *links = now;
        }
        Err(e) => warn!("kernel events: {e}"),
    }
    out.push(KernelEvent::Lost);
    match dump_neighbours(handle).await {
        Ok(mut now) => out.append(&mut now),
        Err(e) => warn!("kernel events: {e}"),
    }
    out
}

/// Every IPv4 neighbour entry, as [`KernelEvent::NeighbourChanged`].
async fn dump_neighbours(handle: &Handle) -> Result<Vec<KernelEvent>, KernelEventsError> {
    let mut out = Vec::new();
    let mut dump = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    while let Some(m) = dump
        .try_next()
        .await
        .map_err(KernelEventsError::Neighbours)?
    {
        out.extend(neighbour(&m, false));
    }
    Ok(out)
}

/// Every link of the namespace: ifindex -> name.
async fn dump_links(handle: &Handle) -> Result<BTreeMap<u32, String>, KernelEventsError> {
    let mut out = BTreeMap::new();
    let mut dump = handle.link().get().execute();
    while let Some(m) = dump.try_next().await.map_err(KernelEventsError::Links)? {
        out.insert(m.header.index, link_name(&m).unwrap_or_default());
    }
    Ok(out)
}

/// Added, removed and renamed links from `before` to `now`.
fn link_differences(
    before: &BTreeMap<u32, String>,
    now: &BTreeMap<u32, String>,
) -> Vec<KernelEvent> {
    let removed = before
        .iter()
        .filter(|(i, _)| !now.contains_key(i))
        .map(|(&ifindex, name)| KernelEvent::LinkRemoved {
            ifindex,
            name: name.clone(),
        });
    let added_or_renamed = now.iter().filter_map(|(&ifindex, name)| {
        let name = name.clone();
        match before.get(&ifindex) {
            None => Some(KernelEvent::LinkAdded { ifindex, name }),
            Some(old) if *old != name => Some(KernelEvent::LinkChanged { ifindex, name }),
            Some(_) => None,
        }
    });
    removed.chain(added_or_renamed).collect()
}

fn link_name(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// The event of one notification, if it is one natd reports; keeps `links` up to date.
fn translate(msg: RouteNetlinkMessage, links: &mut BTreeMap<u32, String>) -> Option<KernelEvent> {
    match msg {
        RouteNetlinkMessage::NewLink(m) => {
            let ifindex = m.header.index;
            let name = link_name(&m)
                .or_else(|| links.get(&ifindex).cloned())
                .unwrap_or_default();
            Some(match links.insert(ifindex, name.clone()) {
                None => KernelEvent::LinkAdded { ifindex, name },
                Some(_) => KernelEvent::LinkChanged { ifindex, name },
            })
        }
        RouteNetlinkMessage::DelLink(m) => {
            let ifindex = m.header.index;
            let known = links.remove(&ifindex);
            let name = link_name(&m).or(known).unwrap_or_default();
            Some(KernelEvent::LinkRemoved { ifindex, name })
        }
        RouteNetlinkMessage::NewRoute(m) => route(&m, false),
        RouteNetlinkMessage::DelRoute(m) => route(&m, true),
        RouteNetlinkMessage::NewNeighbour(m) => neighbour(&m, false),
        RouteNetlinkMessage::DelNeighbour(m) => neighbour(&m, true),
        RouteNetlinkMessage::NewAddress(m) => address(&m, false),
        RouteNetlinkMessage::DelAddress(m) => address(&m, true),
        RouteNetlinkMessage::NewRule(m) => rule(&m, false),
        RouteNetlinkMessage::DelRule(m) => rule(&m, true),
        _ => None,
    }
}

fn route(m: &RouteMessage, removed: bool) -> Option<KernelEvent> {
    if m.header.address_family != AddressFamily::Inet {
        return None;
    }
    let v4 = |a: &RouteAddress| match a {
        RouteAddress::Inet(a) => Some(*a),
        _ => None,
    };
    let mut ev = (Ipv4Addr::UNSPECIFIED, None, None, u32::from(m.header.table));
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => ev.0 = v4(d).unwrap_or(ev.0),
            RouteAttribute::Oif(i) => ev.1 = Some(*i),
            RouteAttribute::Gateway(g) => ev.2 = v4(g),
            RouteAttribute::Table(t) => ev.3 = *t,
            _ => {}
        }
    }
    let (dst, oif, gateway, table) = ev;
    Some(KernelEvent::RouteChanged {
        table,
        dst,
        prefix: m.header.destination_prefix_length,
        oif,
        gateway,
        removed,
    })
}

fn neighbour(m: &NeighbourMessage, removed: bool) -> Option<KernelEvent> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let mut addr = None;
    let mut lladdr = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => addr = Some(*a),
            NeighbourAttribute::LinkLayerAddress(l) => lladdr = <[u8; 6]>::try_from(&l[..]).ok(),
            _ => {}
        }
    }
    Some(KernelEvent::NeighbourChanged {
        ifindex: m.header.ifindex,
        addr: addr?,
        lladdr,
        state: m.header.state,
        removed,
    })
}

fn address(m: &AddressMessage, removed: bool) -> Option<KernelEvent> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let mut addr = None;
    let mut label = None;
    for a in &m.attributes {
        match a {
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer's on
            // point-to-point links); take IFA_ADDRESS only when there is no IFA_LOCAL.
            AddressAttribute::Local(IpAddr::V4(a)) => addr = Some(*a),
            AddressAttribute::Address(IpAddr::V4(a)) => addr = addr.or(Some(*a)),
            AddressAttribute::Label(l) => label = Some(l.clone()),
            _ => {}
        }
    }
    Some(KernelEvent::AddressChanged {
        ifindex: m.header.index,
        addr: addr?,
        prefix: m.header.prefix_len,
        label,
        removed,
    })
}

fn rule(m: &RuleMessage, removed: bool) -> Option<KernelEvent> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let (mut priority, mut table, mut protocol) = (0, u32::from(m.header.table), 0);
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => priority = *p,
            RuleAttribute::Table(t) => table = *t,
            RuleAttribute::Protocol(p) => protocol = u8::from(*p),
            _ => {}
        }
    }
    Some(KernelEvent::RuleChanged {
        priority,
        table,
        protocol,
        removed,
    })
}

#[cfg(test)]
#[path = "kernel_events_tests.rs"]
mod tests;
