//! Map reads and writes: mappings (reverse entry first), firewall entries, settings, counters
//! and flows.
use super::*;

const E2BIG: i32 = nix::errno::Errno::E2BIG as i32;
const ENOSPC: i32 = nix::errno::Errno::ENOSPC as i32;
const ENOMEM: i32 = nix::errno::Errno::ENOMEM as i32;

/// A map write error, or [`DataplaneError::Full`] when the map has no room left (the kernel
/// answers E2BIG for hash maps, ENOSPC for LPM tries).
fn write_error(map: &'static str, source: MapError) -> DataplaneError {
    let full = match &source {
        MapError::SyscallError(e) => {
            matches!(e.io_error.raw_os_error(), Some(E2BIG | ENOSPC))
        }
        _ => false,
    };
    if full {
        let capacity = match map {
            MAP_NAT_IN | MAP_NAT_OUT => nat_common::MAX_MAPPINGS,
            MAP_FW_SRC => nat_common::MAX_FW_SRC,
            MAP_FW_SVC => nat_common::MAX_FW_SVC,
            _ => nat_common::MAX_EG,
        };
        return DataplaneError::Full { map, capacity };
    }
    DataplaneError::Map { map, source }
}

/// Inserts (`Some`) or deletes (`None`) one firewall LPM entry of a loaded object: the one
/// place that knows how an [`Entry`] is encoded as a key (also used by the test bench, which
/// loads the object itself).
pub fn write_entry(
    ebpf: &mut Ebpf,
    e: Entry,
    bits: Option<RuleBits>,
) -> Result<(), DataplaneError> {
    fn write<K: aya::Pod>(
        ebpf: &mut Ebpf,
        map: &'static str,
        k: LpmKey<K>,
        bits: Option<RuleBits>,
    ) -> Result<(), DataplaneError> {
        let m = ebpf.map_mut(map).ok_or(DataplaneError::MissingMap(map))?;
        let mut t = LpmTrie::<_, K, RuleBits>::try_from(m).map_err(map_err(map))?;
        let r = match bits {
            Some(b) => t.insert(&k, b, 0),
            None => match t.remove(&k) {
                Err(MapError::KeyNotFound) => Ok(()),
                r => r,
            },
        };
        r.map_err(|source| write_error(map, source))
    }
    match e {
        Entry::FwSrc(public, cidr) => {
            let data = FwSrcData {
                public: public.octets(),
                source: cidr.addr().octets(),
            };
            let k = LpmKey::new(FW_SRC_BASE_BITS + u32::from(cidr.prefix_len()), data);
            write(ebpf, MAP_FW_SRC, k, bits)
        }
        Entry::FwSvc(public, proto, value, len) => {
            let data = FwSvcData {
                public: public.octets(),
                proto,
                service: value.to_be_bytes(),
                _pad: 0,
            };
            let k = LpmKey::new(FW_SVC_BASE_BITS + u32::from(len), data);
            write(ebpf, MAP_FW_SVC, k, bits)
        }
        Entry::EgSrc(cidr) => {
            let k = LpmKey::new(u32::from(cidr.prefix_len()), cidr.addr().octets());
            write(ebpf, MAP_EG_SRC, k, bits)
        }
        Entry::EgDst(cidr) => {
            let k = LpmKey::new(u32::from(cidr.prefix_len()), cidr.addr().octets());
            write(ebpf, MAP_EG_DST, k, bits)
        }
        Entry::EgSvc(proto, value, len) => {
            let (plen, data) = match proto {
                None => (0, EgSvcData::default()),
                Some(proto) => (
                    EG_SVC_BASE_BITS + u32::from(len),
                    EgSvcData {
                        proto,
                        service: value.to_be_bytes(),
                        _pad: 0,
                    },
                ),
            };
            write(ebpf, MAP_EG_SVC, LpmKey::new(plen, data), bits)
        }
    }
}

impl Dataplane {
    /// Sums the per-CPU verdict counters.
    pub fn stats(&mut self) -> Result<BTreeMap<Reason, Counter>, DataplaneError> {
        let arr = PerCpuArray::<_, Counter>::try_from(self.map(MAP_STATS)?)
            .map_err(map_err(MAP_STATS))?;
        let mut out = BTreeMap::new();
        for r in Reason::ALL {
            let v = arr.get(&(r as u32), 0).map_err(map_err(MAP_STATS))?;
            let mut c = Counter::default();
            for cpu in v.iter() {
                c.packets += cpu.packets;
                c.bytes += cpu.bytes;
            }
            out.insert(r, c);
        }
        Ok(out)
    }

    /// Sums the per-CPU counters of one mapping (zero for a direction not installed).
    pub fn counters(&mut self, m: Mapping) -> Result<MappingCounters, DataplaneError> {
        let sum = |v: Result<PerCpuValues<NatEntry>, MapError>, map| match v {
            Ok(v) => Ok(v.iter().fold((0, 0, 0), |(p, b, d), e| {
                (p + e.packets, b + e.bytes, d + e.denied)
            })),
            Err(MapError::KeyNotFound) => Ok((0, 0, 0)),
            Err(source) => Err(DataplaneError::Map { map, source }),
        };
        let inbound = self.nat_map(MAP_NAT_IN)?.get(&key(m.public), 0);
        let (inbound_packets, inbound_bytes, inbound_denied) = sum(inbound, MAP_NAT_IN)?;
        let outbound = self.nat_map(MAP_NAT_OUT)?.get(&key(m.private), 0);
        let (outbound_packets, outbound_bytes, outbound_denied) = sum(outbound, MAP_NAT_OUT)?;
        Ok(MappingCounters {
            inbound_packets,
            inbound_bytes,
            inbound_denied,
            outbound_packets,
            outbound_bytes,
            outbound_denied,
        })
    }

    pub(super) fn put(
        &mut self,
        map: &'static str,
        k: u32,
        addr: u32,
    ) -> Result<(), DataplaneError> {
        let nr_cpus = self.nr_cpus;
        let values = || {
            PerCpuValues::try_from(vec![NatEntry::new(addr); nr_cpus]).map_err(|source| {
                DataplaneError::Map {
                    map,
                    source: MapError::IoError(source),
                }
            })
        };
        // A per-CPU map without preallocation refills its element cache asynchronously: a
        // burst of inserts can meet a transient ENOMEM, which a short back-off rides out.
        let mut delay = std::time::Duration::from_micros(100);
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.nat_map(map)?.insert(k, values()?, 0) {
                Err(MapError::SyscallError(e))
                    if attempts < 8 && e.io_error.raw_os_error() == Some(ENOMEM) =>
                {
                    std::thread::sleep(delay);
                    delay *= 2;
                }
                r => return r.map_err(|source| write_error(map, source)),
            }
        }
    }

    pub(super) fn delete(&mut self, map: &'static str, k: u32) -> Result<(), DataplaneError> {
        match self.nat_map(map)?.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DataplaneError::Map { map, source }),
        }
    }
}

impl Dataplane {
    fn insert_mapping(&mut self, m: Mapping) -> Result<(), DataplaneError> {
        self.put(MAP_NAT_OUT, key(m.private), key(m.public))?;
        if let Err(e) = self.put(MAP_NAT_IN, key(m.public), key(m.private)) {
            // Leave nothing half-installed.
            let _ = self.delete(MAP_NAT_OUT, key(m.private));
            return Err(e);
        }
        Ok(())
    }

    fn remove_mapping(&mut self, m: Mapping) -> Result<(), DataplaneError> {
        self.delete(MAP_NAT_IN, key(m.public))?;
        self.delete(MAP_NAT_OUT, key(m.private))
    }

    pub(super) fn lpm<K: aya::Pod>(
        &mut self,
        map: &'static str,
    ) -> Result<LpmTrie<&mut MapData, K, RuleBits>, DataplaneError> {
        LpmTrie::try_from(self.map(map)?).map_err(map_err(map))
    }

    fn set_entry(&mut self, e: Entry, bits: Option<RuleBits>) -> Result<(), DataplaneError> {
        write_entry(&mut self.ebpf, e, bits)
    }

    /// Writes the program's settings (egress default and conntrack timeouts).
    pub fn write_config(&mut self, cfg: &NatConfig) -> Result<(), DataplaneError> {
        let mut arr =
            Array::<_, NatConfig>::try_from(self.map(MAP_CONFIG)?).map_err(map_err(MAP_CONFIG))?;
        arr.set(0, cfg, 0).map_err(map_err(MAP_CONFIG))
    }

    pub fn config(&mut self) -> Result<NatConfig, DataplaneError> {
        let arr =
            Array::<_, NatConfig>::try_from(self.map(MAP_CONFIG)?).map_err(map_err(MAP_CONFIG))?;
        arr.get(&0, 0).map_err(map_err(MAP_CONFIG))
    }

    /// Sums the per-CPU event counters.
    pub fn events(&mut self) -> Result<BTreeMap<Event, u64>, DataplaneError> {
        let arr =
            PerCpuArray::<_, u64>::try_from(self.map(MAP_EVENTS)?).map_err(map_err(MAP_EVENTS))?;
        let mut out = BTreeMap::new();
        for e in Event::ALL {
            let v = arr.get(&(e as u32), 0).map_err(map_err(MAP_EVENTS))?;
            out.insert(e, v.iter().sum());
        }
        Ok(out)
    }

    /// Adds `n` to a natd-written event counter (CPU 0's slot; the program never writes it).
    pub fn bump_event(&mut self, e: Event, n: u64) -> Result<(), DataplaneError> {
        let mut arr =
            PerCpuArray::<_, u64>::try_from(self.map(MAP_EVENTS)?).map_err(map_err(MAP_EVENTS))?;
        let v = arr.get(&(e as u32), 0).map_err(map_err(MAP_EVENTS))?;
        let mut v: Vec<u64> = v.iter().copied().collect();
        if let Some(first) = v.first_mut() {
            *first += n;
        }
        let v = PerCpuValues::try_from(v).map_err(|source| DataplaneError::Map {
            map: MAP_EVENTS,
            source: MapError::IoError(source),
        })?;
        arr.set(e as u32, v, 0).map_err(map_err(MAP_EVENTS))
    }

    fn conntrack(
        &mut self,
    ) -> Result<aya::maps::HashMap<&mut MapData, FlowKey, FlowState>, DataplaneError> {
        aya::maps::HashMap::try_from(self.map(MAP_CONNTRACK)?).map_err(map_err(MAP_CONNTRACK))
    }

    /// Every flow in the connection table (entries that vanish while we read are skipped).
    pub fn flows(&mut self) -> Result<Vec<(FlowKey, FlowState)>, DataplaneError> {
        let ct = self.conntrack()?;
        let mut out = Vec::new();
        for item in ct.iter() {
            match item {
                Ok(kv) => out.push(kv),
                Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(DataplaneError::Map {
                        map: MAP_CONNTRACK,
                        source,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Deletes the flows `pred` selects; returns how many went and how many were looked at.
    pub fn remove_flows(
        &mut self,
        pred: impl Fn(&FlowKey, &FlowState) -> bool,
    ) -> Result<(usize, usize), DataplaneError> {
        let all = self.flows()?;
        let seen = all.len();
        let doomed: Vec<FlowKey> = all
            .into_iter()
            .filter(|(k, v)| pred(k, v))
            .map(|(k, _)| k)
            .collect();
        let mut ct = self.conntrack()?;
        let mut n = 0;
        for k in doomed {
            match ct.remove(&k) {
                Ok(()) => n += 1,
                Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(DataplaneError::Map {
                        map: MAP_CONNTRACK,
                        source,
                    });
                }
            }
        }
        Ok((n, seen))
    }

    /// Capacity of the connection table.
    pub fn conntrack_capacity(&mut self) -> Result<u32, DataplaneError> {
        let map = self.map(MAP_CONNTRACK)?;
        Ok(match map {
            aya::maps::Map::LruHashMap(m) | aya::maps::Map::HashMap(m) => {
                m.info().map(|i| i.max_entries()).unwrap_or(0)
            }
            _ => 0,
        })
    }
}

impl FastPath for Dataplane {
    fn apply(&mut self, op: &Op) -> Result<(), DataplaneError> {
        match *op {
            Op::AddMapping(m) => self.insert_mapping(m),
            Op::RemoveMapping(m) => self.remove_mapping(m),
            Op::Set(e, b) => self.set_entry(e, Some(b)),
            Op::Unset(e) => self.set_entry(e, None),
            Op::EgressDefaultDeny(deny) => {
                let mut cfg = self.config()?;
                cfg.egress_default_deny = u32::from(deny);
                self.write_config(&cfg)
            }
        }
    }
}
