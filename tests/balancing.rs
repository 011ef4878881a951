//! Each strategy, seen from the outside: clients connect through ballast to test backends
//! that greet with their name, and the test counts where the connections landed.

mod common;

use std::collections::HashMap;

use common::*;

fn listener_toml(strategy: &str, extra: &str, backends: &str) -> String {
    format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"{strategy}\"\n{extra}\n{backends}"
    )
}

async fn three_backends() -> Vec<Backend> {
    vec![
        Backend::greeter("a").await,
        Backend::greeter("b").await,
        Backend::greeter("c").await,
    ]
}

fn toml_for(backends: &[Backend], weights: &[u32]) -> String {
    let list: Vec<_> = backends
        .iter()
        .zip(weights)
        .map(|(b, &w)| (b.name.as_str(), b.addr, w))
        .collect();
    backends_toml(&list)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_lands_300_connections_100_100_100() {
    let backends = three_backends().await;
    let ballast = start(&listener_toml(
        "round_robin",
        "",
        &toml_for(&backends, &[5, 1, 1]),
    ))
    .await;
    let addr = ballast.listener_addr("web");
    let mut landed: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let (_stream, name) = connect_and_greet(addr).await;
        *landed.entry(name).or_default() += 1;
    }
    assert_eq!(
        landed,
        HashMap::from([("a".into(), 100), ("b".into(), 100), ("c".into(), 100)])
    );
    for b in &backends {
        assert_eq!(b.accepted(), 100, "backend {} counted", b.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_five_one_one_is_exact_and_interleaved_in_every_period() {
    let backends = three_backends().await;
    let ballast = start(&listener_toml(
        "weighted",
        "",
        &toml_for(&backends, &[5, 1, 1]),
    ))
    .await;
    let addr = ballast.listener_addr("web");
    let mut sequence = String::new();
    for _ in 0..21 {
        let (_stream, name) = connect_and_greet(addr).await;
        sequence.push_str(&name);
    }
    // Three periods of sum(weights) = 7 picks each.
    assert_eq!(sequence, "aabacaa".repeat(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_with_weights_two_one_one_holds_twenty_ten_ten_and_refills_an_emptied_backend() {
    let backends = three_backends().await;
    let ballast = start(&listener_toml(
        "least_conn",
        "",
        &toml_for(&backends, &[2, 1, 1]),
    ))
    .await;
    let addr = ballast.listener_addr("web");
    let mut held: Vec<(tokio::net::TcpStream, String)> = Vec::new();
    for _ in 0..40 {
        held.push(connect_and_greet(addr).await);
    }
    let count = |held: &[(tokio::net::TcpStream, String)], name: &str| {
        held.iter().filter(|(_, n)| n == name).count()
    };
    assert_eq!(
        (count(&held, "a"), count(&held, "b"), count(&held, "c")),
        (20, 10, 10)
    );

    // Every connection of c closes; ballast sees them go, and c is refilled first.
    held.retain(|(_, name)| name != "c");
    let route = ballast.ballast.routing();
    let c_state = route
        .listener("web")
        .unwrap()
        .backend("c")
        .unwrap()
        .state
        .clone();
    wait_until("c's connections to be counted closed", || {
        c_state.active() == 0
    })
    .await;
    for _ in 0..10 {
        held.push(connect_and_greet(addr).await);
    }
    assert_eq!(
        (count(&held, "a"), count(&held, "b"), count(&held, "c")),
        (20, 10, 10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_keeps_each_client_on_one_backend_and_spreads_1000_ips_evenly_over_5() {
    let names = ["a", "b", "c", "d", "e"];
    let mut backends = Vec::new();
    for name in names {
        backends.push(Backend::greeter(name).await);
    }
    let ballast = start(&listener_toml("ip_hash", "", &toml_for(&backends, &[1; 5]))).await;
    let addr = ballast.listener_addr("web");
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for i in 0..1000u32 {
        let ip = client_ip(i);
        let (_first, name) = connect_from_and_greet(Some(ip), addr).await;
        let (_second, again) = connect_from_and_greet(Some(ip), addr).await;
        assert_eq!(name, again, "client {ip} moved between backends");
        *per_backend.entry(name).or_default() += 1;
    }
    for name in names {
        let n = per_backend.get(name).copied().unwrap_or(0);
        assert!(
            (140..=260).contains(&n),
            "backend {name} got {n} of 1000 clients: {per_backend:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_backend_among_three_costs_clients_no_failed_connection() {
    let a = Backend::greeter("a").await;
    let c = Backend::greeter("c").await;
    let dead = dead_addr().await;
    let toml = listener_toml(
        "round_robin",
        "",
        &backends_toml(&[("a", a.addr, 1), ("b", dead, 1), ("c", c.addr, 1)]),
    );
    let ballast = start(&toml).await;
    let addr = ballast.listener_addr("web");
    let mut landed: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        // connect_and_greet fails the test on any refused or closed connection.
        let (_stream, name) = connect_and_greet(addr).await;
        *landed.entry(name).or_default() += 1;
    }
    assert_eq!(landed.values().sum::<usize>(), 300);
    assert!(!landed.contains_key("b"));
    let route = ballast.ballast.routing();
    let b = route.listener("web").unwrap().backend("b").unwrap();
    assert!(
        b.state.connect_failures() >= 100,
        "failures: {}",
        b.state.connect_failures()
    );
    assert_eq!(b.state.active(), 0, "failed connects give their slot back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_available_backend_closes_the_client_at_once_and_counts_it() {
    let a = Backend::greeter("a").await;
    let toml = format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n\n  [[listeners.backends]]\n  name = \"a\"\n  addr = \"{}\"\n  max_conns = 0\n",
        a.addr
    );
    let ballast = start(&toml).await;
    let mut stream = tokio::net::TcpStream::connect(ballast.listener_addr("web"))
        .await
        .unwrap();
    assert_closed(&mut stream).await;
    assert_eq!(a.accepted(), 0);
    let route = ballast.ballast.routing();
    let web = route.listener("web").unwrap();
    assert_eq!(
        web.state.rejected(ballast::state::RejectReason::NoBackend),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_max_conns_refuses_the_connection_over_the_cap() {
    let a = Backend::greeter("a").await;
    let toml = listener_toml(
        "round_robin",
        "max_conns = 2",
        &backends_toml(&[("a", a.addr, 1)]),
    );
    let ballast = start(&toml).await;
    let addr = ballast.listener_addr("web");
    let _one = connect_and_greet(addr).await;
    let _two = connect_and_greet(addr).await;
    let mut three = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert_closed(&mut three).await;
    assert_eq!(a.accepted(), 2);
    let route = ballast.ballast.routing();
    assert_eq!(
        route
            .listener("web")
            .unwrap()
            .state
            .rejected(ballast::state::RejectReason::MaxConns),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_max_conns_sends_the_overflow_to_the_others() {
    let a = Backend::greeter("a").await;
    let b = Backend::greeter("b").await;
    let toml = format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"weighted\"\n\n  [[listeners.backends]]\n  name = \"a\"\n  addr = \"{}\"\n  weight = 10\n  max_conns = 3\n{}",
        a.addr,
        backends_toml(&[("b", b.addr, 1)])
    );
    let ballast = start(&toml).await;
    let addr = ballast.listener_addr("web");
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(connect_and_greet(addr).await);
    }
    let on_a = held.iter().filter(|(_, n)| n == "a").count();
    assert_eq!(on_a, 3, "a is capped at 3 held connections");
    assert_eq!(held.len() - on_a, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_idle_timeout() {
    let a = Backend::greeter("a").await;
    let toml = listener_toml(
        "round_robin",
        "idle_timeout = \"300ms\"",
        &backends_toml(&[("a", a.addr, 1)]),
    );
    let ballast = start(&toml).await;
    let (mut stream, _) = connect_and_greet(ballast.listener_addr("web")).await;
    let started = std::time::Instant::now();
    assert_closed(&mut stream).await;
    assert!(started.elapsed() >= std::time::Duration::from_millis(250));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_failing_health_checks_is_marked_down_and_skipped() {
    let a = Backend::greeter("a").await;
    let b = Backend::greeter("b").await;
    let toml = listener_toml(
        "round_robin",
        "\n  [listeners.health]\n  kind = \"tcp\"\n  interval = \"50ms\"\n  timeout = \"50ms\"\n  rise = 1\n  fall = 2\n",
        &backends_toml(&[("a", a.addr, 1), ("b", b.addr, 1)]),
    );
    let ballast = start(&toml).await;
    let addr = ballast.listener_addr("web");
    b.stop();
    let route = ballast.ballast.routing();
    let web = route.listener("web").unwrap();
    wait_until("b to be marked down", || {
        !web.backend("b").unwrap().state.is_up()
    })
    .await;
    let status = ballast.ballast.status();
    assert_eq!(status["listeners"][0]["backends"][1]["state"], "down");
    for _ in 0..10 {
        let (_s, name) = connect_and_greet(addr).await;
        assert_eq!(name, "a");
    }
    assert_eq!(
        web.backend("b").unwrap().state.connect_failures(),
        0,
        "a down backend is not even tried"
    );
}

/// A burst of long-lived connections spreads over the worker threads: whichever worker
/// accepts them, none carries more than `workers::SLACK` beyond the least loaded one
/// (and one more for each other worker accepting at the same moment), so no core is
/// left idle while another carries the burst. Before, 60 landed 60/0/0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_long_lived_connections_spreads_over_the_worker_threads() {
    let a = Backend::greeter("a").await;
    let config = ballast::config::Config::parse(
        &listener_toml("least_conn", "", &backends_toml(&[("a", a.addr, 1)])),
        "test.toml",
    )
    .unwrap();
    let bound = ballast::bind(&config).unwrap();
    let ballast = ballast::Ballast::new(config, None);
    let workers = ballast::workers::Workers::start(3).unwrap();
    ballast.set_workers(&workers);
    let mut tasks = tokio::task::JoinSet::new();
    ballast::serve(&ballast, bound, &mut tasks).unwrap();
    let addr = ballast.bound_addr("web").unwrap();
    for burst in [60, 30] {
        let mut connecting = tokio::task::JoinSet::new();
        for _ in 0..burst {
            connecting.spawn(connect_and_greet(addr));
        }
        let mut held = Vec::new();
        while let Some(connected) = connecting.join_next().await {
            held.push(connected.unwrap().0);
        }
        wait_until("every connection live", || {
            ballast.worker_loads().iter().sum::<usize>() == burst
        })
        .await;
        let loads = ballast.worker_loads();
        let (most, least) = (*loads.iter().max().unwrap(), *loads.iter().min().unwrap());
        assert!(
            most - least <= ballast::workers::SLACK + 3,
            "{burst} connections over the workers: {loads:?}"
        );
        drop(held);
        wait_until("every connection ended", || {
            ballast.worker_loads().iter().sum::<usize>() == 0
        })
        .await;
    }
}
