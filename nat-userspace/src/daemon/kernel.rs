//! `--policy kernel`: the kernel's connection table kept in step with the fast path's (see
//! [`crate::kernel_conntrack`]). Every round the kernel's timeout of each flow the fast path
//! carried since the last round is set to what the fast path's last-seen time leaves of it,
//! and the fast path forgets the flows the kernel no longer has (ended, expired, flushed).
//! The kernel's table is read and written without holding the daemon: a round's middle
//! ([`kernel_round`]) runs on its own.
use std::{collections::BTreeSet, time::Duration};

use log::{debug, warn};
use nat_common::{Event, FlowTuple, TIMEOUT_SLOTS, conntrack::Timeout};

use super::{Daemon, monotonic_ns};
use crate::kernel_conntrack::{self, KernelFlow, Update};

/// A fast-path flow as a round sees it.
#[derive(Debug, Clone, Copy)]
pub struct RoundFlow {
    /// Its original key.
    pub key: FlowTuple,
    /// CLOCK_MONOTONIC (ns) of its last packet.
    pub last_seen: u64,
    /// Its idle timeout (ns).
    pub timeout: u64,
    /// Assured: the kernel's entry is marked so too (which it would be, had it seen the
    /// packets: a UDP flow's are all carried by XDP once it is assured), so that the kernel
    /// never drops it early for room.
    pub assured: bool,
}

/// The fast path's original key of a flow the kernel tracks: [`kernel_flow`]'s inverse.
fn flow_key(f: &KernelFlow) -> FlowTuple {
    FlowTuple::new(
        u32::from_ne_bytes(f.src.octets()),
        u32::from_ne_bytes(f.dst.octets()),
        f.sport.to_be(),
        f.dport.to_be(),
        f.proto,
    )
}

fn kernel_flow(k: &FlowTuple) -> KernelFlow {
    KernelFlow {
        proto: k.proto,
        src: std::net::Ipv4Addr::from(k.saddr.to_ne_bytes()),
        dst: std::net::Ipv4Addr::from(k.daddr.to_ne_bytes()),
        sport: u16::from_be(k.sport),
        dport: u16::from_be(k.dport),
    }
}

impl Daemon {
    /// The fast path's flows, for a round.
    pub fn round_flows(&mut self) -> Vec<RoundFlow> {
        match self.ctl.fast_mut().flows() {
            Ok(flows) => flows
                .iter()
                .map(|f| RoundFlow {
                    key: f.key,
                    last_seen: f.last_seen,
                    timeout: self.timeout(f.timer),
                    assured: f.assured,
                })
                .collect(),
            Err(e) => {
                warn!("keeping the kernel's flows: reading the fast path's: {e}");
                Vec::new()
            }
        }
    }

    /// Forgets the fast path's flows whose original key is in `gone` (the kernel ended them);
    /// returns how many went.
    pub fn forget_ended(&mut self, gone: &BTreeSet<FlowTuple>) -> usize {
        if gone.is_empty() {
            return 0;
        }
        match self.ctl.fast_mut().remove_flows(|v| gone.contains(&v.key)) {
            Ok((n, _)) => {
                // As after a flush: the flows may still sit in their slots.
                if n > 0
                    && let Err(e) = self.ctl.fast_mut().bump_route_generation()
                {
                    warn!("leaving the flow cache after the kernel ended flows: {e}");
                }
                self.count_ended(n);
                n
            }
            Err(e) => {
                warn!("forgetting flows the kernel ended: {e}");
                0
            }
        }
    }

    /// Forgets the fast path's flows the kernel says it ended (its destroy events), one
    /// lookup each; returns the keys of the entries removed (both directions), whose slots
    /// [`Self::evict_again`] empties again a moment later.
    pub fn forget_destroyed(&mut self, ended: &[KernelFlow]) -> Vec<FlowTuple> {
        let keys: Vec<FlowTuple> = ended.iter().map(flow_key).collect();
        match self.ctl.fast_mut().remove_flows_keyed(&keys) {
            Ok((flows, removed)) => {
                self.count_ended(flows);
                if flows > 0 {
                    debug!(
                        "kernel flows: {flows} of the {} the kernel ended were on the fast \
                         path, forgotten",
                        ended.len()
                    );
                }
                removed
            }
            Err(e) => {
                warn!("forgetting flows the kernel ended: {e}");
                Vec::new()
            }
        }
    }

    /// Counts `n` flows forgotten because the kernel ended them.
    fn count_ended(&mut self, n: usize) {
        if n > 0
            && let Err(e) = self
                .ctl
                .fast_mut()
                .bump_event(Event::ConntrackEnded, n as u64)
        {
            warn!("counting flows the kernel ended: {e}");
        }
    }

    /// Empties again the slots of entries [`Self::forget_destroyed`] removed: a packet that
    /// found one just before its removal may have copied it into its slot after.
    pub fn evict_again(&mut self, keys: &[FlowTuple]) {
        if let Err(e) = self.ctl.fast_mut().evict_slots(keys) {
            warn!("emptying the cache slots of flows the kernel ended: {e}");
        }
    }
}

/// The interval of the rounds: `max`, or a third of the shortest timeout a flow the fast path
/// carries can have (established TCP, replied UDP, ICMP, other protocols) where that is
/// shorter, so that a busy flow's kernel entry is refreshed at least twice before it could
/// expire; at least a second.
pub fn round_interval(timeouts_ns: &[u64; TIMEOUT_SLOTS], max: Duration) -> Duration {
    let shortest = [
        Timeout::TcpEstablished,
        Timeout::UdpReplied,
        Timeout::Icmp,
        Timeout::Other,
    ]
    .iter()
    .map(|t| timeouts_ns[*t as usize])
    .min()
    .unwrap_or(u64::MAX);
    Duration::from_nanos(shortest / 3).clamp(Duration::from_secs(1).min(max), max)
}

/// A round's middle, `interval` after the last: refreshes the kernel's timeouts of the flows
/// the fast path carried recently and asks the kernel about the others; returns the original
/// keys of the flows the kernel no longer has.
pub fn kernel_round(flows: &[RoundFlow], interval: Duration) -> BTreeSet<FlowTuple> {
    let now = monotonic_ns();
    let updates = round_updates(flows, now, interval);
    let answers = match kernel_conntrack::update(&updates) {
        Ok(a) => a,
        Err(e) => {
            warn!("keeping the kernel's flows: {e}");
            return BTreeSet::new();
        }
    };
    if let Some((f, errno)) = answers.first_refusal {
        warn!(
            "the kernel refused {} of {} flow updates, the first ({} {}:{} -> {}:{}): {}",
            answers.refused,
            updates.len(),
            f.proto,
            f.src,
            f.sport,
            f.dst,
            f.dport,
            std::io::Error::from_raw_os_error(errno)
        );
    }
    if answers.lost {
        warn!(
            "some of the kernel's answers were lost (receive buffer full); asking again next round"
        );
    }
    let refreshed = updates
        .iter()
        .filter(|(_, u)| matches!(u, Update::Refresh { .. }))
        .count();
    debug!(
        "kernel flows: {} of {} asked refreshed, {} ended",
        refreshed,
        updates.len(),
        answers.gone.len()
    );
    answers.gone.iter().map(|&i| flows[i].key).collect()
}

/// What a round asks of the kernel per fast-path flow, `now`: a flow seen within two
/// intervals has its timeout set to what its idle time leaves of it, the others are probed.
fn round_updates(flows: &[RoundFlow], now: u64, interval: Duration) -> Vec<(KernelFlow, Update)> {
    let recent = 2 * interval.as_nanos() as u64;
    flows
        .iter()
        .map(|f| {
            let idle = now.saturating_sub(f.last_seen);
            let update = if idle < recent {
                Update::Refresh {
                    secs: f.timeout.saturating_sub(idle) / 1_000_000_000,
                    assured: f.assured,
                }
            } else {
                Update::Probe
            };
            (kernel_flow(&f.key), update)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_come_often_enough_for_the_shortest_timeout() {
        let max = Duration::from_secs(5);
        let mut t = Timeout::ALL.map(|t| t.default_secs() * 1_000_000_000);
        assert_eq!(round_interval(&t, max), max);
        t[Timeout::UdpReplied as usize] = 9_000_000_000;
        assert_eq!(round_interval(&t, max), Duration::from_secs(3));
        t[Timeout::Icmp as usize] = 1_000_000_000;
        assert_eq!(round_interval(&t, max), Duration::from_secs(1));
    }

    /// A flow seen within two intervals gets what its timeout leaves of it since its last
    /// packet (whole seconds, assured as the fast path says), an older one only a probe.
    #[test]
    fn a_round_refreshes_the_recent_flows_and_probes_the_others() {
        const S: u64 = 1_000_000_000;
        let flow = |port: u16, last_seen: u64, assured: bool| RoundFlow {
            key: FlowTuple::new(
                u32::from_ne_bytes([10, 0, 0, 10]),
                u32::from_ne_bytes([192, 0, 2, 7]),
                port.to_be(),
                53u16.to_be(),
                17,
            ),
            last_seen,
            timeout: 120 * S,
            assured,
        };
        let now = 1_000 * S;
        let flows = [
            flow(5000, now - S / 2, true),
            flow(5001, now - 9 * S, false),
            flow(5002, now - 10 * S, true),
        ];
        let got = round_updates(&flows, now, Duration::from_secs(5));
        assert_eq!(
            got.iter().map(|(_, u)| *u).collect::<Vec<_>>(),
            [
                Update::Refresh {
                    secs: 119,
                    assured: true
                },
                Update::Refresh {
                    secs: 111,
                    assured: false
                },
                Update::Probe,
            ]
        );
        let f = got[0].0;
        assert_eq!(
            (f.proto, f.src.octets(), f.dst.octets(), f.sport, f.dport),
            (17, [10, 0, 0, 10], [192, 0, 2, 7], 5000, 53)
        );
    }
}
