//! natd: loads the XDP static NAT program, attaches it to the public and guest interfaces,
//! installs the mappings (fast path maps + nftables slow path) and serves natctl.
//!
//! The binary parses its arguments, sets up logging and waits for a signal; the lifecycle is
//! the library's [`nat_userspace::service::Natd`].
use std::path::PathBuf;

use clap::Parser;
use log::info;
use nat_userspace::{
    api::DEFAULT_SOCKET,
    ebpf::{DataplaneError, Mode},
    metrics::{DEFAULT_METRICS_ADDR, PerMapping},
    persist::DEFAULT_STATE_DIR,
    pins::DEFAULT_BPFFS,
    service::{Exit, Natd, Options, Policy, SlowPath, StartError},
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(version, about = "XDP fast path for 1:1 static NAT: the loader daemon")]
struct Args {
    /// Interface facing the internet (CloudStack eth2, eth3...): traffic to a public IP
    /// arriving here is translated to its private IP. Repeat for several.
    #[arg(long = "public-iface", value_name = "IF", required = true)]
    public_ifaces: Vec<String>,
    /// Interface facing the guests (CloudStack eth0): traffic from a private IP arriving here is
    /// translated to its public IP. Repeat for several.
    #[arg(long = "guest-iface", value_name = "IF", required = true)]
    guest_ifaces: Vec<String>,
    /// Who judges new flows: `xdp`, natd's own firewall, egress policy and connection tracking
    /// in the XDP program; or `kernel`, the kernel's netfilter (a CloudStack router's own
    /// iptables, or natd's nftables table with --slow-path nftables), the XDP program only
    /// carrying the established flows the kernel admitted and translated.
    #[arg(long, value_enum, default_value_t = PolicyMode::Xdp)]
    policy: PolicyMode,
    /// What natd installs for the packets the kernel handles: `nftables`, its own table
    /// translating and judging them as the fast path does, and its policy routing rules; or
    /// `none`. Default: nftables with --policy xdp, none with --policy kernel (a CloudStack
    /// router's own rules translate; two NAT tables at the same hooks would fight).
    #[arg(long, value_enum)]
    slow_path: Option<SlowPathMode>,
    /// XDP attach mode. natd never falls back from native to generic by itself.
    #[arg(long, value_enum, default_value_t = XdpMode::Native)]
    xdp_mode: XdpMode,
    /// Control socket for natctl (root only).
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// TOML file with the state to install on a first start (mappings, rules, egress) and
    /// load-time settings (connection table size and timeouts).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Where natd persists the desired state (state.json) and restores it at start.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// bpffs directory for the pinned maps and XDP links (mounted at /sys/fs/bpf if needed).
    #[arg(long, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// On SIGINT/SIGTERM detach XDP and remove the pins, the nftables table and natd's policy
    /// rules. Without it natd leaves the fast path running on exit, for the next natd to
    /// adopt.
    #[arg(long)]
    detach_on_exit: bool,
    /// Add each mapped public IP to the public interface whose subnet holds it (with a
    /// gratuitous ARP), and remove it with its mapping.
    #[arg(long)]
    manage_addresses: bool,
    /// Apply each CloudStack payload file written or moved into this directory once, in order
    /// (those already there at start in name order).
    #[arg(long)]
    cloudstack_dir: Option<PathBuf>,
    /// Where to serve Prometheus metrics (GET /metrics). Loopback unless told otherwise.
    #[arg(long, default_value = DEFAULT_METRICS_ADDR)]
    metrics_addr: std::net::SocketAddr,
    /// Which mappings get per-mapping metric series (7 each): off, all, or top:N, the N
    /// mappings with the most traffic (ranked every minute). Aggregate series are always
    /// exact.
    #[arg(long, value_name = "off|all|top:N", default_value_t = PerMapping::default())]
    metrics_per_mapping: PerMapping,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum PolicyMode {
    Xdp,
    Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SlowPathMode {
    Nftables,
    None,
}

/// `--xdp-mode`: the library's [`Mode`], as the command line names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum XdpMode {
    /// In the driver (default): the fast path proper.
    Native,
    /// In the kernel's generic hook, for drivers without native XDP: much slower.
    Generic,
}

impl std::fmt::Display for XdpMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        Mode::from(*self).fmt(f)
    }
}

impl From<XdpMode> for Mode {
    fn from(m: XdpMode) -> Self {
        match m {
            XdpMode::Native => Mode::Native,
            XdpMode::Generic => Mode::Generic,
        }
    }
}

/// What the operator can do about `e`, in natd's flags (the library does not know them).
fn flag_hint(e: &StartError) -> Option<&'static str> {
    match e {
        StartError::Dataplane(DataplaneError::AttachNative { .. }) => {
            Some("if its driver has no native XDP support, run natd with --xdp-mode generic")
        }
        StartError::Dataplane(DataplaneError::Load(aya::EbpfError::MapError(
            aya::maps::MapError::CreateError { io_error, .. },
        ))) if io_error.raw_os_error() == Some(libc::ENOMEM) => Some(
            "the fast path's tables are allocated whole when natd creates them: a smaller \
             `[conntrack] size` (or `[limits] mappings`) needs less memory",
        ),
        StartError::CloudstackDir { .. } => Some("(--cloudstack-dir)"),
        StartError::MetricsAddress { .. } => Some("(--metrics-addr)"),
        StartError::KernelTracking(_) => Some("(--policy kernel)"),
        StartError::Socket(_) => Some("(--socket)"),
        _ => None,
    }
}

/// The error natd exits with, on one line, with the flag that helps if there is one.
fn exit_message(e: &anyhow::Error) -> String {
    let text = nat_userspace::report(e.as_ref());
    match e.downcast_ref::<StartError>().and_then(flag_hint) {
        Some(hint) => format!("{text}; {hint}"),
        None => text,
    }
}

fn main() {
    // aya warns at every load that the kernel refused the object's BTF: the Rust enums'
    // debug types come out of LLVM in a shape the kernel's BTF checker rejects. natd's maps
    // and programs do not use BTF (legacy map definitions, no CO-RE), so that warning says
    // nothing an operator can act on; RUST_LOG=aya=warn shows it again.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,aya::bpf=error"),
    )
    .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("natd: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args)) {
        // env_logger writes to stderr too: one line, in the log's format.
        log::error!("{}", exit_message(&e));
        std::process::exit(1);
    }
}

fn options(args: Args) -> Options {
    let policy = match args.policy {
        PolicyMode::Xdp => Policy::Xdp,
        PolicyMode::Kernel => Policy::Kernel,
    };
    Options {
        public_ifaces: args.public_ifaces,
        guest_ifaces: args.guest_ifaces,
        policy,
        slow_path: match args.slow_path {
            Some(SlowPathMode::Nftables) => SlowPath::Nftables,
            Some(SlowPathMode::None) => SlowPath::None,
            None => SlowPath::default_for(policy),
        },
        xdp_mode: args.xdp_mode.into(),
        socket: args.socket,
        config: args.config,
        state_dir: args.state_dir,
        bpffs: args.bpffs,
        metrics_addr: args.metrics_addr,
        metrics_per_mapping: args.metrics_per_mapping,
        manage_addresses: args.manage_addresses,
        cloudstack_dir: args.cloudstack_dir,
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let exit = if args.detach_on_exit {
        Exit::Detach
    } else {
        Exit::Leave
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let natd = Natd::start(options(args)).await?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    if exit == Exit::Leave {
        info!("(--detach-on-exit would remove the fast path instead)");
    }
    Ok(natd.stop(exit).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_the_kernel_has_no_memory_for_names_the_setting_that_sizes_it() {
        let create = |errno| {
            StartError::Dataplane(DataplaneError::Load(aya::EbpfError::MapError(
                aya::maps::MapError::CreateError {
                    name: "FLOWS".into(),
                    io_error: std::io::Error::from_raw_os_error(errno),
                },
            )))
        };
        let msg = exit_message(&anyhow::Error::new(create(libc::ENOMEM)));
        assert!(
            msg.starts_with(
                "cannot load the XDP object: map error: failed to create map `FLOWS`: Cannot \
                 allocate memory"
            ),
            "{msg}"
        );
        assert!(
            msg.ends_with(
                "a smaller `[conntrack] size` (or `[limits] mappings`) needs less memory"
            ),
            "{msg}"
        );
        assert_eq!(flag_hint(&create(libc::EPERM)), None);
    }
}
