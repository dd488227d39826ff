//! natd's answer to kernel events ([`crate::kernel_events`]): interfaces deleted and created
//! again are attached again, an attached interface's own address is kept current in the
//! program, and (for the flow cache) route, neighbour and address changes are where the route
//! generation is bumped.
use log::{info, warn};

use super::Daemon;
use crate::kernel_events::KernelEvent;

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
            }
            KernelEvent::AddressChanged { ifindex, .. } => {
                self.refresh_address(ifindex);
                // LEAD: an address change also bumps the route generation (flow cache) here.
            }
            KernelEvent::RouteChanged { .. } | KernelEvent::NeighbourChanged { .. } => {
                // LEAD: bump the route generation of the flow cache here. Nothing else to do:
                // the fast path asks bpf_fib_lookup for every packet today.
            }
            KernelEvent::Lost => {
                // Notifications were lost: check every interface and address again.
                self.check_interfaces();
                let attached: Vec<u32> =
                    self.ctl.fast_mut().attached().map(|a| a.ifindex).collect();
                for ifindex in attached {
                    self.refresh_address(ifindex);
                }
                // LEAD: bump the route generation here too (routes or neighbours may have changed).
            }
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
