//! `--manage-addresses`: each mapped public IP is added to the public interface whose subnet
//! contains it (as CloudStack's router does) and announced with a gratuitous ARP; it is removed
//! when the mapping goes. natd's addresses carry the label `IFNAME:xnat`, so natd only ever
//! removes addresses it added, also those an earlier natd left.
//!
//! Addresses are read and changed over rtnetlink. The gratuitous ARP is sent by `arping`: it
//! is a raw frame on a packet socket, which no maintained crate sends, and arping is the tool
//! routers (CloudStack's among them) use for it.
use std::{
    collections::BTreeMap,
    future::Future,
    net::{IpAddr, Ipv4Addr},
    process::Command,
};

use futures::TryStreamExt as _;
use log::{info, warn};
use rtnetlink::{
    Handle,
    packet_route::{
        AddressFamily,
        address::{AddressAttribute, AddressMessage},
    },
};

use crate::{cidr::Cidr, state::DesiredState};

const LABEL_SUFFIX: &str = ":xnat";

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("cannot open an rtnetlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("public interface {0} does not exist")]
    UnknownIface(String),
    #[error("listing the IPv4 addresses of {ifaces:?}: {source}")]
    List {
        ifaces: Vec<String>,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("adding {cidr} to {iface}: {source}")]
    Add {
        cidr: String,
        iface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("removing {cidr} from {iface}: {source}")]
    Remove {
        cidr: String,
        iface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("public IP {0} is in no subnet of the public interfaces {1:?}; cannot add it")]
    NoSubnet(Ipv4Addr, Vec<String>),
}

/// One IPv4 address on an interface, with the kernel's message for it (to delete it).
#[derive(Debug, Clone)]
struct Addr {
    iface: String,
    addr: Ipv4Addr,
    prefix: u8,
    ours: bool,
    message: AddressMessage,
}

/// Runs `job` with an rtnetlink handle on a thread of its own (natd calls this from
/// synchronous code that may itself run on the async runtime), in the caller's namespace.
/// `E` says how a socket that cannot be opened is reported.
pub(crate) fn with_netlink<T, E, F>(job: impl FnOnce(Handle) -> F + Send) -> Result<T, E>
where
    T: Send,
    E: Send + From<std::io::Error>,
    F: Future<Output = Result<T, E>>,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let (conn, handle, _) = rtnetlink::new_connection()?;
                let driver = tokio::spawn(conn);
                let out = job(handle).await;
                driver.abort();
                out
            })
        })
        .join()
        .unwrap_or_else(|_| {
            Err(E::from(std::io::Error::other(
                "the netlink thread panicked",
            )))
        })
    })
}

/// The IPv4 addresses of `ifaces`, interface by interface in that order.
async fn addresses(handle: &Handle, ifaces: &[String]) -> Result<Vec<Addr>, AddressError> {
    let index: BTreeMap<u32, &String> = ifaces
        .iter()
        .map(|i| {
            crate::ebpf::ifindex(i)
                .map(|n| (n, i))
                .map_err(|_| AddressError::UnknownIface(i.clone()))
        })
        .collect::<Result<_, _>>()?;
    let mut req = handle.address().get();
    req.message_mut().header.family = AddressFamily::Inet;
    let list = |source| AddressError::List {
        ifaces: ifaces.to_vec(),
        source: Box::new(source),
    };
    let mut dump = req.execute();
    let mut out = Vec::new();
    while let Some(m) = dump.try_next().await.map_err(list)? {
        let Some(iface) = index.get(&m.header.index) else {
            continue;
        };
        if m.header.family != AddressFamily::Inet {
            continue;
        }
        let mut addr = None;
        let mut ours = false;
        for a in &m.attributes {
            match a {
                AddressAttribute::Local(IpAddr::V4(a)) => addr = Some(*a),
                AddressAttribute::Address(IpAddr::V4(a)) => addr = addr.or(Some(*a)),
                AddressAttribute::Label(l) => ours = l.ends_with(LABEL_SUFFIX),
                _ => {}
            }
        }
        if let Some(addr) = addr {
            out.push(Addr {
                iface: (*iface).clone(),
                addr,
                prefix: m.header.prefix_len,
                ours,
                message: m,
            });
        }
    }
    out.sort_by_key(|a| ifaces.iter().position(|i| *i == a.iface));
    Ok(out)
}

/// The label of natd's addresses on `iface` (at most 15 bytes, as the kernel's IFNAMSIZ).
fn label(iface: &str) -> String {
    let room = 15 - LABEL_SUFFIX.len();
    let mut end = iface.len().min(room);
    while !iface.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{LABEL_SUFFIX}", &iface[..end])
}

/// Brings the public interfaces' addresses in line with `state`'s mapped public IPs.
pub fn sync(public_ifaces: &[String], state: &DesiredState) -> Result<(), AddressError> {
    let wanted: Vec<Ipv4Addr> = state.mappings().map(|m| m.public).collect();
    with_netlink(|handle| sync_with(handle, public_ifaces, wanted))
}

async fn sync_with(
    handle: Handle,
    public_ifaces: &[String],
    wanted: Vec<Ipv4Addr>,
) -> Result<(), AddressError> {
    let have = addresses(&handle, public_ifaces).await?;
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
        let mut req =
            handle
                .address()
                .add(subnet.message.header.index, IpAddr::V4(*p), subnet.prefix);
        req.message_mut()
            .attributes
            .push(AddressAttribute::Label(label(&iface)));
        req.execute().await.map_err(|source| AddressError::Add {
            cidr: cidr.clone(),
            iface: iface.clone(),
            source: Box::new(source),
        })?;
        info!("added {cidr} to {iface}");
        // Gratuitous ARP (RFC 5227 announcement) so neighbours learn where P now lives.
        announce(&iface, *p);
    }
    for a in have.iter().filter(|a| a.ours && !wanted.contains(&a.addr)) {
        let cidr = format!("{}/{}", a.addr, a.prefix);
        handle
            .address()
            .del(a.message.clone())
            .execute()
            .await
            .map_err(|source| AddressError::Remove {
                cidr: cidr.clone(),
                iface: a.iface.clone(),
                source: Box::new(source),
            })?;
        info!("removed {cidr} from {}", a.iface);
    }
    Ok(())
}

/// Sends one gratuitous ARP for `p` on `iface` with arping; a failure is only logged (the
/// address works without it, neighbours learn it on their next ARP request).
fn announce(iface: &str, p: Ipv4Addr) {
    let out = Command::new("arping")
        .args(["-U", "-c", "1", "-I", iface, &p.to_string()])
        .output();
    match out {
        Ok(o) if o.status.success() => info!("announced {p} on {iface} (gratuitous ARP)"),
        Ok(o) => warn!(
            "gratuitous ARP for {p} on {iface}: arping failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => warn!("gratuitous ARP for {p} on {iface}: cannot run arping: {e}"),
    }
}

/// Removes every address natd added (natd --detach-on-exit).
pub fn remove_all(public_ifaces: &[String]) -> Result<(), AddressError> {
    sync(public_ifaces, &DesiredState::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_fit_the_kernels_limit() {
        assert_eq!(label("pub0"), "pub0:xnat");
        assert_eq!(label("averyveryverylongname"), "averyveryv:xnat");
        assert!(label("averyveryverylongname").len() <= 15);
        // Cut at a character boundary.
        assert_eq!(label("eth2xéééé"), "eth2xéé:xnat");
    }
}
