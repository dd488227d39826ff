//! The bench's access to the policy maps: firewall LPM entries and `CONFIG` written as natd
//! writes them, `EVENTS` and the flow table (`FLOWS`, `PENDING`) read back, seeded or cleared.
//!
//! The harness loads the object itself (small mapping maps, see `TEST_MAX_MAPPINGS`), so it
//! cannot use `nat_userspace::ebpf::Dataplane`; [`write_entry`] goes through natd's own key
//! encoder (`nat_userspace::ebpf::write_entry`), and the `testrun` firewall tests check that the
//! bench and natd's Dataplane write identical maps.
use std::collections::BTreeMap;

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray},
};
use nat_common::{
    EgSvcData, Event, FlowEntry, FlowTuple, FwSrcData, FwSvcData, MAP_CONFIG, MAP_EG_DST,
    MAP_EG_SRC, MAP_EG_SVC, MAP_EVENTS, MAP_FLOWS, MAP_FW_SRC, MAP_FW_SVC, MAP_PENDING, NatConfig,
    RuleBits,
};
use nat_userspace::tables::Entry;

use crate::model::Events;

fn lpm<'a, K: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> anyhow::Result<LpmTrie<&'a mut MapData, K, RuleBits>> {
    let map = ebpf
        .map_mut(name)
        .with_context(|| format!("no map {name}"))?;
    Ok(LpmTrie::try_from(map)?)
}

/// Inserts (`Some`) or deletes (`None`) one firewall LPM entry, through natd's own encoder.
pub fn write_entry(ebpf: &mut Ebpf, e: Entry, bits: Option<RuleBits>) -> anyhow::Result<()> {
    Ok(nat_userspace::ebpf::write_entry(ebpf, e, bits)?)
}

/// One entry of a firewall map: (map, prefix length, key data, bits).
pub type LpmEntry = (String, u32, String, RuleBits);

/// Every entry of the five firewall maps, sorted: what the tests compare between the bench and
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
    dump::<[u8; 4]>(ebpf, MAP_EG_SRC, &mut out)?;
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

fn table<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> anyhow::Result<HashMap<&'a mut MapData, FlowTuple, FlowEntry>> {
    Ok(HashMap::try_from(
        ebpf.map_mut(name)
            .with_context(|| format!("no map {name}"))?,
    )?)
}

/// Every entry of `FLOWS` and `PENDING`, with the map it is in (`true`: `PENDING`).
pub fn read_entries(ebpf: &mut Ebpf) -> anyhow::Result<BTreeMap<FlowTuple, (FlowEntry, bool)>> {
    let mut out = BTreeMap::new();
    for (name, pending) in [(MAP_FLOWS, false), (MAP_PENDING, true)] {
        for kv in table(ebpf, name)?.iter() {
            let (k, v) = kv.with_context(|| format!("iterate {name}"))?;
            if out.insert(k, (v, pending)).is_some() {
                bail!("{k:?} is in both FLOWS and PENDING");
            }
        }
    }
    Ok(out)
}

/// Writes an entry into `FLOWS` (or `PENDING`).
pub fn put_entry(
    ebpf: &mut Ebpf,
    pending: bool,
    k: &FlowTuple,
    e: &FlowEntry,
) -> anyhow::Result<()> {
    let name = if pending { MAP_PENDING } else { MAP_FLOWS };
    Ok(table(ebpf, name)?.insert(k, e, 0)?)
}

/// Empties `FLOWS` and `PENDING`.
pub fn clear_flows(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    for name in [MAP_FLOWS, MAP_PENDING] {
        let mut t = table(ebpf, name)?;
        let keys = t.keys().collect::<Result<Vec<_>, _>>()?;
        for k in keys {
            match t.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
