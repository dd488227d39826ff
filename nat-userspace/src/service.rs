//! natd's lifecycle as one type, so that startup order, rollback and shutdown are library code
//! that tests drive without spawning a process (the `natd` binary only parses its arguments,
//! sets up logging and waits for a signal).
//!
//! ```text
//! Natd::start(Options) ─ checks (interfaces, metrics address, config, state and CloudStack
//!   │                     directories) before anything is installed; loads or adopts the fast
//!   │                     path; attaches; installs the desired state; serves
//!   │   on failure: a fast path this natd created is removed whole (links, nftables table,
//!   │   pins); an adopted one keeps running as it was; the error says what failed
//!   ▼
//! Natd (running: control socket, metrics, kernel events, flow housekeeping, CloudStack dir)
//!   │
//! Natd::stop(Exit::Leave)   fast path and nftables table left for the next natd to adopt
//! Natd::stop(Exit::Detach)  links, nftables table, policy rules and pins removed
//! ```
mod start;
mod tasks;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use log::{info, warn};
use tokio::{
    sync::{Mutex, watch},
    task::JoinHandle,
};

use crate::{
    api::DEFAULT_SOCKET,
    config::ConfigError,
    daemon::Daemon,
    ebpf::{DataplaneError, Mode},
    kernel_conntrack::KernelConntrackError,
    kernel_events::KernelEventsError,
    metrics::{DEFAULT_METRICS_ADDR, PerMapping},
    netfilter::{SlowPath as _, TABLE},
    persist::{DEFAULT_STATE_DIR, PersistError},
    pins::{DEFAULT_BPFFS, PinError},
    reconcile::ApplyError,
};

/// Who judges a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// natd's firewall, egress policy and connection tracking, in the XDP program.
    Xdp,
    /// The kernel's netfilter; the XDP program carries the flows the kernel admitted.
    Kernel,
}

/// What natd installs in netfilter for the packets the kernel handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowPath {
    /// natd's own nftables table and policy routing rules.
    Nftables,
    /// Nothing: the kernel's own rules translate and judge.
    None,
}

impl SlowPath {
    /// The default for `policy`: with the kernel's policy its own rules translate (two NAT
    /// tables at the same hooks would fight).
    pub fn default_for(policy: Policy) -> Self {
        match policy {
            Policy::Xdp => Self::Nftables,
            Policy::Kernel => Self::None,
        }
    }
}

/// Everything natd is told at start.
#[derive(Debug, Clone)]
pub struct Options {
    pub public_ifaces: Vec<String>,
    pub guest_ifaces: Vec<String>,
    pub policy: Policy,
    pub slow_path: SlowPath,
    pub xdp_mode: Mode,
    /// The control socket.
    pub socket: PathBuf,
    /// A TOML file: the state to install on a first start and load-time settings.
    pub config: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// The bpffs directory of the pins.
    pub bpffs: PathBuf,
    /// Port 0 takes any free port ([`Natd::metrics_addr`] says which).
    pub metrics_addr: SocketAddr,
    pub metrics_per_mapping: PerMapping,
    pub manage_addresses: bool,
    pub cloudstack_dir: Option<PathBuf>,
}

impl Options {
    /// natd's defaults for the given interfaces.
    pub fn new(public_ifaces: Vec<String>, guest_ifaces: Vec<String>) -> Self {
        Self {
            public_ifaces,
            guest_ifaces,
            policy: Policy::Xdp,
            slow_path: SlowPath::Nftables,
            xdp_mode: Mode::Native,
            socket: PathBuf::from(DEFAULT_SOCKET),
            config: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            bpffs: PathBuf::from(DEFAULT_BPFFS),
            metrics_addr: DEFAULT_METRICS_ADDR
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9477))),
            metrics_per_mapping: PerMapping::default(),
            manage_addresses: false,
            cloudstack_dir: None,
        }
    }
}

/// What [`Natd::stop`] does with the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Leave it attached and pinned, the nftables table in place, for the next natd.
    Leave,
    /// Detach it and remove the pins, the nftables table and natd's policy rules.
    Detach,
}

/// Why natd did not start. Nothing it created is left behind.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("interface {0} is given more than once (each interface has one role)")]
    DuplicateInterface(String),
    #[error("{0:?} is not a valid interface name")]
    InterfaceName(String),
    #[error("cannot bind the metrics address {addr}: {source}")]
    MetricsAddress {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the CloudStack directory {}: {why}", .dir.display())]
    CloudstackDir { dir: PathBuf, why: String },
    #[error(
        "the kernel's TCP connection tracking must be liberal about windows for the kernel policy: {0}"
    )]
    KernelTracking(#[source] KernelConntrackError),
    #[error("installing the desired state: {0}")]
    Install(#[source] ApplyError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    State(#[from] PersistError),
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    KernelEvents(#[from] KernelEventsError),
    #[error(transparent)]
    Socket(#[from] crate::api::server::ServerError),
}

/// Why a stop was not clean; every step was still tried.
#[derive(Debug, thiserror::Error)]
#[error("shutdown was not clean: {}", .0.join("; "))]
pub struct StopError(pub Vec<String>);

/// How often the fast path's expired flows are collected (`--policy xdp`).
pub const GC_INTERVAL: Duration = Duration::from_secs(10);
/// The longest interval between two rounds keeping the kernel's connection table in step
/// with the fast path's (`--policy kernel`).
pub const KERNEL_ROUND: Duration = Duration::from_secs(5);

/// A running natd.
pub struct Natd {
    daemon: Arc<Mutex<Daemon>>,
    stop: watch::Sender<bool>,
    tasks: Vec<(&'static str, JoinHandle<()>)>,
    socket: PathBuf,
    bpffs: PathBuf,
    metrics_addr: SocketAddr,
}

impl Natd {
    /// Starts natd (see the module's diagram).
    pub async fn start(opts: Options) -> Result<Self, StartError> {
        start::start(opts).await
    }

    /// The daemon state every task shares.
    pub fn daemon(&self) -> Arc<Mutex<Daemon>> {
        self.daemon.clone()
    }

    /// Where metrics are served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops every task, then leaves or removes the fast path. Every step is tried; the
    /// error lists those that failed.
    pub async fn stop(self, exit: Exit) -> Result<(), StopError> {
        let _ = self.stop.send(true);
        for (name, task) in self.tasks {
            if let Err(e) = task.await {
                warn!("task {name} ended badly: {e}");
            }
        }
        let mut daemon = self.daemon.lock().await;
        let ctl = &mut daemon.ctl;
        let mut failed = Vec::new();
        match exit {
            Exit::Leave => info!(
                "leaving the fast path attached and pinned under {} and the nftables table in place; the next natd adopts them",
                self.bpffs.display()
            ),
            Exit::Detach => {
                match ctl.fast_mut().detach_all() {
                    Ok(list) => {
                        for a in list {
                            info!("detached XDP from {}", a.name);
                        }
                    }
                    Err(e) => failed.push(e.to_string()),
                }
                let mappings: Vec<_> = ctl.state().mappings().collect();
                match ctl.slow_mut().remove() {
                    Ok(()) => {
                        info!("removed nftables table {TABLE} and natd's policy rules");
                        ctl.slow_mut().forget(&mappings);
                    }
                    Err(e) => failed.push(e.to_string()),
                }
                if let Some(p) = ctl.fast_mut().pins() {
                    match p.remove_all() {
                        Ok(()) => info!("removed the pins under {}", p.root().display()),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
            }
        }
        if let Err(e) = std::fs::remove_file(&self.socket) {
            failed.push(format!("removing {}: {e}", self.socket.display()));
        }
        for f in &failed {
            warn!("{f}");
        }
        if failed.is_empty() {
            info!("stopped");
            Ok(())
        } else {
            Err(StopError(failed))
        }
    }
}
