//! `natctl status`: natd at a glance.
use std::path::Path;

use nat_userspace::api::{Reply, Request};

use crate::{call, print_json};

pub fn run(socket: &Path, json: bool) -> Result<(), String> {
    let s = match call(socket, Request::Status)? {
        Reply::Status(s) => s,
        other => return Err(format!("unexpected answer from natd: {other:?}")),
    };
    if json {
        return print_json(&s);
    }
    println!("natd {}", s.version);
    for i in &s.interfaces {
        let how = if i.adopted { ", adopted" } else { "" };
        let again = if i.reattached > 0 {
            format!(", re-attached {} time(s)", i.reattached)
        } else {
            String::new()
        };
        println!("  {:<16} {:?}, {} mode{how}{again}", i.name, i.role, i.mode);
    }
    let policy = if s.egress_default_allow {
        "allow"
    } else {
        "deny"
    };
    println!("mappings       {}", s.mappings);
    println!(
        "ingress rules  {} ({} inactive: no mapping)",
        s.ingress_rules, s.inactive_ingress_rules
    );
    println!(
        "egress         default {policy}, {} exception rule(s)",
        s.egress_rules
    );
    println!("flows          {} of {}", s.flows, s.flow_capacity);
    println!(
        "generation     {} (last change at {} s since the epoch)",
        s.generation, s.applied_at
    );
    println!("state file     {}", s.state_file);
    if let Some(b) = &s.bpffs {
        println!("pinned under   {b}");
    }
    Ok(())
}
