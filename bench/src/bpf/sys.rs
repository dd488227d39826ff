//! The `bpf(2)` commands the raw programs need, issued directly: map create/update/lookup,
//! program load, XDP link create, and `BPF_PROG_TEST_RUN` (also in live-frames mode). The
//! attribute structs are the leading fields of the kernel's `union bpf_attr` for each command
//! (the kernel zero-fills the rest).
use std::{
    ffi::c_void,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use anyhow::{Context as _, bail};

use super::asm::{Insn, to_bytes};

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_MAP_UPDATE_ELEM: i64 = 2;
const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_LINK_CREATE: i64 = 28;

pub const MAP_HASH: u32 = 1;
pub const MAP_ARRAY: u32 = 2;
pub const MAP_PERCPU_HASH: u32 = 5;
pub const MAP_PERCPU_ARRAY: u32 = 6;
pub const F_NO_PREALLOC: u32 = 1;

const PROG_TYPE_XDP: u32 = 6;
const ATTACH_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// `BPF_F_TEST_XDP_LIVE_FRAMES`.
const F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

fn sys_bpf<T>(cmd: i64, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, correctly laid out prefix of `union bpf_attr` for `cmd`; the
    // pointers inside it point at buffers that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut c_void,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor to us.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// A map this process created; closed on drop.
pub struct Map {
    pub fd: OwnedFd,
}

impl Map {
    pub fn create(
        name: &str,
        map_type: u32,
        key_size: usize,
        value_size: usize,
        max_entries: u32,
        flags: u32,
    ) -> anyhow::Result<Self> {
        let mut attr = MapCreate {
            map_type,
            key_size: key_size as u32,
            value_size: value_size as u32,
            max_entries,
            map_flags: flags,
            ..Default::default()
        };
        for (d, s) in attr.map_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        let fd = sys_bpf(BPF_MAP_CREATE, &mut attr)
            .with_context(|| format!("BPF_MAP_CREATE {name} ({max_entries} entries)"))?;
        Ok(Self { fd: owned(fd) })
    }

    pub fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Writes `value` (for per-CPU maps: one value per possible CPU, each rounded up to 8).
    pub fn update(&self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        update_raw(self.raw(), key, value)
    }

    /// [`Map::update`], retrying transient ENOMEM (non-preallocated per-CPU maps refill their
    /// element cache asynchronously); returns how many retries it took.
    pub fn update_retry(&self, key: &[u8], value: &[u8]) -> anyhow::Result<u64> {
        for n in 0..1000 {
            match update_errno(self.raw(), key, value) {
                Ok(()) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::ENOMEM) => {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
                Err(e) => return Err(e).context("BPF_MAP_UPDATE_ELEM"),
            }
        }
        bail!("BPF_MAP_UPDATE_ELEM: ENOMEM 1000 times in a row")
    }

    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> anyhow::Result<()> {
        lookup_raw(self.raw(), key, value)
    }
}

#[repr(C)]
struct Elem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

pub fn update_raw(fd: i32, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
    update_errno(fd, key, value).context("BPF_MAP_UPDATE_ELEM")
}

fn update_errno(fd: i32, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = Elem {
        map_fd: fd as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags: 0,
    };
    sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

pub fn lookup_raw(fd: i32, key: &[u8], value: &mut [u8]) -> anyhow::Result<()> {
    let mut attr = Elem {
        map_fd: fd as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("BPF_MAP_LOOKUP_ELEM")?;
    Ok(())
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// A loaded XDP program; unloaded when the last reference (this fd, a link) goes.
pub struct Prog {
    pub fd: OwnedFd,
}

impl Prog {
    /// Loads `insns` as an XDP program; a verifier refusal comes back with its log.
    pub fn load_xdp(name: &str, insns: &[Insn]) -> anyhow::Result<Self> {
        let code = to_bytes(insns);
        let license = c"GPL";
        let mut log = vec![0u8; 1 << 16];
        let mut attr = ProgLoad {
            prog_type: PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: code.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            expected_attach_type: ATTACH_XDP,
            ..Default::default()
        };
        for (d, s) in attr.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *d = s;
        }
        match sys_bpf(BPF_PROG_LOAD, &mut attr) {
            Ok(fd) => Ok(Self { fd: owned(fd) }),
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                bail!(
                    "the verifier refused {name}: {e}\n{}",
                    String::from_utf8_lossy(&log[..end])
                )
            }
        }
    }

    pub fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// Attaches `prog_fd` to `ifindex` (of the calling thread's network namespace) in native mode.
/// The program stays attached while the returned link fd is open.
pub fn attach_xdp(prog_fd: i32, ifindex: u32) -> anyhow::Result<OwnedFd> {
    let mut attr = LinkCreate {
        prog_fd: prog_fd as u32,
        target_ifindex: ifindex,
        attach_type: ATTACH_XDP,
        flags: XDP_FLAGS_DRV_MODE,
    };
    let fd = sys_bpf(BPF_LINK_CREATE, &mut attr)
        .with_context(|| format!("BPF_LINK_CREATE xdp on ifindex {ifindex}"))?;
    Ok(owned(fd))
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// What one `BPF_PROG_TEST_RUN` reported.
#[derive(Clone, Copy, Debug)]
pub struct RunResult {
    pub retval: u32,
    /// Kernel-measured time per repetition, ns (total / repeat, rounded down).
    pub duration_ns: u32,
}

/// The `xdp_md` context of a frame of `len` bytes arriving on `ifindex`.
pub fn xdp_ctx(len: usize, ifindex: u32) -> [u8; 24] {
    let mut c = [0u8; 24];
    c[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    c[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

/// Runs `prog_fd` `repeat` times on `data` (each repetition sees the previous one's output);
/// `ifindex` 0 = no context. `out` receives the final frame.
pub fn test_run(
    prog_fd: i32,
    data: &[u8],
    ifindex: u32,
    repeat: u32,
    out: Option<&mut [u8]>,
) -> anyhow::Result<RunResult> {
    let ctx = xdp_ctx(data.len(), ifindex);
    let (out_ptr, out_len) = match out {
        Some(o) => (o.as_mut_ptr() as u64, o.len() as u32),
        None => (0, 0),
    };
    let mut attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        data_out: out_ptr,
        data_size_out: out_len,
        repeat,
        ..Default::default()
    };
    if ifindex != 0 {
        attr.ctx_size_in = ctx.len() as u32;
        attr.ctx_in = ctx.as_ptr() as u64;
    }
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN")?;
    Ok(RunResult {
        retval: attr.retval,
        duration_ns: attr.duration,
    })
}

/// Runs an XDP program in live-frames mode: `repeat` frames initialised from `data`, as if
/// received on `ifindex` (of the calling thread's namespace); XDP_TX sends each out of that
/// interface. Returns the kernel-measured time per frame (ns).
pub fn live_frames(prog_fd: i32, data: &[u8], ifindex: u32, repeat: u32) -> anyhow::Result<u32> {
    let ctx = xdp_ctx(data.len(), ifindex);
    let mut attr = TestRunAttr {
        prog_fd: prog_fd as u32,
        data_size_in: data.len() as u32,
        data_in: data.as_ptr() as u64,
        repeat,
        ctx_size_in: ctx.len() as u32,
        ctx_in: ctx.as_ptr() as u64,
        flags: F_TEST_XDP_LIVE_FRAMES,
        ..Default::default()
    };
    sys_bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN (live frames)")?;
    Ok(attr.duration)
}

/// Number of possible CPUs (the per-CPU value count of per-CPU maps).
pub fn possible_cpus() -> anyhow::Result<usize> {
    aya::util::nr_cpus().map_err(|(path, e)| anyhow::anyhow!("{path}: {e}"))
}
