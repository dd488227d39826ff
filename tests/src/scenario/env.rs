//! Random changes of the bench's surroundings between packets (see `harness::env`): mostly a
//! neighbour or route change followed by natd's generation bump, sometimes a change the bump
//! has not followed yet, a bump alone, or a mapping removed and installed again.
use std::net::Ipv4Addr;

use proptest::{prelude::*, sample::select};

use crate::harness::{
    P_TO_REMOTE, P1, P2, P3, P4, P5, P6,
    env::{Change, MOVED_MACS, NEIGHBOURS, RemoteVia},
};

/// The public IPs whose mapping a change removes (the scenarios' guests, and an inbound-only
/// one).
const PUBLICS: [Ipv4Addr; 7] = [P1, P1, P2, P3, P4, P5, P6];

/// A neighbour moved to another link-layer address (3 in 7), gone (2 in 7) or back at its
/// first one.
fn neighbour() -> impl Strategy<Value = Change> {
    (select(&NEIGHBOURS[..]), 0..7usize).prop_map(|((dev, addr, first), pick)| {
        let mac = match pick {
            0..=2 => Some(MOVED_MACS[pick % 2]),
            3 | 4 => None,
            _ => Some(first),
        };
        Change::Neighbour { dev, addr, mac }
    })
}

fn public() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![6 => select(&PUBLICS[..]), 1 => Just(P_TO_REMOTE)]
}

/// One change of the surroundings.
pub fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        6 => neighbour(),
        4 => select(
            &[
                RemoteVia::Gateway,
                RemoteVia::Gateway2,
                RemoteVia::Gateway2,
                RemoteVia::NoNeighbour,
                RemoteVia::Unmanaged,
            ][..]
        )
        .prop_map(Change::Remote),
        1 => any::<bool>().prop_map(Change::GuestNetOnGsb),
        3 => Just(Change::Bump),
        2 => public().prop_map(Change::MappingGone),
        2 => public().prop_map(Change::MappingBack),
    ]
}

/// A change and whether natd's bump has followed it already (a bump or a mapping change is
/// never followed by one).
pub fn change_and_bump() -> impl Strategy<Value = (Change, bool)> {
    (change(), prop::bool::weighted(0.75)).prop_map(|(c, bump)| {
        let routes = matches!(
            c,
            Change::Neighbour { .. } | Change::Remote(_) | Change::GuestNetOnGsb(_)
        );
        (c, bump && routes)
    })
}
