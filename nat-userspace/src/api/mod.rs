//! The control API between natctl and natd: one JSON object per line over a Unix socket that
//! only root may use.
pub mod client;
pub mod server;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{
    cidr::Cidr,
    ebpf::{Attached, MappingCounters},
    firewall::{EgressRule, IngressRule, PortRange, Proto},
};

/// Where natd listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/xdp-static-nat/natd.sock";
/// Longest request line natd reads; longer ones are refused.
/// (A CloudStack payload of 100,000 static NAT rules is about 10 MB.)
pub const MAX_REQUEST: usize = 64 * 1024 * 1024;

/// A rule's match as a client states it; natd validates it (CloudStack's -1 = any for ICMP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub proto: Proto,
    #[serde(default)]
    pub ports: Option<PortRange>,
    #[serde(default)]
    pub icmp_type: Option<i64>,
    #[serde(default)]
    pub icmp_code: Option<i64>,
    /// Source CIDRs (ingress) or destination CIDRs (egress); empty = any.
    #[serde(default)]
    pub cidrs: Vec<Cidr>,
    /// Egress only: the guests the rule applies to; empty = every guest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<Cidr>,
}

/// An ingress rule as natctl lists it: in force (`active`) while its public IP is mapped,
/// kept but inactive while it is not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedIngressRule {
    #[serde(flatten)]
    pub rule: IngressRule,
    pub active: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    MappingAdd {
        public: Ipv4Addr,
        private: Ipv4Addr,
    },
    MappingDel {
        public: Ipv4Addr,
    },
    MappingList,
    FirewallAdd {
        public: Ipv4Addr,
        #[serde(flatten)]
        rule: RuleSpec,
    },
    FirewallDel {
        id: u64,
    },
    FirewallList,
    EgressPolicy {
        allow: bool,
    },
    EgressAdd {
        #[serde(flatten)]
        rule: RuleSpec,
    },
    EgressDel {
        id: u64,
    },
    EgressList,
    ConntrackList,
    /// Ends tracked flows: all of them, or those of one public IP (mapped or not any more).
    ConntrackFlush {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        public: Option<Ipv4Addr>,
    },
    Stats,
    Status,
    /// One CloudStack payload file (`staticnatrules` or `firewallrules` JSON), all or nothing.
    CloudstackApply {
        name: String,
        payload: String,
    },
}

impl Request {
    /// The request for the log: in full, but a payload only by name and size.
    pub fn summary(&self) -> String {
        match self {
            Request::CloudstackApply { name, payload } => {
                format!("cloudstack_apply {name} ({} bytes)", payload.len())
            }
            other => serde_json::to_string(other).unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(Reply),
    Error { message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Done {
        message: String,
    },
    RuleAdded {
        id: u64,
        message: String,
    },
    Mappings {
        mappings: Vec<MappingStatus>,
    },
    Firewall {
        rules: Vec<ListedIngressRule>,
    },
    Egress {
        default_allow: bool,
        rules: Vec<EgressRule>,
    },
    Flows {
        capacity: u32,
        flows: Vec<FlowInfo>,
    },
    Stats(StatsReport),
    Status(StatusReport),
}

/// natd at a glance (`natctl status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub interfaces: Vec<Attached>,
    pub mappings: usize,
    /// Every ingress rule; of them, `inactive_ingress_rules` belong to unmapped public IPs.
    pub ingress_rules: usize,
    #[serde(default)]
    pub inactive_ingress_rules: usize,
    pub egress_rules: usize,
    pub egress_default_allow: bool,
    /// Flows in the connection table now (what `natctl conntrack list` lists), and its size.
    pub flows: u64,
    pub flow_capacity: u32,
    pub generation: u64,
    /// Seconds since the epoch of the last applied change (0: none since start).
    pub applied_at: u64,
    pub state_file: String,
    pub bpffs: Option<String>,
}

/// A mapping and what it translated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingStatus {
    pub public: Ipv4Addr,
    pub private: Ipv4Addr,
    #[serde(flatten)]
    pub counters: MappingCounters,
}

/// One tracked flow, in the guest's view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowInfo {
    pub proto: u8,
    pub guest: Ipv4Addr,
    pub guest_port: u16,
    pub remote: Ipv4Addr,
    pub remote_port: u16,
    pub state: String,
    /// "public" (opened from the internet) or "guest".
    pub origin: String,
    pub idle_secs: u64,
    pub expires_in_secs: u64,
}

/// One verdict reason's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonStat {
    pub reason: String,
    pub action: String,
    pub packets: u64,
    pub bytes: u64,
}

/// Connection table figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackStats {
    pub entries: u64,
    pub capacity: u32,
    pub hits: u64,
    pub misses: u64,
    pub creates: u64,
    /// Entries found expired by the program.
    pub expired_seen: u64,
    /// Expired entries natd collected.
    pub collected: u64,
    /// Entries natd removed on request or with their mapping.
    pub flushed: u64,
    /// Entries the kernel evicted to make room (LRU): created - collected - flushed - entries.
    pub evictions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Changes applied since natd started.
    pub generation: u64,
    pub interfaces: Vec<Attached>,
    pub reasons: Vec<ReasonStat>,
    pub conntrack: ConntrackStats,
    pub mappings: Vec<MappingStatus>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `conntrack flush` without a public IP is the request an older natctl sends.
    #[test]
    fn conntrack_flush_names_a_public_ip_or_none() {
        let all: Request = serde_json::from_str(r#"{"command":"conntrack_flush"}"#).unwrap();
        assert_eq!(all, Request::ConntrackFlush { public: None });
        assert_eq!(
            serde_json::to_string(&all).unwrap(),
            r#"{"command":"conntrack_flush"}"#
        );
        let one = Request::ConntrackFlush {
            public: Some(Ipv4Addr::new(203, 0, 113, 10)),
        };
        let text = serde_json::to_string(&one).unwrap();
        assert_eq!(
            text,
            r#"{"command":"conntrack_flush","public":"203.0.113.10"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), one);
        assert!(
            serde_json::from_str::<Request>(r#"{"command":"conntrack_flush","public":"P"}"#)
                .is_err()
        );
    }
}
