//! `natd --cloudstack-dir DIR`: applies each new payload file dropped there once, in name
//! order. Which files were handled (applied or refused) is kept in the state directory, so a
//! file is never applied twice, across restarts too. If natd stops between applying a file and
//! recording it, the file is applied again at start: CloudStack payloads are idempotent (known
//! rule ids are kept, present mappings are no-ops).
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

use crate::{
    api::{Reply, Response},
    daemon::Daemon,
    persist::{PersistError, write_atomic},
};

/// How often the directory is looked at.
pub const POLL: std::time::Duration = std::time::Duration::from_secs(1);
const RECORD: &str = "cloudstack-processed.json";

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub applied: bool,
    pub message: String,
}

/// The record of handled files, by name.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Record {
    pub files: BTreeMap<String, Outcome>,
}

impl Record {
    pub fn load(state_dir: &Path) -> Result<Self, PersistError> {
        let path = state_dir.join(RECORD);
        match std::fs::read_to_string(&path) {
            Ok(t) => {
                serde_json::from_str(&t).map_err(|source| PersistError::Corrupt { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(PersistError::Io { path, source }),
        }
    }

    fn save(&self, state_dir: &Path) -> Result<(), PersistError> {
        let path = state_dir.join(RECORD);
        let data = serde_json::to_vec_pretty(self).map_err(|source| PersistError::Corrupt {
            path: path.clone(),
            source,
        })?;
        write_atomic(&path, &data)
    }
}

/// Payload files in `dir` not yet handled, in name order (hidden and temporary files, which
/// a writer may still be filling, are skipped).
fn pending(dir: &Path, record: &Record) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.ends_with(".tmp") || !e.file_type()?.is_file() {
            continue;
        }
        if !record.files.contains_key(&name) {
            out.push((name, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Handles new files until `stop` turns true.
pub async fn watch_dir(
    dir: PathBuf,
    state_dir: PathBuf,
    mut record: Record,
    daemon: Arc<Mutex<Daemon>>,
    mut stop: watch::Receiver<bool>,
) {
    info!("applying CloudStack payloads dropped in {}", dir.display());
    loop {
        match pending(&dir, &record) {
            Ok(files) => {
                for (name, path) in files {
                    let outcome = match std::fs::read_to_string(&path) {
                        Ok(text) => match daemon.lock().await.apply_cloudstack(&name, &text) {
                            Response::Ok(Reply::Done { message }) => Outcome {
                                applied: true,
                                message,
                            },
                            Response::Ok(other) => Outcome {
                                applied: false,
                                message: format!("{other:?}"),
                            },
                            Response::Error { message } => Outcome {
                                applied: false,
                                message,
                            },
                        },
                        Err(e) => Outcome {
                            applied: false,
                            message: format!("cannot read {}: {e}", path.display()),
                        },
                    };
                    // natd already logged a refusal with its reason.
                    record.files.insert(name, outcome);
                    if let Err(e) = record.save(&state_dir) {
                        warn!("recording handled CloudStack files: {e}");
                    }
                }
            }
            Err(e) => warn!("reading {}: {e}", dir.display()),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = stop.changed() => return,
        }
    }
}
