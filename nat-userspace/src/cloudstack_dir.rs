//! `natd --cloudstack-dir DIR`: applies each payload file dropped there once, in order. A file
//! is taken when its writer closes it (inotify `IN_CLOSE_WRITE`) or renames it into the
//! directory (`IN_MOVED_TO`), never while it is being written; the directory is also read once
//! at start, in name order, for files that arrived while natd was down. Hidden and `.tmp`
//! files are skipped.
//!
//! Which files were handled (applied or refused) is kept in the state directory, so a file is
//! never applied twice, across restarts too. A refused file (invalid input) is recorded with
//! its reason and not tried again. A file natd failed to apply (the fast path, the slow path
//! or persistence failed: nothing changed) is tried again with a back-off (1 s doubling up to
//! [`MAX_RETRY`]), and the files after it wait, so payloads still apply in order; a file whose
//! JSON ends early (its writer may still be at it, or wrote it in several goes) gets the same
//! few seconds before it is refused. If natd stops between applying a file and recording it,
//! the file is applied again at start: CloudStack payloads are idempotent (known rule ids are
//! kept, present mappings are no-ops).
use std::{
    collections::{BTreeMap, VecDeque},
    ffi::OsStr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use inotify::{EventMask, Inotify, WatchMask};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use tokio::{
    io::unix::AsyncFd,
    sync::{Mutex, watch},
    time::Instant,
};

use crate::{
    daemon::{Daemon, Payload},
    persist::{PersistError, write_atomic},
};

/// The first wait before a failed file is tried again; each failure doubles it.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two tries of a failed file.
pub const MAX_RETRY: Duration = Duration::from_secs(30);
/// Tries a file whose JSON ends early gets before it is refused as malformed.
const INCOMPLETE_TRIES: u32 = 3;
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

/// Whether a directory entry named `name` may be a payload (hidden and temporary files, which
/// a writer may still be filling, are not).
fn candidate(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.ends_with(".tmp")
}

/// Payload files in `dir` not yet handled, in name order.
pub fn pending(dir: &Path, record: &Record) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if candidate(&name) && e.file_type()?.is_file() && !record.files.contains_key(&name) {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// The files waiting to be handled, in order. Only the first is ever being handled; after a
/// failure it waits for its next try, and the others wait behind it.
#[derive(Debug, Default)]
struct Queue {
    names: VecDeque<String>,
    /// Failed tries of the first file and when it may be tried again.
    tries: u32,
    due: Option<Instant>,
}

impl Queue {
    /// Queues `name` unless it is queued already; a file that changed while it waits for its
    /// next try is tried again at once.
    fn push(&mut self, name: String) {
        if self.names.front() == Some(&name) {
            self.due = None;
        } else if !self.names.contains(&name) {
            self.names.push_back(name);
        }
    }

    /// The file to handle now, if any.
    fn next(&self, now: Instant) -> Option<&String> {
        match self.due {
            Some(due) if due > now => None,
            _ => self.names.front(),
        }
    }

    /// The first file is handled (applied, refused, or gone).
    fn done(&mut self) {
        self.names.pop_front();
        self.tries = 0;
        self.due = None;
    }

    /// The first file failed: returns how long it waits before its next try.
    fn failed(&mut self, now: Instant) -> Duration {
        let wait = FIRST_RETRY
            .saturating_mul(1 << self.tries.min(16))
            .min(MAX_RETRY);
        self.tries += 1;
        self.due = Some(now + wait);
        wait
    }

    /// When the first file's next try is due.
    fn deadline(&self) -> Option<Instant> {
        self.due.filter(|_| !self.names.is_empty())
    }
}

/// What handling one file came to.
enum Handled {
    /// Applied or refused: recorded, never tried again.
    Recorded(Outcome),
    /// Removed before natd read it: nothing to record.
    Gone,
    /// Not applied for a reason that may pass: try again later.
    Again(String),
}

/// Whether `text` is JSON that ends before its value does.
fn ends_early(text: &str) -> bool {
    matches!(serde_json::from_str::<serde_json::Value>(text), Err(e) if e.is_eof())
}

async fn handle(dir: &Path, name: &str, tries: u32, daemon: &Mutex<Daemon>) -> Handled {
    let path = dir.join(name);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Handled::Gone,
        Err(e) => return Handled::Again(format!("cannot read {}: {e}", path.display())),
    };
    if tries < INCOMPLETE_TRIES && ends_early(&text) {
        return Handled::Again(format!(
            "{name}: its JSON ends early ({} bytes), waiting for the rest",
            text.len()
        ));
    }
    match daemon.lock().await.apply_payload(name, &text) {
        Payload::Applied(message) => Handled::Recorded(Outcome {
            applied: true,
            message,
        }),
        // natd already logged a refusal with its reason.
        Payload::Refused(message) => Handled::Recorded(Outcome {
            applied: false,
            message,
        }),
        Payload::Failed(message) => Handled::Again(message),
    }
}

/// An inotify watch on the directory for files closed after writing or moved in.
pub struct Watcher {
    fd: AsyncFd<Inotify>,
    dir: PathBuf,
}

/// What one read of the watch gave.
enum Seen {
    Names(Vec<String>),
    /// The kernel's event queue overflowed: events were lost, the directory must be read.
    Overflow,
}

impl Watcher {
    /// Watches `dir`; needs the async runtime.
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        let inotify = Inotify::init()?;
        inotify
            .watches()
            .add(dir, WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO)?;
        // SAFETY: `Inotify` owns its descriptor, keeps it open until dropped and always
        // returns the same one; the `AsyncFd` owns the `Inotify`.
        let fd = unsafe { AsyncFd::register(inotify) }?;
        Ok(Self {
            fd,
            dir: dir.to_path_buf(),
        })
    }

    async fn next(&mut self, buf: &mut [u8]) -> std::io::Result<Seen> {
        loop {
            let mut guard = self.fd.readable_mut().await?;
            let read = guard.try_io(|fd| {
                let mut seen = Seen::Names(Vec::new());
                for e in fd.get_mut().read_events(buf)? {
                    if e.mask.contains(EventMask::Q_OVERFLOW) {
                        seen = Seen::Overflow;
                    } else if let (Seen::Names(names), Some(n)) = (&mut seen, e.name) {
                        names.push(OsStr::to_string_lossy(n).into_owned());
                    }
                }
                Ok(seen)
            });
            match read {
                Ok(r) => return r,
                // Spurious readiness: wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

/// Handles `initial` (the files [`pending`] found before natd served anyone: written while no
/// natd watched), then files as they come, until `stop` turns true.
pub async fn watch_dir(
    mut watcher: Watcher,
    initial: Vec<String>,
    state_dir: PathBuf,
    mut record: Record,
    daemon: Arc<Mutex<Daemon>>,
    mut stop: watch::Receiver<bool>,
) {
    let dir = watcher.dir.clone();
    info!(
        "applying CloudStack payloads written or moved into {}",
        dir.display()
    );
    let mut queue = Queue::default();
    let scan = |queue: &mut Queue, record: &Record| match pending(&dir, record) {
        Ok(names) => names.into_iter().for_each(|n| queue.push(n)),
        Err(e) => warn!("reading {}: {e}", dir.display()),
    };
    initial.into_iter().for_each(|n| queue.push(n));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(name) = queue.next(Instant::now()).cloned() {
            match handle(&dir, &name, queue.tries, &daemon).await {
                Handled::Recorded(outcome) => {
                    record.files.insert(name, outcome);
                    if let Err(e) = record.save(&state_dir) {
                        warn!("recording handled CloudStack files: {e}");
                    }
                    queue.done();
                }
                Handled::Gone => queue.done(),
                Handled::Again(why) => {
                    let wait = queue.failed(Instant::now());
                    let behind = queue.names.len() - 1;
                    warn!(
                        "{why}; trying {name} again in {wait:?} ({behind} file(s) wait behind it)"
                    );
                }
            }
        }
        let retry = async {
            match queue.deadline() {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            seen = watcher.next(&mut buf) => match seen {
                Ok(Seen::Names(names)) => {
                    for n in names {
                        if candidate(&n) && !record.files.contains_key(&n) {
                            queue.push(n);
                        }
                    }
                }
                Ok(Seen::Overflow) => {
                    warn!("inotify queue overflow on {}: reading the directory", dir.display());
                    scan(&mut queue, &record);
                }
                Err(e) => {
                    warn!("watching {}: {e}; reading the directory again in 1 s", dir.display());
                    tokio::time::sleep(FIRST_RETRY).await;
                    scan(&mut queue, &record);
                }
            },
            _ = retry => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_and_hold_the_files_behind() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        q.push("10.json".into());
        q.push("20.json".into());
        q.push("10.json".into());
        assert_eq!(q.names, ["10.json", "20.json"]);
        assert_eq!(q.next(t0).map(String::as_str), Some("10.json"));
        let waits: Vec<Duration> = (0..7).map(|_| q.failed(t0)).collect();
        let secs: Vec<u64> = waits.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30]);
        // While the first waits, nothing is handled, not even the file behind it.
        assert_eq!(q.next(t0), None);
        assert_eq!(q.deadline(), Some(t0 + MAX_RETRY));
        assert_eq!(q.next(t0 + MAX_RETRY).map(String::as_str), Some("10.json"));
        // Written again while it waits: tried at once.
        q.push("10.json".into());
        assert_eq!(q.next(t0).map(String::as_str), Some("10.json"));
        q.done();
        assert_eq!(q.tries, 0);
        assert_eq!(q.next(t0).map(String::as_str), Some("20.json"));
        q.done();
        assert_eq!(q.next(t0), None);
        assert_eq!(q.deadline(), None);
    }

    #[test]
    fn only_payload_names_and_complete_json() {
        assert!(candidate("10-staticnat.json"));
        assert!(!candidate(".10-staticnat.json"));
        assert!(!candidate("10-staticnat.json.tmp"));
        assert!(ends_early(r#"{"type":"firewallrules","rules":[{"id":1"#));
        assert!(!ends_early(r#"{"type":"firewallrules"}"#));
        assert!(!ends_early(r#"{"type":"firewallrules"}}"#));
    }
}
