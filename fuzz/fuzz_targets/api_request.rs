//! The control API's decoder: one request line as natd reads it from its socket
//! (`serde_json::from_slice::<Request>`), and natd's reply line as natctl reads it. A decoded
//! request must encode back to itself (natctl encodes, natd decodes), its rule spec must
//! validate or be refused, and a CloudStack payload inside it goes through the CloudStack
//! checks (those with feature `natd`: without it the target builds from nat-api alone).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nat_api::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(resp) = serde_json::from_slice::<Response>(data) {
        let _ = serde_json::to_string(&resp);
    }
    let req = match serde_json::from_slice::<Request>(data) {
        Ok(r) => r,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let line = serde_json::to_string(&req).expect("a request encodes");
    let back: Request =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line} does not decode back: {e}"));
    assert_eq!(back, req, "the request changed on its way through JSON");
    match &req {
        Request::FirewallAdd { rule, .. } | Request::EgressAdd { rule } => {
            let _ = rule.service().map_err(|e| e.to_string());
        }
        #[cfg(feature = "natd")]
        Request::CloudstackApply { payload, .. } => {
            use nat_userspace::cloudstack;
            if let Ok(p) = cloudstack::parse(payload) {
                let before = nat_fuzz::base_state();
                let mut after = before.clone();
                if cloudstack::apply(&p, &mut after).is_ok() {
                    nat_fuzz::check_accepted(&before, &after);
                }
            }
        }
        _ => {}
    }
});
