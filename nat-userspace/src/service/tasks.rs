//! natd's background tasks: the control socket, metrics, kernel events, the flows'
//! housekeeping and the CloudStack directory. Each ends when the stop channel says so.
use std::{path::PathBuf, sync::Arc, time::Duration};

use log::warn;
use tokio::{
    net::{TcpListener, UnixListener},
    sync::{Mutex, watch},
    task::JoinHandle,
};

use super::{GC_INTERVAL, Options, Policy};
use crate::{
    api::server,
    cloudstack_dir,
    daemon::Daemon,
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
