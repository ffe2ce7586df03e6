//! BTF type information parsed from arbitrary bytes, then asked for the
//! members vigil looks up: errors, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = vigil::linux::btf::Btf::parse(data) else { return };
    for (st, path) in [
        ("module", "list"),
        ("module", "core_layout.base"),
        ("ftrace_page", "records"),
        ("dyn_ftrace", "ip"),
        ("kprobe", "hlist"),
    ] {
        let _ = btf.offset_of(st, path);
        let _ = btf.size_of(st);
    }
});
