//! The daemon's metrics: typed label sets in one explicit registry, served
//! as OpenMetrics on `/metrics` by a small HTTP server.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, text::encode,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DomainLabels {
    pub domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub domain: String,
    /// `hot` or `full`.
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabels {
    pub domain: String,
    pub region: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViolationLabels {
    pub domain: String,
    pub region: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PatchLabels {
    pub domain: String,
    pub kind: String,
}

/// A guest's hooks of one mechanism and kind of owner (fixed value sets:
/// see [`crate::linux::hooks::OWNER_KINDS`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HookLabels {
    pub domain: String,
    pub mechanism: String,
    pub owner: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    pub scope: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KvmLabels {
    domain: String,
    stat: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KvmKindLabels {
    domain: String,
    stat: String,
    /// `current` or `peak`.
    kind: String,
}

/// KVM's statistics of the watched domains as last collected (by the
/// daemon's collecting task, every 5 s), encoded as they stand at each scrape.
/// Values are KVM's own, from the VM's start: a restarted domain's counters
/// start again from 0, which Prometheus reads as a reset.
#[derive(Debug, Default)]
pub struct KvmCollector {
    domains: Mutex<BTreeMap<String, crate::kvm::KvmStats>>,
}

impl KvmCollector {
    /// What is exported from now on: these domains' statistics, by name.
    pub fn replace(&self, domains: BTreeMap<String, crate::kvm::KvmStats>) {
        *self.domains.lock().expect("kvm stats lock") = domains;
    }
}

/// A family of the KVM collector's: its name and help, and its samples.
fn encode_kvm_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    counter: bool,
    samples: &[(L, u64)],
) -> Result<(), std::fmt::Error> {
    if samples.is_empty() {
        return Ok(());
    }
    let kind = if counter {
        ConstCounter::new(0u64).metric_type()
    } else {
        ConstGauge::new(0i64).metric_type()
    };
    let mut family: MetricEncoder = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let sample = family.encode_family(labels)?;
        if counter {
            ConstCounter::new(*value).encode(sample)?;
        } else {
            // KVM's gauges are far below 2^63; one past it is shown as the most.
            ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX)).encode(sample)?;
        }
    }
    Ok(())
}

impl Collector for KvmCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use crate::kvm::{Kind, KvmStats, StatMap};
        let domains = self.domains.lock().expect("kvm stats lock");
        type Pick = fn(&KvmStats) -> &StatMap;
        let scopes: [(&str, &str, Pick); 2] = [
            ("vm", "of the domain's VM", |s| &s.vm),
            ("vcpu", "of the domain's vCPUs, summed (a peak: the highest)", |s| &s.vcpu),
        ];
        for (scope, whose, pick) in scopes {
            let mut cumulative = Vec::new();
            let mut instant = Vec::new();
            for (domain, stats) in domains.iter() {
                for ((stat, kind), &value) in pick(stats) {
                    let (domain, stat) = (domain.clone(), stat.clone());
                    match kind {
                        Kind::Cumulative => cumulative.push((KvmLabels { domain, stat }, value)),
                        k => instant.push((
                            KvmKindLabels { domain, stat, kind: k.label().to_owned() },
                            value,
                        )),
                    }
                }
            }
            encode_kvm_family(
                &mut encoder,
                &format!("kvm_{scope}_cumulative"),
                &format!("KVM's cumulative statistics {whose}, from libvirt (none for TCG)"),
                true,
                &cumulative,
            )?;
            encode_kvm_family(
                &mut encoder,
                &format!("kvm_{scope}"),
                &format!("KVM's instant (kind current) and peak statistics {whose}"),
                false,
                &instant,
            )?;
        }
        let vcpus: Vec<(DomainLabels, u64)> = domains
            .iter()
            .filter(|(_, s)| s.vcpus > 0)
            .map(|(d, s)| (DomainLabels { domain: d.clone() }, s.vcpus))
            .collect();
        encode_kvm_family(&mut encoder, "kvm_vcpus", "vCPUs with KVM statistics", false, &vcpus)
    }
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub checks: Family<CheckLabels, Counter>,
    pub check_duration: Family<ScopeLabels, Histogram>,
    pub bytes_verified: Family<DomainLabels, Counter>,
    pub pages_protected: Family<RegionLabels, Gauge>,
    pub last_check: Family<DomainLabels, Gauge<f64, AtomicU64>>,
    pub violations: Family<ViolationLabels, Counter>,
    pub events: Family<KindLabels, Counter>,
    pub errors: Family<KindLabels, Counter>,
    pub patches: Family<PatchLabels, Counter>,
    pub patched_sites: Family<DomainLabels, Gauge>,
    pub pending_sites: Family<DomainLabels, Gauge>,
    pub attached: Gauge,
    pub alerts_held: Gauge,
    pub budget_used: Gauge<f64, AtomicU64>,
    pub budget_overruns: Counter,
    pub evidence_saved: Family<DomainLabels, Counter>,
    pub evidence_bytes: Gauge,
    pub register_snapshots: Family<DomainLabels, Counter>,
    pub reference_verified: Family<DomainLabels, Gauge>,
    pub open_violations: Family<DomainLabels, Gauge>,
    pub guest_memory: Family<DomainLabels, Gauge>,
    pub hooks: Family<HookLabels, Gauge>,
    pub kvm: Arc<KvmCollector>,
}

fn duration_histogram() -> Histogram {
    // 100 µs to about 6.5 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 17))
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("vigil")),
            checks: Family::default(),
            check_duration: Family::new_with_constructor(duration_histogram),
            bytes_verified: Family::default(),
            pages_protected: Family::default(),
            last_check: Family::default(),
            violations: Family::default(),
            events: Family::default(),
            errors: Family::default(),
            patches: Family::default(),
            patched_sites: Family::default(),
            pending_sites: Family::default(),
            attached: Gauge::default(),
            alerts_held: Gauge::default(),
            budget_used: Gauge::default(),
            budget_overruns: Counter::default(),
            evidence_saved: Family::default(),
            evidence_bytes: Gauge::default(),
            register_snapshots: Family::default(),
            reference_verified: Family::default(),
            open_violations: Family::default(),
            guest_memory: Family::default(),
            hooks: Family::default(),
            kvm: Arc::default(),
        };
        {
            let mut r = m.registry.lock().expect("registry lock");
            r.register("checks", "Integrity checks run", m.checks.clone());
            r.register("check_duration_seconds", "Time one check took", m.check_duration.clone());
            r.register(
                "bytes_verified",
                "Guest memory bytes read and hashed",
                m.bytes_verified.clone(),
            );
            r.register("pages_protected", "Pages under protection", m.pages_protected.clone());
            r.register(
                "last_check_timestamp_seconds",
                "Unix time of the last completed check",
                m.last_check.clone(),
            );
            r.register(
                "violations",
                "Violations found (each distinct change once)",
                m.violations.clone(),
            );
            r.register("events", "Alert-log events by kind", m.events.clone());
            r.register("errors", "Monitor failures by kind", m.errors.clone());
            r.register(
                "patches_accepted",
                "Kernel text patches accepted, by kind (jump_label, static_call, ftrace, kprobe)",
                m.patches.clone(),
            );
            r.register(
                "patched_sites",
                "Text patch sites that differ from the baseline now, all accepted",
                m.patched_sites.clone(),
            );
            r.register(
                "patch_sites_pending",
                "Text patch sites whose bytes disagree with their kernel records, held (judged again at every full check) until reported or settled",
                m.pending_sites.clone(),
            );
            r.register("domains_attached", "Domains being checked", m.attached.clone());
            r.register(
                "alerts_held",
                "Alerts the alert log could not take yet, held in memory to be logged",
                m.alerts_held.clone(),
            );
            r.register(
                "reference_verified",
                "Whether the baseline of a domain's boot matched the vendor's image of its kernel when taken: 1 verified, 0 mismatch, -1 no reference to compare with",
                m.reference_verified.clone(),
            );
            r.register(
                "open_violations",
                "Distinct violations a domain's last full check found (0 once reverted or accepted)",
                m.open_violations.clone(),
            );
            r.register(
                "guest_memory_bytes",
                "Host memory held for a domain at its last check, of its budget (limits.guest_memory): its baseline and original pages, modules' text, patch sites and hooks, and the kernel tables and records the check read",
                m.guest_memory.clone(),
            );
            r.register(
                "register_snapshots",
                "vCPU register snapshots asked of libvirt and QEMU (one per check, attach and baseline; more: snapshots taken again)",
                m.register_snapshots.clone(),
            );
            r.register(
                "budget_used_ratio",
                "Share of the CPU budget used over the last second",
                m.budget_used.clone(),
            );
            r.register(
                "budget_overruns",
                "Checks started late because the CPU budget was spent",
                m.budget_overruns.clone(),
            );
            r.register(
                "evidence_saved",
                "Evidence bundles saved after a violation",
                m.evidence_saved.clone(),
            );
            r.register(
                "evidence_bytes",
                "Bytes under the evidence directory after the last save",
                m.evidence_bytes.clone(),
            );
            r.register(
                "hooks",
                "Hooks of the guest kernel at the last check, by mechanism and owner (kernel, bpf, module, unknown)",
                m.hooks.clone(),
            );
            r.register_collector(Box::new(m.kvm.clone()));
            r.register(
                "build",
                "Build information",
                Info::new(vec![("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned())]),
            );
        }
        Arc::new(m)
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry.lock().expect("registry lock"))
            .expect("writing to a String");
        out
    }
}

/// What the metrics listener holds at once.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections held at once. One more evicts the connection idle the
    /// longest (no request in progress), or is closed as it is accepted if
    /// every one is serving; either is counted as error
    /// `metrics_connections`.
    pub connections: usize,
    /// A request's headers must arrive within this, an idle keep-alive
    /// connection's next request too.
    pub header_timeout: Duration,
    /// No connection is held longer than this, however busy.
    pub lifetime: Duration,
}

impl Limits {
    /// Room for a few Prometheus servers and operators' curls. A local user
    /// opening idle connections cannot keep a scrape out: each new
    /// connection pushes out the oldest idle one.
    pub const DEFAULT: Limits = Limits {
        connections: 64,
        header_timeout: Duration::from_secs(10),
        lifetime: Duration::from_secs(120),
    };
}

fn router(metrics: Arc<Metrics>) -> axum::Router {
    use axum::http::header;
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}

/// One connection the listener holds.
struct Held {
    /// A request is being answered.
    busy: std::sync::atomic::AtomicBool,
    /// The connection's task has ended, or was told to.
    done: std::sync::atomic::AtomicBool,
    /// Tells the task to close the connection.
    evict: tokio::sync::Notify,
    /// When the connection last started or finished a request, as
    /// milliseconds since the listener started.
    last: AtomicU64,
}

/// Serves `/metrics` and `/healthz` over HTTP/1 within `limits`, for as
/// long as the daemon runs. A failed accept (out of file descriptors, say)
/// is counted as error `metrics_listener` and retried after a pause.
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, limits: Limits) {
    use std::sync::atomic::Ordering::SeqCst;
    let app = router(metrics.clone());
    let error = |kind: &str| metrics.errors.get_or_create(&KindLabels { kind: kind.into() }).inc();
    let epoch = tokio::time::Instant::now();
    let now = move || u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut held: Vec<Arc<Held>> = Vec::with_capacity(limits.connections);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                error("metrics_listener");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        held.retain(|h| !h.done.load(SeqCst));
        if held.len() >= limits.connections {
            error("metrics_connections");
            let idlest = held
                .iter()
                .enumerate()
                .filter(|(_, h)| !h.busy.load(SeqCst))
                .min_by_key(|(_, h)| h.last.load(SeqCst))
                .map(|(i, _)| i);
            let Some(i) = idlest else {
                drop(stream);
                continue;
            };
            let h = held.swap_remove(i);
            h.done.store(true, SeqCst);
            h.evict.notify_one();
        }
        let h = Arc::new(Held {
            busy: false.into(),
            done: false.into(),
            evict: tokio::sync::Notify::new(),
            last: AtomicU64::new(now()),
        });
        held.push(h.clone());
        let app = hyper_util::service::TowerToHyperService::new(app.clone());
        let marks = h.clone();
        let service = hyper::service::service_fn(move |req| {
            let (call, marks) = (hyper::service::Service::call(&app, req), marks.clone());
            async move {
                marks.busy.store(true, SeqCst);
                let answer = call.await;
                marks.last.store(now(), SeqCst);
                marks.busy.store(false, SeqCst);
                answer
            }
        });
        tokio::spawn(async move {
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // An error is the client's (gone, too slow): nothing to tell.
            tokio::select! {
                _ = tokio::time::timeout(limits.lifetime, connection) => {}
                () = h.evict.notified() => {}
            }
            h.done.store(true, SeqCst);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_openmetrics_with_prefix_and_labels() {
        let m = Metrics::new();
        m.violations
            .get_or_create(&ViolationLabels {
                domain: "web1".into(),
                region: "kernel-text".into(),
                kind: "content".into(),
            })
            .inc();
        m.check_duration.get_or_create(&ScopeLabels { scope: "full".into() }).observe(0.01);
        let text = m.encode();
        assert!(
            text.contains(
                r#"vigil_violations_total{domain="web1",region="kernel-text",kind="content"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains("vigil_check_duration_seconds_bucket"), "{text}");
        assert!(text.contains("vigil_build_info{version="), "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn kvm_statistics_are_exported_as_last_collected() {
        use crate::kvm::{Kind, KvmStats};
        let m = Metrics::new();
        assert!(!m.encode().contains("kvm"), "nothing collected, nothing exported");
        let mut s = KvmStats { vcpus: 2, ..KvmStats::default() };
        s.vcpu.insert(("exits".into(), Kind::Cumulative), 150);
        s.vcpu.insert(("guest_mode".into(), Kind::Current), 1);
        s.vcpu.insert(("halt_poll_fail_ns".into(), Kind::Peak), 9);
        s.vm.insert(("remote_tlb_flush".into(), Kind::Cumulative), 3);
        s.vm.insert(("pages_4k".into(), Kind::Current), u64::MAX);
        let domains = [("web1".to_owned(), s), ("tcg".to_owned(), KvmStats::default())];
        m.kvm.replace(domains.into_iter().collect());
        let text = m.encode();
        for line in [
            "# TYPE vigil_kvm_vcpu_cumulative counter",
            r#"vigil_kvm_vcpu_cumulative_total{domain="web1",stat="exits"} 150"#,
            "# TYPE vigil_kvm_vcpu gauge",
            r#"vigil_kvm_vcpu{domain="web1",stat="guest_mode",kind="current"} 1"#,
            r#"vigil_kvm_vcpu{domain="web1",stat="halt_poll_fail_ns",kind="peak"} 9"#,
            r#"vigil_kvm_vm_cumulative_total{domain="web1",stat="remote_tlb_flush"} 3"#,
            // Past i64: the most a gauge shows.
            r#"vigil_kvm_vm{domain="web1",stat="pages_4k",kind="current"} 9223372036854775807"#,
            r#"vigil_kvm_vcpus{domain="web1"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(!text.contains(r#"domain="tcg""#), "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
        // The next collection replaces the last: a domain let go is gone.
        m.kvm.replace(BTreeMap::new());
        assert!(!m.encode().contains("kvm"));
    }

    /// Reads what the server sends on `c` until it closes, for up to 5 s:
    /// `None` if it is still open then.
    async fn until_closed(c: &mut tokio::net::TcpStream) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let mut buf = Vec::new();
        match tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf)).await {
            Ok(_) => Some(String::from_utf8_lossy(&buf).into_owned()),
            Err(_) => None,
        }
    }

    /// A local user holding idle connections cannot keep a scrape out: at
    /// the cap, a new connection pushes out the one idle the longest
    /// (counted), and is served.
    #[tokio::test]
    async fn a_new_connection_at_the_cap_pushes_out_the_idlest() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Metrics::new();
        let limits = Limits {
            connections: 2,
            header_timeout: Duration::from_secs(60),
            lifetime: Duration::from_secs(60),
        };
        tokio::spawn(serve(listener, m.clone(), limits));
        let mut oldest = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut younger = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut scrape = tokio::net::TcpStream::connect(addr).await.unwrap();
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let body = until_closed(&mut scrape).await.expect("the scrape answered and closed");
        assert!(body.starts_with("HTTP/1.1 200") && body.contains("vigil_errors_total"), "{body}");
        assert_eq!(
            until_closed(&mut oldest).await.as_deref(),
            Some(""),
            "the idlest was pushed out"
        );
        // The younger idle one is still held (its read times out).
        let kept = tokio::time::timeout(Duration::from_millis(300), async {
            use tokio::io::AsyncReadExt;
            younger.read(&mut [0u8; 16]).await
        })
        .await;
        assert!(kept.is_err(), "the younger idle connection was closed too: {kept:?}");
        let pushed =
            m.errors.get_or_create(&KindLabels { kind: "metrics_connections".into() }).get();
        assert_eq!(pushed, 1);
    }

    /// A failed accept (the daemon out of file descriptors) is counted as
    /// `metrics_listener` and tried again; once descriptors are free the
    /// waiting scrape is served, and shows the count. Run in a child
    /// process whose descriptor limit `prlimit` sets low, so that filling
    /// its table is quick and touches no other test.
    #[tokio::test]
    async fn a_failed_accept_is_counted_and_tried_again() {
        const NAME: &str = "daemon::metrics::tests::a_failed_accept_is_counted_and_tried_again";
        if std::env::var_os("VIGIL_TEST_FEW_FILES").is_none() {
            let exe = std::env::current_exe().unwrap();
            let out = std::process::Command::new("prlimit")
                .arg("--nofile=96:96")
                .arg(&exe)
                .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env("VIGIL_TEST_FEW_FILES", "1")
                .output()
                .unwrap_or_else(|e| panic!("prlimit (util-linux) is needed: {e}"));
            let said = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && said.contains("1 passed"), "the child:\n{said}");
            return;
        }
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Metrics::new();
        tokio::spawn(serve(listener, m.clone(), Limits::DEFAULT));
        let mut fill = Vec::new();
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => fill.push(f),
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => break,
                Err(e) => panic!("opening /dev/null: {e}"),
            }
            assert!(fill.len() < 4096, "the descriptor limit is not low: run under prlimit");
        }
        fill.pop(); // one descriptor for the scrape's own end
        let mut scrape = tokio::net::TcpStream::connect(addr).await.unwrap();
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let failed =
            || m.errors.get_or_create(&KindLabels { kind: "metrics_listener".into() }).get();
        for _ in 0..100 {
            if failed() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(failed() >= 2, "no failed accept counted, or not tried again: {}", failed());
        fill.truncate(fill.len().saturating_sub(8));
        let body = until_closed(&mut scrape).await.expect("the scrape answered and closed");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        let counted = body
            .lines()
            .find_map(|l| l.strip_prefix("vigil_errors_total{kind=\"metrics_listener\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        assert!(counted.is_some_and(|n| n >= 2.0), "{body}");
    }

    /// An idle connection is closed once its headers are late, and an idle
    /// keep-alive connection once its next request is.
    #[tokio::test]
    async fn idle_connections_are_timed_out() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            connections: 4,
            header_timeout: Duration::from_millis(300),
            lifetime: Duration::from_secs(60),
        };
        tokio::spawn(serve(listener, Metrics::new(), limits));
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert_eq!(until_closed(&mut silent).await.as_deref(), Some(""));
        let mut kept_alive = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept_alive.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let said = until_closed(&mut kept_alive).await.expect("closed after its idle time");
        assert!(said.starts_with("HTTP/1.1 200") && said.ends_with("ok\n"), "{said:?}");
    }
}
