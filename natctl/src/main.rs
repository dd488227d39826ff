//! natctl: changes and inspects a running natd over its control socket. Built from nat-api
//! alone (no eBPF toolchain); one file per subcommand, [`exit`] for the exit statuses.
mod apply;
mod conntrack;
mod egress;
mod exit;
mod firewall;
mod mapping;
mod rule;
mod stats;
mod status;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use exit::Error;
use nat_api::{DEFAULT_SOCKET, MappingStatus, Reply, Request, client};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Control a running natd (XDP static NAT)",
    after_help = exit::EXIT_STATUS
)]
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

/// Sends `req`; returns natd's reply, or the error to print and exit with.
fn call(socket: &std::path::Path, req: Request) -> Result<Reply, Error> {
    exit::reply_of(client::call(socket, &req))
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        // Help and version go to stdout (status 0); a usage error is refused like bad input
        // natd refuses (status 1, not clap's 2, which is natctl's "failed").
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(Error::Refused(String::new()).status())
            } else {
                ExitCode::SUCCESS
            };
        }
    };
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
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("natctl: {}", e.message());
            ExitCode::from(e.status())
        }
    }
}

/// Prints `value` as pretty JSON.
fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Error> {
    let s = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Failed(format!("cannot print natd's answer as JSON: {e}")))?;
    println!("{s}");
    Ok(())
}

/// Prints mappings and their counters as a table.
fn print_mappings(mappings: &[MappingStatus]) {
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
