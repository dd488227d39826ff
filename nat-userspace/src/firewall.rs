//! Firewall rules as CloudStack defines them (ingress per public IP, egress per guest network;
//! the types and their validation are nat-api's, re-exported here) and their compilation into
//! the LPM entries the XDP program looks up.
//!
//! Compilation: each rule owns a slot (a bit of `RuleBits`) that never changes while it exists,
//! so any order of map writes during a change only ever exposes rules of the old or the new
//! state. A rule's CIDRs and its service (protocol + port range or ICMP type/code) become LPM
//! prefixes; every prefix's bitmap is the union of the rules whose prefixes contain it, so the
//! longest match alone answers "which rules match" in each dimension.
use std::collections::HashMap;

use nat_common::RuleBits;

use crate::cidr::Cidr;
pub use nat_api::rule::{
    EgressRule, IngressRule, PortRange, Proto, RuleError, Service, icmp_field,
};

/// The LPM prefixes of a service: (protocol or all, 16-bit value, prefix length).
fn service_prefixes(service: &Service) -> Vec<SvcPrefix> {
    let Some(proto) = service.proto.number() else {
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
    match (
        service.proto,
        service.ports,
        service.icmp_type,
        service.icmp_code,
    ) {
        (Proto::Tcp | Proto::Udp, Some(r), _, _) => range_prefixes(r.first, r.last)
            .into_iter()
            .map(|(v, l)| one(v, l))
            .collect(),
        (Proto::Icmp, _, Some(t), Some(c)) => vec![one(u16::from(t) << 8 | u16::from(c), 16)],
        (Proto::Icmp, _, Some(t), None) => vec![one(u16::from(t) << 8, 8)],
        _ => vec![one(0, 0)],
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
        for p in service_prefixes(service) {
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
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    /// Reference: does a rule set match (addr, proto, value)? Linear scan.
    fn linear(rules: &[(Service, Vec<Cidr>)], addr: Ipv4Addr, proto: u8, value: u16) -> bool {
        let host = Cidr::new(addr, 32).unwrap();
        rules.iter().any(|(s, cidrs)| {
            cidrs.iter().any(|c| c.contains(&host))
                && service_prefixes(s).iter().any(|p| {
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
}
