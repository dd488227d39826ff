//! The XDP program under `BPF_PROG_TEST_RUN`, each test in a namespace of its own (topology in
//! `nat_tests::harness`): golden frames with hand-written expectations, and a differential
//! property test against the reference model (`nat_tests::model`).
//!
//! Needs root (namespaces, BPF); without it every test fails saying so. CI runs as root.
#[path = "testrun/common.rs"]
mod common;
#[path = "testrun/forwarded.rs"]
mod forwarded;
#[path = "testrun/passed.rs"]
mod passed;
#[path = "testrun/random.rs"]
mod random;
