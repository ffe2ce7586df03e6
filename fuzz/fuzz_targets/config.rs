//! The daemon's configuration file: parsed and validated, or refused with
//! an error naming the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::daemon::config::{Overrides, Settings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Settings::parse("fuzz.toml", text) {
        Ok(raw) => {
            if let Err(e) = Settings::validate("fuzz.toml", raw, &Overrides::default()) {
                assert!(e.to_string().contains("fuzz.toml"), "{e}");
            }
        }
        Err(e) => assert!(e.to_string().contains("fuzz.toml"), "{e}"),
    }
});
