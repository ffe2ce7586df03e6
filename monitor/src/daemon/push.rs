//! Pushing alerts to an Alertmanager (v2 API) and to a webhook, off the
//! check path. A pusher delivers from the durable alert log, in order, and
//! keeps how far it got in a cursor file beside the other state
//! (`push-alertmanager.offset`, `push-webhook.offset`: the offset, and the
//! inode and birth time of the log file it is in): an alert is retried
//! until its sink takes it, across restarts, and none is lost while a sink
//! is unreachable. When the log has been rotated under it, a pusher
//! finishes the rotated file it was in (found by its inode and birth time)
//! before it starts on the next. The checks only
//! wake the pusher. An alert the log could not take (the disk full, say) is
//! handed over whole and pushed with a few retries, at once; the sink holds
//! it and logs it once the log takes alerts again, and it is pushed from
//! the log then too (so it may arrive twice).
//!
//! The HTTP client is the least that does: HTTP/1.1 POST over plain TCP to
//! the configured host and port, success on a 2xx status.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::alerts::{Alert, AlertSeverity, EventKind};
use super::config::HttpEndpoint;
use super::metrics::{KindLabels, Metrics};

/// Alerts waiting to be pushed, at most.
pub const QUEUE: usize = 4096;
const ATTEMPTS: u32 = 8;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a push failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushError {
    pub message: String,
    /// The sink answered that it will not take this request as it is: a
    /// 4xx other than 408 (timeout) and 429 (too many requests). Sent again
    /// unchanged, it is refused again.
    pub refused: bool,
}

impl std::fmt::Display for PushError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// POSTs `body` as JSON; `Ok` on a 2xx answer.
pub async fn post_json(ep: &HttpEndpoint, path: &str, body: &[u8]) -> Result<(), PushError> {
    let failed = |message: String| PushError { message, refused: false };
    let work = async {
        let tcp = tokio::net::TcpStream::connect(&ep.host_port)
            .await
            .map_err(|e| failed(format!("connect {}: {e}", ep.host_port)))?;
        match &ep.tls {
            None => exchange(ep, tcp, path, body).await,
            Some(tls) => {
                let s = tokio_rustls::TlsConnector::from(tls.config.clone())
                    .connect(tls.server_name.clone(), tcp)
                    .await
                    .map_err(|e| failed(format!("TLS with {}: {e}", ep.host_port)))?;
                exchange(ep, s, path, body).await
            }
        }
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| failed(format!("{}: no answer within {TIMEOUT:?}", ep.url)))?
}

/// One POST of `body` on a connection made, and what its answer means.
async fn exchange(
    ep: &HttpEndpoint,
    mut s: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    path: &str,
    body: &[u8],
) -> Result<(), PushError> {
    let failed = |message: String| PushError { message, refused: false };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: vigil/{}\r\n\r\n",
        ep.host_port,
        body.len(),
        env!("CARGO_PKG_VERSION")
    );
    s.write_all(head.as_bytes()).await.map_err(|e| failed(e.to_string()))?;
    s.write_all(body).await.map_err(|e| failed(e.to_string()))?;
    s.flush().await.map_err(|e| failed(e.to_string()))?;
    // The status line, however the answer is split: up to its end or 512
    // bytes, whichever comes first.
    let mut buf = vec![0u8; 512];
    let mut n = 0;
    while n < buf.len() && !buf[..n].contains(&b'\n') {
        match s.read(&mut buf[n..]).await.map_err(|e| failed(e.to_string()))? {
            0 => break,
            got => n += got,
        }
    }
    let status = String::from_utf8_lossy(&buf[..n]);
    let line = status.lines().next().unwrap_or("");
    let code = line.split_whitespace().nth(1).unwrap_or("");
    if code.starts_with('2') {
        return Ok(());
    }
    let refused = code.len() == 3 && code.starts_with('4') && code != "408" && code != "429";
    Err(PushError { message: format!("{} answered {line:?}", ep.url), refused })
}

/// The Alertmanager v2 body for one alert, ending at `ends` (RFC 3339).
///
/// A violation is open until it is reverted, accepted or its boot or
/// domain ends: it is sent again every [`Pacing::resend`] with `endsAt`
/// four of those ahead, so that it stays firing whatever the
/// Alertmanager's `resolve_timeout`, and sent once more with `endsAt` now
/// when it ends. Other alerts have no `endsAt`: the Alertmanager holds them
/// firing for its `resolve_timeout` (5 minutes by default), long enough to
/// notify. Labels are what makes two alerts one for the Alertmanager: an
/// accept's also carry who accepted which diff, so that a second accept (by
/// someone else, or of another diff) is not folded into the first one's
/// notification.
pub fn alertmanager_body(a: &Alert, ends: Option<&str>) -> Vec<u8> {
    let mut v = serde_json::json!([{
        "labels": {
            "alertname": "VigilKernelIntegrity",
            "severity": a.severity,
            "event": a.event,
            "host": a.host,
            "domain": a.domain,
            "uuid": a.uuid,
            "region": a.region,
            "kind": a.kind,
            "key": a.key,
        },
        "annotations": {
            "summary": format!("{} on {}: {}", serde_json::to_value(a.event).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(), a.domain, a.detail),
            "gva": a.gva,
            "gpa": a.gpa,
            "technique": a.technique,
            "before": a.before,
            "after": a.after,
            "evidence": a.evidence.clone().unwrap_or_default(),
        },
        "startsAt": a.time,
    }]);
    if let Some(by) = &a.by {
        let who = by.user.clone().unwrap_or_else(|| format!("uid {}", by.uid));
        v[0]["labels"]["user"] = who.into();
        v[0]["annotations"]["by"] = by.to_string().into();
    }
    if let Some(d) = &a.diff_digest {
        v[0]["labels"]["diff_digest"] = d.as_str().into();
        v[0]["annotations"]["diff_digest"] = d.as_str().into();
    }
    if let Some(ends) = ends {
        v[0]["endsAt"] = ends.into();
    }
    serde_json::to_vec(&v).expect("json")
}

/// Now plus `ahead`, in RFC 3339.
fn rfc3339_in(ahead: Duration) -> String {
    (time::OffsetDateTime::now_utc() + ahead)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

/// Violations delivered to an Alertmanager and not yet ended, by (domain
/// uuid, key), at most [`MAX_OPEN`].
type Open = std::collections::BTreeMap<(String, String), Alert>;

/// Open violations an Alertmanager pusher keeps sending, at most, in all
/// and per domain (a guest names its modules, and each module's violation
/// is one): past either, a violation is sent once and not again, counted as
/// error `alertmanager_open_full`.
pub const MAX_OPEN: usize = 10_000;
pub const MAX_OPEN_PER_DOMAIN: usize = 512;

/// Open violations per request when they are sent again.
const RESEND_BATCH: usize = 256;

/// Whether alert `a` ends the open violation `v`: it is reverted; its
/// domain's state was accepted; a new boot began. A domain let go
/// (stopped, migrated, its task failed) ends nothing: it may come back in
/// the same boot, with the violation reported already and not said again.
fn ends(a: &Alert, v: &Alert) -> bool {
    a.uuid == v.uuid
        && match a.event {
            EventKind::Reverted => a.key == v.key,
            EventKind::Accepted => true,
            EventKind::NewBoot => a.boot != v.boot,
            _ => false,
        }
}

/// Notes in `open` what alert `a` opens or ends, without telling anyone;
/// `false` if it opens a violation there is no room for.
fn replay(open: &mut Open, a: &Alert) -> bool {
    open.retain(|_, v| !ends(a, v));
    if a.event != EventKind::Violation {
        return true;
    }
    let id = (a.uuid.clone(), a.key.clone());
    let of_domain = || open.keys().filter(|(u, _)| *u == a.uuid).count();
    if open.contains_key(&id) || (open.len() < MAX_OPEN && of_domain() < MAX_OPEN_PER_DOMAIN) {
        open.insert(id, a.clone());
        true
    } else {
        false
    }
}

/// The Alertmanager v2 body of several alerts, each ending at `ends`.
fn alertmanager_batch(alerts: &[&Alert], ends: &str) -> Vec<u8> {
    let all: Vec<serde_json::Value> = alerts
        .iter()
        .filter_map(|a| {
            let v: serde_json::Value =
                serde_json::from_slice(&alertmanager_body(a, Some(ends))).ok()?;
            v.get(0).cloned()
        })
        .collect();
    serde_json::to_vec(&all).expect("json")
}

/// The violations still open at `at` (a cursor): every log file the log
/// keeps, oldest first, read up to there.
/// A log file that cannot be read is named in the errors: the violations
/// it left open are missing, and the Alertmanager will resolve them.
fn open_at(log: &Path, at: Cursor) -> (Open, Vec<String>) {
    let (mut open, mut errors) = (Open::new(), Vec::new());
    let mut files: Vec<std::fs::File> = (1..=MAX_ROTATED)
        .map_while(|n| std::fs::File::open(super::alerts::rotated_path(log, n)).ok())
        .collect();
    files.reverse();
    files.extend(std::fs::File::open(log).ok());
    for f in files {
        let here = f.metadata().ok().map(|m| LogFile::of(&m));
        let mine = matches!((at.file, here), (Some(c), Some(h)) if c.is(&h));
        let lines = lines_from(f, 0).unwrap_or_else(|e| {
            errors.push(format!("a file of the alert log {}: {e}", log.display()));
            Vec::new()
        });
        for (next, a) in lines {
            if mine && next > at.offset {
                break;
            }
            if let Some(a) = a {
                replay(&mut open, &a);
            }
        }
        if mine {
            break;
        }
    }
    (open, errors)
}

/// Which alerts an Alertmanager gets: what someone should act on, and
/// accepts, which someone should know of (an accept ends the reports of a
/// domain's violations, so it may not pass unseen where they were seen).
/// Stored state that could not be used is acted on; so is a new baseline
/// the hypervisor did not confirm, and an attach that found the kernel
/// moved (both warnings, where the usual new boot and attach are info).
pub fn for_alertmanager(a: &Alert) -> bool {
    match a.event {
        EventKind::Violation
        | EventKind::Error
        | EventKind::BudgetExceeded
        | EventKind::Accepted
        | EventKind::StateUnreadable => true,
        EventKind::NewBoot | EventKind::Attached => a.severity != AlertSeverity::Info,
        _ => false,
    }
}

/// What wakes a pusher.
#[derive(Debug)]
pub enum Wake {
    /// The log took an alert: deliver what the log holds past the cursor.
    Logged,
    /// The log could not take this alert: push this copy, the only one.
    Unlogged(Box<Alert>),
}

/// Where a sink's pusher keeps its place in the alert log.
pub fn cursor_path(state_dir: &Path, alertmanager: bool) -> PathBuf {
    state_dir.join(if alertmanager { "push-alertmanager.offset" } else { "push-webhook.offset" })
}

/// Longest alert line read back (as the log's own reader allows).
const MAX_LINE: usize = 1 << 20;
/// How often the log is read again without a wake-up (a retry of what is
/// still undelivered, at the latest).
const IDLE: Duration = Duration::from_secs(30);

/// Rotated logs looked through for the one a cursor is in, at most.
const MAX_ROTATED: u32 = 1000;

/// Which log file a cursor is in: its inode and, where the file system
/// keeps one, its birth time. The inode alone is not enough: the oldest
/// rotated log is dropped just before a new log is made, which may get the
/// same inode number, and a pusher still in the dropped file would take
/// the new one for it (and skip its start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LogFile {
    inode: u64,
    /// Nanoseconds since the epoch; `None` if the file system keeps no
    /// birth time, or in a cursor written before cursors kept it.
    born: Option<u64>,
}

impl LogFile {
    fn of(m: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        let born = m
            .created()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .and_then(|d| u64::try_from(d.as_nanos()).ok());
        LogFile { inode: m.ino(), born }
    }

    /// Whether this (a cursor's) is file `f`: the same inode, born at the
    /// same time where both times are known.
    fn is(&self, f: &LogFile) -> bool {
        self.inode == f.inode && (self.born.is_none() || f.born.is_none() || self.born == f.born)
    }
}

/// A pusher's place in the alert log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    offset: u64,
    /// The log file `offset` is in; `None` in a cursor written before the
    /// log was rotated, taken as the current log's.
    file: Option<LogFile>,
}

/// A cursor file's content, `None` if it is no cursor.
fn parse_cursor(text: &str) -> Option<Cursor> {
    let mut words = text.split_whitespace();
    let offset = words.next()?.parse().ok()?;
    let file = match words.next() {
        None => None,
        Some(w) => {
            let born = match words.next() {
                None => None,
                Some(b) => Some(b.parse().ok()?),
            };
            Some(LogFile { inode: w.parse().ok()?, born })
        }
    };
    if words.next().is_some() {
        return None;
    }
    Some(Cursor { offset, file })
}

/// The cursor in `path`: `Ok(None)` if there is none, `Err` why it cannot
/// be used if it cannot be read or is no cursor.
fn load_cursor(path: &Path) -> Result<Option<Cursor>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_cursor(&text).map(Some).ok_or_else(|| {
            let start: String = text.chars().take(64).collect();
            format!("{} holds no cursor: {start:?}", path.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
fn read_cursor(path: &Path) -> Option<Cursor> {
    load_cursor(path).ok().flatten()
}

/// Writes the cursor whole (a new file renamed over the old) and waits
/// until it and the rename are on disk.
fn write_cursor(path: &Path, c: Cursor) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("offset.tmp");
    let text = match c.file {
        Some(LogFile { inode, born: Some(b) }) => format!("{} {inode} {b}\n", c.offset),
        Some(LogFile { inode, born: None }) => format!("{} {inode}\n", c.offset),
        None => format!("{}\n", c.offset),
    };
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

/// The file beside a sink's cursor that says the sink has started once: a
/// cursor missing where it is was deleted, not never written.
fn started_path(cursor: &Path) -> PathBuf {
    cursor.with_extension("started")
}

/// Where a pusher with no usable cursor starts: the start of the oldest
/// rotated log still kept, else of the current log. Everything kept is
/// delivered again rather than anything skipped.
fn safe_start(log: &Path) -> Cursor {
    let oldest = (1..=MAX_ROTATED)
        .map_while(|n| std::fs::metadata(super::alerts::rotated_path(log, n)).ok())
        .last();
    let file = oldest.or_else(|| std::fs::metadata(log).ok()).map(|m| LogFile::of(&m));
    Cursor { offset: 0, file }
}

/// The rotated log (`<log>.1`, `<log>.2`, ...) that is `file`, and the
/// one rotated after it (`None`: the current log follows).
fn rotated_file(log: &Path, file: &LogFile) -> Option<(std::fs::File, Option<LogFile>)> {
    let mut newer = None;
    for n in 1..=MAX_ROTATED {
        let f = std::fs::File::open(super::alerts::rotated_path(log, n)).ok()?;
        let this = LogFile::of(&f.metadata().ok()?);
        if file.is(&this) {
            return Some((f, newer));
        }
        newer = Some(this);
    }
    None
}

/// The complete alert lines of `f` from `offset` on, with the offset
/// after each (a torn or over-long line is skipped, not fatal).
fn lines_from(mut f: std::fs::File, offset: u64) -> std::io::Result<Vec<(u64, Option<Alert>)>> {
    use std::io::{BufRead, Read, Seek};
    f.seek(std::io::SeekFrom::Start(offset))?;
    let mut reader = std::io::BufReader::new(f);
    let (mut out, mut at, mut buf) = (Vec::new(), offset, Vec::new());
    loop {
        buf.clear();
        let n = (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
        if n == 0 || buf.last() != Some(&b'\n') {
            if n > MAX_LINE {
                // An over-long line: skip to its end, if it has one yet.
                let mut rest = Vec::new();
                let m = reader.read_until(b'\n', &mut rest)?;
                if rest.last() == Some(&b'\n') {
                    at += (n + m) as u64;
                    out.push((at, None));
                    continue;
                }
            }
            return Ok(out); // the end, or a line still being written
        }
        at += n as u64;
        out.push((at, serde_json::from_slice::<Alert>(&buf).ok()));
    }
}

/// How a pusher paces itself.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// The first pause after a failed push; doubled after each, up to `most`.
    pub first: Duration,
    pub most: Duration,
    /// The longest pause after a refusal: the sink is up and answering, so
    /// waiting longer spares it nothing and only delays the alerts after.
    pub most_refused: Duration,
    /// Refusals of one alert (see [`PushError::refused`]) before it goes to
    /// the dead-letter file and the pusher moves on.
    pub refusals: u32,
    /// How often open violations are sent to an Alertmanager again.
    pub resend: Duration,
}

impl Pacing {
    pub const DEFAULT: Pacing = Pacing {
        first: Duration::from_secs(1),
        most: Duration::from_secs(60),
        most_refused: Duration::from_secs(8),
        refusals: 8,
        resend: Duration::from_secs(30),
    };
}

/// One sink's pusher, as [`run`] runs it.
pub struct Pusher {
    pub ep: HttpEndpoint,
    pub alertmanager: bool,
    /// The alert log it delivers from.
    pub log: PathBuf,
    /// Its place in the log ([`cursor_path`]).
    pub cursor: PathBuf,
    pub metrics: std::sync::Arc<Metrics>,
    /// This host's name, for the events it has to say.
    pub host: String,
    /// Where those events go (the daemon's sink).
    pub notes: mpsc::UnboundedSender<Alert>,
    pub pacing: Pacing,
    /// Alerts the log could not take kept to push, at most
    /// (`limits.push_queue`).
    pub queue: usize,
}

/// The `kind` of the event that says an alert went to a dead-letter file:
/// such an event refused in turn goes there without another event.
pub const DEAD_LETTER_KIND: &str = "push_dead_letter";

/// Alerts in a row sent to the dead-letter file, none taken between,
/// after which a sink is taken to refuse everything: no more go there.
const DEAD_LETTER_RUN: u32 = 3;

/// Where a sink's alerts that it refused for good go, beside its cursor.
pub fn dead_letter_path(cursor: &Path) -> PathBuf {
    cursor.with_extension("dead.jsonl")
}

/// Appends `a` to the dead-letter file and waits until it is on disk.
fn dead_letter(path: &Path, a: &Alert) -> std::io::Result<()> {
    use std::io::Write;
    let mut line = serde_json::to_vec(a).expect("alerts serialise");
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(&line)?;
    f.sync_data()
}

/// Runs one pusher until its wake-up channel closes.
pub async fn run(pusher: Pusher, mut rx: mpsc::Receiver<Wake>) {
    let Pusher { ep, alertmanager, log, cursor, metrics, host, notes, pacing, queue } = pusher;
    let sink = if alertmanager { "alertmanager" } else { "webhook" };
    let path = if alertmanager {
        format!("{}api/v2/alerts", ep.path.trim_end_matches('/').to_owned() + "/")
    } else {
        ep.path.clone()
    };
    let firing_until = || rfc3339_in(pacing.resend * 4);
    let body = |a: &Alert| {
        if !alertmanager {
            serde_json::to_vec(a).expect("json")
        } else if a.event == EventKind::Violation {
            alertmanager_body(a, Some(&firing_until()))
        } else {
            alertmanager_body(a, None)
        }
    };
    let failed = |e: &str, what: &str| {
        warn_line!("vigil: warning: pushing {what} to the {sink}: {e}");
        metrics.errors.get_or_create(&KindLabels { kind: format!("{sink}_push") }).inc();
    };
    let save = |c: Cursor| {
        if let Err(e) = write_cursor(&cursor, c) {
            failed(&e.to_string(), &format!("its place ({})", cursor.display()));
        }
    };
    // The current log, opened, with which file it is and its length.
    let open_log = || -> std::io::Result<(std::fs::File, LogFile, u64)> {
        let f = std::fs::File::open(&log)?;
        let m = f.metadata()?;
        Ok((f, LogFile::of(&m), m.len()))
    };
    // First start: from the log's end (what came before was never queued
    // for this sink); afterwards, from where the last run got to. A cursor
    // deleted or unusable: from the start of what the log keeps, said.
    let started = started_path(&cursor);
    let mut at = match load_cursor(&cursor) {
        Ok(Some(c)) => {
            // An install from before the marker: it has started, said now.
            if !started.exists()
                && let Err(e) = std::fs::write(&started, b"").and_then(|()| sync_dir(&started))
            {
                failed(&e.to_string(), &format!("that it started ({})", started.display()));
            }
            c
        }
        Ok(None) if !started.exists() => {
            let here = open_log().map_or(Cursor { offset: 0, file: None }, |(_, file, len)| {
                Cursor { offset: len, file: Some(file) }
            });
            save(here);
            if let Err(e) = std::fs::write(&started, b"").and_then(|()| sync_dir(&started)) {
                failed(&e.to_string(), &format!("that it started ({})", started.display()));
            }
            here
        }
        found => {
            let why = match found {
                Err(e) => e,
                _ => format!("{} is gone", cursor.display()),
            };
            let here = safe_start(&log);
            failed(&why, "from its place in the alert log");
            let host = super::alerts::Subject { host: host.clone(), ..Default::default() };
            let _ = notes.send(host.event(
                EventKind::Error,
                AlertSeverity::Warning,
                format!(
                    "the {sink} pusher's place in the alert log cannot be used ({why}): it delivers again \
                     everything the log keeps, from the start of its oldest file, so alerts may arrive twice"
                ),
            ));
            save(here);
            here
        }
    };
    let mut delay = pacing.first;
    // (offset, how many times in a row the alert there was refused)
    let mut refusals: (u64, u32) = (u64::MAX, 0);
    // Alerts sent to the dead-letter file with none taken since, and
    // whether the sink refusing everything was said.
    let (mut dead_in_row, mut refusing_all_said) = (0u32, false);
    // An Alertmanager's open violations, as the log before the cursor left them.
    let mut open = Open::new();
    if alertmanager {
        let (found, errors) = open_at(&log, at);
        for e in errors {
            failed(&e, "the open violations, read back at start");
        }
        open = found;
    }
    let mut resend_at = tokio::time::Instant::now();
    // Alerts the log could not take, to be pushed before what the log
    // holds, each tried up to ATTEMPTS times with the pusher's backoff.
    let mut unlogged: std::collections::VecDeque<(Box<Alert>, u32)> =
        std::collections::VecDeque::new();
    let take_unlogged =
        |a: Box<Alert>, open: &mut Open, unlogged: &mut std::collections::VecDeque<_>| {
            // Open now too: the log takes it later (or never).
            if alertmanager {
                replay(open, &a);
            }
            if unlogged.len() < queue {
                unlogged.push_back((a, 0u32));
            } else {
                // Still held by the daemon, and delivered from the log once
                // the log takes it.
                metrics.errors.get_or_create(&KindLabels { kind: "push_queue_full".into() }).inc();
            }
        };
    loop {
        if alertmanager && tokio::time::Instant::now() >= resend_at {
            let all: Vec<&Alert> = open.values().collect();
            for batch in all.chunks(RESEND_BATCH) {
                let body = alertmanager_batch(batch, &firing_until());
                if let Err(e) = post_json(&ep, &path, &body).await {
                    failed(&e.message, "the open violations again");
                    break;
                }
            }
            resend_at = tokio::time::Instant::now() + pacing.resend;
        }
        let mut stuck = false;
        // Whether what stuck was a refusal (see [`Pacing::most_refused`]).
        let mut refused = false;
        while let Some((a, tries)) = unlogged.front_mut() {
            match post_json(&ep, &path, &body(a)).await {
                Ok(()) => drop(unlogged.pop_front()),
                Err(e) if e.refused => {
                    // Refused as it is: not retried here, and holding up
                    // nothing. It goes to the dead-letter file if that
                    // takes it; the daemon still holds it for the log, whose
                    // delivery dead-letters it in turn (twice, then).
                    failed(&e.message, "an alert the log could not take, refused");
                    let dead = dead_letter_path(&cursor);
                    match dead_letter(&dead, a) {
                        Ok(()) => {
                            let kind = KindLabels { kind: format!("{sink}_dead_letter") };
                            metrics.errors.get_or_create(&kind).inc();
                        }
                        Err(d) => failed(
                            &d.to_string(),
                            &format!("a refused alert to {}", dead.display()),
                        ),
                    }
                    unlogged.pop_front();
                }
                Err(e) => {
                    *tries += 1;
                    failed(
                        &e.message,
                        &format!("an alert the log could not take (attempt {tries} of {ATTEMPTS})"),
                    );
                    if *tries >= ATTEMPTS {
                        // Still held by the daemon: delivered from the log
                        // once the log takes it.
                        unlogged.pop_front();
                    }
                    stuck = true;
                    break;
                }
            }
        }
        // Deliver everything the log holds past the cursor, in order; an
        // alert that will not go is retried, with backoff, before the next.
        let current = open_log();
        // Where to go once the file read now is done, if it is a rotated one.
        let mut then = None;
        let file = match current {
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    failed(&e.to_string(), &format!("from the alert log {}", log.display()));
                }
                None
            }
            Ok((f, now, _)) => match at.file {
                Some(old) if !old.is(&now) => match rotated_file(&log, &old) {
                    // Rotated since: the rest of the file the cursor is in first.
                    Some((rotated, newer)) => {
                        then = Some(Cursor { offset: 0, file: newer.or(Some(now)) });
                        Some(rotated)
                    }
                    None => {
                        failed(
                            "it was rotated away before its alerts were all delivered",
                            &format!(
                                "the alerts after offset {} of an older alert log {}",
                                at.offset,
                                log.display()
                            ),
                        );
                        at = Cursor { offset: 0, file: Some(now) };
                        save(at);
                        Some(f)
                    }
                },
                _ => {
                    at.file = Some(now);
                    Some(f)
                }
            },
        };
        let lines = match file {
            // The sink takes nothing now: back off first.
            _ if stuck => Ok(Vec::new()),
            None => Ok(Vec::new()),
            Some(f) => {
                let len = f.metadata().map_or(0, |m| m.len());
                at.offset = at.offset.min(len);
                lines_from(f, at.offset)
            }
        };
        let lines = lines.unwrap_or_else(|e| {
            failed(&e.to_string(), &format!("from the alert log {}", log.display()));
            Vec::new()
        });
        for (next, alert) in lines {
            let mut result = Ok(());
            if let Some(a) = alert.as_ref().filter(|a| !alertmanager || for_alertmanager(a)) {
                result = post_json(&ep, &path, &body(a)).await;
            }
            if let (Some(a), true, Ok(())) = (&alert, alertmanager, &result) {
                // What this alert ends is sent once more, ended now.
                let ended: Vec<(String, String)> =
                    open.iter().filter(|(_, v)| ends(a, v)).map(|(k, _)| k.clone()).collect();
                for k in ended {
                    let now = crate::integrity::baseline::now_rfc3339();
                    result = post_json(&ep, &path, &alertmanager_body(&open[&k], Some(&now))).await;
                    if result.is_err() {
                        break;
                    }
                    open.remove(&k);
                }
                if result.is_ok() && !replay(&mut open, a) {
                    let kind = KindLabels { kind: "alertmanager_open_full".into() };
                    metrics.errors.get_or_create(&kind).inc();
                }
            }
            if result.is_ok() && alert.is_some() {
                dead_in_row = 0;
                refusing_all_said = false;
            }
            if let (Some(a), Err(e)) = (alert, result) {
                failed(&e.message, "an alert");
                // Refusals of the alert at this offset, in a row.
                refusals = match refusals {
                    (o, n) if o == at.offset && e.refused => (o, n + 1),
                    _ => (at.offset, u32::from(e.refused)),
                };
                if refusals.1 < pacing.refusals {
                    stuck = true;
                    refused = e.refused;
                    break;
                }
                // A sink that refuses every alert is misconfigured, not
                // picky: its alerts wait in the log rather than all going
                // to the dead-letter file.
                if dead_in_row >= DEAD_LETTER_RUN {
                    if !refusing_all_said {
                        refusing_all_said = true;
                        let host =
                            super::alerts::Subject { host: host.clone(), ..Default::default() };
                        let mut note = host.event(
                            EventKind::Error,
                            AlertSeverity::Warning,
                            format!(
                                "the {sink} refuses every alert ({DEAD_LETTER_RUN} in a row went to {}; now {}): \
                                 alerts wait in the log until it takes one; check its URL and its configuration",
                                dead_letter_path(&cursor).display(),
                                e.message
                            ),
                        );
                        note.kind = DEAD_LETTER_KIND.into();
                        let _ = notes.send(note);
                    }
                    stuck = true;
                    break;
                }
                let dead = dead_letter_path(&cursor);
                if let Err(d) = dead_letter(&dead, &a) {
                    failed(&d.to_string(), &format!("a refused alert to {}", dead.display()));
                    stuck = true;
                    break;
                }
                metrics
                    .errors
                    .get_or_create(&KindLabels { kind: format!("{sink}_dead_letter") })
                    .inc();
                if a.kind != DEAD_LETTER_KIND {
                    let subject = super::alerts::Subject {
                        host: host.clone(),
                        domain: a.domain.clone(),
                        uuid: a.uuid.clone(),
                        boot: a.boot.clone(),
                    };
                    let mut note = subject.event(
                        EventKind::Error,
                        AlertSeverity::Warning,
                        format!(
                            "the {sink} refused an alert {} times ({}): it is in {} and the {sink} gets the \
                             alerts after it; the refused one: {} {} {}",
                            refusals.1,
                            e.message,
                            dead.display(),
                            serde_json::to_value(a.event).map(|v| v.to_string()).unwrap_or_default(),
                            a.key,
                            a.time
                        ),
                    );
                    note.kind = DEAD_LETTER_KIND.into();
                    let _ = notes.send(note);
                }
                refusals = (u64::MAX, 0);
                dead_in_row += 1;
                delay = pacing.first;
                // Given up with it: what it would have ended, too.
                open.retain(|_, v| !ends(&a, v));
            }
            at.offset = next;
            save(at);
        }
        if let Some(next) = then.filter(|_| !stuck) {
            // That rotated file is done: on to the start of the next.
            at = next;
            save(at);
            continue;
        }
        if stuck {
            // Back off, then try again; alerts the log could not take that
            // came meanwhile still get their own push.
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(if refused { pacing.most_refused } else { pacing.most });
            loop {
                match rx.try_recv() {
                    Ok(Wake::Unlogged(a)) => take_unlogged(a, &mut open, &mut unlogged),
                    Ok(Wake::Logged) => {}
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            continue;
        }
        delay = pacing.first;
        let idle = if alertmanager && !open.is_empty() {
            resend_at.saturating_duration_since(tokio::time::Instant::now()).min(IDLE)
        } else {
            IDLE
        };
        match tokio::time::timeout(idle, rx.recv()).await {
            Ok(None) => return,
            Ok(Some(Wake::Unlogged(a))) => take_unlogged(a, &mut open, &mut unlogged),
            Ok(Some(Wake::Logged)) | Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::alerts::Subject;

    fn alert(event: EventKind) -> Alert {
        let s =
            Subject { host: "h".into(), domain: "web1".into(), uuid: "u".into(), boot: "b".into() };
        s.event(event, AlertSeverity::Critical, "page 3 of kernel-text changed".into())
    }

    /// Reads one HTTP request whole (head and a body of its Content-Length).
    async fn read_request(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
        let mut buf = vec![0u8; 65536];
        let mut got = Vec::new();
        loop {
            let n = s.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if body.len() >= len {
                    return text;
                }
            }
            if n == 0 {
                return text;
            }
        }
    }

    /// A CA, and a certificate for `localhost` it signed, with its key.
    fn ca_and_server_cert() -> (String, rcgen::Certificate, rcgen::KeyPair) {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Names of their own: a leaf named as its CA looks self-signed.
        ca.distinguished_name.push(rcgen::DnType::CommonName, "vigil test CA");
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        leaf.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
        let cert = leaf.signed_by(&key, &ca).unwrap();
        (ca.pem(), cert, key)
    }

    /// An https sink on 127.0.0.1 showing `cert`: hands over the body of
    /// each request it answers 200; returns its port.
    async fn https_sink(
        cert: &rcgen::Certificate,
        key: &rcgen::KeyPair,
    ) -> (u16, mpsc::UnboundedReceiver<String>) {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = l.accept().await.unwrap();
                // A client that does not trust it hangs up in the handshake.
                let Ok(mut s) = acceptor.accept(tcp).await else { continue };
                let req = read_request(&mut s).await;
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await.unwrap();
                let _ = s.shutdown().await;
                let _ = tx.send(req.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned());
            }
        });
        (port, rx)
    }

    /// An https sink is verified: one whose certificate chains to the CA of
    /// `ca_file` and names the URL's host gets the alert; one the CA did
    /// not sign, or reached by a name its certificate does not carry, is a
    /// failure said as TLS, and gets nothing.
    #[tokio::test]
    async fn https_sinks_are_verified_against_the_configured_ca() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = ca_and_server_cert();
        let (other_ca, _, _) = ca_and_server_cert();
        let (port, mut got) = https_sink(&cert, &key).await;
        let endpoint = |host: &str, ca: &str| {
            let ca_file = dir.path().join(format!("ca-{}.pem", blake3::hash(ca.as_bytes())));
            std::fs::write(&ca_file, ca).unwrap();
            let config = dir.path().join("vigil.toml");
            std::fs::write(
                &config,
                format!(
                    "[webhook]\nurl = \"https://{host}:{port}/hook\"\nca_file = \"{}\"\n",
                    ca_file.display()
                ),
            )
            .unwrap();
            let s = crate::daemon::config::Settings::load(Some(&config), &Default::default());
            s.unwrap().webhook.unwrap()
        };
        let a = serde_json::to_vec(&alert(EventKind::Violation)).unwrap();
        post_json(&endpoint("localhost", &ca), "/hook", &a).await.unwrap();
        let body = got.recv().await.unwrap();
        assert_eq!(body.as_bytes(), a);
        for (host, ca, what) in [
            ("localhost", &other_ca, "another CA"),
            ("127.0.0.1", &ca, "a name not in the certificate"),
        ] {
            let e = post_json(&endpoint(host, ca), "/hook", &a).await.unwrap_err();
            assert!(e.message.starts_with("TLS with ") && !e.refused, "{what}: {e}");
        }
        assert!(got.try_recv().is_err(), "an unverified sink got an alert");
    }

    /// A sink on 127.0.0.1:`port` (0: any) that answers each request with
    /// the status `answer` gives its body; returns the port.
    async fn sink_on(port: u16, answer: impl Fn(&str) -> &'static str + Send + 'static) -> u16 {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let req = read_request(&mut s).await;
                let body = req.split_once("\r\n\r\n").map_or("", |(_, b)| b);
                let status = answer(body);
                let reply = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                s.write_all(reply.as_bytes()).await.unwrap();
            }
        });
        port
    }

    /// A one-shot HTTP server that answers `status` and hands back the request.
    async fn one_request(status: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let req = read_request(&mut s).await;
            s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await
                .unwrap();
            req
        });
        (port, h)
    }

    fn endpoint(port: u16, path: &str) -> HttpEndpoint {
        HttpEndpoint {
            host_port: format!("127.0.0.1:{port}"),
            path: path.into(),
            url: format!("http://127.0.0.1:{port}{path}"),
            tls: None,
        }
    }

    #[tokio::test]
    async fn webhook_gets_the_alert_line_as_json() {
        let (port, req) = one_request("200 OK").await;
        let a = alert(EventKind::Violation);
        let body = serde_json::to_vec(&a).unwrap();
        post_json(&endpoint(port, "/hooks/vigil"), "/hooks/vigil", &body).await.unwrap();
        let req = req.await.unwrap();
        assert!(req.starts_with("POST /hooks/vigil HTTP/1.1\r\n"), "{req}");
        let json = req.split_once("\r\n\r\n").unwrap().1;
        let back: Alert = serde_json::from_str(json).unwrap();
        assert_eq!(back, a);
    }

    /// An Alertmanager's view of what it was sent: of each alert posted, in
    /// order, its key and whether it ended ahead of when it arrived.
    async fn alertmanager_fake() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<(String, bool)>>>) {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = got.clone();
        let port = sink_on(0, move |body| {
            let arrived = time::OffsetDateTime::now_utc();
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            for a in v.as_array().unwrap() {
                let key = a["labels"]["key"].as_str().unwrap_or("").to_owned();
                let ends = a["endsAt"].as_str().and_then(|e| {
                    time::OffsetDateTime::parse(e, &time::format_description::well_known::Rfc3339)
                        .ok()
                });
                keep.lock().unwrap().push((key, ends.is_some_and(|e| e > arrived)));
            }
            "200 OK"
        })
        .await;
        (port, got)
    }

    /// Open violations are sent to the Alertmanager again and again, each
    /// ending ahead of now, until reverted or accepted, when each is sent
    /// once more ending now; a pusher started anew takes up the violations
    /// the log before its cursor left open.
    #[tokio::test]
    async fn the_alertmanager_hears_open_violations_until_they_end() {
        use crate::daemon::alerts::AlertLog;
        let dir = tempfile::tempdir().unwrap();
        let (log_path, cursor) = (dir.path().join("alerts.jsonl"), cursor_path(dir.path(), true));
        let (port, got) = alertmanager_fake().await;
        let metrics = Metrics::new();
        let start = || {
            let (tx, rx) = mpsc::channel(QUEUE);
            let mut p = pusher(
                endpoint(port, "/"),
                &log_path,
                &cursor,
                &metrics,
                mpsc::unbounded_channel().0,
            );
            p.alertmanager = true;
            p.pacing.resend = Duration::from_millis(200);
            (tx, tokio::spawn(run(p, rx)))
        };
        let mut log = AlertLog::open(&log_path).unwrap();
        let (tx, pusher) = start();
        until("the first cursor", || read_cursor(&cursor).is_some()).await;
        let violation = |key: &str| Alert { key: key.into(), ..alert(EventKind::Violation) };
        // Whether a sending ended ahead of its arrival (firing) or not (ended).
        let ahead = |a: &bool| *a;
        let sent = |key: &str| -> Vec<bool> {
            got.lock().unwrap().iter().filter(|(k, _)| k == key).map(|(_, e)| *e).collect()
        };
        for a in [violation("k1"), violation("k2")] {
            log.append(&a).unwrap();
        }
        tx.send(Wake::Logged).await.unwrap();
        until("both sent three times", || sent("k1").len() >= 3 && sent("k2").len() >= 3).await;
        assert!(sent("k1").iter().chain(&sent("k2")).all(&ahead), "{:?}", got.lock().unwrap());
        // k1 reverted: sent once more, ending now, and then no more.
        log.append(&Alert { key: "k1".into(), ..alert(EventKind::Reverted) }).unwrap();
        tx.send(Wake::Logged).await.unwrap();
        until("k1 ended", || sent("k1").last().is_some_and(|e| !ahead(e))).await;
        let k1 = sent("k1").len();
        let k2 = sent("k2").len();
        until("k2 sent again meanwhile", || sent("k2").len() >= k2 + 2).await;
        assert_eq!(sent("k1").len(), k1, "an ended violation sent again");
        drop(tx);
        pusher.await.unwrap();
        // A pusher started anew keeps sending k2, open before its cursor.
        let before = sent("k2").len();
        let (tx, pusher) = start();
        until("k2 sent by the new pusher", || sent("k2").len() >= before + 2).await;
        // An accept of the domain ends it.
        let mut accept = alert(EventKind::Accepted);
        accept.key = "a reason".into();
        log.append(&accept).unwrap();
        tx.send(Wake::Logged).await.unwrap();
        until("k2 ended by the accept", || sent("k2").last().is_some_and(|e| !ahead(e))).await;
        let k2 = sent("k2").len();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(sent("k2").len(), k2, "a violation ended by an accept sent again");
        assert_eq!(sent("a reason").len(), 1, "the accept itself");
        drop(tx);
        pusher.await.unwrap();
    }

    /// A kept log file that cannot be read back at start (here a directory
    /// where `.1` should be) is counted: the violations it left open are
    /// missing.
    #[tokio::test]
    async fn an_unreadable_log_file_at_start_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (log_path, cursor) = (dir.path().join("alerts.jsonl"), cursor_path(dir.path(), true));
        std::fs::write(&log_path, b"").unwrap();
        std::fs::create_dir(super::super::alerts::rotated_path(&log_path, 1)).unwrap();
        let (open, errors) = open_at(&log_path, Cursor { offset: 0, file: None });
        assert!(open.is_empty());
        assert_eq!(errors.len(), 1, "{errors:?}");
        let (port, _got) = alertmanager_fake().await;
        let metrics = Metrics::new();
        let mut p =
            pusher(endpoint(port, "/"), &log_path, &cursor, &metrics, mpsc::unbounded_channel().0);
        p.alertmanager = true;
        let (tx, rx) = mpsc::channel(QUEUE);
        let pusher = tokio::spawn(run(p, rx));
        let count =
            || metrics.errors.get_or_create(&KindLabels { kind: "alertmanager_push".into() }).get();
        until("the unreadable file counted", || count() >= 1).await;
        drop(tx);
        pusher.await.unwrap();
    }

    /// A 4xx but 408 and 429 is a refusal; a 5xx, a 429 or no server is not.
    #[tokio::test]
    async fn refusals_are_told_from_failures() {
        for (status, refused) in [
            ("400 Bad Request", true),
            ("422 Unprocessable Entity", true),
            ("429 Too Many Requests", false),
            ("408 Request Timeout", false),
            ("503 Service Unavailable", false),
        ] {
            let (port, _req) = one_request(status).await;
            let e = post_json(&endpoint(port, "/"), "/", b"{}").await.unwrap_err();
            assert_eq!(e.refused, refused, "{status}: {e}");
        }
    }

    /// An Alertmanager that refuses a violation for good: it goes to the
    /// Alertmanager's own dead-letter file, counted as
    /// `alertmanager_dead_letter` and said, and the next reaches it.
    #[tokio::test]
    async fn an_alertmanager_refusing_an_alert_for_good_has_it_dead_lettered() {
        use crate::daemon::alerts::AlertLog;
        let dir = tempfile::tempdir().unwrap();
        let (log_path, cursor) = (dir.path().join("alerts.jsonl"), cursor_path(dir.path(), true));
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let keep = got.clone();
        let port = sink_on(0, move |body| {
            if body.contains("poison") {
                return "400 Bad Request";
            }
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            for a in v.as_array().unwrap() {
                keep.lock().unwrap().push(a["labels"]["key"].as_str().unwrap_or("").to_owned());
            }
            "200 OK"
        })
        .await;
        let metrics = Metrics::new();
        let (notes, mut heard) = mpsc::unbounded_channel();
        let mut p = pusher(endpoint(port, "/"), &log_path, &cursor, &metrics, notes);
        p.alertmanager = true;
        p.pacing = Pacing {
            first: Duration::from_millis(10),
            most: Duration::from_millis(20),
            refusals: 3,
            ..Pacing::DEFAULT
        };
        let mut log = AlertLog::open(&log_path).unwrap();
        let (tx, rx) = mpsc::channel(QUEUE);
        let pusher = tokio::spawn(run(p, rx));
        until("the first cursor", || read_cursor(&cursor).is_some()).await;
        let poison =
            Alert { detail: "poison".into(), key: "k1".into(), ..alert(EventKind::Violation) };
        let after = Alert { key: "k2".into(), ..alert(EventKind::Violation) };
        log.append(&poison).unwrap();
        log.append(&after).unwrap();
        tx.send(Wake::Logged).await.unwrap();
        until("the violation after the refused one", || got.lock().unwrap().contains(&"k2".into()))
            .await;
        assert!(!got.lock().unwrap().contains(&"k1".into()));
        let dead = std::fs::read_to_string(dead_letter_path(&cursor)).unwrap();
        let dead: Vec<Alert> = dead.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(dead, [poison]);
        let count =
            |kind: &str| metrics.errors.get_or_create(&KindLabels { kind: kind.into() }).get();
        assert_eq!(count("alertmanager_dead_letter"), 1);
        let note = heard.try_recv().expect("the dead letter was not said");
        assert!(
            note.detail.contains("the alertmanager refused an alert 3 times"),
            "{}",
            note.detail
        );
        drop(tx);
        pusher.await.unwrap();
    }

    /// A sink that refuses one alert for good (400 each time): after
    /// `refusals` tries it goes to the dead-letter file, counted and said,
    /// and the alerts after it are delivered.
    #[tokio::test]
    async fn an_alert_refused_for_good_goes_to_the_dead_letter_file_and_the_next_are_delivered() {
        use crate::daemon::alerts::AlertLog;
        let dir = tempfile::tempdir().unwrap();
        let (log_path, cursor) = (dir.path().join("alerts.jsonl"), cursor_path(dir.path(), false));
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Alert>::new()));
        let keep = got.clone();
        let port = sink_on(0, move |body| {
            let a: Alert = serde_json::from_str(body).unwrap();
            if a.detail == "poison" {
                return "400 Bad Request";
            }
            keep.lock().unwrap().push(a);
            "200 OK"
        })
        .await;
        let metrics = Metrics::new();
        let (notes, mut heard) = mpsc::unbounded_channel();
        let mut p = pusher(endpoint(port, "/hook"), &log_path, &cursor, &metrics, notes);
        p.pacing = Pacing {
            first: Duration::from_millis(10),
            most: Duration::from_millis(20),
            refusals: 3,
            ..Pacing::DEFAULT
        };
        let mut log = AlertLog::open(&log_path).unwrap();
        let (tx, rx) = mpsc::channel(QUEUE);
        let pusher = tokio::spawn(run(p, rx));
        until("the first cursor", || read_cursor(&cursor).is_some()).await;
        let mut poison = alert(EventKind::Violation);
        poison.detail = "poison".into();
        let mut after = alert(EventKind::Violation);
        after.detail = "after".into();
        log.append(&poison).unwrap();
        log.append(&after).unwrap();
        tx.send(Wake::Logged).await.unwrap();
        until("the alert after the refused one", || got.lock().unwrap().len() == 1).await;
        assert_eq!(got.lock().unwrap()[0], after);
        let dead = std::fs::read_to_string(dead_letter_path(&cursor)).unwrap();
        let dead: Vec<Alert> = dead.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(dead, [poison]);
        let count =
            |kind: &str| metrics.errors.get_or_create(&KindLabels { kind: kind.into() }).get();
        assert_eq!(count("webhook_dead_letter"), 1);
        assert_eq!(count("webhook_push"), 3, "each refusal counted");
        let note = heard.try_recv().expect("the dead letter was not said");
        assert_eq!(note.kind, DEAD_LETTER_KIND);
        assert!(note.detail.contains("refused an alert 3 times"), "{}", note.detail);
        // Said as it goes through the log, refused in turn: no other event.
        log.append(&Alert { detail: "poison".into(), ..note }).unwrap();
        tx.send(Wake::Logged).await.unwrap();
        until("the refused event dead-lettered", || count("webhook_dead_letter") == 2).await;
        assert!(heard.try_recv().is_err(), "a dead letter of a dead letter was said");
        drop(tx);
        pusher.await.unwrap();
    }

    /// A sink that refuses every alert is misconfigured: after a few in a
    /// row went to the dead-letter file, the rest wait in the log, and that
    /// is said once.
    #[tokio::test]
    async fn a_sink_refusing_everything_does_not_drain_the_log_into_dead_letters() {
        use crate::daemon::alerts::AlertLog;
        let dir = tempfile::tempdir().unwrap();
        let (log_path, cursor) = (dir.path().join("alerts.jsonl"), cursor_path(dir.path(), false));
        let port = sink_on(0, |_| "403 Forbidden").await;
        let metrics = Metrics::new();
        let (notes, mut heard) = mpsc::unbounded_channel();
        let mut p = pusher(endpoint(port, "/hook"), &log_path, &cursor, &metrics, notes);
        p.pacing = Pacing {
            first: Duration::from_millis(5),
            most: Duration::from_millis(10),
            refusals: 2,
            ..Pacing::DEFAULT
        };
        let mut log = AlertLog::open(&log_path).unwrap();
        let (tx, rx) = mpsc::channel(QUEUE);
        let pusher = tokio::spawn(run(p, rx));
        until("the first cursor", || read_cursor(&cursor).is_some()).await;
        for i in 0..6 {
            log.append(&Alert { key: format!("k{i}"), ..alert(EventKind::Violation) }).unwrap();
        }
        tx.send(Wake::Logged).await.unwrap();
        let count =
            |kind: &str| metrics.errors.get_or_create(&KindLabels { kind: kind.into() }).get();
        until("refusals past the dead-letter run", || count("webhook_push") >= 12).await;
        assert_eq!(count("webhook_dead_letter"), u64::from(DEAD_LETTER_RUN));
        let dead = std::fs::read_to_string(dead_letter_path(&cursor)).unwrap();
        assert_eq!(dead.lines().count(), DEAD_LETTER_RUN as usize);
        let said: Vec<String> =
            std::iter::from_fn(|| heard.try_recv().ok()).map(|a| a.detail).collect();
        assert_eq!(
            said.iter().filter(|d| d.contains("refuses every alert")).count(),
            1,
            "{said:#?}"
        );
        drop(tx);
        pusher.await.unwrap();
    }

    #[tokio::test]
    async fn non_2xx_and_no_server_are_errors() {
        let (port, _req) = one_request("500 Internal Server Error").await;
        let e = post_json(&endpoint(port, "/"), "/", b"{}").await.unwrap_err();
        assert!(e.message.contains("500") && !e.refused, "{e}");
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(post_json(&endpoint(dead, "/"), "/", b"{}").await.is_err());
    }

    /// A server on `port` that answers 200 to every request and keeps the
    /// alerts it was sent.
    async fn collector(port: u16) -> std::sync::Arc<std::sync::Mutex<Vec<Alert>>> {
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = got.clone();
        sink_on(port, move |body| {
            keep.lock().unwrap().push(serde_json::from_str(body).unwrap());
            "200 OK"
        })
        .await;
        got
    }

    async fn until(what: &str, mut ok: impl FnMut() -> bool) {
        for _ in 0..200 {
            if ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// Alerts the log could not take, sent while the sink is down, are
    /// retried at the pusher's pace (not each on a schedule of its own that
    /// holds up everything behind it) and delivered, in order, once it is
    /// up, and what the log holds after them.
    #[tokio::test]
    async fn alerts_the_log_could_not_take_wait_for_a_sink_that_is_down() {
        use crate::daemon::alerts::AlertLog;
        let dir = tempfile::tempdir().unwrap();
        let (log_path, cursor) = (dir.path().join("alerts.jsonl"), cursor_path(dir.path(), false));
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let metrics = Metrics::new();
        let mut p =
            pusher(endpoint(port, "/"), &log_path, &cursor, &metrics, mpsc::unbounded_channel().0);
        // Five tries take some 150 ms; the three left, 600 ms more: time
        // for the sink to come up before the first is given up.
        p.pacing = Pacing {
            first: Duration::from_millis(10),
            most: Duration::from_millis(200),
            ..Pacing::DEFAULT
        };
        let mut log = AlertLog::open(&log_path).unwrap();
        let (tx, rx) = mpsc::channel(QUEUE);
        let pusher = tokio::spawn(run(p, rx));
        until("the first cursor", || read_cursor(&cursor).is_some()).await;
        let keyed = |key: &str| Alert { key: key.into(), ..alert(EventKind::Violation) };
        for key in ["u1", "u2"] {
            tx.send(Wake::Unlogged(Box::new(keyed(key)))).await.unwrap();
        }
        let failures =
            || metrics.errors.get_or_create(&KindLabels { kind: "webhook_push".into() }).get();
        until("five tries of the first", || failures() >= 5).await;
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = got.clone();
        sink_on(port, move |body| {
            let a: Alert = serde_json::from_str(body).unwrap();
            keep.lock().unwrap().push(a.key);
            "200 OK"
        })
        .await;
        log.append(&keyed("logged")).unwrap();
        tx.send(Wake::Logged).await.unwrap();
        until("all three", || got.lock().unwrap().len() >= 3).await;
        assert_eq!(*got.lock().unwrap(), ["u1", "u2", "logged"]);
        drop(tx);
        pusher.await.unwrap();
    }

    /// An alert the log could not take that the sink refuses is not
    /// retried and holds nothing up: it goes to the dead-letter file at
    /// once (counted), and the next is delivered.
    #[tokio::test]
    async fn a_refused_alert_the_log_could_not_take_holds_nothing_up() {
        let dir = tempfile::tempdir().unwrap();
        let (log_path, cursor) = (dir.path().join("alerts.jsonl"), cursor_path(dir.path(), false));
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let keep = got.clone();
        let port = sink_on(0, move |body| {
            let a: Alert = serde_json::from_str(body).unwrap();
            if a.key == "poison" {
                return "400 Bad Request";
            }
            keep.lock().unwrap().push(a.key);
            "200 OK"
        })
        .await;
        let metrics = Metrics::new();
        let mut p =
            pusher(endpoint(port, "/"), &log_path, &cursor, &metrics, mpsc::unbounded_channel().0);
        // Were a refusal retried, the backoff alone would outlast the test.
        p.pacing = Pacing { first: Duration::from_secs(60), ..Pacing::DEFAULT };
        let (tx, rx) = mpsc::channel(QUEUE);
        let pusher = tokio::spawn(run(p, rx));
        until("the first cursor", || read_cursor(&cursor).is_some()).await;
        for key in ["poison", "next"] {
            let a = Alert { key: key.into(), ..alert(EventKind::Violation) };
            tx.send(Wake::Unlogged(Box::new(a))).await.unwrap();
        }
        until("the alert after the refused one", || got.lock().unwrap().len() == 1).await;
        assert_eq!(*got.lock().unwrap(), ["next"]);
        let dead = std::fs::read_to_string(dead_letter_path(&cursor)).unwrap();
        let dead: Vec<Alert> = dead.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(dead.iter().map(|a| a.key.as_str()).collect::<Vec<_>>(), ["poison"]);
        let count =
            |kind: &str| metrics.errors.get_or_create(&KindLabels { kind: kind.into() }).get();
        assert_eq!(count("webhook_dead_letter"), 1);
        drop(tx);
        pusher.await.unwrap();
    }

    /// A webhook pusher of `log` to port `port`, and its wake-up sender.
    fn webhook_pusher(
        port: u16,
        log: &Path,
        cursor: &Path,
        metrics: &std::sync::Arc<Metrics>,
    ) -> (mpsc::Sender<Wake>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let ep = endpoint(port, "/hook");
        let pusher =
            tokio::spawn(run(pusher(ep, log, cursor, metrics, mpsc::unbounded_channel().0), rx));
        (tx, pusher)
    }

    /// An alert logged while the sink is down is delivered once it is up, and
    /// one logged while no pusher runs is delivered by the next, from the log.
    #[tokio::test]
    async fn alerts_wait_in_the_log_until_the_sink_takes_them() {
        use crate::daemon::alerts::AlertLog;
        let dir = tempfile::tempdir().unwrap();
        let (log_path, cursor) = (dir.path().join("alerts.jsonl"), cursor_path(dir.path(), false));
        let mut log = AlertLog::open(&log_path).unwrap();
        let mut old = alert(EventKind::Violation);
        old.detail = "before the first start".into();
        log.append(&old).unwrap(); // before any pusher: not this sink's
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let metrics = Metrics::new();
        let start = || webhook_pusher(port, &log_path, &cursor, &metrics);
        let (tx, pusher) = start();
        until("the cursor at the log's end", || read_cursor(&cursor).is_some()).await;
        let mut first = alert(EventKind::Violation);
        first.detail = "while the sink is down".into();
        log.append(&first).unwrap();
        tx.send(Wake::Logged).await.unwrap();
        // Nothing listens yet: the push fails and is counted.
        let failures =
            |m: &Metrics| m.errors.get_or_create(&KindLabels { kind: "webhook_push".into() }).get();
        until("a failed push", || failures(&metrics) > 0).await;
        let got = collector(port).await;
        until("the alert delivered once the sink is up", || got.lock().unwrap().len() == 1).await;
        assert_eq!(got.lock().unwrap()[0], first);
        drop(tx);
        pusher.await.unwrap();
        // Logged while no pusher runs: the next one delivers it from the log.
        let mut second = alert(EventKind::Error);
        second.detail = "while the daemon was down".into();
        log.append(&second).unwrap();
        let (tx, pusher) = start();
        until("the alert logged meanwhile", || got.lock().unwrap().len() == 2).await;
        assert_eq!(got.lock().unwrap()[1], second);
        let end = std::fs::metadata(&log_path).unwrap().len();
        until("the cursor at the end", || read_cursor(&cursor).map(|c| c.offset) == Some(end))
            .await;
        drop(tx);
        pusher.await.unwrap();
        assert!(
            !got.lock().unwrap().contains(&old),
            "an alert from before the first start was sent"
        );
    }

    /// Alerts logged while the sink is down, over several rotations of the
    /// log, reach it once it is up: every one, once, in order.
    #[tokio::test]
    async fn a_pusher_that_is_behind_follows_the_log_through_rotations() {
        use crate::daemon::alerts::{AlertLog, Rotation};
        let dir = tempfile::tempdir().unwrap();
        let (log_path, cursor) = (dir.path().join("alerts.jsonl"), cursor_path(dir.path(), false));
        let rotation = Rotation { max_bytes: 1500, keep: 4 };
        let mut log = AlertLog::open_rotating(&log_path, rotation).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let metrics = Metrics::new();
        let (tx, pusher) = webhook_pusher(port, &log_path, &cursor, &metrics);
        until("the pusher's cursor", || read_cursor(&cursor).is_some()).await;
        let (mut sent, mut rotations) = (Vec::new(), 0);
        for i in 0..12 {
            let mut a = alert(EventKind::Violation);
            a.detail = format!("alert {i}");
            log.append(&a).unwrap();
            rotations += u32::from(log.rotate_if_due().unwrap());
            sent.push(a);
            tx.send(Wake::Logged).await.unwrap();
        }
        assert!(
            (2..=rotation.keep).contains(&rotations),
            "{rotations} rotations: the test needs several, none dropped"
        );
        let failures =
            |m: &Metrics| m.errors.get_or_create(&KindLabels { kind: "webhook_push".into() }).get();
        until("a failed push", || failures(&metrics) > 0).await;
        let got = collector(port).await;
        until("every alert delivered", || got.lock().unwrap().len() >= sent.len()).await;
        let end = std::fs::metadata(&log_path).unwrap().len();
        until("the cursor at the current log's end", || {
            read_cursor(&cursor).map(|c| c.offset) == Some(end)
        })
        .await;
        assert_eq!(*got.lock().unwrap(), sent);
        drop(tx);
        pusher.await.unwrap();
    }

    /// A cursor left in a rotated log that was dropped, whose inode number
    /// the new log got (file systems reuse a freed number at once): the new
    /// log is pushed from its start, and what was lost is said.
    #[tokio::test]
    async fn a_new_log_on_a_dropped_ones_inode_is_pushed_from_its_start() {
        use crate::daemon::alerts::AlertLog;
        let dir = tempfile::tempdir().unwrap();
        let (log_path, cursor) = (dir.path().join("alerts.jsonl"), cursor_path(dir.path(), false));
        let mut log = AlertLog::open(&log_path).unwrap();
        let mut sent = Vec::new();
        for i in 0..3 {
            let mut a = alert(EventKind::Violation);
            a.detail = format!("alert {i}");
            log.append(&a).unwrap();
            sent.push(a);
        }
        let meta = std::fs::metadata(&log_path).unwrap();
        let new = LogFile::of(&meta);
        let born = new.born.unwrap_or_else(|| {
            panic!(
                "the file system of {} keeps no birth time (statx): run the tests on ext4, xfs or btrfs",
                dir.path().display()
            )
        });
        // The dropped file was born earlier, and the pusher was further on
        // in it than the new log is long.
        let dropped = LogFile { inode: new.inode, born: Some(born - 1) };
        write_cursor(&cursor, Cursor { offset: meta.len() + 100, file: Some(dropped) }).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let got = collector(port).await;
        let metrics = Metrics::new();
        let (tx, pusher) = webhook_pusher(port, &log_path, &cursor, &metrics);
        until("the new log's alerts delivered", || got.lock().unwrap().len() >= sent.len()).await;
        assert_eq!(*got.lock().unwrap(), sent);
        let failures =
            metrics.errors.get_or_create(&KindLabels { kind: "webhook_push".into() }).get();
        assert_eq!(failures, 1, "the alerts lost with the dropped log are one failure");
        drop(tx);
        pusher.await.unwrap();
    }

    /// A webhook pusher of `log` keeping its place in `cursor`.
    fn pusher(
        ep: HttpEndpoint,
        log: &Path,
        cursor: &Path,
        metrics: &std::sync::Arc<Metrics>,
        notes: mpsc::UnboundedSender<Alert>,
    ) -> Pusher {
        Pusher {
            ep,
            alertmanager: false,
            log: log.to_owned(),
            cursor: cursor.to_owned(),
            metrics: metrics.clone(),
            host: "h".into(),
            notes,
            pacing: Pacing::DEFAULT,
            queue: QUEUE,
        }
    }

    /// A cursor corrupted, then one deleted, after the pusher delivered part
    /// of a rotated log: each time the pusher says so (an event and a
    /// count) and delivers everything the log keeps again, the rotated
    /// file first: nothing skipped, duplicates only.
    #[tokio::test]
    async fn a_corrupted_or_deleted_cursor_skips_nothing() {
        use crate::daemon::alerts::{AlertLog, Rotation};
        let dir = tempfile::tempdir().unwrap();
        let (log_path, cursor) = (dir.path().join("alerts.jsonl"), cursor_path(dir.path(), false));
        let rotation = Rotation { max_bytes: 1500, keep: 4 };
        let mut log = AlertLog::open_rotating(&log_path, rotation).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let got = collector(port).await;
        let metrics = Metrics::new();
        let start = || {
            let (tx, rx) = mpsc::channel(QUEUE);
            let (notes, heard) = mpsc::unbounded_channel();
            let p = pusher(endpoint(port, "/hook"), &log_path, &cursor, &metrics, notes);
            let pusher = tokio::spawn(run(p, rx));
            (tx, pusher, heard)
        };
        // A first start, then alerts over a rotation, all delivered.
        let (tx, pusher, _) = start();
        until("the first cursor", || read_cursor(&cursor).is_some()).await;
        let mut sent = Vec::new();
        for i in 0..6 {
            let mut a = alert(EventKind::Violation);
            a.detail = format!("alert {i}");
            log.append(&a).unwrap();
            log.rotate_if_due().unwrap();
            sent.push(a);
            tx.send(Wake::Logged).await.unwrap();
        }
        assert!(super::super::alerts::rotated_path(&log_path, 1).exists(), "no rotation");
        until("all delivered", || got.lock().unwrap().len() == sent.len()).await;
        drop(tx);
        pusher.await.unwrap();
        for (damage, said) in [
            (
                &(|c: &Path| std::fs::write(c, "12 garbage\n").unwrap()) as &dyn Fn(&Path),
                "holds no cursor",
            ),
            (&|c: &Path| std::fs::remove_file(c).unwrap(), "is gone"),
        ] {
            got.lock().unwrap().clear();
            damage(&cursor);
            let (tx, pusher, mut heard) = start();
            until("everything kept delivered again", || got.lock().unwrap().len() >= sent.len())
                .await;
            assert_eq!(*got.lock().unwrap(), sent, "after a cursor that {said}");
            let note = heard.try_recv().expect("the pusher said nothing of its cursor");
            assert!(
                note.detail.contains(said) && note.detail.contains("arrive twice"),
                "{}",
                note.detail
            );
            drop(tx);
            pusher.await.unwrap();
        }
        let counted =
            metrics.errors.get_or_create(&KindLabels { kind: "webhook_push".into() }).get();
        assert_eq!(counted, 2, "each unusable cursor counted once");
    }

    #[test]
    fn cursors_old_and_new_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, "123\n").unwrap();
        assert_eq!(read_cursor(&path), Some(Cursor { offset: 123, file: None }));
        std::fs::write(&path, "5 77\n").unwrap();
        let old = LogFile { inode: 77, born: None };
        assert_eq!(read_cursor(&path), Some(Cursor { offset: 5, file: Some(old) }));
        let new = LogFile { inode: 77, born: Some(1_764_000_000_123_456_789) };
        write_cursor(&path, Cursor { offset: 5, file: Some(new) }).unwrap();
        assert_eq!(read_cursor(&path), Some(Cursor { offset: 5, file: Some(new) }));
        // A cursor without a birth time goes by the inode; one with goes by both.
        assert!(old.is(&new) && new.is(&old));
        assert!(!new.is(&LogFile { born: Some(1), ..new }));
        assert!(!new.is(&LogFile { inode: 78, ..new }));
        for bad in ["", "x", "1 y", "1 2 z"] {
            std::fs::write(&path, bad).unwrap();
            assert_eq!(read_cursor(&path), None, "{bad:?}");
        }
    }

    #[test]
    fn alertmanager_body_and_selection() {
        let a = alert(EventKind::Violation);
        let v: serde_json::Value = serde_json::from_slice(&alertmanager_body(&a, None)).unwrap();
        assert_eq!(v[0]["labels"]["alertname"], "VigilKernelIntegrity");
        assert_eq!(v[0]["labels"]["domain"], "web1");
        assert_eq!(v[0]["startsAt"], a.time.as_str());
        assert!(for_alertmanager(&a));
        let mut attached = alert(EventKind::Attached);
        attached.severity = AlertSeverity::Info;
        assert!(!for_alertmanager(&attached));
        assert!(v[0]["labels"].get("user").is_none() && v[0].get("endsAt").is_none());
    }

    /// Which events go to the Alertmanager: violations, the monitor's
    /// failures and accepts; not the lifecycle and information events.
    #[test]
    fn the_alertmanager_gets_violations_failures_and_accepts() {
        use EventKind::*;
        let sent = [Violation, Error, BudgetExceeded, Accepted, StateUnreadable];
        let kept = [
            Reverted,
            Notice,
            Attached,
            Waiting,
            Detached,
            Paused,
            Resumed,
            NewBoot,
            ModuleLoaded,
            ModuleUnloaded,
            KernelPatched,
            EvidenceSaved,
        ];
        for k in sent {
            assert!(for_alertmanager(&alert(k)), "{k:?} not sent");
        }
        for k in kept {
            let mut a = alert(k);
            a.severity = AlertSeverity::Info;
            assert!(!for_alertmanager(&a), "{k:?} sent");
        }
        // A new baseline the hypervisor did not confirm, or an attach that
        // found the kernel moved: warnings, sent.
        for k in [NewBoot, Attached] {
            let mut a = alert(k);
            a.severity = AlertSeverity::Warning;
            assert!(for_alertmanager(&a), "{k:?} warning not sent");
        }
    }

    /// An accept goes as a firing warning, not a resolved alert, and two
    /// accepts by different people or of different diffs stay two alerts.
    #[test]
    fn an_accept_reaches_the_alertmanager_as_a_firing_warning_saying_who() {
        use crate::daemon::alerts::Operator;
        let s =
            Subject { host: "h".into(), domain: "web1".into(), uuid: "u".into(), boot: "b".into() };
        let mut a = s.event(
            EventKind::Accepted,
            AlertSeverity::Warning,
            "alice (uid 1001, pid 4242) accepted the reviewed diff ... of web1".into(),
        );
        a.key = "CHG-4711".into();
        a.by = Some(Operator { uid: 1001, gid: 1001, user: Some("alice".into()), pid: Some(4242) });
        a.diff_digest = Some("ab".repeat(32));
        assert!(for_alertmanager(&a));
        let v: serde_json::Value = serde_json::from_slice(&alertmanager_body(&a, None)).unwrap();
        let labels = &v[0]["labels"];
        assert_eq!(labels["severity"], "warning");
        assert_eq!(labels["event"], "accepted");
        assert_eq!(labels["user"], "alice");
        assert_eq!(labels["diff_digest"], "ab".repeat(32));
        assert_eq!(v[0]["annotations"]["by"], "alice (uid 1001, pid 4242)");
        assert!(v[0]["annotations"]["summary"].as_str().unwrap().starts_with("accepted on web1: "));
        assert_eq!(v[0]["startsAt"], a.time.as_str());
        assert!(v[0].get("endsAt").is_none(), "an endsAt would make it arrive resolved: {v}");
        let mut other = a.clone();
        other.by = Some(Operator { uid: 1002, gid: 1002, user: None, pid: Some(1) });
        let w: serde_json::Value =
            serde_json::from_slice(&alertmanager_body(&other, None)).unwrap();
        assert_eq!(w[0]["labels"]["user"], "uid 1002");
        assert_ne!(w[0]["labels"], v[0]["labels"]);
    }
}
