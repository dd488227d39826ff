//! natd's TOML config file: the state to install at start, and load-time settings.
//!
//! ```toml
//! [[mapping]]
//! public = "203.0.113.10"
//! private = "10.0.0.10"
//!
//! [[rule]]                      # ingress rule of a public IP
//! public = "203.0.113.10"
//! proto = "tcp"                 # tcp | udp | icmp
//! ports = "22"                  # "N" or "N-M"; absent = every port
//! cidrs = ["198.51.100.0/24"]   # sources; absent = 0.0.0.0/0
//!
//! [egress]
//! default = "allow"             # allow | deny
//! [[egress.rule]]
//! proto = "tcp"                 # tcp | udp | icmp | all
//! ports = "25"
//! cidrs = ["0.0.0.0/0"]         # destinations
//! sources = ["10.1.1.0/24"]     # the guests it applies to; absent = every guest
//!
//! [limits]
//! mappings = 65536              # counter slots and translation-map capacity
//!
//! [conntrack]
//! size = 262144                 # assured flows (unset: by memory, `default_flows`)
//! timeouts = { tcp_established = 432000, udp_unreplied = 30 }
//! ```
//!
//! Timeout keys are netfilter's timers (`nat_common::conntrack::Timeout`): `tcp_syn_sent`,
//! `tcp_syn_recv`, `tcp_established`, `tcp_fin_wait`, `tcp_close_wait`, `tcp_last_ack`,
//! `tcp_time_wait`, `tcp_close`, `tcp_syn_sent2`, `tcp_retrans`, `tcp_unack`, `udp_unreplied`,
//! `udp_replied` (netfilter's `udp_timeout_stream`), `icmp`, `other`.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use nat_common::{DEFAULT_CONNTRACK_SIZE, TIMEOUT_SLOTS, conntrack::Timeout};
use serde::Deserialize;

use crate::{
    api::RuleSpec,
    cidr::Cidr,
    firewall::{PortRange, Proto},
    state::{DesiredState, Mapping, StateError},
};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "mapping")]
    pub mappings: Vec<Mapping>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<ConfigRule>,
    #[serde(default)]
    pub egress: EgressConfig,
    #[serde(default)]
    pub conntrack: ConntrackConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
}

/// Capacities chosen at load.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most mappings (default `nat_common::DEFAULT_MAPPINGS`, at most
    /// `nat_common::MAX_MAPPINGS`): sizes the per-CPU counter array, so it costs
    /// 48 bytes per mapping per CPU.
    #[serde(default)]
    pub mappings: Option<u32>,
}

/// A rule as written in the file (`public` only for ingress rules).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigRule {
    #[serde(default)]
    pub public: Option<std::net::Ipv4Addr>,
    pub proto: Proto,
    #[serde(default)]
    pub ports: Option<String>,
    #[serde(default)]
    pub icmp_type: Option<i64>,
    #[serde(default)]
    pub icmp_code: Option<i64>,
    #[serde(default)]
    pub cidrs: Vec<Cidr>,
    /// Egress rules only: the guests the rule applies to.
    #[serde(default)]
    pub sources: Vec<Cidr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressConfig {
    #[serde(default)]
    pub default: Option<Policy>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<ConfigRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Allow,
    Deny,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConntrackConfig {
    /// Entries in the connection table.
    #[serde(default)]
    pub size: Option<u32>,
    /// Idle timeouts in seconds by timer name (see `nat_common::conntrack::Timeout::name`).
    #[serde(default)]
    pub timeouts: BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("config file {path}: {what}: {source}")]
    Invalid {
        path: PathBuf,
        what: String,
        #[source]
        source: StateError,
    },
    #[error("config file {path}: {what}")]
    Setting { path: PathBuf, what: String },
}

impl ConfigRule {
    fn spec(&self) -> Result<RuleSpec, StateError> {
        let ports = self
            .ports
            .as_deref()
            .map(str::parse::<PortRange>)
            .transpose()?;
        Ok(RuleSpec {
            proto: self.proto,
            ports,
            icmp_type: self.icmp_type,
            icmp_code: self.icmp_code,
            cidrs: self.cidrs.clone(),
            sources: self.sources.clone(),
        })
    }
}

impl Config {
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// The desired state this config describes; refuses the first entry (1-based) that does
    /// not fit, and so the whole file.
    pub fn desired_state(&self, path: &Path) -> Result<DesiredState, ConfigError> {
        let invalid = |what: String| {
            let path = path.to_path_buf();
            move |source| ConfigError::Invalid { path, what, source }
        };
        let mut s = DesiredState::default();
        for (i, m) in self.mappings.iter().enumerate() {
            let what = format!("mapping #{} ({} -> {})", i + 1, m.public, m.private);
            s.add_mapping(*m).map_err(invalid(what))?;
        }
        for (i, r) in self.rules.iter().enumerate() {
            let what = format!("rule #{}", i + 1);
            let public = r.public.ok_or_else(|| ConfigError::Setting {
                path: path.into(),
                what: format!("{what}: an ingress rule needs `public`"),
            })?;
            let spec = r.spec().map_err(invalid(what.clone()))?;
            let service = spec
                .ingress_service()
                .map_err(|e| invalid(what.clone())(e.into()))?;
            s.add_ingress(None, public, service, spec.cidrs)
                .map_err(invalid(what))?;
        }
        if let Some(p) = self.egress.default {
            s.set_egress_default_allow(p == Policy::Allow);
        }
        for (i, r) in self.egress.rules.iter().enumerate() {
            let what = format!("egress rule #{}", i + 1);
            if r.public.is_some() {
                return Err(ConfigError::Setting {
                    path: path.into(),
                    what: format!("{what}: egress rules have no `public`"),
                });
            }
            let spec = r.spec().map_err(invalid(what.clone()))?;
            let service = spec
                .service()
                .map_err(|e| invalid(what.clone())(e.into()))?;
            s.add_egress_from(None, service, spec.cidrs, spec.sources)
                .map_err(invalid(what))?;
        }
        Ok(s)
    }

    /// The mapping capacity (`[limits] mappings`).
    pub fn mappings(&self, path: &Path) -> Result<u32, ConfigError> {
        let n = self.limits.mappings.unwrap_or(nat_common::DEFAULT_MAPPINGS);
        if !(2..=nat_common::MAX_MAPPINGS).contains(&n) {
            return Err(ConfigError::Setting {
                path: path.into(),
                what: format!(
                    "limits.mappings must be between 2 and {} (it is {n})",
                    nat_common::MAX_MAPPINGS
                ),
            });
        }
        Ok(n)
    }

    /// The flow table's size and the idle timeouts (ns, by timer slot), netfilter's timeouts
    /// where unset; without `[conntrack] size`, the size for a machine of `mem_total` bytes
    /// ([`default_flows`]).
    pub fn conntrack(
        &self,
        path: &Path,
        mem_total: Option<u64>,
    ) -> Result<(u32, [u64; TIMEOUT_SLOTS]), ConfigError> {
        let setting = |what: String| ConfigError::Setting {
            path: path.into(),
            what,
        };
        let size = self
            .conntrack
            .size
            .unwrap_or_else(|| default_flows(mem_total));
        if size == 0 {
            return Err(setting("conntrack.size must be at least 1".into()));
        }
        let mut t = default_timeouts();
        for (name, secs) in &self.conntrack.timeouts {
            let timer = Timeout::ALL
                .iter()
                .find(|t| t.name() == name)
                .ok_or_else(|| {
                    let known: Vec<_> = Timeout::ALL.iter().map(|t| t.name()).collect();
                    setting(format!(
                        "conntrack.timeouts: unknown timeout {name:?} (known: {})",
                        known.join(", ")
                    ))
                })?;
            if *secs == 0 {
                return Err(setting(format!(
                    "conntrack.timeouts.{name} must be at least 1 second"
                )));
            }
            t[*timer as usize] = secs.saturating_mul(1_000_000_000);
        }
        Ok((size, t))
    }
}

/// Fewest flows [`default_flows`] gives a small machine.
pub const MIN_DEFAULT_FLOWS: u32 = 4096;
/// The kernel's header of each preallocated LRU hash element (`struct htab_elem` and its LRU
/// node), rounded up: an estimate, for [`flow_table_bytes`].
const HTAB_ELEM_OVERHEAD: u64 = 64;

/// About what the flow tables of `flows` flows take of the kernel's memory: `FLOWS` and
/// `PENDING` (preallocated, key, value and the kernel's element header) and `SLOTS`.
pub fn flow_table_bytes(flows: u32) -> u64 {
    use nat_common::{MAP_FLOWS, MAP_PENDING, MAP_SLOTS, maps};
    let sizes = crate::ebpf::Sizes {
        flows,
        mappings: nat_common::DEFAULT_MAPPINGS,
    };
    let count = |m| u64::from(sizes.of(m).unwrap_or(0));
    let elem = u64::from(maps::FLOWS.key_size + maps::FLOWS.value_size) + HTAB_ELEM_OVERHEAD;
    (count(MAP_FLOWS) + count(MAP_PENDING)) * elem
        + count(MAP_SLOTS) * u64::from(maps::SLOTS.value_size)
}

/// `[conntrack] size` when the config does not set it: [`DEFAULT_CONNTRACK_SIZE`] flows, halved
/// (down to [`MIN_DEFAULT_FLOWS`]) while their tables would take more than a sixteenth of the
/// machine's `mem_total` bytes (a router of 1 GiB gets 65,536 flows), as netfilter sizes its
/// own table by the machine's memory (`nf_conntrack_max`: 262,144 above 4 GiB, 65,536 above
/// 1 GiB, less below); the default itself when the memory is unknown.
pub fn default_flows(mem_total: Option<u64>) -> u32 {
    let Some(mem) = mem_total else {
        return DEFAULT_CONNTRACK_SIZE;
    };
    let mut flows = DEFAULT_CONNTRACK_SIZE;
    while flows > MIN_DEFAULT_FLOWS && flow_table_bytes(flows) > mem / 16 {
        flows /= 2;
    }
    flows
}

/// netfilter's default idle timeouts, in ns, by timer slot.
pub fn default_timeouts() -> [u64; TIMEOUT_SLOTS] {
    Timeout::ALL.map(|t| t.default_secs() * 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_size_the_flow_table_follows_the_machines_memory() {
        const GIB: u64 = 1 << 30;
        // Unknown memory, or plenty: the default.
        assert_eq!(default_flows(None), DEFAULT_CONNTRACK_SIZE);
        assert_eq!(default_flows(Some(24 * GIB)), DEFAULT_CONNTRACK_SIZE);
        assert_eq!(default_flows(Some(4 * GIB)), DEFAULT_CONNTRACK_SIZE);
        // A router of 1 GiB, and smaller routers less.
        assert_eq!(default_flows(Some(GIB)), 65_536);
        assert_eq!(default_flows(Some(GIB / 2)), 32_768);
        assert_eq!(default_flows(Some(GIB / 4)), 16_384);
        assert_eq!(default_flows(Some(1 << 20)), MIN_DEFAULT_FLOWS);
        for mem in [GIB / 4, GIB / 2, GIB, 2 * GIB, 4 * GIB] {
            let f = default_flows(Some(mem));
            assert!(flow_table_bytes(f) <= mem / 16, "{mem}: {f}");
            assert!(f == DEFAULT_CONNTRACK_SIZE || flow_table_bytes(2 * f) > mem / 16);
        }
        // A size the file sets is kept whatever the memory.
        let c = Config::parse(p(), "[conntrack]\nsize = 262144\n").unwrap();
        assert_eq!(c.conntrack(p(), Some(GIB / 4)).unwrap().0, 262_144);
        let c = Config::parse(p(), "").unwrap();
        assert_eq!(c.conntrack(p(), Some(GIB / 4)).unwrap().0, 16_384);
    }

    fn p() -> &'static Path {
        Path::new("natd.toml")
    }

    #[test]
    fn parses_and_validates_mappings() {
        let c = Config::parse(
            p(),
            "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n",
        )
        .unwrap();
        assert_eq!(c.desired_state(p()).unwrap().len(), 1);

        let dup = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n\
                   [[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.11\"\n";
        let e = Config::parse(p(), dup)
            .unwrap()
            .desired_state(p())
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("mapping #2 (203.0.113.10 -> 10.0.0.11)"),
            "{e}"
        );

        let e = Config::parse(
            p(),
            "[[mapping]]\npublic = \"203.0.113.300\"\nprivate = \"10.0.0.10\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("natd.toml"), "{e}");
        assert!(
            Config::parse(
                p(),
                "[[mapping]]\npublic = \"203.0.113.1\"\nprivate = \"10.0.0.1\"\nport = 1\n"
            )
            .is_err()
        );
        assert!(Config::parse(p(), "").unwrap().mappings.is_empty());
    }

    #[test]
    fn rules_egress_and_conntrack() {
        let text = r#"
            [[mapping]]
            public = "203.0.113.10"
            private = "10.0.0.10"
            [[rule]]
            public = "203.0.113.10"
            proto = "tcp"
            ports = "5000-5100"
            cidrs = ["198.51.100.0/24"]
            [[rule]]
            public = "203.0.113.10"
            proto = "icmp"
            icmp_type = -1
            [egress]
            default = "deny"
            [[egress.rule]]
            proto = "all"
            cidrs = ["192.0.2.0/24"]
            sources = ["10.0.0.10/32"]
            [conntrack]
            size = 1024
            timeouts = { udp_unreplied = 5, tcp_unack = 60 }
        "#;
        let c = Config::parse(p(), text).unwrap();
        let s = c.desired_state(p()).unwrap();
        assert_eq!(s.ingress_rules().count(), 2);
        assert!(!s.egress_default_allow());
        let sources: Vec<_> = s.egress_rules().map(|r| r.rule.sources.clone()).collect();
        assert_eq!(sources, [vec!["10.0.0.10/32".parse::<Cidr>().unwrap()]]);
        let bad = text.replace(
            "proto = \"icmp\"",
            "proto = \"icmp\"\n sources = [\"10.0.0.0/8\"]",
        );
        let e = Config::parse(p(), &bad)
            .unwrap()
            .desired_state(p())
            .unwrap_err();
        assert!(
            e.to_string().contains("rule #2") && e.to_string().contains("source CIDRs"),
            "{e}"
        );
        let (size, t) = c.conntrack(p(), Some(1 << 28)).unwrap();
        assert_eq!(size, 1024);
        assert_eq!(t[Timeout::UdpUnreplied as usize], 5_000_000_000);
        assert_eq!(t[Timeout::TcpEstablished as usize], 432_000_000_000_000);
        assert_eq!(t[Timeout::TcpUnack as usize], 60_000_000_000);
        assert_eq!(t[Timeout::TcpRetrans as usize], 300_000_000_000);

        let bad = text.replace("5000-5100", "5100-5000");
        let e = Config::parse(p(), &bad)
            .unwrap()
            .desired_state(p())
            .unwrap_err();
        assert!(
            e.to_string().contains("rule #1") && e.to_string().contains("5100-5000"),
            "{e}"
        );
        let bad = text.replace("udp_unreplied", "udp_forever");
        assert!(
            Config::parse(p(), &bad)
                .unwrap()
                .conntrack(p(), None)
                .unwrap_err()
                .to_string()
                .contains("udp_forever")
        );
        let bad = text.replace(
            "public = \"203.0.113.10\"\n            proto = \"icmp\"",
            "public = \"224.0.0.99\"\n            proto = \"icmp\"",
        );
        let e = Config::parse(p(), &bad)
            .unwrap()
            .desired_state(p())
            .unwrap_err();
        assert!(
            e.to_string().contains("rule #2") && e.to_string().contains("224.0.0.99"),
            "{e}"
        );
        // A rule of an IP without a mapping is kept, inactive until the IP is mapped.
        let unmapped = text.replace(
            "public = \"203.0.113.10\"\n            proto = \"icmp\"",
            "public = \"203.0.113.99\"\n            proto = \"icmp\"",
        );
        let s = Config::parse(p(), &unmapped)
            .unwrap()
            .desired_state(p())
            .unwrap();
        assert_eq!(s.ingress_rules().count(), 2);
        assert_eq!(s.active_ingress_rules().count(), 1);
    }
}
