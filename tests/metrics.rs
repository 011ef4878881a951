//! `/metrics` after real traffic shows what the backends and clients saw, and passes
//! `promtool check metrics`.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start_with_admin(
    listener_extra: &str,
    backends: &[(&str, std::net::SocketAddr, u32)],
) -> ballast::Running {
    start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\n{listener_extra}\n{}",
        backends_toml(backends)
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_totals_per_backend_equal_what_the_backends_counted() {
    let backends = [
        Backend::greeter("a").await,
        Backend::greeter("b").await,
        Backend::greeter("c").await,
    ];
    let list: Vec<_> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.addr, 1))
        .collect();
    let ballast = start_with_admin("", &list).await;
    let admin = ballast.admin_addr().unwrap();
    for _ in 0..31 {
        connect_and_greet(ballast.listener_addr("web")).await;
    }
    for b in &backends {
        let labels = [("listener", "web"), ("backend", b.name.as_str())];
        let counted = b.accepted() as f64;
        wait_for_metric(admin, "ballast_backend_connections_total", &labels, |v| {
            v == counted
        })
        .await;
    }
    wait_for_metric(
        admin,
        "ballast_listener_connections_total",
        &[("listener", "web")],
        |v| v == 31.0,
    )
    .await;
    wait_for_metric(
        admin,
        "ballast_listener_connections_active",
        &[("listener", "web")],
        |v| v == 0.0,
    )
    .await;
    let text = scrape(admin).await;
    let count = sample(
        &text,
        "ballast_connection_duration_seconds_count",
        &[("listener", "web")],
    );
    assert_eq!(count, Some(31.0));
    let connects = sample(
        &text,
        "ballast_backend_connect_duration_seconds_count",
        &[("backend", "a")],
    );
    assert_eq!(connects, Some(backends[0].accepted() as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_gauges_follow_held_connections() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin("", &[("a", a.addr, 1)]).await;
    let admin = ballast.admin_addr().unwrap();
    let labels = [("listener", "web"), ("backend", "a")];
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(connect_and_greet(ballast.listener_addr("web")).await);
    }
    wait_for_metric(admin, "ballast_backend_connections_active", &labels, |v| {
        v == 5.0
    })
    .await;
    wait_for_metric(
        admin,
        "ballast_listener_connections_active",
        &[("listener", "web")],
        |v| v == 5.0,
    )
    .await;
    held.truncate(2);
    wait_for_metric(admin, "ballast_backend_connections_active", &labels, |v| {
        v == 2.0
    })
    .await;
    held.clear();
    wait_for_metric(admin, "ballast_backend_connections_active", &labels, |v| {
        v == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_counters_pass_one_mib_while_the_connection_is_still_open() {
    let a = Backend::echo("a").await;
    let ballast = start_with_admin("", &[("a", a.addr, 1)]).await;
    let admin = ballast.admin_addr().unwrap();
    let mut stream = tokio::net::TcpStream::connect(ballast.listener_addr("web"))
        .await
        .unwrap();
    let mib = 1024 * 1024;
    let data = vec![7u8; mib];
    let (mut r, mut w) = stream.split();
    let mut echoed = vec![0u8; mib];
    let (wrote, read) = tokio::join!(w.write_all(&data), r.read_exact(&mut echoed));
    wrote.unwrap();
    read.unwrap();
    // Still open: the counters must already show the MiB both ways.
    let labels = [("listener", "web"), ("backend", "a")];
    wait_for_metric(admin, "ballast_backend_sent_bytes_total", &labels, |v| {
        v >= mib as f64
    })
    .await;
    wait_for_metric(
        admin,
        "ballast_backend_received_bytes_total",
        &labels,
        |v| v >= mib as f64,
    )
    .await;
    wait_for_metric(admin, "ballast_backend_connections_active", &labels, |v| {
        v == 1.0
    })
    .await;
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_count_a_dead_backend() {
    let a = Backend::greeter("a").await;
    let dead = dead_addr().await;
    let ballast = start_with_admin("", &[("a", a.addr, 1), ("dead", dead, 1)]).await;
    let admin = ballast.admin_addr().unwrap();
    for _ in 0..6 {
        connect_and_greet(ballast.listener_addr("web")).await;
    }
    let labels = [("listener", "web"), ("backend", "dead")];
    // Round-robin turns to the dead backend fail (at least every other connection's);
    // each is retried on "a", so every client got through.
    wait_for_metric(
        admin,
        "ballast_backend_connect_failures_total",
        &labels,
        |v| v >= 3.0,
    )
    .await;
    let text = scrape(admin).await;
    assert_eq!(
        sample(&text, "ballast_backend_connections_total", &labels),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "ballast_backend_connections_total",
            &[("backend", "a")]
        ),
        Some(6.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_connections_count_by_reason() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin("max_conns = 1", &[("a", a.addr, 1)]).await;
    let admin = ballast.admin_addr().unwrap();
    let addr = ballast.listener_addr("web");
    let held = connect_and_greet(addr).await;
    let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_closed(&mut over).await;
    let max = [("listener", "web"), ("reason", "max_conns")];
    wait_for_metric(
        admin,
        "ballast_listener_connections_rejected_total",
        &max,
        |v| v == 1.0,
    )
    .await;
    drop(held);
    wait_for_metric(
        admin,
        "ballast_listener_connections_active",
        &[("listener", "web")],
        |v| v == 0.0,
    )
    .await;

    http(admin, "POST", "/api/v1/listeners/web/backends/a/drain").await;
    let mut none = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_closed(&mut none).await;
    let no_backend = [("listener", "web"), ("reason", "no_backend")];
    wait_for_metric(
        admin,
        "ballast_listener_connections_rejected_total",
        &no_backend,
        |v| v == 1.0,
    )
    .await;
    let text = scrape(admin).await;
    assert_eq!(
        sample(&text, "ballast_backend_draining", &[("backend", "a")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "ballast_backend_up", &[("backend", "a")]),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_contract_is_exported_and_passes_promtool() {
    let a = Backend::greeter("a").await;
    let ballast = start_with_admin("", &[("a", a.addr, 2)]).await;
    let admin = ballast.admin_addr().unwrap();
    let _held = connect_and_greet(ballast.listener_addr("web")).await;
    let text = scrape(admin).await;
    for name in [
        "ballast_listener_connections_active",
        "ballast_listener_connections_total",
        "ballast_listener_connections_rejected_total",
        "ballast_backend_connections_active",
        "ballast_backend_connections_total",
        "ballast_backend_connect_failures_total",
        "ballast_backend_connect_duration_seconds_bucket",
        "ballast_backend_sent_bytes_total",
        "ballast_backend_received_bytes_total",
        "ballast_backend_up",
        "ballast_backend_draining",
        "ballast_backend_weight",
        "ballast_rebalance_migrations_total",
        "ballast_listener_imbalance",
        "ballast_connection_duration_seconds_bucket",
        "ballast_config_reloads_total",
        "ballast_config_generation",
        "ballast_config_last_reload_success_timestamp_seconds",
        "ballast_build_info",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
    ] {
        assert!(
            sample(&text, name, &[]).is_some(),
            "{name} missing from:\n{text}"
        );
    }
    assert_eq!(
        sample(&text, "ballast_backend_weight", &[("backend", "a")]),
        Some(2.0)
    );
    assert_eq!(sample(&text, "ballast_config_generation", &[]), Some(1.0));
    assert_eq!(
        sample(&text, "ballast_listener_imbalance", &[("listener", "web")]),
        Some(1.0)
    );

    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; tests/run installs it)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every metric name (a `ballast_` or `process_` identifier) in a PromQL text.
fn metric_names(promql: &str) -> Vec<String> {
    promql
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("ballast_") || t.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

fn collect_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => collect_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_queries(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_queries_is_one_ballast_exports() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/grafana/ballast.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(
        dashboard["templating"]["list"][0]["type"], "datasource",
        "the datasource is a variable"
    );
    let mut queries = Vec::new();
    collect_queries(&dashboard, &mut queries);
    let names: std::collections::BTreeSet<String> =
        queries.iter().flat_map(|q| metric_names(q)).collect();
    assert!(names.len() >= 15, "{names:?}");

    let a = Backend::greeter("a").await;
    let ballast = start_with_admin("", &[("a", a.addr, 1)]).await;
    let text = scrape(ballast.admin_addr().unwrap()).await;
    // The cluster's gauges exist only with [cluster] (tests/cluster.rs scrapes them).
    for name in names.iter().filter(|n| !n.starts_with("ballast_cluster_")) {
        assert!(
            sample(&text, name, &[]).is_some(),
            "the dashboard queries {name}, which ballast does not export"
        );
    }
    assert!(
        !text.contains("ballast_cluster_up"),
        "no cluster, no cluster gauge"
    );
    let panels = dashboard["panels"].as_array().unwrap();
    for title in [
        "Active connections per backend",
        "Backend connect latency",
        "Config reloads",
        "Rebalance migrations per minute",
        "Backend up",
        "Backend draining",
    ] {
        assert!(
            panels.iter().any(|p| p["title"] == title),
            "no panel {title:?}"
        );
    }
}

/// Each selector of a `ballast_` or `process_` metric in a PromQL text, as
/// `(name, matchers)`; `matchers` is empty when the metric has no `{...}`.
fn selectors(promql: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = promql;
    while let Some(at) = ["ballast_", "process_"]
        .iter()
        .filter_map(|p| rest.find(p))
        .min()
    {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let (name, after) = tail.split_at(end);
        let matchers = match after.strip_prefix('{') {
            Some(inner) => inner.split('}').next().unwrap_or_default(),
            None => "",
        };
        found.push((name.to_string(), matchers.to_string()));
        rest = &tail[end..];
    }
    found
}

#[test]
fn every_dashboard_query_is_per_job_and_instance_and_parses_as_promql() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/grafana/ballast.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let variable = |name: &str| {
        dashboard["templating"]["list"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
            .clone()
    };
    let instance = variable("instance");
    assert_eq!(
        instance["query"],
        "label_values(ballast_build_info{job=~\"$job\"}, instance)"
    );
    assert_eq!(
        (&instance["multi"], &instance["includeAll"]),
        (&true.into(), &true.into())
    );
    let listener = variable("listener");
    assert!(listener["query"]
        .as_str()
        .unwrap()
        .contains("{job=~\"$job\", instance=~\"$instance\"}"));

    let mut rules = Vec::new();
    let panels = dashboard["panels"].as_array().unwrap();
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let selectors = selectors(expr);
            assert!(!selectors.is_empty(), "{expr}");
            for (name, matchers) in selectors {
                assert!(
                    matchers.contains("job=~\"$job\"")
                        && matchers.contains("instance=~\"$instance\""),
                    "{}: {name} is not filtered by $job and $instance in {expr}",
                    panel["title"]
                );
            }
            // Two instances are never summed into one line.
            for by in expr.split("sum by (").skip(1) {
                let labels = by.split(')').next().unwrap();
                assert!(
                    labels.contains("instance"),
                    "{}: sums across instances: {expr}",
                    panel["title"]
                );
            }
            rules.push(
                expr.replace("$__rate_interval", "1m")
                    .replace("$__range", "1h")
                    .replace("$job", ".*")
                    .replace("$instance", ".*")
                    .replace("$listener", ".*"),
            );
        }
    }

    // Value mappings make the timelines read up/down and draining/serving.
    let mapping = |title: &str| {
        let panel = panels.iter().find(|p| p["title"] == title).unwrap();
        panel["fieldConfig"]["defaults"]["mappings"][0]["options"].clone()
    };
    assert_eq!(mapping("Backend up")["1"]["text"], "up");
    assert_eq!(mapping("Backend up")["0"]["text"], "down");
    assert_eq!(mapping("Backend draining")["1"]["text"], "draining");
    assert_eq!(mapping("Backend draining")["0"]["text"], "serving");

    // Bytes, counts and seconds in one panel each get their own unit (and axis).
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        let unit_of = |ref_id: &str| {
            panel["fieldConfig"]["overrides"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|o| o["matcher"]["options"] == ref_id)
                .flat_map(|o| o["properties"].as_array().unwrap().clone())
                .find(|p| p["id"] == "unit")
                .map(|p| p["value"].clone())
                .unwrap_or_else(|| panel["fieldConfig"]["defaults"]["unit"].clone())
        };
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            let unit = unit_of(target["refId"].as_str().unwrap());
            let expected: &[&str] = if expr.contains("_bytes") {
                &["bytes", "Bps"]
            } else if expr.contains("_seconds") && !expr.contains("process_cpu") {
                &["s"]
            } else {
                &["short", "cps", "none", "percentunit"]
            };
            assert!(
                expected.iter().any(|u| unit == *u),
                "{}: {expr} has unit {unit}",
                panel["title"]
            );
        }
    }

    // Every query is valid PromQL: promtool checks it as a recording rule.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.rules.json");
    let rules: Vec<serde_json::Value> = rules
        .iter()
        .enumerate()
        .map(|(i, expr)| serde_json::json!({"record": format!("dashboard:query{i}"), "expr": expr}))
        .collect();
    std::fs::write(
        &file,
        serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
