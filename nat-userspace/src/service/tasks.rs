//! natd's background tasks: the control socket, metrics, kernel events, the flows'
//! housekeeping and the CloudStack directory. Each ends when the stop channel says so.
use std::{path::PathBuf, sync::Arc, time::Duration};

use log::{info, warn};
use tokio::{
    io::unix::AsyncFd,
    net::{TcpListener, UnixListener},
    sync::{Mutex, watch},
    task::JoinHandle,
};

use super::{GC_INTERVAL, Options, Policy};
use crate::{
    api::server,
    cloudstack_dir,
    daemon::Daemon,
    kernel_conntrack,
    kernel_events::KernelEvents,
    metrics::{self, DaemonSource, Metrics, PerMapping, Ranking},
};

/// What the tasks are started with, made by the startup.
pub(super) struct Inputs {
    pub listener: UnixListener,
    pub metrics_listener: TcpListener,
    pub events: KernelEvents,
    pub cs_watcher: Option<cloudstack_dir::Watcher>,
    pub cs_initial: Vec<String>,
    pub cs_record: cloudstack_dir::Record,
    /// The interval of the kernel policy's rounds.
    pub round: Duration,
}

pub(super) fn spawn(
    opts: &Options,
    daemon: &Arc<Mutex<Daemon>>,
    stop: &watch::Receiver<bool>,
    inputs: Inputs,
) -> Vec<(&'static str, JoinHandle<()>)> {
    let mut tasks = Vec::new();
    tasks.push((
        "control socket",
        tokio::spawn(server::serve(inputs.listener, daemon.clone(), stop.clone())),
    ));
    // The fast path's own timers expire its flows with the XDP policy; with the kernel's the
    // kernel's do, and natd follows them.
    tasks.push(match opts.policy {
        Policy::Xdp => (
            "flow collection",
            tokio::spawn(collect_expired(daemon.clone(), stop.clone())),
        ),
        Policy::Kernel => (
            "kernel rounds",
            tokio::spawn(kernel_rounds(daemon.clone(), stop.clone(), inputs.round)),
        ),
    });
    if opts.policy == Policy::Kernel {
        tasks.push((
            "kernel flow ends",
            tokio::spawn(kernel_ended(daemon.clone(), stop.clone())),
        ));
    }
    tasks.push((
        "kernel events",
        tokio::spawn(watch_kernel(inputs.events, daemon.clone(), stop.clone())),
    ));
    let ranking = Arc::new(Ranking::default());
    if let PerMapping::Top(n) = opts.metrics_per_mapping {
        tasks.push((
            "metrics ranking",
            tokio::spawn(metrics::ranking::run(
                daemon.clone(),
                ranking.clone(),
                n,
                stop.clone(),
            )),
        ));
    }
    let exposition = Arc::new(Metrics::new(DaemonSource {
        daemon: daemon.clone(),
        per_mapping: opts.metrics_per_mapping,
        ranking,
    }));
    tasks.push((
        "metrics",
        tokio::spawn(metrics::serve(
            inputs.metrics_listener,
            exposition,
            stop.clone(),
        )),
    ));
    if let Some(watcher) = inputs.cs_watcher {
        let state_dir: PathBuf = opts.state_dir.clone();
        tasks.push((
            "CloudStack directory",
            tokio::spawn(cloudstack_dir::watch_dir(
                watcher,
                inputs.cs_initial,
                state_dir,
                inputs.cs_record,
                daemon.clone(),
                stop.clone(),
            )),
        ));
    }
    tasks
}

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

/// The kernel policy: every `interval`, the kernel's timeouts of the flows the fast path
/// carried are refreshed and the flows the kernel ended forgotten, until shutdown. The
/// kernel's table is read and written off the daemon's lock.
async fn kernel_rounds(
    daemon: Arc<Mutex<Daemon>>,
    mut stop: watch::Receiver<bool>,
    interval: Duration,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {
                let flows = daemon.lock().await.round_flows();
                let gone = tokio::task::spawn_blocking(move || {
                    crate::daemon::kernel_round(&flows, interval)
                })
                .await
                .unwrap_or_default();
                daemon.lock().await.forget_ended(&gone);
            }
            _ = stop.changed() => return,
        }
    }
}

/// How long after forgetting flows the kernel ended their cache slots are emptied again (a
/// packet that found a flow's entry just before its removal copies it into the slot within
/// its program run, microseconds).
const EVICT_AGAIN: Duration = Duration::from_millis(20);

/// The kernel policy: a flow the kernel ends (its conntrack destroy event) leaves the fast
/// path at once, not at the next round, until shutdown. The rounds still find the flows
/// whose events were lost or never sent.
async fn kernel_ended(daemon: Arc<Mutex<Daemon>>, mut stop: watch::Receiver<bool>) {
    let subscribed = match kernel_conntrack::Ended::subscribe() {
        Ok(s) => s,
        Err(e) => return warn_rounds_only(&e),
    };
    // SAFETY: `Ended` owns its socket, open until it is dropped, and always returns its fd;
    // the `AsyncFd` owns the `Ended`.
    let mut ended = match unsafe { AsyncFd::register(subscribed) } {
        Ok(fd) => fd,
        Err(e) => return warn_rounds_only(&e),
    };
    info!("kernel policy: flows the kernel ends leave the fast path as its destroy events come");
    let mut flows = Vec::new();
    let mut lost_before = false;
    loop {
        tokio::select! {
            ready = ended.readable_mut() => {
                let mut guard = match ready {
                    Ok(g) => g,
                    Err(e) => return warn_rounds_only(&e),
                };
                flows.clear();
                let lost = match guard.get_inner_mut().read(&mut flows) {
                    Ok(lost) => lost,
                    Err(e) => return warn_rounds_only(&e),
                };
                guard.clear_ready();
                if lost && !lost_before {
                    warn!(
                        "the kernel's flow end events overran natd's buffer: the next round \
                         finds the flows whose events were lost (logged once)"
                    );
                }
                lost_before |= lost;
                if flows.is_empty() {
                    continue;
                }
                let removed = daemon.lock().await.forget_destroyed(&flows);
                if !removed.is_empty() {
                    tokio::time::sleep(EVICT_AGAIN).await;
                    daemon.lock().await.evict_again(&removed);
                }
            }
            _ = stop.changed() => return,
        }
    }
}

fn warn_rounds_only(e: &dyn std::fmt::Display) {
    warn!("the kernel's flow ends reach the fast path at the next round only: {e}");
}

/// Deletes expired flows now and every [`GC_INTERVAL`] until shutdown.
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
