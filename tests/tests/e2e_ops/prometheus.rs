//! Prometheus: a real Prometheus server in the router's namespace scrapes natd's metrics every
//! second; after a known number of echo requests through P it reports exactly that many
//! translated packets; `promtool check metrics` accepts natd's exposition.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use nat_tests::topology::{
    Natd, NatdOptions, PUBLIC_ADDR, Topology,
    observe::ping,
    prometheus::{Prometheus, http_get, promtool_check_metrics},
};

use super::ONE_MAPPING_OPEN;

/// Where natd serves metrics and Prometheus its API: loopback of the router's namespace, which
/// belongs to this test alone, so fixed ports cannot meet another test's.
const METRICS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9477));
const PROMETHEUS: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9090));
const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a value may take to show in Prometheus: a few scrapes.
const SCRAPED: Duration = Duration::from_secs(20);
const PINGS: u32 = 5;

/// The single sample `promql` returns, if it returns exactly one.
fn single(result: &[(serde_json::Value, String)]) -> Option<&str> {
    match result {
        [(_, v)] => Some(v),
        _ => None,
    }
}

#[test]
fn prometheus_scrapes_natd_and_counts_the_packets_sent() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let metrics_arg = METRICS.to_string();
    let natd = Natd::start_with(
        &topo,
        &NatdOptions {
            config: Some(ONE_MAPPING_OPEN.into()),
            args: vec!["--metrics-addr".into(), metrics_arg],
            ..NatdOptions::default()
        },
    )?;
    let prometheus = Prometheus::start(
        &topo.router,
        &topo.dir.path().join("prometheus"),
        PROMETHEUS,
        &[METRICS],
        SCRAPE_INTERVAL,
    )?;
    // Scraped, and nothing translated yet.
    let p = PUBLIC_ADDR.to_string();
    let inbound = format!("xdp_nat_mapping_packets_total{{public=\"{p}\",direction=\"inbound\"}}");
    let outbound =
        format!("xdp_nat_mapping_packets_total{{public=\"{p}\",direction=\"outbound\"}}");
    prometheus.wait_for("up{job=\"natd\"}", SCRAPED, |r| single(r) == Some("1"))?;
    prometheus.wait_for(&inbound, SCRAPED, |r| single(r) == Some("0"))?;

    let pinged = ping(&topo.client, PUBLIC_ADDR, PINGS, 56)?;
    assert_eq!(
        (pinged.transmitted, pinged.received),
        (PINGS, PINGS),
        "{}",
        pinged.output
    );
    // natd itself counted exactly the echo requests in and the replies out...
    let c = natd.natctl()?.counters(PUBLIC_ADDR)?;
    let n = u64::from(PINGS);
    assert_eq!((c.inbound_packets, c.outbound_packets), (n, n), "{c:?}");
    // ... and so does Prometheus, from its scrapes.
    let want = n.to_string();
    for q in [
        inbound.as_str(),
        outbound.as_str(),
        "xdp_nat_verdict_packets_total{reason=\"inbound_forwarded\"}",
        "xdp_nat_verdict_packets_total{reason=\"outbound_forwarded\"}",
    ] {
        prometheus.wait_for(q, SCRAPED, |r| single(r) == Some(want.as_str()))?;
    }
    let rate = format!("sum(increase({inbound}[1m])) > 0");
    prometheus.wait_for(&rate, SCRAPED, |r| r.len() == 1)?;

    // promtool accepts the exposition as natd serves it, now with traffic in every family.
    let (code, body) = http_get(&topo.router, METRICS, "/metrics")?;
    assert_eq!(code, 200, "{body}");
    let (ok, report) = promtool_check_metrics(&body)?;
    assert!(
        ok,
        "promtool check metrics:\n{report}\n---- exposition ----\n{body}"
    );
    Ok(())
}

/// Mappings of the scale test.
const MANY: u32 = 100_000;
/// What one scrape at [`MANY`] mappings may weigh with natd's default flags.
const SCRAPE_BOUND: usize = 10 << 20;

/// `MANY` mappings 100.64.0.0/10 -> 10.128.0.0/9 (RFC 6598 and RFC 1918 space) as a config
/// file, with the open mapping of [`ONE_MAPPING_OPEN`] beside them, and room for them
/// (`[limits] mappings`; the default is 65,536).
fn many_mappings() -> String {
    let mut toml = String::from(ONE_MAPPING_OPEN);
    for i in 1..=MANY {
        let [_, a, b, c] = i.to_be_bytes();
        toml.push_str(&format!(
            "[[mapping]]\npublic = \"100.{}.{b}.{c}\"\nprivate = \"10.{}.{b}.{c}\"\n",
            64 + a,
            128 + a
        ));
    }
    toml.push_str("[limits]\nmappings = 131072\n");
    toml
}

/// The value of the sample `line` starts with (name and labels), if the exposition has it.
fn sample(body: &str, series: &str) -> Option<u64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// natd with 100,000 mappings and default flags: one scrape stays under 10 MB (it would be
/// about 65 MB with a series per mapping and direction), carries the per-mapping series of
/// 1,000 mappings, and its aggregate series equal what natctl reports.
#[test]
fn a_scrape_at_100000_mappings_stays_small_and_aggregates_stay_exact() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let natd = Natd::start_with(
        &topo,
        &NatdOptions {
            config: Some(many_mappings()),
            args: vec!["--metrics-addr".into(), METRICS.to_string()],
            ..NatdOptions::default()
        },
    )?;
    let natctl = natd.natctl()?;
    let pinged = ping(&topo.client, PUBLIC_ADDR, PINGS, 56)?;
    assert_eq!(pinged.received, PINGS, "{}", pinged.output);

    let before = natctl.stats()?;
    let started = std::time::Instant::now();
    let (code, body) = http_get(&topo.router, METRICS, "/metrics")?;
    let took = started.elapsed();
    let after = natctl.stats()?;
    assert_eq!(code, 200, "{}", &body[..body.len().min(2000)]);
    eprintln!(
        "scrape at {} mappings: {} bytes in {took:?}",
        MANY + 1,
        body.len()
    );
    assert!(
        body.len() < SCRAPE_BOUND,
        "a scrape at {} mappings is {} bytes, more than {SCRAPE_BOUND}",
        MANY + 1,
        body.len()
    );
    let per_mapping = body
        .lines()
        .filter(|l| !l.starts_with('#') && l.contains("public=\""))
        .count();
    assert_eq!(per_mapping, 7 * 1000, "per-mapping series");
    assert_eq!(sample(&body, "xdp_nat_mappings"), Some(u64::from(MANY) + 1));
    assert_eq!(
        sample(&body, "xdp_nat_metrics_mappings_exported"),
        Some(1000)
    );
    // Aggregates are exact: every verdict counter lies between natctl's reads just before and
    // just after the scrape (frames the test did not send, IPv6 neighbour discovery say, may
    // arrive meanwhile).
    for (b, a) in before.reasons.iter().zip(&after.reasons) {
        let labels = format!("{{action=\"{}\",reason=\"{}\"}}", b.action, b.reason);
        let packets = sample(&body, &format!("xdp_nat_verdict_packets_total{labels}"));
        let bytes = sample(&body, &format!("xdp_nat_verdict_bytes_total{labels}"));
        assert!(
            packets.is_some_and(|n| (b.packets..=a.packets).contains(&n))
                && bytes.is_some_and(|n| (b.bytes..=a.bytes).contains(&n)),
            "{labels}: exported {packets:?} packets, {bytes:?} bytes; natctl {b:?} then {a:?}"
        );
    }
    assert!(
        sample(
            &body,
            "xdp_nat_verdict_packets_total{action=\"redirect\",reason=\"inbound_forwarded\"}"
        )
        .is_some_and(|n| n >= u64::from(PINGS)),
        "the echo requests are counted"
    );
    let (ok, report) = promtool_check_metrics(&body)?;
    assert!(ok, "promtool check metrics:\n{report}");
    Ok(())
}
