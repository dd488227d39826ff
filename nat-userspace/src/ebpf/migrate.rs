//! Migration of pinned maps whose capacity differs from this natd's, or whose values are of
//! an [`earlier`] layout (decided in [`plan`]): the loader creates the new map under a staging
//! pin (`maps/NAME_migrating`: bpffs reserves names with a dot), natd fills it from the pinned
//! one (counts slot by slot as far as both reach; table entries, converted to this layout's
//! values, the most recently seen flows where a smaller table cannot hold them all) and then
//! renames the staging pin over the old one. A crash at any point leaves the old pin or the
//! new one, never none; staging pins left behind are removed by the next start, and `META`
//! keeps the old layout version until every map is in place. The old program keeps running on
//! the old maps until natd replaces it on each interface: what it counts or opens between the
//! copy and the replacement is lost.
use std::collections::BTreeMap;

use nat_common::ENTRY_ORIG;

use super::{
    earlier::{Convert, FlowEntryV2},
    plan::Action,
    *,
};

/// Where the new map of `name` is pinned while it is filled.
fn staging(pins: &PinDir, name: &str) -> PathBuf {
    pins.maps().join(format!("{name}_migrating"))
}

/// The path the loader pins (or opens) `name` at: the staging pin when it is migrated.
pub(super) fn pin_path(pins: &PinDir, name: &str, action: Action) -> PathBuf {
    if action.migrates() {
        staging(pins, name)
    } else {
        pins.map(name)
    }
}

/// Removes every staging pin: left by a natd that stopped midway, or by this one failing.
pub(super) fn clear_staging(pins: &PinDir) -> Result<(), DataplaneError> {
    for m in adopt::pinned_maps() {
        let path = staging(pins, m.name);
        match std::fs::remove_file(&path) {
            Ok(()) => log::info!("removed the staging pin {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(DataplaneError::Unpin { path, source }),
        }
    }
    Ok(())
}

/// How the entries of a migrated map are copied, by map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Copier {
    Stats,
    Events,
    MappingStats,
    Nat,
    Flows,
}

impl Copier {
    fn of(name: &str) -> Option<Self> {
        Some(match name {
            MAP_STATS => Copier::Stats,
            MAP_EVENTS => Copier::Events,
            MAP_MAPPING_STATS => Copier::MappingStats,
            MAP_NAT_IN | MAP_NAT_OUT => Copier::Nat,
            MAP_FLOWS | MAP_PENDING => Copier::Flows,
            _ => return None,
        })
    }
}

/// What a copy carried over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Copied {
    /// Counter slots.
    Slots(u32),
    Entries(usize),
    /// Flows in the new table, of how many in the old one.
    Flows {
        kept: usize,
        found: usize,
    },
}

/// The pinned map `name`, opened.
fn open_pin(pins: &PinDir, name: &str) -> Result<aya::maps::Map, DataplaneError> {
    let path = pins.map(name);
    MapData::from_pin(&path)
        .and_then(aya::maps::Map::from_map_data)
        .map_err(|source| DataplaneError::ReadPin { path, source })
}

/// Every entry of the pinned hash map `name` (entries that vanish while read are skipped).
fn pinned_entries<K: aya::Pod, V: aya::Pod>(
    pins: &PinDir,
    name: &'static str,
) -> Result<Vec<(K, V)>, DataplaneError> {
    let m = HashMap::<MapData, K, V>::try_from(open_pin(pins, name)?).map_err(map_err(name))?;
    let mut out = Vec::new();
    for kv in m.iter() {
        match kv {
            Ok(kv) => out.push(kv),
            Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(DataplaneError::Map { map: name, source }),
        }
    }
    Ok(out)
}

/// Refuses, before anything is created, a smaller `[limits] mappings` than the pinned
/// mappings and the counter slots their flows name need.
pub(super) fn check_fit(
    pins: &PinDir,
    plan: &[(spec::MapSpec, Action)],
) -> Result<(), DataplaneError> {
    let shrinks = plan.iter().find_map(|(m, a)| match a {
        Action::Counters { from, to } | Action::Entries { from, to }
            if to < from && matches!(m.name, MAP_NAT_IN | MAP_NAT_OUT | MAP_MAPPING_STATS) =>
        {
            Some((*from, *to))
        }
        _ => None,
    });
    let Some((from, to)) = shrinks else {
        return Ok(());
    };
    let mut max_slot = 0;
    let mut entries = 0;
    for name in [MAP_NAT_IN, MAP_NAT_OUT] {
        let all = pinned_entries::<u32, NatValue>(pins, name)?;
        entries = entries.max(all.len());
        max_slot = all.iter().map(|(_, v)| v.slot).fold(max_slot, u32::max);
    }
    for name in [MAP_FLOWS, MAP_PENDING] {
        let how = plan
            .iter()
            .find(|(m, _)| m.name == name)
            .and_then(|(_, a)| a.convert());
        let all = pinned_flows(pins, name, how)?;
        max_slot = all.iter().map(|(_, e)| e.slot).fold(max_slot, u32::max);
    }
    let entries = u32::try_from(entries).unwrap_or(u32::MAX);
    plan::mappings_fit(to, from, max_slot, entries).map_err(|r| DataplaneError::Refused {
        dir: pins.root().to_path_buf(),
        mismatches: r.mismatches,
        remedy: r.remedy,
    })
}

/// Every entry of the pinned flow table `name`, converted `how` where it is of an earlier
/// layout.
fn pinned_flows(
    pins: &PinDir,
    name: &'static str,
    how: Option<Convert>,
) -> Result<Vec<(FlowTuple, FlowEntry)>, DataplaneError> {
    Ok(match how {
        None => pinned_entries::<FlowTuple, FlowEntry>(pins, name)?,
        Some(Convert::FlowEntryV2) => pinned_entries::<FlowTuple, FlowEntryV2>(pins, name)?
            .into_iter()
            .map(|(k, e)| (k, e.into()))
            .collect(),
    })
}

/// The flows of one table that fit `capacity` entries: whole flows (both entries), the most
/// recently seen first; reply entries whose flow is gone are left out. Returned oldest first,
/// the order to insert them in (an LRU short of room evicts the oldest), with the number of
/// flows found.
fn newest_flows(
    entries: Vec<(FlowTuple, FlowEntry)>,
    capacity: usize,
) -> (Vec<(FlowTuple, FlowEntry)>, usize) {
    let mut flows: BTreeMap<FlowTuple, Vec<(FlowTuple, FlowEntry)>> = BTreeMap::new();
    let mut replies = Vec::new();
    for (k, e) in entries {
        if e.flags & ENTRY_ORIG != 0 {
            flows.insert(k, vec![(k, e)]);
        } else {
            replies.push((k, e));
        }
    }
    for (k, e) in replies {
        if let Some(f) = flows.get_mut(&e.peer).filter(|f| f.len() == 1) {
            f.push((k, e));
        }
    }
    let found = flows.len();
    let mut by_age: Vec<Vec<(FlowTuple, FlowEntry)>> = flows.into_values().collect();
    // Newest first (a flow's last-seen time is the later of its entries'); the key breaks
    // ties.
    by_age.sort_by_key(|f| {
        let seen = f.iter().map(|(_, e)| e.last_seen).max().unwrap_or(0);
        std::cmp::Reverse((seen, f[0].0))
    });
    let mut used = 0;
    by_age.retain(|f| {
        let fits = used + f.len() <= capacity;
        if fits {
            used += f.len();
        }
        fits
    });
    let out = by_age.into_iter().rev().flatten().collect();
    (out, found)
}

fn copy_counters<V: aya::Pod>(
    dp: &mut Dataplane,
    pins: &PinDir,
    name: &'static str,
) -> Result<Copied, DataplaneError> {
    let old = PerCpuArray::<MapData, V>::try_from(open_pin(pins, name)?).map_err(map_err(name))?;
    let mut new = PerCpuArray::<_, V>::try_from(dp.map(name)?).map_err(map_err(name))?;
    let n = old.len().min(new.len());
    for i in 0..n {
        let v = old.get(&i, 0).map_err(map_err(name))?;
        new.set(i, v, 0).map_err(map_err(name))?;
    }
    Ok(Copied::Slots(n))
}

fn copy_nat(
    dp: &mut Dataplane,
    pins: &PinDir,
    name: &'static str,
) -> Result<Copied, DataplaneError> {
    let all = pinned_entries::<u32, NatValue>(pins, name)?;
    let mut new = dp.nat_map(name)?;
    for (k, v) in &all {
        new.insert(k, v, 0).map_err(map_err(name))?;
    }
    Ok(Copied::Entries(all.len()))
}

fn copy_flows(
    dp: &mut Dataplane,
    pins: &PinDir,
    name: &'static str,
    capacity: u32,
    how: Option<Convert>,
) -> Result<Copied, DataplaneError> {
    let all = pinned_flows(pins, name, how)?;
    let (keep, found) = newest_flows(all, capacity as usize);
    let mut new: HashMap<_, FlowTuple, FlowEntry> =
        HashMap::try_from(dp.map(name)?).map_err(map_err(name))?;
    for (k, e) in &keep {
        new.insert(k, e, 0).map_err(map_err(name))?;
    }
    // What is there now: an LRU short of room may have evicted some while they went in.
    let mut kept = 0;
    for kv in new.iter() {
        match kv {
            Ok((_, e)) if e.flags & ENTRY_ORIG != 0 => kept += 1,
            Ok(_) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(DataplaneError::Map { map: name, source }),
        }
    }
    Ok(Copied::Flows { kept, found })
}

/// Completes a load whose loader created each migrated map's new map under its staging pin:
/// fills the new maps from the pinned ones, then renames each staging pin over the old pin,
/// and says what it did. On an error the staging pins go: the old pins of the maps not yet
/// put in place stay as they were.
pub(super) fn finish(
    loaded: Result<Dataplane, DataplaneError>,
    pins: &PinDir,
    plan: &[(spec::MapSpec, Action)],
) -> Result<Dataplane, DataplaneError> {
    let done = loaded.and_then(|mut dp| {
        let copied = fill(&mut dp, pins, plan)?;
        put_in_place(pins, &copied)?;
        Ok(dp)
    });
    if done.is_err()
        && let Err(e) = clear_staging(pins)
    {
        log::warn!("{}", crate::report(&e));
    }
    done
}

/// A map filled from its pin: name, action and what was copied.
type Filled = (&'static str, Action, Copied);

fn fill(
    dp: &mut Dataplane,
    pins: &PinDir,
    plan: &[(spec::MapSpec, Action)],
) -> Result<Vec<Filled>, DataplaneError> {
    let mut done = Vec::new();
    for (m, a) in plan.iter().filter(|(_, a)| a.migrates()) {
        let copier = Copier::of(m.name).ok_or(DataplaneError::NoMigration(m.name))?;
        // Only flow tables have a conversion (yet).
        if a.convert().is_some() && copier != Copier::Flows {
            return Err(DataplaneError::NoMigration(m.name));
        }
        let copied = match copier {
            Copier::Stats => copy_counters::<Counter>(dp, pins, m.name)?,
            Copier::Events => copy_counters::<u64>(dp, pins, m.name)?,
            Copier::MappingStats => copy_counters::<MappingStats>(dp, pins, m.name)?,
            Copier::Nat => copy_nat(dp, pins, m.name)?,
            Copier::Flows => {
                let (Action::Entries { to, .. } | Action::Convert { to, .. }) = a else {
                    return Err(DataplaneError::NoMigration(m.name));
                };
                copy_flows(dp, pins, m.name, *to, a.convert())?
            }
        };
        done.push((m.name, *a, copied));
    }
    Ok(done)
}

fn put_in_place(pins: &PinDir, filled: &[Filled]) -> Result<(), DataplaneError> {
    for &(name, a, copied) in filled {
        let (from, to) = match a {
            Action::Counters { from, to }
            | Action::Entries { from, to }
            | Action::Convert { from, to, .. } => (from, to),
            Action::Create | Action::Adopt | Action::Keep { .. } => continue,
        };
        let (src, dst) = (staging(pins, name), pins.map(name));
        std::fs::rename(&src, &dst).map_err(|source| DataplaneError::Rename {
            from: src,
            to: dst.clone(),
            source,
        })?;
        if let (Action::Convert { layout, .. }, Copied::Flows { kept, found }) = (a, copied) {
            log_converted(name, layout, (from, to), kept, found);
            continue;
        }
        match copied {
            Copied::Slots(n) => log::info!(
                "migrated the pinned {name}: {from} -> {to} slots, the counts of {n} carried over"
            ),
            Copied::Entries(n) => {
                log::info!("migrated the pinned {name}: {from} -> {to} entries, {n} copied")
            }
            Copied::Flows { kept, found } if kept < found => log::warn!(
                "migrated the pinned {name}: {from} -> {to} entries, {kept} of {found} flow(s) \
                 copied, {} dropped (the least recently seen: the smaller table cannot hold \
                 them)",
                found - kept
            ),
            Copied::Flows { kept, .. } => log::info!(
                "migrated the pinned {name}: {from} -> {to} entries, {kept} flow(s) copied"
            ),
        }
    }
    Ok(())
}

/// Says what the conversion of the flow table `name` from `layout` carried over: `kept` of
/// `found` flows, the table resized `from` -> `to` entries.
fn log_converted(name: &str, layout: u32, (from, to): (u32, u32), kept: usize, found: usize) {
    let resized = if from == to {
        String::new()
    } else {
        format!(", {from} -> {to} entries")
    };
    if kept < found {
        log::warn!(
            "migrated the pinned {name} from layout {layout}: {kept} of {found} flow(s) \
             converted{resized}, {} dropped (the least recently seen: the smaller table cannot \
             hold them)",
            found - kept
        )
    } else {
        log::info!(
            "migrated the pinned {name} from layout {layout}: {kept} flow(s) converted{resized}"
        )
    }
}

#[cfg(test)]
mod tests {
    use nat_common::proto;

    use super::*;

    #[test]
    fn every_resizable_map_has_a_copier_for_its_value() {
        // A cache kept at its pinned capacity (`Resize::Keep`) is never copied.
        for m in spec::MAPS
            .iter()
            .filter(|m| matches!(m.resize, spec::Resize::Copy | spec::Resize::Counters))
        {
            let c = Copier::of(m.name).unwrap_or_else(|| panic!("no copier for {}", m.name));
            let size = match c {
                Copier::Stats => size_of::<Counter>(),
                Copier::Events => size_of::<u64>(),
                Copier::MappingStats => size_of::<MappingStats>(),
                Copier::Nat => size_of::<NatValue>(),
                Copier::Flows => size_of::<FlowEntry>(),
            };
            assert_eq!(size, m.value_size as usize, "{}", m.name);
        }
    }

    fn tuple(n: u16) -> FlowTuple {
        FlowTuple::new(1, 2, n, 80, proto::TCP)
    }

    /// A flow: its original entry (key `n`, last seen at `seen`) and its reply entry.
    fn flow(n: u16, seen: u64) -> [(FlowTuple, FlowEntry); 2] {
        let orig = FlowEntry {
            flags: ENTRY_ORIG,
            last_seen: seen,
            peer: tuple(1000 + n),
            ..FlowEntry::default()
        };
        let reply = FlowEntry {
            peer: tuple(n),
            ..FlowEntry::default()
        };
        [(tuple(n), orig), (tuple(1000 + n), reply)]
    }

    fn keys(v: &[(FlowTuple, FlowEntry)]) -> Vec<u16> {
        v.iter().map(|(k, _)| k.sport).collect()
    }

    #[test]
    fn a_smaller_table_keeps_the_newest_whole_flows() {
        let mut all: Vec<_> = [flow(1, 30), flow(2, 10), flow(3, 20)]
            .into_iter()
            .flatten()
            .collect();
        // A reply entry whose flow the LRU evicted.
        all.push((
            tuple(9),
            FlowEntry {
                peer: tuple(99),
                ..FlowEntry::default()
            },
        ));
        let (keep, found) = newest_flows(all.clone(), 100);
        assert_eq!(found, 3);
        assert_eq!(keys(&keep), [2, 1002, 3, 1003, 1, 1001], "oldest first");
        let (keep, found) = newest_flows(all.clone(), 5);
        assert_eq!((keys(&keep), found), (vec![3, 1003, 1, 1001], 3));
        let (keep, _) = newest_flows(all, 1);
        assert!(keep.is_empty(), "never half a flow: {keep:?}");
    }

    #[test]
    fn an_original_entry_without_its_reply_is_kept_alone() {
        let [orig, _] = flow(1, 5);
        let (keep, found) = newest_flows(vec![orig], 1);
        assert_eq!((keys(&keep), found), (vec![1], 1));
    }
}
