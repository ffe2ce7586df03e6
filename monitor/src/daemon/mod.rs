//! `vigil daemon`: follows libvirt's domains, checks each running guest's
//! kernel on a schedule inside a host-wide CPU budget, and reports through
//! the alert log (and stdout, for the journal), Prometheus metrics, an
//! optional Alertmanager and webhook, and a control socket.
//!
//! ```text
//!  libvirt events ─┐                 ┌─> domain task ─(blocking pool)─> Watched::check
//!  resync (5 s) ───┼─> main loop ────┼─> domain task ...
//!  signals ────────┘     │           └─> ...
//!                        └─ control socket      every task ─> Sink ─> alert log (fsync)
//!                                                               ├─> stdout
//!                                                               ├─> metrics
//!                                                               └─> push queues
//! ```

/// `eprintln!` that cannot panic: a stderr that will not take the line (a
/// full disk, journald gone) is no reason for a task of the daemon to die.
macro_rules! warn_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that cannot panic, for alert lines on stdout (the journal).
macro_rules! out_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod accept;
pub mod alerts;
pub mod budget;
pub mod config;
pub mod control;
pub mod evidence;
pub mod metrics;
pub mod push;

mod report;
mod sink;
mod task;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch as tokio_watch};

use self::alerts::{Alert, AlertLog, AlertSeverity, EventKind, Reported, Subject};
use self::budget::Budget;
use self::config::Settings;
use self::metrics::{
    CheckLabels, DomainLabels, HookLabels, KindLabels, Metrics, PatchLabels, RegionLabels,
    ScopeLabels, ViolationLabels,
};
use crate::integrity::check::Scope;
use crate::libvirt::{DomainEvent, Hypervisor, error_chain};
use crate::linux::region::Region;
use crate::watch::{AttachSettings, Attached, Knowledge, WatchError, Watched};

use self::report::*;
pub use self::sink::{Emitted, Sink};
use self::task::*;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    AlertLog(#[from] alerts::AlertLogError),
    #[error("cannot listen for metrics on {addr}")]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    #[error(
        "another vigil daemon ({holder}) holds the state directory {path}: one daemon per state directory (stop it, or give this one its own --state-dir)"
    )]
    Locked { path: String, holder: String },
    #[error("cannot lock the state directory through {path}")]
    Lock {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The file whose lock the daemon holds while it runs, in its state
/// directory: the alert log, cursors and control socket are one daemon's.
pub const LOCK_FILE: &str = "daemon.lock";

/// Takes the state directory's lock, and writes this process's id into the
/// lock file for the next one to name. The lock lasts as long as the file.
pub fn lock_state_dir(dir: &std::path::Path) -> Result<std::fs::File, DaemonError> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(LOCK_FILE);
    let shown = path.display().to_string();
    let failed = |source| DaemonError::Lock { path: shown.clone(), source };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(failed)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut held = String::new();
            let _ = file.take(64).read_to_string(&mut held);
            let holder = match held.trim() {
                pid if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) => {
                    format!("pid {pid}")
                }
                _ => "a process that wrote no pid".to_owned(),
            };
            return Err(DaemonError::Locked { path: dir.display().to_string(), holder });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(failed(e)),
    }
    file.set_len(0).map_err(failed)?;
    file.rewind().map_err(failed)?;
    writeln!(file, "{}", std::process::id()).map_err(failed)?;
    Ok(file)
}

/// What the control socket can ask a domain task.
pub enum Command {
    CheckNow(control::AnswerTo),
    /// A diff of the domain now (`vigil diff` through the daemon).
    Diff(control::AnswerTo),
    /// Make the domain's current state its baseline, audited ([`accept`]).
    Accept(accept::Accept),
}

/// Where a domain's task is, as `vigil status` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainState {
    /// Not attached: waiting for the guest, or for attaching to succeed.
    Waiting,
    /// Attached, its changes taken into the baseline while the guest boots.
    Provisional,
    /// Attached and checked against its baseline.
    Watching,
}

/// A domain's state as `vigil status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DomainStatus {
    pub name: String,
    pub uuid: String,
    pub state: DomainState,
    pub detail: String,
    pub boot: String,
    pub last_check: String,
    pub open_violations: usize,
}

struct Task {
    id: u64,
    cancel: tokio_watch::Sender<bool>,
    reboot: Arc<tokio::sync::Notify>,
    commands: mpsc::Sender<Command>,
}

/// Everything the tasks share.
pub struct Shared {
    pub settings: Settings,
    pub sink: Sink,
    pub budget: Budget,
    pub status: Mutex<HashMap<String, DomainStatus>>,
    /// Guest profiles, loaded at start and again when the files on the
    /// search path change (see [`Shared::reload_profiles`]).
    profiles: RwLock<Arc<[crate::linux::profile::Profile]>>,
    /// What the profile files on the search path were when last loaded.
    profile_files: Mutex<ProfileFiles>,
    /// How many times the profiles were loaded again.
    profile_generation: std::sync::atomic::AtomicU64,
    hv: RwLock<Option<Arc<Hypervisor>>>,
    tasks: Mutex<HashMap<String, Task>>,
    /// What libvirt told of each domain's runs and resets, by UUID, kept
    /// across its tasks (see [`boot`]).
    knowledge: Mutex<HashMap<String, Knowledge>>,
    /// When the last budget-exceeded event was sent (one a minute at most).
    budget_event: Mutex<Option<Instant>>,
    /// Domains let go, by UUID, and when: libvirt's events can come after a
    /// check has found the domain gone (a migration's pause and stop), and
    /// they still say why it went.
    let_go: Mutex<HashMap<String, Instant>>,
    /// The last collection of KVM's statistics failed (said once until one
    /// succeeds).
    kvm_failing: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn budget_exceeded(&self, name: &str, uuid: &str, late: Duration, interval: Duration) {
        let mut last = self.budget_event.lock().expect("budget event lock");
        if last.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            return;
        }
        *last = Some(Instant::now());
        let detail = format!(
            "CPU budget of {} core(s) spent: a check of {name} started {late:?} late (interval {interval:?}); \
             raise schedule.cpu_budget or lengthen the intervals",
            self.settings.cpu_budget
        );
        self.sink.emit(self.subject(name, uuid, "").event(
            EventKind::BudgetExceeded,
            AlertSeverity::Warning,
            detail,
        ));
    }

    /// What libvirt told of a domain so far.
    fn knowledge(&self, uuid: &str) -> Knowledge {
        self.knowledge.lock().expect("knowledge lock").get(uuid).cloned().unwrap_or_default()
    }

    /// An attach succeeded on `run` with what was `known`: the daemon
    /// listens to libvirt about this run from now on, and the reset that
    /// led to it (if any) is answered. A reset reported during the attach
    /// stays for the next one.
    fn attached(
        &self,
        uuid: &str,
        known: &Knowledge,
        run: Option<crate::integrity::baseline::Run>,
    ) {
        let mut all = self.knowledge.lock().expect("knowledge lock");
        let k = all.entry(uuid.to_owned()).or_default();
        if k.reset_reported == known.reset_reported {
            k.reset_reported = None;
        }
        k.listened = run;
    }

    /// libvirt reported a reset of a domain's guest.
    fn reset_reported(&self, uuid: &str) {
        let mut all = self.knowledge.lock().expect("knowledge lock");
        all.entry(uuid.to_owned()).or_default().reset_reported = Some(Instant::now());
    }

    /// Events may have been missed (libvirt was unreachable): no run counts
    /// as listened to until it is attached again.
    fn listening_gap(&self) {
        for k in self.knowledge.lock().expect("knowledge lock").values_mut() {
            k.listened = None;
        }
    }

    fn hypervisor(&self) -> Option<Arc<Hypervisor>> {
        self.hv.read().expect("hv lock").clone()
    }

    fn subject(&self, name: &str, uuid: &str, boot: &str) -> Subject {
        Subject {
            host: self.settings.host.clone(),
            domain: name.into(),
            uuid: uuid.into(),
            boot: boot.into(),
        }
    }

    fn set_status(&self, uuid: &str, f: impl FnOnce(&mut DomainStatus)) {
        if let Some(s) = self.status.lock().expect("status lock").get_mut(uuid) {
            f(s);
        }
    }

    /// Sends a command to a domain's task, by name or UUID.
    pub fn command(&self, domain: &str, cmd: Command) -> Result<(), String> {
        let uuid = {
            let st = self.status.lock().expect("status lock");
            st.values().find(|s| s.name == domain || s.uuid == domain).map(|s| s.uuid.clone())
        }
        .ok_or_else(|| format!("vigil is not watching a domain named {domain:?}"))?;
        let tasks = self.tasks.lock().expect("tasks lock");
        let t = tasks.get(&uuid).ok_or_else(|| format!("domain {domain} is not attached"))?;
        t.commands.try_send(cmd).map_err(|_| format!("domain {domain} is busy; try again"))
    }
}

/// The profile files on a search path as last seen: each file's path,
/// length and modification time, in search order.
#[derive(Debug, Default, PartialEq, Eq)]
struct ProfileFiles(Vec<(PathBuf, u64, Option<std::time::SystemTime>)>);

impl ProfileFiles {
    fn on(dirs: &[PathBuf]) -> Self {
        let files = crate::linux::profile::profile_files(dirs)
            .into_iter()
            .map(|found| {
                // A directory that cannot be listed counts as itself, so
                // that its coming back is a change too.
                let p = found.unwrap_or_else(|(dir, _)| dir);
                let meta = std::fs::metadata(&p).ok();
                let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
                (p, len, meta.and_then(|m| m.modified().ok()))
            })
            .collect();
        ProfileFiles(files)
    }
}

impl Shared {
    /// How many times the profiles were loaded again since the start.
    pub fn profile_generation(&self) -> u64 {
        self.profile_generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The guest profiles in use now.
    pub fn profiles(&self) -> Arc<[crate::linux::profile::Profile]> {
        self.profiles.read().expect("profiles lock").clone()
    }

    /// Loads the guest profiles again when the files on the search path
    /// changed (a profile built or copied there, one removed), or when
    /// `asked` (SIGHUP), and says so in a `profiles-loaded` event: the
    /// releases in use, those added and removed, and any file refused
    /// (then a warning). Checks use them from their next one, a domain's
    /// first match of a new profile included.
    pub fn reload_profiles(&self, asked: bool) {
        let now = ProfileFiles::on(&self.settings.profiles);
        {
            let mut was = self.profile_files.lock().expect("profile files lock");
            if *was == now && !asked {
                return;
            }
            *was = now;
        }
        let (loaded, refused) = crate::linux::profile::load_dir(&self.settings.profiles);
        let releases =
            |ps: &[crate::linux::profile::Profile]| -> std::collections::BTreeSet<String> {
                ps.iter().map(|p| p.release.clone()).collect()
            };
        let (before, after) = (releases(&self.profiles()), releases(&loaded));
        let list = |set: Vec<&String>| {
            if set.is_empty() {
                "none".to_owned()
            } else {
                set.into_iter().cloned().collect::<Vec<_>>().join(", ")
            }
        };
        let mut detail = format!(
            "guest profiles loaded again ({}): {} in use ({}); added: {}; removed: {}",
            if asked { "asked for by SIGHUP" } else { "the files on the search path changed" },
            after.len(),
            list(after.iter().collect()),
            list(after.difference(&before).collect()),
            list(before.difference(&after).collect()),
        );
        if !refused.is_empty() {
            let why: Vec<String> =
                refused.iter().map(|(p, why)| format!("{}: {why}", p.display())).collect();
            detail.push_str(&format!("; refused: {}", why.join("; ")));
        }
        detail.push_str("; checks use them from their next one");
        *self.profiles.write().expect("profiles lock") = loaded.into();
        self.profile_generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let severity =
            if refused.is_empty() { AlertSeverity::Info } else { AlertSeverity::Warning };
        self.sink.emit(self.subject("", "", "").event(EventKind::ProfilesLoaded, severity, detail));
    }
}

/// A count as a gauge value (saturating).
fn gauge(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

impl Shared {
    fn start_task(self: &Arc<Self>, uuid: &str, name: &str) {
        let mut tasks = self.tasks.lock().expect("tasks lock");
        if tasks.contains_key(uuid) || !self.settings.watches(name, uuid) {
            return;
        }
        let (cancel, cancel_rx) = tokio_watch::channel(false);
        let reboot = Arc::new(tokio::sync::Notify::new());
        let (commands, commands_rx) = mpsc::channel(4);
        self.status.lock().expect("status lock").insert(
            uuid.to_owned(),
            DomainStatus {
                name: name.into(),
                uuid: uuid.into(),
                state: DomainState::Waiting,
                detail: "attaching".into(),
                boot: String::new(),
                last_check: String::new(),
                open_violations: 0,
            },
        );
        static NEXT_TASK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_TASK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tasks.insert(uuid.to_owned(), Task { id, cancel, reboot: reboot.clone(), commands });
        self.let_go.lock().expect("let-go lock").remove(uuid);
        self.sink.metrics.attached.set(gauge(tasks.len()));
        let task = tokio::spawn(domain_task(
            self.clone(),
            id,
            uuid.to_owned(),
            name.to_owned(),
            cancel_rx,
            reboot,
            commands_rx,
        ));
        self.supervise(task, id, uuid, name);
    }

    /// Watches domain task `id` for a panic (a parser bug on hostile guest
    /// memory), which must not leave the domain silently unwatched: it is
    /// counted and said, and the task retired, so that the next resync
    /// (every 5 s) starts a new one.
    fn supervise(
        self: &Arc<Self>,
        task: tokio::task::JoinHandle<()>,
        id: u64,
        uuid: &str,
        name: &str,
    ) {
        let (me, uuid, name) = (self.clone(), uuid.to_owned(), name.to_owned());
        tokio::spawn(async move {
            if let Some(why) = panicked(task).await {
                me.sink.error("task_panicked");
                me.sink.emit(me.subject(&name, &uuid, "").event(
                    EventKind::Error,
                    AlertSeverity::Warning,
                    format!("the task checking {name} panicked ({why}); a new one takes over"),
                ));
                me.retire(&uuid, Some(id), &name, "its task panicked");
            }
        });
    }

    /// A watched domain paused or resumed: an info event. A paused guest's
    /// memory is still there and is checked on as before.
    fn note_run_state(&self, uuid: &str, name: &str, kind: EventKind, why: &str) {
        if !self.tasks.lock().expect("tasks lock").contains_key(uuid) && !self.just_let_go(uuid) {
            return;
        }
        let detail = if kind == EventKind::Paused {
            format!("{name} {why}: its memory is still checked")
        } else {
            format!("{name} {why}")
        };
        self.sink.emit(self.subject(name, uuid, "").event(kind, AlertSeverity::Info, detail));
    }

    fn stop_task(&self, uuid: &str, name: &str, why: &str) {
        let watched = self.tasks.lock().expect("tasks lock").contains_key(uuid);
        if !watched && self.just_let_go(uuid) {
            // Let go already, when a check found it gone: libvirt's word
            // on why it went still belongs in the log.
            self.sink.emit(self.subject(name, uuid, "").event(
                EventKind::Notice,
                AlertSeverity::Info,
                format!("{name}, let go a moment ago, is gone because {why}"),
            ));
        }
        self.retire(uuid, None, name, why);
    }

    /// Whether a domain was let go in the last minute (and is not watched
    /// again since). Older entries are forgotten here.
    fn just_let_go(&self, uuid: &str) -> bool {
        let mut let_go = self.let_go.lock().expect("let-go lock");
        let_go.retain(|_, at| at.elapsed() < Duration::from_secs(60));
        let_go.contains_key(uuid)
    }

    /// Removes a domain's task (only task `id`, when given) and emits one
    /// detached event; does nothing if it is already gone.
    fn retire(&self, uuid: &str, id: Option<u64>, name: &str, why: &str) {
        let mut tasks = self.tasks.lock().expect("tasks lock");
        if id.is_some_and(|id| tasks.get(uuid).is_none_or(|t| t.id != id)) {
            return;
        }
        if let Some(t) = tasks.remove(uuid) {
            let _ = t.cancel.send(true);
            self.let_go.lock().expect("let-go lock").insert(uuid.to_owned(), Instant::now());
            self.status.lock().expect("status lock").remove(uuid);
            self.sink.emit(self.subject(name, uuid, "").event(
                EventKind::Detached,
                AlertSeverity::Info,
                format!("detached {name}: {why}"),
            ));
            // No longer checked: nothing open of it stays firing.
            self.sink
                .metrics
                .open_violations
                .get_or_create(&DomainLabels { domain: name.into() })
                .set(0);
            for region in [Region::Text, Region::Rodata] {
                self.sink
                    .metrics
                    .pages_protected
                    .get_or_create(&RegionLabels {
                        domain: name.into(),
                        region: region.to_string(),
                    })
                    .set(0);
            }
        }
        self.sink.metrics.attached.set(gauge(tasks.len()));
    }

    /// KVM's statistics of the domains being watched, for the metrics: one
    /// libvirt call for all of them. See [`collect_kvm_forever`].
    fn collect_kvm(&self, hv: &Hypervisor) {
        use std::sync::atomic::Ordering::SeqCst;
        let watched: std::collections::HashSet<String> =
            self.tasks.lock().expect("tasks lock").keys().cloned().collect();
        match hv.kvm_stats(&watched) {
            Ok(all) => {
                let kept =
                    all.into_iter().filter(|(_, _, s)| !s.is_empty()).map(|(_, n, s)| (n, s));
                self.sink.metrics.kvm.replace(kept.collect());
                if self.kvm_failing.swap(false, SeqCst) {
                    warn_line!("vigil: KVM's statistics are collected again");
                }
            }
            Err(e) => self.kvm_not_collected(&error_chain(&e)),
        }
    }

    /// A collection of KVM's statistics that failed: counted as error
    /// `kvm_stats`, said once until one succeeds, and nothing exported
    /// meanwhile rather than stale figures.
    fn kvm_not_collected(&self, why: &str) {
        use std::sync::atomic::Ordering::SeqCst;
        self.sink.metrics.kvm.replace(Default::default());
        self.sink.error("kvm_stats");
        if !self.kvm_failing.swap(true, SeqCst) {
            warn_line!(
                "vigil: warning: KVM's statistics not collected, their figures withdrawn until a collection succeeds: {why}"
            );
        }
    }

    /// Brings the set of tasks in line with the running domains.
    fn resync(self: &Arc<Self>, hv: &Hypervisor) -> Result<(), String> {
        let running = hv.active_domains().map_err(|e| error_chain(&e))?;
        for (uuid, name) in &running {
            self.start_task(uuid, name);
        }
        let gone: Vec<(String, String)> = {
            let tasks = self.tasks.lock().expect("tasks lock");
            let status = self.status.lock().expect("status lock");
            tasks
                .keys()
                .filter(|u| !running.iter().any(|(uuid, _)| uuid == *u))
                .map(|u| (u.clone(), status.get(u).map(|s| s.name.clone()).unwrap_or_default()))
                .collect()
        };
        for (uuid, name) in gone {
            self.stop_task(&uuid, &name, "the domain is no longer running");
        }
        Ok(())
    }
}

/// How long a collection of KVM's statistics may wait on libvirt before its
/// figures are withdrawn (libvirt asks each QEMU's monitor).
const KVM_STATS_WAIT: Duration = Duration::from_secs(10);

/// Collects KVM's statistics of the watched domains every 5 s, in a task of
/// its own: a QEMU whose monitor does not answer holds up only this, never
/// the main loop. One collection at a time; one still waiting after
/// [`KVM_STATS_WAIT`] withdraws the figures and counts as error
/// `kvm_stats`, and the next starts once it ends. Without a connection to
/// libvirt nothing is exported.
async fn collect_kvm_forever(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(hv) = shared.hypervisor() else {
            shared.sink.metrics.kvm.replace(Default::default());
            continue;
        };
        let sh = shared.clone();
        let mut job = tokio::task::spawn_blocking(move || sh.collect_kvm(&hv));
        let ended = match tokio::time::timeout(KVM_STATS_WAIT, &mut job).await {
            Ok(ended) => ended,
            Err(_) => {
                shared.kvm_not_collected(&format!(
                    "libvirt did not answer within {} s",
                    KVM_STATS_WAIT.as_secs()
                ));
                job.await
            }
        };
        if let Err(e) = ended {
            shared.sink.error("task_panicked");
            shared.kvm_not_collected(&format!("the collection panicked: {e}"));
        }
    }
}

fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        warn_line!("vigil: warning: telling systemd {state:?}: {e}");
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(settings: Settings) -> Result<(), DaemonError> {
    std::fs::create_dir_all(&settings.state_dir).map_err(|source| DaemonError::StateDir {
        path: settings.state_dir.display().to_string(),
        source,
    })?;
    // Before anything of the directory's is touched; held until return.
    let _lock = lock_state_dir(&settings.state_dir)?;
    let metrics = Metrics::new();
    let reported = AlertLog::reported(&settings.alert_log)?;
    let log = AlertLog::open_rotating(&settings.alert_log, settings.alert_rotation)?;
    let mut pushers = Vec::new();
    // What the pushers have to say goes through the sink like any event.
    let (notes, mut pusher_notes) = mpsc::unbounded_channel();
    for (ep, is_am) in [(settings.alertmanager.clone(), true), (settings.webhook.clone(), false)] {
        if let Some(ep) = ep {
            let (tx, rx) = mpsc::channel(settings.push_queue);
            let cursor = push::cursor_path(&settings.state_dir, is_am);
            let log = settings.alert_log.clone();
            let pusher = push::Pusher {
                ep,
                alertmanager: is_am,
                log,
                cursor,
                metrics: metrics.clone(),
                host: settings.host.clone(),
                notes: notes.clone(),
                pacing: push::Pacing::DEFAULT,
                queue: settings.push_queue,
            };
            tokio::spawn(push::run(pusher, rx));
            pushers.push((is_am, tx));
        }
    }
    let listener = tokio::net::TcpListener::bind(settings.metrics_listen)
        .await
        .map_err(|source| DaemonError::Metrics { addr: settings.metrics_listen, source })?;
    tokio::spawn(metrics::serve(listener, metrics.clone(), metrics::Limits::DEFAULT));
    let control_listener = control::bind(&settings.control_socket, &settings.control_group)?;
    let files = ProfileFiles::on(&settings.profiles);
    let (profiles, refused) = crate::linux::profile::load_dir(&settings.profiles);
    for (path, why) in &refused {
        warn_line!("vigil: warning: guest profile {} refused: {why}", path.display());
    }
    let shared = Arc::new(Shared {
        budget: Budget::new(settings.cpu_budget),
        sink: Sink::new(log, reported, metrics, pushers),
        status: Mutex::new(HashMap::new()),
        profiles: RwLock::new(profiles.into()),
        profile_files: Mutex::new(files),
        profile_generation: 0.into(),
        hv: RwLock::new(None),
        tasks: Mutex::new(HashMap::new()),
        knowledge: Mutex::new(HashMap::new()),
        budget_event: Mutex::new(None),
        let_go: Mutex::new(HashMap::new()),
        kvm_failing: Default::default(),
        settings,
    });
    tokio::spawn(control::serve(control_listener, shared.clone()));
    tokio::spawn(collect_kvm_forever(shared.clone()));

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Signals)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(DaemonError::Signals)?;
    let mut sighup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(DaemonError::Signals)?;
    let mut resync = tokio::time::interval(Duration::from_secs(5));
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut ready = false;
    let mut libvirt_down_since: Option<Instant> = None;
    let host_subject = shared.subject("", "", "");
    loop {
        tokio::select! {
            _ = sighup.recv() => {
                let sh = shared.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || sh.reload_profiles(true)).await {
                    // The profiles in use stay; a panic here is a bug to see.
                    shared.sink.error("task_panicked");
                    warn_line!("vigil: warning: loading the guest profiles again failed: {e}");
                }
            }
            _ = resync.tick() => {
                shared.sink.flush_held(&shared.settings.host);
                let sh = shared.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || sh.reload_profiles(false)).await {
                    // The profiles in use stay; a panic here is a bug to see.
                    shared.sink.error("task_panicked");
                    warn_line!("vigil: warning: loading the guest profiles again failed: {e}");
                }
                let alive = shared.hypervisor().is_some_and(|h| h.is_alive());
                if !alive {
                    let uri = shared.settings.connect.clone();
                    let tx = ev_tx.clone();
                    match tokio::task::spawn_blocking(move || Hypervisor::connect_with_events(&uri, tx)).await.expect("connect panicked") {
                        Ok(hv) => {
                            let was_down = libvirt_down_since.take().is_some() || shared.hypervisor().is_some();
                            // Events sent while there was no connection are lost.
                            shared.listening_gap();
                            *shared.hv.write().expect("hv lock") = Some(Arc::new(hv));
                            if was_down {
                                shared.sink.emit(host_subject.event(EventKind::Notice, AlertSeverity::Info, format!("reconnected to libvirt at {}", shared.settings.connect)));
                            }
                        }
                        Err(e) => {
                            if libvirt_down_since.is_none() {
                                shared.sink.error("libvirt");
                                shared.sink.emit(host_subject.event(EventKind::Error, AlertSeverity::Warning, format!("libvirt unreachable, retrying: {}", error_chain(&e))));
                                libvirt_down_since = Some(Instant::now());
                            }
                            *shared.hv.write().expect("hv lock") = None;
                        }
                    }
                }
                if let Some(hv) = shared.hypervisor() {
                    let (sh, h) = (shared.clone(), hv.clone());
                    if let Err(e) = tokio::task::spawn_blocking(move || sh.resync(&h)).await.expect("resync panicked") {
                        warn_line!("vigil: warning: listing domains: {e}");
                    }
                }
                if !ready {
                    ready = true;
                    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status("watching libvirt domains")]);
                }
                resync.reset_after(Duration::from_secs(5));
            }
            Some(ev) = ev_rx.recv() => match ev {
                DomainEvent::Started { uuid, name } => shared.start_task(&uuid, &name),
                DomainEvent::Stopped { uuid, name, why } => shared.stop_task(&uuid, &name, why),
                DomainEvent::Paused { uuid, name, why } => shared.note_run_state(&uuid, &name, EventKind::Paused, why),
                DomainEvent::Resumed { uuid, name, why } => shared.note_run_state(&uuid, &name, EventKind::Resumed, why),
                DomainEvent::Rebooted { uuid, .. } => {
                    shared.reset_reported(&uuid);
                    if let Some(t) = shared.tasks.lock().expect("tasks lock").get(&uuid) {
                        t.reboot.notify_one();
                    }
                }
            },
            Some(note) = pusher_notes.recv() => {
                shared.sink.emit(note);
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => notify(&[sd_notify::NotifyState::Watchdog]),
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    notify(&[sd_notify::NotifyState::Stopping]);
    let _ = std::fs::remove_file(&shared.settings.control_socket);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::alerts::{
        AlertLog, AlertSeverity, EventKind, Reported, Rotation, Subject, rotated_path, state_path,
    };
    use super::metrics::{KindLabels, Metrics};
    use super::{Sink, Timetable, panicked};
    use std::time::{Duration, Instant};

    /// Checks over `secs` simulated seconds (each taking 30 ms), as (hot, full).
    fn checks_over(hot: Duration, full: Duration, jitter: f64, secs: u64) -> (u32, u32) {
        let start = Instant::now();
        let mut t = Timetable::starting(start);
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        let mut counts = (0, 0);
        while t.due() < start + Duration::from_secs(secs) {
            let now = t.due();
            let is_full = t.full_at(now, hot);
            if is_full {
                counts.1 += 1;
            } else {
                counts.0 += 1;
            }
            t.checked(is_full, now + Duration::from_millis(30), (hot, full, jitter), &mut seed);
        }
        counts
    }

    /// A held patch site's hold end brings the next full check forward,
    /// never back; one already past brings it to now.
    #[test]
    fn a_hold_ending_brings_the_full_check_forward() {
        let (hot, full) = (Duration::from_secs(1), Duration::from_secs(10));
        let now = Instant::now();
        let mut t = Timetable::starting(now);
        let mut seed = 7;
        t.checked(true, now, (hot, full, 0.0), &mut seed);
        assert_eq!(t.next_full, now + full);
        t.settle_by(Some(now + Duration::from_secs(4)), now);
        assert_eq!(t.next_full, now + Duration::from_secs(4));
        assert!(!t.full_at(now + Duration::from_secs(1), hot));
        assert!(t.full_at(now + Duration::from_secs(4), hot));
        t.settle_by(Some(now + Duration::from_secs(6)), now);
        assert_eq!(t.next_full, now + Duration::from_secs(4), "never later");
        t.settle_by(None, now);
        assert_eq!(t.next_full, now + Duration::from_secs(4), "no hold: as it was");
        // A hold that ended while the check ran: the full check at once.
        t.settle_by(Some(now), now + Duration::from_secs(1));
        assert_eq!(t.next_full, now + Duration::from_secs(1));
    }

    /// A full check due within half a hot interval is not preceded by a hot
    /// one: with both intervals 1 s, every check is a full one, one a
    /// second; with the shipped 1 s and 10 s, a tenth of them are.
    #[test]
    fn a_full_check_about_due_takes_the_hot_checks_place() {
        let s = Duration::from_secs(1);
        let (hot, full) = checks_over(s, s, 0.1, 1000);
        assert_eq!(hot, 0);
        assert!((950..=1050).contains(&full), "{full} full checks in 1000 s");
        let (hot, full) = checks_over(s, 10 * s, 0.1, 1000);
        assert!((92..=105).contains(&full), "{full} full checks in 1000 s");
        assert!((880..=930).contains(&hot), "{hot} hot checks in 1000 s");
        // No jitter, the full interval a whole number of hot ones: the same.
        assert_eq!(checks_over(s, 5 * s, 0.0, 100).1, 20);
        // A hot interval too short to halve still lets full checks come.
        let (_, full) = checks_over(Duration::from_nanos(1), s, 0.0, 10);
        assert!((9..=10).contains(&full), "{full} full checks in 10 s");
    }

    /// A daemon's shared state with no hypervisor, logging to `path`.
    pub(super) fn shared_logging_to(path: &std::path::Path) -> super::Shared {
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex, RwLock};
        let settings = super::Settings::load(None, &super::config::Overrides::default()).unwrap();
        let rotation = Rotation { max_bytes: 1 << 20, keep: 1 };
        super::Shared {
            budget: super::Budget::new(1.0),
            sink: Sink::new(
                AlertLog::open_rotating(path, rotation).unwrap(),
                Reported::default(),
                Metrics::new(),
                Vec::new(),
            ),
            status: Mutex::new(HashMap::new()),
            profiles: RwLock::new(Arc::from(Vec::new())),
            profile_files: Mutex::new(super::ProfileFiles::default()),
            profile_generation: 0.into(),
            hv: RwLock::new(None),
            tasks: Mutex::new(HashMap::new()),
            knowledge: Mutex::new(HashMap::new()),
            budget_event: Mutex::new(None),
            let_go: Mutex::new(HashMap::new()),
            kvm_failing: Default::default(),
            settings,
        }
    }

    /// Gives `shared` a task for domain `uuid`, numbered `id`.
    pub(super) fn with_task(shared: &super::Shared, uuid: &str, id: u64) {
        let (cancel, _) = tokio::sync::watch::channel(false);
        let (commands, _) = tokio::sync::mpsc::channel(1);
        let reboot = std::sync::Arc::new(tokio::sync::Notify::new());
        shared
            .tasks
            .lock()
            .unwrap()
            .insert(uuid.into(), super::Task { id, cancel, reboot, commands });
    }

    pub(super) fn logged(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A domain's task that panics (a parser bug on hostile guest memory)
    /// is counted as `task_panicked`, said in an error event naming the
    /// domain and the panic, and retired so that the next resync starts a
    /// new one; a task that ends without panicking is none of these.
    #[tokio::test]
    async fn a_panicking_domain_task_is_counted_said_and_retired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let shared = std::sync::Arc::new(shared_logging_to(&path));
        let panics = || {
            shared
                .sink
                .metrics
                .errors
                .get_or_create(&KindLabels { kind: "task_panicked".into() })
                .get()
        };
        with_task(&shared, "u1", 7);
        shared.supervise(tokio::spawn(async {}), 7, "u1", "g1");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(shared.tasks.lock().unwrap().contains_key("u1"), "a task that ended was retired");
        assert_eq!(panics(), 0);
        shared.supervise(
            tokio::spawn(async { panic!("walk bug at {:#x}", 0x1000) }),
            7,
            "u1",
            "g1",
        );
        for _ in 0..200 {
            if !shared.tasks.lock().unwrap().contains_key("u1") {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            !shared.tasks.lock().unwrap().contains_key("u1"),
            "the panicked task is not retired"
        );
        assert_eq!(panics(), 1);
        let lines = logged(&path);
        let said: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| (l["event"].as_str().unwrap(), l["detail"].as_str().unwrap()))
            .collect();
        assert_eq!(said.len(), 2, "{said:#?}");
        assert_eq!(said[0].0, "error");
        assert!(said[0].1.contains("g1") && said[0].1.contains("walk bug at 0x1000"), "{said:#?}");
        assert_eq!(said[1], ("detached", "detached g1: its task panicked"));
    }

    /// A profile added to the search path is loaded at the next look, with
    /// a `profiles-loaded` event naming it; nothing changed, nothing is
    /// said, unless asked (SIGHUP); a file that is no profile is named in a
    /// warning; a profile removed is said removed.
    #[test]
    fn profiles_are_loaded_again_when_their_files_change() {
        let dir = tempfile::tempdir().unwrap();
        let profiles = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let mut shared = shared_logging_to(&path);
        shared.settings.profiles = vec![profiles.path().to_path_buf()];
        let said = || -> Vec<(String, String, String)> {
            logged(&path)
                .iter()
                .map(|l| {
                    let s = |k: &str| l[k].as_str().unwrap_or_default().to_owned();
                    (s("event"), s("severity"), s("detail"))
                })
                .collect()
        };
        shared.reload_profiles(false);
        assert!(said().is_empty(), "nothing changed, yet: {:#?}", said());
        let text = crate::linux::profile::tests::sample().to_text();
        std::fs::write(profiles.path().join("6.1.0-test.profile"), &text).unwrap();
        shared.reload_profiles(false);
        assert_eq!(shared.profiles().len(), 1);
        assert_eq!(shared.profile_generation(), 1);
        let s = said();
        assert_eq!(s.len(), 1, "{s:#?}");
        assert_eq!((s[0].0.as_str(), s[0].1.as_str()), ("profiles-loaded", "info"));
        assert!(
            s[0].2.contains("1 in use (6.1.0-test); added: 6.1.0-test; removed: none"),
            "{s:#?}"
        );
        shared.reload_profiles(false);
        assert_eq!(said().len(), 1, "said again with nothing changed");
        shared.reload_profiles(true);
        assert!(said()[1].2.contains("asked for by SIGHUP"), "{:#?}", said());
        std::fs::write(profiles.path().join("broken.profile"), "not a profile").unwrap();
        std::fs::remove_file(profiles.path().join("6.1.0-test.profile")).unwrap();
        shared.reload_profiles(false);
        let s = said();
        assert_eq!(s[2].1, "warning", "{s:#?}");
        assert!(
            s[2].2.contains("removed: 6.1.0-test") && s[2].2.contains("broken.profile"),
            "{s:#?}"
        );
        assert!(shared.profiles().is_empty());
    }

    /// libvirt's pause and stop events for a domain that a check already
    /// found gone (a migration's end) still reach the log with libvirt's
    /// reason; those for a domain never watched do not.
    #[test]
    fn libvirt_events_after_a_domain_is_let_go_still_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let shared = shared_logging_to(&path);
        with_task(&shared, "u1", 7);
        // The check finds it gone first; libvirt's events follow.
        shared.retire("u1", Some(7), "g1", "domain lost: no such domain");
        shared.note_run_state("u1", "g1", EventKind::Paused, "paused for the end of a migration");
        shared.stop_task("u1", "g1", "the domain migrated to another host");
        // A domain never watched: nothing.
        shared.note_run_state("u2", "g2", EventKind::Paused, "paused by request");
        shared.stop_task("u2", "g2", "the domain was destroyed");
        let lines = logged(&path);
        let said: Vec<(String, String)> = lines
            .iter()
            .map(|l| (l["event"].as_str().unwrap().into(), l["detail"].as_str().unwrap().into()))
            .collect();
        assert_eq!(said.len(), 3, "{said:#?}");
        assert_eq!(said[0].0, "detached");
        assert_eq!(said[1].0, "paused");
        assert!(said[1].1.contains("end of a migration"), "{said:#?}");
        assert_eq!(said[2].0, "notice");
        assert!(said[2].1.contains("g1") && said[2].1.contains("migrated"), "{said:#?}");
        assert!(lines.iter().all(|l| l["domain"] != "g2"), "{said:#?}");
    }

    /// Rotation comes after the alert is on disk: when it fails, the alert
    /// is still logged (and not pushed as unlogged), the failure counted, and
    /// the next alert rotates once it can.
    #[test]
    fn an_alert_is_logged_though_the_rotation_after_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let rotation = Rotation { max_bytes: 2000, keep: 2 };
        let sink = Sink::new(
            AlertLog::open_rotating(&path, rotation).unwrap(),
            Reported::default(),
            Metrics::new(),
            Vec::new(),
        );
        let s =
            Subject { host: "h".into(), domain: "d".into(), uuid: "u".into(), boot: "b".into() };
        let event =
            |i: usize| s.event(EventKind::Attached, AlertSeverity::Info, format!("event {i}"));
        // A directory where the state file goes: the rotation cannot keep
        // the state, so it does not happen.
        std::fs::create_dir(state_path(&path)).unwrap();
        for i in 0..10 {
            assert_eq!(sink.emit(event(i)), super::Emitted::Logged, "event {i} not logged");
        }
        let failed = sink
            .metrics
            .errors
            .get_or_create(&KindLabels { kind: "alert_log_rotate".into() })
            .get();
        assert!(failed > 0, "no failed rotation counted");
        assert!(!rotated_path(&path, 1).exists());
        let lines = |p: &std::path::Path| std::fs::read_to_string(p).unwrap().lines().count();
        assert_eq!(lines(&path), 10);
        std::fs::remove_dir(state_path(&path)).unwrap();
        assert_eq!(sink.emit(event(10)), super::Emitted::Logged);
        assert_eq!((lines(&rotated_path(&path, 1)), lines(&path)), (11, 0));
    }

    /// KVM's figures are never left stale: a failed collection withdraws
    /// them and counts each failure, and with no connection to libvirt the
    /// collecting task withdraws them too.
    #[tokio::test]
    async fn kvm_figures_are_withdrawn_when_not_collected() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let shared = std::sync::Arc::new(shared_logging_to(&dir.path().join("alerts.jsonl")));
        let failures = || {
            shared.sink.metrics.errors.get_or_create(&KindLabels { kind: "kvm_stats".into() }).get()
        };
        let some = || {
            let mut s = crate::kvm::KvmStats { vcpus: 1, ..Default::default() };
            s.vcpu.insert(("exits".into(), crate::kvm::Kind::Cumulative), 5);
            [("web1".to_owned(), s)].into_iter().collect()
        };
        shared.sink.metrics.kvm.replace(some());
        assert!(shared.sink.metrics.encode().contains("vigil_kvm_vcpu_cumulative_total"));
        shared.kvm_not_collected("libvirt said no");
        assert!(!shared.sink.metrics.encode().contains("vigil_kvm_"), "stale figures kept");
        assert_eq!(failures(), 1);
        assert!(shared.kvm_failing.load(SeqCst));
        shared.kvm_not_collected("libvirt said no again");
        assert_eq!(failures(), 2, "each failure counts, though said once");
        // No connection: the task's first round withdraws what is there.
        shared.sink.metrics.kvm.replace(some());
        let task = tokio::spawn(super::collect_kvm_forever(shared.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        task.abort();
        assert!(
            !shared.sink.metrics.encode().contains("vigil_kvm_"),
            "figures kept without libvirt"
        );
    }

    /// What the task supervisor in `start_task` relies on: a panic is told
    /// from an end or a cancellation, with its message.
    #[tokio::test]
    async fn a_panicking_task_is_told_from_one_that_ends() {
        assert_eq!(panicked(tokio::spawn(async {})).await, None);
        let boom = tokio::spawn(async { panic!("walk bug at table {}", 7) });
        assert_eq!(panicked(boom).await.as_deref(), Some("walk bug at table 7"));
        let boom = tokio::spawn(async { panic!("plain") });
        assert_eq!(panicked(boom).await.as_deref(), Some("plain"));
        let cancelled = tokio::spawn(std::future::pending::<()>());
        cancelled.abort();
        assert_eq!(panicked(cancelled).await, None);
    }
}
