//! A public-facing gateway under bad input: admission limits, protocol
//! violations, floods, dead peers, slow clients, stalled handshakes; and the
//! forwarding of client messages upstream.

mod support;

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use support::*;
use tungstenite::Message;
use wsgate::{ClientMessages, Disconnect, DropReason, SlowClient};

const UPGRADE: &str = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

fn upgrade_with(extra: &str) -> String {
    format!("{UPGRADE}{extra}\r\n")
}

/// A raw upgrade from a given loopback source address.
fn raw_from(source: [u8; 4], gw: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
    socket.connect(&gw.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(upgrade_with("").as_bytes()).unwrap();
    stream
}

fn status_line(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).trim().to_owned()
}

#[test]
fn the_client_limit_answers_503() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.max_clients = 2;
    let gw = start_gateway(config);
    let _clients = connect_clients(&gw, 2);
    let response = http_exchange(gw.local_addr(), &upgrade_with(""));
    assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
    assert!(response.contains("Retry-After:"));
    assert_eq!(gw.stats().refused_full, 1);
}

#[test]
fn the_per_address_limit_answers_429_and_frees_up() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.max_clients_per_ip = 2;
    let gw = start_gateway(config);
    let mut a = raw_from([127, 0, 0, 1], gw.local_addr());
    let mut b = raw_from([127, 0, 0, 1], gw.local_addr());
    assert!(status_line(&mut a).contains(" 101 "));
    assert!(status_line(&mut b).contains(" 101 "));
    let mut c = raw_from([127, 0, 0, 1], gw.local_addr());
    assert!(status_line(&mut c).starts_with("HTTP/1.1 429 "));
    let mut other = raw_from([127, 0, 0, 2], gw.local_addr());
    assert!(
        status_line(&mut other).contains(" 101 "),
        "another address is not limited"
    );
    assert_eq!(gw.stats().refused_per_ip, 1);
    drop(a);
    wait_clients(&gw, 2);
    let mut d = raw_from([127, 0, 0, 1], gw.local_addr());
    assert!(status_line(&mut d).contains(" 101 "), "a place was freed");
}

#[test]
fn origins_off_the_allow_list_get_403() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.allowed_origins = vec!["https://app.example".into()];
    let gw = start_gateway(config);
    let evil = http_exchange(
        gw.local_addr(),
        &upgrade_with("Origin: https://evil.example\r\n"),
    );
    assert!(evil.starts_with("HTTP/1.1 403 "), "{evil}");
    let mut good = TcpStream::connect(gw.local_addr()).unwrap();
    good.set_read_timeout(Some(DEADLINE)).unwrap();
    good.write_all(upgrade_with("Origin: https://app.example\r\n").as_bytes())
        .unwrap();
    assert!(status_line(&mut good).contains(" 101 "));
    assert_eq!(gw.stats().refused_origin, 1);
}

#[test]
fn each_bad_request_gets_its_status() {
    let origin = TestOrigin::start();
    let gw = start_gateway(test_config(&origin.url()));
    let cases = [
        (UPGRADE.replace("GET", "POST") + "\r\n", "405"),
        (
            upgrade_with("").replace("Version: 13", "Version: 12"),
            "426",
        ),
        (
            upgrade_with(&format!("X-Pad: {}\r\n", "p".repeat(9000))),
            "431",
        ),
        ("GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), "426"),
    ];
    for (request, status) in cases {
        let response = http_exchange(gw.local_addr(), &request);
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status} ")),
            "{response}"
        );
    }
    assert_eq!(gw.stats().handshakes_rejected, 4);
}

#[test]
fn each_bad_frame_gets_its_close_code() {
    let origin = TestOrigin::start();
    let gw = start_gateway(test_config(&origin.url()));
    let cases: [(Vec<u8>, u16); 6] = [
        (masked_frame(0x81, &[0xC3, 0x28]), 1007), // invalid UTF-8
        (masked_frame(0xC1, b"rsv"), 1002),        // reserved bit
        (masked_frame(0x83, b"op"), 1002),         // unknown opcode
        (masked_frame(0x09, b"frag"), 1002),       // fragmented ping
        (masked_frame(0x89, &[0u8; 126]), 1002),   // oversized ping
        (masked_frame(0x82, &vec![0u8; 64 * 1024 + 1]), 1009), // oversized message
    ];
    for (frame, code) in &cases {
        let mut raw = raw_client(gw.local_addr());
        raw.write_all(frame).unwrap();
        assert_eq!(read_close_code(&mut raw), Some(*code), "{:x?}", &frame[..2]);
    }
    wait_until("every violation counted", || {
        let stats = gw.stats();
        stats.disconnected(Disconnect::ProtocolError) == 4
            && stats.disconnected(Disconnect::InvalidUtf8) == 1
            && stats.disconnected(Disconnect::TooBig) == 1
    });
}

#[test]
fn a_flooding_client_is_closed_with_1008() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.max_client_rate = 50;
    let gw = start_gateway(config);
    let mut calm = connect_clients(&gw, 1).remove(0);
    let mut raw = raw_client(gw.local_addr());
    let flood: Vec<u8> = (0..200).flat_map(|_| masked_frame(0x81, b"spam")).collect();
    raw.write_all(&flood).unwrap();
    assert_eq!(read_close_code(&mut raw), Some(1008));
    drop(raw);
    wait_until("the flooder counted", || {
        gw.stats().disconnected(Disconnect::RateLimited) == 1
    });
    // The others are not affected.
    wait_until("origin connection", || origin.open() == 1);
    origin.send_seq(1);
    assert_eq!(recv_text(&mut calm), "1");
}

#[test]
fn a_client_flooding_its_writer_does_not_starve_the_writers_other_clients() {
    const N: u64 = 50;
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    // One writer serves both clients, and the flood is not rate limited:
    // only the writer's cap on reads per client per wake-up (4 of 64 KiB)
    // lets it turn from the flooder to the other.
    config.writers = 1;
    config.max_client_rate = 0;
    let gw = start_gateway(config);
    let mut reader = connect_clients(&gw, 1).remove(0);
    let mut flooder = raw_client(gw.local_addr());
    wait_placed(&gw, 2);
    wait_until("origin connection", || origin.open() == 1);

    // Tiny frames, each decoded on its own, arrive faster than the writer
    // takes them: its socket always has more to read. (Stopped before the
    // gateway is dropped, also on a failure: a writer it held would never
    // end its drain.)
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let sent = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (stop, sent) = (stop.0.clone(), sent.clone());
        flooder
            .set_write_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        std::thread::spawn(move || {
            let chunk: Vec<u8> = (0..8192).flat_map(|_| masked_frame(0x82, b"xx")).collect();
            let mut at = 0;
            while !stop.load(Ordering::SeqCst) {
                match flooder.write(&chunk[at..]) {
                    Ok(n) => {
                        at = (at + n) % chunk.len();
                        sent.fetch_add(n, Ordering::SeqCst);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(flooder)
        })
    };
    wait_until("the flood under way", || {
        sent.load(Ordering::SeqCst) >= 4 << 20
    });

    // Each message reaches the other client before the next is sent: the
    // flood never holds the writer for the whole read deadline.
    let flooded = sent.load(Ordering::SeqCst);
    let start = std::time::Instant::now();
    for n in 1..=N {
        origin.send_seq(n);
        assert_eq!(recv_text(&mut reader), n.to_string());
    }
    let took = start.elapsed();
    let during = sent.load(Ordering::SeqCst) - flooded;
    drop(stop);
    let flooder = flood
        .join()
        .expect("flood thread")
        .expect("the gateway took the flood without closing the flooder");
    eprintln!("{N} messages in {took:?} while the flooder sent {during} bytes");
    assert!(during > 0, "the flood went on while the messages went out");
    assert_eq!(gw.stats().clients, 2, "both clients still connected");
    assert_eq!(gw.stats().disconnected(Disconnect::RateLimited), 0);
    drop(flooder);
}

/// Raises its flag when dropped, so a thread that polls the flag ends
/// with the test, whether it passes or fails.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[test]
fn silent_clients_are_pinged_then_closed_while_live_ones_stay() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.client_ping = Duration::from_millis(300);
    let gw = start_gateway(config);
    // tungstenite answers pings while it reads; the raw client never does.
    let live = Reader::spawn(connect_clients(&gw, 1).remove(0));
    let mut silent = raw_client(gw.local_addr());
    wait_clients(&gw, 2);
    let (opcode, _) = read_server_frame(&mut silent).unwrap();
    assert_eq!(opcode, 0x9, "a ping first");
    assert_eq!(read_close_code(&mut silent), Some(1001));
    wait_until("the silent client gone", || gw.stats().clients == 1);
    assert_eq!(gw.stats().disconnected(Disconnect::Silent), 1);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(gw.stats().clients, 1, "the live client stays");
    live.finish();
}

#[test]
fn the_disconnect_policy_closes_a_stalled_client_with_1013() {
    const N: u64 = 400;
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.queue_depth = 4;
    config.slow_client = SlowClient::Disconnect;
    config.slow_client_drops = 10;
    // Its 1013 waits behind what its socket holds until it reads, after the
    // sending below, however long a loaded machine takes for that.
    config.drain_timeout = Duration::from_secs(60);
    let gw = start_gateway(config);
    let mut stalled = ws_client(gw.local_addr());
    wait_placed(&gw, 1);
    let mut fast = connect_clients(&gw, 2);
    wait_until("origin connection", || origin.open() == 1);
    let payload = |n: u64| {
        let mut p = format!("{n:08}").into_bytes();
        p.resize(32 * 1024, b'.');
        Message::binary(p)
    };
    for n in 1..=N {
        origin.send(payload(n));
        for client in &mut fast {
            let m = client.read().unwrap().into_data();
            assert_eq!(
                &m[..8],
                format!("{n:08}").as_bytes(),
                "fast clients see every message"
            );
        }
    }
    // Reading now, it drains what its socket held, then finds the 1013.
    let close = recv_close(&mut stalled).expect("a close frame");
    assert_eq!(u16::from(close.code), 1013);
    drop(stalled);
    wait_clients(&gw, 2);
    assert_eq!(gw.stats().disconnected(Disconnect::TooSlow), 1);
}

#[test]
fn a_burst_longer_than_the_queue_is_the_gateways_loss_not_the_reading_clients() {
    const BURSTS: u64 = 40;
    const BURST: u64 = 50;
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.queue_depth = 2;
    config.slow_client = SlowClient::Disconnect;
    config.slow_client_drops = 10;
    // The stalled client's 1013 waits until it reads, after the bursts.
    config.drain_timeout = Duration::from_secs(60);
    let gw = start_gateway(config);
    let reader = ws_client(gw.local_addr());
    let mut stalled = stalled_client(gw.local_addr());
    wait_placed(&gw, 2);
    wait_until("origin connection", || origin.open() == 1);

    let last = BURSTS * BURST;
    let reading = std::thread::spawn(move || {
        let mut reader = reader;
        let mut got = Vec::new();
        while got.last() != Some(&last) {
            got.push(number(reader.read().expect("read")));
        }
        (reader, got)
    });
    for burst in 0..BURSTS {
        for n in 1..=BURST {
            origin.send(numbered(burst * BURST + n, 1024));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The reader gets the newest of every burst, in order, and stays.
    let (_reader, got) = reading.join().expect("reader");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
    // The never-reading client's losses are its own once its socket is full.
    assert_eq!(read_close_code(&mut stalled), Some(1013));
    drop(stalled);
    wait_clients(&gw, 1);
    let stats = gw.stats();
    assert_eq!(
        stats.disconnected(Disconnect::TooSlow),
        1,
        "only the stalled one"
    );
    assert!(stats.dropped(DropReason::SlowClient) > 10, "{stats:?}");
    // The reader's were the writer's: bursts of 50 into a queue of 2.
    assert!(
        stats.dropped(DropReason::WriterBehind) > 0,
        "{} of {last} reached the reader and nothing was the writer's loss",
        got.len()
    );
}

#[test]
fn forwarded_client_messages_reach_the_origin() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.client_messages = ClientMessages::Forward;
    config.allow_any_origin = true;
    let gw = start_gateway(config);
    let mut client = connect_clients(&gw, 1).remove(0);
    // Up on the gateway's side too: a message for an origin still being
    // connected is dropped, not held.
    wait_until("origin connection", || gw.stats().origin_connections == 1);
    client.send(Message::text("subscribe ETH")).unwrap();
    client.send(Message::text("x".repeat(70_000))).unwrap();
    wait_until("the message upstream", || {
        origin
            .events()
            .iter()
            .any(|e| matches!(e, OriginEvent::Received { text, .. } if text == "subscribe ETH"))
    });
    assert_eq!(
        read_close_code_ws(&mut client),
        Some(1009),
        "forwarding obeys the size limit"
    );
    assert_eq!(gw.stats().forwarded, 1);
}

/// Reads a tungstenite client until the gateway's close; its code.
fn read_close_code_ws(client: &mut Client) -> Option<u16> {
    recv_close(client).map(|f| u16::from(f.code))
}

#[test]
fn stalled_handshakes_do_not_stop_real_clients_and_are_closed_at_the_deadline() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.handshake_timeout = Duration::from_secs(2);
    let gw = start_gateway(config);
    let mut stalled: Vec<TcpStream> = (0..1000)
        .map(|_| {
            let mut s = TcpStream::connect(gw.local_addr()).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: slow").unwrap();
            s
        })
        .collect();
    let mut good = connect_clients(&gw, 1).remove(0);
    wait_until("origin connection", || origin.open() == 1);
    origin.send_seq(1);
    assert_eq!(recv_text(&mut good), "1");
    wait_until("all stalled handshakes closed", || {
        gw.stats().handshakes_timed_out == 1000
    });
    for s in &mut stalled {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut buf = [0u8; 16];
        // Closed: the end of the stream, or a reset. A timeout is not.
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("not closed without an answer: {other:?}"),
        }
    }
    origin.send_seq(2);
    assert_eq!(recv_text(&mut good), "2");
}
