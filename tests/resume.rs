//! WebSocket resume end to end (feature `sse`, which carries message
//! IDs): a client that offers the `wsgate.resume.v1` subprotocol gets every
//! message in its envelope (`<16 hex digits> <payload>`) with the IDs an
//! event stream on the same lobby sees, resumes after the ID it hands back
//! in `last_event_id`, or gets the `reset` message then the live stream;
//! plain clients on the same lobby get their bytes as ever. Then
//! `examples/resume.js` in headless Chromium across a dropped connection.
//! Real sockets, the real test origin; counts and order, never speed.
#![cfg(feature = "sse")]

mod support;

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use support::*;
use tungstenite::Message;
use wsgate::{Disconnect, GatewayHandle};

/// The subprotocol that opts into resume.
const PROTOCOL: &str = "wsgate.resume.v1";

/// A WebSocket client at `target` offering `protocols`, and the
/// subprotocol the gateway answered, if any.
fn offering(addr: SocketAddr, target: &str, protocols: &[&str]) -> (Client, Option<String>) {
    let stream = TcpStream::connect(addr).expect("connect to gateway");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let uri: tungstenite::http::Uri = format!("ws://{addr}{target}").parse().expect("a URI");
    let mut request = tungstenite::ClientRequestBuilder::new(uri);
    for p in protocols {
        request = request.with_sub_protocol(*p);
    }
    let (ws, response) = tungstenite::client(request, stream).expect("upgrade");
    let answered = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().expect("ASCII").to_owned());
    (ws, answered)
}

/// A resume client at `/`, after `after` if given.
fn resume_client(addr: SocketAddr, after: Option<&str>) -> Client {
    let target = after.map_or_else(|| "/".to_owned(), |id| format!("/?last_event_id={id}"));
    let (ws, answered) = offering(addr, &target, &[PROTOCOL]);
    assert_eq!(answered.as_deref(), Some(PROTOCOL));
    ws
}

/// The next data message, as its opcode's kind and payload.
#[track_caller]
fn next_data(ws: &mut Client) -> Message {
    loop {
        match ws.read().expect("a message before the deadline") {
            m @ (Message::Text(_) | Message::Binary(_)) => return m,
            Message::Close(frame) => panic!("closed by the gateway: {frame:?}"),
            _ => {}
        }
    }
}

/// The next message in its envelope: its ID and its text.
#[track_caller]
fn next_sealed(ws: &mut Client) -> (String, String) {
    let Message::Text(text) = next_data(ws) else {
        panic!("a text message expected");
    };
    assert!(
        text.len() >= 17 && text.is_char_boundary(16),
        "not an envelope: {text:?}"
    );
    let (id, payload) = text.split_at(16);
    assert!(
        id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{text}"
    );
    let payload = payload.strip_prefix(' ').expect("a space after the ID");
    (id.to_owned(), payload.to_owned())
}

#[test]
fn a_plain_client_keeps_its_bytes_while_a_resume_client_gets_envelopes_with_the_sse_ids() {
    let origin = TestOrigin::start();
    let gw = start_gateway(test_config(&origin.url()));
    let addr = gw.local_addr();
    let mut plain = ws_client(addr);
    let mut sealed = resume_client(addr, None);
    let mut stream = sse_client(addr, "/", &[]);
    wait_placed(&gw, 3);
    wait_until("one origin connection", || origin.open() == 1);
    assert_eq!(gw.lobbies(DEADLINE).len(), 1, "one lobby for all three");
    for n in 1..=5 {
        origin.send_seq(n);
    }
    origin.send(Message::binary(vec![0u8, 1, 2, 0xff]));
    for n in 1..=5 {
        assert_eq!(next_data(&mut plain), Message::text(n.to_string()), "plain");
        let (id, text) = next_sealed(&mut sealed);
        assert_eq!(text, n.to_string(), "in its envelope");
        let (data, sse_id) = stream.message();
        assert_eq!(data, n.to_string());
        assert_eq!(id, sse_id, "the ID an event stream sees");
    }
    assert_eq!(
        next_data(&mut plain),
        Message::binary(vec![0u8, 1, 2, 0xff])
    );
    let Message::Binary(bytes) = next_data(&mut sealed) else {
        panic!("binary stays binary");
    };
    let id = stream.event().id.expect("an id");
    assert_eq!(&bytes[..17], format!("{id} ").as_bytes());
    assert_eq!(&bytes[17..], &[0u8, 1, 2, 0xff]);
    assert_eq!(gw.stats().frames_dropped, 0);
}

#[test]
fn a_resume_client_back_with_its_last_id_gets_exactly_what_it_missed_then_live() {
    let (origin, gw, _ws) = gateway_with_a_lobby(|_| {});
    let addr = gw.local_addr();
    let mut first = resume_client(addr, None);
    wait_placed(&gw, 2);
    for n in 1..=10 {
        origin.send_seq(n);
    }
    // It reads five of them, then its connection drops.
    let mut last = String::new();
    for n in 1..=5 {
        let (id, text) = next_sealed(&mut first);
        assert_eq!(text, n.to_string());
        last = id;
    }
    drop(first);
    wait_clients(&gw, 1);
    for n in 11..=15 {
        origin.send_seq(n);
    }
    let mut back = resume_client(addr, Some(&last));
    for n in 6..=15 {
        assert_eq!(next_sealed(&mut back).1, n.to_string(), "from the history");
    }
    origin.send_seq(16);
    assert_eq!(next_sealed(&mut back).1, "16", "then live");
    let stats = gw.stats();
    assert_eq!((stats.resumes, stats.resume_resets), (1, 0));
}

/// What the gateway answers an offer of permessage-deflate with.
#[cfg(feature = "compression")]
const DEFLATE_ANSWER: &str = "Sec-WebSocket-Extensions: permessage-deflate; \
    server_no_context_takeover; client_no_context_takeover\r\n";

/// A raw resume client at `target` offering permessage-deflate as Chromium
/// does, the extension answered.
#[cfg(feature = "compression")]
fn deflating_resume_client(addr: SocketAddr, target: &str) -> TcpStream {
    let (stream, head) = upgrade_with(
        addr,
        target,
        &format!(
            "Sec-WebSocket-Protocol: {PROTOCOL}\r\n\
             Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        ),
    );
    assert_eq!(status_of(&head), 101, "{head}");
    assert!(
        head.contains(&format!("Sec-WebSocket-Protocol: {PROTOCOL}\r\n")),
        "{head}"
    );
    assert!(head.contains(DEFLATE_ANSWER), "{head}");
    stream
}

/// The next message a raw client reads: whether it came compressed (RSV1),
/// and its payload as the client sees it (inflated with flate2 if so).
#[cfg(feature = "compression")]
#[track_caller]
fn next_inflated(stream: &mut TcpStream) -> (bool, String) {
    let (first, payload) = read_server_frame_whole(stream).expect("a frame before the deadline");
    assert_eq!(first & 0x0F, 0x1, "a text frame: {first:#x}");
    let compressed = first & 0x40 != 0;
    let payload = if compressed {
        inflate(&payload)
    } else {
        payload
    };
    (compressed, String::from_utf8(payload).expect("UTF-8"))
}

/// Message `n` of a compressible feed: a price tick of about 700 bytes
/// (past `--compress-min`) for most, a short one (under it) every third.
#[cfg(feature = "compression")]
fn tick(n: u64) -> String {
    if n % 3 == 0 {
        return format!("{{\"seq\":{n}}}");
    }
    let level = |i: u64| format!("{{\"price\":{}.25,\"qty\":{}.5}}", 64_000 + n + i, i % 7);
    let levels: Vec<String> = (0..20).map(level).collect();
    format!("{{\"seq\":{n},\"levels\":[{}]}}", levels.join(","))
}

#[cfg(feature = "compression")]
#[test]
fn a_resume_client_taking_deflate_gets_compressed_envelopes_and_resumes_from_the_history() {
    let (origin, gw, _ws) = gateway_with_a_lobby(|_| {});
    let addr = gw.local_addr();
    // Beside the plain client: a resume client that does not offer
    // compression (the envelopes and IDs to compare with), and one that does.
    let mut sealed = resume_client(addr, None);
    let mut packed = deflating_resume_client(addr, "/");
    wait_placed(&gw, 3);
    let send = |n: u64| origin.send(Message::text(tick(n)));
    for n in 1..=10 {
        send(n);
    }
    // The same envelope, with the same ID, compressed where the message is
    // long enough (the lobby compressed the envelope, once), not where it
    // is under --compress-min.
    let mut envelopes = Vec::new();
    for n in 1..=10 {
        let (id, text) = next_sealed(&mut sealed);
        assert_eq!(text, tick(n), "in order");
        envelopes.push(format!("{id} {text}"));
    }
    let mut last = String::new();
    for n in 1..=5 {
        let (compressed, envelope) = next_inflated(&mut packed);
        assert_eq!(compressed, n % 3 != 0, "RSV1 on message {n}");
        assert_eq!(envelope, envelopes[n as usize - 1], "message {n}");
        last = envelope[..16].to_owned();
    }
    // Its connection drops after five; five more arrive, then five while
    // it is away. Back with its last ID: exactly what it missed, from the
    // history (compressed or not: the lobby compressed envelopes only while
    // a resume client that takes them was there), then live.
    drop(packed);
    wait_clients(&gw, 2);
    for n in 11..=15 {
        send(n);
    }
    for n in 11..=15 {
        let (id, text) = next_sealed(&mut sealed);
        assert_eq!(text, tick(n), "in order");
        envelopes.push(format!("{id} {text}"));
    }
    let mut back = deflating_resume_client(addr, &format!("/?last_event_id={last}"));
    for n in 6..=15 {
        let (compressed, envelope) = next_inflated(&mut back);
        assert!(
            !compressed || n % 3 != 0,
            "message {n} is too short to compress"
        );
        assert_eq!(
            envelope,
            envelopes[n as usize - 1],
            "message {n}, from the history"
        );
    }
    wait_placed(&gw, 3);
    send(16);
    let (id, text) = next_sealed(&mut sealed);
    let (compressed, envelope) = next_inflated(&mut back);
    assert!(compressed, "live, compressed again");
    assert_eq!(envelope, format!("{id} {text}"));
    assert_eq!(text, tick(16));
    let stats = gw.stats();
    assert_eq!((stats.resumes, stats.resume_resets), (1, 0));
    // None lost to a full queue. (Frames the dropped connection had queued
    // but not yet been written are counted `departed`, as many as the
    // writer had not reached when it saw the close: a CI run had one.)
    assert_eq!(
        stats.dropped(wsgate::DropReason::SlowClient)
            + stats.dropped(wsgate::DropReason::WriterBehind),
        0
    );
    assert!(stats.messages_compressed >= 4, "{stats:?}");
}

#[test]
fn a_slow_resume_client_is_closed_rather_than_thinned_and_resumes_with_nothing_lost() {
    // The close waits for what is queued as long as the test may take;
    // the history holds every message (each in two forms).
    let (origin, gw, ws) = gateway_with_a_lobby(|c| {
        c.queue_depth = 4;
        c.drain_timeout = DEADLINE;
        c.history_bytes = 4 << 20;
    });
    let addr = gw.local_addr();
    // A resume client that stops reading, into a small receive buffer.
    let stream = connect_from(addr, [127, 0, 0, 1], 4096);
    let uri: tungstenite::http::Uri = format!("ws://{addr}/").parse().expect("a URI");
    let request = tungstenite::ClientRequestBuilder::new(uri).with_sub_protocol(PROTOCOL);
    let (mut slow, _) = tungstenite::client(request, stream).expect("upgrade");
    wait_placed(&gw, 2);
    const N: u64 = 100;
    let pad = "x".repeat(8000);
    for n in 1..=N {
        origin.send(Message::text(format!("{n} {pad}")));
        wait_until("the plain client to keep up", || ws.count() as u64 >= n);
    }
    // Its queue overflowed long ago: what it was sent arrives in order,
    // then the 1013 close.
    let mut got = Vec::new();
    let mut last = String::new();
    let close = loop {
        match slow.read().expect("a message or the close") {
            Message::Text(text) => {
                let (id, payload) = text.split_at(16);
                last = id.to_owned();
                got.push(
                    payload
                        .trim_start()
                        .split(' ')
                        .next()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
            Message::Close(frame) => {
                // Answer it, so the gateway can let the connection go.
                let _ = slow.flush();
                break frame.expect("a close code");
            }
            _ => {}
        }
    };
    assert_eq!(u16::from(close.code), 1013, "{close:?}");
    assert!(got.len() < N as usize, "it fell behind: {}", got.len());
    wait_until("the slow resume client counted", || {
        gw.stats().disconnected(Disconnect::TooSlow) == 1
    });
    let mut back = resume_client(addr, Some(&last));
    while got.len() < N as usize {
        let (_, payload) = next_sealed(&mut back);
        got.push(payload.split(' ').next().unwrap_or_default().to_owned());
    }
    let want: Vec<String> = (1..=N).map(|n| n.to_string()).collect();
    assert_eq!(got, want, "every message once, in order, across the close");
    assert_eq!(ws.count() as u64, N, "the plain client lost nothing");
    let stats = gw.stats();
    assert_eq!((stats.resumes, stats.resume_resets), (1, 0));
}

/// A gateway whose only lobby lingers as long as a test may take, after
/// its one resume client read message 1 (whose ID is returned) and left.
fn a_lobby_emptied_after_message_1() -> (TestOrigin, GatewayHandle, String) {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.lobby_linger = DEADLINE;
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    let mut first = resume_client(addr, None);
    wait_until("the upstream", || origin.open() == 1);
    wait_placed(&gw, 1);
    origin.send_seq(1);
    let (last, text) = next_sealed(&mut first);
    assert_eq!(text, "1");
    drop(first);
    wait_clients(&gw, 0);
    (origin, gw, last)
}

#[test]
fn a_client_back_to_its_emptied_lobby_within_the_linger_loses_nothing() {
    let (origin, gw, last) = a_lobby_emptied_after_message_1();
    let addr = gw.local_addr();
    // The lingering lobby still reads its origin.
    assert_eq!(
        origin.send_seq(2),
        1,
        "the emptied lobby keeps its upstream"
    );
    let mut back = resume_client(addr, Some(&last));
    assert_eq!(
        next_sealed(&mut back).1,
        "2",
        "what it missed, from the history"
    );
    wait_placed(&gw, 1);
    origin.send_seq(3);
    assert_eq!(next_sealed(&mut back).1, "3", "then live");
    assert_eq!(origin.accepted(), 1, "one upstream all along");
    let stats = gw.stats();
    assert_eq!((stats.resumes, stats.resume_resets), (1, 0));
}

#[test]
fn a_resume_across_its_lobby_losing_the_origin_gets_the_reset() {
    let (origin, gw, last) = a_lobby_emptied_after_message_1();
    let addr = gw.local_addr();
    // The origin goes away and comes back: what it sent meanwhile (here,
    // perhaps nothing) the lobby cannot know.
    let (origin_addr, counts) = origin.kill();
    let origin = TestOrigin::start_on(origin_addr, counts, OriginOptions::default());
    wait_until("the lobby to reconnect", || origin.open() == 1);
    origin.send_seq(2);
    let mut back = resume_client(addr, Some(&last));
    assert_eq!(
        next_data(&mut back),
        Message::text("reset"),
        "the lobby's stream has a hole after message 1: not a silent gap"
    );
    wait_placed(&gw, 1);
    origin.send_seq(3);
    // Then live: message 2 too if it reached the lobby after the client
    // (its reset puts it at the live edge), then 3.
    let mut live = vec![next_sealed(&mut back).1];
    if live[0] == "2" {
        live.push(next_sealed(&mut back).1);
    }
    assert!(
        live == ["3"] || live == ["2", "3"],
        "live after the reset: {live:?}"
    );
    let stats = gw.stats();
    assert_eq!((stats.resumes, stats.resume_resets), (0, 1));
}

#[test]
fn an_unknown_or_too_old_id_gets_the_reset_message_then_live_and_is_counted() {
    let (origin, gw, ws) = gateway_with_a_lobby(|c| c.history = 64);
    let addr = gw.local_addr();
    origin.send_seq(1);
    wait_until("the lobby to have a message", || ws.count() == 1);
    let mut unknown = resume_client(addr, Some("00000000deadbeef"));
    assert_eq!(next_data(&mut unknown), Message::text("reset"));
    wait_placed(&gw, 2);
    origin.send_seq(2);
    assert_eq!(next_sealed(&mut unknown).1, "2", "live after the reset");
    assert_eq!(gw.stats().resume_resets, 1);
    // An ID the lobby had, and forgot: its history holds 64 messages here.
    origin.send_seq(3);
    let (old, text) = next_sealed(&mut unknown);
    assert_eq!(text, "3");
    drop(unknown);
    for n in 4..=100 {
        origin.send_seq(n);
        wait_until("the plain client to keep up", || ws.count() as u64 >= n);
    }
    let mut too_old = resume_client(addr, Some(&old));
    assert_eq!(next_data(&mut too_old), Message::text("reset"));
    wait_placed(&gw, 2);
    origin.send_seq(101);
    assert_eq!(next_sealed(&mut too_old).1, "101", "live after the reset");
    let stats = gw.stats();
    assert_eq!((stats.resumes, stats.resume_resets), (0, 2));
}

#[test]
fn resume_clients_move_between_lobbies_with_compaction_and_keep_their_envelopes() {
    let origin = Arc::new(TestOrigin::start());
    let mut config = test_config(&origin.url());
    config.lobby_capacity = 2;
    config.compact_interval = Duration::from_millis(300);
    config.compact_fill = 1.0;
    // A busy box's writer may fall behind for a while: not what this tests.
    config.queue_depth = 512;
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    let lobbies = |gw: &wsgate::GatewayHandle| -> Vec<usize> {
        gw.lobbies(DEADLINE).iter().map(|l| l.clients).collect()
    };
    // Lobby 0: a resume client and a plain one; lobby 1: a resume client.
    let first = Follower::spawn(resume_client(addr, None));
    wait_placed(&gw, 1);
    let plain = connect_clients(&gw, 1).remove(0);
    let second = Follower::spawn(resume_client(addr, None));
    wait_until("two lobbies", || lobbies(&gw) == [2, 1]);
    wait_until("two upstreams", || origin.open() == 2);
    let feed = Feed::start(origin.clone(), Duration::from_millis(10));
    wait_until("both fed", || first.count() > 5 && second.count() > 5);
    // The plain client goes: the two resume clients fit one lobby.
    drop(plain);
    wait_until("one lobby", || lobbies(&gw) == [2]);
    wait_until("one upstream", || origin.open() == 1);
    let before = (first.count(), second.count());
    wait_until("both fed after the move", || {
        first.count() > before.0 + 20 && second.count() > before.1 + 20
    });
    feed.stop();
    for (name, client) in [("first", first), ("second", second)] {
        let mut ids = Vec::new();
        let payloads: Vec<String> = client
            .finish_timed()
            .into_iter()
            .map(|(_, text)| {
                let (id, payload) = text
                    .split_once(' ')
                    .unwrap_or_else(|| panic!("{name}: not an envelope: {text:?}"));
                assert_eq!(id.len(), 16, "{name}: {text:?}");
                ids.push(id.to_owned());
                payload.to_owned()
            })
            .collect();
        let numbers = assert_continuous(&payloads, |_| 0);
        assert!(numbers.len() > 30, "{name}: {numbers:?}");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), payloads.len(), "{name}: an ID each");
    }
    assert!(gw.stats().migrations >= 1);
    assert_eq!(gw.stats().migration_gaps, 0);
}

#[cfg(feature = "auth")]
#[test]
fn the_resume_subprotocol_is_answered_and_a_token_beside_it_never_is() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.auth.jwt_secret_file = Some(secret_file("resume"));
    config.subprotocols = vec!["feed.v1".into()];
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    let token = mint(jsonwebtoken::Algorithm::HS256, &claims_for(600), None);
    let bearer = format!("bearer.{token}");
    let (_ws, answered) = offering(addr, "/", &[&bearer, PROTOCOL]);
    assert_eq!(
        answered.as_deref(),
        Some(PROTOCOL),
        "the token is not answered"
    );
    let (_ws, answered) = offering(addr, "/", &["feed.v1", &bearer, PROTOCOL]);
    assert_eq!(
        answered.as_deref(),
        Some(PROTOCOL),
        "in place of the route's"
    );
    let (_ws, answered) = offering(addr, "/", &["feed.v1", &bearer]);
    assert_eq!(answered.as_deref(), Some("feed.v1"), "without it, as ever");
    // The raw answer: one subprotocol line, naming it.
    let (_stream, head) = upgrade_with(
        addr,
        "/",
        &format!("Sec-WebSocket-Protocol: {bearer}, {PROTOCOL}\r\n"),
    );
    assert_eq!(status_of(&head), 101, "{head}");
    let signature = token.rsplit('.').next().expect("a signature");
    assert!(!head.contains(signature), "{head}");
    let lines: Vec<&str> = head
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("sec-websocket-protocol"))
        .collect();
    assert_eq!(lines, [format!("Sec-WebSocket-Protocol: {PROTOCOL}")]);
}

/// `examples/resume.js`, in a page that reports each message it is handed
/// (all of them so far, in order), each (re)connection and each reset.
fn page(ws_url: &str) -> String {
    format!(
        r#"<!doctype html><title>wsgate resume</title><script>{}</script><script>
const got = [];
let opens = 0;
function report(event) {{
  const q = new URLSearchParams({{ way: "resume", event, got: got.join("_") }});
  fetch("/report?" + q, {{ cache: "no-store" }});
}}
wsgateResume("{ws_url}", {{
  onOpen() {{ opens += 1; report("open-" + opens); }},
  onReset() {{ report("reset"); }},
  onMessage(data) {{ got.push(data); report("got-" + got.length); }},
}});
</script>"#,
        include_str!("../examples/resume.js")
    )
}

/// A TCP relay on loopback in front of the gateway: what a network between
/// a browser and the gateway can do to a connection, on demand. It cuts
/// every connection it carries ([`Relay::cut`]), and then holds new ones
/// unanswered until let through ([`Relay::let_through`]).
struct Relay {
    addr: SocketAddr,
    held: Arc<AtomicBool>,
    carried: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(to: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("address");
        let held = Arc::new(AtomicBool::new(false));
        let carried: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (h, c, s) = (Arc::clone(&held), Arc::clone(&carried), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let mut waiting = Vec::new();
            while !s.load(Ordering::SeqCst) {
                if let Ok((client, _)) = listener.accept() {
                    waiting.push(client);
                }
                if !h.load(Ordering::SeqCst) {
                    for client in waiting.drain(..) {
                        if let Ok(pair) = Relay::carry(client, to) {
                            c.lock().expect("relay lock").extend(pair);
                        }
                    }
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
        Relay {
            addr,
            held,
            carried,
            stop,
            thread: Some(thread),
        }
    }

    /// Copies both ways between `client` and a new connection to `to`;
    /// the two sockets, to cut them.
    fn carry(client: TcpStream, to: SocketAddr) -> io::Result<[TcpStream; 2]> {
        client.set_nonblocking(false)?;
        let upstream = TcpStream::connect(to)?;
        for (mut from, mut into) in [
            (client.try_clone()?, upstream.try_clone()?),
            (upstream.try_clone()?, client.try_clone()?),
        ] {
            thread::spawn(move || {
                let _ = io::copy(&mut from, &mut into);
                let _ = into.shutdown(Shutdown::Write);
            });
        }
        Ok([client, upstream])
    }

    /// Drops every connection carried, at once, and holds new ones.
    fn cut(&self) {
        self.held.store(true, Ordering::SeqCst);
        for socket in self.carried.lock().expect("relay lock").drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }

    /// Carries the connections held, and new ones, to the gateway.
    fn let_through(&self) {
        self.held.store(false, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The page's messages so far, from a report.
fn got(report: &Report) -> Vec<String> {
    report.get("got").split('_').map(str::to_owned).collect()
}

#[test]
fn the_example_client_in_chromium_resumes_across_a_dropped_connection() {
    let Some(chromium) = chromium() else {
        return;
    };
    let (origin, gw, ws) = gateway_with_a_lobby(|_| {});
    let relay = Relay::start(gw.local_addr());
    let pages = Pages::start(vec![("/", page(&format!("ws://{}/", relay.addr)))]);
    let _browser = Browser::open(&chromium, &pages.url("/"));
    pages.wait_for("resume", "open-1");
    wait_placed(&gw, 2);
    for n in 1..=10 {
        origin.send_seq(n);
    }
    let before = pages.wait_for("resume", "got-10");
    // The connection drops; what is sent meanwhile waits in the history
    // (the plain client holds the lobby open), and the page, reconnecting
    // with backoff, is held until all of it is there.
    relay.cut();
    wait_clients(&gw, 1);
    for n in 11..=20 {
        origin.send_seq(n);
    }
    wait_until("the history to hold 20", || ws.count() == 20);
    relay.let_through();
    pages.wait_for("resume", "open-2");
    wait_placed(&gw, 2);
    for n in 21..=30 {
        origin.send_seq(n);
    }
    let after = pages.wait_for("resume", "got-30");
    let want: Vec<String> = (1..=30).map(|n| n.to_string()).collect();
    assert_eq!(got(&before), want[..10]);
    assert_eq!(got(&after), want, "every message once, in order");
    assert!(
        !pages.reports().iter().any(|r| r.is("resume", "reset")),
        "{:?}",
        pages.reports()
    );
    let stats = gw.stats();
    assert_eq!((stats.resumes, stats.resume_resets), (1, 0));
}
