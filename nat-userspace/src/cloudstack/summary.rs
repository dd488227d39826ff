//! What applying a payload did, rule by rule, for natd's log and natctl's answer.
use std::{fmt, net::Ipv4Addr};

use super::RuleRef;
use crate::state::Mapping;

/// Ingress rules belong to a public IP, egress rules to the guest network. natd keeps both in
/// one id space, as CloudStack does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKind {
    Ingress,
    Egress,
}

impl RuleKind {
    /// The protocols a rule of this kind may name.
    pub(super) fn protocols(self) -> &'static str {
        match self {
            RuleKind::Ingress => "tcp, udp, icmp or all",
            RuleKind::Egress => "tcp, udp, icmp or all",
        }
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleKind::Ingress => "ingress",
            RuleKind::Egress => "egress",
        })
    }
}

/// What one rule of a payload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new mapping; `active`: the ingress rules of its public IP it brought into force.
    MappingAdded {
        mapping: Mapping,
        active: Vec<u64>,
    },
    /// An entry for a public IP that was mapped to another guest replaced that mapping (as the
    /// router's databag merge does); the IP's ingress rules `active` apply to the new guest.
    MappingReplaced {
        old: Mapping,
        new: Mapping,
        active: Vec<u64>,
    },
    /// A revoke removed the mapping; the ingress rules of its public IP stay, `inactive`.
    MappingRemoved {
        mapping: Mapping,
        inactive: Vec<u64>,
    },
    /// No-op: exactly this mapping was already there.
    MappingPresent(Mapping),
    /// No-op: a revoke of a public IP that has no mapping.
    MappingAbsent(Ipv4Addr),
    RuleAdded {
        kind: RuleKind,
        id: u64,
    },
    RuleRemoved {
        kind: RuleKind,
        id: u64,
    },
    /// No-op: the id is known and stays as it is; `differs` says the payload's fields differ
    /// from the installed rule (worth a warning: CloudStack never changes a rule in place).
    RuleKept {
        kind: RuleKind,
        id: u64,
        differs: bool,
    },
    /// An ingress rule of a public IP without static NAT: kept, inactive until the IP's static
    /// NAT arrives (never, for a port-forwarding or source NAT IP, which the router's own
    /// firewall handles).
    RuleInactive {
        id: u64,
        public: Ipv4Addr,
    },
    /// No-op: a revoke of an id natd does not have (of either kind).
    RuleAbsent {
        id: u64,
    },
    /// No-op: an ingress rule whose `source_cidr_list` is empty. The router writes one ACCEPT
    /// per source CIDR, so it allows nothing there, and natd installs nothing.
    RuleAllowsNothing {
        id: u64,
        public: Ipv4Addr,
    },
    /// No-op: an ingress rule with protocol `all`. configure.py builds `-p all -m all` for it,
    /// which iptables refuses (and configure.py only logs), so it allows nothing on the router,
    /// and natd installs nothing.
    IngressAllAllowsNothing {
        id: u64,
        public: Ipv4Addr,
    },
    /// An ingress rule allowing exactly what rule `existing` of the same public IP allows, added
    /// beside it as the router keeps both ids for its one iptables rule: the traffic stays
    /// allowed until both are revoked. `active`: the IP has static NAT.
    RuleDuplicate {
        id: u64,
        public: Ipv4Addr,
        existing: u64,
        active: bool,
    },
    /// The guest network's default egress policy after a payload that added or revoked a
    /// default egress rule, or added an exception while none was held: allow only if the
    /// default rules held (`rules`) all say allow. `dormant`: the exceptions not in force
    /// under it (added under the other default).
    EgressDefault {
        allow: bool,
        was: bool,
        rules: Vec<u64>,
        dormant: Vec<u64>,
    },
    /// A default egress rule (protocol `all`, no source CIDRs): the router appends it to its
    /// chain, ACCEPT if it says `allow`, DROP otherwise.
    EgressDefaultRule {
        id: u64,
        allow: bool,
    },
    /// An egress exception rule, added under the default `under` (its
    /// `default_egress_policy`): it drops under allow, accepts under deny.
    EgressExceptionAdded {
        id: u64,
        under: bool,
    },
}

impl Change {
    /// Whether this left the state as it was.
    pub fn is_noop(&self) -> bool {
        match self {
            Change::MappingAdded { .. }
            | Change::MappingReplaced { .. }
            | Change::MappingRemoved { .. } => false,
            Change::RuleAdded { .. }
            | Change::RuleRemoved { .. }
            | Change::RuleInactive { .. }
            | Change::RuleDuplicate { .. }
            | Change::EgressDefaultRule { .. }
            | Change::EgressExceptionAdded { .. } => false,
            Change::EgressDefault { allow, was, .. } => allow == was,
            Change::MappingPresent(_)
            | Change::MappingAbsent(_)
            | Change::RuleKept { .. }
            | Change::RuleAbsent { .. }
            | Change::RuleAllowsNothing { .. }
            | Change::IngressAllAllowsNothing { .. } => true,
        }
    }
}

fn policy(allow: bool) -> &'static str {
    if allow { "allow" } else { "deny" }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::MappingAdded { mapping: m, active } => {
                write!(f, "mapping added: {} -> {}", m.public, m.private)?;
                if !active.is_empty() {
                    write!(f, "; its ingress rules {active:?} are in force")?;
                }
                Ok(())
            }
            Change::MappingReplaced { old, new, active } => {
                write!(
                    f,
                    "mapping replaced: {} -> {} (was -> {})",
                    new.public, new.private, old.private
                )?;
                if !active.is_empty() {
                    write!(f, "; its ingress rules {active:?} apply to {}", new.private)?;
                }
                Ok(())
            }
            Change::MappingRemoved {
                mapping: m,
                inactive,
            } => {
                write!(f, "mapping removed: {} -> {}", m.public, m.private)?;
                if !inactive.is_empty() {
                    write!(
                        f,
                        "; its ingress rules {inactive:?} stay, inactive until it is mapped again"
                    )?;
                }
                Ok(())
            }
            Change::MappingPresent(m) => {
                write!(f, "mapping {} -> {} already present", m.public, m.private)
            }
            Change::MappingAbsent(p) => write!(f, "revoke: {p} has no mapping, nothing to do"),
            Change::RuleAdded { kind, id } => write!(f, "{kind} rule {id} added"),
            Change::RuleRemoved { kind, id } => write!(f, "{kind} rule {id} removed"),
            Change::RuleKept { kind, id, differs } => {
                write!(f, "{kind} rule {id} already present, kept as it is")?;
                if *differs {
                    f.write_str(" (the payload's fields differ from it)")?;
                }
                Ok(())
            }
            Change::RuleAbsent { id } => write!(f, "revoke: no rule {id}, nothing to do"),
            Change::RuleAllowsNothing { id, public } => write!(
                f,
                "ingress rule {id} to {public} has an empty source_cidr_list and allows \
                 nothing (as on the router); not installed"
            ),
            Change::IngressAllAllowsNothing { id, public } => write!(
                f,
                "ingress rule {id} to {public} has protocol all, which allows nothing in an \
                 ingress rule (as on the router); not installed"
            ),
            Change::RuleDuplicate {
                id,
                public,
                existing,
                active,
            } => {
                write!(f, "ingress rule {id} added")?;
                if !active {
                    write!(f, ", inactive: {public} has no static NAT (yet)")?;
                }
                write!(
                    f,
                    "; it allows what rule {existing} allows, which stays allowed until both \
                     are revoked (as on the router)"
                )
            }
            Change::RuleInactive { id, public } => write!(
                f,
                "ingress rule {id} added, inactive: {public} has no static NAT (yet)"
            ),
            Change::EgressDefault {
                allow,
                was,
                rules,
                dormant,
            } => {
                if allow == was {
                    write!(f, "egress default policy {}, unchanged", policy(*allow))?;
                } else {
                    write!(
                        f,
                        "egress default policy: {} -> {}",
                        policy(*was),
                        policy(*allow)
                    )?;
                }
                match rules.as_slice() {
                    [] => f.write_str(
                        " (no default egress rule: the router's chain ends in its FORWARD \
                         policy, drop)",
                    )?,
                    [one] => write!(f, " (default rule {one})")?,
                    _ => write!(f, " (default rules {rules:?}: allow only if all say allow)")?,
                }
                if !dormant.is_empty() {
                    write!(
                        f,
                        "; egress rules {dormant:?} not in force (exceptions to a default of {})",
                        policy(!*allow)
                    )?;
                }
                Ok(())
            }
            Change::EgressDefaultRule { id, allow } => write!(
                f,
                "egress rule {id} added: the default rule ({} by default)",
                policy(*allow)
            ),
            Change::EgressExceptionAdded { id, under } => write!(
                f,
                "egress rule {id} added ({} exception to a default of {})",
                if *under { "a drop" } else { "an accept" },
                policy(*under)
            ),
        }
    }
}

/// Every rule's effect, in payload order, for logging.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub changes: Vec<(RuleRef, Change)>,
}

impl Summary {
    /// Whether anything changed.
    pub fn changed(&self) -> bool {
        self.changes.iter().any(|(_, c)| !c.is_noop())
    }

    /// One line per rule: `rule #1 (id 11): ingress rule 11 added`.
    pub fn lines(&self) -> impl Iterator<Item = String> + '_ {
        self.changes.iter().map(|(r, c)| format!("{r}: {c}"))
    }

    pub(super) fn push(&mut self, rule: RuleRef, change: Change) {
        self.changes.push((rule, change));
    }
}

/// Counter labels of [`Summary`]'s `Display`, singular and plural.
const TALLY: [(&str, &str); 13] = [
    ("mapping added", "mappings added"),
    ("mapping replaced", "mappings replaced"),
    ("mapping removed", "mappings removed"),
    ("mapping already present", "mappings already present"),
    ("revoke of an unmapped IP", "revokes of unmapped IPs"),
    ("rule added", "rules added"),
    ("rule removed", "rules removed"),
    ("rule kept", "rules kept"),
    ("revoke of an unknown rule", "revokes of unknown rules"),
    ("egress default changed", "egress default changed"),
    (
        "inactive rule added (no static NAT)",
        "inactive rules added (no static NAT)",
    ),
    (
        "rule allowing nothing (empty source_cidr_list)",
        "rules allowing nothing (empty source_cidr_list)",
    ),
    (
        "rule allowing nothing (ingress protocol all)",
        "rules allowing nothing (ingress protocol all)",
    ),
];

/// Which counter of [`TALLY`] a change adds to.
fn tally(c: &Change) -> Option<usize> {
    Some(match c {
        Change::MappingAdded { .. } => 0,
        Change::MappingReplaced { .. } => 1,
        Change::MappingRemoved { .. } => 2,
        Change::MappingPresent(_) => 3,
        Change::MappingAbsent(_) => 4,
        Change::RuleAdded { .. }
        | Change::EgressDefaultRule { .. }
        | Change::EgressExceptionAdded { .. } => 5,
        Change::RuleRemoved { .. } => 6,
        Change::RuleKept { .. } => 7,
        Change::RuleAbsent { .. } => 8,
        Change::EgressDefault { allow, was, .. } if allow != was => 9,
        Change::RuleInactive { .. } => 10,
        Change::RuleAllowsNothing { .. } => 11,
        Change::IngressAllAllowsNothing { .. } => 12,
        // Counted as what it adds; its line names the rule it duplicates.
        Change::RuleDuplicate { active: true, .. } => 5,
        Change::RuleDuplicate { active: false, .. } => 10,
        Change::EgressDefault { .. } => return None,
    })
}

impl fmt::Display for Summary {
    /// Counts: `2 mappings added, 1 rule kept`, or `no change`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut n = [0usize; TALLY.len()];
        for i in self.changes.iter().filter_map(|(_, c)| tally(c)) {
            n[i] += 1;
        }
        let parts: Vec<String> = n
            .iter()
            .zip(TALLY)
            .filter(|(n, _)| **n > 0)
            .map(|(n, (one, many))| format!("{n} {}", if *n == 1 { one } else { many }))
            .collect();
        if parts.is_empty() {
            f.write_str("no change")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}
