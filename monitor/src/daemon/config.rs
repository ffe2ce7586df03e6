//! The daemon's configuration, in two steps: TOML parsed into raw inputs
//! ([`RawConfig`], every field optional, unknown keys refused), then validated
//! into [`Settings`], which cannot hold an invalid value. Every error names
//! the file, the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {reason}")]
    Syntax { file: String, reason: String },
    #[error("{file}: key {key}: {reason}")]
    Invalid { file: String, key: String, reason: String },
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub connect: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub alert_log: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub control_socket: Option<PathBuf>,
    pub control_group: Option<String>,
    pub host: Option<String>,
    pub profiles: Option<Vec<PathBuf>>,
    #[serde(default)]
    pub schedule: RawSchedule,
    #[serde(default)]
    pub domains: RawDomains,
    #[serde(default)]
    pub alertmanager: RawEndpoint,
    #[serde(default)]
    pub webhook: RawEndpoint,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    pub hot_interval: Option<String>,
    pub full_interval: Option<String>,
    pub jitter: Option<f64>,
    pub cpu_budget: Option<f64>,
    pub attach_retry: Option<String>,
    pub settle: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDomains {
    pub include: Option<Vec<String>>,
    pub exclude: Option<Vec<String>>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoint {
    pub url: Option<String>,
}

/// Values given on the command line, which win over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub connect: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub alert_log: Option<PathBuf>,
    pub metrics_listen: Option<String>,
    pub control_socket: Option<PathBuf>,
    pub profiles: Option<Vec<PathBuf>>,
}

/// Where guest profiles are looked for unless told otherwise.
pub const DEFAULT_PROFILES: &str = "/usr/share/vigil/guest-profiles";

/// An `http://host:port/path` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpEndpoint {
    pub host_port: String,
    pub path: String,
    pub url: String,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connect: String,
    pub state_dir: PathBuf,
    pub alert_log: PathBuf,
    pub metrics_listen: SocketAddr,
    pub control_socket: PathBuf,
    pub control_group: String,
    pub host: String,
    /// Directories of guest profiles.
    pub profiles: Vec<PathBuf>,
    pub hot_interval: Duration,
    pub full_interval: Duration,
    pub jitter: f64,
    /// Share of one CPU core the checks of all domains may use.
    pub cpu_budget: f64,
    pub attach_retry: Duration,
    /// How long a new baseline stays provisional while a boot settles.
    pub settle: Duration,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub alertmanager: Option<HttpEndpoint>,
    pub webhook: Option<HttpEndpoint>,
}

/// Parses `"1s"`, `"500ms"`, `"2m"`, `"1h"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (secs.is_finite() && secs > 0.0 && secs < 1e7).then(|| Duration::from_secs_f64(secs))
}

fn parse_endpoint(url: &str) -> Result<HttpEndpoint, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        "must be an http:// URL (https is not supported; relay through a local proxy)".to_owned()
    })?;
    let (host_port, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host_port.is_empty() || !host_port.contains(':') {
        return Err("must name host and port, as http://127.0.0.1:9093".into());
    }
    Ok(HttpEndpoint { host_port: host_port.to_owned(), path: path.to_owned(), url: url.to_owned() })
}

/// Whether a domain name or UUID matches a pattern of literal text with `*`
/// (any run) and `?` (one character).
pub fn matches(pattern: &str, text: &str) -> bool {
    fn go(p: &[u8], t: &[u8]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], t) || (!t.is_empty() && go(p, &t[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &t[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &t[1..]),
            _ => false,
        }
    }
    // Patterns are short and from the operator; bound them anyway.
    pattern.len() <= 256 && text.len() <= 256 && go(pattern.as_bytes(), text.as_bytes())
}

impl Settings {
    /// Reads, parses and validates `file` (or the defaults when `None`),
    /// with command-line overrides applied.
    pub fn load(file: Option<&Path>, over: &Overrides) -> Result<Self, ConfigError> {
        let (name, raw) = match file {
            Some(p) => {
                let name = p.display().to_string();
                let text = std::fs::read_to_string(p)
                    .map_err(|source| ConfigError::Read { file: name.clone(), source })?;
                let raw = Self::parse(&name, &text)?;
                (name, raw)
            }
            None => ("(defaults)".to_owned(), RawConfig::default()),
        };
        Self::validate(&name, raw, over)
    }

    pub fn parse(file: &str, text: &str) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: file.into(),
            reason: e.to_string().trim().replace('\n', " "),
        })
    }

    pub fn validate(file: &str, raw: RawConfig, over: &Overrides) -> Result<Self, ConfigError> {
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            file: file.into(),
            key: key.into(),
            reason,
        };
        let dur = |key: &str,
                   v: &Option<String>,
                   default: Duration|
         -> Result<Duration, ConfigError> {
            match v {
                None => Ok(default),
                Some(s) => parse_duration(s).ok_or_else(|| {
                    bad(
                        key,
                        format!("{s:?} is not a positive duration like \"500ms\", \"1s\", \"2m\""),
                    )
                }),
            }
        };
        let state_dir =
            over.state_dir.clone().or(raw.state_dir).unwrap_or_else(|| "/var/lib/vigil".into());
        let alert_log = over
            .alert_log
            .clone()
            .or(raw.alert_log)
            .unwrap_or_else(|| state_dir.join("alerts.jsonl"));
        let listen = over
            .metrics_listen
            .clone()
            .or(raw.metrics_listen)
            .unwrap_or_else(|| "127.0.0.1:9797".into());
        let metrics_listen: SocketAddr = listen
            .parse()
            .map_err(|_| bad("metrics_listen", format!("{listen:?} is not an ADDRESS:PORT")))?;
        let hot_interval =
            dur("schedule.hot_interval", &raw.schedule.hot_interval, Duration::from_secs(1))?;
        let full_interval =
            dur("schedule.full_interval", &raw.schedule.full_interval, Duration::from_secs(10))?;
        if full_interval < hot_interval {
            return Err(bad(
                "schedule.full_interval",
                format!(
                    "{full_interval:?} is shorter than schedule.hot_interval ({hot_interval:?})"
                ),
            ));
        }
        let jitter = raw.schedule.jitter.unwrap_or(0.1);
        if !(0.0..=0.5).contains(&jitter) {
            return Err(bad(
                "schedule.jitter",
                format!("{jitter} is not a fraction between 0 and 0.5"),
            ));
        }
        let cpu_budget = raw.schedule.cpu_budget.unwrap_or(0.5);
        if !(cpu_budget > 0.0 && cpu_budget <= 64.0) {
            return Err(bad(
                "schedule.cpu_budget",
                format!("{cpu_budget} is not a share of CPU cores above 0"),
            ));
        }
        let attach_retry =
            dur("schedule.attach_retry", &raw.schedule.attach_retry, Duration::from_secs(2))?;
        let settle = dur("schedule.settle", &raw.schedule.settle, Duration::from_secs(5))?;
        let include = raw.domains.include.unwrap_or_else(|| vec!["*".into()]);
        let exclude = raw.domains.exclude.unwrap_or_default();
        for (key, list) in [("domains.include", &include), ("domains.exclude", &exclude)] {
            if let Some(p) = list.iter().find(|p| p.is_empty() || p.len() > 256) {
                return Err(bad(
                    key,
                    format!("pattern {p:?} is empty or longer than 256 characters"),
                ));
            }
        }
        let endpoint = |key: &str, e: RawEndpoint| -> Result<Option<HttpEndpoint>, ConfigError> {
            e.url
                .map(|u| parse_endpoint(&u).map_err(|r| bad(key, format!("{u:?} {r}"))))
                .transpose()
        };
        let host = raw.host.unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into())
        });
        Ok(Self {
            connect: over
                .connect
                .clone()
                .or(raw.connect)
                .unwrap_or_else(|| "qemu:///system".into()),
            alert_log,
            metrics_listen,
            control_socket: over
                .control_socket
                .clone()
                .or(raw.control_socket)
                .unwrap_or_else(|| "/run/vigil/control.sock".into()),
            control_group: raw.control_group.unwrap_or_else(|| "vigil".into()),
            host,
            profiles: over
                .profiles
                .clone()
                .or(raw.profiles)
                .unwrap_or_else(|| vec![DEFAULT_PROFILES.into()]),
            hot_interval,
            full_interval,
            jitter,
            cpu_budget,
            attach_retry,
            settle,
            include,
            exclude,
            alertmanager: endpoint("alertmanager.url", raw.alertmanager)?,
            webhook: endpoint("webhook.url", raw.webhook)?,
            state_dir,
        })
    }

    /// Whether the daemon watches a domain of this name and UUID.
    pub fn watches(&self, name: &str, uuid: &str) -> bool {
        let hit = |pats: &[String]| pats.iter().any(|p| matches(p, name) || matches(p, uuid));
        hit(&self.include) && !hit(&self.exclude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Settings, ConfigError> {
        let raw = Settings::parse("vigil.toml", text)?;
        Settings::validate("vigil.toml", raw, &Overrides::default())
    }

    #[test]
    fn defaults_and_a_full_file() {
        let s = load("").unwrap();
        assert_eq!(s.hot_interval, Duration::from_secs(1));
        assert_eq!(s.full_interval, Duration::from_secs(10));
        assert_eq!(s.alert_log, PathBuf::from("/var/lib/vigil/alerts.jsonl"));
        let s = load(
            r#"
            state_dir = "/srv/vigil"
            metrics_listen = "0.0.0.0:9100"
            [schedule]
            hot_interval = "500ms"
            full_interval = "1m"
            cpu_budget = 0.25
            [domains]
            include = ["web-*"]
            exclude = ["web-test?"]
            [alertmanager]
            url = "http://127.0.0.1:9093"
            "#,
        )
        .unwrap();
        assert_eq!(s.hot_interval, Duration::from_millis(500));
        assert_eq!(s.full_interval, Duration::from_secs(60));
        assert_eq!(s.alert_log, PathBuf::from("/srv/vigil/alerts.jsonl"));
        assert!(s.watches("web-1", "x") && !s.watches("web-test1", "x") && !s.watches("db", "x"));
        assert_eq!(s.alertmanager.unwrap().path, "/");
    }

    #[test]
    fn overrides_win() {
        let raw =
            Settings::parse("f", "state_dir = \"/a\"\nmetrics_listen = \"127.0.0.1:1\"").unwrap();
        let over = Overrides {
            state_dir: Some("/b".into()),
            metrics_listen: Some("127.0.0.1:2".into()),
            ..Default::default()
        };
        let s = Settings::validate("f", raw, &over).unwrap();
        assert_eq!(s.state_dir, PathBuf::from("/b"));
        assert_eq!(s.metrics_listen.port(), 2);
    }

    #[test]
    fn invalid_files_name_file_key_and_reason() {
        for (text, key) in [
            ("[schedule]\nhot_interval = \"fast\"", "schedule.hot_interval"),
            (
                "[schedule]\nhot_interval = \"10s\"\nfull_interval = \"1s\"",
                "schedule.full_interval",
            ),
            ("[schedule]\njitter = 2.0", "schedule.jitter"),
            ("[schedule]\ncpu_budget = 0", "schedule.cpu_budget"),
            ("metrics_listen = \"localhost\"", "metrics_listen"),
            ("[alertmanager]\nurl = \"https://am:9093\"", "alertmanager.url"),
            ("[domains]\ninclude = [\"\"]", "domains.include"),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(e.starts_with("vigil.toml: key ") && e.contains(key), "{text:?}: {e}");
        }
        for (text, word) in [
            ("bogus = 1", "bogus"),
            ("[schedule]\nhot_intervall = \"1s\"", "hot_intervall"),
            ("state_dir = 5", "state_dir"),
            ("[[", ""),
        ] {
            let e = load(text).unwrap_err().to_string();
            assert!(e.starts_with("vigil.toml: ") && e.contains(word), "{text:?}: {e}");
        }
    }

    #[test]
    fn durations_and_patterns() {
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        for bad in ["", "s", "1", "-1s", "0s", "1d", "1e9h", "nan s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        assert!(matches("*", ""));
        assert!(matches("a*b?d", "axxbcd"));
        assert!(!matches("a*b", "ac"));
        assert!(!matches(&"*".repeat(300), "a"));
    }
}
