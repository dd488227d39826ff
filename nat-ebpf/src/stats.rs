//! Per-CPU counters: one slot per verdict [`Reason`], one per [`Event`], and each mapping's
//! counters by its slot in `MAPPING_STATS`.
use nat_common::{COUNT_IN, Event, Reason};

use crate::{EVENTS, MAPPING_STATS, STATS};

#[inline(always)]
pub fn count(reason: Reason, bytes: u64) {
    if let Some(c) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot of this CPU; nothing else writes it while we run.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn event(e: Event) {
    if let Some(c) = EVENTS.get_ptr_mut(e as u32) {
        // SAFETY: as above.
        unsafe { *c += 1 };
    }
}

/// A frame of `bytes` a mapping translated, on the `counter` half ([`COUNT_IN`] / `COUNT_OUT`)
/// of its `slot`.
#[inline(always)]
pub fn forwarded(slot: u32, counter: u8, bytes: u64) {
    if let Some(c) = MAPPING_STATS.get_ptr_mut(slot) {
        // SAFETY: as above.
        unsafe {
            if counter == COUNT_IN {
                (*c).in_packets += 1;
                (*c).in_bytes += bytes;
            } else {
                (*c).out_packets += 1;
                (*c).out_bytes += bytes;
            }
        }
    }
}

/// A frame a mapping's policy dropped: its ingress firewall ([`COUNT_IN`]) or the egress
/// policy.
#[inline(always)]
pub fn denied(slot: u32, counter: u8) {
    if let Some(c) = MAPPING_STATS.get_ptr_mut(slot) {
        // SAFETY: as above.
        unsafe {
            if counter == COUNT_IN {
                (*c).in_denied += 1;
            } else {
                (*c).out_denied += 1;
            }
        }
    }
}
