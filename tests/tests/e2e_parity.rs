//! End to end, CloudStack parity (issue 10): the everyday cases where the product answered
//! otherwise than a CloudStack virtual router (iptables + netfilter conntrack) does for the
//! same payloads and traffic, each with real traffic in namespaces, and the slow path's
//! verdicts compared with the fast path's on the same packets. One module per topic under
//! `e2e_parity/`:
//!
//! - `scope`: egress policy filters only what leaves for the public side (the router's own
//!   addresses and other guest networks stay reachable); a public IP answers only on its own
//!   public network, on both paths.
//! - `tracking`: connection tracking as netfilter keeps it: a SYN on a flow closed by RST is
//!   new (and judged again), ICMP timestamp, information and address-mask queries, an echo
//!   request reusing a guest ping's identifier, a flood that must not evict an assured flow.
//! - `window`: an RST or FIN changes a TCP flow's state only from inside the window the flow
//!   has shown: a blind, spoofed one (from either side) leaves the flow ESTABLISHED and the
//!   connection running; one at the connection's next sequence number ends it.
//! - `answers`: what gets an answer: a denied TTL-1 packet draws no time exceeded (on both
//!   paths), hairpin flows from the same source port each get their own answers.
//! - `protocols`: UDP-Lite and DCCP, whose checksums cover the addresses, are translated by the
//!   fast path and never corrupted.
//! - `kernel_protocols`: what of them the XDP program hands to the kernel leaves translated
//!   and intact or not at all, and nothing leaves a public interface from a mapped private
//!   address untranslated.
//! - `paths`: the same frames with XDP attached and with the kernel alone give the same
//!   delivery and the same addresses.
//!
//! Same ground rules as `e2e.rs`: each test builds its own namespaces and natd and removes them
//! when it ends, also on failure; every check is on something observed (the addresses a socket
//! or a raw ICMP socket saw, ICMP errors in a sender's error queue, natd's counters). A packet
//! dropped in XDP is observed by the counter of its drop reason; one dropped by the kernel by
//! a packet sent after it on the same path that did arrive.
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use anyhow::{Context as _, bail};
use nat_tests::topology::{Natctl, policy::reason};

#[path = "e2e_parity/answers.rs"]
mod answers;
#[path = "e2e_parity/kernel_protocols.rs"]
mod kernel_protocols;
#[path = "e2e_parity/paths.rs"]
mod paths;
#[path = "e2e_parity/protocols.rs"]
mod protocols;
#[path = "e2e_parity/scope.rs"]
mod scope;
#[path = "e2e_parity/tracking.rs"]
mod tracking;
#[path = "e2e_parity/window.rs"]
mod window;

/// P 203.0.113.10 <-> V 10.0.0.10, no rules: P is closed.
const ONE_MAPPING: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n";

fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

/// The IPv4 socket address `a`, or an error naming `what`.
fn v4(a: SocketAddr, what: &str) -> anyhow::Result<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => bail!("{what}: an IPv6 address {a}"),
    }
}

/// Runs `send`, then waits until natd counted one more packet under verdict reason `name`;
/// returns what `send` returned.
fn counted<T>(
    natctl: &Natctl,
    name: &str,
    what: &str,
    send: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let before = reason(&natctl.stats()?, name)?;
    let out = send().with_context(|| format!("sending {what}"))?;
    natctl.wait_stats(&format!("{name} for {what}"), |s| {
        Ok(reason(s, name)? > before)
    })?;
    Ok(out)
}
