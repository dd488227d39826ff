//! `natctl stats`.
use std::path::Path;

use nat_api::{Reply, Request};

use crate::{call, exit, print_json, print_mappings};

pub fn run(socket: &Path, json: bool) -> Result<(), exit::Error> {
    let s = match call(socket, Request::Stats)? {
        Reply::Stats(s) => s,
        other => return Err(exit::Error::unexpected(&other)),
    };
    if json {
        return print_json(&s);
    }
    println!("generation {}", s.generation);
    for i in &s.interfaces {
        println!(
            "interface {} (ifindex {}): {:?}, {} mode",
            i.name, i.ifindex, i.role, i.mode
        );
    }
    println!(
        "\n{:<22} {:<9} {:>12} {:>14}",
        "REASON", "ACTION", "PACKETS", "BYTES"
    );
    for r in &s.reasons {
        println!(
            "{:<22} {:<9} {:>12} {:>14}",
            r.reason, r.action, r.packets, r.bytes
        );
    }
    let c = &s.conntrack;
    println!(
        "\nconntrack: {} of {} entries; hits {}, misses {}, created {}, expired seen {}, collected {}, flushed {}, ended by the kernel {}, evicted {}",
        c.entries,
        c.capacity,
        c.hits,
        c.misses,
        c.creates,
        c.expired_seen,
        c.collected,
        c.flushed,
        c.ended,
        c.evictions
    );
    if !s.slow_path.is_empty() {
        let counters: Vec<String> = s
            .slow_path
            .iter()
            .map(|c| format!("{} {} packets ({} bytes)", c.name, c.packets, c.bytes))
            .collect();
        println!(
            "\nkernel path (natd's nftables table): {}",
            counters.join(", ")
        );
    }
    println!();
    print_mappings(&s.mappings);
    Ok(())
}
