//! natd's side of the control API: accepts root clients only, reads one JSON request per line
//! (bounded), answers each with one JSON line. Malformed input gets an error reply, never a
//! crash.
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
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let daemon = daemon.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, daemon).await {
                            warn!("control connection: {e}");
                        }
                    });
                }
                Err(e) => warn!("control socket accept: {e}"),
            },
            _ = shutdown.changed() => break,
        }
    }
}

async fn reply(
    stream: &mut tokio::net::unix::WriteHalf<'_>,
    resp: &Response,
) -> std::io::Result<()> {
    let mut line = serde_json::to_string(resp).map_err(std::io::Error::other)?;
    line.push('\n');
    stream.write_all(line.as_bytes()).await
}

async fn connection(mut stream: UnixStream, daemon: Arc<Mutex<Daemon>>) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (rd, mut wr) = stream.split();
    if uid != 0 {
        let message = "permission denied: natd's control socket is for root only".to_string();
        return reply(&mut wr, &Response::Error { message }).await;
    }
    let mut rd = BufReader::new(rd);
    loop {
        let mut buf = Vec::new();
        let n = (&mut rd)
            .take(MAX_REQUEST as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Ok(());
        }
        if buf.len() > MAX_REQUEST {
            let message = format!("request longer than {MAX_REQUEST} bytes refused");
            return reply(&mut wr, &Response::Error { message }).await;
        }
        let resp = match serde_json::from_slice::<Request>(&buf) {
            Ok(req) => {
                info!(
                    "control request: {}",
                    serde_json::to_string(&req).unwrap_or_default()
                );
                daemon.lock().await.handle(req)
            }
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        };
        reply(&mut wr, &resp).await?;
    }
}
