//! Policy setup of the bench: natd desired states (mappings of the bench plus rules) installed
//! in program and model, conntrack timeouts, and the two connection tables read, seeded,
//! compared and cleared together.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::bail;
use nat_common::TIMEOUT_SLOTS;
use nat_userspace::{
    cidr::Cidr,
    firewall::{PortRange, Proto, Service},
    state::{DesiredState, Mapping},
    tables::{Op, Tables, egress_mode, plan},
};

use super::{Harness, NAT_IN, NAT_OUT, maps};
use crate::model::{Flow, Rules, Tracked};

/// Every mapping of the bench as a natd state (no rules, egress allowed by default): the base
/// tests add rules to before [`Harness::set_policy`].
pub fn base_state() -> DesiredState {
    let mut pairs: Vec<(Ipv4Addr, Ipv4Addr)> = NAT_IN.to_vec();
    pairs.extend(
        NAT_OUT
            .iter()
            .filter(|(v, _)| !NAT_IN.iter().any(|(_, p)| p == v))
            .map(|(v, p)| (*p, *v)),
    );
    let list: Vec<Mapping> = pairs
        .into_iter()
        .map(|(public, private)| Mapping { public, private })
        .collect();
    DesiredState::from_mappings(&list).expect("the bench's mappings form a valid state")
}

/// A service: `proto` with optional ports (TCP/UDP) or ICMP type and code.
pub fn service(proto: Proto, ports: Option<(u16, u16)>, icmp: Option<(u8, Option<u8>)>) -> Service {
    Service {
        proto,
        ports: ports.map(|(first, last)| PortRange { first, last }),
        icmp_type: icmp.map(|(t, _)| t),
        icmp_code: icmp.and_then(|(_, c)| c),
    }
}

/// [`base_state`] with TCP, UDP and ICMP open from anywhere to every public address: what the
/// program did before it had a firewall, for the translation tests.
pub fn allow_all() -> DesiredState {
    let mut s = base_state();
    for (public, _) in NAT_IN {
        for proto in [Proto::Tcp, Proto::Udp, Proto::Icmp] {
            s.add_ingress(None, public, service(proto, None, None), vec![Cidr::ANY])
                .expect("valid rule");
        }
    }
    s
}

impl Harness {
    /// Installs the rules and egress policy of `state` in program and model. The program's maps
    /// change by natd's own plan from the previous state (so a removed rule's entries are
    /// deleted as natd deletes them); `state`'s mappings are ignored (the bench's are fixed).
    pub fn set_policy(&self, state: &DesiredState) -> anyhow::Result<()> {
        let tables = Tables::of(state);
        let mut cur = self.policy.borrow_mut();
        let mut ebpf = self.ebpf.borrow_mut();
        for (op, _undo) in plan(&cur.0, &cur.1, state, &tables) {
            match op {
                Op::Set(e, bits) => maps::write_entry(&mut ebpf, e, Some(bits))?,
                Op::Unset(e) => maps::write_entry(&mut ebpf, e, None)?,
                Op::EgressDefaultDeny(_) | Op::EgressClosed => {
                    let mut cfg = maps::read_config(&mut ebpf)?;
                    cfg.egress_default_deny =
                        egress_mode(op == Op::EgressClosed, op == Op::EgressDefaultDeny(true));
                    maps::write_config(&mut ebpf, &cfg)?;
                }
                Op::AddMapping(_) | Op::RemoveMapping(_) => {}
            }
        }
        *cur = (state.clone(), tables);
        self.model.borrow_mut().policy.rules = Rules::of(state);
        Ok(())
    }

    /// Closes egress (`nat_common::EGRESS_CLOSED`, as natd does while it turns the default
    /// over) or opens it again under the current state's default, in program and model.
    pub fn set_egress_closed(&self, closed: bool) -> anyhow::Result<()> {
        let mut ebpf = self.ebpf.borrow_mut();
        let mut cfg = maps::read_config(&mut ebpf)?;
        let deny = self.policy.borrow().1.egress_default_deny;
        cfg.egress_default_deny = egress_mode(closed, deny);
        maps::write_config(&mut ebpf, &cfg)?;
        self.model.borrow_mut().policy.rules.egress_closed = closed;
        Ok(())
    }

    /// Sets `--policy kernel` (`true`) or `--policy xdp` in program and model.
    pub fn set_kernel_policy(&self, kernel: bool) -> anyhow::Result<()> {
        let mut ebpf = self.ebpf.borrow_mut();
        let mut cfg = maps::read_config(&mut ebpf)?;
        cfg.policy = if kernel {
            nat_common::POLICY_KERNEL
        } else {
            nat_common::POLICY_XDP
        };
        maps::write_config(&mut ebpf, &cfg)?;
        self.model.borrow_mut().kernel_policy = kernel;
        Ok(())
    }

    /// Sets the conntrack idle timeouts (ns by state, 0 = netfilter's default) in program and
    /// model.
    pub fn set_timeouts(&self, timeouts_ns: [u64; TIMEOUT_SLOTS]) -> anyhow::Result<()> {
        let mut ebpf = self.ebpf.borrow_mut();
        let mut cfg = maps::read_config(&mut ebpf)?;
        cfg.timeouts_ns = timeouts_ns;
        maps::write_config(&mut ebpf, &cfg)?;
        self.model.borrow_mut().policy.conntrack.timeouts_ns = timeouts_ns;
        Ok(())
    }

    /// The program's connection table in the logical view (every flow, live or expired).
    pub fn flows(&self) -> anyhow::Result<BTreeMap<Flow, Tracked>> {
        Ok(self.program_flows()?.flows)
    }

    /// The model's connection table in the logical view.
    pub fn model_flows(&self) -> BTreeMap<Flow, Tracked> {
        self.model.borrow().policy.conntrack.flows()
    }

    /// Fails unless program and model hold the same flows in the same states, and the same
    /// directions: key, what its packets become, where they arrive, the route and generation
    /// they were resolved under, the mapping counter, the table it is in.
    pub fn check_flows(&self) -> anyhow::Result<()> {
        let got = self.program_flows()?;
        let want = self.model_seen();
        fn diff<K: Ord + std::fmt::Display + std::fmt::Debug, V: PartialEq + std::fmt::Debug>(
            what: &str,
            got: &BTreeMap<K, V>,
            want: &BTreeMap<K, V>,
        ) -> anyhow::Result<()> {
            if got == want {
                return Ok(());
            }
            let show = |m: &BTreeMap<K, V>, other: &BTreeMap<K, V>| {
                m.iter()
                    .filter(|(k, v)| other.get(k) != Some(v))
                    .map(|(k, v)| format!("\n    {k}: {v:?}"))
                    .collect::<String>()
            };
            bail!(
                "{what} differs from the model\n  program only/different:{}\n  model only/different:{}",
                show(got, want),
                show(want, got)
            );
        }
        diff("the flow table", &got.flows, &want.flows)?;
        diff("the flow entries", &got.entries, &want.entries)
    }

    /// Empties program's and model's flow tables.
    pub fn clear_flows(&self) -> anyhow::Result<()> {
        maps::clear_flows(&mut self.ebpf.borrow_mut())?;
        self.model.borrow_mut().policy.conntrack.clear();
        Ok(())
    }

    /// Moves the route generation on in program and model (as natd does on a kernel route,
    /// neighbour, address or link change).
    pub fn bump_route_gen(&self) -> anyhow::Result<()> {
        let mut ebpf = self.ebpf.borrow_mut();
        let mut cfg = maps::read_config(&mut ebpf)?;
        cfg.route_gen += 1;
        maps::write_config(&mut ebpf, &cfg)?;
        self.model.borrow_mut().route_gen = cfg.route_gen;
        Ok(())
    }

    /// Every entry of the firewall maps (see [`maps::firewall_entries`]).
    pub fn firewall_entries(&self) -> anyhow::Result<Vec<maps::LpmEntry>> {
        maps::firewall_entries(&mut self.ebpf.borrow_mut())
    }
}
