//! The vigil test lab: transient libvirt TCG domains booting the pinned Debian
//! cloud kernel with the lab's busybox initramfs (built by `lab/setup.sh`),
//! each with a command port on its second serial line, so that a test decides
//! when an attack or a reboot happens.
//!
//! ```text
//!   test  --"<id> <command>"-->  QEMU ttyS1  -->  guest /init runs it
//!         <--output, then "VIGIL-DONE <id> <status>"--
//! ```

pub mod confine;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The libvirt URI lab domains live at.
pub const URI: &str = "qemu:///system";
/// Prefix of every lab domain's name, so stale ones can be found and removed.
pub const NAME_PREFIX: &str = "vigil-lab-";

/// Why the lab could not do what was asked.
#[derive(Debug)]
pub struct LabError(pub String);

impl std::fmt::Display for LabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LabError {}

fn err(msg: impl Into<String>) -> LabError {
    LabError(msg.into())
}

/// How a lab guest's RAM is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// A memfd with `access mode='shared'`: vigil maps it directly.
    Shared,
    /// libvirt's default private anonymous RAM: vigil reads the QEMU process.
    Private,
}

/// The kernel line a lab guest boots (both prepared by `lab/setup.sh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernel {
    /// Debian 12's 6.1, the pinned build in the lab directory itself.
    #[default]
    V6_1,
    /// The 6.12 of Debian 13 and bookworm-backports, in its `6.12`
    /// subdirectory.
    V6_12,
}

impl Kernel {
    pub const ALL: [Kernel; 2] = [Kernel::V6_1, Kernel::V6_12];

    /// The line's name, as `vigil-lab start --kernel` takes it.
    pub fn line(self) -> &'static str {
        match self {
            Kernel::V6_1 => "6.1",
            Kernel::V6_12 => "6.12",
        }
    }

    pub fn from_line(line: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.line() == line)
    }

    /// Where the line's vmlinuz, initramfs and kernel-release are.
    pub fn dir(self, lab: &Path) -> PathBuf {
        match self {
            Kernel::V6_1 => lab.to_path_buf(),
            Kernel::V6_12 => lab.join("6.12"),
        }
    }
}

/// The size and backing of a lab guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub memory: Memory,
    /// RAM in MiB; above 3 GiB QEMU splits it below and above 4 GiB.
    pub mib: u32,
    pub vcpus: u32,
    /// ACPI on, with the power button powering the guest off (its init
    /// loads the button driver): what `virsh shutdown` and `virsh reboot`
    /// ask of a guest.
    pub acpi: bool,
    pub kernel: Kernel,
    /// A QEMU CPU model (`qemu64`, `Skylake-Client`, ...) in place of the
    /// most TCG can emulate: another set of features, so other alternatives.
    pub cpu: Option<String>,
    /// Added to the kernel command line (`vigil.attack=inline,syscall` has
    /// the guest's init attack before it answers: before vigil looked).
    pub cmdline: String,
    /// Run under KVM (`<domain type='kvm'>`) rather than TCG. Nested KVM
    /// runs guest code about a thousand times slower here: such a guest does
    /// not reach init in a test's time (see [`Lab::start_booting`]), but
    /// has what only KVM has, its statistics.
    pub kvm: bool,
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            memory: Memory::Shared,
            mib: 384,
            vcpus: 1,
            acpi: false,
            kernel: Kernel::V6_1,
            cpu: None,
            cmdline: String::new(),
            kvm: false,
        }
    }
}

/// The prepared lab files.
#[derive(Debug, Clone)]
pub struct Lab {
    pub dir: PathBuf,
}

impl Lab {
    /// The lab at `$VIGIL_LAB_DIR` (default `/var/lib/vigil-lab`), checked to
    /// have been set up.
    pub fn open() -> Result<Self, LabError> {
        let dir = PathBuf::from(
            std::env::var("VIGIL_LAB_DIR").unwrap_or_else(|_| "/var/lib/vigil-lab".into()),
        );
        for k in Kernel::ALL {
            for f in ["vmlinuz", "initramfs.cpio.gz"] {
                let path = k.dir(&dir).join(f);
                if !path.is_file() {
                    return Err(err(format!(
                        "the lab is not set up: {} (kernel {}) is missing; run `lab/setup.sh --install` (as root) first",
                        path.display(),
                        k.line()
                    )));
                }
            }
        }
        let run = dir.join("run");
        std::fs::create_dir_all(&run)
            .map_err(|e| err(format!("creating {}: {e}", run.display())))?;
        // QEMU runs as libvirt-qemu and creates the command socket here.
        set_mode(&run, 0o1777)?;
        Ok(Self { dir })
    }

    fn console_path(&self, name: &str) -> PathBuf {
        self.dir.join("run").join(format!("{name}.console"))
    }

    fn socket_path(&self, name: &str) -> PathBuf {
        self.dir.join("run").join(format!("{name}.cmd"))
    }

    /// Writes a domain's XML where virsh reads it from.
    fn xml_file(&self, name: &str, xml: &str) -> Result<String, LabError> {
        let file = self.dir.join("run").join(format!("{name}.xml"));
        std::fs::write(&file, xml).map_err(|e| err(format!("writing {}: {e}", file.display())))?;
        Ok(file.to_string_lossy().into_owned())
    }

    /// The domain XML of a lab guest.
    pub fn domain_xml(&self, name: &str, memory: Memory, mib: u32) -> String {
        self.domain_xml_with(name, &Shape { memory, mib, ..Shape::default() })
    }

    /// The domain XML of a lab guest of any shape.
    pub fn domain_xml_with(&self, name: &str, shape: &Shape) -> String {
        let (memory, mib, vcpus) = (shape.memory, shape.mib, shape.vcpus);
        let features = if shape.acpi { "<features><acpi/></features>" } else { "" };
        let backing = match memory {
            Memory::Shared => {
                "<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
            }
            Memory::Private => "",
        };
        format!(
            "<domain type='{accel}'>
  <name>{name}</name>
  <memory unit='MiB'>{mib}</memory>
  <vcpu>{vcpus}</vcpu>
  {backing}
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet {extra}</cmdline>
  </os>
  {features}
  {cpu}
  <on_reboot>restart</on_reboot>
  <devices>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{socket}'/><target port='1'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>",
            accel = if shape.kvm { "kvm" } else { "qemu" },
            extra = shape.cmdline,
            cpu = match &shape.cpu {
                None => "<cpu mode='maximum'/>".to_owned(),
                Some(model) => format!(
                    "<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>{model}</model></cpu>"
                ),
            },
            kernel = shape.kernel.dir(&self.dir).join("vmlinuz").display(),
            initrd = shape.kernel.dir(&self.dir).join("initramfs.cpio.gz").display(),
            console = self.console_path(name).display(),
            socket = self.socket_path(name).display(),
        )
    }

    /// Starts a transient guest named `vigil-lab-<suffix>` and waits until its
    /// init answers on the command port. A stale guest of that name is
    /// destroyed first.
    pub fn start(&self, suffix: &str, memory: Memory) -> Result<Guest, LabError> {
        self.start_with(suffix, &Shape { memory, ..Shape::default() })
    }

    /// Like [`Lab::start`], for a guest of any shape.
    pub fn start_with(&self, suffix: &str, shape: &Shape) -> Result<Guest, LabError> {
        let mut guest = self.start_booting(suffix, shape)?;
        guest.wait_ready(Duration::from_secs(120))?;
        Ok(guest)
    }

    /// Starts a guest of `shape` and returns at once, its kernel still
    /// booting (a KVM guest's, for one, does not reach init in a test's time
    /// on these nested machines). It has no command port until it does.
    pub fn start_booting(&self, suffix: &str, shape: &Shape) -> Result<Guest, LabError> {
        let name = format!("{NAME_PREFIX}{suffix}");
        let lock = self.lock_shared()?;
        remove_stale(&name)?;
        let _ = std::fs::remove_file(self.console_path(&name));
        let file = self.xml_file(&name, &self.domain_xml_with(&name, shape))?;
        virsh(URI, &["create", &file])
            .map_err(|e| err(format!("starting lab domain {name}: {e}")))?;
        let uuid = virsh(URI, &["domuuid", &name]).unwrap_or_default().trim().to_owned();
        Ok(Guest {
            socket: self.socket_path(&name),
            console: self.console_path(&name),
            name,
            uuid,
            uri: Some(URI.to_owned()),
            port: None,
            next_id: first_id(),
            _lock: lock,
        })
    }

    /// Creates a guest paused before its first instruction: its vCPU is still
    /// in real mode and no kernel has run.
    pub fn start_paused(&self, suffix: &str) -> Result<Guest, LabError> {
        let name = format!("{NAME_PREFIX}{suffix}");
        remove_stale(&name)?;
        let xml = self.domain_xml(&name, Memory::Shared, 384);
        let file = self.xml_file(&name, &xml)?;
        virsh(URI, &["create", &file, "--paused"])
            .map_err(|e| err(format!("starting lab domain {name} paused: {e}")))?;
        let uuid = virsh(URI, &["domuuid", &name]).unwrap_or_default().trim().to_owned();
        Ok(Guest {
            socket: self.socket_path(&name),
            console: self.console_path(&name),
            name,
            uuid,
            uri: Some(URI.to_owned()),
            port: None,
            next_id: first_id(),
            _lock: None,
        })
    }

    /// Defines (without starting) a persistent guest, undefined again when
    /// the returned handle is dropped: a domain that exists but is not running.
    pub fn define(&self, suffix: &str, memory: Memory) -> Result<Defined, LabError> {
        let name = format!("{NAME_PREFIX}{suffix}");
        remove_stale(&name)?;
        let file = self.xml_file(&name, &self.domain_xml(&name, memory, 384))?;
        virsh(URI, &["define", &file])
            .map_err(|e| err(format!("defining lab domain {name}: {e}")))?;
        Ok(Defined { name })
    }

    /// Attaches to a running lab guest started earlier (by `vigil-lab start`).
    pub fn attach(&self, suffix: &str) -> Result<Guest, LabError> {
        let name = format!("{NAME_PREFIX}{suffix}");
        let mut g = Guest {
            socket: self.socket_path(&name),
            console: self.console_path(&name),
            name,
            uuid: String::new(),
            uri: None,
            port: None,
            next_id: first_id(),
            _lock: None,
        };
        g.connect(Duration::from_secs(10))?;
        Ok(g)
    }
}

/// Runs `virsh -c uri ARGS` (libvirt-clients); its output, or what it said
/// on failure. The lab drives libvirt through virsh, as an operator would,
/// so that it needs no libvirt library of its own.
pub fn virsh(uri: &str, args: &[&str]) -> Result<String, LabError> {
    let out = std::process::Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| err(format!("virsh (install libvirt-clients): {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether libvirt at `uri` has a domain named `name`, running or not.
fn exists(uri: &str, name: &str) -> Result<bool, LabError> {
    let names = virsh(uri, &["list", "--all", "--name"]).map_err(|e| {
        err(format!(
            "cannot connect to libvirt at {uri}: {e} (is libvirtd running? `lab/services.sh` starts it)"
        ))
    })?;
    Ok(names.lines().any(|l| l.trim() == name))
}

/// Removes a lab domain of that name left over from an earlier run
/// (destroyed, and undefined if it was persistent).
fn remove_stale(name: &str) -> Result<(), LabError> {
    if exists(URI, name)? {
        let _ = virsh(URI, &["destroy", name]);
        let _ = virsh(URI, &["undefine", name]);
    }
    Ok(())
}

/// Set while this process holds the lab's exclusive lock.
static EXCLUSIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A lock on the lab: every guest holds it shared; a test that disturbs
/// libvirt itself (restarting libvirtd) holds it exclusive, so that it runs
/// alone whatever the test runner's parallelism.
pub struct LabLock {
    _file: std::fs::File,
    exclusive: bool,
}

impl Drop for LabLock {
    fn drop(&mut self) {
        if self.exclusive {
            EXCLUSIVE.store(false, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Lab {
    fn lock_file(&self) -> Result<std::fs::File, LabError> {
        let path = self.dir.join("run").join("lab.lock");
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| err(format!("opening {}: {e}", path.display())))
    }

    /// Waits until no other lab test runs, and keeps them out until dropped.
    pub fn lock_exclusive(&self) -> Result<LabLock, LabError> {
        let f = self.lock_file()?;
        f.lock().map_err(|e| err(format!("locking the lab: {e}")))?;
        EXCLUSIVE.store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(LabLock { _file: f, exclusive: true })
    }

    fn lock_shared(&self) -> Result<Option<LabLock>, LabError> {
        if EXCLUSIVE.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(None); // this process already holds it exclusively
        }
        let f = self.lock_file()?;
        f.lock_shared().map_err(|e| err(format!("locking the lab: {e}")))?;
        Ok(Some(LabLock { _file: f, exclusive: false }))
    }
}

/// Command ids start from the clock, so that answers meant for an earlier
/// process on the same port are never taken for this one's.
fn first_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(1))
        .unwrap_or(1)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), LabError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err(format!("chmod {}: {e}", path.display())))
}

/// A running lab guest. Dropping it destroys the domain, unless it was kept.
pub struct Guest {
    pub name: String,
    pub uuid: String,
    /// The libvirt its domain runs at, while this handle owns it (destroyed
    /// on drop).
    uri: Option<String>,
    socket: PathBuf,
    console: PathBuf,
    port: Option<BufReader<UnixStream>>,
    next_id: u64,
    /// Held while the domain runs (see [`LabLock`]); dropped after it.
    _lock: Option<LabLock>,
}

impl Guest {
    fn connect(&mut self, timeout: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_millis(500)))
                        .map_err(|e| err(e.to_string()))?;
                    self.port = Some(BufReader::new(s));
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(err(format!(
                        "{}: command port {} never opened: {e}",
                        self.name,
                        self.socket.display()
                    )));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Waits until init answers a ping on the command port.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        if self.port.is_none() {
            self.connect(timeout)?;
        }
        while Instant::now() < deadline {
            if let Ok((0, out)) = self.exec_with_timeout("echo VIGIL-PONG", Duration::from_secs(2))
                && out.contains("VIGIL-PONG")
            {
                return Ok(());
            }
        }
        Err(err(format!(
            "{}: guest init never answered; console says:\n{}",
            self.name,
            self.console_tail()
        )))
    }

    /// The last lines the guest printed on its console.
    pub fn console_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Runs a shell command line in the guest; returns its exit status and output.
    pub fn exec(&mut self, line: &str) -> Result<(i32, String), LabError> {
        self.exec_with_timeout(line, Duration::from_secs(60))
    }

    fn exec_with_timeout(
        &mut self,
        line: &str,
        timeout: Duration,
    ) -> Result<(i32, String), LabError> {
        let name = self.name.clone();
        let id = self.next_id;
        self.next_id += 1;
        let port = self.port.as_mut().ok_or_else(|| err(format!("{name}: not connected")))?;
        // Drop anything left over (a late answer to an earlier ping).
        let mut junk = String::new();
        port.get_mut().set_nonblocking(true).map_err(|e| err(e.to_string()))?;
        while port.read_line(&mut junk).map(|n| n > 0).unwrap_or(false) {}
        port.get_mut().set_nonblocking(false).map_err(|e| err(e.to_string()))?;
        port.get_mut()
            .write_all(format!("{id} {line}\n").as_bytes())
            .map_err(|e| err(format!("{name}: writing command: {e}")))?;
        let deadline = Instant::now() + timeout;
        let mut out = String::new();
        let mut cur = String::new();
        loop {
            match port.read_line(&mut cur) {
                Ok(0) => return Err(err(format!("{name}: command port closed"))),
                Ok(_) => {
                    if !cur.ends_with('\n') {
                        continue;
                    }
                    if let Some(rest) = cur.trim_end().strip_prefix("VIGIL-DONE ") {
                        let mut f = rest.split_whitespace();
                        let done_id: Option<u64> = f.next().and_then(|v| v.parse().ok());
                        let status: Option<i32> = f.next().and_then(|v| v.parse().ok());
                        match (done_id, status) {
                            (Some(d), Some(status)) if d == id => return Ok((status, out)),
                            // A late answer to an earlier command: forget its output.
                            _ => out.clear(),
                        }
                        cur.clear();
                        continue;
                    }
                    out.push_str(&cur);
                    cur.clear();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() > deadline {
                        return Err(err(format!(
                            "{name}: no answer to {line:?} within {timeout:?} (output so far: {out:?})"
                        )));
                    }
                }
                Err(e) => return Err(err(format!("{name}: reading command port: {e}"))),
            }
        }
    }

    /// Runs a command that must succeed.
    pub fn run(&mut self, line: &str) -> Result<String, LabError> {
        match self.exec(line)? {
            (0, out) => Ok(out),
            (status, out) => Err(err(format!("{}: `{line}` exited {status}: {out}", self.name))),
        }
    }

    /// The address of a kernel symbol, from the guest's /proc/kallsyms.
    pub fn symbol(&mut self, name: &str) -> Result<u64, LabError> {
        let out = self.run(&format!("grep ' {name}$' /proc/kallsyms | head -n 1"))?;
        let hex = out
            .split_whitespace()
            .next()
            .ok_or_else(|| err(format!("{}: no symbol {name}", self.name)))?;
        u64::from_str_radix(hex, 16)
            .map_err(|_| err(format!("{}: bad kallsyms line {out:?}", self.name)))
    }

    /// Reboots the guest from inside (a new boot, with a new KASLR slide) and
    /// waits until init answers again.
    pub fn reboot(&mut self) -> Result<(), LabError> {
        let before = self.run("cat /proc/sys/kernel/random/boot_id")?;
        let id = self.next_id;
        self.next_id += 1;
        let port = self.port.as_mut().ok_or_else(|| err("not connected"))?;
        port.get_mut()
            .write_all(format!("{id} reboot -f\n").as_bytes())
            .map_err(|e| err(e.to_string()))?;
        std::thread::sleep(Duration::from_secs(2));
        self.wait_ready(Duration::from_secs(120))?;
        let after = self.run("cat /proc/sys/kernel/random/boot_id")?;
        if before == after {
            return Err(err(format!(
                "{}: still the same boot ({}) after reboot -f",
                self.name,
                before.trim()
            )));
        }
        Ok(())
    }

    /// Resets the guest through libvirt, as `virsh reset` does (a reset
    /// button: no guest involvement), and waits until init answers again in
    /// a new boot.
    pub fn reset(&mut self) -> Result<(), LabError> {
        self.restart_from_host("reset")
    }

    /// Destroys the domain and starts it again from the same definition,
    /// UUID included: a new QEMU process runs the same domain, as after a
    /// shutdown and start. Waits until init answers.
    pub fn restart_process(&mut self) -> Result<(), LabError> {
        let uri = self.owned_uri()?;
        let xml = virsh(&uri, &["dumpxml", "--inactive", &self.name])
            .map_err(|e| err(format!("{}: its definition: {e}", self.name)))?;
        virsh(&uri, &["destroy", &self.name])
            .map_err(|e| err(format!("{}: destroy: {e}", self.name)))?;
        self.port = None;
        let file = self.write_beside(&xml, "xml")?;
        virsh(&uri, &["create", &file])
            .map_err(|e| err(format!("starting {} again: {e}", self.name)))?;
        self.wait_ready(Duration::from_secs(120))
    }

    /// Saves the guest to a file and restores it (`virsh save`, `virsh
    /// restore`): a new QEMU process, started with `-incoming`, takes the
    /// guest's memory back. Waits until init answers again, in the same boot.
    pub fn save_and_restore(&mut self) -> Result<(), LabError> {
        let uri = self.owned_uri()?;
        let file = self.socket.with_extension("save");
        let path = file.to_string_lossy().into_owned();
        let _ = std::fs::remove_file(&file);
        virsh(&uri, &["save", &self.name, &path])?;
        self.port = None;
        let restored = virsh(&uri, &["restore", &path]);
        let _ = std::fs::remove_file(&file);
        restored?;
        self.wait_ready(Duration::from_secs(120))
    }

    /// The libvirt this handle's domain runs at.
    fn owned_uri(&self) -> Result<String, LabError> {
        self.uri.clone().ok_or_else(|| err(format!("{}: no domain handle", self.name)))
    }

    /// Writes `text` to a file beside the command port, with extension `ext`.
    fn write_beside(&self, text: &str, ext: &str) -> Result<String, LabError> {
        let file = self.socket.with_extension(ext);
        std::fs::write(&file, text).map_err(|e| err(format!("writing {}: {e}", file.display())))?;
        Ok(file.to_string_lossy().into_owned())
    }

    fn restart_from_host(&mut self, how: &str) -> Result<(), LabError> {
        let what = format!("virsh {how}");
        let before = self.run("cat /proc/sys/kernel/random/boot_id")?;
        let uri = self.owned_uri()?;
        let mut args = vec![how, self.name.as_str()];
        if how == "reboot" {
            args.extend(["--mode", "acpi"]);
        }
        virsh(&uri, &args).map_err(|e| err(format!("{}: {what}: {e}", self.name)))?;
        // The old boot may answer a while yet (a power button is handled by
        // the guest in its own time): wait for another boot to answer.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            std::thread::sleep(Duration::from_secs(1));
            self.wait_ready(Duration::from_secs(120))?;
            if self.run("cat /proc/sys/kernel/random/boot_id")? != before {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "{}: still the same boot ({}) two minutes after {what}",
                    self.name,
                    before.trim()
                )));
            }
        }
    }

    /// Reboots the guest through libvirt, as `virsh reboot` does: libvirt
    /// presses the ACPI power button, the guest powers off, and libvirt
    /// resets it instead of letting QEMU end. Needs a guest of an ACPI
    /// [`Shape`]. Waits until init answers again in a new boot.
    pub fn reboot_by_libvirt(&mut self) -> Result<(), LabError> {
        self.restart_from_host("reboot")
    }

    /// Migrates the guest live to the libvirt at `uri` (another host, or
    /// the lab's second libvirtd: `lab/second-libvirtd.sh`), the migration
    /// stream over the loopback, and follows it there. The command port
    /// moves to a socket of its own: the old QEMU removes its socket's path
    /// as it exits, after the new one has bound it.
    pub fn migrate(&mut self, uri: &str) -> Result<(), LabError> {
        let from = self.owned_uri()?;
        let xml = virsh(&from, &["dumpxml", "--migratable", &self.name])
            .map_err(|e| err(format!("{}: its XML: {e}", self.name)))?;
        let old = self.socket.display().to_string();
        let moved = PathBuf::from(format!("{old}.migrated{}", self.next_id));
        if !xml.contains(&format!("'{old}'")) {
            return Err(err(format!("{}: its XML names no command port {old}", self.name)));
        }
        let xml = xml.replace(&format!("'{old}'"), &format!("'{}'", moved.display()));
        let file = self.write_beside(&xml, "migrate.xml")?;
        virsh(
            &from,
            &[
                "migrate",
                "--live",
                &self.name,
                uri,
                "--migrateuri",
                "tcp://127.0.0.1",
                "--xml",
                &file,
            ],
        )
        .map_err(|e| err(format!("migrating {} to {uri}: {e}", self.name)))?;
        self.uri = Some(uri.to_owned());
        self.socket = moved;
        self.port = None;
        self.next_id += 1;
        self.connect(Duration::from_secs(30))
    }

    /// Leaves the domain running when this handle is dropped.
    pub fn keep(mut self) {
        self.uri = None;
    }

    /// Destroys the domain now.
    pub fn destroy(mut self) {
        self.destroy_now();
    }

    fn destroy_now(&mut self) {
        if let Some(uri) = self.uri.take() {
            let _ = virsh(&uri, &["destroy", &self.name]);
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.destroy_now();
    }
}

/// A defined, stopped lab domain; undefined on drop.
pub struct Defined {
    pub name: String,
}

impl Drop for Defined {
    fn drop(&mut self) {
        let _ = virsh(URI, &["destroy", &self.name]);
        let _ = virsh(URI, &["undefine", &self.name]);
    }
}

/// Destroys a lab domain by suffix, if it runs.
pub fn destroy(suffix: &str) -> Result<bool, LabError> {
    let name = format!("{NAME_PREFIX}{suffix}");
    if !exists(URI, &name)? {
        return Ok(false);
    }
    virsh(URI, &["destroy", &name]).map(|_| true)
}
