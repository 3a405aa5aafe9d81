//! permessage-deflate end to end: real origin, real gateway, raw clients
//! upgraded by hand (the frames read with the support helpers, compressed
//! payloads checked with flate2 directly, not with the gateway's code:
//! `support/deflate.rs`).
//!
//! Compressing and plain clients share one lobby and each get every message
//! in order, compressed exactly where it pays; the history replays the form
//! each client negotiated; compressed client messages are inflated and
//! forwarded; a decompression bomb is closed with 1009 without the gateway
//! inflating it; RSV1 without the negotiation is still a protocol error.
//! And a real browser: headless Chromium (skipped where it is not
//! installed, failed on CI) negotiates the extension and decodes what it
//! receives.

mod support;

use std::{io::Write, net::TcpStream, sync::Arc, time::Duration};

use support::*;
use tungstenite::Message;
use wsgate::ClientMessages;

/// What Chromium offers.
const OFFER: &str = "permessage-deflate; client_max_window_bits";
/// What the gateway answers.
const ANSWER: &str = "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n";
const RSV1: u8 = 0x40;

/// A 1 KiB price tick: repeated keys, varying numbers.
fn tick(seq: u64) -> String {
    let levels: Vec<String> = (0..12)
        .map(|i| {
            let price = 64_000.0 + (seq * 7 + i * 13) as f64 * 0.25;
            let qty = ((seq * 31 + i * 17) % 997) as f64 / 100.0;
            format!(
                "{{\"price\":{price:.2},\"qty\":{qty:.2},\"orders\":{}}}",
                (seq + i) % 9
            )
        })
        .collect();
    let mut tick = format!(
        "{{\"seq\":{seq},\"symbol\":\"BTC-USD\",\"ts\":{},\"levels\":[{}]}}",
        1_700_000_000_000 + seq,
        levels.join(",")
    );
    while tick.len() < 1024 {
        tick.push(' ');
    }
    tick
}

/// 400 bytes that deflate cannot shrink, starting with `seq`.
fn noise(seq: u64) -> Vec<u8> {
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut bytes = seq.to_be_bytes().to_vec();
    bytes.extend((0..392).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    bytes
}

/// Message number `n` of the mixed feed: small text (under `compress_min`),
/// a 1 KiB tick, or incompressible binary.
fn mixed(n: u64) -> Message {
    match n % 3 {
        0 => Message::text(format!("{{\"seq\":{n},\"hb\":1}}")),
        1 => Message::text(tick(n)),
        _ => Message::binary(noise(n)),
    }
}

/// Reads `n` data frames: (first byte, payload as the client sees it).
fn read_frames(stream: &mut TcpStream, n: usize) -> Vec<(u8, Vec<u8>)> {
    (0..n)
        .map(|_| read_server_frame_whole(stream).expect("a frame before the deadline"))
        .collect()
}

#[test]
fn compressed_and_plain_clients_share_a_lobby_and_get_every_message_in_order() {
    let origin = Arc::new(TestOrigin::start());
    let mut config = test_config(&origin.url());
    // The burst is read after it is sent: queues deep enough to drop none.
    config.queue_depth = 256;
    let gw = start_gateway(config);
    let (mut deflating, response) = raw_client_offering(gw.local_addr(), OFFER);
    assert!(response.contains(ANSWER), "{response}");
    let mut plain = raw_client(gw.local_addr());
    // A window smaller than the gateway's is declined: that client is plain.
    let (mut declined, response) = raw_client_offering(
        gw.local_addr(),
        "permessage-deflate; server_max_window_bits=10",
    );
    assert!(!response.contains("Extensions"), "{response}");
    wait_placed(&gw, 3);
    assert_eq!(gw.lobbies(DEADLINE).len(), 1, "one lobby for all three");
    wait_until("origin connection", || origin.open() == 1);

    const N: u64 = 60;
    for n in 0..N {
        origin.send(mixed(n));
    }
    let sent: Vec<Vec<u8>> = (0..N)
        .map(|n| match mixed(n) {
            Message::Text(t) => t.as_bytes().to_vec(),
            Message::Binary(b) => b.to_vec(),
            _ => unreachable!(),
        })
        .collect();
    for (n, (first, payload)) in read_frames(&mut deflating, N as usize)
        .into_iter()
        .enumerate()
    {
        let is_tick = n % 3 == 1;
        assert_eq!(first & RSV1 != 0, is_tick, "RSV1 on message {n}");
        let got = if is_tick {
            assert!(payload.len() * 3 < sent[n].len(), "a tick deflates well");
            inflate(&payload)
        } else {
            payload
        };
        assert_eq!(got, sent[n], "message {n}, in order, intact");
    }
    for client in [&mut plain, &mut declined] {
        for (n, (first, payload)) in read_frames(client, N as usize).into_iter().enumerate() {
            assert_eq!(first & 0x70, 0, "no RSV bit for a plain client ({n})");
            assert_eq!(payload, sent[n], "message {n}, in order, intact");
        }
    }
    // Compressed once per lobby, not per client; counted by form.
    let ticks = N / 3;
    wait_until("the deliveries counted", || {
        gw.stats().frames_delivered == 3 * N
    });
    let s = gw.stats();
    assert_eq!(s.messages_compressed, ticks);
    assert_eq!(s.frames_delivered_compressed, ticks);
    assert!(
        s.compress_bytes_out * 3 < s.compress_bytes_in,
        "{} → {}",
        s.compress_bytes_in,
        s.compress_bytes_out
    );
    gw.shutdown();
}

#[test]
fn replay_gives_each_client_the_form_it_negotiated() {
    let origin = Arc::new(TestOrigin::start());
    let mut config = test_config(&origin.url());
    config.replay = 4;
    let gw = start_gateway(config);
    let (mut first, _) = raw_client_offering(gw.local_addr(), OFFER);
    wait_placed(&gw, 1);
    wait_until("origin connection", || origin.open() == 1);
    for n in 1..=4 {
        origin.send(Message::text(tick(n)));
    }
    for (first_byte, payload) in read_frames(&mut first, 4) {
        assert_ne!(first_byte & RSV1, 0);
        assert!(inflate(&payload).starts_with(b"{\"seq\":"));
    }
    // Newcomers get the last four from the history, each in its own form,
    // then the live feed. The next message is sent once the replay has
    // arrived: a placed client can still be on its way into the lobby, and
    // a message sent before it joined would be in its replay instead.
    let (mut late_deflating, _) = raw_client_offering(gw.local_addr(), OFFER);
    let mut late_plain = raw_client(gw.local_addr());
    let mut replayed = read_frames(&mut late_deflating, 4);
    let mut replayed_plain = read_frames(&mut late_plain, 4);
    origin.send(Message::text(tick(5)));
    replayed.extend(read_frames(&mut late_deflating, 1));
    replayed_plain.extend(read_frames(&mut late_plain, 1));
    for (n, (first_byte, payload)) in (1..=5).zip(replayed) {
        assert_ne!(first_byte & RSV1, 0, "replayed {n} compressed");
        assert_eq!(inflate(&payload), tick(n).as_bytes(), "{n}");
    }
    for (n, (first_byte, payload)) in (1..=5).zip(replayed_plain) {
        assert_eq!(first_byte & RSV1, 0, "replayed {n} plain");
        assert_eq!(payload, tick(n).as_bytes(), "{n}");
    }
    gw.shutdown();
}

#[test]
fn compressed_client_messages_are_inflated_and_a_bomb_is_closed_with_1009() {
    let origin = Arc::new(TestOrigin::start());
    let mut config = test_config(&origin.url());
    config.client_messages = ClientMessages::Forward;
    config.allow_any_origin = true;
    config.max_client_message = 64 * 1024;
    let gw = start_gateway(config);
    let (mut client, _) = raw_client_offering(gw.local_addr(), OFFER);
    wait_placed(&gw, 1);
    wait_until("origin connection", || origin.open() == 1);

    // A compressed text message within the limit reaches the origin whole.
    let text = tick(7).repeat(8);
    client
        .write_all(&masked_frame(0xC1, &deflate(text.as_bytes())))
        .expect("send");
    wait_until("the inflated message at the origin", || {
        origin
            .events()
            .iter()
            .any(|e| matches!(e, OriginEvent::Received { text: t, .. } if *t == text))
    });

    // 64 MiB of zeros in under 64 KiB: within the limit on the wire, a
    // thousand times over it inflated.
    let bomb = deflate(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
    let peak = || {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .unwrap_or(0)
    };
    let before = peak();
    client.write_all(&masked_frame(0xC2, &bomb)).expect("send");
    assert_eq!(read_close_code(&mut client), Some(1009));
    // The process's peak memory did not grow by anything near the bomb's
    // 64 MiB (the writer inflates at most the limit).
    let grown_kib = peak().saturating_sub(before);
    assert!(grown_kib < 16 * 1024, "peak RSS grew {grown_kib} KiB");
    wait_until("the client gone", || gw.stats().clients == 0);
    gw.shutdown();
}

#[test]
fn rsv1_without_the_negotiation_is_a_protocol_error() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.compression = false;
    let gw = start_gateway(config);
    // Compression off: the offer is declined.
    let (mut client, response) = raw_client_offering(gw.local_addr(), OFFER);
    assert!(!response.contains("Extensions"), "{response}");
    client
        .write_all(&masked_frame(0xC1, &deflate(b"hello hello hello")))
        .expect("send");
    assert_eq!(read_close_code(&mut client), Some(1002));
    std::thread::sleep(Duration::from_millis(10));
    gw.shutdown();
}

#[test]
fn chromium_negotiates_and_decodes_the_compressed_messages() {
    let Some(chromium) = chromium() else {
        return;
    };
    let origin = Arc::new(TestOrigin::start());
    let mut config = test_config(&origin.url());
    // The page reports back through the gateway, to the origin.
    config.client_messages = ClientMessages::Forward;
    config.allow_any_origin = true;
    // On a loaded machine the lobby can queue the whole burst before the
    // writer runs: queues deep enough to drop none of it (with the default
    // 16, the page once missed the oldest frames and never sent a verdict).
    config.queue_depth = 64;
    let gw = start_gateway(config);
    const N: u64 = 20;
    let expected: Vec<String> = (1..=N).map(tick).collect();
    // The page checks, itself, the extension negotiated and that each
    // message is the JSON sent (parsed, and byte for byte), then sends its
    // verdict.
    let page = format!(
        r#"<!doctype html><title>wsgate compression</title><script>
const expected = {expected};
const ws = new WebSocket("ws://{addr}/");
let got = 0, same = 0, parsed = 0;
ws.onmessage = (e) => {{
  const i = got++;
  if (e.data === expected[i]) same++;
  try {{ if (JSON.parse(e.data).seq === JSON.parse(expected[i]).seq) parsed++; }} catch (_) {{}}
  if (got === expected.length) {{
    ws.send(JSON.stringify({{verdict: 1, extensions: ws.extensions, got, same, parsed}}));
  }}
}};
</script>"#,
        expected = serde_json_array(&expected),
        addr = gw.local_addr(),
    );
    // Served from loopback, as the gateway is: Chromium refuses a page
    // from elsewhere (a data: URL) access to a loopback address.
    let server = PageServer::start(page);
    let _browser = Browser::open(&chromium, &server.url());
    wait_placed(&gw, 1);
    wait_until("origin connection", || origin.open() == 1);
    for tick in &expected {
        origin.send(Message::text(tick.clone()));
    }
    let mut verdict = None;
    wait_until("the page's verdict at the origin", || {
        verdict = origin.events().into_iter().find_map(|e| match e {
            OriginEvent::Received { text, .. } if text.contains("\"verdict\"") => Some(text),
            _ => None,
        });
        verdict.is_some()
    });
    let verdict = verdict.unwrap_or_default();
    assert_eq!(
        verdict,
        format!(
            "{{\"verdict\":1,\"extensions\":\"permessage-deflate; server_no_context_takeover; \
             client_no_context_takeover\",\"got\":{N},\"same\":{N},\"parsed\":{N}}}"
        )
    );
    // What the page decoded went out compressed.
    let s = gw.stats();
    assert_eq!(s.frames_delivered_compressed, N, "{s:?}");
    assert_eq!(s.messages_compressed, N);
    gw.shutdown();
}

/// A one-page HTTP server on loopback, in a thread, until dropped.
struct PageServer {
    addr: std::net::SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PageServer {
    /// Serves `page` (HTML) for every request on a free loopback port.
    fn start(page: String) -> PageServer {
        use std::io::Read;
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("address");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut request = Vec::new();
                let mut byte = [0u8];
                while !request.ends_with(b"\r\n\r\n")
                    && stream.read(&mut byte).is_ok_and(|n| n == 1)
                {
                    request.push(byte[0]);
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = stream.write_all(response.as_bytes());
            }
        });
        PageServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `items` as a JSON array of strings (they hold no quote or backslash
/// that needs more than escaping `"`).
fn serde_json_array(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("[{}]", quoted.join(","))
}

#[test]
fn a_client_moved_by_compaction_keeps_its_compression() {
    let origin = Arc::new(TestOrigin::start());
    let mut config = test_config(&origin.url());
    config.lobby_capacity = 3;
    config.compact_interval = Duration::from_millis(300);
    let gw = start_gateway(config);
    let lobby_sizes = || -> Vec<usize> {
        let mut sizes: Vec<usize> = gw.lobbies(DEADLINE).iter().map(|l| l.clients).collect();
        sizes.sort_unstable();
        sizes
    };
    // Lobby one: a compressing client and two plain ones; lobby two: a
    // compressing client. The plain ones leave, and the two that are left
    // fit one lobby: one of them moves.
    let (mut first, _) = raw_client_offering(gw.local_addr(), OFFER);
    let plain: Vec<TcpStream> = (0..2).map(|_| raw_client(gw.local_addr())).collect();
    wait_placed(&gw, 3);
    let (mut second, _) = raw_client_offering(gw.local_addr(), OFFER);
    wait_until("two lobbies, 3 and 1", || lobby_sizes() == [1, 3]);
    drop(plain);
    wait_until("one lobby of two", || lobby_sizes() == [2]);
    assert_eq!(gw.stats().migrations, 1);
    wait_until("one origin connection", || origin.open() == 1);
    for n in 1..=5 {
        origin.send(Message::text(tick(n)));
    }
    for client in [&mut first, &mut second] {
        for (n, (first_byte, payload)) in (1..=5).zip(read_frames(client, 5)) {
            assert_ne!(first_byte & RSV1, 0, "tick {n} compressed");
            assert_eq!(inflate(&payload), tick(n).as_bytes());
        }
    }
    gw.shutdown();
}

#[test]
fn a_lobby_without_compressing_clients_compresses_nothing() {
    let origin = Arc::new(TestOrigin::start());
    let gw = start_gateway(test_config(&origin.url()));
    let mut plain = raw_client(gw.local_addr());
    wait_placed(&gw, 1);
    wait_until("origin connection", || origin.open() == 1);
    for n in 1..=5 {
        origin.send(Message::text(tick(n)));
    }
    for (first_byte, _) in read_frames(&mut plain, 5) {
        assert_eq!(first_byte & RSV1, 0);
    }
    assert_eq!(gw.stats().messages_compressed, 0);
    gw.shutdown();
}
