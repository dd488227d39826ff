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
// The flow cache's sequence locks (`slots`): the eBPF target's atomics.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod fast;
mod flows;
mod forward;
mod learn;
mod maps;
mod mark;
mod newflow;
mod parse;
mod policy;
mod rewrite;
mod slots;
mod stats;
mod tracked;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use nat_common::Reason;

// The maps, as `crate::NAME` for every module.
use crate::maps::*;
use crate::{parse::Packet, tracked::Tracked};

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
        // The flow's slot first, else `FLOWS` then `PENDING`; one call of the established
        // path for either (for the verifier: a second inlined copy after the slot's
        // multiplied the paths it walks).
        let cached = slots::copy(&tuple);
        let found = match &cached {
            Some(c) => Some(c.found()),
            None => flows::lookup(&tuple),
        };
        if let Some(f) = &found
            && let Some(done) = fast::forward(ctx, &pkt, &l4, f, ingress)
        {
            slots::forwarded(&tuple, &cached, f);
            return Ok(done);
        }
        // The full path works on `FLOWS` (merged with the slot), never on a slot's copy (the
        // established path refuses the copy for what it would refuse the entry for).
        let found = if cached.is_some() {
            flows::lookup(&tuple)
        } else {
            found
        };
        match found {
            Some(found) => match tracked::forward(ctx, &pkt, &l4, &found)? {
                Tracked::Done(action, reason) => return Ok((action, reason)),
                Tracked::New => {}
                Tracked::Invalid => may_open = false,
            },
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
