//! `natctl status`: natd at a glance.
use std::path::Path;

use nat_api::{Reply, Request};

use crate::{call, exit, print_json};

pub fn run(socket: &Path, json: bool) -> Result<(), exit::Error> {
    let s = match call(socket, Request::Status)? {
        Reply::Status(s) => s,
        other => return Err(exit::Error::unexpected(&other)),
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
        "generation     {} ({})",
        s.generation,
        match s.applied_at {
            0 => "no change since natd started".to_string(),
            t => format!("last change {}", date(t)),
        }
    );
    println!("state file     {}", s.state_file);
    if let Some(b) = &s.bpffs {
        println!("pinned under   {b}");
    }
    Ok(())
}

/// Seconds since the epoch as an RFC 3339 date in UTC (`2026-01-31T12:00:00Z`).
fn date(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| jiff::Timestamp::from_second(s).ok())
        .map_or_else(|| format!("{secs} s since the epoch"), |t| t.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(super::date(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::date(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(
            super::date(u64::MAX),
            format!("{} s since the epoch", u64::MAX)
        );
    }
}
