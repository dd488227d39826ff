//! Prometheus metrics (`GET /metrics`, names `xdp_nat_*`): a `prometheus-client` collector
//! that reads the maps at scrape time, encoded in the Prometheus text format (0.0.4) and served
//! by hyper. Reading counters is map lookups of per-CPU values: the fast path never waits for
//! a scrape.
//!
//! Per-mapping series (7 per mapping) are limited by `--metrics-per-mapping` ([`PerMapping`]):
//! by default the [`DEFAULT_TOP`] mappings with the most traffic, ranked in the background
//! ([`ranking`]) so that a scrape reads the counters of those mappings only. Every aggregate
//! series (verdicts, connection table, state) is exact whatever the limit.
mod families;
pub mod ranking;
#[cfg(test)]
mod tests;

use std::{convert::Infallible, str::FromStr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{info, warn};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, prometheus_text},
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{Mutex, watch},
};

use crate::{api::StatsReport, daemon::Daemon};

pub use ranking::Ranking;

/// Default `--metrics-addr`: loopback only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";
/// Mappings with per-mapping series by default (`top:1000`): about 650 kB of exposition.
pub const DEFAULT_TOP: usize = 1000;
const PREFIX: &str = "xdp_nat";
/// How long a client may take to send its request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Which mappings get per-mapping series (`--metrics-per-mapping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PerMapping {
    /// None: only aggregate series.
    Off,
    /// Every mapping (7 series each: 700,000 at 100,000 mappings).
    All,
    /// The N mappings with the most traffic (frames forwarded or denied, both directions,
    /// since the mapping was installed); all of them while there are at most N.
    Top(usize),
}

impl Default for PerMapping {
    fn default() -> Self {
        Self::Top(DEFAULT_TOP)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("per-mapping metrics {value:?}: expected off, all or top:N with N at least 1")]
pub struct PerMappingError {
    pub value: String,
}

impl FromStr for PerMapping {
    type Err = PerMappingError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PerMappingError {
            value: s.to_string(),
        };
        match s {
            "off" => Ok(Self::Off),
            "all" => Ok(Self::All),
            _ => match s.strip_prefix("top:").map(str::parse::<usize>) {
                Some(Ok(n)) if n > 0 => Ok(Self::Top(n)),
                _ => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for PerMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::All => f.write_str("all"),
            Self::Top(n) => write!(f, "top:{n}"),
        }
    }
}

/// What one scrape exports, read at scrape time.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Every counter; `stats.mappings` holds the mappings with per-mapping series only.
    pub stats: StatsReport,
    /// Seconds since the epoch of the last applied change (0: none since start).
    pub applied_at: u64,
    /// Mappings installed (all of them, whatever the limit).
    pub mappings: usize,
}

/// Where the collector reads a [`Snapshot`] from at each scrape.
pub trait Source: Send + Sync + 'static {
    fn snapshot(&self) -> Result<Snapshot, String>;
}

/// natd's own source: the daemon's maps, per-mapping series chosen by [`PerMapping`].
pub struct DaemonSource {
    pub daemon: Arc<Mutex<Daemon>>,
    pub per_mapping: PerMapping,
    pub ranking: Arc<Ranking>,
}

impl Source for DaemonSource {
    /// Locks the daemon (blocking: call it off the async runtime's threads).
    fn snapshot(&self) -> Result<Snapshot, String> {
        let mut d = self.daemon.blocking_lock();
        let chosen = self.ranking.select(self.per_mapping, d.ctl.state());
        let stats = d.stats_of(false, chosen)?;
        Ok(Snapshot {
            stats,
            applied_at: d.ctl.applied_at(),
            mappings: d.ctl.state().len(),
        })
    }
}

/// The collector: one [`Source::snapshot`] per scrape, encoded as natd's metric families. A
/// snapshot that fails fails the scrape (HTTP 500 with the error), never a partial exposition.
pub struct NatCollector<S> {
    source: S,
    /// The last scrape's error, for the HTTP answer (the encoder only carries `fmt::Error`).
    error: std::sync::Mutex<Option<String>>,
}

impl<S> std::fmt::Debug for NatCollector<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatCollector").finish_non_exhaustive()
    }
}

impl<S: Source> Collector for NatCollector<S> {
    fn encode(&self, encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        match self.source.snapshot() {
            Ok(s) => families::encode(&s, encoder),
            Err(e) => {
                if let Ok(mut slot) = self.error.lock() {
                    *slot = Some(e);
                }
                Err(std::fmt::Error)
            }
        }
    }
}

/// natd's registry: everything under the `xdp_nat_` prefix, read from `source` at scrape time.
pub struct Metrics<S> {
    registry: Registry,
    collector: Arc<NatCollector<S>>,
}

impl<S: Source> Metrics<S> {
    pub fn new(source: S) -> Self {
        let collector = Arc::new(NatCollector {
            source,
            error: std::sync::Mutex::new(None),
        });
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_collector(Box::new(collector.clone()));
        Self {
            registry,
            collector,
        }
    }

    /// One scrape: the exposition, or why it failed.
    pub fn render(&self) -> Result<String, String> {
        let mut out = String::new();
        match prometheus_text::encode(&mut out, &self.registry) {
            Ok(()) => Ok(out),
            Err(_) => Err(self
                .collector
                .error
                .lock()
                .ok()
                .and_then(|mut e| e.take())
                .unwrap_or_else(|| "encoding the metrics failed".to_string())),
        }
    }
}

/// Serves `GET /metrics` until `stop` turns true.
pub async fn serve<S: Source>(
    listener: TcpListener,
    metrics: Arc<Metrics<S>>,
    mut stop: watch::Receiver<bool>,
) {
    if let Ok(a) = listener.local_addr() {
        info!("metrics on http://{a}/metrics");
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        let service = service_fn(move |req| respond(req, metrics.clone()));
                        let conn = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service);
                        if let Err(e) = conn.await {
                            warn!("metrics connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    warn!("metrics accept: {e}");
                    // Out of file descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn respond<S: Source>(
    req: Request<Incoming>,
    metrics: Arc<Metrics<S>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() != "/metrics" {
        return Ok(text(StatusCode::NOT_FOUND, "see /metrics\n"));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        r.headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return Ok(r);
    }
    // The collector locks the daemon and makes map syscalls: off the async threads.
    let rendered = tokio::task::spawn_blocking(move || metrics.render())
        .await
        .unwrap_or_else(|e| Err(format!("the scrape failed: {e}")));
    Ok(match rendered {
        Ok(body) => {
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
            );
            r
        }
        Err(e) => {
            warn!("metrics: {e}");
            text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"))
        }
    })
}
