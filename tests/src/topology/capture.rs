//! A packet capture on one interface of a namespace: an `AF_PACKET` socket bound to it sees
//! every IPv4 frame the interface receives, those addressed to another MAC
//! (`PACKET_OTHERHOST`, which IP then drops) included, and counts the TCP frames to one address
//! by destination MAC. It runs on its own thread until dropped.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Context as _, ensure};

use super::Netns;

const ETH_P_IP: u16 = 0x0800;

/// TCP frames to one address arriving on one interface, counted by destination MAC.
pub struct FrameCounter {
    stop: Arc<AtomicBool>,
    counts: Arc<Mutex<BTreeMap<[u8; 6], u64>>>,
    thread: Option<JoinHandle<()>>,
}

fn open(dev: &str) -> anyhow::Result<OwnedFd> {
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: a valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(ifindex != 0, "no interface {dev}");
    let fd = super::sock::open(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        i32::from(ETH_P_IP.to_be()),
        "AF_PACKET",
    )?;
    // SAFETY: zeroed plain C struct, then filled in.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_IP.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: valid fd and a correctly sized `sockaddr_ll`.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "bind to {dev}: {}",
        std::io::Error::last_os_error()
    );
    super::sock::receive_timeout(&fd, std::time::Duration::from_millis(50))?;
    Ok(fd)
}

impl FrameCounter {
    /// Starts counting the TCP frames to `dst` that `dev` in `ns` receives.
    pub fn start(ns: &Netns, dev: &str, dst: Ipv4Addr) -> anyhow::Result<Self> {
        let fd = ns
            .run(|| open(dev))?
            .with_context(|| format!("capturing on {dev} in {}", ns.name()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let (s, c) = (stop.clone(), counts.clone());
        let thread = std::thread::spawn(move || count(&fd, dst, &s, &c));
        Ok(Self {
            stop,
            counts,
            thread: Some(thread),
        })
    }

    /// Frames counted so far, by destination MAC.
    pub fn counts(&self) -> BTreeMap<[u8; 6], u64> {
        match self.counts.lock() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Frames counted so far to `mac`.
    pub fn to(&self, mac: [u8; 6]) -> u64 {
        self.counts().get(&mac).copied().unwrap_or(0)
    }
}

impl Drop for FrameCounter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn count(fd: &OwnedFd, dst: Ipv4Addr, stop: &AtomicBool, counts: &Mutex<BTreeMap<[u8; 6], u64>>) {
    // A whole frame: GRO may hand the socket one of up to 64 KiB.
    let mut buf = vec![0u8; 65_536 + 14];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: valid fd; the buffer outlives the call and its length is passed.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { continue };
        let f = &buf[..n];
        if n < 34 || f[12..14] != ETH_P_IP.to_be_bytes() || f[23] != libc::IPPROTO_TCP as u8 {
            continue;
        }
        if Ipv4Addr::new(f[30], f[31], f[32], f[33]) != dst {
            continue;
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&f[..6]);
        match counts.lock() {
            Ok(mut c) => *c.entry(mac).or_default() += 1,
            Err(poisoned) => *poisoned.into_inner().entry(mac).or_default() += 1,
        }
    }
}
