//! natctl's side of the control API (blocking; one request per connection).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use crate::wire::{Request, Response};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("natd is not running (no control socket at {0})")]
    NotRunning(PathBuf),
    #[error("natd is not running (nothing listens on {0})")]
    Refused(PathBuf),
    #[error("permission denied: natd's control socket {0} is for root only (run natctl as root)")]
    PermissionDenied(PathBuf),
    #[error("talking to natd on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("natd closed the connection without answering")]
    NoAnswer,
    #[error("cannot understand natd's answer: {0}")]
    BadAnswer(serde_json::Error),
}

/// Sends one request and waits for its answer.
pub fn call(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    use std::io::ErrorKind;
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        ErrorKind::NotFound => ClientError::NotRunning(socket.into()),
        ErrorKind::ConnectionRefused => ClientError::Refused(socket.into()),
        ErrorKind::PermissionDenied => ClientError::PermissionDenied(socket.into()),
        _ => ClientError::Io {
            path: socket.into(),
            source: e,
        },
    })?;
    let io = |source| ClientError::Io {
        path: socket.into(),
        source,
    };
    let mut line = serde_json::to_string(req).map_err(ClientError::BadAnswer)?;
    line.push('\n');
    // natd may answer and close before reading all of a refused request (permission
    // denied): its answer is still there to read.
    if let Err(e) = stream.write_all(line.as_bytes())
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        return Err(io(e));
    }
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        return Err(ClientError::NoAnswer);
    }
    serde_json::from_str(&answer).map_err(ClientError::BadAnswer)
}
