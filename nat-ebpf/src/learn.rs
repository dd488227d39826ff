//! The tc egress learner: makes flows the kernel's slow path forwarded known to the fast
//! path. A packet leaving a public interface from a mapped public IP was SNATed by the kernel
//! (its flow was opened by the guest); one leaving a guest interface to a mapped private IP
//! was DNATed (opened from the internet). Either opens or advances that flow in the shared
//! connection table, so its later packets, which take the fast path, belong to it instead of
//! meeting the firewall as strangers. Frames XDP redirects never pass here.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use nat_common::{FlowKey, ROLE_PUBLIC};

use crate::{
    IFACES, NAT_IN, NAT_OUT,
    parse::{L4_OFF, PROTO_ICMP, PROTO_TCP, PROTO_UDP, Transport, ptr_at},
    policy,
};

#[classifier]
pub fn learn(ctx: TcContext) -> i32 {
    try_learn(&ctx);
    TC_ACT_OK as i32
}

/// Headers the learner reads must be in the linear part of the buffer.
const HEADERS: u32 = (L4_OFF + 14) as u32;

#[inline(always)]
fn try_learn(ctx: &TcContext) -> Option<()> {
    // SAFETY: reads a field of the context the program was given.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a shared read of a value natd only replaces whole.
    let role = unsafe { IFACES.get(&ifindex) }?.role;
    let _ = ctx.pull_data(HEADERS);
    let eth = ptr_at::<[u8; 14]>(ctx, 0)?;
    // SAFETY: in bounds per `ptr_at`.
    let eth = unsafe { &*eth };
    if eth[12] != 0x08 || eth[13] != 0x00 {
        return None;
    }
    let ip = ptr_at::<[u8; 20]>(ctx, 14)?;
    // SAFETY: in bounds per `ptr_at`.
    let ip = unsafe { &*ip };
    // No options; a first fragment (offset 0) still carries the ports.
    if ip[0] != 0x45 || u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
        return None;
    }
    let proto = ip[9];
    let saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let l4 = transport(ctx, proto)?;
    // Outbound (SNATed, leaving a public interface) or inbound (DNATed, leaving a guest one).
    let (from_guest, guest, remote, guest_port, remote_port) = if role == ROLE_PUBLIC {
        let private = NAT_IN.get_ptr(&saddr)?;
        // SAFETY: this CPU's copy of a live value.
        (true, unsafe { (*private).addr }, daddr, l4.sport, l4.dport)
    } else {
        NAT_OUT.get_ptr(&daddr)?;
        (false, daddr, saddr, l4.dport, l4.sport)
    };
    let key = FlowKey {
        guest,
        remote,
        guest_port,
        remote_port: policy::icmp_remote_port(proto, &l4, from_guest, remote_port),
        proto,
        ..FlowKey::default()
    };
    let now = policy::now();
    if policy::track(&key, proto, &l4, from_guest, now) == policy::Track::Miss {
        let _ = policy::create(&key, proto, &l4, from_guest, now);
    }
    Some(())
}

/// Ports, TCP flags and ICMP type as the fast path's policy reads them.
#[inline(always)]
fn transport(ctx: &TcContext, proto: u8) -> Option<Transport> {
    let mut t = Transport {
        csum_at: None,
        udp: false,
        sport: 0,
        dport: 0,
        tcp_flags: 0,
        service: [0, 0],
        icmp_error: None,
    };
    match proto {
        PROTO_TCP => {
            let h = ptr_at::<[u8; 14]>(ctx, L4_OFF)?;
            // SAFETY: in bounds per `ptr_at`.
            let h = unsafe { &*h };
            t.sport = u16::from_ne_bytes([h[0], h[1]]);
            t.dport = u16::from_ne_bytes([h[2], h[3]]);
            t.tcp_flags = h[13];
        }
        PROTO_UDP => {
            let h = ptr_at::<[u8; 4]>(ctx, L4_OFF)?;
            // SAFETY: in bounds per `ptr_at`.
            let h = unsafe { &*h };
            t.sport = u16::from_ne_bytes([h[0], h[1]]);
            t.dport = u16::from_ne_bytes([h[2], h[3]]);
        }
        PROTO_ICMP => {
            let h = ptr_at::<[u8; 8]>(ctx, L4_OFF)?;
            // SAFETY: in bounds per `ptr_at`.
            let h = unsafe { &*h };
            t.service = [h[0], h[1]];
            // Queries: the identifier names the flow (errors and others are not tracked).
            t.sport = u16::from_ne_bytes([h[4], h[5]]);
            t.dport = t.sport;
        }
        _ => {}
    }
    Some(t)
}
