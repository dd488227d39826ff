//! Socket plumbing the topology's senders, sniffers and captures share: a socket opened with
//! `SOCK_CLOEXEC` and owned at once, a receive timeout, an int option, an IPv4 address as the kernel takes it,
//! a bind, and a whole-packet send on a raw socket. Each failure names what it was for.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, FromRawFd as _, OwnedFd},
    time::Duration,
};

use anyhow::ensure;

/// A new socket (`domain`, `ty` | `SOCK_CLOEXEC`, `proto`); `what` names it in the error.
pub fn open(
    domain: libc::c_int,
    ty: libc::c_int,
    proto: libc::c_int,
    what: &str,
) -> anyhow::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned right away.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    ensure!(
        fd >= 0,
        "{what} socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Makes a blocking receive on `fd` give up after `d` (`SO_RCVTIMEO`).
pub fn receive_timeout(fd: &impl AsRawFd, d: Duration) -> anyhow::Result<()> {
    let tv = libc::timeval {
        tv_sec: d.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(d.subsec_micros()),
    };
    // SAFETY: valid fd and a correctly sized `timeval`.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    ensure!(rc == 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
    Ok(())
}

/// `setsockopt(fd, level, opt, value)` for an int option; `name` names the option in the
/// error.
pub fn set_int(
    fd: &impl AsRawFd,
    (level, opt): (libc::c_int, libc::c_int),
    value: libc::c_int,
    name: &str,
) -> anyhow::Result<()> {
    // SAFETY: valid fd and a correctly sized int.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "{name} = {value}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// `addr` as the kernel's `sockaddr_in`.
pub fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Binds the IPv4 socket `fd` to `addr`.
pub fn bind(fd: &impl AsRawFd, addr: SocketAddrV4) -> anyhow::Result<()> {
    let sa = sockaddr(addr);
    // SAFETY: valid fd and a correctly sized `sockaddr_in`.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "binding to {addr}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Sends `packet` to `dst` on the raw IPv4 socket `fd` (the kernel adds the IPv4 header):
/// all of it, or an error saying it was `what`.
pub fn raw_send(fd: &impl AsRawFd, packet: &[u8], dst: Ipv4Addr, what: &str) -> anyhow::Result<()> {
    let to = sockaddr(SocketAddrV4::new(dst, 0));
    // SAFETY: valid fd; the buffer and the `sockaddr_in` outlive the call, sizes passed.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const to).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    ensure!(
        usize::try_from(n) == Ok(packet.len()),
        "sending {what}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}
