//! Prometheus metrics: the text exposition format over a minimal HTTP/1.1 endpoint
//! (`GET /metrics`). Reading counters is map lookups of per-CPU values: the fast path never
//! waits for a scrape.
use std::{fmt::Write as _, sync::Arc};

use log::{info, warn};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Mutex, watch},
};

use crate::{api::StatsReport, daemon::Daemon};

/// Default `--metrics-addr`: loopback only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";
const PREFIX: &str = "xdp_nat";

/// Escapes a label value (exposition format: backslash, quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(
            self.0,
            "# HELP {PREFIX}_{name} {help}\n# TYPE {PREFIX}_{name} {kind}"
        );
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let l: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", esc(v)))
            .collect();
        if l.is_empty() {
            let _ = writeln!(self.0, "{PREFIX}_{name} {value}");
        } else {
            let _ = writeln!(self.0, "{PREFIX}_{name}{{{}}} {value}", l.join(","));
        }
    }
}

/// Renders every metric from one report.
pub fn render(s: &StatsReport, applied_at: u64) -> String {
    let mut o = Out(String::new());
    o.family("build_info", "gauge", "natd build; the value is always 1.");
    o.sample("build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1);

    o.family(
        "interface_xdp_mode",
        "gauge",
        "1 for each interface natd attached to, with its role and XDP mode.",
    );
    for i in &s.interfaces {
        let role = format!("{:?}", i.role).to_lowercase();
        let mode = i.mode.to_string();
        o.sample(
            "interface_xdp_mode",
            &[("interface", &i.name), ("role", &role), ("mode", &mode)],
            1,
        );
    }

    o.family(
        "state_generation",
        "gauge",
        "Changes applied to the desired state.",
    );
    o.sample("state_generation", &[], s.generation);
    o.family(
        "state_last_apply_timestamp_seconds",
        "gauge",
        "When the last change was applied (0: none since start).",
    );
    o.sample("state_last_apply_timestamp_seconds", &[], applied_at);

    o.family(
        "verdict_packets_total",
        "counter",
        "Frames the XDP program ended, by action and reason.",
    );
    for r in &s.reasons {
        o.sample(
            "verdict_packets_total",
            &[("action", &r.action), ("reason", &r.reason)],
            r.packets,
        );
    }
    o.family(
        "verdict_bytes_total",
        "counter",
        "Bytes of those frames, by action and reason.",
    );
    for r in &s.reasons {
        o.sample(
            "verdict_bytes_total",
            &[("action", &r.action), ("reason", &r.reason)],
            r.bytes,
        );
    }

    type Get = fn(&crate::ebpf::MappingCounters) -> [u64; 2];
    let per_mapping: [(&str, &str, Get); 3] = [
        (
            "mapping_packets_total",
            "Frames translated and forwarded by the fast path, per mapping and direction.",
            |c| [c.inbound_packets, c.outbound_packets],
        ),
        (
            "mapping_bytes_total",
            "Bytes of those frames, per mapping and direction.",
            |c| [c.inbound_bytes, c.outbound_bytes],
        ),
        (
            "mapping_denied_packets_total",
            "Frames of a mapping dropped by policy, per direction (inbound: the public IP's firewall; outbound: egress policy).",
            |c| [c.inbound_denied, c.outbound_denied],
        ),
    ];
    for (name, help, get) in per_mapping {
        o.family(name, "counter", help);
        for m in &s.mappings {
            let (p, v) = (m.public.to_string(), m.private.to_string());
            let [i, out] = get(&m.counters);
            o.sample(
                name,
                &[("public", &p), ("private", &v), ("direction", "inbound")],
                i,
            );
            o.sample(
                name,
                &[("public", &p), ("private", &v), ("direction", "outbound")],
                out,
            );
        }
    }
    o.family(
        "firewall_denied_packets_total",
        "counter",
        "Frames dropped by the ingress firewall, per public IP.",
    );
    for m in &s.mappings {
        o.sample(
            "firewall_denied_packets_total",
            &[("public", &m.public.to_string())],
            m.counters.inbound_denied,
        );
    }

    let c = &s.conntrack;
    o.family(
        "conntrack_entries",
        "gauge",
        "Flows in the connection table (as of the last collection).",
    );
    o.sample("conntrack_entries", &[], c.entries);
    o.family(
        "conntrack_capacity",
        "gauge",
        "Size of the connection table.",
    );
    o.sample("conntrack_capacity", &[], c.capacity);
    o.family(
        "conntrack_lookups_total",
        "counter",
        "Connection table lookups by result.",
    );
    o.sample("conntrack_lookups_total", &[("result", "hit")], c.hits);
    o.sample("conntrack_lookups_total", &[("result", "miss")], c.misses);
    o.family("conntrack_created_total", "counter", "Flows created.");
    o.sample("conntrack_created_total", &[], c.creates);
    o.family(
        "conntrack_expired_seen_total",
        "counter",
        "Lookups that found an expired flow.",
    );
    o.sample("conntrack_expired_seen_total", &[], c.expired_seen);
    o.family(
        "conntrack_removed_total",
        "counter",
        "Flows natd removed, by cause.",
    );
    o.sample(
        "conntrack_removed_total",
        &[("cause", "expired")],
        c.collected,
    );
    o.sample(
        "conntrack_removed_total",
        &[("cause", "flushed")],
        c.flushed,
    );
    o.family(
        "conntrack_evictions_total",
        "counter",
        "Flows the kernel evicted to make room (LRU).",
    );
    o.sample("conntrack_evictions_total", &[], c.evictions);
    o.0
}

/// Serves `GET /metrics` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    daemon: Arc<Mutex<Daemon>>,
    mut stop: watch::Receiver<bool>,
) {
    if let Ok(a) = listener.local_addr() {
        info!("metrics on http://{a}/metrics");
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let daemon = daemon.clone();
                    tokio::spawn(async move {
                        if let Err(e) = respond(stream, daemon).await {
                            warn!("metrics connection: {e}");
                        }
                    });
                }
                Err(e) => warn!("metrics accept: {e}"),
            },
            _ = stop.changed() => return,
        }
    }
}

async fn respond(mut stream: TcpStream, daemon: Arc<Mutex<Daemon>>) -> std::io::Result<()> {
    // The request head only (bounded); the body of a GET is empty.
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    let deadline = tokio::time::Duration::from_secs(5);
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        if n == buf.len() {
            return write(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
        match tokio::time::timeout(deadline, stream.read(&mut buf[n..])).await {
            Ok(Ok(0)) | Err(_) => return Ok(()),
            Ok(Ok(k)) => n += k,
            Ok(Err(e)) => return Err(e),
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    if method != "GET" {
        return write(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n",
        )
        .await;
    }
    if path != "/metrics" && !path.starts_with("/metrics?") {
        return write(&mut stream, "404 Not Found", "text/plain", "see /metrics\n").await;
    }
    let body = {
        let mut d = daemon.lock().await;
        let applied_at = d.ctl.applied_at();
        match d.stats(false) {
            Ok(s) => render(&s, applied_at),
            Err(e) => {
                return write(&mut stream, "500 Internal Server Error", "text/plain", &e).await;
            }
        }
    };
    write(
        &mut stream,
        "200 OK",
        "text/plain; version=0.0.4; charset=utf-8",
        &body,
    )
    .await
}

async fn write(
    stream: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{ConntrackStats, MappingStatus, ReasonStat},
        ebpf::MappingCounters,
    };

    #[test]
    fn exposition_names_types_and_labels() {
        let s = StatsReport {
            generation: 3,
            interfaces: vec![],
            reasons: vec![ReasonStat {
                reason: "inbound_forwarded".into(),
                action: "redirect".into(),
                packets: 5,
                bytes: 500,
            }],
            conntrack: ConntrackStats {
                entries: 1,
                capacity: 10,
                hits: 2,
                misses: 3,
                creates: 1,
                expired_seen: 0,
                collected: 0,
                flushed: 0,
                evictions: 0,
            },
            mappings: vec![MappingStatus {
                public: "203.0.113.10".parse().unwrap(),
                private: "10.0.0.10".parse().unwrap(),
                counters: MappingCounters {
                    inbound_packets: 5,
                    inbound_bytes: 500,
                    ..Default::default()
                },
            }],
        };
        let t = render(&s, 42);
        assert!(
            t.contains("# TYPE xdp_nat_mapping_packets_total counter\n"),
            "{t}"
        );
        assert!(t.contains("xdp_nat_mapping_packets_total{public=\"203.0.113.10\",private=\"10.0.0.10\",direction=\"inbound\"} 5\n"), "{t}");
        assert!(t.contains("xdp_nat_verdict_packets_total{action=\"redirect\",reason=\"inbound_forwarded\"} 5\n"), "{t}");
        assert!(
            t.contains("xdp_nat_state_last_apply_timestamp_seconds 42\n"),
            "{t}"
        );
        assert!(t.contains("xdp_nat_conntrack_capacity 10\n"), "{t}");
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    /// The shipped Grafana dashboard only queries metrics natd exports.
    #[test]
    fn dashboard_uses_exported_names() {
        let dash = include_str!("../../dist/grafana-dashboard.json");
        let exported = render(
            &StatsReport {
                generation: 0,
                interfaces: vec![],
                reasons: vec![],
                conntrack: ConntrackStats {
                    entries: 0,
                    capacity: 0,
                    hits: 0,
                    misses: 0,
                    creates: 0,
                    expired_seen: 0,
                    collected: 0,
                    flushed: 0,
                    evictions: 0,
                },
                mappings: vec![],
            },
            0,
        );
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
}
