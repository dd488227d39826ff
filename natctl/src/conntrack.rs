//! `natctl conntrack list|flush`.
use std::path::Path;

use clap::Subcommand;
use nat_api::{Reply, Request};

use crate::{call, exit, print_json};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// List tracked flows (guest's view: private address first).
    List {
        #[arg(long)]
        json: bool,
    },
    /// End tracked flows: every one, or those of one public IP
    ///
    /// With PUBLIC, only the flows translated to or from that public IP, also after its
    /// mapping was removed (a removed mapping's established flows run on until they end or
    /// are flushed). The kernel's connection-tracking entries of the public IPs go too. A
    /// connection whose flow was flushed needs a rule again.
    Flush {
        /// Only the flows translated to or from this public IP.
        public: Option<std::net::Ipv4Addr>,
    },
}

pub fn run(socket: &Path, cmd: Cmd) -> Result<(), exit::Error> {
    let (req, json) = match cmd {
        Cmd::List { json } => (Request::ConntrackList, json),
        Cmd::Flush { public } => (Request::ConntrackFlush { public }, false),
    };
    match call(socket, req)? {
        Reply::Done { message } => println!("{message}"),
        Reply::Flows { capacity, flows } if json => {
            print_json(&serde_json::json!({ "capacity": capacity, "flows": flows }))?
        }
        Reply::Flows { capacity, flows } => {
            println!("{} of {capacity} entries", flows.len());
            println!(
                "{:<6} {:<22} {:<22} {:<16} {:<7} {:>8} {:>10}",
                "PROTO", "GUEST", "REMOTE", "STATE", "ORIGIN", "IDLE_S", "EXPIRES_S"
            );
            for f in flows {
                println!(
                    "{:<6} {:<22} {:<22} {:<16} {:<7} {:>8} {:>10}",
                    f.proto,
                    format!("{}:{}", f.guest, f.guest_port),
                    format!("{}:{}", f.remote, f.remote_port),
                    f.state,
                    f.origin,
                    f.idle_secs,
                    f.expires_in_secs
                );
            }
        }
        other => return Err(exit::Error::unexpected(&other)),
    }
    Ok(())
}
