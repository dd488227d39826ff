//! The control API between natctl and natd: one JSON object per line over a Unix socket that
//! only root may use.
pub mod client;
pub mod server;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::ebpf::{Attached, MappingCounters};

/// Where natd listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/xdp-static-nat/natd.sock";
/// Longest request line natd reads; longer ones are refused.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    MappingAdd { public: Ipv4Addr, private: Ipv4Addr },
    MappingDel { public: Ipv4Addr },
    MappingList,
    Stats,
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
    Done { message: String },
    Mappings { mappings: Vec<MappingStatus> },
    Stats(StatsReport),
}

/// A mapping and what it translated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingStatus {
    pub public: Ipv4Addr,
    pub private: Ipv4Addr,
    #[serde(flatten)]
    pub counters: MappingCounters,
}

/// One verdict reason's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonStat {
    pub reason: String,
    pub action: String,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Changes applied since natd started.
    pub generation: u64,
    pub interfaces: Vec<Attached>,
    pub reasons: Vec<ReasonStat>,
    pub mappings: Vec<MappingStatus>,
}
