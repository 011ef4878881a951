//! Several instances sharing live counts through a Redis of the test's own
//! (`[cluster]`): least_conn and the pick route on cluster-wide counts, rebalance
//! without herding, Redis going away and coming back, an instance killed.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::redis_server::{Redis, Sticky};
use common::*;
use serde_json::Value;

const REPORT: Duration = Duration::from_millis(200);
const PEER_TTL: Duration = Duration::from_secs(1);

/// The TOML of one instance: least_conn over `backends`, reporting to `redis`.
fn instance_toml(redis: &Redis, name: &str, backends: &[&Backend], extra: &str) -> String {
    let list: Vec<(&str, SocketAddr, u32)> = backends
        .iter()
        .map(|b| (b.name.as_str(), b.addr, 1))
        .collect();
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[cluster]\nredis = \"{}\"\ninstance = \"{name}\"\nreport_interval = \"{}ms\"\npeer_ttl = \"{}ms\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"least_conn\"\n{extra}\n{}",
        redis.url(),
        REPORT.as_millis(),
        PEER_TTL.as_millis(),
        backends_toml(&list)
    )
}

async fn greeters(names: &[&str]) -> Vec<Backend> {
    let mut out = Vec::new();
    for name in names {
        out.push(Backend::greeter(name).await);
    }
    out
}

/// The cluster-wide live count of each backend of listener "web", as `ballast` shows it.
fn cluster_counts(ballast: &ballast::Ballast) -> Vec<(String, u64)> {
    status_backends(ballast)
        .iter()
        .map(|b| {
            let name = b["name"].as_str().unwrap().to_string();
            (name, b["cluster_active"].as_u64().expect("cluster_active"))
        })
        .collect()
}

fn count_of(counts: &[(String, u64)], name: &str) -> u64 {
    counts.iter().find(|(n, _)| n == name).map_or(0, |c| c.1)
}

fn peers(ballast: &ballast::Ballast) -> Vec<String> {
    let status = ballast.status();
    status["cluster"]["peers"]
        .as_array()
        .map(|p| {
            p.iter()
                .map(|p| p["instance"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn post(admin: SocketAddr, path: &str) {
    let (status, body) = http(admin, "POST", path).await;
    assert_eq!(status, 200, "POST {path}: {body}");
}

async fn pick(admin: SocketAddr) -> String {
    let (status, body) = http(admin, "GET", "/api/v1/listeners/web/pick").await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    answer["backend"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_balance_least_conn_on_cluster_wide_counts_and_pick_names_the_cluster_s_least_loaded(
) {
    let redis = Redis::start().await;
    let backends = greeters(&["a", "b", "c"]).await;
    let all: Vec<&Backend> = backends.iter().collect();
    let one = start(&instance_toml(&redis, "edge-1", &all, "")).await;
    let two = start(&instance_toml(&redis, "edge-2", &all, "")).await;
    let (admin1, admin2) = (one.admin_addr().unwrap(), two.admin_addr().unwrap());
    wait_until("each instance sees the other", || {
        peers(&one.ballast) == ["edge-2"] && peers(&two.ballast) == ["edge-1"]
    })
    .await;

    // Instance 1 can reach only a while its 30 connect.
    for b in ["b", "c"] {
        post(admin1, &format!("/api/v1/listeners/web/backends/{b}/drain")).await;
    }
    let mut held = Vec::new();
    for _ in 0..30 {
        let (stream, greeting) = connect_and_greet(one.listener_addr("web")).await;
        assert_eq!(greeting, "a");
        held.push(stream);
    }
    for b in ["b", "c"] {
        post(
            admin1,
            &format!("/api/v1/listeners/web/backends/{b}/undrain"),
        )
        .await;
    }
    wait_until("instance 2 sees a's 30", || {
        count_of(&cluster_counts(&two.ballast), "a") == 30
    })
    .await;

    // Instance 2's own counts are all 0, but the cluster's are not: its 30 go to b and c.
    let mut on = std::collections::HashMap::new();
    let mut through_two = Vec::new();
    for _ in 0..30 {
        let (stream, greeting) = connect_and_greet(two.listener_addr("web")).await;
        *on.entry(greeting.clone()).or_insert(0) += 1;
        through_two.push((greeting, stream));
    }
    assert_eq!(on.get("a"), None, "{on:?}");
    assert_eq!((on["b"], on["c"]), (15, 15), "{on:?}");
    let seen = |ballast: &ballast::Ballast, a, b, c| {
        let counts = cluster_counts(ballast);
        (
            count_of(&counts, "a"),
            count_of(&counts, "b"),
            count_of(&counts, "c"),
        ) == (a, b, c)
    };
    wait_until("both see 30/15/15", || {
        seen(&one.ballast, 30, 15, 15) && seen(&two.ballast, 30, 15, 15)
    })
    .await;
    // Both name b or c, never a, the cluster's fullest.
    assert_ne!(pick(admin1).await, "a");
    assert_ne!(pick(admin2).await, "a");

    // c's connections end: c is the cluster's least loaded, for both instances.
    through_two.retain(|(backend, _)| backend != "c");
    wait_until("both see c at 0", || {
        seen(&one.ballast, 30, 15, 0) && seen(&two.ballast, 30, 15, 0)
    })
    .await;
    assert_eq!(pick(admin1).await, "c");
    assert_eq!(pick(admin2).await, "c");
    // A graceful stop takes the instance's report out of Redis at once.
    two.shutdown(Duration::from_secs(2)).await;
    assert_eq!(
        redis
            .command("EXISTS ballast:instance:edge-2")
            .await
            .as_deref(),
        Some(":0")
    );
    drop((held, through_two));
    one.shutdown(Duration::from_secs(2)).await;
}

/// The sum over `admins` of metric `name` for listener "web".
async fn total_of(admins: &[SocketAddr], name: &str) -> f64 {
    let mut sum = 0.0;
    for admin in admins {
        let text = scrape(*admin).await;
        sum += text
            .lines()
            .filter(|l| l.starts_with(name) && l.contains("listener=\"web\""))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum::<f64>();
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_rebalance_90_clients_piled_on_one_backend_with_near_minimal_migrations() {
    let redis = Redis::start().await;
    let backends = greeters(&["a", "b", "c"]).await;
    let all: Vec<&Backend> = backends.iter().collect();
    let rebalance =
        "\n  [listeners.rebalance]\n  interval = \"300ms\"\n  precision = 2\n  step_size = 30\n";
    let mut instances = Vec::new();
    for i in 1..=3 {
        let toml = instance_toml(&redis, &format!("edge-{i}"), &all, rebalance);
        instances.push(start(&toml).await);
    }
    let admins: Vec<SocketAddr> = instances.iter().map(|r| r.admin_addr().unwrap()).collect();
    wait_until("every instance sees two peers", || {
        instances.iter().all(|r| peers(&r.ballast).len() == 2)
    })
    .await;
    // Pile 30 clients per instance on a: b and c are drained everywhere meanwhile.
    for admin in &admins {
        for b in ["b", "c"] {
            post(*admin, &format!("/api/v1/listeners/web/backends/{b}/drain")).await;
        }
    }
    let clients: Vec<Sticky> = instances
        .iter()
        .map(|r| Sticky::start(r.listener_addr("web"), 30))
        .collect();
    wait_until("90 clients on a", || {
        clients.iter().map(|c| c.on("a")).sum::<usize>() == 90
    })
    .await;
    wait_until("every instance sees 90 on a", || {
        instances
            .iter()
            .all(|r| count_of(&cluster_counts(&r.ballast), "a") == 90)
    })
    .await;
    for admin in &admins {
        for b in ["b", "c"] {
            post(
                *admin,
                &format!("/api/v1/listeners/web/backends/{b}/undrain"),
            )
            .await;
        }
    }

    // The backends end within precision (2) of 30 each, cluster-wide.
    let even = |counts: &[(String, u64)]| {
        counts.len() == 3
            && counts.iter().map(|c| c.1).sum::<u64>() == 90
            && counts.iter().all(|(_, n)| n.abs_diff(30) <= 2)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let on: Vec<(String, u64)> = ["a", "b", "c"]
            .iter()
            .map(|b| {
                (
                    b.to_string(),
                    clients.iter().map(|c| c.on(b)).sum::<usize>() as u64,
                )
            })
            .collect();
        if even(&on) && instances.iter().all(|r| even(&cluster_counts(&r.ballast))) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never even: clients on {on:?}, instance 1 sees {:?}",
            cluster_counts(&instances[0].ballast)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let migrations = total_of(&admins, "ballast_rebalance_migrations_total").await;
    eprintln!("even after {migrations} migrations (minimum 58)");
    // At least 58 must move for a to come within precision (2) of its share of 30;
    // within 10% of that.
    assert!(
        (58.0..=63.0).contains(&migrations),
        "{migrations} migrations for a minimum of 58"
    );
    // None after: several rebalance intervals and report rounds later, nothing moved.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        total_of(&admins, "ballast_rebalance_migrations_total").await,
        migrations
    );
    let connects: usize = clients.iter().map(|c| c.connects()).sum();
    assert_eq!(
        connects as f64,
        90.0 + migrations,
        "every migrated client came back once"
    );
    for c in clients {
        assert!(c.stop().await.is_empty());
    }
    for r in instances {
        r.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_under_churn_fails_no_connection_and_cluster_counts_return_when_it_is_back() {
    let mut redis = Redis::start().await;
    let backends = greeters(&["a", "b"]).await;
    let all: Vec<&Backend> = backends.iter().collect();
    let one = start(&instance_toml(&redis, "edge-1", &all, "")).await;
    let two = start(&instance_toml(&redis, "edge-2", &all, "")).await;
    let admins = [one.admin_addr().unwrap(), two.admin_addr().unwrap()];
    // One long-lived connection through instance 2, seen by instance 1.
    let (_held, _) = connect_and_greet(two.listener_addr("web")).await;
    let sees_held =
        |r: &ballast::Running| cluster_counts(&r.ballast).iter().map(|c| c.1).sum::<u64>() >= 1;
    wait_until("instance 1 sees instance 2's connection", || {
        sees_held(&one)
    })
    .await;
    for admin in admins {
        wait_for_metric(admin, "ballast_cluster_up", &[], |v| v == 1.0).await;
    }
    let churn = [
        Churn::start(one.listener_addr("web")),
        Churn::start(two.listener_addr("web")),
    ];
    churn[0].wait_for_more(20).await;

    redis.kill();
    for admin in admins {
        wait_for_metric(admin, "ballast_cluster_up", &[], |v| v == 0.0).await;
        wait_for_metric(admin, "ballast_cluster_peers", &[], |v| v == 0.0).await;
    }
    for c in &churn {
        c.wait_for_more(50).await;
    }

    redis.restart().await;
    let back = tokio::time::Instant::now();
    wait_until("instance 1 sees instance 2's connection again", || {
        peers(&one.ballast) == ["edge-2"] && sees_held(&one)
    })
    .await;
    let took = back.elapsed();
    eprintln!("cluster counts back {took:?} after Redis");
    // Two report intervals, and a little for this machine to poll and schedule.
    assert!(
        took <= REPORT * 2 + Duration::from_millis(500),
        "cluster counts came back after {took:?}"
    );
    for admin in admins {
        wait_for_metric(admin, "ballast_cluster_up", &[], |v| v == 1.0).await;
    }
    for c in churn {
        let (done, failures) = c.stop().await;
        assert!(done > 100, "{done}");
        assert!(failures.is_empty(), "{failures:?}");
    }
    one.shutdown(Duration::from_secs(2)).await;
    two.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_with_sigkill_is_gone_from_the_others_view_within_peer_ttl() {
    let redis = Redis::start().await;
    let backends = greeters(&["a", "b"]).await;
    let all: Vec<&Backend> = backends.iter().collect();
    let one = start(&instance_toml(&redis, "edge-1", &all, "")).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge-2.toml");
    std::fs::write(&path, instance_toml(&redis, "edge-2", &all, "")).unwrap();
    let two = Proc::run(&path, &[], 1).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_and_greet(two.listeners["web"]).await.0);
    }
    wait_until("instance 1 sees instance 2's 4", || {
        cluster_counts(&one.ballast)
            .iter()
            .map(|c| c.1)
            .sum::<u64>()
            == 4
    })
    .await;
    two.signal("-KILL");
    let killed = tokio::time::Instant::now();
    wait_until("instance 2's counts vanish", || {
        peers(&one.ballast).is_empty() && cluster_counts(&one.ballast).iter().all(|c| c.1 == 0)
    })
    .await;
    let took = killed.elapsed();
    eprintln!("a killed instance's counts gone after {took:?}");
    // Within peer_ttl by design; a little more for this machine to poll and schedule.
    assert!(
        took <= PEER_TTL + Duration::from_millis(400),
        "gone after {took:?}"
    );
    drop(held);
    one.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_even_cluster_migrates_nothing_with_or_without_redis_and_a_drain_still_moves_what_must_go(
) {
    // Each instance holds 20 clients, all on a backend of its own: each is as uneven as
    // can be by its own counts, the cluster is even. Balancing on own counts would move
    // 40 clients; on the cluster's, none.
    let redis = Redis::start().await;
    let backends = greeters(&["a", "b", "c"]).await;
    let all: Vec<&Backend> = backends.iter().collect();
    let rebalance =
        "\n  [listeners.rebalance]\n  interval = \"200ms\"\n  precision = 2\n  step_size = 30\n";
    let mut instances = Vec::new();
    for i in 1..=3 {
        let toml = instance_toml(&redis, &format!("edge-{i}"), &all, rebalance);
        instances.push(start(&toml).await);
    }
    let admins: Vec<SocketAddr> = instances.iter().map(|r| r.admin_addr().unwrap()).collect();
    let names = ["a", "b", "c"];
    let mut clients = Vec::new();
    for (i, r) in instances.iter().enumerate() {
        for other in names.iter().filter(|n| **n != names[i]) {
            post(
                admins[i],
                &format!("/api/v1/listeners/web/backends/{other}/drain"),
            )
            .await;
        }
        let sticky = Sticky::start(r.listener_addr("web"), 20);
        wait_until("20 clients on the instance's own backend", || {
            sticky.on(names[i]) == 20
        })
        .await;
        clients.push(sticky);
    }
    wait_until("every instance sees 20/20/20", || {
        instances.iter().all(|r| {
            let counts = cluster_counts(&r.ballast);
            names.iter().all(|n| count_of(&counts, n) == 20)
        })
    })
    .await;
    for (i, admin) in admins.iter().enumerate() {
        for other in names.iter().filter(|n| **n != names[i]) {
            post(
                *admin,
                &format!("/api/v1/listeners/web/backends/{other}/undrain"),
            )
            .await;
        }
    }
    // Ten rebalance intervals, five report rounds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        total_of(&admins, "ballast_rebalance_migrations_total").await,
        0.0
    );
    // Redis goes: own counts alone would say each instance is uneven. Rebalance waits.
    let mut redis = redis;
    redis.kill();
    for admin in &admins {
        wait_for_metric(*admin, "ballast_cluster_peers", &[], |v| v == 0.0).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        total_of(&admins, "ballast_rebalance_migrations_total").await,
        0.0
    );
    // What must go still goes: a backend drained on instance 1 sheds its 20 there.
    post(admins[0], "/api/v1/listeners/web/backends/a/drain").await;
    wait_until("instance 1's clients off a", || {
        clients[0].on("a") == 0 && clients[0].live() == 20
    })
    .await;
    assert_eq!(
        total_of(&admins, "ballast_rebalance_migrations_total").await,
        20.0
    );
    let connects: usize = clients.iter().map(|c| c.connects()).sum();
    assert_eq!(connects, 80, "the 20 migrated came back once each");
    for c in clients {
        assert!(c.stop().await.is_empty());
    }
    for r in instances {
        r.shutdown(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_url_reports_over_tls_verified_against_the_system_s_roots() {
    // A CA and a certificate for 127.0.0.1 made for this test; the instance that trusts
    // the CA (as its system's roots, through SSL_CERT_FILE) reports, the other cannot.
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    std::fs::write(at("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    for args in [
        "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=ballast-test-ca -keyout ca.key -out ca.pem",
        "req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout key.pem -out leaf.csr",
        "x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -out cert.pem -extfile san.ext",
    ] {
        let made = std::process::Command::new("openssl")
            .args(args.split(' '))
            .current_dir(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs (Debian: apt-get install openssl)");
        assert!(made.success(), "openssl {args}");
    }
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let tls_port = dead_addr().await.port();
    let redis = Redis::start_tls(tls_port, &cert, &key).await;
    let backend = Backend::greeter("a").await;
    let toml = |instance: &str| {
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n[cluster]\nredis = \"rediss://127.0.0.1:{tls_port}/0\"\ninstance = \"{instance}\"\nreport_interval = \"200ms\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n{}",
            backends_toml(&[("a", backend.addr, 1)])
        )
    };
    let (trusting, doubting) = (
        dir.path().join("trusting.toml"),
        dir.path().join("doubting.toml"),
    );
    std::fs::write(&trusting, toml("trusting")).unwrap();
    std::fs::write(&doubting, toml("doubting")).unwrap();
    let ca_file = at("ca.pem");
    let trusts = Proc::run(&trusting, &[("SSL_CERT_FILE", ca_file.as_str())], 1).await;
    let empty = dir.path().join("none.pem");
    std::fs::write(&empty, "").unwrap();
    let doubts = Proc::run(&doubting, &[("SSL_CERT_FILE", empty.to_str().unwrap())], 1).await;
    wait_for_metric(trusts.admin, "ballast_cluster_up", &[], |v| v == 1.0).await;
    // Its report is in Redis (read over Redis's plain port).
    let report = redis
        .command("GET ballast:instance:trusting")
        .await
        .unwrap();
    assert!(report.contains("\"listeners\""), "{report}");
    wait_for_metric(doubts.admin, "ballast_cluster_up", &[], |v| v == 0.0).await;
    assert_eq!(
        redis
            .command("EXISTS ballast:instance:doubting")
            .await
            .as_deref(),
        Some(":0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instance_takes_its_report_out_of_redis_before_it_exits() {
    let redis = Redis::start().await;
    let backend = Backend::greeter("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge-9.toml");
    std::fs::write(&path, instance_toml(&redis, "edge-9", &[&backend], "")).unwrap();
    let proc = Proc::run(&path, &[], 1).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while redis
        .command("EXISTS ballast:instance:edge-9")
        .await
        .as_deref()
        != Some(":1")
    {
        assert!(tokio::time::Instant::now() < deadline, "never reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGTERM, and the process has exited: its report is gone, not left to peer_ttl.
    let (status, log) = proc.stop().await;
    assert!(status.success(), "{log}");
    assert_eq!(
        redis
            .command("EXISTS ballast:instance:edge-9")
            .await
            .as_deref(),
        Some(":0"),
        "{log}"
    );
    assert_eq!(
        redis
            .command("ZSCORE ballast:instances edge-9")
            .await
            .as_deref(),
        Some("$-1")
    );
}
