//! `return XDP_PASS`: the do-nothing baseline of `BPF_PROG_TEST_RUN` (the test-run loop's own
//! cost per repetition).
#![no_std]
#![no_main]

mod common;

use aya_ebpf::{bindings::xdp_action::XDP_PASS, macros::xdp, programs::XdpContext};

#[xdp]
pub fn bench_empty(_ctx: XdpContext) -> u32 {
    XDP_PASS
}
