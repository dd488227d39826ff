//! `natctl apply FILE...`: CloudStack payloads, in the order given, each all or nothing.
use std::path::{Path, PathBuf};

use nat_userspace::api::{Reply, Request};

use crate::call;

pub fn run(socket: &Path, files: &[PathBuf]) -> Result<(), String> {
    for f in files {
        let payload =
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?;
        let name = f.display().to_string();
        match call(socket, Request::CloudstackApply { name, payload })? {
            Reply::Done { message } => println!("{message}"),
            other => return Err(format!("unexpected answer from natd: {other:?}")),
        }
    }
    Ok(())
}
