//! What a hostile or broken client can cost: a client that stops reading
//! holds a bounded number of bytes in the kernel and reads fresh frames when
//! it resumes; pings from a client that never reads leave one pong waiting,
//! not thousands; the frame rate limit holds within one read, before
//! anything is forwarded; and admission counts connections from accept, so
//! half-sent requests cannot crowd out other clients.

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use support::*;
use tungstenite::Message;
use wsgate::ClientMessages;

/// What a stalled client's socket may hold on the gateway's side: the unsent
/// bound (16 KiB by default), what the kernel already put in flight to a
/// 4 KiB receive buffer, and a segment's worth of slack.
const SEND_Q_BOUND: u64 = 64 * 1024;

/// A 512-byte text starting with `n` (five digits).
fn numbered_text(n: u64) -> String {
    let mut text = format!("{n:05}");
    text.extend(std::iter::repeat_n('.', 512 - 5));
    text
}

/// [`numbered_text`] as a message.
fn numbered(n: u64) -> Message {
    Message::text(numbered_text(n))
}

/// Reads server frames until a text frame numbered `last`; returns how many
/// text frames came.
fn read_until(stream: &mut TcpStream, last: u64) -> usize {
    let want = format!("{last:05}");
    let mut count = 0;
    loop {
        let (opcode, payload) = read_server_frame(stream).expect("a frame before the deadline");
        if opcode == 0x1 {
            count += 1;
            if payload.starts_with(want.as_bytes()) {
                return count;
            }
        }
    }
}

#[test]
fn a_client_that_stops_reading_costs_a_bounded_send_queue_and_reads_fresh_frames() {
    const MESSAGES: u64 = 600;
    // 320 ms of the feed: the reading client loses nothing to a writer
    // stalled on this busy box, and a stalled client still reads little of
    // what it missed.
    const QUEUE: usize = 64;
    let origin = Arc::new(TestOrigin::start());
    let mut config = test_config(&origin.url());
    config.queue_depth = QUEUE;
    let gw = start_gateway(config);
    let mut stalled: Vec<TcpStream> = (0..10).map(|_| stalled_client(gw.local_addr())).collect();
    let good = Follower::spawn(connect_clients(&gw, 1).remove(0));
    wait_placed(&gw, 11);
    wait_until("origin connection", || origin.open() == 1);
    // 200 messages a second of 512 bytes, for 3 s.
    for n in 1..=MESSAGES {
        origin.send(numbered(n));
        thread::sleep(Duration::from_millis(5));
    }
    wait_until("the feed written out", || {
        gw.stats().frames_delivered >= MESSAGES
    });
    thread::sleep(Duration::from_millis(200));
    for s in &stalled {
        let (send_q, _) =
            socket_queues(gw.local_addr(), s.local_addr().unwrap()).expect("the gateway's socket");
        println!("stalled client's Send-Q: {send_q} bytes");
        assert!(
            send_q <= SEND_Q_BOUND,
            "a stalled client's socket holds {send_q} bytes"
        );
    }
    // Resuming, it reads what little waited, then the newest message.
    let read = read_until(&mut stalled[0], MESSAGES);
    println!("{read} messages waited for the stalled client");
    assert!(
        read <= QUEUE + 64,
        "{read} of {MESSAGES} messages waited for the stalled client"
    );
    let got = good.finish_at(&numbered_text(MESSAGES));
    let behind = gw.stats().dropped(wsgate::DropReason::WriterBehind);
    assert_eq!(behind, 0, "frames dropped while the writers were behind");
    assert_eq!(got.len() as u64, MESSAGES);
}

#[test]
fn a_client_that_never_reads_but_pings_leaves_one_pong_waiting() {
    // 1000 pings a second for 3 s (no rate limit here: this is about the
    // pongs, not the pings).
    const PINGS: u32 = 3000;
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.max_client_rate = 0;
    let gw = start_gateway(config);
    let mut stalled = stalled_client(gw.local_addr());
    let ping = |i: u32| {
        let mut payload = format!("{i:06}").into_bytes();
        payload.resize(125, b'p');
        masked_frame(0x89, &payload)
    };
    for i in (1..=PINGS).step_by(10) {
        let burst: Vec<u8> = (i..i + 10).flat_map(ping).collect();
        stalled.write_all(&burst).unwrap();
        thread::sleep(Duration::from_millis(10));
    }
    let (local, remote) = (gw.local_addr(), stalled.local_addr().unwrap());
    wait_until("the gateway has read every ping", || {
        socket_queues(local, remote).is_some_and(|(_, unread)| unread == 0)
    });
    thread::sleep(Duration::from_millis(300));
    let (send_q, _) = socket_queues(local, remote).expect("the gateway's socket");
    println!("pinging client's Send-Q: {send_q} bytes");
    assert!(send_q <= SEND_Q_BOUND, "{send_q} bytes of pongs queued");
    // Reading now: the pongs the kernel held, then the latest ping's.
    stalled
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut pongs = Vec::new();
    while let Ok((opcode, payload)) = read_server_frame(&mut stalled) {
        assert_eq!(opcode, 0xA, "only pongs");
        pongs.push(payload);
    }
    println!("{} pongs waited", pongs.len());
    assert!(
        pongs.len() < 300,
        "{} of {PINGS} pongs waited for a client that never read",
        pongs.len()
    );
    assert!(
        pongs.last().is_some_and(|p| p.starts_with(b"003000")),
        "the last pong answers the last ping"
    );
}

#[test]
fn the_rate_limit_holds_within_one_read_before_anything_is_forwarded() {
    const FRAMES: usize = 10_000;
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.client_messages = ClientMessages::Forward;
    config.allow_any_origin = true;
    let gw = start_gateway(config);
    let mut calm = connect_clients(&gw, 1).remove(0);
    wait_until("origin connection", || origin.open() == 1);
    let mut raw = raw_client(gw.local_addr());
    wait_placed(&gw, 2);
    let flood: Vec<u8> = (0..FRAMES).flat_map(|_| masked_frame(0x81, b"x")).collect();
    raw.write_all(&flood).unwrap();
    assert_eq!(read_close_code(&mut raw), Some(1008));
    // The calm client's messages still go upstream, on the same link, once
    // the flood's burst has drained (while it fills the way, others' are
    // dropped and counted too: it is bounded).
    let received = |origin: &TestOrigin| -> Vec<String> {
        origin
            .events()
            .into_iter()
            .filter_map(|e| match e {
                OriginEvent::Received { text, .. } => Some(text),
                _ => None,
            })
            .collect()
    };
    wait_until("the calm client's message upstream", || {
        calm.send(Message::text("after")).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        received(&origin).iter().any(|t| t == "after")
    });
    let flooded = received(&origin).iter().filter(|t| *t == "x").count();
    assert!(
        (1..=100).contains(&flooded),
        "{flooded} of {FRAMES} flooded frames went upstream (burst 100)"
    );
    wait_until("every message counted as forwarded arrived", || {
        gw.stats().forwarded as usize == received(&origin).len()
    });
}

/// Sends half an upgrade request from `source`.
fn half_request(gw: std::net::SocketAddr, source: [u8; 4]) -> TcpStream {
    let mut s = connect_from(gw, source, 0);
    s.write_all(b"GET / HTTP/1.1\r\nHost: slow").unwrap();
    s
}

/// The status line the gateway answered, if it answered within `patience`.
fn status_within(s: &mut TcpStream, patience: Duration) -> Option<String> {
    s.set_read_timeout(Some(patience)).ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    (!head.is_empty()).then(|| String::from_utf8_lossy(&head).trim().to_owned())
}

#[test]
fn the_address_limit_counts_handshakes_from_accept() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.max_clients_per_ip = 4;
    let gw = start_gateway(config);
    let held: Vec<TcpStream> = (0..4)
        .map(|_| half_request(gw.local_addr(), [127, 0, 0, 1]))
        .collect();
    wait_until("four handshakes pending", || {
        gw.stats().handshakes_pending == 4
    });
    for _ in 0..6 {
        let mut more = half_request(gw.local_addr(), [127, 0, 0, 1]);
        let status = status_within(&mut more, Duration::from_secs(5));
        assert!(
            status.as_deref().is_some_and(|s| s.contains(" 429 ")),
            "answered at once with 429, not held: {status:?}"
        );
    }
    assert_eq!(gw.stats().handshakes_pending, 4);
    assert_eq!(gw.stats().refused_per_ip, 6);
    // Another address is not affected; the first gets room once it frees some.
    let mut other = connect_from(gw.local_addr(), [127, 0, 0, 2], 0);
    other.write_all(UPGRADE_REQUEST.as_bytes()).unwrap();
    assert!(read_http_head(&mut other).starts_with("HTTP/1.1 101"));
    drop(held);
    wait_until("the handshakes gone", || gw.stats().handshakes_pending == 0);
    let mut again = connect_from(gw.local_addr(), [127, 0, 0, 1], 0);
    again.write_all(UPGRADE_REQUEST.as_bytes()).unwrap();
    assert!(read_http_head(&mut again).starts_with("HTTP/1.1 101"));
}

#[test]
fn at_the_pending_cap_the_oldest_handshake_makes_room() {
    const HALF: usize = 40;
    const CAP: usize = 8;
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.max_pending_handshakes = CAP;
    config.handshake_timeout = Duration::from_secs(60);
    let gw = start_gateway(config);
    let mut held: Vec<TcpStream> = Vec::new();
    for _ in 0..HALF {
        held.push(half_request(gw.local_addr(), [127, 0, 0, 1]));
        // In order, so which are oldest is known.
        wait_until("the handshake accepted", || {
            gw.stats().handshakes_pending + gw.stats().handshakes_shed == held.len() as u64
        });
    }
    // A snapshot reads one counter after the other: the wait above may
    // have seen the last shed without the add that follows it.
    wait_until("the cap held and the oldest shed", || {
        let stats = gw.stats();
        (stats.handshakes_pending, stats.handshakes_shed) == (CAP as u64, (HALF - CAP) as u64)
    });
    for (i, s) in held.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let is_closed = match s.read(&mut [0u8; 1]) {
            Ok(n) => n == 0,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        assert_eq!(
            is_closed,
            i < HALF - CAP,
            "handshake {i}: the oldest are closed"
        );
    }
    // A real client still gets in and receives.
    let start = Instant::now();
    let mut good = connect_clients(&gw, 1).remove(0);
    wait_until("origin connection", || origin.open() == 1);
    origin.send_seq(1);
    assert_eq!(recv_text(&mut good), "1");
    println!(
        "a new client received its first message in {:?}",
        start.elapsed()
    );
}

/// The nice value of each of this process's threads whose name starts with
/// `prefix` (Linux: it is per thread).
#[cfg(target_os = "linux")]
fn nice_of_threads(prefix: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !comm.trim_end().starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // The fields after the command's closing parenthesis start at the
        // third (state); the nice value is the nineteenth.
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        found.push(fields[16].parse().unwrap());
    }
    found
}

#[test]
#[cfg(target_os = "linux")]
fn the_acceptor_yields_to_the_fan_out_at_its_nice_value_and_still_admits() {
    let process = {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .collect();
        fields[16].parse::<i32>().unwrap()
    };
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.acceptor_nice = 7;
    let gw = start_gateway(config);
    let mut clients = connect_clients(&gw, 2);
    wait_until("origin connection", || origin.open() == 1);
    origin.send(Message::text("through"));
    for c in &mut clients {
        assert_eq!(recv_text(c), "through");
    }
    // Other tests' gateways in this process keep nice 0 acceptors: this
    // one's is the lowered one, and no thread serving clients is lowered.
    let acceptors = nice_of_threads("wsgate-acceptor");
    assert!(
        acceptors.contains(&(process + 7).min(19)),
        "an acceptor at nice {}: {acceptors:?}",
        process + 7
    );
    for serving in ["wsgate-writer", "wsgate-lobby", "wsgate-manager"] {
        let nices = nice_of_threads(serving);
        assert!(!nices.is_empty(), "no {serving} thread found");
        assert!(
            nices.iter().all(|&n| n == process),
            "{serving} threads at {nices:?}, not the process's {process}"
        );
    }
}
