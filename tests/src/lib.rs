//! Test support for the XDP static NAT: namespaces, a frame builder, the reference model, the
//! `BPF_PROG_TEST_RUN` harness, the random frame and firewall-scenario strategies, and the
//! figures robustness tests report for `RELIABILITY.md`. The tests themselves live in
//! `tests/tests/`.
pub mod harness;
pub mod model;
pub mod netns;
pub mod packet;
pub mod reliability;
pub mod scenario;
pub mod strategy;
pub mod topology;
