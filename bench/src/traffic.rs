//! Traffic for sections 2-4: the live-frames generator (the bench's raw XDP program run with
//! `BPF_F_TEST_XDP_LIVE_FRAMES` on the client's veth, `XDP_TX` out of it), timed runs with the
//! guest's sink counting what arrives, and a socket-level request/response flow.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    bpf::{
        progs::{self, FlowSource},
        sys::{self, MAP_ARRAY, Map},
    },
    frame::Udp,
    topo::{CLIENT, GEN_PORT_LO, Topo},
    util::{self, CpuTimes},
};

/// Which flows generated frames belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flows {
    /// Random source port of 64,512 per frame (one destination port).
    Many,
    /// One flow.
    One,
    /// Each frame the next of `n` distinct (source port, destination port) pairs.
    Distinct(u32),
}

impl Flows {
    pub fn label(self) -> String {
        match self {
            Flows::Many => "many flows (random source port)".into(),
            Flows::One => "one flow".into(),
            Flows::Distinct(n) => format!("{n} distinct flows"),
        }
    }
}

/// The generator program for one topology; used on a thread inside the client namespace.
pub struct Generator {
    prog: sys::Prog,
    _counter: Map,
    template: [u8; 60],
    ifindex: u32,
}

impl Generator {
    /// `direct`: into the client-guest pair, bypassing the router.
    pub fn new(topo: &Topo, flows: Flows, direct: bool) -> anyhow::Result<Self> {
        let f = Udp {
            dst_mac: if direct {
                topo.direct_mac
            } else {
                topo.router_pub_mac
            },
            src_mac: topo.client_mac,
            src: CLIENT,
            dst: topo.setup.target(),
            sport: 1024,
            dport: GEN_PORT_LO,
            ttl: 64,
            checksum: false,
        }
        .build(60);
        let template: [u8; 60] = f.as_slice().try_into().context("60-byte template")?;
        let counter = Map::create("bench_gen", MAP_ARRAY, 4, 8, 1, 0)?;
        let source = match flows {
            Flows::Many => FlowSource::Random {
                flows: progs::SPORT_SPAN as u32,
            },
            Flows::One => FlowSource::Random { flows: 1 },
            Flows::Distinct(n) => FlowSource::Counter {
                map: counter.raw(),
                flows: n,
            },
        };
        let prog = sys::Prog::load_xdp(
            "bench_gen",
            &progs::generator(&template, source, GEN_PORT_LO),
        )?;
        Ok(Self {
            prog,
            _counter: counter,
            template,
            ifindex: if direct {
                topo.direct_if
            } else {
                topo.client_if
            },
        })
    }

    /// Sends `frames` frames; returns the kernel's time per frame (generator, router and sink
    /// work done inline on this CPU), ns. Call inside the client namespace.
    pub fn send(&self, frames: u32) -> anyhow::Result<u32> {
        sys::live_frames(self.prog.raw(), &self.template, self.ifindex, frames)
    }
}

/// What one timed run saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct Run {
    pub generated: u64,
    pub delivered: u64,
    pub secs: f64,
    /// Kernel time per generated frame, ns.
    pub kernel_ns: f64,
    pub softirq_secs: f64,
}

impl Run {
    pub fn delivered_pps(&self) -> f64 {
        self.delivered as f64 / self.secs
    }
    pub fn delivered_fraction(&self) -> f64 {
        self.delivered as f64 / (self.generated as f64).max(1.0)
    }
    /// Softirq CPU time (all CPUs) per delivered frame, ns.
    pub fn softirq_ns(&self) -> f64 {
        self.softirq_secs * 1e9 / (self.delivered as f64).max(1.0)
    }
}

/// Sends for `secs`, flat out (`rate` None) or paced at `rate` frames/s in 10 ms batches;
/// `direct`: to the guest's sink without the router.
pub fn timed(
    topo: &Topo,
    flows: Flows,
    secs: f64,
    rate: Option<u64>,
    direct: bool,
) -> anyhow::Result<Run> {
    timed_until(topo, flows, secs, rate, direct, u64::MAX)
}

/// [`timed`], stopping early once `limit` frames were sent.
pub fn timed_until(
    topo: &Topo,
    flows: Flows,
    secs: f64,
    rate: Option<u64>,
    direct: bool,
    limit: u64,
) -> anyhow::Result<Run> {
    let generator = Generator::new(topo, flows, direct)?;
    topo.client.run(|| {
        // Let the pipeline settle (and conntrack see the flows) before measuring.
        generator.send(4096)?;
        std::thread::sleep(Duration::from_millis(20));
        let sink0 = topo.sink.count()?;
        let cpu0 = CpuTimes::read()?;
        let start = Instant::now();
        let end = start + Duration::from_secs_f64(secs);
        let (mut generated, mut kernel_ns) = (0u64, 0f64);
        let batch: u32 = match rate {
            Some(r) => (r / 100).max(1) as u32,
            None => 16_384,
        };
        let mut tick = start;
        while Instant::now() < end && generated < limit {
            util::check_interrupted()?;
            let ns = generator.send(batch)?;
            generated += u64::from(batch);
            kernel_ns += f64::from(ns) * f64::from(batch);
            if rate.is_some() {
                tick += Duration::from_millis(10);
                if let Some(wait) = tick.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }
        let secs = start.elapsed().as_secs_f64();
        // Frames still in flight land within microseconds.
        std::thread::sleep(Duration::from_millis(20));
        let cpu1 = CpuTimes::read()?;
        let delivered = topo.sink.count()? - sink0;
        Ok(Run {
            generated,
            delivered,
            secs,
            kernel_ns: kernel_ns / (generated as f64).max(1.0),
            softirq_secs: cpu1.softirq_secs_since(&cpu0),
        })
    })
}

/// A request/response UDP flow from the guest (V2:7000) to the client (:7001), which echoes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Steady {
    pub sent: u64,
    pub at_client: u64,
    pub replies: u64,
}

impl Steady {
    pub fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.replies)
    }
}

pub fn udp_socket(
    ns: &crate::netns::Netns,
    addr: Ipv4Addr,
    port: u16,
) -> anyhow::Result<UdpSocket> {
    ns.run(|| {
        let s = UdpSocket::bind(SocketAddr::from((addr, port)))
            .with_context(|| format!("bind {addr}:{port}"))?;
        s.set_read_timeout(Some(Duration::from_millis(20)))?;
        Ok(s)
    })
}

/// Runs the request/response flow at `rate` requests/s for `secs` while `during` runs (it
/// starts `lead` after the flow and the flow goes on `lead` after it returns).
pub fn steady_during<T: Send>(
    topo: &Topo,
    guest_addr: Ipv4Addr,
    rate: u64,
    lead: Duration,
    during: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<(Steady, T)> {
    let echo = udp_socket(&topo.client, CLIENT, 7001)?;
    let guest = udp_socket(&topo.guest, guest_addr, 7000)?;
    guest.connect(SocketAddr::from((CLIENT, 7001)))?;
    let stop_send = AtomicBool::new(false);
    let stop_all = AtomicBool::new(false);
    let (sent, at_client, replies) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            let mut buf = [0u8; 64];
            while !stop_all.load(Ordering::Relaxed) {
                if let Ok((n, from)) = echo.recv_from(&mut buf) {
                    at_client.fetch_add(1, Ordering::Relaxed);
                    let _ = echo.send_to(&buf[..n], from);
                }
            }
        });
        s.spawn(|| {
            let mut buf = [0u8; 64];
            while !stop_all.load(Ordering::Relaxed) {
                if guest.recv(&mut buf).is_ok() {
                    replies.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        s.spawn(|| {
            let start = Instant::now();
            let mut n = 0u64;
            while !stop_send.load(Ordering::Relaxed) {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                while n < due {
                    if guest.send(&n.to_be_bytes()).is_ok() {
                        n += 1;
                    } else {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            sent.store(n, Ordering::Relaxed);
        });
        std::thread::sleep(lead);
        let r = during();
        std::thread::sleep(lead);
        stop_send.store(true, Ordering::Relaxed);
        // Replies still on their way.
        std::thread::sleep(Duration::from_millis(300));
        stop_all.store(true, Ordering::Relaxed);
        r
    })?;
    Ok((
        Steady {
            sent: sent.load(Ordering::Relaxed),
            at_client: at_client.load(Ordering::Relaxed),
            replies: replies.load(Ordering::Relaxed),
        },
        result,
    ))
}
