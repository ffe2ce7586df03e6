//! The daemon's configuration, in two steps: TOML parsed into raw inputs
//! ([`RawConfig`], every field optional, unknown keys refused), then validated
//! into [`Settings`], which cannot hold an invalid value. Every error names
//! the file, the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::alerts::Rotation;

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
    pub alert_log_max_size: Option<String>,
    pub alert_log_keep: Option<u32>,
    pub metrics_listen: Option<String>,
    pub control_socket: Option<PathBuf>,
    pub control_group: Option<String>,
    pub host: Option<String>,
    pub profiles: Option<Vec<PathBuf>>,
    pub originals: Option<String>,
    #[serde(default)]
    pub schedule: RawSchedule,
    #[serde(default)]
    pub domains: RawDomains,
    #[serde(default)]
    pub alertmanager: RawEndpoint,
    #[serde(default)]
    pub webhook: RawEndpoint,
    #[serde(default)]
    pub evidence: RawEvidence,
    #[serde(default)]
    pub hooks: RawHooks,
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub module_text: Option<String>,
    pub guest_memory: Option<String>,
    pub push_queue: Option<usize>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHooks {
    pub allow: Option<Vec<String>>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvidence {
    pub enabled: Option<bool>,
    pub memory_dump: Option<bool>,
    pub max_dump: Option<String>,
    pub max_total: Option<String>,
    pub keep: Option<u32>,
    pub min_interval: Option<String>,
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
    pub check_timeout: Option<String>,
    pub module_grace: Option<String>,
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
    /// PEM file of the CAs an https sink's certificate must chain to.
    pub ca_file: Option<String>,
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

/// An `http://` or `https://` `host[:port]/path` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpEndpoint {
    /// What is connected to (the port filled in: 80 or 443 by default).
    pub host_port: String,
    pub path: String,
    pub url: String,
    /// For https: the server's name and whom to trust.
    pub tls: Option<Tls>,
}

/// How an https endpoint's server is verified.
#[derive(Clone)]
pub struct Tls {
    /// The CA file given (`ca_file`); none for the host's CA bundle.
    pub ca_file: Option<PathBuf>,
    /// The name the server's certificate must carry.
    pub server_name: rustls::pki_types::ServerName<'static>,
    pub config: std::sync::Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("ca_file", &self.ca_file)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl PartialEq for Tls {
    fn eq(&self, other: &Self) -> bool {
        self.ca_file == other.ca_file && self.server_name == other.server_name
    }
}

impl Eq for Tls {}

/// A TLS client configuration trusting the CAs of `ca_file`, or the host's
/// CA bundle (as `ca-certificates` installs it) when none is given.
fn client_config(ca_file: Option<&Path>) -> Result<std::sync::Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            // A CA bundle is some hundred KiB; a device or a huge file is no CA file.
            match std::fs::metadata(path) {
                Ok(m) if m.is_file() && m.len() <= 4 << 20 => {}
                Ok(_) => return Err(format!("{} is not a file of at most 4 MiB", path.display())),
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{} holds no PEM certificate", path.display()));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: a certificate unfit as a CA: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(format!(
                    "no CA certificate found on this host ({}); install ca-certificates or set ca_file",
                    if why.is_empty() {
                        "none in the usual places".to_owned()
                    } else {
                        why.join("; ")
                    }
                ));
            }
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub connect: String,
    pub state_dir: PathBuf,
    pub alert_log: PathBuf,
    /// When the alert log is rotated, and how many rotated logs are kept.
    pub alert_rotation: Rotation,
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
    /// How long a module may stay loading or unloading (its text not
    /// compared) before that is a violation.
    pub module_grace: Duration,
    /// Module text kept whole per domain, in bytes (`limits.module_text`).
    pub module_text: u64,
    /// Bytes of a guest's kernel tables and records one check may hold
    /// (`limits.guest_memory`).
    pub guest_memory: u64,
    /// Alerts the log could not take, waiting in memory for each push sink
    /// (`limits.push_queue`); past it they are counted as
    /// `push_queue_full`, and delivered from the log once it takes them.
    pub push_queue: usize,
    /// A check running longer than this is reported (it cannot be cut short:
    /// it runs on a blocking thread), and the domain's next check waits.
    pub check_timeout: Duration,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    pub alertmanager: Option<HttpEndpoint>,
    pub webhook: Option<HttpEndpoint>,
    /// Evidence saved on a violation; `None` when switched off (the default).
    pub evidence: Option<EvidenceSettings>,
    /// Keep baselines' original pages in their files, not in memory
    /// (`originals = "disk"`).
    pub originals_on_disk: bool,
    /// Modules allowed to hook (`hooks.allow`).
    pub hooks: crate::linux::hooks::HookPolicy,
}

/// What the daemon saves when a violation is first reported (`[evidence]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvidenceSettings {
    /// Whether to save the guest's memory through libvirt as well as the diff.
    pub memory_dump: bool,
    /// No memory dump of a guest with more memory than this (bytes).
    pub max_dump: u64,
    /// The evidence directory's size cap (bytes): the oldest bundles go first.
    pub max_total: u64,
    /// Bundles kept per domain, newest first.
    pub keep: usize,
    /// At most one bundle per domain in this time.
    pub min_interval: Duration,
}

/// The smallest alert log rotated: an alert line may be 64 KiB long.
const MIN_ALERT_LOG: u64 = 64 << 10;

/// Parses a size: `"512MiB"`, `"4GiB"`, `"1TiB"`, `"64KiB"`, or plain bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return None,
    };
    n.checked_mul(1u64 << shift).filter(|&b| b > 0)
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

/// Which key of an endpoint's table a refusal is about.
#[derive(Debug, PartialEq, Eq)]
enum EndpointKey {
    Url,
    CaFile,
}

fn parse_endpoint(url: &str, ca_file: Option<&str>) -> Result<HttpEndpoint, (EndpointKey, String)> {
    let bad_url = |r: &str| (EndpointKey::Url, format!("{url:?} {r}"));
    let (https, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => return Err(bad_url("must be an http:// or https:// URL")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    // host, [v6 host] or either with :port
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (host, after) =
                v6.split_once(']').ok_or_else(|| bad_url("has an unclosed [ in its host"))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad_url("has a host in [ ] that is no IPv6 address"));
            }
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| bad_url("has text after its ] that is no :port"))?,
                    ),
                ),
            }
        }
        None => match authority.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err(bad_url(
                    "has more than one : in its host and port (an IPv6 host goes in [ ])",
                ));
            }
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() || authority.contains('@') {
        return Err(bad_url(
            "must name a host, as http://127.0.0.1:9093 (and no user or password)",
        ));
    }
    let port = match port {
        None => {
            if https {
                443
            } else {
                80
            }
        }
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| bad_url("has a port that is not a number from 1 to 65535"))?,
    };
    let host_port = if authority.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let tls = match (https, ca_file) {
        (false, Some(_)) => {
            return Err((EndpointKey::CaFile, "is for https URLs; this one is http://".into()));
        }
        (false, None) => None,
        (true, ca_file) => {
            let server_name =
                rustls::pki_types::ServerName::try_from(host.to_owned()).map_err(|e| {
                    bad_url(&format!("names a host that cannot be a TLS server name ({e})"))
                })?;
            let ca_file = ca_file.map(PathBuf::from);
            let config = client_config(ca_file.as_deref()).map_err(|e| {
                (if ca_file.is_some() { EndpointKey::CaFile } else { EndpointKey::Url }, e)
            })?;
            Some(Tls { ca_file, server_name, config })
        }
    };
    Ok(HttpEndpoint { host_port, path: path.to_owned(), url: url.to_owned(), tls })
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
        let bad = |key: &str, reason: String| invalid(file, key, reason);
        let dur =
            |key: &str, v: &Option<String>, default: Duration| duration(file, key, v, default);
        let state_dir = over
            .state_dir
            .clone()
            .or(raw.state_dir)
            .unwrap_or_else(|| crate::paths::STATE_DIR.into());
        let alert_log = over
            .alert_log
            .clone()
            .or(raw.alert_log)
            .unwrap_or_else(|| state_dir.join("alerts.jsonl"));
        let alert_rotation = rotation(file, raw.alert_log_max_size.as_deref(), raw.alert_log_keep)?;
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
            dur("schedule.full_interval", &raw.schedule.full_interval, Duration::from_secs(1))?;
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
        let module_grace = dur(
            "schedule.module_grace",
            &raw.schedule.module_grace,
            crate::linux::modules::MODULE_GRACE,
        )?;
        let check_timeout =
            dur("schedule.check_timeout", &raw.schedule.check_timeout, Duration::from_secs(30))?;
        let module_text = match &raw.limits.module_text {
            None => crate::linux::modules::MODULE_TEXT_KEPT,
            Some(t) => parse_size(t).filter(|&b| b <= 1 << 40).ok_or_else(|| {
                bad("limits.module_text", format!("{t:?} is not a size such as \"64MiB\""))
            })?,
        };
        let guest_memory = match &raw.limits.guest_memory {
            None => crate::linux::semantic::ReadBudget::DEFAULT,
            Some(t) => {
                parse_size(t).filter(|&b| (4 << 20..=1 << 40).contains(&b)).ok_or_else(|| {
                    bad(
                        "limits.guest_memory",
                        format!("{t:?} is not a size from \"4MiB\" to \"1TiB\""),
                    )
                })?
            }
        };
        let push_queue = match raw.limits.push_queue {
            None => super::push::QUEUE,
            Some(n) if (1..=1 << 20).contains(&n) => n,
            Some(n) => {
                return Err(bad("limits.push_queue", format!("{n} is not from 1 to 1048576")));
            }
        };
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
        let endpoint = |table: &str, e: RawEndpoint| -> Result<Option<HttpEndpoint>, ConfigError> {
            match (e.url, e.ca_file) {
                (None, None) => Ok(None),
                (None, Some(_)) => {
                    Err(bad(&format!("{table}.ca_file"), "is given without a url".into()))
                }
                (Some(u), ca) => {
                    parse_endpoint(&u, ca.as_deref()).map(Some).map_err(|(key, r)| match key {
                        EndpointKey::Url => bad(&format!("{table}.url"), r),
                        EndpointKey::CaFile => bad(&format!("{table}.ca_file"), r),
                    })
                }
            }
        };
        let evidence = evidence(file, raw.evidence)?;
        let allow = raw
            .hooks
            .allow
            .unwrap_or_default()
            .iter()
            .map(|a| a.parse().map_err(|r| bad("hooks.allow", r)))
            .collect::<Result<Vec<_>, _>>()?;
        let originals_on_disk = match raw.originals.as_deref() {
            None | Some("memory") => false,
            Some("disk") => true,
            Some(other) => {
                return Err(bad(
                    "originals",
                    format!("{other:?} is neither \"memory\" nor \"disk\""),
                ));
            }
        };
        let host =
            raw.host.unwrap_or_else(|| crate::sys::hostname().unwrap_or_else(|| "unknown".into()));
        Ok(Self {
            connect: over
                .connect
                .clone()
                .or(raw.connect)
                .unwrap_or_else(|| "qemu:///system".into()),
            alert_log,
            alert_rotation,
            metrics_listen,
            control_socket: over
                .control_socket
                .clone()
                .or(raw.control_socket)
                .unwrap_or_else(|| crate::paths::CONTROL_SOCKET.into()),
            control_group: raw.control_group.unwrap_or_else(|| "vigil".into()),
            host,
            profiles: over
                .profiles
                .clone()
                .or(raw.profiles)
                .unwrap_or_else(|| crate::paths::profile_path(&state_dir)),
            hot_interval,
            full_interval,
            jitter,
            cpu_budget,
            attach_retry,
            settle,
            module_grace,
            module_text,
            guest_memory,
            push_queue,
            check_timeout,
            include,
            exclude,
            alertmanager: endpoint("alertmanager", raw.alertmanager)?,
            webhook: endpoint("webhook", raw.webhook)?,
            evidence,
            originals_on_disk,
            hooks: crate::linux::hooks::HookPolicy { allow },
            state_dir,
        })
    }

    /// Whether the daemon watches a domain of this name and UUID.
    pub fn watches(&self, name: &str, uuid: &str) -> bool {
        let hit = |pats: &[String]| pats.iter().any(|p| matches(p, name) || matches(p, uuid));
        hit(&self.include) && !hit(&self.exclude)
    }
}

fn invalid(file: &str, key: &str, reason: String) -> ConfigError {
    ConfigError::Invalid { file: file.into(), key: key.into(), reason }
}

/// A duration setting, or `default` when absent.
fn duration(
    file: &str,
    key: &str,
    v: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => parse_duration(s).ok_or_else(|| {
            invalid(
                file,
                key,
                format!("{s:?} is not a positive duration like \"500ms\", \"1s\", \"2m\""),
            )
        }),
    }
}

/// `alert_log_max_size` and `alert_log_keep`.
fn rotation(
    file: &str,
    max_size: Option<&str>,
    keep: Option<u32>,
) -> Result<Rotation, ConfigError> {
    let d = Rotation::default();
    let max_bytes = match max_size {
        None => d.max_bytes,
        Some(t) => parse_size(t).filter(|&b| b >= MIN_ALERT_LOG).ok_or_else(|| {
            invalid(
                file,
                "alert_log_max_size",
                format!("{t:?} is not a size of at least \"64KiB\", like \"64MiB\""),
            )
        })?,
    };
    let keep = keep.unwrap_or(d.keep);
    if !(1..=1000).contains(&keep) {
        return Err(invalid(
            file,
            "alert_log_keep",
            format!(
                "{keep} is not between 1 and 1000 (a pusher that is behind finishes reading the newest rotated log)"
            ),
        ));
    }
    Ok(Rotation { max_bytes, keep })
}

/// The `[evidence]` table: `None` when switched off; settings without
/// `enabled` are refused rather than guessed at.
fn evidence(file: &str, e: RawEvidence) -> Result<Option<EvidenceSettings>, ConfigError> {
    let bad = |key: &str, reason: String| invalid(file, key, reason);
    let any_key = e.memory_dump.is_some()
        || e.max_dump.is_some()
        || e.max_total.is_some()
        || e.keep.is_some()
        || e.min_interval.is_some();
    if e.enabled.is_none() && any_key {
        return Err(bad(
            "evidence.enabled",
            "missing: [evidence] has settings but is not switched on; say enabled = true (or false)"
                .into(),
        ));
    }
    if !e.enabled.unwrap_or(false) {
        return Ok(None);
    }
    let size = |key: &str, v: &Option<String>, default: u64| match v {
        None => Ok(default),
        Some(t) => parse_size(t)
            .ok_or_else(|| bad(key, format!("{t:?} is not a size like \"512MiB\" or \"4GiB\""))),
    };
    let keep = e.keep.unwrap_or(5);
    if keep == 0 {
        return Err(bad(
            "evidence.keep",
            "0 would delete every bundle as it is saved; switch evidence off instead".into(),
        ));
    }
    Ok(Some(EvidenceSettings {
        memory_dump: e.memory_dump.unwrap_or(true),
        max_dump: size("evidence.max_dump", &e.max_dump, 4 << 30)?,
        max_total: size("evidence.max_total", &e.max_total, 16 << 30)?,
        keep: keep as usize,
        min_interval: duration(
            file,
            "evidence.min_interval",
            &e.min_interval,
            Duration::from_secs(600),
        )?,
    }))
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
        assert_eq!(s.full_interval, Duration::from_secs(1));
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
        assert!(!load("").unwrap().originals_on_disk);
        assert!(load("originals = \"disk\"").unwrap().originals_on_disk);
        let allowed = load("[hooks]\nallow = [\"falcon_lsm\", \"agent:__x64_sys_kill\"]").unwrap();
        assert_eq!(allowed.hooks.allow.len(), 2);
        assert_eq!(allowed.hooks.allow[1].symbol.as_deref(), Some("__x64_sys_kill"));
        let e = load("[hooks]\nallow = [\"bad name\"]").unwrap_err().to_string();
        assert!(e.contains("hooks.allow") && e.contains("bad name"), "{e}");
        assert_eq!(load("").unwrap().module_grace, Duration::from_secs(120));
        let s = load("[schedule]\nmodule_grace = \"5m\"").unwrap();
        assert_eq!(s.module_grace, Duration::from_secs(300));
        let e = load("[schedule]\nmodule_grace = \"soon\"").unwrap_err().to_string();
        assert!(e.contains("schedule.module_grace"), "{e}");
        assert_eq!(load("").unwrap().alert_rotation, Rotation { max_bytes: 64 << 20, keep: 4 });
        let s = load("alert_log_max_size = \"1MiB\"\nalert_log_keep = 2").unwrap();
        assert_eq!(s.alert_rotation, Rotation { max_bytes: 1 << 20, keep: 2 });
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

    /// Endpoints: the port filled in by scheme, IPv6 hosts, https with the
    /// host's CA bundle (ca-certificates) unless a CA file is given.
    #[test]
    fn endpoints_take_default_ports_and_https() {
        let ep = |text: &str| load(text).unwrap().webhook.unwrap();
        let plain = ep("[webhook]\nurl = \"http://hooks.example/vigil\"");
        assert_eq!((plain.host_port.as_str(), plain.path.as_str()), ("hooks.example:80", "/vigil"));
        assert!(plain.tls.is_none());
        let v6 = ep("[webhook]\nurl = \"http://[::1]:9093\"");
        assert_eq!((v6.host_port.as_str(), v6.path.as_str()), ("[::1]:9093", "/"));
        let tls = ep("[webhook]\nurl = \"https://hooks.example/vigil\"");
        assert_eq!(tls.host_port, "hooks.example:443");
        let t = tls.tls.expect("https is TLS");
        assert_eq!(t.ca_file, None);
        assert_eq!(
            format!("{:?}", t.server_name),
            format!("{:?}", rustls::pki_types::ServerName::try_from("hooks.example").unwrap())
        );
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
            ("[alertmanager]\nurl = \"ftp://am:9093\"", "alertmanager.url"),
            ("[alertmanager]\nurl = \"http://am:port\"", "alertmanager.url"),
            ("[webhook]\nurl = \"http://user:pw@am:80/\"", "webhook.url"),
            (
                "[webhook]\nurl = \"http://127.0.0.1:9/\"\nca_file = \"/etc/ssl/certs/ca-certificates.crt\"",
                "webhook.ca_file",
            ),
            (
                "[webhook]\nurl = \"https://127.0.0.1:9/\"\nca_file = \"/nonexistent/ca.pem\"",
                "webhook.ca_file",
            ),
            ("[webhook]\nca_file = \"/etc/ssl/certs/ca-certificates.crt\"", "webhook.ca_file"),
            (
                "[webhook]\nurl = \"https://127.0.0.1:9/\"\nca_file = \"/dev/zero\"",
                "webhook.ca_file",
            ),
            ("[webhook]\nurl = \"http://[::1]9093/\"", "webhook.url"),
            ("[webhook]\nurl = \"http://[evil.example]:80/\"", "webhook.url"),
            ("[webhook]\nurl = \"http://a:b:80/\"", "webhook.url"),
            ("[webhook]\nurl = \"http://a:0/\"", "webhook.url"),
            ("[domains]\ninclude = [\"\"]", "domains.include"),
            ("[evidence]\nenabled = true\nmax_dump = \"4 GB\"", "evidence.max_dump"),
            ("[evidence]\nenabled = true\nkeep = 0", "evidence.keep"),
            ("[evidence]\nmemory_dump = true", "evidence.enabled"),
            ("originals = \"ssd\"", "originals"),
            ("[evidence]\nenabled = true\nmin_interval = \"soon\"", "evidence.min_interval"),
            ("alert_log_max_size = \"4KiB\"", "alert_log_max_size"),
            ("alert_log_max_size = \"big\"", "alert_log_max_size"),
            ("alert_log_keep = 0", "alert_log_keep"),
            ("[limits]\nguest_memory = \"1MiB\"", "limits.guest_memory"),
            ("[limits]\npush_queue = 0", "limits.push_queue"),
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
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size(" 2 GiB "), Some(2 << 30));
        for bad in ["", "GiB", "0", "4GB", "1.5GiB", "-1", "99999999999TiB"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn evidence_is_off_unless_enabled() {
        assert_eq!(load("").unwrap().evidence, None);
        assert_eq!(load("[evidence]\nenabled = false\nkeep = 3").unwrap().evidence, None);
        let e = load("[evidence]\nenabled = true\nmax_total = \"1GiB\"\nkeep = 2")
            .unwrap()
            .evidence
            .unwrap();
        assert_eq!((e.max_total, e.keep, e.memory_dump), (1 << 30, 2, true));
        assert_eq!(e.min_interval, Duration::from_secs(600));
        assert!(load("[evidence]\nenabled = true\nbogus = 1").is_err());
    }
}
