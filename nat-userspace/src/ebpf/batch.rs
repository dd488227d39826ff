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
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries asked for per call; more when one bucket holds more (`ENOSPC`).
const CHUNK: usize = 4096;

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
        // SAFETY: `bpf_attr` is a union of plain integers; all zero is the kernel's default
        // for every member.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: writing the `batch` member of a zeroed union.
        let b = unsafe { &mut attr.batch };
        b.in_batch = if first { 0 } else { &raw const at as u64 };
        b.out_batch = &raw mut next as u64;
        b.keys = keys.as_mut_ptr() as u64;
        b.values = values.as_mut_ptr() as u64;
        b.count = chunk as u32;
        b.map_fd = fd.as_raw_fd() as u32;
        // SAFETY: `attr` is a `bpf_attr` of the size passed (its members beyond the batch's
        // zero, as the kernel requires); the kernel writes at most `count` keys and values
        // into buffers of that capacity, `next`, and `count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                &raw mut attr,
                size_of::<bpf_attr>() as libc::c_uint,
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        // SAFETY: the `batch` member, which the kernel wrote back.
        let n = (unsafe { attr.batch.count } as usize).min(chunk);
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
