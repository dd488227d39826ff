//! natd: loads the XDP static NAT program, attaches it to the public and guest interfaces,
//! installs the mappings (fast path maps + nftables slow path) and serves natctl.
use std::{path::PathBuf, sync::Arc};

use anyhow::{Context as _, bail};
use clap::Parser;
use log::{info, warn};
use nat_common::NatConfig;
use nat_userspace::{
    api::{DEFAULT_SOCKET, server},
    cloudstack_dir,
    config::Config,
    daemon::Daemon,
    ebpf::{Dataplane, DataplaneError, Mode, Role, Sizes},
    kernel_events::KernelEvents,
    metrics::{self, DEFAULT_METRICS_ADDR, DaemonSource, Metrics, PerMapping, Ranking},
    netfilter::{Nft, SlowPath as _},
    persist::{DEFAULT_STATE_DIR, StateDir},
    pins::{DEFAULT_BPFFS, PinDir},
    reconcile::Controller,
    state::DesiredState,
    tables::Tables,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{Mutex, watch},
};

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

/// How often `--policy kernel` refreshes the kernel's timeouts of the flows the fast path
/// carries and forgets the flows the kernel ended, at most (see
/// `nat_userspace::daemon::round_interval`).
const KERNEL_ROUND: std::time::Duration = std::time::Duration::from_secs(5);

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
fn flag_hint(e: &DataplaneError) -> Option<&'static str> {
    match e {
        DataplaneError::AttachNative { .. } => {
            Some("if its driver has no native XDP support, run natd with --xdp-mode generic")
        }
        _ => None,
    }
}

/// The error natd exits with, on one line, with the flag that helps if there is one.
fn exit_message(e: &anyhow::Error) -> String {
    let text = nat_userspace::report(e.as_ref());
    match e
        .chain()
        .find_map(|c| c.downcast_ref::<DataplaneError>().and_then(flag_hint))
    {
        Some(hint) => format!("{text}; {hint}"),
        None => text,
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
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

fn check_ifaces(args: &Args) -> anyhow::Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for name in args.public_ifaces.iter().chain(&args.guest_ifaces) {
        if !seen.insert(name) {
            bail!("interface {name} is given more than once (each interface has one role)");
        }
        if name.is_empty() || name.len() >= nix::libc::IFNAMSIZ || name.contains(['"', '/', ' ']) {
            bail!("{name:?} is not a valid interface name");
        }
        nat_userspace::ebpf::ifindex(name)?;
        let fwd = format!("/proc/sys/net/ipv4/conf/{name}/forwarding");
        if std::fs::read_to_string(&fwd)
            .map(|s| s.trim() == "0")
            .unwrap_or(false)
        {
            warn!(
                "IPv4 forwarding is off on {name}: the kernel will not route translated traffic (sysctl net.ipv4.ip_forward=1)"
            );
        }
    }
    Ok(())
}

fn raise_memlock() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        // Kernels >= 5.11 account BPF memory to the cgroup and ignore this limit; on older
        // ones map creation would fail with its own clear error.
        log::debug!("RLIMIT_MEMLOCK left as is ({e}); kernels since 5.11 do not need it");
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    check_ifaces(&args)?;
    // Bound before anything is installed, so a taken port changes nothing.
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding the metrics address {}", args.metrics_addr))?;
    let config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let path = args.config.clone().unwrap_or_default();
    let (ct_size, timeouts_ns) = config.conntrack(&path)?;
    let sizes = Sizes {
        flows: ct_size,
        mappings: config.mappings(&path)?,
    };
    let store = StateDir::new(&args.state_dir);
    store.ensure()?;
    if let Some(dir) = &args.cloudstack_dir
        && !dir.is_dir()
    {
        anyhow::bail!("--cloudstack-dir {} is not a directory", dir.display());
    }
    let cs_record = cloudstack_dir::Record::load(&args.state_dir)?;
    // Watching before anything is installed, so a directory natd cannot watch changes nothing.
    let cs_watcher = match &args.cloudstack_dir {
        Some(dir) => Some(
            cloudstack_dir::Watcher::new(dir)
                .with_context(|| format!("--cloudstack-dir {}: cannot watch it", dir.display()))?,
        ),
        None => None,
    };
    let (desired, generation) = match store.load()? {
        Some((snap, state)) => {
            info!(
                "restored state generation {} from {} ({} mapping(s))",
                snap.generation,
                store.file().display(),
                state.len()
            );
            if args.config.is_some() {
                info!("the state file takes precedence over the config file's mappings and rules");
            }
            (state, snap.generation)
        }
        None => (config.desired_state(&path)?, 0),
    };
    raise_memlock();
    let pins = PinDir::prepare(&args.bpffs)?;
    let mut dataplane = Dataplane::open(nat_userspace::EBPF_OBJECT, sizes, Some(pins))?;
    let (installed, tables) = if dataplane.adopted() {
        let (s, t) = dataplane.installed()?;
        info!(
            "adopted the pinned fast path under {} ({} mapping(s) installed); connection tracking and counters carry over",
            args.bpffs.display(),
            s.len()
        );
        (s, t)
    } else {
        (DesiredState::default(), Tables::default())
    };
    // An adopted fast path keeps its route generation, moved on: what changed while no natd
    // watched the kernel's routes is resolved again.
    let route_gen = if dataplane.adopted() {
        dataplane.config()?.route_gen.wrapping_add(1).max(1)
    } else {
        1
    };
    // `--policy kernel`: the kernel's timers are the flows' timers.
    let timeouts_ns = match args.policy {
        PolicyMode::Xdp => timeouts_ns,
        PolicyMode::Kernel => {
            let (kernel, changed) = nat_userspace::kernel_conntrack::kernel_timeouts(timeouts_ns);
            if !changed.is_empty() {
                info!(
                    "--policy kernel: the kernel's connection tracking timeouts apply (seconds): {changed:?}"
                );
            }
            kernel
        }
    };
    if args.policy == PolicyMode::Kernel {
        // Before any flow is carried: the kernel must not judge a carried flow's next segment
        // by a window it last saw before the fast path took over.
        if nat_userspace::kernel_conntrack::make_tcp_liberal()
            .context("--policy kernel needs the kernel's TCP tracking liberal about windows")?
        {
            info!(
                "set net.netfilter.nf_conntrack_tcp_be_liberal=1: the kernel does not see the TCP segments the fast path carries, so it cannot keep their windows"
            );
        }
    }
    dataplane.write_config(&NatConfig {
        egress_default_deny: u32::from(tables.egress_default_deny),
        route_gen,
        jiffies_per_sec: nat_userspace::clock::jiffies_per_sec(),
        policy: match args.policy {
            PolicyMode::Xdp => nat_common::POLICY_XDP,
            PolicyMode::Kernel => nat_common::POLICY_KERNEL,
        },
        timeouts_ns,
    })?;
    let slow_path = args.slow_path.unwrap_or(match args.policy {
        PolicyMode::Xdp => SlowPathMode::Nftables,
        PolicyMode::Kernel => SlowPathMode::None,
    });
    let nft = Nft::new(
        args.public_ifaces.clone(),
        args.guest_ifaces.clone(),
        args.manage_addresses,
    );
    let nft = match slow_path {
        SlowPathMode::Nftables => nft,
        SlowPathMode::None => {
            info!(
                "no nftables table of natd's own (--slow-path none): the kernel's own rules translate and judge what the fast path hands it"
            );
            nft.without_table()
        }
    };
    if args.policy == PolicyMode::Kernel {
        info!(
            "--policy kernel: the kernel's netfilter judges every new flow; the fast path carries the established flows it admitted, and natd keeps the kernel's timeouts of those current every {:?}",
            nat_userspace::daemon::round_interval(&timeouts_ns, KERNEL_ROUND)
        );
    }
    let mut ctl = Controller::with_store(dataplane, nft, store, installed, tables, generation);
    let roles = args
        .public_ifaces
        .iter()
        .map(|i| (i, Role::Public))
        .chain(args.guest_ifaces.iter().map(|i| (i, Role::Guest)));
    for (name, role) in roles {
        match ctl.fast_mut().attach(name, role, args.xdp_mode.into()) {
            Ok(a) if a.adopted => info!(
                "replaced the program on {} (ifindex {}, {:?}) atomically, keeping its attachment",
                a.name, a.ifindex, a.role
            ),
            Ok(a) => info!(
                "attached XDP to {} (ifindex {}, {:?}) in {} mode",
                a.name, a.ifindex, a.role, a.mode
            ),
            Err(e) => {
                // A fast path we created ourselves goes entirely; an adopted one keeps running.
                if !ctl.fast_mut().adopted() {
                    abandon(&mut ctl);
                }
                return Err(e.into());
            }
        }
        match ctl.fast_mut().attach_learner(name) {
            Ok(()) => info!("attached the tc egress learner to {name}"),
            // Without it the fast path works; only flows the kernel forwarded stay unknown.
            Err(e) => warn!("{e}: flows the kernel forwards will not be known to the fast path"),
        }
        match ctl.fast_mut().attach_marker(name) {
            Ok(()) => info!("attached the tc ingress marker to {name}"),
            // Without it the fast path works; what it passes to the kernel of its own flows
            // (fragments above all) meets the slow path's rules as a new flow.
            Err(e) => warn!(
                "{e}: packets of fast-path flows passed to the kernel are judged as new flows"
            ),
        }
    }

    // Interfaces are attached first: a mapping's public IP is bound to the public interface
    // whose network holds it. A failure leaves a fast path natd created itself removed.
    if let Err(e) = ctl.apply(desired) {
        if !ctl.fast_mut().adopted() {
            abandon(&mut ctl);
        }
        return Err(anyhow::Error::from(e).context("installing the desired state"));
    }
    info!(
        "installed {} mapping(s), {} ingress rule(s) ({} inactive), {} egress rule(s) (default {}), connection table of {ct_size}, and the nftables slow path",
        ctl.state().len(),
        ctl.state().ingress_rules().count(),
        ctl.state().ingress_rules().count() - ctl.state().active_ingress_rules().count(),
        ctl.state().egress_rules().count(),
        if ctl.state().egress_default_allow() {
            "allow"
        } else {
            "deny"
        },
    );

    // Link events from here on: an interface deleted and created again is attached again.
    let events = match KernelEvents::subscribe().await {
        Ok(e) => e,
        Err(e) => {
            let _ = ctl.slow_mut().remove();
            return Err(e.into());
        }
    };
    // The files already there are read before natd serves anyone: anything written after it
    // is taken on its close-write (or moved-to) event, never half-written.
    let cs_initial = match &args.cloudstack_dir {
        Some(dir) => cloudstack_dir::pending(dir, &cs_record)
            .with_context(|| format!("--cloudstack-dir {}: cannot read it", dir.display()))?,
        None => Vec::new(),
    };
    let listener = match server::bind(&args.socket) {
        Ok(l) => l,
        Err(e) => {
            let _ = ctl.slow_mut().remove();
            return Err(e.into());
        }
    };
    info!("control socket {}", args.socket.display());
    let daemon = Arc::new(Mutex::new(Daemon::new(ctl, timeouts_ns)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(server::serve(listener, daemon.clone(), stop_rx.clone()));
    // The fast path's own timers expire its flows with --policy xdp; with --policy kernel the
    // kernel's do, and natd follows them.
    let gc = match args.policy {
        PolicyMode::Xdp => tokio::spawn(collect_expired(daemon.clone(), stop_rx.clone())),
        PolicyMode::Kernel => tokio::spawn(kernel_rounds(
            daemon.clone(),
            stop_rx.clone(),
            nat_userspace::daemon::round_interval(&timeouts_ns, KERNEL_ROUND),
        )),
    };
    let ifaces = tokio::spawn(watch_kernel(events, daemon.clone(), stop_rx.clone()));
    let ranking = Arc::new(Ranking::default());
    let ranker = match args.metrics_per_mapping {
        PerMapping::Top(n) => Some(tokio::spawn(metrics::ranking::run(
            daemon.clone(),
            ranking.clone(),
            n,
            stop_rx.clone(),
        ))),
        PerMapping::Off | PerMapping::All => None,
    };
    let exposition = Arc::new(Metrics::new(DaemonSource {
        daemon: daemon.clone(),
        per_mapping: args.metrics_per_mapping,
        ranking,
    }));
    let metrics = tokio::spawn(metrics::serve(
        metrics_listener,
        exposition,
        stop_rx.clone(),
    ));
    let cloudstack = match cs_watcher {
        Some(watcher) => Some(tokio::spawn(cloudstack_dir::watch_dir(
            watcher,
            cs_initial,
            args.state_dir.clone(),
            cs_record,
            daemon.clone(),
            stop_rx,
        ))),
        None => None,
    };

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    let _ = gc.await;
    let _ = ifaces.await;
    let _ = metrics.await;
    if let Some(r) = ranker {
        let _ = r.await;
    }
    if let Some(c) = cloudstack {
        let _ = c.await;
    }

    let mut daemon = daemon.lock().await;
    let ctl = &mut daemon.ctl;
    let mut failed = false;
    if !args.detach_on_exit {
        info!(
            "leaving the fast path attached and pinned under {} and the nftables table in place; the next natd adopts them (--detach-on-exit removes them)",
            args.bpffs.display()
        );
    } else {
        match ctl.fast_mut().detach_all() {
            Ok(list) => {
                for a in list {
                    info!("detached XDP from {}", a.name);
                }
            }
            Err(e) => {
                warn!("{e}");
                failed = true;
            }
        }
        let mappings: Vec<_> = ctl.state().mappings().collect();
        match ctl.slow_mut().remove() {
            Ok(()) => {
                info!(
                    "removed nftables table {} and natd's policy rules",
                    nat_userspace::netfilter::TABLE
                );
                ctl.slow_mut().forget(&mappings);
            }
            Err(e) => {
                warn!("{e}");
                failed = true;
            }
        }
        if let Some(p) = ctl.fast_mut().pins() {
            match p.remove_all() {
                Ok(()) => info!("removed the pins under {}", p.root().display()),
                Err(e) => {
                    warn!("{e}");
                    failed = true;
                }
            }
        }
    }
    if let Err(e) = std::fs::remove_file(&args.socket) {
        warn!("removing {}: {e}", args.socket.display());
    }
    if failed {
        bail!("shutdown was not clean, see the warnings above");
    }
    info!("stopped");
    Ok(())
}

/// Removes a fast path this natd created itself (startup failed): detaches it, removes its
/// nftables table and its pins.
fn abandon(ctl: &mut nat_userspace::daemon::NatController) {
    let _ = ctl.fast_mut().detach_all();
    if let Err(e) = ctl.slow_mut().remove() {
        warn!("removing the nftables table: {e}");
    }
    if let Some(p) = ctl.fast_mut().pins()
        && let Err(e) = p.remove_all()
    {
        warn!("removing the pins: {e}");
    }
}

/// How often expired flows are collected.
const GC_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Hands kernel events (links, routes, neighbours, addresses) to the daemon until shutdown.
/// Interfaces are checked once first: one may have gone between attaching and subscribing.
async fn watch_kernel(
    mut events: KernelEvents,
    daemon: Arc<Mutex<Daemon>>,
    mut stop: watch::Receiver<bool>,
) {
    {
        let mut d = daemon.lock().await;
        d.check_interfaces();
        // Policy rules the operator added while natd was starting.
        d.refresh_routing();
    }
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(ev) => daemon.lock().await.on_kernel_event(ev),
                None => {
                    warn!("kernel events ended: natd no longer notices interfaces created again");
                    return;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

/// Deletes expired flows now and every [`GC_INTERVAL`] until shutdown.
/// `--policy kernel`: every `every`, the kernel's timeouts of the flows the fast path
/// carried are refreshed and the flows the kernel ended forgotten, until shutdown.
async fn kernel_rounds(
    daemon: Arc<Mutex<Daemon>>,
    mut stop: watch::Receiver<bool>,
    every: std::time::Duration,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {
                let flows = daemon.lock().await.round_flows();
                let gone = tokio::task::spawn_blocking(move || {
                    nat_userspace::daemon::kernel_round(&flows, every)
                })
                .await
                .unwrap_or_default();
                daemon.lock().await.forget_ended(&gone);
            }
            _ = stop.changed() => return,
        }
    }
}

async fn collect_expired(daemon: Arc<Mutex<Daemon>>, mut stop: watch::Receiver<bool>) {
    if let Err(e) = daemon.lock().await.collect_expired() {
        warn!("conntrack collection: {e}");
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(GC_INTERVAL) => {
                if let Err(e) = daemon.lock().await.collect_expired() {
                    warn!("conntrack collection: {e}");
                }
            }
            _ = stop.changed() => return,
        }
    }
}
