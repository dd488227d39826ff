//! The bench's network namespaces: [`nat_testbed::Netns`] named `xsn-b-<pid>-<n>-<role>`,
//! each command in them bounded by [`util::COMMAND_TIMEOUT`], deleted when their guard drops
//! (also on error and after Ctrl-C). [`sweep_stale`] removes those of earlier runs whose
//! process is gone (killed with SIGKILL); nothing else is ever touched.
pub use nat_testbed::{Netns, mac_str};

use crate::util;

const PREFIX: &str = "xsn-b-";

/// A fresh unique name stem `xsn-b-<pid>-<n>`.
pub fn unique_stem() -> String {
    nat_testbed::unique_stem(PREFIX)
}

/// Creates namespace `name` with its loopback up.
pub fn create(name: String) -> anyhow::Result<Netns> {
    let ns = Netns::create_with_timeout(name, util::COMMAND_TIMEOUT)?;
    ns.ip(&["link", "set", "lo", "up"])?;
    Ok(ns)
}

/// Deletes bench namespaces (and bpffs pin directories) left by bench processes that no longer
/// exist.
pub fn sweep_stale() {
    for name in nat_testbed::netns::sweep_stale(PREFIX) {
        eprintln!("bench: removed namespace {name} left by an earlier run");
    }
}
