//! Why the program ended a frame the way it did: one counter slot each, one metric label each.

/// Final verdict reasons. The discriminant is the index into [`crate::MAP_STATS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    /// Public -> guest: translated P -> V and redirected.
    InboundForwarded = 0,
    /// Guest -> public: translated V -> P and redirected.
    OutboundForwarded,
    /// Guest -> mapped public IP of a guest (or its reply): translated both ways and redirected.
    HairpinForwarded,
    /// Dropped: no ingress rule of the public IP allows it and it belongs to no tracked flow.
    InboundDenied,
    /// Dropped: the egress policy forbids it and it belongs to no tracked flow.
    OutboundDenied,
    /// Arrived on an interface natd did not configure.
    UnknownIface,
    /// Not an IPv4 frame (ARP, IPv6, VLAN...).
    NotIpv4,
    /// IPv4 header or transport header truncated or inconsistent.
    Malformed,
    /// IPv4 header carries options (IHL > 5).
    IpOptions,
    /// A fragment (MF set or offset != 0): the kernel reassembles and translates it.
    Fragment,
    /// Neither address involves a mapping on this interface's side.
    Unmapped,
    /// TTL <= 1: the kernel sends ICMP time exceeded.
    TtlExpired,
    /// An ICMP error whose embedded packet is cut short or refers to another address.
    IcmpErrorUnrelated,
    /// The route lookup found no neighbour entry yet: the kernel resolves it.
    NoNeighbour,
    /// The frame is larger than the egress MTU: the kernel fragments or answers.
    FragNeeded,
    /// No route, a local destination, forwarding disabled, or any other lookup result.
    NoRoute,
    /// The route leaves through an interface that is not of the opposite role (or, for
    /// hairpin, not a guest interface with an address).
    WrongEgress,
    /// A hairpin flow for which no free source port was found (the translated 4-tuple and
    /// every alternative taken): the kernel translates it.
    HairpinCollision,
    /// Dropped: arrived on a public interface addressed to a mapped private address (a guest
    /// is reached only through its public address).
    DirectToPrivate,
    /// Dropped: a new inbound flow to a public IP arrived on a public interface other than
    /// the one whose network owns the IP.
    WrongNetwork,
    /// `--policy kernel`: a mapped packet the fast path does not carry (no established flow
    /// the kernel admitted, or one whose state the packet may change): the kernel decides.
    KernelDecides,
}

impl Reason {
    /// Number of reasons, the size of [`crate::MAP_STATS`].
    pub const COUNT: u32 = Reason::KernelDecides as u32 + 1;

    /// Every reason, in discriminant order.
    pub const ALL: [Reason; Reason::COUNT as usize] = [
        Reason::InboundForwarded,
        Reason::OutboundForwarded,
        Reason::HairpinForwarded,
        Reason::InboundDenied,
        Reason::OutboundDenied,
        Reason::UnknownIface,
        Reason::NotIpv4,
        Reason::Malformed,
        Reason::IpOptions,
        Reason::Fragment,
        Reason::Unmapped,
        Reason::TtlExpired,
        Reason::IcmpErrorUnrelated,
        Reason::NoNeighbour,
        Reason::FragNeeded,
        Reason::NoRoute,
        Reason::WrongEgress,
        Reason::HairpinCollision,
        Reason::DirectToPrivate,
        Reason::WrongNetwork,
        Reason::KernelDecides,
    ];

    /// The reason of discriminant `v` (a forwarded reason stored in a flow entry); `Malformed`
    /// for a value no reason has.
    #[inline(always)]
    pub const fn from_index(v: u32) -> Reason {
        if v < Reason::COUNT {
            // SAFETY: `Reason` is `repr(u32)` with the discriminants 0..COUNT (see `ALL` and
            // its test), and `v` is one of them. (Indexing `ALL` instead would put a table in
            // the program's read-only data, a map of its own.)
            unsafe { core::mem::transmute::<u32, Reason>(v) }
        } else {
            Reason::Malformed
        }
    }

    /// The snake_case name used in `natctl stats` and as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::InboundForwarded => "inbound_forwarded",
            Reason::OutboundForwarded => "outbound_forwarded",
            Reason::HairpinForwarded => "hairpin_forwarded",
            Reason::InboundDenied => "inbound_denied",
            Reason::OutboundDenied => "outbound_denied",
            Reason::UnknownIface => "unknown_iface",
            Reason::NotIpv4 => "not_ipv4",
            Reason::Malformed => "malformed",
            Reason::IpOptions => "ip_options",
            Reason::Fragment => "fragment",
            Reason::Unmapped => "unmapped",
            Reason::TtlExpired => "ttl_expired",
            Reason::IcmpErrorUnrelated => "icmp_error_unrelated",
            Reason::NoNeighbour => "no_neighbour",
            Reason::FragNeeded => "frag_needed",
            Reason::NoRoute => "no_route",
            Reason::WrongEgress => "wrong_egress",
            Reason::HairpinCollision => "hairpin_collision",
            Reason::DirectToPrivate => "direct_to_private",
            Reason::WrongNetwork => "wrong_network",
            Reason::KernelDecides => "kernel_decides",
        }
    }

    /// The XDP action this reason ends with: `"redirect"`, `"drop"` or `"pass"`.
    pub const fn action(self) -> &'static str {
        match self {
            Reason::InboundForwarded | Reason::OutboundForwarded | Reason::HairpinForwarded => {
                "redirect"
            }
            Reason::InboundDenied
            | Reason::OutboundDenied
            | Reason::DirectToPrivate
            | Reason::WrongNetwork => "drop",
            _ => "pass",
        }
    }
}

/// Events counted beside the verdicts, per CPU ([`crate::MAP_EVENTS`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Event {
    /// A packet found a live flow and took the full path (its state may change).
    ConntrackHit = 0,
    /// A packet found no live flow (absent or expired).
    ConntrackMiss,
    /// A flow was created.
    ConntrackCreate,
    /// A flow was found expired and replaced or refused.
    ConntrackExpired,
    /// Expired flows natd collected (written by natd, so the count survives restarts).
    ConntrackCollected,
    /// Flows natd removed on request or with their mapping (written by natd).
    ConntrackFlushed,
    /// A packet of an established flow took its entry's cached rewrite and route (one
    /// lookup).
    FastPath,
    /// A flow entry resolved its route again (first reply, or a route generation bump).
    RouteResolved,
    /// A packet of an established flow took the copy of its entry in its slot (one
    /// cache-line pair read; also counted as [`Event::FastPath`]).
    SlotHit,
    /// Flows natd forgot because the kernel ended them (`--policy kernel`: its destroy
    /// events, or a round that found the kernel's entry gone; written by natd).
    ConntrackEnded,
}

impl Event {
    pub const COUNT: u32 = Event::ConntrackEnded as u32 + 1;
    pub const ALL: [Event; Event::COUNT as usize] = [
        Event::ConntrackHit,
        Event::ConntrackMiss,
        Event::ConntrackCreate,
        Event::ConntrackExpired,
        Event::ConntrackCollected,
        Event::ConntrackFlushed,
        Event::FastPath,
        Event::RouteResolved,
        Event::SlotHit,
        Event::ConntrackEnded,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            Event::ConntrackHit => "conntrack_hit",
            Event::ConntrackMiss => "conntrack_miss",
            Event::ConntrackCreate => "conntrack_create",
            Event::ConntrackExpired => "conntrack_expired",
            Event::ConntrackCollected => "conntrack_collected",
            Event::ConntrackFlushed => "conntrack_flushed",
            Event::FastPath => "fast_path",
            Event::RouteResolved => "route_resolved",
            Event::SlotHit => "slot_hit",
            Event::ConntrackEnded => "conntrack_ended",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_discriminant_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
