//! Section 1b's memory floor: what one cache-cold random access costs in a map as big as the
//! flow table, with nothing else. Two arrays of `N` values (`N` = the entries `FLOWS` holds in
//! the cold measurement): one whose values are the size of one of `FLOWS`' kernel elements
//! (the hash element's header, a `FlowTuple` and a `FlowEntry`: 168 bytes at this writing),
//! and one of 64 bytes (a cache line); and three LRU hashes of `N` flow-like entries (16-byte key)
//! whose values are 64, 104 and 128 bytes, each read where a fast path reads it.
//!
//! Each run takes a pseudo-random index of `N` (a counter mixed by splitmix64's finaliser, so
//! successive runs land anywhere in the table, not at a constant stride); the `*_key` programs
//! only produce it (the baselines subtracted). Each array program comes twice: as is (the
//! CPU may overlap one run's read with the next runs', as in the other cold rows) and `_dep`,
//! where the next run's index waits for this run's read (one access's latency); the hash
//! lookups only as is, as the cold `FLOWS` lookups are measured. The hashes are filled by the `fill_*`
//! programs, one key per run in key order, so an entry's place in memory follows its key and
//! the random keys read memory at random. A run whose lookup hit adds one to `HITS`.
#![no_std]
#![no_main]

mod common;

use core::{hint::black_box, mem::size_of, ptr::read_volatile};

use aya_ebpf::{
    Global,
    bindings::xdp_action::XDP_DROP,
    macros::{map, xdp},
    maps::{Array, LruHashMap},
    programs::XdpContext,
};
use nat_common::{FlowEntry, FlowTuple};

/// The kernel's hash element header before the key (`struct htab_elem` on 64-bit kernels:
/// the bucket list node, the LRU node, the hash).
const HTAB_ELEM_HEADER: usize = 48;
/// One `FLOWS` element as the kernel lays it out: header, key and value, each rounded up to
/// 8 bytes.
const FLOWS_ELEM: usize = HTAB_ELEM_HEADER
    + size_of::<FlowTuple>().next_multiple_of(8)
    + size_of::<FlowEntry>().next_multiple_of(8);
type VElem = [u64; FLOWS_ELEM / 8];
type V64 = [u64; 8];
type V104 = [u64; 13];
type V128 = [u64; 16];
/// A flow-like key: the index and three constant words (16 bytes, as `FlowTuple`).
type FlowKey = [u32; 4];

// Sizes are set by the loader (`N`; the hashes with room to spare, as an LRU map may evict
// before it is full).
#[map]
static ARR_ELEM: Array<VElem> = Array::with_max_entries(1, 0);
#[map]
static ARR64: Array<V64> = Array::with_max_entries(1, 0);
#[map]
static LRU64: LruHashMap<FlowKey, V64> = LruHashMap::with_max_entries(1, 0);
#[map]
static LRU104: LruHashMap<FlowKey, V104> = LruHashMap::with_max_entries(1, 0);
#[map]
static LRU128: LruHashMap<FlowKey, V128> = LruHashMap::with_max_entries(1, 0);
/// Runs whose operation succeeded.
#[map]
static HITS: Array<u64> = Array::with_max_entries(1, 0);
/// The run counter the index is made from.
#[map]
static CTR: Array<u64> = Array::with_max_entries(1, 0);

/// Entries in each map.
#[unsafe(no_mangle)]
static N: Global<u32> = Global::new(1);

#[inline(always)]
fn finish(ok: bool) -> u32 {
    common::finish(&HITS, ok)
}

/// The run counter, incremented.
#[inline(always)]
fn tick() -> Option<u64> {
    common::tick(&CTR)
}

/// A pseudo-random index of `N`: the run counter through splitmix64's finaliser.
#[inline(always)]
fn random() -> Option<u32> {
    let x = common::mix64(tick()?.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    Some((x % u64::from(N.load().max(1))) as u32)
}

#[inline(always)]
fn key(i: u32) -> FlowKey {
    [i, 1, 2, 3]
}

/// The sum of `words` of the value at `v` (volatile reads: each one happens).
///
/// # Safety
/// `v` points at a live map value of at least `W` words, and every index of `words` is below
/// `W`.
#[inline(always)]
unsafe fn read<const W: usize>(v: *const [u64; W], words: &[usize]) -> u64 {
    let mut s = 0u64;
    for w in words {
        // SAFETY: as the caller promised.
        s = s.wrapping_add(unsafe { read_volatile(&(*v)[*w]) });
    }
    s
}

// The words a fast path reads: a 64-byte value (or the first 64 bytes of a 128-byte one) at
// its start, middle and end; today's 104-byte `FlowEntry` across its first 72 bytes (the
// established path reads up to `last_seen`, bytes 64..72).
const W64: [usize; 3] = [0, 4, 7];
const W104: [usize; 3] = [0, 4, 8];

/// Adds `w` (a value the run read: always 0) to the run counter, so the next run's index, and
/// with it the next run's read, waits for this run's read: successive reads are not
/// overlapped and a run costs one access's latency.
#[inline(always)]
fn chain(w: u64) {
    if let Some(c) = CTR.get_ptr_mut(0) {
        // SAFETY: the array's only slot; a test run runs on one CPU.
        unsafe { *c += w }
    }
}

/// One word read of a random value of `map`; `dep`: the next run waits for it.
#[inline(always)]
fn array_read<const W: usize>(map: &Array<[u64; W]>, dep: bool) -> u32 {
    let Some(i) = random() else {
        return XDP_DROP;
    };
    let Some(v) = map.get_ptr(i) else {
        return XDP_DROP;
    };
    // SAFETY: a live map value; word 0 exists.
    let s = unsafe { read(v, &[0]) };
    if dep {
        chain(s);
    }
    finish(s != u64::MAX)
}

/// The lookup of a random key of `map` and the read of `words` of its value (the runs
/// independent, as the cold `FLOWS` lookups).
#[inline(always)]
fn lru_read<const W: usize>(map: &LruHashMap<FlowKey, [u64; W]>, words: &[usize]) -> u32 {
    let Some(i) = random() else {
        return XDP_DROP;
    };
    let Some(v) = map.get_ptr(key(i)) else {
        return XDP_DROP;
    };
    // SAFETY: a live map value; every word of `words` exists (the callers' constants).
    finish(unsafe { read(v, words) } != u64::MAX)
}

/// Inserts key `run % N` with a zeroed value: `N` runs fill `map` in key order.
#[inline(always)]
fn fill<const W: usize>(map: &LruHashMap<FlowKey, [u64; W]>) -> u32 {
    let Some(c) = tick() else {
        return XDP_DROP;
    };
    let i = (c % u64::from(N.load().max(1))) as u32;
    finish(map.insert(key(i), [0; W], 0).is_ok())
}

#[xdp]
pub fn f_key(_ctx: XdpContext) -> u32 {
    match random() {
        Some(i) => finish(black_box(i) != u32::MAX),
        None => XDP_DROP,
    }
}

#[xdp]
pub fn f_key_lru(_ctx: XdpContext) -> u32 {
    match random() {
        Some(i) => finish(black_box(key(i))[0] != u32::MAX),
        None => XDP_DROP,
    }
}

/// A reading program as is and its `_dep` twin.
macro_rules! programs {
    ($($name:ident, $dep:ident = $read:ident($($arg:expr),*);)*) => {
        $(
            #[xdp]
            pub fn $name(_ctx: XdpContext) -> u32 {
                $read($($arg,)* false)
            }

            #[xdp]
            pub fn $dep(_ctx: XdpContext) -> u32 {
                $read($($arg,)* true)
            }
        )*
    };
}

programs! {
    f_arr_elem, f_arr_elem_dep = array_read(&ARR_ELEM);
    f_arr64, f_arr64_dep = array_read(&ARR64);
}

#[xdp]
pub fn f_lru64(_ctx: XdpContext) -> u32 {
    lru_read(&LRU64, &W64)
}

#[xdp]
pub fn f_lru104(_ctx: XdpContext) -> u32 {
    lru_read(&LRU104, &W104)
}

#[xdp]
pub fn f_lru128(_ctx: XdpContext) -> u32 {
    lru_read(&LRU128, &W64)
}

#[xdp]
pub fn fill_lru64(_ctx: XdpContext) -> u32 {
    fill(&LRU64)
}

#[xdp]
pub fn fill_lru104(_ctx: XdpContext) -> u32 {
    fill(&LRU104)
}

#[xdp]
pub fn fill_lru128(_ctx: XdpContext) -> u32 {
    fill(&LRU128)
}
