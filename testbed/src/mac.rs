//! MAC addresses as `ip` prints and reads them: six lower-case hex bytes joined by colons.
use anyhow::{Context as _, anyhow};

/// `aa:bb:cc:dd:ee:ff` from its six bytes.
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The six bytes of `aa:bb:cc:dd:ee:ff` (either case); fails naming the text otherwise.
pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let v = s
        .split(':')
        .map(|h| u8::from_str_radix(h, 16))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("MAC {s}"))?;
    v.try_into().map_err(|_| anyhow!("MAC {s}: not 6 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let m = [0x02, 0x00, 0x5e, 0x10, 0xab, 0xff];
        assert_eq!(mac_str(m), "02:00:5e:10:ab:ff");
        assert_eq!(parse_mac("02:00:5E:10:ab:ff").unwrap(), m);
    }

    #[test]
    fn refuses_what_is_not_six_hex_bytes() {
        for bad in [
            "",
            "02:00:5e:10:ab",
            "02:00:5e:10:ab:ff:01",
            "02:00:5e:10:ab:zz",
        ] {
            let e = parse_mac(bad).unwrap_err();
            assert!(format!("{e:#}").contains(bad), "{e:#}");
        }
    }
}
