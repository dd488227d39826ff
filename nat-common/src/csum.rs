//! Internet checksum arithmetic (RFC 1071) and incremental update (RFC 1624, eqn. 3).
//!
//! Values are 16-bit words exactly as loaded from packet memory in host order: the one's
//! complement sum is byte-order independent (RFC 1071 §2(B)), so callers read and write the
//! checksum field and the changed words with native loads and never swap bytes.

/// Folds a 32-bit accumulator of 16-bit words into 16 bits with end-around carry.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    // Two rounds suffice for any sum of up to 2^16 words.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` for one changed 16-bit word.
#[inline(always)]
pub const fn replace2(check: u16, old: u16, new: u16) -> u16 {
    !fold(!check as u32 + !old as u32 + new as u32)
}

/// RFC 1624 eqn. 3 for a changed 32-bit field (two words), e.g. an IPv4 address.
#[inline(always)]
pub const fn replace4(check: u16, old: u32, new: u32) -> u16 {
    let sum = !check as u32 + (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16);
    !fold(sum)
}

/// [`replace4`] for a UDP checksum (RFC 768): 0 means "no checksum" and stays 0; a result of 0
/// is sent as 0xFFFF.
#[inline(always)]
pub const fn replace4_udp(check: u16, old: u32, new: u32) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace4(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

/// RFC 1624 `~m + m'` for a 16-bit word, unfolded: add several and [`fold`] once.
#[inline(always)]
pub const fn delta2(old: u16, new: u16) -> u32 {
    (!old) as u32 + new as u32
}

/// [`delta2`] for a 32-bit field (two words), e.g. an IPv4 address.
#[inline(always)]
pub const fn delta4(old: u32, new: u32) -> u32 {
    (!old & 0xffff) + (!old >> 16) + (new & 0xffff) + (new >> 16)
}

/// [`delta2`] of the IPv4 word holding TTL and protocol when the TTL drops by one: the same
/// for every TTL above 0, since `~m + (m - d) = 0xFFFF - d` (RFC 1141).
pub const TTL_DECREMENT: u32 = 0xffff - u16::from_ne_bytes([1, 0]) as u32;

/// Applies a folded delta: `HC' = ~(~HC + delta)` (RFC 1624 eqn. 3).
#[inline(always)]
pub const fn apply(check: u16, delta: u16) -> u16 {
    !fold(!check as u32 + delta as u32)
}

/// [`apply`] for a UDP checksum (RFC 768): 0 stays 0, a computed 0 is sent as 0xFFFF.
#[inline(always)]
pub const fn apply_udp(check: u16, delta: u16) -> u16 {
    if check == 0 {
        return 0;
    }
    match apply(check, delta) {
        0 => 0xffff,
        c => c,
    }
}

/// Full RFC 1071 checksum of `data` (an odd trailing byte is padded with zero), as the value to
/// store in the checksum field when that field was zero during the sum.
pub fn checksum(data: &[u8]) -> u16 {
    !fold_wide(sum_words(data, 0))
}

/// One's complement sum of `data` as native-order words, added to `acc` (no final inversion).
pub fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        acc += u16::from_ne_bytes([w[0], w[1]]) as u64;
    }
    if let [b] = chunks.remainder() {
        acc += u16::from_ne_bytes([*b, 0]) as u64;
    }
    acc
}

/// Folds a 64-bit accumulator into 16 bits.
pub fn fold_wide(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Writes `c` at `at` (native order) and returns the buffer.
    fn with_csum(mut buf: [u8; 20], at: usize, c: u16) -> [u8; 20] {
        buf[at..at + 2].copy_from_slice(&c.to_ne_bytes());
        buf
    }

    fn valid(buf: &[u8]) -> bool {
        // A correct checksum makes the sum over the whole buffer 0xFFFF (negative zero).
        fold_wide(sum_words(buf, 0)) == 0xffff
    }

    proptest! {
        /// Incrementally updating an address keeps the header valid and equals a full recompute
        /// (modulo the +0/-0 ambiguity that RFC 1624 §3 explains, which cannot arise here because
        /// a header with a valid checksum and a nonzero word never sums to +0).
        #[test]
        fn replace4_matches_full_recompute(mut hdr in any::<[u8; 20]>(), new in any::<u32>(), at in 0usize..4) {
            hdr[0] = 0x45; // a nonzero word, as in every real IPv4 header
            let csum_at = 10;
            let addr_at = 12 + (at % 2) * 4;
            hdr = with_csum(hdr, csum_at, 0);
            let c = checksum(&hdr);
            hdr = with_csum(hdr, csum_at, c);
            prop_assert!(valid(&hdr));

            let old = u32::from_ne_bytes([hdr[addr_at], hdr[addr_at + 1], hdr[addr_at + 2], hdr[addr_at + 3]]);
            hdr[addr_at..addr_at + 4].copy_from_slice(&new.to_ne_bytes());
            let inc = replace4(c, old, new);
            let full = checksum(&with_csum(hdr, csum_at, 0));
            prop_assert_eq!(inc, full);
            prop_assert!(valid(&with_csum(hdr, csum_at, inc)));
        }

        #[test]
        fn replace2_matches_full_recompute(mut hdr in any::<[u8; 20]>(), new in any::<u16>(), word in 0usize..10) {
            hdr[0] = 0x45;
            let csum_at = 10;
            prop_assume!(word != 5);
            hdr = with_csum(hdr, csum_at, 0);
            let c = checksum(&hdr);
            let at = word * 2;
            let old = u16::from_ne_bytes([hdr[at], hdr[at + 1]]);
            hdr[at..at + 2].copy_from_slice(&new.to_ne_bytes());
            let inc = replace2(c, old, new);
            prop_assert_eq!(inc, checksum(&with_csum(hdr, csum_at, 0)));
        }

        /// UDP: a zero checksum stays zero; any other stays valid and is never zero.
        #[test]
        fn replace4_udp_rules(c in any::<u16>(), old in any::<u32>(), new in any::<u32>()) {
            let r = replace4_udp(c, old, new);
            if c == 0 { prop_assert_eq!(r, 0); } else { prop_assert_ne!(r, 0); }
        }

        /// Chained updates equal one full recompute over a longer buffer (TCP/UDP/ICMP payloads).
        #[test]
        fn chained_updates_over_payload(mut data in proptest::collection::vec(any::<u8>(), 8..200),
                                        edits in proptest::collection::vec((any::<usize>(), any::<u16>()), 1..6)) {
            data[0] = 1; // nonzero word
            data[2] = 0; data[3] = 0;
            let mut c = checksum(&data);
            let words = data.len() / 2;
            for (i, new) in edits {
                let w = 2 + i % (words - 2);
                let at = w * 2;
                let old = u16::from_ne_bytes([data[at], data[at + 1]]);
                data[at..at + 2].copy_from_slice(&new.to_ne_bytes());
                c = replace2(c, old, new);
            }
            prop_assert_eq!(c, checksum(&data));
        }
    }

    #[test]
    fn rfc1624_example() {
        // RFC 1624 §4 numbers: HC = 0xDD2F, m = 0x5555, m' = 0x3285 -> HC' = 0x0000 (eqn. 3).
        assert_eq!(replace2(0xdd2f, 0x5555, 0x3285), 0x0000);
    }
}
