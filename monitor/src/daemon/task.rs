//! One watched domain's task: attach, the schedule of hot and full checks,
//! what each check's report becomes (metrics, events, evidence), re-attach
//! and let go.

use super::control::Answer;
use super::*;
use crate::linux::KernelReport;

/// When a domain's next hot and full checks are due.
pub(super) struct Timetable {
    pub(super) next_hot: Instant,
    pub(super) next_full: Instant,
}

impl Timetable {
    /// Both checks due at once (a full one, which covers the hot one).
    pub(super) fn starting(now: Instant) -> Self {
        Self { next_hot: now, next_full: now }
    }

    pub(super) fn due(&self) -> Instant {
        self.next_hot.min(self.next_full)
    }

    /// Whether the check due at `now` is a full one: its time has come, or
    /// it comes in less than half a hot interval. A hot check then would
    /// be followed at once by the full one, which covers it: with both
    /// intervals 1 s and jitter, half the full checks came a moment after
    /// a hot check, each check paying for its register snapshot (a libvirt
    /// and QEMU round trip) on the host the guest shares.
    pub(super) fn full_at(&self, now: Instant, hot_interval: Duration) -> bool {
        now >= self.next_full || self.next_full - now < hot_interval / 2
    }

    /// Sets the next times after a check (full or hot) ending at `now`,
    /// from the hot and full intervals and the jitter.
    pub(super) fn checked(
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

    /// Brings the next full check forward to `at` (when a held patch site's
    /// hold ends: that check reports it if it still disagrees), or to `now`
    /// if that has passed while the check ran.
    pub(super) fn settle_by(&mut self, at: Option<Instant>, now: Instant) {
        if let Some(at) = at {
            self.next_full = self.next_full.min(at.max(now));
        }
    }
}

/// A little randomness for jitter, without a dependency.
pub(super) fn jittered(base: Duration, jitter: f64, seed: &mut u64) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    let unit = (*seed >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
    base.mul_f64(1.0 + jitter * (2.0 * unit - 1.0))
}

pub(super) fn seed_of(text: &str) -> u64 {
    let h = blake3::hash(format!("{text}{:?}", Instant::now()).as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) | 1
}

/// Waits for a task to end; its panic message if it panicked.
pub(super) async fn panicked(task: tokio::task::JoinHandle<()>) -> Option<String> {
    let e = task.await.err().filter(tokio::task::JoinError::is_panic)?;
    Some(crate::panic_message(&*e.into_panic()))
}

/// How much longer than `schedule.check_timeout` one stage of a check may
/// run before the check is reported as overlong: a check stops between its
/// stages once past the timeout (its error counted as `limit_check_time`),
/// but a stage itself cannot be cut short.
pub(super) const STAGE_SLACK: Duration = Duration::from_secs(5);

/// Awaits a check, reporting one that runs past `schedule.check_timeout`
/// and [`STAGE_SLACK`]: an error event, `limit_check_time` in
/// `vigil_errors_total`, and a notice when it ends. It is then waited for,
/// since a blocking thread reading guest memory cannot be stopped; the
/// domain's next check starts after it.
pub(super) async fn time_limited<T>(
    shared: &Shared,
    subject: &Subject,
    name: &str,
    scope: &str,
    job: impl std::future::Future<Output = (Watched, T)>,
) -> (Watched, T) {
    let limit = shared.settings.check_timeout + STAGE_SLACK;
    let started = Instant::now();
    tokio::pin!(job);
    match tokio::time::timeout(limit, &mut job).await {
        Ok(done) => done,
        Err(_) => {
            shared.sink.error("limit_check_time");
            shared.sink.emit(subject.event(
                EventKind::Error,
                AlertSeverity::Warning,
                format!(
                    "a {scope} check of {name} has run longer than schedule.check_timeout and {STAGE_SLACK:?} \
                     more ({limit:?}) in one stage; the domain's next check waits for it"
                ),
            ));
            let done = job.await;
            shared.sink.emit(subject.event(
                EventKind::Notice,
                AlertSeverity::Info,
                format!("the overlong {scope} check of {name} ended after {:?}", started.elapsed()),
            ));
            done
        }
    }
}

/// The guest memory budget of a check: its use as a gauge; a refused read
/// counted (`limit_memory`) at each check, and said in a critical error
/// event once for the watch (a check that reads fewer tables fits again,
/// and the forgery is still there).
fn report_guest_memory(
    shared: &Shared,
    subject: &Subject,
    name: &str,
    k: &crate::linux::report::KernelFacts,
    said: &mut bool,
) {
    let labels = DomainLabels { domain: name.to_owned() };
    let total = k.guest_memory_held.saturating_add(k.guest_memory);
    shared.sink.metrics.guest_memory.get_or_create(&labels).set(gauge(total));
    let Some(why) = &k.guest_memory_refused else { return };
    shared.sink.error("limit_memory");
    if !*said {
        let mut a = subject.event(
            EventKind::Error,
            AlertSeverity::Critical,
            format!(
                "{name}'s kernel tables and records, with what its watch holds, pass the domain's memory \
                 budget ({why}): those past it go unread, and a change to the sites they list is judged as a \
                 write no record explains; a guest listing thousands of modules or tables of millions of \
                 entries is forging them"
            ),
        );
        a.kind = "limit_memory".into();
        *said = shared.sink.emit(a).reported();
    }
}

/// Runs one blocking step of a watched domain on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
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
pub(super) async fn attach(
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
                profiles: shared.profiles(),
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
                    w.set_module_text(shared.settings.module_text);
                    w.set_guest_memory(shared.settings.guest_memory);
                    w.set_time_limit(Some(shared.settings.check_timeout));
                    w.session.hook_policy = shared.settings.hooks.clone();
                    shared.attached(uuid, &known, w.run.clone());
                    return Some((w, attached));
                }
                Err(e) if e.domain_gone() => {
                    shared.sink.error(e.kind());
                    return None;
                }
                Err(e) => {
                    // Each failed try, whatever the reason (a guest still
                    // booting fails for a few seconds): `attach`.
                    shared.sink.error("attach");
                    let reason = e.message();
                    if reason != last_reason {
                        let detail = format!(
                            "waiting to attach {name}: {reason}; retrying every {:?}",
                            shared.settings.attach_retry
                        );
                        shared.sink.emit(shared.subject(name, uuid, "").event(
                            EventKind::Waiting,
                            AlertSeverity::Info,
                            detail.clone(),
                        ));
                        shared.set_status(uuid, |s| {
                            s.state = DomainState::Waiting;
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
/// new boot, stop when cancelled or the domain is gone. A state machine over
/// [`Phase`], one method of [`DomainTask`] per state.
pub(super) async fn domain_task(
    shared: Arc<Shared>,
    task_id: u64,
    uuid: String,
    name: String,
    cancel: tokio_watch::Receiver<bool>,
    reboot: Arc<tokio::sync::Notify>,
    commands: mpsc::Receiver<Command>,
) {
    let seed = seed_of(&uuid);
    let mut task = DomainTask {
        shared,
        task_id,
        uuid,
        name,
        cancel,
        reboot,
        commands,
        seed,
        estimate: [Duration::from_millis(5), Duration::from_millis(50)],
    };
    let mut phase = Phase::Attaching;
    loop {
        phase = match phase {
            Phase::Attaching => task.attach().await,
            Phase::Watching(w, watch) => task.watch(*w, watch).await,
            Phase::Reattaching { why } => task.reattach(why).await,
            Phase::Detached => break,
        };
    }
    task.forget();
}

/// Where a domain's task is.
enum Phase {
    /// Finding the guest's kernel and deciding its baseline.
    Attaching,
    /// Checking on schedule (provisional while [`Watch::provisional_until`]
    /// is set: a new boot still settling).
    Watching(Box<Watched>, Box<Watch>),
    /// The guest reset or its kernel vanished: attach again after a pause.
    Reattaching { why: Option<&'static str> },
    /// The domain is gone or the task was cancelled.
    Detached,
}

/// What one domain's task keeps from start to end.
struct DomainTask {
    shared: Arc<Shared>,
    task_id: u64,
    uuid: String,
    name: String,
    cancel: tokio_watch::Receiver<bool>,
    reboot: Arc<tokio::sync::Notify>,
    commands: mpsc::Receiver<Command>,
    seed: u64,
    /// How long the last hot and full checks took: what the next reserves
    /// of the CPU budget.
    estimate: [Duration; 2],
}

/// What a task keeps while it watches one boot of its guest.
struct Watch {
    subject: Subject,
    /// Keys and digests of what is reported and not reverted.
    reported: HashMap<String, String>,
    /// A boot still patching itself is absorbed until the window the
    /// attach measured from the hypervisor's reset or start closes, or the
    /// kernel has been quiet for a settle period: (window end, quiet from).
    provisional_until: Option<(Instant, Instant)>,
    times: Timetable,
    last_error: String,
    /// The profiles' generation (see [`Shared::profile_generation`]) the
    /// watch last said which profile matches under.
    profile_said: Option<u64>,
    /// The guest memory budget refused a read, and that was said (once per
    /// watch: a forgery stays for the boot).
    memory_said: bool,
    last_evidence: Option<Instant>,
}

/// What the watching loop does after a step.
enum Flow {
    Continue,
    Then(Phase),
}

impl DomainTask {
    /// Attaching: waits for the guest's kernel and its baseline, says how
    /// they were found, and starts watching.
    async fn attach(&mut self) -> Phase {
        let shared = self.shared.clone();
        let Some((mut w, how)) = attach(&shared, &self.uuid, &self.name, &mut self.cancel).await
        else {
            return Phase::Detached;
        };
        let boot = w.boot();
        let subject = shared.subject(&self.name, &self.uuid, &boot);
        let mut reported = shared.sink.reported_for(&self.uuid, &boot);
        announce_attach(&shared, &subject, &self.name, &mut w, &how, &mut reported);
        let provisional_until = w
            .provisional_left
            .map(|left| (Instant::now() + left, Instant::now() + shared.settings.settle));
        seed_series(&shared, &self.name, &w);
        shared.set_status(&self.uuid, |st| {
            st.state = match provisional_until {
                Some(_) => DomainState::Provisional,
                None => DomainState::Watching,
            };
            st.detail = String::new();
            st.boot = boot.clone();
        });
        let watch = Watch {
            subject,
            reported,
            provisional_until,
            times: Timetable::starting(Instant::now()),
            last_error: String::new(),
            profile_said: None,
            memory_said: false,
            last_evidence: None,
        };
        Phase::Watching(Box::new(w), Box::new(watch))
    }

    /// Reattaching: says why (if the status should), waits, attaches again.
    async fn reattach(&mut self, why: Option<&'static str>) -> Phase {
        if let Some(why) = why {
            self.shared.set_status(&self.uuid, |st| {
                st.state = DomainState::Waiting;
                st.detail = why.into();
            });
        }
        tokio::time::sleep(self.shared.settings.attach_retry).await;
        Phase::Attaching
    }

    /// Watching: checks when due, answers commands, until a new boot, the
    /// domain's end or cancellation.
    async fn watch(&mut self, mut w: Watched, mut watch: Box<Watch>) -> Phase {
        loop {
            let due = watch.times.due();
            let mut forced: Option<Command> = None;
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = self.cancel.changed() => return Phase::Detached,
                _ = self.reboot.notified() => {
                    // A wake-up left over from a reset the last attach
                    // already answered is no reset.
                    if self.shared.knowledge(&self.uuid).reset_reported.is_none() {
                        continue;
                    }
                    return Phase::Reattaching { why: Some("guest rebooted") };
                }
                Some(cmd) = self.commands.recv() => forced = Some(cmd),
            }
            let flow;
            (w, flow) = match forced {
                Some(Command::Diff(reply)) => {
                    let sh = self.shared.clone();
                    let (back, r) = blocking(w, move |w| w.diff(&sh.profiles())).await;
                    let _ =
                        reply.send(r.map(|d| Answer::Diff(Box::new(d))).map_err(|e| e.message()));
                    (back, Flow::Continue)
                }
                Some(Command::Accept(req)) => {
                    let (back, accepted) =
                        accept::run(&self.shared, w, &self.name, &self.uuid, req).await;
                    if accepted {
                        watch.reported.clear();
                    }
                    (back, Flow::Continue)
                }
                Some(Command::CheckNow(reply)) => self.check(w, &mut watch, due, Some(reply)).await,
                None => self.check(w, &mut watch, due, None).await,
            };
            if let Flow::Then(next) = flow {
                return next;
            }
        }
    }

    /// One check (full when asked for, due, or while provisional), within
    /// the CPU budget, and what its result becomes.
    async fn check(
        &mut self,
        w: Watched,
        watch: &mut Watch,
        due: Instant,
        reply: Option<Reply>,
    ) -> (Watched, Flow) {
        let shared = self.shared.clone();
        let s = &shared.settings;
        let now = Instant::now();
        // While a new baseline is provisional every check is full, so a
        // settling boot is seen settling as soon as it does.
        let full = reply.is_some()
            || watch.times.full_at(now, s.hot_interval)
            || watch.provisional_until.is_some();
        let scope = if full { Scope::Full } else { Scope::Hot };
        let est = self.estimate[usize::from(full)];
        let wait = shared.budget.reserve(est);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
            let late = Instant::now().duration_since(due);
            let interval = if full { s.full_interval } else { s.hot_interval };
            if late > interval / 2 {
                shared.sink.metrics.budget_overruns.inc();
                shared.budget_exceeded(&self.name, &self.uuid, late, interval);
            }
        }
        let started = Instant::now();
        let sh = shared.clone();
        let scope_name = if full { "full" } else { "hot" };
        let job = blocking(w, move |w| w.check(scope, &sh.profiles()));
        let (mut w, result) =
            time_limited(&shared, &watch.subject, &self.name, scope_name, job).await;
        // A check that ran across a reset libvirt reported read the old
        // kernel going and the new one coming: not a finding. Attach
        // again, as the reset asks.
        if shared.knowledge(&self.uuid).reset_reported.is_some_and(|t| t >= started) {
            if let Some(reply) = reply {
                let _ = reply.send(Err(format!("{} was reset during the check", self.name)));
            }
            return (w, Flow::Then(Phase::Reattaching { why: None }));
        }
        let took = started.elapsed();
        self.estimate[usize::from(full)] = took;
        let m = &shared.sink.metrics;
        m.budget_used.set(shared.budget.settle(est, took));
        // Those of the attach and of re-taken baselines too, which come
        // before a check.
        m.register_snapshots
            .get_or_create(&DomainLabels { domain: self.name.clone() })
            .inc_by(w.take_register_snapshots());
        let every = (s.hot_interval, s.full_interval, s.jitter);
        watch.times.checked(full, Instant::now(), every, &mut self.seed);
        watch.times.settle_by(w.take_patch_hold_end(), Instant::now());
        match result {
            Ok(report) => {
                count_check(m, &self.name, scope_name, took, &report.check);
                let (w, flow) = self.on_report(w, watch, &report, full).await;
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(Answer::Checked(Box::new(report))));
                }
                (w, flow)
            }
            Err(e) => (w, self.on_error(watch, &e, reply)),
        }
    }

    /// A check's report: while provisional, changes absorbed into a
    /// re-taken baseline; else accepted patches and module events said,
    /// findings grouped and reported once, evidence saved, reverts said.
    async fn on_report(
        &mut self,
        w: Watched,
        watch: &mut Watch,
        report: &KernelReport,
        full: bool,
    ) -> (Watched, Flow) {
        let shared = self.shared.clone();
        let (name, subject) = (&self.name, &watch.subject);
        watch.last_error.clear();
        // Said at the first check, and again after the profiles are
        // loaded again.
        let generation = shared.profile_generation();
        if watch.profile_said != Some(generation) {
            watch.profile_said = Some(generation);
            profile_notice(&shared, subject, name, &report.kernel);
        }
        // While a new boot settles, the kernel may still be patching
        // itself: such changes are taken into the baseline, each
        // listed with its digest in an info event, until the
        // window the attach opened closes.
        let mut w = w;
        if let Some((until, quiet)) = watch.provisional_until {
            // What differs from the vendor's image is no change while the
            // boot settles: it was there when the baseline was taken, and is
            // reported at once; so is a hook (no baseline holds hooks).
            let all: Vec<_> = report
                .check
                .violations
                .iter()
                .chain(&report.check.info)
                .filter(|f| {
                    !matches!(
                        f.kind,
                        crate::integrity::FindingKind::Reference
                            | crate::integrity::FindingKind::Hook
                    )
                })
                .cloned()
                .collect();
            if !all.is_empty() && Instant::now() < until {
                let w = absorb(&shared, subject, name, w, &all).await;
                watch.provisional_until = Some((until, Instant::now() + shared.settings.settle));
                return (w, Flow::Continue);
            }
            let now = Instant::now();
            if full && (now >= quiet || now >= until) {
                watch.provisional_until = None;
                shared.set_status(&self.uuid, |st| st.state = DomainState::Watching);
            }
        }
        report_patches(&shared, subject, name, &report.kernel, full);
        report_guest_memory(&shared, subject, name, &report.kernel, &mut watch.memory_said);
        report_module_events(&shared, subject, std::mem::take(&mut w.session.module_events));
        let all: Vec<_> =
            report.check.violations.iter().chain(&report.check.info).cloned().collect();
        let groups = alerts::groups(&all);
        if full {
            let open = groups
                .iter()
                .filter(|(_, _, fs)| fs[0].severity == crate::integrity::Severity::Violation)
                .count();
            let labels = DomainLabels { domain: name.to_owned() };
            shared.sink.metrics.open_violations.get_or_create(&labels).set(gauge(open));
        }
        let (fresh, gone) = alerts::news(&visible(&watch.reported, &report.check), &groups);
        // Evidence of new violations, at most once per min_interval.
        let s = &shared.settings;
        let evidence = s.evidence.clone().filter(|e| {
            fresh.iter().any(|(_, _, fs)| fs[0].severity == crate::integrity::Severity::Violation)
                && watch.last_evidence.is_none_or(|t| t.elapsed() >= e.min_interval)
        });
        let bundle = evidence.as_ref().map(|_| evidence::bundle_dir(&s.state_dir, &self.uuid));
        let mut for_evidence = Vec::new();
        for (key, digest, fs) in fresh {
            let mut a = subject.group(key, digest, fs);
            if a.event == EventKind::Violation
                && let Some(dir) = &bundle
            {
                a.evidence = Some(dir.display().to_string());
                for_evidence.push(a.key.clone());
            }
            // Reported once logged, or held to be: an alert neither (the log
            // failing and the memory for held alerts full) is reported
            // again by the next check that sees the change.
            let (key, digest) = (a.key.clone(), a.digest.clone());
            if shared.sink.emit(a).reported() {
                watch.reported.insert(key, digest);
            }
        }
        if let (Some(cfg), Some(dir)) = (evidence, bundle) {
            watch.last_evidence = Some(Instant::now());
            let sh = shared.clone();
            let (back, out) =
                blocking(w, move |w| evidence::save(w, &sh.profiles(), &cfg, &dir, for_evidence))
                    .await;
            w = back;
            report_evidence(&shared, subject, &out);
        }
        for key in gone {
            let mut a = subject.event(
                EventKind::Reverted,
                AlertSeverity::Info,
                format!("{key} is as in the baseline again"),
            );
            a.key = key.clone();
            if shared.sink.emit(a).reported() {
                watch.reported.remove(&key);
            }
        }
        let open = watch.reported.len();
        let when = crate::integrity::baseline::now_rfc3339();
        shared.set_status(&self.uuid, |st| {
            st.last_check = when;
            st.open_violations = open;
        });
        (w, Flow::Continue)
    }

    /// A check that failed: the domain gone ends the task; a failure is
    /// said once until it changes; a kernel that vanished from its page
    /// tables (a reset in progress) or a libvirt that came back on a new
    /// connection means attaching again, with the stored baseline.
    fn on_error(&mut self, watch: &mut Watch, e: &WatchError, reply: Option<Reply>) -> Flow {
        let shared = &self.shared;
        shared.sink.error(e.kind());
        if e.domain_gone() {
            if let Some(reply) = reply {
                let _ = reply.send(Err(e.message()));
            }
            // Lost without a stop event (or before it arrived): say so,
            // unless the stop event's handling already did.
            shared.retire(
                &self.uuid,
                Some(self.task_id),
                &self.name,
                &format!("domain lost: {}", e.message()),
            );
            return Flow::Then(Phase::Detached);
        }
        let msg = e.message();
        if msg != watch.last_error {
            // A check stopped at its time limit leaves the guest unchecked
            // (a guest can make checks slow): critical, not a warning.
            let severity = if matches!(e, WatchError::OverTime(_)) {
                AlertSeverity::Critical
            } else {
                AlertSeverity::Warning
            };
            shared.sink.emit(watch.subject.event(
                EventKind::Error,
                severity,
                format!("checking {} failed: {msg}", self.name),
            ));
            watch.last_error = msg.clone();
        }
        if let Some(reply) = reply {
            let _ = reply.send(Err(msg));
        }
        if matches!(e, WatchError::Discover(_) | WatchError::Guest(_)) {
            return Flow::Then(Phase::Reattaching { why: None });
        }
        Flow::Continue
    }

    /// Ended by itself (the domain is gone) or cancelled: forgets the
    /// domain, unless a newer task for it has taken its place meanwhile, so
    /// that a resync can start it again if it does run.
    fn forget(&self) {
        let shared = &self.shared;
        let mut tasks = shared.tasks.lock().expect("tasks lock");
        if tasks.get(&self.uuid).is_some_and(|t| t.id == self.task_id) {
            tasks.remove(&self.uuid);
            shared.status.lock().expect("status lock").remove(&self.uuid);
        }
        shared.sink.metrics.attached.set(gauge(tasks.len()));
    }
}

/// Where a forced check's answer goes.
type Reply = super::control::AnswerTo;

/// Changes seen while a new boot settles: taken into a re-taken baseline
/// and listed, with their digests, in an info event.
async fn absorb(
    shared: &Shared,
    subject: &Subject,
    name: &str,
    w: Watched,
    all: &[crate::integrity::Finding],
) -> Watched {
    let absorbed: Vec<String> = alerts::groups(all)
        .iter()
        .map(|(key, digest, fs)| format!("{key} ({} finding(s), digest {digest})", fs.len()))
        .collect();
    let digest = blake3::hash(absorbed.join("\n").as_bytes()).to_hex().to_string();
    let (w, r) = blocking(w, |w| w.rebaseline()).await;
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
    let mut a = subject.event(EventKind::Notice, AlertSeverity::Info, detail);
    a.digest = digest;
    shared.sink.emit(a);
    w
}

/// How long after the hypervisor reported a start or reset a new baseline
/// stays provisional at most: twelve settle periods (a minute by default).
pub(super) fn provisional_window(s: &Settings) -> Duration {
    s.settle * 12
}

#[cfg(test)]
mod tests {
    use super::super::tests::{logged, shared_logging_to, with_task};
    use super::*;
    use crate::watch::GuestError;

    /// A check that finds its domain gone (destroyed, migrated away between
    /// two checks, before libvirt's event arrived) is counted as
    /// `domain_lost`, answers a forced check with the reason, and retires
    /// the task with a detached event that says the domain was lost; a
    /// check failing otherwise keeps the task.
    #[tokio::test]
    async fn a_check_that_finds_the_domain_gone_counts_it_and_lets_it_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alerts.jsonl");
        let shared = Arc::new(shared_logging_to(&path));
        with_task(&shared, "u1", 7);
        let (_cancel, cancel) = tokio_watch::channel(false);
        let (_commands, commands) = mpsc::channel(1);
        let mut task = DomainTask {
            shared: shared.clone(),
            task_id: 7,
            uuid: "u1".into(),
            name: "g1".into(),
            cancel,
            reboot: Arc::new(tokio::sync::Notify::new()),
            commands,
            seed: 1,
            estimate: [Duration::ZERO; 2],
        };
        let subject =
            Subject { host: "h".into(), domain: "g1".into(), uuid: "u1".into(), boot: "b".into() };
        let mut watch = Watch {
            subject,
            reported: HashMap::new(),
            provisional_until: None,
            times: Timetable::starting(Instant::now()),
            last_error: String::new(),
            profile_said: None,
            memory_said: false,
            last_evidence: None,
        };
        let count = |kind: &str| {
            shared.sink.metrics.errors.get_or_create(&KindLabels { kind: kind.into() }).get()
        };
        let unreadable = WatchError::Guest(GuestError::Memory("a page read failed".into()));
        assert!(matches!(
            task.on_error(&mut watch, &unreadable, None),
            Flow::Then(Phase::Reattaching { .. })
        ));
        assert!(shared.tasks.lock().unwrap().contains_key("u1"), "a failed read let the domain go");
        assert_eq!((count("memory_unreadable"), count("domain_lost")), (1, 0));
        let gone =
            WatchError::Guest(GuestError::Gone("Domain not found: no domain with uuid u1".into()));
        let (reply, answer) = tokio::sync::oneshot::channel();
        assert!(matches!(
            task.on_error(&mut watch, &gone, Some(reply)),
            Flow::Then(Phase::Detached)
        ));
        assert_eq!(count("domain_lost"), 1);
        assert!(!shared.tasks.lock().unwrap().contains_key("u1"), "the lost domain's task stays");
        let answered = answer.await.unwrap().unwrap_err();
        assert!(answered.contains("no domain with uuid u1"), "{answered}");
        let said: Vec<(String, String)> = logged(&path)
            .iter()
            .map(|l| (l["event"].as_str().unwrap().into(), l["detail"].as_str().unwrap().into()))
            .collect();
        let detached =
            said.iter().find(|(e, _)| e == "detached").unwrap_or_else(|| panic!("{said:#?}"));
        assert!(
            detached.1.contains("domain lost") && detached.1.contains("no domain with uuid u1"),
            "{said:#?}"
        );
    }
}
