//! Route lookup on the translated packet (`bpf_fib_lookup`) and the redirect.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action,
    },
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use nat_common::Reason;

use crate::{
    DEVMAP, IFACES,
    parse::{Packet, Transport},
};

const AF_INET: u8 = 2;

/// Where a translated frame goes.
pub struct Route {
    /// The router's own address on the egress interface (0 if none).
    pub addr: u32,
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// Looks up the route for the translated addresses, as the kernel would forward it (policy
/// rules included, with the ingress interface as input device). Only a complete answer whose
/// egress interface has role `want` is used; everything else is left to the kernel,
/// which resolves neighbours and sends "fragmentation needed" itself.
#[inline(always)]
pub fn lookup(
    ctx: &XdpContext,
    pkt: &Packet,
    l4: &Transport,
    src: u32,
    dst: u32,
    want: u32,
) -> Result<Route, Reason> {
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid (empty) request.
    let mut p: FibParams = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.l4_protocol = pkt.proto;
    // Ports only feed the multipath hash and port-matching policy rules; ICMP has none.
    if l4.csum_at.is_some() {
        p.sport = l4.sport;
        p.dport = l4.dport;
    }
    p.__bindgen_anon_1.tot_len = pkt.tot_len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    p.__bindgen_anon_2.tos = pkt.tos;
    p.__bindgen_anon_3.ipv4_src = src;
    p.__bindgen_anon_4.ipv4_dst = dst;
    // SAFETY: `p` is a live, correctly sized `bpf_fib_lookup`.
    let ret = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut p,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    match ret as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => {}
        BPF_FIB_LKUP_RET_NO_NEIGH => return Err(Reason::NoNeighbour),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => return Err(Reason::FragNeeded),
        _ => return Err(Reason::NoRoute),
    }
    // SAFETY: a shared read of a value natd only replaces whole.
    let cfg_addr = match unsafe { IFACES.get(&p.ifindex) } {
        Some(cfg) if cfg.role == want => cfg.addr,
        _ => return Err(Reason::WrongEgress),
    };
    Ok(Route {
        addr: cfg_addr,
        ifindex: p.ifindex,
        smac: p.smac,
        dmac: p.dmac,
    })
}

/// Redirects to `ifindex`. natd puts every interface of `IFACES` into `DEVMAP` first, so the
/// lookup cannot miss; if it ever did, the frame is aborted (visible as an XDP exception).
#[inline(always)]
pub fn redirect(ifindex: u32) -> u32 {
    DEVMAP
        .redirect(ifindex, 0)
        .unwrap_or(xdp_action::XDP_ABORTED)
}
