//! natd: the control plane of the XDP static NAT (natctl, its client, is a crate of its own).
//!
//! Library first: the binary is a thin layer over [`daemon`] (request handling),
//! [`reconcile`] (the one path every change takes), [`ebpf`] (the fast path's maps and links),
//! [`netfilter`] (the slow path, with [`policy_routing`]) and [`api`] (the control socket; its
//! wire types, rule specs and CIDRs are the nat-api crate's, re-exported at their old paths).
//! [`cloudstack`] turns CloudStack virtual-router payloads into desired-state changes;
//! [`kernel_events`] reports link, route, neighbour and address changes over rtnetlink;
//! [`metrics`] serves Prometheus.
pub mod addresses;
pub mod api;
/// IPv4 prefixes: [`nat_api::cidr`], at its old path.
pub use nat_api::cidr;
pub mod clock;
pub mod cloudstack;
pub mod cloudstack_dir;
pub mod config;
pub mod daemon;
pub mod ebpf;
pub mod firewall;
pub mod kernel_conntrack;
pub mod kernel_events;
pub mod metrics;
pub mod netfilter;
pub mod persist;
pub mod pins;
pub mod policy_routing;
pub mod reconcile;
pub mod service;
pub mod state;
pub mod tables;

/// The compiled XDP object, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nat-ebpf"));

/// An error and its causes on one line, each cause once: the error types here already embed
/// their direct cause's text, so a cause whose text is already there is skipped.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}
