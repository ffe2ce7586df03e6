//! The control socket: a Unix socket, mode 0660, group `vigil` (by default),
//! taking one JSON request per line and answering with one JSON line.
//!
//! ```text
//! {"command":"status"}
//! {"command":"check","domain":"web1"}
//! {"command":"diff","domain":"web1"}
//! {"command":"accept","domain":"web1","reason":"kernel livepatch 2026-11-28"}
//! {"command":"accept","domain":"web1","reason":"CHG-4711","diff_digest":"<64 hex digits>"}
//! ```
//!
//! Only root and members of the group are served: the kernel's peer
//! credentials decide, not anything the caller says. They are also who an
//! accept is recorded as ([`Operator`]).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::accept::Accept;
use super::alerts::Operator;
use super::{Command, DomainStatus, Shared};
use crate::linux::KernelReport;
use crate::linux::diff::Diff;

/// Longest request accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// Longest reason an accept takes, in bytes. It is written into the alert
/// line (twice: `key` and `detail`) and pushed as an Alertmanager label; a
/// longer one is refused, not cut, so that what is recorded is what the
/// operator wrote. A ticket number and a sentence fit.
pub const MAX_REASON: usize = 1024;
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {what}")]
    Bind {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Who may use the socket.
#[derive(Debug, Clone)]
pub struct Access {
    pub group: String,
    pub gid: Option<u32>,
}

/// Looks a group up in `/etc/group`: its gid and member names.
pub fn group_entry(group_file: &str, name: &str) -> Option<(u32, Vec<String>)> {
    group_file.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() == 4 && f[0] == name).then(|| {
            let gid = f[2].parse().ok()?;
            Some((gid, f[3].split(',').filter(|m| !m.is_empty()).map(str::to_owned).collect()))
        })?
    })
}

/// The user name of a uid, from `/etc/passwd`.
pub fn user_name(passwd_file: &str, uid: u32) -> Option<String> {
    passwd_file.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && f[2].parse::<u32>().ok() == Some(uid)).then(|| f[0].to_owned())
    })
}

/// Whether a peer with these credentials may use the socket.
pub fn allowed(uid: u32, gid: u32, group: &str) -> bool {
    if uid == 0 {
        return true;
    }
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let Some((group_gid, members)) = group_entry(&groups, group) else { return false };
    if gid == group_gid {
        return true;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    user_name(&passwd, uid).is_some_and(|u| members.contains(&u))
}

/// Creates the socket: stale socket removed, mode 0660, group set when the
/// group exists (root-only otherwise).
pub fn bind(path: &Path, group: &str) -> Result<UnixListener, ControlError> {
    let err = |what, source| ControlError::Bind { path: path.to_owned(), what, source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err("creating its directory", e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("removing a stale socket", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| err("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| err("setting mode 0660", e))?;
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    if let Some((gid, _)) = group_entry(&groups, group) {
        // Running as the unit's user vigil, the socket already has the group;
        // a chown then would need a system call the unit's filter denies.
        let current = std::fs::metadata(path).map_err(|e| err("reading its owner", e))?.gid();
        if current != gid {
            std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(|e| err("setting its group", e))?;
        }
    } else {
        warn_line!(
            "vigil: warning: group {group:?} does not exist: only root can use the control socket {}",
            path.display()
        );
    }
    Ok(listener)
}

#[derive(serde::Deserialize)]
struct RawRequest {
    command: String,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    diff_digest: Option<String>,
}

/// A control request, checked: one line of JSON such as
/// `{"command":"accept","domain":"web1","reason":"kernel update"}`, as
/// [`request`] sends it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// `status` (or `domains`): every watched domain.
    Status,
    Check {
        domain: String,
    },
    Diff {
        domain: String,
    },
    /// Accept the domain's current state; the reason goes to the alert log.
    /// With a digest, only if the domain's diff still has that digest (the
    /// diff the operator reviewed).
    Accept {
        domain: String,
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        diff_digest: Option<String>,
    },
}

/// What a domain answers a command with, as the `result` of a [`Reply`].
#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// `check`: the report of the check it ran.
    Checked(Box<KernelReport>),
    /// `diff`: the domain against the daemon's baseline.
    Diff(Box<Diff>),
    /// `accept`: what was accepted, by whom.
    Accepted(Accepted),
}

/// An accept that was done: the domain's new baseline and the diff it took.
#[derive(Debug, serde::Serialize)]
pub struct Accepted {
    pub domain: String,
    pub baseline: PathBuf,
    pub boot: String,
    pub diff_digest: String,
    pub violations: usize,
    pub by: Operator,
}

/// Where a domain task sends its answer to one command.
pub(super) type AnswerTo = tokio::sync::oneshot::Sender<Result<Answer, String>>;

/// One line the socket answers with: `ok`, and the status, the domain's
/// answer or why not.
#[derive(Debug, serde::Serialize)]
pub struct Reply {
    ok: bool,
    #[serde(flatten)]
    body: ReplyBody,
}

#[derive(Debug, serde::Serialize)]
#[serde(untagged)]
enum ReplyBody {
    Status { host: String, connect: String, domains: Vec<DomainStatus> },
    Done { result: Answer },
    Refused { error: String },
}

impl Reply {
    fn done(result: Answer) -> Self {
        Reply { ok: true, body: ReplyBody::Done { result } }
    }

    fn refused(error: impl Into<String>) -> Self {
        Reply { ok: false, body: ReplyBody::Refused { error: error.into() } }
    }
}

/// Checks an accept's reason: present, one line, at most [`MAX_REASON`] bytes.
fn check_reason(reason: Option<String>) -> Result<String, String> {
    let Some(reason) = reason.filter(|r| !r.trim().is_empty()) else {
        return Err("accept needs a \"reason\": it is recorded in the alert log".into());
    };
    if reason.len() > MAX_REASON {
        return Err(format!(
            "the reason is {} bytes; at most {MAX_REASON} are taken (name the ticket that holds the rest)",
            reason.len()
        ));
    }
    if reason.chars().any(char::is_control) {
        return Err("the reason must be one line of text, without control characters".into());
    }
    Ok(reason)
}

/// Checks a diff digest: the 64 hex digits `vigil diff` shows (either case).
fn check_digest(digest: Option<String>) -> Result<Option<String>, String> {
    match digest {
        None => Ok(None),
        Some(d) if d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(Some(d.to_ascii_lowercase()))
        }
        Some(_) => {
            Err("\"diff_digest\" must be the 64 hex digits `vigil diff DOMAIN --daemon` shows"
                .into())
        }
    }
}

/// Parses and checks one request line (the caller bounds its length).
pub fn parse_request(line: &str) -> Result<Request, String> {
    // serde_json's message quotes what it did not expect, which may be the
    // whole line: only its start is sent back.
    let short = |t: String| {
        let mut end = t.len().min(160);
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        t[..end].to_owned()
    };
    let req: RawRequest = serde_json::from_str(line)
        .map_err(|e| format!("not a request: {}", short(e.to_string())))?;
    let domain =
        || req.domain.clone().filter(|d| !d.is_empty()).ok_or("this command needs a \"domain\"");
    match req.command.as_str() {
        "status" | "domains" => Ok(Request::Status),
        "check" => Ok(Request::Check { domain: domain()? }),
        "diff" => Ok(Request::Diff { domain: domain()? }),
        "accept" => Ok(Request::Accept {
            domain: domain()?,
            reason: check_reason(req.reason)?,
            diff_digest: check_digest(req.diff_digest)?,
        }),
        other => Err(format!(
            "unknown command {} (status, domains, check, diff, accept)",
            short(format!("{other:?}"))
        )),
    }
}

async fn answer(shared: &Arc<Shared>, line: &str, by: Operator) -> Reply {
    let req = match parse_request(line) {
        Ok(r) => r,
        Err(e) => return Reply::refused(e),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (domain, cmd) = match req {
        Request::Status => {
            let mut list: Vec<_> =
                shared.status.lock().expect("status lock").values().cloned().collect();
            list.sort_by(|a, b| a.name.cmp(&b.name));
            let (host, connect) = (shared.settings.host.clone(), shared.settings.connect.clone());
            return Reply { ok: true, body: ReplyBody::Status { host, connect, domains: list } };
        }
        Request::Check { domain } => (domain, Command::CheckNow(tx)),
        Request::Diff { domain } => (domain, Command::Diff(tx)),
        Request::Accept { domain, reason, diff_digest } => {
            (domain, Command::Accept(Accept { reason, by, diff_digest, reply: tx }))
        }
    };
    if let Err(e) = shared.command(&domain, cmd) {
        return Reply::refused(e);
    }
    match tokio::time::timeout(TIMEOUT, rx).await {
        Ok(Ok(Ok(v))) => Reply::done(v),
        Ok(Ok(Err(e))) => Reply::refused(e),
        Ok(Err(_)) => Reply::refused(format!("domain {domain} was detached before answering")),
        Err(_) => Reply::refused(format!("domain {domain} did not answer within {TIMEOUT:?}")),
    }
}

async fn client(shared: Arc<Shared>, stream: UnixStream) {
    let cred = stream.peer_cred();
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r.take(MAX_REQUEST));
    let mut line = String::new();
    // Read the request (bounded) before answering, even a refusal, so that
    // the caller is not cut off in mid-write and sees the reason.
    let got = matches!(tokio::time::timeout(TIMEOUT, lines.read_line(&mut line)).await, Ok(Ok(n)) if n > 0);
    let v = match cred {
        Ok(c) if allowed(c.uid(), c.gid(), &shared.settings.control_group) => {
            if !got {
                return;
            }
            answer(&shared, line.trim(), operator(c)).await
        }
        Ok(c) => Reply::refused(format!(
            "permission denied: uid {} gid {} is neither root nor in group {}",
            c.uid(),
            c.gid(),
            shared.settings.control_group
        )),
        Err(_) => Reply::refused(format!(
            "permission denied: an unknown peer is neither root nor in group {}",
            shared.settings.control_group
        )),
    };
    let line = serde_json::to_string(&v).unwrap_or_else(|e| {
        let why = format!("the answer could not be written as JSON: {e}");
        serde_json::json!({ "ok": false, "error": why }).to_string()
    });
    let _ = w.write_all(format!("{line}\n").as_bytes()).await;
}

/// Who a peer is: its credentials, and its uid's name.
fn operator(c: tokio::net::unix::UCred) -> Operator {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    Operator { uid: c.uid(), gid: c.gid(), user: user_name(&passwd, c.uid()), pid: c.pid() }
}

/// Serves the socket until the listener fails.
pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(client(shared.clone(), stream));
            }
            Err(e) => {
                warn_line!("vigil: warning: control socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Sends one request to the daemon's control socket and returns its answer.
pub fn request(path: &Path, req: &Request) -> Result<serde_json::Value, String> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| format!("cannot reach the vigil daemon at {}: {e} (is it running? are you root or in its group?)", path.display()))?;
    s.set_read_timeout(Some(TIMEOUT + Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let req = serde_json::to_string(req).map_err(|e| format!("the request as JSON: {e}"))?;
    s.write_all(format!("{req}\n").as_bytes())
        .map_err(|e| format!("writing to {}: {e}", path.display()))?;
    let mut line = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("reading from {}: {e}", path.display()))?;
    serde_json::from_str(&line)
        .map_err(|e| format!("the daemon's answer is not JSON ({e}): {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_as_sent_is_read_back_as_itself() {
        let digest = "0123456789abcdef".repeat(4);
        for req in [
            Request::Status,
            Request::Check { domain: "web1".into() },
            Request::Diff { domain: "web1".into() },
            Request::Accept { domain: "web1".into(), reason: "CHG-1".into(), diff_digest: None },
            Request::Accept {
                domain: "web1".into(),
                reason: "r".into(),
                diff_digest: Some(digest),
            },
        ] {
            let line = serde_json::to_string(&req).unwrap();
            assert_eq!(parse_request(&line), Ok(req), "{line}");
        }
        let line = serde_json::to_string(&Request::Check { domain: "a".into() }).unwrap();
        assert_eq!(line, r#"{"command":"check","domain":"a"}"#);
    }

    #[test]
    fn replies_say_ok_and_then_the_answer_or_why_not() {
        let v = serde_json::to_value(Reply::refused("no such domain")).unwrap();
        assert_eq!(v, serde_json::json!({ "ok": false, "error": "no such domain" }));
        let by = Operator { uid: 0, gid: 0, user: Some("root".into()), pid: Some(7) };
        let accepted = Accepted {
            domain: "web1".into(),
            baseline: "/var/lib/vigil/baselines/web1.json".into(),
            boot: "b".into(),
            diff_digest: "d".into(),
            violations: 2,
            by,
        };
        let v = serde_json::to_value(Reply::done(Answer::Accepted(accepted))).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["result"]["baseline"], "/var/lib/vigil/baselines/web1.json");
        assert_eq!(
            (v["result"]["violations"].clone(), v["result"]["by"]["pid"].clone()),
            (2.into(), 7.into())
        );
        let status = DomainStatus {
            name: "web1".into(),
            uuid: "u".into(),
            state: super::super::DomainState::Provisional,
            detail: String::new(),
            boot: String::new(),
            last_check: String::new(),
            open_violations: 0,
        };
        let body = ReplyBody::Status {
            host: "h".into(),
            connect: "qemu:///system".into(),
            domains: vec![status],
        };
        let v = serde_json::to_value(Reply { ok: true, body }).unwrap();
        assert_eq!((v["ok"].clone(), v["host"].clone()), (true.into(), "h".into()));
        assert_eq!(v["domains"][0]["state"], "provisional");
    }

    #[test]
    fn requests_are_checked_before_anything_acts_on_them() {
        let ok = |l: &str| parse_request(l).unwrap();
        let err = |l: &str| parse_request(l).unwrap_err();
        assert_eq!(ok(r#"{"command":"domains"}"#), Request::Status);
        assert_eq!(ok(r#"{"command":"diff","domain":"a"}"#), Request::Diff { domain: "a".into() });
        assert_eq!(
            ok(r#"{"command":"accept","domain":"a","reason":"update"}"#),
            Request::Accept { domain: "a".into(), reason: "update".into(), diff_digest: None }
        );
        let digest = "0123456789abcdef".repeat(4);
        assert_eq!(
            ok(&format!(
                r#"{{"command":"accept","domain":"a","reason":"CHG-1","diff_digest":"{}"}}"#,
                digest.to_uppercase()
            )),
            Request::Accept {
                domain: "a".into(),
                reason: "CHG-1".into(),
                diff_digest: Some(digest)
            }
        );
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(65)] {
            let line = format!(
                r#"{{"command":"accept","domain":"a","reason":"r","diff_digest":"{bad}"}}"#
            );
            assert!(err(&line).contains("64 hex digits"), "{bad:?}");
        }
        // A reason is bounded and one line: refused whole, not cut.
        let at_most = "r".repeat(MAX_REASON);
        let line = format!(r#"{{"command":"accept","domain":"a","reason":"{at_most}"}}"#);
        assert!(matches!(ok(&line), Request::Accept { reason, .. } if reason == at_most));
        let line = format!(r#"{{"command":"accept","domain":"a","reason":"{at_most}r"}}"#);
        let e = err(&line);
        assert!(e.contains("1025 bytes") && e.contains("at most 1024"), "{e}");
        assert!(e.len() < 300, "the reason is not echoed: {e}");
        let e = err(r#"{"command":"accept","domain":"a","reason":"ok\n\u001b[2Jfake line"}"#);
        assert!(e.contains("one line"), "{e}");
        assert!(err(r#"{"command":"check"}"#).contains("needs a \"domain\""));
        assert!(err(r#"{"command":"check","domain":""}"#).contains("needs a \"domain\""));
        assert!(err(r#"{"command":"accept","domain":"a","reason":"  "}"#).contains("reason"));
        assert!(err("status").starts_with("not a request"));
        let long = format!(r#"{{"command":"{}"}}"#, "x".repeat(10_000));
        assert!(err(&long).len() < 300, "an unknown command is not echoed whole");
        // Found by the control_request fuzz target: serde_json quotes a
        // mistyped value whole in its message.
        let string = format!(r#""{}""#, "I".repeat(10_000));
        assert!(err(&string).len() < 300, "{}", err(&string).len());
        let escaped = format!(r#"{{"command":"{}"}}"#, "\u{10ffff}".repeat(1000));
        assert!(err(&escaped).len() < 300, "{}", err(&escaped).len());
    }

    #[test]
    fn group_and_passwd_lookups() {
        let groups = "root:x:0:\nvigil:x:998:alice,bob\nbroken:x\n";
        assert_eq!(group_entry(groups, "vigil"), Some((998, vec!["alice".into(), "bob".into()])));
        assert_eq!(group_entry(groups, "root"), Some((0, vec![])));
        assert_eq!(group_entry(groups, "broken"), None);
        assert_eq!(group_entry(groups, "nobody"), None);
        let passwd = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        assert_eq!(user_name(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(user_name(passwd, 5), None);
        assert!(allowed(0, 0, "no-such-group"));
        assert!(!allowed(65534, 65534, "no-such-group-vigil-test"));
    }
}
