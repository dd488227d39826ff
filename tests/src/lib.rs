//! Test support for the XDP static NAT: namespaces, a frame builder, the reference model and
//! the `BPF_PROG_TEST_RUN` harness. The tests themselves live in `tests/tests/`.
pub mod harness;
pub mod model;
pub mod netns;
pub mod packet;
pub mod strategy;
pub mod topology;
