//! What the hardening tests share: configs, a raw client for natd's control socket, the check
//! that natd is alive and answering, the pinned maps read from outside natd, CloudStack
//! payload builders and the liveness check that reports to `RELIABILITY.md`.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddrV4},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use aya::maps::{HashMap, Map, MapData};
use nat_common::NatValue;
use nat_tests::topology::{Natd, Topology};
use nat_userspace::api::{ErrorKind, Response};

/// P 203.0.113.10 <-> V 10.0.0.10 and no rules: P is closed.
pub const ONE_MAPPING: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n";
/// [`ONE_MAPPING`] with TCP, UDP and ICMP to P allowed from anywhere.
pub const ONE_MAPPING_OPEN: &str = "[[mapping]]\npublic = \"203.0.113.10\"\nprivate = \"10.0.0.10\"\n\
                                    [[rule]]\npublic = \"203.0.113.10\"\nproto = \"tcp\"\n\
                                    [[rule]]\npublic = \"203.0.113.10\"\nproto = \"udp\"\n\
                                    [[rule]]\npublic = \"203.0.113.10\"\nproto = \"icmp\"\n";
/// How long natd may take to answer a plain request after hostile traffic, on a loaded CI
/// machine; it answers in milliseconds when idle.
pub const PROMPT: Duration = Duration::from_secs(3);

pub fn at(addr: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(addr, port)
}

pub use nat_tests::reliability::Figures;

/// [`answers_promptly`], counted in `fig`: one more check of natd, one more failure if it
/// failed, and the slowest answer so far (ms).
pub fn alive(natd: &mut Natd, fig: &mut Figures, after: &str) -> anyhow::Result<Duration> {
    const CHECKS: &str = "checks that natd runs and answers within 3 s";
    const FAILED: &str = "checks that found natd exited, stalled or panicked";
    const SLOWEST: &str = "slowest answer to natctl status (ms)";
    fig.add(CHECKS, 1);
    fig.add(FAILED, 0);
    match answers_promptly(natd, after) {
        Ok(took) => {
            let ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
            fig.set(SLOWEST, fig.get(SLOWEST).max(ms));
            Ok(took)
        }
        Err(e) => {
            fig.add(FAILED, 1);
            Err(e)
        }
    }
}

/// Fails unless natd still runs and answers `natctl status` within [`PROMPT`]; returns how
/// long the answer took.
pub fn answers_promptly(natd: &mut Natd, after: &str) -> anyhow::Result<Duration> {
    ensure!(
        natd.is_running()?,
        "natd exited after {after}:\n{}",
        natd.log_text()
    );
    let start = Instant::now();
    natd.natctl()?
        .ok(&["status", "--json"])
        .with_context(|| format!("natctl status after {after}"))?;
    let took = start.elapsed();
    ensure!(
        took <= PROMPT,
        "natctl status took {took:?} after {after} (more than {PROMPT:?})"
    );
    ensure!(
        !natd.log_text().contains("panicked"),
        "natd panicked after {after}:\n{}",
        natd.log_text()
    );
    Ok(took)
}

/// A connection to natd's control socket that sends raw bytes, with bounded reads.
pub struct RawClient {
    stream: UnixStream,
}

impl RawClient {
    pub fn connect(socket: &Path) -> anyhow::Result<Self> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self { stream })
    }

    /// A second handle on the same connection (for a writer thread).
    pub fn try_clone_stream(&self) -> anyhow::Result<UnixStream> {
        self.stream.try_clone().context("cloning the connection")
    }

    pub fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).context("writing a request")
    }

    /// Ends the request stream (the peer reads end of file).
    pub fn close_write(&self) -> anyhow::Result<()> {
        self.stream.shutdown(Shutdown::Write).context("shutdown")
    }

    /// The next reply line, parsed; `None` if natd closed the connection without one.
    pub fn reply(&mut self) -> anyhow::Result<Option<Response>> {
        let mut line = String::new();
        BufReader::new(&mut self.stream)
            .read_line(&mut line)
            .context("reading natd's reply")?;
        if line.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&line)
            .map(Some)
            .with_context(|| format!("natd's reply is not a Response: {line:?}"))
    }

    /// Reads `n` reply lines (pipelined requests), parsed.
    pub fn replies(&mut self, n: usize) -> anyhow::Result<Vec<Response>> {
        let mut reader = BufReader::new(&mut self.stream);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let mut line = String::new();
            reader
                .read_line(&mut line)
                .with_context(|| format!("reading reply {i}"))?;
            ensure!(!line.is_empty(), "natd closed after {i} of {n} replies");
            out.push(serde_json::from_str(&line).with_context(|| format!("reply {line:?}"))?);
        }
        Ok(out)
    }
}

/// The error message of `resp`, which must be a refusal (hostile input is bad input, never a
/// failure of natd's), or a failure naming `what` if natd accepted it.
pub fn error_message(resp: Option<Response>, what: &str) -> anyhow::Result<String> {
    match resp {
        Some(Response::Error {
            message,
            kind: ErrorKind::Refused,
        }) => Ok(message),
        Some(Response::Error {
            message,
            kind: ErrorKind::Failed,
        }) => anyhow::bail!("natd failed (rather than refused) {what}: {message}"),
        Some(Response::Ok(reply)) => anyhow::bail!("natd accepted {what}: {reply:?}"),
        None => anyhow::bail!("natd closed the connection without answering {what}"),
    }
}

/// The public addresses in natd's pinned `map` (`NAT_IN`: public IPs; `NAT_OUT`: private IPs),
/// read from bpffs without natd: what the fast path holds.
pub fn pinned_keys(topo: &Topology, map: &str) -> anyhow::Result<BTreeSet<Ipv4Addr>> {
    let path = Natd::pin_dir(topo).join("maps").join(map);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let m: HashMap<MapData, u32, NatValue> = Map::from_map_data(data)?.try_into()?;
    m.keys()
        .map(|k| Ok(Ipv4Addr::from(k?.to_ne_bytes())))
        .collect::<Result<_, aya::maps::MapError>>()
        .with_context(|| format!("reading {}", path.display()))
}

/// natd's state file in `topo`'s private state directory.
pub fn state_file(topo: &Topology) -> PathBuf {
    topo.dir.path().join("state").join("state.json")
}

/// The mappings the state file holds, as (public, private).
pub fn state_file_mappings(topo: &Topology) -> anyhow::Result<BTreeSet<(Ipv4Addr, Ipv4Addr)>> {
    let path = state_file(topo);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let snap: nat_userspace::persist::Snapshot =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(snap
        .mappings
        .iter()
        .map(|m| (m.public, m.private))
        .collect())
}

/// A `staticnatrules` payload mapping each (public, private) pair, or revoking it.
pub fn static_nat_payload(pairs: &[(Ipv4Addr, Ipv4Addr)], revoke: bool) -> String {
    let rules: Vec<_> = pairs
        .iter()
        .map(|(p, v)| {
            serde_json::json!({
                "revoke": revoke,
                "source_ip_address": p.to_string(),
                "destination_ip_address": v.to_string(),
            })
        })
        .collect();
    serde_json::json!({ "type": "staticnatrules", "rules": rules }).to_string()
}

/// One ingress rule of a `firewallrules` payload: `proto` to `public`, `ports` for tcp/udp,
/// from `cidrs` (empty: from nowhere, the rule allows nothing, as on CloudStack's router).
pub fn ingress_rule(
    id: u64,
    public: Ipv4Addr,
    proto: &str,
    ports: Option<(u16, u16)>,
    cidrs: &[String],
) -> serde_json::Value {
    let mut r = serde_json::json!({
        "id": id,
        "src_ip": public.to_string(),
        "protocol": proto,
        "revoked": false,
        "source_cidr_list": cidrs,
        "traffic_type": "Ingress",
    });
    if let Some((first, last)) = ports {
        r["src_port_range"] = serde_json::json!([first, last]);
    }
    r
}

/// A `firewallrules` payload of `rules`.
pub fn firewall_payload(rules: Vec<serde_json::Value>) -> String {
    serde_json::json!({ "type": "firewallrules", "rules": rules }).to_string()
}

/// Writes `payload` to `name` in the scratch directory; returns its path as natctl takes it.
pub fn payload_file(topo: &Topology, name: &str, payload: &str) -> anyhow::Result<String> {
    let path = topo.dir.path().join(name);
    std::fs::write(&path, payload).with_context(|| format!("writing {}", path.display()))?;
    Ok(path.display().to_string())
}

/// A small, seedable pseudo-random sequence (xorshift64*), so a failing run can be repeated
/// with the seed it printed.
pub struct Rng(u64);

impl Rng {
    /// From `$var` if set, else from the clock; prints the seed.
    pub fn from_env(var: &str) -> Self {
        let seed = std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("random seed {seed} (repeat with {var}={seed})");
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
