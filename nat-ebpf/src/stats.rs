//! Per-CPU counters: one slot per verdict [`Reason`], one per [`Event`].
use nat_common::{Event, Reason};

use crate::{EVENTS, STATS};

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
