//! The bench's own XDP programs, in raw BPF:
//! - [`empty`]: `return XDP_PASS`, the do-nothing baseline of `BPF_PROG_TEST_RUN`;
//! - [`generator`]: rewrites a 60-byte UDP frame in place and returns `XDP_TX`, for
//!   live-frames mode, with a flow index per frame from a counter or a random number;
//! - [`sink`]: counts and drops UDP frames to a destination port range, passes the rest;
//! - [`map_op`]: one map operation per run (the design card's per-CPU vs plain hash choice,
//!   and the firewall's LPM lookups), counting the runs whose operation succeeded (the lookup
//!   hit), so a measurement of lookups that missed can be refused.
use super::asm::{
    Alu, Asm, Cond, HELPER_GET_PRANDOM_U32, HELPER_MAP_LOOKUP_ELEM, Insn, R0, R1, R2, R3, R4, R5,
    R6, R7, R8, R9, R10, Size, XDP_DROP, XDP_PASS, XDP_TX,
};

fn done(a: &Asm) -> Vec<Insn> {
    a.finish()
        .expect("the bench's programs only jump to labels they define")
}

pub fn empty() -> Vec<Insn> {
    done(Asm::new().ret(XDP_PASS))
}

/// `r2 = data, r3 = data_end` from the context in r1; jumps to `fail` unless `len` bytes
/// are there.
fn bounds(a: &mut Asm, len: i32, fail: &'static str) {
    a.load(Size::W, R2, R1, 0)
        .load(Size::W, R3, R1, 4)
        .mov_reg(R4, R2)
        .alu_imm(Alu::Add, R4, len)
        .jmp_reg(Cond::Gt, R4, R3, fail);
}

/// Where a generated frame's flow index comes from.
#[derive(Clone, Copy, Debug)]
pub enum FlowSource {
    /// `counter[0]++ % flows`: every frame the next of `flows` distinct flows. `map` is an
    /// array of one u64.
    Counter { map: i32, flows: u32 },
    /// `prandom() % flows`.
    Random { flows: u32 },
}

/// Source ports per destination port: index `i` is sent from port `SPORT_BASE + i % SPORT_SPAN`
/// to `dport_base + i / SPORT_SPAN`.
pub const SPORT_BASE: i32 = 1024;
pub const SPORT_SPAN: i32 = 64_512;

/// Writes `template` (a 60-byte Ethernet/IPv4/UDP frame with UDP checksum 0) into the frame,
/// then the flow's ports, and transmits it (`XDP_TX`). Headers are rewritten every time:
/// live-frames mode recycles pages that the receiver may have rewritten.
pub fn generator(template: &[u8; 60], source: FlowSource, dport_base: u16) -> Vec<Insn> {
    let mut a = Asm::new();
    bounds(&mut a, 60, "drop");
    for (i, w) in template.chunks_exact(4).enumerate() {
        let v = i32::from_ne_bytes([w[0], w[1], w[2], w[3]]);
        a.store_imm(Size::W, R2, (4 * i) as i16, v);
    }
    a.mov_reg(R7, R2);
    match source {
        FlowSource::Counter { map, flows } => {
            a.store_imm(Size::W, R10, -4, 0)
                .load_map_fd(R1, map)
                .mov_reg(R2, R10)
                .alu_imm(Alu::Add, R2, -4)
                .call(HELPER_MAP_LOOKUP_ELEM)
                .jmp_imm(Cond::Eq, R0, 0, "drop")
                .load(Size::DW, R1, R0, 0)
                .mov_reg(R2, R1)
                .alu_imm(Alu::Add, R2, 1)
                .store_reg(Size::DW, R0, 0, R2)
                .mov_reg(R0, R1)
                .alu_imm(Alu::Mod, R0, flows as i32);
        }
        FlowSource::Random { flows } => {
            a.call(HELPER_GET_PRANDOM_U32)
                .alu_imm(Alu::Mod, R0, flows as i32);
        }
    }
    a.mov_reg(R8, R0)
        .alu_imm(Alu::Mod, R8, SPORT_SPAN)
        .alu_imm(Alu::Add, R8, SPORT_BASE)
        .bswap_be(R8, 16)
        .store_reg(Size::H, R7, 34, R8)
        .mov_reg(R9, R0)
        .alu_imm(Alu::Div, R9, SPORT_SPAN)
        .alu_imm(Alu::Add, R9, i32::from(dport_base))
        .bswap_be(R9, 16)
        .store_reg(Size::H, R7, 36, R9)
        .ret(XDP_TX)
        .label("drop")
        .ret(XDP_DROP);
    done(&a)
}

/// Counts (atomically, in `map[0]`, an array of one u64) and drops IPv4 UDP frames whose
/// destination port is in `lo..=hi`; passes everything else to the stack.
pub fn sink(map: i32, lo: u16, hi: u16) -> Vec<Insn> {
    let mut a = Asm::new();
    bounds(&mut a, 38, "pass");
    a.load(Size::H, R5, R2, 12)
        .jmp_imm(Cond::Ne, R5, 0x0008, "pass") // ethertype 0x0800, read little-endian
        .load(Size::B, R5, R2, 23)
        .jmp_imm(Cond::Ne, R5, 17, "pass")
        .load(Size::H, R5, R2, 36)
        .bswap_be(R5, 16)
        .jmp_imm(Cond::Lt, R5, i32::from(lo), "pass")
        .jmp_imm(Cond::Gt, R5, i32::from(hi), "pass")
        .store_imm(Size::W, R10, -4, 0)
        .load_map_fd(R1, map)
        .mov_reg(R2, R10)
        .alu_imm(Alu::Add, R2, -4)
        .call(HELPER_MAP_LOOKUP_ELEM)
        .jmp_imm(Cond::Eq, R0, 0, "drop")
        .mov_imm(R1, 1)
        .atomic_add64(R0, 0, R1)
        .label("drop")
        .ret(XDP_DROP)
        .label("pass")
        .ret(XDP_PASS);
    done(&a)
}

/// Which key a [`map_op`] program looks up.
#[derive(Clone, Copy, Debug)]
pub enum KeySource {
    /// The same u32 key every run.
    Hot(u32),
    /// `base + (counter[0]++ % n) << shift` (the counter is a one-entry u64 array `map`):
    /// every run the next of `n` keys, so lookups miss the CPU caches as traffic over many
    /// mappings would.
    Cycle {
        map: i32,
        base: u32,
        n: u32,
        shift: i32,
    },
}

/// What a [`map_op`] program does with the key.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Nothing: the cost of producing the key.
    KeyOnly,
    /// Per-CPU hash whose 32-byte value carries its counters (`NatEntry`: addr, pad,
    /// packets @8, bytes @16): one lookup, two plain increments. The project's layout.
    PerCpuValue { map: i32 },
    /// Plain hash of u32 -> (addr u32, slot u32), then a per-CPU array of (packets, bytes)
    /// indexed by slot: two lookups, two plain increments.
    HashThenPerCpuArray { hash: i32, counters: i32 },
    /// Plain hash whose shared 32-byte value carries the counters: one lookup, two atomic adds.
    HashAtomic { map: i32 },
    /// Firewall source trie: key `(prefix 64, public, source)`; the source is the key.
    LpmSrc { map: i32, public: u32 },
    /// Firewall service trie: key `(prefix 56, public, 17, port)`; the port is the key's low
    /// 16 bits.
    LpmSvc { map: i32, public: u32 },
    /// A lookup of a fixed key of up to 16 bytes (e.g. a conntrack `FlowKey`).
    Lookup { map: i32, key: [u8; 16] },
    /// `bpf_ktime_get_ns()`.
    Ktime,
    /// `bpf_fib_lookup()` of a UDP packet `src -> dst` arriving on `ifindex` (flags 0).
    Fib { ifindex: u32, src: u32, dst: u32 },
    /// `bpf_redirect_map(devmap, ifindex, 0)` (the program still returns `XDP_PASS`).
    Redirect { devmap: i32, ifindex: u32 },
}

/// `XDP_REDIRECT`, what `bpf_redirect_map()` returns when the target exists.
const XDP_REDIRECT: i32 = 4;
/// `BPF_FIB_LKUP_RET_SUCCESS`.
const FIB_SUCCESS: i32 = 0;

/// `enum bpf_func_id` values of the helpers above.
const HELPER_KTIME_GET_NS: i32 = 5;
const HELPER_REDIRECT_MAP: i32 = 51;
const HELPER_FIB_LOOKUP: i32 = 69;

const FRAME_LEN: i32 = 60;

/// One map operation per run. When it succeeded (every lookup found its entry, the route
/// lookup found a route, the redirect its target) the run adds one to `hits[0]` (an array of
/// one u64; a plain add: a test run repeats on one CPU) and returns `XDP_PASS`; otherwise it
/// returns `XDP_DROP` without counting. The key is a u32 at r10-8 (addresses are written as
/// their network-order bytes, the way the project keys its maps).
pub fn map_op(key: KeySource, op: Op, hits: i32) -> Vec<Insn> {
    let mut a = Asm::new();
    a.mov_reg(R9, R1);
    match key {
        KeySource::Hot(k) => {
            a.mov_imm(R6, k as i32);
        }
        KeySource::Cycle {
            map,
            base,
            n,
            shift,
        } => {
            a.store_imm(Size::W, R10, -4, 0)
                .load_map_fd(R1, map)
                .mov_reg(R2, R10)
                .alu_imm(Alu::Add, R2, -4)
                .call(HELPER_MAP_LOOKUP_ELEM)
                .jmp_imm(Cond::Eq, R0, 0, "out")
                .load(Size::DW, R6, R0, 0)
                .mov_reg(R1, R6)
                .alu_imm(Alu::Add, R1, 1)
                .store_reg(Size::DW, R0, 0, R1)
                .alu_imm(Alu::Mod, R6, n as i32)
                .alu_imm(Alu::Lsh, R6, shift)
                .alu_imm(Alu::Add, R6, base as i32);
        }
    }
    a.store_reg(Size::W, R10, -8, R6);
    let lookup = |a: &mut Asm, map: i32, key_off: i32| {
        a.load_map_fd(R1, map)
            .mov_reg(R2, R10)
            .alu_imm(Alu::Add, R2, key_off)
            .call(HELPER_MAP_LOOKUP_ELEM)
            .jmp_imm(Cond::Eq, R0, 0, "out");
    };
    match op {
        Op::KeyOnly => {}
        Op::PerCpuValue { map } => {
            lookup(&mut a, map, -8);
            a.load(Size::DW, R1, R0, 8)
                .alu_imm(Alu::Add, R1, 1)
                .store_reg(Size::DW, R0, 8, R1)
                .load(Size::DW, R1, R0, 16)
                .alu_imm(Alu::Add, R1, FRAME_LEN)
                .store_reg(Size::DW, R0, 16, R1);
        }
        Op::HashThenPerCpuArray { hash, counters } => {
            lookup(&mut a, hash, -8);
            a.load(Size::W, R1, R0, 4).store_reg(Size::W, R10, -12, R1);
            lookup(&mut a, counters, -12);
            a.load(Size::DW, R1, R0, 0)
                .alu_imm(Alu::Add, R1, 1)
                .store_reg(Size::DW, R0, 0, R1)
                .load(Size::DW, R1, R0, 8)
                .alu_imm(Alu::Add, R1, FRAME_LEN)
                .store_reg(Size::DW, R0, 8, R1);
        }
        Op::HashAtomic { map } => {
            lookup(&mut a, map, -8);
            a.mov_imm(R1, 1)
                .atomic_add64(R0, 8, R1)
                .mov_imm(R1, FRAME_LEN)
                .atomic_add64(R0, 16, R1);
        }
        Op::LpmSrc { map, public } => {
            // key at r10-24: prefixlen, public, source (= the u32 key).
            a.store_imm(Size::W, R10, -24, 64)
                .store_imm(Size::W, R10, -20, public as i32)
                .store_reg(Size::W, R10, -16, R6);
            lookup(&mut a, map, -24);
        }
        Op::LpmSvc { map, public } => {
            // key at r10-24: prefixlen, public, [17, port_hi, port_lo, 0].
            a.store_imm(Size::W, R10, -24, 56)
                .store_imm(Size::W, R10, -20, public as i32)
                .mov_reg(R1, R6)
                .bswap_be(R1, 16)
                .alu_imm(Alu::Lsh, R1, 8)
                .alu_imm(Alu::Or, R1, 17)
                .store_reg(Size::W, R10, -16, R1);
            lookup(&mut a, map, -24);
        }
        Op::Lookup { map, key } => {
            for (i, w) in key.chunks_exact(4).enumerate() {
                let v = i32::from_ne_bytes([w[0], w[1], w[2], w[3]]);
                a.store_imm(Size::W, R10, -32 + 4 * i as i16, v);
            }
            lookup(&mut a, map, -32);
        }
        Op::Ktime => {
            a.call(HELPER_KTIME_GET_NS);
        }
        Op::Fib { ifindex, src, dst } => {
            // struct bpf_fib_lookup (64 bytes) at r10-96.
            for off in (-96..-32).step_by(8) {
                a.store_imm(Size::DW, R10, off, 0);
            }
            a.store_imm(Size::B, R10, -96, 2) // AF_INET
                .store_imm(Size::B, R10, -95, 17)
                .store_imm(Size::H, R10, -94, i32::from(40_000u16.to_be()))
                .store_imm(Size::H, R10, -92, i32::from(10_000u16.to_be()))
                .store_imm(Size::H, R10, -90, 46)
                .store_imm(Size::W, R10, -88, ifindex as i32)
                .store_imm(Size::W, R10, -80, src as i32)
                .store_imm(Size::W, R10, -64, dst as i32)
                .mov_reg(R1, R9)
                .mov_reg(R2, R10)
                .alu_imm(Alu::Add, R2, -96)
                .mov_imm(R3, 64)
                .mov_imm(R4, 0)
                .call(HELPER_FIB_LOOKUP)
                .jmp_imm(Cond::Ne, R0, FIB_SUCCESS, "out");
        }
        Op::Redirect { devmap, ifindex } => {
            a.load_map_fd(R1, devmap)
                .mov_imm(R2, ifindex as i32)
                .mov_imm(R3, 0)
                .call(HELPER_REDIRECT_MAP)
                .jmp_imm(Cond::Ne, R0, XDP_REDIRECT, "out");
        }
    }
    // Count the hit (key 0 at r10-100, below every other use of the stack).
    a.store_imm(Size::W, R10, -100, 0)
        .load_map_fd(R1, hits)
        .mov_reg(R2, R10)
        .alu_imm(Alu::Add, R2, -100)
        .call(HELPER_MAP_LOOKUP_ELEM)
        .jmp_imm(Cond::Eq, R0, 0, "out")
        .load(Size::DW, R1, R0, 0)
        .alu_imm(Alu::Add, R1, 1)
        .store_reg(Size::DW, R0, 0, R1)
        .ret(XDP_PASS);
    a.label("out").ret(XDP_DROP);
    done(&a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_assemble_and_end_in_exit() {
        let t = [0u8; 60];
        for p in [
            empty(),
            generator(&t, FlowSource::Counter { map: 3, flows: 10 }, 5000),
            generator(&t, FlowSource::Random { flows: 10 }, 5000),
            sink(3, 5000, 5015),
            map_op(KeySource::Hot(1), Op::PerCpuValue { map: 3 }, 6),
            map_op(
                KeySource::Cycle {
                    map: 4,
                    base: 0,
                    n: 8,
                    shift: 0,
                },
                Op::HashThenPerCpuArray {
                    hash: 3,
                    counters: 5,
                },
                6,
            ),
            map_op(KeySource::Hot(1), Op::LpmSvc { map: 3, public: 9 }, 6),
            map_op(
                KeySource::Hot(1),
                Op::Fib {
                    ifindex: 2,
                    src: 1,
                    dst: 2,
                },
                6,
            ),
        ] {
            assert_eq!(p.last().map(|i| i.code), Some(0x95));
        }
    }
}
