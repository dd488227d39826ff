//! The flow cache in front of `FLOWS` (see [`nat_common::Slot`]): an established packet
//! whose key sits in its slot (its own, or the other of its pair) is forwarded from a copy of
//! the slot's entry, one 128-byte read instead of the hash table's bucket and then its
//! element.
//!
//! Every write to a slot holds its sequence lock (odd while written), so a reader on another
//! CPU never uses a mix of two entries: it copies the entry and keeps the copy only if the
//! sequence was even and unchanged around the copy. What a fast packet changes in the copy
//! (last-seen times, TCP segment notes, the timer copy) is written back to the slot; every
//! `FLOWS` lookup of the full path first merges those into the `FLOWS` entry and empties the
//! slot ([`take`]), so the full path works on the whole truth and a slot never outlives its
//! entry's change.
use core::intrinsics::{AtomicOrdering::SeqCst, atomic_cxchg, atomic_xadd};

use aya_ebpf::Global;
use nat_common::{FlowEntry, FlowTuple, Slot, maps::SLOT_COUNT, other_slot, slot_index};

use crate::{
    SLOTS,
    flows::{self, Found},
};

/// Words of a `FlowEntry` a slot carries: all but `flow` (whose first word is the lock).
const ENTRY_WORDS: usize = 12;

/// The slot count of `SLOTS` minus one (see `nat_common::maps::SLOT_MASK_GLOBAL`): a loader
/// that sizes `SLOTS` otherwise sets it. A constant to the verifier (frozen `.rodata`).
#[unsafe(no_mangle)]
static SLOT_MASK: Global<u32> = Global::new(SLOT_COUNT - 1);

/// 1: the cache is used; 0: never (natd clears it where loads may pass loads, see
/// `nat_common::maps::SLOT_CACHE_GLOBAL`). A constant to the verifier, which then drops the
/// cache's code.
#[unsafe(no_mangle)]
static SLOT_CACHE: Global<u32> = Global::new(1);

/// The index of `t`'s own slot; the other slot of its pair (`nat_common::other_slot`) may
/// hold it instead.
#[inline(always)]
fn home(t: &FlowTuple) -> Option<u32> {
    if SLOT_CACHE.load() == 0 {
        return None;
    }
    Some(slot_index(t, SLOT_MASK.load()))
}

/// The slot's sequence word (the eBPF target has 64-bit atomics only, and no atomic types:
/// the intrinsics are what its `lock` instructions are reached by).
#[inline(always)]
fn seq(s: *mut Slot) -> *mut u64 {
    (s as *mut u8).wrapping_add(Slot::SEQ_OFFSET) as *mut u64
}

/// The slot's fill time (jiffies).
#[inline(always)]
fn filled(s: *mut Slot) -> *mut u64 {
    (s as *mut u8).wrapping_add(Slot::FILLED_OFFSET) as *mut u64
}

#[inline(always)]
fn seq_load(s: *mut Slot) -> u64 {
    // SAFETY: an aligned word of a live map value. A plain load: eBPF has no ordered load
    // before 6.15. Reads are not reordered with other reads on x86-64 (the only JIT this
    // build supports, see the README), so the re-read after the copy orders the copy.
    unsafe { core::ptr::read_volatile(seq(s)) }
}

#[inline(always)]
fn words(p: *mut u8) -> *mut u64 {
    p as *mut u64
}

/// Whether the slot's key is `t` (both 16 bytes, padding zero). In 32-bit words: the key on
/// the stack is only 4-aligned. The words' differences are or-ed and tested once: one branch
/// instead of four, for the verifier, which walks each branch of every call site.
#[inline(always)]
fn holds(s: *mut Slot, t: &FlowTuple) -> bool {
    let k = s as *const u32;
    let w = t as *const FlowTuple as *const u32;
    let mut differ = 0;
    for i in 0..4 {
        // SAFETY: 16 bytes of a live map value and of `t`; volatile so the reads stay
        // between the sequence reads.
        differ |= unsafe { core::ptr::read_volatile(k.add(i)) ^ *w.add(i) };
    }
    differ == 0
}

/// The slot of its pair holding `t`, and its sequence word, even, read before the key was:
/// its own slot first, then the other one.
#[inline(always)]
fn locate(t: &FlowTuple) -> Option<(*mut Slot, u64)> {
    let i = home(t)?;
    let s = SLOTS.get_ptr_mut(i)?;
    let s1 = seq_load(s);
    if s1 & 1 == 0 && holds(s, t) {
        return Some((s, s1));
    }
    let s = SLOTS.get_ptr_mut(other_slot(i))?;
    let s1 = seq_load(s);
    (s1 & 1 == 0 && holds(s, t)).then_some((s, s1))
}

/// Claims the slot for writing: its sequence goes from the even `s1` to odd.
#[inline(always)]
fn claim(s: *mut Slot, s1: u64) -> bool {
    // SAFETY: as above.
    s1 & 1 == 0 && unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(seq(s), s1, s1 + 1).1 }
}

/// Ends a write begun by [`claim`].
#[inline(always)]
fn release(s: *mut Slot) {
    // SAFETY: as above.
    unsafe { atomic_xadd::<u64, u64, { SeqCst }>(seq(s), 1) };
}

/// A copy of a slot's entry in the per-CPU scratch, for the established path.
pub struct Copied {
    slot: *mut Slot,
    /// The slot's sequence word when copied.
    seq: u64,
    pub entry: *mut FlowEntry,
}

impl Copied {
    /// The copy as the established path takes an entry.
    #[inline(always)]
    pub fn found(&self) -> Found {
        Found {
            entry: self.entry,
            pending: false,
        }
    }
}

/// A consistent copy of the entry in `t`'s slot, or `None` if its key is not there, a CPU
/// was writing the slot, or the slot's fill is old (`Slot::REFILL_SECS`: the packet takes
/// `FLOWS`, which refills the slot).
#[inline(always)]
pub fn copy(t: &FlowTuple) -> Option<Copied> {
    let (s, s1) = locate(t)?;
    let jps = flows::refresh_jiffies_in(flows::config());
    // SAFETY: an aligned word of a live map value.
    let filled = unsafe { core::ptr::read_volatile(filled(s)) };
    if flows::jiffies().wrapping_sub(filled) >= Slot::REFILL_SECS * jps {
        return None;
    }
    let copy = &mut flows::scratch()?.entries[0];
    let (from, to) = (
        words(s as *mut u8).wrapping_add(2),
        copy as *mut FlowEntry as *mut u64,
    );
    for i in 0..ENTRY_WORDS {
        // SAFETY: within the slot's entry and the scratch entry.
        unsafe { core::ptr::write_volatile(to.add(i), core::ptr::read_volatile(from.add(i))) };
    }
    if seq_load(s) != s1 {
        return None;
    }
    Some(Copied {
        slot: s,
        seq: s1,
        entry: copy as *mut FlowEntry,
    })
}

/// After the established path forwarded a packet by `found` (keyed `t`): what it changed in
/// a slot's copy goes back to the slot; an entry of `FLOWS` is copied into its slot.
#[inline(always)]
pub fn forwarded(t: &FlowTuple, cached: &Option<Copied>, found: &Found) {
    match cached {
        Some(c) => {
            // SAFETY: the scratch entry, valid for the program's run.
            write_back(c.slot, c.seq, unsafe { &*c.entry });
            crate::stats::event(nat_common::Event::SlotHit);
        }
        None if !found.pending => fill(t, found.entry),
        None => {}
    }
}

/// The words of an entry a fast packet may change: flags (in word 4), the timer (6), the
/// last-seen times (7, 8) and the segment notes (9).
const CHANGING: [usize; 5] = [4, 6, 7, 8, 9];

/// Writes what the packet changed in the copy back to the slot, if no CPU wrote the slot
/// since it was copied.
#[inline(always)]
fn write_back(s: *mut Slot, s1: u64, copy: &FlowEntry) {
    let (slot, c) = (
        words(s as *mut u8).wrapping_add(2),
        copy as *const FlowEntry as *const u64,
    );
    // SAFETY: within the slot's entry and the copy.
    let changed = CHANGING
        .iter()
        .any(|&i| unsafe { core::ptr::read_volatile(slot.add(i)) != *c.add(i) });
    if !changed || !claim(s, s1) {
        return;
    }
    for i in CHANGING {
        // SAFETY: as above; the slot is claimed.
        unsafe { core::ptr::write_volatile(slot.add(i), *c.add(i)) };
    }
    release(s);
}

/// Copies the `FLOWS` entry keyed `t` into a slot of its pair (after the full path's lookup
/// forwarded a packet by it), unless a CPU is writing the slot. The slot's occupant, if
/// another key, is merged into its own entry first.
///
/// A function of its own, for the verifier, as [`take`].
#[inline(never)]
pub fn fill(t: &FlowTuple, e: *mut FlowEntry) {
    let Some(s) = free_slot(t) else { return };
    let s1 = seq_load(s);
    // SAFETY: a live map value.
    let occupant = unsafe { (*s).key };
    let s1 = if occupant.proto != 0 && occupant != *t {
        take(
            &occupant,
            flows::flows_entry(&occupant).unwrap_or(core::ptr::null_mut()),
        );
        seq_load(s)
    } else {
        s1
    };
    if !claim(s, s1) {
        return;
    }
    let (k, w) = (s as *mut u32, t as *const FlowTuple as *const u32);
    let (to, from) = (words(s as *mut u8).wrapping_add(2), e as *const u64);
    // SAFETY: within the slot, `t` and the live entry `e`; the slot is claimed.
    unsafe {
        for i in 0..4 {
            core::ptr::write_volatile(k.add(i), *w.add(i));
        }
        for i in 0..ENTRY_WORDS {
            core::ptr::write_volatile(to.add(i), core::ptr::read_volatile(from.add(i)));
        }
        core::ptr::write_volatile(filled(s), flows::jiffies());
    }
    release(s);
}

/// The slot of `t`'s pair to fill with `t`: one holding `t` already, else an empty one, else
/// one whose flow was idle for `Slot::TAKEOVER_REFRESHES` refresh intervals (its own slot
/// first each time), so that two busy flows of one pair each keep a slot and a third stays
/// on `FLOWS` rather than evict one of them on every packet.
#[inline(always)]
fn free_slot(t: &FlowTuple) -> Option<*mut Slot> {
    let i = home(t)?;
    let (own, other) = (SLOTS.get_ptr_mut(i)?, SLOTS.get_ptr_mut(other_slot(i))?);
    // SAFETY: live map values; a key torn by a writer only misleads the choice (the fill
    // claims the slot before writing it).
    let (k_own, k_other) = unsafe { ((*own).key, (*other).key) };
    if k_own == *t {
        return Some(own);
    }
    if k_other == *t {
        return Some(other);
    }
    if k_own.proto == 0 {
        return Some(own);
    }
    if k_other.proto == 0 {
        return Some(other);
    }
    let idle = Slot::TAKEOVER_REFRESHES * flows::refresh_jiffies_in(flows::config());
    let now = flows::jiffies();
    // SAFETY: as above.
    let (seen_own, seen_other) = unsafe { ((*own).entry.seen, (*other).entry.seen) };
    if now.wrapping_sub(seen_own) >= idle {
        return Some(own);
    }
    (now.wrapping_sub(seen_other) >= idle).then_some(other)
}

/// Empties the slot holding `t`, if one does, after merging what fast packets changed into
/// `t`'s `FLOWS` entry `e` (null: it has none; a raw pointer, as `Option<*mut _>` would be
/// two registers, one left unset for `None`, which the verifier refuses to read). Every
/// `FLOWS` lookup of the full path does this.
///
/// A function of its own, for the verifier: inlined into each of the full path's lookups,
/// its branches multiplied the paths the verifier walks after each (on 6.18, `nat` took
/// three times the instructions to verify); after a call, the states of its branches are
/// equal and pruned.
#[inline(never)]
pub fn take(t: &FlowTuple, e: *mut FlowEntry) {
    let Some((s, s1)) = locate(t) else { return };
    // Claimed at the sequence read before the key: no write ended between them, so the key
    // read is the slot's.
    if !claim(s, s1) {
        return;
    }
    if !e.is_null() {
        // SAFETY: the slot is claimed (no CPU changes it); `e` a live map value.
        unsafe { Slot::merge(&mut *e, &(*s).entry) };
    }
    // SAFETY: claimed; zero proto marks the slot empty.
    unsafe { (*s).key = FlowTuple::default() };
    release(s);
}
