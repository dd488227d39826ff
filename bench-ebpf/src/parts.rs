//! Section 1b's micro-benchmarks: each part of the established path measured alone, by
//! calling the XDP program's own code (nat-ebpf's modules, compiled in here unchanged) on the
//! loaded program's own maps (the loader reuses them through pins), plus the firewall's LPM
//! lookups. One operation per run; a run whose operation succeeded (lookup hit, route found,
//! redirect target present) adds one to `HITS`, so the bench can refuse a measurement of
//! misses. The counter parts (`STATS`, `EVENTS`, `MAPPING_STATS`) are checked by the bench
//! from the counters they moved.
//!
//! `p_none` only counts its run, `p_key*` programs also produce a key (the baselines
//! subtracted); `*_cyc` programs take the next of `CYCLE_N` keys each run, so lookups miss the
//! CPU caches as traffic over many flows would.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod common;

// The flow functions' module reaches the fast path and the flow cache's (`flows` merges a
// slot before each lookup), which the parts measured here do not use.
#[allow(dead_code)]
#[path = "../../nat-ebpf/src/fast.rs"]
mod fast;
#[allow(dead_code)]
#[path = "../../nat-ebpf/src/flows.rs"]
mod flows;
#[allow(dead_code)]
#[path = "../../nat-ebpf/src/forward.rs"]
mod forward;
#[allow(dead_code)]
#[path = "../../nat-ebpf/src/parse.rs"]
mod parse;
#[allow(dead_code)]
#[path = "../../nat-ebpf/src/rewrite.rs"]
mod rewrite;
#[allow(dead_code)]
#[path = "../../nat-ebpf/src/slots.rs"]
mod slots;
#[allow(dead_code)]
#[path = "../../nat-ebpf/src/stats.rs"]
mod stats;

use core::hint::black_box;

use aya_ebpf::{
    Global,
    bindings::xdp_action::{XDP_DROP, XDP_REDIRECT},
    macros::{map, xdp},
    maps::{Array, LpmTrie, lpm_trie::Key},
    programs::XdpContext,
};
use nat_common::{
    COUNT_IN, Event, FW_SRC_BASE_BITS, FW_SVC_BASE_BITS, FlowEntry, FlowTuple, FwSrcData,
    FwSvcData, ROLE_GUEST, Reason, RuleBits,
    conntrack::{State, Timeout},
    proto,
};

use crate::{
    flows::{Kind, NewFlow},
    forward::{Query, Route},
    parse::Packet,
};

// The program's maps, nat-ebpf's own declarations; the loader points each at the loaded
// program's own map (pins), so these programs read and write the real tables.
#[allow(dead_code)]
#[path = "../../nat-ebpf/src/maps.rs"]
mod maps;
use maps::*;

// The bench's own maps.
/// Runs whose operation succeeded.
#[map]
static HITS: Array<u64> = Array::with_max_entries(1, 0);
/// The cycling key's counter.
#[map]
static CTR: Array<u64> = Array::with_max_entries(1, 0);
/// A one-entry firewall trie, next to the program's full one.
#[map]
static LPM1: LpmTrie<FwSrcData, RuleBits> = LpmTrie::with_max_entries(16, 1);
/// A copy of the hot flow's entry, for the rewrite alone.
#[map]
static ENTRY: Array<FlowEntry> = Array::with_max_entries(1, 0);

// The hot flow as the packet carries it (network order), and what its entry needs.
#[unsafe(no_mangle)]
static SRC: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static PUBLIC: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static SPORT: Global<u16> = Global::new(0);
#[unsafe(no_mangle)]
static DPORT: Global<u16> = Global::new(0);
/// Where the hot flow leaves, and its private address (the route looked up).
#[unsafe(no_mangle)]
static OUT_IFINDEX: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static PRIVATE: Global<u32> = Global::new(0);
/// The hot mapping's counter slot.
#[unsafe(no_mangle)]
static SLOT: Global<u32> = Global::new(0);
/// The first mapping of the cycle's counter slot (the cycle's slots follow it).
#[unsafe(no_mangle)]
static CYCLE_SLOT: Global<u32> = Global::new(0);
/// Cycling keys: `CYCLE_N` destinations from `CYCLE_BASE` (host order).
#[unsafe(no_mangle)]
static CYCLE_N: Global<u32> = Global::new(1);
#[unsafe(no_mangle)]
static CYCLE_BASE: Global<u32> = Global::new(0);

const FRAME_LEN: u64 = 60;

/// The facts `Packet::parse` gives for the bench's 60-byte UDP frame.
#[inline(always)]
fn packet() -> Packet {
    Packet {
        tot_len: 46,
        proto: proto::UDP,
        tos: 0,
        ttl: 64,
        saddr: SRC.load(),
        daddr: PUBLIC.load(),
        first_fragment: false,
    }
}

#[inline(always)]
fn finish(ok: bool) -> u32 {
    common::finish(&HITS, ok)
}

/// The next of `CYCLE_N` indices.
#[inline(always)]
fn next() -> Option<u32> {
    let v = common::tick(&CTR)?;
    Some((v % u64::from(CYCLE_N.load().max(1))) as u32)
}

#[inline(always)]
fn hot_tuple() -> FlowTuple {
    FlowTuple::new(
        SRC.load(),
        PUBLIC.load(),
        SPORT.load(),
        DPORT.load(),
        proto::UDP,
    )
}

/// The hot flow's key with the next cycled destination.
#[inline(always)]
fn cycled_tuple() -> Option<FlowTuple> {
    let i = next()?;
    Some(FlowTuple {
        daddr: (CYCLE_BASE.load().wrapping_add(i)).to_be(),
        ..hot_tuple()
    })
}

/// The hot source with the next cycled /24 (16.i.j.1 from 16.0.0.1).
#[inline(always)]
fn cycled_source() -> Option<u32> {
    Some(SRC.load().wrapping_add(next()? << 8))
}

#[inline(always)]
fn src_key(source: u32) -> Key<FwSrcData> {
    Key::new(
        FW_SRC_BASE_BITS + 32,
        FwSrcData {
            public: PUBLIC.load().to_ne_bytes(),
            source: source.to_ne_bytes(),
        },
    )
}

#[xdp]
pub fn p_none(_ctx: XdpContext) -> u32 {
    finish(true)
}

#[xdp]
pub fn p_key(_ctx: XdpContext) -> u32 {
    finish(black_box(hot_tuple()).proto == proto::UDP)
}

#[xdp]
pub fn p_key_cyc(_ctx: XdpContext) -> u32 {
    match cycled_tuple() {
        Some(t) => finish(black_box(t).proto == proto::UDP),
        None => XDP_DROP,
    }
}

#[xdp]
pub fn p_parse(ctx: XdpContext) -> u32 {
    let ok = match Packet::parse(&ctx) {
        Ok(pkt) => match pkt.transport(&ctx) {
            Ok(l4) => l4.tuple(&pkt).map(black_box).is_some(),
            Err(_) => false,
        },
        Err(_) => false,
    };
    finish(ok)
}

/// The `FLOWS` lookup alone (not `flows::lookup`, which also merges and empties the flow's
/// slot, as the full path does).
#[xdp]
pub fn p_flows(_ctx: XdpContext) -> u32 {
    finish(flows::flows_entry(&hot_tuple()).is_some())
}

/// The hot flow's slot copied under its sequence lock (`slots::copy`, what an established
/// packet reads instead of `FLOWS`). A run that finds the slot empty or another flow's
/// (the program's full path empties it) fills it from `FLOWS` and copies again: once per
/// emptying, not per run.
#[xdp]
pub fn p_slot(_ctx: XdpContext) -> u32 {
    let t = hot_tuple();
    if let Some(c) = slots::copy(&t) {
        return finish(!black_box(c.entry).is_null());
    }
    match flows::flows_entry(&t) {
        Some(e) => slots::fill(&t, e),
        None => return XDP_DROP,
    }
    finish(slots::copy(&t).is_some())
}

/// A flow no table holds (the hot flow's tuple as TCP): both tables miss, as for a new flow.
#[xdp]
pub fn p_flows_miss(_ctx: XdpContext) -> u32 {
    let t = FlowTuple {
        proto: proto::TCP,
        ..hot_tuple()
    };
    finish(flows::lookup(&t).is_none())
}

/// A new flow's entry written into `PENDING` (the hot flow's tuple as ESP, which no packet
/// uses; each run replaces the last run's entry).
#[xdp]
pub fn p_pend_ins(_ctx: XdpContext) -> u32 {
    let t = FlowTuple {
        proto: 50,
        ..hot_tuple()
    };
    finish(matches!(ENTRY.get(0), Some(e) if PENDING.insert(&t, e, 0).is_ok()))
}

/// The same with the next cycled destination each run (a different entry each time).
#[xdp]
pub fn p_pend_ins_cyc(_ctx: XdpContext) -> u32 {
    let Some(t) = cycled_tuple() else {
        return XDP_DROP;
    };
    let t = FlowTuple { proto: 50, ..t };
    finish(matches!(ENTRY.get(0), Some(e) if PENDING.insert(&t, e, 0).is_ok()))
}

/// A flow opened as the program opens a new one (`flows::create`: both entries built and
/// written into `PENDING`), keyed `t` as ESP (which no packet uses). Counted by the bench from
/// `EVENTS` (`conntrack_create` counts only when both entries were written).
#[inline(always)]
fn create(t: FlowTuple) -> u32 {
    let orig = FlowTuple { proto: 50, ..t };
    let route = Route {
        addr: 0,
        ifindex: OUT_IFINDEX.load(),
        smac: [2, 0, 0, 0, 0, 1],
        dmac: [2, 0, 0, 0, 0, 2],
        mtu: 1500,
    };
    let f = NewFlow {
        orig,
        orig_to: FlowTuple {
            daddr: PRIVATE.load(),
            ..orig
        },
        kind: Kind::Inbound,
        conn: (State::Other as u8, 0, Timeout::Other as u8),
        ingress: 0,
        route: &route,
        slot: SLOT.load(),
    };
    finish(flows::create(&f).is_some())
}

#[xdp]
pub fn p_create(_ctx: XdpContext) -> u32 {
    create(hot_tuple())
}

#[xdp]
pub fn p_create_cyc(_ctx: XdpContext) -> u32 {
    match cycled_tuple() {
        Some(t) => create(t),
        None => XDP_DROP,
    }
}

#[xdp]
pub fn p_flows_cyc(_ctx: XdpContext) -> u32 {
    match cycled_tuple() {
        Some(t) => finish(flows::flows_entry(&t).is_some()),
        None => XDP_DROP,
    }
}

#[xdp]
pub fn p_config(_ctx: XdpContext) -> u32 {
    finish(flows::config().map(|c| black_box(c.route_gen)).is_some())
}

#[xdp]
pub fn p_jiffies(_ctx: XdpContext) -> u32 {
    finish(black_box(flows::jiffies()) != 0)
}

#[xdp]
pub fn p_now_ns(_ctx: XdpContext) -> u32 {
    finish(black_box(flows::now_ns()) != 0)
}

#[xdp]
pub fn p_entry(_ctx: XdpContext) -> u32 {
    finish(ENTRY.get(0).map(black_box).is_some())
}

#[xdp]
pub fn p_rewrite(ctx: XdpContext) -> u32 {
    let ok = match ENTRY.get(0) {
        Some(e) => rewrite::apply(&ctx, &packet(), e).is_ok(),
        None => false,
    };
    finish(ok)
}

#[xdp]
pub fn p_stats(_ctx: XdpContext) -> u32 {
    stats::count(Reason::InboundForwarded, FRAME_LEN);
    finish(true)
}

#[xdp]
pub fn p_events(_ctx: XdpContext) -> u32 {
    stats::event(Event::FastPath);
    finish(true)
}

#[xdp]
pub fn p_mapstats(_ctx: XdpContext) -> u32 {
    stats::forwarded(SLOT.load(), COUNT_IN, FRAME_LEN);
    finish(true)
}

/// The next of the cycle's counter slots in a scattered order (a stride through them), as
/// traffic over many mappings would count.
#[inline(always)]
fn scattered_slot() -> Option<u32> {
    let n = u64::from(CYCLE_N.load().max(1));
    Some(CYCLE_SLOT.load() + (u64::from(next()?) * 7_919 % n) as u32)
}

#[xdp]
pub fn p_key_slot_cyc(_ctx: XdpContext) -> u32 {
    match scattered_slot() {
        Some(s) => finish(black_box(s) != 0),
        None => XDP_DROP,
    }
}

/// A different mapping's counters each run.
#[xdp]
pub fn p_mapstats_cyc(_ctx: XdpContext) -> u32 {
    match scattered_slot() {
        Some(s) => {
            stats::forwarded(s, COUNT_IN, FRAME_LEN);
            finish(true)
        }
        None => XDP_DROP,
    }
}

#[xdp]
pub fn p_redirect(_ctx: XdpContext) -> u32 {
    finish(forward::redirect(OUT_IFINDEX.load()) == XDP_REDIRECT)
}

#[xdp]
pub fn p_fib(ctx: XdpContext) -> u32 {
    let q = Query {
        src: SRC.load(),
        dst: PRIVATE.load(),
        sport: SPORT.load(),
        dport: DPORT.load(),
        want: ROLE_GUEST,
    };
    finish(forward::lookup(&ctx, &packet(), &q).is_ok())
}

#[xdp]
pub fn p_lpm1(_ctx: XdpContext) -> u32 {
    finish(LPM1.get(src_key(SRC.load())).is_some())
}

#[xdp]
pub fn p_lpm_src(_ctx: XdpContext) -> u32 {
    finish(FW_SRC.get(src_key(SRC.load())).is_some())
}

#[xdp]
pub fn p_lpm_svc(_ctx: XdpContext) -> u32 {
    let k = Key::new(
        FW_SVC_BASE_BITS + 16,
        FwSvcData {
            public: PUBLIC.load().to_ne_bytes(),
            proto: proto::UDP,
            service: DPORT.load().to_ne_bytes(),
            _pad: 0,
        },
    );
    finish(FW_SVC.get(k).is_some())
}

#[xdp]
pub fn p_key_src(_ctx: XdpContext) -> u32 {
    finish(black_box(src_key(SRC.load())).prefix_len != 0)
}

#[xdp]
pub fn p_key_src_cyc(_ctx: XdpContext) -> u32 {
    match cycled_source() {
        Some(s) => finish(black_box(src_key(s)).prefix_len != 0),
        None => XDP_DROP,
    }
}

#[xdp]
pub fn p_lpm_src_cyc(_ctx: XdpContext) -> u32 {
    match cycled_source() {
        Some(s) => finish(FW_SRC.get(src_key(s)).is_some()),
        None => XDP_DROP,
    }
}
