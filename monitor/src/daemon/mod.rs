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
pub mod boot;
pub mod budget;
pub mod config;
pub mod control;
pub mod evidence;
pub mod metrics;
pub mod push;
pub mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch as tokio_watch};

use self::alerts::{Alert, AlertLog, EventKind, Reported, Subject};
use self::budget::Budget;
use self::config::Settings;
use self::metrics::{
    CheckLabels, DomainLabels, KindLabels, Metrics, PatchLabels, RegionLabels, ScopeLabels,
    ViolationLabels,
};
use self::watch::{AttachSettings, Attached, Knowledge, WatchError, Watched};
use crate::integrity::check::Scope;
use crate::libvirt::{DomainEvent, Hypervisor, error_chain};

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
}

/// Where every alert goes; shared by all tasks.
pub struct Sink {
    log: Mutex<AlertLog>,
    reported: Mutex<Reported>,
    pub metrics: Arc<Metrics>,
    pushers: Vec<(bool, mpsc::Sender<push::Wake>)>,
    /// The alert log's last append failed (full or read-only state
    /// directory): said once as an event when it starts and when it ends.
    log_failing: std::sync::atomic::AtomicBool,
}

impl Sink {
    /// Records an alert: alert log first (fsynced), then stdout, metrics and
    /// the push queues. Returns whether the log took it.
    pub fn emit(&self, alert: Alert) -> bool {
        use std::sync::atomic::Ordering;
        let appended = {
            let mut log = self.log.lock().expect("alert log lock");
            let appended = log.append(&alert);
            // Rotating may fail (the directory read-only, say) after the
            // alert is safely logged: said, counted, and tried again next time.
            if appended.is_ok()
                && let Err(e) = log.rotate_if_due()
            {
                warn_line!("vigil: warning: rotating the alert log: {}", error_chain(&e));
                let kind = KindLabels { kind: "alert_log_rotate".into() };
                self.metrics.errors.get_or_create(&kind).inc();
            }
            appended
        };
        let logged = match appended {
            Ok(()) => {
                if self.log_failing.swap(false, Ordering::SeqCst) {
                    let host = Subject { host: alert.host.clone(), ..Subject::default() };
                    self.emit(host.event(
                        EventKind::Notice,
                        "info",
                        "the alert log takes alerts again".into(),
                    ));
                }
                true
            }
            Err(e) => {
                warn_line!("vigil: error: {}", error_chain(&e));
                self.metrics.errors.get_or_create(&KindLabels { kind: "alert_log".into() }).inc();
                if !self.log_failing.swap(true, Ordering::SeqCst) {
                    self.announce_unlogged(&alert, &e);
                }
                false
            }
        };
        out_line!("{}", serde_json::to_string(&alert).expect("alerts serialise"));
        let kind = serde_json::to_value(alert.event)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        self.metrics.events.get_or_create(&KindLabels { kind }).inc();
        if alert.event == EventKind::Violation {
            self.metrics
                .violations
                .get_or_create(&ViolationLabels {
                    domain: alert.domain.clone(),
                    region: alert.region.clone(),
                    kind: alert.kind.clone(),
                })
                .inc();
        }
        {
            let mut rep = self.reported.lock().expect("reported lock");
            let slot = rep.entry((alert.uuid.clone(), alert.boot.clone())).or_default();
            match alert.event {
                EventKind::Violation | EventKind::Notice => {
                    slot.insert(alert.key.clone(), alert.digest.clone());
                }
                EventKind::Reverted => {
                    slot.remove(&alert.key);
                }
                EventKind::Accepted | EventKind::NewBoot => slot.clear(),
                _ => {}
            }
        }
        for (is_am, q) in &self.pushers {
            if logged {
                // The pusher reads it from the log; a wake-up lost to a full
                // queue is made up by the next one, or the pusher's timer.
                let _ = q.try_send(push::Wake::Logged);
            } else if (!*is_am || push::for_alertmanager(&alert))
                && q.try_send(push::Wake::Unlogged(Box::new(alert.clone()))).is_err()
            {
                self.metrics
                    .errors
                    .get_or_create(&KindLabels { kind: "push_queue_full".into() })
                    .inc();
            }
        }
        logged
    }

    /// The alert log failing, as an event to stdout and the push sinks (the
    /// log itself cannot take it); alerts go on to them regardless.
    fn announce_unlogged(&self, alert: &Alert, e: &alerts::AlertLogError) {
        let host = Subject { host: alert.host.clone(), ..Subject::default() };
        let failure = host.event(
            EventKind::Error,
            "warning",
            format!(
                "the alert log cannot take alerts ({}); they go to stdout and the push sinks only until it can",
                error_chain(e)
            ),
        );
        out_line!("{}", serde_json::to_string(&failure).expect("alerts serialise"));
        self.metrics.events.get_or_create(&KindLabels { kind: "error".into() }).inc();
        for (is_am, q) in &self.pushers {
            if !*is_am || push::for_alertmanager(&failure) {
                let _ = q.try_send(push::Wake::Unlogged(Box::new(failure.clone())));
            }
        }
    }

    fn reported_for(&self, uuid: &str, boot: &str) -> HashMap<String, String> {
        self.reported
            .lock()
            .expect("reported lock")
            .get(&(uuid.to_owned(), boot.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    fn error(&self, kind: &str) {
        self.metrics.errors.get_or_create(&KindLabels { kind: kind.into() }).inc();
    }
}

/// What the control socket can ask a domain task.
pub enum Command {
    CheckNow(oneshot::Sender<Result<serde_json::Value, String>>),
    /// A diff of the domain now (`vigil diff` through the daemon).
    Diff(oneshot::Sender<Result<serde_json::Value, String>>),
    /// Make the domain's current state its baseline, audited ([`accept`]).
    Accept(accept::Accept),
}

/// A domain's state as `vigil status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DomainStatus {
    pub name: String,
    pub uuid: String,
    /// `waiting`, `provisional`, `watching`.
    pub state: String,
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
    /// Guest profiles, loaded at start.
    pub profiles: Arc<[crate::linux::profile::Profile]>,
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
            "warning",
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

/// A count as a gauge value (saturating).
fn gauge(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

/// When a domain's next hot and full checks are due.
struct Timetable {
    next_hot: Instant,
    next_full: Instant,
}

impl Timetable {
    /// Both checks due at once (a full one, which covers the hot one).
    fn starting(now: Instant) -> Self {
        Self { next_hot: now, next_full: now }
    }

    fn due(&self) -> Instant {
        self.next_hot.min(self.next_full)
    }

    /// Whether the check due at `now` is a full one: its time has come, or
    /// it comes in less than half a hot interval. A hot check then would
    /// be followed at once by the full one, which covers it: with both
    /// intervals 1 s and jitter, half the full checks came a moment after
    /// a hot check, each check paying for its register snapshot (a libvirt
    /// and QEMU round trip) on the host the guest shares.
    fn full_at(&self, now: Instant, hot_interval: Duration) -> bool {
        now >= self.next_full || self.next_full - now < hot_interval / 2
    }

    /// Sets the next times after a check (full or hot) ending at `now`,
    /// from the hot and full intervals and the jitter.
    fn checked(
        &mut self,
        full: bool,
        now: Instant,
        every: (Duration, Duration, f64),
        seed: &mut u64,
    ) {
        let (hot, full_interval, jitter) = every;
        if full {
            self.next_full = now + jittered(full_interval, jitter, seed);
        }
        self.next_hot = now + jittered(hot, jitter, seed);
    }
}

/// A little randomness for jitter, without a dependency.
fn jittered(base: Duration, jitter: f64, seed: &mut u64) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    let unit = (*seed >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    base.mul_f64(1.0 + jitter * (2.0 * unit - 1.0))
}

fn seed_of(text: &str) -> u64 {
    let h = blake3::hash(format!("{text}{:?}", Instant::now()).as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) | 1
}

/// Waits for a task to end; its panic message if it panicked.
async fn panicked(task: tokio::task::JoinHandle<()>) -> Option<String> {
    let e = task.await.err().filter(tokio::task::JoinError::is_panic)?;
    Some(crate::panic_message(&*e.into_panic()))
}

/// Awaits a check, reporting one that runs past `schedule.check_timeout`: an
/// error event, `limit_check_time` in `vigil_errors_total`, and a notice
/// when it ends. It is then waited for, since a blocking thread reading guest
/// memory cannot be stopped; the domain's next check starts after it.
async fn time_limited<T>(
    shared: &Shared,
    subject: &Subject,
    name: &str,
    scope: &str,
    job: impl std::future::Future<Output = (Watched, T)>,
) -> (Watched, T) {
    let limit = shared.settings.check_timeout;
    let started = Instant::now();
    tokio::pin!(job);
    match tokio::time::timeout(limit, &mut job).await {
        Ok(done) => done,
        Err(_) => {
            shared.sink.error("limit_check_time");
            shared.sink.emit(subject.event(
                EventKind::Error,
                "warning",
                format!(
                    "a {scope} check of {name} has run longer than schedule.check_timeout ({limit:?}); \
                     the domain's next check waits for it"
                ),
            ));
            let done = job.await;
            shared.sink.emit(subject.event(
                EventKind::Notice,
                "info",
                format!("the overlong {scope} check of {name} ended after {:?}", started.elapsed()),
            ));
            done
        }
    }
}

/// Runs one blocking step of a watched domain on the blocking pool.
async fn blocking<T: Send + 'static>(
    w: Watched,
    f: impl FnOnce(&mut Watched) -> T + Send + 'static,
) -> (Watched, T) {
    tokio::task::spawn_blocking(move || {
        let mut w = w;
        let r = f(&mut w);
        (w, r)
    })
    .await
    .expect("a check panicked")
}

/// Attaches a domain, retrying until its kernel can be found, the task is
/// cancelled, or the domain is gone. `None` when it should stop.
async fn attach(
    shared: &Arc<Shared>,
    uuid: &str,
    name: &str,
    cancel: &mut tokio_watch::Receiver<bool>,
) -> Option<(Watched, Attached)> {
    let mut last_reason = String::new();
    loop {
        if *cancel.borrow() {
            return None;
        }
        if let Some(hv) = shared.hypervisor() {
            let (u, dir) = (uuid.to_owned(), shared.settings.state_dir.clone());
            let settings = AttachSettings {
                originals_on_disk: shared.settings.originals_on_disk,
                provisional_window: provisional_window(&shared.settings),
                profiles: shared.profiles.clone(),
            };
            let known = shared.knowledge(uuid);
            let given = known.clone();
            let r = tokio::task::spawn_blocking(move || {
                Watched::attach(&hv, &u, &dir, &given, settings)
            })
            .await
            .expect("attach panicked");
            match r {
                Ok((mut w, attached)) => {
                    w.set_module_grace(shared.settings.module_grace);
                    shared.attached(uuid, &known, w.run.clone());
                    return Some((w, attached));
                }
                Err(e) if e.domain_gone() => return None,
                Err(e) => {
                    let reason = e.message();
                    if reason != last_reason {
                        let detail = format!(
                            "waiting to attach {name}: {reason}; retrying every {:?}",
                            shared.settings.attach_retry
                        );
                        shared.sink.emit(shared.subject(name, uuid, "").event(
                            EventKind::Waiting,
                            "info",
                            detail.clone(),
                        ));
                        shared.set_status(uuid, |s| {
                            s.state = "waiting".into();
                            s.detail = detail;
                        });
                        last_reason = reason;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(shared.settings.attach_retry) => {}
            _ = cancel.changed() => {}
        }
    }
}

/// A domain's life in the daemon: attach, check on schedule, re-attach on a
/// new boot, stop when cancelled or the domain is gone.
async fn domain_task(
    shared: Arc<Shared>,
    task_id: u64,
    uuid: String,
    name: String,
    mut cancel: tokio_watch::Receiver<bool>,
    reboot: Arc<tokio::sync::Notify>,
    mut commands: mpsc::Receiver<Command>,
) {
    let s = &shared.settings;
    let mut seed = seed_of(&uuid);
    let mut estimate = [Duration::from_millis(5), Duration::from_millis(50)];
    'attach: loop {
        let Some((mut w, how)) = attach(&shared, &uuid, &name, &mut cancel).await else { break };
        let boot = w.boot();
        let subject = shared.subject(&name, &uuid, &boot);
        let mut reported = shared.sink.reported_for(&uuid, &boot);
        for problem in std::mem::take(&mut w.problems) {
            shared.sink.error("baseline_file");
            let mut e = subject.event(
                EventKind::StateUnreadable,
                "critical",
                format!("{}: {}", problem.file, problem.detail),
            );
            e.key = problem.file;
            shared.sink.emit(e);
        }
        let (severity, mut detail) = attached_event(&name, &w, &how);
        let kind = match how {
            Attached::Stored | Attached::Remapped { .. } => EventKind::Attached,
            _ => EventKind::NewBoot,
        };
        if let Ok(bounds) = &w.bounds {
            detail.push_str(&format!(". Regions bounded by the kernel's layout: {bounds}"));
        }
        shared.sink.emit(subject.event(kind, severity, detail));
        if w.bounds.as_ref().is_ok_and(|b| b.contains("lower trust")) {
            shared.sink.emit(subject.event(
                EventKind::Notice,
                "warning",
                format!(
                    "{name}: no profile matches its kernel, so its text and rodata are bounded by the \
                     guest's own kallsyms, which a rootkit can rewrite; add a profile of this kernel \
                     (vigil profile build) to bound them by the vendor's image"
                ),
            ));
        }
        if let Err(why) = &w.bounds {
            shared.sink.emit(subject.event(
                EventKind::Notice,
                "warning",
                format!(
                    "{name}: kernel text and rodata are classed by page permission only ({why}): pages \
                     the kernel freed after boot may still be protected as content, and their reuse \
                     reported. Add a profile of this kernel (vigil profile build) to bound them"
                ),
            ));
        }
        if kind == EventKind::NewBoot {
            reported.clear();
        }
        // A boot still patching itself is absorbed until the window the
        // attach measured from the hypervisor's reset or start closes, or the
        // kernel has been quiet for a settle period: (window end, quiet from).
        let mut provisional_until =
            w.provisional_left.map(|left| (Instant::now() + left, Instant::now() + s.settle));
        for (region, pages) in w.pages() {
            shared
                .sink
                .metrics
                .pages_protected
                .get_or_create(&RegionLabels { domain: name.clone(), region: region.into() })
                .set(gauge(pages));
        }
        // Every violation series exists from the start, at 0, so that
        // Prometheus sees the first violation as an increase.
        let regions = w
            .pages()
            .map(|(r, _)| r.to_owned())
            .chain([crate::integrity::check::IMAGE_REGION.to_owned()]);
        for region in regions {
            for kind in ["content", "remap", "permission"] {
                let labels = ViolationLabels {
                    domain: name.clone(),
                    region: region.clone(),
                    kind: kind.into(),
                };
                let _ = shared.sink.metrics.violations.get_or_create(&labels);
            }
        }
        let labels = ViolationLabels {
            domain: name.clone(),
            region: crate::integrity::check::REGISTER_REGION.into(),
            kind: "register".into(),
        };
        let _ = shared.sink.metrics.violations.get_or_create(&labels);
        shared.set_status(&uuid, |st| {
            st.state = if provisional_until.is_some() { "provisional" } else { "watching" }.into();
            st.detail = String::new();
            st.boot = boot.clone();
        });
        let mut times = Timetable::starting(Instant::now());
        let mut last_error = String::new();
        let mut profile_said = false;
        let mut last_evidence: Option<Instant> = None;
        loop {
            let due = times.due();
            let mut forced: Option<Command> = None;
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = cancel.changed() => break 'attach,
                _ = reboot.notified() => {
                    // A wake-up left over from a reset the last attach
                    // already answered is no reset.
                    if shared.knowledge(&uuid).reset_reported.is_none() {
                        continue;
                    }
                    shared.set_status(&uuid, |st| { st.state = "waiting".into(); st.detail = "guest rebooted".into(); });
                    tokio::time::sleep(s.attach_retry).await;
                    continue 'attach;
                }
                Some(cmd) = commands.recv() => forced = Some(cmd),
            }
            if let Some(Command::Diff(reply)) = forced {
                let sh = shared.clone();
                let (back, r) = blocking(w, move |w| w.diff(&sh.profiles)).await;
                w = back;
                let _ = reply.send(
                    r.map(|d| serde_json::to_value(&d).unwrap_or_default())
                        .map_err(|e| e.message()),
                );
                continue;
            }
            if let Some(Command::Accept(req)) = forced {
                let (back, accepted) = accept::run(&shared, w, &name, &uuid, req).await;
                w = back;
                if accepted {
                    reported.clear();
                }
                continue;
            }
            let now = Instant::now();
            // While a new baseline is provisional every check is full, so a
            // settling boot is seen settling as soon as it does.
            let full = forced.is_some()
                || times.full_at(now, s.hot_interval)
                || provisional_until.is_some();
            let scope = if full { Scope::Full } else { Scope::Hot };
            let est = estimate[usize::from(full)];
            let wait = shared.budget.reserve(est);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
                let late = Instant::now().duration_since(due);
                let interval = if full { s.full_interval } else { s.hot_interval };
                if late > interval / 2 {
                    shared.sink.metrics.budget_overruns.inc();
                    shared.budget_exceeded(&name, &uuid, late, interval);
                }
            }
            let started = Instant::now();
            let sh = shared.clone();
            let job = blocking(w, move |w| w.check(scope, &sh.profiles));
            let (back, result) =
                time_limited(&shared, &subject, &name, if full { "full" } else { "hot" }, job)
                    .await;
            w = back;
            // A check that ran across a reset libvirt reported read the old
            // kernel going and the new one coming: not a finding. Attach
            // again, as the reset asks.
            if shared.knowledge(&uuid).reset_reported.is_some_and(|t| t >= started) {
                if let Some(Command::CheckNow(reply)) = forced {
                    let _ = reply.send(Err(format!("{name} was reset during the check")));
                }
                tokio::time::sleep(s.attach_retry).await;
                continue 'attach;
            }
            let took = started.elapsed().saturating_sub(w.take_waited());
            estimate[usize::from(full)] = took;
            let ratio = shared.budget.settle(est, took);
            let m = &shared.sink.metrics;
            m.budget_used.set(ratio);
            // Those of the attach and of re-taken baselines too, which come
            // before a check.
            m.register_snapshots
                .get_or_create(&DomainLabels { domain: name.clone() })
                .inc_by(w.take_register_snapshots());
            let scope_name = if full { "full" } else { "hot" };
            times.checked(
                full,
                Instant::now(),
                (s.hot_interval, s.full_interval, s.jitter),
                &mut seed,
            );
            let reply = match forced {
                Some(Command::CheckNow(reply)) => Some(reply),
                _ => None,
            };
            match result {
                Ok(report) => {
                    last_error.clear();
                    if !profile_said {
                        profile_said = true;
                        let (sev, detail) = match &report.profile {
                            Some(p) => (
                                "info",
                                format!(
                                    "{name} runs kernel {p}: syscall tables and IDT gates are checked by symbol"
                                ),
                            ),
                            None => (
                                "warning",
                                format!(
                                    "no guest profile in {} matches the kernel of {name}: page, mapping and register checks only",
                                    s.profiles
                                        .iter()
                                        .map(|p| p.display().to_string())
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                ),
                            ),
                        };
                        shared.sink.emit(subject.event(EventKind::Notice, sev, detail));
                    }
                    m.checks
                        .get_or_create(&CheckLabels {
                            domain: name.clone(),
                            scope: scope_name.into(),
                        })
                        .inc();
                    m.check_duration
                        .get_or_create(&ScopeLabels { scope: scope_name.into() })
                        .observe(took.as_secs_f64());
                    m.bytes_verified
                        .get_or_create(&DomainLabels { domain: name.clone() })
                        .inc_by(report.bytes_verified);
                    let unix = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0);
                    m.last_check.get_or_create(&DomainLabels { domain: name.clone() }).set(unix);
                    // While a new boot settles, the kernel may still be patching
                    // itself: such changes are taken into the baseline, each
                    // listed with its digest in an info event, until the
                    // window the attach opened closes.
                    if let Some((until, quiet)) = provisional_until {
                        let all: Vec<_> =
                            report.violations.iter().chain(&report.info).cloned().collect();
                        if !all.is_empty() && Instant::now() < until {
                            let absorbed: Vec<String> = alerts::groups(&all)
                                .iter()
                                .map(|(key, digest, fs)| {
                                    format!("{key} ({} finding(s), digest {digest})", fs.len())
                                })
                                .collect();
                            let digest =
                                blake3::hash(absorbed.join("\n").as_bytes()).to_hex().to_string();
                            let (back, r) = blocking(w, |w| w.rebaseline()).await;
                            w = back;
                            let detail = match r {
                                Ok(()) => format!(
                                    "{name} was still changing while its new boot settled; absorbed into a re-taken baseline: {}",
                                    absorbed.join("; ")
                                ),
                                Err(e) => format!(
                                    "{name} was still changing while its new boot settled ({}); re-taking the baseline failed: {}",
                                    absorbed.join("; "),
                                    e.message()
                                ),
                            };
                            let mut a = subject.event(EventKind::Notice, "info", detail);
                            a.digest = digest;
                            shared.sink.emit(a);
                            provisional_until = Some((until, Instant::now() + s.settle));
                            if let Some(r) = reply {
                                let _ =
                                    r.send(Ok(serde_json::to_value(&report).unwrap_or_default()));
                            }
                            continue;
                        }
                        let now = Instant::now();
                        if full && (now >= quiet || now >= until) {
                            provisional_until = None;
                            shared.set_status(&uuid, |st| st.state = "watching".into());
                        }
                    }
                    if !report.patches.is_empty() {
                        let mut parts = Vec::new();
                        for (kind, n) in &report.patches {
                            m.patches
                                .get_or_create(&PatchLabels {
                                    domain: name.clone(),
                                    kind: kind.clone(),
                                })
                                .inc_by(*n);
                            parts.push(format!("{n} {kind}"));
                        }
                        shared.sink.emit(subject.event(
                            EventKind::KernelPatched,
                            "info",
                            format!(
                                "{name} patched its own text: {} site change(s) accepted ({}); {} site(s) differ from the baseline now",
                                report.patches.values().sum::<u64>(),
                                parts.join(", "),
                                report.patched_sites
                            ),
                        ));
                    }
                    if full {
                        m.patched_sites
                            .get_or_create(&DomainLabels { domain: name.clone() })
                            .set(i64::try_from(report.patched_sites).unwrap_or(i64::MAX));
                    }
                    for ev in std::mem::take(&mut w.session.module_events) {
                        let detail = if ev.loaded {
                            format!(
                                "module {} loaded at {:#x}: {} page(s) of its text protected from now on",
                                ev.name, ev.base, ev.text_pages
                            )
                        } else {
                            format!("module {} unloaded from {:#x}", ev.name, ev.base)
                        };
                        let kind = if ev.loaded {
                            EventKind::ModuleLoaded
                        } else {
                            EventKind::ModuleUnloaded
                        };
                        shared.sink.emit(subject.event(kind, "info", detail));
                    }
                    let all: Vec<_> =
                        report.violations.iter().chain(&report.info).cloned().collect();
                    let groups = alerts::groups(&all);
                    let (fresh, gone) = alerts::news(&visible(&reported, &report), &groups);
                    // Evidence of new violations, at most once per min_interval.
                    let evidence = s.evidence.clone().filter(|e| {
                        fresh.iter().any(|(_, _, fs)| {
                            fs[0].severity == crate::integrity::Severity::Violation
                        }) && last_evidence.is_none_or(|t| t.elapsed() >= e.min_interval)
                    });
                    let bundle =
                        evidence.as_ref().map(|_| evidence::bundle_dir(&s.state_dir, &uuid));
                    let mut for_evidence = Vec::new();
                    for (key, digest, fs) in fresh {
                        let mut a = subject.group(key, digest, fs);
                        if a.event == EventKind::Violation
                            && let Some(dir) = &bundle
                        {
                            a.evidence = Some(dir.display().to_string());
                            for_evidence.push(a.key.clone());
                        }
                        reported.insert(a.key.clone(), a.digest.clone());
                        shared.sink.emit(a);
                    }
                    if let (Some(cfg), Some(dir)) = (evidence, bundle) {
                        last_evidence = Some(Instant::now());
                        let sh = shared.clone();
                        let (back, out) = blocking(w, move |w| {
                            evidence::save(w, &sh.profiles, &cfg, &dir, for_evidence)
                        })
                        .await;
                        w = back;
                        report_evidence(&shared, &subject, &out);
                    }
                    for key in gone {
                        let mut a = subject.event(
                            EventKind::Reverted,
                            "info",
                            format!("{key} is as in the baseline again"),
                        );
                        a.key = key.clone();
                        reported.remove(&key);
                        shared.sink.emit(a);
                    }
                    let open = reported.len();
                    let when = crate::integrity::baseline::now_rfc3339();
                    shared.set_status(&uuid, |st| {
                        st.last_check = when;
                        st.open_violations = open;
                    });
                    if let Some(r) = reply {
                        let _ = r.send(Ok(serde_json::to_value(&report).unwrap_or_default()));
                    }
                }
                Err(e) if e.domain_gone() => {
                    if let Some(r) = reply {
                        let _ = r.send(Err(e.message()));
                    }
                    // Lost without a stop event (or before it arrived): say so,
                    // unless the stop event's handling already did.
                    shared.retire(
                        &uuid,
                        Some(task_id),
                        &name,
                        &format!("domain lost: {}", e.message()),
                    );
                    break 'attach;
                }
                Err(e) => {
                    shared.sink.error(e.kind());
                    let msg = e.message();
                    if msg != last_error {
                        shared.sink.emit(subject.event(
                            EventKind::Error,
                            "warning",
                            format!("checking {name} failed: {msg}"),
                        ));
                        last_error = msg.clone();
                    }
                    if let Some(r) = reply {
                        let _ = r.send(Err(msg));
                    }
                    if matches!(e, WatchError::Discover(_) | WatchError::Libvirt(_)) {
                        // The kernel vanished from its page tables (a reset in
                        // progress), or libvirt went away and came back on a new
                        // connection: attach again, with the stored baseline.
                        tokio::time::sleep(s.attach_retry).await;
                        continue 'attach;
                    }
                }
            }
        }
    }
    // Ended by itself (the domain is gone) or cancelled: forget it, unless a
    // newer task for the same domain has taken its place meanwhile, so that a
    // resync can start it again if it does run.
    let mut tasks = shared.tasks.lock().expect("tasks lock");
    if tasks.get(&uuid).is_some_and(|t| t.id == task_id) {
        tasks.remove(&uuid);
        shared.status.lock().expect("status lock").remove(&uuid);
    }
    shared.sink.metrics.attached.set(gauge(tasks.len()));
}

/// How long after the hypervisor reported a start or reset a new baseline
/// stays provisional at most: twelve settle periods (a minute by default).
fn provisional_window(s: &Settings) -> Duration {
    s.settle * 12
}

/// The event an attach ends with: its severity and sentence.
fn attached_event(name: &str, w: &Watched, how: &Attached) -> (&'static str, String) {
    let path = w.path.display();
    let boot = w.boot();
    let settling = match w.provisional_left {
        Some(left) => format!(
            "; provisional for up to {}s while the new kernel patches itself (changes then are absorbed and listed)",
            left.as_secs()
        ),
        None => String::new(),
    };
    match how {
        Attached::Stored => (
            "info",
            format!("attached {name}: checking against the stored baseline of this boot ({path})"),
        ),
        Attached::Remapped { then, now } => (
            "warning",
            format!(
                "attached {name}: its kernel code is not all where the stored baseline has it (image at {now}; \
                 {then} in the baseline), and the hypervisor reported no reboot: checking against the stored \
                 baseline ({path}), so every moved page is a remap violation"
            ),
        ),
        Attached::NewBoot { why } => (
            "info",
            format!("attached {name}: new baseline of boot {boot} taken ({path}): {why}{settling}"),
        ),
        Attached::FirstSight => (
            "info",
            format!(
                "attached {name}: first baseline of boot {boot} taken ({path}), trusted on first use{settling}"
            ),
        ),
        Attached::Unconfirmed { then, now, why, kept } => (
            "warning",
            format!(
                "attached {name}: its kernel image moved from {then} to {now}, a new boot that the hypervisor \
                 cannot confirm: {why}. New baseline of boot {boot} taken ({path}); the earlier one: {kept}. \
                 If nobody restarted the guest while vigil was not watching, treat it as compromised"
            ),
        ),
        Attached::Replaced => (
            "warning",
            format!(
                "attached {name}: new baseline of boot {boot} taken ({path}) in place of a stored one that \
                 could not be used; trusted on first use"
            ),
        ),
    }
}

/// Says what an evidence bundle holds, as an event and in the metrics.
fn report_evidence(shared: &Shared, subject: &alerts::Subject, out: &evidence::Outcome) {
    let m = &out.manifest;
    let files: Vec<String> =
        m.files.iter().map(|f| format!("{} ({} KiB)", f.name, f.bytes.div_ceil(1024))).collect();
    let skipped: Vec<String> =
        m.skipped.iter().map(|k| format!("{}: {}", k.what, k.reason)).collect();
    let (severity, detail) = match &out.failed {
        Some(why) => ("warning", format!("evidence of {} could not be saved: {why}", m.domain)),
        None if skipped.is_empty() => (
            "info",
            format!(
                "evidence of {} saved in {}: {}",
                m.domain,
                out.dir.display(),
                files.join(", ")
            ),
        ),
        None => (
            "warning",
            format!(
                "evidence of {} saved in part: {}; not saved: {}",
                m.domain,
                if files.is_empty() { "nothing".into() } else { files.join(", ") },
                skipped.join("; ")
            ),
        ),
    };
    if out.failed.is_some() || !skipped.is_empty() {
        shared.sink.error("evidence");
    }
    if out.failed.is_none() {
        shared
            .sink
            .metrics
            .evidence_saved
            .get_or_create(&DomainLabels { domain: m.domain.clone() })
            .inc();
        shared.sink.metrics.evidence_bytes.set(gauge(out.total_bytes));
    }
    let mut a = subject.event(EventKind::EvidenceSaved, severity, detail);
    a.evidence = Some(out.dir.display().to_string());
    shared.sink.emit(a);
}

/// The reported groups a check could see again: those of the regions it
/// covered (a hot check does not look at text pages, so it must not call
/// their changes reverted).
fn visible(
    reported: &HashMap<String, String>,
    report: &crate::integrity::Report,
) -> HashMap<String, String> {
    reported
        .iter()
        .filter(|(k, _)| {
            let region = k.split('/').next().unwrap_or("");
            report.regions.iter().any(|r| r.name == region)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
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
                state: "waiting".into(),
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
        // A panic in a domain's task (a parser bug on hostile guest memory)
        // must not leave the domain silently unwatched: report it and retire
        // the task, so that the next resync (every 5 s) starts a new one.
        let (me, uuid, name) = (self.clone(), uuid.to_owned(), name.to_owned());
        tokio::spawn(async move {
            if let Some(why) = panicked(task).await {
                me.sink.error("task_panicked");
                me.sink.emit(me.subject(&name, &uuid, "").event(
                    EventKind::Error,
                    "warning",
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
        self.sink.emit(self.subject(name, uuid, "").event(kind, "info", detail));
    }

    fn stop_task(&self, uuid: &str, name: &str, why: &str) {
        let watched = self.tasks.lock().expect("tasks lock").contains_key(uuid);
        if !watched && self.just_let_go(uuid) {
            // Let go already, when a check found it gone: libvirt's word
            // on why it went still belongs in the log.
            self.sink.emit(self.subject(name, uuid, "").event(
                EventKind::Notice,
                "info",
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
                "info",
                format!("detached {name}: {why}"),
            ));
            for region in ["kernel-text", "kernel-rodata"] {
                self.sink
                    .metrics
                    .pages_protected
                    .get_or_create(&RegionLabels { domain: name.into(), region: region.into() })
                    .set(0);
            }
        }
        self.sink.metrics.attached.set(gauge(tasks.len()));
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
    let metrics = Metrics::new();
    let reported = AlertLog::reported(&settings.alert_log)?;
    let log = AlertLog::open_rotating(&settings.alert_log, settings.alert_rotation)?;
    let mut pushers = Vec::new();
    for (ep, is_am) in [(settings.alertmanager.clone(), true), (settings.webhook.clone(), false)] {
        if let Some(ep) = ep {
            let (tx, rx) = mpsc::channel(push::QUEUE);
            let cursor = push::cursor_path(&settings.state_dir, is_am);
            let log = settings.alert_log.clone();
            tokio::spawn(push::run(ep, is_am, log, cursor, rx, metrics.clone()));
            pushers.push((is_am, tx));
        }
    }
    let listener = tokio::net::TcpListener::bind(settings.metrics_listen)
        .await
        .map_err(|source| DaemonError::Metrics { addr: settings.metrics_listen, source })?;
    tokio::spawn(metrics::serve(listener, metrics.clone()));
    let control_listener = control::bind(&settings.control_socket, &settings.control_group)?;
    let (profiles, refused) = crate::linux::profile::load_dir(&settings.profiles);
    for (path, why) in &refused {
        warn_line!("vigil: warning: guest profile {} refused: {why}", path.display());
    }
    let shared = Arc::new(Shared {
        budget: Budget::new(settings.cpu_budget),
        sink: Sink {
            log: Mutex::new(log),
            reported: Mutex::new(reported),
            metrics,
            pushers,
            log_failing: false.into(),
        },
        status: Mutex::new(HashMap::new()),
        profiles: profiles.into(),
        hv: RwLock::new(None),
        tasks: Mutex::new(HashMap::new()),
        knowledge: Mutex::new(HashMap::new()),
        budget_event: Mutex::new(None),
        let_go: Mutex::new(HashMap::new()),
        settings,
    });
    tokio::spawn(control::serve(control_listener, shared.clone()));

    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Signals)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(DaemonError::Signals)?;
    let mut resync = tokio::time::interval(Duration::from_secs(5));
    let watchdog = sd_notify::watchdog_enabled().map(|d| d / 2);
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let mut ready = false;
    let mut libvirt_down_since: Option<Instant> = None;
    let host_subject = shared.subject("", "", "");
    loop {
        tokio::select! {
            _ = resync.tick() => {
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
                                shared.sink.emit(host_subject.event(EventKind::Notice, "info", format!("reconnected to libvirt at {}", shared.settings.connect)));
                            }
                        }
                        Err(e) => {
                            if libvirt_down_since.is_none() {
                                shared.sink.error("libvirt");
                                shared.sink.emit(host_subject.event(EventKind::Error, "warning", format!("libvirt unreachable, retrying: {}", error_chain(&e))));
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
        AlertLog, EventKind, Reported, Rotation, Subject, rotated_path, state_path,
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

    /// libvirt's pause and stop events for a domain that a check already
    /// found gone (a migration's end) still reach the log with libvirt's
    /// reason; those for a domain never watched do not.
    #[test]
    fn libvirt_events_after_a_domain_is_let_go_still_say_why() {
        use std::collections::HashMap;
        use std::sync::{Arc, Mutex, RwLock};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let settings = super::Settings::load(None, &super::config::Overrides::default()).unwrap();
        let rotation = Rotation { max_bytes: 1 << 20, keep: 1 };
        let shared = super::Shared {
            budget: super::Budget::new(1.0),
            sink: Sink {
                log: Mutex::new(AlertLog::open_rotating(&path, rotation).unwrap()),
                reported: Mutex::new(Reported::default()),
                metrics: Metrics::new(),
                pushers: Vec::new(),
                log_failing: false.into(),
            },
            status: Mutex::new(HashMap::new()),
            profiles: Arc::from(Vec::new()),
            hv: RwLock::new(None),
            tasks: Mutex::new(HashMap::new()),
            knowledge: Mutex::new(HashMap::new()),
            budget_event: Mutex::new(None),
            let_go: Mutex::new(HashMap::new()),
            settings,
        };
        let (cancel, _cancel_rx) = tokio::sync::watch::channel(false);
        let (commands, _commands_rx) = tokio::sync::mpsc::channel(1);
        let reboot = Arc::new(tokio::sync::Notify::new());
        shared
            .tasks
            .lock()
            .unwrap()
            .insert("u1".into(), super::Task { id: 7, cancel, reboot, commands });
        // The check finds it gone first; libvirt's events follow.
        shared.retire("u1", Some(7), "g1", "domain lost: no such domain");
        shared.note_run_state("u1", "g1", EventKind::Paused, "paused for the end of a migration");
        shared.stop_task("u1", "g1", "the domain migrated to another host");
        // A domain never watched: nothing.
        shared.note_run_state("u2", "g2", EventKind::Paused, "paused by request");
        shared.stop_task("u2", "g2", "the domain was destroyed");
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
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
        let sink = Sink {
            log: std::sync::Mutex::new(AlertLog::open_rotating(&path, rotation).unwrap()),
            reported: std::sync::Mutex::new(Reported::default()),
            metrics: Metrics::new(),
            pushers: Vec::new(),
            log_failing: false.into(),
        };
        let s =
            Subject { host: "h".into(), domain: "d".into(), uuid: "u".into(), boot: "b".into() };
        let event = |i: usize| s.event(EventKind::Attached, "info", format!("event {i}"));
        // A directory where the state file goes: the rotation cannot keep
        // the state, so it does not happen.
        std::fs::create_dir(state_path(&path)).unwrap();
        for i in 0..10 {
            assert!(sink.emit(event(i)), "event {i} not logged");
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
        assert!(sink.emit(event(10)));
        assert_eq!((lines(&rotated_path(&path, 1)), lines(&path)), (11, 0));
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
