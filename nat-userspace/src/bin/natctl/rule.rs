//! Rule options shared by `natctl firewall add` and `natctl egress add`.
use clap::Args;
use nat_userspace::{
    api::RuleSpec,
    cidr::Cidr,
    firewall::{PortRange, Proto},
};

#[derive(Debug, Args)]
pub struct RuleArgs {
    /// Protocol.
    #[arg(long)]
    pub proto: Proto,
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
            proto: self.proto,
            ports: self.ports,
            icmp_type: self.icmp_type,
            icmp_code: self.icmp_code,
            cidrs: self.cidrs,
            sources,
        }
    }
}

/// "tcp ports 22 [198.51.100.0/24]" for listings.
pub fn describe(service: &nat_userspace::firewall::Service, cidrs: &[Cidr]) -> String {
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
