//! `natctl egress policy|add|del|list`: the guest network's egress policy.
use std::path::Path;

use clap::{Subcommand, ValueEnum};
use nat_api::{Cidr, Reply, Request};

use crate::{
    call, exit, print_json,
    rule::{RuleArgs, describe, list},
};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Policy {
    Allow,
    Deny,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Default for guest traffic that no exception rule matches.
    Policy { policy: Policy },
    /// Add an exception to the default (prints the new rule's id); --cidr is the destination,
    /// --src the guests it applies to.
    Add {
        #[command(flatten)]
        rule: RuleArgs,
        /// A guest source CIDR the rule applies to (repeat for several); none = every guest.
        #[arg(long = "src")]
        sources: Vec<Cidr>,
    },
    /// Delete exception rule ID.
    Del { id: u64 },
    /// Show the default and the exception rules.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(socket: &Path, cmd: Cmd) -> Result<(), exit::Error> {
    let (req, json) = match cmd {
        Cmd::Policy { policy } => (
            Request::EgressPolicy {
                allow: matches!(policy, Policy::Allow),
            },
            false,
        ),
        Cmd::Add { rule, sources } => (
            Request::EgressAdd {
                rule: rule.spec(sources),
            },
            false,
        ),
        Cmd::Del { id } => (Request::EgressDel { id }, false),
        Cmd::List { json } => (Request::EgressList, json),
    };
    match call(socket, req)? {
        Reply::RuleAdded { id, .. } => println!("{id}"),
        Reply::Done { message } => println!("{message}"),
        Reply::Egress {
            default_allow,
            rules,
            inactive,
        } if json => print_json(&serde_json::json!({
            "default_allow": default_allow,
            "rules": rules,
            "inactive": inactive,
        }))?,
        Reply::Egress {
            default_allow,
            rules,
            inactive,
        } => {
            let (d, x) = if default_allow {
                ("allow", "deny")
            } else {
                ("deny", "allow")
            };
            println!("default: {d}; exceptions ({x}):");
            println!("{:<18} RULE (DESTINATIONS) FROM", "ID");
            for r in rules {
                // A CloudStack rule added under the other default does what the default does.
                let standing = if inactive.contains(&r.id) {
                    format!(" (not in force: an exception to a default of {x})")
                } else {
                    String::new()
                };
                println!(
                    "{:<18} {} from [{}]{standing}",
                    r.id,
                    describe(&r.service, &r.cidrs),
                    list(&r.sources)
                );
            }
        }
        other => return Err(exit::Error::unexpected(&other)),
    }
    Ok(())
}
