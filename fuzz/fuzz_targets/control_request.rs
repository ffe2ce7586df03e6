//! Control-socket requests (one line of JSON from a local client): a
//! request is accepted only whole and checked, and a refusal stays short
//! whatever was sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::daemon::control::{Request, parse_request};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    match parse_request(line) {
        Ok(Request::Status) => {}
        Ok(Request::Check { domain } | Request::Diff { domain }) => assert!(!domain.is_empty()),
        Ok(Request::Accept { domain, reason }) => {
            assert!(!domain.is_empty() && !reason.trim().is_empty());
        }
        Err(e) => assert!(e.len() <= 512, "a {}-byte refusal", e.len()),
    }
});
