//! What the ends of the topology observe: UDP and TCP exchanges whose sockets record the peer
//! address each side saw, a raw ICMP socket recording the addresses of ICMP packets a namespace
//! received (and sending single echo requests), and `ping`'s own account. Every wait is
//! bounded; nothing here sleeps to let something happen (a bind waits for its port, see
//! [`udp_bind`]).
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

use super::{COMMAND_TIMEOUT, Netns, run_bounded, sock};

/// How long a datagram or connection that should arrive may take.
pub const ARRIVAL: Duration = Duration::from_secs(5);

/// Test payload: a byte pattern that shows truncation and reordering.
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// What a UDP round trip looked like from both ends.
#[derive(Debug)]
pub struct UdpSeen {
    /// Source of the datagram as the server saw it.
    pub server_saw: SocketAddr,
    /// Bytes the server received in that datagram.
    pub server_len: usize,
    /// Source of the answer as the client saw it.
    pub client_saw: SocketAddr,
    /// Bytes the client received in the answer.
    pub client_len: usize,
}

/// Binds a UDP socket to `addr` in `ns`. A port a test's socket just closed may still be held
/// for a moment: a child process another test's thread forked keeps a copy of every
/// descriptor until its exec closes them (the tests run in parallel threads of one process).
/// So `EADDRINUSE` is tried again, every 10 ms for [`ARRIVAL`] at most.
pub fn udp_bind(ns: &Netns, addr: SocketAddrV4) -> anyhow::Result<UdpSocket> {
    let start = Instant::now();
    loop {
        match ns.run(|| UdpSocket::bind(addr))? {
            Err(e) if e.kind() == ErrorKind::AddrInUse && start.elapsed() < ARRIVAL => {
                std::thread::sleep(Duration::from_millis(10));
            }
            bound => {
                return bound.with_context(|| format!("binding UDP {addr} in {}", ns.name()));
            }
        }
    }
}

/// A fresh UDP socket in `client_ns` sends `len` bytes to `target`; a socket bound to `listen`
/// in `server_ns` must receive exactly them and echoes them back.
pub fn udp_exchange(
    server_ns: &Netns,
    listen: SocketAddrV4,
    client_ns: &Netns,
    target: SocketAddrV4,
    len: usize,
) -> anyhow::Result<UdpSeen> {
    let server = udp_bind(server_ns, listen)?;
    let client = udp_bind(client_ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    let data = payload(len);
    let mut buf = vec![0; 65536];
    client
        .send_to(&data, target)
        .with_context(|| format!("sending {len} bytes to {target}"))?;

    server.set_read_timeout(Some(ARRIVAL))?;
    let (server_len, server_saw) = server.recv_from(&mut buf).with_context(|| {
        format!("no datagram for {listen} (sent to {target}) within {ARRIVAL:?}")
    })?;
    ensure!(
        buf[..server_len] == data[..],
        "{listen} received {server_len} bytes from {server_saw}, not the {len} sent"
    );
    server
        .send_to(&buf[..server_len], server_saw)
        .with_context(|| format!("answering {server_saw}"))?;

    client.set_read_timeout(Some(ARRIVAL))?;
    let (client_len, client_saw) = client
        .recv_from(&mut buf)
        .with_context(|| format!("no answer from {target} within {ARRIVAL:?}"))?;
    ensure!(
        buf[..client_len] == data[..],
        "the answer from {client_saw} has {client_len} bytes, not the {len} sent"
    );
    Ok(UdpSeen {
        server_saw,
        server_len,
        client_saw,
        client_len,
    })
}

/// The fate of one probe datagram.
#[derive(Debug)]
pub enum Probe {
    /// The listener received it, from this source.
    Delivered(SocketAddr),
    /// The sender got an ICMP error back (seen as this socket error) and the listener received
    /// nothing.
    Rejected(std::io::Error),
}

/// A UDP socket in the client namespace, connected to one target, that reports ICMP errors.
pub struct ProbeSender {
    socket: UdpSocket,
    target: SocketAddrV4,
    sent: u32,
}

impl ProbeSender {
    pub fn new(client_ns: &Netns, target: SocketAddrV4) -> anyhow::Result<Self> {
        let socket = udp_bind(client_ns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        socket.connect(target)?;
        // Without IP_RECVERR, Linux reports only "hard" ICMP errors (port unreachable) on a UDP
        // socket, not a router's "network unreachable".
        let on: libc::c_int = 1;
        // SAFETY: valid fd and a correctly sized int.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_RECVERR,
                (&raw const on).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        ensure!(rc == 0, "IP_RECVERR: {}", std::io::Error::last_os_error());
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            target,
            sent: 0,
        })
    }

    /// Sends one datagram of `len` bytes (at least 32) and reports whether `server` received
    /// it or this socket got an ICMP error back (a router without a route answers
    /// "unreachable"), whichever is observed first within [`ARRIVAL`]. Neither is an error;
    /// seeing neither is.
    pub fn probe(&mut self, server: &UdpSocket, len: usize) -> anyhow::Result<Probe> {
        self.sent += 1;
        let mut data = format!("probe {} #{}:", self.socket.local_addr()?, self.sent).into_bytes();
        data.resize(len.max(data.len()), b'.');
        self.socket
            .send(&data)
            .with_context(|| format!("sending a probe to {}", self.target))?;
        server.set_read_timeout(Some(Duration::from_millis(20)))?;
        let mut buf = vec![0u8; 65536];
        let deadline = Instant::now() + ARRIVAL;
        // After an ICMP error the listener gets a further moment: a datagram forwarded just
        // before the error was sent would arrive within it.
        let mut rejected: Option<(std::io::Error, Instant)> = None;
        loop {
            match server.recv_from(&mut buf) {
                Ok((n, from)) if buf[..n] == data[..] => return Ok(Probe::Delivered(from)),
                Ok((n, from)) => bail!(
                    "unexpected datagram of {n} bytes from {from}: {:?}",
                    String::from_utf8_lossy(&buf[..n.min(64)])
                ),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).context("receiving on the probe listener"),
            }
            match rejected.take() {
                Some((e, at)) if at.elapsed() >= Duration::from_millis(300) => {
                    return Ok(Probe::Rejected(e));
                }
                Some(r) => rejected = Some(r),
                None => match self.socket.recv(&mut buf) {
                    Ok(n) => bail!(
                        "the probe sender got an unexpected answer: {:?}",
                        String::from_utf8_lossy(&buf[..n.min(64)])
                    ),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => rejected = Some((e, Instant::now())),
                },
            }
            ensure!(
                Instant::now() < deadline,
                "probe to {}: neither delivered nor rejected within {ARRIVAL:?}",
                self.target
            );
        }
    }
}

/// [`ProbeSender::probe`] from a fresh socket (a new flow).
pub fn udp_probe(
    server: &UdpSocket,
    client_ns: &Netns,
    target: SocketAddrV4,
) -> anyhow::Result<Probe> {
    ProbeSender::new(client_ns, target)?.probe(server, 32)
}

/// What a TCP exchange looked like from both ends.
#[derive(Debug)]
pub struct TcpSeen {
    /// The accepted connection's peer address, as the server saw it.
    pub server_peer: SocketAddr,
    /// The accepted connection's local address.
    pub server_local: SocketAddr,
    /// Bytes the server read (all of the client's data, checked).
    pub server_received: usize,
    /// The byte count the server reported back, as the client read it.
    pub client_confirmed: usize,
    /// TCP segments the server's connection received, by the end of the client's data
    /// ([`segs_in`]).
    pub server_segs_in: u64,
    /// TCP segments the client's connection received, by the end of the server's answer.
    pub client_segs_in: u64,
}

/// TCP segments `conn` has received (`tcpi_segs_in` of `TCP_INFO`): counted before GRO merges
/// them (a merged packet counts its segments), so it is the number of segments that arrived
/// at this end, handshake included (give or take the SYN).
pub fn segs_in(conn: &TcpStream) -> anyhow::Result<u64> {
    Ok(u64::from(tcp_info(conn)?.tcpi_segs_in))
}

/// `TCP_INFO` of `conn`.
pub fn tcp_info(conn: &TcpStream) -> anyhow::Result<libc::tcp_info> {
    // SAFETY: zeroed plain C struct.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: valid fd; `info` and `len` outlive the call and `len` is its size.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    ensure!(rc == 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    Ok(info)
}

/// A listener bound to `listen` in `server_ns`; a client in `client_ns` connects to `target`,
/// sends `len` bytes and closes its side; the server reads them all and answers with the count.
pub fn tcp_exchange(
    server_ns: &Netns,
    listen: SocketAddrV4,
    client_ns: &Netns,
    target: SocketAddrV4,
    len: usize,
) -> anyhow::Result<TcpSeen> {
    let listener = server_ns
        .run(|| TcpListener::bind(listen))?
        .with_context(|| format!("listening on {listen} in {}", server_ns.name()))?;
    let data = payload(len);
    std::thread::scope(|s| {
        let server = s.spawn(|| serve_once(&listener, &data));
        let client = client_ns
            .run(|| TcpStream::connect_timeout(&target.into(), ARRIVAL))?
            .with_context(|| format!("connecting to {target} from {}", client_ns.name()));
        let confirmed = client.and_then(|mut c| {
            c.set_read_timeout(Some(ARRIVAL))?;
            c.set_write_timeout(Some(ARRIVAL))?;
            c.write_all(&data).context("sending")?;
            c.shutdown(Shutdown::Write)?;
            let mut answer = Vec::new();
            c.read_to_end(&mut answer).context("reading the answer")?;
            let count: [u8; 8] = answer
                .as_slice()
                .try_into()
                .with_context(|| format!("the answer has {} bytes, not 8", answer.len()))?;
            Ok((u64::from_be_bytes(count), segs_in(&c)?))
        });
        let served = server
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        let (server_peer, server_local, server_received, server_segs_in) = served?;
        let (confirmed, client_segs_in) = confirmed?;
        Ok(TcpSeen {
            server_peer,
            server_local,
            server_received,
            client_confirmed: usize::try_from(confirmed)?,
            server_segs_in,
            client_segs_in,
        })
    })
}

/// Accepts one connection within [`ARRIVAL`], reads it to the end, checks it is `data`, and
/// answers with the byte count; returns the peer, the local address, the bytes read and the
/// segments received.
fn serve_once(
    listener: &TcpListener,
    data: &[u8],
) -> anyhow::Result<(SocketAddr, SocketAddr, usize, u64)> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + ARRIVAL;
    let (mut conn, peer) = loop {
        match listener.accept() {
            Ok(c) => break c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                ensure!(
                    Instant::now() < deadline,
                    "no connection to {} within {ARRIVAL:?}",
                    listener.local_addr()?
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accept"),
        }
    };
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(ARRIVAL))?;
    let mut got = Vec::new();
    conn.read_to_end(&mut got)
        .with_context(|| format!("reading from {peer}"))?;
    ensure!(
        got == data,
        "received {} bytes from {peer}, not the {} sent",
        got.len(),
        data.len()
    );
    let segs = segs_in(&conn)?;
    conn.write_all(&(got.len() as u64).to_be_bytes())?;
    Ok((peer, conn.local_addr()?, got.len(), segs))
}

/// An ICMP packet a namespace received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpSeen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub icmp_type: u8,
    /// The IPv4 total length (after reassembly).
    pub ip_len: usize,
    /// The identifier and sequence number words (meaningful in query messages).
    pub id: u16,
    pub seq: u16,
}

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_ECHO_REQUEST: u8 = 8;

/// A raw ICMP socket: receives a copy of every ICMP packet its namespace receives, reassembled.
pub struct IcmpSniffer(OwnedFd);

impl IcmpSniffer {
    pub fn open_in(ns: &Netns) -> anyhow::Result<Self> {
        ns.run(|| {
            let fd = sock::open(
                libc::AF_INET,
                libc::SOCK_RAW,
                libc::IPPROTO_ICMP,
                "raw ICMP",
            )?;
            sock::receive_timeout(&fd, Duration::from_millis(50))?;
            Ok(Self(fd))
        })?
    }

    /// Receives until `want` packets matching `pred` were seen or [`ARRIVAL`] passed; returns
    /// the matching ones.
    pub fn collect(&self, want: usize, pred: impl Fn(&IcmpSeen) -> bool) -> Vec<IcmpSeen> {
        self.collect_until(want, pred, Instant::now() + ARRIVAL)
    }

    /// The packets matching `pred` already received (waits no longer than one receive
    /// timeout, 50 ms, for the queue to run dry).
    pub fn pending(&self, pred: impl Fn(&IcmpSeen) -> bool) -> Vec<IcmpSeen> {
        self.collect_until(usize::MAX, pred, Instant::now())
    }

    /// Sends an ICMP echo request of `len` data bytes to `dst` from this socket's namespace
    /// (the kernel adds the IPv4 header and picks the source).
    pub fn send_echo(&self, dst: Ipv4Addr, seq: u16, len: usize) -> anyhow::Result<()> {
        self.send_query(dst, ICMP_ECHO_REQUEST, (0x5853, seq), &payload(len))
    }

    /// Sends an ICMP query message of type `icmp_type` (code 0) with identifier and sequence
    /// number `id_seq` and `data` after them, to `dst` from this socket's namespace.
    pub fn send_query(
        &self,
        dst: Ipv4Addr,
        icmp_type: u8,
        (id, seq): (u16, u16),
        data: &[u8],
    ) -> anyhow::Result<()> {
        let mut msg = vec![icmp_type, 0, 0, 0];
        msg.extend(id.to_be_bytes());
        msg.extend(seq.to_be_bytes());
        msg.extend(data);
        let sum = msg.chunks(2).fold(0u32, |acc, c| {
            acc + u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]))
        });
        let folded = (sum & 0xffff) + (sum >> 16);
        let csum = !(((folded & 0xffff) + (folded >> 16)) as u16);
        msg[2..4].copy_from_slice(&csum.to_be_bytes());
        sock::raw_send(
            &self.0,
            &msg,
            dst,
            &format!("ICMP type {icmp_type} to {dst}"),
        )
    }

    /// Receives until `want` packets matching `pred` were seen, or a receive timed out after
    /// `deadline` (or, should packets never stop coming, a second after it).
    fn collect_until(
        &self,
        want: usize,
        pred: impl Fn(&IcmpSeen) -> bool,
        deadline: Instant,
    ) -> Vec<IcmpSeen> {
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 65536];
        let last = deadline + Duration::from_secs(1);
        while seen.len() < want && Instant::now() < last {
            // SAFETY: valid fd; the buffer outlives the call and its length is passed.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else {
                if Instant::now() >= deadline {
                    break;
                }
                continue;
            };
            if n < 20 {
                continue;
            }
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            if n < ihl + 8 {
                continue;
            }
            let octets = |at: usize| Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3]);
            let word = |at: usize| u16::from_be_bytes([buf[at], buf[at + 1]]);
            let p = IcmpSeen {
                src: octets(12),
                dst: octets(16),
                icmp_type: buf[ihl],
                ip_len: usize::from(word(2)),
                id: word(ihl + 4),
                seq: word(ihl + 6),
            };
            if pred(&p) {
                seen.push(p);
            }
        }
        seen
    }
}

/// `ping`'s account of a run.
#[derive(Debug)]
pub struct PingResult {
    pub transmitted: u32,
    pub received: u32,
    /// Source address of each reply ping printed.
    pub reply_from: Vec<Ipv4Addr>,
    pub output: String,
}

/// Runs `ping -c COUNT -s SIZE DST` in `ns` (at most 10 s).
pub fn ping(ns: &Netns, dst: Ipv4Addr, count: u32, size: usize) -> anyhow::Result<PingResult> {
    let (count_arg, size_arg, dst_arg) = (count.to_string(), size.to_string(), dst.to_string());
    let out = run_bounded(
        ns.command("ping").args([
            "-n", "-c", &count_arg, "-i", "0.2", "-w", "10", "-s", &size_arg, &dst_arg,
        ]),
        COMMAND_TIMEOUT,
    )?;
    // ping exits 1 when replies are missing (reported below), 2 on errors.
    ensure!(
        out.status.code().is_some_and(|c| c <= 1),
        "`{}` failed ({}): {}",
        out.command,
        out.status,
        out.stderr.trim()
    );
    let mut result = PingResult {
        transmitted: 0,
        received: 0,
        reply_from: Vec::new(),
        output: out.stdout.clone(),
    };
    for line in out.stdout.lines() {
        if let Some((_, rest)) = line.split_once(" bytes from ") {
            let addr = rest.split(':').next().unwrap_or_default();
            result.reply_from.push(
                addr.parse()
                    .with_context(|| format!("ping printed {line:?}"))?,
            );
        } else if line.contains("packets transmitted") {
            let num = |word: &str| {
                line.split(", ")
                    .find(|part| part.contains(word))
                    .and_then(|part| part.split(' ').next())
                    .and_then(|n| n.parse().ok())
            };
            result.transmitted = num("transmitted").unwrap_or_default();
            result.received = num("received").unwrap_or_default();
        }
    }
    Ok(result)
}
