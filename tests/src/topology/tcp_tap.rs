//! TCP segments as one end meets them, and forged ones: a raw `IPPROTO_TCP` socket bound to a
//! namespace's address receives a copy of every TCP segment delivered to that address, before
//! the namespace's TCP stack judges it (so also one the stack ignores as out of its window),
//! and sends segments the test builds from that address (the kernel adds the IPv4 header).
//! A test learns a connection's sequence numbers from what each end received, and spoofs an
//! RST or FIN with the connection's 4-tuple.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::{Netns, observe::ARRIVAL, sock};
use crate::packet::{TCP_FIN, TCP_SYN, tcp_seq};

/// A TCP segment one end received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// Payload bytes (a GRO-merged segment counts them all).
    pub len: u32,
}

impl Segment {
    /// The sequence number after this segment: SYN and FIN take one each (RFC 9293 §3.4).
    pub fn end(&self) -> u32 {
        let one = |bit: u8| u32::from(self.flags & bit != 0);
        self.seq
            .wrapping_add(self.len)
            .wrapping_add(one(TCP_SYN))
            .wrapping_add(one(TCP_FIN))
    }

    /// Whether it went `from` -> `to` (addresses and ports as they arrived).
    pub fn is(&self, from: SocketAddrV4, to: SocketAddrV4) -> bool {
        (self.src, self.dst) == (from, to)
    }

    /// Parses an IPv4 packet carrying TCP, as a raw socket receives it.
    fn parse(p: &[u8]) -> Option<Self> {
        let ihl = usize::from(*p.first()? & 0x0f) * 4;
        let t = p.get(ihl..)?;
        let doff = usize::from(*t.get(12)? >> 4) * 4;
        let word = |b: &[u8], at: usize| -> Option<u32> {
            Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
        };
        let port = |at: usize| -> Option<u16> {
            Some(u16::from_be_bytes(t.get(at..at + 2)?.try_into().ok()?))
        };
        Some(Self {
            src: SocketAddrV4::new(Ipv4Addr::from(word(p, 12)?), port(0)?),
            dst: SocketAddrV4::new(Ipv4Addr::from(word(p, 16)?), port(2)?),
            seq: word(t, 4)?,
            ack: word(t, 8)?,
            flags: *t.get(13)?,
            len: u32::try_from(t.len().checked_sub(doff)?).ok()?,
        })
    }
}

/// Whether sequence number `a` lies after `b` (RFC 1982 serial arithmetic).
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The TCP segments delivered to one address of a namespace, and a sender of forged ones
/// from it.
pub struct TcpTap {
    fd: OwnedFd,
    local: Ipv4Addr,
    seen: Vec<Segment>,
}

impl TcpTap {
    /// A tap on `local`, an address of `ns`.
    pub fn open_in(ns: &Netns, local: Ipv4Addr) -> anyhow::Result<Self> {
        let fd = ns
            .run(|| -> anyhow::Result<OwnedFd> {
                let fd = sock::open(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP, "raw TCP")?;
                sock::bind(&fd, SocketAddrV4::new(local, 0))?;
                sock::receive_timeout(&fd, Duration::from_millis(50))?;
                Ok(fd)
            })?
            .with_context(|| format!("a TCP tap on {local} in {}", ns.name()))?;
        Ok(Self {
            fd,
            local,
            seen: Vec::new(),
        })
    }

    /// Receives one segment, waiting at most the socket's short timeout if `wait`; `None` if
    /// none came.
    fn receive(&self, wait: bool) -> Option<Segment> {
        // A whole packet: GRO may hand the socket one of up to 64 KiB.
        let mut buf = vec![0u8; 65_536];
        let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
        // SAFETY: valid fd; the buffer outlives the call and its length is passed.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                flags,
            )
        };
        let n = usize::try_from(n).ok()?;
        Segment::parse(&buf[..n])
    }

    /// Takes in every segment already delivered, without waiting: what the namespace's TCP
    /// stack has received by now (the copy is queued before the stack handles the segment).
    fn drain(&mut self) {
        while let Some(s) = self.receive(false) {
            self.seen.push(s);
        }
    }

    /// Every segment delivered so far.
    pub fn seen(&mut self) -> &[Segment] {
        self.drain();
        &self.seen
    }

    /// Waits up to [`ARRIVAL`] for a segment matching `pred` to be delivered; returns the first.
    pub fn wait_for(
        &mut self,
        what: &str,
        pred: impl Fn(&Segment) -> bool,
    ) -> anyhow::Result<Segment> {
        let deadline = Instant::now() + ARRIVAL;
        loop {
            self.drain();
            if let Some(s) = self.seen.iter().find(|s| pred(s)) {
                return Ok(*s);
            }
            ensure!(
                Instant::now() < deadline,
                "{what} did not reach {} within {ARRIVAL:?}; segments seen: {:#?}",
                self.local,
                self.seen
            );
            if let Some(s) = self.receive(true) {
                self.seen.push(s);
            }
        }
    }

    /// The sequence number the sender of the segments `from` -> `to` sends next: the furthest
    /// end among those delivered so far. Fails if none was.
    pub fn next_seq(&mut self, from: SocketAddrV4, to: SocketAddrV4) -> anyhow::Result<u32> {
        self.drain();
        self.seen
            .iter()
            .filter(|s| s.is(from, to))
            .map(Segment::end)
            .reduce(|a, b| if after(b, a) { b } else { a })
            .with_context(|| format!("no segment {from} -> {to} reached {}", self.local))
    }

    /// Sends a forged segment `from` (this tap's address, any port) -> `to` with `flags`,
    /// `seq` and `ack` and no payload.
    pub fn send(
        &self,
        from_port: u16,
        to: SocketAddrV4,
        flags: u8,
        (seq, ack): (u32, u32),
    ) -> anyhow::Result<()> {
        let seg = tcp_seq(
            self.local,
            *to.ip(),
            (from_port, to.port()),
            flags,
            (seq, ack),
            &[],
            &[],
        );
        let what = format!("a forged segment {}:{from_port} -> {to}", self.local);
        sock::raw_send(&self.fd, &seg, *to.ip(), &what)
    }
}
