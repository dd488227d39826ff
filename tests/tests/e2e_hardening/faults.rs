//! Faults: natd killed (SIGKILL, no cleanup at all) at random moments of a bulk change, and a
//! corrupt state file at start. natd persists each accepted state (atomic rename) and leaves
//! the pinned fast path running when it dies; the next natd restores the state file and
//! reconciles the pinned maps and the nftables table with it.
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, GUEST_ADDR, Natd, NatdOptions, PUBLIC_ADDR, ROUTER_GUEST_IF, ROUTER_PUBLIC_IF,
    Topology, observe::udp_exchange, process::binary,
};

use crate::common::*;

/// Mappings in the bulk change.
const BULK: u32 = 10_000;
/// Kills during bulk changes per run.
const KILLS: u32 = 6;

/// `BULK` mappings 100.64.x.y -> 10.128.x.y (RFC 6598 and RFC 1918 space, pairwise distinct).
fn bulk_pairs() -> Vec<(Ipv4Addr, Ipv4Addr)> {
    (1..=BULK)
        .map(|i| {
            let [_, _, hi, lo] = i.to_be_bytes();
            (
                Ipv4Addr::new(100, 64, hi, lo),
                Ipv4Addr::new(10, 128, hi, lo),
            )
        })
        .collect()
}

type Pairs = BTreeSet<(Ipv4Addr, Ipv4Addr)>;

/// natd for the fault tests: the fast path stays up when natd goes (as in production), and
/// each natd writes its own log.
fn options(log: String) -> NatdOptions {
    NatdOptions {
        omit: vec!["--detach-on-exit"],
        log: Some(log),
        ..NatdOptions::default()
    }
}

/// Every view of the installed mappings equals `want`: natctl's list, the state file, the
/// pinned fast-path maps (both directions) and the nftables maps (both directions).
fn check_everywhere(topo: &Topology, natd: &Natd, want: &Pairs) -> anyhow::Result<()> {
    let listed: Pairs = natd
        .natctl()?
        .mappings()?
        .iter()
        .map(|m| (m.public, m.private))
        .collect();
    let count = |p: &Pairs| p.len();
    ensure!(
        listed == *want,
        "natctl lists {} mappings, expected {}",
        count(&listed),
        count(want)
    );
    let file = state_file_mappings(topo)?;
    ensure!(
        file == *want,
        "the state file holds {} mappings, expected {}",
        count(&file),
        count(want)
    );
    let publics: BTreeSet<_> = want.iter().map(|(p, _)| *p).collect();
    let privates: BTreeSet<_> = want.iter().map(|(_, v)| *v).collect();
    let nat_in = pinned_keys(topo, "NAT_IN")?;
    let nat_out = pinned_keys(topo, "NAT_OUT")?;
    ensure!(
        nat_in == publics && nat_out == privates,
        "the fast path holds {} / {} entries (NAT_IN / NAT_OUT), expected {}",
        nat_in.len(),
        nat_out.len(),
        want.len()
    );
    let maps = topo.nft_maps()?.context("natd's nftables table is gone")?;
    let set = |name: &str| -> BTreeSet<(Ipv4Addr, Ipv4Addr)> {
        maps.get(name).into_iter().flatten().copied().collect()
    };
    let swapped: Pairs = want.iter().map(|&(p, v)| (v, p)).collect();
    ensure!(
        set("dnat_v4") == *want && set("snat_v4") == swapped,
        "nftables holds {} / {} elements (dnat_v4 / snat_v4), expected {}",
        set("dnat_v4").len(),
        set("snat_v4").len(),
        want.len()
    );
    Ok(())
}

/// How many mappings a restarted natd found in the pinned maps (its "adopted" log line).
fn adopted_count(log: &str) -> Option<usize> {
    let line = log
        .lines()
        .find(|l| l.contains("adopted the pinned fast path"))?;
    let (_, rest) = line.split_once(" (")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Starts natd again after a kill: the dead natd's socket file is removed first (the helper
/// waits for the socket to appear).
fn restart(topo: &Topology, natd: &Natd, log: String) -> anyhow::Result<Natd> {
    let _ = std::fs::remove_file(natd.socket());
    Natd::start_with(topo, &options(log))
}

/// The mappings natctl lists.
fn listed(natd: &Natd) -> anyhow::Result<Pairs> {
    Ok(natd
        .natctl()?
        .mappings()?
        .iter()
        .map(|m| (m.public, m.private))
        .collect())
}

/// Which bulk change natd is killed during.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Bulk {
    /// 10,000 mappings added (from none).
    Addition,
    /// 10,000 mappings revoked (to none).
    Removal,
}

/// A topology and natd for the kill tests, the two payloads, and the time natd takes from a
/// request to the state file holding its result (measured on an addition without a kill).
struct KillBench {
    topo: Topology,
    natd: Natd,
    add: String,
    revoke: String,
    full: Pairs,
    to_persist: Duration,
    restarts: u32,
}

impl KillBench {
    fn new() -> anyhow::Result<Self> {
        let topo = Topology::new()?;
        let natd = Natd::start_with(&topo, &options("natd-0.log".into()))?;
        let pairs = bulk_pairs();
        let add = payload_file(&topo, "bulk-add.json", &static_nat_payload(&pairs, false))?;
        let revoke = payload_file(&topo, "bulk-revoke.json", &static_nat_payload(&pairs, true))?;
        let mut bench = Self {
            topo,
            natd,
            add,
            revoke,
            full: pairs.iter().copied().collect(),
            to_persist: Duration::ZERO,
            restarts: 0,
        };
        let (mut apply, start) = bench.spawn_apply(Bulk::Addition)?;
        let file = state_file(&bench.topo);
        let small = std::fs::metadata(&file).map_or(0, |m| m.len());
        while std::fs::metadata(&file).map_or(0, |m| m.len()) <= small * 10 {
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "natd did not persist {BULK} mappings within a minute"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        bench.to_persist = start.elapsed();
        ensure!(apply.wait()?.success(), "applying {BULK} mappings failed");
        let took = start.elapsed();
        check_everywhere(&bench.topo, &bench.natd, &bench.full)?;
        eprintln!(
            "applying {BULK} mappings: persisted after {:?}, answered after {took:?}",
            bench.to_persist
        );
        Ok(bench)
    }

    /// Starts `natctl apply` of the addition or the removal; returns it and when it started.
    fn spawn_apply(&self, bulk: Bulk) -> anyhow::Result<(std::process::Child, Instant)> {
        let file = match bulk {
            Bulk::Addition => &self.add,
            Bulk::Removal => &self.revoke,
        };
        let child = Command::new(binary("natctl")?)
            .arg("--socket")
            .arg(self.natd.socket())
            .args(["apply", file])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting natctl apply")?;
        Ok((child, Instant::now()))
    }

    fn restart(&mut self) -> anyhow::Result<()> {
        self.restarts += 1;
        self.natd = restart(
            &self.topo,
            &self.natd,
            format!("natd-{}.log", self.restarts),
        )?;
        Ok(())
    }

    /// Brings natd to the state before a `bulk` change without a kill: all mappings for a
    /// removal (an addition, quick), none for an addition (a fresh router: natd stopped, its
    /// state and pins removed, natd started anew, as a removal of 10,000 takes minutes).
    fn prepare(&mut self, bulk: Bulk) -> anyhow::Result<Pairs> {
        let current = listed(&self.natd)?;
        match bulk {
            Bulk::Removal if current != self.full => {
                if !current.is_empty() {
                    self.fresh()?;
                }
                self.natd.natctl()?.ok(&["apply", &self.add])?;
                Ok(self.full.clone())
            }
            Bulk::Addition if !current.is_empty() => {
                self.fresh()?;
                Ok(Pairs::new())
            }
            _ => Ok(current),
        }
    }

    fn fresh(&mut self) -> anyhow::Result<()> {
        self.natd.kill()?;
        let state = state_file(&self.topo);
        let pins = Natd::pin_dir(&self.topo);
        std::fs::remove_dir_all(state.parent().context("state dir")?)?;
        std::fs::remove_dir_all(&pins).with_context(|| format!("removing {}", pins.display()))?;
        self.restart()
    }
}

/// Kills natd `KILLS` times at random moments of a `bulk` change of 10,000 mappings (one
/// CloudStack payload, `natctl apply`), now and then also the natd repairing after it. After
/// every restart the installed state is exactly the one before or the one after the change,
/// never a mixture, in every place it lives: natctl, the state file, the pinned fast path and
/// nftables; a change natctl saw acknowledged is never lost.
fn kill_during(bulk: Bulk) -> anyhow::Result<()> {
    const KILLED: &str = "SIGKILLs of natd during a bulk change or its repair";
    const INTERRUPTED: &str = "bulk changes of 10,000 mappings natd was killed during";
    const ACKED: &str = "bulk changes natctl saw acknowledged before the kill";
    const TORN: &str = "restarts that found a half-written fast path";
    const MIXED: &str = "restarts with neither the state before nor the one after";
    const LOST: &str = "acknowledged changes lost by a restart";
    const DISAGREED: &str = "restarts whose views disagreed (natctl, state file, pins, nftables)";
    let mut fig = Figures::new("faults");
    for f in [MIXED, LOST, DISAGREED, TORN] {
        fig.add(f, 0);
    }
    let mut b = KillBench::new()?;
    // Kills land from the request to well after the state is persisted.
    let window = u64::try_from(b.to_persist.as_micros())? * 6 / 5;
    let mut rng = Rng::from_env("NAT_FAULT_SEED");
    let mut after_count = 0u64;
    for i in 1..=KILLS {
        let before = b.prepare(bulk)?;
        let target = if bulk == Bulk::Addition {
            b.full.clone()
        } else {
            Pairs::new()
        };
        let delay = Duration::from_micros(rng.below(window));
        let (mut apply, start) = b.spawn_apply(bulk)?;
        std::thread::sleep(delay.saturating_sub(start.elapsed()));
        b.natd.kill()?;
        fig.add(KILLED, 1);
        fig.add(INTERRUPTED, 1);
        let acknowledged = apply.wait()?.success();
        fig.add(ACKED, u64::from(acknowledged));

        b.restart()?;
        let found_torn = adopted_count(&b.natd.log_text())
            .is_some_and(|n| n != before.len() && n != target.len());
        fig.add(TORN, u64::from(found_torn));
        // Now and then the natd repairing the torn state is killed too.
        if rng.below(3) == 0 {
            std::thread::sleep(Duration::from_micros(rng.below(window)));
            b.natd.kill()?;
            fig.add(KILLED, 1);
            b.restart()?;
        }
        let now = listed(&b.natd)?;
        let mixed = now != before && now != target;
        let lost = acknowledged && now != target;
        fig.add(MIXED, u64::from(mixed));
        fig.add(LOST, u64::from(lost));
        ensure!(
            !mixed,
            "kill {i} after {delay:?}: natd restarted with {} mappings, neither the {} before nor \
             the {} after the change",
            now.len(),
            before.len(),
            target.len()
        );
        ensure!(
            !lost,
            "kill {i} after {delay:?}: natctl saw the change acknowledged, but natd restarted \
             with the state before it"
        );
        let views = check_everywhere(&b.topo, &b.natd, &now);
        fig.add(DISAGREED, u64::from(views.is_err()));
        views.with_context(|| format!("kill {i} after {delay:?}"))?;
        after_count += u64::from(now == target);
        eprintln!(
            "kill {i} after {delay:?}: restarted with the state {} the {bulk:?}{}",
            if now == target { "after" } else { "before" },
            if found_torn {
                " (the fast path was half-written and repaired)"
            } else {
                ""
            }
        );
    }
    let dir = state_file(&b.topo);
    let leftovers = std::fs::read_dir(dir.parent().context("state dir")?)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .count();
    fig.set(
        "temporary state files left by killed natds",
        leftovers as u64,
    );
    eprintln!(
        "{} kills; {after_count} of {KILLS} changes survived, {} acknowledged; {} restarts \
         repaired a half-written fast path",
        fig.get(KILLED),
        fig.get(ACKED),
        fig.get(TORN)
    );
    fig.done();
    Ok(())
}

/// natd killed during bulk removals of 10,000 mappings: see [`kill_during`].
#[test]
fn natd_killed_during_a_bulk_removal_restarts_with_the_state_before_or_after() -> anyhow::Result<()>
{
    kill_during(Bulk::Removal)
}

/// natd killed during bulk additions of 10,000 mappings: see [`kill_during`]. A kill before
/// the state is persisted leaves mappings in the fast path that the next natd removes.
#[test]
fn natd_killed_during_a_bulk_addition_restarts_with_the_state_before_or_after() -> anyhow::Result<()>
{
    kill_during(Bulk::Addition)
}

/// While natd forgets the kernel's connection-tracking entries of 10,000 removed mappings, it
/// still answers natctl promptly.
#[test]
fn natd_answers_during_a_bulk_removal() -> anyhow::Result<()> {
    let mut b = KillBench::new()?;
    let (mut apply, start) = b.spawn_apply(Bulk::Removal)?;
    while !state_file_mappings(&b.topo).is_ok_and(|m| m.is_empty()) {
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "the removal was not persisted within 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = answers_promptly(&mut b.natd, "a bulk removal was persisted")?;
    eprintln!("natd answered after {took:?} while finishing the removal");
    let _ = apply.kill();
    let _ = apply.wait();
    Ok(())
}

/// Ways a state file can be damaged, as a crash, a full disk or a careless edit leave it.
fn corruptions(good: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("truncated", good[..good.len() / 2].to_vec()),
        ("empty", Vec::new()),
        ("text garbage", b"\x00\x7fELF\x01 garbage".to_vec()),
        (
            "JSON of another shape",
            br#"{"mappings": "all of them"}"#.to_vec(),
        ),
    ]
}

/// A corrupt state file stops natd at start with an error naming the file and saying it is
/// corrupt; natd neither starts empty nor rewrites the file. Meanwhile the fast path the last
/// natd left (pinned) keeps translating with the last good state, and with the file repaired
/// natd starts and adopts it.
#[test]
fn a_corrupt_state_file_is_refused_and_the_fast_path_keeps_forwarding() -> anyhow::Result<()> {
    const TRIPS: &str = "UDP round trips through the fast path while natd could not start";
    const FAILED: &str = "UDP round trips that failed while natd could not start";
    let mut fig = Figures::new("faults");
    fig.add(FAILED, 0);
    let topo = Topology::new()?;
    let mut natd = Natd::start_with(
        &topo,
        &NatdOptions {
            config: Some(ONE_MAPPING_OPEN.into()),
            ..options("natd-first.log".into())
        },
    )?;
    let exchange = |port: u16| -> anyhow::Result<()> {
        let seen = udp_exchange(
            &topo.guest,
            at(GUEST_ADDR, port),
            &topo.client,
            at(PUBLIC_ADDR, port),
            256,
        )?;
        ensure!(
            seen.server_saw.ip() == CLIENT_ADDR && seen.client_saw.ip() == PUBLIC_ADDR,
            "{seen:?}"
        );
        Ok(())
    };
    exchange(7000)?;
    natd.terminate()?;
    // Counted in `fig`: the round trips made while no natd runs.
    let exchange_without_natd = |fig: &mut Figures, port: u16| -> anyhow::Result<()> {
        fig.add(TRIPS, 1);
        let r = exchange(port);
        fig.add(FAILED, u64::from(r.is_err()));
        r
    };
    let file = state_file(&topo);
    let good = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    let want: Pairs = [(PUBLIC_ADDR, GUEST_ADDR)].into();

    let socket = topo.dir.path().join("natd-corrupt.sock");
    let socket_arg = socket.display().to_string();
    let args = [
        "--public-iface",
        ROUTER_PUBLIC_IF,
        "--guest-iface",
        ROUTER_GUEST_IF,
        "--socket",
        &socket_arg,
    ];
    let cases = corruptions(&good);
    for (n, (what, bytes)) in cases.iter().enumerate() {
        std::fs::write(&file, bytes)?;
        let (status, output) = Natd::run_to_exit_with(
            &topo,
            &args,
            &["--detach-on-exit"],
            nat_tests::topology::process::NATD_START,
        )?;
        fig.add("corrupt state files natd was started with", 1);
        fig.add(
            "corrupt state files natd refused (exited with an error)",
            u64::from(!status.success()),
        );
        ensure!(!status.success(), "natd started with a {what} state file");
        let path = file.display().to_string();
        ensure!(
            output.contains(&path) && output.contains("corrupt"),
            "natd's error for a {what} state file names neither {path} nor \"corrupt\":\n{output}"
        );
        ensure!(!socket.exists(), "natd served with a {what} state file");
        ensure!(
            std::fs::read(&file)? == *bytes,
            "natd rewrote the {what} state file"
        );
        // The last good state is still installed and translating.
        ensure!(
            pinned_keys(&topo, "NAT_IN")? == [PUBLIC_ADDR].into(),
            "the fast path lost its mapping"
        );
        let maps = topo.nft_maps()?.context("natd's nftables table is gone")?;
        ensure!(
            maps.get("dnat_v4") == Some(&vec![(PUBLIC_ADDR, GUEST_ADDR)]),
            "{maps:?}"
        );
        exchange_without_natd(&mut fig, 7001 + n as u16)
            .with_context(|| format!("with a {what} state file"))?;
    }

    std::fs::write(&file, &good)?;
    let natd = Natd::start_with(&topo, &options("natd-repaired.log".into()))?;
    ensure!(
        adopted_count(&natd.log_text()) == Some(1),
        "natd did not adopt the pinned fast path:\n{}",
        natd.log_text()
    );
    check_everywhere(&topo, &natd, &want)?;
    exchange(7100)?;
    fig.done();
    Ok(())
}

/// A state file of bytes that are not even UTF-8 (a disk error, another program's file) is
/// called corrupt too, not an I/O error, and natd does not start.
#[test]
fn a_state_file_of_binary_garbage_is_called_corrupt() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let file = state_file(&topo);
    std::fs::create_dir_all(file.parent().context("state dir")?)?;
    std::fs::write(&file, b"\x00\x7fELF\xff\xfe\x00garbage")?;
    let args = [
        "--public-iface",
        ROUTER_PUBLIC_IF,
        "--guest-iface",
        ROUTER_GUEST_IF,
    ];
    let (status, output) =
        Natd::run_to_exit(&topo, &args, nat_tests::topology::process::NATD_START)?;
    ensure!(!status.success(), "natd started with a binary state file");
    ensure!(
        output.contains(&file.display().to_string()) && output.contains("corrupt"),
        "natd's error for a binary state file does not call it corrupt:\n{output}"
    );
    Ok(())
}
