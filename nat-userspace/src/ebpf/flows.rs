//! The flow table as natd sees it: every flow by its original entry (identity, state,
//! last-seen time), whole-flow removal (both entries), and the capacity.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::AsFd as _,
};

use nat_common::{
    ENTRY_LEARNED, ENTRY_ORIG, ENTRY_PENDING, FLOW_NAT, MAP_SLOTS, ORIGIN_GUEST,
    conntrack::{ASSURED, SEEN_REPLY, State},
};

use super::*;

/// What a [`Dataplane::sweep`] of the flow tables did and found.
#[derive(Debug, Default)]
pub struct Sweep {
    /// Flows removed.
    pub removed: usize,
    /// Flows looked at.
    pub seen: usize,
    /// The mapping counter slots the entries read name.
    pub counter_slots: BTreeSet<u32>,
}

/// One flow, from its original entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowView {
    /// The original direction's key and the reply direction's.
    pub key: FlowTuple,
    pub peer: FlowTuple,
    /// The flow in the guest's view.
    pub flow: FlowKey,
    pub state: State,
    /// The idle timer (`nat_common::conntrack::Timeout`) its last packet started.
    pub timer: u8,
    /// Assured (netfilter's `IPS_ASSURED`).
    pub assured: bool,
    /// CLOCK_MONOTONIC (ns) of its last packet, to about a second: the later of its two
    /// entries' (each direction refreshes its own).
    pub last_seen: u64,
    /// Not assured yet (in `PENDING`).
    pub pending: bool,
    /// A reply was seen.
    pub replied: bool,
    /// Opened by the tc learner from a packet the kernel translated.
    pub learned: bool,
    /// The mapping counter slot its entries count on.
    pub slot: u32,
}

impl FlowView {
    /// The public IP the flow is translated to or from: for a flow a guest opened to the
    /// public side, the destination of its reply direction (the P its answers come to); for a
    /// flow opened from the public side, and for hairpin, the destination of its original
    /// direction (the P it reached).
    pub fn public(&self) -> std::net::Ipv4Addr {
        let outbound = self.flow.kind == FLOW_NAT && self.flow.origin == ORIGIN_GUEST;
        addr(if outbound {
            self.peer.daddr
        } else {
            self.key.daddr
        })
    }

    /// The flow of original entry `e` keyed `key`; `reply_seen`: its reply entry's last-seen
    /// time (0 if it has none).
    fn of(key: FlowTuple, e: &FlowEntry, reply_seen: u64) -> Self {
        let pending = e.flags & ENTRY_PENDING != 0;
        FlowView {
            key,
            peer: e.peer,
            flow: e.flow,
            state: State::from_u8(e.state).unwrap_or(State::Other),
            timer: e.timer,
            assured: e.ct_flags & ASSURED != 0,
            last_seen: e.last_seen.max(reply_seen),
            pending,
            replied: e.ct_flags & SEEN_REPLY != 0,
            learned: e.flags & ENTRY_LEARNED != 0,
            slot: e.slot,
        }
    }
}

/// Reads every entry of one flow map (entries that vanish while we read are skipped); with
/// `slots`, `FLOWS` entries merged with their slots (what fast packets changed).
fn entries(
    dp: &mut Dataplane,
    map: &'static str,
    slots: Option<&SlotView>,
) -> Result<Vec<(FlowTuple, FlowEntry)>, DataplaneError> {
    let data = match dp.map(map)? {
        aya::maps::Map::LruHashMap(d) | aya::maps::Map::HashMap(d) => d,
        _ => return Err(DataplaneError::MissingMap(map)),
    };
    let mut out =
        super::batch::lookup_all::<FlowTuple, FlowEntry>(data.fd().as_fd()).map_err(|e| {
            DataplaneError::Map {
                map,
                source: MapError::IoError(e),
            }
        })?;
    if map == MAP_FLOWS
        && let Some(slots) = slots
    {
        for (k, e) in out.iter_mut() {
            *e = slots.merged(k, *e);
        }
    }
    Ok(out)
}

/// Removes `k`'s entry from `map`; a `FLOWS` entry's slot is emptied too (after the entry:
/// a packet that found the entry just before may still fill the slot, see `remove_flows`).
fn remove(
    dp: &mut Dataplane,
    slots: &SlotView,
    map: &'static str,
    k: &FlowTuple,
) -> Result<bool, DataplaneError> {
    let mut m: HashMap<_, FlowTuple, FlowEntry> =
        HashMap::try_from(dp.map(map)?).map_err(map_err(map))?;
    let removed = match m.remove(k) {
        Ok(()) => true,
        Err(MapError::KeyNotFound) => false,
        Err(source) => return Err(DataplaneError::Map { map, source }),
    };
    if map == MAP_FLOWS {
        slots.evict(k);
    }
    Ok(removed)
}

/// `k`'s entry in `map`, a `FLOWS` entry merged with its slot.
fn get(
    dp: &mut Dataplane,
    slots: &SlotView,
    map: &'static str,
    k: &FlowTuple,
) -> Result<Option<FlowEntry>, DataplaneError> {
    let m: HashMap<_, FlowTuple, FlowEntry> =
        HashMap::try_from(dp.map(map)?).map_err(map_err(map))?;
    let v = match m.get(k, 0) {
        Ok(v) => v,
        Err(MapError::KeyNotFound) => return Ok(None),
        Err(source) => return Err(DataplaneError::Map { map, source }),
    };
    if map == MAP_FLOWS {
        return Ok(Some(slots.merged(k, v)));
    }
    Ok(Some(v))
}

const TABLES: [(&str, bool); 2] = [(MAP_FLOWS, false), (MAP_PENDING, true)];

/// The last-seen time of every reply entry among `all`, by its key.
fn reply_seen(all: &[(FlowTuple, FlowEntry)]) -> BTreeMap<FlowTuple, u64> {
    all.iter()
        .filter(|(_, e)| e.flags & ENTRY_ORIG == 0)
        .map(|(k, e)| (*k, e.last_seen))
        .collect()
}

impl Dataplane {
    /// `SLOTS` mapped for reading: `FLOWS` entries are read merged with their slots (the
    /// program writes what fast packets change to the slot only, see `nat_common::Slot`).
    pub fn slot_view(&mut self) -> Result<SlotView, DataplaneError> {
        let map = match self.map(MAP_SLOTS)? {
            aya::maps::Map::Array(d) => d,
            _ => return Err(DataplaneError::MissingMap(MAP_SLOTS)),
        };
        Ok(SlotView::of(map)?)
    }

    /// The `FLOWS` entry keyed `k` as the program's full path would use it (merged with its
    /// slot), if there is one.
    pub fn flow_entry(&mut self, k: &FlowTuple) -> Result<Option<FlowEntry>, DataplaneError> {
        let slots = self.slot_view()?;
        get(self, &slots, MAP_FLOWS, k)
    }

    /// Every flow (its original entry), assured and pending.
    pub fn flows(&mut self) -> Result<Vec<FlowView>, DataplaneError> {
        let mut out = Vec::new();
        let slots = self.slot_view()?;
        for (map, _) in TABLES {
            let all = entries(self, map, Some(&slots))?;
            let seen = reply_seen(&all);
            for (k, e) in &all {
                if e.flags & ENTRY_ORIG != 0 {
                    out.push(FlowView::of(*k, e, seen.get(&e.peer).copied().unwrap_or(0)));
                }
            }
        }
        Ok(out)
    }

    /// Removes the flows `pred` selects (both entries), and entries left without their
    /// flow's other entry (the LRU evicted it). Each flow is read again right before its
    /// removal and `pred` asked again, so a flow re-created or refreshed while the table was
    /// walked is kept. Returns how many flows went and how many were looked at.
    pub fn remove_flows(
        &mut self,
        pred: impl Fn(&FlowView) -> bool,
    ) -> Result<(usize, usize), DataplaneError> {
        self.sweep(pred).map(|s| (s.removed, s.seen))
    }

    /// Removes the flows whose original key is among `keys` (both entries, their slots
    /// emptied), looked up one by one: for a few flows named from outside (the kernel ended
    /// them) without a walk of the tables. Returns how many flows went, and the keys of the
    /// entries removed, both directions, for [`Self::evict_slots`].
    pub fn remove_flows_keyed(
        &mut self,
        keys: &[FlowTuple],
    ) -> Result<(usize, Vec<FlowTuple>), DataplaneError> {
        let slots = self.slot_view()?;
        let mut flows = 0;
        let mut removed = Vec::new();
        for k in keys {
            for (map, _) in TABLES {
                let Some(e) = get(self, &slots, map, k)? else {
                    continue;
                };
                if e.flags & ENTRY_ORIG == 0 {
                    continue;
                }
                if remove(self, &slots, map, k)? {
                    flows += 1;
                    removed.push(*k);
                }
                if remove(self, &slots, map, &e.peer)? {
                    removed.push(e.peer);
                }
            }
        }
        Ok((flows, removed))
    }

    /// Empties the slots holding `keys` (entries removed a moment ago: a packet that found
    /// one just before its removal may have copied it into its slot after the removal emptied
    /// it); returns how many it emptied.
    pub fn evict_slots(&mut self, keys: &[FlowTuple]) -> Result<usize, DataplaneError> {
        let slots = self.slot_view()?;
        Ok(keys.iter().filter(|k| slots.evict(k)).count())
    }

    /// [`Self::remove_flows`], also returning the counter slots the entries it left name.
    pub fn sweep(&mut self, pred: impl Fn(&FlowView) -> bool) -> Result<Sweep, DataplaneError> {
        let mut removed = 0;
        let mut seen = 0;
        let mut counter_slots = BTreeSet::new();
        let slots = self.slot_view()?;
        for (map, _) in TABLES {
            // As stored, without the slots: a slot only makes a flow's last-seen time later, so a
            // flow the stored entries show live is live, and one they show expired is read
            // again merged with its slots (below) before it goes. Saves a random read of the
            // slot array per entry.
            let all = entries(self, map, None)?;
            // The counter slots every entry read names; those of entries removed below stay
            // (a slot is freed a pass later at most).
            counter_slots.extend(all.iter().map(|(_, e)| e.slot));
            let seen_of = reply_seen(&all);
            let origs: BTreeSet<FlowTuple> = all
                .iter()
                .filter(|(_, e)| e.flags & ENTRY_ORIG != 0)
                .map(|(k, _)| *k)
                .collect();
            for (k, e) in &all {
                if e.flags & ENTRY_ORIG == 0 {
                    // A reply entry whose flow is gone.
                    if !origs.contains(&e.peer) && get(self, &slots, map, &e.peer)?.is_none() {
                        remove(self, &slots, map, k)?;
                    }
                    continue;
                }
                seen += 1;
                let reply = seen_of.get(&e.peer).copied().unwrap_or(0);
                if !pred(&FlowView::of(*k, e, reply)) {
                    continue;
                }
                let Some(now) = get(self, &slots, map, k)? else {
                    continue;
                };
                let reply = get(self, &slots, map, &now.peer)?.map_or(0, |r| r.last_seen);
                if now.flags & ENTRY_ORIG == 0 || !pred(&FlowView::of(*k, &now, reply)) {
                    continue;
                }
                if remove(self, &slots, map, k)? {
                    removed += 1;
                }
                remove(self, &slots, map, &now.peer)?;
            }
        }
        // Every removed entry's slot was emptied (`remove`). A packet that found an entry
        // just before its removal may still have filled the slot after: that copy serves
        // until its refill (`Slot::REFILL_SECS`), and an expired flow's not even that long
        // (the established path's once-a-second check finds the flow gone). Callers that
        // end live flows (flush, flows the kernel ended) also bump the route generation,
        // which leaves every slot for the full path.
        Ok(Sweep {
            removed,
            seen,
            counter_slots,
        })
    }

    /// Frees the retired counter slots no entry names: `in_use`, the counter slots a
    /// [`Self::sweep`] found named. Returns how many it freed.
    pub fn recycle_slots(&mut self, in_use: &BTreeSet<u32>) -> usize {
        self.slots.recycle(in_use)
    }

    /// Capacity of the connection table in flows (assured ones; half as many more may be
    /// pending).
    pub fn conntrack_capacity(&mut self) -> Result<u32, DataplaneError> {
        Ok(self.sizes.flows)
    }

    /// Bumps the route generation: every flow resolves its route again on its next packet.
    pub fn bump_route_generation(&mut self) -> Result<u32, DataplaneError> {
        let mut cfg = self.config()?;
        cfg.route_gen = match cfg.route_gen.wrapping_add(1) {
            0 => 1,
            g => g,
        };
        self.write_config(&cfg)?;
        Ok(cfg.route_gen)
    }
}

#[cfg(test)]
mod tests {
    use nat_common::{FLOW_HAIRPIN, ORIGIN_PUBLIC, proto};

    use super::*;

    fn ip(s: &str) -> u32 {
        key(s.parse().unwrap())
    }

    fn view(key: FlowTuple, peer: FlowTuple, kind: u8, origin: u8) -> FlowView {
        FlowView {
            key,
            peer,
            flow: FlowKey {
                kind,
                origin,
                ..FlowKey::default()
            },
            state: State::Other,
            timer: 0,
            assured: false,
            last_seen: 0,
            pending: false,
            replied: false,
            learned: false,
            slot: 1,
        }
    }

    /// Each direction refreshes its own entry's last-seen time: the flow's is the later.
    #[test]
    fn a_flow_was_last_seen_when_either_direction_was() {
        let k = FlowTuple::new(1, 2, 3, 4, proto::UDP);
        let e = |last_seen| FlowEntry {
            flags: ENTRY_ORIG,
            last_seen,
            ..FlowEntry::default()
        };
        assert_eq!(FlowView::of(k, &e(5), 9).last_seen, 9);
        assert_eq!(FlowView::of(k, &e(9), 5).last_seen, 9);
        assert_eq!(FlowView::of(k, &e(9), 0).last_seen, 9);
    }

    #[test]
    fn a_flow_tells_its_public_ip_whichever_side_opened_it() {
        let (v, p, r) = (ip("10.0.0.10"), ip("203.0.113.10"), ip("198.51.100.2"));
        let t = |s, d| FlowTuple::new(s, d, 1, 2, proto::UDP);
        // A guest's flow: V -> R, answered R -> P.
        let out = view(t(v, r), t(r, p), FLOW_NAT, ORIGIN_GUEST);
        // A remote's flow: R -> P, answered V -> R.
        let inb = view(t(r, p), t(v, r), FLOW_NAT, ORIGIN_PUBLIC);
        // Hairpin: V2 -> P, answered V -> the router's guest address.
        let (v2, g) = (ip("10.0.0.20"), ip("10.0.0.1"));
        let hairpin = view(t(v2, p), t(v, g), FLOW_HAIRPIN, ORIGIN_GUEST);
        for f in [out, inb, hairpin] {
            assert_eq!(f.public(), addr(p), "{f:?}");
        }
    }
}
