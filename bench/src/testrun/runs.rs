//! Running the loaded program: frames, runs of many repetitions ([`Bed::walk`]), the check
//! that a run took the intended path (the `STATS` and `EVENTS` it moved), and opening the
//! established flows by their first packets ([`Bed::seed`]).
use std::net::Ipv4Addr;

use anyhow::ensure;
use nat_common::{Event, Reason};

use super::setup::{Bed, DPORT, H0, H1, REPS_PER_CALL, SPORT, SRC, chain_addr};
use crate::{bpf, frame::Udp, util};

/// Flows opened per round while seeding a cycle: `PENDING` holds them until they are assured.
const SEED_CHUNK: u32 = 16_384;
/// The seeding order's stride through the cycle (a prime: coprime with the cycle lengths).
const SEED_STRIDE: u64 = 7_919;

/// (reason counters, event counters), summed over CPUs, in `Reason::ALL` / `Event::ALL`
/// order.
pub type Counters = (Vec<u64>, Vec<u64>);

/// What a run of the program must have done: every repetition ended with `reason`, and the
/// events moved by exactly `events` (every other event stayed still, but slot hits: at most
/// one per fast-path packet).
pub struct Expect<'a> {
    pub reason: Reason,
    pub events: &'a [(Event, u64)],
}

impl Bed {
    /// Counters summed over CPUs.
    pub fn counters(&mut self) -> anyhow::Result<Counters> {
        let s = self.dp.stats()?;
        let e = self.dp.events()?;
        Ok((
            Reason::ALL
                .iter()
                .map(|r| s.get(r).map_or(0, |c| c.packets))
                .collect(),
            Event::ALL
                .iter()
                .map(|v| e.get(v).copied().unwrap_or(0))
                .collect(),
        ))
    }

    /// Fails unless the counters moved from `before` as `want` says for `n` runs.
    pub fn check(
        &mut self,
        what: &str,
        before: &Counters,
        n: u64,
        want: &Expect,
    ) -> anyhow::Result<()> {
        let (s1, e1) = self.counters()?;
        let ds: Vec<u64> = s1
            .iter()
            .zip(&before.0)
            .map(|(a, b)| a.wrapping_sub(*b))
            .collect();
        let de: Vec<u64> = e1
            .iter()
            .zip(&before.1)
            .map(|(a, b)| a.wrapping_sub(*b))
            .collect();
        let moved = |names: Vec<(&str, u64)>| {
            names
                .into_iter()
                .filter(|(_, d)| *d > 0)
                .map(|(n, d)| format!("{n} {d}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let reasons = moved(
            Reason::ALL
                .iter()
                .map(|r| r.name())
                .zip(ds.iter().copied())
                .collect(),
        );
        let events = moved(
            Event::ALL
                .iter()
                .map(|e| e.name())
                .zip(de.iter().copied())
                .collect(),
        );
        let total: u64 = ds.iter().sum();
        // Slot hits are fast-path packets served from the flow cache (`SLOTS`): the path is
        // the fast path either way, so they are logged, and only bounded by the fast path's.
        let hits = de[Event::SlotHit as usize];
        if hits > 0 {
            eprintln!("{what}: {hits} of {n} served from their flow's slot");
        }
        let events_ok = hits <= de[Event::FastPath as usize]
            && Event::ALL.iter().zip(&de).all(|(e, d)| {
                *e == Event::SlotHit
                    || *d
                        == want
                            .events
                            .iter()
                            .find(|(w, _)| w == e)
                            .map_or(0, |(_, n)| *n)
            });
        ensure!(
            ds[want.reason as usize] == n && total == n && events_ok,
            "{what}: expected {n} x {} with events {:?}; STATS moved: {reasons}; EVENTS moved: \
             {events}",
            want.reason.name(),
            want.events
                .iter()
                .map(|(e, n)| format!("{} {n}", e.name()))
                .collect::<Vec<_>>()
        );
        Ok(())
    }

    /// Runs the program `n` times as if arriving on `ifindex`, in calls of at most
    /// [`REPS_PER_CALL`] repetitions, each call starting from `frame_at(k)` (k = repetitions
    /// already run); returns the kernel's time per repetition (ns), summed over calls.
    pub fn walk(
        &mut self,
        ifindex: u32,
        n: u64,
        frame_at: impl FnMut(u64) -> Vec<u8>,
    ) -> anyhow::Result<f64> {
        self.walk_by(ifindex, n, REPS_PER_CALL, frame_at)
    }

    /// [`Bed::walk`] in calls of at most `per_call` repetitions.
    pub fn walk_by(
        &mut self,
        ifindex: u32,
        n: u64,
        per_call: u32,
        mut frame_at: impl FnMut(u64) -> Vec<u8>,
    ) -> anyhow::Result<f64> {
        let prog = self.prog()?;
        let (mut done, mut total_ns) = (0u64, 0u64);
        while done < n {
            let reps = (n - done).min(u64::from(per_call)) as u32;
            let r = bpf::test_run(prog, &frame_at(done), ifindex, reps)?;
            total_ns += u64::from(r.duration_ns) * u64::from(reps);
            done += u64::from(reps);
        }
        Ok(total_ns as f64 / n.max(1) as f64)
    }

    /// Opens and assures the guest-opened UDP flows of the hot pair (H1 -> [`SRC`] leaving as
    /// H0, and H0 -> SRC leaving as H1) and of every mapping of the cycle, by sending their
    /// first packets through the program: the guest's request (the flow opens, in
    /// `PENDING`), the remote's reply (its route is resolved), the guest's next request (the
    /// flow is assured and moves to `FLOWS`). Every step is checked against the counters.
    /// Afterwards an inbound frame from SRC to any mapped public address of the pair or the
    /// cycle is a `FLOWS` hit whose rewrite leads to the next one.
    ///
    /// One packet per call, the cycle's flows in a scattered order (a stride through the
    /// cycle): the table's entries are taken in the order flows open, so flows opened along
    /// the cycle would lie in memory in the order a walk along the cycle visits them, and the
    /// "different flow each packet" walk would read memory almost sequentially, unlike
    /// traffic.
    pub fn seed(&mut self) -> anyhow::Result<()> {
        self.seed_flows("hot pair", 2, |k| if k == 0 { (H1, H0) } else { (H0, H1) })?;
        let n = self.chain;
        let mut a = 0;
        while a < n {
            util::check_interrupted()?;
            let b = (a + SEED_CHUNK).min(n);
            // Mapping m is chain_addr(m) -> chain_addr(m + 1): its guest is chain_addr(m + 1).
            let (nn, a64) = (u64::from(n), u64::from(a));
            self.seed_flows(
                &format!("cycle, flows {a}..{b} in seeding order"),
                b - a,
                |k| {
                    let m = ((a64 + k) * SEED_STRIDE % nn) as u32;
                    (chain_addr((m + 1) % n), chain_addr(m))
                },
            )?;
            a = b;
        }
        Ok(())
    }

    /// Opens `flows` flows; flow k is the one whose guest (private address) and public
    /// address `addrs(k)` gives.
    fn seed_flows(
        &mut self,
        what: &str,
        flows: u32,
        addrs: impl Fn(u64) -> (Ipv4Addr, Ipv4Addr),
    ) -> anyhow::Result<()> {
        let (pub0, gst0) = (self.pub0, self.gst0);
        let n = u64::from(flows);
        let steps = [
            (
                "guest's first requests",
                Reason::OutboundForwarded,
                Event::ConntrackCreate,
                Some(Event::ConntrackMiss),
            ),
            (
                "replies",
                Reason::InboundForwarded,
                Event::ConntrackHit,
                Some(Event::RouteResolved),
            ),
            (
                "guest's second requests",
                Reason::OutboundForwarded,
                Event::ConntrackHit,
                None,
            ),
        ];
        for (step, reason, event, extra) in steps {
            let before = self.counters()?;
            let f = self.frames;
            if reason == Reason::OutboundForwarded {
                self.walk_by(gst0, n, 1, |k| f.outbound(addrs(k).0))?;
            } else {
                self.walk_by(pub0, n, 1, |k| f.inbound(SRC, SPORT, addrs(k).1, DPORT))?;
            }
            let mut events = vec![(event, n)];
            events.extend(extra.map(|e| (e, n)));
            self.check(
                &format!("seeding {what}: {step}"),
                &before,
                n,
                &Expect {
                    reason,
                    events: &events,
                },
            )?;
        }
        Ok(())
    }
}

/// The MAC addresses frames need: inbound ones arrive on pub0 from pub1, the guests' on gst0
/// from gst1.
#[derive(Clone, Copy, Debug)]
pub struct Frames {
    pub pub0_mac: [u8; 6],
    pub pub1_mac: [u8; 6],
    pub gst0_mac: [u8; 6],
    pub gst1_mac: [u8; 6],
}

impl Frames {
    /// An inbound frame from `src`:`sport` to `dst`:`dport`, arriving on pub0.
    pub fn inbound(&self, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
        Udp {
            dst_mac: self.pub0_mac,
            src_mac: self.pub1_mac,
            src,
            dst,
            sport,
            dport,
            ttl: 255,
            checksum: true,
        }
        .build(60)
    }

    /// A guest's frame from `guest`:[`DPORT`] to [`SRC`]:[`SPORT`], arriving on gst0.
    pub fn outbound(&self, guest: Ipv4Addr) -> Vec<u8> {
        self.outbound_to(guest, SPORT)
    }

    /// A guest's frame from `guest`:[`DPORT`] to [`SRC`]:`port`, arriving on gst0.
    pub fn outbound_to(&self, guest: Ipv4Addr, port: u16) -> Vec<u8> {
        Udp {
            dst_mac: self.gst0_mac,
            src_mac: self.gst1_mac,
            src: guest,
            dst: SRC,
            sport: DPORT,
            dport: port,
            ttl: 255,
            checksum: true,
        }
        .build(60)
    }
}
