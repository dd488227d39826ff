//! The tc ingress marker: tells the kernel which packets the fast path admitted. Whatever the
//! XDP program passes to the kernel (fragments, IP options, no neighbour, too big, TTL 1)
//! reaches tc ingress next; a packet whose wire tuple is a live flow's key, arriving on that
//! flow's side of the router, gets [`FASTPATH_MARK`], which natd's nftables table accepts
//! before its ingress and egress rules, so the kernel gives it the fast path's verdict. The
//! first fragment carries the ports and its mark survives reassembly; later fragments are not
//! looked at. Frames XDP redirected or dropped never pass here.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use nat_common::marks::FASTPATH_MARK;

use crate::{
    flows, forward,
    parse::{self, IP_MAX_LEN, IP_OFF},
};

#[classifier]
pub fn mark(ctx: TcContext) -> i32 {
    try_mark(&ctx);
    TC_ACT_OK as i32
}

/// Headers the marker reads must be in the linear part of the buffer: the longest IPv4
/// header and 8 bytes of the transport header.
const HEADERS: usize = IP_OFF + IP_MAX_LEN + 8;

#[inline(always)]
fn try_mark(ctx: &TcContext) -> Option<()> {
    // SAFETY: reads a field of the context the program was given.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let role = forward::role(ifindex);
    if role == 0 {
        return None;
    }
    let linear = ctx.data_end() - ctx.data();
    if linear < HEADERS && (ctx.len() as usize) > linear {
        let _ = ctx.pull_data(HEADERS as u32);
    }
    let key = parse::wire_tuple(ctx)?;
    let found = flows::lookup(&key)?;
    // SAFETY: a live map value.
    let in_ifindex = unsafe { (*found.entry).in_ifindex };
    // The flow's side of the router, as the XDP program requires it (a reply may come back on
    // another interface of that side).
    if in_ifindex != ifindex && forward::role(in_ifindex) != role {
        return None;
    }
    if !flows::live(&found) {
        return None;
    }
    // SAFETY: as above.
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(mark | FASTPATH_MARK);
    Some(())
}
