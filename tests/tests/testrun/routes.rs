//! Differential property test of the flow cache's routes: random route scenarios (see
//! `nat_tests::scenario::route_scenario`: established flows through an open policy, their
//! packets both ways, and between them neighbours moving to another link-layer address or
//! deleted, the remote network moving to another gateway, one without neighbour or one behind
//! an interface natd does not manage, natd's generation bumps, mappings removed and installed
//! again). After every frame program and model must agree on verdict, reason, bytes,
//! counters and events, and hold the same flow entries, each with the route and generation it
//! was resolved under ([`crate::scenarios::play`]). Watched from those entries: a direction
//! whose route was resolved and whose next packet after a bump resolves it again (and takes a
//! new next hop when there is one), goes to the kernel when its neighbour is gone, and then
//! takes the established path again.
//!
//! `NAT_PROPTEST_CASES` sets the size (route scenarios = 2.5 % of it, 500 by default).
use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    time::Instant,
};

use nat_common::{Reason, TIMEOUT_SLOTS};
use nat_tests::{
    harness::{Harness, TEST_TIMEOUT_NS, allow_all, env, env::Change},
    model::{DirView, Outcome, Path, Tuple, XDP_REDIRECT},
    reliability::Figures,
    scenario::route_scenario,
};
use proptest::test_runner::{TestCaseError, TestRunner};

use crate::{
    common::*,
    random::{cases_from_env, config},
    scenarios::{Coverage, play},
};

/// Most steps of a route scenario after its flows opened.
const MAX_STEPS: usize = 40;

/// What the changes of the surroundings led to, from the flow entries before and after each
/// frame.
#[derive(Default)]
pub struct RouteCoverage {
    /// Changes applied, and how many of them were generation bumps.
    pub changes: u32,
    pub bumps: u32,
    /// Frames whose direction had a route and resolved it again under a newer generation.
    pub re_resolved: u32,
    /// ... and got another next hop (egress interface or destination MAC).
    pub new_next_hop: u32,
    /// Frames of a direction with a route that went to the kernel for want of a neighbour
    /// when they resolved it again.
    pub no_neighbour: u32,
    /// Frames on the established path of a direction that had resolved its route again.
    pub fast_again: u32,
    /// Frames forwarded by a flow whose mapping was removed.
    pub unmapped_forwarded: u32,
}

impl fmt::Display for RouteCoverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} changes ({} generation bumps); {} frames resolved their route again ({} to \
             another next hop), {} went to the kernel for want of a neighbour, {} took the \
             established path after resolving again; {} forwarded by flows of a removed \
             mapping",
            self.changes,
            self.bumps,
            self.re_resolved,
            self.new_next_hop,
            self.no_neighbour,
            self.fast_again,
            self.unmapped_forwarded
        )
    }
}

/// The flow-table key of a frame (TCP/UDP/UDP-Lite/DCCP ports, an ICMP query's identifier and type, other
/// protocols none), read as the program does; `None` if it has none.
fn key_of(f: &[u8]) -> Option<Tuple> {
    if f.len() < 42 || f[12..14] != [8, 0] || f[14] != 0x45 {
        return None;
    }
    let be = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
    let addr = |at: usize| Ipv4Addr::new(f[at], f[at + 1], f[at + 2], f[at + 3]);
    let (sport, dport) = match f[23] {
        6 | 17 | 33 | 136 => (be(34), be(36)),
        1 if matches!(f[34], 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18) => (be(38), u16::from(f[34])),
        1 => return None,
        _ => (0, 0),
    };
    Some(Tuple {
        saddr: addr(26),
        daddr: addr(30),
        sport,
        dport,
        proto: f[23],
    })
}

/// One scenario's view of the flow entries between frames.
pub struct Watch {
    before: BTreeMap<Tuple, DirView>,
    /// Directions that resolved their route again.
    re_resolved: BTreeSet<Tuple>,
    /// Public and private addresses of removed mappings.
    gone: BTreeSet<Ipv4Addr>,
}

impl Watch {
    pub fn new(h: &Harness) -> Self {
        Watch {
            before: h.model_seen().entries,
            re_resolved: BTreeSet::new(),
            gone: BTreeSet::new(),
        }
    }

    pub fn changed(&mut self, r: &mut RouteCoverage, change: &Change) {
        r.changes += 1;
        match *change {
            Change::Bump => r.bumps += 1,
            Change::MappingGone(p) => {
                self.gone.insert(p);
                self.gone.extend(env::private_of(p));
            }
            Change::MappingBack(p) => {
                self.gone.remove(&p);
                if let Some(v) = env::private_of(p) {
                    self.gone.remove(&v);
                }
            }
            _ => {}
        }
    }

    /// After a frame program and model agreed on (so the model's entries are the
    /// program's).
    pub fn framed(
        &mut self,
        r: &mut RouteCoverage,
        h: &Harness,
        frame: &[u8],
        path: Option<Path>,
        got: &Outcome,
    ) {
        let after = h.model_seen().entries;
        if let Some(k) = key_of(frame) {
            let (was, now) = (self.before.get(&k), after.get(&k));
            // `route.4` is the generation the route was resolved under (0: never).
            if let (Some(was), Some(now)) = (was, now)
                && was.route.4 != 0
                && now.route.4 != was.route.4
            {
                r.re_resolved += 1;
                if (now.route.0, now.route.2) != (was.route.0, was.route.2) {
                    r.new_next_hop += 1;
                }
                self.re_resolved.insert(k);
            }
            if was.is_some_and(|w| w.route.4 != 0)
                && path == Some(Path::Established)
                && got.reason == Reason::NoNeighbour
            {
                r.no_neighbour += 1;
            }
            if path == Some(Path::Fast) && self.re_resolved.contains(&k) {
                r.fast_again += 1;
            }
        }
        if got.action == XDP_REDIRECT && got.counted.is_some_and(|(_, a)| self.gone.contains(&a)) {
            r.unmapped_forwarded += 1;
        }
        self.before = after;
    }
}

#[test]
fn route_changes_match_model() {
    let h = harness();
    let scenarios = cases_from_env() / 40;
    let mut fig = Figures::new("differential");
    fig.set(
        "route scenarios planned (NAT_PROPTEST_CASES / 40)",
        u64::from(scenarios),
    );
    let cov = RefCell::new(Coverage::default());
    let start = Instant::now();
    let (config, seed) = config(scenarios);
    let result = TestRunner::new(config).run(&route_scenario(MAX_STEPS), |sc| {
        let setup = || -> anyhow::Result<()> {
            h.reset_env()?;
            h.set_policy(&allow_all())?;
            h.set_timeouts([TEST_TIMEOUT_NS; TIMEOUT_SLOTS])?;
            h.clear_flows()
        };
        setup().map_err(|e| TestCaseError::fail(format!("setup: {e:#}")))?;
        let mut c = cov.borrow_mut();
        c.scenarios += 1;
        play(&h, &mut c, &sc.actions(&h.topo))
    });
    let elapsed = start.elapsed();
    let c = cov.into_inner();
    fig.set(
        "route scenarios run through program and model",
        u64::from(c.scenarios),
    );
    fig.set(
        "route scenario frames run through program and model (tables compared after each)",
        u64::from(c.frames),
    );
    if let Err(e) = result {
        panic!("{e}\nreplay with PROPTEST_RNG_SEED={seed} (and the same NAT_PROPTEST_CASES)");
    }
    let reasons: Vec<_> = c
        .reasons
        .iter()
        .map(|(r, n)| format!("{}={n}", r.name()))
        .collect();
    let paths: Vec<_> = c
        .paths
        .iter()
        .map(|((leg, p), n)| format!("{leg:?} {p:?}={n}"))
        .collect();
    eprintln!(
        "{} route scenarios, {} frames in {elapsed:.1?}\n  paths: {}\n  reasons: {}\n  \
         surroundings: {}",
        c.scenarios,
        c.frames,
        paths.join(", "),
        reasons.join(" "),
        c.routes
    );
    if scenarios >= 100 {
        let r = &c.routes;
        let thin: Vec<_> = [
            ("re-resolved routes", r.re_resolved),
            ("re-resolved to another next hop", r.new_next_hop),
            (
                "stale routes sent to the kernel for want of a neighbour",
                r.no_neighbour,
            ),
            ("established path after re-resolving", r.fast_again),
            (
                "frames forwarded by flows of a removed mapping",
                r.unmapped_forwarded,
            ),
        ]
        .into_iter()
        .filter(|(_, n)| *n < 20)
        .collect();
        assert!(thin.is_empty(), "route scenarios rarely reached {thin:?}");
    }
    fig.done();
}
