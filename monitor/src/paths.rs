//! Where vigil keeps its state and finds its inputs unless told otherwise:
//! one place for the CLI and the daemon, so that `vigil baseline` and the
//! daemon read and write the same files.

use std::path::{Path, PathBuf};

/// Baselines, original pages, the alert log and its state.
pub const STATE_DIR: &str = "/var/lib/vigil";
/// Guest profiles shipped with the package.
pub const PROFILES_DIR: &str = "/usr/share/vigil/guest-profiles";
/// Guest profiles an operator places by hand; they come first.
pub const PROFILES_ETC: &str = "/etc/vigil/guest-profiles";

/// Where `vigil profile build` writes profiles made on this host: beside
/// the baselines, under `state_dir`.
pub fn built_profiles(state_dir: &Path) -> PathBuf {
    state_dir.join("guest-profiles")
}

/// Where guest profiles are looked for unless told otherwise, in order: the
/// operator's own, those built on this host, those the package ships. A
/// profile of a kernel release found earlier in the path shadows one of
/// the same release found later.
pub fn profile_path(state_dir: &Path) -> Vec<PathBuf> {
    vec![PROFILES_ETC.into(), built_profiles(state_dir), PROFILES_DIR.into()]
}
/// The daemon's control socket.
pub const CONTROL_SOCKET: &str = "/run/vigil/control.sock";

/// Where a domain's baseline is kept under `state_dir`.
pub fn baseline_path(state_dir: &Path, uuid: &str) -> PathBuf {
    state_dir.join("baselines").join(format!("{uuid}.json"))
}
