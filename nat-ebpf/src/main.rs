//! XDP fast path for 1:1 static NAT.
//!
//! Stages, each in its own module: [`parse`] (headers, sanity) -> classify (which mapping, in
//! [`try_nat`]) -> [`policy`] (connection tracking, firewall, egress) -> [`forward`] (route
//! lookup on the translated packet) -> [`rewrite`] (addresses, checksums, TTL, MACs) ->
//! redirect. Every exit is counted exactly once, in [`nat`]. Anything
//! the program cannot handle is `XDP_PASS`ed untouched; the kernel's nftables mirror (see
//! natd) translates it the same way.
#![no_std]
#![no_main]

mod forward;
mod hairpin;
mod learn;
mod parse;
mod policy;
mod rewrite;
mod stats;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::XdpContext,
};
use nat_common::{
    Counter, DEFAULT_CONNTRACK_SIZE, EgSvcData, Event, FlowKey, FlowState, FwSrcData, FwSvcData,
    IfaceConfig, MAX_EG, MAX_FW_SRC, MAX_FW_SVC, MAX_IFACES, MAX_MAPPINGS, NatConfig, NatEntry,
    ROLE_GUEST, ROLE_PUBLIC, Reason, RuleBits,
};

use crate::parse::Packet;

/// Mappings are allocated as added (`BPF_F_NO_PREALLOC`): a preallocated per-CPU table of
/// `MAX_MAPPINGS` would cost `MAX_MAPPINGS * 32 B * CPUs` up front and seconds to create.
const BPF_F_NO_PREALLOC: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;

/// Public address -> private address + inbound counters (natd writes, we count).
#[map]
static NAT_IN: PerCpuHashMap<u32, NatEntry> =
    PerCpuHashMap::with_max_entries(MAX_MAPPINGS, BPF_F_NO_PREALLOC);
/// Private address -> public address + outbound counters (natd writes, we count).
#[map]
static NAT_OUT: PerCpuHashMap<u32, NatEntry> =
    PerCpuHashMap::with_max_entries(MAX_MAPPINGS, BPF_F_NO_PREALLOC);
/// ifindex -> role of each interface natd attached to (natd writes).
#[map]
static IFACES: HashMap<u32, IfaceConfig> = HashMap::with_max_entries(MAX_IFACES, 0);
/// ifindex -> ifindex, redirect targets; natd keeps it a superset of `IFACES`.
#[map]
static DEVMAP: DevMapHash = DevMapHash::with_max_entries(MAX_IFACES, 0);
/// Reason -> frames and bytes, per CPU (we write, natd sums).
#[map]
static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);
/// Event -> count, per CPU (we write, natd sums).
#[map]
static EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Event::COUNT, 0);
/// (public IP, source prefix) -> ingress rules whose CIDRs contain it (natd writes).
#[map]
static FW_SRC: LpmTrie<FwSrcData, RuleBits> = LpmTrie::with_max_entries(MAX_FW_SRC, 0);
/// (public IP, protocol, port/ICMP prefix) -> ingress rules matching it (natd writes).
#[map]
static FW_SVC: LpmTrie<FwSvcData, RuleBits> = LpmTrie::with_max_entries(MAX_FW_SVC, 0);
/// Guest source prefix -> egress rules whose source CIDRs contain it (natd writes).
#[map]
static EG_SRC: LpmTrie<[u8; 4], RuleBits> = LpmTrie::with_max_entries(MAX_EG, 0);
/// Destination prefix -> egress rules whose CIDRs contain it (natd writes).
#[map]
static EG_DST: LpmTrie<[u8; 4], RuleBits> = LpmTrie::with_max_entries(MAX_EG, 0);
/// (protocol, port/ICMP prefix) -> egress rules matching it (natd writes).
#[map]
static EG_SVC: LpmTrie<EgSvcData, RuleBits> = LpmTrie::with_max_entries(MAX_EG, 0);
/// Flow (guest's view) -> state; shared by all CPUs; natd may resize it at load and collects
/// expired entries.
#[map]
static CONNTRACK: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, 0);
/// Settings natd writes at start (egress default, timeouts).
#[map]
static CONFIG: Array<NatConfig> = Array::with_max_entries(1, 0);

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
    let ifindex = ctx.ingress_ifindex() as u32;
    // SAFETY: a shared read of a value natd only replaces whole.
    let iface = unsafe { IFACES.get(&ifindex) }.ok_or(Reason::UnknownIface)?;
    let (role, own_addr) = (iface.role, iface.addr);
    let pkt = Packet::parse(ctx)?;
    if role == ROLE_PUBLIC {
        let entry = NAT_IN.get_ptr_mut(&pkt.daddr).ok_or(Reason::Unmapped)?;
        return translate(ctx, &pkt, true, entry);
    }
    // Guest side: to a mapped public IP is hairpin; to the router itself may be a hairpin
    // reply; otherwise a mapped private source goes out.
    if let Some(entry) = NAT_IN.get_ptr_mut(&pkt.daddr) {
        return hairpin::forward(ctx, &pkt, entry);
    }
    if own_addr != 0
        && pkt.daddr == own_addr
        && let Some(done) = hairpin::reply(ctx, &pkt)?
    {
        return Ok(done);
    }
    let entry = NAT_OUT.get_ptr_mut(&pkt.saddr).ok_or(Reason::Unmapped)?;
    translate(ctx, &pkt, false, entry)
}

/// Inbound (P -> V) or outbound (V -> P) translation with `entry` the mapping's value in the
/// direction's map.
#[inline(always)]
fn translate(
    ctx: &XdpContext,
    pkt: &Packet,
    inbound: bool,
    entry: *mut NatEntry,
) -> Result<(u32, Reason), Reason> {
    let old = if inbound { pkt.daddr } else { pkt.saddr };
    // SAFETY: the pointer is this CPU's copy of the value, valid for the program's run.
    let new = unsafe { (*entry).addr };
    if pkt.ttl <= 1 {
        return Err(Reason::TtlExpired);
    }
    let l4 = pkt.transport(ctx, inbound, old)?;
    let (public, private) = if inbound { (old, new) } else { (new, old) };
    let admit = match policy::check(pkt, &l4, inbound, public, private) {
        Ok(a) => a,
        Err(denied) => {
            // SAFETY: as above; per-CPU.
            unsafe { (*entry).denied += 1 };
            return Ok((xdp_action::XDP_DROP, denied));
        }
    };
    let (src, dst, want) = if inbound {
        (pkt.saddr, new, ROLE_GUEST)
    } else {
        (new, pkt.daddr, ROLE_PUBLIC)
    };
    let route = forward::lookup(ctx, pkt, &l4, src, dst, want)?;
    if let policy::Admit::Open(key) = admit {
        let _ = policy::create(&key, pkt.proto, &l4, !inbound, policy::now());
    }
    rewrite::translate(ctx, pkt, &l4, inbound, old, new)?;
    rewrite::forward_l2(ctx, &route)?;
    // SAFETY: as above; per-CPU, so plain increments do not race.
    unsafe {
        (*entry).packets += 1;
        (*entry).bytes += (ctx.data_end() - ctx.data()) as u64;
    }
    let reason = if inbound {
        Reason::InboundForwarded
    } else {
        Reason::OutboundForwarded
    };
    Ok((forward::redirect(route.ifindex), reason))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
