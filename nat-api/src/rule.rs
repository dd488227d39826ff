//! Firewall rules as CloudStack defines them (ingress per public IP, egress per guest network)
//! and their validation: what natd stores, lists and persists. Their compilation into the
//! fast path's lookup entries is natd's (`nat_userspace::firewall`).
use std::{fmt, net::Ipv4Addr, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;

/// Protocols a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    /// Every IP protocol (egress rules only).
    All,
}

impl Proto {
    /// IANA protocol number, `None` for [`Proto::All`].
    pub const fn number(self) -> Option<u8> {
        match self {
            Proto::Tcp => Some(6),
            Proto::Udp => Some(17),
            Proto::Icmp => Some(1),
            Proto::All => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::All => "all",
        })
    }
}

/// A destination port range, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl FromStr for PortRange {
    type Err = RuleError;

    /// `N` or `N-M`, 1 <= N <= M <= 65535.
    fn from_str(s: &str) -> Result<Self, RuleError> {
        let port = |p: &str| -> Result<u16, RuleError> {
            let n: u32 = p
                .trim()
                .parse()
                .map_err(|_| RuleError::BadPorts(s.to_string()))?;
            PortRange::check(n)
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        PortRange::new(first.into(), last.into())
    }
}

impl PortRange {
    fn check(n: u32) -> Result<u16, RuleError> {
        match u16::try_from(n) {
            Ok(p) if p >= 1 => Ok(p),
            _ => Err(RuleError::PortOutOfRange(n)),
        }
    }

    /// Validates both ends (1..=65535, first <= last).
    pub fn new(first: u32, last: u32) -> Result<Self, RuleError> {
        let (first, last) = (Self::check(first)?, Self::check(last)?);
        if first > last {
            return Err(RuleError::PortsReversed { first, last });
        }
        Ok(PortRange { first, last })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("ports {0:?} are not N or N-M")]
    BadPorts(String),
    #[error("port {0} is outside 1-65535")]
    PortOutOfRange(u32),
    #[error("port range {first}-{last} starts after it ends")]
    PortsReversed { first: u16, last: u16 },
    #[error("ports apply to tcp and udp only, not {0}")]
    PortsWithoutPorts(Proto),
    #[error("icmp type and code apply to icmp only, not {0}")]
    IcmpFieldsWithout(Proto),
    #[error("icmp {field} {value} is outside 0-255 (or -1 for any)")]
    IcmpOutOfRange { field: &'static str, value: i64 },
    #[error("an icmp code needs an icmp type")]
    CodeWithoutType,
    #[error("protocol all is for egress rules only")]
    AllInIngress,
    #[error("a rule needs at least one CIDR")]
    NoCidr,
    #[error("source CIDRs are for egress rules (an ingress rule's CIDRs are its sources)")]
    SourcesInIngress,
}

/// What a rule matches besides addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Service {
    pub proto: Proto,
    /// TCP/UDP destination ports; `None` = every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    /// ICMP type and code; `None` = any (CloudStack's -1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
}

/// Converts CloudStack's -1-means-any convention.
pub fn icmp_field(field: &'static str, v: Option<i64>) -> Result<Option<u8>, RuleError> {
    match v {
        None | Some(-1) => Ok(None),
        Some(n) => u8::try_from(n)
            .map(Some)
            .map_err(|_| RuleError::IcmpOutOfRange { field, value: n }),
    }
}

impl Service {
    pub fn validate(&self) -> Result<(), RuleError> {
        if let Some(p) = self.ports {
            PortRange::new(p.first.into(), p.last.into())?;
        }
        if self.ports.is_some() && !matches!(self.proto, Proto::Tcp | Proto::Udp) {
            return Err(RuleError::PortsWithoutPorts(self.proto));
        }
        if (self.icmp_type.is_some() || self.icmp_code.is_some()) && self.proto != Proto::Icmp {
            return Err(RuleError::IcmpFieldsWithout(self.proto));
        }
        if self.icmp_code.is_some() && self.icmp_type.is_none() {
            return Err(RuleError::CodeWithoutType);
        }
        Ok(())
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.proto)?;
        if let Some(p) = self.ports {
            write!(f, " ports {p}")?;
        }
        if let Some(t) = self.icmp_type {
            write!(f, " type {t}")?;
        }
        if let Some(c) = self.icmp_code {
            write!(f, " code {c}")?;
        }
        Ok(())
    }
}

/// An ingress rule of one public IP. `cidrs` are source prefixes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressRule {
    pub id: u64,
    pub public: Ipv4Addr,
    #[serde(flatten)]
    pub service: Service,
    pub cidrs: Vec<Cidr>,
}

/// An egress exception rule of the guest network. `cidrs` are destination prefixes, `sources`
/// the guests it applies to (CloudStack's `source_cidr_list`; `0.0.0.0/0` = every guest, also
/// for a state persisted before rules had sources).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressRule {
    pub id: u64,
    #[serde(flatten)]
    pub service: Service,
    pub cidrs: Vec<Cidr>,
    #[serde(default = "any_source")]
    pub sources: Vec<Cidr>,
}

fn any_source() -> Vec<Cidr> {
    vec![Cidr::ANY]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_problem() {
        assert_eq!("0".parse::<PortRange>(), Err(RuleError::PortOutOfRange(0)));
        assert_eq!(
            "70000".parse::<PortRange>(),
            Err(RuleError::PortOutOfRange(70000))
        );
        assert_eq!(
            "20-10".parse::<PortRange>(),
            Err(RuleError::PortsReversed {
                first: 20,
                last: 10
            })
        );
        assert_eq!(
            "5000-5100".parse::<PortRange>(),
            Ok(PortRange {
                first: 5000,
                last: 5100
            })
        );
        let icmp_ports = Service {
            proto: Proto::Icmp,
            ports: Some(PortRange { first: 1, last: 1 }),
            icmp_type: None,
            icmp_code: None,
        };
        assert_eq!(
            icmp_ports.validate(),
            Err(RuleError::PortsWithoutPorts(Proto::Icmp))
        );
        let tcp_type = Service {
            proto: Proto::Tcp,
            ports: None,
            icmp_type: Some(8),
            icmp_code: None,
        };
        assert_eq!(
            tcp_type.validate(),
            Err(RuleError::IcmpFieldsWithout(Proto::Tcp))
        );
        assert_eq!(icmp_field("icmp type", Some(-1)), Ok(None));
        assert!(icmp_field("icmp type", Some(256)).is_err());
    }
}
