//! natctl: changes and inspects a running natd over its control socket.
mod apply;
mod conntrack;
mod egress;
mod firewall;
mod mapping;
mod rule;
mod stats;
mod status;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use nat_userspace::api::{DEFAULT_SOCKET, Reply, Request, Response, client};

#[derive(Debug, Parser)]
#[command(version, about = "Control a running natd (XDP static NAT)")]
struct Args {
    /// natd's control socket.
    #[arg(long, global = true, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Static NAT mappings (public IP <-> private IP, all protocols and ports).
    #[command(subcommand)]
    Mapping(mapping::Cmd),
    /// Ingress firewall of public IPs (default deny; rules allow).
    #[command(subcommand)]
    Firewall(firewall::Cmd),
    /// Egress policy of the guest network (a default plus exception rules).
    #[command(subcommand)]
    Egress(egress::Cmd),
    /// Connection tracking table.
    #[command(subcommand)]
    Conntrack(conntrack::Cmd),
    /// natd at a glance: interfaces and modes, counts of mappings, rules and flows, state
    /// generation.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Apply CloudStack virtual-router payloads (staticnat_rules.json, firewall_rules.json
    /// shapes), in order; each file is applied whole or refused whole.
    Apply {
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
    /// Verdict counters by reason, and per mapping.
    Stats {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Sends `req`; returns natd's reply, or the message to print for an error.
fn call(socket: &std::path::Path, req: Request) -> Result<Reply, String> {
    match client::call(socket, &req) {
        Ok(Response::Ok(reply)) => Ok(reply),
        Ok(Response::Error { message }) => Err(message),
        Err(e) => Err(e.to_string()),
    }
}

fn main() {
    let args = Args::parse();
    let result = match args.command {
        Command::Mapping(cmd) => mapping::run(&args.socket, cmd),
        Command::Firewall(cmd) => firewall::run(&args.socket, cmd),
        Command::Egress(cmd) => egress::run(&args.socket, cmd),
        Command::Conntrack(cmd) => conntrack::run(&args.socket, cmd),
        Command::Stats { json } => stats::run(&args.socket, json),
        Command::Status { json } => status::run(&args.socket, json),
        Command::Apply { files } => apply::run(&args.socket, &files),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Args::command(),
                "natctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    };
    if let Err(message) = result {
        eprintln!("natctl: {message}");
        std::process::exit(1);
    }
}

/// Prints `value` as pretty JSON.
fn print_json<T: serde::Serialize>(value: &T) -> Result<(), String> {
    let s = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    println!("{s}");
    Ok(())
}

/// Prints mappings and their counters as a table.
fn print_mappings(mappings: &[nat_userspace::api::MappingStatus]) {
    println!(
        "{:<16} {:<16} {:>10} {:>12} {:>9} {:>10} {:>12} {:>9}",
        "PUBLIC", "PRIVATE", "IN_PKTS", "IN_BYTES", "IN_DENY", "OUT_PKTS", "OUT_BYTES", "OUT_DENY"
    );
    for m in mappings {
        let c = m.counters;
        println!(
            "{:<16} {:<16} {:>10} {:>12} {:>9} {:>10} {:>12} {:>9}",
            m.public.to_string(),
            m.private.to_string(),
            c.inbound_packets,
            c.inbound_bytes,
            c.inbound_denied,
            c.outbound_packets,
            c.outbound_bytes,
            c.outbound_denied
        );
    }
}
