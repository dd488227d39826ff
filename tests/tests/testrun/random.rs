//! Differential property test: random, often damaged frames (see `nat_tests::strategy`)
//! through the program and the model must agree on verdict, reason, output bytes, the mapping
//! counted and the conntrack events; a translated frame whose checksums were all valid must
//! have them all valid still. The connection tables (hairpin legs and bindings included) are compared (and emptied)
//! every [`FLOW_CHECK_EVERY`] frames. Before about one frame in [`CHANGE_EVERY`] the
//! surroundings change (a neighbour, a route, a mapping or the route generation, see
//! `nat_tests::harness::env`), in program and model alike. The report counts frames by leg and
//! policy path, and the hairpin legs by reason.
//! The policy is open ([`open_policy`]), so the translation paths stay reachable.
//! `NAT_PROPTEST_CASES` sets the number of frames (default 20 000, plus a quarter of that
//! again aimed at ICMP errors, another quarter at hairpin, and an eighth under `--policy
//! kernel`). The public side has two interfaces, so new inbound flows arriving on the one
//! that does not own their public IP occur too.
use std::{cell::RefCell, collections::BTreeMap, time::Instant};

use nat_common::Reason;
use nat_tests::{
    harness::{Harness, allow_all, env::Change, service},
    model::{Leg, Path, XDP_REDIRECT},
    packet::{PROTO_ICMP, verify_checksums},
    reliability::Figures,
    scenario::env::change_and_bump,
    strategy::{
        FrameSpec, frame_spec, hairpin_frame_spec, icmp_error_frame_spec, related_error_pair,
    },
};
use nat_userspace::{firewall::Proto, state::DesiredState};
use proptest::{
    prop_oneof,
    strategy::Strategy,
    test_runner::{Config, RngSeed, TestCaseError, TestRunner},
};

use crate::common::*;

const DEFAULT_CASES: u32 = 20_000;
/// Frames between two comparisons of the connection tables.
const FLOW_CHECK_EVERY: u32 = 256;
/// About one frame in this many comes after a change of the surroundings.
const CHANGE_EVERY: f64 = 64.0;

/// [`allow_all`], and egress allowed but to one of the strategy's destinations, so both drop
/// reasons occur (inbound: protocols other than TCP, UDP and ICMP).
fn open_policy() -> DesiredState {
    let mut s = allow_all();
    let dst = "192.0.2.200/32".parse().expect("CIDR");
    s.add_egress(None, service(Proto::All, None, None), vec![dst])
        .expect("valid rule");
    s
}

/// A runner configuration for `cases` cases and its RNG seed: `PROPTEST_RNG_SEED` if set,
/// else a fresh one. Failures must print the seed: the tests carry state (connection tables)
/// from case to case, so only the whole sequence, replayed from the seed, reproduces one.
pub fn config(cases: u32) -> (Config, u64) {
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let seed = match config.rng_seed {
        RngSeed::Fixed(seed) => seed,
        RngSeed::Random => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            t.as_nanos() as u64 ^ u64::from(std::process::id()) << 32
        }
    };
    let config = Config {
        rng_seed: RngSeed::Fixed(seed),
        ..config
    };
    (config, seed)
}

pub fn cases_from_env() -> u32 {
    match std::env::var("NAT_PROPTEST_CASES") {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("NAT_PROPTEST_CASES={v}: {e}")),
        Err(_) => DEFAULT_CASES,
    }
}

/// What the generator reached, so a strategy that drifts away from a path fails loudly.
#[derive(Default)]
struct Coverage {
    reasons: [u32; Reason::COUNT as usize],
    icmp_errors_translated: u32,
    frames: u32,
    /// (leg, policy path) -> frames.
    paths: BTreeMap<(Leg, Option<Path>), u32>,
    /// (leg, reason) -> frames, for the hairpin legs.
    hairpin: BTreeMap<(Leg, Reason), u32>,
    /// Changes of the surroundings made between frames.
    changes: u32,
}

/// One case: the change before the frame (and natd's bump after it) if any, then the frame:
/// program and model agree; an undamaged translated frame has valid checksums.
fn check(
    h: &Harness,
    cov: &RefCell<Coverage>,
    (change, specs): &(Option<(Change, bool)>, Vec<FrameSpec>),
) -> Result<(), TestCaseError> {
    if let Some((change, bump)) = change {
        let apply = || -> anyhow::Result<()> {
            h.change(change)?;
            if *bump {
                h.change(&Change::Bump)?;
            }
            Ok(())
        };
        apply().map_err(|e| TestCaseError::fail(format!("{change:?}: {e:#}")))?;
        cov.borrow_mut().changes += 1;
    }
    specs.iter().try_for_each(|spec| check_frame(h, cov, spec))
}

/// One frame: program and model agree; an undamaged translated frame has valid checksums.
fn check_frame(
    h: &Harness,
    cov: &RefCell<Coverage>,
    spec: &FrameSpec,
) -> Result<(), TestCaseError> {
    let ingress = spec.ingress_ifindex(&h.topo);
    let frame = spec.build();
    let got = h
        .run(ingress, &frame)
        .map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
    let want = h.run_model(ingress, &frame);
    let mut c = cov.borrow_mut();
    c.frames += 1;
    c.reasons[got.reason as usize] += 1;
    if let (Some(leg), path) = h.model_decision() {
        *c.paths.entry((leg, path)).or_default() += 1;
        if matches!(leg, Leg::HairpinForward | Leg::HairpinReply) {
            *c.hairpin.entry((leg, got.reason)).or_default() += 1;
        }
    }
    // Only a redirected frame is sure to hold an ICMP header.
    let redirected = got.action == XDP_REDIRECT;
    if redirected && frame[23] == PROTO_ICMP && matches!(frame[34], 3 | 11 | 12) {
        c.icmp_errors_translated += 1;
    }
    // Valid checksums in, valid checksums out (an undamaged frame of another protocol may
    // carry the number of TCP or UDP, and so a bogus checksum).
    if redirected && verify_checksums(&frame).is_ok() {
        verify_checksums(&got.frame)
            .map_err(|e| TestCaseError::fail(format!("{e} after translating {}", hex(&frame))))?;
    }
    if got != want {
        let (g, w) = (describe(&got), describe(&want));
        return Err(TestCaseError::fail(format!(
            "ingress {ingress}, frame {}\nprogram: {g}\nmodel:   {w}\n{}",
            hex(&frame),
            diff(&got.frame, &want.frame)
        )));
    }
    if c.frames.is_multiple_of(FLOW_CHECK_EVERY) {
        h.check_flows()
            .and_then(|()| h.clear_flows())
            .map_err(|e| TestCaseError::fail(format!("after frame {}: {e:#}", hex(&frame))))?;
    }
    Ok(())
}

/// Runs `cases` frames of `s`; the failure (with the seed that replays it) if one disagreed.
fn run(
    h: &Harness,
    cov: &RefCell<Coverage>,
    cases: u32,
    s: impl Strategy<Value = Vec<FrameSpec>>,
) -> Result<(), String> {
    // Each batch starts from the bench's surroundings (changes accumulate within a batch,
    // and a batch aimed at one kind of frame must not start with its targets gone).
    h.reset_env().map_err(|e| format!("{e:#}"))?;
    let (config, seed) = config(cases);
    let s = (
        proptest::option::weighted(1.0 / CHANGE_EVERY, change_and_bump()),
        s,
    );
    TestRunner::new(config)
        .run(&s, |case| check(h, cov, &case))
        .map_err(|e| {
            format!("{e}\nreplay with PROPTEST_RNG_SEED={seed} (and the same NAT_PROPTEST_CASES)")
        })
}

#[test]
fn program_matches_model() {
    let h = harness();
    h.set_policy(&open_policy())
        .expect("install the open policy");
    let cases = cases_from_env();
    let mut fig = Figures::new("differential");
    fig.set(
        "random frames planned (NAT_PROPTEST_CASES, plus a quarter for ICMP errors, a \
         quarter for hairpin and an eighth under --policy kernel)",
        u64::from(cases + cases / 4 + cases / 4 + cases / 8),
    );
    let cov = RefCell::new(Coverage::default());
    let start = Instant::now();
    let one = |s: FrameSpec| vec![s];
    // Half the ICMP errors come right after the frame that opened the flow they quote.
    let errors = prop_oneof![icmp_error_frame_spec().prop_map(one), related_error_pair()];
    let result = run(&h, &cov, cases, frame_spec().prop_map(one))
        .and_then(|()| run(&h, &cov, cases / 4, errors))
        .and_then(|()| run(&h, &cov, cases / 4, hairpin_frame_spec().prop_map(one)))
        .and_then(|()| {
            // `--policy kernel`, from an empty flow table (its flows come from the tc
            // learner, which this bench does not run).
            h.clear_flows()
                .and_then(|()| h.set_kernel_policy(true))
                .map_err(|e| format!("{e:#}"))?;
            run(&h, &cov, cases / 8, frame_spec().prop_map(one))
        });
    let elapsed = start.elapsed();
    fig.set(
        "random frames run through program and model",
        u64::from(cov.borrow().frames),
    );
    if let Err(e) = result {
        panic!("{e}");
    }

    let cov = cov.into_inner();
    let seen = |r: Reason| cov.reasons[r as usize];
    let report: Vec<_> = Reason::ALL
        .iter()
        .map(|r| format!("{}={}", r.name(), seen(*r)))
        .collect();
    let paths: Vec<_> = cov
        .paths
        .iter()
        .map(|((leg, p), n)| match p {
            Some(p) => format!("{leg:?} {p:?}={n}"),
            None => format!("{leg:?} (before policy)={n}"),
        })
        .collect();
    let hairpin: Vec<_> = cov
        .hairpin
        .iter()
        .map(|((leg, r), n)| format!("{leg:?} {}={n}", r.name()))
        .collect();
    eprintln!(
        "{} random frames in {elapsed:.1?} ({} changes of the surroundings between them), {} \
         translated ICMP errors; {}\n  policy: {}\n  hairpin: {}",
        cases + cases / 2 + cases / 8,
        cov.changes,
        cov.icmp_errors_translated,
        report.join(" "),
        paths.join(", "),
        hairpin.join(" ")
    );
    if cases >= 5_000 {
        // Random frames cannot take every alternative source port of a hairpin flow:
        // `hairpin_edges::hairpin_collisions_take_another_port` reaches that one.
        let missed: Vec<_> = Reason::ALL
            .iter()
            .filter(|r| **r != Reason::HairpinCollision && seen(**r) < 10)
            .collect();
        assert!(missed.is_empty(), "the generator rarely reached {missed:?}");
        let icmp = cov.icmp_errors_translated;
        assert!(
            icmp >= cases / 50,
            "the generator translated only {icmp} ICMP errors"
        );
        let hairpin = |leg, r| cov.hairpin.get(&(leg, r)).copied().unwrap_or(0);
        let thin: Vec<_> = [
            (Leg::HairpinForward, Reason::HairpinForwarded),
            (Leg::HairpinForward, Reason::IcmpErrorUnrelated),
            (Leg::HairpinReply, Reason::HairpinForwarded),
            // A hairpin reply is one of a live flow, which outlives its mapping; its route
            // is resolved by its first packet, so a reply meets a missing neighbour.
            (Leg::HairpinReply, Reason::NoNeighbour),
        ]
        .into_iter()
        .filter(|(leg, r)| hairpin(*leg, *r) < 10)
        .collect();
        assert!(thin.is_empty(), "the generator rarely reached {thin:?}");
    }
    fig.done();
}
