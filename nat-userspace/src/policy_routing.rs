//! Policy routing on the slow path: what the kernel translates leaves through the public
//! network that owns its public IP, as what the fast path translates does.
//!
//! The fast path routes a guest's packet as coming from its public IP P (`bpf_fib_lookup`
//! from P), so the operator's source rules (`ip rule add from P lookup T`; CloudStack's router
//! has `from NETWORK lookup Table_ethN` per public interface) choose P's network. The kernel
//! routes before its SNAT, by the private source V, which no such rule matches. So natd
//! mirrors each operator rule that routes a mapped P by its source with a rule of its own at
//! the same priority, `fwmark M/ROUTE_MARK_MASK lookup T` (protocol [`RULE_PROTOCOL`]), and
//! its nftables table ([`crate::netfilter`]) puts M in the connection mark of every new
//! connection from V or to P, and in the mark of every packet of such a connection arriving
//! from the guest side, before the kernel routes it: as CloudStack's router does with
//! `CONNMARK` and one `fwmark` rule per public interface table.
//!
//! Only rules whose one selector is a source prefix are mirrored (no destination, TOS,
//! interface, mark, port, protocol, uid range or `not`). A mapping follows the first such rule
//! (lowest priority) whose prefix holds its P; rules of the same priority and table share one
//! mark and one rule of natd's, and a mark keeps its priority and table while natd's rule for
//! it exists (across restarts too), so the marks of live connections keep their meaning. At
//! most [`MAX_ROUTE_MARKS`] priority and table pairs are mirrored (the rest are logged and
//! their mappings routed as before). natd's rules are known by their protocol and mark mask;
//! no other rule is ever changed.
use std::{fmt, net::Ipv4Addr};

use futures::TryStreamExt as _;
use nat_common::marks::{MAX_ROUTE_MARKS, ROUTE_MARK_MASK, route_mark};
use rtnetlink::{
    Handle, IpVersion,
    packet_route::{
        AddressFamily,
        route::RouteProtocol,
        rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
    },
};

use crate::{addresses::with_netlink, cidr::Cidr, state::Mapping};

/// The routing protocol number natd's policy rules carry (`ip rule ... protocol 167`), so
/// natd tells them from everyone else's. Not assigned in the kernel's `rtnetlink.h`.
pub const RULE_PROTOCOL: u8 = 167;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot open an rtnetlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("listing the IPv4 policy rules: {0}")]
    List(#[source] Box<rtnetlink::Error>),
    #[error("adding policy rule `{rule}`: {source}")]
    Add {
        rule: MarkRule,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("removing policy rule `{rule}`: {source}")]
    Remove {
        rule: MarkRule,
        #[source]
        source: Box<rtnetlink::Error>,
    },
}

/// An operator's rule that routes by source prefix alone: `priority P from SOURCE lookup T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceRule {
    pub priority: u32,
    pub source: Cidr,
    pub table: u32,
}

/// One of natd's rules: `priority P fwmark MARK/ROUTE_MARK_MASK lookup T`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MarkRule {
    pub priority: u32,
    pub mark: u32,
    pub table: u32,
}

impl fmt::Display for MarkRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "priority {} fwmark {:#x}/{ROUTE_MARK_MASK:#x} lookup {} protocol {RULE_PROTOCOL}",
            self.priority, self.mark, self.table
        )
    }
}

/// The mappings the operator's source rules of one priority and table route, and natd's rule
/// for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteGroup {
    pub rule: MarkRule,
    /// The source prefixes of the operator's rules (of that priority and table) that hold
    /// the mappings' public IPs.
    pub sources: Vec<Cidr>,
    pub mappings: Vec<Mapping>,
}

/// What natd installs so the kernel routes translated traffic as the fast path does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// By priority, then table.
    pub groups: Vec<RouteGroup>,
    /// Mappings a source rule routes for which no mark was left (more than
    /// [`MAX_ROUTE_MARKS`] priority and table pairs route mapped public IPs).
    pub unmarked: Vec<Mapping>,
}

impl RoutePlan {
    /// The plan for `mappings` under the operator's source rules `rules` (in the kernel's
    /// order: by priority, then as listed). Mappings routed by rules of the same priority and
    /// table share a mark; a priority and table that `existing` (natd's rules in the kernel)
    /// already has a mark for keep it, so the marks of live connections keep their meaning
    /// when rules come and go; the others take the lowest free marks.
    pub fn of(
        mappings: impl IntoIterator<Item = Mapping>,
        rules: &[SourceRule],
        existing: &[MarkRule],
    ) -> Self {
        let mut ordered: Vec<&SourceRule> = rules.iter().collect();
        ordered.sort_by_key(|r| r.priority);
        let mut groups: std::collections::BTreeMap<(u32, u32), RouteGroup> = Default::default();
        for m in mappings {
            let Some(r) = ordered.iter().find(|r| r.source.holds(m.public)) else {
                continue;
            };
            let g = groups
                .entry((r.priority, r.table))
                .or_insert_with(|| RouteGroup {
                    rule: MarkRule {
                        priority: r.priority,
                        mark: 0,
                        table: r.table,
                    },
                    sources: Vec::new(),
                    mappings: Vec::new(),
                });
            if !g.sources.contains(&r.source) {
                g.sources.push(r.source);
            }
            g.mappings.push(m);
        }
        let mut taken: std::collections::BTreeSet<u32> = Default::default();
        for g in groups.values_mut() {
            let kept = existing.iter().find(|e| {
                (e.priority, e.table) == (g.rule.priority, g.rule.table) && !taken.contains(&e.mark)
            });
            if let Some(e) = kept {
                g.rule.mark = e.mark;
                taken.insert(e.mark);
            }
        }
        let mut free = (1..=MAX_ROUTE_MARKS)
            .map(route_mark)
            .filter(|m| !taken.contains(m));
        let mut plan = RoutePlan::default();
        for mut g in groups.into_values() {
            if g.rule.mark == 0 {
                match free.next() {
                    Some(m) => g.rule.mark = m,
                    None => {
                        plan.unmarked.extend(g.mappings);
                        continue;
                    }
                }
            }
            plan.groups.push(g);
        }
        plan
    }

    /// natd's rules for this plan.
    pub fn mark_rules(&self) -> Vec<MarkRule> {
        self.groups.iter().map(|g| g.rule).collect()
    }
}

/// The IPv4 address of a rule's source attribute.
fn source_of(m: &RuleMessage) -> Option<Ipv4Addr> {
    m.attributes.iter().find_map(|a| match a {
        RuleAttribute::Source(std::net::IpAddr::V4(a)) => Some(*a),
        _ => None,
    })
}

/// The table a rule looks up (the attribute for tables above 255, else the header's).
fn table_of(m: &RuleMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

fn priority_of(m: &RuleMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

/// natd's own rule, if `m` is one.
pub fn ours(m: &RuleMessage) -> Option<MarkRule> {
    let (mut proto, mut mark, mut mask) = (None, 0, 0);
    for a in &m.attributes {
        match a {
            RuleAttribute::Protocol(p) => proto = Some(u8::from(*p)),
            RuleAttribute::FwMark(v) => mark = *v,
            RuleAttribute::FwMask(v) => mask = *v,
            _ => {}
        }
    }
    (m.header.family == AddressFamily::Inet
        && proto == Some(RULE_PROTOCOL)
        && mask == ROUTE_MARK_MASK
        && mark != 0
        && mark & !ROUTE_MARK_MASK == 0)
        .then(|| MarkRule {
            priority: priority_of(m),
            mark,
            table: table_of(m),
        })
}

/// The operator's rule `m` if it routes by source prefix alone (see the module's doc).
pub fn source_rule(m: &RuleMessage) -> Option<SourceRule> {
    let h = &m.header;
    if h.family != AddressFamily::Inet
        || h.action != RuleAction::ToTable
        || h.src_len == 0
        || h.dst_len != 0
        || h.tos != 0
        || h.flags.contains(RuleFlags::Invert)
        || ours(m).is_some()
    {
        return None;
    }
    for a in &m.attributes {
        match a {
            RuleAttribute::Source(_)
            | RuleAttribute::Priority(_)
            | RuleAttribute::Table(_)
            | RuleAttribute::Protocol(_) => {}
            RuleAttribute::FwMark(0) | RuleAttribute::FwMask(_) | RuleAttribute::L3MDev(false) => {}
            // Suppressors only narrow what the table's answer may be; the rule still
            // matches by source alone.
            RuleAttribute::SuppressPrefixLen(_) | RuleAttribute::SuppressIfGroup(_) => {}
            _ => return None,
        }
    }
    Some(SourceRule {
        priority: priority_of(m),
        source: Cidr::new(source_of(m)?, h.src_len)?,
        table: table_of(m),
    })
}

/// The kernel's IPv4 rules: the operator's source rules and natd's own (with their messages).
async fn dump(
    handle: &Handle,
) -> Result<(Vec<SourceRule>, Vec<(MarkRule, RuleMessage)>), RoutingError> {
    let mut dump = handle.rule().get(IpVersion::V4).execute();
    let (mut sources, mut mine) = (Vec::new(), Vec::new());
    while let Some(m) = dump
        .try_next()
        .await
        .map_err(|e| RoutingError::List(Box::new(e)))?
    {
        if let Some(r) = ours(&m) {
            mine.push((r, m));
        } else if let Some(r) = source_rule(&m) {
            sources.push(r);
        }
    }
    Ok((sources, mine))
}

/// The operator's source rules and natd's own rules in the kernel now.
pub fn rules() -> Result<(Vec<SourceRule>, Vec<MarkRule>), RoutingError> {
    with_netlink(|handle| async move {
        let (sources, mine) = dump(&handle).await?;
        Ok((sources, mine.into_iter().map(|(r, _)| r).collect()))
    })
}

/// Makes natd's rules in the kernel exactly `want`: adds the missing ones, then removes the
/// others natd made (an earlier natd's too).
pub fn sync(want: &[MarkRule]) -> Result<(), RoutingError> {
    let want = want.to_vec();
    with_netlink(|handle| async move {
        let (_, mine) = dump(&handle).await?;
        for r in &want {
            if mine.iter().any(|(m, _)| m == r) {
                continue;
            }
            let mut req = handle
                .rule()
                .add()
                .v4()
                .action(RuleAction::ToTable)
                .priority(r.priority)
                .fw_mark(r.mark)
                .table_id(r.table);
            let msg = req.message_mut();
            msg.attributes.push(RuleAttribute::FwMask(ROUTE_MARK_MASK));
            msg.attributes
                .push(RuleAttribute::Protocol(RouteProtocol::from(RULE_PROTOCOL)));
            req.execute().await.map_err(|e| RoutingError::Add {
                rule: *r,
                source: Box::new(e),
            })?;
        }
        for (r, m) in mine {
            if want.contains(&r) {
                continue;
            }
            handle
                .rule()
                .del(m)
                .execute()
                .await
                .map_err(|e| RoutingError::Remove {
                    rule: r,
                    source: Box::new(e),
                })?;
        }
        Ok(())
    })
}

#[cfg(test)]
#[path = "policy_routing_tests.rs"]
mod tests;
