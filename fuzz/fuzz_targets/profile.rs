//! Guest profile files: a profile that parses is written back to the same
//! text's meaning (parse, write, parse again gives the same profile).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::linux::profile::Profile;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(p) = Profile::parse(text) else { return };
    let again = Profile::parse(&p.to_text()).expect("a written profile parses");
    assert_eq!(again, p);
});
