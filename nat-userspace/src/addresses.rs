//! `--manage-addresses`: each mapped public IP is added to the public interface whose subnet
//! contains it (as CloudStack's router does) and announced with a gratuitous ARP; it is removed
//! when the mapping goes. natd's addresses carry the label `IFNAME:xnat`, so natd only ever
//! removes addresses it added, also those an earlier natd left.
use std::{net::Ipv4Addr, process::Command};

use log::{info, warn};
use serde::Deserialize;

use crate::{cidr::Cidr, state::DesiredState};

const LABEL_SUFFIX: &str = ":xnat";

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("cannot run {0}: {1}")]
    Spawn(&'static str, std::io::Error),
    #[error("{cmd} failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("public IP {0} is in no subnet of the public interfaces {1:?}; cannot add it")]
    NoSubnet(Ipv4Addr, Vec<String>),
}

#[derive(Deserialize)]
struct IpAddrShow {
    ifname: String,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Deserialize)]
struct AddrInfo {
    family: String,
    local: String,
    prefixlen: u8,
    #[serde(default)]
    label: Option<String>,
}

/// One IPv4 address on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Addr {
    iface: String,
    addr: Ipv4Addr,
    prefix: u8,
    ours: bool,
}

fn run(cmd: &'static str, args: &[&str]) -> Result<String, AddressError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| AddressError::Spawn(cmd, e))?;
    if !out.status.success() {
        return Err(AddressError::Failed {
            cmd: format!("{cmd} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn addresses(ifaces: &[String]) -> Result<Vec<Addr>, AddressError> {
    let mut out = Vec::new();
    for i in ifaces {
        let json = run("ip", &["-j", "-4", "addr", "show", "dev", i])?;
        let shown: Vec<IpAddrShow> =
            serde_json::from_str(&json).map_err(|e| AddressError::Failed {
                cmd: format!("ip -j -4 addr show dev {i}"),
                stderr: e.to_string(),
            })?;
        for s in shown {
            for a in s.addr_info.into_iter().filter(|a| a.family == "inet") {
                if let Ok(addr) = a.local.parse() {
                    let ours = a
                        .label
                        .as_deref()
                        .is_some_and(|l| l.ends_with(LABEL_SUFFIX));
                    out.push(Addr {
                        iface: s.ifname.clone(),
                        addr,
                        prefix: a.prefixlen,
                        ours,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Brings the public interfaces' addresses in line with `state`'s mapped public IPs.
pub fn sync(public_ifaces: &[String], state: &DesiredState) -> Result<(), AddressError> {
    let have = addresses(public_ifaces)?;
    let wanted: Vec<Ipv4Addr> = state.mappings().map(|m| m.public).collect();
    for p in &wanted {
        if have.iter().any(|a| a.addr == *p) {
            continue;
        }
        let host = Cidr::new(*p, 32).unwrap_or(Cidr::ANY);
        let subnet = have
            .iter()
            .filter(|a| !a.ours)
            .find(|a| Cidr::new(a.addr, a.prefix).is_some_and(|c| c.contains(&host)))
            .ok_or_else(|| AddressError::NoSubnet(*p, public_ifaces.to_vec()))?;
        let (iface, cidr) = (subnet.iface.clone(), format!("{p}/{}", subnet.prefix));
        let label = format!(
            "{}{LABEL_SUFFIX}",
            iface
                .chars()
                .take(15 - LABEL_SUFFIX.len())
                .collect::<String>()
        );
        run(
            "ip",
            &["addr", "add", &cidr, "dev", &iface, "label", &label],
        )?;
        info!("added {cidr} to {iface}");
        // Gratuitous ARP (RFC 5227 announcement) so neighbours learn where P now lives.
        match run("arping", &["-U", "-c", "1", "-I", &iface, &p.to_string()]) {
            Ok(_) => info!("announced {p} on {iface} (gratuitous ARP)"),
            Err(e) => warn!("gratuitous ARP for {p} on {iface}: {e}"),
        }
    }
    for a in have.iter().filter(|a| a.ours && !wanted.contains(&a.addr)) {
        let cidr = format!("{}/{}", a.addr, a.prefix);
        run("ip", &["addr", "del", &cidr, "dev", &a.iface])?;
        info!("removed {cidr} from {}", a.iface);
    }
    Ok(())
}

/// Removes every address natd added (natd --detach-on-exit).
pub fn remove_all(public_ifaces: &[String]) -> Result<(), AddressError> {
    sync(public_ifaces, &DesiredState::default())
}
