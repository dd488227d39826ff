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

/// The longest a request may take to arrive, however steadily its bytes come (a 64 MiB line
/// takes a fraction of it): a client dribbling bytes cannot hold a connection longer.
const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads one request line into `buf`, keeping at most `MAX_REQUEST + 1` bytes: its length
/// (0 at end of stream, more than `MAX_REQUEST` for a line over the limit, which is not read
/// further), or `None` if the client sent nothing for the idle time ([`IDLE`], or
/// [`IDLE_CROWDED`] in a crowd) or went past [`REQUEST_DEADLINE`]. Idle is counted from the
/// last bytes received, not from the request's start: a big request still arriving is not
/// cut off (a machine under load reads a 64 MiB line in more than a second).
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    rd: &mut R,
    buf: &mut Vec<u8>,
    open: &AtomicUsize,
) -> std::io::Result<Option<usize>> {
    let deadline = tokio::time::Instant::now() + REQUEST_DEADLINE;
    loop {
        let idle = if open.load(Ordering::Relaxed) > CROWD {
            IDLE_CROWDED
        } else {
            IDLE
        };
        let until = (tokio::time::Instant::now() + idle).min(deadline);
        let Ok(chunk) = tokio::time::timeout_at(until, rd.fill_buf()).await else {
            return Ok(None);
        };
        let chunk = chunk?;
        if chunk.is_empty() {
            return Ok(Some(buf.len()));
        }
        let room = MAX_REQUEST + 1 - buf.len();
        let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) if i < room => (i + 1, true),
            _ => (chunk.len().min(room), chunk.len() >= room),
        };
        buf.extend_from_slice(&chunk[..take]);
        rd.consume(take);
        if done {
            return Ok(Some(buf.len()));
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
        let Some(n) = read_request(&mut rd, &mut buf, open).await? else {
            return Ok(());
        };
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncWriteExt as _, BufReader, duplex};

    use super::*;

    /// Reads one request from a client that writes `chunks`, sleeping `gap` (virtual time)
    /// before each.
    async fn read_from(chunks: Vec<Vec<u8>>, gap: Duration) -> Option<Vec<u8>> {
        let (client, server) = duplex(1 << 16);
        let writer = tokio::spawn(async move {
            let mut client = client;
            for c in chunks {
                tokio::time::sleep(gap).await;
                if client.write_all(&c).await.is_err() {
                    return;
                }
            }
            // Keep the connection open: only the line's end (or the clock) ends the read.
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let mut rd = BufReader::new(server);
        let mut buf = Vec::new();
        let got = read_request(&mut rd, &mut buf, &AtomicUsize::new(1))
            .await
            .expect("reads");
        writer.abort();
        got.map(|n| buf[..n].to_vec())
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_still_arriving_is_not_cut_off_by_the_idle_time() {
        // Ten chunks 0.6 s apart: 6 s in all, each gap under the idle second.
        let mut chunks = vec![b"{\"command\":".to_vec()];
        chunks.extend((0..8).map(|_| b" ".to_vec()));
        chunks.push(b"\"stats\"}\n".to_vec());
        let line = read_from(chunks, Duration::from_millis(600)).await;
        assert_eq!(
            line.as_deref(),
            Some(&b"{\"command\":        \"stats\"}\n"[..])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_silent_for_the_idle_time_is_dropped() {
        let line = read_from(vec![b"{\"comm".to_vec()], Duration::from_millis(1500)).await;
        assert_eq!(line, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_dribbling_bytes_is_dropped_at_the_deadline() {
        // A byte every 0.5 s would never end without the deadline.
        let chunks = vec![b"a".to_vec(); 200];
        let start = tokio::time::Instant::now();
        assert_eq!(read_from(chunks, Duration::from_millis(500)).await, None);
        assert_eq!(start.elapsed(), REQUEST_DEADLINE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_line_over_the_limit_is_read_no_further_than_one_byte_past_it() {
        let line = read_from(
            vec![vec![b'x'; MAX_REQUEST], b"yz\n".to_vec()],
            Duration::ZERO,
        )
        .await
        .expect("a line");
        assert_eq!(line.len(), MAX_REQUEST + 1);
        assert_eq!(line.last(), Some(&b'y'));
    }
}
