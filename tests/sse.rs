//! Server-Sent Events end to end (feature `sse`): event streams from the
//! same lobbies as WebSocket clients, message IDs, resume from a lobby's
//! history with Last-Event-ID, the reset event, slow streams closed rather
//! than thinned, and the answers to bad requests. Real sockets, the real
//! test origin; counts and order, never speed.
#![cfg(feature = "sse")]

mod support;

use std::{io::Read, thread, time::Duration};

use support::*;
use tungstenite::Message;
use wsgate::{Disconnect, DropReason, SlowStream};

/// The status of an HTTP response.
fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

/// Whether `id` is a message ID as documented: 16 lowercase hex digits.
fn is_message_id(id: &str) -> bool {
    id.len() == 16 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[test]
fn an_event_stream_gets_every_message_in_order_with_ids() {
    let origin = TestOrigin::start();
    // The burst below (22 messages) is longer than the default queue (16),
    // which would close a stream that overflowed it, and fits the twice as
    // deep queue an event stream gets.
    let gw = start_gateway(test_config(&origin.url()));
    let mut client = sse_client(gw.local_addr(), "/", &["Origin: https://app.example"]);
    assert!(
        client.head.contains("Access-Control-Allow-Origin: *\r\n"),
        "{}",
        client.head
    );
    wait_placed(&gw, 1);
    wait_until("one origin connection", || origin.open() == 1);
    for n in 1..=20 {
        origin.send_seq(n);
    }
    origin.send(Message::text("first line\nsecond\r\nthird"));
    origin.send(Message::binary(vec![0u8, 1, 2, 0xff]));
    let mut ids = Vec::new();
    for n in 1..=20 {
        let (data, id) = client.message();
        assert_eq!(data, n.to_string());
        assert!(is_message_id(&id), "{id:?}");
        ids.push(id);
    }
    assert_eq!(client.retry, Some(1000), "the retry hint");
    let (data, _) = client.message();
    assert_eq!(data, "first line\nsecond\nthird", "one data: line each");
    let binary = client.event();
    assert_eq!(binary.event.as_deref(), Some("binary"));
    assert_eq!(binary.data, "AAEC/w==");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20, "an ID of its own for each message");
}

#[test]
fn websocket_and_sse_clients_share_one_lobby_and_one_upstream() {
    let origin = TestOrigin::start();
    let gw = start_gateway(test_config(&origin.url()));
    let ws = connect_clients(&gw, 1).remove(0);
    let stream = sse_client(gw.local_addr(), "/", &[]);
    wait_placed(&gw, 2);
    wait_until("one origin connection", || origin.open() == 1);
    assert_eq!(gw.lobbies(DEADLINE).len(), 1);
    let ws = Follower::spawn(ws);
    let sse = SseFollower::spawn(stream);
    const N: u64 = 200;
    for n in 1..=N {
        origin.send_seq(n);
        if n % 10 == 0 {
            wait_until("the burst delivered", || {
                ws.count() as u64 >= n && sse.count() as u64 >= n
            });
        }
    }
    let want: Vec<String> = (1..=N).map(|n| n.to_string()).collect();
    let got: Vec<String> = sse.events().into_iter().map(|e| e.data).collect();
    assert_eq!(got, want, "the event stream");
    assert_eq!(ws.finish_at(&N.to_string()), want, "the WebSocket");
    assert_eq!(origin.accepted(), 1, "one upstream connection for both");
    assert_eq!(gw.stats().frames_dropped, 0);
}

#[test]
fn a_stream_resumes_after_its_last_event_id_with_no_gap_and_no_duplicate() {
    let (origin, gw, _ws) = gateway_with_a_lobby(|_| {});
    let mut first = sse_client(gw.local_addr(), "/", &[]);
    wait_placed(&gw, 2);
    for n in 1..=10 {
        origin.send_seq(n);
    }
    // It reads five of them, then goes.
    let mut last = String::new();
    for n in 1..=5 {
        let (data, id) = first.message();
        assert_eq!(data, n.to_string());
        last = id;
    }
    drop(first);
    wait_clients(&gw, 1);
    for n in 11..=15 {
        origin.send_seq(n);
    }
    // Back with its Last-Event-ID header: 6 to 15 from the history, then live.
    let mut back = sse_client(gw.local_addr(), "/", &[&format!("Last-Event-ID: {last}")]);
    for n in 6..=15 {
        let (data, id) = back.message();
        assert_eq!(data, n.to_string(), "from the history");
        last = id;
    }
    origin.send_seq(16);
    let (data, _) = back.message();
    assert_eq!(data, "16", "then live");
    assert_eq!(gw.stats().resumes, 1);
    drop(back);
    wait_clients(&gw, 1);
    // The query form, as a first connection that resumes: after 15.
    origin.send_seq(17);
    let mut query = sse_client(gw.local_addr(), &format!("/?last_event_id={last}"), &[]);
    assert_eq!(query.message().0, "16");
    assert_eq!(query.message().0, "17");
    origin.send_seq(18);
    assert_eq!(query.message().0, "18");
    let stats = gw.stats();
    assert_eq!((stats.resumes, stats.resume_resets), (2, 0));
}

/// With no setting changed, a stream away for 2 s from a 50 msg/s feed of
/// small messages resumes with nothing lost, and the lobby listing shows
/// what its history holds.
#[test]
fn by_default_a_stream_away_two_seconds_from_50_messages_a_second_loses_nothing() {
    let (origin, gw, ws) = gateway_with_a_lobby(|_| {});
    let mut first = sse_client(gw.local_addr(), "/", &[]);
    wait_placed(&gw, 2);
    origin.send_seq(1);
    let (data, last) = first.message();
    assert_eq!(data, "1");
    drop(first);
    wait_clients(&gw, 1);
    for n in 2..=101 {
        origin.send_seq(n);
        thread::sleep(Duration::from_millis(20));
    }
    wait_until("the WebSocket client to have them all", || {
        ws.count() >= 101
    });
    let lobbies = gw.lobbies(DEADLINE);
    assert_eq!(lobbies.len(), 1, "{lobbies:?}");
    assert_eq!(lobbies[0].history_messages, 101, "{lobbies:?}");
    assert!(lobbies[0].history_bytes >= 101 * 3, "{lobbies:?}");
    let mut back = sse_client(gw.local_addr(), "/", &[&format!("Last-Event-ID: {last}")]);
    for n in 2..=101 {
        assert_eq!(back.message().0, n.to_string(), "from the history");
    }
    let stats = gw.stats();
    assert_eq!((stats.resumes, stats.resume_resets), (1, 0));
}

#[test]
fn an_unknown_or_too_old_id_gets_the_reset_event_then_live_messages() {
    let (origin, gw, ws) = gateway_with_a_lobby(|c| c.history = 64);
    origin.send_seq(1);
    wait_until("the lobby to have a message", || ws.count() == 1);
    // An ID the lobby never had.
    let mut unknown = sse_client(gw.local_addr(), "/", &["Last-Event-ID: 00000000deadbeef"]);
    let reset = unknown.event();
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    wait_placed(&gw, 2);
    origin.send_seq(2);
    assert_eq!(unknown.message().0, "2", "live after the reset");
    assert_eq!(gw.stats().resume_resets, 1);
    // An ID the lobby had, and forgot: its history holds 64 messages here.
    origin.send_seq(3);
    let (_, old) = unknown.message();
    drop(unknown);
    for n in 4..=200 {
        origin.send_seq(n);
        wait_until("the WebSocket client to keep up", || ws.count() as u64 >= n);
    }
    let mut late = sse_client(gw.local_addr(), "/", &[&format!("Last-Event-ID: {old}")]);
    assert_eq!(late.event().event.as_deref(), Some("reset"));
    wait_placed(&gw, 2);
    origin.send_seq(201);
    assert_eq!(late.message().0, "201");
    let stats = gw.stats();
    assert_eq!((stats.resume_resets, stats.resumes), (2, 0));
}

#[test]
fn a_slow_stream_is_closed_rather_than_thinned_and_fast_clients_lose_nothing() {
    let (origin, gw, ws) = gateway_with_a_lobby(|c| c.queue_depth = 4);
    let fast = SseFollower::spawn(sse_client(gw.local_addr(), "/", &[]));
    // A stream that never reads, into a small receive buffer.
    let mut slow = connect_from(gw.local_addr(), [127, 0, 0, 1], 4096);
    std::io::Write::write_all(&mut slow, sse_request("/", &[]).as_bytes()).expect("request");
    wait_placed(&gw, 3);
    const N: u64 = 100;
    let pad = "x".repeat(8000);
    for n in 1..=N {
        origin.send(Message::text(format!("{n} {pad}")));
        wait_until("the fast clients to keep up", || {
            ws.count() as u64 >= n && fast.count() as u64 >= n
        });
    }
    wait_until("the slow stream closed", || {
        gw.stats().disconnected(Disconnect::TooSlow) == 1
    });
    // Its socket ends once what it was sent is read.
    slow.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut sink = Vec::new();
    let _ = slow.read_to_end(&mut sink);
    let got: Vec<String> = fast
        .events()
        .into_iter()
        .map(|e| e.data.split(' ').next().unwrap_or_default().to_owned())
        .collect();
    let want: Vec<String> = (1..=N).map(|n| n.to_string()).collect();
    assert_eq!(got, want, "the fast stream lost nothing");
    assert_eq!(ws.count() as u64, N, "the WebSocket client lost nothing");
    assert!(!fast.has_ended());
    assert_eq!(gw.stats().disconnected(Disconnect::TooSlow), 1);
}

#[test]
fn with_slow_stream_drop_a_slow_stream_stays_open_and_loses_its_oldest() {
    let (origin, gw, ws) = gateway_with_a_lobby(|c| {
        c.queue_depth = 4;
        c.slow_stream = SlowStream::Drop;
    });
    let mut slow = connect_from(gw.local_addr(), [127, 0, 0, 1], 4096);
    std::io::Write::write_all(&mut slow, sse_request("/", &[]).as_bytes()).expect("request");
    wait_placed(&gw, 2);
    const N: u64 = 100;
    let pad = "x".repeat(8000);
    for n in 1..=N {
        origin.send(Message::text(format!("{n} {pad}")));
        wait_until("the WebSocket client to keep up", || ws.count() as u64 >= n);
    }
    wait_until("the slow stream's oldest dropped", || {
        let stats = gw.stats();
        stats.dropped(DropReason::SlowClient) + stats.dropped(DropReason::WriterBehind) > 0
    });
    // Still open: what it holds, then the next message.
    origin.send(Message::text(format!("{} {pad}", N + 1)));
    let want = format!("\ndata: {} ", N + 1);
    let mut text = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    while !String::from_utf8_lossy(&text).contains(&want) {
        let n = slow.read(&mut chunk).expect("the stream is still open");
        assert!(n > 0, "the stream ended");
        text.extend_from_slice(&chunk[..n]);
    }
    let got = String::from_utf8_lossy(&text).matches("\ndata: ").count();
    assert!(got < (N + 1) as usize, "it lost some: got {got}");
    assert_eq!(gw.stats().disconnected(Disconnect::TooSlow), 0);
    // The last message reaches the WebSocket client in its own time.
    wait_until("the WebSocket client has the last message", || {
        ws.count() as u64 > N
    });
    assert_eq!(
        ws.count() as u64,
        N + 1,
        "the WebSocket client lost nothing"
    );
}

#[test]
fn bad_requests_get_their_statuses() {
    let origin = TestOrigin::start();
    let gw = start_gateway(test_config(&origin.url()));
    let addr = gw.local_addr();
    let huge = format!("Last-Event-ID: {}", "a".repeat(100_000));
    assert_eq!(
        status(&http_exchange(addr, &sse_request("/", &[&huge]))),
        431
    );
    for bad in ["Last-Event-ID: 12", "Last-Event-ID: 0123456789abcdeg"] {
        let response = http_exchange(addr, &sse_request("/", &[bad]));
        assert_eq!(status(&response), 400, "{bad}: {response}");
        assert!(response.contains("malformed Last-Event-ID"), "{response}");
    }
    let query = http_exchange(addr, &sse_request("/?last_event_id=zz", &[]));
    assert_eq!(status(&query), 400, "{query}");
    let post =
        "POST / HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\nContent-Length: 0\r\n\r\n";
    let response = http_exchange(addr, post);
    assert_eq!(status(&response), 405, "{response}");
    assert!(response.contains("Allow: GET\r\n"), "{response}");
    let html = "GET / HTTP/1.1\r\nHost: x\r\nAccept: text/html, */*\r\n\r\n";
    let response = http_exchange(addr, html);
    assert_eq!(status(&response), 426, "{response}");
    assert!(response.contains("text/event-stream"), "{response}");
    assert_eq!(
        status(&http_exchange(addr, &sse_request("/elsewhere", &[]))),
        404
    );
    // None of them reached a lobby.
    assert_eq!(gw.stats().clients_accepted, 0);
}

#[test]
fn an_allowed_origin_gets_its_cors_header_and_another_gets_403() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.allowed_origins = vec!["https://app.example".to_owned()];
    let gw = start_gateway(config);
    let client = sse_client(gw.local_addr(), "/", &["Origin: https://app.example"]);
    assert!(
        client.head.contains(
            "Access-Control-Allow-Origin: https://app.example\r\n\
             Access-Control-Allow-Credentials: true\r\nVary: Origin\r\n"
        ),
        "{}",
        client.head
    );
    let evil = sse_request("/", &["Origin: https://evil.example"]);
    assert_eq!(status(&http_exchange(gw.local_addr(), &evil)), 403);
    // A preflight (a cross-origin stream with an Authorization header, say)
    // is answered and the connection closed; from elsewhere, 403.
    let preflight = |from: &str| {
        format!(
            "OPTIONS /?symbol=btc HTTP/1.1\r\nHost: x\r\nOrigin: {from}\r\n\
             Access-Control-Request-Method: GET\r\n\
             Access-Control-Request-Headers: authorization\r\n\r\n"
        )
    };
    let answer = http_exchange(gw.local_addr(), &preflight("https://app.example"));
    assert_eq!(status(&answer), 204, "{answer}");
    assert!(
        answer.contains("Access-Control-Allow-Headers: Authorization, "),
        "{answer}"
    );
    let refused = http_exchange(gw.local_addr(), &preflight("https://evil.example"));
    assert_eq!(status(&refused), 403, "{refused}");
    assert_eq!(
        gw.stats().clients,
        1,
        "the stream alone: a preflight is no client"
    );
}

#[test]
fn an_idle_stream_gets_heartbeat_comments_that_are_not_events() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.sse_heartbeat = Duration::from_millis(200);
    let gw = start_gateway(config);
    let mut client = sse_client(gw.local_addr(), "/", &[]);
    wait_placed(&gw, 1);
    wait_until("one origin connection", || origin.open() == 1);
    // Two heartbeats' time, then a message: the comments came first and
    // were not dispatched as events.
    std::thread::sleep(Duration::from_millis(700));
    origin.send_seq(1);
    assert_eq!(client.message().0, "1");
    assert!(client.comments >= 2, "{} heartbeats", client.comments);
    wait_until("the delivery counted", || gw.stats().frames_delivered >= 1);
    assert_eq!(
        gw.stats().frames_delivered,
        1,
        "heartbeats are not deliveries"
    );
}

#[cfg(feature = "auth")]
#[test]
fn an_event_stream_passes_the_same_authentication_as_an_upgrade() {
    use jsonwebtoken::Algorithm;
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.auth.jwt_secret_file = Some(secret_file("sse"));
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    let token = mint(
        Algorithm::HS256,
        &serde_json::json!({ "sub": "u", "exp": now() + 600 }),
        None,
    );
    let expired = mint(
        Algorithm::HS256,
        &serde_json::json!({ "sub": "u", "exp": now() - 600 }),
        None,
    );
    assert_eq!(status(&http_exchange(addr, &sse_request("/", &[]))), 401);
    let bad = format!("/?access_token={expired}");
    assert_eq!(status(&http_exchange(addr, &sse_request(&bad, &[]))), 401);
    let mut by_query = sse_client(addr, &format!("/?access_token={token}"), &[]);
    let mut by_header = sse_client(addr, "/", &[&format!("Authorization: Bearer {token}")]);
    wait_placed(&gw, 2);
    wait_until("one origin connection", || origin.open() == 1);
    origin.send_seq(1);
    assert_eq!(by_query.message().0, "1");
    assert_eq!(by_header.message().0, "1");
}

/// A stream resuming on another gateway whose upstream is behind the one
/// it came from (a rolling restart behind a load balancer): the ID it
/// hands back has not arrived there yet, so it waits for it, then gets
/// exactly what follows, with no reset.
#[test]
fn a_resume_on_a_gateway_behind_waits_for_its_message_rather_than_a_reset() {
    // Connection 0 (gateway A's lobby) gets each message at once,
    // connection 1 (gateway B's) a second later.
    let origin = TestOrigin::start_with(OriginOptions {
        skew: Duration::from_secs(1),
        ..OriginOptions::default()
    });
    let a = start_gateway(test_config(&origin.url()));
    let _at_a = Follower::spawn(connect_clients(&a, 1).remove(0));
    wait_until("A's origin connection", || origin.open() == 1);
    let b = start_gateway(test_config(&origin.url()));
    let _at_b = Follower::spawn(connect_clients(&b, 1).remove(0));
    wait_until("B's origin connection", || origin.open() == 2);
    wait_until("both upstreams up", || {
        a.stats().origin_connections == 1 && b.stats().origin_connections == 1
    });
    let mut stream = sse_client(a.local_addr(), "/", &[]);
    wait_placed(&a, 2);
    for n in 1..=20 {
        origin.send_seq(n);
    }
    let mut last = String::new();
    for n in 1..=20 {
        let (data, id) = stream.message();
        assert_eq!(data, n.to_string());
        last = id;
    }
    drop(stream);
    // At once on B, which gets 20 about a second after A did (on a machine
    // slow enough that it already has it, this resumes from its history).
    let mut back = sse_client(b.local_addr(), "/", &[&format!("Last-Event-ID: {last}")]);
    for n in 21..=23 {
        origin.send_seq(n);
    }
    for n in 21..=23 {
        assert_eq!(back.message().0, n.to_string(), "after 20, no reset");
    }
    let stats = b.stats();
    assert_eq!((stats.resumes, stats.resume_resets), (1, 0), "{stats:?}");
}

#[test]
fn an_id_from_another_route_gets_the_reset_event() {
    let a = TestOrigin::start();
    let b = TestOrigin::start();
    let mut config = test_config("");
    config.origin = String::new();
    config.routes = vec![
        wsgate::RouteConfig::new("/a", &a.url()),
        wsgate::RouteConfig::new("/b", &b.url()),
    ];
    let gw = start_gateway(config);
    let mut at_a = sse_client(gw.local_addr(), "/a", &[]);
    let at_b = SseFollower::spawn(sse_client(gw.local_addr(), "/b", &[]));
    wait_placed(&gw, 2);
    wait_until("one connection to each origin", || {
        a.open() == 1 && b.open() == 1
    });
    a.send_seq(1);
    b.send_seq(1);
    let (_, id_at_a) = at_a.message();
    wait_until("/b's message", || at_b.count() == 1);
    // /b's lobby never had /a's message, whatever their payloads.
    let mut wrong = sse_client(
        gw.local_addr(),
        "/b",
        &[&format!("Last-Event-ID: {id_at_a}")],
    );
    assert_eq!(wrong.event().event.as_deref(), Some("reset"));
    wait_placed(&gw, 3);
    b.send_seq(2);
    assert_eq!(wrong.message().0, "2");
    assert_eq!(gw.stats().resume_resets, 1);
}

#[test]
fn event_streams_move_between_lobbies_with_compaction_and_lose_nothing() {
    let origin = std::sync::Arc::new(TestOrigin::start());
    let mut config = test_config(&origin.url());
    config.lobby_capacity = 2;
    config.compact_interval = Duration::from_millis(300);
    config.compact_fill = 1.0;
    // A busy box's writer may fall behind for a while: not what this tests.
    config.queue_depth = 512;
    let gw = start_gateway(config);
    let lobbies = |gw: &wsgate::GatewayHandle| -> Vec<usize> {
        gw.lobbies(DEADLINE).iter().map(|l| l.clients).collect()
    };
    // Lobby 0: a stream and a WebSocket client; lobby 1: a stream.
    let first = SseFollower::spawn(sse_client(gw.local_addr(), "/", &[]));
    wait_placed(&gw, 1);
    let ws = connect_clients(&gw, 1).remove(0);
    let second = SseFollower::spawn(sse_client(gw.local_addr(), "/", &[]));
    wait_until("two lobbies", || lobbies(&gw) == [2, 1]);
    wait_until("two upstreams", || origin.open() == 2);
    let feed = Feed::start(origin.clone(), Duration::from_millis(10));
    wait_until("both streams fed", || {
        first.count() > 5 && second.count() > 5
    });
    // The WebSocket client goes: the two streams fit one lobby.
    drop(ws);
    wait_until("one lobby", || lobbies(&gw) == [2]);
    wait_until("one upstream", || origin.open() == 1);
    let before = (first.count(), second.count());
    wait_until("both streams fed after the move", || {
        first.count() > before.0 + 20 && second.count() > before.1 + 20
    });
    feed.stop();
    for (name, stream) in [("first", &first), ("second", &second)] {
        let got: Vec<String> = stream.events().into_iter().map(|e| e.data).collect();
        let numbers = assert_continuous(&got, |_| 0);
        assert!(numbers.len() > 30, "{name}: {numbers:?}");
    }
    assert!(gw.stats().migrations >= 1);
    assert_eq!(gw.stats().migration_gaps, 0);
}
