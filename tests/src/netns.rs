//! Hermetic network namespaces for tests: a uniquely named namespace (`xsn-t-<pid>-<n>`),
//! entered on the current thread only and left and deleted when the guard drops (also while
//! unwinding from a panic); see [`nat_testbed::EnteredNetns`]. Nothing outside the namespace
//! this guard created is touched.
//!
//! `BPF_PROG_TEST_RUN` resolves `ingress_ifindex` in the calling thread's namespace, so the
//! guard is `!Send`: it must be used, and dropped, on the thread that entered.
use std::ops::Deref;

use nat_testbed::{EnteredNetns, unique_stem};

/// A namespace this process created, entered on the current thread. Dereferences to the
/// [`nat_testbed::Netns`] for `ip -n`, `ip -batch` and commands.
pub struct NetnsGuard(EnteredNetns);

impl NetnsGuard {
    /// Creates a fresh namespace and moves the current thread into it.
    pub fn new() -> anyhow::Result<Self> {
        EnteredNetns::create(unique_stem("xsn-t-")).map(Self)
    }
}

impl Deref for NetnsGuard {
    type Target = EnteredNetns;

    fn deref(&self) -> &EnteredNetns {
        &self.0
    }
}
