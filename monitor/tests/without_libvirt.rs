//! vigil builds and runs without libvirt installed: the binary does not link
//! it, and loads `libvirt.so.0` only when it first talks to a hypervisor,
//! saying which package to install when it cannot. Here libvirt is hidden
//! from one run of `vigil domains` (a mount namespace of an unprivileged user
//! namespace, in which the library files read as empty), or is absent anyway.

use std::path::Path;
use std::process::Command;

const VIGIL: &str = env!("CARGO_BIN_EXE_vigil");

#[test]
fn the_binary_does_not_link_libvirt() {
    let out = Command::new("ldd")
        .arg(VIGIL)
        .output()
        .expect("running ldd (Debian: libc-bin) on the vigil binary");
    assert!(out.status.success(), "ldd {VIGIL}: {}", String::from_utf8_lossy(&out.stderr));
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(libs.contains("libc.so"), "ldd lists no C library: {libs}");
    assert!(!libs.contains("libvirt"), "vigil links libvirt: {libs}");
}

#[test]
fn without_libvirt_vigil_says_what_to_install() {
    let libs = ["libvirt.so.0", "libvirt-qemu.so.0"];
    let dirs = ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"];
    let present: Vec<String> = dirs
        .iter()
        .flat_map(|d| libs.iter().map(move |l| Path::new(d).join(l)))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    // Each library file, through its symlink, reads as empty: dlopen fails
    // as for a missing library.
    let hide: String = present.iter().map(|p| format!("mount --bind /dev/null {p} && ")).collect();
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
        .arg(format!("{hide}exec {VIGIL} domains"))
        .output()
        .expect("running unshare (Debian: util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("unshare:") && !stderr.contains("mount:"),
        "could not hide libvirt (unprivileged user namespaces needed: sysctl kernel.unprivileged_userns_clone=1): {stderr}"
    );
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.contains("libvirt.so.0") && stderr.contains("libvirt0"),
        "the error names neither the library nor its package: {stderr}"
    );
}
