//! `natd --cloudstack-dir` as files really arrive: a file still being written is not taken
//! (natd waits for its writer to close it, while files after it are applied), and a file natd
//! failed to apply is tried again, the files after it waiting their turn, until the cause is
//! gone; neither is recorded as handled before it was applied.
use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{GUEST_ADDR, Natctl, Natd, NatdOptions, PUBLIC_ADDR, Topology};

use super::{
    cloudstack::{drop_file, record},
    pairs,
};

/// How long natd may take to apply a file, a retry after a failure included.
const APPLIED: Duration = Duration::from_secs(20);
/// A public IP in none of the router's public subnets until the test adds 192.0.2.0/24.
const NO_SUBNET: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 77);
/// A second mapping, for a file that arrives after another.
const OTHER_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const OTHER_PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);

fn static_nat(public: Ipv4Addr, private: Ipv4Addr) -> String {
    format!(
        r#"{{"type":"staticnatrules","rules":[{{"revoke":false,"source_ip_address":"{public}","destination_ip_address":"{private}"}}]}}"#
    )
}

fn firewall(id: u64, public: Ipv4Addr) -> String {
    format!(
        r#"{{"type":"firewallrules","rules":[{{"id":{id},"traffic_type":"Ingress","src_ip":"{public}","protocol":"udp","src_port_range":[7000,7000],"source_cidr_list":["0.0.0.0/0"],"revoked":false}}]}}"#
    )
}

/// natd with `--cloudstack-dir` (and `extra` flags); returns it, the inbox and the state
/// directory.
fn natd_with_inbox(topo: &Topology, extra: &[&str]) -> anyhow::Result<(Natd, PathBuf, PathBuf)> {
    let inbox = topo.dir.path().join("cloudstack");
    std::fs::create_dir(&inbox)?;
    let mut args = vec!["--cloudstack-dir".to_string(), inbox.display().to_string()];
    args.extend(extra.iter().map(|a| a.to_string()));
    let natd = Natd::start_with(
        topo,
        &NatdOptions {
            args,
            ..NatdOptions::default()
        },
    )?;
    Ok((natd, inbox, topo.dir.path().join("state")))
}

/// Polls until `done` holds, within [`APPLIED`].
fn wait(natd: &Natd, what: &str, done: impl Fn() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + APPLIED;
    while !done()? {
        ensure!(
            Instant::now() < deadline,
            "{what}: not within {APPLIED:?}\n{}",
            natd.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The names natd recorded as handled, with whether each was applied.
fn handled(state_dir: &Path) -> anyhow::Result<Vec<(String, bool)>> {
    if !state_dir.join("cloudstack-processed.json").exists() {
        return Ok(Vec::new());
    }
    Ok(record(state_dir)?
        .into_iter()
        .map(|(n, applied, _)| (n, applied))
        .collect())
}

fn rule_ids(natctl: &Natctl) -> anyhow::Result<Vec<u64>> {
    Ok(natctl.firewall_rules()?.iter().map(|r| r.id).collect())
}

/// A payload written in place in two goes: natd does not take the first half (which would be
/// refused as malformed JSON, for good), applies a complete file that comes after it, and takes
/// the first one when its writer closes it.
#[test]
fn a_file_is_taken_once_its_writer_closed_it() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let (natd, inbox, state_dir) = natd_with_inbox(&topo, &[])?;
    let natctl = natd.natctl()?;
    let text = static_nat(PUBLIC_ADDR, GUEST_ADDR);
    let (first, rest) = text.split_at(text.len() / 2);
    let path = inbox.join("10-staticnat.json");
    let mut writer =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    writer.write_all(first.as_bytes())?;
    writer.flush()?;

    drop_file(
        &inbox,
        "20-staticnat.json",
        &static_nat(OTHER_PUBLIC, OTHER_PRIVATE),
    )?;
    // natd records a file after applying it: wait for both, then look at what it recorded.
    wait(&natd, "20-staticnat.json applied and recorded", || {
        Ok(pairs(&natctl)? == [(OTHER_PUBLIC, OTHER_PRIVATE)]
            && handled(&state_dir)?
                .iter()
                .any(|(n, _)| n == "20-staticnat.json"))
    })?;
    ensure!(
        handled(&state_dir)? == [("20-staticnat.json".to_string(), true)],
        "natd handled the half-written file: {:?}",
        record(&state_dir)?
    );

    writer.write_all(rest.as_bytes())?;
    drop(writer);
    wait(&natd, "10-staticnat.json applied and recorded", || {
        Ok(pairs(&natctl)?.len() == 2 && handled(&state_dir)?.len() == 2)
    })?;
    assert_eq!(
        pairs(&natctl)?,
        [(PUBLIC_ADDR, GUEST_ADDR), (OTHER_PUBLIC, OTHER_PRIVATE)]
    );
    assert_eq!(
        handled(&state_dir)?,
        [
            ("10-staticnat.json".to_string(), true),
            ("20-staticnat.json".to_string(), true)
        ]
    );
    Ok(())
}

/// natd cannot put a public IP outside its public subnets on the interface
/// (`--manage-addresses`): applying the static NAT fails (nothing changes), is not recorded,
/// and is tried again, the firewall file after it waiting its turn; once the router has that
/// subnet, both apply, in order.
#[test]
fn a_file_natd_failed_to_apply_is_tried_again_in_order() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let (natd, inbox, state_dir) = natd_with_inbox(&topo, &["--manage-addresses"])?;
    let natctl = natd.natctl()?;
    drop_file(
        &inbox,
        "10-staticnat.json",
        &static_nat(NO_SUBNET, GUEST_ADDR),
    )?;
    drop_file(&inbox, "20-firewall.json", &firewall(16, NO_SUBNET))?;
    wait(&natd, "a failed try of 10-staticnat.json", || {
        Ok(natd.log_text().contains("trying 10-staticnat.json again"))
    })?;
    let log = natd.log_text();
    ensure!(
        log.contains("192.0.2.77 is in no subnet"),
        "the failure's cause is not logged:\n{log}"
    );
    ensure!(
        handled(&state_dir)?.is_empty(),
        "recorded before it applied: {:?}",
        record(&state_dir)?
    );
    ensure!(pairs(&natctl)?.is_empty(), "a mapping appeared");
    ensure!(
        rule_ids(&natctl)?.is_empty(),
        "20-firewall.json did not wait"
    );

    topo.router
        .ip(&["addr", "add", "192.0.2.1/24", "dev", "pub0"])?;
    wait(&natd, "both files applied", || {
        Ok(handled(&state_dir)?.len() == 2)
    })?;
    assert_eq!(
        handled(&state_dir)?,
        [
            ("10-staticnat.json".to_string(), true),
            ("20-firewall.json".to_string(), true)
        ]
    );
    assert_eq!(pairs(&natctl)?, [(NO_SUBNET, GUEST_ADDR)]);
    assert_eq!(natctl.firewall_states()?, (vec![16], vec![]));
    Ok(())
}
