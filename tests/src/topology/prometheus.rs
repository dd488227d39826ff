//! A real Prometheus server (Debian's `prometheus`) in a namespace of the topology, scraping
//! targets there; its HTTP API queried from the same namespace; `promtool check metrics`; and
//! a minimal HTTP GET over a socket made in a namespace. The server keeps its configuration and
//! its database in a directory of its own, listens on loopback only, and is stopped on drop
//! (SIGTERM, a bounded wait, then SIGKILL).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use super::{COMMAND_TIMEOUT, Netns};

/// How long Prometheus may take to become ready.
pub const PROMETHEUS_START: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(100);

/// `GET path` from `addr`, on a socket made in `ns`; the status code and the body.
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut conn = ns
        .run(|| TcpStream::connect_timeout(&addr, COMMAND_TIMEOUT))?
        .with_context(|| format!("connecting to {addr} in {}", ns.name()))?;
    conn.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    conn.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to GET {path} from {addr}"))?;
    let text = String::from_utf8(raw).with_context(|| format!("GET {path}: not UTF-8"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("GET {path}: no end of headers in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {path}: no status in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(body).with_context(|| format!("GET {path}: bad chunked body"))?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").context("no chunk size line")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        ensure!(rest.len() >= size + 2, "chunk of {size} bytes cut short");
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

/// Runs `promtool check metrics` on `exposition`; its exit status and combined output.
pub fn promtool_check_metrics(exposition: &str) -> anyhow::Result<(bool, String)> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run promtool (Debian package prometheus; `cargo xtask setup`)")?;
    let mut stdin = child.stdin.take().context("promtool's stdin")?;
    let text = exposition.to_string();
    let feeder = std::thread::spawn(move || stdin.write_all(text.as_bytes()));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    while child.try_wait()?.is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("promtool did not finish within {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = feeder.join();
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    ))
}

/// A Prometheus server in a namespace; stopped on drop.
pub struct Prometheus<'a> {
    child: Child,
    listen: SocketAddr,
    log: PathBuf,
    ns: &'a Netns,
}

impl<'a> Prometheus<'a> {
    /// Starts Prometheus in `ns`, scraping `targets` every `interval`, with its configuration,
    /// database and log under `dir` (created), and waits until it is ready. It listens on
    /// `listen`, which should be a loopback address of `ns`.
    pub fn start(
        ns: &'a Netns,
        dir: &Path,
        listen: SocketAddr,
        targets: &[SocketAddr],
        interval: Duration,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let secs = interval.as_secs_f64();
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: {secs}s\n  evaluation_interval: {secs}s\n\
             scrape_configs:\n  - job_name: natd\n    scrape_interval: {secs}s\n    \
             scrape_timeout: {secs}s\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log = dir.join("prometheus.log");
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        // nsenter execs prometheus, so the child's pid is prometheus's.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("cannot start prometheus (Debian package prometheus; `cargo xtask setup`)")?;
        let mut p = Self {
            child,
            listen,
            log,
            ns,
        };
        let deadline = Instant::now() + PROMETHEUS_START;
        loop {
            if let Some(status) = p.child.try_wait()? {
                bail!("prometheus exited ({status}):\n{}", p.log_text());
            }
            if let Ok((200, _)) = p.get("/-/ready") {
                return Ok(p);
            }
            ensure!(
                Instant::now() < deadline,
                "prometheus was not ready within {PROMETHEUS_START:?}:\n{}",
                p.log_text()
            );
            std::thread::sleep(POLL);
        }
    }

    fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        http_get(self.ns, self.listen, path)
    }

    /// Evaluates the instant query `promql`; the value of each series in the result, as
    /// Prometheus printed it, with the series' labels.
    pub fn query(&self, promql: &str) -> anyhow::Result<Vec<(serde_json::Value, String)>> {
        let path = format!("/api/v1/query?query={}", url_encode(promql));
        let (status, body) = self.get(&path)?;
        ensure!(status == 200, "query {promql:?}: HTTP {status}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("query {promql:?}: {body}"))?;
        ensure!(v["status"] == "success", "query {promql:?}: {body}");
        let mut out = Vec::new();
        for r in v["data"]["result"].as_array().into_iter().flatten() {
            let value = r["value"][1]
                .as_str()
                .with_context(|| format!("query {promql:?}: no value in {r}"))?;
            out.push((r["metric"].clone(), value.to_string()));
        }
        Ok(out)
    }

    /// Polls `promql` until `done` holds for its result (returned) or `timeout` passed (an
    /// error with the last result and the scrape targets' health).
    pub fn wait_for(
        &self,
        promql: &str,
        timeout: Duration,
        done: impl Fn(&[(serde_json::Value, String)]) -> bool,
    ) -> anyhow::Result<Vec<(serde_json::Value, String)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let result = self.query(promql)?;
            if done(&result) {
                return Ok(result);
            }
            if Instant::now() >= deadline {
                let targets = self.get("/api/v1/targets").map(|(_, b)| b);
                bail!(
                    "query {promql:?}: not as expected within {timeout:?}; \
                     last result {result:?}; targets {targets:?}"
                );
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: plain syscall; `pid` is our own child, not yet reaped.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while let Ok(None) = self.child.try_wait() {
                if Instant::now() >= deadline {
                    eprintln!("cleanup: prometheus ignored SIGTERM; killing it");
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "---- prometheus log ----\n{}---- end of prometheus log ----",
                self.log_text()
            );
        }
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
