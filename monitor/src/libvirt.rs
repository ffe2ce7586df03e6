//! libvirt at the outer edge: finding domains, talking to their QEMU monitor
//! through libvirt's passthrough, and opening their memory.
//!
//! Everything QEMU says is parsed by `qemu`; this module only asks.

use crate::sys::virt::{self as sys, Connection, Dom, VirError};

use crate::integrity::baseline::Run;
use crate::memory::{BlockMapping, GuestMemory, ProcessRam, RamLayout, SharedRam};
use crate::qemu::{self, ParseError};
use crate::x86::VcpuRegisters;

/// Why libvirt could not give what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("libvirt cannot be used")]
    Unavailable {
        #[source]
        source: VirError,
    },
    #[error("cannot connect to libvirt at {uri} (is libvirtd running, and are you root?)")]
    Connect {
        uri: String,
        #[source]
        source: VirError,
    },
    #[error("listing domains at {uri}")]
    List {
        uri: String,
        #[source]
        source: VirError,
    },
    #[error("asking libvirt at {uri} for domains' statistics")]
    Stats {
        uri: String,
        #[source]
        source: VirError,
    },
    #[error("registering for domain events at {uri}: {reason}")]
    Events { uri: String, reason: String },
    #[error("no domain named or with UUID {0:?}")]
    NoDomain(String),
    #[error("looking up domain {id:?} at {uri}")]
    Lookup {
        uri: String,
        id: String,
        #[source]
        source: VirError,
    },
    #[error("domain {domain} is not running (it is {state})")]
    NotRunning { domain: String, state: String },
    #[error("domain {domain}: QEMU monitor command {command:?} failed")]
    Monitor {
        domain: String,
        command: String,
        #[source]
        source: VirError,
    },
    #[error("domain {domain}: unexpected reply to {command:?}")]
    Parse {
        domain: String,
        command: String,
        #[source]
        source: ParseError,
    },
    #[error("domain {domain}: memory not readable: {reason}")]
    Memory { domain: String, reason: String },
}

pub use crate::sys::DomainEvent;

/// Which memory source to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceChoice {
    /// Shared mapping when the RAM is shared, otherwise process reads.
    Auto,
    Shared,
    Process,
}

/// A connection to libvirt.
pub struct Hypervisor {
    conn: Connection,
    uri: String,
}

/// One line of `vigil domains`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DomainSummary {
    pub name: String,
    pub uuid: String,
    pub state: String,
    /// `shared-mapping`, `process-read`, or why neither applies.
    pub memory_source: String,
}

impl Hypervisor {
    pub fn connect(uri: &str) -> Result<Self, LibvirtError> {
        // Errors are returned and reported once; keep libvirt from printing them too.
        sys::quiet_errors();
        let conn = Connection::open(uri).map_err(|source| match source.code {
            sys::ERR_NOT_LOADED => LibvirtError::Unavailable { source },
            _ => LibvirtError::Connect { uri: uri.into(), source },
        })?;
        Ok(Self { conn, uri: uri.into() })
    }

    /// Connects for a long-running process: libvirt's default event loop
    /// runs on a thread of its own, domain lifecycle and reboot events go to
    /// `events`, and keepalives notice a libvirtd that went away.
    pub fn connect_with_events(
        uri: &str,
        events: tokio::sync::mpsc::UnboundedSender<DomainEvent>,
    ) -> Result<Self, LibvirtError> {
        static EVENT_LOOP: std::sync::Once = std::sync::Once::new();
        EVENT_LOOP.call_once(|| {
            if sys::event_register_default_impl().is_ok() {
                std::thread::Builder::new()
                    .name("libvirt-events".into())
                    .spawn(|| {
                        loop {
                            if sys::event_run_default_impl().is_err() {
                                std::thread::sleep(std::time::Duration::from_millis(100));
                            }
                        }
                    })
                    .expect("spawning the libvirt event thread");
            }
        });
        let hv = Self::connect(uri)?;
        let _ = hv.conn.set_keep_alive(5, 3);
        crate::sys::register_domain_events(&hv.conn, events)
            .map_err(|reason| LibvirtError::Events { uri: uri.into(), reason })?;
        Ok(hv)
    }

    /// Whether the connection still works.
    pub fn is_alive(&self) -> bool {
        self.conn.is_alive()
    }

    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Every domain libvirt knows, running or not.
    pub fn domains(&self) -> Result<Vec<DomainSummary>, LibvirtError> {
        let mut out = Vec::new();
        for g in self.list(0)? {
            let state = g.state_text();
            let memory_source = if g.is_running() {
                match g.memory_blocks().and_then(|(pid, _, blocks)| {
                    SharedRam::available(pid, &blocks).map_err(|e| g.memory_error(e.to_string()))
                }) {
                    Ok(true) => "shared-mapping".into(),
                    Ok(false) => "process-read".into(),
                    Err(e) => format!("unavailable: {e}"),
                }
            } else {
                "-".into()
            };
            out.push(DomainSummary {
                name: g.name.clone(),
                uuid: g.uuid.clone(),
                state,
                memory_source,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn list(&self, flags: u32) -> Result<Vec<GuestDomain>, LibvirtError> {
        let doms = self
            .conn
            .list_all_domains(flags)
            .map_err(|source| LibvirtError::List { uri: self.uri.clone(), source })?;
        Ok(doms.into_iter().map(GuestDomain::new).collect())
    }

    /// The running (or paused) domains, as (UUID, name): one libvirt call, no
    /// QEMU monitor traffic, for the daemon's periodic resync.
    pub fn active_domains(&self) -> Result<Vec<(String, String)>, LibvirtError> {
        Ok(self
            .list(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)?
            .into_iter()
            .map(|g| (g.uuid, g.name))
            .collect())
    }

    /// KVM's statistics of the running domains among `uuids`, as (UUID,
    /// name, them): a listing and one statistics call, in which libvirt asks
    /// each of their QEMUs (`query-stats`); a QEMU busy with another job is
    /// not waited for, and its domain's are then empty this time. A TCG
    /// domain's are always empty. Other domains' QEMUs are not asked.
    pub fn kvm_stats(
        &self,
        uuids: &std::collections::HashSet<String>,
    ) -> Result<Vec<(String, String, crate::kvm::KvmStats)>, LibvirtError> {
        let doms = self
            .conn
            .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            .map_err(|source| LibvirtError::List { uri: self.uri.clone(), source })?;
        let asked: Vec<&Dom> = doms.iter().filter(|d| uuids.contains(&d.ids().0)).collect();
        let stats = sys::domain_list_stats(
            &asked,
            sys::VIR_DOMAIN_STATS_VCPU | sys::VIR_DOMAIN_STATS_VM,
            sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT,
        )
        .map_err(|source| LibvirtError::Stats { uri: self.uri.clone(), source })?;
        Ok(stats
            .iter()
            .map(|d| (d.uuid.clone(), d.name.clone(), crate::kvm::from_domain_stats(d)))
            .collect())
    }

    /// A domain by name or UUID.
    pub fn domain(&self, id: &str) -> Result<GuestDomain, LibvirtError> {
        // Only libvirt's "no such domain" (and, by UUID, "not a UUID") is
        // that; a connection that failed meanwhile is said as such, not as
        // a domain gone.
        let by_name = match self.conn.lookup_by_name(id) {
            Ok(d) => return Ok(GuestDomain::new(d)),
            Err(e) => e,
        };
        match self.conn.lookup_by_uuid_string(id) {
            Ok(d) => Ok(GuestDomain::new(d)),
            Err(by_uuid) => {
                let absent = |code| code == sys::ERR_NO_DOMAIN || code == sys::ERR_ARGUMENT;
                if absent(by_name.code)
                    && (absent(by_uuid.code) || by_uuid.code == sys::ERR_INVALID_ARG)
                {
                    Err(LibvirtError::NoDomain(id.into()))
                } else {
                    Err(LibvirtError::Lookup {
                        uri: self.uri.clone(),
                        id: id.into(),
                        source: by_name,
                    })
                }
            }
        }
    }
}

/// A libvirt domain and what vigil asks of it.
pub struct GuestDomain {
    dom: Dom,
    pub name: String,
    pub uuid: String,
}

impl GuestDomain {
    fn new(dom: Dom) -> Self {
        let (uuid, name) = dom.ids();
        let known = |s: String| if s.is_empty() { "?".to_owned() } else { s };
        Self { dom, name: known(name), uuid: known(uuid) }
    }

    pub fn state_text(&self) -> String {
        match self.dom.state().map(|(state, _)| state) {
            Ok(sys::VIR_DOMAIN_RUNNING) => "running",
            Ok(sys::VIR_DOMAIN_BLOCKED) => "blocked",
            Ok(sys::VIR_DOMAIN_PAUSED) => "paused",
            Ok(sys::VIR_DOMAIN_SHUTDOWN) => "shutting down",
            Ok(sys::VIR_DOMAIN_SHUTOFF) => "shut off",
            Ok(sys::VIR_DOMAIN_CRASHED) => "crashed",
            Ok(sys::VIR_DOMAIN_PMSUSPENDED) => "suspended",
            Ok(sys::VIR_DOMAIN_NOSTATE) => "in no state",
            Ok(_) | Err(_) => "in an unknown state",
        }
        .into()
    }

    /// Running or paused: QEMU is there and its memory can be read.
    pub fn is_running(&self) -> bool {
        self.dom.is_active().unwrap_or(false)
    }

    /// `Ok` when the domain runs; `NotRunning` only when libvirt says it
    /// does not (a failing connection is another error).
    pub fn ensure_running(&self) -> Result<(), LibvirtError> {
        match self.dom.is_active() {
            Ok(true) => Ok(()),
            Ok(false) => Err(LibvirtError::NotRunning {
                domain: self.name.clone(),
                state: self.state_text(),
            }),
            Err(source) => Err(self.call_error("is-active", source)),
        }
    }

    /// A failed call on the domain. A transient domain saved or destroyed
    /// under the call is gone, not broken (libvirt's VIR_ERR_NO_DOMAIN): the
    /// daemon then retires it without an error event.
    fn call_error(&self, command: &str, source: VirError) -> LibvirtError {
        if source.code == sys::ERR_NO_DOMAIN {
            return LibvirtError::NoDomain(self.name.clone());
        }
        LibvirtError::Monitor { domain: self.name.clone(), command: command.into(), source }
    }

    fn monitor(&self, command: &str, hmp: bool) -> Result<String, LibvirtError> {
        let flags = if hmp { sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP } else { 0 };
        self.dom
            .qemu_monitor_command(command, flags)
            .map_err(|source| self.call_error(command, source))
    }

    fn parse<T>(&self, command: &str, r: Result<T, ParseError>) -> Result<T, LibvirtError> {
        r.map_err(|source| LibvirtError::Parse {
            domain: self.name.clone(),
            command: command.into(),
            source,
        })
    }

    fn memory_error(&self, reason: String) -> LibvirtError {
        LibvirtError::Memory { domain: self.name.clone(), reason }
    }

    /// Control and descriptor-table registers of every vCPU.
    pub fn registers(&self) -> Result<Vec<VcpuRegisters>, LibvirtError> {
        let cmd = "info registers -a";
        let text = self.monitor(cmd, true)?;
        self.parse(cmd, qemu::parse_registers(&text))
    }

    /// The QEMU process, found through its vCPU threads as libvirt reports them.
    pub fn qemu_pid(&self) -> Result<i32, LibvirtError> {
        let cmd = r#"{"execute":"query-cpus-fast"}"#;
        let reply = self.monitor(cmd, false)?;
        let tids = self.parse(cmd, qemu::parse_query_cpus_thread_ids(&reply))?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", tids[0])).map_err(|e| {
            self.memory_error(format!(
                "vCPU thread {} of QEMU is not visible in /proc: {e}",
                tids[0]
            ))
        })?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| self.memory_error(format!("no Tgid in /proc/{}/status", tids[0])))
    }

    /// The run of the guest as this host knows it: its QEMU process, with
    /// that process's start time and the host's boot. Asked of QEMU and the
    /// host's `/proc`, nothing of the guest's.
    pub fn run(&self) -> Result<Run, LibvirtError> {
        let pid = self.qemu_pid()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| {
            self.memory_error(format!("QEMU process {pid} is not visible in /proc: {e}"))
        })?;
        let started = process_start_ticks(&stat).ok_or_else(|| {
            self.memory_error(format!("/proc/{pid}/stat has no start time: {stat:?}"))
        })?;
        let host_booted = host_booted()
            .ok_or_else(|| self.memory_error("the host's clocks cannot be read".into()))?;
        let ticks_per_second = crate::sys::clock_ticks()
            .ok_or_else(|| self.memory_error("the host's clock tick rate is unknown".into()))?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map_err(|e| self.memory_error(format!("QEMU process {pid}'s command line: {e}")))?;
        let incoming = cmdline.split(|&b| b == 0).any(|arg| arg == b"-incoming");
        Ok(Run { host_booted, pid, started, incoming, ticks_per_second })
    }

    /// The RAM layout and where each RAM block is in the QEMU process.
    pub fn memory_blocks(&self) -> Result<(i32, RamLayout, Vec<BlockMapping>), LibvirtError> {
        let pid = self.qemu_pid()?;
        let blocks_cmd = "info ramblock";
        let text = self.monitor(blocks_cmd, true)?;
        let blocks = self.parse(blocks_cmd, qemu::parse_ramblocks(&text))?;
        let mtree_cmd = "info mtree -f";
        let text = self.monitor(mtree_cmd, true)?;
        let ranges = self.parse(mtree_cmd, qemu::parse_mtree_ram(&text, &blocks))?;
        let layout =
            RamLayout::new(ranges).map_err(|e| self.memory_error(format!("RAM layout: {e}")))?;
        let mut mappings = Vec::new();
        for b in &blocks {
            let Some(range) = layout.ranges().iter().find(|r| r.block == b.name) else {
                continue;
            };
            let cmd = format!("gpa2hva {:#x}", range.start.raw());
            let reply = self.monitor(&cmd, true)?;
            let (name, hva) = self.parse(&cmd, qemu::parse_gpa2hva(&reply))?;
            if name != b.name {
                return Err(self.memory_error(format!(
                    "{cmd} names block {name:?}, the layout says {:?}",
                    b.name
                )));
            }
            let base = hva.checked_sub(range.block_offset).ok_or_else(|| {
                self.memory_error(format!("block {:?} would start below address 0", b.name))
            })?;
            mappings.push(BlockMapping { name: b.name.clone(), host_addr: base, len: b.used });
        }
        Ok((pid, layout, mappings))
    }

    /// The guest's memory size in bytes, as libvirt reports it.
    pub fn memory_bytes(&self) -> Result<u64, LibvirtError> {
        let kib = self.dom.max_memory_kib().map_err(|source| self.call_error("dominfo", source))?;
        Ok(kib.saturating_mul(1024))
    }

    /// Writes the guest's memory to `path` as an ELF core, as `virsh dump
    /// --memory-only` does. QEMU pauses the guest while it writes.
    pub fn dump_memory(&self, path: &std::path::Path) -> Result<(), LibvirtError> {
        let to = path.to_str().ok_or_else(|| {
            self.memory_error(format!("dump path {} is not UTF-8", path.display()))
        })?;
        self.dom
            .core_dump_with_format(
                to,
                sys::VIR_DOMAIN_CORE_DUMP_FORMAT_RAW,
                sys::VIR_DUMP_MEMORY_ONLY,
            )
            .map_err(|source| self.call_error("dump --memory-only", source))
    }

    /// Opens the guest's memory with the source `choice` asks for.
    pub fn open_memory(
        &self,
        choice: SourceChoice,
    ) -> Result<Box<dyn GuestMemory + Send + Sync>, LibvirtError> {
        self.ensure_running()?;
        let (pid, layout, blocks) = self.memory_blocks()?;
        let used: Vec<BlockMapping> = blocks
            .into_iter()
            .filter(|b| layout.ranges().iter().any(|r| r.block == b.name))
            .collect();
        let shared = match choice {
            SourceChoice::Process => false,
            SourceChoice::Shared => true,
            SourceChoice::Auto => {
                SharedRam::available(pid, &used).map_err(|e| self.memory_error(e.to_string()))?
            }
        };
        if shared {
            let ram = SharedRam::open(pid, layout, &used)
                .map_err(|e| self.memory_error(error_chain(&e)))?;
            Ok(Box::new(ram))
        } else {
            let ram = ProcessRam::new(pid, layout, used).map_err(|e| self.memory_error(e))?;
            Ok(Box::new(ram))
        }
    }
}

/// When the host booted, in seconds of the Unix epoch: the wall clock less
/// the time since boot.
pub fn host_booted() -> Option<u64> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(now.checked_sub(crate::sys::since_boot()?)?.as_secs())
}

/// How long ago `run`'s process started, by this host's clocks; `None` for
/// another host boot's.
pub fn run_age(run: &Run) -> Option<std::time::Duration> {
    let mut now = run.clone();
    now.host_booted = host_booted()?;
    if !now.same_as(run) {
        return None;
    }
    let started = std::time::Duration::from_millis(
        run.started.checked_mul(1000)? / run.ticks_per_second.max(1),
    );
    crate::sys::since_boot()?.checked_sub(started)
}

/// A process's start time, in clock ticks after the host's boot: field 22 of
/// `/proc/PID/stat`, counted after the command name's closing parenthesis
/// (the name itself may hold spaces and parentheses).
pub fn process_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::process_start_ticks;

    #[test]
    fn a_process_start_time_is_read_past_an_awkward_name() {
        let tail = "S 1 2 3 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 1000 10";
        assert_eq!(process_start_ticks(&format!("4242 (qemu-system-x86) {tail}")), Some(987654));
        assert_eq!(process_start_ticks(&format!("4242 (a ) b (c) {tail}")), Some(987654));
        assert_eq!(process_start_ticks("4242 (qemu) S 1 2"), None);
        assert_eq!(process_start_ticks("no parenthesis"), None);
    }
}
