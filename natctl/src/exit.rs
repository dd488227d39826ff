//! What went wrong, and natctl's exit status for it: natd refused the request (1), natd failed
//! to carry it out (2), or natd was not reached (3). [`EXIT_STATUS`] documents them in
//! `--help`; the README's natctl section says the same.
use nat_api::{ErrorKind, Reply, Response, client::ClientError};

/// The exit statuses, as `natctl --help` lists them.
pub const EXIT_STATUS: &str = "\
Exit status:
  0  done
  1  refused: natd refused the request (bad input, or a conflict with a mapping or rule it
     holds; nothing changed, and the same request will be refused again), or natctl refused
     its arguments (a usage error, an unreadable file, not run as root)
  2  failed: natd could not carry out a valid request (the fast path, the nftables slow path,
     persistence or reading its maps failed); nothing changed, and trying again may succeed
  3  natd was not reached (not running, nothing listening on the socket) or its answer could
     not be read";

/// Why a command did not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Bad input or a conflict, natd's verdict or natctl's own.
    Refused(String),
    /// natd could not carry out a valid request.
    Failed(String),
    /// natd was not reached, or its answer not understood.
    Unreachable(String),
}

impl Error {
    /// natctl's exit status for this error.
    pub fn status(&self) -> u8 {
        match self {
            Error::Refused(_) => 1,
            Error::Failed(_) => 2,
            Error::Unreachable(_) => 3,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Error::Refused(m) | Error::Failed(m) | Error::Unreachable(m) => m,
        }
    }

    /// An answer of natd's that does not fit the request (a natd of another version).
    pub fn unexpected(reply: &Reply) -> Self {
        Error::Unreachable(format!("unexpected answer from natd: {reply:?}"))
    }
}

/// natd's reply, or the error its answer (or the lack of one) stands for.
pub fn reply_of(answer: Result<Response, ClientError>) -> Result<Reply, Error> {
    match answer {
        Ok(Response::Ok(reply)) => Ok(reply),
        Ok(Response::Error {
            message,
            kind: ErrorKind::Refused,
        }) => Err(Error::Refused(message)),
        Ok(Response::Error {
            message,
            kind: ErrorKind::Failed,
        }) => Err(Error::Failed(message)),
        // natd's socket is root's only: natd's own answer to anyone else is a refusal too.
        Err(e @ ClientError::PermissionDenied(_)) => Err(Error::Refused(e.to_string())),
        Err(e) => Err(Error::Unreachable(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn refusals_exit_1_failures_2_an_unreached_natd_3() {
        let status = |answer| reply_of(answer).map_err(|e| e.status());
        let done = Reply::Done {
            message: "ok".to_string(),
        };
        assert_eq!(status(Ok(Response::Ok(done.clone()))), Ok(done));
        assert_eq!(status(Ok(Response::refused("no".to_string()))), Err(1));
        assert_eq!(status(Ok(Response::failed("broken".to_string()))), Err(2));
        // An older natd's error, which does not say which it is: a refusal.
        let old = serde_json::from_str(r#"{"error":{"message":"no"}}"#).unwrap();
        assert_eq!(status(Ok(old)), Err(1));
        let socket = PathBuf::from("/run/natd.sock");
        assert_eq!(
            status(Err(ClientError::PermissionDenied(socket.clone()))),
            Err(1)
        );
        assert_eq!(status(Err(ClientError::NotRunning(socket.clone()))), Err(3));
        assert_eq!(status(Err(ClientError::Refused(socket))), Err(3));
        assert_eq!(status(Err(ClientError::NoAnswer)), Err(3));
    }

    #[test]
    fn the_message_is_natds() {
        let e = reply_of(Ok(Response::failed("mapping add failed".to_string())));
        assert_eq!(e.unwrap_err().message(), "mapping add failed");
    }
}
