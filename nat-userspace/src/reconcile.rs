//! The one path every change takes: validate -> diff against what is installed -> write the fast
//! path (removals first, each mapping whole) -> replace the slow path. If any step fails, the
//! steps already done are undone in reverse and the installed state stays what it was.
use log::{error, info};

use crate::{
    ebpf::{DataplaneError, FastPath},
    netfilter::{NetfilterError, SlowPath},
    state::{DesiredState, Diff, Mapping, StateError},
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(#[from] StateError),
    #[error("fast path: {0}")]
    FastPath(#[from] DataplaneError),
    #[error("slow path: {0}")]
    SlowPath(#[from] NetfilterError),
}

/// Owns the installed state and the two places it is installed.
pub struct Controller<F, S> {
    state: DesiredState,
    fast: F,
    slow: S,
    generation: u64,
}

#[derive(Clone, Copy)]
enum Step {
    Removed(Mapping),
    Added(Mapping),
}

impl<F: FastPath, S: SlowPath> Controller<F, S> {
    /// A controller with nothing installed yet.
    pub fn new(fast: F, slow: S) -> Self {
        Self {
            state: DesiredState::default(),
            fast,
            slow,
            generation: 0,
        }
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

    pub fn add_mapping(&mut self, m: Mapping) -> Result<Diff, ApplyError> {
        let mut new = self.state.clone();
        new.add_mapping(m)?;
        self.apply(new)
    }

    pub fn remove_mapping(&mut self, public: std::net::Ipv4Addr) -> Result<Diff, ApplyError> {
        let mut new = self.state.clone();
        new.remove_mapping(public)?;
        self.apply(new)
    }

    /// Installs `new` (already valid by construction of [`DesiredState`]) in place of the
    /// current state, all or nothing.
    pub fn apply(&mut self, new: DesiredState) -> Result<Diff, ApplyError> {
        let diff = Diff::between(&self.state, &new);
        let steps = diff
            .removed
            .iter()
            .map(|m| Step::Removed(*m))
            .chain(diff.added.iter().map(|m| Step::Added(*m)));
        let mut done = Vec::new();
        for step in steps {
            let r = match step {
                Step::Removed(m) => self.fast.remove(m),
                Step::Added(m) => self.fast.insert(m),
            };
            if let Err(e) = r {
                self.undo(&done);
                return Err(e.into());
            }
            done.push(step);
        }
        if let Err(e) = self.slow.replace(&new) {
            self.undo(&done);
            return Err(e.into());
        }
        self.state = new;
        self.generation += 1;
        for m in &diff.removed {
            info!("mapping removed: {} -> {}", m.public, m.private);
        }
        for m in &diff.added {
            info!("mapping added: {} -> {}", m.public, m.private);
        }
        Ok(diff)
    }

    fn undo(&mut self, done: &[Step]) {
        for step in done.iter().rev() {
            let r = match *step {
                Step::Removed(m) => self.fast.insert(m),
                Step::Added(m) => self.fast.remove(m),
            };
            if let Err(e) = r {
                error!("rollback failed, the fast path may differ from the desired state: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[derive(Default)]
    struct FakeFast {
        maps: BTreeMap<std::net::Ipv4Addr, std::net::Ipv4Addr>,
        fail_on_insert: Option<Mapping>,
    }

    impl FastPath for FakeFast {
        fn insert(&mut self, m: Mapping) -> Result<(), DataplaneError> {
            if self.fail_on_insert == Some(m) {
                return Err(DataplaneError::MissingMap("NAT_IN"));
            }
            self.maps.insert(m.public, m.private);
            Ok(())
        }
        fn remove(&mut self, m: Mapping) -> Result<(), DataplaneError> {
            self.maps.remove(&m.public);
            Ok(())
        }
    }

    #[derive(Default)]
    struct FakeSlow {
        installed: Option<DesiredState>,
        fail: bool,
    }

    impl SlowPath for FakeSlow {
        fn replace(&mut self, s: &DesiredState) -> Result<(), NetfilterError> {
            if self.fail {
                return Err(NetfilterError::Refused("no".into()));
            }
            self.installed = Some(s.clone());
            Ok(())
        }
        fn remove(&mut self) -> Result<(), NetfilterError> {
            self.installed = None;
            Ok(())
        }
    }

    fn m(p: &str, v: &str) -> Mapping {
        Mapping {
            public: p.parse().unwrap(),
            private: v.parse().unwrap(),
        }
    }

    #[test]
    fn applies_to_both_paths() {
        let mut c = Controller::new(FakeFast::default(), FakeSlow::default());
        c.add_mapping(m("203.0.113.1", "10.0.0.1")).unwrap();
        assert_eq!(c.fast.maps.len(), 1);
        assert_eq!(c.slow.installed.as_ref().unwrap().len(), 1);
        c.remove_mapping("203.0.113.1".parse().unwrap()).unwrap();
        assert!(c.fast.maps.is_empty());
        assert_eq!(c.generation(), 2);
    }

    #[test]
    fn a_failed_step_undoes_everything() {
        let mut c = Controller::new(FakeFast::default(), FakeSlow::default());
        c.add_mapping(m("203.0.113.1", "10.0.0.1")).unwrap();
        let before = c.fast.maps.clone();
        let mut new = c.state().clone();
        new.remove_mapping("203.0.113.1".parse().unwrap()).unwrap();
        new.add_mapping(m("203.0.113.2", "10.0.0.2")).unwrap();
        new.add_mapping(m("203.0.113.3", "10.0.0.3")).unwrap();
        c.fast.fail_on_insert = Some(m("203.0.113.3", "10.0.0.3"));
        assert!(c.apply(new.clone()).is_err());
        assert_eq!(c.fast.maps, before);
        assert_eq!(c.state().len(), 1);

        c.fast.fail_on_insert = None;
        c.slow.fail = true;
        assert!(matches!(c.apply(new), Err(ApplyError::SlowPath(_))));
        assert_eq!(c.fast.maps, before);
        assert_eq!(c.generation(), 1);
    }

    #[test]
    fn invalid_changes_touch_nothing() {
        let mut c = Controller::new(FakeFast::default(), FakeSlow::default());
        c.add_mapping(m("203.0.113.1", "10.0.0.1")).unwrap();
        assert!(matches!(
            c.add_mapping(m("203.0.113.1", "10.0.0.2")),
            Err(ApplyError::Invalid(_))
        ));
        assert!(matches!(
            c.remove_mapping("203.0.113.2".parse().unwrap()),
            Err(ApplyError::Invalid(_))
        ));
        assert_eq!(c.generation(), 1);
    }
}
