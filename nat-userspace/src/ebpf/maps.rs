//! Map reads and writes: mappings (reverse entry first), firewall entries, settings, counters
//! and flows.
use super::*;

const E2BIG: i32 = nix::errno::Errno::E2BIG as i32;
const ENOSPC: i32 = nix::errno::Errno::ENOSPC as i32;

/// A map write error, or [`DataplaneError::Full`] when the map has no room left (the kernel
/// answers E2BIG for hash maps, ENOSPC for LPM tries).
fn write_error(map: &'static str, capacity: u32, source: MapError) -> DataplaneError {
    let full = match &source {
        MapError::SyscallError(e) => {
            matches!(e.io_error.raw_os_error(), Some(E2BIG | ENOSPC))
        }
        _ => false,
    };
    if full {
        return DataplaneError::Full { map, capacity };
    }
    DataplaneError::Map { map, source }
}

/// The capacity a firewall map is declared with.
fn lpm_capacity(map: &str) -> u32 {
    spec::MAPS
        .iter()
        .find(|m| m.name == map)
        .map_or(0, |m| m.max_entries)
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
        r.map_err(|source| write_error(map, lpm_capacity(map), source))
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

    /// Sums the per-CPU counters of one mapping (zeros if it is not installed).
    pub fn counters(&mut self, m: Mapping) -> Result<MappingCounters, DataplaneError> {
        let Some(slot) = self.slots.get(m.public) else {
            return Ok(MappingCounters::default());
        };
        let arr = PerCpuArray::<_, MappingStats>::try_from(self.map(MAP_MAPPING_STATS)?)
            .map_err(map_err(MAP_MAPPING_STATS))?;
        let v = arr.get(&slot, 0).map_err(map_err(MAP_MAPPING_STATS))?;
        let mut c = MappingCounters::default();
        for s in v.iter() {
            c.inbound_packets += s.in_packets;
            c.inbound_bytes += s.in_bytes;
            c.inbound_denied += s.in_denied;
            c.outbound_packets += s.out_packets;
            c.outbound_bytes += s.out_bytes;
            c.outbound_denied += s.out_denied;
        }
        Ok(c)
    }

    /// Zeroes the counters of `slot` (handed to a new mapping).
    fn zero_slot(&mut self, slot: u32) -> Result<(), DataplaneError> {
        let zeros = PerCpuValues::try_from(vec![MappingStats::default(); self.nr_cpus]).map_err(
            |source| DataplaneError::Map {
                map: MAP_MAPPING_STATS,
                source: MapError::IoError(source),
            },
        )?;
        PerCpuArray::<_, MappingStats>::try_from(self.map(MAP_MAPPING_STATS)?)
            .map_err(map_err(MAP_MAPPING_STATS))?
            .set(slot, zeros, 0)
            .map_err(map_err(MAP_MAPPING_STATS))
    }

    pub(super) fn put(
        &mut self,
        map: &'static str,
        k: u32,
        v: NatValue,
    ) -> Result<(), DataplaneError> {
        let capacity = self.sizes.mappings;
        self.nat_map(map)?
            .insert(k, v, 0)
            .map_err(|source| write_error(map, capacity, source))
    }

    pub(super) fn delete(&mut self, map: &'static str, k: u32) -> Result<(), DataplaneError> {
        match self.nat_map(map)?.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(DataplaneError::Map { map, source }),
        }
    }
}

impl Dataplane {
    /// Installs a mapping with a fresh counter slot: the reverse entry first.
    fn insert_mapping(&mut self, m: Mapping) -> Result<(), DataplaneError> {
        let slot = self.slots.take(m.public).ok_or(DataplaneError::NoSlot {
            capacity: self.slots.capacity().saturating_sub(1),
        })?;
        let r = self.install(m, slot);
        if r.is_err() {
            self.slots.untake(m.public);
        }
        r
    }

    fn install(&mut self, m: Mapping, slot: u32) -> Result<(), DataplaneError> {
        self.zero_slot(slot)?;
        let out = NatValue {
            addr: key(m.public),
            slot,
            ..NatValue::default()
        };
        self.put(MAP_NAT_OUT, key(m.private), out)?;
        let inbound = NatValue {
            addr: key(m.private),
            slot,
            ifindex: self.owning_iface(m.public),
            _pad: 0,
        };
        if let Err(e) = self.put(MAP_NAT_IN, key(m.public), inbound) {
            // Leave nothing half-installed.
            let _ = self.delete(MAP_NAT_OUT, key(m.private));
            return Err(e);
        }
        Ok(())
    }

    /// The public interface whose network holds `public` (0: none or several), so new inbound
    /// flows to it are taken only there. Inside a batch the interfaces' subnets are read once
    /// (one `getifaddrs` for all of the batch's mappings, not one per mapping).
    fn owning_iface(&self, public: std::net::Ipv4Addr) -> u32 {
        let fresh;
        let subnets = match &self.public_subnets {
            Some(s) => s,
            None => {
                fresh = self.read_public_subnets();
                &fresh
            }
        };
        let mut owners = subnets
            .iter()
            .filter(|(_, nets)| subnets_hold(nets, public));
        match (owners.next(), owners.next()) {
            (Some((ifindex, _)), None) => *ifindex,
            _ => 0,
        }
    }

    /// The public interfaces' ifindexes and subnets, from one `getifaddrs`.
    fn read_public_subnets(&self) -> PublicSubnets {
        let all = all_subnets();
        self.attached()
            .filter(|a| a.role == Role::Public)
            .map(|a| {
                let nets = all
                    .iter()
                    .filter(|(name, _)| *name == a.name)
                    .map(|(_, net)| *net)
                    .collect();
                (a.ifindex, nets)
            })
            .collect()
    }

    /// Removes a mapping, forward entry first; its established flows run on (a revoked static
    /// NAT keeps them, as netfilter does) and its slot is retired until they are gone.
    fn remove_mapping(&mut self, m: Mapping) -> Result<(), DataplaneError> {
        self.delete(MAP_NAT_IN, key(m.public))?;
        self.delete(MAP_NAT_OUT, key(m.private))?;
        self.slots.retire(m.public);
        Ok(())
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

    /// Writes `NatConfig::egress_default_deny` (`nat_common::EGRESS_*`), the other settings
    /// as they are.
    fn write_egress_mode(&mut self, mode: u32) -> Result<(), DataplaneError> {
        let mut cfg = self.config()?;
        cfg.egress_default_deny = mode;
        self.write_config(&cfg)
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
}

impl FastPath for Dataplane {
    fn begin(&mut self) {
        self.public_subnets = Some(self.read_public_subnets());
    }

    fn end(&mut self) {
        self.public_subnets = None;
    }

    fn apply(&mut self, op: &Op) -> Result<(), DataplaneError> {
        match *op {
            Op::AddMapping(m) => self.insert_mapping(m),
            Op::RemoveMapping(m) => self.remove_mapping(m),
            Op::Set(e, b) => self.set_entry(e, Some(b)),
            Op::Unset(e) => self.set_entry(e, None),
            Op::EgressDefaultDeny(deny) => self.write_egress_mode(egress_mode(false, deny)),
            Op::EgressClosed => self.write_egress_mode(egress_mode(true, false)),
        }
    }
}
