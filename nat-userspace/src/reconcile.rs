//! The one path every change takes: validate (building the new [`DesiredState`]) -> plan the
//! map writes against what is installed -> write the fast path -> replace the slow path ->
//! persist. If any step fails, the writes already done are undone in reverse, the slow path is
//! given the installed state again (its table may have been replaced before a later part of
//! the step, such as address management, failed), and the installed state stays what it was.
use log::{error, info};

use crate::{
    ebpf::{DataplaneError, FastPath},
    netfilter::{NetfilterError, SlowPath},
    persist::{PersistError, Snapshot, StateDir, unix_now},
    state::{DesiredState, Diff, StateError},
    tables::{Op, Tables, plan},
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(#[from] StateError),
    #[error("fast path: {0}")]
    FastPath(#[from] DataplaneError),
    #[error("slow path: {0}")]
    SlowPath(#[from] NetfilterError),
    #[error("persisting: {0}")]
    Persist(#[from] PersistError),
}

/// Where accepted states are persisted; a trait so tests can run without a state directory.
pub trait Store {
    fn save(&mut self, state: &DesiredState, generation: u64) -> Result<(), PersistError>;
}

/// No persistence.
pub struct NoStore;

impl Store for NoStore {
    fn save(&mut self, _: &DesiredState, _: u64) -> Result<(), PersistError> {
        Ok(())
    }
}

impl Store for StateDir {
    fn save(&mut self, state: &DesiredState, generation: u64) -> Result<(), PersistError> {
        StateDir::save(self, &Snapshot::of(state, generation, unix_now()))
    }
}

/// Owns the installed state, the two places it is installed and where it is persisted.
pub struct Controller<F, S, P = NoStore> {
    state: DesiredState,
    tables: Tables,
    fast: F,
    slow: S,
    store: P,
    generation: u64,
    applied_at: u64,
}

impl<F: FastPath, S: SlowPath> Controller<F, S, NoStore> {
    /// A controller with nothing installed yet (the maps are empty, the egress default is the
    /// program's zeroed default: allow) and no persistence.
    pub fn new(fast: F, slow: S) -> Self {
        Controller::with_store(
            fast,
            slow,
            NoStore,
            DesiredState::default(),
            Tables::default(),
            0,
        )
    }
}

impl<F: FastPath, S: SlowPath, P: Store> Controller<F, S, P> {
    /// A controller whose fast path currently holds `installed` (mappings) and `tables`
    /// (firewall entries), e.g. read back from pinned maps, persisting to `store`.
    pub fn with_store(
        fast: F,
        slow: S,
        store: P,
        installed: DesiredState,
        tables: Tables,
        generation: u64,
    ) -> Self {
        Self {
            state: installed,
            tables,
            fast,
            slow,
            store,
            generation,
            applied_at: 0,
        }
    }

    pub fn store(&self) -> &P {
        &self.store
    }

    /// When the last change was applied (seconds since the epoch; 0 = none since start).
    pub fn applied_at(&self) -> u64 {
        self.applied_at
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// How many changes were applied since start.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn fast_mut(&mut self) -> &mut F {
        &mut self.fast
    }

    pub fn slow_mut(&mut self) -> &mut S {
        &mut self.slow
    }

    /// Builds a new state from the current one with `change` (which validates), and applies it.
    pub fn change<T>(
        &mut self,
        change: impl FnOnce(&mut DesiredState) -> Result<T, StateError>,
    ) -> Result<(T, Diff), ApplyError> {
        let mut new = self.state.clone();
        let out = change(&mut new)?;
        let diff = self.apply(new)?;
        Ok((out, diff))
    }

    /// Installs `new` in place of the current state, all or nothing.
    pub fn apply(&mut self, new: DesiredState) -> Result<Diff, ApplyError> {
        self.fast.begin();
        let r = self.apply_batch(new);
        self.fast.end();
        r
    }

    /// [`Controller::apply`] inside one batch of fast-path writes.
    fn apply_batch(&mut self, new: DesiredState) -> Result<Diff, ApplyError> {
        let tables = Tables::of(&new);
        let ops = plan(&self.state, &self.tables, &new, &tables);
        // Every change to the desired state changes some map entry; no writes means the fast
        // path already holds `new` (e.g. a restart adopting pinned maps).
        let unchanged = ops.is_empty();
        let mut done: Vec<Op> = Vec::new();
        for (op, undo) in ops {
            if let Err(e) = self.fast.apply(&op) {
                self.undo(&done);
                return Err(e.into());
            }
            done.push(undo);
        }
        if let Err(e) = self.slow.replace(&new) {
            self.undo(&done);
            self.restore_slow();
            return Err(e.into());
        }
        let generation = if unchanged {
            self.generation
        } else {
            self.generation + 1
        };
        if let Err(e) = self.store.save(&new, generation) {
            // Installed but not persisted would be lost at restart: take it back.
            self.undo(&done);
            self.restore_slow();
            return Err(e.into());
        }
        // A removed mapping's established flows run on, in the fast path and in the kernel's
        // conntrack alike (as a CloudStack router keeps them); `conntrack flush` ends them.
        let diff = Diff::between(&self.state, &new);
        for m in &diff.removed {
            info!("mapping removed: {} -> {}", m.public, m.private);
        }
        for m in &diff.added {
            info!("mapping added: {} -> {}", m.public, m.private);
        }
        if !unchanged {
            log_rules(&self.state, &new);
        }
        self.state = new;
        self.tables = tables;
        if !unchanged {
            self.generation = generation;
            self.applied_at = unix_now();
        }
        Ok(diff)
    }

    /// Brings the slow path up to date with what it derives from the kernel for the installed
    /// state (policy rules changed); says whether its table was installed again.
    pub fn refresh_slow(&mut self) -> Result<bool, NetfilterError> {
        self.slow.refresh(&self.state)
    }

    /// Gives the slow path the installed state again after a failed change.
    fn restore_slow(&mut self) {
        if let Err(e) = self.slow.replace(&self.state) {
            error!("restoring the slow path failed, it may differ from the desired state: {e}");
        }
    }

    fn undo(&mut self, done: &[Op]) {
        for op in done.iter().rev() {
            if let Err(e) = self.fast.apply(op) {
                error!("rollback failed, the fast path may differ from the desired state: {e}");
            }
        }
    }
}

fn list(cidrs: &[crate::cidr::Cidr]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn log_rules(old: &DesiredState, new: &DesiredState) {
    for r in old
        .ingress_rules()
        .filter(|r| !new.ingress_rules().any(|n| n == *r))
    {
        let r = &r.rule;
        info!(
            "ingress rule {} removed: {} to {} from {}",
            r.id,
            r.service,
            r.public,
            list(&r.cidrs)
        );
    }
    for r in new
        .ingress_rules()
        .filter(|r| !old.ingress_rules().any(|o| o == *r))
    {
        let active = if new.is_active(&r.rule) {
            ""
        } else {
            " (inactive: no mapping)"
        };
        let r = &r.rule;
        info!(
            "ingress rule {} added: {} to {} from {}{active}",
            r.id,
            r.service,
            r.public,
            list(&r.cidrs)
        );
    }
    for r in old
        .egress_rules()
        .filter(|r| !new.egress_rules().any(|n| n == *r))
    {
        info!(
            "egress rule {} removed: {} from {} to {}",
            r.rule.id,
            r.rule.service,
            list(&r.rule.sources),
            list(&r.rule.cidrs)
        );
    }
    for r in new
        .egress_rules()
        .filter(|r| !old.egress_rules().any(|o| o == *r))
    {
        info!(
            "egress rule {} added: {} from {} to {}",
            r.rule.id,
            r.rule.service,
            list(&r.rule.sources),
            list(&r.rule.cidrs)
        );
    }
    if old.egress_default_allow() != new.egress_default_allow() {
        let p = if new.egress_default_allow() {
            "allow"
        } else {
            "deny"
        };
        info!("egress default policy: {p}");
    }
    // CloudStack's exceptions act under the default they were added under (see
    // `DesiredState::is_egress_active`): say which ones a change of default woke or stilled.
    let held: std::collections::BTreeSet<u64> = old.egress_rules().map(|r| r.rule.id).collect();
    let (was_out, now_out) = (old.inactive_egress_ids(), new.inactive_egress_ids());
    for r in new.egress_rules() {
        let id = r.rule.id;
        let is = !now_out.contains(&id);
        // A rule held before whose standing changed, or a rule added out of force.
        let changed = if held.contains(&id) {
            is == was_out.contains(&id)
        } else {
            !is
        };
        if changed {
            let under = new.egress_under().get(&id).copied().unwrap_or(true);
            let (exception, default) = if under {
                ("drop", "allow")
            } else {
                ("accept", "deny")
            };
            if is {
                info!("egress rule {id} in force: the default is {default} again");
            } else {
                info!(
                    "egress rule {id} not in force: a {exception} exception to a default of \
                     {default}, and the default is not {default}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;
    use crate::{
        firewall::{Proto, Service},
        state::Mapping,
        tables::Entry,
    };

    #[derive(Default)]
    struct FakeFast {
        maps: BTreeMap<std::net::Ipv4Addr, std::net::Ipv4Addr>,
        entries: HashMap<Entry, nat_common::RuleBits>,
        fail_on: Option<Op>,
        /// Inside a batch ([`FastPath::begin`] .. [`FastPath::end`]), and the writes made
        /// outside one.
        in_batch: bool,
        unbatched: usize,
    }

    impl FastPath for FakeFast {
        fn begin(&mut self) {
            assert!(!self.in_batch, "a batch began inside a batch");
            self.in_batch = true;
        }

        fn end(&mut self) {
            assert!(self.in_batch, "a batch ended that never began");
            self.in_batch = false;
        }

        fn apply(&mut self, op: &Op) -> Result<(), DataplaneError> {
            if !self.in_batch {
                self.unbatched += 1;
            }
            if self.fail_on == Some(*op) {
                return Err(DataplaneError::MissingMap("NAT_IN"));
            }
            match *op {
                Op::AddMapping(m) => {
                    self.maps.insert(m.public, m.private);
                }
                Op::RemoveMapping(m) => {
                    self.maps.remove(&m.public);
                }
                Op::Set(e, b) => {
                    self.entries.insert(e, b);
                }
                Op::Unset(e) => {
                    self.entries.remove(&e);
                }
                Op::EgressDefaultDeny(_) | Op::EgressClosed => {}
            }
            Ok(())
        }
    }

    #[derive(Default)]
    struct FakeSlow {
        installed: Option<DesiredState>,
        fail: bool,
        /// Installs the table, then fails (as address management after `nft -f` may), when
        /// given a state with this many mappings.
        fail_after_install_at: Option<usize>,
    }

    impl SlowPath for FakeSlow {
        fn replace(&mut self, s: &DesiredState) -> Result<(), NetfilterError> {
            if self.fail {
                return Err(NetfilterError::Refused("no".into()));
            }
            self.installed = Some(s.clone());
            if self.fail_after_install_at == Some(s.len()) {
                return Err(NetfilterError::Refused("addresses".into()));
            }
            Ok(())
        }
        fn remove(&mut self) -> Result<(), NetfilterError> {
            self.installed = None;
            Ok(())
        }
        fn forget(&mut self, _: &[Mapping]) {}
        fn forget_publics(&mut self, _: &[std::net::Ipv4Addr]) {}
    }

    fn m(p: &str, v: &str) -> Mapping {
        Mapping {
            public: p.parse().unwrap(),
            private: v.parse().unwrap(),
        }
    }

    fn tcp22() -> Service {
        Service {
            proto: Proto::Tcp,
            ports: Some("22".parse().unwrap()),
            icmp_type: None,
            icmp_code: None,
        }
    }

    #[test]
    fn applies_to_both_paths() {
        let mut c = Controller::new(FakeFast::default(), FakeSlow::default());
        c.change(|s| s.add_mapping(m("203.0.113.1", "10.0.0.1")))
            .unwrap();
        assert_eq!(c.fast.maps.len(), 1);
        assert_eq!(c.slow.installed.as_ref().unwrap().len(), 1);
        let (id, _) = c
            .change(|s| s.add_ingress(None, "203.0.113.1".parse().unwrap(), tcp22(), vec![]))
            .unwrap();
        assert!(!c.fast.entries.is_empty());
        c.change(|s| s.remove_ingress(id)).unwrap();
        assert!(c.fast.entries.is_empty());
        c.change(|s| s.remove_mapping("203.0.113.1".parse().unwrap()))
            .unwrap();
        assert!(c.fast.maps.is_empty());
        assert_eq!(c.generation(), 4);
    }

    /// As on CloudStack's router, whose firewall databag is independent of its static NAT one:
    /// a public IP's rules outlive its mapping, inactive (nothing in the fast path), and are in
    /// force again when it is mapped again. (They used to be deleted with the mapping, which a
    /// CloudStack router never does and CloudStack never makes up for: it does not resend them.)
    #[test]
    fn deleting_a_mapping_keeps_its_rules_inactive() {
        let mut c = Controller::new(FakeFast::default(), FakeSlow::default());
        c.change(|s| s.add_mapping(m("203.0.113.1", "10.0.0.1")))
            .unwrap();
        c.change(|s| s.add_ingress(None, "203.0.113.1".parse().unwrap(), tcp22(), vec![]))
            .unwrap();
        let active = c.fast.entries.clone();
        assert!(!active.is_empty());
        c.change(|s| s.remove_mapping("203.0.113.1".parse().unwrap()))
            .unwrap();
        assert!(c.fast.entries.is_empty());
        let rules: Vec<_> = c.state().ingress_rules().collect();
        assert_eq!(rules.len(), 1);
        assert!(!c.state().is_active(&rules[0].rule));
        let installed = c.slow.installed.as_ref().unwrap();
        assert_eq!(installed.active_ingress_rules().count(), 0);
        c.change(|s| s.add_mapping(m("203.0.113.1", "10.0.0.2")))
            .unwrap();
        assert_eq!(c.fast.entries, active);
        assert_eq!(c.state().active_ingress_rules().count(), 1);
    }

    /// A rule for a public IP without a mapping is kept, inactive: listed, persisted, nothing
    /// in the fast path until the mapping comes.
    #[test]
    fn rules_before_their_mapping_take_effect_with_it() {
        let mut c = Controller::new(FakeFast::default(), FakeSlow::default());
        let (id, _) = c
            .change(|s| s.add_ingress(None, "203.0.113.1".parse().unwrap(), tcp22(), vec![]))
            .unwrap();
        assert!(id > crate::state::LOCAL_RULE_IDS);
        assert!(c.fast.entries.is_empty());
        assert_eq!(c.state().ingress_rules().count(), 1);
        c.change(|s| s.add_mapping(m("203.0.113.1", "10.0.0.1")))
            .unwrap();
        assert!(c.fast.entries.keys().any(|e| matches!(
            e,
            Entry::FwSvc(p, 6, 22, 16) if *p == "203.0.113.1".parse::<std::net::Ipv4Addr>().unwrap()
        )));
        let installed = c.slow.installed.as_ref().unwrap();
        assert_eq!(installed.active_ingress_rules().count(), 1);
    }

    /// Every write of a change, its undo included, is made inside one batch, which ends with
    /// the change (what the batch reads once, e.g. the interfaces' subnets, is read again
    /// for the next change).
    #[test]
    fn a_change_is_one_batch_of_writes() {
        let mut c = Controller::new(FakeFast::default(), FakeSlow::default());
        let mut new = c.state().clone();
        for i in 1..=3 {
            new.add_mapping(m(&format!("203.0.113.{i}"), &format!("10.0.0.{i}")))
                .unwrap();
        }
        c.apply(new.clone()).unwrap();
        assert_eq!(c.fast.maps.len(), 3);
        new.add_mapping(m("203.0.113.4", "10.0.0.4")).unwrap();
        c.fast.fail_on = Some(Op::AddMapping(m("203.0.113.4", "10.0.0.4")));
        new.remove_mapping("203.0.113.1".parse().unwrap()).unwrap();
        assert!(c.apply(new).is_err());
        assert_eq!(c.fast.maps.len(), 3);
        assert!(!c.fast.in_batch);
        assert_eq!(c.fast.unbatched, 0);
    }

    #[test]
    fn a_failed_step_undoes_everything() {
        let mut c = Controller::new(FakeFast::default(), FakeSlow::default());
        c.change(|s| s.add_mapping(m("203.0.113.1", "10.0.0.1")))
            .unwrap();
        let before = (c.fast.maps.clone(), c.fast.entries.clone());
        let mut new = c.state().clone();
        new.remove_mapping("203.0.113.1".parse().unwrap()).unwrap();
        new.add_mapping(m("203.0.113.2", "10.0.0.2")).unwrap();
        new.add_ingress(None, "203.0.113.2".parse().unwrap(), tcp22(), vec![])
            .unwrap();
        new.add_mapping(m("203.0.113.3", "10.0.0.3")).unwrap();
        c.fast.fail_on = Some(Op::AddMapping(m("203.0.113.3", "10.0.0.3")));
        assert!(c.apply(new.clone()).is_err());
        assert_eq!((c.fast.maps.clone(), c.fast.entries.clone()), before);
        assert_eq!(c.state().len(), 1);

        c.fast.fail_on = None;
        c.slow.fail = true;
        assert!(matches!(c.apply(new.clone()), Err(ApplyError::SlowPath(_))));
        assert_eq!((c.fast.maps.clone(), c.fast.entries.clone()), before);
        assert_eq!(c.generation(), 1);

        // The slow path replaced its table, then failed (address management): both paths
        // hold the previous state again.
        c.slow.fail = false;
        c.slow.fail_after_install_at = Some(new.len());
        let old = c.state().clone();
        assert!(matches!(c.apply(new), Err(ApplyError::SlowPath(_))));
        assert_eq!((c.fast.maps.clone(), c.fast.entries.clone()), before);
        assert_eq!(c.slow.installed.as_ref(), Some(&old));
        assert_eq!(c.state(), &old);
        assert_eq!(c.generation(), 1);
    }

    #[test]
    fn invalid_changes_touch_nothing() {
        let mut c = Controller::new(FakeFast::default(), FakeSlow::default());
        c.change(|s| s.add_mapping(m("203.0.113.1", "10.0.0.1")))
            .unwrap();
        assert!(matches!(
            c.change(|s| s.add_mapping(m("203.0.113.1", "10.0.0.2"))),
            Err(ApplyError::Invalid(_))
        ));
        let all = Service {
            proto: Proto::All,
            ports: None,
            icmp_type: None,
            icmp_code: None,
        };
        assert!(matches!(
            c.change(|s| s.add_ingress(None, "203.0.113.1".parse().unwrap(), all, vec![])),
            Err(ApplyError::Invalid(StateError::Rule(_)))
        ));
        c.change(|s| s.add_ingress(None, "203.0.113.1".parse().unwrap(), tcp22(), vec![]))
            .unwrap();
        assert!(matches!(
            c.change(|s| s.add_ingress(None, "203.0.113.1".parse().unwrap(), tcp22(), vec![])),
            Err(ApplyError::Invalid(StateError::DuplicateRule { .. }))
        ));
        assert_eq!(c.generation(), 2);
    }
}
