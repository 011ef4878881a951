//! Every Prometheus metric ballast exports, defined once.
//!
//! The hot path never looks a label up: each backend's and listener's handles are
//! resolved once, when its runtime state is created ([`Metrics::backend`],
//! [`Metrics::listener`]), and the runtime state uses those handles *as* its counters
//! (a prometheus counter is an atomic), so the admin API and `/metrics` read the same
//! numbers. Values that are properties of the config or of the moment (up, draining,
//! weight, imbalance, generation) are set from the routing snapshot at each scrape.

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
    rebalance_migrations: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub config_last_reload_success: Gauge,
}

/// One listener's handles.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    pub active: IntGauge,
    pub total: IntCounter,
    pub rejected_max_conns: IntCounter,
    pub rejected_no_backend: IntCounter,
    pub rejected_denied: IntCounter,
    pub imbalance: Gauge,
    pub connection_duration: Histogram,
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
    pub migrations: IntCounter,
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
                "1 when the backend passes health checks, 0 when it is down.",
                lb,
            ),
            backend_draining: int_gauge_vec(
                "ballast_backend_draining",
                "1 when the backend is draining (drained, max_conns = 0 or removed).",
                lb,
            ),
            backend_weight: int_gauge_vec("ballast_backend_weight", "Configured weight.", lb),
            rebalance_migrations: counter_vec(
                "ballast_rebalance_migrations_total",
                "Connections migrated away from the backend by rebalance.",
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
            registry: r.clone(),
        };
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
            let process = prometheus::process_collector::ProcessCollector::for_self();
            let _ = r.register(Box::new(process));
        }
        metrics
    }

    /// Resolves (and so creates, at zero) every series of a listener.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let l = &[listener];
        ListenerMetrics {
            active: self.listener_active.with_label_values(l),
            total: self.listener_total.with_label_values(l),
            rejected_max_conns: self
                .listener_rejected
                .with_label_values(&[listener, "max_conns"]),
            rejected_no_backend: self
                .listener_rejected
                .with_label_values(&[listener, "no_backend"]),
            // Allow/deny lists are not there yet; the series exists so that dashboards
            // and alerts written against the contract find it.
            rejected_denied: self
                .listener_rejected
                .with_label_values(&[listener, "denied"]),
            imbalance: self.listener_imbalance.with_label_values(l),
            connection_duration: self.connection_duration.with_label_values(l),
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
            migrations: self.rebalance_migrations.with_label_values(lb),
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
        let _ = self.rebalance_migrations.remove_label_values(lb);
    }

    /// Drops every series of a listener that left the config and has no connection left.
    pub fn remove_listener(&self, listener: &str) {
        let l = &[listener];
        let _ = self.listener_active.remove_label_values(l);
        let _ = self.listener_total.remove_label_values(l);
        for reason in ["max_conns", "no_backend", "denied"] {
            let _ = self
                .listener_rejected
                .remove_label_values(&[listener, reason]);
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
