//! XDP fast path for 1:1 static NAT.
//!
//! A packet is [`parse`]d, then looked up by its wire tuple in the flow table
//! ([`flows`]): an established flow's entry holds the whole rewrite and route, and is applied
//! as it is ([`fast`]). Everything else takes the full path: a tracked flow's state advances
//! and its route is resolved again where needed ([`tracked`]); a packet without a flow is
//! classified by the mappings, judged by [`policy`] (ingress firewall, egress policy), routed
//! ([`forward`]) and opens its flow ([`newflow`]). Every exit is counted exactly once, in
//! [`nat`]. Anything the program cannot handle is `XDP_PASS`ed untouched; the kernel's
//! nftables mirror (see natd) translates it the same way.
#![no_std]
#![no_main]

mod fast;
mod flows;
mod forward;
mod learn;
mod mark;
mod newflow;
mod parse;
mod policy;
mod rewrite;
mod stats;
mod tracked;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use nat_common::{
    Counter, EgSvcData, FlowEntry, FlowTuple, FwSrcData, FwSvcData, IfaceConfig, MappingStats,
    NatConfig, NatValue, Reason, RuleBits, Scratch, maps as spec,
};

use crate::{parse::Packet, tracked::Tracked};

// The maps, each from its one declaration in `nat_common::maps` (name = the static's name).

/// Public address -> private address and counter slot (natd writes).
#[map]
static NAT_IN: HashMap<u32, NatValue> =
    HashMap::with_max_entries(spec::NAT_IN.max_entries, spec::NAT_IN.flags);
/// Private address -> public address and counter slot (natd writes).
#[map]
static NAT_OUT: HashMap<u32, NatValue> =
    HashMap::with_max_entries(spec::NAT_OUT.max_entries, spec::NAT_OUT.flags);
/// Counter slot -> a mapping's counters, per CPU (we count, natd sums and zeroes).
#[map]
static MAPPING_STATS: PerCpuArray<MappingStats> =
    PerCpuArray::with_max_entries(spec::MAPPING_STATS.max_entries, spec::MAPPING_STATS.flags);
/// Wire tuple -> one direction of an assured flow (we write; natd collects expired flows).
#[map]
static FLOWS: LruHashMap<FlowTuple, FlowEntry> =
    LruHashMap::with_max_entries(spec::FLOWS.max_entries, spec::FLOWS.flags);
/// Wire tuple -> one direction of a flow not yet assured.
#[map]
static PENDING: LruHashMap<FlowTuple, FlowEntry> =
    LruHashMap::with_max_entries(spec::PENDING.max_entries, spec::PENDING.flags);
/// ifindex -> role of each interface natd attached to (natd writes).
#[map]
static IFACES: HashMap<u32, IfaceConfig> =
    HashMap::with_max_entries(spec::IFACES.max_entries, spec::IFACES.flags);
/// ifindex -> ifindex, redirect targets; natd keeps it a superset of `IFACES`.
#[map]
static DEVMAP: DevMapHash = DevMapHash::with_max_entries(spec::DEVMAP.max_entries, 0);
/// Reason -> frames and bytes, per CPU (we write, natd sums).
#[map]
static STATS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(spec::STATS.max_entries, spec::STATS.flags);
/// Event -> count, per CPU (we write, natd sums).
#[map]
static EVENTS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(spec::EVENTS.max_entries, spec::EVENTS.flags);
/// (public IP, source prefix) -> ingress rules whose CIDRs contain it (natd writes).
#[map]
static FW_SRC: LpmTrie<FwSrcData, RuleBits> =
    LpmTrie::with_max_entries(spec::FW_SRC.max_entries, 0);
/// (public IP, protocol, port/ICMP prefix) -> ingress rules matching it (natd writes).
#[map]
static FW_SVC: LpmTrie<FwSvcData, RuleBits> =
    LpmTrie::with_max_entries(spec::FW_SVC.max_entries, 0);
/// Guest source prefix -> egress rules whose source CIDRs contain it (natd writes).
#[map]
static EG_SRC: LpmTrie<[u8; 4], RuleBits> = LpmTrie::with_max_entries(spec::EG_SRC.max_entries, 0);
/// Destination prefix -> egress rules whose CIDRs contain it (natd writes).
#[map]
static EG_DST: LpmTrie<[u8; 4], RuleBits> = LpmTrie::with_max_entries(spec::EG_DST.max_entries, 0);
/// (protocol, port/ICMP prefix) -> egress rules matching it (natd writes).
#[map]
static EG_SVC: LpmTrie<EgSvcData, RuleBits> =
    LpmTrie::with_max_entries(spec::EG_SVC.max_entries, 0);
/// Settings and the route generation (natd writes).
#[map]
static CONFIG: Array<NatConfig> =
    Array::with_max_entries(spec::CONFIG.max_entries, spec::CONFIG.flags);
/// Per-CPU scratch space (see `nat_common::maps::SCRATCH`).
#[map]
static SCRATCH: PerCpuArray<Scratch> =
    PerCpuArray::with_max_entries(spec::SCRATCH.max_entries, spec::SCRATCH.flags);
/// The layout version of the pins (natd's; never read here).
#[map]
static META: Array<u32> = Array::with_max_entries(spec::META.max_entries, spec::META.flags);

#[xdp]
pub fn nat(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    match try_nat(&ctx) {
        Ok((action, reason)) => {
            stats::count(reason, len);
            action
        }
        Err(reason) => {
            stats::count(reason, len);
            xdp_action::XDP_PASS
        }
    }
}

/// Returns the action (redirect or drop) and its reason, or the reason to pass the frame on
/// untouched.
#[inline(always)]
fn try_nat(ctx: &XdpContext) -> Result<(u32, Reason), Reason> {
    let pkt = Packet::parse(ctx)?;
    let l4 = pkt.transport(ctx)?;
    let ingress = ctx.ingress_ifindex() as u32;
    let mut may_open = true;
    if let Some(tuple) = l4.tuple(&pkt) {
        match flows::lookup(&tuple) {
            Some(found) => {
                if let Some(done) = fast::forward(ctx, &pkt, &l4, &found, ingress) {
                    return Ok(done);
                }
                match tracked::forward(ctx, &pkt, &l4, &found)? {
                    Tracked::Done(action, reason) => return Ok((action, reason)),
                    Tracked::New => {}
                    Tracked::Invalid => may_open = false,
                }
            }
            None => stats::event(nat_common::Event::ConntrackMiss),
        }
    }
    newflow::forward(ctx, &pkt, &l4, may_open)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
