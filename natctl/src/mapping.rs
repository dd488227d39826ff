//! `natctl mapping add|del|list`.
use std::{net::Ipv4Addr, path::Path};

use clap::Subcommand;
use nat_api::{Reply, Request};

use crate::{call, exit, print_json, print_mappings};

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Map PUBLIC to PRIVATE (one-to-one).
    Add { public: Ipv4Addr, private: Ipv4Addr },
    /// Remove the mapping of PUBLIC.
    Del { public: Ipv4Addr },
    /// List mappings with their counters.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(socket: &Path, cmd: Cmd) -> Result<(), exit::Error> {
    let (req, json) = match cmd {
        Cmd::Add { public, private } => (Request::MappingAdd { public, private }, false),
        Cmd::Del { public } => (Request::MappingDel { public }, false),
        Cmd::List { json } => (Request::MappingList, json),
    };
    match call(socket, req)? {
        Reply::Done { message } => println!("{message}"),
        Reply::Mappings { mappings } if json => print_json(&mappings)?,
        Reply::Mappings { mappings } => print_mappings(&mappings),
        other => return Err(exit::Error::unexpected(&other)),
    }
    Ok(())
}
