//! CloudStack virtual-router payloads: static NAT rules and firewall rules as the management
//! server writes them to its router, parsed ([`parse`]) and applied to a [`DesiredState`]
//! ([`apply`]) with the semantics of CloudStack's own router scripts. Pure: no I/O.
//!
//! Invariants: a payload is validated as a whole; the first problem refuses it with an error
//! naming the rule (1-based position in `rules`, and its `id` when it has one) and the field.
//! [`apply`] works on a state the caller cloned and discards on error, so a refused payload
//! changes nothing (see [`apply`]).
//!
//! [`DesiredState`]: crate::state::DesiredState
use std::fmt;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::{
    cidr::CidrError,
    firewall::RuleError,
    state::{LOCAL_RULE_IDS, StateError},
};

mod apply;
mod model;
mod summary;

pub use apply::apply;
pub use model::{FirewallRule, Payload, StaticNatRule};
pub use summary::{Change, RuleKind, Summary};

/// Where in a payload a problem is: a rule's 1-based position in `rules`, and its `id` if it
/// has a readable one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleRef {
    pub position: usize,
    pub id: Option<u64>,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rule #{}", self.position)?;
        if let Some(id) = self.id {
            write!(f, " (id {id})")?;
        }
        Ok(())
    }
}

/// A field of a rule, with the 0-based index of the element for list fields
/// (`source_cidr_list[1]` is the second CIDR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub index: Option<usize>,
}

impl Field {
    pub fn new(name: &str) -> Self {
        Field {
            name: name.to_string(),
            index: None,
        }
    }

    pub fn at(name: &str, index: usize) -> Self {
        Field {
            name: name.to_string(),
            index: Some(index),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(i) = self.index {
            write!(f, "[{i}]")?;
        }
        Ok(())
    }
}

/// What is wrong with one field (or, without a field, with a rule as a whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("missing")]
    Missing,
    /// The JSON value has the wrong type (serde's message).
    #[error("{0}")]
    Type(String),
    #[error("expected a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("{0:?} is not an IPv4 address")]
    NotIpv4(String),
    #[error("{0}")]
    Cidr(CidrError),
    #[error("port {0} is outside 1-65535")]
    Port(i64),
    #[error("expected [first, last], found {0} values")]
    PortRangeLength(usize),
    #[error("{0} is outside 0-255 (or -1 for any)")]
    Icmp(i64),
    #[error("{0}")]
    Rule(RuleError),
    #[error("{0:?} is not a traffic type (expected \"Ingress\" or \"Egress\")")]
    TrafficType(String),
    #[error("{protocol:?} is not supported in {kind} rules (expected {})", .kind.protocols())]
    UnsupportedProtocol { protocol: String, kind: RuleKind },
    #[error(
        "{0} is in the range natd gives its own rules (from {LOCAL_RULE_IDS}); CloudStack's ids \
         are below it"
    )]
    LocalId(u64),
    #[error("{0}")]
    State(StateError),
}

/// Why a payload is refused.
#[derive(Debug, thiserror::Error)]
pub enum CloudStackError {
    /// Not JSON; serde's message says where (line and column).
    #[error("malformed JSON: {0}")]
    Json(serde_json::Error),
    #[error("payload: expected a JSON object, found {found}")]
    NotAnObject { found: &'static str },
    #[error("type: missing (expected \"staticnatrules\" or \"firewallrules\")")]
    MissingType,
    #[error(
        "type: {found} is not a payload type natd applies \
         (expected \"staticnatrules\" or \"firewallrules\")"
    )]
    UnknownType { found: String },
    #[error("rules: expected an array of rules, found {found}")]
    RulesNotArray { found: &'static str },
    #[error("{rule}: {}{problem}", field_prefix(.field))]
    Rule {
        rule: RuleRef,
        field: Option<Field>,
        problem: Problem,
    },
}

fn field_prefix(field: &Option<Field>) -> String {
    field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default()
}

impl CloudStackError {
    fn rule(rule: RuleRef, field: Option<Field>, problem: Problem) -> Self {
        CloudStackError::Rule {
            rule,
            field,
            problem,
        }
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses a payload. Unknown fields are ignored and absent `rules` is an empty list (as the
/// router's scripts treat it); a missing or unknown `type`, malformed JSON, or a field of the
/// wrong JSON type is refused, naming the rule and field.
pub fn parse(text: &str) -> Result<Payload, CloudStackError> {
    let value: Value = serde_json::from_str(text).map_err(CloudStackError::Json)?;
    let Value::Object(mut top) = value else {
        return Err(CloudStackError::NotAnObject {
            found: json_kind(&value),
        });
    };
    let kind = match top.get("type") {
        None | Some(Value::Null) => return Err(CloudStackError::MissingType),
        Some(Value::String(s)) if s == "staticnatrules" || s == "firewallrules" => s.clone(),
        Some(other) => {
            return Err(CloudStackError::UnknownType {
                found: other.to_string(),
            });
        }
    };
    let rules = match top.remove("rules") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(CloudStackError::RulesNotArray {
                found: json_kind(&other),
            });
        }
    };
    Ok(if kind == "staticnatrules" {
        Payload::StaticNat {
            rules: rules_of(rules)?,
        }
    } else {
        Payload::Firewall {
            rules: rules_of(rules)?,
        }
    })
}

fn rules_of<T: DeserializeOwned>(values: Vec<Value>) -> Result<Vec<T>, CloudStackError> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| rule_of(i + 1, v))
        .collect()
}

/// One rule. When it does not deserialize, each of its fields is tried alone (every field is
/// optional) to find the one with the wrong type.
fn rule_of<T: DeserializeOwned>(position: usize, value: Value) -> Result<T, CloudStackError> {
    let rule = RuleRef {
        position,
        id: value.get("id").and_then(Value::as_u64),
    };
    let Some(map) = value.as_object() else {
        let problem = Problem::NotAnObject(json_kind(&value));
        return Err(CloudStackError::rule(rule, None, problem));
    };
    let whole = match T::deserialize(&value) {
        Ok(r) => return Ok(r),
        Err(e) => e,
    };
    for (name, v) in map {
        let alone = Value::Object(Map::from_iter([(name.clone(), v.clone())]));
        if let Err(e) = T::deserialize(&alone) {
            let problem = Problem::Type(e.to_string());
            return Err(CloudStackError::rule(rule, Some(Field::new(name)), problem));
        }
    }
    let problem = Problem::Type(whole.to_string());
    Err(CloudStackError::rule(rule, None, problem))
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod refusals;
#[cfg(test)]
mod tests;
