//! natctl's policy commands for the tests: firewall, egress and conntrack, their JSON parsed;
//! and waiting on natd's counters, which is how a test observes that a packet was dropped.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use nat_userspace::{
    api::{FlowInfo, ListedIngressRule, StatsReport},
    ebpf::MappingCounters,
    firewall::{EgressRule, IngressRule},
};

use super::{Natctl, observe::ARRIVAL};

const POLL: Duration = Duration::from_millis(20);

/// Packets counted under verdict reason `name` in `stats`.
pub fn reason(stats: &StatsReport, name: &str) -> anyhow::Result<u64> {
    stats
        .reasons
        .iter()
        .find(|r| r.reason == name)
        .map(|r| r.packets)
        .with_context(|| format!("natctl stats has no reason {name}"))
}

/// The egress policy as `natctl egress list --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    pub default_allow: bool,
    pub rules: Vec<EgressRule>,
    /// Ids of the rules held but not in force (CloudStack exceptions added under the other
    /// default).
    pub inactive: Vec<u64>,
}

/// The flow table as `natctl conntrack list --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowTable {
    pub capacity: u32,
    pub flows: Vec<FlowInfo>,
}

/// Which way a packet the policy drops travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// From the public side to a mapped public IP: the ingress firewall decides.
    In,
    /// From a guest: the egress policy decides.
    Out,
}

impl Natctl {
    /// Runs `send`, then waits until natd counted one more drop of a packet travelling `way`,
    /// both on the mapping of `public` and under the verdict reason (`inbound_denied` or
    /// `outbound_denied`); returns what `send` returned. The counter is the observation that
    /// the packet was dropped, so no test has to wait for it not to arrive.
    pub fn dropped<T>(
        &self,
        public: Ipv4Addr,
        way: Way,
        what: &str,
        send: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let (name, denied): (_, fn(&MappingCounters) -> u64) = match way {
            Way::In => ("inbound_denied", |c| c.inbound_denied),
            Way::Out => ("outbound_denied", |c| c.outbound_denied),
        };
        let of = |s: &StatsReport| -> anyhow::Result<u64> {
            s.mappings
                .iter()
                .find(|m| m.public == public)
                .map(|m| denied(&m.counters))
                .with_context(|| format!("no mapping of {public} in {:?}", s.mappings))
        };
        let before = self.stats()?;
        let (mapping0, reason0) = (of(&before)?, reason(&before, name)?);
        let out = send().with_context(|| format!("sending {what}"))?;
        self.wait_stats(&format!("{name} for {what}"), |s| {
            Ok(of(s)? > mapping0 && reason(s, name)? > reason0)
        })?;
        Ok(out)
    }

    /// Runs natctl with `args`; its stdout as JSON.
    fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = self.ok(args)?;
        serde_json::from_str(&out)
            .with_context(|| format!("parsing `natctl {}`: {out}", args.join(" ")))
    }

    /// Runs natctl with `args` that add a rule; returns the id it printed.
    fn add_rule(&self, args: &[&str]) -> anyhow::Result<u64> {
        let out = self.ok(args)?;
        out.trim()
            .parse()
            .with_context(|| format!("`natctl {}` printed {out:?}, not a rule id", args.join(" ")))
    }

    /// `natctl firewall add PUBLIC ARGS...`; returns the id it printed.
    pub fn firewall_add(&self, public: Ipv4Addr, args: &[&str]) -> anyhow::Result<u64> {
        let public = public.to_string();
        let args: Vec<&str> = ["firewall", "add", &public]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        self.add_rule(&args)
    }

    /// `natctl egress add ARGS...`; returns the id it printed.
    pub fn egress_add(&self, args: &[&str]) -> anyhow::Result<u64> {
        let args: Vec<&str> = ["egress", "add"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        self.add_rule(&args)
    }

    /// `natctl firewall list --json`, parsed: every rule, active or not.
    pub fn firewall_rules(&self) -> anyhow::Result<Vec<IngressRule>> {
        Ok(self
            .firewall_listing()?
            .into_iter()
            .map(|l| l.rule)
            .collect())
    }

    /// `natctl firewall list --json`, parsed, with whether each rule is active (its public IP
    /// mapped).
    pub fn firewall_listing(&self) -> anyhow::Result<Vec<ListedIngressRule>> {
        let v = self.json(&["firewall", "list", "--json"])?;
        serde_json::from_value(v.clone())
            .with_context(|| format!("`natctl firewall list --json`: {v}"))
    }

    /// Ids of the rules `natctl firewall list --json` shows as active, and as inactive.
    pub fn firewall_states(&self) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
        let (active, inactive): (Vec<_>, Vec<_>) =
            self.firewall_listing()?.into_iter().partition(|l| l.active);
        let ids = |v: Vec<ListedIngressRule>| v.into_iter().map(|l| l.rule.id).collect();
        Ok((ids(active), ids(inactive)))
    }

    /// `natctl egress list --json`, parsed.
    pub fn egress(&self) -> anyhow::Result<EgressPolicy> {
        let v = self.json(&["egress", "list", "--json"])?;
        let parse = || -> anyhow::Result<EgressPolicy> {
            Ok(EgressPolicy {
                default_allow: v["default_allow"]
                    .as_bool()
                    .context("no boolean default_allow")?,
                rules: serde_json::from_value(v["rules"].clone())?,
                inactive: serde_json::from_value(v["inactive"].clone())?,
            })
        };
        parse().with_context(|| format!("`natctl egress list --json`: {v}"))
    }

    /// `natctl conntrack list --json`, parsed.
    pub fn flows(&self) -> anyhow::Result<FlowTable> {
        let v = self.json(&["conntrack", "list", "--json"])?;
        let parse = || -> anyhow::Result<FlowTable> {
            Ok(FlowTable {
                capacity: serde_json::from_value(v["capacity"].clone())?,
                flows: serde_json::from_value(v["flows"].clone())?,
            })
        };
        parse().with_context(|| format!("`natctl conntrack list --json`: {v}"))
    }

    /// The counters of the mapping of `public`.
    pub fn counters(&self, public: Ipv4Addr) -> anyhow::Result<MappingCounters> {
        let list = self.mappings()?;
        list.iter()
            .find(|m| m.public == public)
            .map(|m| m.counters)
            .with_context(|| format!("no mapping of {public} in {list:?}"))
    }

    /// Polls `natctl stats --json` until `done` holds (returns those stats) or [`ARRIVAL`]
    /// passed (an error showing the last stats): waits for the counter that proves a packet
    /// was handled, a drop above all, instead of for a time.
    pub fn wait_stats(
        &self,
        what: &str,
        done: impl Fn(&StatsReport) -> anyhow::Result<bool>,
    ) -> anyhow::Result<StatsReport> {
        let deadline = Instant::now() + ARRIVAL;
        loop {
            let stats = self.stats()?;
            if done(&stats)? {
                return Ok(stats);
            }
            ensure!(
                Instant::now() < deadline,
                "{what}: not seen within {ARRIVAL:?}; last stats: {stats:?}"
            );
            std::thread::sleep(POLL);
        }
    }
}
