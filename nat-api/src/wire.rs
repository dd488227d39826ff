//! The control API between natctl and natd: one JSON object per line over a Unix socket that
//! only root may use. A request gets one [`Response`]: a [`Reply`], or an error that says
//! whether natd refused the request or failed to carry it out ([`ErrorKind`]).
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{
    report::{FlowInfo, MappingStatus, StatsReport, StatusReport},
    rule::{EgressRule, IngressRule},
    spec::RuleSpec,
};

/// Where natd listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/xdp-static-nat/natd.sock";
/// Longest request line natd reads; longer ones are refused.
/// (A CloudStack payload of 100,000 static NAT rules is about 10 MB.)
pub const MAX_REQUEST: usize = 64 * 1024 * 1024;

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
    /// Nothing changed. `kind` is absent in the answers of a natd older than it: refused.
    Error {
        message: String,
        #[serde(default)]
        kind: ErrorKind,
    },
}

impl Response {
    /// natd refused the request: bad input, or a conflict with what it holds.
    pub fn refused(message: String) -> Self {
        Response::Error {
            message,
            kind: ErrorKind::Refused,
        }
    }

    /// natd could not carry out a valid request (the fast path, the slow path or persistence
    /// failed, or it could not read its maps).
    pub fn failed(message: String) -> Self {
        Response::Error {
            message,
            kind: ErrorKind::Failed,
        }
    }
}

/// Why a request was not carried out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Bad input or a conflict (an address already mapped, a rule that does not exist...):
    /// the same request will be refused again.
    #[default]
    Refused,
    /// natd could not apply a valid request, and changed nothing: it may succeed later.
    Failed,
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
        /// Rules held but not in force: CloudStack exceptions added under the other default
        /// (the router's rule then does what the default does).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        inactive: Vec<u64>,
    },
    Flows {
        capacity: u32,
        flows: Vec<FlowInfo>,
    },
    Stats(StatsReport),
    Status(StatusReport),
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

    /// An error says whether it is a refusal or a failure; an older natd's error, which does
    /// not say, is a refusal (what it was to the older natctl, which exited 1 on both), and an
    /// older natctl reads a new natd's error by its message alone.
    #[test]
    fn errors_say_refused_or_failed_and_old_errors_are_refusals() {
        let failed = Response::failed("mapping add failed, nothing changed: x".to_string());
        let text = serde_json::to_string(&failed).unwrap();
        assert_eq!(
            text,
            r#"{"error":{"message":"mapping add failed, nothing changed: x","kind":"failed"}}"#
        );
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), failed);
        let old: Response = serde_json::from_str(r#"{"error":{"message":"no"}}"#).unwrap();
        assert_eq!(old, Response::refused("no".to_string()));

        /// The Response of a natctl that predates `kind`.
        #[derive(Debug, PartialEq, Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum OldResponse {
            Ok(serde_json::Value),
            Error { message: String },
        }
        assert_eq!(
            serde_json::from_str::<OldResponse>(&text).unwrap(),
            OldResponse::Error {
                message: "mapping add failed, nothing changed: x".to_string()
            }
        );
    }
}
