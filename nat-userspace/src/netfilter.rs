//! The slow path: an nftables table of natd's own that translates exactly what the XDP program
//! translates, for every frame the program passes to the kernel (fragments above all; the kernel
//! reassembles before NAT). The table is replaced whole in one `nft -f` transaction; nothing
//! outside it is touched.
use std::{
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
};

use crate::state::DesiredState;

/// Name of natd's table in the `ip` family.
pub const TABLE: &str = "xdp_static_nat";

#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    #[error("cannot run nft (is the nftables package installed?): {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the ruleset: {0}")]
    Refused(String),
}

/// Renders the whole table: DNAT P -> V for what arrives on a public interface, SNAT V -> P for
/// what leaves through one, the same scope the XDP program uses. Interface names are quoted; natd
/// checked they exist, so they contain no quote.
pub fn render(public_ifaces: &[String], state: &DesiredState) -> String {
    let ifaces = public_ifaces
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut dnat = String::new();
    let mut snat = String::new();
    for m in state.mappings() {
        let sep = if dnat.is_empty() { "" } else { ", " };
        let _ = write!(dnat, "{sep}{} : {}", m.public, m.private);
        let _ = write!(snat, "{sep}{} : {}", m.private, m.public);
    }
    let elements = |e: &str| {
        if e.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {e} }};")
        }
    };
    format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tmap dnat_v4 {{ type ipv4_addr : ipv4_addr;{dn} }}\n\
         \tmap snat_v4 {{ type ipv4_addr : ipv4_addr;{sn} }}\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tiifname {{ {ifaces} }} dnat ip to ip daddr map @dnat_v4\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname {{ {ifaces} }} snat ip to ip saddr map @snat_v4\n\
         \t}}\n\
         }}\n",
        dn = elements(&dnat),
        sn = elements(&snat),
    )
}

/// Where natd writes its slow-path rules; a trait so the reconciler can be tested without nft.
pub trait SlowPath {
    /// Atomically replaces natd's table with the rules for `state`.
    fn replace(&mut self, state: &DesiredState) -> Result<(), NetfilterError>;
    /// Removes natd's table, if present.
    fn remove(&mut self) -> Result<(), NetfilterError>;
}

/// The real slow path, through the `nft` command.
pub struct Nft {
    pub public_ifaces: Vec<String>,
}

fn run_nft(script: &str) -> Result<(), NetfilterError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NetfilterError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(NetfilterError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NetfilterError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetfilterError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

impl SlowPath for Nft {
    fn replace(&mut self, state: &DesiredState) -> Result<(), NetfilterError> {
        run_nft(&render(&self.public_ifaces, state))
    }

    fn remove(&mut self) -> Result<(), NetfilterError> {
        // Declaring the table first makes the delete succeed whether or not it exists.
        run_nft(&format!("table ip {TABLE}\ndelete table ip {TABLE}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Mapping;

    #[test]
    fn renders_both_directions_scoped_to_public_ifaces() {
        let s = DesiredState::from_mappings(&[Mapping {
            public: "203.0.113.10".parse().unwrap(),
            private: "10.0.0.10".parse().unwrap(),
        }])
        .unwrap();
        let r = render(&["eth2".into(), "eth3".into()], &s);
        assert!(r.contains("elements = { 203.0.113.10 : 10.0.0.10 }"), "{r}");
        assert!(r.contains("elements = { 10.0.0.10 : 203.0.113.10 }"), "{r}");
        assert!(
            r.contains("iifname { \"eth2\", \"eth3\" } dnat ip to ip daddr map @dnat_v4"),
            "{r}"
        );
        assert!(
            r.contains("oifname { \"eth2\", \"eth3\" } snat ip to ip saddr map @snat_v4"),
            "{r}"
        );
        assert!(r.starts_with("table ip xdp_static_nat\ndelete table ip xdp_static_nat\n"));
    }

    #[test]
    fn empty_state_has_empty_maps() {
        let r = render(&["eth2".into()], &DesiredState::default());
        assert!(!r.contains("elements"), "{r}");
    }
}
