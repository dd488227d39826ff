//! Traffic for sections 2-4: the live-frames generator (`bench-gen`, run with
//! `BPF_PROG_TEST_RUN` in live-frames mode on a veth, `XDP_TX` out of it), timed runs with a
//! sink counting what arrives, the request-reply-request that establishes generated flows, and
//! a socket-level request/response flow.
use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use nat_common::{Event, MAP_EVENTS};

use crate::{
    bpf,
    frame::Udp,
    netns::Netns,
    topo::{CLIENT, GEN_PORT_LO, Topo, V1},
    util::{self, CpuTimes},
};

/// Ports a flow index spreads over (as `bench-gen` does): flow `i` is sent from port
/// `PORT_BASE + i % PORT_SPAN` to `GEN_PORT_LO + i / PORT_SPAN`.
pub const PORT_SPAN: u32 = 64_512;

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

    /// How many distinct flows the frames belong to.
    pub fn count(self) -> u32 {
        match self {
            Flows::Many => PORT_SPAN,
            Flows::One => 1,
            Flows::Distinct(n) => n,
        }
    }
}

/// Which way generated traffic crosses the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client on the public side to the guest (DNAT).
    Inbound,
    /// From the guest (V1) to the client (SNAT).
    Outbound,
}

impl Direction {
    pub fn label(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// Who sends: the end that opens the flows in `dir`, or (`reply`) the other end answering
/// them; `direct`: over the client-guest pair, bypassing the router.
#[derive(Clone, Copy, Debug)]
pub struct Sender {
    pub dir: Direction,
    pub reply: bool,
    pub direct: bool,
}

impl Sender {
    pub fn opener(dir: Direction, direct: bool) -> Self {
        Self {
            dir,
            reply: false,
            direct,
        }
    }

    /// Whether the client sends (else the guest).
    fn client(&self) -> bool {
        (self.dir == Direction::Inbound) != self.reply
    }
}

/// The generator program for one topology; used on a thread inside the sender's namespace.
pub struct Generator {
    ebpf: Ebpf,
    template: [u8; 60],
    ifindex: u32,
}

impl Generator {
    pub fn new(topo: &Topo, flows: Flows, sender: Sender) -> anyhow::Result<Self> {
        // The client sends from CLIENT to the setup's target (P1, or V1 without NAT), the guest
        // from V1 to CLIENT; the flow's own port is the client's in inbound flows and the
        // guest's in outbound ones.
        let (src, dst, src_mac, dst_mac, ifindex) = match (sender.client(), sender.direct) {
            (true, false) => (
                CLIENT,
                topo.setup.target(),
                topo.client_mac,
                topo.router_pub_mac,
                topo.client_if,
            ),
            (true, true) => (
                CLIENT,
                topo.setup.target(),
                topo.client_direct_mac,
                topo.guest_direct_mac,
                topo.client_direct_if,
            ),
            (false, false) => (
                V1,
                CLIENT,
                topo.guest_mac,
                topo.router_gst_mac,
                topo.guest_if,
            ),
            (false, true) => (
                V1,
                CLIENT,
                topo.guest_direct_mac,
                topo.client_direct_mac,
                topo.guest_direct_if,
            ),
        };
        let f = Udp {
            dst_mac,
            src_mac,
            src,
            dst,
            sport: 1024,
            dport: GEN_PORT_LO,
            ttl: 64,
            checksum: false,
        }
        .build(60);
        let template: [u8; 60] = f.as_slice().try_into().context("60-byte template")?;
        let mut words = [0u32; 15];
        for (w, b) in words.iter_mut().zip(template.chunks_exact(4)) {
            *w = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        }
        let (count, sequential, reply, base) = (
            flows.count(),
            u32::from(matches!(flows, Flows::Distinct(_))),
            u32::from(sender.reply),
            u32::from(GEN_PORT_LO),
        );
        // The answers of a flow carry its own port as destination: `REPLY` swaps the ports.
        let mut ebpf = bpf::load(bpf::GEN, |l| {
            l.override_global("TEMPLATE", &words, true)
                .override_global("FLOW_COUNT", &count, true)
                .override_global("SEQUENTIAL", &sequential, true)
                .override_global("REPLY", &reply, true)
                .override_global("DPORT_BASE", &base, true);
        })?;
        bpf::xdp(&mut ebpf, "bench_gen")?;
        Ok(Self {
            ebpf,
            template,
            ifindex,
        })
    }

    /// Sends `frames` frames; returns the kernel's time per frame (generator, router and sink
    /// work done inline on this CPU), ns. Call inside the sender's namespace.
    pub fn send(&mut self, frames: u32) -> anyhow::Result<u32> {
        let prog = bpf::xdp(&mut self.ebpf, "bench_gen")?;
        bpf::live_frames(prog, &self.template, self.ifindex, frames)
    }
}

/// The namespace a sender runs in.
fn sender_ns(topo: &Topo, sender: Sender) -> &Netns {
    if sender.client() {
        &topo.client
    } else {
        &topo.guest
    }
}

/// Establishes every flow of `flows` in `dir` through the router the way traffic does: each
/// flow's first packet, the other end's answer, the flow's second packet (netfilter's and
/// natd's UDP flows are assured from the first packet after a reply; only assured flows take
/// natd's fast path).
pub fn establish(topo: &Topo, flows: Flows, dir: Direction) -> anyhow::Result<()> {
    let n = flows.count();
    for reply in [false, true, false] {
        let sender = Sender {
            dir,
            reply,
            direct: false,
        };
        let mut g = Generator::new(topo, Flows::Distinct(n), sender)?;
        sender_ns(topo, sender).run(|| g.send(n).map(drop))??;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
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
    /// natd only: frames that took its fast path during the run.
    pub fast_path: Option<u64>,
    /// natd only: of those, frames forwarded from their flow's slot (its `slot_hit` event).
    pub slot_hit: Option<u64>,
    /// natd only, with the kernel's BPF run-time statistics on: its XDP program's own time
    /// per run, ns.
    pub prog_ns: Option<f64>,
    /// natd only: the CPU time natd used during the run (user + system, its waited-for
    /// children included), seconds.
    pub natd_cpu_secs: Option<f64>,
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
    /// Share of the generated frames natd's fast path carried.
    pub fn fast_path_share(&self) -> Option<f64> {
        self.fast_path
            .map(|f| f as f64 / (self.generated as f64).max(1.0))
    }
    /// natd's own CPU during the run, as a share of one CPU.
    pub fn natd_cpu_share(&self) -> Option<f64> {
        self.natd_cpu_secs.map(|c| c / self.secs.max(1e-9))
    }
    /// Share of natd's fast-path frames forwarded from their flow's slot (the rest looked
    /// their flow up in `FLOWS`).
    pub fn slot_share(&self) -> Option<f64> {
        self.slot_hit
            .zip(self.fast_path)
            .map(|(s, f)| s as f64 / (f as f64).max(1.0))
    }
}

/// natd's XDP program's (run time ns, run count) as the kernel's BPF statistics count them
/// (they count only while enabled), if the topology runs natd: the program its pinned eth2
/// link runs.
fn prog_stats(topo: &Topo) -> anyhow::Result<Option<(u64, u64)>> {
    let Some(n) = &topo.natd else {
        return Ok(None);
    };
    let link = PinnedLink::from_pin(n.pinned_link("eth2"))?;
    let id = FdLink::from(link).info()?.program_id();
    for p in loaded_programs() {
        let p = p?;
        if p.id() == id {
            return Ok(Some((p.run_time().as_nanos() as u64, p.run_count())));
        }
    }
    anyhow::bail!("natd's program {id} is not loaded")
}

/// natd's count of event `e` (its pinned `EVENTS`), if the topology runs natd.
fn event_count(topo: &Topo, e: Event) -> anyhow::Result<Option<u64>> {
    match &topo.natd {
        Some(n) => Ok(Some(bpf::pinned_percpu_sum(
            &n.pinned_map(MAP_EVENTS),
            e as u32,
        )?)),
        None => Ok(None),
    }
}

/// Sends for `secs`, flat out (`rate` None) or paced at `rate` frames/s in 10 ms batches,
/// from the end that opens flows in `dir`; `direct`: to the other end's sink without the
/// router.
pub fn timed(
    topo: &Topo,
    flows: Flows,
    dir: Direction,
    secs: f64,
    rate: Option<u64>,
    direct: bool,
) -> anyhow::Result<Run> {
    timed_until(topo, flows, dir, secs, rate, direct, u64::MAX)
}

/// [`timed`], stopping early once `limit` frames were sent.
pub fn timed_until(
    topo: &Topo,
    flows: Flows,
    dir: Direction,
    secs: f64,
    rate: Option<u64>,
    direct: bool,
    limit: u64,
) -> anyhow::Result<Run> {
    let sender = Sender::opener(dir, direct);
    let mut generator = Generator::new(topo, flows, sender)?;
    let sink = match dir {
        Direction::Inbound => &topo.guest_sink,
        Direction::Outbound => &topo.client_sink,
    };
    sender_ns(topo, sender).run(|| {
        // Let the pipeline settle (and conntrack see the flows) before measuring.
        generator.send(4096)?;
        std::thread::sleep(Duration::from_millis(20));
        let sink0 = sink.count()?;
        let fast0 = event_count(topo, Event::FastPath)?;
        let slot0 = event_count(topo, Event::SlotHit)?;
        let prog0 = prog_stats(topo)?;
        let natd0 = natd_cpu(topo)?;
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
        let delivered = sink.count()? - sink0;
        let fast1 = event_count(topo, Event::FastPath)?;
        let slot1 = event_count(topo, Event::SlotHit)?;
        let prog1 = prog_stats(topo)?;
        let natd1 = natd_cpu(topo)?;
        Ok(Run {
            generated,
            delivered,
            secs,
            kernel_ns: kernel_ns / (generated as f64).max(1.0),
            softirq_secs: cpu1.softirq_secs_since(&cpu0),
            fast_path: fast0.zip(fast1).map(|(a, b)| b.saturating_sub(a)),
            slot_hit: slot0.zip(slot1).map(|(a, b)| b.saturating_sub(a)),
            prog_ns: prog0.zip(prog1).and_then(|((t0, n0), (t1, n1))| {
                (n1 > n0).then(|| (t1 - t0) as f64 / (n1 - n0) as f64)
            }),
            natd_cpu_secs: natd0.zip(natd1).map(|(a, b)| (b - a).max(0.0)),
        })
    })?
}

/// natd's CPU time so far, in a setup that runs natd.
fn natd_cpu(topo: &Topo) -> anyhow::Result<Option<f64>> {
    topo.natd.as_ref().map(|n| n.cpu_secs()).transpose()
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
    })?
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
