//! A flood of new UDP flows: small datagrams for each (source port, destination port) pair,
//! built by hand and sent from a raw IP socket in batches (`sendmmsg`), so a few hundred
//! thousand flows take about a second instead of a socket each. The UDP checksum is 0 (none,
//! valid for UDP over IPv4); the kernel fills in the IP header's length, identifier and
//! checksum. The flood loses nothing on its way out: a frame the veth could not queue is sent
//! again (see [`udp_flows`]). [`OneCpu`] keeps a test's flows and its flood on one CPU.
use std::{
    marker::PhantomData,
    net::Ipv4Addr,
    ops::RangeInclusive,
    os::fd::{AsRawFd as _, OwnedFd},
};

use anyhow::ensure;

use super::Netns;

/// Datagrams per `sendmmsg` call.
const BATCH: usize = 512;
/// IPv4 header (20) + UDP header (8) + 4 bytes of payload.
const FRAME: usize = 32;

/// Sends `per_flow` datagrams in a row from `src`:sport to `dst`:dport for every pair of
/// `sports` x `dports`, from namespace `ns`; returns how many the kernel took (all, or an
/// error).
///
/// A veth whose peer runs XDP queues frames in a ring of its own; when the peer's NAPI falls
/// behind (the softirq deferred to `ksoftirqd` on a busy machine), the ring is full and the
/// frame is dropped. A raw socket reports that drop as `ENOBUFS` only with `IP_RECVERR` set,
/// and reports nothing otherwise, so the socket sets it and the frame is sent again.
pub fn udp_flows(
    ns: &Netns,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    (sports, dports): (RangeInclusive<u16>, RangeInclusive<u16>),
    per_flow: usize,
) -> anyhow::Result<u64> {
    ns.run(|| {
        let fd = super::sock::open(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW, "raw IP")?;
        super::sock::set_int(&fd, (libc::IPPROTO_IP, libc::IP_RECVERR), 1, "IP_RECVERR")?;
        let pairs: Vec<(u16, u16)> = dports
            .flat_map(|d| sports.clone().map(move |s| (s, d)))
            .flat_map(|pair| std::iter::repeat_n(pair, per_flow))
            .collect();
        let mut sent = 0u64;
        for chunk in pairs.chunks(BATCH) {
            sent += send_batch(&fd, src, dst, chunk)?;
        }
        Ok(sent)
    })?
}

/// How many frames `dev` in `ns` dropped on their way out (`ip -s link`'s TX dropped; for a
/// veth, the frames its peer's ring had no room for).
pub fn tx_dropped(ns: &Netns, dev: &str) -> anyhow::Result<u64> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", dev])?;
    let links: serde_json::Value = serde_json::from_str(&out)?;
    links[0]["stats64"]["tx"]["dropped"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no TX dropped count for {dev} in {out}"))
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
            // A full socket buffer or veth ring: the frames before this one are on their way,
            // this one was not taken; send it again once the receiving side has run.
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

/// Keeps the calling thread (and the threads it starts, which inherit it) on one CPU until
/// dropped, then restores its CPU set. A frame sent into a veth is handled by the kernel on
/// the sending CPU, XDP included, so a flow opened and a flood sent under one `OneCpu` meet in
/// the same CPU's share of an LRU map (a BPF LRU map keeps per-CPU lists; a flood on another
/// CPU would spare a flow by chance, not by design).
pub struct OneCpu {
    before: libc::cpu_set_t,
    /// Restored on the thread that pinned itself.
    _not_send: PhantomData<*const ()>,
}

impl OneCpu {
    /// Pins the calling thread to the first CPU it may run on.
    pub fn pin() -> anyhow::Result<Self> {
        // SAFETY: zeroed plain C bit set.
        let mut before: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: pid 0 = the calling thread; `before` is a valid set of `size` bytes.
        let rc = unsafe { libc::sched_getaffinity(0, size, &raw mut before) };
        ensure!(
            rc == 0,
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        let first = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE.
            .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &before) })
            .ok_or_else(|| anyhow::anyhow!("the thread may run on no CPU"))?;
        // SAFETY: zeroed plain C bit set.
        let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `first` is below CPU_SETSIZE.
        unsafe { libc::CPU_SET(first, &mut one) };
        // SAFETY: as above, with `one`.
        let rc = unsafe { libc::sched_setaffinity(0, size, &raw const one) };
        ensure!(
            rc == 0,
            "sched_setaffinity(CPU {first}): {}",
            std::io::Error::last_os_error()
        );
        Ok(Self {
            before,
            _not_send: PhantomData,
        })
    }
}

impl Drop for OneCpu {
    fn drop(&mut self) {
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: pid 0 = the calling thread, the one that pinned itself (the guard is !Send).
        if unsafe { libc::sched_setaffinity(0, size, &raw const self.before) } != 0 {
            eprintln!(
                "restoring the thread's CPU set: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
