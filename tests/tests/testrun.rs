//! The XDP program under `BPF_PROG_TEST_RUN`, each test in a namespace of its own (topology in
//! `nat_tests::harness`): golden frames with hand-written expectations (translation, pass
//! reasons, firewall and egress rules, connection tracking, hairpin), and differential property tests
//! against the reference model (`nat_tests::model`): random frames, random firewall
//! scenarios, and random route scenarios (route, neighbour and mapping changes between
//! packets).
//!
//! Needs root (namespaces, BPF); without it every test fails saying so. CI runs as root.
#[path = "testrun/common.rs"]
mod common;
#[path = "testrun/conntrack.rs"]
mod conntrack;
#[path = "testrun/firewall.rs"]
mod firewall;
#[path = "testrun/forwarded.rs"]
mod forwarded;
#[path = "testrun/hairpin.rs"]
mod hairpin;
#[path = "testrun/hairpin_edges.rs"]
mod hairpin_edges;
#[path = "testrun/passed.rs"]
mod passed;
#[path = "testrun/random.rs"]
mod random;
#[path = "testrun/routes.rs"]
mod routes;
#[path = "testrun/scenarios.rs"]
mod scenarios;
#[path = "testrun/slots.rs"]
mod slots;
