//! Adoption of an earlier natd's pinned maps: layout checks, and reading back what they hold.
use super::*;

/// Key and value sizes of each map, as this natd's program declares them.
pub(super) fn expected_layout(name: &str) -> Option<(usize, usize)> {
    use std::mem::size_of;
    let lpm = |data: usize| 4 + data;
    Some(match name {
        MAP_NAT_IN | MAP_NAT_OUT => (size_of::<u32>(), size_of::<NatEntry>()),
        MAP_IFACES => (size_of::<u32>(), size_of::<IfaceConfig>()),
        MAP_STATS => (size_of::<u32>(), size_of::<Counter>()),
        MAP_EVENTS => (size_of::<u32>(), size_of::<u64>()),
        MAP_FW_SRC => (lpm(size_of::<FwSrcData>()), size_of::<RuleBits>()),
        MAP_FW_SVC => (lpm(size_of::<FwSvcData>()), size_of::<RuleBits>()),
        MAP_EG_SRC | MAP_EG_DST => (lpm(4), size_of::<RuleBits>()),
        MAP_EG_SVC => (lpm(size_of::<EgSvcData>()), size_of::<RuleBits>()),
        MAP_CONNTRACK => (size_of::<FlowKey>(), size_of::<FlowState>()),
        MAP_CONFIG => (size_of::<u32>(), size_of::<NatConfig>()),
        _ => return None,
    })
}

/// Checks that a pinned map left by an earlier natd has the layout this natd's program uses;
/// adopting one that does not would corrupt it.
pub(super) fn check_pinned(name: &str, path: &Path) -> Result<(), DataplaneError> {
    let info = MapInfo::from_pin(path).map_err(|source| DataplaneError::Adopt {
        path: path.to_path_buf(),
        why: source.to_string(),
    })?;
    let found = (info.key_size() as usize, info.value_size() as usize);
    match expected_layout(name) {
        Some(want) if want != found => Err(DataplaneError::Adopt {
            path: path.to_path_buf(),
            why: format!(
                "key/value size {}/{} but this natd's program needs {}/{}",
                found.0, found.1, want.0, want.1
            ),
        }),
        _ => Ok(()),
    }
}

impl Dataplane {
    /// natd killed mid-change, which it removes) and every firewall entry, so a new natd can
    /// reconcile them with the desired state instead of starting from empty maps.
    pub fn installed(&mut self) -> Result<(DesiredState, Tables), DataplaneError> {
        let read = |dp: &mut Self, map| -> Result<BTreeMap<u32, u32>, DataplaneError> {
            let m = dp.nat_map(map)?;
            let mut out = BTreeMap::new();
            for kv in m.iter() {
                match kv {
                    Ok((k, v)) => {
                        if let Some(e) = v.first() {
                            out.insert(k, e.addr);
                        }
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
        for (&p, &v) in &nat_in {
            let m = Mapping {
                public: addr(p),
                private: addr(v),
            };
            if nat_out.get(&v) == Some(&p) && state.add_mapping(m).is_ok() {
                continue;
            }
            log::warn!(
                "removing half-installed mapping {} -> {}",
                m.public,
                m.private
            );
            self.delete(MAP_NAT_IN, p)?;
        }
        for (&v, &p) in &nat_out {
            if nat_in.get(&p) != Some(&v) {
                log::warn!("removing half-installed mapping {} -> {}", addr(p), addr(v));
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
        let egress_default_deny = self.config()?.egress_default_deny != 0;
        state.set_egress_default_allow(!egress_default_deny);
        Ok((
            state,
            Tables {
                entries,
                egress_default_deny,
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
