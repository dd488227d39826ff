//! Rule options shared by `natctl firewall add` and `natctl egress add`.
use clap::{Args, ValueEnum};
use nat_api::{Cidr, PortRange, Proto, RuleSpec, Service};

/// A rule's protocol as natctl takes it (`all`: egress rules only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
    Icmp,
    /// Every IP protocol (egress rules only).
    All,
}

impl From<ProtoArg> for Proto {
    fn from(p: ProtoArg) -> Self {
        match p {
            ProtoArg::Tcp => Proto::Tcp,
            ProtoArg::Udp => Proto::Udp,
            ProtoArg::Icmp => Proto::Icmp,
            ProtoArg::All => Proto::All,
        }
    }
}

#[derive(Debug, Args)]
pub struct RuleArgs {
    /// Protocol.
    #[arg(long)]
    pub proto: ProtoArg,
    /// Destination port or range (tcp/udp only): N or N-M, within 1-65535.
    #[arg(long)]
    pub ports: Option<PortRange>,
    /// A CIDR (repeat for several); none = 0.0.0.0/0.
    #[arg(long = "cidr")]
    pub cidrs: Vec<Cidr>,
    /// ICMP type, -1 = any (icmp only).
    #[arg(long, allow_negative_numbers = true)]
    pub icmp_type: Option<i64>,
    /// ICMP code, -1 = any (icmp only).
    #[arg(long, allow_negative_numbers = true)]
    pub icmp_code: Option<i64>,
}

impl RuleArgs {
    /// The spec of a rule that applies to `sources` (egress; empty for ingress rules).
    pub fn spec(self, sources: Vec<Cidr>) -> RuleSpec {
        RuleSpec {
            proto: self.proto.into(),
            ports: self.ports,
            icmp_type: self.icmp_type,
            icmp_code: self.icmp_code,
            cidrs: self.cidrs,
            sources,
        }
    }
}

/// "tcp ports 22 [198.51.100.0/24]" for listings.
pub fn describe(service: &Service, cidrs: &[Cidr]) -> String {
    format!("{service} [{}]", list(cidrs))
}

/// "a, b" of CIDRs.
pub fn list(cidrs: &[Cidr]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// natctl names each protocol as natd's API does.
    #[test]
    fn protocols_are_named_as_on_the_wire() {
        for p in ProtoArg::value_variants() {
            let name = p.to_possible_value().map(|v| v.get_name().to_string());
            assert_eq!(name, Some(Proto::from(*p).to_string()));
        }
    }
}
