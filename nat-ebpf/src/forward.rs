//! Route lookup (`bpf_fib_lookup`) for a flow's first packet or a stale route, and the
//! redirect.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use nat_common::{Reason, proto};

use crate::{DEVMAP, IFACES, parse::Packet};

const AF_INET: u8 = 2;

/// Where a translated frame goes. `repr(C)`: the MACs at even offsets, as
/// `rewrite` reads them (16 bits at a time).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Route {
    /// The router's own address on the egress interface (0 if none).
    pub addr: u32,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// Largest IPv4 total length the route takes.
    pub mtu: u16,
}

/// What a route lookup is asked.
pub struct Query {
    /// The translated addresses and ports (ports feed multipath hashing and port-matching
    /// policy rules).
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    /// The role the egress interface must have.
    pub want: u32,
}

/// Why a lookup gave no usable route; `ifindex` is the egress interface where the kernel
/// named one (no neighbour yet).
pub struct NoRoute {
    pub reason: Reason,
    pub ifindex: u32,
}

/// Looks up the route for the translated addresses, as the kernel would forward it (policy
/// rules included, with the ingress interface as input device). Only a complete answer whose
/// egress interface has role `q.want` is used; everything else is left to the kernel, which
/// resolves neighbours and sends "fragmentation needed" itself.
#[inline(always)]
pub fn lookup(ctx: &XdpContext, pkt: &Packet, q: &Query) -> Result<Route, NoRoute> {
    // The request lives in this CPU's scratch space, off the BPF stack (64 bytes, 8-aligned:
    // the size `nat_common::Scratch::fib` has).
    const _: () = assert!(core::mem::size_of::<FibParams>() == 64);
    let fail = |reason, ifindex| Err(NoRoute { reason, ifindex });
    let Some(scratch) = crate::flows::scratch() else {
        return fail(Reason::NoRoute, 0);
    };
    crate::flows::zero(&mut scratch.fib);
    // SAFETY: `fib` is 64 bytes, 8-aligned, all zeros: a valid, empty `bpf_fib_lookup`.
    let p = unsafe { &mut *(scratch.fib.as_mut_ptr() as *mut FibParams) };
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    // The ports of TCP, UDP, UDP-Lite and DCCP (0 for protocols without); not an ICMP
    // query's identifier.
    if pkt.proto != proto::ICMP {
        p.sport = q.sport;
        p.dport = q.dport;
    }
    p.__bindgen_anon_1.tot_len = pkt.tot_len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_2.tos = pkt.tos;
    p.__bindgen_anon_3.ipv4_src = q.src;
    p.__bindgen_anon_4.ipv4_dst = q.dst;
    // SAFETY: `p` is a live, correctly sized `bpf_fib_lookup`.
    let ret =
        unsafe { bpf_fib_lookup(ctx.as_ptr(), p, core::mem::size_of::<FibParams>() as i32, 0) };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        // The kernel filled in the egress interface before it missed the neighbour.
        BPF_FIB_LKUP_RET_NO_NEIGH => return fail(Reason::NoNeighbour, p.ifindex),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return fail(Reason::FragNeeded, 0),
        _ => return fail(Reason::NoRoute, 0),
    }
    // SAFETY: a shared read of a value natd only replaces whole.
    let addr = match unsafe { IFACES.get(&p.ifindex) } {
        Some(cfg) if cfg.role == q.want => cfg.addr,
        _ => return fail(Reason::WrongEgress, p.ifindex),
    };
    // SAFETY: on success the kernel (5.12+) writes the route's MTU over `tot_len`; before
    // that it leaves `tot_len`, which this packet fits.
    let mtu = unsafe { p.__bindgen_anon_1.mtu_result };
    Ok(Route {
        addr,
        ifindex: p.ifindex,
        smac: p.smac,
        dmac: p.dmac,
        mtu: if mtu == 0 { pkt.tot_len } else { mtu },
    })
}

/// The role of interface `ifindex`, 0 if natd did not configure it.
#[inline(always)]
pub fn role(ifindex: u32) -> u32 {
    // SAFETY: a shared read of a value natd only replaces whole.
    unsafe { IFACES.get(&ifindex) }.map_or(0, |c| c.role)
}

/// Redirects to `ifindex`. natd puts every interface of `IFACES` into `DEVMAP` first, so the
/// lookup cannot miss; if it ever did, the frame is aborted (visible as an XDP exception).
#[inline(always)]
pub fn redirect(ifindex: u32) -> u32 {
    DEVMAP
        .redirect(ifindex, 0)
        .unwrap_or(xdp_action::XDP_ABORTED)
}
