//! Section 4: the control plane. Time to apply 10,000 and 100,000 mappings with one
//! `natctl apply` of a CloudStack staticnatrules payload and with a loop of `natctl mapping
//! add` (natctl has no batch command), and the time from `natctl mapping add` returning to
//! the first translated packet.
use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};

use crate::{
    natd::binary,
    report::{Chart, Section, Table},
    topo::{CLIENT, P3, Setup, Topo, V3, natd_config},
    traffic::udp_socket,
    util::{self, Summary, show},
    verdict::Target,
};

fn public(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + i)
}

fn private(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i)
}

/// A CloudStack `staticnatrules` payload of `n` mappings.
pub fn payload(n: u32) -> String {
    let mut s = String::from(r#"{"type":"staticnatrules","rules":["#);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            r#"{{"revoke":false,"source_ip_address":"{}","destination_ip_address":"{}"}}"#,
            public(i),
            private(i)
        );
    }
    s.push_str("]}");
    s
}

/// natd's config for `n` mappings: no state, a mapping capacity with room for them (natd's
/// default is 65,536).
fn limits(n: u32) -> String {
    let cap = (n + n / 4).max(nat_common::DEFAULT_MAPPINGS);
    format!("[limits]\nmappings = {cap}\n")
}

/// A number `natctl status --json` reports.
fn status_figure(topo: &Topo, field: &str) -> anyhow::Result<u64> {
    let v: serde_json::Value = serde_json::from_str(&topo.natd()?.natctl(&["status", "--json"])?)?;
    v[field]
        .as_u64()
        .with_context(|| format!("natctl status: no {field}"))
}

fn mapping_count(topo: &Topo) -> anyhow::Result<u64> {
    status_figure(topo, "mappings")
}

/// Seconds one natctl command took (spawn to exit), or its error.
fn timed_natctl(topo: &Topo, args: &[&str]) -> anyhow::Result<f64> {
    let t = Instant::now();
    topo.natd()?.natctl(args)?;
    Ok(t.elapsed().as_secs_f64())
}

/// The kernel memory of each map natd pinned (`memlock` of its fdinfo, as natd logs it at
/// start), largest first.
fn map_memory(topo: &Topo) -> anyhow::Result<Vec<(&'static str, u64)>> {
    let natd = topo.natd()?;
    let mut out = Vec::new();
    for m in nat_common::maps::MAPS {
        let path = natd.pinned_map(m.name);
        if !path.exists() {
            continue;
        }
        let map = aya::maps::MapData::from_pin(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let bytes = nat_userspace::ebpf::memlock(&map)
            .with_context(|| format!("{}: no memlock in its fdinfo", m.name))?;
        out.push((m.name, bytes));
    }
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    Ok(out)
}

/// The memory table and its summary line (`flows`: natd's flow table size).
fn memory_report(maps: &[(&'static str, u64)], flows: u64) -> (Table, String) {
    const MIB: f64 = 1024.0 * 1024.0;
    let total: u64 = maps.iter().map(|(_, b)| b).sum();
    let mut t = Table::new(&["map", "MiB"]);
    for (name, b) in maps {
        t.row(vec![format!("`{name}`"), format!("{:.1}", *b as f64 / MIB)]);
    }
    t.row(vec![
        format!("all {} pinned maps", maps.len()),
        format!("{:.1}", total as f64 / MIB),
    ]);
    let largest: Vec<String> = maps
        .iter()
        .take(3)
        .map(|(name, b)| format!("`{name}` {:.1}", *b as f64 / MIB))
        .collect();
    let line = format!(
        "- natd's maps at its default sizes ({flows} flows, {} mappings) take {:.1} MiB of \
         kernel memory as the kernel counts it, the largest {} MiB.",
        nat_common::DEFAULT_MAPPINGS,
        total as f64 / MIB,
        largest.join(", ")
    );
    (t, line)
}

pub fn section(quick: bool) -> anyhow::Result<Section> {
    let (repeats, sizes, loop_secs): (usize, &[u32], f64) = if quick {
        (2, &[10_000], 10.0)
    } else {
        (5, &[10_000, 100_000], 45.0)
    };
    let mut topo = Topo::new(Setup::Natd)?;
    // natd's flow table size: the default it chose for this machine.
    let flows = status_figure(&topo, "flow_capacity")?;
    let (memory, memory_line) = memory_report(&map_memory(&topo)?, flows);
    let mut t = Table::new(&[
        "operation",
        "mappings",
        "seconds",
        "natd CPU, s",
        "mappings/s",
        "runs ok",
    ]);
    let mut bars = Vec::new();
    let mut failures = String::new();
    let mut target = Vec::new();
    for &n in sizes {
        let file = std::env::temp_dir().join(format!(
            "{}-staticnat-{n}.json",
            crate::netns::unique_stem()
        ));
        std::fs::write(&file, payload(n))?;
        let file_arg = file.display().to_string();
        let reps = if n > 10_000 { repeats.min(3) } else { repeats };
        let (mut secs, mut cpu) = (Vec::new(), Vec::new());
        for r in 0..reps {
            util::check_interrupted()?;
            eprintln!("bench: control: apply {n} mappings, run {}", r + 1);
            topo.restart_natd(Some(&limits(n)))?;
            let cpu0 = topo.natd()?.cpu_secs()?;
            match timed_natctl(&topo, &["apply", &file_arg]) {
                Ok(s) => {
                    cpu.push(topo.natd()?.cpu_secs()? - cpu0);
                    let got = mapping_count(&topo)?;
                    ensure!(
                        got == u64::from(n),
                        "natctl apply of {n} mappings left {got} installed"
                    );
                    secs.push(s);
                }
                Err(e) => {
                    let _ = writeln!(
                        failures,
                        "- `natctl apply` of {n} mappings failed (run {}): {e:#}",
                        r + 1
                    );
                }
            }
        }
        let _ = std::fs::remove_file(&file);
        let rate: Vec<f64> = secs.iter().map(|s| f64::from(n) / s).collect();
        t.row(vec![
            "natctl apply (one staticnatrules payload)".into(),
            n.to_string(),
            show(Summary::of(&secs), 3),
            show(Summary::of(&cpu), 2),
            show(Summary::of(&rate), 0),
            format!("{}/{reps}", secs.len()),
        ]);
        if let Some(s) = Summary::of(&secs) {
            bars.push((format!("apply {n}"), s));
        }
        if n == 10_000 {
            // Every run counts: one that failed missed the target.
            target.push(
                Target {
                    name: "10,000 mappings in under 1 s (`natctl apply`)",
                    limit: 1.0,
                    below: true,
                    unit: "s",
                }
                .line(&secs, reps - secs.len()),
            );
            target.push(
                Target {
                    name: "10,000 mappings in under 1 s of natd's CPU time (`natctl apply`)",
                    limit: 1.0,
                    below: true,
                    unit: "s",
                }
                .line(&cpu, reps - cpu.len()),
            );
        }
    }
    // A loop of `natctl mapping add`, bounded in time.
    eprintln!("bench: control: loop of natctl mapping add for up to {loop_secs} s");
    topo.restart_natd(Some(&limits(10_000)))?;
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut added = 0u32;
    while added < 10_000 && start.elapsed().as_secs_f64() < loop_secs {
        util::check_interrupted()?;
        let (p, v) = (public(added).to_string(), private(added).to_string());
        lat.push(timed_natctl(&topo, &["mapping", "add", &p, &v])?);
        added += 1;
    }
    let total = start.elapsed().as_secs_f64();
    let last: Vec<f64> = lat.iter().rev().take(100).map(|s| s * 1e3).collect();
    let first: Vec<f64> = lat.iter().take(100).map(|s| s * 1e3).collect();
    t.row(vec![
        format!("loop of natctl mapping add (stopped after {loop_secs} s or 10,000)"),
        added.to_string(),
        format!("{total:.1}"),
        String::new(),
        format!("{:.0}", f64::from(added) / total),
        "1/1".into(),
    ]);
    // natd's own shutdown with that many mappings (SIGTERM, --detach-on-exit).
    let shutdown = match topo.natd.as_mut() {
        Some(n) => n.terminate(Duration::from_secs(300)),
        None => Ok(Duration::ZERO),
    };
    topo.natd = None;
    let shutdown_note = match shutdown {
        Ok(d) => format!(
            "- natd's shutdown (SIGTERM, `--detach-on-exit`) with those {added} mappings took \
             {:.1} s ({:.1} ms per mapping).\n",
            d.as_secs_f64(),
            d.as_secs_f64() * 1e3 / f64::from(added.max(1))
        ),
        Err(e) => format!("- natd's shutdown with {added} mappings: {e:#}\n"),
    };
    let loop_note = format!(
        "- The loop added {added} mappings in {total:.1} s; one `natctl mapping add` took \
         {} ms for the first 100 and {} ms for the last 100 (median (min–max)): {}.\n",
        show(Summary::of(&first), 1),
        show(Summary::of(&last), 1),
        growth(&first, &last)
    );
    // First translated packet after `natctl mapping add` returns.
    eprintln!("bench: control: first translated packet");
    topo.restart_natd(Some(&natd_config()))?;
    let (after_return, natctl_secs) = first_packet(&topo, repeats)?;
    let mut t2 = Table::new(&["", "ms"]);
    t2.row(vec![
        "`natctl mapping add` (spawn to exit)".into(),
        show(Summary::of(&natctl_secs), 2),
    ]);
    t2.row(vec![
        "first translated packet at the client, after natctl returned (negative: before)".into(),
        show(Summary::of(&after_return), 2),
    ]);
    let _ = binary("natctl")?;
    Ok(Section {
        title: "4. Control plane".into(),
        intro: format!(
            "natd (release build) on the three-namespace topology, started afresh (empty state) \
             for each run, its mapping capacity (`[limits] mappings`) at least 65,536 and a \
             quarter above N. 'natctl apply': one CloudStack `staticnatrules` payload with N \
             mappings (public 100.64.x.y -> private 10.128.x.y), timed from spawning natctl to \
             its exit, after which `natctl status` must report N mappings; beside it the CPU time \
             natd and its children (`nft`) spent meanwhile (user + system, from \
             `/proc/PID/stat`, 10 ms resolution), which the machine's load does not stretch as \
             it does the wall clock. natctl has no batch command for mappings, so the other figure is a loop of `natctl mapping add` (one \
             process and one natd change per mapping), bounded to {loop_secs} s. Median \
             (min–max) over the runs."
        ),
        tables: vec![
            (String::new(), t),
            (
                format!(
                    "Time to the first translated packet ({repeats} runs): the guest (V3) streams \
                     UDP to the client every ~20 µs while V3 is unmapped (the router forwards \
                     it untranslated); `natctl mapping add {P3} {V3}` is run, and the client \
                     records when the first packet with source {P3} arrives. Between runs the \
                     mapping is deleted again and natd's flow table flushed (a deleted mapping \
                     keeps its flows: the stream's would go on being translated)."
                ),
                t2,
            ),
            (
                format!(
                    "Kernel memory of natd's maps, natd started at its default sizes (a flow \
                     table of {flows} flows, as `natctl status` reports it on this machine; \
                     `[limits] mappings` {}): each pinned map's `memlock` in its fdinfo, what \
                     the kernel charges for it (natd logs the same at start):",
                    nat_common::DEFAULT_MAPPINGS
                ),
                memory,
            ),
        ],
        notes: target.join("\n")
            + "\n"
            + &memory_line
            + "\n\n"
            + &failures
            + &loop_note
            + &shutdown_note,
        summary: target.into_iter().chain([memory_line]).collect(),
        charts: vec![Chart {
            file: "control.svg".into(),
            title: "Time to apply N mappings with one natctl apply".into(),
            unit: "seconds".into(),
            bars,
        }],
    })
}

/// Whether one add cost more at the end of the loop than at its start: only if the last
/// hundred's fastest add was slower than the first hundred's slowest.
fn growth(first: &[f64], last: &[f64]) -> String {
    match (Summary::of(first), Summary::of(last)) {
        (Some(f), Some(l)) if l.min > f.max => format!(
            "the cost per add grew with the number of mappings ({:.1}x by the medians)",
            l.median / f.median
        ),
        (Some(_), Some(_)) => "the two ranges overlap: no clear growth".into(),
        _ => "too few adds to compare".into(),
    }
}

/// Per run: (ms from natctl's return to the first translated packet, ms natctl took).
fn first_packet(topo: &Topo, runs: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let natd = topo.natd()?;
    let rx = udp_socket(&topo.client, CLIENT, 7101)?;
    let tx = udp_socket(&topo.guest, V3, 7100)?;
    tx.connect(SocketAddr::from((CLIENT, 7101)))?;
    let stop = AtomicBool::new(false);
    let first_p3 = AtomicU64::new(0);
    let seen_v3 = AtomicU64::new(0);
    let (mut after, mut took) = (Vec::new(), Vec::new());
    std::thread::scope(|s| -> anyhow::Result<()> {
        s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = tx.send(&n.to_be_bytes());
                n += 1;
                std::thread::sleep(Duration::from_micros(20));
            }
        });
        s.spawn(|| {
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((_, from)) = rx.recv_from(&mut buf) {
                    let now = util::monotonic_ns();
                    match from.ip() {
                        std::net::IpAddr::V4(a) if a == P3 => {
                            let _ = first_p3.compare_exchange(
                                0,
                                now,
                                Ordering::SeqCst,
                                Ordering::SeqCst,
                            );
                        }
                        std::net::IpAddr::V4(a) if a == V3 => seen_v3.store(now, Ordering::SeqCst),
                        _ => {}
                    }
                }
            }
        });
        let result = (|| -> anyhow::Result<()> {
            let (p, v) = (P3.to_string(), V3.to_string());
            for _ in 0..runs {
                util::check_interrupted()?;
                // Untranslated packets must be arriving before the mapping exists.
                let armed = util::monotonic_ns();
                let end = Instant::now() + Duration::from_secs(5);
                while seen_v3.load(Ordering::SeqCst) <= armed {
                    ensure!(
                        Instant::now() < end,
                        "no untranslated packets from {V3} reach the client"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                first_p3.store(0, Ordering::SeqCst);
                let t0 = util::monotonic_ns();
                let mut c = Command::new(binary("natctl")?);
                c.arg("--socket")
                    .arg(&natd.socket)
                    .args(["mapping", "add", &p, &v]);
                util::run(&mut c)?;
                let t1 = util::monotonic_ns();
                let end = Instant::now() + Duration::from_secs(5);
                let first = loop {
                    match first_p3.load(Ordering::SeqCst) {
                        0 => {
                            ensure!(
                                Instant::now() < end,
                                "no translated packet within 5 s of mapping add"
                            );
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        t => break t,
                    }
                };
                after.push((first as f64 - t1 as f64) / 1e6);
                took.push((t1 - t0) as f64 / 1e6);
                // A deleted mapping keeps its flows (the stream's flow would go on being
                // translated): flushed, so the next run starts untranslated again.
                natd.natctl(&["mapping", "del", &p])?;
                natd.natctl(&["conntrack", "flush"])?;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    Ok((after, took))
}

#[cfg(test)]
mod tests {
    use super::growth;

    #[test]
    fn growth_only_when_the_ranges_do_not_overlap() {
        assert!(growth(&[20.0, 30.0], &[40.0, 50.0]).starts_with("the cost per add grew"));
        assert!(growth(&[20.0, 45.0], &[40.0, 50.0]).contains("no clear growth"));
        assert!(growth(&[], &[1.0]).contains("too few"));
    }
}
