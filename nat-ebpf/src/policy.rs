//! Policy for packets that belong to no flow: the ingress firewall of a public IP and the
//! egress policy of the guest networks.
//!
//! Cost per packet is a fixed number of map lookups whatever the number of rules: two LPM
//! lookups (ingress: source, service) or three (egress: source, destination, service) whose
//! rule bitmaps must intersect (see `nat_common::RuleBits`).
use aya_ebpf::maps::lpm_trie::Key;
use nat_common::{
    EG_SVC_BASE_BITS, EGRESS_ALLOW, EGRESS_DENY, EgSvcData, FW_SRC_BASE_BITS, FW_SVC_BASE_BITS,
    FwSrcData, FwSvcData,
};

use crate::{
    EG_DST, EG_SRC, EG_SVC, FW_SRC, FW_SVC,
    flows::config,
    parse::{Packet, Transport},
};

/// Ingress firewall of `public`: allowed if one rule matches both the source `saddr` and the
/// service.
#[inline(always)]
pub fn firewall_allows(public: u32, saddr: u32, pkt: &Packet, l4: &Transport) -> bool {
    let public = public.to_ne_bytes();
    let src = Key::new(
        FW_SRC_BASE_BITS + 32,
        FwSrcData {
            public,
            source: saddr.to_ne_bytes(),
        },
    );
    let Some(a) = FW_SRC.get(&src) else {
        return false;
    };
    let svc = Key::new(
        FW_SVC_BASE_BITS + 16,
        FwSvcData {
            public,
            proto: pkt.proto,
            service: l4.service,
            _pad: 0,
        },
    );
    match FW_SVC.get(&svc) {
        Some(b) => a.intersects(b),
        None => false,
    }
}

/// Egress policy for a guest's packet the route sends out of a public interface: the
/// default, inverted by any exception rule that matches the guest source, the destination and
/// the service; nothing while natd turns the default over ([`nat_common::EGRESS_CLOSED`]).
#[inline(always)]
pub fn egress_allows(pkt: &Packet, l4: &Transport) -> bool {
    let mode = config().map_or(EGRESS_ALLOW, |c| c.egress_default_deny);
    let src = Key::new(32, pkt.saddr.to_ne_bytes());
    let dst = Key::new(32, pkt.daddr.to_ne_bytes());
    let svc = Key::new(
        EG_SVC_BASE_BITS + 16,
        EgSvcData {
            proto: pkt.proto,
            service: l4.service,
            _pad: 0,
        },
    );
    let matched = match (EG_SRC.get(&src), EG_DST.get(&dst), EG_SVC.get(&svc)) {
        (Some(s), Some(a), Some(b)) => s.intersects3(a, b),
        _ => false,
    };
    // Closed (any other mode) lets nothing out. Decided after the lookups, not before: an
    // early return there is one more path for the verifier to walk through the lookups.
    mode <= EGRESS_DENY && (mode == EGRESS_ALLOW) != matched
}
