//! CloudStack payloads (`staticnatrules`, `firewallrules`): parse, then apply to a state that
//! has mappings and a rule, as natd does for `natctl apply` and `--cloudstack-dir`. A refused
//! payload must be refused with an error, an accepted one must give a state natd can install,
//! persist and restore (`nat_fuzz::check_accepted`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nat_userspace::cloudstack;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let payload = match cloudstack::parse(text) {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let before = nat_fuzz::base_state();
    let mut after = before.clone();
    match cloudstack::apply(&payload, &mut after) {
        Ok(summary) => {
            let _ = summary.to_string();
            nat_fuzz::check_accepted(&before, &after);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
