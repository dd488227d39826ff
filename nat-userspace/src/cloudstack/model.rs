//! The JSON shapes CloudStack's management server writes to its virtual router for static NAT
//! and firewall rules (`StaticNatRule` / `FirewallRule` in
//! `com.cloud.agent.resource.virtualnetwork.model`), serialised by Gson with
//! lower_case_with_underscores names and null fields left out.
//!
//! Every field is optional here and unknown fields are ignored: CloudStack adds fields across
//! versions, and which fields a rule needs depends on the rule ([`apply`](fn@super::apply)
//! decides). Addresses, CIDRs and protocols stay strings so that a bad value is reported with
//! the value itself, not as a JSON type error. Fields natd has no use for (`protocol` and
//! `source_port_range` of a static NAT rule, `src_vlan_tag`, `already_added`, `purpose`,
//! `guest_cidr`, ...) are not modelled, so they can never make a payload fail.
use serde::{Deserialize, Serialize};

/// One entry of a `staticnatrules` payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StaticNatRule {
    /// `true`: disable the static NAT of `source_ip_address`. Absent = `false` (Gson always
    /// writes this Java `boolean`, so only a hand-written payload leaves it out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoke: Option<bool>,
    /// The public IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ip_address: Option<String>,
    /// The guest VM's IP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_ip_address: Option<String>,
}

/// One entry of a `firewallrules` payload (ingress rules of public IPs and egress rules of the
/// guest network share this shape).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FirewallRule {
    /// CloudStack's rule id, unique across ingress and egress rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// `"Ingress"` or `"Egress"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_type: Option<String>,
    /// `true`: delete the rule with this id. Absent = `false`, as for [`StaticNatRule::revoke`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked: Option<bool>,
    /// Ingress: the public IP the rule opens. Egress: `""`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_ip: Option<String>,
    /// `tcp`, `udp`, `icmp` or `all` (egress: every protocol; ingress: allows nothing, as the
    /// router's iptables refuses the rule it builds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// `[first, last]` destination ports (tcp/udp); absent = every port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_port_range: Option<Vec<i64>>,
    /// ICMP type and code; `-1` or absent = any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<i64>,
    /// Ingress: allowed sources (absent = `0.0.0.0/0`; empty = the rule allows nothing, as on
    /// the router). Egress: the guests the rule applies to (empty or absent = every guest; down
    /// to one VM's /32).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_cidr_list: Option<Vec<String>>,
    /// Egress: destinations (`0.0.0.0/0` entries are skipped; nothing left = any).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest_cidr_list: Option<Vec<String>>,
    /// Egress: the guest network's default, `true` = allow.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_egress_policy: Option<bool>,
}

/// A whole payload, as its `type` field selects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
pub enum Payload {
    #[serde(rename = "staticnatrules")]
    StaticNat { rules: Vec<StaticNatRule> },
    #[serde(rename = "firewallrules")]
    Firewall { rules: Vec<FirewallRule> },
}

impl Payload {
    /// The `type` value that selects this payload.
    pub fn type_name(&self) -> &'static str {
        match self {
            Payload::StaticNat { .. } => "staticnatrules",
            Payload::Firewall { .. } => "firewallrules",
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Payload::StaticNat { rules } => rules.len(),
            Payload::Firewall { rules } => rules.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
