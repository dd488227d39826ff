//! Frames the bench sends: Ethernet + IPv4 (no options, DF) + UDP, with a valid IP header
//! checksum and an optional UDP checksum (RFC 768), padded to at least 60 bytes (64 on the
//! wire with the FCS).
use std::net::Ipv4Addr;

use nat_common::csum::{checksum, fold_wide, sum_words};

pub const ETH_LEN: usize = 14;
/// Smallest Ethernet frame without FCS.
pub const MIN_FRAME: usize = 60;

#[derive(Clone, Copy, Debug)]
pub struct Udp {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    /// Compute the UDP checksum (false: 0, "none").
    pub checksum: bool,
}

impl Udp {
    /// The frame, `len` bytes long (at least 42 + 1 payload byte; at least 60).
    pub fn build(&self, len: usize) -> Vec<u8> {
        let len = len.max(MIN_FRAME);
        let ip_len = len - ETH_LEN;
        let udp_len = ip_len - 20;
        let mut f = Vec::with_capacity(len);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&(ip_len as u16).to_be_bytes());
        ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, self.ttl, 17, 0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_ne_bytes());
        f.extend_from_slice(&ip);
        let mut udp = Vec::with_capacity(udp_len);
        udp.extend_from_slice(&self.sport.to_be_bytes());
        udp.extend_from_slice(&self.dport.to_be_bytes());
        udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.resize(udp_len, 0xa5);
        if self.checksum {
            let mut ph = Vec::with_capacity(12);
            ph.extend_from_slice(&self.src.octets());
            ph.extend_from_slice(&self.dst.octets());
            ph.extend_from_slice(&[0, 17]);
            ph.extend_from_slice(&(udp_len as u16).to_be_bytes());
            let c = match !fold_wide(sum_words(&udp, sum_words(&ph, 0))) {
                0 => 0xffff,
                c => c,
            };
            udp[6..8].copy_from_slice(&c.to_ne_bytes());
        }
        f.extend_from_slice(&udp);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_frame_has_valid_checksums_and_minimum_size() {
        let u = Udp {
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(192, 0, 2, 1),
            dst: Ipv4Addr::new(198, 51, 100, 10),
            sport: 1234,
            dport: 5000,
            ttl: 64,
            checksum: true,
        };
        let f = u.build(0);
        assert_eq!(f.len(), MIN_FRAME);
        assert_eq!(fold_wide(sum_words(&f[14..34], 0)), 0xffff, "IP header");
        let mut ph = Vec::new();
        ph.extend_from_slice(&f[26..34]);
        ph.extend_from_slice(&[0, 17, 0, 26]);
        assert_eq!(
            fold_wide(sum_words(&f[34..], sum_words(&ph, 0))),
            0xffff,
            "UDP"
        );
        assert_eq!(&f[30..34], &u.dst.octets());
    }
}
