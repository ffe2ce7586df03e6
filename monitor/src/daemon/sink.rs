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

/// Where every alert goes; shared by all tasks.
pub struct Sink {
    pub(super) log: Mutex<AlertLog>,
    pub(super) reported: Mutex<Reported>,
    pub metrics: Arc<Metrics>,
    pub(super) pushers: Vec<(bool, mpsc::Sender<push::Wake>)>,
    /// The alert log's last append failed (full or read-only state
    /// directory): said once as an event when it starts and when it ends.
    pub(super) log_failing: std::sync::atomic::AtomicBool,
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
                        AlertSeverity::Info,
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
                    region: metric_region(&alert.region).into(),
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
    pub(super) fn announce_unlogged(&self, alert: &Alert, e: &alerts::AlertLogError) {
        let host = Subject { host: alert.host.clone(), ..Subject::default() };
        let failure = host.event(
            EventKind::Error,
            AlertSeverity::Warning,
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
