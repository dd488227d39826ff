//! natd's control API, on its own so that clients (natctl, the fuzz targets) build without the
//! eBPF toolchain: the wire types ([`wire`], [`report`]), the rule and mapping specs a client
//! states ([`spec`], [`rule`]), IPv4 prefixes ([`cidr`]) and the blocking client ([`client`]).
//! natd (nat-userspace) re-exports each at its old path.
pub mod cidr;
pub mod client;
pub mod report;
pub mod rule;
pub mod spec;
pub mod wire;

pub use cidr::{Cidr, CidrError};
pub use report::{
    Attached, ConntrackStats, FlowInfo, MappingCounters, MappingStatus, Mode, ReasonStat, Role,
    SlowPathCounter, StatsReport, StatusReport,
};
pub use rule::{EgressRule, IngressRule, PortRange, Proto, RuleError, Service};
pub use spec::{Mapping, RuleSpec};
pub use wire::{
    DEFAULT_SOCKET, ErrorKind, ListedIngressRule, MAX_REQUEST, Reply, Request, Response,
};
