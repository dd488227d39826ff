//! `SLOTS`, the program's flow cache (see `nat_common::Slot`), mapped into our
//! memory (the array is `BPF_F_MMAPABLE`): how natd, the tests and the bench read a `FLOWS`
//! entry with what fast packets wrote to its slot merged in, without a system call per flow.
//! The program writes slots; a reader copies a slot under its sequence lock, and natd empties
//! the slot of an entry it removes ([`SlotView::evict`]) under the same lock, with the same
//! atomic instructions the program uses.
use std::{
    num::NonZeroUsize,
    os::fd::AsFd,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering, fence},
};

use aya::maps::{MapData, MapError};
use nat_common::{FlowEntry, FlowTuple, Slot, other_slot, slot_index};
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

/// The sequence word if no write is under way (even), else `None` after a pause.
fn even(seq: &AtomicU64) -> Option<u64> {
    let s1 = seq.load(Ordering::Acquire);
    if s1 & 1 != 0 {
        std::hint::spin_loop();
        return None;
    }
    Some(s1)
}

/// A mapping of `SLOTS`, unmapped on drop.
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
        // SAFETY: a shared mapping of the whole array (the kernel rounds it to pages), written
        // only by `evict` under the slot's lock; it lives until `drop`.
        let base = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
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

    /// The index of `k`'s own slot in this array; the other slot of its pair
    /// ([`other_slot`]) may hold `k` instead.
    pub fn index(&self, k: &FlowTuple) -> u32 {
        slot_index(k, self.mask)
    }

    /// The slots `k` may live in: its own, then the other of its pair.
    fn pair(&self, k: &FlowTuple) -> [u32; 2] {
        let i = self.index(k);
        [i, other_slot(i)]
    }

    /// The index of the slot of `k`'s pair that holds `k`, if one does (a plain read: a
    /// slot being written may be missed).
    pub fn holding(&self, k: &FlowTuple) -> Option<u32> {
        self.pair(k).into_iter().find(|&i| {
            let (p, _) = self.at(i);
            // SAFETY: within the mapping; a key a writer may tear, as said above.
            unsafe { std::ptr::read_volatile(&raw const (*p).key) == *k }
        })
    }

    /// Slot `i` (below the slot count) and its sequence word.
    fn at(&self, i: u32) -> (*mut Slot, &AtomicU64) {
        // SAFETY: `i` is below the slot count (an index of `pair`);
        // the mapping covers every slot.
        let p = unsafe { self.base.as_ptr().add(i as usize) };
        // SAFETY: the slot's 8-aligned sequence word, valid while the mapping is (the
        // program changes it with atomic instructions only, as we do).
        let seq = unsafe { &*(p.cast::<u8>().add(Slot::SEQ_OFFSET).cast::<AtomicU64>()) };
        (p, seq)
    }

    /// Empties the slot holding `k`, if one of its pair does (natd removed `k`'s `FLOWS`
    /// entry). Returns whether it did; `false` also when CPUs kept writing the slot, whose
    /// copy then lives until its refill (`Slot::REFILL_SECS`) at most.
    pub fn evict(&self, k: &FlowTuple) -> bool {
        self.pair(k).into_iter().any(|i| self.evict_at(i, k))
    }

    /// Empties slot `i` if it holds `k`.
    fn evict_at(&self, i: u32, k: &FlowTuple) -> bool {
        let (p, seq) = self.at(i);
        for _ in 0..TRIES {
            let Some(s1) = even(seq) else { continue };
            // SAFETY: within the mapping; read after the sequence word, checked by the claim.
            let key = unsafe { std::ptr::read_volatile(&raw const (*p).key) };
            if key != *k {
                return false;
            }
            // Claimed only if no write ended since `s1`: the key read is the slot's.
            if seq
                .compare_exchange(s1, s1 + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // SAFETY: claimed: no CPU writes the slot; zero `proto` marks it empty.
            unsafe { std::ptr::write_volatile(&raw mut (*p).key, FlowTuple::default()) };
            seq.fetch_add(1, Ordering::Release);
            return true;
        }
        false
    }

    /// A consistent copy of the slot of `k`'s pair that holds `k`, else of `k`'s own slot;
    /// `None` if CPUs kept writing the slot.
    pub fn slot(&self, k: &FlowTuple) -> Option<Slot> {
        let [own, other] = self.pair(k);
        let first = self.copy_at(own);
        if first.is_some_and(|s| s.key == *k) {
            return first;
        }
        match self.copy_at(other) {
            Some(s) if s.key == *k => Some(s),
            _ => first,
        }
    }

    /// A consistent copy of slot `i`, or `None` if CPUs kept writing it.
    fn copy_at(&self, i: u32) -> Option<Slot> {
        let (p, seq) = self.at(i);
        for _ in 0..TRIES {
            let Some(s1) = even(seq) else { continue };
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

#[cfg(test)]
mod tests {
    use aya::maps::{Array, HashMap};
    use nat_common::{ENTRY_ORIG, ENTRY_SEQ, MAP_FLOWS, MAP_SLOTS, other_slot, proto};

    use super::*;
    use crate::ebpf::{Dataplane, Sizes};

    fn tuple(n: u16) -> FlowTuple {
        FlowTuple::new(1, 2, n, 80, proto::TCP)
    }

    /// The program's maps, loaded, with one flow in `FLOWS`: its original key and entry
    /// (last seen at 100; its reply entry at 50).
    fn one_flow() -> (Dataplane, FlowTuple, FlowEntry) {
        let sizes = Sizes {
            flows: 1024,
            mappings: 256,
        };
        let mut dp = Dataplane::load(sizes).unwrap_or_else(|e| panic!("{}", crate::report(&e)));
        let (k, r) = (tuple(1), tuple(1001));
        let orig = FlowEntry {
            flags: ENTRY_ORIG,
            last_seen: 100,
            peer: r,
            ..FlowEntry::default()
        };
        let reply = FlowEntry {
            last_seen: 50,
            peer: k,
            ..FlowEntry::default()
        };
        {
            let mut m: HashMap<_, FlowTuple, FlowEntry> =
                HashMap::try_from(dp.map(MAP_FLOWS).unwrap()).unwrap();
            m.insert(k, orig, 0).unwrap();
            m.insert(r, reply, 0).unwrap();
        }
        (dp, k, orig)
    }

    /// natd (its collector, `conntrack list`, the keep-alive of `--policy kernel`) reads what
    /// fast packets wrote to a slot, and a flow it removes leaves no copy in a slot. Loads
    /// the program's maps: needs root, as the other kernel tests of this crate.
    #[test]
    fn natd_reads_flows_merged_with_their_slots_and_empties_the_slots_of_flows_it_removes() {
        let (mut dp, k, orig) = one_flow();
        // What fast packets of the original direction left in its slot: a later packet and
        // a noted segment.
        let slot = Slot {
            key: k,
            entry: FlowEntry {
                last_seen: 900,
                flags: ENTRY_ORIG | ENTRY_SEQ,
                seq_end: 77,
                ..orig
            },
        };
        let i = dp.slot_view().unwrap().index(&k);
        {
            let mut slots: Array<_, Slot> = Array::try_from(dp.map(MAP_SLOTS).unwrap()).unwrap();
            slots.set(i, slot, 0).unwrap();
        }

        let e = dp.flow_entry(&k).unwrap().expect("the flow's entry");
        assert_eq!((e.last_seen, e.seq_end), (900, 77));
        assert_ne!(e.flags & ENTRY_SEQ, 0);
        let flows = dp.flows().unwrap();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].last_seen, 900, "the flow's last-seen time");

        // Idle by its stored entries (100), live by its slot (900): a sweep keeps it.
        assert_eq!(dp.remove_flows(|v| v.last_seen < 500).unwrap(), (0, 1));
        assert_eq!(dp.flows().unwrap().len(), 1);
        assert_eq!(dp.remove_flows(|_| true).unwrap(), (1, 1));
        let left = dp.slot_view().unwrap().slot(&k).expect("a quiet slot");
        assert_eq!(
            left.key,
            FlowTuple::default(),
            "the removed flow's slot still holds it"
        );
    }

    /// A flow the program put in the other slot of its pair (its own held another busy
    /// flow) is read merged and emptied alike, and the flow in its own slot is left there.
    #[test]
    fn natd_finds_a_flow_in_the_other_slot_of_its_pair() {
        let (mut dp, k, orig) = one_flow();
        let other = tuple(2);
        let view = dp.slot_view().unwrap();
        let own = view.index(&k);
        let pair = other_slot(own);
        {
            let mut slots: Array<_, Slot> = Array::try_from(dp.map(MAP_SLOTS).unwrap()).unwrap();
            // k's own slot holds another flow; k sits in the other slot of the pair.
            slots
                .set(
                    own,
                    Slot {
                        key: other,
                        entry: orig,
                    },
                    0,
                )
                .unwrap();
            let entry = FlowEntry {
                last_seen: 900,
                ..orig
            };
            slots.set(pair, Slot { key: k, entry }, 0).unwrap();
        }
        assert_eq!(view.holding(&k), Some(pair));
        let e = dp.flow_entry(&k).unwrap().expect("the flow's entry");
        assert_eq!(e.last_seen, 900, "the other slot's last-seen time");
        assert_eq!(dp.remove_flows(|_| true).unwrap(), (1, 1));
        assert_eq!(
            view.holding(&k),
            None,
            "the removed flow's slot still holds it"
        );
        let slots: Array<_, Slot> = Array::try_from(dp.map(MAP_SLOTS).unwrap()).unwrap();
        assert_eq!(
            slots.get(&own, 0).unwrap().key,
            other,
            "the flow in the own slot lost it"
        );
    }
}
