//! Firewall rules as CloudStack defines them (ingress per public IP, egress per guest network),
//! their validation, and their compilation into the LPM entries the XDP program looks up.
//!
//! Compilation: each rule owns a slot (a bit of `RuleBits`) that never changes while it exists,
//! so any order of map writes during a change only ever exposes rules of the old or the new
//! state. A rule's CIDRs and its service (protocol + port range or ICMP type/code) become LPM
//! prefixes; every prefix's bitmap is the union of the rules whose prefixes contain it, so the
//! longest match alone answers "which rules match" in each dimension.
use std::{collections::HashMap, fmt, net::Ipv4Addr, str::FromStr};

use nat_common::RuleBits;
use serde::{Deserialize, Serialize};

use crate::cidr::Cidr;

/// Protocols a rule can name.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
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

    /// The LPM prefixes of this service: (protocol or all, 16-bit value, prefix length).
    fn prefixes(&self) -> Vec<SvcPrefix> {
        let Some(proto) = self.proto.number() else {
            return vec![SvcPrefix {
                proto: None,
                value: 0,
                len: 0,
            }];
        };
        let one = |value: u16, len: u8| SvcPrefix {
            proto: Some(proto),
            value,
            len,
        };
        match (self.proto, self.ports, self.icmp_type, self.icmp_code) {
            (Proto::Tcp | Proto::Udp, Some(r), _, _) => range_prefixes(r.first, r.last)
                .into_iter()
                .map(|(v, l)| one(v, l))
                .collect(),
            (Proto::Icmp, _, Some(t), Some(c)) => vec![one(u16::from(t) << 8 | u16::from(c), 16)],
            (Proto::Icmp, _, Some(t), None) => vec![one(u16::from(t) << 8, 8)],
            _ => vec![one(0, 0)],
        }
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

/// The CIDR prefixes covering `first..=last` exactly (at most 30 for 16-bit ports).
pub fn range_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    let mut out = Vec::new();
    while lo <= hi {
        let mut size: u32 = if lo == 0 {
            1 << 16
        } else {
            lo & lo.wrapping_neg()
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, (16 - size.trailing_zeros()) as u8));
        lo += size;
    }
    out
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

/// Sorted, deduplicated CIDRs; an empty list means "any" (CloudStack's default).
pub fn normalize_cidrs(mut cidrs: Vec<Cidr>) -> Vec<Cidr> {
    if cidrs.is_empty() {
        cidrs.push(Cidr::ANY);
    }
    cidrs.sort();
    cidrs.dedup();
    cidrs
}

/// A service prefix: protocol (`None` = every protocol), then a prefix of the 16-bit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SvcPrefix {
    proto: Option<u8>,
    value: u16,
    len: u8,
}

impl SvcPrefix {
    fn mask(len: u8) -> u16 {
        if len == 0 {
            0
        } else {
            u16::MAX << (16 - u16::from(len))
        }
    }

    /// Every stored prefix that contains this one, itself included.
    fn ancestors(&self) -> Vec<SvcPrefix> {
        let mut out: Vec<SvcPrefix> = (0..=self.len)
            .map(|l| SvcPrefix {
                proto: self.proto,
                value: self.value & Self::mask(l),
                len: l,
            })
            .collect();
        if self.proto.is_some() {
            out.push(SvcPrefix {
                proto: None,
                value: 0,
                len: 0,
            });
        }
        out
    }
}

fn cidr_ancestors(c: &Cidr) -> impl Iterator<Item = Cidr> + '_ {
    (0..=c.prefix_len()).map(|l| c.truncate(l))
}

/// Fills in, for every prefix, the union of the bits of all prefixes containing it.
fn close_over<K: Copy + Eq + std::hash::Hash>(
    own: &HashMap<K, RuleBits>,
    ancestors: impl Fn(&K) -> Vec<K>,
) -> HashMap<K, RuleBits> {
    own.keys()
        .map(|k| {
            let mut bits = RuleBits::default();
            for a in ancestors(k) {
                if let Some(b) = own.get(&a) {
                    bits.union(b);
                }
            }
            (*k, bits)
        })
        .collect()
}

/// LPM entries of one rule set (one public IP's ingress rules, or the egress rules):
/// source (ingress) or destination (egress) prefixes and service prefixes, each with its rule
/// bitmap. The egress rules' guest sources are a third dimension, [`compile_addrs`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Compiled {
    /// (CIDR, bits).
    pub addrs: HashMap<Cidr, RuleBits>,
    /// ((protocol or all, value, prefix length), bits).
    pub services: HashMap<(Option<u8>, u16, u8), RuleBits>,
}

/// Compiles one address dimension of rules given as (slot, CIDRs): every prefix with the
/// bits of the rules whose CIDRs contain it.
pub fn compile_addrs<'a>(
    rules: impl Iterator<Item = (usize, &'a [Cidr])>,
) -> HashMap<Cidr, RuleBits> {
    let mut addrs: HashMap<Cidr, RuleBits> = HashMap::new();
    for (slot, cidrs) in rules {
        for c in cidrs {
            addrs.entry(*c).or_default().set(slot);
        }
    }
    close_over(&addrs, |c| cidr_ancestors(c).collect())
}

/// Compiles rules given as (slot, service, CIDRs).
pub fn compile<'a>(rules: impl Iterator<Item = (usize, &'a Service, &'a [Cidr])>) -> Compiled {
    let mut with_addrs = Vec::new();
    let mut services: HashMap<SvcPrefix, RuleBits> = HashMap::new();
    for (slot, service, cidrs) in rules {
        with_addrs.push((slot, cidrs));
        for p in service.prefixes() {
            services.entry(p).or_default().set(slot);
        }
    }
    let addrs = compile_addrs(with_addrs.into_iter());
    let services = close_over(&services, SvcPrefix::ancestors)
        .into_iter()
        .map(|(p, b)| ((p.proto, p.value, p.len), b))
        .collect();
    Compiled { addrs, services }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Reference: does a rule set match (addr, proto, value)? Linear scan.
    fn linear(rules: &[(Service, Vec<Cidr>)], addr: Ipv4Addr, proto: u8, value: u16) -> bool {
        let host = Cidr::new(addr, 32).unwrap();
        rules.iter().any(|(s, cidrs)| {
            cidrs.iter().any(|c| c.contains(&host))
                && s.prefixes().iter().any(|p| {
                    p.proto.is_none_or(|x| x == proto) && value & SvcPrefix::mask(p.len) == p.value
                })
        })
    }

    /// What the XDP program does: longest match in each dimension, then intersect.
    fn lpm(c: &Compiled, addr: Ipv4Addr, proto: u8, value: u16) -> bool {
        let host = Cidr::new(addr, 32).unwrap();
        let a = (0..=32u8)
            .rev()
            .find_map(|l| c.addrs.get(&host.truncate(l)));
        let s = (0..=16u8)
            .rev()
            .find_map(|l| {
                c.services
                    .get(&(Some(proto), value & SvcPrefix::mask(l), l))
            })
            .or_else(|| c.services.get(&(None, 0, 0)));
        matches!((a, s), (Some(a), Some(s)) if a.intersects(s))
    }

    fn service() -> impl Strategy<Value = Service> {
        prop_oneof![
            (
                prop_oneof![Just(Proto::Tcp), Just(Proto::Udp)],
                proptest::option::of((1u16..200, 0u16..100))
            )
                .prop_map(|(proto, r)| Service {
                    proto,
                    ports: r.map(|(a, n)| PortRange {
                        first: a,
                        last: a.saturating_add(n)
                    }),
                    icmp_type: None,
                    icmp_code: None,
                }),
            (proptest::option::of(0u8..4), proptest::option::of(0u8..3)).prop_map(|(t, c)| {
                Service {
                    proto: Proto::Icmp,
                    ports: None,
                    icmp_type: t,
                    icmp_code: t.and(c),
                }
            }),
            Just(Service {
                proto: Proto::All,
                ports: None,
                icmp_type: None,
                icmp_code: None
            }),
        ]
    }

    fn cidr() -> impl Strategy<Value = Cidr> {
        (0u32..16, 0u8..=32)
            .prop_map(|(a, l)| Cidr::new(Ipv4Addr::from(0xc000_0200 | a << 4), l).unwrap())
    }

    proptest! {
        #[test]
        fn lpm_union_equals_linear_scan(
            rules in proptest::collection::vec((service(), proptest::collection::vec(cidr(), 1..4)), 0..12),
            probes in proptest::collection::vec((0u32..256, prop_oneof![Just(6u8), Just(17), Just(1), Just(47)], 0u16..320), 64),
        ) {
            let c = compile(rules.iter().enumerate().map(|(i, (s, cs))| (i, s, cs.as_slice())));
            for (a, proto, value) in probes {
                let addr = Ipv4Addr::from(0xc000_0200 | a);
                prop_assert_eq!(lpm(&c, addr, proto, value), linear(&rules, addr, proto, value),
                    "addr {} proto {} value {}", addr, proto, value);
            }
        }

        #[test]
        fn range_prefixes_cover_exactly(first in 1u16.., len in 0u16..2000) {
            let last = first.saturating_add(len);
            let ps = range_prefixes(first, last);
            prop_assert!(ps.len() <= 30);
            let mut covered = 0u32;
            for (v, l) in &ps {
                let size = 1u32 << (16 - l);
                prop_assert_eq!(u32::from(*v) % size, 0);
                covered += size;
            }
            prop_assert_eq!(covered, u32::from(last) - u32::from(first) + 1);
        }
    }

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
