//! Traffic that policy may drop: a non-blocking TCP connect and lone UDP datagrams, each from
//! a chosen source address if asked, and the checks that nothing arrived.
//!
//! A packet dropped in XDP leaves no trace at either end (no ICMP error, no RST), so a test
//! first waits for the evidence of the drop (natd's `inbound_denied` / `outbound_denied`
//! counter, see `Natctl::wait_stats`) and only then checks here, without waiting, that the
//! listener holds nothing. Where no counter exists (the kernel's slow path), a test sends a
//! packet that must arrive after the dropped one and checks once that one arrived.
use std::{
    io::{ErrorKind, Read as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use super::{
    Netns,
    observe::ARRIVAL,
    sock::{self, sockaddr},
};

const POLL: Duration = Duration::from_millis(10);

/// A TCP connection being opened from the client side: a non-blocking connect whose outcome
/// is read later, so a dropped SYN costs no time.
pub struct TcpAttempt {
    stream: TcpStream,
    target: SocketAddrV4,
}

impl TcpAttempt {
    /// Starts connecting from `ns` to `target`, from `source` if given (else the address the
    /// route picks).
    pub fn start(
        ns: &Netns,
        source: Option<Ipv4Addr>,
        target: SocketAddrV4,
    ) -> anyhow::Result<Self> {
        Self::start_bound(ns, source.map(|a| SocketAddrV4::new(a, 0)), target)
    }

    /// Starts connecting from `ns` to `target` from exactly `source` (address and port; the
    /// port may be one a connection closed a moment ago: `SO_REUSEADDR`).
    pub fn start_from(
        ns: &Netns,
        source: SocketAddrV4,
        target: SocketAddrV4,
    ) -> anyhow::Result<Self> {
        Self::start_bound(ns, Some(source), target)
    }

    fn start_bound(
        ns: &Netns,
        source: Option<SocketAddrV4>,
        target: SocketAddrV4,
    ) -> anyhow::Result<Self> {
        let stream = ns.run(|| -> anyhow::Result<TcpStream> {
            let fd = sock::open(
                libc::AF_INET,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK,
                0,
                "TCP",
            )?;
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if let Some(src) = source {
                let on: libc::c_int = 1;
                // SAFETY: valid fd and a correctly sized int.
                let rc = unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_REUSEADDR,
                        (&raw const on).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                ensure!(rc == 0, "SO_REUSEADDR: {}", std::io::Error::last_os_error());
                let sa = sockaddr(src);
                // SAFETY: valid fd and a correctly sized `sockaddr_in`.
                let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len) };
                ensure!(
                    rc == 0,
                    "binding to {src}: {}",
                    std::io::Error::last_os_error()
                );
            }
            let sa = sockaddr(target);
            // SAFETY: valid fd and a correctly sized `sockaddr_in`.
            let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), len) };
            let err = std::io::Error::last_os_error();
            ensure!(
                rc == 0 || err.raw_os_error() == Some(libc::EINPROGRESS),
                "connecting to {target}: {err}"
            );
            Ok(TcpStream::from(fd))
        })??;
        Ok(Self { stream, target })
    }

    /// Whether the handshake completed; an error if the connection failed (refused, reset).
    pub fn is_connected(&self) -> anyhow::Result<bool> {
        if let Some(e) = self.stream.take_error()? {
            bail!("connection to {} failed: {e}", self.target);
        }
        Ok(self.stream.peer_addr().is_ok())
    }

    /// Waits up to [`ARRIVAL`] for the handshake; returns the connected stream (blocking, with
    /// [`ARRIVAL`] read and write timeouts).
    pub fn connected(self) -> anyhow::Result<TcpStream> {
        let deadline = Instant::now() + ARRIVAL;
        while !self.is_connected()? {
            ensure!(
                Instant::now() < deadline,
                "no connection to {} within {ARRIVAL:?}",
                self.target
            );
            std::thread::sleep(POLL);
        }
        self.stream.set_nonblocking(false)?;
        self.stream.set_read_timeout(Some(ARRIVAL))?;
        self.stream.set_write_timeout(Some(ARRIVAL))?;
        Ok(self.stream)
    }
}

/// A non-blocking TCP listener on `addr` in `ns`.
pub fn tcp_listen(ns: &Netns, addr: SocketAddrV4) -> anyhow::Result<TcpListener> {
    let listener = ns
        .run(|| TcpListener::bind(addr))?
        .with_context(|| format!("listening on {addr} in {}", ns.name()))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Accepts one connection on a non-blocking `listener` within [`ARRIVAL`]; the stream is
/// blocking with [`ARRIVAL`] timeouts.
pub fn accept(listener: &TcpListener) -> anyhow::Result<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + ARRIVAL;
    loop {
        match listener.accept() {
            Ok((conn, peer)) => {
                conn.set_nonblocking(false)?;
                conn.set_read_timeout(Some(ARRIVAL))?;
                conn.set_write_timeout(Some(ARRIVAL))?;
                return Ok((conn, peer));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => ensure!(
                Instant::now() < deadline,
                "no connection to {} within {ARRIVAL:?}",
                listener.local_addr()?
            ),
            Err(e) => return Err(e).context("accept"),
        }
        std::thread::sleep(POLL);
    }
}

/// Fails if a connection is waiting on the non-blocking `listener` (checked once, no wait).
pub fn assert_no_connection(listener: &TcpListener) -> anyhow::Result<()> {
    match listener.accept() {
        Ok((_, peer)) => bail!(
            "{} accepted a connection from {peer}",
            listener.local_addr()?
        ),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e).context("accept"),
    }
}

/// Reads exactly `want.len()` bytes from `conn` and checks they are `want`.
pub fn expect_bytes(conn: &mut TcpStream, want: &[u8]) -> anyhow::Result<()> {
    let mut got = vec![0u8; want.len()];
    conn.read_exact(&mut got)
        .with_context(|| format!("reading {:?}", String::from_utf8_lossy(want)))?;
    ensure!(
        got == want,
        "read {:?}, not {:?}",
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(want)
    );
    Ok(())
}

/// Fails if `conn` has data to read (checked once, no wait).
pub fn assert_nothing_to_read(conn: &mut TcpStream) -> anyhow::Result<()> {
    conn.set_nonblocking(true)?;
    let mut buf = [0u8; 64];
    let r = conn.read(&mut buf);
    conn.set_nonblocking(false)?;
    match r {
        Ok(n) => bail!("read {n} bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e).context("read"),
    }
}

/// Sends `data` from a fresh UDP socket in `ns` (bound to `source` if given) to `target`;
/// returns the socket, for answers.
pub fn udp_send(
    ns: &Netns,
    source: Option<Ipv4Addr>,
    target: SocketAddrV4,
    data: &[u8],
) -> anyhow::Result<UdpSocket> {
    let bind = SocketAddrV4::new(source.unwrap_or(Ipv4Addr::UNSPECIFIED), 0);
    let socket = ns
        .run(|| UdpSocket::bind(bind))?
        .with_context(|| format!("binding UDP {bind} in {}", ns.name()))?;
    socket
        .send_to(data, target)
        .with_context(|| format!("sending {} bytes to {target}", data.len()))?;
    Ok(socket)
}

/// Fails if a datagram is waiting on `socket` (checked once, no wait).
pub fn assert_no_datagram(socket: &UdpSocket) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 65536];
    socket.set_nonblocking(true)?;
    let r = socket.recv_from(&mut buf);
    socket.set_nonblocking(false)?;
    match r {
        Ok((n, from)) => bail!("{} received {n} bytes from {from}", socket.local_addr()?),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
        Err(e) => Err(e).context("recv"),
    }
}

/// Receives one datagram on `socket` within [`ARRIVAL`]; returns its length and source.
pub fn udp_receive(socket: &UdpSocket) -> anyhow::Result<(Vec<u8>, SocketAddr)> {
    let mut buf = vec![0u8; 65536];
    socket.set_read_timeout(Some(ARRIVAL))?;
    let (n, from) = socket.recv_from(&mut buf).with_context(|| {
        format!(
            "no datagram for {} within {ARRIVAL:?}",
            socket
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string())
        )
    })?;
    buf.truncate(n);
    Ok((buf, from))
}
