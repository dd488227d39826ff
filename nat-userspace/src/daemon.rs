//! natd's request handling and housekeeping: turns API requests into controller changes and
//! reports, and collects expired flows. No I/O of its own besides the maps, so the API server
//! stays a thin layer.
use std::net::Ipv4Addr;

use log::{info, warn};
use nat_common::{Event, ORIGIN_GUEST, Reason, TIMEOUT_SLOTS, conntrack::Timeout};

use crate::{
    api::{
        ConntrackStats, FlowInfo, ListedIngressRule, MappingStatus, ReasonStat, Reply, Request,
        Response, StatsReport, StatusReport,
    },
    ebpf::{Dataplane, DataplaneError, FlowView},
    netfilter::{Nft, SlowPath as _},
    persist::StateDir,
    reconcile::{ApplyError, Controller},
    state::{Mapping, StateError},
};

mod events;
mod kernel;

pub use kernel::{RoundFlow, kernel_round, round_interval};

pub type NatController = Controller<Dataplane, Nft, StateDir>;

/// What became of a CloudStack payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Applied(String),
    /// Invalid (malformed, or a change the state does not allow): the same file can never be
    /// applied.
    Refused(String),
    /// natd could not install it (fast path, slow path or persistence failed); nothing changed,
    /// and the same file may apply later.
    Failed(String),
}

/// natd's state: the controller and the housekeeping counters.
pub struct Daemon {
    pub ctl: NatController,
    /// Idle timeouts by `conntrack::Timeout`, as written to the program.
    timeouts_ns: [u64; TIMEOUT_SLOTS],
    /// Live flows and evictions as of the last collection (metrics read these instead of
    /// walking the table on every scrape).
    entries: u64,
    evictions: u64,
    /// Configured interfaces found missing (logged once each).
    missing: std::collections::BTreeSet<String>,
    /// Link-layer addresses of the usable neighbours seen (all of them: the kernel events
    /// report the ones there are first), by (ifindex, address): a change or a removal bumps
    /// the route generation.
    neighbours: std::collections::BTreeMap<(u32, std::net::Ipv4Addr), [u8; 6]>,
    /// Public IPs whose mapping was removed since natd started: their flows may run on (in
    /// the kernel too) until a flush.
    revoked: std::collections::BTreeSet<Ipv4Addr>,
}

pub use crate::clock::monotonic_ns;

/// The idle timeout (ns) of a flow's stored timer slot; an unknown slot counts as the generic
/// one, as in the program.
fn timeout_of(timeouts: &[u64; TIMEOUT_SLOTS], timer: u8) -> u64 {
    timeouts[Timeout::from_u8(timer).unwrap_or(Timeout::Other) as usize]
}

fn ip(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

impl Daemon {
    pub fn new(ctl: NatController, timeouts_ns: [u64; TIMEOUT_SLOTS]) -> Self {
        Self {
            ctl,
            timeouts_ns,
            entries: 0,
            evictions: 0,
            missing: Default::default(),
            neighbours: Default::default(),
            revoked: Default::default(),
        }
    }

    /// The idle timeout a flow's stored timer slot stands for.
    fn timeout(&self, timer: u8) -> u64 {
        timeout_of(&self.timeouts_ns, timer)
    }

    /// Answers one request. Every refusal (bad input, a conflict) and every failure (natd
    /// could not apply or read what was asked; nothing changed) is an `Error` response naming
    /// what was wrong, and saying which of the two it is.
    pub fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::MappingAdd { public, private } => {
                let what = format!("mapping add {public} {private}");
                self.change(&what, |s| s.add_mapping(Mapping { public, private }))
                    .map(|_| {
                        let n = self.rules_of(public);
                        let rules = if n > 0 {
                            format!("; its {n} ingress rule(s) are in force")
                        } else {
                            String::new()
                        };
                        done(format!("mapping added: {public} -> {private}{rules}"))
                    })
                    .unwrap_or_else(|e| *e)
            }
            Request::MappingDel { public } => {
                let r = self.change(&format!("mapping del {public}"), |s| {
                    s.remove_mapping(public)
                });
                match r {
                    Ok(m) => {
                        let n = self.rules_of(public);
                        let rules = if n > 0 {
                            format!(
                                "; its {n} ingress rule(s) stay, inactive until it is mapped again"
                            )
                        } else {
                            String::new()
                        };
                        done(format!("mapping removed: {public} -> {}{rules}", m.private))
                    }
                    Err(e) => *e,
                }
            }
            Request::MappingList => match self.mappings() {
                Ok(mappings) => Response::Ok(Reply::Mappings { mappings }),
                Err(e) => fail(e),
            },
            Request::FirewallAdd { public, rule } => {
                let what = format!("firewall add {public}");
                let r = rule.ingress_service().map_err(StateError::from);
                let mapped = self.ctl.state().private_of(public).is_some();
                self.change(&what, |s| {
                    s.add_ingress(None, public, r?, rule.cidrs.clone())
                })
                .map(|id| {
                    let message = if mapped {
                        format!("ingress rule {id} added")
                    } else {
                        format!(
                            "ingress rule {id} added, inactive until {public} is mapped (it has \
                             no mapping)"
                        )
                    };
                    Response::Ok(Reply::RuleAdded { id, message })
                })
                .unwrap_or_else(|e| *e)
            }
            Request::FirewallDel { id } => self
                .change(&format!("firewall del {id}"), |s| s.remove_ingress(id))
                .map(|_| done(format!("ingress rule {id} removed")))
                .unwrap_or_else(|e| *e),
            Request::FirewallList => {
                let state = self.ctl.state();
                Response::Ok(Reply::Firewall {
                    rules: state
                        .ingress_rules()
                        .map(|r| ListedIngressRule {
                            rule: r.rule.clone(),
                            active: state.is_active(&r.rule),
                        })
                        .collect(),
                })
            }
            Request::EgressPolicy { allow } => {
                let p = if allow { "allow" } else { "deny" };
                self.change(&format!("egress policy {p}"), |s| {
                    s.set_egress_default_allow(allow);
                    Ok(())
                })
                .map(|_| done(format!("egress default policy: {p}")))
                .unwrap_or_else(|e| *e)
            }
            Request::EgressAdd { rule } => {
                let r = rule.service().map_err(StateError::from);
                self.change("egress add", |s| {
                    s.add_egress_from(None, r?, rule.cidrs.clone(), rule.sources.clone())
                })
                .map(|id| {
                    Response::Ok(Reply::RuleAdded {
                        id,
                        message: format!("egress rule {id} added"),
                    })
                })
                .unwrap_or_else(|e| *e)
            }
            Request::EgressDel { id } => self
                .change(&format!("egress del {id}"), |s| s.remove_egress(id))
                .map(|_| done(format!("egress rule {id} removed")))
                .unwrap_or_else(|e| *e),
            Request::EgressList => Response::Ok(Reply::Egress {
                default_allow: self.ctl.state().egress_default_allow(),
                rules: self
                    .ctl
                    .state()
                    .egress_rules()
                    .map(|r| r.rule.clone())
                    .collect(),
                inactive: self.ctl.state().inactive_egress_ids().into_iter().collect(),
            }),
            Request::ConntrackList => match self.flows() {
                Ok(r) => Response::Ok(r),
                Err(e) => fail(e),
            },
            Request::ConntrackFlush { public } => self.flush(public),
            Request::CloudstackApply { name, payload } => self.apply_cloudstack(&name, &payload),
            Request::Status => match self.status() {
                Ok(s) => Response::Ok(Reply::Status(s)),
                Err(e) => fail(e),
            },
            Request::Stats => match self.stats(true) {
                Ok(s) => Response::Ok(Reply::Stats(s)),
                Err(e) => fail(e),
            },
        }
    }

    /// How many ingress rules `public` has, active or not.
    fn rules_of(&self, public: Ipv4Addr) -> usize {
        self.ctl
            .state()
            .ingress_rules()
            .filter(|r| r.rule.public == public)
            .count()
    }

    /// Applies a change through the controller; a refusal becomes the error response.
    fn change<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut crate::state::DesiredState) -> Result<T, StateError>,
    ) -> Result<T, Box<Response>> {
        match self.ctl.change(f) {
            Ok((out, diff)) => {
                self.forget_flows(&diff.removed);
                Ok(out)
            }
            Err(ApplyError::Invalid(e)) => Err(Box::new(refuse(format!("{what} refused: {e}")))),
            Err(e) => Err(Box::new(fail(format!(
                "{what} failed, nothing changed: {}",
                crate::report(&e)
            )))),
        }
    }

    /// Ends the flows of `public`, or every flow: in the fast path, and the kernel's
    /// connection-tracking entries of the public IPs concerned (flows the slow path tracked
    /// must not outlive a flush either): every mapped public IP, every public IP revoked since
    /// natd started and every one a fast-path flow named.
    fn flush(&mut self, public: Option<Ipv4Addr>) -> Response {
        let named = std::cell::RefCell::new(std::collections::BTreeSet::new());
        let n = self.remove_flows(|v| {
            let p = v.public();
            let hit = public.is_none_or(|want| want == p);
            if hit {
                named.borrow_mut().insert(p);
            }
            hit
        });
        let mut publics = named.into_inner();
        match public {
            Some(p) => {
                publics.insert(p);
                self.revoked.remove(&p);
            }
            None => {
                publics.extend(self.ctl.state().mappings().map(|m| m.public));
                publics.append(&mut self.revoked);
            }
        }
        let publics: Vec<Ipv4Addr> = publics.into_iter().collect();
        self.ctl.slow_mut().forget_publics(&publics);
        match public {
            Some(p) => done(format!("{n} flows of {p} flushed")),
            None => done(format!("{n} flows flushed")),
        }
    }

    /// A removed mapping refuses new flows at once; its established flows run on with their
    /// binding until they end or time out, as netfilter keeps them on a CloudStack router
    /// (`natctl conntrack flush` ends them).
    fn forget_flows(&mut self, removed: &[Mapping]) {
        self.revoked.extend(removed.iter().map(|m| m.public));
        if !removed.is_empty() {
            info!(
                "{} mapping(s) removed: new flows refused, established flows kept until they end",
                removed.len()
            );
        }
    }

    /// Applies one CloudStack payload file, all or nothing.
    pub fn apply_cloudstack(&mut self, name: &str, text: &str) -> Response {
        match self.apply_payload(name, text) {
            Payload::Applied(message) => done(message),
            Payload::Refused(message) => refuse(message),
            Payload::Failed(message) => fail(message),
        }
    }

    /// Applies one CloudStack payload file, all or nothing, and says whether it was refused
    /// (invalid: trying again cannot help) or failed (natd could not install it).
    pub fn apply_payload(&mut self, name: &str, text: &str) -> Payload {
        let payload = match crate::cloudstack::parse(text) {
            Ok(p) => p,
            Err(e) => return Payload::Refused(format!("{name} refused: {e}")),
        };
        let mut new = self.ctl.state().clone();
        let summary = match crate::cloudstack::apply(&payload, &mut new) {
            Ok(s) => s,
            Err(e) => return Payload::Refused(format!("{name} refused: {e}")),
        };
        match self.ctl.apply(new) {
            Ok(diff) => self.forget_flows(&diff.removed),
            Err(ApplyError::Invalid(e)) => {
                return Payload::Refused(format!("{name} refused: {e}"));
            }
            Err(e) => {
                return Payload::Failed(format!(
                    "{name} failed, nothing changed: {}",
                    crate::report(&e)
                ));
            }
        }
        for line in summary.lines() {
            info!("{name}: {line}");
        }
        Payload::Applied(format!("{name}: {summary}"))
    }

    fn remove_flows(&mut self, pred: impl Fn(&FlowView) -> bool) -> usize {
        match self.ctl.fast_mut().remove_flows(pred) {
            Ok((n, _)) => {
                // `remove_flows` emptied each removed entry's slot, but a packet that found
                // an entry just before its removal may have filled the slot again: a new
                // route generation makes the program leave every slot for the full path.
                if n > 0
                    && let Err(e) = self.ctl.fast_mut().bump_route_generation()
                {
                    warn!("leaving the flow cache after a flush: {e}");
                }
                if let Err(e) = self
                    .ctl
                    .fast_mut()
                    .bump_event(Event::ConntrackFlushed, n as u64)
                {
                    warn!("counting flushed flows: {e}");
                }
                n
            }
            Err(e) => {
                warn!("removing flows: {e}");
                0
            }
        }
    }

    /// Deletes expired flows (the program treats them as absent already); returns how many.
    pub fn collect_expired(&mut self) -> Result<usize, DataplaneError> {
        let now = monotonic_ns();
        let timeouts = self.timeouts_ns;
        let sweep = self
            .ctl
            .fast_mut()
            .sweep(|v| now.saturating_sub(v.last_seen) > timeout_of(&timeouts, v.timer))?;
        let (n, seen) = (sweep.removed, sweep.seen);
        let freed = self.ctl.fast_mut().recycle_slots(&sweep.counter_slots);
        if freed > 0 {
            log::debug!("{freed} counter slot(s) of removed mappings free again");
        }
        self.ctl
            .fast_mut()
            .bump_event(Event::ConntrackCollected, n as u64)?;
        self.entries = (seen - n) as u64;
        let events = self.ctl.fast_mut().events()?;
        self.evictions = self.evictions.max(evictions(&events, self.entries));
        if n > 0 {
            info!("conntrack: collected {n} expired flows");
        }
        Ok(n)
    }

    fn mappings(&mut self) -> Result<Vec<MappingStatus>, String> {
        let list: Vec<Mapping> = self.ctl.state().mappings().collect();
        self.mapping_status(list)
    }

    /// The counters of each mapping of `list`.
    fn mapping_status(&mut self, list: Vec<Mapping>) -> Result<Vec<MappingStatus>, String> {
        list.into_iter()
            .map(|m| {
                let counters = self
                    .ctl
                    .fast_mut()
                    .counters(m)
                    .map_err(|e| format!("reading counters: {e}"))?;
                Ok(MappingStatus {
                    public: m.public,
                    private: m.private,
                    counters,
                })
            })
            .collect()
    }

    fn flows(&mut self) -> Result<Reply, String> {
        let now = monotonic_ns();
        let dp = self.ctl.fast_mut();
        let capacity = dp.conntrack_capacity().map_err(|e| e.to_string())?;
        let raw = dp.flows().map_err(|e| format!("reading flows: {e}"))?;
        let flows = raw
            .into_iter()
            .map(|v| {
                let k = v.flow;
                let idle = now.saturating_sub(v.last_seen);
                FlowInfo {
                    proto: k.proto,
                    guest: ip(k.guest),
                    guest_port: u16::from_be(k.guest_port),
                    remote: ip(k.remote),
                    remote_port: u16::from_be(k.remote_port),
                    state: v.state.name().to_string(),
                    origin: if k.origin == ORIGIN_GUEST {
                        "guest"
                    } else {
                        "public"
                    }
                    .to_string(),
                    idle_secs: idle / 1_000_000_000,
                    expires_in_secs: self.timeout(v.timer).saturating_sub(idle) / 1_000_000_000,
                }
            })
            .collect();
        Ok(Reply::Flows { capacity, flows })
    }

    fn status(&mut self) -> Result<StatusReport, String> {
        let st = self.ctl.state();
        let (mappings, ingress_rules, egress_rules, egress_default_allow) = (
            st.len(),
            st.ingress_rules().count(),
            st.egress_rules().count(),
            st.egress_default_allow(),
        );
        let inactive_ingress_rules = ingress_rules - st.active_ingress_rules().count();
        let state_file = self.ctl.store().file().display().to_string();
        let dp = self.ctl.fast_mut();
        // Counted now, as `conntrack list` lists them (the last collection's count may be
        // up to a collection interval old).
        let flows = dp.flows().map_err(|e| format!("reading flows: {e}"))?.len() as u64;
        Ok(StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            interfaces: dp.attached().cloned().collect(),
            mappings,
            ingress_rules,
            inactive_ingress_rules,
            egress_rules,
            egress_default_allow,
            flows,
            flow_capacity: self
                .ctl
                .fast_mut()
                .conntrack_capacity()
                .map_err(|e| e.to_string())?,
            generation: self.ctl.generation(),
            applied_at: self.ctl.applied_at(),
            state_file,
            bpffs: self
                .ctl
                .fast_mut()
                .pins()
                .map(|p| p.root().display().to_string()),
        })
    }

    /// Every counter natd reports. `walk_flows`: count live flows now (natctl) rather than
    /// use the last collection's count (metrics, every scrape).
    pub fn stats(&mut self, walk_flows: bool) -> Result<StatsReport, String> {
        let all: Vec<Mapping> = self.ctl.state().mappings().collect();
        self.stats_of(walk_flows, all)
    }

    /// [`Self::stats`] with the counters of the mappings in `mappings` only (metrics limit
    /// per-mapping series); every other figure is the same.
    pub fn stats_of(
        &mut self,
        walk_flows: bool,
        mappings: Vec<Mapping>,
    ) -> Result<StatsReport, String> {
        let mappings = self.mapping_status(mappings)?;
        let dp = self.ctl.fast_mut();
        let counters = dp.stats().map_err(|e| format!("reading counters: {e}"))?;
        let events = dp.events().map_err(|e| format!("reading counters: {e}"))?;
        let entries = if walk_flows {
            dp.flows().map_err(|e| format!("reading flows: {e}"))?.len() as u64
        } else {
            self.entries
        };
        let capacity = dp.conntrack_capacity().map_err(|e| e.to_string())?;
        let ev = |e: Event| events.get(&e).copied().unwrap_or(0);
        let creates = ev(Event::ConntrackCreate);
        let reasons = Reason::ALL
            .iter()
            .map(|r| {
                let c = counters.get(r).copied().unwrap_or_default();
                ReasonStat {
                    reason: r.name().to_string(),
                    action: r.action().to_string(),
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect();
        let conntrack = ConntrackStats {
            entries,
            capacity,
            hits: ev(Event::ConntrackHit),
            misses: ev(Event::ConntrackMiss),
            creates,
            expired_seen: ev(Event::ConntrackExpired),
            collected: ev(Event::ConntrackCollected),
            flushed: ev(Event::ConntrackFlushed),
            ended: ev(Event::ConntrackEnded),
            evictions: if walk_flows {
                evictions(&events, entries)
            } else {
                self.evictions
            },
        };
        let slow_path = self.ctl.slow_mut().counters().map_err(|e| e.to_string())?;
        Ok(StatsReport {
            generation: self.ctl.generation(),
            interfaces: self.ctl.fast_mut().attached().cloned().collect(),
            reasons,
            conntrack,
            mappings,
            slow_path,
        })
    }
}

/// Flows the kernel evicted (LRU) to make room: every flow ever created is either still there,
/// collected, flushed, ended by the kernel (`--policy kernel`) or evicted. All counters live in the pinned maps, so this holds across
/// restarts.
fn evictions(events: &std::collections::BTreeMap<Event, u64>, entries: u64) -> u64 {
    let ev = |e| events.get(&e).copied().unwrap_or(0);
    ev(Event::ConntrackCreate).saturating_sub(
        ev(Event::ConntrackCollected)
            + ev(Event::ConntrackFlushed)
            + ev(Event::ConntrackEnded)
            + entries,
    )
}

fn done(message: String) -> Response {
    Response::Ok(Reply::Done { message })
}

/// The request is refused: bad input or a conflict (natctl exits 1).
fn refuse(message: String) -> Response {
    warn!("{message}");
    Response::refused(message)
}

/// natd could not carry out a valid request, and changed nothing (natctl exits 2).
fn fail(message: String) -> Response {
    warn!("{message}");
    Response::failed(message)
}
