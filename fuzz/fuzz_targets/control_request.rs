//! Control-socket requests (one line of JSON from a local client): a
//! request is accepted only whole and checked, and a refusal stays short
//! whatever was sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::daemon::control::{MAX_REASON, Request, parse_request};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    match parse_request(line) {
        Ok(Request::Status) => {}
        Ok(Request::Check { domain } | Request::Diff { domain }) => assert!(!domain.is_empty()),
        Ok(Request::Accept { domain, reason, diff_digest }) => {
            assert!(!domain.is_empty() && !reason.trim().is_empty());
            assert!(reason.len() <= MAX_REASON && !reason.chars().any(char::is_control));
            assert!(diff_digest.is_none_or(|d| d.len() == 64
                && d.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))));
        }
        Err(e) => assert!(e.len() <= 512, "a {}-byte refusal", e.len()),
    }
});
