//! ICMP queries after netfilter's `nf_conntrack_proto_icmp.c`: echo, timestamp, information
//! and address-mask requests open a flow (`valid_new`); the flow is the request's identifier
//! and type, and its reply type (`invmap`) answers it. Errors (destination unreachable, time
//! exceeded, parameter problem) are never flows of their own: they are RELATED to the flow
//! they quote. Every other type is not tracked.

/// `(request, reply)` types of the query `ty` belongs to, whether `ty` is the request or the
/// reply (RFC 792, RFC 950): echo 8/0, timestamp 13/14, information 15/16, address mask
/// 17/18.
#[inline(always)]
pub const fn icmp_query(ty: u8) -> Option<(u8, u8)> {
    match ty {
        8 | 0 => Some((8, 0)),
        13 | 14 => Some((13, 14)),
        15 | 16 => Some((15, 16)),
        17 | 18 => Some((17, 18)),
        _ => None,
    }
}

/// Whether `ty` is a query request, the only ICMP message that opens a flow.
#[inline(always)]
pub const fn icmp_opens(ty: u8) -> bool {
    match icmp_query(ty) {
        Some((request, _)) => request == ty,
        None => false,
    }
}

/// The type the guest sends in the flow a query message of type `ty` belongs to: `ty` itself
/// for a message from the guest, its counterpart for one to the guest. With the identifier
/// this names the flow, so a guest's echo request (8) and a remote's echo request that reuses
/// its identifier (the guest answers 0) are different flows, as in netfilter, where the reply
/// tuple of one is not the original tuple of the other. `None`: not a query message.
#[inline(always)]
pub const fn icmp_flow_type(ty: u8, from_guest: bool) -> Option<u8> {
    match icmp_query(ty) {
        Some((request, reply)) => Some(if from_guest {
            ty
        } else if ty == request {
            reply
        } else {
            request
        }),
        None => None,
    }
}
