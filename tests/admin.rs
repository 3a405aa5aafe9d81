//! End-to-end tests of the admin server (`--admin`): real gateways on port
//! 0, a real origin, real WebSocket clients, HTTP over real sockets, the
//! metrics read with a Prometheus text parser, and the dashboard rendered by
//! headless Chromium when it is installed (always on CI).

mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use support::*;
use tungstenite::Message;
use wsgate::{Config, Error, Gateway, GatewayHandle};

/// A test configuration with the admin server on a free port.
fn admin_config(origin: &str) -> Config {
    let mut config = test_config(origin);
    config.admin = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config
}

fn admin(gw: &GatewayHandle) -> SocketAddr {
    gw.admin_addr().expect("the admin server runs")
}

/// An HTTP response: status and body.
#[derive(Debug)]
struct Response {
    status: u16,
    head: String,
    body: String,
}

/// Parses what the admin server sent on one connection.
fn parse_response(raw: &str) -> Response {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    Response {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// `GET path` on a new connection.
fn get(addr: SocketAddr, path: &str) -> Response {
    parse_response(&http_exchange(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n"),
    ))
}

/// `GET /metrics`, parsed by an independent Prometheus text-format parser.
fn scrape(addr: SocketAddr) -> prometheus_parse::Scrape {
    let response = get(addr, "/metrics");
    assert_eq!(response.status, 200, "{response:?}");
    assert!(
        response.head.contains("text/plain; version=0.0.4"),
        "{}",
        response.head
    );
    let lines = response.body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("Prometheus text format")
}

/// The value of the sample `name` whose labels include `labels`.
#[track_caller]
fn sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)));
    match found.map(|s| &s.value) {
        Some(
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v),
        ) => *v,
        other => panic!("no sample {name}{labels:?}: {other:?}"),
    }
}

/// The sum of `name`'s samples over every label set.
fn total(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
            _ => 0.0,
        })
        .sum()
}

/// The buckets (cumulative) of the histogram `name`.
fn histogram(
    scrape: &prometheus_parse::Scrape,
    name: &str,
) -> Vec<prometheus_parse::HistogramCount> {
    scrape
        .samples
        .iter()
        .find_map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) if s.metric == name => {
                Some(buckets.clone())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no histogram {name}"))
}

#[test]
fn metrics_count_exactly_what_the_clients_received() {
    const K: usize = 4;
    const N: u64 = 100;
    let origin = TestOrigin::start();
    let mut config = admin_config(&origin.url());
    // Room for the whole burst: no client may lose a frame here.
    config.queue_depth = 2 * N as usize;
    let gw = start_gateway(config);
    let mut clients = connect_clients(&gw, K);
    wait_until("the origin connection", || origin.open() == 1);
    for n in 1..=N {
        origin.send_seq(n);
    }
    let mut payload_bytes = 0;
    for client in &mut clients {
        for n in 1..=N {
            assert_eq!(recv_text(client), n.to_string());
        }
    }
    for n in 1..=N {
        // Text frame: 2 header bytes and the payload.
        payload_bytes += 2 + n.to_string().len() as u64;
    }
    let want_bytes = payload_bytes * K as u64;
    let delivered = (K as u64 * N) as f64;
    wait_until("K×N frames delivered in the metrics", || {
        let s = scrape(admin(&gw));
        sample(&s, "wsgate_frames_delivered_total", &[]) == delivered
            && sample(&s, "wsgate_client_sent_bytes_total", &[]) == want_bytes as f64
    });
    let s = scrape(admin(&gw));
    assert_eq!(sample(&s, "wsgate_clients", &[]), K as f64);
    assert_eq!(sample(&s, "wsgate_clients_accepted_total", &[]), K as f64);
    assert_eq!(sample(&s, "wsgate_lobbies", &[]), 1.0);
    assert_eq!(
        sample(&s, "wsgate_origin_connections", &[("state", "up")]),
        1.0
    );
    assert_eq!(
        sample(&s, "wsgate_origin_messages_received_total", &[]),
        N as f64
    );
    for reason in ["slow_client", "writer_behind", "departed"] {
        assert_eq!(
            sample(&s, "wsgate_frames_dropped_total", &[("reason", reason)]),
            0.0
        );
    }
    assert!(sample(&s, "wsgate_origin_connect_attempts_total", &[]) >= 1.0);
    for cause in [
        "connect",
        "timeout",
        "tls",
        "upgrade",
        "lost",
        "silent",
        "oversized",
    ] {
        assert_eq!(
            sample(&s, "wsgate_origin_failures_total", &[("cause", cause)]),
            0.0
        );
    }
    assert!(sample(&s, "wsgate_uptime_seconds", &[]) > 0.0);
    // One delivery in 16 is timed: the histogram holds that many samples,
    // each within the test's lifetime.
    let buckets = histogram(&s, "wsgate_delivery_latency_seconds");
    let timed = buckets.last().map(|b| b.count).unwrap_or(0.0);
    // (each writer counts its own deliveries: up to one short per writer)
    let most = ((K as u64 * N) / 16) as f64;
    assert!(
        (most - 2.0..=most).contains(&timed),
        "{timed} timed: {buckets:?}"
    );
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "cumulative"
    );
    assert!(
        buckets
            .iter()
            .any(|b| b.less_than <= 2.5 && b.count == timed),
        "every sample under 2.5 s: {buckets:?}"
    );
    // Every metric has its help text, and counters end in _total.
    for sample in &s.samples {
        assert!(sample.metric.starts_with("wsgate_"), "{}", sample.metric);
        if matches!(sample.value, prometheus_parse::Value::Counter(_)) {
            assert!(sample.metric.ends_with("_total"), "{}", sample.metric);
        }
        // A histogram's _sum and _count share its HELP.
        let family = ["_sum", "_count"]
            .iter()
            .find_map(|suffix| sample.metric.strip_suffix(suffix))
            .filter(|base| s.docs.contains_key(*base))
            .unwrap_or(&sample.metric);
        assert!(s.docs.contains_key(family), "{} has no HELP", sample.metric);
    }
}

#[test]
fn metrics_count_the_frames_a_stalled_client_missed_as_dropped() {
    const N: u64 = 2000;
    let origin = TestOrigin::start();
    let mut config = admin_config(&origin.url());
    config.client_send_buffer = 8 * 1024;
    let gw = start_gateway(config);
    let reader = ws_client(gw.local_addr());
    let stalled = small_buffer_client(gw.local_addr());
    wait_placed(&gw, 2);
    wait_until("the origin connection", || origin.open() == 1);
    let reading = thread::spawn(move || read_until(reader, N));
    for n in 1..=N {
        origin.send(numbered(n, 1024));
    }
    wait_until("the gateway to read every message", || {
        gw.stats().messages_in == N
    });
    let read = reading.join().expect("reader");
    let got = read_until(stalled, N);
    assert!(
        got.len() < read.len(),
        "the stalled client should have lost more"
    );
    // A burst this size overflows the reading client's queue too at times:
    // every frame either reached a client or is counted as dropped.
    let delivered = (read.len() + got.len()) as u64;
    let missed = 2 * N - delivered;
    wait_until("what clients got and missed, in the metrics", || {
        let s = scrape(admin(&gw));
        sample(&s, "wsgate_frames_delivered_total", &[]) == delivered as f64
            && total(&s, "wsgate_frames_dropped_total") == missed as f64
    });
    // Binary frames of 1024 bytes: 4 header bytes each, nothing else written.
    let s = scrape(admin(&gw));
    assert_eq!(
        sample(&s, "wsgate_client_sent_bytes_total", &[]),
        (delivered * 1028) as f64
    );
}

#[test]
fn lobbies_json_lists_every_lobby_with_its_counters() {
    let origin = TestOrigin::start();
    let mut config = admin_config(&origin.url());
    config.lobby_capacity = 2;
    let gw = start_gateway(config);
    let mut clients = connect_clients(&gw, 5);
    wait_until("three origin connections", || origin.open() == 3);
    wait_until("every lobby's origin up", || {
        gw.lobbies(DEADLINE)
            .iter()
            .all(|l| l.origin == wsgate::OriginState::Up)
    });
    let json = lobbies_json(admin(&gw));
    let lobbies = json["lobbies"].as_array().expect("a lobby array");
    let expected = gw.lobbies(DEADLINE);
    assert_eq!(lobbies.len(), 3);
    assert_eq!(json["lobby_capacity"], 2);
    for (l, want) in lobbies.iter().zip(&expected) {
        assert_eq!(l["id"], want.id);
        assert_eq!(l["clients"], want.clients as u64);
        assert_eq!(l["origin"], "up");
        assert_eq!(l["messages_in"], 0);
        assert!(l["last_message_age_seconds"].is_null(), "{l}");
        assert!(l["origin_since_seconds"].as_f64().is_some(), "{l}");
    }
    let mut sizes: Vec<u64> = lobbies
        .iter()
        .map(|l| l["clients"].as_u64().unwrap_or(0))
        .collect();
    sizes.sort_unstable();
    assert_eq!(sizes, [1, 2, 2]);

    for n in 1..=3 {
        origin.send_seq(n);
    }
    for client in &mut clients {
        for n in 1..=3 {
            assert_eq!(recv_text(client), n.to_string());
        }
    }
    let json = lobbies_json(admin(&gw));
    for l in json["lobbies"].as_array().expect("a lobby array") {
        assert_eq!(l["messages_in"], 3, "{l}");
        assert_eq!(
            l["frames_out"],
            l["clients"].as_u64().unwrap_or(0) * 3,
            "{l}"
        );
        assert_eq!(l["frames_dropped"], 0, "{l}");
        let age = l["last_message_age_seconds"].as_f64().expect("an age");
        assert!((0.0..20.0).contains(&age), "{l}");
    }
}

fn lobbies_json(addr: SocketAddr) -> serde_json::Value {
    let response = get(addr, "/lobbies");
    assert_eq!(response.status, 200, "{response:?}");
    assert!(
        response.head.contains("application/json"),
        "{}",
        response.head
    );
    serde_json::from_str(&response.body).expect("JSON")
}

/// An instance's first client must not fail its readiness for as long as
/// its lobby's first origin attempt takes (HAProxy would mark a fresh
/// instance down for it); a failed attempt does, and so do the retries
/// after it until the origin is up.
#[test]
fn readyz_passes_while_a_first_origin_attempt_is_under_way_and_fails_once_one_failed() {
    // An origin that completes TCP connects (its backlog) and never
    // answers the upgrade: the attempt stays under way.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("ws://{}/feed", silent.local_addr().expect("addr"));
    let mut config = admin_config(&url);
    config.origin_connect_timeout = Duration::from_secs(60);
    let gw = start_gateway(config);
    let addr = admin(&gw);
    let _client = ws_client(gw.local_addr());
    wait_placed(&gw, 1);
    wait_until("the lobby's first origin attempt under way", || {
        gw.stats().origins_connecting == 1
    });
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 200, "{ready:?}");
    assert!(ready.body.contains("1 connecting"), "{ready:?}");

    // The origin goes away: the pending connect is reset, the attempt
    // fails, and the retries (to a closed port) keep failing.
    drop(silent);
    wait_until("the origin failing", || gw.stats().origins_failing == 1);
    let attempts = gw.stats().origin_connect_attempts;
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(get(addr, "/readyz").status);
        thread::sleep(Duration::from_millis(25));
    }
    assert!(statuses.iter().all(|&s| s == 503), "{statuses:?}");
    assert!(
        gw.stats().origin_connect_attempts > attempts,
        "it retried meanwhile"
    );
    let why = get(addr, "/readyz").body;
    assert!(why.starts_with("no origin connection up"), "{why}");
    gw.shutdown();
    gw.join();
}

#[test]
fn readyz_fails_as_shutdown_begins_and_the_admin_answers_through_the_drain() {
    let origin = TestOrigin::start();
    let mut config = admin_config(&origin.url());
    config.client_send_buffer = 8 * 1024;
    config.drain_timeout = Duration::from_secs(4);
    let drain = config.drain_timeout;
    let gw = start_gateway(config);
    let addr = admin(&gw);
    let livez = get(addr, "/livez");
    assert_eq!((livez.status, livez.body.as_str()), (200, "ok\n"));
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 200, "{ready:?}");

    let mut reader = ws_client(gw.local_addr());
    // Never read until the end: its queued frames keep the drain going.
    let stalled = small_buffer_client(gw.local_addr());
    wait_placed(&gw, 2);
    wait_until("ready once the origin is up", || {
        get(addr, "/readyz").status == 200
    });
    for n in 1..=500 {
        origin.send(numbered(n, 1024));
    }
    let mut last = 0;
    while last != 500 {
        let data = reader.read().expect("a message").into_data();
        last = std::str::from_utf8(&data[..8])
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("a numbered message");
    }

    let shutdown = Instant::now();
    gw.shutdown();
    // Readiness fails at once, before the reading client has seen its close
    // (it is read only afterwards) ...
    let ready = get(addr, "/readyz");
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(ready.body.starts_with("draining"), "{ready:?}");
    let close = recv_close(&mut reader).expect("a close frame");
    assert_eq!(u16::from(close.code), 1001);
    // ... and the admin server keeps answering while the stalled client
    // holds the drain open: live, not ready, metrics say draining.
    assert!(gw.stats().clients >= 1, "the drain is still under way");
    assert_eq!(get(addr, "/livez").status, 200);
    assert_eq!(get(addr, "/readyz").status, 503);
    assert_eq!(sample(&scrape(addr), "wsgate_draining", &[]), 1.0);
    assert!(!gw.readiness().ok);

    let last = gw.join();
    assert!(last.draining);
    // The promise: the drain timeout and a second, from shutdown(); with
    // 2 s for this noisy machine.
    let took = shutdown.elapsed();
    let bound = drain + Duration::from_secs(1) + Duration::from_secs(2);
    assert!(
        took < bound,
        "shutdown took {took:?}, promised under {bound:?}"
    );
    drop(stalled);
    // The admin server stopped last, with the gateway.
    assert!(
        TcpStream::connect(addr).is_err(),
        "the admin port still accepts"
    );
}

#[test]
fn livez_fails_once_the_gateway_has_a_fatal_error() {
    let origin = std::sync::Arc::new(TestOrigin::start());
    let mut config = admin_config(&origin.url());
    config.drain_timeout = Duration::from_secs(5);
    let gw = start_gateway(config);
    assert!(gw.liveness().ok);
    assert_eq!(get(admin(&gw), "/livez").status, 200);
    // A client that never reads a busy feed keeps the drain, and the admin
    // server, going once the acceptor fails.
    let _stalled = stalled_client(gw.local_addr());
    wait_until("the origin connection", || origin.open() == 1);
    let feed = Feed::start(origin.clone(), Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(300));
    gw.inject_fault(wsgate::fault::Fault::Acceptor);
    wait_until("/livez failing", || get(admin(&gw), "/livez").status == 503);
    assert!(!gw.liveness().ok);
    assert_eq!(
        sample(&scrape(admin(&gw)), "wsgate_fatal_errors_total", &[]),
        1.0
    );
    feed.stop();
}

#[test]
fn the_admin_answers_promptly_while_the_gateway_is_saturated() {
    const CLIENTS: usize = 40;
    let origin = Arc::new(TestOrigin::start());
    let gw = start_gateway(admin_config(&origin.url()));
    let addr = admin(&gw);
    let clients = connect_clients(&gw, CLIENTS);
    wait_until("the origin connection", || origin.open() == 1);
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let (received, stop) = (received.clone(), stop.clone());
            client
                .get_ref()
                .set_read_timeout(Some(Duration::from_millis(100)))
                .expect("read timeout");
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(Message::Binary(_)) = client.read() {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // As fast as the origin link takes it, in bursts: far more than 40
    // clients can be written on this machine, so queues overflow.
    let feed = {
        let (origin, stop) = (origin.clone(), stop.clone());
        thread::spawn(move || {
            let payload = vec![b'x'; 256];
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..50 {
                    origin.send(Message::binary(payload.clone()));
                }
                sent += 50;
                thread::sleep(Duration::from_millis(1));
            }
            sent
        })
    };
    wait_until("the feed flowing", || {
        received.load(Ordering::Relaxed) > 10_000
    });
    let before = gw.stats();
    let mut latencies = Vec::new();
    for i in 0..30 {
        let path = ["/metrics", "/readyz", "/lobbies"][i % 3];
        let started = Instant::now();
        let response = get(addr, path);
        latencies.push(started.elapsed());
        assert_eq!(response.status, 200, "{path}: {response:?}");
        thread::sleep(Duration::from_millis(50));
    }
    let after = gw.stats();
    stop.store(true, Ordering::Relaxed);
    let sent = feed.join().expect("feed");
    for reader in readers {
        reader.join().expect("reader");
    }
    latencies.sort_unstable();
    let (p50, max) = (
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
    );
    let delivered = after.frames_delivered - before.frames_delivered;
    let dropped = after.frames_dropped - before.frames_dropped;
    println!(
        "admin latency while saturated ({CLIENTS} clients, {sent} messages sent, \
         {delivered} delivered and {dropped} dropped during the requests): \
         p50 {:.2} ms, max {:.2} ms",
        p50.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0
    );
    assert!(delivered > 10_000, "the gateway was not busy");
    assert!(
        max < Duration::from_secs(2),
        "an admin request took {max:?}"
    );
}

#[test]
fn bad_requests_get_http_errors() {
    let origin = TestOrigin::start();
    let gw = start_gateway(admin_config(&origin.url()));
    let addr = admin(&gw);
    assert_eq!(get(addr, "/nope").status, 404);
    assert_eq!(get(addr, "/metrics/extra").status, 404);
    let post = parse_response(&http_exchange(
        addr,
        "POST /metrics HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n",
    ));
    assert_eq!(post.status, 405);
    assert!(post.head.contains("Allow: GET, HEAD"), "{}", post.head);
    let head = parse_response(&http_exchange(
        addr,
        "HEAD /livez HTTP/1.1\r\nHost: a\r\n\r\n",
    ));
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert_eq!(get(addr, "/readyz?verbose=1").status, 200);
    let garbage = parse_response(&http_exchange(addr, "\x01\x02 nonsense\r\n\r\n"));
    assert_eq!(garbage.status, 400);

    // A 64 KiB header: 431, not an unbounded read.
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: admin\r\nX-Huge: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    assert_eq!(parse_response(&http_exchange(addr, &huge)).status, 431);
    // Many small headers past the limit: 431 too.
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: admin\r\n{many}\r\n");
    assert_eq!(parse_response(&http_exchange(addr, &request)).status, 431);
    // Still serving.
    assert_eq!(get(addr, "/livez").status, 200);
}

#[test]
fn slowloris_connections_do_not_lock_operators_out() {
    let origin = TestOrigin::start();
    let gw = start_gateway(admin_config(&origin.url()));
    let addr = admin(&gw);
    // More half-sent requests than the server keeps connections.
    let mut stalled: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: adm")
                .expect("half a request");
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(get(addr, "/livez").status, 200);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // And each stalled connection is closed by the request deadline (5 s).
    let started = Instant::now();
    for s in &mut stalled {
        s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(
            rest.is_empty() || rest.starts_with(b"HTTP/1.1 4"),
            "{rest:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "stalled connections held for {:?}",
        started.elapsed()
    );
}

#[test]
fn a_busy_admin_port_is_a_bind_error_and_no_admin_means_none() {
    let origin = TestOrigin::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("address");
    let mut config = test_config(&origin.url());
    config.admin = Some(busy);
    match Gateway::start(config) {
        Err(Error::Bind { addr, .. }) => assert_eq!(addr, busy),
        other => panic!("expected a bind error, got {other:?}"),
    }
    let gw = start_gateway(test_config(&origin.url()));
    assert_eq!(gw.admin_addr(), None);
    assert!(gw.readiness().ok, "{:?}", gw.readiness());
}

#[test]
fn an_embedder_adds_the_metrics_to_its_own_registry() {
    use prometheus_client::{encoding::text::encode, registry::Registry};
    let origin = TestOrigin::start();
    let gw = start_gateway(test_config(&origin.url()));
    let _client = connect_clients(&gw, 1);
    let mut registry = Registry::with_prefix("app");
    wsgate::metrics::register(&mut registry, gw.metrics_collector());
    let mut text = String::new();
    encode(&mut text, &registry).expect("encode");
    assert!(text.lines().any(|l| l == "app_wsgate_clients 1"), "{text}");
}

#[test]
fn the_dashboard_shows_the_lobbies_and_live_rates_in_chromium() {
    let Some(chromium) = chromium() else {
        return;
    };
    let origin = Arc::new(TestOrigin::start());
    let mut config = admin_config(&origin.url());
    config.lobby_capacity = 1;
    let gw = start_gateway(config);
    let readers: Vec<Reader> = connect_clients(&gw, 3)
        .into_iter()
        .map(Reader::spawn)
        .collect();
    wait_until("three origin connections", || origin.open() == 3);
    let feed = Feed::start(origin.clone(), Duration::from_millis(2));
    let url = format!("http://{}/", admin(&gw));

    // Virtual time runs the page's one-second timer quickly; the network is
    // real, so each refresh reads the live gateway.
    let dom = run_chromium(
        &chromium,
        &["--virtual-time-budget=5000", "--dump-dom", &url],
    );
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("admin-dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    run_chromium(
        &chromium,
        &[
            "--virtual-time-budget=5000",
            "--window-size=1400,900",
            "--hide-scrollbars",
            &format!("--screenshot={}", screenshot.display()),
            &url,
        ],
    );
    feed.stop();
    for reader in readers {
        reader.finish();
    }

    let refreshes: u64 = attr(&dom, "data-refreshes").parse().unwrap_or(0);
    assert!(refreshes >= 2, "{refreshes} refreshes in\n{dom}");
    assert_eq!(attr(&dom, "data-count"), "3", "{dom}");
    assert_eq!(dom.matches("data-lobby-id=").count(), 3, "{dom}");
    assert_eq!(dom.matches("data-origin=\"up\"").count(), 3, "{dom}");
    let rate: f64 = value_of(&dom, "rate-messages-in").parse().unwrap_or(0.0);
    assert!(rate > 0.0, "messages in/s {rate} in\n{dom}");
    let frames: f64 = value_of(&dom, "rate-frames-out").parse().unwrap_or(0.0);
    assert!(frames > 0.0, "frames out/s {frames} in\n{dom}");
    let per_write: f64 = value_of(&dom, "frames-per-write").parse().unwrap_or(0.0);
    assert!(per_write > 0.0, "frames per write {per_write} in\n{dom}");
    assert!(dom.contains("<canvas"), "uPlot drew no chart:\n{dom}");
    let png = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(
        png > 10_000,
        "screenshot {} is {png} bytes",
        screenshot.display()
    );
    println!("dashboard screenshot: {}", screenshot.display());
}

/// The value of the first `name="…"` attribute in `html`.
fn attr<'a>(html: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=\"");
    html.split_once(&key)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or("", |(value, _)| value)
}

/// The `data-value` of the element with `id`.
fn value_of<'a>(html: &'a str, id: &str) -> &'a str {
    let key = format!("id=\"{id}\"");
    let Some(at) = html.find(&key) else {
        return "";
    };
    let tag_end = html[at..].find('>').map_or(html.len(), |e| at + e);
    let tag_start = html[..at].rfind('<').unwrap_or(0);
    attr(&html[tag_start..tag_end], "data-value")
}
