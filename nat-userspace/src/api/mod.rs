//! The control API between natctl and natd: one JSON object per line over a Unix socket that
//! only root may use. The wire types and the client live in the nat-api crate (natctl builds
//! from it alone) and are re-exported here; natd's side is [`server`].
pub mod server;

pub use nat_api::{
    client,
    report::{
        Attached, ConntrackStats, FlowInfo, MappingCounters, MappingStatus, ReasonStat,
        SlowPathCounter, StatsReport, StatusReport,
    },
    spec::RuleSpec,
    wire::{DEFAULT_SOCKET, ErrorKind, ListedIngressRule, MAX_REQUEST, Reply, Request, Response},
};
