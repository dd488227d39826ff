//! Reading a whole hash map in batches (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6; hash and LRU hash
//! maps): one system call per few thousand entries, where aya's iterator (which has no batch
//! operations in 0.14) makes two per entry, a key's successor then its value. natd reads the
//! flow tables whole at every collection pass; at 64,000 flows the per-entry iteration cost
//! a quarter of a CPU (its system calls and the kernel's bucket walk for each successor).
use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

/// Entries asked for per call; more when one bucket holds more (`ENOSPC`).
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h); the kernel reads this
/// many bytes of it, and takes any it knows beyond them as zero.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Every entry of the hash map `fd` (keys `K`, values `V`, as the map declares them), read in
/// batches. Entries added or removed while it reads may be missed or not, as with any walk
/// of a live map; none is returned twice (the kernel resumes at the next bucket).
pub fn lookup_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let mut chunk = CHUNK;
    // The kernel's position: a bucket index for hash maps (a u32; room for a u64).
    let (mut at, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut keys: Vec<K> = Vec::with_capacity(chunk);
        let mut values: Vec<V> = Vec::with_capacity(chunk);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw const at as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix of the size passed; the kernel writes
        // at most `count` keys and values into buffers of that capacity, `next`, and `count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        let n = (attr.count as usize).min(chunk);
        // SAFETY: the kernel initialised the first `n` keys and values (it reports how many
        // it copied in `count`, also on `ENOENT`), and both are plain data.
        unsafe {
            keys.set_len(n);
            values.set_len(n);
        }
        match err {
            None => {}
            // The last batch: the map has no entry past it.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                out.extend(keys.into_iter().zip(values));
                return Ok(out);
            }
            // A bucket holds more entries than fit: ask again, for more.
            Some(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                chunk *= 2;
                continue;
            }
            Some(e) => return Err(e),
        }
        out.extend(keys.into_iter().zip(values));
        at = next;
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use aya::maps::HashMap;
    use nat_common::{ENTRY_ORIG, FlowEntry, FlowTuple, MAP_FLOWS, MAP_PENDING, proto};

    use crate::ebpf::{Dataplane, Sizes};

    /// The flow tables read in batches hold what was written, every entry once, over more
    /// calls than one (more entries than a batch); an empty table reads empty. Loads the
    /// program's maps: needs root, as the other kernel tests of this crate.
    #[test]
    fn a_table_read_in_batches_is_read_whole() {
        let sizes = Sizes {
            flows: 16384,
            mappings: 256,
        };
        let mut dp = Dataplane::load(sizes).unwrap_or_else(|e| panic!("{}", crate::report(&e)));
        let n = 3 * super::CHUNK as u32 + 17;
        let mut want = BTreeMap::new();
        {
            let mut m: HashMap<_, FlowTuple, FlowEntry> =
                HashMap::try_from(dp.map(MAP_FLOWS).unwrap()).unwrap();
            for i in 0..n {
                let k = FlowTuple::new(i, !i, (i % 60000) as u16, 53, proto::UDP);
                let e = FlowEntry {
                    flags: ENTRY_ORIG,
                    last_seen: u64::from(i) * 7,
                    slot: i,
                    ..FlowEntry::default()
                };
                m.insert(k, e, 0).unwrap();
                want.insert(k, e);
            }
        }
        let got = dp.flows().unwrap();
        assert_eq!(got.len(), n as usize, "every flow once");
        for f in &got {
            let e = want.get(&f.key).expect("a flow written");
            assert_eq!((f.last_seen, f.slot), (e.last_seen, e.slot));
        }
        let data = match dp.map(MAP_PENDING).unwrap() {
            aya::maps::Map::LruHashMap(d) => d,
            _ => panic!("PENDING is an LRU hash"),
        };
        use std::os::fd::AsFd as _;
        let none = super::lookup_all::<FlowTuple, FlowEntry>(data.fd().as_fd()).unwrap();
        assert!(none.is_empty());
    }
}
