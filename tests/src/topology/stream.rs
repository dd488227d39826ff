//! Traffic that keeps flowing while a test does something else (restarts natd): a stream of
//! ICMP echo requests at a fixed interval whose replies are matched by sequence number, and a
//! TCP connection that keeps sending a known byte pattern (and can pause until nothing of it
//! is on the way, so a test can count what arrives from then on). Each runs on its own thread
//! until stopped; stopping waits, bounded, for what is still on the way, then reports what
//! arrived.
//! Sockets are made in the namespaces given and stay there.
use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use super::{
    Netns,
    attempt::accept,
    observe::{ARRIVAL, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, tcp_info},
};

const POLL: Duration = Duration::from_millis(10);

/// What a [`PingStream`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingTally {
    pub sent: u16,
    /// Sequence numbers whose reply never came.
    pub missing: Vec<u16>,
    /// Replies from an address other than the target.
    pub foreign: Vec<Ipv4Addr>,
}

/// Echo requests from one namespace to one address, one every `interval`, on a raw ICMP socket
/// with an identifier of its own.
pub struct PingStream {
    id: u16,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    replied: Arc<AtomicU64>,
    thread: Option<JoinHandle<anyhow::Result<PingTally>>>,
}

fn raw_icmp_socket() -> anyhow::Result<OwnedFd> {
    super::sock::open(
        libc::AF_INET,
        libc::SOCK_RAW,
        libc::IPPROTO_ICMP,
        "raw ICMP",
    )
}

fn echo_request(id: u16, seq: u16) -> Vec<u8> {
    let mut msg = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
    msg.extend(id.to_be_bytes());
    msg.extend(seq.to_be_bytes());
    msg.extend((0..56u8).collect::<Vec<_>>());
    let sum = msg.chunks(2).fold(0u32, |acc, c| {
        acc + u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
    });
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    msg
}

impl PingStream {
    /// Starts sending from `ns` to `dst`.
    pub fn start(ns: &Netns, dst: Ipv4Addr, interval: Duration) -> anyhow::Result<Self> {
        let fd = ns.run(raw_icmp_socket)??;
        // Unique enough among the streams of this process; other processes' tests have
        // namespaces of their own.
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let id = ((std::process::id() as u64 ^ NEXT.fetch_add(1, Ordering::Relaxed) << 8) & 0xffff)
            as u16;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let replied = Arc::new(AtomicU64::new(0));
        let (s, n, r) = (stop.clone(), sent.clone(), replied.clone());
        let thread = std::thread::spawn(move || run_pings(&fd, dst, id, interval, &s, &n, &r));
        Ok(Self {
            id,
            stop,
            sent,
            replied,
            thread: Some(thread),
        })
    }

    /// The identifier of the stream's echo requests.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Echo requests sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Distinct replies received so far.
    pub fn replied(&self) -> u64 {
        self.replied.load(Ordering::Relaxed)
    }

    /// Waits up to [`ARRIVAL`] until at least `n` replies were received since the stream
    /// started.
    pub fn wait_replies(&self, n: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + ARRIVAL;
        while self.replied() < n {
            ensure!(
                Instant::now() < deadline,
                "{} of {n} echo replies within {ARRIVAL:?} ({} requests sent)",
                self.replied(),
                self.sent()
            );
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// Stops sending, waits up to [`ARRIVAL`] for the replies still on the way, and reports.
    pub fn stop(mut self) -> anyhow::Result<PingTally> {
        self.stop.store(true, Ordering::Relaxed);
        joined(self.thread.take().context("stopped twice")?.join())
    }
}

impl Drop for PingStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_pings(
    fd: &OwnedFd,
    dst: Ipv4Addr,
    id: u16,
    interval: Duration,
    stop: &AtomicBool,
    sent_count: &AtomicU64,
    replied_count: &AtomicU64,
) -> anyhow::Result<PingTally> {
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut replied = BTreeSet::new();
    let mut foreign = Vec::new();
    let mut seq: u16 = 0;
    let mut next = Instant::now();
    let mut drain_until: Option<Instant> = None;
    let mut buf = vec![0u8; 65536];
    loop {
        let now = Instant::now();
        if drain_until.is_none() && stop.load(Ordering::Relaxed) {
            drain_until = Some(now + ARRIVAL);
        }
        match drain_until {
            Some(end) if now >= end || replied.len() == usize::from(seq) => break,
            Some(_) => {}
            None if now >= next => {
                ensure!(
                    seq < u16::MAX,
                    "the ping stream ran out of sequence numbers"
                );
                let msg = echo_request(id, seq);
                // SAFETY: valid fd; the buffer and the `sockaddr_in` outlive the call.
                let n = unsafe {
                    libc::sendto(
                        fd.as_raw_fd(),
                        msg.as_ptr().cast(),
                        msg.len(),
                        0,
                        (&raw const sa).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                ensure!(
                    usize::try_from(n) == Ok(msg.len()),
                    "sending echo request {seq} to {dst}: {}",
                    std::io::Error::last_os_error()
                );
                seq += 1;
                sent_count.store(u64::from(seq), Ordering::Relaxed);
                next += interval;
            }
            None => {}
        }
        let wait = match drain_until {
            Some(end) => end.saturating_duration_since(Instant::now()),
            None => next.saturating_duration_since(Instant::now()),
        }
        .min(Duration::from_millis(50));
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&raw mut pfd, 1, wait.as_millis() as libc::c_int) };
        if ready <= 0 {
            continue;
        }
        // SAFETY: valid fd; the buffer outlives the call and its length is passed.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        let Ok(n) = usize::try_from(n) else { continue };
        let ihl = usize::from(buf[0] & 0x0f) * 4;
        if n < ihl + 8 || buf[ihl] != ICMP_ECHO_REPLY {
            continue;
        }
        let word = |at: usize| u16::from_be_bytes([buf[at], buf[at + 1]]);
        if word(ihl + 4) != id {
            continue;
        }
        let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
        if src != dst {
            foreign.push(src);
        } else if replied.insert(word(ihl + 6)) {
            replied_count.store(replied.len() as u64, Ordering::Relaxed);
        }
    }
    Ok(PingTally {
        sent: seq,
        missing: (0..seq).filter(|s| !replied.contains(s)).collect(),
        foreign,
    })
}

/// What a [`TcpTransfer`] delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferTally {
    pub written: u64,
    /// Bytes the server read, all matching the pattern.
    pub received: u64,
    /// The count the server sent back after the sender shut its side.
    pub confirmed: u64,
    /// Where the server saw the connection come from.
    pub server_peer: SocketAddr,
    /// The client's own end of the connection.
    pub client_local: SocketAddr,
}

/// One TCP connection, from `client` to `target`, accepted by a listener on `listen` in
/// `server`, over which the client writes chunks of a byte pattern until stopped; the server
/// checks every byte and answers with the count when the client shuts its side.
pub struct TcpTransfer {
    stop: Arc<AtomicBool>,
    /// The writer is to write nothing more until resumed; `idle`: it noticed.
    paused: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    client_local: SocketAddr,
    server_peer: SocketAddr,
    listener: TcpListener,
    /// Second handles of the two ends, to read their `TCP_INFO` (they keep the sockets open
    /// until the transfer is dropped).
    client_probe: TcpStream,
    server_probe: TcpStream,
    writer: Option<JoinHandle<anyhow::Result<u64>>>,
    reader: Option<JoinHandle<anyhow::Result<()>>>,
}

const CHUNK: usize = 8 * 1024;

fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| ((offset + i) % 251) as u8)
        .collect()
}

impl TcpTransfer {
    /// Connects and starts writing a chunk every `pace`.
    pub fn start(
        server: &Netns,
        listen: SocketAddrV4,
        client: &Netns,
        target: SocketAddrV4,
        pace: Duration,
    ) -> anyhow::Result<Self> {
        let listener = super::attempt::tcp_listen(server, listen)?;
        let conn = client
            .run(|| TcpStream::connect_timeout(&target.into(), ARRIVAL))?
            .with_context(|| format!("connecting to {target}"))?;
        let (server_conn, server_peer) = accept(&listener)?;
        conn.set_write_timeout(Some(ARRIVAL))?;
        conn.set_read_timeout(Some(ARRIVAL))?;
        let client_local = conn.local_addr()?;
        let (client_probe, server_probe) = (conn.try_clone()?, server_conn.try_clone()?);
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let idle = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let writing = Writing {
            stop: stop.clone(),
            paused: paused.clone(),
            idle: idle.clone(),
            written: written.clone(),
        };
        let writer = std::thread::spawn(move || write_until_stopped(conn, pace, &writing));
        let r = received.clone();
        let reader = std::thread::spawn(move || read_and_confirm(server_conn, &r));
        Ok(Self {
            stop,
            paused,
            idle,
            written,
            received,
            client_local,
            server_peer,
            listener,
            client_probe,
            server_probe,
            writer: Some(writer),
            reader: Some(reader),
        })
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn client_local(&self) -> SocketAddr {
        self.client_local
    }

    /// Waits up to [`ARRIVAL`] until the server has read at least `n` bytes.
    pub fn wait_received(&self, n: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + ARRIVAL;
        while self.received() < n {
            ensure!(
                Instant::now() < deadline,
                "the server read {} of {n} bytes within {ARRIVAL:?} ({} written)",
                self.received(),
                self.written()
            );
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// TCP segments each end has received so far (`tcpi_segs_in`): (client, server).
    pub fn segs_in(&self) -> anyhow::Result<(u64, u64)> {
        Ok((
            u64::from(tcp_info(&self.client_probe)?.tcpi_segs_in),
            u64::from(tcp_info(&self.server_probe)?.tcpi_segs_in),
        ))
    }

    /// Stops the writer after its current chunk and waits, up to [`ARRIVAL`], until nothing
    /// of the transfer is on the way: the server read everything written, the client has
    /// nothing unacknowledged, and neither end received a segment for [`QUIET`].
    pub fn pause(&self) -> anyhow::Result<()> {
        self.paused.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + ARRIVAL;
        let mut last = None;
        let mut since = Instant::now();
        loop {
            let settled = self.idle.load(Ordering::Relaxed)
                && self.received() == self.written()
                && tcp_info(&self.client_probe)?.tcpi_unacked == 0;
            let segs = self.segs_in()?;
            if !settled || last != Some(segs) {
                (last, since) = (Some(segs), Instant::now());
            } else if since.elapsed() >= QUIET {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the transfer did not settle within {ARRIVAL:?}: {} of {} bytes read, writer \
                 {}",
                self.received(),
                self.written(),
                if self.idle.load(Ordering::Relaxed) {
                    "paused"
                } else {
                    "still writing"
                }
            );
            std::thread::sleep(POLL);
        }
    }

    /// The writer goes on after [`TcpTransfer::pause`].
    pub fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    /// Stops writing, shuts the client's side, and waits for the server's count. Fails if the
    /// listener accepted a second connection meanwhile (the transfer must be one connection).
    pub fn stop(mut self) -> anyhow::Result<TransferTally> {
        self.stop.store(true, Ordering::Relaxed);
        let writer = self.writer.take().context("stopped twice")?;
        let reader = self.reader.take().context("stopped twice")?;
        let confirmed = joined(writer.join()).context("the sending side")?;
        joined(reader.join()).context("the receiving side")?;
        match self.listener.accept() {
            Ok((_, peer)) => bail!("the listener accepted a second connection, from {peer}"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("accept"),
        }
        Ok(TransferTally {
            written: self.written(),
            received: self.received(),
            confirmed,
            server_peer: self.server_peer,
            client_local: self.client_local,
        })
    }
}

impl Drop for TcpTransfer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.writer.take() {
            let _ = t.join();
        }
        if let Some(t) = self.reader.take() {
            let _ = t.join();
        }
    }
}

/// A thread's result, its panic resumed here.
fn joined<T>(r: std::thread::Result<anyhow::Result<T>>) -> anyhow::Result<T> {
    match r {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// How long a paused transfer's ends must receive nothing to count as settled.
pub const QUIET: Duration = Duration::from_millis(100);

/// The writer's side of a [`TcpTransfer`]'s flags.
struct Writing {
    stop: Arc<AtomicBool>,
    paused: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
}

/// Writes the pattern until `stop` (nothing while `paused`), then shuts down writing and
/// reads the server's count.
fn write_until_stopped(mut conn: TcpStream, pace: Duration, w: &Writing) -> anyhow::Result<u64> {
    let (stop, written) = (&w.stop, &w.written);
    let mut offset = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if w.paused.load(Ordering::Relaxed) {
            w.idle.store(true, Ordering::Relaxed);
            std::thread::sleep(POLL);
            continue;
        }
        w.idle.store(false, Ordering::Relaxed);
        conn.write_all(&pattern(offset, CHUNK))
            .with_context(|| format!("writing at offset {offset}"))?;
        offset += CHUNK as u64;
        written.store(offset, Ordering::Relaxed);
        std::thread::sleep(pace);
    }
    conn.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    conn.read_exact(&mut count)
        .context("reading the server's byte count")?;
    Ok(u64::from_be_bytes(count))
}

/// Reads to the end, checking the pattern, then answers with the count.
fn read_and_confirm(mut conn: TcpStream, received: &AtomicU64) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading at offset {offset}")),
        };
        ensure!(
            buf[..n] == pattern(offset, n)[..],
            "the bytes at offset {offset} are not the ones sent"
        );
        offset += n as u64;
        received.store(offset, Ordering::Relaxed);
    }
    conn.write_all(&offset.to_be_bytes())?;
    Ok(())
}
