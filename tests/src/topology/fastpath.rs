//! The check that the XDP fast path carried a test's traffic, from what the receivers counted:
//! each forwarded verdict reason grew by at least the packets that arrived at the far end in
//! that direction (ICMP packets a sniffer saw, datagrams a socket received, TCP segments in
//! `tcpi_segs_in`), and no pass reason grew at all, so the kernel forwarded none of it. A
//! lower bound of a few packets would let bulk data through the kernel unnoticed; this one
//! does not. `not_ipv4` (ARP, IPv6 neighbour discovery) is left out: no test traffic is
//! counted there, and the namespaces' own housekeeping is.
use anyhow::{Context as _, ensure};
use nat_userspace::api::{ReasonStat, StatsReport};

/// The pass reason that is not about the tests' IPv4 traffic.
const NOT_TEST_TRAFFIC: &str = "not_ipv4";

/// Packets that arrived at a receiver, and which forwarded reason must account for them.
#[derive(Debug, Clone)]
pub struct Arrived {
    /// `inbound_forwarded`, `outbound_forwarded` or `hairpin_forwarded`.
    pub reason: &'static str,
    /// Packets the receivers counted.
    pub packets: u64,
    /// What they were, for the failure message.
    pub what: String,
}

impl Arrived {
    pub fn new(reason: &'static str, packets: u64, what: impl Into<String>) -> Self {
        Self {
            reason,
            packets,
            what: what.into(),
        }
    }
}

/// How much reason `name` grew from `before` to `after`.
fn grown(before: &[ReasonStat], after: &[ReasonStat], name: &str) -> anyhow::Result<u64> {
    let of = |s: &[ReasonStat]| {
        s.iter()
            .find(|r| r.reason == name)
            .map(|r| r.packets)
            .with_context(|| format!("natctl stats has no reason {name}"))
    };
    Ok(of(after)?.saturating_sub(of(before)?))
}

/// The pass reasons (but `not_ipv4`) that grew from `before` to `after`, with how much.
pub fn passes_grown(
    before: &[ReasonStat],
    after: &[ReasonStat],
) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for r in after
        .iter()
        .filter(|r| r.action == "pass" && r.reason != NOT_TEST_TRAFFIC)
    {
        let n = grown(before, after, &r.reason)?;
        if n > 0 {
            out.push((r.reason.clone(), n));
        }
    }
    Ok(out)
}

/// Fails unless, from `before` to `after`, every reason of `arrived` grew by at least the
/// packets counted for it (summed over the entries naming it), and no pass reason grew.
pub fn carried(
    before: &StatsReport,
    after: &StatsReport,
    arrived: &[Arrived],
) -> anyhow::Result<()> {
    check(&before.reasons, &after.reasons, arrived)
}

fn check(before: &[ReasonStat], after: &[ReasonStat], arrived: &[Arrived]) -> anyhow::Result<()> {
    let passes = passes_grown(before, after)?;
    let mut reasons: Vec<&str> = arrived.iter().map(|a| a.reason).collect();
    reasons.sort_unstable();
    reasons.dedup();
    for reason in reasons {
        let mine: Vec<&Arrived> = arrived.iter().filter(|a| a.reason == reason).collect();
        let packets: u64 = mine.iter().map(|a| a.packets).sum();
        let forwarded = grown(before, after, reason)?;
        let what: Vec<String> = mine
            .iter()
            .map(|a| format!("{} {}", a.packets, a.what))
            .collect();
        ensure!(
            forwarded >= packets,
            "{reason} grew by {forwarded}, but {packets} packets arrived ({}): the fast path \
             did not carry them all (pass reasons that grew: {passes:?})",
            what.join(", ")
        );
    }
    ensure!(
        passes.is_empty(),
        "pass reasons grew while the fast path was to carry everything: {passes:?}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(inbound: u64, outbound: u64, fragment: u64, not_ipv4: u64) -> Vec<ReasonStat> {
        [
            ("inbound_forwarded", "redirect", inbound),
            ("outbound_forwarded", "redirect", outbound),
            ("fragment", "pass", fragment),
            ("not_ipv4", "pass", not_ipv4),
        ]
        .into_iter()
        .map(|(reason, action, packets)| ReasonStat {
            reason: reason.into(),
            action: action.into(),
            packets,
            bytes: packets * 100,
        })
        .collect()
    }

    #[test]
    fn every_arrived_packet_must_be_forwarded_and_nothing_passed() {
        let before = stats(10, 10, 1, 1);
        let arrived = [
            Arrived::new("inbound_forwarded", 150, "segments"),
            Arrived::new("inbound_forwarded", 40, "datagrams"),
            Arrived::new("outbound_forwarded", 18, "answers"),
        ];
        // 190 in and 18 out forwarded; ARP and IPv6 (not_ipv4) do not matter.
        check(&before, &stats(200, 28, 1, 9), &arrived).unwrap();
        // Bulk data through the kernel: only the handshake was forwarded.
        let e = check(&before, &stats(15, 28, 1, 1), &arrived).unwrap_err();
        assert!(
            format!("{e:#}").contains("inbound_forwarded grew by 5, but 190 packets arrived"),
            "{e:#}"
        );
        // All forwarded, but a pass reason grew too.
        let e = check(&before, &stats(200, 28, 4, 1), &arrived).unwrap_err();
        assert!(format!("{e:#}").contains("(\"fragment\", 3)"), "{e:#}");
        assert!(
            check(
                &before,
                &stats(200, 28, 1, 1),
                &[Arrived::new("nope", 1, "x")]
            )
            .is_err()
        );
    }
}
