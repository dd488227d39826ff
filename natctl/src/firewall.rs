//! `natctl firewall add|del|list`: ingress rules of public IPs.
use std::{net::Ipv4Addr, path::Path};

use clap::Subcommand;
use nat_api::{Reply, Request};

use crate::{call, exit, print_json, rule::RuleArgs, rule::describe};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Allow traffic to PUBLIC (prints the new rule's id). A rule of a PUBLIC without a
    /// mapping is kept, inactive until PUBLIC is mapped.
    Add {
        public: Ipv4Addr,
        #[command(flatten)]
        rule: RuleArgs,
    },
    /// Delete rule ID (tracked connections it admitted keep working).
    Del { id: u64 },
    /// List ingress rules, active (PUBLIC mapped) or not.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(socket: &Path, cmd: Cmd) -> Result<(), exit::Error> {
    let (req, json) = match cmd {
        Cmd::Add { public, rule } => (
            Request::FirewallAdd {
                public,
                rule: rule.spec(Vec::new()),
            },
            false,
        ),
        Cmd::Del { id } => (Request::FirewallDel { id }, false),
        Cmd::List { json } => (Request::FirewallList, json),
    };
    match call(socket, req)? {
        Reply::RuleAdded { id, message } => {
            println!("{id}");
            if message.contains("inactive") {
                eprintln!("{message}");
            }
        }
        Reply::Done { message } => println!("{message}"),
        Reply::Firewall { rules } if json => print_json(&rules)?,
        Reply::Firewall { rules } => {
            println!(
                "{:<18} {:<16} {:<8} RULE (SOURCES)",
                "ID", "PUBLIC", "STATE"
            );
            for l in rules {
                let r = &l.rule;
                println!(
                    "{:<18} {:<16} {:<8} {}",
                    r.id,
                    r.public.to_string(),
                    if l.active { "active" } else { "inactive" },
                    describe(&r.service, &r.cidrs)
                );
            }
        }
        other => return Err(exit::Error::unexpected(&other)),
    }
    Ok(())
}
