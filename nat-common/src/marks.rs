//! Packet marks (`skb->mark`) and connection marks natd's kernel path uses, defined once: the
//! tc ingress marker (`nat-ebpf/src/mark.rs`) sets [`FASTPATH_MARK`], natd's nftables table
//! accepts it and sets the [`ROUTE_MARK_MASK`] field, and natd's policy routing rules
//! (`fwmark M/ROUTE_MARK_MASK lookup T`) read that field. Both live in the high bits, away
//! from the small values routers commonly use (CloudStack's router marks with 100 + N and
//! 0x524/0x525), and every writer leaves the other bits of the mark as they are.

/// Set on a packet the XDP program passed to the kernel that belongs to a live flow of the
/// fast path and arrived on that flow's side of the router: the fast path admitted its flow,
/// so the slow path's filter accepts it (the kernel's reassembly keeps the first fragment's
/// mark on the datagram).
pub const FASTPATH_MARK: u32 = 1 << 30;

/// The field of the mark (and of the connection mark) that selects the routing table of a
/// public IP's network for what the kernel translates: value `i << ROUTE_MARK_SHIFT`, `i` in
/// `1..=MAX_ROUTE_MARKS`, one per policy rule of the operator that natd mirrors.
pub const ROUTE_MARK_MASK: u32 = 0x3f << ROUTE_MARK_SHIFT;
/// Position of the routing field in the mark.
pub const ROUTE_MARK_SHIFT: u32 = 24;
/// How many distinct routing tables the field can select.
pub const MAX_ROUTE_MARKS: u32 = ROUTE_MARK_MASK >> ROUTE_MARK_SHIFT;

/// The mark of routing field value `i` (1-based).
pub const fn route_mark(i: u32) -> u32 {
    (i << ROUTE_MARK_SHIFT) & ROUTE_MARK_MASK
}

const _: () = assert!(FASTPATH_MARK & ROUTE_MARK_MASK == 0);
const _: () = assert!(route_mark(MAX_ROUTE_MARKS) == ROUTE_MARK_MASK);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_marks_are_distinct_and_inside_their_field() {
        let mut all = [0u32; MAX_ROUTE_MARKS as usize];
        for (n, i) in (1..=MAX_ROUTE_MARKS).enumerate() {
            let m = route_mark(i);
            assert_eq!(m & !ROUTE_MARK_MASK, 0, "{m:#x}");
            assert_ne!(m, 0);
            assert!(!all[..n].contains(&m), "{m:#x} twice");
            all[n] = m;
        }
        assert_eq!(MAX_ROUTE_MARKS, 63);
    }
}
