//! The bench's own XDP programs (crate `bench-ebpf`, built by build.rs with aya-build and
//! embedded here) and the `BPF_PROG_TEST_RUN` calls, all through aya: [`TestRun`] with
//! repeat and duration, live-frames mode through [`TestRunAttrs::xdp_live_frames`], maps
//! through aya's typed maps. Parameters reach the programs as globals
//! (`EbpfLoader::override_global`), which the verifier sees as constants.
use std::{os::fd::AsFd as _, os::fd::AsRawFd as _, path::Path};

use anyhow::Context as _;
use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunAttrs, TestRunOptions, include_bytes_aligned,
    maps::{Map, MapData, PerCpuArray},
    programs::Xdp,
};

/// `return XDP_PASS` (`bench_empty`).
pub static EMPTY: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-empty"));
/// The live-frames traffic generator (`bench_gen`).
pub static GEN: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-gen"));
/// The counting sink (`bench_sink`).
pub static SINK: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-sink"));
/// Section 5's map-layout micro-benchmarks.
pub static MAPOPS: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-mapops"));
/// Section 1b's micro-benchmarks on the loaded program's maps.
pub static PARTS: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-parts"));
/// Section 1b's memory floor: random reads in maps as big as the flow table.
pub static FLOOR: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-floor"));
/// Section 2's floor router: one per-flow slot read per frame, then the redirect (`bench_fwd`).
pub static FWD: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-fwd"));

/// `XDP_PASS`, `XDP_TX` and `XDP_REDIRECT` as test runs report them.
pub const XDP_PASS: u32 = 2;

/// Loads `object` with `prepare` applied to the loader (globals, pins, sizes).
pub fn load<'a>(object: &[u8], prepare: impl FnOnce(&mut EbpfLoader<'a>)) -> anyhow::Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    prepare(&mut loader);
    loader
        .load(object)
        .context("loading a bench program object")
}

/// Program `name` of `ebpf`, loaded into the kernel (once).
pub fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()
            .with_context(|| format!("the verifier refused {name}"))?;
    }
    Ok(prog)
}

/// The `xdp_md` context of a frame of `len` bytes arriving on `ifindex`.
pub fn xdp_ctx(len: usize, ifindex: u32) -> [u8; 24] {
    let mut c = [0u8; 24];
    c[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    c[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

/// What one `BPF_PROG_TEST_RUN` reported.
#[derive(Clone, Copy, Debug)]
pub struct RunResult {
    pub retval: u32,
    /// Kernel-measured time per repetition, ns (total / repeat, rounded down).
    pub duration_ns: u32,
}

/// Runs `prog` `repeat` times on `data` as if arriving on `ifindex` (0: no context); each
/// repetition sees the previous one's output.
pub fn test_run(prog: &Xdp, data: &[u8], ifindex: u32, repeat: u32) -> anyhow::Result<RunResult> {
    let ctx = xdp_ctx(data.len(), ifindex);
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(data),
            ctx_in: (ifindex != 0).then_some(&ctx[..]),
            repeat,
            ..TestRunOptions::new()
        })
        .context("BPF_PROG_TEST_RUN")?;
    Ok(RunResult {
        retval: r.return_value,
        duration_ns: u32::try_from(r.duration.as_nanos()).unwrap_or(u32::MAX),
    })
}

/// Runs `prog` in live-frames mode: `repeat` frames initialised from `data`, as if received
/// on `ifindex` (of the calling thread's namespace); `XDP_TX` sends each out of that
/// interface. Returns the kernel-measured time per frame (ns).
pub fn live_frames(prog: &Xdp, data: &[u8], ifindex: u32, repeat: u32) -> anyhow::Result<u32> {
    let ctx = xdp_ctx(data.len(), ifindex);
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(data),
            ctx_in: Some(&ctx),
            repeat,
            // Batch size 0: the kernel's default (64 frames per batch).
            attrs: TestRunAttrs::new().xdp_live_frames(0),
            ..TestRunOptions::new()
        })
        .context("BPF_PROG_TEST_RUN (live frames)")?;
    Ok(u32::try_from(r.duration.as_nanos()).unwrap_or(u32::MAX))
}

/// The sum over CPUs of slot `index` of the per-CPU `u64` array `name` of `ebpf`.
pub fn percpu_sum(ebpf: &Ebpf, name: &str, index: u32) -> anyhow::Result<u64> {
    let map = ebpf.map(name).with_context(|| format!("no map {name}"))?;
    let arr = PerCpuArray::<_, u64>::try_from(map)?;
    Ok(arr.get(&index, 0)?.iter().sum())
}

/// The same of a pinned per-CPU `u64` array.
pub fn pinned_percpu_sum(path: &Path, index: u32) -> anyhow::Result<u64> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let arr = PerCpuArray::<_, u64>::try_from(Map::from_map_data(data)?)?;
    Ok(arr.get(&index, 0)?.iter().sum())
}

/// The raw fd of map `name` of `ebpf` (for its `/proc` accounting).
pub fn map_fd(ebpf: &Ebpf, name: &str) -> anyhow::Result<i32> {
    Ok(map_data(ebpf, name)?.fd().as_fd().as_raw_fd())
}

/// The kernel's value size of map `name` of `ebpf`.
pub fn value_size(ebpf: &Ebpf, name: &str) -> anyhow::Result<u32> {
    Ok(map_data(ebpf, name)?.info()?.value_size())
}

fn map_data<'a>(ebpf: &'a Ebpf, name: &str) -> anyhow::Result<&'a MapData> {
    let map = ebpf.map(name).with_context(|| format!("no map {name}"))?;
    nat_userspace::ebpf::map_data(map).with_context(|| format!("map {name}: unexpected type"))
}

/// Number of possible CPUs (the value count of per-CPU maps).
pub fn possible_cpus() -> anyhow::Result<usize> {
    aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("{path}: {e}"))
}
