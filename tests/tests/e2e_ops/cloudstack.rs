//! CloudStack payloads: the five example payloads a management server writes to its virtual
//! router (copies in `nat-userspace/tests/data/cloudstack/`), applied with `natctl apply` one by
//! one, and dropped into `natd --cloudstack-dir`. After each step natd holds exactly what
//! CloudStack's router would; a malformed payload is refused whole and changes nothing; a
//! dropped file is handled once, in name order, refused or not, across restarts too.
//!
//! The payloads map 203.0.113.100 and .101 to 10.1.1.10 and .11: a guest on gst1 (10.1.1.1/24)
//! holds 10.1.1.10, so one ping shows an applied mapping and ingress rule at work.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use nat_tests::topology::{
    CLIENT_ADDR, Natctl, Natd, NatdOptions, Netns, ROUTER_GUEST_IF, ROUTER_PUBLIC_IF, Topology,
    links::Link,
    observe::{ICMP_ECHO_REQUEST, IcmpSniffer, ping},
    policy::EgressPolicy,
};
use nat_userspace::{
    cidr::Cidr,
    firewall::{EgressRule, IngressRule, PortRange, Proto, Service},
};

use super::{Desired, pairs};

const P100: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 100);
const P101: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 101);
const V10: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10);
const V11: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 11);
/// The guest network of the payloads.
const CS_GUEST_LINK: Link<'static> = Link {
    router_if: "gst1",
    router_addr: Ipv4Addr::new(10, 1, 1, 1),
    peer_addr: V10,
    prefix: 24,
};
/// The five example payloads in the order CloudStack sends them here.
const PAYLOADS: [&str; 5] = [
    "staticnat_rules.json",
    "firewall_rules.json",
    "firewall_rules_revoke.json",
    "staticnat_rules_revoke.json",
    "egress_rules.json",
];
/// How long natd may take to pick up a dropped file (inotify tells it at once; a loaded
/// machine may be slow to apply it).
const PICKED_UP: Duration = Duration::from_secs(15);

/// A firewall payload whose first rule is fine and whose second has a port out of range.
const BAD_PORT: &str = r#"{"type":"firewallrules","rules":[
    {"id":31,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp","src_port_range":[80,80],"source_cidr_list":["0.0.0.0/0"]},
    {"id":33,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp","src_port_range":[1,70000],"source_cidr_list":["0.0.0.0/0"]}]}"#;
/// A static NAT payload whose first rule is fine and whose second has no IPv4 address.
const BAD_ADDRESS: &str = r#"{"type":"staticnatrules","rules":[
    {"revoke":false,"source_ip_address":"203.0.113.102","destination_ip_address":"10.1.1.12"},
    {"revoke":false,"source_ip_address":"203.0.113.103","destination_ip_address":"10.1.1.300"}]}"#;

/// The directory with the example payloads, in the repository.
fn payload_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nat-userspace/tests/data/cloudstack")
}

/// The example payload `name`.
fn payload(name: &str) -> anyhow::Result<String> {
    let path = payload_dir().join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Writes `text` to `dir/name` the way a writer should for natd to never see half a file: to a
/// temporary name natd skips, then renamed.
pub(super) fn drop_file(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("renaming {}", tmp.display()))
}

fn cidrs(list: &[&str]) -> Vec<Cidr> {
    list.iter()
        .map(|c| c.parse().unwrap_or_else(|e| panic!("{c}: {e}")))
        .collect()
}

fn ports(first: u16, last: u16) -> Option<PortRange> {
    Some(PortRange { first, last })
}

fn service(proto: Proto, ports: Option<PortRange>, icmp: Option<(u8, u8)>) -> Service {
    Service {
        proto,
        ports,
        icmp_type: icmp.map(|i| i.0),
        icmp_code: icmp.map(|i| i.1),
    }
}

/// The ingress rules of `firewall_rules.json`, by id, as natd lists them.
fn ingress(id: u64) -> IngressRule {
    let (public, service, sources) = match id {
        11 => (
            P100,
            service(Proto::Tcp, ports(22, 22), None),
            &["198.51.100.0/24"][..],
        ),
        12 => (
            P100,
            service(Proto::Udp, ports(5000, 5100), None),
            &["0.0.0.0/0"][..],
        ),
        13 => (
            P100,
            service(Proto::Icmp, None, Some((8, 0))),
            &["0.0.0.0/0"][..],
        ),
        14 => (
            P101,
            service(Proto::Icmp, None, None),
            &["192.0.2.0/25", "192.0.2.128/25"][..],
        ),
        15 => (
            P100,
            service(Proto::Tcp, ports(80, 80), None),
            &["0.0.0.0/0"][..],
        ),
        _ => panic!("no ingress rule {id} in the payloads"),
    };
    IngressRule {
        id,
        public,
        service,
        cidrs: cidrs(sources),
    }
}

/// Egress: default allow, with the exceptions `ids` (21 from `egress_rules.json`, 23 from the
/// second marker below).
fn egress(ids: &[u64]) -> EgressPolicy {
    let rule = |id| match id {
        21 => EgressRule {
            id,
            service: service(Proto::Tcp, ports(25, 25), None),
            cidrs: cidrs(&["0.0.0.0/0"]),
            sources: cidrs(&["10.1.1.0/24"]),
        },
        23 => EgressRule {
            id,
            service: service(Proto::Udp, ports(53, 53), None),
            cidrs: cidrs(&["0.0.0.0/0"]),
            sources: cidrs(&["0.0.0.0/0"]),
        },
        _ => panic!("no egress rule {id} in the payloads"),
    };
    EgressPolicy {
        default_allow: true,
        rules: ids.iter().map(|&id| rule(id)).collect(),
        inactive: Vec::new(),
    }
}

/// Mappings, ingress rules and egress policy as natctl lists them.
type Listed = (Vec<(Ipv4Addr, Ipv4Addr)>, Vec<IngressRule>, EgressPolicy);

fn listed(natctl: &Natctl) -> anyhow::Result<Listed> {
    Ok((pairs(natctl)?, natctl.firewall_rules()?, natctl.egress()?))
}

/// The state CloudStack's router has after each of [`PAYLOADS`], in turn.
fn expected_after(step: usize) -> Listed {
    let both = vec![(P100, V10), (P101, V11)];
    let rules = |ids: &[u64]| ids.iter().map(|&id| ingress(id)).collect::<Vec<_>>();
    match step {
        0 => (both, vec![], egress(&[])),
        1 => (both, rules(&[11, 12, 13, 14]), egress(&[])),
        2 => (both, rules(&[12, 13, 14]), egress(&[])),
        // The revoke of 203.0.113.101 leaves its ingress rule 14 in the router's firewall
        // databag: kept, inactive.
        3 => (vec![(P100, V10)], rules(&[12, 13, 14]), egress(&[])),
        4 => (vec![(P100, V10)], rules(&[12, 13, 14]), egress(&[21])),
        _ => panic!("no step {step}"),
    }
}

/// The topology with the payloads' guest on gst1, and natd serving it with `args`.
struct CsRouter {
    // Field order is drop order: natd stops before the namespaces go.
    natd: Natd,
    guest: Netns,
    topo: Topology,
}

fn natd_options(args: &[String]) -> NatdOptions {
    NatdOptions {
        public_ifaces: vec![ROUTER_PUBLIC_IF.into()],
        guest_ifaces: vec![ROUTER_GUEST_IF.into(), CS_GUEST_LINK.router_if.into()],
        args: args.to_vec(),
        ..NatdOptions::default()
    }
}

impl CsRouter {
    fn new(topo: Topology, args: &[String]) -> anyhow::Result<Self> {
        let guest = topo.add_guest("csguest", CS_GUEST_LINK)?;
        let natd = Natd::start_with(&topo, &natd_options(args))?;
        Ok(Self { natd, guest, topo })
    }

    /// A ping from the client to 203.0.113.100 reaches the payloads' guest (rule 13 allows
    /// echo requests) and is answered from 203.0.113.100.
    fn ping_works(&self) -> anyhow::Result<()> {
        let sniffer = IcmpSniffer::open_in(&self.guest)?;
        let p = ping(&self.topo.client, P100, 1, 56)?;
        ensure!(
            (p.transmitted, p.received) == (1, 1) && p.reply_from == [P100],
            "ping 203.0.113.100: {}",
            p.output
        );
        let requests = sniffer.collect(1, |s| s.icmp_type == ICMP_ECHO_REQUEST);
        ensure!(
            requests.len() == 1 && (requests[0].src, requests[0].dst) == (CLIENT_ADDR, V10),
            "echo requests the guest received: {requests:?}"
        );
        Ok(())
    }
}

/// `natctl apply` of the five payloads in turn leaves, after each, exactly CloudStack's
/// router's state: in the end 203.0.113.100 -> 10.1.1.10 only, ingress rules 12 and 13 in
/// force and 14 kept inactive (203.0.113.101 lost its static NAT), egress default allow with
/// exception 21. Malformed payloads (bad port, bad address,
/// truncated JSON) are refused whole, naming the rule and field, and change nothing.
#[test]
fn natctl_apply_of_the_payloads_gives_the_routers_state() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    // natctl reads the copies in the test's own directory.
    let dir = topo.dir.path().join("payloads");
    std::fs::create_dir(&dir)?;
    for name in PAYLOADS {
        std::fs::write(dir.join(name), payload(name)?)?;
    }
    let r = CsRouter::new(topo, &[])?;
    let natctl = r.natd.natctl()?;
    assert_eq!(listed(&natctl)?, (vec![], vec![], egress(&[])), "at start");

    for (step, name) in PAYLOADS.iter().enumerate() {
        let file = dir.join(name).display().to_string();
        let out = natctl.ok(&["apply", &file])?;
        assert!(out.contains(name), "natctl apply {name} printed {out:?}");
        assert_eq!(listed(&natctl)?, expected_after(step), "after {name}");
    }
    assert_eq!(natctl.firewall_states()?, (vec![12, 13], vec![14]));
    assert_eq!(
        r.topo.nft_maps()?.and_then(|m| m.get("dnat_v4").cloned()),
        Some(vec![(P100, V10)])
    );
    r.ping_works()?;

    let before = Desired::of(&r.topo, &natctl)?;
    let truncated = &payload("firewall_rules.json")?[..80];
    let cases: [(&str, &str, &[&str]); 3] = [
        (
            "bad_port.json",
            BAD_PORT,
            &[
                "rule #2 (id 33)",
                "src_port_range",
                "70000 is outside 1-65535",
            ],
        ),
        (
            "bad_address.json",
            BAD_ADDRESS,
            &[
                "rule #2",
                "destination_ip_address",
                "\"10.1.1.300\" is not an IPv4 address",
            ],
        ),
        (
            "truncated.json",
            truncated,
            &["malformed JSON", "line 1 column 80"],
        ),
    ];
    for (name, text, expected) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        let out = natctl.run(&["apply", &path.display().to_string()])?;
        assert!(
            !out.status.success(),
            "natctl apply {name} succeeded: {out:?}"
        );
        for e in expected.iter().chain([&name]) {
            assert!(
                out.stderr.contains(e),
                "{name}: stderr lacks {e:?}: {}",
                out.stderr
            );
        }
        assert_eq!(
            Desired::of(&r.topo, &natctl)?,
            before,
            "after refusing {name}"
        );
    }
    r.ping_works()
}

/// What natd recorded of the files in its `--cloudstack-dir`: name -> (applied, message).
pub(super) fn record(state_dir: &Path) -> anyhow::Result<Vec<(String, bool, String)>> {
    let path = state_dir.join("cloudstack-processed.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let files = v["files"]
        .as_object()
        .with_context(|| format!("{}: no files object: {text}", path.display()))?;
    Ok(files
        .iter()
        .map(|(name, o)| {
            (
                name.clone(),
                o["applied"].as_bool().unwrap_or(false),
                o["message"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// Polls natctl until `done` holds for what it lists, within [`PICKED_UP`].
fn wait_listed(natctl: &Natctl, what: &str, done: impl Fn(&Listed) -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + PICKED_UP;
    loop {
        let l = listed(natctl)?;
        if done(&l) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: not applied within {PICKED_UP:?}; natd lists {l:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// natd --cloudstack-dir applies the files it finds there in name order (the five payloads and
/// a malformed one among them give the router's state only in that order), once each: a
/// refused file is recorded with its reason and not tried again, not even once it became
/// valid; after a restart on the same state directory, files already handled are not applied
/// again (what natctl changed since stays changed) while new ones are.
#[test]
fn natd_applies_dropped_files_once_in_name_order() -> anyhow::Result<()> {
    let topo = Topology::new()?;
    let inbox = topo.dir.path().join("cloudstack");
    std::fs::create_dir(&inbox)?;
    let state_dir = topo.dir.path().join("state");
    // All in place before natd starts, so its first look finds them all.
    let names = [
        ("10-staticnat_rules.json", payload(PAYLOADS[0])?),
        ("20-firewall_rules.json", payload(PAYLOADS[1])?),
        ("25-bad_port.json", BAD_PORT.to_string()),
        ("30-firewall_rules_revoke.json", payload(PAYLOADS[2])?),
        ("40-staticnat_rules_revoke.json", payload(PAYLOADS[3])?),
        ("50-egress_rules.json", payload(PAYLOADS[4])?),
    ];
    for (name, text) in &names {
        drop_file(&inbox, name, text)?;
    }
    let args = vec!["--cloudstack-dir".to_string(), inbox.display().to_string()];
    let mut r = CsRouter::new(topo, &args)?;
    let natctl = r.natd.natctl()?;
    wait_listed(&natctl, "50-egress_rules.json", |l| !l.2.rules.is_empty())?;
    assert_eq!(
        listed(&natctl)?,
        expected_after(4),
        "after the dropped files"
    );
    r.ping_works()?;
    let handled = record(&state_dir)?;
    let summary: Vec<(&str, bool)> = handled
        .iter()
        .map(|(n, applied, _)| (n.as_str(), *applied))
        .collect();
    assert_eq!(
        summary,
        names
            .iter()
            .map(|(n, _)| (*n, !n.contains("bad")))
            .collect::<Vec<_>>(),
        "{handled:#?}"
    );
    let refusal = &handled[2].2;
    assert!(
        refusal.contains("rule #2 (id 33)") && refusal.contains("src_port_range"),
        "the refusal says {refusal:?}"
    );

    // The refused file, now valid, is not tried again; a new file after it is applied.
    drop_file(
        &inbox,
        "25-bad_port.json",
        r#"{"type":"staticnatrules","rules":[{"source_ip_address":"203.0.113.102","destination_ip_address":"10.1.1.12"}]}"#,
    )?;
    drop_file(
        &inbox,
        "60-marker.json",
        r#"{"type":"firewallrules","rules":[{"id":15,"traffic_type":"Ingress","src_ip":"203.0.113.100","protocol":"tcp","src_port_range":[80,80],"source_cidr_list":["0.0.0.0/0"]}]}"#,
    )?;
    wait_listed(&natctl, "60-marker.json", |l| {
        l.1.iter().any(|r| r.id == 15)
    })?;
    let (mappings, rules, _) = listed(&natctl)?;
    assert_eq!(
        mappings,
        [(P100, V10)],
        "the refused file was applied after all"
    );
    assert_eq!(rules, [ingress(12), ingress(13), ingress(14), ingress(15)]);
    assert_eq!(
        record(&state_dir)?[2],
        handled[2],
        "the refusal's record changed"
    );

    // Changed by hand, then natd restarts: handled files are not applied again (rule 12 and
    // the mapping of .101 would come back), a new one is.
    natctl.ok(&["firewall", "del", "12"])?;
    r.natd.terminate()?;
    r.natd = Natd::start_with(&r.topo, &natd_options(&args))?;
    let natctl = r.natd.natctl()?;
    drop_file(
        &inbox,
        "70-marker.json",
        r#"{"type":"firewallrules","rules":[{"id":23,"traffic_type":"Egress","protocol":"udp","src_port_range":[53,53],"dest_cidr_list":["0.0.0.0/0"],"default_egress_policy":true}]}"#,
    )?;
    wait_listed(&natctl, "70-marker.json", |l| {
        l.2.rules.iter().any(|r| r.id == 23)
    })?;
    assert_eq!(
        listed(&natctl)?,
        (
            vec![(P100, V10)],
            vec![ingress(13), ingress(14), ingress(15)],
            egress(&[21, 23])
        ),
        "after the restart"
    );
    let after = record(&state_dir)?;
    assert_eq!(after.len(), names.len() + 2, "{after:#?}");
    assert!(
        after
            .iter()
            .all(|(n, applied, _)| *applied != n.contains("bad")),
        "{after:#?}"
    );
    Ok(())
}
