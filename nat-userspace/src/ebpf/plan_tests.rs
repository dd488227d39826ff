//! Every case of [`super`]: what becomes of each pin, and the refusal's text.
use super::*;
use crate::ebpf::earlier::Convert;

fn shape(m: &MapSpec) -> Shape {
    Shape::wanted(m, m.max_entries)
}

/// Every map pinned as this natd's layout wants it, `META` with this layout's version.
fn all_as_wanted() -> Vec<Pinned> {
    super::super::adopt::pinned_maps()
        .map(|m| Pinned {
            spec: *m,
            want_max: m.max_entries,
            found: Some(shape(m)),
        })
        .collect()
}

fn with(mut all: Vec<Pinned>, name: &str, f: impl Fn(&mut Pinned)) -> Vec<Pinned> {
    for p in all.iter_mut().filter(|p| p.spec.name == name) {
        f(p);
    }
    all
}

fn actions(p: &[(MapSpec, Action)]) -> Vec<(&'static str, Action)> {
    p.iter()
        .filter(|(_, a)| *a != Action::Adopt)
        .map(|(m, a)| (m.name, *a))
        .collect()
}

const V: Option<u32> = Some(spec::LAYOUT_VERSION);

/// A refusal's mismatches as natd words them.
fn texts(r: &Refusal) -> Vec<String> {
    r.mismatches.iter().map(ToString::to_string).collect()
}

#[test]
fn nothing_pinned_creates_every_map_and_an_identical_layout_is_adopted() {
    let none: Vec<Pinned> = all_as_wanted()
        .into_iter()
        .map(|p| Pinned { found: None, ..p })
        .collect();
    let p = plan(&none, None).unwrap();
    assert!(p.iter().all(|(_, a)| *a == Action::Create), "{p:?}");
    let p = plan(&all_as_wanted(), V).unwrap();
    assert_eq!(actions(&p), []);
    assert_eq!(p.len(), spec::MAPS.len() - 1, "all but SCRATCH");
}

#[test]
fn counter_arrays_of_another_size_are_migrated() {
    let fewer = spec::STATS.max_entries - 3;
    let pins = with(all_as_wanted(), "STATS", |p| {
        p.found.as_mut().unwrap().max_entries = fewer
    });
    let pins = with(pins, "MAPPING_STATS", |p| p.want_max = 512);
    let p = plan(&pins, V).unwrap();
    assert_eq!(
        actions(&p),
        [
            (
                "MAPPING_STATS",
                Action::Counters {
                    from: spec::DEFAULT_MAPPINGS,
                    to: 512
                }
            ),
            (
                "STATS",
                Action::Counters {
                    from: fewer,
                    to: spec::STATS.max_entries
                }
            ),
        ]
    );
}

#[test]
fn tables_natd_sizes_are_migrated_to_the_configured_size() {
    let pins = with(all_as_wanted(), "FLOWS", |p| p.want_max = 2048);
    let pins = with(pins, "PENDING", |p| p.want_max = 1024);
    let pins = with(pins, "NAT_IN", |p| {
        p.found.as_mut().unwrap().max_entries = 256
    });
    let p = plan(&pins, V).unwrap();
    let from = spec::DEFAULT_MAPPINGS;
    assert_eq!(
        actions(&p),
        [
            (
                "NAT_IN",
                Action::Entries {
                    from: 256,
                    to: from
                }
            ),
            (
                "FLOWS",
                Action::Entries {
                    from: spec::FLOWS.max_entries,
                    to: 2048
                }
            ),
            (
                "PENDING",
                Action::Entries {
                    from: spec::PENDING.max_entries,
                    to: 1024
                }
            ),
        ]
    );
    assert!(p.iter().filter(|(_, a)| a.migrates()).count() == 3);
}

#[test]
fn another_key_or_value_size_type_or_flags_is_refused_naming_each_difference() {
    let pins = with(all_as_wanted(), "FLOWS", |p| {
        let f = p.found.as_mut().unwrap();
        f.value_size = 96;
        f.max_entries = 4;
    });
    let pins = with(pins, "EVENTS", |p| {
        let f = p.found.as_mut().unwrap();
        f.kind = MapKind::Array as u32;
        f.key_size = 8;
    });
    let pins = with(pins, "IFACES", |p| p.found.as_mut().unwrap().flags = 1);
    let r = plan(&pins, V).unwrap_err();
    assert_eq!(r.remedy, Remedy::Afresh);
    let text: Vec<String> = r.mismatches.iter().map(ToString::to_string).collect();
    let flows = spec::FLOWS.value_size;
    assert_eq!(
        text,
        [
            format!("FLOWS: value size found 96, wanted {flows}").as_str(),
            "IFACES: flags found 0x1, wanted 0x0",
            "EVENTS: type found array, wanted percpu_array",
            "EVENTS: key size found 8, wanted 4",
        ]
    );
    let msg = refusal_text(Path::new("/sys/fs/bpf/x"), &r.mismatches, &r.remedy);
    assert!(
        msg.starts_with(&format!(
            "cannot adopt the fast path pinned under /sys/fs/bpf/x: FLOWS: value size \
             found 96, wanted {flows}; IFACES: "
        )),
        "{msg}"
    );
    assert!(msg.contains("natd changed nothing"), "{msg}");
    assert!(msg.contains("remove /sys/fs/bpf/x"), "{msg}");
    assert!(msg.contains("--detach-on-exit"), "{msg}");
}

#[test]
fn a_fixed_capacity_that_differs_is_refused() {
    let pins = with(all_as_wanted(), "DEVMAP", |p| {
        p.found.as_mut().unwrap().max_entries = 32
    });
    let r = plan(&pins, V).unwrap_err();
    assert_eq!(texts(&r), ["DEVMAP: capacity found 32, wanted 64"]);
}

#[test]
fn another_layout_version_or_none_is_refused_whatever_the_maps() {
    // 1: before the earliest layout natd upgrades from; the next one: a newer natd's.
    for v in [1, spec::LAYOUT_VERSION + 1] {
        let r = plan(&all_as_wanted(), Some(v)).unwrap_err();
        assert_eq!(r.remedy, Remedy::Afresh);
        assert_eq!(
            r.mismatches
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            [format!(
                "META: layout version found {v}, wanted {}",
                spec::LAYOUT_VERSION
            )]
        );
    }
    let r = plan(&all_as_wanted(), Some(0)).unwrap_err();
    assert!(r.mismatches[0].found.contains("never stamped"), "{r:?}");
    // main's layout: CONNTRACK and no META; the maps of the same name look alike.
    let old = with(all_as_wanted(), "META", |p| p.found = None);
    let r = plan(&old, None).unwrap_err();
    assert_eq!(r.mismatches.len(), 1, "{r:?}");
    assert!(r.mismatches[0].found.starts_with("none"), "{r:?}");
    // A META of another shape: named, the version not read.
    let odd = with(all_as_wanted(), "META", |p| {
        p.found.as_mut().unwrap().value_size = 8
    });
    let r = plan(&odd, None).unwrap_err();
    assert_eq!(texts(&r), ["META: value size found 8, wanted 4"]);
}

#[test]
fn a_map_missing_among_pinned_ones_is_refused() {
    let pins = with(all_as_wanted(), "PENDING", |p| p.found = None);
    let r = plan(&pins, V).unwrap_err();
    assert_eq!(r.mismatches.len(), 1);
    assert_eq!(
        (r.mismatches[0].map, r.mismatches[0].what),
        ("PENDING", "pin")
    );
}

#[test]
fn fewer_mappings_are_refused_while_slots_beyond_are_in_use() {
    assert_eq!(mappings_fit(256, 65_536, 255, 200), Ok(()));
    let r = mappings_fit(256, 65_536, 300, 2).unwrap_err();
    assert_eq!(r.remedy, Remedy::Mappings { at_least: 301 });
    assert_eq!(
        r.mismatches[0].to_string(),
        "MAPPING_STATS: capacity found 65536 with 2 mapping(s) installed and counter slot \
         300 in use, wanted 256 ([limits] mappings)"
    );
    let r = mappings_fit(256, 65_536, 3, 400).unwrap_err();
    assert_eq!(r.remedy, Remedy::Mappings { at_least: 400 });
    let msg = refusal_text(Path::new("/p"), &r.mismatches, &r.remedy);
    assert!(
        msg.contains("Start natd with [limits] mappings of at least 400"),
        "{msg}"
    );
}

/// `EVENTS` of layouts 2 and 3: one counter short of this layout's (no `slot_hit`).
const EVENTS_3: u32 = spec::EVENTS.max_entries - 1;

/// Layout 3's pins: this layout's maps without `SLOTS`, `EVENTS` one counter shorter.
fn layout_3() -> Vec<Pinned> {
    let pins = with(all_as_wanted(), "SLOTS", |p| p.found = None);
    with(pins, "EVENTS", |p| {
        p.found.as_mut().unwrap().max_entries = EVENTS_3
    })
}

/// Layout 2's pins: layout 3's, but `FLOWS` and `PENDING` of 104-byte values.
fn layout_2() -> Vec<Pinned> {
    let v2 = |p: &mut Pinned| p.found.as_mut().unwrap().value_size = 104;
    with(with(layout_3(), "FLOWS", v2), "PENDING", v2)
}

/// What becomes of layout 2's and 3's `EVENTS`.
const EVENTS_UP: (&str, Action) = (
    "EVENTS",
    Action::Counters {
        from: EVENTS_3,
        to: spec::EVENTS.max_entries,
    },
);
const SLOTS_NEW: (&str, Action) = ("SLOTS", Action::Create);

#[test]
fn layout_3_gets_the_flow_cache_created_its_events_resized_and_the_rest_adopted() {
    let p = plan(&layout_3(), Some(3)).unwrap();
    assert_eq!(actions(&p), [EVENTS_UP, SLOTS_NEW]);
    assert_eq!(p.len(), spec::MAPS.len() - 1, "all but SCRATCH");
    // An upgrade that stopped after the loader created SLOTS (META still 3): adopted.
    let pins = with(layout_3(), "SLOTS", |p| p.found = Some(shape(&spec::SLOTS)));
    let p = plan(&pins, Some(3)).unwrap();
    assert_eq!(actions(&p), [EVENTS_UP]);
    // A SLOTS of another shape is not this layout's: refused.
    let pins = with(layout_3(), "SLOTS", |p| {
        p.found = Some(Shape {
            max_entries: 1000,
            ..shape(&spec::SLOTS)
        })
    });
    let r = plan(&pins, Some(3)).unwrap_err();
    assert_eq!(
        texts(&r),
        [format!(
            "SLOTS: capacity found 1000, wanted {0}, or a power of two up to {0}",
            spec::SLOT_COUNT
        )]
    );
}

#[test]
fn a_flow_cache_of_another_capacity_is_kept_as_pinned_if_the_program_can_mask_it() {
    // Smaller or larger than a new `[conntrack] size` asks for: kept, not re-created (its
    // slots hold what `FLOWS` does not yet).
    for (found, want) in [(1024, spec::SLOT_COUNT), (spec::SLOT_COUNT, 32_768)] {
        let pins = with(all_as_wanted(), "SLOTS", |p| {
            p.found.as_mut().unwrap().max_entries = found;
            p.want_max = want;
        });
        let p = plan(&pins, V).unwrap();
        assert_eq!(
            actions(&p),
            [(
                "SLOTS",
                Action::Keep {
                    kept: found,
                    wanted: want
                }
            )]
        );
        assert!(
            !Action::Keep {
                kept: found,
                wanted: want
            }
            .migrates()
        );
    }
    // A capacity the slot mask cannot cover, or beyond the layout's most: refused.
    for found in [3000, 2 * spec::SLOT_COUNT] {
        let pins = with(all_as_wanted(), "SLOTS", |p| {
            p.found.as_mut().unwrap().max_entries = found;
            p.want_max = 32_768;
        });
        let r = plan(&pins, V).unwrap_err();
        assert_eq!(
            texts(&r),
            [format!(
                "SLOTS: capacity found {found}, wanted 32768, or a power of two up to {}",
                spec::SLOT_COUNT
            )]
        );
    }
}

#[test]
fn a_map_of_this_layout_missing_from_its_own_pins_is_refused_naming_it() {
    let pins = with(all_as_wanted(), "SLOTS", |p| p.found = None);
    let r = plan(&pins, V).unwrap_err();
    assert_eq!(r.remedy, Remedy::Afresh);
    assert_eq!(
        texts(&r),
        ["SLOTS: pin found none, wanted one, as the other maps are pinned"]
    );
}

#[test]
fn only_maps_added_since_the_pinned_layout_may_be_missing() {
    // Layout 3 had PENDING: missing, it is refused as ever (SLOTS alone may be missing).
    let pins = with(layout_3(), "PENDING", |p| p.found = None);
    let r = plan(&pins, Some(3)).unwrap_err();
    assert_eq!(
        r.mismatches
            .iter()
            .map(|m| (m.map, m.what))
            .collect::<Vec<_>>(),
        [("PENDING", "pin")]
    );
}

fn convert_2(from: u32, to: u32) -> Action {
    Action::Convert {
        layout: 2,
        how: Convert::FlowEntryV2,
        from,
        to,
    }
}

#[test]
fn layout_2_converts_the_flow_tables_and_adopts_the_other_maps() {
    let (flows, pending) = (spec::FLOWS.max_entries, spec::PENDING.max_entries);
    let p = plan(&layout_2(), Some(2)).unwrap();
    assert_eq!(
        actions(&p),
        [
            ("FLOWS", convert_2(flows, flows)),
            ("PENDING", convert_2(pending, pending)),
            EVENTS_UP,
            SLOTS_NEW,
        ]
    );
    // Of the maps that migrate, only EVENTS (a counter array of layout 3's size) is not
    // converted.
    assert!(
        p.iter()
            .filter(|(m, _)| m.name != "EVENTS")
            .all(|(_, a)| a.migrates() == a.convert().is_some())
    );
    // Resized too where the configuration says so.
    let pins = with(layout_2(), "FLOWS", |p| p.want_max = 64);
    let pins = with(pins, "NAT_IN", |p| p.want_max = 512);
    let p = plan(&pins, Some(2)).unwrap();
    assert_eq!(
        actions(&p),
        [
            (
                "NAT_IN",
                Action::Entries {
                    from: spec::DEFAULT_MAPPINGS,
                    to: 512
                }
            ),
            ("FLOWS", convert_2(flows, 64)),
            ("PENDING", convert_2(pending, pending)),
            EVENTS_UP,
            SLOTS_NEW,
        ]
    );
}

#[test]
fn a_flow_table_a_stopped_upgrade_put_in_place_already_is_adopted() {
    // FLOWS renamed over its old pin, PENDING not yet, META still 2.
    let pins = with(layout_2(), "FLOWS", |p| {
        p.found.as_mut().unwrap().value_size = spec::FLOWS.value_size
    });
    let p = plan(&pins, Some(2)).unwrap();
    let pending = spec::PENDING.max_entries;
    assert_eq!(
        actions(&p),
        [
            ("PENDING", convert_2(pending, pending)),
            EVENTS_UP,
            SLOTS_NEW
        ]
    );
}

#[test]
fn layout_2_pins_of_another_shape_are_refused_naming_each_difference() {
    let pins = with(layout_2(), "FLOWS", |p| {
        p.found.as_mut().unwrap().value_size = 96
    });
    let pins = with(pins, "PENDING", |p| {
        p.found.as_mut().unwrap().kind = MapKind::Hash as u32
    });
    let pins = with(pins, "DEVMAP", |p| {
        p.found.as_mut().unwrap().max_entries = 32
    });
    let r = plan(&pins, Some(2)).unwrap_err();
    assert_eq!(r.remedy, Remedy::Afresh);
    assert_eq!(
        texts(&r),
        [
            format!(
                "FLOWS: value size found 96, wanted {}",
                spec::FLOWS.value_size
            ),
            "PENDING: type found hash, wanted lru_hash".to_string(),
            "DEVMAP: capacity found 32, wanted 64".to_string(),
        ]
    );
}
