//! The persisted desired state: one JSON file under `--state-dir`, written atomically (temp
//! file, fsync, rename, fsync of the directory) after every accepted change and restored at
//! start. A file that cannot be read or validated is an error, never an empty configuration.
use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    firewall::{EgressRule, IngressRule},
    state::{DesiredState, Mapping, Slotted, StateError},
};

/// Default `--state-dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/xdp-static-nat";
const FILE: &str = "state.json";
const VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt (not the JSON natd writes): {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state file {path} has version {found}, this natd reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("state file {path} describes an invalid state: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: StateError,
    },
}

/// What the file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub version: u32,
    /// Changes applied over natd's lifetimes.
    pub generation: u64,
    /// When the last change was applied (seconds since the epoch).
    pub applied_at: u64,
    pub mappings: Vec<Mapping>,
    pub ingress: Vec<Slotted<IngressRule>>,
    pub egress_default_allow: bool,
    pub egress: Vec<Slotted<EgressRule>>,
    /// CloudStack's egress exception rules: the default each was added under, by id (absent
    /// in files written before natd kept it: every rule then acts under any default).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub egress_under: BTreeMap<u64, bool>,
    /// CloudStack's default egress rules held, by id: their policy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub egress_defaults: BTreeMap<u64, bool>,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Snapshot {
    pub fn of(state: &DesiredState, generation: u64, applied_at: u64) -> Self {
        Snapshot {
            version: VERSION,
            generation,
            applied_at,
            mappings: state.mappings().collect(),
            ingress: state.ingress_rules().cloned().collect(),
            egress_default_allow: state.egress_default_allow(),
            egress: state.egress_rules().cloned().collect(),
            egress_under: state.egress_under().clone(),
            egress_defaults: state.egress_defaults().clone(),
        }
    }

    pub fn state(&self) -> Result<DesiredState, StateError> {
        DesiredState::from_parts(
            &self.mappings,
            &self.ingress,
            self.egress_default_allow,
            &self.egress,
            &self.egress_under,
            &self.egress_defaults,
        )
    }
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Creates the directory (0700) if needed.
    pub fn ensure(&self) -> Result<(), PersistError> {
        let io = |source| PersistError::Io {
            path: self.dir.clone(),
            source,
        };
        if !self.dir.exists() {
            fs::create_dir_all(&self.dir).map_err(io)?;
            fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        Ok(())
    }

    /// The persisted snapshot and its state, or `None` if natd never saved one here.
    pub fn load(&self) -> Result<Option<(Snapshot, DesiredState)>, PersistError> {
        let path = self.file();
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(PersistError::Io { path, source }),
        };
        let snap: Snapshot =
            serde_json::from_slice(&text).map_err(|source| PersistError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if snap.version != VERSION {
            return Err(PersistError::Version {
                path,
                found: snap.version,
            });
        }
        let state = snap
            .state()
            .map_err(|source| PersistError::Invalid { path, source })?;
        Ok(Some((snap, state)))
    }

    /// Writes `snap` atomically: readers see the old file or the new one, never a mixture.
    pub fn save(&self, snap: &Snapshot) -> Result<(), PersistError> {
        let data = serde_json::to_vec_pretty(snap).map_err(|source| PersistError::Corrupt {
            path: self.file(),
            source,
        })?;
        write_atomic(&self.file(), &data)
    }
}

/// Writes `data` to `path` through a temp file in the same directory (mode 0600), fsyncs it,
/// renames it over `path` and fsyncs the directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), PersistError> {
    let io = |source| PersistError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("state"),
        std::process::id()
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io)?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cidr::Cidr,
        firewall::{Proto, Service},
    };

    fn state() -> DesiredState {
        let mut s = DesiredState::default();
        let p = "203.0.113.10".parse().unwrap();
        s.add_mapping(Mapping {
            public: p,
            private: "10.0.0.10".parse().unwrap(),
        })
        .unwrap();
        let tcp = Service {
            proto: Proto::Tcp,
            ports: Some("22".parse().unwrap()),
            icmp_type: None,
            icmp_code: None,
        };
        let udp = Service {
            proto: Proto::Udp,
            ..tcp.clone()
        };
        let a = s.add_ingress(Some(7), p, tcp.clone(), vec![]).unwrap();
        s.add_ingress(Some(9), p, udp, vec![]).unwrap();
        s.remove_ingress(a).unwrap(); // rule 9 keeps slot 1 while slot 0 is free
        s.set_egress_default_allow(false);
        s.add_egress(None, tcp, vec!["192.0.2.0/24".parse().unwrap()])
            .unwrap();
        s
    }

    #[test]
    fn round_trip_keeps_ids_and_slots() {
        let dir = std::env::temp_dir().join(format!("xsn-persist-{}", std::process::id()));
        let sd = StateDir::new(&dir);
        sd.ensure().unwrap();
        assert!(sd.load().unwrap().is_none());
        let s = state();
        sd.save(&Snapshot::of(&s, 5, 123)).unwrap();
        let (snap, back) = sd.load().unwrap().unwrap();
        assert_eq!(back, s);
        assert_eq!(snap.generation, 5);
        assert_eq!(back.ingress_rules().next().unwrap().slot, 1);
        let mode = fs::metadata(sd.file()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        fs::write(sd.file(), b"{\"version\": 1, \"generation\": ").unwrap();
        let e = sd.load().unwrap_err();
        assert!(e.to_string().contains("corrupt"), "{e}");
        let mut bad = Snapshot::of(&s, 1, 1);
        bad.ingress[0].slot = nat_common::MAX_RULES_PER_IP;
        sd.save(&bad).unwrap();
        assert!(matches!(sd.load(), Err(PersistError::Invalid { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A state written before egress rules had sources loads with every rule for every guest,
    /// and one with rules of an unmapped IP (inactive) loads as it was.
    #[test]
    fn older_and_inactive_states_load() {
        let dir = std::env::temp_dir().join(format!("xsn-persist-old-{}", std::process::id()));
        let sd = StateDir::new(&dir);
        sd.ensure().unwrap();
        let mut s = state();
        s.remove_mapping("203.0.113.10".parse().unwrap()).unwrap();
        assert_eq!(s.active_ingress_rules().count(), 0);
        sd.save(&Snapshot::of(&s, 2, 3)).unwrap();
        assert_eq!(sd.load().unwrap().unwrap().1, s);
        let mut json: serde_json::Value =
            serde_json::from_slice(&fs::read(sd.file()).unwrap()).unwrap();
        for r in json["egress"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("sources").unwrap();
        }
        fs::write(sd.file(), serde_json::to_vec(&json).unwrap()).unwrap();
        let (_, back) = sd.load().unwrap().unwrap();
        assert_eq!(back, s);
        assert!(back.egress_rules().all(|r| r.rule.sources == [Cidr::ANY]));
        fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod cloudstack_egress_tests {
    use super::*;
    use crate::firewall::{Proto, Service};

    /// CloudStack's egress rules keep the policy each came with and the default rules held
    /// across a restart (the default and which rules act follow from them); a file written
    /// before natd kept them loads with every rule in force under the default it names.
    #[test]
    fn egress_policies_and_default_rules_survive_a_restart() {
        let dir = std::env::temp_dir().join(format!("xsn-persist-cs-{}", std::process::id()));
        let sd = StateDir::new(&dir);
        sd.ensure().unwrap();
        let svc = |proto| Service {
            proto,
            ports: None,
            icmp_type: None,
            icmp_code: None,
        };
        let mut s = DesiredState::default();
        let to = vec!["192.0.2.0/24".parse().unwrap()];
        s.add_egress_under(23, svc(Proto::Udp), to.clone(), vec![], true)
            .unwrap();
        // A repeat of rule 23 under another id, and a rule under the other policy.
        s.add_egress_under(24, svc(Proto::Udp), to.clone(), vec![], true)
            .unwrap();
        s.add_egress_under(25, svc(Proto::Tcp), to, vec![], false)
            .unwrap();
        s.add_egress_default(0, true).unwrap();
        let active =
            |s: &DesiredState| -> Vec<u64> { s.active_egress_rules().map(|r| r.rule.id).collect() };
        assert_eq!(active(&s), [23, 24]);
        sd.save(&Snapshot::of(&s, 1, 1)).unwrap();
        let (_, back) = sd.load().unwrap().unwrap();
        assert_eq!(back, s);
        assert_eq!(active(&back), [23, 24]);

        let mut json: serde_json::Value =
            serde_json::from_slice(&fs::read(sd.file()).unwrap()).unwrap();
        let obj = json.as_object_mut().unwrap();
        obj.remove("egress_under").unwrap();
        obj.remove("egress_defaults").unwrap();
        // (natd refused repeated rules then.)
        let egress = obj["egress"].as_array_mut().unwrap();
        egress.retain(|r| r["id"] != 24);
        assert_eq!(egress.len(), 2);
        fs::write(sd.file(), serde_json::to_vec(&json).unwrap()).unwrap();
        let (_, old) = sd.load().unwrap().unwrap();
        assert!(old.egress_default_allow());
        assert_eq!(active(&old), [23, 25]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
