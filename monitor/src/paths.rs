//! Where vigil keeps its state and finds its inputs unless told otherwise:
//! one place for the CLI and the daemon, so that `vigil baseline` and the
//! daemon read and write the same files.

use std::path::{Path, PathBuf};

/// Baselines, original pages, the alert log and its state.
pub const STATE_DIR: &str = "/var/lib/vigil";
/// Guest profiles shipped with the package.
pub const PROFILES_DIR: &str = "/usr/share/vigil/guest-profiles";
/// The daemon's control socket.
pub const CONTROL_SOCKET: &str = "/run/vigil/control.sock";

/// Where a domain's baseline is kept under `state_dir`.
pub fn baseline_path(state_dir: &Path, uuid: &str) -> PathBuf {
    state_dir.join("baselines").join(format!("{uuid}.json"))
}
