//! The slow path: an nftables table of natd's own that translates exactly what the XDP program
//! translates, for every frame the program passes to the kernel (fragments above all; the kernel
//! reassembles before NAT), and gives it the same verdict: what the tc marker marked as part of
//! a flow the fast path admitted ([`FASTPATH_MARK`]) is accepted, the rest meets the same rules
//! as in the fast path. Routing by the public IP's network ([`crate::policy_routing`]) is done
//! with marks set here. The table is replaced whole in one `nft -f` transaction; nothing
//! outside it is touched but natd's own policy rules.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use log::warn;

use nat_api::SlowPathCounter;
use nat_common::marks::{FASTPATH_MARK, ROUTE_MARK_MASK};

use crate::{
    cidr::Cidr,
    firewall::{Proto, Service},
    kernel_conntrack::{self, Selection},
    policy_routing::{self, RoutePlan, RoutingError},
    state::{DesiredState, Mapping},
};

mod protocols;
pub use protocols::{COUNTERS, KernelTrackers};

/// Name of natd's table in the `ip` family.
pub const TABLE: &str = "xdp_static_nat";

#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error("cannot run nft (is the nftables package installed?): {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
    #[error("public addresses: {0}")]
    Addresses(#[from] crate::addresses::AddressError),
    #[error("policy routing: {0}")]
    Routing(#[from] RoutingError),
    #[error("reading natd's nftables counters: {0}")]
    Counters(String),
}

/// Priority of the chain that drops what is addressed to a private address from the public
/// side and sets the routing marks: after conntrack (-200) and before the NAT of the
/// prerouting hook (-100), so it sees every packet's addresses as they arrived (a reply's
/// destination is still P), and after the `mangle` priority (-150) where a router's own
/// iptables (CloudStack's `CONNMARK --restore-mark`) writes the marks.
const ROUTE_PRIORITY: i32 = -140;

/// Priority of the chain that judges what arrives for a mapped public IP: after the NAT of the
/// prerouting hook (-100), and before the kernel routes the packet, so a packet the ingress
/// rules deny is dropped before the kernel could answer for it (time exceeded for TTL 1,
/// unreachable), as the XDP program drops it before anything else.
const JUDGE_PRIORITY: i32 = -90;

/// Each mapped public IP's own public interface (by name), where the kernel takes new inbound
/// flows to it; IPs whose network no single public interface holds are absent (taken on any).
pub type Homes = BTreeMap<Ipv4Addr, String>;

/// [`Homes`] of the mappings of `state`: the public interface whose IPv4 networks hold the
/// public IP, if exactly one does (the rule the XDP program's `NatValue::ifindex` follows).
pub fn homes(public_ifaces: &[String], state: &DesiredState) -> Homes {
    // Each interface's networks read once, not once per mapping.
    let networks: Vec<(&String, Vec<(Ipv4Addr, u32)>)> = public_ifaces
        .iter()
        .map(|i| (i, crate::ebpf::iface_subnets(i)))
        .collect();
    let holds = |nets: &[(Ipv4Addr, u32)], ip: Ipv4Addr| {
        nets.iter()
            .any(|(a, mask)| u32::from(*a) & mask == u32::from(ip) & mask)
    };
    state
        .mappings()
        .filter_map(|m| {
            let mut owners = networks.iter().filter(|(_, n)| holds(n, m.public));
            match (owners.next(), owners.next()) {
                (Some((i, _)), None) => Some((m.public, (*i).clone())),
                _ => None,
            }
        })
        .collect()
}

/// Renders the whole table: DNAT P -> V for what arrives on a public interface, SNAT V -> P for
/// what leaves through one (the scope the XDP program uses), hairpin (a guest to a mapped P:
/// DNAT, and the source masqueraded to the router's guest-side address), the router's own
/// traffic to a mapped P (DNAT in the output hook, as the CloudStack router's `OUTPUT -d P -j
/// DNAT`), and the same policy in the forward hook: what the tc marker marked as part of a
/// fast-path flow passes, established and related flows pass, each mapped public IP accepts
/// what its active ingress rules allow and drops the rest, mapped guests' traffic to the
/// public side obeys the egress policy (source, destination, service). What arrives on a
/// public interface addressed to a mapped private address is dropped, as the XDP program drops
/// it (`direct_to_private`). The connections of the mappings `routes` covers get their routing
/// mark ([`route_section`]). A new connection to a mapped public IP arriving on a public
/// interface other than the IP's own (`homes`) is dropped, as the XDP program drops it
/// (`wrong_network`). The ingress rules judge in the prerouting hook ([`JUDGE_PRIORITY`]),
/// before the kernel routes, so a denied packet draws no answer from the kernel either. The
/// kernel reassembles fragments before these hooks, so a fragmented packet meets exactly the
/// rules an unfragmented one does (and carries the mark of its first fragment). UDP-Lite and
/// DCCP, which the kernel's trackers of `trackers` cannot always translate, are translated
/// statelessly or dropped, and nothing from a mapped private address leaves a public interface
/// untranslated ([`protocols`]). Interface names are quoted; natd checked they exist, so they
/// contain no quote.
pub fn render(
    public_ifaces: &[String],
    guest_ifaces: &[String],
    state: &DesiredState,
    routes: &RoutePlan,
    homes: &Homes,
    trackers: KernelTrackers,
) -> String {
    let set = |items: &[String]| {
        items
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (pubs, guests) = (set(public_ifaces), set(guest_ifaces));
    let elements = |e: Vec<String>| {
        if e.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", e.join(", "))
        }
    };
    let ms: Vec<_> = state.mappings().collect();
    let dnat = elements(
        ms.iter()
            .map(|m| format!("{} : {}", m.public, m.private))
            .collect(),
    );
    let snat = elements(
        ms.iter()
            .map(|m| format!("{} : {}", m.private, m.public))
            .collect(),
    );
    let publics = elements(ms.iter().map(|m| m.public.to_string()).collect());
    let privates = elements(ms.iter().map(|m| m.private.to_string()).collect());
    let homed = elements(homes.keys().map(ToString::to_string).collect());
    let home_pairs = elements(
        homes
            .iter()
            .map(|(p, i)| format!("{p} . \"{i}\""))
            .collect(),
    );
    let wrong_network = if homes.is_empty() {
        String::new()
    } else {
        format!(
            "\t\tct state new iifname {{ {pubs} }} ip daddr @homed ip daddr . iifname != @homes \
             drop\n"
        )
    };

    let mut ingress = String::new();
    for r in state.active_ingress_rules() {
        let r = &r.rule;
        let _ = writeln!(
            ingress,
            "\t\tct original ip daddr {}{}{} accept comment \"rule {}\"",
            r.public,
            addr_match("saddr", &r.cidrs),
            service_match(&r.service),
            r.id
        );
    }
    let allow = state.egress_default_allow();
    let (exception, default) = if allow {
        ("drop", "accept")
    } else {
        ("accept", "drop")
    };
    let mut egress = String::new();
    for r in state.active_egress_rules() {
        let r = &r.rule;
        let m = format!(
            "{}{}{}",
            addr_match("saddr", &r.sources),
            addr_match("daddr", &r.cidrs),
            service_match(&r.service)
        );
        let _ = writeln!(
            egress,
            "\t\t{} {exception} comment \"rule {}\"",
            m.trim_start(),
            r.id
        );
    }
    let (route_defs, route_rules) = route_section(&pubs, &guests, routes);
    let untranslatable = protocols::render(&pubs, &guests, trackers);
    let fastpath = FASTPATH_MARK;
    format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tmap dnat_v4 {{ type ipv4_addr : ipv4_addr;{dnat} }}\n\
         \tmap snat_v4 {{ type ipv4_addr : ipv4_addr;{snat} }}\n\
         \tset publics {{ type ipv4_addr;{publics} }}\n\
         \tset privates {{ type ipv4_addr;{privates} }}\n\
         \tset homed {{ type ipv4_addr;{homed} }}\n\
         \tset homes {{ type ipv4_addr . ifname;{home_pairs} }}\n\
         {route_defs}\
         \tchain route {{\n\
         \t\ttype filter hook prerouting priority {ROUTE_PRIORITY}; policy accept;\n\
         \t\tiifname {{ {pubs} }} ip daddr @privates drop\n\
         {wrong_network}\
         {route_rules}\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tiifname {{ {pubs} }} dnat ip to ip daddr map @dnat_v4\n\
         \t\tiifname {{ {guests} }} dnat ip to ip daddr map @dnat_v4\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tdnat ip to ip daddr map @dnat_v4\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname {{ {pubs} }} snat ip to ip saddr map @snat_v4\n\
         \t\tiifname {{ {guests} }} oifname {{ {guests} }} ct original ip daddr @publics masquerade\n\
         \t}}\n\
         \tchain judge {{\n\
         \t\ttype filter hook prerouting priority {JUDGE_PRIORITY}; policy accept;\n\
         \t\tmeta mark and {fastpath:#x} == {fastpath:#x} accept\n\
         \t\tiifname {{ {pubs} }} ct original ip daddr @publics jump ingress\n\
         \t\tiifname {{ {guests} }} ct original ip daddr @publics jump ingress\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tmeta mark and {fastpath:#x} == {fastpath:#x} accept\n\
         \t\tiifname {{ {pubs} }} ip daddr @publics drop\n\
         \t\tiifname {{ {guests} }} oifname {{ {pubs} }} ip saddr @privates jump egress\n\
         \t}}\n\
         \tchain ingress {{\n\
         \t\tct state established,related accept\n\
         {ingress}\
         \t\tdrop\n\
         \t}}\n\
         \tchain egress {{\n\
         \t\tct state established,related accept\n\
         {egress}\
         \t\t{default}\n\
         \t}}\n\
         {untranslatable}\
         }}\n"
    )
}

/// The routing marks of [`crate::policy_routing`]: the chains and maps (before the `route`
/// chain, which refers to them) and the rules of the `route` chain. Group `i`'s chain `route_i`
/// puts its mark in the connection mark of a new connection to one of its public IPs arriving
/// on a public interface, or from one of its private addresses arriving on a guest interface
/// and not to a mapped public IP (hairpin is routed by its private addresses, as in the fast
/// path); `mark_i` copies the mark into the packet's mark for every packet of such a
/// connection arriving on a guest interface, which the kernel routes next. Both keep the
/// other bits of the marks. UDP-Lite the table translates statelessly has no connection to
/// carry a mark: from a guest interface, `mark_i` marks it by its private source.
fn route_section(pubs: &str, guests: &str, routes: &RoutePlan) -> (String, String) {
    if routes.groups.is_empty() {
        return (String::new(), String::new());
    }
    let keep = !ROUTE_MARK_MASK;
    let mut defs = String::new();
    let (mut ins, mut outs, mut marks, mut stateless) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, g) in routes.groups.iter().enumerate() {
        let (n, mark) = (i + 1, g.rule.mark);
        let _ = write!(
            defs,
            "\tchain route_{n} {{\n\t\tct mark set ct mark and {keep:#x} or {mark:#x}\n\t}}\n\
             \tchain mark_{n} {{\n\t\tmeta mark set meta mark and {keep:#x} or {mark:#x}\n\t}}\n"
        );
        for m in &g.mappings {
            ins.push(format!("{} : jump route_{n}", m.public));
            outs.push(format!("{} : jump route_{n}", m.private));
            stateless.push(format!("{} : jump mark_{n}", m.private));
        }
        marks.push(format!("{mark:#x} : jump mark_{n}"));
    }
    let _ = write!(
        defs,
        "\tmap route_in {{ type ipv4_addr : verdict; elements = {{ {} }} }}\n\
         \tmap route_out {{ type ipv4_addr : verdict; elements = {{ {} }} }}\n\
         \tmap mark_out {{ type ipv4_addr : verdict; elements = {{ {} }} }}\n",
        ins.join(", "),
        outs.join(", "),
        stateless.join(", ")
    );
    let rules = format!(
        "\t\tct state new iifname {{ {pubs} }} ip daddr vmap @route_in\n\
         \t\tct state new iifname {{ {guests} }} ip daddr != @publics ip saddr vmap @route_out\n\
         \t\tiifname {{ {guests} }} ct mark and {ROUTE_MARK_MASK:#x} vmap {{ {} }}\n\
         \t\tmeta l4proto udplite ct state untracked iifname {{ {guests} }} ip daddr != @publics \
         ip saddr vmap @mark_out\n",
        marks.join(", ")
    );
    (defs, rules)
}

/// ` ip saddr { ... }` for the CIDRs, or nothing when one of them is 0.0.0.0/0.
fn addr_match(field: &str, cidrs: &[Cidr]) -> String {
    if cidrs.is_empty() || cidrs.iter().any(Cidr::is_any) {
        return String::new();
    }
    let list = cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!(" ip {field} {{ {list} }}")
}

/// The protocol part of a rule.
fn service_match(s: &Service) -> String {
    match s.proto {
        Proto::Tcp | Proto::Udp => match s.ports {
            Some(p) if p.first == p.last => format!(" {} dport {}", s.proto, p.first),
            Some(p) => format!(" {} dport {}-{}", s.proto, p.first, p.last),
            None => format!(" meta l4proto {}", s.proto),
        },
        Proto::Icmp => match (s.icmp_type, s.icmp_code) {
            (Some(t), Some(c)) => format!(" icmp type {t} icmp code {c}"),
            (Some(t), None) => format!(" icmp type {t}"),
            _ => " meta l4proto icmp".to_string(),
        },
        Proto::All => String::new(),
    }
}

/// Where natd writes its slow-path rules; a trait so the reconciler can be tested without nft.
pub trait SlowPath {
    /// Atomically replaces natd's table with the rules for `state`.
    fn replace(&mut self, state: &DesiredState) -> Result<(), NetfilterError>;
    /// Installs the table for `state` again if what it derives from the kernel (the policy
    /// rules the routing marks follow) changed, and natd's policy rules; says whether the
    /// table was installed again.
    fn refresh(&mut self, _state: &DesiredState) -> Result<bool, NetfilterError> {
        Ok(false)
    }
    /// Removes natd's table and policy rules, if present.
    fn remove(&mut self) -> Result<(), NetfilterError>;
    /// Forgets the kernel's connection-tracking entries of removed mappings, so flows the
    /// slow path translated stop being translated with them (best effort, logged).
    fn forget(&mut self, removed: &[Mapping]);
    /// Forgets the kernel's connection-tracking entries of the public IPs `publics`, mapped or
    /// not (any more): flows DNATed from one (its original destination) or SNATed to one (its
    /// reply destination). Best effort, logged.
    fn forget_publics(&mut self, publics: &[Ipv4Addr]);
}

/// Removed mappings whose kernel flows are forgotten before a change is acknowledged.
const FORGET_INLINE: usize = 64;

/// The kernel's flows of removed mappings: inbound flows were DNATed from P (their original
/// destination), outbound ones SNATed from V (their original source).
fn mapping_flows(removed: &[Mapping]) -> Selection {
    Selection {
        orig_dst: removed.iter().map(|m| m.public).collect(),
        orig_src: removed.iter().map(|m| m.private).collect(),
        ..Selection::default()
    }
}

/// The kernel's flows of the public IPs `publics`: DNATed from one (its original destination)
/// or SNATed to one (its reply destination).
fn public_flows(publics: &[Ipv4Addr]) -> Selection {
    Selection {
        orig_dst: publics.iter().copied().collect(),
        reply_dst: publics.iter().copied().collect(),
        ..Selection::default()
    }
}

/// Deletes the kernel's flows `sel` selects (those of `n` `what`), logging what it could not.
fn forget_selected(sel: &Selection, n: usize, what: &str) -> usize {
    match kernel_conntrack::delete(sel) {
        Ok(deleted) => deleted,
        Err(e) => {
            warn!("forgetting the kernel's flows of {n} {what}: {e}");
            0
        }
    }
}

/// The real slow path, through the `nft` command, and natd's policy rules.
pub struct Nft {
    pub public_ifaces: Vec<String>,
    pub guest_ifaces: Vec<String>,
    /// `--manage-addresses`: keep mapped public IPs on the public interfaces.
    pub manage_addresses: bool,
    /// natd's own table and policy rules are installed. Off with `--slow-path none` (the
    /// default of `--policy kernel`: a CloudStack router's own rules translate and judge
    /// what the kernel gets, and two NAT tables at the same hooks would fight).
    pub table: bool,
    /// The routing plan installed with the table.
    routes: RoutePlan,
}

impl Nft {
    pub fn new(
        public_ifaces: Vec<String>,
        guest_ifaces: Vec<String>,
        manage_addresses: bool,
    ) -> Self {
        Nft {
            public_ifaces,
            guest_ifaces,
            manage_addresses,
            table: true,
            routes: RoutePlan::default(),
        }
    }

    /// The same without natd's own table and policy rules (`--slow-path none`).
    pub fn without_table(mut self) -> Self {
        self.table = false;
        self
    }

    /// The routing plan for `state` under the kernel's policy rules now.
    fn plan(state: &DesiredState) -> Result<RoutePlan, NetfilterError> {
        let (rules, existing) = policy_routing::rules()?;
        let plan = RoutePlan::of(state.mappings(), &rules, &existing);
        if !plan.unmarked.is_empty() {
            warn!(
                "policy routing: more than {} policy rules route mapped public IPs; the kernel \
                 routes what it translates of {} mapping(s) by their private address",
                nat_common::marks::MAX_ROUTE_MARKS,
                plan.unmarked.len()
            );
        }
        Ok(plan)
    }

    /// Installs the table for `state` with `routes`, then natd's policy rules for them. The
    /// table follows the kernel's trackers ([`KernelTrackers::probe`]); while connection
    /// tracking is not loaded it assumes none, and installs the table again if loading it
    /// (the table's own `ct` rules do) showed otherwise.
    fn install(&mut self, state: &DesiredState, routes: RoutePlan) -> Result<(), NetfilterError> {
        let homes = homes(&self.public_ifaces, state);
        let table = |trackers| {
            render(
                &self.public_ifaces,
                &self.guest_ifaces,
                state,
                &routes,
                &homes,
                trackers,
            )
        };
        let probed = KernelTrackers::probe();
        let assumed = probed.unwrap_or_default();
        run_nft(&table(assumed))?;
        if probed.is_none()
            && let Some(found) = KernelTrackers::probe()
            && found != assumed
        {
            run_nft(&table(found))?;
        }
        policy_routing::sync(&routes.mark_rules())?;
        if routes != self.routes {
            for g in &routes.groups {
                let sources: Vec<String> = g.sources.iter().map(ToString::to_string).collect();
                log::info!(
                    "policy routing: {} mapping(s) of `from {} lookup {}`: {}",
                    g.mappings.len(),
                    sources.join(", "),
                    g.rule.table,
                    g.rule
                );
            }
        }
        self.routes = routes;
        Ok(())
    }

    /// The named counters of natd's table ([`protocols::COUNTERS`]), as the kernel counts
    /// them now; none without the table. A table missing while natd should have one is an
    /// error, not zeros.
    pub fn counters(&self) -> Result<Vec<SlowPathCounter>, NetfilterError> {
        if !self.table {
            return Ok(Vec::new());
        }
        let out = Command::new("nft")
            .args(["-j", "list", "counters", "table", "ip", TABLE])
            .stdin(Stdio::null())
            .output()
            .map_err(NetfilterError::Spawn)?;
        if !out.status.success() {
            return Err(NetfilterError::Counters(format!(
                "nft list counters table ip {TABLE}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        parse_counters(&String::from_utf8_lossy(&out.stdout))
            .map_err(|e| NetfilterError::Counters(format!("nft -j list counters: {e}")))
    }
}

/// The counters of natd's table in `nft -j list counters` output, in
/// [`protocols::COUNTERS`] order; every one of them must be there.
fn parse_counters(json: &str) -> Result<Vec<SlowPathCounter>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let objects = v["nftables"].as_array().ok_or("no \"nftables\" array")?;
    protocols::COUNTERS
        .iter()
        .map(|name| {
            let c = objects
                .iter()
                .map(|o| &o["counter"])
                .find(|c| c["table"] == TABLE && c["name"] == *name)
                .ok_or_else(|| format!("no counter {name} in table {TABLE}"))?;
            let field = |f: &str| {
                c[f].as_u64()
                    .ok_or_else(|| format!("counter {name}: no {f}"))
            };
            Ok(SlowPathCounter {
                name: (*name).to_string(),
                packets: field("packets")?,
                bytes: field("bytes")?,
            })
        })
        .collect()
}

fn run_nft(script: &str) -> Result<(), NetfilterError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetfilterError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(NetfilterError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NetfilterError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetfilterError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

impl SlowPath for Nft {
    fn replace(&mut self, state: &DesiredState) -> Result<(), NetfilterError> {
        if self.table {
            let routes = Self::plan(state)?;
            self.install(state, routes)?;
        }
        if self.manage_addresses {
            crate::addresses::sync(&self.public_ifaces, state)?;
        }
        Ok(())
    }

    fn refresh(&mut self, state: &DesiredState) -> Result<bool, NetfilterError> {
        if !self.table {
            return Ok(false);
        }
        let routes = Self::plan(state)?;
        if routes == self.routes {
            // natd's rules may have been removed by hand: put them back.
            policy_routing::sync(&routes.mark_rules())?;
            return Ok(false);
        }
        self.install(state, routes)?;
        Ok(true)
    }

    fn remove(&mut self) -> Result<(), NetfilterError> {
        if self.manage_addresses {
            crate::addresses::remove_all(&self.public_ifaces)?;
        }
        if !self.table {
            return Ok(());
        }
        // The table goes even if the rules cannot: a rule without the table's marks matches
        // nothing.
        let rules = policy_routing::sync(&[]);
        self.routes = RoutePlan::default();
        // Declaring the table first makes the delete succeed whether or not it exists.
        run_nft(&format!("table ip {TABLE}\ndelete table ip {TABLE}\n"))?;
        Ok(rules?)
    }

    fn forget(&mut self, removed: &[Mapping]) {
        if removed.is_empty() {
            return;
        }
        // One walk of the kernel's table (a dump) finds them all: a few mappings' flows are
        // forgotten before the change is acknowledged (a flow must not outlive its mapping),
        // a bulk removal's in the background so natd keeps answering meanwhile.
        let (sel, n) = (mapping_flows(removed), removed.len());
        if n <= FORGET_INLINE {
            forget_selected(&sel, n, "mapping(s)");
        } else {
            std::thread::spawn(move || {
                let deleted = forget_selected(&sel, n, "mapping(s)");
                log::info!("forgot the kernel's {deleted} flows of {n} removed mappings");
            });
        }
    }

    fn forget_publics(&mut self, publics: &[Ipv4Addr]) {
        if publics.is_empty() {
            return;
        }
        let (sel, n) = (public_flows(publics), publics.len());
        if n <= FORGET_INLINE {
            forget_selected(&sel, n, "public IP(s)");
        } else {
            std::thread::spawn(move || {
                let deleted = forget_selected(&sel, n, "public IP(s)");
                log::info!("forgot the kernel's {deleted} flows of {n} public IPs");
            });
        }
    }
}

#[cfg(test)]
#[path = "netfilter_tests.rs"]
pub(crate) mod tests_routes;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::tests_routes;

    /// `nft -j list counters table ip xdp_static_nat` as nft 1.0.6 prints it.
    const COUNTERS_JSON: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"counter": {"family": "ip", "name": "udplite_stateless", "table": "xdp_static_nat", "handle": 1, "packets": 0, "bytes": 0}}, {"counter": {"family": "ip", "name": "untranslatable", "table": "xdp_static_nat", "handle": 2, "packets": 0, "bytes": 0}}, {"counter": {"family": "ip", "name": "untranslated", "table": "xdp_static_nat", "handle": 3, "packets": 3, "bytes": 180}}]}"#;

    #[test]
    fn counters_are_read_by_name_from_natd_table() {
        let c = parse_counters(COUNTERS_JSON).unwrap();
        let got: Vec<_> = c
            .iter()
            .map(|c| (c.name.as_str(), c.packets, c.bytes))
            .collect();
        assert_eq!(
            got,
            [
                ("udplite_stateless", 0, 0),
                ("untranslatable", 0, 0),
                ("untranslated", 3, 180)
            ]
        );
        // Another table's counter of the same name is not natd's.
        let other = COUNTERS_JSON.replace(
            r#""name": "untranslated", "table": "xdp_static_nat""#,
            r#""name": "untranslated", "table": "other""#,
        );
        let e = parse_counters(&other).unwrap_err();
        assert!(e.contains("no counter untranslated"), "{e}");
        assert!(parse_counters("not json").is_err());
    }

    fn state() -> DesiredState {
        let mut s = DesiredState::default();
        s.add_mapping(Mapping {
            public: "203.0.113.10".parse().unwrap(),
            private: "10.0.0.10".parse().unwrap(),
        })
        .unwrap();
        s
    }

    #[test]
    fn renders_both_directions_scoped_to_public_ifaces() {
        let r = render(
            &["eth2".into(), "eth3".into()],
            &["eth0".into()],
            &state(),
            &RoutePlan::default(),
            &Homes::new(),
            KernelTrackers::default(),
        );
        assert!(r.contains("elements = { 203.0.113.10 : 10.0.0.10 }"), "{r}");
        assert!(r.contains("elements = { 10.0.0.10 : 203.0.113.10 }"), "{r}");
        assert!(
            r.contains("iifname { \"eth2\", \"eth3\" } dnat ip to ip daddr map @dnat_v4"),
            "{r}"
        );
        assert!(
            r.contains("oifname { \"eth2\", \"eth3\" } snat ip to ip saddr map @snat_v4"),
            "{r}"
        );
        assert!(r.starts_with("table ip xdp_static_nat\ndelete table ip xdp_static_nat\n"));
        // The router's own traffic to P, as the CloudStack router's `OUTPUT -d P -j DNAT`.
        assert!(
            r.contains(
                "\tchain output {\n\t\ttype nat hook output priority -100; policy accept;\n\
                 \t\tdnat ip to ip daddr map @dnat_v4\n\t}"
            ),
            "{r}"
        );
    }

    #[test]
    fn renders_rules() {
        let mut s = state();
        let p = "203.0.113.10".parse().unwrap();
        let tcp = Service {
            proto: Proto::Tcp,
            ports: Some("5000-5100".parse().unwrap()),
            icmp_type: None,
            icmp_code: None,
        };
        s.add_ingress(
            Some(11),
            p,
            tcp.clone(),
            vec!["198.51.100.0/24".parse().unwrap()],
        )
        .unwrap();
        let icmp = Service {
            proto: Proto::Icmp,
            ports: None,
            icmp_type: Some(8),
            icmp_code: Some(0),
        };
        s.add_ingress(Some(13), p, icmp, vec![]).unwrap();
        // Kept but inactive: 203.0.113.11 has no mapping.
        s.add_ingress(
            Some(14),
            "203.0.113.11".parse().unwrap(),
            tcp.clone(),
            vec![],
        )
        .unwrap();
        s.set_egress_default_allow(false);
        s.add_egress(Some(21), tcp.clone(), vec![]).unwrap();
        s.add_egress_from(
            Some(22),
            tcp,
            vec!["192.0.2.0/24".parse().unwrap()],
            vec![
                "10.1.1.25/32".parse().unwrap(),
                "10.1.1.26/32".parse().unwrap(),
            ],
        )
        .unwrap();
        let r = render(
            &["eth2".into()],
            &["eth0".into()],
            &s,
            &RoutePlan::default(),
            &Homes::new(),
            KernelTrackers::default(),
        );
        assert!(!r.contains("rule 14"), "{r}");
        assert!(
            r.contains(
                "\t\tip saddr { 10.1.1.25/32, 10.1.1.26/32 } ip daddr { 192.0.2.0/24 } \
                 tcp dport 5000-5100 accept comment \"rule 22\"\n\t\tdrop\n"
            ),
            "{r}"
        );
        assert!(r.contains("ct original ip daddr 203.0.113.10 ip saddr { 198.51.100.0/24 } tcp dport 5000-5100 accept comment \"rule 11\""), "{r}");
        assert!(r.contains("ct original ip daddr 203.0.113.10 icmp type 8 icmp code 0 accept comment \"rule 13\""), "{r}");
        assert!(
            r.contains("\t\ttcp dport 5000-5100 accept comment \"rule 21\"\n"),
            "{r}"
        );
    }

    /// The kernel's own parser accepts what we render (`nft -c` checks without committing).
    #[test]
    fn nft_accepts_the_ruleset() {
        let mut s = state();
        let p = "203.0.113.10".parse().unwrap();
        for (i, svc) in [
            Service {
                proto: Proto::Tcp,
                ports: Some("22".parse().unwrap()),
                icmp_type: None,
                icmp_code: None,
            },
            Service {
                proto: Proto::Udp,
                ports: None,
                icmp_type: None,
                icmp_code: None,
            },
            Service {
                proto: Proto::Icmp,
                ports: None,
                icmp_type: Some(3),
                icmp_code: None,
            },
            Service {
                proto: Proto::Icmp,
                ports: None,
                icmp_type: None,
                icmp_code: None,
            },
        ]
        .into_iter()
        .enumerate()
        {
            s.add_ingress(
                None,
                p,
                svc.clone(),
                vec![format!("192.0.2.{}/32", i).parse().unwrap()],
            )
            .unwrap();
            s.add_egress(None, svc, vec![]).unwrap();
        }
        s.add_egress_from(
            None,
            Service {
                proto: Proto::All,
                ports: None,
                icmp_type: None,
                icmp_code: None,
            },
            vec!["198.51.100.0/24".parse().unwrap()],
            vec!["10.0.0.0/25".parse().unwrap()],
        )
        .unwrap();
        for script in [
            render(
                &["eth2".into()],
                &["eth0".into(), "eth1".into()],
                &s,
                &tests_routes::plan(&s),
                &Homes::from([("203.0.113.10".parse().unwrap(), "eth2".to_string())]),
                KernelTrackers { dccp: true },
            ),
            render(
                &["x".into()],
                &["y".into()],
                &DesiredState::default(),
                &RoutePlan::default(),
                &Homes::new(),
                KernelTrackers::default(),
            ),
        ] {
            let mut child = Command::new("nft")
                .args(["-c", "-f", "-"])
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("nft is installed by `cargo xtask setup`");
            child
                .stdin
                .take()
                .unwrap()
                .write_all(script.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}\n{script}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn empty_state_has_empty_maps() {
        let r = render(
            &["eth2".into()],
            &["eth0".into()],
            &DesiredState::default(),
            &RoutePlan::default(),
            &Homes::new(),
            KernelTrackers::default(),
        );
        assert!(!r.contains("elements"), "{r}");
    }
}
