//! The names of the regions the Linux model protects. The integrity engine
//! takes any name; these are the ones the Linux layer gives and looks for.

/// The kernel image's read-only executable pages (`_text` to `_etext`).
pub const TEXT: &str = "kernel-text";
/// Its read-only data (`__start_rodata` to `__end_rodata`).
pub const RODATA: &str = "kernel-rodata";

const MODULE_PREFIX: &str = "module:";

/// The region of a loaded module's text.
pub fn module(name: &str) -> String {
    format!("{MODULE_PREFIX}{name}")
}

/// The module a region is the text of, if it is one.
pub fn module_name(region: &str) -> Option<&str> {
    region.strip_prefix(MODULE_PREFIX)
}

/// Whether a region is a module's text.
pub fn is_module(region: &str) -> bool {
    module_name(region).is_some()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_module_region_names_its_module() {
        assert_eq!(super::module("ext4"), "module:ext4");
        assert_eq!(super::module_name(&super::module("ext4")), Some("ext4"));
        assert_eq!(super::module_name(super::TEXT), None);
        assert!(!super::is_module("modules"));
    }
}
