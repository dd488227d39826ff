//! ICMP errors that came back to one UDP socket, read from its error queue (`IP_RECVERR`):
//! which message the sender got for its datagrams, and who sent it. Unlike a sniffer, the
//! queue holds only the errors about this socket's own datagrams.
use std::{
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use super::sock::set_int;

/// ICMP time exceeded.
pub const ICMP_TIME_EXCEEDED: u8 = 11;

/// One ICMP error from a socket's error queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpError {
    pub icmp_type: u8,
    pub code: u8,
    /// Who sent the error (`SO_EE_OFFENDER`).
    pub offender: Ipv4Addr,
}

/// Queues the ICMP errors about `socket`'s datagrams (`IP_RECVERR`).
pub fn record_errors(socket: &UdpSocket) -> anyhow::Result<()> {
    set_int(
        socket,
        (libc::IPPROTO_IP, libc::IP_RECVERR),
        1,
        "IP_RECVERR",
    )
}

/// Sends `socket`'s datagrams with this TTL.
pub fn set_ttl(socket: &UdpSocket, ttl: u8) -> anyhow::Result<()> {
    set_int(
        socket,
        (libc::IPPROTO_IP, libc::IP_TTL),
        libc::c_int::from(ttl),
        "IP_TTL",
    )
}

/// The next ICMP error in `socket`'s error queue, if one is there now (no wait).
pub fn next_error(socket: &UdpSocket) -> anyhow::Result<Option<IcmpError>> {
    let mut data = [0u8; 1500];
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: zeroed plain C struct, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: valid fd; `msg` points at buffers that outlive the call, their sizes given.
    let n = unsafe {
        libc::recvmsg(
            socket.as_raw_fd(),
            &raw mut msg,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e).context("recvmsg(MSG_ERRQUEUE)");
    }
    // SAFETY: the kernel filled `control` up to `msg_controllen`; the CMSG macros stay in it.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&raw const msg) };
    while !cmsg.is_null() {
        // SAFETY: a header inside `control`, as above.
        let (level, kind) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
        if level == libc::IPPROTO_IP && kind == libc::IP_RECVERR {
            // SAFETY: an IP_RECVERR message holds a `sock_extended_err` and the offender's
            // `sockaddr_in` after it; both may be unaligned in the buffer.
            let (ee, offender) = unsafe {
                let ee = libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>();
                let offender = libc::SO_EE_OFFENDER(ee).cast::<libc::sockaddr_in>();
                (ee.read_unaligned(), offender.read_unaligned())
            };
            ensure!(
                ee.ee_origin == libc::SO_EE_ORIGIN_ICMP,
                "an error of origin {} (not ICMP) in the error queue: {}",
                ee.ee_origin,
                ee.ee_errno
            );
            return Ok(Some(IcmpError {
                icmp_type: ee.ee_type,
                code: ee.ee_code,
                offender: Ipv4Addr::from(u32::from_be(offender.sin_addr.s_addr)),
            }));
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&raw const msg, cmsg) };
    }
    anyhow::bail!("an error queue message without IP_RECVERR data")
}

/// Waits up to `within` for an ICMP error in `socket`'s error queue.
pub fn wait_error(socket: &UdpSocket, within: Duration) -> anyhow::Result<IcmpError> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(e) = next_error(socket)? {
            return Ok(e);
        }
        ensure!(
            Instant::now() < deadline,
            "no ICMP error for {} within {within:?}",
            socket.local_addr()?
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
