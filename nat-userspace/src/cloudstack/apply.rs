//! Applies a parsed payload to a desired state the way CloudStack's router scripts merge it
//! into their databags (`cs_forwardingrules.merge` for static NAT, `cs_firewallrules.merge`,
//! then `CsAcl`): rules in order, static NAT by public IP (an entry replaces the IP's mapping),
//! firewall rules by id, the two databags independent of each other (an ingress rule of an IP
//! without static NAT is kept, inactive, and a revoked static NAT leaves the IP's rules).
use std::{collections::BTreeSet, net::Ipv4Addr};

use super::{
    CloudStackError, Field, Problem, RuleRef,
    model::{FirewallRule, Payload, StaticNatRule},
    summary::{Change, RuleKind, Summary},
};
use crate::{
    cidr::Cidr,
    firewall::{PortRange, Proto, RuleError, Service, normalize_cidrs},
    state::{DesiredState, LOCAL_RULE_IDS, Mapping, StateError},
};

/// Applies `payload` to `state`, rule by rule, and says what each rule did.
///
/// `state` must be a copy the caller owns: on error this returns at the first refused rule and
/// leaves `state` as far as it got (half-modified). The caller discards it and keeps the
/// original, so a refused payload changes nothing:
///
/// ```ignore
/// let mut new = current.clone();
/// let summary = cloudstack::apply(&payload, &mut new)?; // on error `current` is untouched
/// controller.apply(new)?;
/// ```
pub fn apply(payload: &Payload, state: &mut DesiredState) -> Result<Summary, CloudStackError> {
    let mut summary = Summary::default();
    match payload {
        Payload::StaticNat { rules } => {
            // Revokes already carried out ahead of their turn (see `static_nat`).
            let mut done = BTreeSet::new();
            for (i, r) in rules.iter().enumerate() {
                if done.contains(&i) {
                    continue;
                }
                let at = RuleRef {
                    position: i + 1,
                    id: None,
                };
                static_nat(at, r, &rules[i + 1..], state, &mut summary, &mut done)?;
            }
        }
        Payload::Firewall { rules } => {
            let was = state.egress_default_allow();
            let mut settle = None;
            for (i, r) in rules.iter().enumerate() {
                let at = RuleRef {
                    position: i + 1,
                    id: r.id,
                };
                // A payload that carries egress rules (new or re-sent), or revokes a default
                // egress rule, speaks for the network's egress: its default is then the
                // router's, which depends on the default rules held alone.
                let carries_egress =
                    !r.revoked.unwrap_or(false) && r.traffic_type.as_deref() == Some("Egress");
                if firewall(at, r, state, &mut summary)? || carries_egress {
                    settle = Some(at);
                }
            }
            if let Some(at) = settle {
                state.settle_egress_default();
                // Said when it changed, or when egress rules came or went.
                let egress_changed = summary.changes.iter().any(|(_, c)| {
                    matches!(
                        c,
                        Change::EgressDefaultRule { .. }
                            | Change::EgressExceptionAdded { .. }
                            | Change::RuleRemoved {
                                kind: RuleKind::Egress,
                                ..
                            }
                    )
                });
                if egress_changed || state.egress_default_allow() != was {
                    summary.push(at, egress_default(state, was));
                }
            }
        }
    }
    Ok(summary)
}

fn refuse(at: RuleRef, field: &str, problem: Problem) -> CloudStackError {
    CloudStackError::rule(at, Some(Field::new(field)), problem)
}

fn ipv4(at: RuleRef, field: &str, value: Option<&str>) -> Result<Ipv4Addr, CloudStackError> {
    let s = value.ok_or_else(|| refuse(at, field, Problem::Missing))?;
    s.parse()
        .map_err(|_| refuse(at, field, Problem::NotIpv4(s.to_string())))
}

/// Which field a refused mapping is the fault of.
fn mapping_field(e: &StateError) -> &'static str {
    match e {
        StateError::PrivateInUse { .. } => "destination_ip_address",
        StateError::NotUnicast { field, .. } | StateError::CrossUse { field, .. }
            if *field == "private IP" =>
        {
            "destination_ip_address"
        }
        _ => "source_ip_address",
    }
}

/// Static NAT: `P -> V` by public IP. Other fields of the rule do not apply to static NAT.
///
/// The router merges entries one by one into a databag keyed by public IP and configures
/// the result, so within one payload a guest may be mapped by a new public IP before the
/// revoke of its old one (`[P2 -> V, revoke P1]`: V moves to P2). natd's mappings are
/// one-to-one at every step, so such a revoke, found among the `later` rules as the next
/// rule naming that public IP, is carried out first (`done` notes its index among all
/// rules); the payload ends where the router's does.
fn static_nat(
    at: RuleRef,
    r: &StaticNatRule,
    later: &[StaticNatRule],
    state: &mut DesiredState,
    summary: &mut Summary,
    done: &mut BTreeSet<usize>,
) -> Result<(), CloudStackError> {
    let public = ipv4(at, "source_ip_address", r.source_ip_address.as_deref())?;
    let field = "destination_ip_address";
    if r.revoke.unwrap_or(false) {
        // The router removes the public IP's mapping whatever private IP the revoke names;
        // a present one must still be an address.
        if let Some(d) = r.destination_ip_address.as_deref() {
            ipv4(at, field, Some(d))?;
        }
        if state.private_of(public).is_none() {
            summary.push(at, Change::MappingAbsent(public));
            return Ok(());
        }
        let mapping = state
            .remove_mapping(public)
            .map_err(|e| refuse(at, "source_ip_address", Problem::State(e)))?;
        let inactive = rules_of(state, public);
        summary.push(at, Change::MappingRemoved { mapping, inactive });
        return Ok(());
    }
    let private = ipv4(at, field, r.destination_ip_address.as_deref())?;
    let m = Mapping { public, private };
    let replaced = match state.private_of(public) {
        Some(p) if p == private => {
            summary.push(at, Change::MappingPresent(m));
            return Ok(());
        }
        // The router's databag keeps one entry per public IP: a new one replaces it (its
        // revoke never arrived, or CloudStack moved the IP to another guest).
        Some(_) => Some(
            state
                .remove_mapping(public)
                .map_err(|e| refuse(at, "source_ip_address", Problem::State(e)))?,
        ),
        None => None,
    };
    if let Some(holder) = state.public_of(private)
        && let Some(k) = revoked_next(later, holder)
    {
        let revoke = RuleRef {
            position: at.position + 1 + k,
            id: None,
        };
        let mapping = state
            .remove_mapping(holder)
            .map_err(|e| refuse(revoke, "source_ip_address", Problem::State(e)))?;
        let inactive = rules_of(state, holder);
        summary.push(revoke, Change::MappingRemoved { mapping, inactive });
        done.insert(at.position + k);
    }
    state
        .add_mapping(m)
        .map_err(|e| refuse(at, mapping_field(&e), Problem::State(e)))?;
    let active = rules_of(state, public);
    summary.push(
        at,
        match replaced {
            Some(old) => Change::MappingReplaced {
                old,
                new: m,
                active,
            },
            None => Change::MappingAdded { mapping: m, active },
        },
    );
    Ok(())
}

/// The index among `later` of a revoke of `public`, if the next of those rules naming
/// `public` as its public IP is one (and a well-formed one).
fn revoked_next(later: &[StaticNatRule], public: Ipv4Addr) -> Option<usize> {
    let named = |r: &StaticNatRule| {
        r.source_ip_address
            .as_deref()
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
            == Some(public)
    };
    let k = later.iter().position(named)?;
    let r = &later[k];
    let well_formed = r
        .destination_ip_address
        .as_deref()
        .is_none_or(|d| d.parse::<Ipv4Addr>().is_ok());
    (r.revoke.unwrap_or(false) && well_formed).then_some(k)
}

/// Ids of the ingress rules of `public`.
fn rules_of(state: &DesiredState, public: Ipv4Addr) -> Vec<u64> {
    state
        .ingress_rules()
        .filter(|s| s.rule.public == public)
        .map(|s| s.rule.id)
        .collect()
}

/// Firewall rules by id, as the router's `cs_firewallrules.merge` keys its databag: one id
/// space for ingress and egress; `revoked` deletes the id whatever else the rule says; a known
/// id is kept as it is and the rest of the re-sent rule is not looked at; an unknown id is
/// validated and added. Returns whether it revoked a default egress rule.
fn firewall(
    at: RuleRef,
    r: &FirewallRule,
    state: &mut DesiredState,
    summary: &mut Summary,
) -> Result<bool, CloudStackError> {
    let id = r.id.ok_or_else(|| refuse(at, "id", Problem::Missing))?;
    if id >= LOCAL_RULE_IDS {
        return Err(refuse(at, "id", Problem::LocalId(id)));
    }
    let held = held_kind(state, id);
    if r.revoked.unwrap_or(false) {
        // Like the router, a revoke needs nothing but the id. Revoking the default egress
        // rule takes its ACCEPT (or DROP) from the end of the router's chain.
        if state.egress_defaults().contains_key(&id) {
            state
                .remove_egress_default(id)
                .map_err(|e| refuse(at, "id", Problem::State(e)))?;
            let kind = RuleKind::Egress;
            summary.push(at, Change::RuleRemoved { kind, id });
            return Ok(true);
        }
        let change = match held {
            Some(kind) => {
                let removed = match kind {
                    RuleKind::Ingress => state.remove_ingress(id).map(drop),
                    RuleKind::Egress => state.remove_egress(id).map(drop),
                };
                removed.map_err(|e| refuse(at, "id", Problem::State(e)))?;
                Change::RuleRemoved { kind, id }
            }
            None => Change::RuleAbsent { id },
        };
        summary.push(at, change);
        return Ok(false);
    }
    if let Some(kind) = held {
        // The router keeps the rule it has; a re-sent rule's fields are never read, so they
        // cannot make the payload fail (a difference is only reported). Its
        // `default_egress_policy` neither: the rule keeps the action it was added with.
        let differs = differs(at, r, state, kind, id).unwrap_or(true);
        summary.push(at, Change::RuleKept { kind, id, differs });
        return Ok(false);
    }
    // configure.py: `obj['traffic_type'] == 'Ingress'`, as Gson writes the Java enum.
    let kind = match r.traffic_type.as_deref() {
        None => return Err(refuse(at, "traffic_type", Problem::Missing)),
        Some("Ingress") => RuleKind::Ingress,
        Some("Egress") => RuleKind::Egress,
        Some(t) => {
            let problem = Problem::TrafficType(t.to_string());
            return Err(refuse(at, "traffic_type", problem));
        }
    };
    match kind {
        RuleKind::Ingress => ingress(at, id, r, state, summary).map(|()| false),
        RuleKind::Egress => egress(at, id, r, state, summary).map(|()| false),
    }
}

/// Which kind of rule holds `id`, if any.
fn held_kind(state: &DesiredState, id: u64) -> Option<RuleKind> {
    if state.ingress_rules().any(|s| s.rule.id == id) {
        Some(RuleKind::Ingress)
    } else if state.egress_rules().any(|s| s.rule.id == id)
        || state.egress_defaults().contains_key(&id)
    {
        Some(RuleKind::Egress)
    } else {
        None
    }
}

/// Whether a re-sent rule says something else than the rule `id` natd holds; an error when
/// the re-sent fields do not even parse (they differ, then).
fn differs(
    at: RuleRef,
    r: &FirewallRule,
    state: &DesiredState,
    kind: RuleKind,
    id: u64,
) -> Result<bool, CloudStackError> {
    let service = service(at, r, kind)?;
    Ok(match kind {
        RuleKind::Ingress => {
            let public = ipv4(at, "src_ip", r.src_ip.as_deref())?;
            let sources = normalize_cidrs(ingress_sources(at, r)?);
            state.ingress_rules().any(|s| {
                s.rule.id == id
                    && (s.rule.public != public
                        || s.rule.service != service
                        || s.rule.cidrs != sources)
            })
        }
        RuleKind::Egress => {
            if let Some(&allow) = state.egress_defaults().get(&id) {
                return Ok(r.default_egress_policy != Some(allow));
            }
            if state.egress_under().get(&id) != r.default_egress_policy.as_ref() {
                return Ok(true);
            }
            let dests = normalize_cidrs(destinations(at, r)?);
            let sources = cidr_list(at, "source_cidr_list", r.source_cidr_list.as_deref())?;
            let sources = normalize_cidrs(sources);
            state.egress_rules().any(|s| {
                s.rule.id == id
                    && (s.rule.service != service
                        || s.rule.cidrs != dests
                        || s.rule.sources != sources)
            })
        }
    })
}

fn ingress(
    at: RuleRef,
    id: u64,
    r: &FirewallRule,
    state: &mut DesiredState,
    summary: &mut Summary,
) -> Result<(), CloudStackError> {
    let service = service(at, r, RuleKind::Ingress)?;
    let cidrs = ingress_sources(at, r)?;
    let public = ipv4(at, "src_ip", r.src_ip.as_deref())?;
    // Ingress rules that open nothing on the router (protocol `all`; an empty source list), so
    // natd installs nothing for them. The router's databag still keeps their ids (a later
    // revoke removes an entry that made no iptables rule, a re-send is kept as it is). natd
    // does not hold them, for both alike, as it has never held the empty source list's: a
    // later revoke is reported as a revoke of an unknown id and a re-send allows nothing again,
    // and both end where the router ends, nothing open. Holding them would add a persisted
    // kind of rule that installs nothing, for the sake of those two summary lines; the ends
    // would differ only for an id re-sent with other fields (or the other traffic type), which
    // CloudStack never sends (a rule is never changed in place; ids come from its database's
    // auto-increment).
    if service.proto == Proto::All {
        // configure.py builds `-p all -m all` for each source CIDR (none for an empty list),
        // which iptables refuses; configure.py only logs it, so FIREWALL_<ip> still ends in DROP.
        summary.push(at, Change::IngressAllAllowsNothing { id, public });
        return Ok(());
    }
    if cidrs.is_empty() {
        summary.push(at, Change::RuleAllowsNothing { id, public });
        return Ok(());
    }
    // Kept whether or not the IP has static NAT: the firewall databag is independent of the
    // static NAT one, and CloudStack does not send the rule again when the static NAT comes.
    // (It also sends the rules of port-forwarding and source-NAT IPs, which stay inactive.)
    // A rule identical to one natd holds under another id is added beside it, as the router
    // keeps both ids for its one iptables rule (see `add_ingress_beside_duplicates`).
    let same_as = state
        .add_ingress_beside_duplicates(id, public, service, cidrs)
        .map_err(|e| {
            let field = match e {
                StateError::TooManyIngressRules { .. } | StateError::NotUnicast { .. } => {
                    Some(Field::new("src_ip"))
                }
                _ => None,
            };
            CloudStackError::rule(at, field, Problem::State(e))
        })?;
    let active = state.private_of(public).is_some();
    summary.push(
        at,
        match (same_as, active) {
            (Some(existing), _) => Change::RuleDuplicate {
                id,
                public,
                existing,
                active,
            },
            (None, true) => Change::RuleAdded {
                kind: RuleKind::Ingress,
                id,
            },
            (None, false) => Change::RuleInactive { id, public },
        },
    );
    Ok(())
}

/// An egress rule, as configure.py's `AclIP` builds it from the rule's own
/// `default_egress_policy`: the default rule (protocol `all`, no source CIDRs) is appended to
/// the router's chain, ACCEPT under allow and DROP under deny; any other rule is inserted
/// before it, an exception with the opposite action. natd holds each with the policy it
/// came with (see `DesiredState::is_egress_active`); the payload settles the network's
/// default after its last rule (see [`apply`]).
fn egress(
    at: RuleRef,
    id: u64,
    r: &FirewallRule,
    state: &mut DesiredState,
    summary: &mut Summary,
) -> Result<(), CloudStackError> {
    let proto = protocol(at, r, RuleKind::Egress)?;
    let field = "default_egress_policy";
    let under = r
        .default_egress_policy
        .ok_or_else(|| refuse(at, field, Problem::Missing))?;
    let sources = cidr_list(at, "source_cidr_list", r.source_cidr_list.as_deref())?;
    if proto == Proto::All && sources.is_empty() {
        state
            .add_egress_default(id, under)
            .map_err(|e| refuse(at, "id", Problem::State(e)))?;
        summary.push(at, Change::EgressDefaultRule { id, allow: under });
        return Ok(());
    }
    let service = service(at, r, RuleKind::Egress)?;
    // As the router's ipsets: the rule applies to guests in `source_cidr_list` (all if empty)
    // and destinations in `dest_cidr_list`.
    let dests = destinations(at, r)?;
    state
        .add_egress_under(id, service, dests, sources, under)
        .map_err(|e| CloudStackError::rule(at, None, Problem::State(e)))?;
    summary.push(at, Change::EgressExceptionAdded { id, under });
    Ok(())
}

/// The network's egress default after a payload that settled it, and which exceptions are
/// not in force under it.
fn egress_default(state: &DesiredState, was: bool) -> Change {
    Change::EgressDefault {
        allow: state.egress_default_allow(),
        was,
        rules: state.egress_defaults().keys().copied().collect(),
        dormant: state.inactive_egress_ids().into_iter().collect(),
    }
}

/// An ingress rule's sources: absent means 0.0.0.0/0 (the payloads' documented default; the
/// management server always fills the list). A list given is taken as configure.py takes it:
/// one ACCEPT per entry into the IP's FIREWALL_<ip> chain, which ends in DROP, so an empty
/// list allows nothing.
fn ingress_sources(at: RuleRef, r: &FirewallRule) -> Result<Vec<Cidr>, CloudStackError> {
    match r.source_cidr_list.as_deref() {
        None => Ok(vec![Cidr::ANY]),
        list => cidr_list(at, "source_cidr_list", list),
    }
}

/// An egress rule's destinations. configure.py skips every `0.0.0.0/0` entry (an ipset of
/// type hash:net cannot hold a /0) and matches the rest, so `["0.0.0.0/0", "192.0.2.0/24"]`
/// is 192.0.2.0/24 alone; nothing left (or an empty list) is any destination.
fn destinations(at: RuleRef, r: &FirewallRule) -> Result<Vec<Cidr>, CloudStackError> {
    let mut dests = cidr_list(at, "dest_cidr_list", r.dest_cidr_list.as_deref())?;
    dests.retain(|c| !c.is_any());
    Ok(dests)
}

fn protocol(at: RuleRef, r: &FirewallRule, kind: RuleKind) -> Result<Proto, CloudStackError> {
    let p = r
        .protocol
        .as_deref()
        .ok_or_else(|| refuse(at, "protocol", Problem::Missing))?;
    let proto = match p.to_ascii_lowercase().as_str() {
        "tcp" => Some(Proto::Tcp),
        "udp" => Some(Proto::Udp),
        "icmp" => Some(Proto::Icmp),
        // Egress: every protocol. Ingress: allows nothing (see `ingress`).
        "all" => Some(Proto::All),
        _ => None,
    };
    proto.ok_or_else(|| {
        let problem = Problem::UnsupportedProtocol {
            protocol: p.to_string(),
            kind,
        };
        refuse(at, "protocol", problem)
    })
}

/// The rule's service. As on the router, ports apply to tcp/udp only and ICMP type/code to
/// icmp only; the other protocol's fields are ignored.
fn service(at: RuleRef, r: &FirewallRule, kind: RuleKind) -> Result<Service, CloudStackError> {
    let proto = protocol(at, r, kind)?;
    let mut s = Service {
        proto,
        ports: None,
        icmp_type: None,
        icmp_code: None,
    };
    match proto {
        Proto::Tcp | Proto::Udp => {
            s.ports = r
                .src_port_range
                .as_deref()
                .map(|range| ports(at, range))
                .transpose()?;
        }
        Proto::Icmp => {
            s.icmp_type = icmp(at, "icmp_type", r.icmp_type)?;
            s.icmp_code = icmp(at, "icmp_code", r.icmp_code)?;
            if s.icmp_code.is_some() && s.icmp_type.is_none() {
                let problem = Problem::Rule(RuleError::CodeWithoutType);
                return Err(refuse(at, "icmp_code", problem));
            }
        }
        Proto::All => {}
    }
    Ok(s)
}

fn ports(at: RuleRef, range: &[i64]) -> Result<PortRange, CloudStackError> {
    let field = "src_port_range";
    let &[first, last] = range else {
        return Err(refuse(at, field, Problem::PortRangeLength(range.len())));
    };
    let port = |n: i64| {
        u16::try_from(n)
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| refuse(at, field, Problem::Port(n)))
    };
    let (first, last) = (port(first)?, port(last)?);
    PortRange::new(first.into(), last.into()).map_err(|e| refuse(at, field, Problem::Rule(e)))
}

/// CloudStack's ICMP type/code: -1 or absent = any.
fn icmp(at: RuleRef, field: &str, v: Option<i64>) -> Result<Option<u8>, CloudStackError> {
    match v {
        None | Some(-1) => Ok(None),
        Some(n) => u8::try_from(n)
            .map(Some)
            .map_err(|_| refuse(at, field, Problem::Icmp(n))),
    }
}

/// CIDRs of a list field; empty or absent is an empty list (callers decide what that means).
fn cidr_list(
    at: RuleRef,
    field: &str,
    list: Option<&[String]>,
) -> Result<Vec<Cidr>, CloudStackError> {
    list.unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse()
                .map_err(|e| CloudStackError::rule(at, Some(Field::at(field, i)), Problem::Cidr(e)))
        })
        .collect()
}
