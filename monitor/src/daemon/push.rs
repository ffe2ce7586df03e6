//! Pushing alerts to an Alertmanager (v2 API) and to a webhook, with
//! retries, off the check path: the checks only put alerts on a queue.
//!
//! The HTTP client is the least that does: HTTP/1.1 POST over plain TCP to
//! the configured host and port, success on a 2xx status.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::alerts::{Alert, EventKind};
use super::config::HttpEndpoint;
use super::metrics::{KindLabels, Metrics};

/// Alerts waiting to be pushed, at most.
pub const QUEUE: usize = 4096;
const ATTEMPTS: u32 = 8;
const TIMEOUT: Duration = Duration::from_secs(10);

/// POSTs `body` as JSON; `Ok` on a 2xx answer.
pub async fn post_json(ep: &HttpEndpoint, path: &str, body: &[u8]) -> Result<(), String> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(&ep.host_port)
            .await
            .map_err(|e| format!("connect {}: {e}", ep.host_port))?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: vigil/{}\r\n\r\n",
            ep.host_port,
            body.len(),
            env!("CARGO_PKG_VERSION")
        );
        s.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
        s.write_all(body).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 512];
        let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
        let status = String::from_utf8_lossy(&buf[..n]);
        let line = status.lines().next().unwrap_or("");
        let code = line.split_whitespace().nth(1).unwrap_or("");
        if code.starts_with('2') { Ok(()) } else { Err(format!("{} answered {line:?}", ep.url)) }
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| format!("{}: no answer within {TIMEOUT:?}", ep.url))?
}

/// The Alertmanager v2 body for one alert.
pub fn alertmanager_body(a: &Alert) -> Vec<u8> {
    let v = serde_json::json!([{
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
        },
        "startsAt": a.time,
    }]);
    serde_json::to_vec(&v).expect("json")
}

/// Which alerts an Alertmanager gets: what someone should act on.
pub fn for_alertmanager(a: &Alert) -> bool {
    matches!(a.event, EventKind::Violation | EventKind::Error | EventKind::BudgetExceeded)
}

/// Runs one pusher until its queue closes.
pub async fn run(
    ep: HttpEndpoint,
    alertmanager: bool,
    mut rx: mpsc::Receiver<Alert>,
    metrics: std::sync::Arc<Metrics>,
) {
    let sink = if alertmanager { "alertmanager" } else { "webhook" };
    while let Some(a) = rx.recv().await {
        let (path, body) = if alertmanager {
            (
                format!("{}api/v2/alerts", ep.path.trim_end_matches('/').to_owned() + "/"),
                alertmanager_body(&a),
            )
        } else {
            (ep.path.clone(), serde_json::to_vec(&a).expect("json"))
        };
        let mut delay = Duration::from_secs(1);
        for attempt in 1..=ATTEMPTS {
            match post_json(&ep, &path, &body).await {
                Ok(()) => break,
                Err(e) => {
                    eprintln!(
                        "vigil: warning: pushing an alert to the {sink} (attempt {attempt} of {ATTEMPTS}): {e}"
                    );
                    metrics
                        .errors
                        .get_or_create(&KindLabels { kind: format!("{sink}_push") })
                        .inc();
                    if attempt < ATTEMPTS {
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(60));
                    }
                }
            }
        }
    }
}
