//! The exposition natd serves, from fixed snapshots; the per-mapping limit.
use super::*;
use crate::{
    api::{ConntrackStats, MappingStatus, ReasonStat, SlowPathCounter},
    ebpf::MappingCounters,
    state::Mapping,
};

struct Fixed(Result<Snapshot, String>);

impl Source for Fixed {
    fn snapshot(&self) -> Result<Snapshot, String> {
        self.0.clone()
    }
}

fn conntrack() -> ConntrackStats {
    ConntrackStats {
        entries: 1,
        capacity: 10,
        hits: 2,
        misses: 3,
        creates: 1,
        expired_seen: 0,
        collected: 0,
        flushed: 0,
        ended: 4,
        evictions: 0,
    }
}

fn snapshot(mappings: Vec<MappingStatus>) -> Snapshot {
    Snapshot {
        stats: StatsReport {
            generation: 3,
            interfaces: vec![],
            reasons: vec![ReasonStat {
                reason: "inbound_forwarded".into(),
                action: "redirect".into(),
                packets: 5,
                bytes: 500,
            }],
            conntrack: conntrack(),
            mappings,
            slow_path: vec![SlowPathCounter {
                name: "untranslatable".into(),
                packets: 2,
                bytes: 120,
            }],
        },
        applied_at: 42,
        mappings: 1,
    }
}

fn mapping(i: u32, packets: u64) -> MappingStatus {
    MappingStatus {
        public: std::net::Ipv4Addr::from(0xcb00_7100 + i),
        private: std::net::Ipv4Addr::from(0x0a00_0000 + i),
        counters: MappingCounters {
            inbound_packets: packets,
            inbound_bytes: 100 * packets,
            ..Default::default()
        },
    }
}

fn render(s: Snapshot) -> String {
    Metrics::new(Fixed(Ok(s))).render().expect("renders")
}

#[test]
fn exposition_names_types_and_labels() {
    let t = render(snapshot(vec![mapping(10, 5)]));
    assert!(
        t.contains("# TYPE xdp_nat_mapping_packets_total counter\n"),
        "{t}"
    );
    assert!(t.contains("xdp_nat_mapping_packets_total{public=\"203.0.113.10\",private=\"10.0.0.10\",direction=\"inbound\"} 5\n"), "{t}");
    assert!(
        t.contains(
            "xdp_nat_verdict_packets_total{action=\"redirect\",reason=\"inbound_forwarded\"} 5\n"
        ),
        "{t}"
    );
    assert!(
        t.contains("xdp_nat_firewall_denied_packets_total{public=\"203.0.113.10\"} 0\n"),
        "{t}"
    );
    assert!(
        t.contains("# TYPE xdp_nat_state_last_apply_timestamp_seconds gauge\nxdp_nat_state_last_apply_timestamp_seconds 42\n"),
        "{t}"
    );
    assert!(t.contains("xdp_nat_conntrack_capacity 10\n"), "{t}");
    assert!(
        t.contains("xdp_nat_conntrack_removed_total{cause=\"kernel_ended\"} 4\n"),
        "{t}"
    );
    assert!(
        t.contains("xdp_nat_conntrack_lookups_total{result=\"miss\"} 3\n"),
        "{t}"
    );
    assert!(t.contains("xdp_nat_mappings 1\n"), "{t}");
    assert!(
        t.contains("xdp_nat_kernel_path_packets_total{counter=\"untranslatable\"} 2\n"),
        "{t}"
    );
    assert!(
        t.contains("xdp_nat_kernel_path_bytes_total{counter=\"untranslatable\"} 120\n"),
        "{t}"
    );
    assert!(t.contains("xdp_nat_metrics_mappings_exported 1\n"), "{t}");
    // The classic text format: no OpenMetrics end marker.
    assert!(!t.contains("# EOF"), "{t}");
}

#[test]
fn label_values_are_escaped() {
    let mut s = snapshot(vec![]);
    s.stats.reasons[0].reason = "a\"b\\c\nd".into();
    let t = render(s);
    assert!(t.contains("reason=\"a\\\"b\\\\c\\nd\""), "{t}");
}

#[test]
fn a_failed_read_fails_the_scrape_with_its_reason() {
    let m = Metrics::new(Fixed(Err("reading counters: boom".into())));
    assert_eq!(m.render(), Err("reading counters: boom".to_string()));
}

#[test]
fn per_mapping_values_parse_and_print_back() {
    for (text, want) in [
        ("off", PerMapping::Off),
        ("all", PerMapping::All),
        ("top:1", PerMapping::Top(1)),
        ("top:1000", PerMapping::Top(1000)),
    ] {
        assert_eq!(text.parse(), Ok(want));
        assert_eq!(want.to_string(), text);
    }
    for bad in ["", "top", "top:", "top:0", "top:-1", "top:x", "none", "ALL"] {
        assert_eq!(
            bad.parse::<PerMapping>(),
            Err(PerMappingError { value: bad.into() }),
            "{bad}"
        );
    }
    assert_eq!(PerMapping::default(), PerMapping::Top(DEFAULT_TOP));
}

#[test]
fn the_top_mappings_are_those_with_most_traffic() {
    let m = |i: u8| Mapping {
        public: std::net::Ipv4Addr::new(203, 0, 113, i),
        private: std::net::Ipv4Addr::new(10, 0, 0, i),
    };
    let all = vec![(5, m(1)), (9, m(2)), (0, m(3)), (9, m(4)), (7, m(5))];
    assert_eq!(ranking::top_n(all.clone(), 3), vec![m(2), m(4), m(5)]);
    assert_eq!(ranking::top_n(all.clone(), 10).len(), 5);
    assert_eq!(ranking::top_n(all, 0), vec![]);
}

#[test]
fn the_selection_follows_the_flag_and_the_installed_mappings() {
    let list: Vec<Mapping> = (1..=5u8)
        .map(|i| Mapping {
            public: std::net::Ipv4Addr::new(203, 0, 113, i),
            private: std::net::Ipv4Addr::new(10, 0, 0, i),
        })
        .collect();
    let mut state = crate::state::DesiredState::from_mappings(&list).expect("valid");
    let r = Ranking::default();
    assert!(r.select(PerMapping::Off, &state).is_empty());
    assert_eq!(r.select(PerMapping::All, &state), list);
    assert_eq!(r.select(PerMapping::Top(5), &state), list);
    // Not ranked yet: the first ones.
    assert_eq!(r.select(PerMapping::Top(2), &state), list[..2]);
    r.set(Some(vec![list[4], list[2]]));
    assert_eq!(r.select(PerMapping::Top(2), &state), [list[2], list[4]]);
    // A ranked mapping removed since is left out.
    state.remove_mapping(list[4].public).expect("installed");
    assert_eq!(r.select(PerMapping::Top(2), &state), [list[2]]);
}

/// What a scrape at 100,000 mappings weighs with every mapping exported: the reason for the
/// limit (the e2e test `e2e_ops::prometheus` measures natd's own scrape with the default).
#[test]
fn every_mapping_costs_seven_series() {
    let one = render(snapshot(vec![mapping(1, 1)]));
    let none = render(snapshot(vec![]));
    let per_mapping = one.len() - none.len();
    let series = one.lines().filter(|l| l.contains("public=")).count();
    assert_eq!(series, 7, "{one}");
    assert!(
        (500..800).contains(&per_mapping),
        "{per_mapping} bytes per mapping"
    );
}

/// The shipped Grafana dashboard only queries metrics natd exports.
#[test]
fn dashboard_uses_exported_names() {
    let dash = include_str!("../../../dist/grafana-dashboard.json");
    let exported = render(snapshot(vec![]));
    let mut checked = 0;
    for (i, _) in dash.match_indices("xdp_nat_") {
        let name: String = dash[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        assert!(
            exported.contains(&format!("# TYPE {name} ")),
            "dashboard uses {name}, which natd does not export"
        );
        checked += 1;
    }
    assert!(checked > 10);
}

/// The HTTP side, on a loopback port: GET /metrics answers the exposition with the text
/// format's content type, other methods 405, other paths 404, a failed read 500.
#[tokio::test]
async fn http_answers_get_metrics_only() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    async fn ask(addr: std::net::SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        s.write_all(request.as_bytes()).await.expect("sends");
        let mut out = String::new();
        s.read_to_string(&mut out).await.expect("reads");
        out
    }
    let (stop_tx, stop) = watch::channel(false);
    let mut addrs = Vec::new();
    for source in [Ok(snapshot(vec![mapping(10, 5)])), Err("boom".to_string())] {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        addrs.push(listener.local_addr().expect("bound"));
        let metrics = Arc::new(Metrics::new(Fixed(source)));
        tokio::spawn(serve(listener, metrics, stop.clone()));
    }
    let close = "Host: x\r\nConnection: close\r\n\r\n";
    let ok = ask(addrs[0], &format!("GET /metrics?x=1 HTTP/1.1\r\n{close}")).await;
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(
        ok.contains("content-type: text/plain; version=0.0.4; charset=utf-8\r\n"),
        "{ok}"
    );
    assert!(ok.contains("\r\n\r\n# HELP xdp_nat_build_info "), "{ok}");
    let post = ask(
        addrs[0],
        &format!("POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n{close}"),
    )
    .await;
    assert!(
        post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{post}"
    );
    let other = ask(addrs[0], &format!("GET / HTTP/1.1\r\n{close}")).await;
    assert!(other.starts_with("HTTP/1.1 404 Not Found\r\n"), "{other}");
    let failed = ask(addrs[1], &format!("GET /metrics HTTP/1.1\r\n{close}")).await;
    assert!(
        failed.starts_with("HTTP/1.1 500 Internal Server Error\r\n") && failed.ends_with("boom\n"),
        "{failed}"
    );
    let _ = stop_tx.send(true);
}
