//! What a client states: a static NAT mapping, and a rule's match before natd gives it an id.
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{
    cidr::Cidr,
    rule::{PortRange, Proto, RuleError, Service, icmp_field},
};

/// One static NAT mapping, public P <-> private V.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    pub public: Ipv4Addr,
    pub private: Ipv4Addr,
}

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

impl RuleSpec {
    /// The validated service of an ingress rule's spec (which has no `sources`).
    pub fn ingress_service(&self) -> Result<Service, RuleError> {
        if !self.sources.is_empty() {
            return Err(RuleError::SourcesInIngress);
        }
        self.service()
    }

    /// The validated service of this spec.
    pub fn service(&self) -> Result<Service, RuleError> {
        let s = Service {
            proto: self.proto,
            ports: self.ports,
            icmp_type: icmp_field("icmp type", self.icmp_type)?,
            icmp_code: icmp_field("icmp code", self.icmp_code)?,
        };
        s.validate()?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(proto: Proto) -> RuleSpec {
        RuleSpec {
            proto,
            ports: None,
            icmp_type: None,
            icmp_code: None,
            cidrs: Vec::new(),
            sources: Vec::new(),
        }
    }

    #[test]
    fn a_spec_validates_into_its_service() {
        let any_echo = RuleSpec {
            icmp_type: Some(8),
            icmp_code: Some(-1),
            ..spec(Proto::Icmp)
        };
        assert_eq!(
            any_echo.ingress_service(),
            Ok(Service {
                proto: Proto::Icmp,
                ports: None,
                icmp_type: Some(8),
                icmp_code: None,
            })
        );
        let from = RuleSpec {
            sources: vec![Cidr::ANY],
            ..spec(Proto::Tcp)
        };
        assert!(from.service().is_ok());
        assert_eq!(from.ingress_service(), Err(RuleError::SourcesInIngress));
        let code_300 = RuleSpec {
            icmp_type: Some(3),
            icmp_code: Some(300),
            ..spec(Proto::Icmp)
        };
        assert_eq!(
            code_300.service(),
            Err(RuleError::IcmpOutOfRange {
                field: "icmp code",
                value: 300
            })
        );
    }
}
