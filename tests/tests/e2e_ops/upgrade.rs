//! Upgrades: a natd started on pins an earlier natd left with other capacities (another
//! `[limits] mappings` or `[conntrack] size`, counter arrays of a build with fewer reasons or
//! events) migrates them and keeps traffic flowing through the fast path with its flows and
//! counts; pins of another layout (a map of another value size) are refused with a message
//! naming the map and what to run, and natd exits having changed nothing.
use std::{collections::BTreeMap, path::PathBuf};

use anyhow::Context as _;
use aya::maps::{MapData, MapInfo, PerCpuArray, PerCpuValues};
use nat_common::{Counter, Event, Reason};
use nat_tests::topology::{
    GUEST_ADDR, Natd, NatdOptions, PUBLIC_ADDR, ROUTER_GUEST_IF, ROUTER_PUBLIC_IF, Topology,
    fastpath::{self, Arrived},
    observe::ping,
    process::NATD_START,
    stream::{PingStream, TcpTransfer},
};

use super::{
    ONE_MAPPING_OPEN, at,
    restart::{PING_INTERVAL, WRITE_PACE, assert_xdp_attached, progress, transfer_flow},
    status,
};

/// The pin of map `name` under the topology's natd pin directory.
fn pin(topo: &Topology, name: &str) -> PathBuf {
    Natd::pin_dir(topo).join("maps").join(name)
}

/// The program's slot hits so far (`Event::SlotHit` in the pinned `EVENTS`, all CPUs).
fn slot_hits(topo: &Topology) -> anyhow::Result<u64> {
    let events = PerCpuArray::<MapData, u64>::try_from(aya::maps::Map::PerCpuArray(
        MapData::from_pin(pin(topo, "EVENTS"))?,
    ))?;
    Ok(events.get(&(Event::SlotHit as u32), 0)?.iter().sum())
}

/// Starts natd with `config`, leaving its fast path behind when it stops, and stops it.
fn leave_pins(topo: &Topology, config: &str) -> anyhow::Result<()> {
    let mut natd = Natd::start_with(
        topo,
        &NatdOptions {
            config: Some(config.into()),
            keep_fast_path: true,
            ..NatdOptions::default()
        },
    )?;
    let status = natd.terminate()?;
    anyhow::ensure!(status.success(), "natd exited with {status}");
    Ok(())
}

/// Puts a per-CPU array of `slots` slots in place of the pin of `name`, slot `i` holding
/// `value(i)` on every CPU: what a build with another number of counters would have left.
fn replace_with_counters<V: aya::Pod>(
    topo: &Topology,
    name: &str,
    slots: u32,
    value: impl Fn(u32) -> V,
) -> anyhow::Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    let mut map = PerCpuArray::<MapData, V>::create(slots, 0).context("creating a map")?;
    for i in 0..slots {
        map.set(i, PerCpuValues::try_from(vec![value(i); cpus])?, 0)?;
    }
    let path = pin(topo, name);
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    map.pin(&path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(())
}

/// Every pin (maps and links) with the id of the object it holds, and the XDP program
/// attached to each interface: what a refused start must leave as it was.
fn pins_and_programs(topo: &Topology) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let dir = Natd::pin_dir(topo);
    for sub in ["maps", "links"] {
        for e in std::fs::read_dir(dir.join(sub))? {
            let path = e?.path();
            let id = match sub {
                "maps" => MapInfo::from_pin(&path)?.id().to_string(),
                _ => String::new(),
            };
            out.insert(path.display().to_string(), id);
        }
    }
    for dev in [ROUTER_PUBLIC_IF, ROUTER_GUEST_IF] {
        let link = topo.router_link(dev)?;
        let prog = link
            .split_once("prog/xdp id ")
            .map(|(_, rest)| rest.split_whitespace().next().unwrap_or("").to_string());
        out.insert(format!("xdp on {dev}"), format!("{prog:?}"));
    }
    Ok(out)
}

/// natd stopped (fast path left running) while pings stream to P and a TCP connection sends,
/// then started with more mappings and a larger connection table: `NAT_IN`, `NAT_OUT`,
/// `MAPPING_STATS`, `FLOWS` and `PENDING` are re-created at the new sizes with their entries
/// and counts; the flow cache (`SLOTS`) is kept at the size the first natd gave it, and
/// its slots serve the echoes. No echo request goes unanswered, the connection delivers every byte, its flow
/// is still listed and no flow was created again (the copies carried the traffic), the
/// mapping's counters and the forwarded counts went on from where they were by at least what
/// crossed since, through XDP (no pass reason grew).
#[test]
fn other_mapping_and_connection_table_sizes_are_migrated_with_flows_and_counts()
-> anyhow::Result<()> {
    let sized = |mappings: u32, flows: u32| {
        format!("{ONE_MAPPING_OPEN}[limits]\nmappings = {mappings}\n[conntrack]\nsize = {flows}\n")
    };
    let topo = Topology::new()?;
    let mut first = Natd::start_with(
        &topo,
        &NatdOptions {
            config: Some(sized(256, 1024)),
            keep_fast_path: true,
            ..NatdOptions::default()
        },
    )?;
    let natctl = first.natctl()?;
    let pings = PingStream::start(&topo.client, PUBLIC_ADDR, PING_INTERVAL)?;
    let transfer = TcpTransfer::start(
        &topo.guest,
        at(GUEST_ADDR, 8080),
        &topo.client,
        at(PUBLIC_ADDR, 8080),
        WRITE_PACE,
    )?;
    let client_port = transfer.client_local().port();
    progress(&pings, &transfer)?;
    let flow_before = transfer_flow(&natctl.flows()?.flows, client_port)
        .context("the transfer's flow is not tracked before the upgrade")?;
    assert_eq!(flow_before.state, "tcp_established", "{flow_before:?}");
    let counters_before = natctl.counters(PUBLIC_ADDR)?;
    let stats_before = natctl.stats()?;
    let sent_before = pings.sent();
    let stopped = first.terminate()?;
    assert!(stopped.success(), "natd exited with {stopped}");
    assert_xdp_attached(&topo, "after natd stopped")?;
    progress(&pings, &transfer)?;

    let second = Natd::start(&topo, Some(&sized(512, 2048)))?;
    let log = second.log_text();
    for line in [
        "migrated the pinned NAT_IN: 256 -> 512 entries, 1 copied",
        "migrated the pinned NAT_OUT: 256 -> 512 entries, 1 copied",
        "migrated the pinned MAPPING_STATS: 256 -> 512 slots, the counts of 256 carried over",
        "migrated the pinned FLOWS: 2048 -> 4096 entries",
        "migrated the pinned PENDING: 1024 -> 2048 entries",
        "kept the pinned SLOTS at 2048 slots ([conntrack] size asks for 4096)",
    ] {
        assert!(log.contains(line), "the log lacks {line:?}:\n{log}");
    }
    assert!(
        log.contains("maps take") && log.contains("MiB of kernel memory (FLOWS"),
        "natd does not say what its maps take (the flow table the largest):\n{log}"
    );
    let slots = MapInfo::from_pin(pin(&topo, "SLOTS"))?.max_entries();
    assert_eq!(
        slots,
        nat_common::maps::slots_for(1024),
        "the flow cache the first natd made for its table"
    );
    let natctl = second.natctl()?;
    let (replied0, hits0) = (pings.replied(), slot_hits(&topo)?);
    progress(&pings, &transfer)?;
    // Each echo answered since crossed the fast path twice, request and reply, each from its
    // slot of the kept cache but once per refill.
    let replied = pings.replied() - replied0;
    let hits = slot_hits(&topo)? - hits0;
    assert!(
        hits >= replied,
        "{hits} slot hits while {replied} echo requests were answered"
    );
    assert_eq!(status(&natctl)?["flow_capacity"], 2048);
    let flow_after = transfer_flow(&natctl.flows()?.flows, client_port)
        .context("the transfer's flow is not tracked after the upgrade")?;
    assert_eq!(
        (&flow_after.state, &flow_after.origin),
        (&flow_before.state, &flow_before.origin)
    );
    let tally = pings.stop()?;
    assert!(
        tally.missing.is_empty() && tally.foreign.is_empty(),
        "{} echo requests sent: {tally:?}",
        tally.sent
    );
    let later = u64::from(tally.sent) - sent_before;
    let counters_after = natctl.counters(PUBLIC_ADDR)?;
    assert!(
        counters_after.inbound_packets >= counters_before.inbound_packets + later
            && counters_after.outbound_packets >= counters_before.outbound_packets + later,
        "{later} echo requests answered since, counters {counters_before:?} -> {counters_after:?}"
    );
    let t = transfer.stop()?;
    assert_eq!(t.server_peer, t.client_local, "another connection: {t:?}");
    assert_eq!((t.received, t.confirmed), (t.written, t.written), "{t:?}");
    let stats_after = natctl.stats()?;
    // The copied flows carried the traffic: none had to be opened anew.
    assert_eq!(
        stats_after.conntrack.creates, stats_before.conntrack.creates,
        "flows were created again: {:?} -> {:?}",
        stats_before.conntrack, stats_after.conntrack
    );
    fastpath::carried(
        &stats_before,
        &stats_after,
        &[
            Arrived::new("inbound_forwarded", later, "echo requests at the guest"),
            Arrived::new("outbound_forwarded", later, "echo replies at the client"),
        ],
    )
}

/// Pins of a build with fewer verdict reasons and events (counter arrays two slots short,
/// holding known counts): natd re-creates them at its sizes with the counts carried over;
/// `natctl stats` works and shows them, the slots the old arrays lacked start from zero, and
/// new traffic is counted on top.
#[test]
fn smaller_counter_arrays_are_migrated_with_their_counts() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    leave_pins(&topo, ONE_MAPPING_OPEN)?;
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))? as u64;
    let old_reasons = Reason::COUNT - 2;
    let per_cpu = |i: u32| 1000 * u64::from(i + 1);
    replace_with_counters(&topo, "STATS", old_reasons, |i| Counter {
        packets: per_cpu(i),
        bytes: 100 * per_cpu(i),
    })?;
    let flushed = Event::ConntrackFlushed as u32;
    replace_with_counters(&topo, "EVENTS", Event::COUNT - 2, |i| {
        if i == flushed { 7u64 } else { 0 }
    })?;

    let natd = Natd::start(&topo, None)?;
    let log = natd.log_text();
    for line in [
        format!(
            "migrated the pinned STATS: {old_reasons} -> {} slots, the counts of {old_reasons} \
             carried over",
            Reason::COUNT
        ),
        format!(
            "migrated the pinned EVENTS: {} -> {} slots",
            Event::COUNT - 2,
            Event::COUNT
        ),
    ] {
        assert!(log.contains(&line), "the log lacks {line:?}:\n{log}");
    }
    let natctl = natd.natctl()?;
    let before = natctl.stats()?;
    assert_eq!(before.reasons.len(), Reason::COUNT as usize, "{before:?}");
    for r in Reason::ALL {
        let i = r as u32;
        let got = before
            .reasons
            .iter()
            .find(|s| s.reason == r.name())
            .with_context(|| format!("no reason {} in {before:?}", r.name()))?;
        // What the old array held, and at most a little traffic since.
        let carried = if i < old_reasons {
            cpus * per_cpu(i)
        } else {
            0
        };
        assert!(
            (carried..carried + 1000).contains(&got.packets),
            "{}: {} packets, {carried} carried over",
            r.name(),
            got.packets
        );
        if i < old_reasons {
            assert!(got.bytes >= 100 * carried, "{got:?}");
        }
    }
    assert_eq!(before.conntrack.flushed, 7 * cpus, "{:?}", before.conntrack);

    let p = ping(&topo.client, PUBLIC_ADDR, 3, 56)?;
    assert_eq!((p.transmitted, p.received), (3, 3), "{}", p.output);
    fastpath::carried(
        &before,
        &natctl.stats()?,
        &[
            Arrived::new("inbound_forwarded", 3, "echo requests at the guest"),
            Arrived::new("outbound_forwarded", 3, "echo replies at the client"),
        ],
    )
}

/// A pinned map of another value size (a build of another layout) is refused: natd exits
/// non-zero naming the map, what was found and what it wants, and what to run; every pin and
/// the old fast path are as they were, and it still translates.
#[test]
fn a_pinned_map_of_another_value_size_is_refused_and_nothing_changes() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    leave_pins(&topo, ONE_MAPPING_OPEN)?;
    // EVENTS with 16-byte values instead of 8.
    replace_with_counters(&topo, "EVENTS", Event::COUNT, |_| Counter::default())?;
    let before = pins_and_programs(&topo)?;

    let socket = topo.dir.path().join("natd.sock").display().to_string();
    let args = [
        "--public-iface",
        ROUTER_PUBLIC_IF,
        "--guest-iface",
        ROUTER_GUEST_IF,
        "--socket",
        &socket,
    ];
    let (status, output) = Natd::run_to_exit_with(&topo, &args, &["--detach-on-exit"], NATD_START)?;
    assert!(!status.success(), "natd started:\n{output}");
    let dir = Natd::pin_dir(&topo).display().to_string();
    for text in [
        format!(
            "cannot adopt the fast path pinned under {dir}: EVENTS: value size found 16, \
             wanted 8; natd changed nothing."
        ),
        format!("remove {dir}"),
        "--detach-on-exit".to_string(),
    ] {
        assert!(
            output.contains(&text),
            "the output lacks {text:?}:\n{output}"
        );
    }
    assert_eq!(
        pins_and_programs(&topo)?,
        before,
        "natd changed the pins:\n{output}"
    );
    let p = ping(&topo.client, PUBLIC_ADDR, 3, 56)?;
    assert_eq!((p.transmitted, p.received), (3, 3), "{}", p.output);
    assert_eq!(p.reply_from, [PUBLIC_ADDR; 3], "{}", p.output);
    Ok(())
}
