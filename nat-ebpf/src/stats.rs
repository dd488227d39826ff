//! Per-CPU verdict counters, one slot per [`Reason`].
use nat_common::Reason;

use crate::STATS;

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
