//! The traffic generator, run with `BPF_PROG_TEST_RUN` in live-frames mode: writes a 60-byte
//! Ethernet/IPv4/UDP frame (UDP checksum 0) afresh into every frame (live-frames mode recycles
//! pages the receiver may have rewritten), sets the frame's flow, and transmits it
//! (`XDP_TX`). Flow `i` of `FLOW_COUNT` is sent from port `PORT_BASE + i % PORT_SPAN` to
//! `DPORT_BASE + i / PORT_SPAN`, or, with `REPLY` set, the other way round (the answers to
//! those flows).
#![no_std]
#![no_main]

mod common;

use aya_ebpf::{
    Global,
    bindings::xdp_action::{XDP_DROP, XDP_TX},
    helpers::bpf_get_prandom_u32,
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
};

/// The frame, as 15 native-order words (set by the loader).
#[unsafe(no_mangle)]
static TEMPLATE: [Global<u32>; 15] = [const { Global::new(0) }; 15];
/// Distinct flows.
#[unsafe(no_mangle)]
static FLOW_COUNT: Global<u32> = Global::new(1);
/// 0: a random flow per frame; 1: each frame the next flow (`COUNTER`).
#[unsafe(no_mangle)]
static SEQUENTIAL: Global<u32> = Global::new(0);
/// 0: flow i's own direction; 1: its answers (ports swapped).
#[unsafe(no_mangle)]
static REPLY: Global<u32> = Global::new(0);
#[unsafe(no_mangle)]
static DPORT_BASE: Global<u32> = Global::new(5000);

/// Ports the flow index spreads over (see the module comment); the bench uses the same.
const PORT_BASE: u32 = 1024;
const PORT_SPAN: u32 = 64_512;

/// The next flow index in sequential mode.
#[map]
static COUNTER: Array<u64> = Array::with_max_entries(1, 0);

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + 60 > end {
        return XDP_DROP;
    }
    let words = data as *mut u32;
    for i in 0..15 {
        // SAFETY: within the 60 bytes checked above; the frame's data is word-aligned.
        unsafe { words.add(i).write_volatile(TEMPLATE[i].load()) };
    }
    let flows = FLOW_COUNT.load().max(1);
    let index = if SEQUENTIAL.load() != 0 {
        let Some(c) = COUNTER.get_ptr_mut(0) else {
            return XDP_DROP;
        };
        // SAFETY: the array's only slot; a test run runs on one CPU.
        unsafe {
            let v = *c;
            *c = v + 1;
            (v % u64::from(flows)) as u32
        }
    } else {
        // SAFETY: helper without arguments.
        (unsafe { bpf_get_prandom_u32() }) % flows
    };
    let flow_port = (PORT_BASE + index % PORT_SPAN) as u16;
    let base_port = (DPORT_BASE.load() + index / PORT_SPAN) as u16;
    let (sport, dport) = if REPLY.load() != 0 {
        (base_port, flow_port)
    } else {
        (flow_port, base_port)
    };
    let ports = data as *mut [u8; 2];
    // SAFETY: offsets 34..38 lie within the 60 bytes checked above.
    unsafe {
        ports.byte_add(34).write_volatile(sport.to_be_bytes());
        ports.byte_add(36).write_volatile(dport.to_be_bytes());
    }
    XDP_TX
}
