//! The kernel's connection table as `--policy kernel` keeps it in step with the fast path: the
//! kernel's netfilter judges and tracks every flow, and the program carries the established
//! ones it learned without the kernel seeing their packets. So that the kernel never forgets
//! a flow the fast path carries (and `conntrack -L` stays true), natd refreshes the kernel's
//! timeout of every flow the fast path saw recently, and forgets the fast path's flows the
//! kernel ended.
//!
//! XDP carries TCP segments the kernel never sees, so the kernel's idea of each window stops
//! where the fast path took over: natd makes the kernel's TCP tracking liberal about windows
//! ([`make_tcp_liberal`]), as the kernel's own flowtable does for the flows it offloads.
//!
//! The flows' timers are the kernel's: natd takes the idle timeouts from the kernel's own
//! settings ([`kernel_timeouts`]), so a refreshed entry never has more time left than the
//! kernel would have given it had it seen the packets.
//!
//! Through the `conntrack` tool: no maintained Rust library speaks ctnetlink, and one
//! `conntrack -L` and one `conntrack -R -` (a batch of `-U` updates) per round is cheap next to
//! a round's interval.
use std::{
    collections::HashSet,
    io::Write as _,
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
};

use nat_common::{TIMEOUT_SLOTS, conntrack::Timeout};

/// `net.netfilter.nf_conntrack_tcp_be_liberal` of natd's network namespace.
pub const TCP_BE_LIBERAL: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal";
/// Where the kernel's connection tracking settings of natd's network namespace are.
const NETFILTER_SYSCTLS: &str = "/proc/sys/net/netfilter";

/// The kernel's setting (`net.netfilter.*`) of a timer slot's timeout; netfilter has none for
/// SYN_SENT2.
fn sysctl_of(t: Timeout) -> Option<&'static str> {
    Some(match t {
        Timeout::TcpSynSent => "nf_conntrack_tcp_timeout_syn_sent",
        Timeout::TcpSynRecv => "nf_conntrack_tcp_timeout_syn_recv",
        Timeout::TcpEstablished => "nf_conntrack_tcp_timeout_established",
        Timeout::TcpFinWait => "nf_conntrack_tcp_timeout_fin_wait",
        Timeout::TcpCloseWait => "nf_conntrack_tcp_timeout_close_wait",
        Timeout::TcpLastAck => "nf_conntrack_tcp_timeout_last_ack",
        Timeout::TcpTimeWait => "nf_conntrack_tcp_timeout_time_wait",
        Timeout::TcpClose => "nf_conntrack_tcp_timeout_close",
        Timeout::TcpSynSent2 => return None,
        Timeout::TcpRetrans => "nf_conntrack_tcp_timeout_max_retrans",
        Timeout::TcpUnack => "nf_conntrack_tcp_timeout_unacknowledged",
        Timeout::UdpUnreplied => "nf_conntrack_udp_timeout",
        Timeout::UdpReplied => "nf_conntrack_udp_timeout_stream",
        Timeout::Icmp => "nf_conntrack_icmp_timeout",
        Timeout::Other => "nf_conntrack_generic_timeout",
    })
}

/// `timeouts_ns` with every slot the kernel has a setting for replaced by the kernel's own,
/// from natd's network namespace (`--policy kernel`: the kernel's timers are the flows'
/// timers); a slot whose setting cannot be read keeps its value. Also returns the names of
/// the slots that changed, with the kernel's seconds.
pub fn kernel_timeouts(
    timeouts_ns: [u64; TIMEOUT_SLOTS],
) -> ([u64; TIMEOUT_SLOTS], Vec<(&'static str, u64)>) {
    kernel_timeouts_at(Path::new(NETFILTER_SYSCTLS), timeouts_ns)
}

fn kernel_timeouts_at(
    dir: &Path,
    mut timeouts_ns: [u64; TIMEOUT_SLOTS],
) -> ([u64; TIMEOUT_SLOTS], Vec<(&'static str, u64)>) {
    let mut changed = Vec::new();
    for t in Timeout::ALL {
        let Some(name) = sysctl_of(t) else {
            continue;
        };
        let secs = std::fs::read_to_string(dir.join(name))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&s| s > 0);
        if let Some(secs) = secs {
            let ns = secs.saturating_mul(1_000_000_000);
            if timeouts_ns[t as usize] != ns {
                timeouts_ns[t as usize] = ns;
                changed.push((t.name(), secs));
            }
        }
    }
    (timeouts_ns, changed)
}

/// A flow by its original tuple as the kernel tracks it (host order; ICMP: identifier and
/// type).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelFlow {
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelConntrackError {
    #[error("cannot run conntrack (is the conntrack package installed?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("conntrack {what} failed: {stderr}")]
    Failed { what: &'static str, stderr: String },
    #[error("{path} (is nf_conntrack loaded?): {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Makes the kernel's TCP connection tracking accept segments outside the windows it saw
/// ([`TCP_BE_LIBERAL`] = 1); returns whether it was off. Without it, the first segment of a
/// fast-path flow the kernel gets again after more than a window went through XDP (the FIN,
/// an RST, a fragment, a segment XDP cannot forward) is INVALID to it: not translated, and
/// dropped by any ruleset that admits only NEW and ESTABLISHED packets, so the connection
/// cannot close. The kernel's flowtable sets the same per flow (`IP_CT_TCP_FLAG_BE_LIBERAL`)
/// for the same reason.
pub fn make_tcp_liberal() -> Result<bool, KernelConntrackError> {
    make_liberal_at(Path::new(TCP_BE_LIBERAL))
}

fn make_liberal_at(path: &Path) -> Result<bool, KernelConntrackError> {
    let err = |source| KernelConntrackError::Sysctl {
        path: path.display().to_string(),
        source,
    };
    let now = std::fs::read_to_string(path).map_err(err)?;
    if now.trim() != "0" {
        return Ok(false);
    }
    std::fs::write(path, "1").map_err(err)?;
    Ok(true)
}

/// The original tuple of one line of `conntrack -L` (`None` for a protocol without ports the
/// fast path keys differently, or a line it cannot read).
fn parse_line(line: &str) -> Option<KernelFlow> {
    let mut words = line.split_whitespace();
    let _name = words.next()?;
    let proto: u8 = words.next()?.parse().ok()?;
    let (mut src, mut dst, mut sport, mut dport, mut ty, mut id) =
        (None, None, None, None, None, None);
    for w in words {
        let Some((k, v)) = w.split_once('=') else {
            continue;
        };
        // The first of each field belongs to the original tuple.
        match k {
            "src" if src.is_none() => src = v.parse().ok(),
            "dst" if dst.is_none() => dst = v.parse().ok(),
            "sport" if sport.is_none() => sport = v.parse().ok(),
            "dport" if dport.is_none() => dport = v.parse().ok(),
            "type" if ty.is_none() => ty = v.parse::<u16>().ok(),
            "id" if id.is_none() => id = v.parse().ok(),
            _ => {}
        }
    }
    // UDP-Lite and DCCP have ports where their kernel trackers exist; a kernel without one
    // (DCCP on 6.18) tracks them generically, without ports: not the fast path's flow.
    let (sport, dport) = match proto {
        6 | 17 | 33 | 136 => (sport?, dport?),
        1 => (id?, ty?),
        _ => (0, 0),
    };
    Some(KernelFlow {
        proto,
        src: src?,
        dst: dst?,
        sport,
        dport,
    })
}

/// Every IPv4 flow the kernel tracks, by original tuple.
pub fn list() -> Result<HashSet<KernelFlow>, KernelConntrackError> {
    let out = Command::new("conntrack")
        .args(["-L", "-f", "ipv4"])
        .stderr(Stdio::piped())
        .output()
        .map_err(KernelConntrackError::Spawn)?;
    if !out.status.success() {
        return Err(KernelConntrackError::Failed {
            what: "-L",
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(parse_line)
        .collect())
}

/// The `conntrack -R` line that sets the kernel's timeout of `f` to `secs`, and marks it
/// assured if `assured` (a status bit conntrack only ever sets).
fn update_line(f: &KernelFlow, secs: u64, assured: bool) -> String {
    let ports = match f.proto {
        6 | 17 | 33 | 136 => format!("--sport {} --dport {}", f.sport, f.dport),
        1 => format!("--icmp-type {} --icmp-id {}", f.dport, f.sport),
        _ => String::new(),
    };
    let status = if assured { " --status ASSURED" } else { "" };
    format!(
        "-U -p {} -s {} -d {} {ports} --timeout {secs}{status}\n",
        f.proto, f.src, f.dst
    )
}

/// Sets the kernel's timeouts of `flows` (seconds, at least 1) and marks those assured that
/// say so, in one batch. A flow the kernel no longer has is skipped.
pub fn refresh(flows: &[(KernelFlow, u64, bool)]) -> Result<(), KernelConntrackError> {
    if flows.is_empty() {
        return Ok(());
    }
    let script: String = flows
        .iter()
        .map(|(f, s, assured)| update_line(f, (*s).max(1), *assured))
        .collect();
    let mut child = Command::new("conntrack")
        .args(["-R", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(KernelConntrackError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(KernelConntrackError::Spawn)?;
    }
    let out = child
        .wait_with_output()
        .map_err(KernelConntrackError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(KernelConntrackError::Failed {
            what: "-R (timeout updates)",
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_original_tuple() {
        let tcp = "tcp      6 431999 ESTABLISHED src=10.0.0.10 dst=192.0.2.7 sport=40000 \
                   dport=80 src=192.0.2.7 dst=203.0.113.10 sport=80 dport=40000 [ASSURED] \
                   mark=0 use=1";
        assert_eq!(
            parse_line(tcp),
            Some(KernelFlow {
                proto: 6,
                src: "10.0.0.10".parse().unwrap(),
                dst: "192.0.2.7".parse().unwrap(),
                sport: 40000,
                dport: 80,
            })
        );
        let icmp = "icmp     1 29 src=10.0.0.10 dst=192.0.2.7 type=8 code=0 id=77 \
                    src=192.0.2.7 dst=203.0.113.10 type=0 code=0 id=77 mark=0 use=1";
        assert_eq!(parse_line(icmp).map(|f| (f.sport, f.dport)), Some((77, 8)));
        assert_eq!(parse_line("conntrack v1.4.7: 3 flow entries"), None);
        let udplite = "udplite  136 29 src=10.0.0.10 dst=192.0.2.7 sport=5000 dport=53 \
                       src=192.0.2.7 dst=203.0.113.10 sport=53 dport=5000 mark=0 use=1";
        assert_eq!(
            parse_line(udplite).map(|f| (f.proto, f.sport, f.dport)),
            Some((136, 5000, 53))
        );
        let generic_dccp = "unknown  33 599 src=10.0.0.10 dst=192.0.2.7 src=192.0.2.7 \
                            dst=203.0.113.10 mark=0 use=1";
        assert_eq!(parse_line(generic_dccp), None);
    }

    #[test]
    fn takes_the_kernels_timeouts() {
        let dir = std::env::temp_dir().join(format!("kct-timeouts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("nf_conntrack_udp_timeout_stream"), "10\n").unwrap();
        std::fs::write(dir.join("nf_conntrack_udp_timeout"), "30\n").unwrap();
        std::fs::write(dir.join("nf_conntrack_icmp_timeout"), "junk\n").unwrap();
        let defaults = Timeout::ALL.map(|t| t.default_secs() * 1_000_000_000);
        let (t, changed) = kernel_timeouts_at(&dir, defaults);
        assert_eq!(changed, [("udp_replied", 10)]);
        assert_eq!(t[Timeout::UdpReplied as usize], 10_000_000_000);
        assert_eq!(t[Timeout::UdpUnreplied as usize], 30_000_000_000);
        assert_eq!(t[Timeout::Icmp as usize], defaults[Timeout::Icmp as usize]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn makes_tcp_tracking_liberal_once() {
        let dir = std::env::temp_dir().join(format!("kct-liberal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("nf_conntrack_tcp_be_liberal");
        std::fs::write(&path, "0\n").unwrap();
        assert!(make_liberal_at(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), "1");
        assert!(!make_liberal_at(&path).unwrap());
        let missing = make_liberal_at(&dir.join("absent"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("absent (is nf_conntrack loaded?)"),
            "{missing}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_updates_conntrack_reads() {
        let f = KernelFlow {
            proto: 17,
            src: "10.0.0.10".parse().unwrap(),
            dst: "192.0.2.7".parse().unwrap(),
            sport: 5353,
            dport: 53,
        };
        assert_eq!(
            update_line(&f, 120, false),
            "-U -p 17 -s 10.0.0.10 -d 192.0.2.7 --sport 5353 --dport 53 --timeout 120\n"
        );
        assert_eq!(
            update_line(&f, 9, true),
            "-U -p 17 -s 10.0.0.10 -d 192.0.2.7 --sport 5353 --dport 53 --timeout 9 \
             --status ASSURED\n"
        );
    }
}
