//! Where every alert goes: the alert log first, then the pushers; what
//! was reported, so that one attack is one alert.

use super::*;

/// A region as a metric label: a module's is `module`, whatever its name.
/// The guest names its modules, and a label value it chooses would be a
/// series it makes (one per name, as many as it likes); the alert names
/// the module.
pub(super) fn metric_region(region: &str) -> &str {
    if Region::is_module(region) { "module" } else { region }
}

/// Alerts held in memory, at most, while the alert log cannot take them.
pub const HELD_MAX: usize = 10_000;

/// What became of an alert handed to [`Sink::emit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emitted {
    /// In the alert log, fsynced, after every alert held before it.
    Logged,
    /// The log cannot take it now: held in memory, in order, and logged
    /// before any later alert once the log takes alerts again (tried at
    /// every alert and every few seconds). Pushed meanwhile as it is.
    Held,
    /// Neither logged nor held ([`HELD_MAX`] alerts already are): counted
    /// as error `alert_dropped`, and not reported, so that the check that
    /// sees the same change again reports it again.
    Dropped,
}

impl Emitted {
    /// Whether the alert counts as reported: logged, or held to be.
    pub fn reported(self) -> bool {
        self != Emitted::Dropped
    }
}

/// The event that says the alert log stopped taking alerts.
fn unlogged_event(host: &str, e: &alerts::AlertLogError) -> Alert {
    let host = Subject { host: host.to_owned(), ..Subject::default() };
    host.event(
        EventKind::Error,
        AlertSeverity::Warning,
        format!(
            "the alert log cannot take alerts ({}); they are held in memory (up to {HELD_MAX}) and pushed, and logged once it can",
            error_chain(e)
        ),
    )
}

/// Where every alert goes; shared by all tasks.
pub struct Sink {
    log: Mutex<AlertLog>,
    /// Alerts the log has not taken yet, oldest first.
    held: Mutex<std::collections::VecDeque<Alert>>,
    pub(super) reported: Mutex<Reported>,
    pub metrics: Arc<Metrics>,
    pub(super) pushers: Vec<(bool, mpsc::Sender<push::Wake>)>,
    /// The alert log's last append failed (full or read-only state
    /// directory): said once as an event when it starts and when it ends.
    log_failing: std::sync::atomic::AtomicBool,
}

impl Sink {
    pub fn new(
        log: AlertLog,
        reported: Reported,
        metrics: Arc<Metrics>,
        pushers: Vec<(bool, mpsc::Sender<push::Wake>)>,
    ) -> Self {
        Sink {
            log: Mutex::new(log),
            held: Mutex::new(std::collections::VecDeque::new()),
            reported: Mutex::new(reported),
            metrics,
            pushers,
            log_failing: false.into(),
        }
    }

    /// Appends what is held, in order, then `alert`; rotates once after.
    /// On a failure, `alert` is held after what already is (if there is
    /// room), all under the log's lock, so that no other alert gets between;
    /// the first failure after the log worked holds the failure's own
    /// event first. Returns how many held alerts were logged, what became
    /// of `alert`, and the failure event to announce, if one began.
    fn log_in_order(&self, alert: Option<&Alert>, host: &str) -> (usize, Emitted, Option<Alert>) {
        use std::sync::atomic::Ordering;
        let mut log = self.log.lock().expect("alert log lock");
        let mut held = self.held.lock().expect("held alerts lock");
        let mut logged = 0;
        let mut result = Ok(());
        while let Some(a) = held.front() {
            if let Err(e) = log.append(a) {
                result = Err(e);
                break;
            }
            held.pop_front();
            logged += 1;
        }
        if result.is_ok()
            && let Some(a) = alert
        {
            result = log.append(a);
        }
        let mut announce = None;
        let outcome = match result {
            Ok(()) => Emitted::Logged,
            Err(e) => {
                warn_line!("vigil: error: {}", error_chain(&e));
                self.error("alert_log");
                if !self.log_failing.swap(true, Ordering::SeqCst) {
                    let failure = unlogged_event(host, &e);
                    if held.len() < HELD_MAX {
                        held.push_back(failure.clone());
                        self.count(&failure);
                    } else {
                        self.error("alert_dropped");
                    }
                    announce = Some(failure);
                }
                match alert {
                    Some(a) if held.len() < HELD_MAX => {
                        held.push_back(a.clone());
                        Emitted::Held
                    }
                    Some(_) => {
                        self.error("alert_dropped");
                        Emitted::Dropped
                    }
                    None => Emitted::Held,
                }
            }
        };
        self.metrics.alerts_held.set(gauge(held.len()));
        drop(held);
        // Rotating may fail (the directory read-only, say) after the
        // alerts are safely logged: said, counted, and tried again next time.
        if (logged > 0 || (alert.is_some() && outcome == Emitted::Logged))
            && let Err(e) = log.rotate_if_due()
        {
            warn_line!("vigil: warning: rotating the alert log: {}", error_chain(&e));
            self.error("alert_log_rotate");
        }
        (logged, outcome, announce)
    }

    /// Says that the log takes alerts again, once, after it failed.
    fn recovered(&self, host: &str, held: usize) {
        use std::sync::atomic::Ordering;
        if self.log_failing.swap(false, Ordering::SeqCst) {
            let host = Subject { host: host.to_owned(), ..Subject::default() };
            self.emit(host.event(
                EventKind::Notice,
                AlertSeverity::Info,
                format!(
                    "the alert log takes alerts again: {held} alert(s) held meanwhile are logged"
                ),
            ));
        }
    }

    /// Logs what is held, if the log takes it now (called every few
    /// seconds, so that held alerts do not wait for the next alert).
    pub fn flush_held(&self, host: &str) {
        let (logged, outcome, announce) = self.log_in_order(None, host);
        if let Some(failure) = announce {
            self.announce_unlogged(&failure);
        }
        if outcome == Emitted::Logged {
            self.recovered(host, logged);
        }
    }

    /// Records an alert: the alert log first (fsynced, after whatever is
    /// held), else held in memory; then stdout, metrics and the push queues.
    pub fn emit(&self, alert: Alert) -> Emitted {
        let (logged_held, outcome, announce) = self.log_in_order(Some(&alert), &alert.host);
        if let Some(failure) = announce {
            self.announce_unlogged(&failure);
        }
        if outcome == Emitted::Logged {
            self.recovered(&alert.host, logged_held);
        }
        out_line!("{}", serde_json::to_string(&alert).expect("alerts serialise"));
        if outcome.reported() {
            self.count(&alert);
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
            if outcome == Emitted::Logged {
                // The pusher reads it from the log; a wake-up lost to a full
                // queue is made up by the next one, or the pusher's timer.
                let _ = q.try_send(push::Wake::Logged);
            } else if (!*is_am || push::for_alertmanager(&alert))
                && q.try_send(push::Wake::Unlogged(Box::new(alert.clone()))).is_err()
            {
                self.error("push_queue_full");
            }
        }
        outcome
    }

    /// The events and violations counters, for an alert reported.
    fn count(&self, alert: &Alert) {
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
                    region: metric_region(&alert.region).into(),
                    kind: alert.kind.clone(),
                })
                .inc();
        }
    }

    /// The alert log failing, as an event (held already): to stdout and
    /// the push sinks at once.
    fn announce_unlogged(&self, failure: &Alert) {
        out_line!("{}", serde_json::to_string(failure).expect("alerts serialise"));
        for (is_am, q) in &self.pushers {
            if (!*is_am || push::for_alertmanager(failure))
                && q.try_send(push::Wake::Unlogged(Box::new(failure.clone()))).is_err()
            {
                self.error("push_queue_full");
            }
        }
    }

    pub(super) fn reported_for(&self, uuid: &str, boot: &str) -> HashMap<String, String> {
        self.reported
            .lock()
            .expect("reported lock")
            .get(&(uuid.to_owned(), boot.to_owned()))
            .cloned()
            .unwrap_or_default()
    }

    pub(super) fn error(&self, kind: &str) {
        self.metrics.errors.get_or_create(&KindLabels { kind: kind.into() }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::alerts::{Rotation, Subject};

    fn violation(s: &Subject, key: &str) -> Alert {
        let mut a = s.event(EventKind::Violation, AlertSeverity::Critical, format!("change {key}"));
        a.key = key.into();
        a.digest = format!("digest-{key}");
        a
    }

    /// The log failing (a file that is always full): alerts are held, in
    /// order, the failure first, and reported; once the log takes alerts,
    /// what is held is logged before the next; with the memory for held
    /// alerts full, an alert is dropped, counted, and not reported.
    #[test]
    fn alerts_the_log_cannot_take_are_held_in_order_and_dropped_only_when_memory_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let full = dir.path().join("full.jsonl");
        std::os::unix::fs::symlink("/dev/full", &full).unwrap();
        let rotation = Rotation { max_bytes: 1 << 30, keep: 1 };
        let open = |p: &std::path::Path| AlertLog::open_rotating(p, rotation).unwrap();
        let sink = Sink::new(open(&full), Reported::default(), Metrics::new(), Vec::new());
        let s =
            Subject { host: "h".into(), domain: "d".into(), uuid: "u".into(), boot: "b".into() };
        let reported = |sink: &Sink, key: &str| sink.reported_for("u", "b").contains_key(key);
        let count = |sink: &Sink, kind: &str| {
            sink.metrics.errors.get_or_create(&KindLabels { kind: kind.into() }).get()
        };

        assert_eq!(sink.emit(violation(&s, "a")), Emitted::Held);
        assert_eq!(sink.emit(violation(&s, "b")), Emitted::Held);
        assert!(reported(&sink, "a") && reported(&sink, "b"));
        assert_eq!(sink.metrics.alerts_held.get(), 3, "the failure and both violations");
        assert_eq!(count(&sink, "alert_log"), 2);

        // The log takes alerts again.
        let path = dir.path().join("alerts.jsonl");
        *sink.log.lock().unwrap() = open(&path);
        assert_eq!(sink.emit(violation(&s, "c")), Emitted::Logged);
        let lines: Vec<Alert> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let said: Vec<&str> = lines.iter().map(|a| a.detail.as_str()).collect();
        assert_eq!(said.len(), 5, "{said:#?}");
        assert!(said[0].starts_with("the alert log cannot take alerts"), "{said:#?}");
        assert_eq!(&said[1..4], ["change a", "change b", "change c"]);
        assert!(
            said[4].starts_with("the alert log takes alerts again: 3 alert(s) held"),
            "{said:#?}"
        );
        assert_eq!(sink.metrics.alerts_held.get(), 0);

        // Full again, and the memory for held alerts fills up.
        *sink.log.lock().unwrap() = open(&full);
        let mut outcomes = Vec::new();
        for i in 0..HELD_MAX {
            outcomes.push(sink.emit(violation(&s, &format!("x{i}"))));
        }
        // The failure event took one place: the last alert found none.
        assert!(outcomes[..HELD_MAX - 1].iter().all(|&o| o == Emitted::Held));
        assert_eq!(outcomes[HELD_MAX - 1], Emitted::Dropped);
        let last = format!("x{}", HELD_MAX - 1);
        assert!(!reported(&sink, &last), "a dropped alert counted as reported");
        assert!(reported(&sink, &format!("x{}", HELD_MAX - 2)));
        assert_eq!(count(&sink, "alert_dropped"), 1);
        assert_eq!(sink.metrics.alerts_held.get(), i64::try_from(HELD_MAX).unwrap());

        // A tick once the log takes alerts: everything held logged, in order.
        *sink.log.lock().unwrap() = open(&path);
        sink.flush_held("h");
        let text = std::fs::read_to_string(&path).unwrap();
        let after: Vec<Alert> =
            text.lines().skip(5).map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(after.len(), HELD_MAX + 1, "held alerts and the recovery notice");
        assert!(after[0].detail.starts_with("the alert log cannot take alerts"));
        for (i, a) in after[1..HELD_MAX].iter().enumerate() {
            assert_eq!(a.key, format!("x{i}"));
        }
        assert_eq!(sink.metrics.alerts_held.get(), 0);
    }
}
