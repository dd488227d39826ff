//! The part of natd's table for what the kernel's connection tracking cannot translate, and
//! the net under everything: no packet from a mapped private address leaves a public
//! interface untranslated.
//!
//! UDP-Lite and DCCP checksums cover the addresses (RFC 3828 §3.1, RFC 4340 §9.1), so only a
//! tracker that knows the protocol translates them intact. The kernel's trackers fail them
//! in ways natd cannot configure away:
//! - UDP-Lite: `udplite_error` checks the checksum of what arrives from the wire with the
//!   pseudo-header of UDP (protocol 17, not 136), so it deems every such datagram INVALID
//!   (unless the driver vouched for the checksum, or `nf_conntrack_checksum` is 0): the NAT
//!   chains never see it and it would leave with the guest's private address. The code is the
//!   same in 6.1 and 6.18. natd takes UDP-Lite of its mappings out of connection tracking
//!   (`notrack`) and translates it itself, statelessly (a 1:1 mapping needs no state): the
//!   `payload set` of an address updates the UDP-Lite checksum for the pseudo-header
//!   (`nft_payload_l4csum_update`, which knows UDP-Lite since 4.x). Inbound it translates only
//!   what the tc marker marked as part of a fast-path flow ([`FASTPATH_MARK`]; no ingress rule
//!   admits UDP-Lite), outbound what the egress policy admitted. Hairpin (the router's
//!   guest-side address as source) needs the kernel's NAT state: dropped.
//! - DCCP: 6.1 has a DCCP tracker and NAT (`dccp_manip_pkt`), which translate what it deems
//!   valid; what it deems INVALID (its state machine, or the checksum check) is dropped here.
//!   6.18 has no DCCP tracker: the generic tracker NATs the addresses and leaves the DCCP
//!   checksum stale, so every DCCP packet of a mapping on the kernel path is dropped there
//!   ([`KernelTrackers::probe`] tells which). nftables cannot rewrite a DCCP checksum itself.
//!   The drop comes before the kernel sends the packet, so DCCP alone does not get an
//!   unresolved neighbour resolved (other traffic does; then DCCP takes the fast path).
//!
//! What is dropped because the kernel cannot translate it is counted (`untranslatable`), what
//! the net catches (`untranslated`), and what natd translated statelessly
//! (`udplite_stateless`), in named counters of the table, each drop also logged (at most 6 a
//! minute).
use std::path::Path;

use nat_common::marks::FASTPATH_MARK;

/// Priority of the chain that takes UDP-Lite of the mappings out of connection tracking:
/// before conntrack (-200), as the `raw` table.
const UNTRACK_PRIORITY: i32 = -300;
/// Priority of the chain that translates inbound UDP-Lite and drops what the kernel cannot
/// translate: after the `route` chain (-140, which drops what is addressed to a private
/// address) and before the prerouting NAT (-100), so a public IP is still the destination.
const INBOUND_PRIORITY: i32 = -110;
/// Priority of the chain that translates outbound UDP-Lite and drops outbound DCCP the kernel
/// cannot translate: before the postrouting NAT (100), after the route is known.
const OUTBOUND_PRIORITY: i32 = 90;
/// Priority of the net: after every postrouting NAT (100), so what it sees is what leaves.
const NET_PRIORITY: i32 = 200;

/// The named counters of natd's table, in the order they are declared.
pub const COUNTERS: [&str; 3] = ["udplite_stateless", "untranslatable", "untranslated"];

/// The kernel's connection trackers natd's table depends on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelTrackers {
    /// The kernel tracks DCCP itself (`CONFIG_NF_CT_PROTO_DCCP`: 6.1 yes, 6.18 no), so its NAT
    /// rewrites the DCCP checksum of what it deems valid.
    pub dccp: bool,
}

impl KernelTrackers {
    /// What the kernel of this network namespace tracks, or `None` while connection tracking
    /// is not loaded (its sysctls appear with it; natd's table loads it).
    pub fn probe() -> Option<Self> {
        Self::probe_in(Path::new("/proc/sys/net/netfilter"))
    }

    /// [`Self::probe`] of the sysctl directory `dir`.
    fn probe_in(dir: &Path) -> Option<Self> {
        dir.join("nf_conntrack_max").exists().then(|| Self {
            dccp: dir.join("nf_conntrack_dccp_timeout_request").exists(),
        })
    }
}

/// The counters and chains of this part of the table; `pubs` and `guests` are the quoted,
/// comma-separated interface names.
pub fn render(pubs: &str, guests: &str, trackers: KernelTrackers) -> String {
    let fastpath = FASTPATH_MARK;
    // What of DCCP the kernel cannot translate: everything without a tracker, what its
    // tracker deems INVALID with one.
    let dccp = if trackers.dccp {
        "meta l4proto dccp ct state invalid"
    } else {
        "meta l4proto dccp"
    };
    let counters: String = COUNTERS
        .iter()
        .map(|c| format!("\tcounter {c} {{ }}\n"))
        .collect();
    format!(
        "{counters}\
         \tchain untrack {{\n\
         \t\ttype filter hook prerouting priority {UNTRACK_PRIORITY}; policy accept;\n\
         \t\tmeta l4proto udplite iifname {{ {pubs}, {guests} }} ip daddr @publics notrack\n\
         \t\tmeta l4proto udplite iifname {{ {guests} }} ip saddr @privates notrack\n\
         \t}}\n\
         \tchain stateless_in {{\n\
         \t\ttype filter hook prerouting priority {INBOUND_PRIORITY}; policy accept;\n\
         \t\tmeta l4proto udplite ct state untracked iifname {{ {pubs} }} ip daddr @publics \
         meta mark and {fastpath:#x} == {fastpath:#x} counter name \"udplite_stateless\" \
         ip daddr set ip daddr map @dnat_v4 accept\n\
         \t\tmeta l4proto udplite ct state untracked iifname {{ {pubs} }} ip daddr @publics drop\n\
         \t\tmeta l4proto udplite ct state untracked iifname {{ {guests} }} ip daddr @publics \
         jump untranslatable\n\
         \t\t{dccp} iifname {{ {pubs}, {guests} }} ip daddr @publics jump untranslatable\n\
         \t}}\n\
         \tchain stateless_out {{\n\
         \t\ttype filter hook postrouting priority {OUTBOUND_PRIORITY}; policy accept;\n\
         \t\tmeta l4proto udplite ct state untracked oifname {{ {pubs} }} ip saddr @privates \
         counter name \"udplite_stateless\" ip saddr set ip saddr map @snat_v4\n\
         \t\t{dccp} oifname {{ {pubs} }} ip saddr @privates jump untranslatable\n\
         \t}}\n\
         \tchain net {{\n\
         \t\ttype filter hook postrouting priority {NET_PRIORITY}; policy accept;\n\
         \t\toifname {{ {pubs} }} ip saddr @privates jump untranslated\n\
         \t}}\n\
         {}{}",
        drop_chain("untranslatable"),
        drop_chain("untranslated"),
    )
}

/// A chain that counts in counter `name`, logs (at most 6 a minute) and drops.
fn drop_chain(name: &str) -> String {
    format!(
        "\tchain {name} {{\n\
         \t\tcounter name \"{name}\"\n\
         \t\tlimit rate 6/minute log prefix \"xdp_static_nat {name}: \" level warn\n\
         \t\tdrop\n\
         \t}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_the_dccp_tracker_by_its_sysctl() {
        let dir = std::env::temp_dir().join(format!("xsn-probe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(KernelTrackers::probe_in(&dir), None, "no conntrack loaded");
        std::fs::write(dir.join("nf_conntrack_max"), "262144\n").unwrap();
        assert_eq!(
            KernelTrackers::probe_in(&dir),
            Some(KernelTrackers { dccp: false })
        );
        std::fs::write(dir.join("nf_conntrack_dccp_timeout_request"), "240\n").unwrap();
        assert_eq!(
            KernelTrackers::probe_in(&dir),
            Some(KernelTrackers { dccp: true })
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dccp_is_dropped_whole_without_a_tracker_and_when_invalid_with_one() {
        let without = render("\"eth2\"", "\"eth0\"", KernelTrackers { dccp: false });
        assert!(
            without.contains(
                "\t\tmeta l4proto dccp iifname { \"eth2\", \"eth0\" } ip daddr @publics \
                 jump untranslatable\n"
            ),
            "{without}"
        );
        assert!(
            without.contains(
                "\t\tmeta l4proto dccp oifname { \"eth2\" } ip saddr @privates \
                 jump untranslatable\n"
            ),
            "{without}"
        );
        let with = render("\"eth2\"", "\"eth0\"", KernelTrackers { dccp: true });
        assert!(
            with.contains(
                "\t\tmeta l4proto dccp ct state invalid oifname { \"eth2\" } ip saddr @privates \
                 jump untranslatable\n"
            ),
            "{with}"
        );
    }

    #[test]
    fn the_net_drops_a_private_source_after_every_nat() {
        let r = render("\"eth2\", \"eth3\"", "\"eth0\"", KernelTrackers::default());
        assert!(
            r.contains(
                "\tchain net {\n\t\ttype filter hook postrouting priority 200; policy accept;\n\
                 \t\toifname { \"eth2\", \"eth3\" } ip saddr @privates jump untranslated\n\t}\n"
            ),
            "{r}"
        );
        for c in COUNTERS {
            assert!(r.contains(&format!("\tcounter {c} {{ }}\n")), "{r}");
        }
    }
}
