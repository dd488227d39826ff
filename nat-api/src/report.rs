//! What natd reports (`natctl status`, `stats`, `mapping list`, `conntrack list`): its
//! interfaces, counters and flows, as they travel on the control socket.
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// XDP attach mode, as the operator names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// In the driver (default): the fast path proper.
    Native,
    /// In the kernel's generic hook, for drivers without native XDP: much slower.
    Generic,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
        })
    }
}

/// Role of an interface, as the operator names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Public,
    Guest,
}

/// An interface the program is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub name: String,
    pub ifindex: u32,
    pub role: Role,
    pub mode: Mode,
    /// The attachment was taken over from an earlier natd (its link updated in place).
    #[serde(default)]
    pub adopted: bool,
    /// How often natd attached again after the interface was deleted and created again.
    #[serde(default)]
    pub reattached: u64,
}

/// Frames and bytes a mapping translated, per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingCounters {
    pub inbound_packets: u64,
    pub inbound_bytes: u64,
    /// Dropped by the public IP's ingress firewall.
    pub inbound_denied: u64,
    pub outbound_packets: u64,
    pub outbound_bytes: u64,
    /// Dropped by the egress policy.
    pub outbound_denied: u64,
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
    /// Flows natd forgot because the kernel ended them (`--policy kernel`).
    #[serde(default)]
    pub ended: u64,
    /// Entries the kernel evicted to make room (LRU): created - collected - flushed - ended
    /// - entries.
    pub evictions: u64,
}

/// One named counter of natd's nftables table: what the kernel path translated statelessly
/// (`udplite_stateless`) or dropped because the kernel cannot translate it (`untranslatable`)
/// or because it would leave untranslated (`untranslated`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlowPathCounter {
    pub name: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Changes applied since natd started.
    pub generation: u64,
    pub interfaces: Vec<Attached>,
    pub reasons: Vec<ReasonStat>,
    pub conntrack: ConntrackStats,
    pub mappings: Vec<MappingStatus>,
    /// The counters of natd's nftables table; empty without the table (`--slow-path none`).
    #[serde(default)]
    pub slow_path: Vec<SlowPathCounter>,
}
