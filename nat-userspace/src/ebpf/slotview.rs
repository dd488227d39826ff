//! `SLOTS`, the program's one-line flow cache (see `nat_common::Slot`), mapped into our
//! memory (the array is `BPF_F_MMAPABLE`): how natd, the tests and the bench read a `FLOWS`
//! entry with what fast packets wrote to its slot merged in, without a system call per flow.
//! The program alone writes slots; a reader copies a slot under its sequence lock.
use std::{
    num::NonZeroUsize,
    os::fd::AsFd,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering, fence},
};

use aya::maps::{MapData, MapError};
use nat_common::{FlowEntry, FlowTuple, Slot, slot_index};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

/// Tries at copying a slot that CPUs keep writing before its changes are left out.
const TRIES: usize = 8;

/// Why `SLOTS` cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SlotViewError {
    #[error("map SLOTS: {0}")]
    Info(#[source] MapError),
    #[error("map SLOTS holds {0} slots, not a power of two")]
    Count(u32),
    #[error("cannot map SLOTS into memory: {0}")]
    Mmap(#[source] nix::Error),
}

/// A read-only mapping of `SLOTS`, unmapped on drop.
pub struct SlotView {
    base: NonNull<Slot>,
    len: NonZeroUsize,
    mask: u32,
}

impl SlotView {
    /// Maps the `SLOTS` array `map` (its slot count, a power of two, read from the kernel).
    pub fn of(map: &MapData) -> Result<Self, SlotViewError> {
        let count = map.info().map_err(SlotViewError::Info)?.max_entries();
        if !count.is_power_of_two() {
            return Err(SlotViewError::Count(count));
        }
        let len = (count as usize)
            .checked_mul(size_of::<Slot>())
            .and_then(NonZeroUsize::new)
            .ok_or(SlotViewError::Count(count))?;
        // SAFETY: a shared, read-only mapping of the whole array (the kernel rounds it to
        // pages); nothing in this process writes it, and it lives until `drop`.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ,
                MapFlags::MAP_SHARED,
                map.fd().as_fd(),
                0,
            )
        }
        .map_err(SlotViewError::Mmap)?;
        Ok(SlotView {
            base: base.cast(),
            len,
            mask: count - 1,
        })
    }

    /// The index `k`'s slot has in this array.
    pub fn index(&self, k: &FlowTuple) -> u32 {
        slot_index(k, self.mask)
    }

    /// A consistent copy of the slot `k` hashes to, or `None` if CPUs kept writing it.
    pub fn slot(&self, k: &FlowTuple) -> Option<Slot> {
        // SAFETY: `index` is below the slot count; the mapping covers every slot.
        let p = unsafe { self.base.as_ptr().add(self.index(k) as usize) };
        // SAFETY: the slot's 8-aligned sequence word (the program changes it with atomic
        // instructions only, as this reader does).
        let seq = unsafe { &*(p.cast::<u8>().add(Slot::SEQ_OFFSET).cast::<AtomicU64>()) };
        for _ in 0..TRIES {
            let s1 = seq.load(Ordering::Acquire);
            if s1 & 1 != 0 {
                std::hint::spin_loop();
                continue;
            }
            // SAFETY: within the mapping; a copy a writer may tear, which the sequence
            // check below discards.
            let copy = unsafe { std::ptr::read_volatile(p) };
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) == s1 {
                return Some(copy);
            }
        }
        None
    }

    /// `e`, the `FLOWS` entry keyed `k`, with what fast packets changed in its slot merged
    /// in (as the program's full path merges it before using the entry). A slot CPUs kept
    /// writing through every try is left out: its changes reach `FLOWS` at its next refill
    /// (`Slot::REFILL_SECS`).
    pub fn merged(&self, k: &FlowTuple, e: FlowEntry) -> FlowEntry {
        match self.slot(k) {
            Some(s) => s.merged_into(k, e),
            None => e,
        }
    }
}

impl Drop for SlotView {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `of`, of `len` bytes, unused from now on.
        if let Err(e) = unsafe { munmap(self.base.cast(), self.len.get()) } {
            log::warn!("cannot unmap SLOTS: {e}");
        }
    }
}
