//! What the gateway does with client frames and with bad upgrade requests.

mod support;

use std::io::Write;

use support::*;
use tungstenite::{
    Message,
    protocol::{CloseFrame, frame::coding::CloseCode},
};
use wsgate::{ClientMessages, Disconnect};

fn gateway() -> (TestOrigin, wsgate::GatewayHandle) {
    let origin = TestOrigin::start();
    let gw = start_gateway(test_config(&origin.url()));
    (origin, gw)
}

#[test]
fn ping_gets_pong_with_the_same_payload() {
    let (_origin, gw) = gateway();
    let mut raw = raw_client(gw.local_addr());
    raw.write_all(&masked_frame(0x89, b"are you there"))
        .unwrap();
    let (opcode, payload) = read_server_frame(&mut raw).unwrap();
    assert_eq!((opcode, payload.as_slice()), (0xA, &b"are you there"[..]));
}

#[test]
fn client_close_gets_a_close_reply_and_the_client_leaves() {
    let (_origin, gw) = gateway();
    let mut client = connect_clients(&gw, 1).remove(0);
    client
        .close(Some(CloseFrame {
            code: CloseCode::Away,
            reason: "bye".into(),
        }))
        .unwrap();
    let reply = recv_close(&mut client);
    assert_eq!(
        reply.map(|f| f.code),
        Some(CloseCode::Away),
        "the code is echoed"
    );
    wait_clients(&gw, 0);
}

#[test]
fn data_messages_are_read_and_discarded() {
    let (origin, gw) = gateway();
    let mut client = connect_clients(&gw, 1).remove(0);
    wait_until("origin connection", || origin.open() == 1);
    client.send(Message::text("hello gateway")).unwrap();
    client.send(Message::binary(vec![1u8; 60_000])).unwrap();
    origin.send_seq(1);
    assert_eq!(recv_text(&mut client), "1");
    assert_eq!(gw.stats().clients, 1, "still connected");
}

#[test]
fn client_messages_beyond_the_forward_queue_are_dropped_and_counted() {
    /// Client messages the manager's queue holds (`FORWARD_QUEUE`,
    /// src/fanout/manager.rs).
    const FORWARD_QUEUE: u64 = 256;
    const N: u64 = 1000;
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.client_messages = ClientMessages::Forward;
    config.allow_any_origin = true;
    config.max_client_rate = 0;
    let gw = start_gateway(config);
    let mut sender = connect_clients(&gw, 1).remove(0);
    wait_until("origin connection", || origin.open() == 1);
    // The manager stops while it places a second client, as a thread
    // writing to a blocked log pipe would: it takes no client message
    // meanwhile.
    let stream = std::net::TcpStream::connect(gw.local_addr()).unwrap();
    let hold = hold_log_line(&format!(
        " from {} placed in ",
        stream.local_addr().unwrap()
    ));
    let _second =
        tungstenite::client(format!("ws://{}/", gw.local_addr()), stream).expect("upgrade");
    hold.wait_held();
    for n in 1..=N {
        sender.write(Message::text(n.to_string())).unwrap();
    }
    sender.flush().unwrap();
    wait_until("the messages beyond the manager's queue dropped", || {
        gw.stats().forward_dropped == N - FORWARD_QUEUE
    });
    hold.release();
    wait_until("every message sent or dropped", || {
        let stats = gw.stats();
        stats.forwarded + stats.forward_dropped == N
    });
    // What went upstream went in order, from the first the queue kept.
    let stats = gw.stats();
    wait_until("the origin to receive what was sent", || {
        received(&origin).len() as u64 == stats.forwarded
    });
    let got = received(&origin);
    assert!(
        got.windows(2).all(|w| w[0] < w[1]) && got.iter().all(|&n| n <= FORWARD_QUEUE),
        "{got:?}"
    );
    assert_eq!(gw.stats().clients, 2, "no client closed");
}

/// The numbers of the text messages the origin received, in order.
fn received(origin: &TestOrigin) -> Vec<u64> {
    origin
        .events()
        .into_iter()
        .filter_map(|e| match e {
            OriginEvent::Received { text, .. } => text.parse().ok(),
            _ => None,
        })
        .collect()
}

#[test]
fn oversized_message_closes_with_1009() {
    let (_origin, gw) = gateway();
    let mut raw = raw_client(gw.local_addr());
    raw.write_all(&masked_frame(0x82, &vec![0u8; 64 * 1024 + 1]))
        .unwrap();
    assert_eq!(read_close_code(&mut raw), Some(1009));
    drop(raw);
    wait_until("the violation counted", || {
        gw.stats().disconnected(Disconnect::TooBig) == 1
    });
}

#[test]
fn fragmented_oversized_message_closes_with_1009() {
    let (_origin, gw) = gateway();
    let mut raw = raw_client(gw.local_addr());
    raw.write_all(&masked_frame(0x02, &vec![0u8; 40 * 1024]))
        .unwrap();
    raw.write_all(&masked_frame(0x80, &vec![0u8; 40 * 1024]))
        .unwrap();
    assert_eq!(read_close_code(&mut raw), Some(1009));
}

#[test]
fn unmasked_frame_closes_with_1002() {
    let (_origin, gw) = gateway();
    let mut raw = raw_client(gw.local_addr());
    raw.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(read_close_code(&mut raw), Some(1002));
    wait_clients(&gw, 0);
}

#[test]
fn bytes_sent_right_after_the_request_are_not_lost() {
    let (_origin, gw) = gateway();
    let mut stream = std::net::TcpStream::connect(gw.local_addr()).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut bytes = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                      Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        .to_vec();
    bytes.extend(masked_frame(0x89, b"early"));
    stream.write_all(&bytes).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        std::io::Read::read_exact(&mut stream, &mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let (opcode, payload) = read_server_frame(&mut stream).unwrap();
    assert_eq!((opcode, payload.as_slice()), (0xA, &b"early"[..]));
}

#[test]
fn plain_http_request_gets_426() {
    let (_origin, gw) = gateway();
    let response = http_exchange(gw.local_addr(), "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 426 "), "{response}");
    assert!(response.contains("Upgrade: websocket"), "{response}");
    assert_eq!(gw.stats().clients, 0);
}

#[test]
fn unknown_path_gets_404() {
    let (_origin, gw) = gateway();
    let request = "GET /elsewhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let response = http_exchange(gw.local_addr(), request);
    assert!(response.starts_with("HTTP/1.1 404 "), "{response}");
    wait_until("the refusal counted", || {
        gw.stats().handshakes_rejected == 1
    });
}

#[test]
fn garbage_gets_400_and_an_oversized_request_431() {
    let (_origin, gw) = gateway();
    let response = http_exchange(gw.local_addr(), "\x16\x03\x01\x02\x00hello\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 400 "), "{response}");
    let big = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(10_000));
    let response = http_exchange(gw.local_addr(), &big);
    assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
}
