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
            "evidence": a.evidence.clone().unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::alerts::Subject;

    fn alert(event: EventKind) -> Alert {
        let s =
            Subject { host: "h".into(), domain: "web1".into(), uuid: "u".into(), boot: "b".into() };
        s.event(event, "critical", "page 3 of kernel-text changed".into())
    }

    /// A one-shot HTTP server that answers `status` and hands back the request.
    async fn one_request(status: &'static str) -> (u16, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
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
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                .await
                .unwrap();
            String::from_utf8_lossy(&got).to_string()
        });
        (port, h)
    }

    fn endpoint(port: u16, path: &str) -> HttpEndpoint {
        HttpEndpoint {
            host_port: format!("127.0.0.1:{port}"),
            path: path.into(),
            url: format!("http://127.0.0.1:{port}{path}"),
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

    #[tokio::test]
    async fn non_2xx_and_no_server_are_errors() {
        let (port, _req) = one_request("500 Internal Server Error").await;
        let e = post_json(&endpoint(port, "/"), "/", b"{}").await.unwrap_err();
        assert!(e.contains("500"), "{e}");
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(post_json(&endpoint(dead, "/"), "/", b"{}").await.is_err());
    }

    #[test]
    fn alertmanager_body_and_selection() {
        let a = alert(EventKind::Violation);
        let v: serde_json::Value = serde_json::from_slice(&alertmanager_body(&a)).unwrap();
        assert_eq!(v[0]["labels"]["alertname"], "VigilKernelIntegrity");
        assert_eq!(v[0]["labels"]["domain"], "web1");
        assert_eq!(v[0]["startsAt"], a.time.as_str());
        assert!(for_alertmanager(&a));
        assert!(!for_alertmanager(&alert(EventKind::Attached)));
    }
}
