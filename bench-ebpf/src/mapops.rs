//! Section 5's micro-benchmarks: one lookup of a u32 key and the count of one 60-byte packet
//! per run, in three layouts of a mapping's value and counters; and one lookup of a flow
//! (16-byte key, 104-byte value, as `FLOWS`) in an LRU hash (preallocated, as `FLOWS`) and in
//! a hash without preallocation. A run whose operation
//! succeeded (the lookup hit) adds one to `HITS` and returns `XDP_PASS`; otherwise it returns
//! `XDP_DROP` without counting, so the bench can refuse a measurement of misses.
//!
//! Keys: `hot_*` look up key 0 every run; `cyc_*` the next of `CYCLE_N` keys each run (a
//! counter picks it), so lookups miss the CPU caches as traffic over many mappings would.
#![no_std]
#![no_main]
// The BPF target has no `AtomicU64::fetch_add`; the intrinsic lowers to the BPF atomic add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod common;

use aya_ebpf::{
    Global,
    bindings::xdp_action::XDP_DROP,
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap},
    programs::XdpContext,
};

const NO_PREALLOC: u32 = 1;
const FRAME_LEN: u64 = 60;

/// Per-CPU hash whose value carries the counters: [address, packets, bytes, pad].
#[map]
static PCPU: PerCpuHashMap<u32, [u64; 4]> = PerCpuHashMap::with_max_entries(1, NO_PREALLOC);
/// Plain hash of key -> [address, counter slot].
#[map]
static HASH: HashMap<u32, [u32; 2]> = HashMap::with_max_entries(1, NO_PREALLOC);
/// Per-CPU array of [packets, bytes] by slot.
#[map]
static CNT: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);
/// Plain hash whose shared value carries the counters, updated atomically.
#[map]
static ATOM: HashMap<u32, [u64; 4]> = HashMap::with_max_entries(1, NO_PREALLOC);
/// Flow-sized entries: key [k, 1, 2, 3] -> 104 bytes, in an LRU hash (preallocated, like
/// `FLOWS`) and in a hash allocating entries as they are inserted.
#[map]
static FLOW_LRU: LruHashMap<[u32; 4], [u64; 13]> = LruHashMap::with_max_entries(1, 0);
#[map]
static FLOW_HASH: HashMap<[u32; 4], [u64; 13]> = HashMap::with_max_entries(1, NO_PREALLOC);
/// The cycling key's counter.
#[map]
static CTR: Array<u64> = Array::with_max_entries(1, 0);
/// Runs whose operation succeeded.
#[map]
static HITS: Array<u64> = Array::with_max_entries(1, 0);

#[unsafe(no_mangle)]
static CYCLE_N: Global<u32> = Global::new(1);

#[inline(always)]
fn hot() -> Option<u32> {
    Some(0)
}

#[inline(always)]
fn cycle() -> Option<u32> {
    let c = CTR.get_ptr_mut(0)?;
    // SAFETY: the array's only slot; a test run runs on one CPU.
    unsafe {
        let v = *c;
        *c = v + 1;
        Some((v % u64::from(CYCLE_N.load().max(1))) as u32)
    }
}

#[inline(always)]
fn key_only(_k: u32) -> bool {
    true
}

#[inline(always)]
fn percpu(k: u32) -> bool {
    match PCPU.get_ptr_mut(k) {
        // SAFETY: this CPU's value.
        Some(v) => unsafe {
            (*v)[1] += 1;
            (*v)[2] += FRAME_LEN;
            true
        },
        None => false,
    }
}

#[inline(always)]
fn hash_counters(k: u32) -> bool {
    // SAFETY: a shared read of a value only userspace writes.
    let Some(v) = (unsafe { HASH.get(k) }) else {
        return false;
    };
    match CNT.get_ptr_mut(v[1]) {
        // SAFETY: this CPU's slot.
        Some(c) => unsafe {
            (*c)[0] += 1;
            (*c)[1] += FRAME_LEN;
            true
        },
        None => false,
    }
}

#[inline(always)]
fn atomic(k: u32) -> bool {
    use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};
    match ATOM.get_ptr_mut(k) {
        // SAFETY: a live map value, updated atomically.
        Some(v) => unsafe {
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*v)[1], 1);
            atomic_xadd::<u64, u64, { Relaxed }>(&raw mut (*v)[2], FRAME_LEN);
            true
        },
        None => false,
    }
}

/// A flow's entry read as the fast path reads it (a field of its first cache line).
#[inline(always)]
fn flow_lru(k: u32) -> bool {
    FLOW_LRU
        .get_ptr(&[k, 1, 2, 3])
        // SAFETY: a live map value.
        .is_some_and(|v| unsafe { core::ptr::read_volatile(&(*v)[1]) } != u64::MAX)
}

#[inline(always)]
fn flow_hash(k: u32) -> bool {
    FLOW_HASH
        .get_ptr(&[k, 1, 2, 3])
        // SAFETY: a live map value.
        .is_some_and(|v| unsafe { core::ptr::read_volatile(&(*v)[1]) } != u64::MAX)
}

#[inline(always)]
fn finish(ok: bool) -> u32 {
    common::finish(&HITS, ok)
}

macro_rules! program {
    ($name:ident, $key:ident, $op:ident) => {
        #[xdp]
        pub fn $name(_ctx: XdpContext) -> u32 {
            match $key() {
                Some(k) => finish($op(k)),
                None => XDP_DROP,
            }
        }
    };
}

program!(hot_key, hot, key_only);
program!(hot_pcpu, hot, percpu);
program!(hot_hash, hot, hash_counters);
program!(hot_atomic, hot, atomic);
program!(cyc_key, cycle, key_only);
program!(cyc_pcpu, cycle, percpu);
program!(cyc_hash, cycle, hash_counters);
program!(cyc_atomic, cycle, atomic);
program!(hot_flru, hot, flow_lru);
program!(hot_fhash, hot, flow_hash);
program!(cyc_flru, cycle, flow_lru);
program!(cyc_fhash, cycle, flow_hash);
