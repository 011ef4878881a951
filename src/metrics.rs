//! Every Prometheus metric ballast exports, defined once.
//!
//! The hot path never looks a label up: each backend's and listener's handles are
//! resolved once, when its runtime state is created ([`Metrics::backend`],
//! [`Metrics::listener`]), and the runtime state uses those handles *as* its counters
//! (a prometheus counter is an atomic), so the admin API and `/metrics` read the same
//! numbers. Values that are properties of the config or of the moment (up, draining,
//! weight, imbalance, generation) are set from the routing snapshot at each scrape.

use crate::conn::EndReason;
use crate::state::RejectReason;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Seconds; from a loopback connect (~50us) to a slow remote one (10s).
const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Seconds; from a one-request connection to a day-long WebSocket.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0,
    86400.0,
];

/// The metric families, registered in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    listener_active: IntGaugeVec,
    listener_total: IntCounterVec,
    listener_rejected: IntCounterVec,
    listener_closed: IntCounterVec,
    listener_imbalance: GaugeVec,
    connection_duration: HistogramVec,
    backend_active: IntGaugeVec,
    backend_total: IntCounterVec,
    backend_connect_failures: IntCounterVec,
    backend_connect_duration: HistogramVec,
    backend_sent_bytes: IntCounterVec,
    backend_received_bytes: IntCounterVec,
    backend_up: IntGaugeVec,
    backend_draining: IntGaugeVec,
    backend_weight: IntGaugeVec,
    backend_effective_weight: GaugeVec,
    rebalance_migrations: IntCounterVec,
    backend_ejections: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub config_last_reload_success: Gauge,
    /// Log lines that stderr could not take (see `crate::logging`).
    pub log_lines_dropped: IntCounter,
    /// DNS answers for `discover` entries and backends' host names, by listener and
    /// result (`success`, `failure`: an error, no answer in time, or no usable address).
    pub discovery_resolutions: IntCounterVec,
    pub handover: IntCounterVec,
    /// `ballast_cluster_up` and `ballast_cluster_peers`, registered once `[cluster]` is
    /// first in use, so that an instance without one shows no cluster down.
    cluster: std::sync::Arc<std::sync::Mutex<Option<ClusterMetrics>>>,
}

/// The cluster's gauges.
#[derive(Debug, Clone)]
pub struct ClusterMetrics {
    /// 1 while Redis answers.
    pub up: IntGauge,
    /// Peers whose latest report is fresh.
    pub peers: IntGauge,
}

/// One listener's handles.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    pub active: IntGauge,
    pub total: IntCounter,
    /// `ballast_listener_connections_rejected_total` by [`RejectReason::index`].
    pub rejected: Vec<IntCounter>,
    pub imbalance: Gauge,
    pub connection_duration: Histogram,
    /// `ballast_connections_closed_total` by [`EndReason::index`].
    pub closed: Vec<IntCounter>,
}

/// One backend's handles.
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    pub active: IntGauge,
    pub total: IntCounter,
    pub connect_failures: IntCounter,
    pub connect_duration: Histogram,
    pub sent_bytes: IntCounter,
    pub received_bytes: IntCounter,
    pub up: IntGauge,
    pub draining: IntGauge,
    pub weight: IntGauge,
    pub effective_weight: Gauge,
    pub migrations: IntCounter,
    pub ejections: IntCounter,
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique and valid");
    c
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let int_gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                &r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let histogram_vec = |name: &str, help: &str, labels: &[&str], buckets: &[f64]| {
            let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
            register(&r, HistogramVec::new(opts, labels).expect("valid metric"))
        };
        let lb = &["listener", "backend"];
        let metrics = Metrics {
            listener_active: int_gauge_vec(
                "ballast_listener_connections_active",
                "Client connections open right now.",
                &["listener"],
            ),
            listener_total: counter_vec(
                "ballast_listener_connections_total",
                "Client connections accepted.",
                &["listener"],
            ),
            listener_rejected: counter_vec(
                "ballast_listener_connections_rejected_total",
                "Client connections closed without a backend, by reason.",
                &["listener", "reason"],
            ),
            listener_closed: counter_vec(
                "ballast_connections_closed_total",
                "Client connections that ended, by why they ended.",
                &["listener", "reason"],
            ),
            listener_imbalance: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "ballast_listener_imbalance",
                        "Largest active / fair share among available backends; 1 = even.",
                    ),
                    &["listener"],
                )
                .expect("valid metric"),
            ),
            connection_duration: histogram_vec(
                "ballast_connection_duration_seconds",
                "How long client connections lasted.",
                &["listener"],
                DURATION_BUCKETS,
            ),
            backend_active: int_gauge_vec(
                "ballast_backend_connections_active",
                "Connections open right now to the backend.",
                lb,
            ),
            backend_total: counter_vec(
                "ballast_backend_connections_total",
                "Connections established to the backend.",
                lb,
            ),
            backend_connect_failures: counter_vec(
                "ballast_backend_connect_failures_total",
                "Connects to the backend that were refused or timed out.",
                lb,
            ),
            backend_connect_duration: histogram_vec(
                "ballast_backend_connect_duration_seconds",
                "Time to establish a connection to the backend.",
                lb,
                CONNECT_BUCKETS,
            ),
            backend_sent_bytes: counter_vec(
                "ballast_backend_sent_bytes_total",
                "Bytes relayed from clients to the backend.",
                lb,
            ),
            backend_received_bytes: counter_vec(
                "ballast_backend_received_bytes_total",
                "Bytes relayed from the backend to clients.",
                lb,
            ),
            backend_up: int_gauge_vec(
                "ballast_backend_up",
                "1 when the backend passes health checks and neither its agent nor passive ejection takes it out, 0 otherwise.",
                lb,
            ),
            backend_draining: int_gauge_vec(
                "ballast_backend_draining",
                "1 when the backend is draining (drained, max_conns = 0 or removed).",
                lb,
            ),
            backend_weight: int_gauge_vec("ballast_backend_weight", "Configured weight.", lb),
            backend_effective_weight: register(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "ballast_backend_effective_weight",
                        "The weight picks use now: the configured one, or one set by the admin API or an agent, reduced during slow start.",
                    ),
                    lb,
                )
                .expect("valid metric"),
            ),
            rebalance_migrations: counter_vec(
                "ballast_rebalance_migrations_total",
                "Connections migrated away from the backend by rebalance.",
                lb,
            ),
            backend_ejections: counter_vec(
                "ballast_backend_ejections_total",
                "Times the backend was ejected by passive outlier detection.",
                lb,
            ),
            config_reloads: counter_vec(
                "ballast_config_reloads_total",
                "Config reloads, by result.",
                &["result"],
            ),
            config_generation: register(
                &r,
                IntGauge::new(
                    "ballast_config_generation",
                    "Generation of the config in use: 1 at start, +1 per successful reload.",
                )
                .expect("valid metric"),
            ),
            config_last_reload_success: register(
                &r,
                Gauge::new(
                    "ballast_config_last_reload_success_timestamp_seconds",
                    "Unix time of the last successful config load.",
                )
                .expect("valid metric"),
            ),
            log_lines_dropped: register(
                &r,
                IntCounter::new(
                    "ballast_log_lines_dropped_total",
                    "Log lines dropped because stderr could not take them (a closed terminal).",
                )
                .expect("valid metric"),
            ),
            discovery_resolutions: counter_vec(
                "ballast_discovery_resolutions_total",
                "DNS answers for discover entries and backends' host names, by result (success, failure).",
                &["listener", "result"],
            ),
            handover: counter_vec(
                "ballast_handover_connections_total",
                "Established connections an upgrade handed over, by result: sent (to the new process), received (from the old one), failed (kept by the old process, or lost).",
                &["result"],
            ),
            cluster: std::sync::Arc::default(),
            registry: r.clone(),
        };
        // Every result from the start, at 0: a dashboard's increase() sees the first.
        for result in ["sent", "received", "failed"] {
            metrics.handover.with_label_values(&[result]);
        }
        let build_info = register(
            &r,
            IntGaugeVec::new(
                Opts::new("ballast_build_info", "Always 1; labelled with the version."),
                &["version"],
            )
            .expect("valid metric"),
        );
        build_info.with_label_values(&[crate::VERSION]).set(1);
        for result in ["success", "failure"] {
            metrics.config_reloads.with_label_values(&[result]);
        }
        #[cfg(target_os = "linux")]
        {
            let _ = r.register(Box::new(process::Collector::new()));
        }
        metrics
    }

    /// Resolves (and so creates, at zero) every series of a listener.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let l = &[listener];
        ListenerMetrics {
            active: self.listener_active.with_label_values(l),
            total: self.listener_total.with_label_values(l),
            rejected: RejectReason::ALL
                .iter()
                .map(|r| {
                    self.listener_rejected
                        .with_label_values(&[listener, r.as_str()])
                })
                .collect(),
            imbalance: self.listener_imbalance.with_label_values(l),
            connection_duration: self.connection_duration.with_label_values(l),
            closed: EndReason::ALL
                .iter()
                .map(|r| {
                    self.listener_closed
                        .with_label_values(&[listener, r.as_str()])
                })
                .collect(),
        }
    }

    /// Resolves (and so creates, at zero) every series of a backend.
    pub fn backend(&self, listener: &str, backend: &str) -> BackendMetrics {
        let lb = &[listener, backend];
        BackendMetrics {
            active: self.backend_active.with_label_values(lb),
            total: self.backend_total.with_label_values(lb),
            connect_failures: self.backend_connect_failures.with_label_values(lb),
            connect_duration: self.backend_connect_duration.with_label_values(lb),
            sent_bytes: self.backend_sent_bytes.with_label_values(lb),
            received_bytes: self.backend_received_bytes.with_label_values(lb),
            up: self.backend_up.with_label_values(lb),
            draining: self.backend_draining.with_label_values(lb),
            weight: self.backend_weight.with_label_values(lb),
            effective_weight: self.backend_effective_weight.with_label_values(lb),
            migrations: self.rebalance_migrations.with_label_values(lb),
            ejections: self.backend_ejections.with_label_values(lb),
        }
    }

    /// Drops every series of a backend that left the config and has no connection left.
    pub fn remove_backend(&self, listener: &str, backend: &str) {
        let lb = &[listener, backend];
        let _ = self.backend_active.remove_label_values(lb);
        let _ = self.backend_total.remove_label_values(lb);
        let _ = self.backend_connect_failures.remove_label_values(lb);
        let _ = self.backend_connect_duration.remove_label_values(lb);
        let _ = self.backend_sent_bytes.remove_label_values(lb);
        let _ = self.backend_received_bytes.remove_label_values(lb);
        let _ = self.backend_up.remove_label_values(lb);
        let _ = self.backend_draining.remove_label_values(lb);
        let _ = self.backend_weight.remove_label_values(lb);
        let _ = self.backend_effective_weight.remove_label_values(lb);
        let _ = self.rebalance_migrations.remove_label_values(lb);
        let _ = self.backend_ejections.remove_label_values(lb);
    }

    /// The cluster's gauges, registered on first use.
    pub fn cluster(&self) -> ClusterMetrics {
        let mut cluster = self.cluster.lock().unwrap_or_else(|e| e.into_inner());
        cluster
            .get_or_insert_with(|| {
                let gauge = |name: &str, help: &str| {
                    register(
                        &self.registry,
                        IntGauge::new(name, help).expect("valid metric"),
                    )
                };
                ClusterMetrics {
                    up: gauge("ballast_cluster_up", "1 while Redis answers ([cluster])."),
                    peers: gauge(
                        "ballast_cluster_peers",
                        "Other instances whose latest report is fresh ([cluster]).",
                    ),
                }
            })
            .clone()
    }

    /// Unregisters the cluster's gauges: `[cluster]` left the config.
    pub fn drop_cluster(&self) {
        let mut cluster = self.cluster.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(gone) = cluster.take() {
            let _ = self.registry.unregister(Box::new(gone.up));
            let _ = self.registry.unregister(Box::new(gone.peers));
        }
    }

    /// Drops every series of a listener that left the config and has no connection left.
    pub fn remove_listener(&self, listener: &str) {
        let l = &[listener];
        let _ = self.listener_active.remove_label_values(l);
        let _ = self.listener_total.remove_label_values(l);
        for reason in RejectReason::ALL {
            let _ = self
                .listener_rejected
                .remove_label_values(&[listener, reason.as_str()]);
        }
        for reason in EndReason::ALL {
            let _ = self
                .listener_closed
                .remove_label_values(&[listener, reason.as_str()]);
        }
        let _ = self.listener_imbalance.remove_label_values(l);
        let _ = self.connection_duration.remove_label_values(l);
    }

    /// The text exposition format (version 0.0.4) of every metric.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The standard `process_*` metrics, with CPU time and start time as fractions of a
/// second.
///
/// The prometheus crate's collector divides clock ticks by ticks-per-second in integers,
/// so its `process_cpu_seconds_total` moves in whole seconds and a CPU panel reads 0 at
/// light load. This collector keeps the crate's memory, file-descriptor and thread
/// metrics and measures those two itself: CPU from `getrusage` (microseconds, every
/// thread of the process), start time from `/proc/self/stat` as `client_golang` does.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod process {
    use prometheus::core::{Collector as _, Desc};
    use prometheus::proto::MetricFamily;
    use prometheus::{Counter, Gauge, Opts};

    const CPU: &str = "process_cpu_seconds_total";
    const START: &str = "process_start_time_seconds";

    pub struct Collector {
        /// Resident and virtual memory, open and max fds, threads.
        inner: prometheus::process_collector::ProcessCollector,
        /// The inner collector's descriptions without its CPU and start time, then ours.
        descs: Vec<Desc>,
        /// Set once: a process starts once.
        start_time: Gauge,
    }

    fn cpu_opts() -> Opts {
        Opts::new(CPU, "Total user and system CPU time spent in seconds.")
    }

    impl Collector {
        pub fn new() -> Collector {
            let inner = prometheus::process_collector::ProcessCollector::for_self();
            let start_time = Gauge::with_opts(Opts::new(
                START,
                "Start time of the process since unix epoch in seconds.",
            ))
            .expect("valid metric");
            if let Some(started) = start_time_seconds() {
                start_time.set(started);
            }
            let cpu = Counter::with_opts(cpu_opts()).expect("valid metric");
            let mut descs: Vec<Desc> = inner
                .desc()
                .into_iter()
                .filter(|d| d.fq_name != CPU && d.fq_name != START)
                .cloned()
                .collect();
            descs.extend(cpu.desc().into_iter().cloned());
            descs.extend(start_time.desc().into_iter().cloned());
            Collector {
                inner,
                descs,
                start_time,
            }
        }
    }

    impl prometheus::core::Collector for Collector {
        fn desc(&self) -> Vec<&Desc> {
            self.descs.iter().collect()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let mut families: Vec<MetricFamily> = self
                .inner
                .collect()
                .into_iter()
                .filter(|f| f.name() != CPU && f.name() != START)
                .collect();
            if let Some(seconds) = cpu_seconds() {
                // A fresh counter per scrape: the kernel keeps the running total, and
                // two scrapes at once cannot race on a shared one.
                let cpu = Counter::with_opts(cpu_opts()).expect("valid metric");
                cpu.inc_by(seconds);
                families.extend(cpu.collect());
            }
            families.extend(self.start_time.collect());
            families
        }
    }

    /// User + system CPU time of every thread of this process, live and ended.
    fn cpu_seconds() -> Option<f64> {
        // SAFETY: `rusage` is plain integers, for which all-zero bytes are a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes only into the struct it is given, which outlives the call.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return None;
        }
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
    }

    /// Boot time (`btime` in `/proc/stat`) plus this process's `starttime` (field 22 of
    /// `/proc/self/stat`, clock ticks after boot).
    fn start_time_seconds() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) is in parentheses and may hold spaces or ')'.
        let after_name = &stat[stat.rfind(')')? + 1..];
        let ticks: f64 = after_name.split_whitespace().nth(22 - 3)?.parse().ok()?;
        let boot: f64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        // SAFETY: sysconf reads a constant of the system and touches no memory of ours.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (per_second > 0).then(|| boot + ticks / per_second as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of an unlabelled sample in the text format.
    fn value(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Keeps one core busy for `cpu` of wall time.
    fn burn(cpu: std::time::Duration) {
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while started.elapsed() < cpu {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn process_cpu_seconds_count_fractions_of_a_second() {
        let metrics = Metrics::new();
        burn(std::time::Duration::from_millis(50));
        let text = metrics.encode();
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
        let cpu = value(&text, "process_cpu_seconds_total").expect("a cpu sample");
        assert!(
            cpu > 0.0 && cpu.fract() != 0.0,
            "process_cpu_seconds_total {cpu}"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_other_process_metrics_are_still_exported() {
        let text = Metrics::new().encode();
        for (name, kind) in [
            ("process_start_time_seconds", "gauge"),
            ("process_resident_memory_bytes", "gauge"),
            ("process_virtual_memory_bytes", "gauge"),
            ("process_open_fds", "gauge"),
            ("process_max_fds", "gauge"),
            ("process_threads", "gauge"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}")),
                "{name}: {text}"
            );
            assert!(
                value(&text, name).is_some_and(|v| v > 0.0),
                "{name}: {text}"
            );
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = value(&text, "process_start_time_seconds").unwrap();
        assert!(
            started <= now + 1.0 && started > now - 3600.0,
            "{started} vs {now}"
        );
    }
}
