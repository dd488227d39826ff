//! What natd does with each map an earlier natd pinned, decided from what the kernel says of
//! the pins and what this natd's layout ([`spec::MAPS`], [`spec::LAYOUT_VERSION`]) and
//! configuration want: adopt it as it is, migrate it (a counter array, or a table natd sizes
//! at load, re-created at the wanted capacity; see [`spec::Resize`]; or a table of an
//! [`earlier`] layout, its entries converted), create it (a map added since that earlier
//! layout), or refuse to start with every difference named and what to run. Pure: every case
//! is tested here, without BPF.
use std::{fmt, path::Path};

use nat_common::maps::{self as spec, MapKind, MapSpec, Resize};

use super::earlier::{self, Convert};

/// A map as the kernel describes it (`struct bpf_map_info`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// `enum bpf_map_type`.
    pub kind: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    /// `BPF_F_*`.
    pub flags: u32,
}

impl Shape {
    /// What this natd wants of `m` at capacity `max_entries`.
    pub fn wanted(m: &MapSpec, max_entries: u32) -> Self {
        Shape {
            kind: m.kind as u32,
            key_size: m.key_size,
            value_size: m.value_size,
            max_entries,
            flags: m.flags,
        }
    }
}

/// One map of this natd's layout and what is pinned under its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pinned {
    pub spec: MapSpec,
    /// The capacity this natd wants (the spec's, or the configured one where natd sizes it).
    pub want_max: u32,
    /// The pinned map, `None` if nothing is pinned under the name.
    pub found: Option<Shape>,
}

/// What becomes of one map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing pinned: the loader creates and pins the map.
    Create,
    /// Pinned as wanted: used as it is.
    Adopt,
    /// A counter array of another capacity: re-created with `to` slots, the counts of the
    /// slots both have carried over.
    Counters { from: u32, to: u32 },
    /// A table natd sizes at load, of another capacity: re-created with room for `to`
    /// entries, the entries copied.
    Entries { from: u32, to: u32 },
    /// A cache of another capacity ([`Resize::Keep`]): used as it is, with its `kept`
    /// capacity; the configured `wanted` one applies when natd next creates the maps.
    Keep { kept: u32, wanted: u32 },
    /// A table of the earlier layout `layout` whose values changed: re-created with room for
    /// `to` entries (`from` pinned), each entry converted `how`.
    Convert {
        layout: u32,
        how: Convert,
        from: u32,
        to: u32,
    },
}

impl Action {
    /// Whether the map is re-created from the pinned one.
    pub fn migrates(self) -> bool {
        matches!(
            self,
            Action::Counters { .. } | Action::Entries { .. } | Action::Convert { .. }
        )
    }

    /// How the pinned map's entries are converted, `None` when they are of this layout.
    pub fn convert(self) -> Option<Convert> {
        match self {
            Action::Convert { how, .. } => Some(how),
            _ => None,
        }
    }
}

/// One difference between a pin and what this natd wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub map: &'static str,
    /// What differs: `type`, `key size`, `capacity`, `layout version`...
    pub what: &'static str,
    pub found: String,
    pub wanted: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} found {}, wanted {}",
            self.map, self.what, self.found, self.wanted
        )
    }
}

/// What the operator can do about a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Remedy {
    /// The pins are of another layout: run the build that made them, or start afresh.
    Afresh,
    /// `[limits] mappings` is below what the pinned mappings need.
    Mappings { at_least: u32 },
}

/// Why natd will not adopt the pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub mismatches: Vec<Mismatch>,
    pub remedy: Remedy,
}

/// The text of a refusal of the pins under `dir`.
pub fn refusal_text(dir: &Path, mismatches: &[Mismatch], remedy: &Remedy) -> String {
    let what: Vec<String> = mismatches.iter().map(ToString::to_string).collect();
    let dir = dir.display();
    let todo = match remedy {
        Remedy::Afresh => format!(
            "Either run the natd build that pinned them, or take the old fast path down and \
             start afresh, losing connection tracking and counters: remove {dir} (this \
             detaches its XDP program; or run the old build with --detach-on-exit and stop \
             it), then start this natd again"
        ),
        Remedy::Mappings { at_least } => format!(
            "Start natd with [limits] mappings of at least {at_least} (what the installed \
             mappings and the counter slots their flows use need), or remove mappings first"
        ),
    };
    format!(
        "cannot adopt the fast path pinned under {dir}: {}; natd changed nothing. {todo}",
        what.join("; ")
    )
}

/// The name of a kernel map type.
pub fn kind_name(raw: u32) -> String {
    [
        MapKind::Hash,
        MapKind::Array,
        MapKind::PerCpuArray,
        MapKind::LruHash,
        MapKind::LpmTrie,
        MapKind::DevMapHash,
    ]
    .into_iter()
    .find(|k| *k as u32 == raw)
    .map_or_else(|| format!("type-{raw}"), |k| k.name().to_string())
}

/// What becomes of one pinned map: adopted when it is as wanted, migrated when only its
/// capacity differs and its spec allows that, otherwise every difference.
pub fn decide(m: &MapSpec, found: Shape, want_max: u32) -> Result<Action, Vec<Mismatch>> {
    let want = Shape::wanted(m, want_max);
    let mut out = Vec::new();
    let mut differ = |what, found: String, wanted: String| {
        out.push(Mismatch {
            map: m.name,
            what,
            found,
            wanted,
        })
    };
    if found.kind != want.kind {
        differ("type", kind_name(found.kind), kind_name(want.kind));
    }
    if found.key_size != want.key_size {
        differ(
            "key size",
            found.key_size.to_string(),
            want.key_size.to_string(),
        );
    }
    if found.value_size != want.value_size {
        differ(
            "value size",
            found.value_size.to_string(),
            want.value_size.to_string(),
        );
    }
    if found.flags != want.flags {
        differ(
            "flags",
            format!("{:#x}", found.flags),
            format!("{:#x}", want.flags),
        );
    }
    let (from, to) = (found.max_entries, want.max_entries);
    if from != to && m.resize == Resize::Fixed {
        differ("capacity", from.to_string(), to.to_string());
    }
    // A cache's slot is its key's hash masked: any power of two up to the layout's most.
    if from != to && m.resize == Resize::Keep && !(from.is_power_of_two() && from <= m.max_entries)
    {
        differ(
            "capacity",
            from.to_string(),
            format!("{to}, or a power of two up to {}", m.max_entries),
        );
    }
    if !out.is_empty() {
        return Err(out);
    }
    Ok(match m.resize {
        _ if from == to => Action::Adopt,
        Resize::Counters => Action::Counters { from, to },
        Resize::Copy => Action::Entries { from, to },
        Resize::Keep => Action::Keep {
            kept: from,
            wanted: to,
        },
        Resize::Fixed => unreachable!("a fixed capacity that differs is a mismatch"),
    })
}

/// What becomes of a map of the earlier layout `from` that changed since (`c`): pinned as it
/// was, it is converted (resized too where the wanted capacity differs); pinned of this
/// layout's shape, it is the map a natd that stopped while migrating had put in place already
/// (`META` is stamped only once every map is), used as any other.
fn decide_changed(
    m: &MapSpec,
    found: Shape,
    want_max: u32,
    from: &earlier::Earlier,
    c: earlier::Changed,
) -> Result<Action, Vec<Mismatch>> {
    if found.value_size != c.value_size {
        return decide(m, found, want_max);
    }
    let old = MapSpec {
        value_size: c.value_size,
        ..*m
    };
    let (from_max, to) = match decide(&old, found, want_max)? {
        Action::Entries { from, to } | Action::Counters { from, to } => (from, to),
        _ => (found.max_entries, want_max),
    };
    Ok(Action::Convert {
        layout: from.version,
        how: c.how,
        from: from_max,
        to,
    })
}

/// What becomes of every map. Nothing pinned: all are created. Otherwise the pins must carry
/// this natd's layout version or one of an [`earlier`] layout natd upgrades from (`version`,
/// read from the pinned `META`; `None` when `META` is not pinned or cannot be read as this
/// layout's `META`), and every map must be pinned and adoptable or migratable (converted,
/// where an earlier layout's map changed since), except a map added since that earlier
/// layout, which is created where nothing is pinned; else the refusal names every difference.
pub fn plan(pinned: &[Pinned], version: Option<u32>) -> Result<Vec<(MapSpec, Action)>, Refusal> {
    if pinned.iter().all(|p| p.found.is_none()) {
        return Ok(pinned.iter().map(|p| (p.spec, Action::Create)).collect());
    }
    let afresh = |mismatches| Refusal {
        mismatches,
        remedy: Remedy::Afresh,
    };
    let meta_pinned = pinned
        .iter()
        .any(|p| p.spec.name == spec::META.name && p.found.is_some());
    let mut upgrade = None;
    match version {
        Some(v) if v == spec::LAYOUT_VERSION => {}
        Some(v) if earlier::of(v).is_some() => upgrade = earlier::of(v),
        // Of another layout, every difference follows from that one.
        Some(v) => {
            return Err(afresh(vec![Mismatch {
                map: spec::META.name,
                what: "layout version",
                found: match v {
                    0 => "0 (never stamped: the natd that pinned the maps stopped while starting)"
                        .into(),
                    v => v.to_string(),
                },
                wanted: spec::LAYOUT_VERSION.to_string(),
            }]));
        }
        None if !meta_pinned => {
            return Err(afresh(vec![Mismatch {
                map: spec::META.name,
                what: "layout version",
                found: "none (no META pinned: a natd from before layout versions)".into(),
                wanted: spec::LAYOUT_VERSION.to_string(),
            }]));
        }
        // A META of another shape: its mismatch is reported below.
        None => {}
    }
    let mut out = Vec::new();
    let mut mismatches = Vec::new();
    for p in pinned {
        let Some(found) = p.found else {
            if upgrade.is_some_and(|e| e.added(p.spec.name)) {
                out.push((p.spec, Action::Create));
                continue;
            }
            mismatches.push(Mismatch {
                map: p.spec.name,
                what: "pin",
                found: "none".into(),
                wanted: "one, as the other maps are pinned".into(),
            });
            continue;
        };
        let decided = match upgrade.and_then(|e| Some((e, e.changed(p.spec.name)?))) {
            Some((e, c)) => decide_changed(&p.spec, found, p.want_max, e, c),
            None => decide(&p.spec, found, p.want_max),
        };
        match decided {
            Ok(a) => out.push((p.spec, a)),
            Err(m) => mismatches.extend(m),
        }
    }
    if mismatches.is_empty() {
        Ok(out)
    } else {
        Err(afresh(mismatches))
    }
}

/// Whether mapping tables and counters of `want` capacity (`[limits] mappings`, smaller than
/// the pinned `found`) hold what the pins hold: `max_slot` is the highest counter slot a
/// mapping or a flow names, `entries` the most entries of `NAT_IN` and `NAT_OUT`.
pub fn mappings_fit(want: u32, found: u32, max_slot: u32, entries: u32) -> Result<(), Refusal> {
    let at_least = max_slot.saturating_add(1).max(entries).max(2);
    if want >= at_least {
        return Ok(());
    }
    Err(Refusal {
        mismatches: vec![Mismatch {
            map: spec::MAPPING_STATS.name,
            what: "capacity",
            found: format!(
                "{found} with {entries} mapping(s) installed and counter slot {max_slot} in use"
            ),
            wanted: format!("{want} ([limits] mappings)"),
        }],
        remedy: Remedy::Mappings { at_least },
    })
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
