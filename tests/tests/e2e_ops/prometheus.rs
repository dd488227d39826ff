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
