//! natd's answer to kernel events ([`crate::kernel_events`]): interfaces deleted and created
//! again are attached again, an attached interface's own address is kept current in the
//! program, and every route, address, link or policy rule change, and every neighbour whose
//! link-layer address changed or went away, bumps the route generation: each flow resolves its
//! route and next hop again on its next packet (a neighbour that is gone sends the flow to the
//! kernel, which resolves it). A policy rule change also brings the slow path's routing marks
//! and natd's own rules up to date ([`crate::policy_routing`]).
use log::{debug, info, warn};

use super::Daemon;
use crate::kernel_events::{KernelEvent, NeighbourState};

impl Daemon {
    /// Acts on one kernel event ([`crate::kernel_events`]): re-attaches to a configured
    /// interface created again (or renamed to its name), logs once when one is gone, and keeps
    /// an interface's own address (hairpin source) current.
    pub fn on_kernel_event(&mut self, ev: KernelEvent) {
        match ev {
            KernelEvent::LinkAdded { ifindex, name }
            | KernelEvent::LinkChanged { ifindex, name }
            | KernelEvent::LinkRemoved { ifindex, name } => {
                let ours = self
                    .ctl
                    .fast_mut()
                    .attached()
                    .any(|a| a.name == name || a.ifindex == ifindex);
                if ours {
                    self.check_interfaces();
                }
                self.bump_routes("link");
            }
            KernelEvent::AddressChanged { ifindex, .. } => {
                self.refresh_address(ifindex);
                self.bump_routes("address");
            }
            KernelEvent::RouteChanged { .. } => self.bump_routes("route"),
            KernelEvent::RuleChanged { protocol, .. } => {
                // natd's own rules match marked packets only, never the fast path's lookups.
                if protocol != crate::policy_routing::RULE_PROTOCOL {
                    self.bump_routes("policy rule");
                }
                self.refresh_routing();
            }
            KernelEvent::NeighbourChanged {
                ifindex,
                addr,
                lladdr,
                state,
                removed,
            } => {
                let usable = !removed
                    && !matches!(
                        state,
                        NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None
                    );
                let known = self.neighbours.get(&(ifindex, addr)).copied();
                match (usable, lladdr) {
                    (true, Some(mac)) => {
                        self.neighbours.insert((ifindex, addr), mac);
                        // A neighbour seen the first time changes no route a flow holds: the
                        // ones there were when natd subscribed (or lost notifications) are
                        // reported to it first.
                        if known.is_some_and(|k| k != mac) {
                            self.bump_routes("neighbour address");
                        }
                    }
                    (true, None) => {}
                    (false, _) => {
                        if self.neighbours.remove(&(ifindex, addr)).is_some() {
                            self.bump_routes("neighbour gone");
                        }
                    }
                }
            }
            KernelEvent::Lost => {
                // Notifications were lost: check every interface and address again.
                self.check_interfaces();
                let attached: Vec<u32> =
                    self.ctl.fast_mut().attached().map(|a| a.ifindex).collect();
                for ifindex in attached {
                    self.refresh_address(ifindex);
                }
                // The neighbours there are follow this event.
                self.neighbours.clear();
                self.bump_routes("lost notifications");
                self.refresh_routing();
            }
        }
    }

    /// Every flow resolves its route again on its next packet.
    fn bump_routes(&mut self, why: &str) {
        match self.ctl.fast_mut().bump_route_generation() {
            Ok(g) => debug!("route generation {g} ({why})"),
            Err(e) => warn!("bumping the route generation ({why}): {e}"),
        }
    }

    /// Brings the slow path's routing marks and natd's policy rules up to date with the
    /// kernel's policy rules (see [`crate::policy_routing`]).
    pub fn refresh_routing(&mut self) {
        match self.ctl.refresh_slow() {
            Ok(true) => info!("policy rules changed: the slow path's routing marks follow them"),
            Ok(false) => {}
            Err(e) => warn!("policy routing: {}", crate::report(&e)),
        }
    }

    /// Re-attaches to configured interfaces that were deleted and created again; logs once
    /// when one is gone. Called on link events, and once when natd starts watching them.
    pub fn check_interfaces(&mut self) {
        for (a, now) in self.ctl.fast_mut().stale() {
            match now {
                None => {
                    if self.missing.insert(a.name.clone()) {
                        warn!(
                            "interface {} (ifindex {}) is gone; natd re-attaches when it returns",
                            a.name, a.ifindex
                        );
                    }
                }
                Some(new) => match self.ctl.fast_mut().reattach(&a.name) {
                    Ok(n) => {
                        self.missing.remove(&a.name);
                        info!(
                            "interface {} was created again (ifindex {} -> {new}): re-attached in {} mode ({} time(s) so far)",
                            a.name, a.ifindex, n.mode, n.reattached
                        );
                    }
                    Err(e) => warn!("re-attaching to {}: {e}", a.name),
                },
            }
        }
    }

    /// Writes the current address of attached interface `ifindex` to the program.
    fn refresh_address(&mut self, ifindex: u32) {
        match self.ctl.fast_mut().refresh_address(ifindex) {
            Ok(Some((name, addr))) => info!("{name}'s address for the fast path is now {addr:?}"),
            Ok(None) => {}
            Err(e) => warn!("updating the address of ifindex {ifindex}: {e}"),
        }
    }
}
