//! natd's metric families, encoded from one [`Snapshot`]. Names are registered without the
//! `xdp_nat_` prefix (the registry adds it) and counters without `_total` (the encoder adds
//! it), so the exported names are `xdp_nat_<name>` and `xdp_nat_<name>_total`.
use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::Snapshot;
use crate::ebpf::MappingCounters;

type Fmt = Result<(), std::fmt::Error>;

/// One family: its descriptor, then one sample per label set.
fn family<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> Fmt {
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in samples {
        let m = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(m)?,
            // Gauges here are counts and sizes, far below 2^63.
            _ => ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX)).encode(m)?,
        }
    }
    Ok(())
}

/// A family of one sample without labels.
fn single(e: &mut DescriptorEncoder, name: &str, help: &str, kind: MetricType, v: u64) -> Fmt {
    family::<[(&str, &str); 0]>(e, name, help, kind, [([], v)])
}

const GAUGE: MetricType = MetricType::Gauge;
const COUNTER: MetricType = MetricType::Counter;

/// Every family of `s`.
pub(super) fn encode(s: &Snapshot, mut e: DescriptorEncoder) -> Fmt {
    let e = &mut e;
    let st = &s.stats;
    family(
        e,
        "build_info",
        "natd build; the value is always 1.",
        GAUGE,
        [([("version", env!("CARGO_PKG_VERSION"))], 1)],
    )?;
    let ifaces: Vec<_> = st
        .interfaces
        .iter()
        .map(|i| {
            (
                i.name.clone(),
                format!("{:?}", i.role).to_lowercase(),
                i.mode.to_string(),
            )
        })
        .collect();
    family(
        e,
        "interface_xdp_mode",
        "1 for each interface natd attached to, with its role and XDP mode.",
        GAUGE,
        ifaces.iter().map(|(name, role, mode)| {
            (
                [
                    ("interface", name.as_str()),
                    ("role", role.as_str()),
                    ("mode", mode.as_str()),
                ],
                1,
            )
        }),
    )?;
    single(
        e,
        "state_generation",
        "Changes applied to the desired state.",
        GAUGE,
        st.generation,
    )?;
    single(
        e,
        "state_last_apply_timestamp_seconds",
        "When the last change was applied (0: none since start).",
        GAUGE,
        s.applied_at,
    )?;
    single(
        e,
        "mappings",
        "Mappings installed.",
        GAUGE,
        s.mappings as u64,
    )?;
    single(
        e,
        "metrics_mappings_exported",
        "Mappings whose per-mapping series this scrape carries (natd --metrics-per-mapping).",
        GAUGE,
        st.mappings.len() as u64,
    )?;
    let reasons = |get: fn(&crate::api::ReasonStat) -> u64| {
        st.reasons.iter().map(move |r| {
            (
                [("action", r.action.as_str()), ("reason", r.reason.as_str())],
                get(r),
            )
        })
    };
    family(
        e,
        "verdict_packets",
        "Frames the XDP program ended, by action and reason.",
        COUNTER,
        reasons(|r| r.packets),
    )?;
    family(
        e,
        "verdict_bytes",
        "Bytes of those frames, by action and reason.",
        COUNTER,
        reasons(|r| r.bytes),
    )?;
    per_mapping(e, s)?;
    conntrack(e, s)?;
    slow_path(e, s)
}

/// The named counters of natd's nftables table (none without the table).
fn slow_path(e: &mut DescriptorEncoder, s: &Snapshot) -> Fmt {
    let c = &s.stats.slow_path;
    family(
        e,
        "kernel_path_packets",
        "Packets natd's nftables table counted on the kernel path: UDP-Lite translated \
         statelessly (udplite_stateless), dropped because the kernel cannot translate them \
         (untranslatable), or dropped leaving a public interface from a private address \
         (untranslated).",
        COUNTER,
        c.iter()
            .map(|c| ([("counter", c.name.as_str())], c.packets)),
    )?;
    family(
        e,
        "kernel_path_bytes",
        "Bytes of those packets.",
        COUNTER,
        c.iter().map(|c| ([("counter", c.name.as_str())], c.bytes)),
    )
}

/// The per-mapping families (of the mappings the snapshot carries).
fn per_mapping(e: &mut DescriptorEncoder, s: &Snapshot) -> Fmt {
    type Get = fn(&MappingCounters) -> [u64; 2];
    let labels: Vec<(String, String)> = s
        .stats
        .mappings
        .iter()
        .map(|m| (m.public.to_string(), m.private.to_string()))
        .collect();
    let families: [(&str, &str, Get); 3] = [
        (
            "mapping_packets",
            "Frames translated and forwarded by the fast path, per mapping and direction.",
            |c| [c.inbound_packets, c.outbound_packets],
        ),
        (
            "mapping_bytes",
            "Bytes of those frames, per mapping and direction.",
            |c| [c.inbound_bytes, c.outbound_bytes],
        ),
        (
            "mapping_denied_packets",
            "Frames of a mapping dropped by policy, per direction (inbound: the public IP's firewall; outbound: egress policy).",
            |c| [c.inbound_denied, c.outbound_denied],
        ),
    ];
    for (name, help, get) in families {
        let samples = s
            .stats
            .mappings
            .iter()
            .zip(&labels)
            .flat_map(|(m, (p, v))| {
                let [inbound, outbound] = get(&m.counters);
                [("inbound", inbound), ("outbound", outbound)].map(|(dir, n)| {
                    (
                        [
                            ("public", p.as_str()),
                            ("private", v.as_str()),
                            ("direction", dir),
                        ],
                        n,
                    )
                })
            });
        family(e, name, help, COUNTER, samples)?;
    }
    family(
        e,
        "firewall_denied_packets",
        "Frames dropped by the ingress firewall, per public IP.",
        COUNTER,
        s.stats
            .mappings
            .iter()
            .zip(&labels)
            .map(|(m, (p, _))| ([("public", p.as_str())], m.counters.inbound_denied)),
    )
}

fn conntrack(e: &mut DescriptorEncoder, s: &Snapshot) -> Fmt {
    let c = &s.stats.conntrack;
    single(
        e,
        "conntrack_entries",
        "Flows in the connection table (as of the last collection).",
        GAUGE,
        c.entries,
    )?;
    single(
        e,
        "conntrack_capacity",
        "Size of the connection table.",
        GAUGE,
        u64::from(c.capacity),
    )?;
    family(
        e,
        "conntrack_lookups",
        "Connection table lookups by result.",
        COUNTER,
        [
            ([("result", "hit")], c.hits),
            ([("result", "miss")], c.misses),
        ],
    )?;
    single(e, "conntrack_created", "Flows created.", COUNTER, c.creates)?;
    single(
        e,
        "conntrack_expired_seen",
        "Lookups that found an expired flow.",
        COUNTER,
        c.expired_seen,
    )?;
    family(
        e,
        "conntrack_removed",
        "Flows natd removed, by cause.",
        COUNTER,
        [
            ([("cause", "expired")], c.collected),
            ([("cause", "flushed")], c.flushed),
            ([("cause", "kernel_ended")], c.ended),
        ],
    )?;
    single(
        e,
        "conntrack_evictions",
        "Flows the kernel evicted to make room (LRU).",
        COUNTER,
        c.evictions,
    )
}
