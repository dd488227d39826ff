//! The earlier map layouts natd upgrades from without a restart of the fast path: for each
//! layout version, the maps whose values changed since and how to convert their entries, and
//! the maps added since (created empty, as on a first start); the other maps of that layout
//! are this layout's, adopted or resized as usual. Pins of a layout not listed here are
//! refused ([`super::plan`]). The value types of earlier layouts live here, not in
//! nat-common, which holds only the current layout.
//!
//! The layouts, and what each bump changed:
//! - 2 -> 3: `FLOWS` and `PENDING` values gained the TCP window fields (`seq_end`,
//!   `max_ack`): entries converted ([`FlowEntryV2`]).
//! - 3 -> 4: `SLOTS` added (the flow cache in front of `FLOWS`, written by the
//!   program only: created empty, its slots fill as packets come); `EVENTS` one counter longer
//!   (`slot_hit`, appended), which its [`nat_common::maps::Resize::Counters`] migration
//!   re-creates with the pinned counts carried over, as for any build with other events.
//! - 4 -> 5: a key may live in the other slot of its pair in `SLOTS` (`nat_common::other_slot`).
//!   Nothing to convert: a layout-4 program fills only a key's own slot, which this layout
//!   reads first. The bump keeps a layout-4 natd from adopting this layout's pins: its
//!   program would never empty a key's copy in the other slot, which this layout's program
//!   would later merge into `FLOWS` over the newer state.
//!
//! Adding a bump: describe the old values here (a `#[repr(C)]` struct with a size assertion and
//! a conversion to the new one), add a [`Convert`] variant read by
//! [`super::migrate`], and list the changed maps under the old version; list a new map under
//! every earlier version as added. Conversions of older layouts go straight to the current
//! values.
use nat_common::{FlowEntry, FlowKey, FlowTuple, MAP_FLOWS, MAP_PENDING, MAP_SLOTS};

/// How the entries of a changed map are converted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Convert {
    /// `FLOWS` and `PENDING` of layout 2: [`FlowEntryV2`] -> [`FlowEntry`].
    FlowEntryV2,
}

/// A map whose values changed since an earlier layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Changed {
    pub map: &'static str,
    /// The value size the map had in that layout (its type, key size and flags are this
    /// layout's).
    pub value_size: u32,
    pub how: Convert,
}

/// An earlier layout natd upgrades from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Earlier {
    pub version: u32,
    pub changed: &'static [Changed],
    /// Maps of this layout that layout `version` did not have: not pinned, they are created.
    pub added: &'static [&'static str],
}

impl Earlier {
    /// How `map` of this layout is converted, `None` when it is unchanged.
    pub fn changed(&self, map: &str) -> Option<Changed> {
        self.changed.iter().find(|c| c.map == map).copied()
    }

    /// Whether `map` was added since this layout.
    pub fn added(&self, map: &str) -> bool {
        self.added.contains(&map)
    }
}

const V2_FLOW_SIZE: u32 = size_of::<FlowEntryV2>() as u32;

/// Every earlier layout natd upgrades from.
pub const EARLIER: &[Earlier] = &[
    Earlier {
        version: 2,
        changed: &[
            Changed {
                map: MAP_FLOWS,
                value_size: V2_FLOW_SIZE,
                how: Convert::FlowEntryV2,
            },
            Changed {
                map: MAP_PENDING,
                value_size: V2_FLOW_SIZE,
                how: Convert::FlowEntryV2,
            },
        ],
        added: &[MAP_SLOTS],
    },
    Earlier {
        version: 3,
        changed: &[],
        added: &[MAP_SLOTS],
    },
    Earlier {
        version: 4,
        changed: &[],
        added: &[],
    },
];

/// The earlier layout of `version`, if natd upgrades from it.
pub fn of(version: u32) -> Option<&'static Earlier> {
    EARLIER.iter().find(|e| e.version == version)
}

/// [`FlowEntry`] of layout 2: the same fields without `seq_end` and `max_ack` (layout 3
/// inserted them after `last_seen`). See [`FlowEntry`] for what each field holds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntryV2 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub ip_delta: u16,
    pub l4_delta: u16,
    pub in_ifindex: u32,
    pub out_ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
    pub mtu: u16,
    pub l4_csum: u8,
    pub flags: u8,
    pub route_gen: u32,
    pub slot: u32,
    pub reason: u8,
    pub counter: u8,
    pub state: u8,
    pub ct_flags: u8,
    pub timer: u8,
    pub _pad: [u8; 3],
    pub seen: u64,
    pub last_seen: u64,
    pub peer: FlowTuple,
    pub flow: FlowKey,
}
const _: () = assert!(size_of::<FlowEntryV2>() == 104);

// SAFETY: `#[repr(C)]`, every field plain data, no implicit padding (104 bytes, the sum of
// the fields'), as `FlowEntry` is.
unsafe impl aya::Pod for FlowEntryV2 {}

impl From<FlowEntryV2> for FlowEntry {
    /// Every field as it was. `seq_end` and `max_ack` stay 0 with their flags (`ENTRY_SEQ`,
    /// `ENTRY_ACKED`) clear, as layout 2 never set them: the window check takes the flow's
    /// window as not known yet, until its next segments note it.
    fn from(e: FlowEntryV2) -> Self {
        FlowEntry {
            saddr: e.saddr,
            daddr: e.daddr,
            sport: e.sport,
            dport: e.dport,
            ip_delta: e.ip_delta,
            l4_delta: e.l4_delta,
            in_ifindex: e.in_ifindex,
            out_ifindex: e.out_ifindex,
            dmac: e.dmac,
            smac: e.smac,
            mtu: e.mtu,
            l4_csum: e.l4_csum,
            flags: e.flags,
            route_gen: e.route_gen,
            slot: e.slot,
            reason: e.reason,
            counter: e.counter,
            state: e.state,
            ct_flags: e.ct_flags,
            timer: e.timer,
            _pad: e._pad,
            seen: e.seen,
            last_seen: e.last_seen,
            peer: e.peer,
            flow: e.flow,
            ..FlowEntry::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use nat_common::{ENTRY_ACKED, ENTRY_SEQ, maps as spec};

    use super::*;

    #[test]
    fn only_earlier_layouts_are_listed_and_only_maps_of_this_layout() {
        for e in EARLIER {
            assert!(e.version < spec::LAYOUT_VERSION, "{e:?}");
            for c in e.changed {
                let m = spec::MAPS.iter().find(|m| m.name == c.map);
                let m = m.unwrap_or_else(|| panic!("no map {}", c.map));
                assert_ne!(m.value_size, c.value_size, "{} did not change", c.map);
                assert!(!e.added(c.map), "{} both changed and added", c.map);
            }
            for a in e.added {
                assert!(
                    super::super::adopt::pinned_maps().any(|m| m.name == *a),
                    "no pinned map {a}"
                );
            }
        }
    }

    /// A map added since a layout is added since every layout before it too.
    #[test]
    fn a_map_added_since_a_layout_is_added_since_every_earlier_one() {
        for e in EARLIER {
            for older in EARLIER.iter().filter(|o| o.version < e.version) {
                for a in e.added {
                    assert!(older.added(a), "layout {} lacks {a} too", older.version);
                }
            }
        }
    }

    /// Layout 2's offsets, as its `FlowEntry` had them (the fields before `last_seen` are
    /// where layout 3 has them).
    #[test]
    fn the_v2_entry_has_layout_2s_offsets() {
        assert_eq!(offset_of!(FlowEntryV2, last_seen), 64);
        assert_eq!(offset_of!(FlowEntry, last_seen), 64);
        assert_eq!(offset_of!(FlowEntryV2, peer), 72);
        assert_eq!(offset_of!(FlowEntryV2, flow), 88);
    }

    #[test]
    fn a_v2_entry_converts_field_by_field_with_no_window_known() {
        let v2 = FlowEntryV2 {
            saddr: 1,
            daddr: 2,
            sport: 3,
            dport: 4,
            ip_delta: 5,
            l4_delta: 6,
            in_ifindex: 7,
            out_ifindex: 8,
            dmac: [9; 6],
            smac: [10; 6],
            mtu: 11,
            l4_csum: 12,
            flags: 13,
            route_gen: 14,
            slot: 15,
            reason: 16,
            counter: 17,
            state: 18,
            ct_flags: 19,
            timer: 20,
            _pad: [0; 3],
            seen: 21,
            last_seen: 22,
            peer: FlowTuple::new(23, 24, 25, 26, 6),
            flow: FlowKey {
                guest: 27,
                remote: 28,
                guest_port: 29,
                remote_port: 30,
                proto: 6,
                kind: 1,
                origin: 2,
                _pad: 0,
            },
        };
        let e = FlowEntry::from(v2);
        // The bytes up to `last_seen`'s end are the same, and so are `peer` and `flow`.
        let (old, new) = (aya_bytes(&v2), aya_bytes(&e));
        let (was, is) = (offset_of!(FlowEntryV2, peer), offset_of!(FlowEntry, peer));
        assert_eq!(old[..was], new[..was]);
        assert_eq!(old[was..], new[is..]);
        assert_eq!(e.peer, v2.peer);
        assert_eq!((e.seq_end, e.max_ack), (0, 0));
        assert_eq!(e.flags & (ENTRY_SEQ | ENTRY_ACKED), 0);
    }

    fn aya_bytes<T: aya::Pod>(v: &T) -> Vec<u8> {
        // SAFETY: `Pod` values are plain bytes without padding.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }
}
