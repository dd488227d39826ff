//! `natctl apply FILE...`: CloudStack payloads, in the order given, each all or nothing; the
//! first file refused or failed stops the rest (its error is natctl's exit status).
use std::path::{Path, PathBuf};

use nat_api::{Reply, Request};

use crate::{call, exit};

pub fn run(socket: &Path, files: &[PathBuf]) -> Result<(), exit::Error> {
    for f in files {
        let payload = std::fs::read_to_string(f)
            .map_err(|e| exit::Error::Refused(format!("cannot read {}: {e}", f.display())))?;
        let name = f.display().to_string();
        match call(socket, Request::CloudstackApply { name, payload })? {
            Reply::Done { message } => println!("{message}"),
            other => return Err(exit::Error::unexpected(&other)),
        }
    }
    Ok(())
}
