//! Frames the bench sends: Ethernet + IPv4 (no options, DF) + UDP or TCP, with a valid IP
//! header checksum, an optional UDP checksum (RFC 768) or a TCP checksum, at least 60 bytes
//! (64 on the wire with the FCS).
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
        let udp_len = len - ETH_LEN - 20;
        let mut udp = Vec::with_capacity(udp_len);
        udp.extend_from_slice(&self.sport.to_be_bytes());
        udp.extend_from_slice(&self.dport.to_be_bytes());
        udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.resize(udp_len, 0xa5);
        if self.checksum {
            let c = match l4_checksum(self.src, self.dst, 17, &udp) {
                0 => 0xffff,
                c => c,
            };
            udp[6..8].copy_from_slice(&c.to_ne_bytes());
        }
        let ends = (self.dst_mac, self.src_mac, self.src, self.dst);
        ipv4_frame(ends, self.ttl, 17, &udp)
    }
}

/// Ethernet + IPv4 (no options, DF, a valid header checksum) around the transport segment
/// `l4` of protocol `proto`; `ends` are the destination and source MAC, source and
/// destination address. Padded to [`MIN_FRAME`] after the IP packet, as Ethernet pads.
fn ipv4_frame(
    (dst_mac, src_mac, src, dst): ([u8; 6], [u8; 6], Ipv4Addr, Ipv4Addr),
    ttl: u8,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let ip_len = 20 + l4.len();
    let mut f = Vec::with_capacity((ETH_LEN + ip_len).max(MIN_FRAME));
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(ip_len as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, ttl, proto, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f.resize(f.len().max(MIN_FRAME), 0);
    f
}

/// The transport checksum of `seg` (its checksum field zero) over the IPv4 pseudo-header.
fn l4_checksum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, seg: &[u8]) -> u16 {
    let mut ph = Vec::with_capacity(12);
    ph.extend_from_slice(&src.octets());
    ph.extend_from_slice(&dst.octets());
    ph.extend_from_slice(&[0, proto]);
    ph.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    !fold_wide(sum_words(seg, sum_words(&ph, 0)))
}

/// TCP header flags (byte 13).
pub const TCP_SYN: u8 = 0x02;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// A TCP segment without options (window 64,000, no scaling).
#[derive(Clone, Copy, Debug)]
pub struct Tcp {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// Payload bytes (the IP total length counts them; a shorter frame is padded to 60
    /// bytes after the IP packet, as Ethernet pads).
    pub payload: usize,
}

impl Tcp {
    pub fn build(&self) -> Vec<u8> {
        let tcp_len = 20 + self.payload;
        let mut tcp = Vec::with_capacity(tcp_len);
        tcp.extend_from_slice(&self.sport.to_be_bytes());
        tcp.extend_from_slice(&self.dport.to_be_bytes());
        tcp.extend_from_slice(&self.seq.to_be_bytes());
        tcp.extend_from_slice(&self.ack.to_be_bytes());
        tcp.extend_from_slice(&[5 << 4, self.flags]);
        tcp.extend_from_slice(&64_000u16.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]);
        tcp.resize(tcp_len, 0xa5);
        let c = l4_checksum(self.src, self.dst, 6, &tcp);
        tcp[16..18].copy_from_slice(&c.to_ne_bytes());
        let ends = (self.dst_mac, self.src_mac, self.src, self.dst);
        ipv4_frame(ends, self.ttl, 6, &tcp)
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

    #[test]
    fn tcp_frame_has_valid_checksums_and_its_fields() {
        let t = Tcp {
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(192, 0, 2, 1),
            dst: Ipv4Addr::new(198, 51, 100, 10),
            sport: 1234,
            dport: 5000,
            ttl: 64,
            seq: 0x0102_0304,
            ack: 0x0a0b_0c0d,
            flags: TCP_PSH | TCP_ACK,
            payload: 6,
        };
        let f = t.build();
        assert_eq!(f.len(), MIN_FRAME);
        assert_eq!(&f[16..18], &46u16.to_be_bytes(), "IP total length");
        assert_eq!(f[23], 6, "protocol");
        assert_eq!(fold_wide(sum_words(&f[14..34], 0)), 0xffff, "IP header");
        let mut ph = Vec::new();
        ph.extend_from_slice(&f[26..34]);
        ph.extend_from_slice(&[0, 6, 0, 26]);
        assert_eq!(
            fold_wide(sum_words(&f[34..], sum_words(&ph, 0))),
            0xffff,
            "TCP"
        );
        assert_eq!(&f[38..42], &[1, 2, 3, 4], "sequence number");
        assert_eq!(&f[42..46], &[10, 11, 12, 13], "acknowledgment");
        assert_eq!(f[46], 0x50, "data offset");
        assert_eq!(f[47], TCP_PSH | TCP_ACK);
        // Shorter than 60 bytes: padded after the IP packet, not counted in it.
        let short = Tcp { payload: 0, ..t }.build();
        assert_eq!(short.len(), MIN_FRAME);
        assert_eq!(&short[16..18], &40u16.to_be_bytes());
    }
}
