//! natd's TOML config file: parse, the desired state it describes and the connection-table
//! settings, as natd reads them at start. An accepted state must be one natd can install,
//! persist and restore (`nat_fuzz::check_accepted`).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nat_userspace::{config::Config, state::DesiredState};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("natd.toml");
    let config = match Config::parse(path, text) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    match config.desired_state(path) {
        Ok(state) => nat_fuzz::check_accepted(&DesiredState::default(), &state),
        Err(e) => {
            let _ = e.to_string();
        }
    }
    // The smallest machine the default sizing knows, so a defaulted size is checked too.
    match config.conntrack(path, Some(1 << 20)) {
        Ok((size, _timeouts)) => assert!(size >= 1, "a connection table of {size} accepted"),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
