//! natd's side of the control API: accepts root clients only, reads one JSON request per line
//! (bounded), answers each with one JSON line. Malformed input gets an error reply (refused),
//! never a crash.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use log::{info, warn};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Mutex, watch},
};

use super::{MAX_REQUEST, Request, Response};
use crate::daemon::Daemon;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another natd is already listening on {0}")]
    InUse(PathBuf),
    #[error("control socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the control socket: its directory is created root-only (0700), the socket is 0600, a
/// stale socket left by a dead natd is replaced, a live one is an error.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let io = |source| ServerError::Io {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.into()));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    daemon: Arc<Mutex<Daemon>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let daemon = daemon.clone();
                    let open = open.clone();
                    open.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, daemon, &open).await {
                            warn!("control connection: {e}");
                        }
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
                }
                Err(e) => {
                    // E.g. out of file descriptors: back off instead of spinning, while idle
                    // clients time out and free theirs.
                    warn!("control socket accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
}

/// A client that sends nothing for this long is disconnected (natctl sends its request at
/// once): idle clients cannot hold natd's file descriptors for long.
const IDLE: std::time::Duration = std::time::Duration::from_secs(1);
/// With more than [`CROWD`] clients connected, one idle for [`IDLE_CROWDED`] is dropped: a
/// crowd of idle clients (beyond what natd's file descriptors allow at once, the rest waiting
/// in the listen queue) is gone in a fraction of a second, not a second per batch.
const CROWD: usize = 8;
const IDLE_CROWDED: std::time::Duration = std::time::Duration::from_millis(100);
/// Pause after a failed accept.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

async fn reply(
    stream: &mut tokio::net::unix::WriteHalf<'_>,
    resp: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_string(resp).map_err(std::io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await
}

async fn connection(
    mut stream: UnixStream,
    daemon: Arc<Mutex<Daemon>>,
    open: &AtomicUsize,
) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (rd, mut wr) = stream.split();
    let mut rd = BufReader::new(rd);
    if uid != 0 {
        // Read (a bounded part of) the request first, so the client is not writing into a
        // closed socket and gets to read the answer.
        let mut sink = Vec::new();
        let mut head = (&mut rd).take(4096);
        let read = head.read_until(b'\n', &mut sink);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), read).await;
        let message = "permission denied: natd's control socket is for root only".to_string();
        return reply(&mut wr, &Response::refused(message)).await;
    }
    loop {
        let mut buf = Vec::new();
        let mut limited = (&mut rd).take(MAX_REQUEST as u64 + 1);
        let read = limited.read_until(b'\n', &mut buf);
        let idle = if open.load(Ordering::Relaxed) > CROWD {
            IDLE_CROWDED
        } else {
            IDLE
        };
        let Ok(n) = tokio::time::timeout(idle, read).await else {
            return Ok(());
        };
        let n = n?;
        if n == 0 {
            return Ok(());
        }
        if buf.len() > MAX_REQUEST {
            let message = format!("request longer than {MAX_REQUEST} bytes refused");
            return reply(&mut wr, &Response::refused(message)).await;
        }
        let resp = match serde_json::from_slice::<Request>(&buf) {
            Ok(req) => {
                info!("control request: {}", req.summary());
                daemon.lock().await.handle(req)
            }
            Err(e) => Response::refused(format!("malformed request: {e}")),
        };
        reply(&mut wr, &resp).await?;
    }
}
