//! Runs a program confined as systemd would run it under a unit, on a host
//! where systemd is not PID 1 (CI, the lab): the lab's stand-in for
//! `systemd-run`, so that the lab suite exercises the shipped unit's
//! confinement rather than root's freedom.
//!
//! Taken from the unit's `[Service]` section and applied, in systemd's order,
//! in the child between fork and exec:
//!
//! ```text
//!   ProtectProc=, ProcSubset=            a mount namespace with /proc mounted hidepid=/subset=
//!   CapabilityBoundingSet=               every other capability dropped from the bounding set
//!   User=, Group=, SupplementaryGroups=  setgroups, setresgid, setresuid (capabilities kept)
//!   AmbientCapabilities=                 the only capabilities left, raised as ambient
//!   UMask=
//!   NoNewPrivileges=, SystemCallFilter=, SystemCallErrorNumber=, SystemCallArchitectures=native,
//!   MemoryDenyWriteExecute=              one seccomp filter (groups expanded by systemd-analyze)
//! ```
//!
//! Not applied: the other mount-namespace settings (`ProtectSystem=`,
//! `PrivateTmp=`, ...), address-family and IP restrictions, and anything else
//! systemd does with cgroups; `systemd-analyze security` scores those.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::CString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Capability names, by number (linux/capability.h).
const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Where the kernel's x86-64 system call numbers are (package linux-libc-dev).
const UNISTD_64: &str = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";

/// Nesting of systemd's system-call groups is two or three deep; this bounds
/// a cycle, should one ever appear.
const MAX_GROUP_DEPTH: usize = 8;

/// The confinement settings of a unit's `[Service]` section, as written.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UnitSettings {
    pub user: Option<String>,
    pub group: Option<String>,
    pub supplementary_groups: Vec<String>,
    /// `None`: not set (every capability stays in the bounding set).
    pub bounding: Option<Vec<String>>,
    pub ambient: Vec<String>,
    pub no_new_privileges: bool,
    /// Each `SystemCallFilter=` line in order, split into entries (`~` kept).
    pub syscall_filter: Vec<Vec<String>>,
    pub syscall_errno: Option<String>,
    pub native_only: bool,
    pub memory_deny_write_execute: bool,
    pub umask: Option<u32>,
    pub protect_proc: Option<String>,
    pub proc_subset: Option<String>,
}

fn yes(value: &str) -> bool {
    matches!(value, "yes" | "true" | "on" | "1")
}

impl UnitSettings {
    /// Reads the settings from a unit file's text. Repeated list settings
    /// accumulate and an empty assignment resets, as systemd reads them.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut s = UnitSettings::default();
        let mut in_service = false;
        let words = |v: &str| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') {
                in_service = line == "[Service]";
                continue;
            }
            if !in_service {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("line {}: no '=' in {line:?}", n + 1))?;
            let value = value.trim();
            match key.trim() {
                "User" => s.user = Some(value.to_owned()),
                "Group" => s.group = Some(value.to_owned()),
                "SupplementaryGroups" if value.is_empty() => s.supplementary_groups.clear(),
                "SupplementaryGroups" => s.supplementary_groups.extend(words(value)),
                "CapabilityBoundingSet" if value.starts_with('~') => {
                    return Err(format!(
                        "line {}: inverted CapabilityBoundingSet= is not supported",
                        n + 1
                    ));
                }
                "CapabilityBoundingSet" => {
                    s.bounding.get_or_insert_with(Vec::new).extend(words(value))
                }
                "AmbientCapabilities" if value.is_empty() => s.ambient.clear(),
                "AmbientCapabilities" => s.ambient.extend(words(value)),
                "NoNewPrivileges" => s.no_new_privileges = yes(value),
                "SystemCallFilter" if value.is_empty() => s.syscall_filter.clear(),
                "SystemCallFilter" => {
                    // "~a b" denies both a and b: carry the mark onto each entry.
                    let (deny, rest) = match value.strip_prefix('~') {
                        Some(rest) => (true, rest),
                        None => (false, value),
                    };
                    let entries =
                        words(rest).into_iter().map(|w| if deny { format!("~{w}") } else { w });
                    s.syscall_filter.push(entries.collect());
                }
                "SystemCallErrorNumber" => s.syscall_errno = Some(value.to_owned()),
                "SystemCallArchitectures" => s.native_only = value == "native",
                "MemoryDenyWriteExecute" => s.memory_deny_write_execute = yes(value),
                "UMask" => {
                    s.umask = Some(
                        u32::from_str_radix(value, 8)
                            .map_err(|e| format!("line {}: UMask={value}: {e}", n + 1))?,
                    );
                }
                "ProtectProc" => s.protect_proc = Some(value.to_owned()),
                "ProcSubset" => s.proc_subset = Some(value.to_owned()),
                _ => {}
            }
        }
        Ok(s)
    }

    /// The unit without one capability (to show that it is needed).
    pub fn without_capability(&self, name: &str) -> Self {
        let mut s = self.clone();
        if let Some(b) = s.bounding.as_mut() {
            b.retain(|c| c != name);
        }
        s.ambient.retain(|c| c != name);
        s
    }

    /// The capabilities the unit keeps: its ambient set, within its bounding set.
    pub fn capabilities(&self) -> Vec<String> {
        self.ambient
            .iter()
            .filter(|c| self.bounding.as_ref().is_none_or(|b| b.contains(c)))
            .cloned()
            .collect()
    }
}

fn capability_number(name: &str) -> Result<u32, String> {
    CAPABILITIES
        .iter()
        .position(|c| c.eq_ignore_ascii_case(name))
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| format!("unknown capability {name:?}"))
}

/// A mask of capabilities, bit N for capability N.
pub fn capability_mask(names: &[String]) -> Result<u64, String> {
    names.iter().try_fold(0u64, |m, n| Ok(m | 1u64 << capability_number(n)?))
}

/// systemd's system-call groups (`@system-service` and the rest), from
/// `systemd-analyze syscall-filter`'s listing: group name to its entries,
/// which may name other groups.
pub fn systemd_syscall_groups() -> Result<HashMap<String, Vec<String>>, String> {
    let out =
        Command::new("systemd-analyze").args(["syscall-filter", "--no-pager"]).output().map_err(
            |e| format!("running systemd-analyze syscall-filter: {e} (apt-get install systemd)"),
        )?;
    if !out.status.success() {
        return Err(format!(
            "systemd-analyze syscall-filter failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(parse_syscall_groups(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_syscall_groups(listing: &str) -> HashMap<String, Vec<String>> {
    let mut groups: HashMap<String, Vec<String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in listing.lines() {
        if line.starts_with('@') {
            let name = line.trim().to_owned();
            groups.entry(name.clone()).or_default();
            current = Some(name);
        } else if line.trim().is_empty() {
            current = None;
        } else if let Some(g) = &current {
            let entry = line.trim();
            if !entry.starts_with('#') {
                groups.entry(g.clone()).or_default().push(entry.to_owned());
            }
        }
    }
    groups
}

/// System call names to numbers, from the kernel headers' `__NR_` list.
pub fn syscall_numbers(header: &str) -> HashMap<String, i64> {
    header
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "#define").then_some(())?;
            let name = w.next()?.strip_prefix("__NR_")?;
            Some((name.to_owned(), w.next()?.parse().ok()?))
        })
        .collect()
}

fn expand(
    entry: &str,
    groups: &HashMap<String, Vec<String>>,
    depth: usize,
    out: &mut BTreeSet<String>,
) -> Result<(), String> {
    if !entry.starts_with('@') {
        out.insert(entry.to_owned());
        return Ok(());
    }
    if depth > MAX_GROUP_DEPTH {
        return Err(format!("system-call group {entry} nests too deep"));
    }
    let members = groups
        .get(entry)
        .ok_or_else(|| format!("systemd does not know system-call group {entry}"))?;
    for m in members {
        expand(m, groups, depth + 1, out)?;
    }
    Ok(())
}

/// The allowed system calls of an allow-list filter, by systemd's rules: the
/// first line's entries (and `@default`, which systemd always allows) make
/// the list, and `~` entries on any line take calls out of it. Names the
/// running architecture does not have are skipped, as systemd skips them.
pub fn allowed_syscalls(
    settings: &UnitSettings,
    groups: &HashMap<String, Vec<String>>,
    numbers: &HashMap<String, i64>,
) -> Result<BTreeMap<String, i64>, String> {
    let first = settings.syscall_filter.first().ok_or("the unit has no SystemCallFilter=")?;
    if first.first().is_some_and(|e| e.starts_with('~')) {
        return Err(
            "a deny-list SystemCallFilter= (first line starting '~') is not supported".into()
        );
    }
    let (mut allow, mut deny) = (BTreeSet::new(), BTreeSet::new());
    expand("@default", groups, 0, &mut allow)?;
    for entry in settings.syscall_filter.iter().flatten() {
        match entry.strip_prefix('~') {
            Some(d) => expand(d, groups, 0, &mut deny)?,
            None => expand(entry, groups, 0, &mut allow)?,
        }
    }
    Ok(allow
        .difference(&deny)
        .filter_map(|name| numbers.get(name).map(|&nr| (name.clone(), nr)))
        .collect())
}

fn errno_number(name: &str) -> Result<i32, String> {
    match name {
        "EPERM" => Ok(libc::EPERM),
        "EACCES" => Ok(libc::EACCES),
        "ENOSYS" => Ok(libc::ENOSYS),
        other => {
            other.parse().map_err(|_| format!("SystemCallErrorNumber={other} is not supported"))
        }
    }
}

fn masked_zero(arg: u8, mask: u64) -> Result<SeccompRule, String> {
    let cond = SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(mask), 0)
        .map_err(|e| e.to_string())?;
    SeccompRule::new(vec![cond]).map_err(|e| e.to_string())
}

/// The seccomp program for the unit's filter. `MemoryDenyWriteExecute=`
/// becomes conditions: `mmap` only without both write and execute,
/// `mprotect`/`pkey_mprotect` only without execute, `shmat` only without
/// `SHM_EXEC`, as systemd filters them.
pub fn seccomp_program(
    settings: &UnitSettings,
    allowed: &BTreeMap<String, i64>,
) -> Result<BpfProgram, String> {
    let denied = match &settings.syscall_errno {
        Some(e) => {
            SeccompAction::Errno(u32::try_from(errno_number(e)?).map_err(|e| e.to_string())?)
        }
        None => SeccompAction::KillProcess,
    };
    let prot = |p: i32| u64::try_from(p).expect("PROT_ flags are positive");
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (name, &nr) in allowed {
        let conditional = match (settings.memory_deny_write_execute, name.as_str()) {
            (true, "mmap") => vec![
                masked_zero(2, prot(libc::PROT_WRITE))?,
                masked_zero(2, prot(libc::PROT_EXEC))?,
            ],
            (true, "mprotect" | "pkey_mprotect") => vec![masked_zero(2, prot(libc::PROT_EXEC))?],
            (true, "shmat") => vec![masked_zero(2, prot(libc::SHM_EXEC))?],
            _ => vec![],
        };
        rules.insert(nr, conditional);
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| e.to_string())?;
    let filter =
        SeccompFilter::new(rules, denied, SeccompAction::Allow, arch).map_err(|e| e.to_string())?;
    filter.try_into().map_err(|e: seccompiler::BackendError| e.to_string())
}

fn id_of(table: &str, file: &str, name: &str) -> Result<(u32, u32), String> {
    // passwd: name:x:uid:gid:...   group: name:x:gid:members
    table
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && f[0] == name)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().unwrap_or(0))))
        .ok_or_else(|| format!("{name:?} is not in {file} (lab/setup.sh creates user vigil)"))
}

/// Everything needed to confine a child, worked out in the parent so that
/// the child, between fork and exec, only makes system calls.
#[derive(Debug)]
pub struct Confinement {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// Capabilities kept in the bounding set; every other is dropped.
    pub bounding: u64,
    /// Capabilities the program runs with (ambient, and so effective).
    pub ambient: u64,
    last_cap: u32,
    umask: Option<u32>,
    proc_options: Option<CString>,
    program: BpfProgram,
    /// What is applied, for logs and test failures.
    pub summary: String,
}

impl Confinement {
    /// The confinement of a unit file. Needs root, the unit's users and
    /// groups, systemd-analyze and the kernel headers' system call list.
    pub fn from_unit(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let settings =
            UnitSettings::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::new(&settings)
    }

    pub fn new(settings: &UnitSettings) -> Result<Self, String> {
        if !settings.no_new_privileges {
            return Err(
                "the unit does not set NoNewPrivileges=yes, which this launcher assumes".into()
            );
        }
        let passwd =
            std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
        let group =
            std::fs::read_to_string("/etc/group").map_err(|e| format!("/etc/group: {e}"))?;
        let user = settings.user.as_deref().ok_or("the unit has no User=")?;
        let (uid, user_gid) = id_of(&passwd, "/etc/passwd", user)?;
        let gid = match &settings.group {
            Some(g) => id_of(&group, "/etc/group", g)?.0,
            None => user_gid,
        };
        let groups = settings
            .supplementary_groups
            .iter()
            .map(|g| id_of(&group, "/etc/group", g).map(|(id, _)| id))
            .collect::<Result<Vec<_>, _>>()?;
        let all: Vec<String> = CAPABILITIES.iter().map(|&c| c.to_owned()).collect();
        let bounding = capability_mask(settings.bounding.as_ref().unwrap_or(&all))?;
        let ambient = capability_mask(&settings.capabilities())?;
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40);
        let header = std::fs::read_to_string(UNISTD_64)
            .map_err(|e| format!("{UNISTD_64}: {e} (apt-get install linux-libc-dev)"))?;
        let allowed =
            allowed_syscalls(settings, &systemd_syscall_groups()?, &syscall_numbers(&header))?;
        let program = seccomp_program(settings, &allowed)?;
        let proc_options = proc_mount_options(settings);
        let summary = format!(
            "user {user} (uid {uid}, gid {gid}, groups {groups:?}), capabilities [{}], {} system calls \
             allowed ({} otherwise){}{}",
            settings.capabilities().join(" "),
            allowed.len(),
            settings.syscall_errno.as_deref().unwrap_or("killed"),
            if settings.memory_deny_write_execute {
                ", no writable and executable memory"
            } else {
                ""
            },
            proc_options
                .as_ref()
                .map(|o| format!(", /proc mounted {}", o.to_string_lossy()))
                .unwrap_or_default(),
        );
        Ok(Confinement {
            uid,
            gid,
            groups,
            bounding,
            ambient,
            last_cap,
            umask: settings.umask,
            proc_options,
            program,
            summary,
        })
    }

    /// Makes `cmd` start its program confined.
    pub fn apply(self: &std::sync::Arc<Self>, cmd: &mut Command) {
        let me = std::sync::Arc::clone(self);
        // SAFETY: the closure runs in the forked child before exec. It makes
        // only system calls on data prepared in the parent (no allocation, no
        // locks), which is what a child of a multi-threaded parent may do.
        unsafe {
            cmd.pre_exec(move || me.enter());
        }
    }

    /// Confines the calling process; meant for a child between fork and exec.
    fn enter(&self) -> io::Result<()> {
        let check =
            |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
        if let Some(options) = &self.proc_options {
            // SAFETY: plain system calls; the strings are NUL-terminated and
            // live in `self` across the calls.
            unsafe {
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    options.as_ptr().cast(),
                ))?;
            }
        }
        for cap in 0..=self.last_cap {
            if self.bounding & (1u64 << cap) == 0 {
                // SAFETY: prctl with integer arguments only.
                check(unsafe {
                    libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0)
                })?;
            }
        }
        // SAFETY: the group list is a live slice of gid_t of the given length;
        // the rest take integers.
        unsafe {
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            check(libc::setresgid(self.gid, self.gid, self.gid))?;
            check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0))?;
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
        }
        // capset(2), version 3: two 32-bit words per set.
        #[repr(C)]
        struct Header {
            version: u32,
            pid: libc::c_int,
        }
        #[repr(C)]
        #[derive(Clone, Copy)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let word = |i: u32| {
            let w =
                u32::try_from((self.ambient >> (32 * i)) & 0xffff_ffff).expect("masked to 32 bits");
            Data { effective: w, permitted: w, inheritable: w }
        };
        let header = Header { version: 0x2008_0522, pid: 0 };
        let data = [word(0), word(1)];
        // SAFETY: header and data are laid out as capset(2) version 3 reads them.
        let rc = unsafe { libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        for cap in 0..=self.last_cap {
            if self.ambient & (1u64 << cap) != 0 {
                // SAFETY: prctl with integer arguments only.
                check(unsafe {
                    libc::prctl(
                        libc::PR_CAP_AMBIENT,
                        libc::PR_CAP_AMBIENT_RAISE,
                        libc::c_ulong::from(cap),
                        0,
                        0,
                    )
                })?;
            }
        }
        if let Some(mask) = self.umask {
            // SAFETY: umask cannot fail.
            unsafe { libc::umask(mask) };
        }
        // Sets no_new_privs, then loads the filter.
        seccompiler::apply_filter(&self.program).map_err(|_| io::Error::last_os_error())
    }
}

fn proc_mount_options(settings: &UnitSettings) -> Option<CString> {
    let mut options = Vec::new();
    match settings.protect_proc.as_deref() {
        None | Some("default") => {}
        Some(p) => options.push(format!("hidepid={p}")),
    }
    match settings.proc_subset.as_deref() {
        None | Some("all") => {}
        Some(s) => options.push(format!("subset={s}")),
    }
    (!options.is_empty()).then(|| CString::new(options.join(",")).expect("no NUL in unit values"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTING: &str = "@default\n    # Always allowed\n    exit\n    mmap\n\n@basic-io\n    read\n    write\n\n@service\n    @basic-io\n    @loop\n    getpid\n\n@loop\n    @service\n\n@known\n    exit\n";

    #[test]
    fn a_units_filter_settings_are_read_as_systemd_reads_them() {
        let unit = "[Unit]\nUser=nobody\n[Service]\nUser=vigil\nSupplementaryGroups=libvirt\n\
                    CapabilityBoundingSet=CAP_SYS_PTRACE\nCapabilityBoundingSet=CAP_CHECKPOINT_RESTORE\n\
                    AmbientCapabilities=CAP_KILL\nAmbientCapabilities=\nAmbientCapabilities=CAP_SYS_PTRACE CAP_CHOWN\n\
                    SystemCallFilter=@service\nSystemCallFilter=~write getpid\nUMask=0027\nNoNewPrivileges=yes\n";
        let s = UnitSettings::parse(unit).unwrap();
        assert_eq!(
            s.user.as_deref(),
            Some("vigil"),
            "the [Unit] section's User= is not the service's"
        );
        assert_eq!(
            s.bounding,
            Some(vec!["CAP_SYS_PTRACE".into(), "CAP_CHECKPOINT_RESTORE".into()])
        );
        assert_eq!(s.ambient, ["CAP_SYS_PTRACE", "CAP_CHOWN"], "an empty assignment resets");
        assert_eq!(s.capabilities(), ["CAP_SYS_PTRACE"], "ambient is bounded");
        assert_eq!(
            s.syscall_filter,
            [vec!["@service".to_owned()], vec!["~write".into(), "~getpid".into()]]
        );
        assert_eq!(s.umask, Some(0o27));
        assert!(s.no_new_privileges);
        assert_eq!(capability_mask(&s.capabilities()).unwrap(), 1 << 19);
        assert!(UnitSettings::parse("[Service]\nCapabilityBoundingSet=~CAP_SYS_ADMIN\n").is_err());
    }

    #[test]
    fn groups_expand_and_denials_take_calls_out() {
        let groups = parse_syscall_groups(LISTING);
        assert_eq!(groups["@service"], ["@basic-io", "@loop", "getpid"]);
        let numbers: HashMap<String, i64> =
            [("exit", 60), ("mmap", 9), ("read", 0), ("write", 1), ("getpid", 39)]
                .into_iter()
                .map(|(n, nr)| (n.to_owned(), nr))
                .collect();
        let mut s = UnitSettings {
            syscall_filter: vec![
                vec!["@basic-io".into(), "nonexistent_call".into()],
                vec!["~write".into()],
            ],
            ..UnitSettings::default()
        };
        let allowed = allowed_syscalls(&s, &groups, &numbers).unwrap();
        assert_eq!(
            allowed.keys().collect::<Vec<_>>(),
            ["exit", "mmap", "read"],
            "@default always, names unknown to the architecture skipped"
        );
        s.syscall_filter = vec![vec!["@service".into()]];
        let err = allowed_syscalls(&s, &groups, &numbers).unwrap_err();
        assert!(err.contains("nests too deep"), "{err}");
        s.syscall_filter = vec![vec!["@nonexistent".into()]];
        assert!(allowed_syscalls(&s, &groups, &numbers).unwrap_err().contains("@nonexistent"));
        s.syscall_filter = vec![vec!["~@basic-io".into()]];
        assert!(
            allowed_syscalls(&s, &groups, &numbers).is_err(),
            "deny lists are refused, not misread"
        );
    }

    #[test]
    fn the_kernel_headers_number_the_calls() {
        let n = syscall_numbers(
            "#define __NR_read 0\n#define __NR_process_vm_readv 310\n#define _ASM_X86_UNISTD_64_H 1\n",
        );
        assert_eq!(n.len(), 2);
        assert_eq!(n["process_vm_readv"], 310);
    }
}
