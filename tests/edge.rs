//! At the edge: the client's real address through PROXY protocol both ways, and the
//! per-client rules (allow, deny, max_conns_per_ip), seen from outside.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ballast::config::SendProxy;
use ballast::proxy_protocol::header;
use ballast::state::RejectReason;
use ballast::state::{Phase, RuntimeWeight::AgentPercent};
use common::*;
use ppp::{v1, v2, HeaderResult};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// A backend behind ballast's `send_proxy`: reads the PROXY header (either version),
/// answers `<name> <client> <destination> v1|v2` on a line, then echoes.
async fn proxy_reader(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 512];
                let (line, rest) = loop {
                    let Ok(n) = stream.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let (line, used) = match HeaderResult::parse(&buf) {
                        HeaderResult::V1(Ok(h)) => match h.addresses {
                            v1::Addresses::Tcp4(a) => (
                                format!(
                                    "{name} {}:{} {}:{} v1",
                                    a.source_address,
                                    a.source_port,
                                    a.destination_address,
                                    a.destination_port
                                ),
                                h.header.len(),
                            ),
                            v1::Addresses::Tcp6(a) => (
                                format!(
                                    "{name} [{}]:{} [{}]:{} v1",
                                    a.source_address,
                                    a.source_port,
                                    a.destination_address,
                                    a.destination_port
                                ),
                                h.header.len(),
                            ),
                            v1::Addresses::Unknown => {
                                (format!("{name} unknown - v1"), h.header.len())
                            }
                        },
                        HeaderResult::V2(Ok(h)) => match h.addresses {
                            v2::Addresses::IPv4(a) => (
                                format!(
                                    "{name} {}:{} {}:{} v2",
                                    a.source_address,
                                    a.source_port,
                                    a.destination_address,
                                    a.destination_port
                                ),
                                h.len(),
                            ),
                            v2::Addresses::IPv6(a) => (
                                format!(
                                    "{name} [{}]:{} [{}]:{} v2",
                                    a.source_address,
                                    a.source_port,
                                    a.destination_address,
                                    a.destination_port
                                ),
                                h.len(),
                            ),
                            _ => (format!("{name} local - v2"), h.len()),
                        },
                        result if ppp::PartialResult::is_incomplete(&result) => continue,
                        _ => (format!("{name} no-header - -"), 0),
                    };
                    break (line, buf.split_off(used));
                };
                if stream
                    .write_all(format!("{line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                if stream.write_all(&rest).await.is_err() {
                    return;
                }
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, task)
}

/// Connects (from `from` when given), sends `first`, and reads one line: `None` when
/// ballast closes the connection instead.
async fn line_after(
    from: Option<IpAddr>,
    addr: SocketAddr,
    first: &[u8],
) -> (BufReader<TcpStream>, Option<String>) {
    let stream = match from {
        Some(ip) => {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
            socket.connect(addr).await.unwrap()
        }
        None => TcpStream::connect(addr).await.unwrap(),
    };
    let mut reader = BufReader::new(stream);
    if !first.is_empty() {
        // A refused connection may be gone before all of it is written.
        let _ = reader.get_mut().write_all(first).await;
    }
    let mut line = String::new();
    let read = tokio::time::timeout(DEADLINE, reader.read_line(&mut line))
        .await
        .expect("a line or a close in time");
    let line = match read {
        Ok(_) if line.ends_with('\n') => Some(line.trim_end().to_string()),
        _ => None,
    };
    (reader, line)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_sees_the_real_client_that_an_upstream_header_names() {
    let (reader, _task) = proxy_reader("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ballast.toml");
    let config = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n[runtime]\nshutdown_timeout = \"1s\"\n\
         [[listeners]]\nname = \"any\"\nbind = \"127.0.0.1:0\"\naccess_log = true\n\
         accept_proxy = \"any\"\ntrusted_proxies = [\"127.0.0.0/8\"]\nsend_proxy = \"v2\"\n\
           [[listeners.backends]]\n  name = \"a\"\n  addr = \"{reader}\"\n\
         [[listeners]]\nname = \"v1only\"\nbind = \"127.0.0.1:0\"\naccess_log = true\n\
         accept_proxy = \"v1\"\ntrusted_proxies = [\"127.0.0.1\"]\nsend_proxy = \"v2\"\n\
           [[listeners.backends]]\n  name = \"a\"\n  addr = \"{reader}\"\n  send_proxy = \"v1\"\n\
         [[listeners]]\nname = \"strict\"\nbind = \"127.0.0.1:0\"\naccess_log = true\n\
         accept_proxy = \"any\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n\
           [[listeners.backends]]\n  name = \"a\"\n  addr = \"{reader}\"\n\
         [[listeners]]\nname = \"direct\"\nbind = \"127.0.0.1:0\"\naccess_log = true\nsend_proxy = \"v1\"\n\
           [[listeners.backends]]\n  name = \"a\"\n  addr = \"{reader}\"\n\
         [[listeners]]\nname = \"few\"\nbind = \"127.0.0.1:0\"\naccess_log = true\n\
         max_conns_per_ip = 1\ndeny = [\"127.0.0.3\"]\nsend_proxy = \"v1\"\n\
           [[listeners.backends]]\n  name = \"a\"\n  addr = \"{reader}\"\n"
    );
    std::fs::write(&path, config).unwrap();
    let ballast = Proc::run(&path, &[], 5).await;
    let at = |name: &str| ballast.listeners[name];

    // Each version and family in, v2 out (v1 out where the backend asks for it); the
    // destination an upstream named goes on too; bytes after the header reach the backend.
    let cases = [
        (
            "any",
            SendProxy::V1,
            addr("192.0.2.7:4000"),
            addr("198.51.100.1:443"),
            "v2",
        ),
        (
            "any",
            SendProxy::V2,
            addr("192.0.2.8:4001"),
            addr("198.51.100.1:443"),
            "v2",
        ),
        (
            "any",
            SendProxy::V2,
            addr("[2001:db8::7]:4002"),
            addr("[2001:db8::1]:443"),
            "v2",
        ),
        (
            "any",
            SendProxy::V1,
            addr("[2001:db8::8]:4003"),
            addr("[2001:db8::1]:443"),
            "v2",
        ),
        (
            "v1only",
            SendProxy::V1,
            addr("192.0.2.9:4004"),
            addr("198.51.100.1:80"),
            "v1",
        ),
        (
            "v1only",
            SendProxy::V1,
            addr("[2001:db8::9]:4005"),
            addr("[2001:db8::1]:80"),
            "v1",
        ),
    ];
    for (listener, version, client, destination, out) in cases {
        let mut first = header(version, Some((client, destination)));
        first.extend_from_slice(b"ping");
        let (mut stream, line) = line_after(None, at(listener), &first).await;
        assert_eq!(
            line.as_deref(),
            Some(format!("a {client} {destination} {out}").as_str()),
            "{listener}: {version:?} from {client}"
        );
        let mut echoed = [0u8; 4];
        tokio::time::timeout(DEADLINE, stream.read_exact(&mut echoed))
            .await
            .expect("the echo in time")
            .unwrap();
        assert_eq!(&echoed, b"ping");
    }
    // An upstream's own health check (v2 LOCAL) names nobody, and so does the header
    // passed on.
    let (_s, line) = line_after(None, at("any"), &header(SendProxy::V2, None)).await;
    assert_eq!(line.as_deref(), Some("a local - v2"));
    // A header cut short by the upstream closing is refused and counted as well.
    let mut cut = TcpStream::connect(at("any")).await.unwrap();
    cut.write_all(b"PROXY TCP4 192.0.2.1").await.unwrap();
    cut.shutdown().await.unwrap();
    assert_closed(&mut cut).await;
    // Without accept_proxy, the header names the socket's own client and listener.
    let (s, line) = line_after(None, at("direct"), b"").await;
    assert_eq!(
        line.unwrap(),
        format!(
            "a {} {} v1",
            s.get_ref().local_addr().unwrap(),
            at("direct")
        )
    );

    // Refused, each counted: a header from an address not trusted, a malformed header,
    // no header at all (plain bytes), and v2 where only v1 is read.
    let v2 = header(
        SendProxy::V2,
        Some((addr("192.0.2.10:1"), addr("198.51.100.1:443"))),
    );
    let refused = [
        ("strict", &v2[..]),
        ("any", &b"PROXY TCP4 192.0.2.300 198.51.100.1 1 2\r\n"[..]),
        ("any", &b"PROXY TCP4 192.0.2.3 198.51.100.1 1\r\n"[..]),
        ("any", &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..]),
        ("v1only", &v2[..]),
    ];
    for (listener, bytes) in refused {
        let (_s, line) = line_after(None, at(listener), bytes).await;
        assert_eq!(line, None, "{listener}: {bytes:?}");
    }
    for (listener, count) in [("strict", 1.0), ("any", 4.0), ("v1only", 1.0)] {
        wait_for_metric(
            ballast.admin,
            "ballast_listener_connections_rejected_total",
            &[("listener", listener), ("reason", "proxy_protocol")],
            |v| v == count,
        )
        .await;
    }

    // The per-client rules' refusals, for their access log lines.
    let (_held, line) = line_after(None, at("few"), b"").await;
    assert!(line.is_some());
    assert_eq!(line_after(None, at("few"), b"").await.1, None);
    let denied = Some("127.0.0.3".parse().unwrap());
    assert_eq!(line_after(denied, at("few"), b"").await.1, None);
    wait_for_metric(
        ballast.admin,
        "ballast_listener_connections_rejected_total",
        &[("listener", "few"), ("reason", "denied")],
        |v| v == 1.0,
    )
    .await;

    let (_, log) = ballast.stop().await;
    let lines = |listener: &str| access_lines(&log, listener);
    // The access log names the real client.
    let any = lines("any");
    for client in ["192.0.2.7:4000", "[2001:db8::7]:4002"] {
        assert!(any.iter().any(|f| f[2] == client), "{client} in {any:?}");
    }
    let strict = lines("strict");
    assert_eq!(strict.len(), 1, "{strict:?}");
    assert_eq!(strict[0][9], "proxy_protocol");
    assert!(strict[0][2].starts_with("127.0.0.1:"), "{strict:?}");
    assert_eq!(
        any.iter().filter(|f| f[9] == "proxy_protocol").count(),
        4,
        "{any:?}"
    );
    let few: Vec<_> = lines("few").into_iter().map(|f| f[9]).collect();
    for reason in ["per_ip_limit", "denied"] {
        assert_eq!(few.iter().filter(|r| **r == reason).count(), 1, "{few:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_through_two_chained_ballasts_keeps_each_client_on_one_backend() {
    let backends = [
        Backend::greeter("a").await,
        Backend::greeter("b").await,
        Backend::greeter("c").await,
    ];
    let second = start(&format!(
        "[[listeners]]\nname = \"back\"\nbind = \"127.0.0.1:0\"\nstrategy = \"ip_hash\"\n\
         accept_proxy = \"v2\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n{}",
        backends_toml(&[
            ("a", backends[0].addr, 1),
            ("b", backends[1].addr, 1),
            ("c", backends[2].addr, 1)
        ])
    ))
    .await;
    let first = start(&format!(
        "[[listeners]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\nsend_proxy = \"v2\"\n\
           [[listeners.backends]]\n  name = \"second\"\n  addr = \"{}\"\n",
        second.listener_addr("back")
    ))
    .await;
    let front = first.listener_addr("front");
    let mut landed = std::collections::HashMap::new();
    for i in 0..200u32 {
        let ip = client_ip(i);
        for _ in 0..2 {
            let (_stream, backend) = connect_from_and_greet(Some(ip), front).await;
            let was = landed.entry(ip).or_insert_with(|| backend.clone());
            assert_eq!(*was, backend, "{ip} moved between backends");
        }
    }
    // Every connection reached the second ballast from the first one's one address; only
    // the real client address spreads them.
    let used: std::collections::HashSet<_> = landed.values().collect();
    assert_eq!(
        used.len(),
        3,
        "200 client addresses over 3 backends: {used:?}"
    );
    for backend in &backends {
        let share = landed.values().filter(|b| **b == backend.name).count();
        assert!(
            (30..=110).contains(&share),
            "{}: {share} of 200",
            backend.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_max_conns_per_ip_and_the_rest_is_refused_while_others_are_served() {
    let a = Backend::greeter("a").await;
    let ballast = start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nmax_conns_per_ip = 100\n\
         deny = [\"127.0.0.3\", \"127.9.0.0/16\"]\n{}\
         [[listeners]]\nname = \"inner\"\nbind = \"127.0.0.1:0\"\n\
         allow = [\"127.0.0.4/32\", \"127.8.0.0/16\"]\ndeny = [\"127.8.8.8\"]\n{}",
        backends_toml(&[("a", a.addr, 1)]),
        backends_toml(&[("a", a.addr, 1)]),
    ))
    .await;
    let web = ballast.listener_addr("web");
    let inner = ballast.listener_addr("inner");
    let one = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

    let mut served = Vec::new();
    let mut refused = 0;
    for _ in 0..1000 {
        match line_after(Some(one), web, b"").await {
            (stream, Some(greeting)) => {
                assert_eq!(greeting, "a");
                served.push(stream);
            }
            (_, None) => refused += 1,
        }
    }
    assert_eq!((served.len(), refused), (100, 900));
    // Another client is served meanwhile.
    let (_other, greeting) =
        connect_from_and_greet(Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5))), web).await;
    assert_eq!(greeting, "a");
    // deny, and allow with a deny inside it.
    for (ip, at, ok) in [
        ("127.0.0.3", web, false),
        ("127.9.1.1", web, false),
        ("127.0.0.4", inner, true),
        ("127.8.1.1", inner, true),
        ("127.8.8.8", inner, false),
        ("127.0.0.6", inner, false),
    ] {
        let (_s, line) = line_after(Some(ip.parse().unwrap()), at, b"").await;
        assert_eq!(line.is_some(), ok, "{ip}");
    }

    let admin = ballast.admin_addr().unwrap();
    let rejected = |listener: &'static str, reason: &'static str, count: f64| async move {
        wait_for_metric(
            admin,
            "ballast_listener_connections_rejected_total",
            &[("listener", listener), ("reason", reason)],
            |v| v == count,
        )
        .await
    };
    rejected("web", "per_ip_limit", 900.0).await;
    rejected("web", "denied", 2.0).await;
    rejected("inner", "denied", 2.0).await;

    // The table holds the addresses with live connections, and forgets each with its
    // last one: a served connection that ends makes room for one more.
    let routing = ballast.ballast.routing();
    let state = &routing.listener("web").unwrap().state;
    assert_eq!(state.client_conns(one), 100);
    served.pop();
    wait_until("a slot freed", || state.client_conns(one) == 99).await;
    let (stream, line) = line_after(Some(one), web, b"").await;
    assert_eq!(line.as_deref(), Some("a"));
    served.push(stream);
    assert_eq!(state.rejected(RejectReason::PerIpLimit), 900);
    drop(served);
    drop(_other);
    wait_until("the table emptied", || state.clients_counted() == 0).await;
}

/// A greeter like [`Backend::greeter`] on a given address (one that refused before).
async fn greeter_at(addr: SocketAddr, name: &'static str) -> tokio::task::JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if stream
                    .write_all(format!("{name}\n").as_bytes())
                    .await
                    .is_ok()
                {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
        }
    })
}

/// Each backend's `state` in `/api/v1/status`, by listener and backend name.
async fn states(admin: SocketAddr, listener: &str) -> Vec<(String, String)> {
    let (_, body) = http(admin, "GET", "/api/v1/status").await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let listeners = status["listeners"].as_array().unwrap();
    let l = listeners.iter().find(|l| l["name"] == listener).unwrap();
    l["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_refuses_connects_is_ejected_without_failing_a_client_and_comes_back() {
    let a = Backend::greeter("a").await;
    let b = Backend::greeter("b").await;
    let c = dead_addr().await;
    let (d, e) = (dead_addr().await, dead_addr().await);
    let outlier = |base: &str| {
        format!("  [listeners.outlier]\n  consecutive_failures = 3\n  base_ejection = \"{base}\"\n  max_ejection = \"8s\"\n  max_ejected_percent = 50\n")
    };
    let ballast = start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\nretries = 2\n{}{}\
         [[listeners]]\nname = \"capped\"\nbind = \"127.0.0.1:0\"\nstrategy = \"round_robin\"\nretries = 2\n{}{}",
        outlier("3s"),
        backends_toml(&[("a", a.addr, 1), ("b", b.addr, 1), ("c", c, 1)]),
        outlier("8s"),
        backends_toml(&[("a", a.addr, 1), ("d", d, 1), ("e", e, 1)]),
    ))
    .await;
    let admin = ballast.admin_addr().unwrap();
    let ejections = |listener: &'static str, backend: &'static str| async move {
        sample(
            &scrape(admin).await,
            "ballast_backend_ejections_total",
            &[("listener", listener), ("backend", backend)],
        )
        .unwrap_or(0.0)
    };

    let churn = Churn::start(ballast.listener_addr("web"));
    let capped = Churn::start(ballast.listener_addr("capped"));
    wait_for_metric(
        admin,
        "ballast_backend_ejections_total",
        &[("listener", "web"), ("backend", "c")],
        |v| v >= 1.0,
    )
    .await;
    // consecutive_failures connects failed before it (and at most one more per client
    // already on its way there): no active check.
    let routing = ballast.ballast.routing();
    let web = routing.listener("web").unwrap();
    let failed = web.backends[2].state.connect_failures();
    let c_ejections = web.backends[2].state.ejections();
    assert!(c_ejections > 1 || (3..=3 + 4).contains(&failed), "{failed}");
    assert!(states(admin, "web")
        .await
        .contains(&("c".into(), "ejected".into())));
    // While ejected it gets no connect at all (checked only over a window it stayed
    // ejected through, however slow this machine).
    churn.wait_for_more(200).await;
    if web.backends[2].state.is_ejected() {
        assert_eq!(web.backends[2].state.connect_failures(), failed);
    }

    // It accepts again: back in service once base_ejection has passed.
    let _c = greeter_at(c, "c").await;
    wait_until("c is back and serves", || web.backends[2].state.total() > 0).await;
    assert!(states(admin, "web")
        .await
        .contains(&("c".into(), "up".into())));
    churn.wait_for_more(100).await;

    // Two of three failing with max_ejected_percent = 50: one ejected, never both.
    wait_until("one of d and e ejected", || {
        let capped = routing.listener("capped").unwrap();
        capped.backends[1].state.is_ejected() || capped.backends[2].state.is_ejected()
    })
    .await;
    let target = capped.done() + 200;
    while capped.done() < target {
        let capped_states = states(admin, "capped").await;
        let out = capped_states.iter().filter(|(_, s)| s == "ejected").count();
        assert!(out <= 1, "{capped_states:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (d_out, e_out) = (
        ejections("capped", "d").await,
        ejections("capped", "e").await,
    );
    assert!(d_out + e_out >= 1.0, "d {d_out}, e {e_out}");

    let (done, failures) = churn.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {done} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let (done, failures) = capped.stop().await;
    assert!(
        failures.is_empty(),
        "{} of {done} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(
        ejections("web", "a").await + ejections("web", "b").await,
        0.0
    );
}

/// An agent that answers every connection with the line it holds now, then closes.
async fn agent() -> (SocketAddr, std::sync::Arc<std::sync::Mutex<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reply = std::sync::Arc::new(std::sync::Mutex::new(String::from("up\n")));
    let said = std::sync::Arc::clone(&reply);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let line = said.lock().unwrap().clone();
            let _ = stream.write_all(line.as_bytes()).await;
        }
    });
    (addr, reply)
}

/// Opens `n` connections to `addr` and counts where they landed; `hold` keeps them open
/// (least_conn then sees them all), otherwise each closes before the next opens.
async fn land(
    addr: SocketAddr,
    n: usize,
    hold: bool,
) -> (std::collections::BTreeMap<String, usize>, Vec<TcpStream>) {
    let mut landed = std::collections::BTreeMap::new();
    let mut held = Vec::new();
    for _ in 0..n {
        let (stream, backend) = connect_and_greet(addr).await;
        *landed.entry(backend).or_insert(0) += 1;
        if hold {
            held.push(stream);
        } else {
            drop(stream);
        }
    }
    (landed, held)
}

fn shares(pairs: &[(&str, usize)]) -> std::collections::BTreeMap<String, usize> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_s_agent_sets_its_share_its_cap_and_its_service_and_the_api_sets_a_weight() {
    let a = Backend::greeter("a").await;
    let b = Backend::greeter("b").await;
    let (agent_addr, reply) = agent().await;
    let listener = |name: &str, strategy: &str| {
        format!(
            "[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nstrategy = \"{strategy}\"\n\
               [listeners.agent]\n  interval = \"50ms\"\n\
               [[listeners.backends]]\n  name = \"a\"\n  addr = \"{}\"\n  weight = 2\n\
               [[listeners.backends]]\n  name = \"b\"\n  addr = \"{}\"\n  weight = 2\n  agent_addr = \"{agent_addr}\"\n",
            a.addr, b.addr
        )
    };
    let ballast = start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n{}{}",
        listener("w", "weighted"),
        listener("lc", "least_conn")
    ))
    .await;
    let admin = ballast.admin_addr().unwrap();
    let routing = ballast.ballast.routing();
    let b_of = |l: &str| Arc::clone(&routing.listener(l).unwrap().backends[1].state);
    let (w, lc) = (ballast.listener_addr("w"), ballast.listener_addr("lc"));

    // 50%: b's weight is 1 of a's 2, for new connections short and long.
    *reply.lock().unwrap() = "up 50%\n".into();
    wait_until("50% applied", || {
        b_of("w").runtime_weight() == Some(AgentPercent(50))
            && b_of("lc").runtime_weight() == Some(AgentPercent(50))
    })
    .await;
    wait_for_metric(
        admin,
        "ballast_backend_effective_weight",
        &[("listener", "w"), ("backend", "b")],
        |v| v == 1.0,
    )
    .await;
    wait_for_metric(
        admin,
        "ballast_backend_weight",
        &[("listener", "w"), ("backend", "b")],
        |v| v == 2.0,
    )
    .await;
    assert_eq!(land(w, 30, false).await.0, shares(&[("a", 20), ("b", 10)]));
    let (landed, held) = land(lc, 30, true).await;
    assert_eq!(landed, shares(&[("a", 20), ("b", 10)]));
    drop(held);
    wait_until("lc empty", || {
        routing.listener("lc").unwrap().state.active() == 0
    })
    .await;

    // maxconn:5 caps it whatever its weight.
    *reply.lock().unwrap() = "100% maxconn:5\n".into();
    wait_until("maxconn applied", || {
        b_of("lc").agent_max_conns() == Some(5)
            && b_of("lc").runtime_weight() == Some(AgentPercent(100))
    })
    .await;
    let (landed, held) = land(lc, 30, true).await;
    assert_eq!(landed, shares(&[("a", 25), ("b", 5)]));

    // drain: no new connections, while its connections stay; ready: back.
    *reply.lock().unwrap() = "drain\n".into();
    wait_until("drained", || {
        b_of("lc").phase() == Phase::AgentDrained && b_of("w").phase() == Phase::AgentDrained
    })
    .await;
    assert!(states(admin, "lc")
        .await
        .contains(&("b".into(), "draining".into())));
    assert_eq!(land(w, 10, false).await.0, shares(&[("a", 10)]));
    // Its connections stay through an agent's drain (no drain clock).
    assert_eq!(b_of("lc").active(), 5);
    drop(held);
    *reply.lock().unwrap() = "ready 50% maxconn:1000\n".into();
    wait_until("ready", || {
        b_of("w").phase() == Phase::Up && b_of("w").runtime_weight() == Some(AgentPercent(50))
    })
    .await;

    // The API's weight holds until the agent's next word on that backend: a has no
    // agent, so 6 holds; b's agent says 100% (weight 2) again.
    let (status, body) =
        http_with(admin, "POST", "/api/v1/listeners/w/backends/a/weight", "").await;
    assert_eq!(status, 400, "an empty body is refused: {body}");
    let (status, body) = post_json(
        admin,
        "/api/v1/listeners/w/backends/a/weight",
        "{\"weight\": 6}",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    *reply.lock().unwrap() = "100%\n".into();
    wait_until("b at 100%", || {
        b_of("w").runtime_weight() == Some(AgentPercent(100))
    })
    .await;
    assert_eq!(land(w, 32, false).await.0, shares(&[("a", 24), ("b", 8)]));
    for (body, expect) in [
        ("{\"weight\": -1}", 400),
        ("{\"weight\": 1000001}", 400),
        ("[6]", 400),
    ] {
        assert_eq!(
            post_json(admin, "/api/v1/listeners/w/backends/a/weight", body)
                .await
                .0,
            expect,
            "{body}"
        );
    }
    assert_eq!(
        post_json(
            admin,
            "/api/v1/listeners/w/backends/zz/weight",
            "{\"weight\": 1}"
        )
        .await
        .0,
        404
    );
}

/// A POST with a JSON body to the admin endpoint: (status, body).
async fn post_json(admin: SocketAddr, path: &str, body: &str) -> (u16, String) {
    http_with_body(admin, "POST", path, "", body).await
}
