//! A raw IPv4 socket for one protocol in a namespace: it sends that protocol's packets whole
//! (the kernel adds the IPv4 header, and fragments what does not fit the link) and receives a
//! copy of every packet of that protocol the namespace receives, reassembled, with the
//! addresses it arrived with and whether its checksums hold for them
//! ([`crate::packet::verify_checksums`]), whether or not any socket of the protocol listens.
use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use super::{Netns, observe::ARRIVAL, sock};

/// A packet a [`Sniffer`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// The transport header and payload.
    pub l4: Vec<u8>,
    /// Every checksum holds for the addresses it arrived with, or the first that does not.
    pub checksums: Result<(), String>,
}

/// A raw socket for one IP protocol in one namespace.
pub struct Sniffer {
    fd: OwnedFd,
    proto: u8,
}

impl Sniffer {
    pub fn open_in(ns: &Netns, proto: u8) -> anyhow::Result<Self> {
        ns.run(|| {
            let fd = sock::open(
                libc::AF_INET,
                libc::SOCK_RAW,
                libc::c_int::from(proto),
                &format!("raw IP protocol {proto}"),
            )?;
            sock::receive_timeout(&fd, Duration::from_millis(50))?;
            Ok(Self { fd, proto })
        })?
    }

    /// Sends from `addr` (one of the namespace's addresses) rather than the address the
    /// kernel would choose.
    pub fn bind_source(&self, addr: Ipv4Addr) -> anyhow::Result<()> {
        sock::bind(&self.fd, std::net::SocketAddrV4::new(addr, 0))
    }

    /// Sends `l4` (a whole transport packet, checksum included) to `dst`.
    pub fn send(&self, l4: &[u8], dst: Ipv4Addr) -> anyhow::Result<()> {
        sock::raw_send(
            &self.fd,
            l4,
            dst,
            &format!("protocol {} to {dst}", self.proto),
        )
    }

    /// Sends `l4` to `dst` with IP options `options` (`IP_OPTIONS` for this one packet: set,
    /// sent, cleared).
    pub fn send_with_options(
        &self,
        l4: &[u8],
        dst: Ipv4Addr,
        options: &[u8],
    ) -> anyhow::Result<()> {
        self.set_options(options)?;
        let sent = self.send(l4, dst);
        self.set_options(&[])?;
        sent
    }

    fn set_options(&self, options: &[u8]) -> anyhow::Result<()> {
        // SAFETY: valid fd and a buffer of the given length.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                options.as_ptr().cast(),
                options.len() as libc::socklen_t,
            )
        };
        anyhow::ensure!(rc == 0, "IP_OPTIONS: {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// Receives until a packet matching `stop` arrived or [`ARRIVAL`] passed; returns every
    /// packet received, the one that matched last.
    pub fn until(&self, stop: impl Fn(&Seen) -> bool) -> Vec<Seen> {
        self.collect_until(stop, Instant::now() + ARRIVAL)
    }

    /// Every packet already received (waits no longer than one receive timeout, 50 ms, for
    /// the queue to run dry).
    pub fn pending(&self) -> Vec<Seen> {
        self.collect_until(|_| false, Instant::now())
    }

    /// Receives until a packet matching `stop` arrived, or a receive timed out after
    /// `deadline` (or, should packets never stop coming, a second after it).
    fn collect_until(&self, stop: impl Fn(&Seen) -> bool, deadline: Instant) -> Vec<Seen> {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 65536];
        let last = deadline + Duration::from_secs(1);
        while Instant::now() < last {
            // SAFETY: valid fd; the buffer outlives the call and its length is passed.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else {
                if Instant::now() >= deadline {
                    break;
                }
                continue;
            };
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            if n < 20 || n < ihl {
                continue;
            }
            let octets = |at: usize| Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3]);
            // verify_checksums reads a frame: an Ethernet header first.
            let mut frame = vec![0u8; 14];
            frame.extend_from_slice(&buf[..n]);
            let p = Seen {
                src: octets(12),
                dst: octets(16),
                l4: buf[ihl..n].to_vec(),
                checksums: crate::packet::verify_checksums(&frame),
            };
            let done = stop(&p);
            seen.push(p);
            if done {
                break;
            }
        }
        seen
    }
}
