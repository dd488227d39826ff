//! Adoption of an earlier natd's pinned maps: what the pins are (decided in [`plan`]), and
//! reading back what they hold.
use super::*;

/// The maps that are pinned: all but the per-CPU scratch space.
pub(super) fn pinned_maps() -> impl Iterator<Item = &'static spec::MapSpec> {
    spec::MAPS.iter().filter(|m| m.name != spec::SCRATCH.name)
}

/// What the kernel says of the map pinned at `path`.
fn shape(path: &Path) -> Result<plan::Shape, DataplaneError> {
    let err = |source| DataplaneError::ReadPin {
        path: path.to_path_buf(),
        source,
    };
    let info = MapInfo::from_pin(path).map_err(err)?;
    Ok(plan::Shape {
        kind: info.map_type().map_or(u32::MAX, |t| t as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: info.max_entries(),
        flags: info.map_flags(),
    })
}

/// Reads every pin an earlier natd left and decides what becomes of each map (see [`plan`]):
/// created (nothing pinned), adopted, migrated, or refused, naming every difference (type,
/// key and value size, capacity, flags, the layout version stamped in `META`) and what to run.
pub(super) fn read_pins(
    pins: &PinDir,
    sizes: &Sizes,
) -> Result<Vec<(spec::MapSpec, plan::Action)>, DataplaneError> {
    let mut pinned = Vec::new();
    for m in pinned_maps() {
        let path = pins.map(m.name);
        let found = if path.exists() {
            Some(shape(&path)?)
        } else {
            None
        };
        pinned.push(plan::Pinned {
            spec: *m,
            want_max: sizes.of(m.name).unwrap_or(m.max_entries),
            found,
        });
    }
    // The version is read only from a META of this layout's shape.
    let meta = pinned.iter().find(|p| p.spec.name == MAP_META);
    let version = match meta.and_then(|p| p.found) {
        Some(s) if s == plan::Shape::wanted(&spec::META, spec::META.max_entries) => {
            let path = pins.map(MAP_META);
            let err = |source| DataplaneError::ReadPin {
                path: path.clone(),
                source,
            };
            let m = aya::maps::Map::Array(MapData::from_pin(&path).map_err(err)?);
            Some(
                Array::<_, u32>::try_from(m)
                    .and_then(|a| a.get(&0, 0))
                    .map_err(err)?,
            )
        }
        _ => None,
    };
    plan::plan(&pinned, version).map_err(|r| DataplaneError::Refused {
        dir: pins.root().to_path_buf(),
        mismatches: r.mismatches,
        remedy: r.remedy,
    })
}

impl Dataplane {
    /// natd killed mid-change, which it removes) and every firewall entry, so a new natd can
    /// reconcile them with the desired state instead of starting from empty maps.
    pub fn installed(&mut self) -> Result<(DesiredState, Tables), DataplaneError> {
        let read = |dp: &mut Self, map| -> Result<BTreeMap<u32, NatValue>, DataplaneError> {
            let m = dp.nat_map(map)?;
            let mut out = BTreeMap::new();
            for kv in m.iter() {
                match kv {
                    Ok((k, v)) => {
                        out.insert(k, v);
                    }
                    Err(MapError::KeyNotFound) => {}
                    Err(source) => return Err(DataplaneError::Map { map, source }),
                }
            }
            Ok(out)
        };
        let nat_in = read(self, MAP_NAT_IN)?;
        let nat_out = read(self, MAP_NAT_OUT)?;
        let mut state = DesiredState::default();
        for (&p, v) in &nat_in {
            let m = Mapping {
                public: addr(p),
                private: addr(v.addr),
            };
            let whole = nat_out
                .get(&v.addr)
                .is_some_and(|o| o.addr == p && o.slot == v.slot);
            if whole && state.add_mapping(m).is_ok() {
                self.slots.restore(m.public, v.slot);
                continue;
            }
            log::warn!(
                "removing half-installed mapping {} -> {}",
                m.public,
                m.private
            );
            self.delete(MAP_NAT_IN, p)?;
        }
        for (&v, o) in &nat_out {
            if nat_in.get(&o.addr).is_none_or(|i| i.addr != v) {
                log::warn!(
                    "removing half-installed mapping {} -> {}",
                    addr(o.addr),
                    addr(v)
                );
                self.delete(MAP_NAT_OUT, v)?;
            }
        }
        let mut entries = std::collections::HashMap::new();
        for (k, b) in self.lpm_entries::<FwSrcData>(MAP_FW_SRC)? {
            let len = k.prefix_len().saturating_sub(FW_SRC_BASE_BITS) as u8;
            if let Some(c) = Cidr::new(k.data().source.into(), len) {
                entries.insert(Entry::FwSrc(k.data().public.into(), c), b);
            }
        }
        for (k, b) in self.lpm_entries::<FwSvcData>(MAP_FW_SVC)? {
            let d = k.data();
            let len = k.prefix_len().saturating_sub(FW_SVC_BASE_BITS) as u8;
            entries.insert(
                Entry::FwSvc(d.public.into(), d.proto, u16::from_be_bytes(d.service), len),
                b,
            );
        }
        for (k, b) in self.lpm_entries::<[u8; 4]>(MAP_EG_SRC)? {
            if let Some(c) = Cidr::new(k.data().into(), k.prefix_len() as u8) {
                entries.insert(Entry::EgSrc(c), b);
            }
        }
        for (k, b) in self.lpm_entries::<[u8; 4]>(MAP_EG_DST)? {
            if let Some(c) = Cidr::new(k.data().into(), k.prefix_len() as u8) {
                entries.insert(Entry::EgDst(c), b);
            }
        }
        for (k, b) in self.lpm_entries::<EgSvcData>(MAP_EG_SVC)? {
            let d = k.data();
            let e = match k.prefix_len() {
                0 => Entry::EgSvc(None, 0, 0),
                p => Entry::EgSvc(
                    Some(d.proto),
                    u16::from_be_bytes(d.service),
                    (p - EG_SVC_BASE_BITS) as u8,
                ),
            };
            entries.insert(e, b);
        }
        // Closed: a natd stopped while turning the default over; the entries are a mix of
        // both defaults' and the plan from these tables ends by writing the default.
        let mode = self.config()?.egress_default_deny;
        let egress_default_deny = mode != nat_common::EGRESS_ALLOW;
        state.set_egress_default_allow(!egress_default_deny);
        Ok((
            state,
            Tables {
                entries,
                egress_default_deny,
                egress_closed: mode == nat_common::EGRESS_CLOSED,
            },
        ))
    }

    fn lpm_entries<K: aya::Pod>(
        &mut self,
        map: &'static str,
    ) -> Result<Vec<(LpmKey<K>, RuleBits)>, DataplaneError> {
        let t = self.lpm::<K>(map)?;
        let mut out = Vec::new();
        for kv in t.iter() {
            match kv {
                Ok(kv) => out.push(kv),
                Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(DataplaneError::Map { map, source }),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The compiled object declares every map exactly as `nat_common::maps` does (the
    /// verifier accepts both programs too: loading them is part of `Dataplane::load`).
    #[test]
    fn the_object_matches_the_map_specs() {
        let sizes = Sizes {
            flows: 1024,
            mappings: 256,
        };
        let mut dp = Dataplane::load(sizes).unwrap_or_else(|e| panic!("{}", crate::report(&e)));
        let names: Vec<String> = dp.ebpf.maps().map(|(n, _)| n.to_string()).collect();
        for m in spec::MAPS {
            assert!(
                names.iter().any(|n| n == m.name),
                "no map {} in {names:?}",
                m.name
            );
            let map = dp.map(m.name).unwrap();
            let info = match map {
                aya::maps::Map::HashMap(d)
                | aya::maps::Map::LruHashMap(d)
                | aya::maps::Map::Array(d)
                | aya::maps::Map::PerCpuArray(d)
                | aya::maps::Map::LpmTrie(d)
                | aya::maps::Map::DevMapHash(d) => d.info().unwrap(),
                other => panic!("{}: unexpected map type {other:?}", m.name),
            };
            let want_max = sizes.of(m.name).unwrap_or(m.max_entries);
            assert_eq!(
                (
                    info.map_type().unwrap() as u32,
                    info.key_size(),
                    info.value_size(),
                    info.max_entries(),
                    info.map_flags(),
                ),
                (m.kind as u32, m.key_size, m.value_size, want_max, m.flags),
                "map {}",
                m.name
            );
        }
        // Besides `.rodata` (the program's globals, see `spec::SLOT_MASK_GLOBAL`), never pinned.
        let maps = names.iter().filter(|n| !n.starts_with('.')).count();
        assert_eq!(maps, spec::MAPS.len(), "{names:?}");
    }
}
