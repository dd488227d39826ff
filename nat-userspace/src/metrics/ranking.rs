//! The top mappings by traffic for `--metrics-per-mapping top:N`, ranked in the background
//! every [`RANK_INTERVAL`] so that a scrape reads the counters of N mappings, not of all.
//!
//! Ranking reads every mapping's counters in chunks of [`CHUNK`], releasing the daemon between
//! chunks (natctl and scrapes wait for one chunk at most). Traffic is the frames a mapping
//! forwarded or denied in both directions since it was installed, so the ranking changes
//! slowly and series do not come and go from one scrape to the next. Ties go to the lower
//! public address. Until the first ranking, and whenever at most N mappings are installed,
//! the first N mappings in address order are exported.
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use log::{debug, warn};
use tokio::sync::{Mutex, watch};

use super::PerMapping;
use crate::{daemon::Daemon, ebpf::MappingCounters, state::DesiredState, state::Mapping};

/// How often the mappings are ranked again.
pub const RANK_INTERVAL: Duration = Duration::from_secs(60);
/// Mappings whose counters are read under one hold of the daemon.
pub const CHUNK: usize = 1024;

/// The last ranking: the top mappings, most traffic first.
#[derive(Debug, Default)]
pub struct Ranking {
    top: StdMutex<Option<Vec<Mapping>>>,
}

/// A mapping's traffic for the ranking.
pub fn traffic(c: &MappingCounters) -> u64 {
    c.inbound_packets
        .saturating_add(c.outbound_packets)
        .saturating_add(c.inbound_denied)
        .saturating_add(c.outbound_denied)
}

/// The `n` mappings of `all` with the most traffic, most first (ties: lower public address).
pub fn top_n(mut all: Vec<(u64, Mapping)>, n: usize) -> Vec<Mapping> {
    let order = |a: &(u64, Mapping), b: &(u64, Mapping)| b.0.cmp(&a.0).then(a.1.cmp(&b.1));
    if all.len() > n {
        all.select_nth_unstable_by(n, order);
        all.truncate(n);
    }
    all.sort_unstable_by(order);
    all.into_iter().map(|(_, m)| m).collect()
}

impl Ranking {
    /// The mappings whose series a scrape exports under `per_mapping`, of those in `state`.
    pub fn select(&self, per_mapping: PerMapping, state: &DesiredState) -> Vec<Mapping> {
        match per_mapping {
            PerMapping::Off => Vec::new(),
            PerMapping::All => state.mappings().collect(),
            PerMapping::Top(n) if state.len() <= n => state.mappings().collect(),
            PerMapping::Top(n) => {
                let ranked = self.top.lock().ok().and_then(|t| t.clone());
                match ranked {
                    // Those still installed (a mapping removed since is left out; one added
                    // since waits for the next ranking).
                    Some(top) => {
                        let mut chosen: Vec<Mapping> = top
                            .into_iter()
                            .filter(|m| state.private_of(m.public) == Some(m.private))
                            .take(n)
                            .collect();
                        chosen.sort_unstable();
                        chosen
                    }
                    None => state.mappings().take(n).collect(),
                }
            }
        }
    }

    pub(super) fn set(&self, top: Option<Vec<Mapping>>) {
        if let Ok(mut t) = self.top.lock() {
            *t = top;
        }
    }
}

/// Ranks the mappings now and every [`RANK_INTERVAL`] until `stop` (only while more than `n`
/// mappings are installed).
pub async fn run(
    daemon: Arc<Mutex<Daemon>>,
    ranking: Arc<Ranking>,
    n: usize,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let all: Vec<Mapping> = daemon.lock().await.ctl.state().mappings().collect();
        if all.len() > n {
            let started = std::time::Instant::now();
            let mut seen = Vec::with_capacity(all.len());
            let mut failed = BTreeSet::new();
            for chunk in all.chunks(CHUNK) {
                let mut d = daemon.lock().await;
                for &m in chunk {
                    match d.ctl.fast_mut().counters(m) {
                        Ok(c) => seen.push((traffic(&c), m)),
                        Err(e) => {
                            failed.insert(e.to_string());
                        }
                    }
                }
                drop(d);
                tokio::task::yield_now().await;
            }
            for e in failed {
                warn!("ranking mappings for metrics: {e}");
            }
            ranking.set(Some(top_n(seen, n)));
            debug!(
                "ranked {} mappings for metrics in {:?}",
                all.len(),
                started.elapsed()
            );
        } else {
            ranking.set(None);
        }
        tokio::select! {
            _ = tokio::time::sleep(RANK_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}
