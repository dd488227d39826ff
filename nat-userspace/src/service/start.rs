//! [`Natd::start`]: what can be checked is checked before anything is installed; what is
//! installed is undone when a later step fails.
use std::sync::Arc;

use log::{info, warn};
use nat_common::{NatConfig, TIMEOUT_SLOTS};
use tokio::sync::{Mutex, watch};

use super::{KERNEL_ROUND, Natd, Options, Policy, SlowPath, StartError, tasks};
use crate::{
    api::server,
    cloudstack_dir,
    config::Config,
    daemon::{Daemon, NatController},
    ebpf::{Dataplane, Role, Sizes},
    kernel_conntrack,
    kernel_events::KernelEvents,
    netfilter::{Nft, SlowPath as _},
    persist::StateDir,
    pins::PinDir,
    reconcile::Controller,
    state::DesiredState,
    tables::Tables,
};

pub(super) async fn start(opts: Options) -> Result<Natd, StartError> {
    check_ifaces(&opts)?;
    // Bound before anything is installed, so a taken port changes nothing.
    let metrics_listener = tokio::net::TcpListener::bind(opts.metrics_addr)
        .await
        .map_err(|source| StartError::MetricsAddress {
            addr: opts.metrics_addr,
            source,
        })?;
    let metrics_addr = metrics_listener.local_addr().unwrap_or(opts.metrics_addr);
    let config = match &opts.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let path = opts.config.clone().unwrap_or_default();
    let mem = mem_total();
    let (ct_size, timeouts_ns) = config.conntrack(&path, mem)?;
    if config.conntrack.size.is_none() && ct_size < nat_common::DEFAULT_CONNTRACK_SIZE {
        info!(
            "no `[conntrack] size` set: the flow table holds {ct_size} flows, the default {} \
             halved until its tables take at most a sixteenth of this machine's {} MiB",
            nat_common::DEFAULT_CONNTRACK_SIZE,
            mem.unwrap_or(0) / (1024 * 1024)
        );
    }
    let sizes = Sizes {
        flows: ct_size,
        mappings: config.mappings(&path)?,
    };
    let store = StateDir::new(&opts.state_dir);
    store.ensure()?;
    let cs_dir_err = |dir: &std::path::Path, why: String| StartError::CloudstackDir {
        dir: dir.to_path_buf(),
        why,
    };
    if let Some(dir) = &opts.cloudstack_dir
        && !dir.is_dir()
    {
        return Err(cs_dir_err(dir, "not a directory".into()));
    }
    let cs_record = cloudstack_dir::Record::load(&opts.state_dir)?;
    // Watching before anything is installed, so a directory natd cannot watch changes nothing.
    let cs_watcher = match &opts.cloudstack_dir {
        Some(dir) => Some(
            cloudstack_dir::Watcher::new(dir)
                .map_err(|e| cs_dir_err(dir, format!("cannot watch it: {e}")))?,
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
            if opts.config.is_some() {
                info!("the state file takes precedence over the config file's mappings and rules");
            }
            (state, snap.generation)
        }
        None => (config.desired_state(&path)?, 0),
    };
    let timeouts_ns = kernel_policy(&opts, timeouts_ns)?;
    raise_memlock();
    let pins = PinDir::prepare(&opts.bpffs)?;
    let mut dataplane = Dataplane::open(crate::EBPF_OBJECT, sizes, Some(pins))?;
    let maps = dataplane.memory();
    info!("{}", memory_line(&maps));
    let taken: u64 = maps.iter().map(|(_, b)| b).sum();
    if let Some(total) = mem
        && taken > total / 4
    {
        warn!(
            "the fast path's maps take more than a quarter of this machine's {} MiB of memory: \
             a smaller `[conntrack] size` (or `[limits] mappings`) leaves the rest more room",
            total / (1024 * 1024)
        );
    }
    let adopted = dataplane.adopted();
    let (installed, tables) = if adopted {
        // An adopted fast path is left as it runs whatever fails from here.
        let (s, t) = dataplane.installed()?;
        info!(
            "adopted the pinned fast path under {} ({} mapping(s) installed); connection tracking and counters carry over",
            opts.bpffs.display(),
            s.len()
        );
        (s, t)
    } else {
        (DesiredState::default(), Tables::default())
    };
    let nft = Nft::new(
        opts.public_ifaces.clone(),
        opts.guest_ifaces.clone(),
        opts.manage_addresses,
    );
    let nft = match opts.slow_path {
        SlowPath::Nftables => nft,
        SlowPath::None => {
            info!(
                "no nftables table of natd's own: the kernel's own rules translate and judge what the fast path hands it"
            );
            nft.without_table()
        }
    };
    let egress_mode = tables.egress_mode();
    let mut ctl = Controller::with_store(dataplane, nft, store, installed, tables, generation);
    let sizes = (timeouts_ns, ct_size, egress_mode);
    let events = match install(&mut ctl, &opts, desired, sizes).await {
        Ok(events) => events,
        Err(e) => {
            if !adopted {
                abandon(&mut ctl);
            }
            return Err(e);
        }
    };
    // The files already there are read before natd serves anyone: anything written after it
    // is taken on its close-write (or moved-to) event, never half-written.
    let serving = match &opts.cloudstack_dir {
        Some(dir) => cloudstack_dir::pending(dir, &cs_record)
            .map_err(|e| cs_dir_err(dir, format!("cannot read it: {e}"))),
        None => Ok(Vec::new()),
    }
    .and_then(|initial| Ok((initial, server::bind(&opts.socket)?)));
    let (cs_initial, listener) = match serving {
        Ok(s) => s,
        Err(e) => {
            if !adopted {
                abandon(&mut ctl);
            }
            return Err(e);
        }
    };
    info!("control socket {}", opts.socket.display());

    let daemon = Arc::new(Mutex::new(Daemon::new(ctl, timeouts_ns)));
    let (stop, stop_rx) = watch::channel(false);
    let tasks = tasks::spawn(
        &opts,
        &daemon,
        &stop_rx,
        tasks::Inputs {
            listener,
            metrics_listener,
            events,
            cs_watcher,
            cs_initial,
            cs_record,
            round: crate::daemon::round_interval(&timeouts_ns, KERNEL_ROUND),
        },
    );
    Ok(Natd {
        daemon,
        stop,
        tasks,
        socket: opts.socket,
        bpffs: opts.bpffs,
        metrics_addr,
    })
}

/// Everything from the program's configuration to the desired state, then the kernel's
/// events subscribed; the caller undoes it on failure.
async fn install(
    ctl: &mut NatController,
    opts: &Options,
    desired: DesiredState,
    (timeouts_ns, ct_size, egress_mode): ([u64; TIMEOUT_SLOTS], u32, u32),
) -> Result<KernelEvents, StartError> {
    let fast = ctl.fast_mut();
    // An adopted fast path keeps its route generation, moved on: what changed while no natd
    // watched the kernel's routes is resolved again.
    let route_gen = if fast.adopted() {
        fast.config()?.route_gen.wrapping_add(1).max(1)
    } else {
        1
    };
    fast.write_config(&NatConfig {
        egress_default_deny: egress_mode,
        route_gen,
        jiffies_per_sec: crate::clock::jiffies_per_sec(),
        policy: match opts.policy {
            Policy::Xdp => nat_common::POLICY_XDP,
            Policy::Kernel => nat_common::POLICY_KERNEL,
        },
        timeouts_ns,
    })?;
    attach(ctl, opts)?;
    // Interfaces are attached first: a mapping's public IP is bound to the public interface
    // whose network holds it.
    ctl.apply(desired).map_err(StartError::Install)?;
    info!(
        "installed {} mapping(s), {} ingress rule(s) ({} inactive), {} egress rule(s) (default {}), connection table of {ct_size}{}",
        ctl.state().len(),
        ctl.state().ingress_rules().count(),
        ctl.state().ingress_rules().count() - ctl.state().active_ingress_rules().count(),
        ctl.state().egress_rules().count(),
        if ctl.state().egress_default_allow() {
            "allow"
        } else {
            "deny"
        },
        match opts.slow_path {
            SlowPath::Nftables => ", and the nftables slow path",
            SlowPath::None => "",
        }
    );
    if opts.policy == Policy::Kernel {
        info!(
            "kernel policy: the kernel's netfilter judges every new flow; the fast path carries the established flows it admitted, and natd keeps the kernel's timeouts of those current every {:?}",
            crate::daemon::round_interval(&timeouts_ns, KERNEL_ROUND)
        );
    }
    // Link events from here on: an interface deleted and created again is attached again.
    Ok(KernelEvents::subscribe().await?)
}

/// Attaches the XDP program, the tc egress learner and the tc ingress marker to every
/// interface.
fn attach(ctl: &mut NatController, opts: &Options) -> Result<(), StartError> {
    let roles = opts
        .public_ifaces
        .iter()
        .map(|i| (i, Role::Public))
        .chain(opts.guest_ifaces.iter().map(|i| (i, Role::Guest)));
    for (name, role) in roles {
        let a = ctl.fast_mut().attach(name, role, opts.xdp_mode)?;
        if a.adopted {
            info!(
                "replaced the program on {} (ifindex {}, {:?}) atomically, keeping its attachment",
                a.name, a.ifindex, a.role
            );
        } else {
            info!(
                "attached XDP to {} (ifindex {}, {:?}) in {} mode",
                a.name, a.ifindex, a.role, a.mode
            );
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
    Ok(())
}

/// With the kernel's policy the kernel's timers are the flows' timers, and the kernel must
/// not judge a carried flow's next segment by a window it last saw before the fast path took
/// over. Done before anything is installed.
fn kernel_policy(
    opts: &Options,
    timeouts_ns: [u64; TIMEOUT_SLOTS],
) -> Result<[u64; TIMEOUT_SLOTS], StartError> {
    if opts.policy == Policy::Xdp {
        return Ok(timeouts_ns);
    }
    let (kernel, changed) = kernel_conntrack::kernel_timeouts(timeouts_ns);
    if !changed.is_empty() {
        info!(
            "kernel policy: the kernel's connection tracking timeouts apply (seconds): {changed:?}"
        );
    }
    if kernel_conntrack::make_tcp_liberal().map_err(StartError::KernelTracking)? {
        info!(
            "set net.netfilter.nf_conntrack_tcp_be_liberal=1: the kernel does not see the TCP segments the fast path carries, so it cannot keep their windows"
        );
    }
    Ok(kernel)
}

fn check_ifaces(opts: &Options) -> Result<(), StartError> {
    let mut seen = std::collections::BTreeSet::new();
    for name in opts.public_ifaces.iter().chain(&opts.guest_ifaces) {
        if !seen.insert(name) {
            return Err(StartError::DuplicateInterface(name.clone()));
        }
        if name.is_empty() || name.len() >= nix::libc::IFNAMSIZ || name.contains(['"', '/', ' ']) {
            return Err(StartError::InterfaceName(name.clone()));
        }
        crate::ebpf::ifindex(name)?;
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

/// Removes a fast path this natd created itself (startup failed): detaches it, removes its
/// nftables table, its policy rules and its pins.
fn abandon(ctl: &mut NatController) {
    if let Err(e) = ctl.fast_mut().detach_all() {
        warn!("detaching: {e}");
    }
    if let Err(e) = ctl.slow_mut().remove() {
        warn!("removing the nftables table: {e}");
    }
    if let Some(p) = ctl.fast_mut().pins()
        && let Err(e) = p.remove_all()
    {
        warn!("removing the pins: {e}");
    }
}

/// What the fast path's maps take of the kernel's memory (`(map, bytes)`, largest first):
/// the total and the three largest maps.
fn memory_line(maps: &[(String, u64)]) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let total: u64 = maps.iter().map(|(_, b)| b).sum();
    let largest: Vec<String> = maps
        .iter()
        .take(3)
        .map(|(name, b)| format!("{name} {:.1} MiB", *b as f64 / MIB))
        .collect();
    format!(
        "the fast path's {} maps take {:.1} MiB of kernel memory ({}; `[conntrack] size` sizes \
         FLOWS, PENDING and SLOTS)",
        maps.len(),
        total as f64 / MIB,
        largest.join(", ")
    )
}

/// The machine's memory in bytes (`MemTotal` of /proc/meminfo).
fn mem_total() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_line_names_the_total_and_the_largest_maps() {
        let mib = 1024 * 1024;
        let maps = [
            ("FLOWS".to_string(), 96 * mib),
            ("SLOTS".to_string(), 64 * mib),
            ("PENDING".to_string(), 48 * mib),
            ("CONFIG".to_string(), mib / 2),
        ];
        assert_eq!(
            memory_line(&maps),
            "the fast path's 4 maps take 208.5 MiB of kernel memory (FLOWS 96.0 MiB, SLOTS 64.0 \
             MiB, PENDING 48.0 MiB; `[conntrack] size` sizes FLOWS, PENDING and SLOTS)"
        );
        assert!(mem_total().is_some_and(|b| b > 0));
    }
}
