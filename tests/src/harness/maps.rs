//! The bench's access to the policy maps: firewall LPM entries and `CONFIG` written as natd
//! writes them, `EVENTS` and `CONNTRACK` read back (and `CONNTRACK` seeded or cleared).
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
    EgSvcData, Event, FlowKey, FlowState, FwSrcData, FwSvcData, MAP_CONFIG, MAP_CONNTRACK,
    MAP_EG_DST, MAP_EG_SRC, MAP_EG_SVC, MAP_EVENTS, MAP_FW_SRC, MAP_FW_SVC, NatConfig, RuleBits,
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
