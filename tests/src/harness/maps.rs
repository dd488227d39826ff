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
    MAP_EG_SRC, MAP_EG_SVC, MAP_EVENTS, MAP_FLOWS, MAP_FW_SRC, MAP_FW_SVC, MAP_PENDING, MAP_SLOTS,
    NatConfig, RuleBits, Slot,
};
use nat_userspace::{ebpf::SlotView, tables::Entry};

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
        // Slot hits are the flow cache's own business, invisible to the model: a packet is on
        // the fast path (`fast_path`) whether its entry came from its slot or from `FLOWS`.
        if ev != Event::SlotHit {
            e.0[ev as usize] = m.get(&(ev as u32), 0)?.iter().sum();
        }
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

fn slots(ebpf: &mut Ebpf) -> anyhow::Result<Array<&mut MapData, Slot>> {
    Ok(Array::try_from(
        ebpf.map_mut(MAP_SLOTS).context("no map SLOTS")?,
    )?)
}

/// `SLOTS` mapped for reading, as natd reads it.
pub fn slot_view(ebpf: &Ebpf) -> anyhow::Result<SlotView> {
    match ebpf.map(MAP_SLOTS).context("no map SLOTS")? {
        aya::maps::Map::Array(d) => Ok(SlotView::of(d)?),
        _ => bail!("SLOTS is not an array"),
    }
}

/// Every entry of `FLOWS` and `PENDING`, with the map it is in (`true`: `PENDING`); a
/// `FLOWS` entry with what fast packets changed in its slot merged in (the table as the
/// program's full path and natd see it).
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
    let slots = slot_view(ebpf)?;
    for (k, (e, pending)) in out.iter_mut() {
        if !*pending {
            *e = slots.merged(k, *e);
        }
    }
    Ok(out)
}

/// Empties the slot holding `k`, if one does (a test writing or removing `k`'s entry: the
/// program never sees a slot outlive its entry's change).
fn drop_slot(ebpf: &mut Ebpf, k: &FlowTuple) -> anyhow::Result<()> {
    if let Some(i) = slot_view(ebpf)?.holding(k) {
        slots(ebpf)?.set(i, Slot::default(), 0)?;
    }
    Ok(())
}

/// Writes an entry into `FLOWS` (or `PENDING`).
pub fn put_entry(
    ebpf: &mut Ebpf,
    pending: bool,
    k: &FlowTuple,
    e: &FlowEntry,
) -> anyhow::Result<()> {
    let name = if pending { MAP_PENDING } else { MAP_FLOWS };
    drop_slot(ebpf, k)?;
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
    clear_slots(ebpf)
}

/// Empties every slot (the tests' array is small, see `TEST_SLOTS`).
fn clear_slots(ebpf: &mut Ebpf) -> anyhow::Result<()> {
    let mut slots = slots(ebpf)?;
    for i in 0..slots.len() {
        slots.set(i, Slot::default(), 0)?;
    }
    Ok(())
}

/// The program's slot hits so far (`Event::SlotHit`, which [`read_events`] leaves out).
pub fn slot_hits(ebpf: &Ebpf) -> anyhow::Result<u64> {
    let m: PerCpuArray<_, u64> = ebpf.map(MAP_EVENTS).context("no map EVENTS")?.try_into()?;
    Ok(m.get(&(Event::SlotHit as u32), 0)?.iter().sum())
}

/// The key held by the slot of `k`'s pair that holds `k`, else by `k`'s own slot (`proto`
/// 0: empty).
pub fn slot_key(ebpf: &Ebpf, k: &FlowTuple) -> anyhow::Result<FlowTuple> {
    slot_view(ebpf)?
        .slot(k)
        .map(|s| s.key)
        .context("the slot kept being written")
}

/// Makes the slot holding `k` look filled long ago, so that `k`'s next packet takes `FLOWS`
/// and refills it: half the jiffies clock's range away (the tests' second is `u32::MAX`
/// jiffies, so that nothing is refreshed by time). Returns whether a slot held `k`.
pub fn age_slot(ebpf: &mut Ebpf, k: &FlowTuple) -> anyhow::Result<bool> {
    let Some(i) = slot_view(ebpf)?.holding(k) else {
        return Ok(false);
    };
    let mut slots = slots(ebpf)?;
    let s = slots.get(&i, 0)?;
    let mut bytes = [0u8; size_of::<Slot>()];
    // SAFETY: `Slot` is plain `#[repr(C)]` data of exactly this size.
    unsafe { std::ptr::write_unaligned(bytes.as_mut_ptr().cast::<Slot>(), s) };
    bytes[Slot::FILLED_OFFSET..Slot::FILLED_OFFSET + 8]
        .copy_from_slice(&(1u64 << 63).to_ne_bytes());
    // SAFETY: as above; every bit pattern is a valid `Slot`.
    let aged = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Slot>()) };
    slots.set(i, aged, 0)?;
    Ok(true)
}

/// Makes the flow `k` in its slot look idle for longer than `Slot::TAKEOVER_REFRESHES`
/// refresh intervals (its `seen` pushed 2^40 jiffies back; the tests' interval is
/// `u32::MAX`), so that another flow of the pair may take the slot over. Returns whether a
/// slot held `k`.
pub fn idle_slot(ebpf: &mut Ebpf, k: &FlowTuple) -> anyhow::Result<bool> {
    let Some(i) = slot_view(ebpf)?.holding(k) else {
        return Ok(false);
    };
    let mut slots = slots(ebpf)?;
    let mut s = slots.get(&i, 0)?;
    s.entry.seen = s.entry.seen.wrapping_sub(1 << 40);
    slots.set(i, s, 0)?;
    Ok(true)
}
