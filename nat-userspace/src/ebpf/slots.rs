//! Counter slots: each mapping owns a slot of `MAPPING_STATS` (named in its `NAT_IN` and
//! `NAT_OUT` values and copied into its flows' entries). Slot 0 is never handed out. A removed
//! mapping's slot is retired, not reused, while flows that outlive the mapping (revoked static
//! NAT keeps its established flows) still count on it; the collector recycles it once no flow
//! names it. Slots are reused oldest-freed first.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::Ipv4Addr,
};

#[derive(Debug, Default)]
pub struct Slots {
    /// Slots 1..capacity exist.
    capacity: u32,
    /// The next never-used slot.
    next: u32,
    free: VecDeque<u32>,
    retired: BTreeSet<u32>,
    /// Public address -> slot of every installed mapping.
    owned: BTreeMap<Ipv4Addr, u32>,
}

impl Slots {
    pub fn new(capacity: u32) -> Self {
        Slots {
            capacity,
            next: 1,
            ..Slots::default()
        }
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    pub fn get(&self, public: Ipv4Addr) -> Option<u32> {
        self.owned.get(&public).copied()
    }

    /// A slot for a new mapping of `public`; `None` when every slot is owned or retired.
    pub fn take(&mut self, public: Ipv4Addr) -> Option<u32> {
        if let Some(s) = self.get(public) {
            return Some(s);
        }
        let slot = match self.free.pop_front() {
            Some(s) => s,
            None if self.next < self.capacity => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.owned.insert(public, slot);
        Some(slot)
    }

    /// Gives back a slot just taken whose mapping could not be installed.
    pub fn untake(&mut self, public: Ipv4Addr) {
        if let Some(s) = self.owned.remove(&public) {
            self.free.push_front(s);
        }
    }

    /// The mapping of `public` is gone: its slot waits until no flow names it.
    pub fn retire(&mut self, public: Ipv4Addr) {
        if let Some(s) = self.owned.remove(&public) {
            self.retired.insert(s);
        }
    }

    /// A slot an adopted mapping already owns (read back from the pinned maps).
    pub fn restore(&mut self, public: Ipv4Addr, slot: u32) {
        if slot == 0 || slot >= self.capacity {
            return;
        }
        self.owned.insert(public, slot);
        self.free.retain(|s| *s != slot);
        self.retired.remove(&slot);
        while self.next <= slot {
            if self.next != slot && !self.owned.values().any(|s| *s == self.next) {
                // Unknown slots below an adopted one: flows of mappings an earlier natd removed
                // may still count there, so they are retired until the collector frees them.
                self.retired.insert(self.next);
            }
            self.next += 1;
        }
    }

    /// Retired slots no flow names any more become free.
    pub fn recycle(&mut self, in_use: &BTreeSet<u32>) -> usize {
        let done: Vec<u32> = self
            .retired
            .iter()
            .copied()
            .filter(|s| !in_use.contains(s))
            .collect();
        for s in &done {
            self.retired.remove(s);
            self.free.push_back(*s);
        }
        done.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(203, 0, 113, n)
    }

    #[test]
    fn retired_slots_wait_for_their_flows() {
        let mut s = Slots::new(4);
        assert_eq!(s.take(ip(1)), Some(1));
        assert_eq!(s.take(ip(2)), Some(2));
        assert_eq!(s.take(ip(3)), Some(3));
        assert_eq!(s.take(ip(4)), None, "slot 0 is never handed out");
        s.retire(ip(2));
        assert_eq!(s.take(ip(4)), None, "retired, not free");
        assert_eq!(s.recycle(&[2].into()), 0);
        assert_eq!(s.recycle(&BTreeSet::new()), 1);
        assert_eq!(s.take(ip(4)), Some(2));
    }

    #[test]
    fn restored_slots_are_not_handed_out_again() {
        let mut s = Slots::new(8);
        s.restore(ip(1), 3);
        assert_eq!(s.get(ip(1)), Some(3));
        // 1 and 2 may still be counted on by an earlier natd's flows.
        assert_eq!(s.take(ip(2)), Some(4));
        assert_eq!(s.recycle(&BTreeSet::new()), 2);
        assert_eq!(s.take(ip(3)), Some(1));
    }
}
