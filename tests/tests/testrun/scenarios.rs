//! Differential property test of the policy stage: random firewall scenarios (see
//! `nat_tests::scenario`: random ingress rules, egress policy and conntrack timeouts, then
//! packets that open flows, answer and repeat them, ICMP errors quoting them, and arbitrary
//! frames) through program and model; between frames, changes of neighbours (new link-layer
//! address, gone), routes (another gateway, one without neighbour, an unmanaged interface),
//! mappings (removed, installed again) and route generation bumps (see
//! `nat_tests::harness::env`). After every frame they must agree on verdict, reason, output
//! bytes, counters (translated and denied) and conntrack events, and hold the same connection
//! table (keys, state, origin, status bits, timer) and flow entries (rewrite, ingress, route
//! and the generation it was resolved under).
//!
//! `NAT_PROPTEST_CASES` sets the size (scenarios = 5 % of it, 1 000 by default, up to
//! [`MAX_STEPS`] frames each). The report gives how often each policy path decided a frame.
use std::{cell::RefCell, collections::BTreeMap, time::Instant};

use nat_common::{Event, Reason};
use nat_tests::{
    harness::Harness,
    model::{Events, Leg, Path, XDP_REDIRECT},
    packet::verify_checksums,
    reliability::Figures,
    scenario::{Action, Scenario, scenario},
};
use proptest::test_runner::{TestCaseError, TestRunner};

use crate::{
    common::*,
    random::{cases_from_env, config},
    routes::{RouteCoverage, Watch},
};

/// Most steps of a scenario.
const MAX_STEPS: usize = 48;

/// Every (leg, path) the scenarios must reach.
const EXPECTED_PATHS: [(Leg, Path); 17] = [
    (Leg::Inbound, Path::Rule),
    (Leg::Inbound, Path::Established),
    (Leg::Inbound, Path::Related),
    (Leg::Inbound, Path::Denied),
    (Leg::Outbound, Path::Rule),
    (Leg::Outbound, Path::Established),
    (Leg::Outbound, Path::Related),
    (Leg::Outbound, Path::Denied),
    (Leg::HairpinForward, Path::Rule),
    (Leg::HairpinForward, Path::Established),
    (Leg::HairpinForward, Path::Denied),
    (Leg::HairpinForward, Path::Collision),
    (Leg::HairpinReply, Path::Established),
    (Leg::Inbound, Path::Fast),
    (Leg::Outbound, Path::Fast),
    (Leg::HairpinForward, Path::Fast),
    (Leg::HairpinReply, Path::Fast),
];

/// What the scenarios reached.
#[derive(Default)]
pub(crate) struct Coverage {
    pub scenarios: u32,
    pub frames: u32,
    /// (leg, path) -> frames that reached the policy.
    pub paths: BTreeMap<(Leg, Path), u32>,
    /// (leg, reason) -> frames that were classified to a leg.
    pub legs: BTreeMap<(Leg, Reason), u32>,
    pub reasons: BTreeMap<Reason, u32>,
    pub events: Events,
    /// Most flows in a table at the end of a scenario.
    pub max_flows: usize,
    pub routes: RouteCoverage,
    /// Frames that were RSTs or FINs outside their flow's window (blind).
    pub out_of_window: u32,
}

fn fail(step: usize, frame: &[u8], e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("step {step}, frame {}: {e}", hex(frame)))
}

fn check(h: &Harness, cov: &RefCell<Coverage>, sc: &Scenario) -> Result<(), TestCaseError> {
    let setup = || -> anyhow::Result<()> {
        h.reset_env()?;
        h.set_policy(&sc.policy.state())?;
        h.set_timeouts(sc.policy.timeouts_ns)?;
        h.clear_flows()
    };
    setup().map_err(|e| TestCaseError::fail(format!("setup: {e:#}")))?;
    let mut c = cov.borrow_mut();
    c.scenarios += 1;
    play(h, &mut c, &sc.actions(&h.topo))?;
    let flows = h.model_flows().len();
    c.max_flows = c.max_flows.max(flows);
    Ok(())
}

/// Applies the changes and runs the frames of a scenario through program and model, which
/// must agree on each frame and hold the same flow table after it.
pub(crate) fn play(h: &Harness, c: &mut Coverage, actions: &[Action]) -> Result<(), TestCaseError> {
    let mut watch = Watch::new(h);
    for (i, a) in actions.iter().enumerate() {
        let (ingress, frame) = match a {
            Action::Frame { ingress, frame } => (*ingress, frame),
            Action::Env(change) => {
                h.change(change)
                    .map_err(|e| TestCaseError::fail(format!("step {i}, {change:?}: {e:#}")))?;
                watch.changed(&mut c.routes, change);
                continue;
            }
        };
        let got = h
            .run(ingress, frame)
            .map_err(|e| fail(i, frame, format!("{e:#}")))?;
        let want = h.run_model(ingress, frame);
        c.frames += 1;
        *c.reasons.entry(got.reason).or_default() += 1;
        for (a, b) in c.events.0.iter_mut().zip(got.events.0) {
            *a += b;
        }
        c.out_of_window += u32::from(h.model_out_of_window());
        let (leg, path) = h.model_decision();
        if let Some(leg) = leg {
            *c.legs.entry((leg, got.reason)).or_default() += 1;
            if let Some(p) = path {
                *c.paths.entry((leg, p)).or_default() += 1;
            }
        }
        if got != want {
            let (g, w) = (describe(&got), describe(&want));
            let d = diff(&got.frame, &want.frame);
            return Err(fail(i, frame, format!("\nprogram: {g}\nmodel:   {w}\n{d}")));
        }
        if got.action == XDP_REDIRECT && verify_checksums(frame).is_ok() {
            verify_checksums(&got.frame).map_err(|e| fail(i, frame, e))?;
        }
        h.check_flows()
            .map_err(|e| fail(i, frame, format!("{e:#}")))?;
        watch.framed(&mut c.routes, h, frame, path, &got);
    }
    Ok(())
}

#[test]
fn scenarios_match_model() {
    let h = harness();
    let scenarios = cases_from_env() / 20;
    let mut fig = Figures::new("differential");
    fig.set(
        "firewall scenarios planned (NAT_PROPTEST_CASES / 20)",
        u64::from(scenarios),
    );
    let cov = RefCell::new(Coverage::default());
    let start = Instant::now();
    let (config, seed) = config(scenarios);
    let result = TestRunner::new(config).run(&scenario(MAX_STEPS), |sc| check(&h, &cov, &sc));
    let elapsed = start.elapsed();
    fig.set(
        "firewall scenarios run through program and model",
        u64::from(cov.borrow().scenarios),
    );
    fig.set(
        "scenario frames run through program and model (tables compared after each)",
        u64::from(cov.borrow().frames),
    );
    if let Err(e) = result {
        panic!("{e}\nreplay with PROPTEST_RNG_SEED={seed} (and the same NAT_PROPTEST_CASES)");
    }

    let c = cov.into_inner();
    let path = |leg: Leg, p: Path| c.paths.get(&(leg, p)).copied().unwrap_or(0);
    let decided: u32 = c.paths.values().sum();
    let pct = |n: u32| 100.0 * f64::from(n) / f64::from(decided.max(1));
    let mut report = Vec::new();
    for (leg, p) in EXPECTED_PATHS {
        let n = path(leg, p);
        report.push(format!("{leg:?} {p:?}={n} ({:.1}%)", pct(n)));
    }
    let legs: Vec<_> = c
        .legs
        .iter()
        .filter(|((leg, _), _)| matches!(leg, Leg::HairpinForward | Leg::HairpinReply))
        .map(|((leg, r), n)| format!("{leg:?} {}={n}", r.name()))
        .collect();
    let events: Vec<_> = Event::ALL
        .iter()
        .map(|e| format!("{}={}", e.name(), c.events.get(*e)))
        .collect();
    let reasons: Vec<_> = c
        .reasons
        .iter()
        .map(|(r, n)| format!("{}={n}", r.name()))
        .collect();
    eprintln!(
        "{} scenarios, {} frames in {elapsed:.1?}; {decided} reached the policy: {}\n  hairpin: \
         {}\n  events: {}\n  reasons: {}\n  largest connection table: {} flows\n  \
         RST/FIN outside their flow's window: {}\n  surroundings: {}",
        c.scenarios,
        c.frames,
        report.join(", "),
        legs.join(" "),
        events.join(" "),
        reasons.join(" "),
        c.max_flows,
        c.out_of_window,
        c.routes
    );
    if scenarios >= 300 {
        // Each path, event and blind segment must come up at least once in 500 scenarios:
        // 20 at the size `cargo xtask test` runs (10,000 scenarios). A fixed count failed at
        // the default size (1,000): a hairpin flow's forward direction on the fast path needs
        // a hairpin flow opened, answered and repeated, about one scenario in a hundred.
        let bar = (scenarios / 500).max(1);
        assert!(
            c.routes.changes >= scenarios / 5,
            "scenarios rarely changed the surroundings: {}",
            c.routes
        );
        // A hairpin flow takes another source port when its own is held (as netfilter's
        // NAT does), so a collision needs every alternative held: scenarios never get there;
        // `hairpin_edges::hairpin_collisions_take_another_port` does.
        let thin: Vec<_> = EXPECTED_PATHS
            .into_iter()
            .filter(|(leg, p)| *p != Path::Collision && path(*leg, *p) < bar)
            .collect();
        assert!(
            thin.is_empty(),
            "scenarios rarely reached (leg, path) {thin:?}"
        );
        // natd alone writes the last two.
        let rare: Vec<_> = Event::ALL[..4]
            .iter()
            .filter(|e| c.events.get(**e) < u64::from(bar))
            .collect();
        assert!(rare.is_empty(), "scenarios rarely caused {rare:?}");
        assert!(
            c.out_of_window >= bar,
            "scenarios rarely sent an RST or FIN outside its flow's window: {}",
            c.out_of_window
        );
    }
    fig.done();
}
