//! Backends from DNS (`discover`), against a DNS server of the test's own: addresses
//! that come and go, SRV records, an answer that fails.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::dns_server::{Answer, Dns};
use common::*;
use tokio::net::TcpStream;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn names(ballast: &ballast::Ballast) -> Vec<String> {
    let mut names: Vec<String> = status_backends(ballast)
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// Three greeters on one port of three loopback addresses: 127.0.0.2, .3 and .4.
async fn three_hosts() -> (u16, Vec<Backend>) {
    for _ in 0..20 {
        let first = Backend::greeter_at("a", "127.0.0.2:0".parse().unwrap()).await;
        let port = first.addr.port();
        let mut all = vec![first];
        for (name, host) in [("b", "127.0.0.3"), ("c", "127.0.0.4")] {
            let addr = SocketAddr::new(ip(host), port);
            if std::net::TcpListener::bind(addr).is_err() {
                break;
            }
            all.push(Backend::greeter_at(name, addr).await);
        }
        if all.len() == 3 {
            return (port, all);
        }
    }
    panic!("no port free on 127.0.0.2-4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_that_appear_get_connections_ones_that_go_drain_and_a_failed_answer_changes_nothing(
) {
    let (port, _hosts) = three_hosts().await;
    let dns = Dns::start().await;
    dns.set(
        "app.test",
        Answer::Addresses(vec![ip("127.0.0.2"), ip("127.0.0.3")]),
    );
    let ballast = start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"least_conn\"\ndrain_timeout = \"1500ms\"\nresolve_interval = \"200ms\"\nresolver = \"{}\"\n\n  [[listeners.backends]]\n  name = \"app\"\n  discover = \"dns:app.test:{port}\"\n",
        dns.addr
    ))
    .await;
    let admin = ballast.admin_addr().unwrap();
    let web = ballast.listener_addr("web");
    // Found before the first connection.
    assert_eq!(names(&ballast.ballast), ["app@127.0.0.2", "app@127.0.0.3"]);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_and_greet(web).await);
    }
    let on = |held: &[(TcpStream, String)], b: &str| held.iter().filter(|h| h.1 == b).count();
    assert_eq!((on(&held, "a"), on(&held, "b")), (2, 2));

    // A weight set at run time outlives DNS changes (it lasts until the next reload):
    // 0, so a takes nothing new from here on.
    let (status, body) = http_with_body(
        admin,
        "POST",
        "/api/v1/listeners/web/backends/app@127.0.0.2/weight",
        "",
        "{\"weight\":0}",
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // A third address: a new backend, and least_conn sends it the next two.
    dns.set(
        "app.test",
        Answer::Addresses(vec![ip("127.0.0.2"), ip("127.0.0.3"), ip("127.0.0.4")]),
    );
    wait_until("a third backend", || names(&ballast.ballast).len() == 3).await;
    for _ in 0..2 {
        held.push(connect_and_greet(web).await);
    }
    assert_eq!(on(&held, "c"), 2, "the new backend gets connections");
    let weight_of = |name: &str| {
        status_backends(&ballast.ballast)
            .iter()
            .find(|b| b["name"] == name)
            .map(|b| b["effective_weight"].as_f64().unwrap())
    };
    assert_eq!(weight_of("app@127.0.0.2"), Some(0.0));

    // Back to two: the dropped one drains, its connections live until drain_timeout.
    dns.set(
        "app.test",
        Answer::Addresses(vec![ip("127.0.0.2"), ip("127.0.0.3")]),
    );
    wait_until("the third backend gone from the routing", || {
        names(&ballast.ballast) == ["app@127.0.0.2", "app@127.0.0.3"]
    })
    .await;
    let dropped_at = tokio::time::Instant::now();
    let text = scrape(admin).await;
    let of_c = |name: &str| sample(&text, name, &[("backend", "app@127.0.0.4")]);
    assert_eq!(of_c("ballast_backend_draining"), Some(1.0), "{text}");
    assert_eq!(
        of_c("ballast_backend_connections_active"),
        Some(2.0),
        "it keeps its live count: {text}"
    );
    let mut on_c: Vec<TcpStream> = Vec::new();
    let mut others = Vec::new();
    for (stream, backend) in held {
        if backend == "c" {
            on_c.push(stream);
        } else {
            others.push(stream);
        }
    }
    for stream in &mut on_c {
        assert!(
            still_open(stream).await,
            "a dropped backend's connection lives on"
        );
    }
    for _ in 0..4 {
        let (_, backend) = connect_and_greet(web).await;
        assert_ne!(backend, "c", "a dropped backend gets nothing new");
    }
    for stream in &mut on_c {
        assert_closed(stream).await;
    }
    let lived = dropped_at.elapsed();
    assert!(
        lived >= Duration::from_millis(1200) && lived <= Duration::from_millis(3500),
        "closed after {lived:?}, drain_timeout is 1.5s"
    );

    // Answers that fail change nothing, and each is counted: SERVFAIL; no address; and
    // A answering (with one address less) while AAAA fails, which must not drain
    // 127.0.0.3.
    for answer in [
        Answer::ServFail,
        Answer::Addresses(Vec::new()),
        Answer::ServFailAaaa(vec![ip("127.0.0.2")]),
    ] {
        let failures = [("listener", "web"), ("result", "failure")];
        let text = scrape(admin).await;
        let before = sample(&text, "ballast_discovery_resolutions_total", &failures);
        let before = before.unwrap_or(0.0);
        dns.set("app.test", answer);
        let metric = "ballast_discovery_resolutions_total";
        wait_for_metric(admin, metric, &failures, |n| n >= before + 2.0).await;
        assert_eq!(names(&ballast.ballast), ["app@127.0.0.2", "app@127.0.0.3"]);
    }
    for stream in &mut others {
        assert!(still_open(stream).await);
    }
    let (_, backend) = connect_and_greet(web).await;
    assert!(backend == "a" || backend == "b", "{backend}");
    ballast.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_addresses_ports_and_weights_and_higher_priorities_are_backups() {
    let (one, two, backup) = (
        Backend::greeter("one").await,
        Backend::greeter("two").await,
        Backend::greeter("backup").await,
    );
    let dns = Dns::start().await;
    dns.set("one.test", Answer::Addresses(vec![ip("127.0.0.1")]));
    dns.set("backup.test", Answer::Addresses(vec![ip("127.0.0.1")]));
    dns.set(
        "_app._tcp.test",
        Answer::Srv(vec![
            (10, 3, one.addr.port(), "one.test".into()),
            (10, 1, two.addr.port(), "one.test".into()),
            (20, 1, backup.addr.port(), "backup.test".into()),
        ]),
    );
    let ballast = start(&format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"weighted\"\nresolve_interval = \"200ms\"\nresolver = \"{}\"\n\n  [[listeners.backends]]\n  discover = \"srv:_app._tcp.test\"\n",
        dns.addr
    ))
    .await;
    let status = ballast.ballast.status();
    let mut found: Vec<(String, u64)> = status["listeners"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["weight"].as_u64().unwrap(),
            )
        })
        .collect();
    found.sort();
    let mut expected = vec![
        (format!("_app._tcp.test@127.0.0.1:{}", one.addr.port()), 3),
        (format!("_app._tcp.test@127.0.0.1:{}", two.addr.port()), 1),
    ];
    expected.sort();
    assert_eq!(found, expected);
    let mut greetings = Vec::new();
    for _ in 0..8 {
        greetings.push(connect_and_greet(ballast.listener_addr("web")).await.1);
    }
    let count = |name: &str| greetings.iter().filter(|g| *g == name).count();
    assert_eq!((count("one"), count("two"), count("backup")), (6, 2, 0));
    ballast.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_name_asked_refuses_no_connection() {
    let (port, _hosts) = three_hosts().await;
    let dns = Dns::start().await;
    dns.set(
        "app.test",
        Answer::Addresses(vec![ip("127.0.0.2"), ip("127.0.0.3")]),
    );
    dns.set("next.test", Answer::Addresses(vec![ip("127.0.0.4")]));
    let toml = |bind: &str, name: &str| {
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"web\"\nbind = \"{bind}\"\nresolve_interval = \"10s\"\nresolver = \"{}\"\n\n  [[listeners.backends]]\n  name = \"app\"\n  discover = \"dns:{name}:{port}\"\n",
            dns.addr
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    std::fs::write(&path, toml("127.0.0.1:0", "app.test")).unwrap();
    let ballast = start_file(&path).await;
    let admin = ballast.admin_addr().unwrap();
    let web = ballast.listener_addr("web");
    let churn = Churn::start(web);
    churn.wait_for_more(50).await;
    // The same bind (so the same socket), another name to ask.
    std::fs::write(&path, toml("127.0.0.1:0", "next.test")).unwrap();
    let (status, body) = http(admin, "POST", "/api/v1/reload").await;
    assert_eq!(status, 200, "{body}");
    // Resolved before the new config applied: its backend is there at once.
    assert_eq!(names(&ballast.ballast), ["app@127.0.0.4"]);
    churn.wait_for_more(50).await;
    let (_, failures) = churn.stop().await;
    assert!(failures.is_empty(), "{failures:?}");
    let (_, backend) = connect_and_greet(web).await;
    assert_eq!(backend, "c");
    ballast.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_caught_by_a_change_of_every_backend_goes_to_the_new_ones() {
    // A connection loads the routing when it is accepted; behind a PROXY header it picks
    // only once the header is in. If DNS replaced every backend meanwhile, the pick is
    // made on the routing in place then: the new backend, not the old one, and not
    // refused.
    use tokio::io::AsyncWriteExt;
    let (port, _hosts) = three_hosts().await;
    let dns = Dns::start().await;
    dns.set("app.test", Answer::Addresses(vec![ip("127.0.0.2")]));
    let ballast = start(&format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\naccept_proxy = \"v1\"\ntrusted_proxies = [\"127.0.0.0/8\"]\nresolve_interval = \"200ms\"\nresolver = \"{}\"\n\n  [[listeners.backends]]\n  name = \"app\"\n  discover = \"dns:app.test:{port}\"\n",
        dns.addr
    ))
    .await;
    let mut client = TcpStream::connect(ballast.listener_addr("web"))
        .await
        .unwrap();
    dns.set("app.test", Answer::Addresses(vec![ip("127.0.0.3")]));
    wait_until("every backend replaced", || {
        names(&ballast.ballast) == ["app@127.0.0.3"]
    })
    .await;
    client
        .write_all(b"PROXY TCP4 127.0.0.9 127.0.0.1 4000 80\r\n")
        .await
        .unwrap();
    let mut greeting = [0u8; 2];
    tokio::time::timeout(
        DEADLINE,
        tokio::io::AsyncReadExt::read_exact(&mut client, &mut greeting),
    )
    .await
    .expect("an answer in time")
    .expect("greeted, not refused");
    assert_eq!(&greeting, b"b\n");
    ballast.shutdown(Duration::from_secs(2)).await;
}
