//! An operator's accept: a domain's current state made its baseline, on the
//! word of someone the control socket let in, and, when they name the diff
//! they reviewed (its digest), only if the guest still has that diff.
//!
//! Recorded in the alert log as an `accepted` warning (pushed to the
//! Alertmanager too): who (the socket peer's credentials), why (the
//! reason), and what (the digest of the diff accepted). A refused accept
//! leaves a warning `notice` and the baseline as it was.
//!
//! What the control socket's request says is checked there
//! (`control::parse_request`); this module owns the transaction.

use std::sync::Arc;

use super::control::{Accepted, Answer};

use super::alerts::{AlertSeverity, EventKind, Operator};
use super::{Shared, blocking};
use crate::watch::{WatchError, Watched};

/// An accept, as the control socket hands it to the domain's task.
pub struct Accept {
    /// Why, in the operator's words (bounded by `control::MAX_REASON`).
    pub reason: String,
    pub by: Operator,
    /// The digest of the diff the operator reviewed, if they named one.
    pub diff_digest: Option<String>,
    pub reply: super::control::AnswerTo,
}

/// What came of an accept.
enum Outcome {
    /// Re-baselined; the diff that was accepted.
    Accepted { digest: String, violations: usize },
    /// The guest's diff is not the one reviewed: its digest now.
    Changed { now: String },
    /// The diff failed: nothing was accepted.
    NoDiff(WatchError),
    /// Taking the new baseline failed.
    NoBaseline(WatchError),
}

/// Diffs the guest and, unless its digest is not the one reviewed, takes
/// the new baseline, in one step on the blocking pool: nothing else of this
/// domain runs between the two. (The guest runs on meanwhile: a change made
/// while the baseline is read is in it. The diff makes that window the
/// time of one baseline, not the operator's time to review.)
fn diff_then_rebaseline(
    w: &mut Watched,
    profiles: &[crate::linux::profile::Profile],
    reviewed: Option<&str>,
) -> Outcome {
    let d = match w.diff(profiles) {
        Ok(d) => d,
        Err(e) => return Outcome::NoDiff(e),
    };
    if reviewed.is_some_and(|r| r != d.digest) {
        return Outcome::Changed { now: d.digest };
    }
    match w.rebaseline() {
        Ok(()) => Outcome::Accepted { digest: d.digest, violations: d.violations },
        Err(e) => Outcome::NoBaseline(e),
    }
}

/// Runs one accept on a domain's watch, answers it and records it. Returns
/// the watch, and whether its baseline was re-taken (what was reported of
/// the domain is then over).
pub(super) async fn run(
    shared: &Arc<Shared>,
    w: Watched,
    name: &str,
    uuid: &str,
    req: Accept,
) -> (Watched, bool) {
    let Accept { reason, by, diff_digest, reply } = req;
    let (sh, reviewed) = (shared.clone(), diff_digest.clone());
    let (w, r) =
        blocking(w, move |w| diff_then_rebaseline(w, &sh.profiles(), reviewed.as_deref())).await;
    let boot = w.boot();
    let subject = shared.subject(name, uuid, &boot);
    let (answer, accepted) = match r {
        Outcome::Accepted { digest, violations } => {
            let what = match &diff_digest {
                Some(_) => {
                    format!("the reviewed diff {digest} of {name} ({violations} violation(s))")
                }
                None => format!(
                    "the current state of {name} (diff {digest}, {violations} violation(s); no reviewed diff named)"
                ),
            };
            let mut a = subject.event(
                EventKind::Accepted,
                AlertSeverity::Warning,
                format!("{by} accepted {what} as its new baseline: {reason}"),
            );
            a.key = reason;
            a.by = Some(by.clone());
            a.diff_digest = Some(digest.clone());
            shared.sink.emit(a);
            let answer = Accepted {
                domain: name.to_owned(),
                baseline: w.path.clone(),
                boot,
                diff_digest: digest,
                violations,
                by,
            };
            (Ok(Answer::Accepted(answer)), true)
        }
        Outcome::Changed { now } => {
            let reviewed = diff_digest.unwrap_or_default();
            let mut a = subject.event(
                EventKind::Notice,
                AlertSeverity::Warning,
                format!(
                    "{by} asked to accept the state of {name} reviewed as diff {reviewed}, but its diff is {now} now: \
                     refused, nothing accepted (reason given: {reason})"
                ),
            );
            a.by = Some(by);
            a.diff_digest = Some(reviewed.clone());
            shared.sink.emit(a);
            let refusal = format!(
                "the guest changed since the reviewed diff: you reviewed diff {reviewed}, {name}'s diff is {now} now; \
                 nothing was accepted. Review `vigil diff {name} --daemon` again and accept with the digest it shows"
            );
            (Err(refusal), false)
        }
        Outcome::NoDiff(e) => {
            (Err(format!("cannot diff {name}: {}; nothing was accepted", e.message())), false)
        }
        Outcome::NoBaseline(e) => {
            (Err(format!("re-taking the baseline of {name} failed: {}", e.message())), false)
        }
    };
    let _ = reply.send(answer);
    (w, accepted)
}
