//! What a namespace holds, read with `ip -j` (sysfs shows the mount namespace's view, not the
//! thread's network namespace, so it is not used) and `/proc/net/snmp` read from inside.
use std::net::Ipv4Addr;

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::Netns;
use crate::mac::parse_mac;

/// A link as `ip -j link show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// An IPv4 address as `ip -j addr` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddrInfo {
    pub addr: Ipv4Addr,
    pub prefix: u8,
    pub label: Option<String>,
}

/// A neighbour entry as `ip -j neigh` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub lladdr: Option<String>,
    pub state: Vec<String>,
}

fn link_info(l: &Value) -> anyhow::Result<LinkInfo> {
    let name = l["ifname"].as_str().context("ifname")?.to_string();
    let ifindex = l["ifindex"]
        .as_u64()
        .and_then(|i| u32::try_from(i).ok())
        .with_context(|| format!("{name}: ifindex"))?;
    let mac = parse_mac(
        l["address"]
            .as_str()
            .with_context(|| format!("{name}: address"))?,
    )?;
    Ok(LinkInfo { name, ifindex, mac })
}

impl Netns {
    /// `ip -n NAME -j ARGS...`, parsed (an empty array where `ip` prints nothing).
    pub fn ip_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = vec!["-j"];
        all.extend(args);
        let out = self.ip(&all)?;
        // `ip -j` prints nothing at all for an empty neighbour list.
        if out.trim().is_empty() {
            return Ok(Value::Array(Vec::new()));
        }
        serde_json::from_str(&out).with_context(|| format!("parsing `ip {}`: {out}", all.join(" ")))
    }

    /// ifindex and MAC of `dev`.
    pub fn link(&self, dev: &str) -> anyhow::Result<(u32, [u8; 6])> {
        let v = self.ip_json(&["link", "show", "dev", dev])?;
        let l = link_info(&v[0]).with_context(|| format!("`ip -j link show dev {dev}`"))?;
        Ok((l.ifindex, l.mac))
    }

    /// Every link of the namespace.
    pub fn links(&self) -> anyhow::Result<Vec<LinkInfo>> {
        let v = self.ip_json(&["link", "show"])?;
        v.as_array()
            .context("ip -j link: not an array")?
            .iter()
            .map(|l| link_info(l).context("`ip -j link show`"))
            .collect()
    }

    /// The MAC address of `dev` (lower case, colon separated).
    pub fn mac(&self, dev: &str) -> anyhow::Result<String> {
        let v = self.ip_json(&["link", "show", "dev", dev])?;
        v[0]["address"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("`ip -j link show dev {dev}`: no address in {v}"))
    }

    /// The IPv4 addresses of `dev`.
    pub fn ipv4_addrs(&self, dev: &str) -> anyhow::Result<Vec<AddrInfo>> {
        let v = self.ip_json(&["-4", "addr", "show", "dev", dev])?;
        let mut out = Vec::new();
        for a in v
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|i| i["addr_info"].as_array().into_iter().flatten())
        {
            let parse = || -> Option<AddrInfo> {
                Some(AddrInfo {
                    addr: a["local"].as_str()?.parse().ok()?,
                    prefix: u8::try_from(a["prefixlen"].as_u64()?).ok()?,
                    label: a["label"].as_str().map(str::to_string),
                })
            };
            out.push(parse().with_context(|| format!("`ip -j addr show dev {dev}`: {a}"))?);
        }
        Ok(out)
    }

    /// The neighbour entry of `addr` on `dev`, if there is one.
    pub fn neighbour(&self, addr: Ipv4Addr, dev: &str) -> anyhow::Result<Option<Neighbour>> {
        let a = addr.to_string();
        let v = self.ip_json(&["neigh", "show", "to", &a, "dev", dev])?;
        Ok(v.as_array().and_then(|l| l.first()).map(|n| Neighbour {
            lladdr: n["lladdr"].as_str().map(str::to_string),
            state: n["state"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect(),
        }))
    }

    /// This namespace's IPv4 MIB counter `name` (`ReasmOKs`, `InReceives`, ...) from
    /// `/proc/net/snmp`, which shows the namespace of the process reading it.
    pub fn ip_counter(&self, name: &str) -> anyhow::Result<u64> {
        let text = self.exec("cat", &["/proc/net/snmp"])?;
        let mut ip = text.lines().filter(|l| l.starts_with("Ip: "));
        let (Some(names), Some(values)) = (ip.next(), ip.next()) else {
            bail!("/proc/net/snmp has no Ip lines:\n{text}");
        };
        let i = names
            .split_whitespace()
            .position(|n| n == name)
            .with_context(|| format!("/proc/net/snmp has no Ip counter {name}: {names}"))?;
        values
            .split_whitespace()
            .nth(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("/proc/net/snmp: no value for {name}: {values}"))
    }
}
