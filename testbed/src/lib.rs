//! Test infrastructure shared by `tests/`, `bench/` and `cargo xtask demo`: network namespaces
//! this process creates (unique names, deleted on drop also while unwinding, entered on a
//! thread or for one closure, `ip`/`ip -batch`/`sysctl`/commands inside, link and neighbour
//! lookups, a sweep of namespaces left by dead processes), the client/router/guest topology
//! that the end-to-end tests and the demo share, a command runner with a time bound, process
//! guards (a child stopped and reaped on drop, its output in a log file), scratch directories
//! and MAC address helpers.
//!
//! Nothing here touches what this process did not create (except [`netns::sweep_stale`],
//! which removes only names carrying the caller's prefix and the pid of a process that no
//! longer exists). It depends on std, anyhow, libc and serde_json only, so `xtask` builds it
//! on stable with no BPF toolchain.
pub mod cmd;
pub mod mac;
pub mod netns;
pub mod process;
pub mod scratch;
pub mod topology;

pub use cmd::{CmdOutput, describe, run_bounded, run_bounded_input};
pub use mac::{mac_str, parse_mac};
pub use netns::{EnteredNetns, Netns, unique_stem};
pub use process::{Process, Stopped, binary};
pub use scratch::ScratchDir;
