//! The kernel's connection table as `--policy kernel` keeps it in step with the fast path: the
//! kernel's netfilter judges and tracks every flow, and the program carries the established
//! ones it learned without the kernel seeing their packets. So that the kernel never forgets
//! a flow the fast path carries (and `conntrack -L` stays true), natd refreshes the kernel's
//! timeout of every flow the fast path saw recently, and forgets the fast path's flows the
//! kernel ended.
//!
//! Through the `conntrack` tool: no maintained Rust library speaks ctnetlink, and one
//! `conntrack -L` and one `conntrack -R -` (a batch of `-U` updates) per round is cheap next to
//! a round's interval.
use std::{
    collections::HashSet,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

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
    let (sport, dport) = match proto {
        6 | 17 => (sport?, dport?),
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

/// The `conntrack -R` line that sets the kernel's timeout of `f` to `secs`.
fn update_line(f: &KernelFlow, secs: u64) -> String {
    let ports = match f.proto {
        6 | 17 => format!("--sport {} --dport {}", f.sport, f.dport),
        1 => format!("--icmp-type {} --icmp-id {}", f.dport, f.sport),
        _ => String::new(),
    };
    format!(
        "-U -p {} -s {} -d {} {ports} --timeout {secs}\n",
        f.proto, f.src, f.dst
    )
}

/// Sets the kernel's timeouts of `flows` (seconds, at least 1), in one batch. A flow the
/// kernel no longer has is skipped.
pub fn refresh(flows: &[(KernelFlow, u64)]) -> Result<(), KernelConntrackError> {
    if flows.is_empty() {
        return Ok(());
    }
    let script: String = flows
        .iter()
        .map(|(f, s)| update_line(f, (*s).max(1)))
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
            update_line(&f, 120),
            "-U -p 17 -s 10.0.0.10 -d 192.0.2.7 --sport 5353 --dport 53 --timeout 120\n"
        );
    }
}
