//! The bench's access to the policy maps: firewall LPM entries and `CONFIG` written as natd
//! writes them, `EVENTS` and `CONNTRACK` read back (and `CONNTRACK` seeded or cleared).
//!
//! The harness loads the object itself (small mapping maps, see `TEST_MAX_MAPPINGS`), so it
//! cannot use `nat_userspace::ebpf::Dataplane`; [`write_entry`] is a copy of its `set_entry`
//! key encoding, and the `testrun` firewall tests check the two write identical maps.
use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, lpm_trie::Key},
};
use nat_common::{
    EG_SVC_BASE_BITS, EgSvcData, Event, FW_SRC_BASE_BITS, FW_SVC_BASE_BITS, FlowKey, FlowState,
    FwSrcData, FwSvcData, MAP_CONFIG, MAP_CONNTRACK, MAP_EG_DST, MAP_EG_SVC, MAP_EVENTS,
    MAP_FW_SRC, MAP_FW_SVC, NatConfig, RuleBits,
};
use nat_userspace::tables::Entry;

use crate::model::{Events, Flow, Tracked};

fn lpm<'a, K: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> anyhow::Result<LpmTrie<&'a mut MapData, K, RuleBits>> {
    let map = ebpf
        .map_mut(name)
        .with_context(|| format!("no map {name}"))?;
    Ok(LpmTrie::try_from(map)?)
}

fn write<K: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    k: Key<K>,
    bits: Option<RuleBits>,
) -> anyhow::Result<()> {
    let mut t = lpm::<K>(ebpf, name)?;
    let r = match bits {
        Some(b) => t.insert(&k, b, 0),
        None => match t.remove(&k) {
            Err(MapError::KeyNotFound) => Ok(()),
            r => r,
        },
    };
    r.with_context(|| format!("write {name}"))
}

/// Inserts (`Some`) or deletes (`None`) one firewall LPM entry, encoded as natd encodes it.
pub fn write_entry(ebpf: &mut Ebpf, e: Entry, bits: Option<RuleBits>) -> anyhow::Result<()> {
    match e {
        Entry::FwSrc(public, cidr) => {
            let data = FwSrcData {
                public: public.octets(),
                source: cidr.addr().octets(),
            };
            let k = Key::new(FW_SRC_BASE_BITS + u32::from(cidr.prefix_len()), data);
            write(ebpf, MAP_FW_SRC, k, bits)
        }
        Entry::FwSvc(public, proto, value, len) => {
            let data = FwSvcData {
                public: public.octets(),
                proto,
                service: value.to_be_bytes(),
                _pad: 0,
            };
            write(
                ebpf,
                MAP_FW_SVC,
                Key::new(FW_SVC_BASE_BITS + u32::from(len), data),
                bits,
            )
        }
        Entry::EgDst(cidr) => {
            let k = Key::new(u32::from(cidr.prefix_len()), cidr.addr().octets());
            write(ebpf, MAP_EG_DST, k, bits)
        }
        Entry::EgSvc(proto, value, len) => {
            let k = match proto {
                None => Key::new(0, EgSvcData::default()),
                Some(proto) => Key::new(
                    EG_SVC_BASE_BITS + u32::from(len),
                    EgSvcData {
                        proto,
                        service: value.to_be_bytes(),
                        _pad: 0,
                    },
                ),
            };
            write(ebpf, MAP_EG_SVC, k, bits)
        }
    }
}

/// One entry of a firewall map: (map, prefix length, key data, bits).
pub type LpmEntry = (String, u32, String, RuleBits);

/// Every entry of the four firewall maps, sorted: what the tests compare between the bench and
/// natd's `Dataplane`.
pub fn firewall_entries(ebpf: &mut Ebpf) -> anyhow::Result<Vec<LpmEntry>> {
    fn dump<K: aya::Pod + std::fmt::Debug>(
        ebpf: &mut Ebpf,
        name: &str,
        out: &mut Vec<LpmEntry>,
    ) -> anyhow::Result<()> {
        let t = lpm::<K>(ebpf, name)?;
        for kv in t.iter() {
            let (k, v) = kv.with_context(|| format!("iterate {name}"))?;
            out.push((
                name.to_string(),
                k.prefix_len(),
                format!("{:?}", k.data()),
                v,
            ));
        }
        Ok(())
    }
    let mut out = Vec::new();
    dump::<FwSrcData>(ebpf, MAP_FW_SRC, &mut out)?;
    dump::<FwSvcData>(ebpf, MAP_FW_SVC, &mut out)?;
    dump::<[u8; 4]>(ebpf, MAP_EG_DST, &mut out)?;
    dump::<EgSvcData>(ebpf, MAP_EG_SVC, &mut out)?;
    out.sort_by(|a, b| (&a.0, a.1, &a.2).cmp(&(&b.0, b.1, &b.2)));
    Ok(out)
}

fn config_map(ebpf: &mut Ebpf) -> anyhow::Result<Array<&mut MapData, NatConfig>> {
    Ok(Array::try_from(
        ebpf.map_mut(MAP_CONFIG).context("no map CONFIG")?,
    )?)
}

pub fn read_config(ebpf: &mut Ebpf) -> anyhow::Result<NatConfig> {
    Ok(config_map(ebpf)?.get(&0, 0)?)
}

pub fn write_config(ebpf: &mut Ebpf, cfg: &NatConfig) -> anyhow::Result<()> {
    Ok(config_map(ebpf)?.set(0, cfg, 0)?)
}

/// `EVENTS` summed over CPUs.
pub fn read_events(ebpf: &Ebpf) -> anyhow::Result<Events> {
    let m: PerCpuArray<_, u64> = ebpf.map(MAP_EVENTS).context("no map EVENTS")?.try_into()?;
    let mut e = Events::default();
    for ev in Event::ALL {
        e.0[ev as usize] = m.get(&(ev as u32), 0)?.iter().sum();
    }
    Ok(e)
}

fn conntrack(ebpf: &mut Ebpf) -> anyhow::Result<HashMap<&mut MapData, FlowKey, FlowState>> {
    Ok(HashMap::try_from(
        ebpf.map_mut(MAP_CONNTRACK).context("no map CONNTRACK")?,
    )?)
}

/// Every `CONNTRACK` entry; fails on a key or value the program never writes (an unknown
/// kind, nonzero padding).
pub fn read_flows(ebpf: &mut Ebpf) -> anyhow::Result<BTreeMap<Flow, Tracked>> {
    let ct = conntrack(ebpf)?;
    let mut out = BTreeMap::new();
    for kv in ct.iter() {
        let (k, v) = kv.context("iterate CONNTRACK")?;
        let Some(flow) = Flow::from_key(&k).filter(|f| f.key() == k) else {
            bail!("CONNTRACK key with an unknown kind or padding set: {k:?}");
        };
        let Some(t) = Tracked::from_value(&v) else {
            bail!("CONNTRACK value with unexpected fields for {flow}: {v:?}");
        };
        out.insert(flow, t);
    }
    Ok(out)
}

pub fn put_flow(ebpf: &mut Ebpf, flow: &Flow, v: &FlowState) -> anyhow::Result<()> {
    Ok(conntrack(ebpf)?.insert(flow.key(), v, 0)?)
}

pub fn clear_flows(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut ct = conntrack(ebpf)?;
    let keys = ct.keys().collect::<Result<Vec<_>, _>>()?;
    for k in keys {
        match ct.remove(&k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
