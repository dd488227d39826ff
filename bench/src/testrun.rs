//! Per-packet cost of the project's XDP program with `BPF_PROG_TEST_RUN` (section 1).
//!
//! One namespace holds the topology below; the program is loaded with natd's own loader
//! ([`Dataplane`]) and its maps are written with natd's own writers (`FastPath::apply` of the
//! ops `tables::plan` computes), so the program runs exactly as natd installs it.
//!
//! ```text
//!  pub0 198.51.100.1/24 (PUBLIC) -- pub1   16.0.0.0/8 via 198.51.100.2 (permanent neighbour)
//!  gst0 10.0.0.1/24     (GUEST)  -- gst1   100.64.0.0/10 via 10.0.0.2 (permanent neighbour)
//!  oth0 (not in IFACES)          -- oth1
//! ```
//!
//! The program rewrites the frame and, with `repeat > 1`, sees its own output on the next
//! repetition (see TOOLCHAIN.md). Every mapping used here therefore points at another public
//! address routed out of the guest interface, so a translated frame is again an inbound frame
//! of the same kind: the hot pair `H0 -> H1 -> H0`, and a cycle `X0 -> X1 -> ... -> X0` over all
//! other mappings. The TTL decrements on every pass, so a run is at most 254 repetitions; runs
//! are chained (each starts where the last ended) and their kernel-measured times summed.
//! Established flows are opened by their first packets, sent through the program the same way
//! (guest request, reply, request: see [`setup::Bed::seed`]); the hot pair also has TCP
//! flows, opened by a three-way handshake (see [`tcp`]). Every measurement checks with
//! `STATS` and `EVENTS` that the intended path ran on every repetition.
pub mod measure;
pub mod report;
pub mod runs;
pub mod setup;
mod tcp;

pub use measure::{Plan, run};
