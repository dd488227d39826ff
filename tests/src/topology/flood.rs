//! A flood of new UDP flows: one small datagram for each (source port, destination port) pair,
//! built by hand and sent from a raw IP socket in batches (`sendmmsg`), so a few hundred
//! thousand flows take about a second instead of a socket each. The UDP checksum is 0 (none,
//! valid for UDP over IPv4); the kernel fills in the IP header's length, identifier and
//! checksum.
use std::{
    net::Ipv4Addr,
    ops::RangeInclusive,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::ensure;

use super::Netns;

/// Datagrams per `sendmmsg` call.
const BATCH: usize = 512;
/// IPv4 header (20) + UDP header (8) + 4 bytes of payload.
const FRAME: usize = 32;

/// Sends one datagram from `src`:sport to `dst`:dport for every pair of `sports` x `dports`,
/// from namespace `ns`; returns how many the kernel took (all, or an error).
pub fn udp_flows(
    ns: &Netns,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sports: RangeInclusive<u16>,
    dports: RangeInclusive<u16>,
) -> anyhow::Result<u64> {
    ns.run(|| {
        // SAFETY: plain syscall; the fd is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        ensure!(
            fd >= 0,
            "raw IP socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let pairs: Vec<(u16, u16)> = dports
            .flat_map(|d| sports.clone().map(move |s| (s, d)))
            .collect();
        let mut sent = 0u64;
        for chunk in pairs.chunks(BATCH) {
            sent += send_batch(&fd, src, dst, chunk)?;
        }
        Ok(sent)
    })?
}

/// One datagram per (sport, dport) in `pairs`, in one `sendmmsg` (repeated for what it did
/// not take).
fn send_batch(
    fd: &OwnedFd,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    pairs: &[(u16, u16)],
) -> anyhow::Result<u64> {
    let mut frames: Vec<[u8; FRAME]> = pairs.iter().map(|&(s, d)| frame(src, dst, s, d)).collect();
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(dst).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iovs: Vec<libc::iovec> = frames
        .iter_mut()
        .map(|f| libc::iovec {
            iov_base: f.as_mut_ptr().cast(),
            iov_len: FRAME,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: zeroed plain C struct, filled in below.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&raw const to).cast_mut().cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let mut done = 0usize;
    while done < msgs.len() {
        let rest = &mut msgs[done..];
        // SAFETY: valid fd; every header points at buffers (`frames`, `iovs`, `to`) that
        // outlive the call; the count is the slice's length.
        let n = unsafe {
            libc::sendmmsg(
                fd.as_raw_fd(),
                rest.as_mut_ptr(),
                rest.len() as libc::c_uint,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // A full socket buffer: the frames queued so far are on their way; try again.
            if e.raw_os_error() == Some(libc::ENOBUFS) {
                std::thread::yield_now();
                continue;
            }
            anyhow::bail!("sendmmsg to {dst}: {e}");
        }
        done += n as usize;
    }
    Ok(done as u64)
}

/// An IPv4/UDP frame from `src`:`sport` to `dst`:`dport` with 4 bytes of payload.
fn frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> [u8; FRAME] {
    let mut f = [0u8; FRAME];
    f[0] = 0x45;
    f[2..4].copy_from_slice(&(FRAME as u16).to_be_bytes());
    f[8] = 64;
    f[9] = libc::IPPROTO_UDP as u8;
    f[12..16].copy_from_slice(&src.octets());
    f[16..20].copy_from_slice(&dst.octets());
    f[20..22].copy_from_slice(&sport.to_be_bytes());
    f[22..24].copy_from_slice(&dport.to_be_bytes());
    f[24..26].copy_from_slice(&((FRAME - 20) as u16).to_be_bytes());
    f[28..32].copy_from_slice(b"many");
    f
}
