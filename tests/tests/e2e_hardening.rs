//! End to end, hardening: natd under hostile input, faults and exhaustion. Same topology and
//! ground rules as `e2e.rs` (each test has its own namespaces and natd, removed when it ends;
//! root needed). Each test reports what it did (faults injected, flows flooded, packets lost)
//! for `RELIABILITY.md` through `nat_tests::reliability`.
#[path = "e2e_hardening/common.rs"]
mod common;
#[path = "e2e_hardening/defaults.rs"]
mod defaults;
#[path = "e2e_hardening/exhaustion.rs"]
mod exhaustion;
#[path = "e2e_hardening/faults.rs"]
mod faults;
#[path = "e2e_hardening/hostile.rs"]
mod hostile;
#[path = "e2e_hardening/links.rs"]
mod links;
