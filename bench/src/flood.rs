//! Section 3: a steady established flow to one mapping while a flood of distinct new flows
//! hits another mapped address, with iptables and with the project.
use std::time::Duration;

use anyhow::Context as _;

use crate::{
    report::{Section, Table},
    topo::{P2, Setup, Topo, V2},
    traffic::{self, Direction, Flows, Run, Steady},
    util, verdict,
};

/// Requests per second of the steady flow.
const STEADY_RATE: u64 = 2_000;

/// What the connection table looked like: its size, and the counters of what pressure did
/// to it (cumulative; a run's share is the difference of two readings, [`Table_::pressure`]).
#[derive(Debug, Default, Clone)]
struct Table_ {
    entries: u64,
    capacity: u64,
    /// iptables: conntrack drop, early_drop, insert_failed; natd: flows created, evicted.
    counters: [(&'static str, u64); 3],
}

impl Table_ {
    /// What happened to the table between `before` and `self`, as "N name, ..."
    fn pressure(&self, before: &Table_) -> String {
        self.counters
            .iter()
            .zip(&before.counters)
            .filter(|((name, _), _)| !name.is_empty())
            .map(|((name, now), (_, was))| format!("{} {name}", now.saturating_sub(*was)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn conntrack_state(topo: &Topo) -> anyhow::Result<Table_> {
    match topo.setup {
        Setup::Natd => {
            let s = topo.natd()?.stats()?;
            Ok(Table_ {
                entries: s.conntrack.entries,
                capacity: u64::from(s.conntrack.capacity),
                counters: [
                    ("created", s.conntrack.creates),
                    ("evicted (LRU)", s.conntrack.evictions),
                    ("", 0),
                ],
            })
        }
        _ => {
            let count = topo
                .router
                .exec("conntrack", &["-C"])?
                .trim()
                .parse()
                .unwrap_or(0);
            let max = topo
                .router
                .exec("sysctl", &["-n", "net.netfilter.nf_conntrack_max"])?
                .trim()
                .parse()
                .unwrap_or(0);
            let stats = topo.router.exec("conntrack", &["-S"]).unwrap_or_default();
            let sum = |key: &str| -> u64 {
                stats
                    .split_whitespace()
                    .filter_map(|w| w.strip_prefix(&format!("{key}=")))
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum()
            };
            Ok(Table_ {
                entries: count,
                capacity: max,
                counters: [
                    ("drop", sum("drop")),
                    ("early_drop", sum("early_drop")),
                    ("insert_failed", sum("insert_failed")),
                ],
            })
        }
    }
}

/// Packets to P2 the firewall dropped so far: natd's `inbound_denied` verdicts, or the DROP
/// rule of iptables' FIREWALL_P2 chain. Only steady-flow replies go to P2.
fn p2_denied(topo: &Topo) -> anyhow::Result<u64> {
    match topo.setup {
        Setup::Natd => Ok(topo
            .natd()?
            .stats()?
            .reasons
            .iter()
            .find(|r| r.reason == "inbound_denied")
            .map_or(0, |r| r.packets)),
        _ => {
            let out = topo.router.exec(
                "iptables",
                &["-t", "mangle", "-nvxL", &format!("FIREWALL_{P2}")],
            )?;
            Ok(out
                .lines()
                .find(|l| l.split_whitespace().nth(2) == Some("DROP"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0))
        }
    }
}

fn flush(topo: &Topo) -> anyhow::Result<()> {
    match topo.setup {
        Setup::Natd => topo.natd()?.natctl(&["conntrack", "flush"]).map(drop),
        _ => {
            // `conntrack -F` exits 1 on an empty table on some versions.
            let _ = topo.router.exec("conntrack", &["-F"]);
            Ok(())
        }
    }
}

pub fn section(quick: bool) -> anyhow::Result<Section> {
    let (repeats, secs, flows) = if quick {
        (1, 2.0, 300_000)
    } else {
        (3, 4.0, 1_000_000)
    };
    let setups = [Setup::Iptables, Setup::Natd];
    let topos: Vec<Topo> = setups
        .iter()
        .map(|s| Topo::new(*s))
        .collect::<anyhow::Result<_>>()?;
    let mut t = Table::new(&[
        "setup",
        "repeat",
        "flood frames sent",
        "distinct flows",
        "flood delivered",
        "steady requests",
        "reached client",
        "replies back",
        "lost",
        "replies dropped by P2's firewall",
        "connection table after",
        "pressure during the run",
    ]);
    let mut lost_by = vec![Vec::new(); setups.len()];
    let mut delivered_by = vec![Vec::new(); setups.len()];
    for r in 0..repeats {
        for (i, topo) in topos.iter().enumerate() {
            util::check_interrupted()?;
            eprintln!("bench: flood: {} repeat {}", topo.setup.short(), r + 1);
            flush(topo)?;
            let denied0 = p2_denied(topo)?;
            let ct0 = conntrack_state(topo)?;
            let (steady, flood): (Steady, Run) =
                traffic::steady_during(topo, V2, STEADY_RATE, Duration::from_millis(500), || {
                    traffic::timed_until(
                        topo,
                        Flows::Distinct(flows),
                        Direction::Inbound,
                        secs,
                        None,
                        false,
                        u64::from(flows),
                    )
                })
                .with_context(|| format!("flood against {}", topo.setup.name()))?;
            let ct = conntrack_state(topo)?;
            let denied = p2_denied(topo)? - denied0;
            lost_by[i].push(steady.lost() as f64);
            delivered_by[i].push(flood.delivered as f64 / (flood.generated as f64).max(1.0));
            t.row(vec![
                topo.setup.name().into(),
                (r + 1).to_string(),
                flood.generated.to_string(),
                flood.generated.min(u64::from(flows)).to_string(),
                flood.delivered.to_string(),
                steady.sent.to_string(),
                steady.at_client.to_string(),
                steady.replies.to_string(),
                steady.lost().to_string(),
                denied.to_string(),
                format!("{} of {}", ct.entries, ct.capacity),
                ct.pressure(&ct0),
            ]);
        }
    }
    let mut summary = Vec::new();
    for (i, s) in setups.iter().enumerate() {
        summary.push(format!(
            "- {}: steady-flow requests lost per run: {}; share of the flood delivered per \
             run: {}.",
            s.name(),
            verdict::per_run(&lost_by[i]),
            delivered_by[i]
                .iter()
                .map(|f| format!("{f:.3}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let notes = summary.join("\n") + "\n";
    Ok(Section {
        title: "3. Under a flood of new flows".into(),
        intro: format!(
            "The generator sends flat out to P1 (UDP, ports 5000–5015, allowed by P1's rule), \
             each frame the next of {flows} distinct (source port, destination port) pairs, \
             until it has sent {flows} frames (that many distinct new flows) or {secs} s have \
             passed, whichever comes first. Meanwhile the guest behind P2 runs a steady request/response flow to \
             the client ({STEADY_RATE} requests/s from V2:7000, echoed by the client): the \
             guest opened it, so the replies to P2 pass only as an established flow (P2 has no \
             ingress rule). It starts 0.5 s before the flood and ends 0.5 s after. The \
             connection table is flushed before each run. iptables: the kernel's conntrack \
             of the router namespace (`conntrack -C` against `nf_conntrack_max`, which bounds \
             each namespace's table; `conntrack -S` counters summed over CPUs). Project: \
             `natctl stats` (entries as of natd's last collection). The pressure columns are what \
             happened during that run: the difference of the counters before and after it."
        ),
        tables: vec![(String::new(), t)],
        notes,
        summary,
        charts: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::Table_;

    #[test]
    fn pressure_is_the_runs_difference() {
        let at = |c, e| Table_ {
            entries: 0,
            capacity: 0,
            counters: [("created", c), ("evicted (LRU)", e), ("", 0)],
        };
        assert_eq!(
            at(978_947, 192_896).pressure(&at(630_786, 106_752)),
            "348161 created, 86144 evicted (LRU)"
        );
    }
}
