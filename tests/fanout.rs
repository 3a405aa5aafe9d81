//! End-to-end fan-out: order, placement, slow-client isolation, write coalescing, origin restarts.

mod support;

use support::*;
use tungstenite::Message;

#[test]
fn every_client_receives_every_message_in_order() {
    let origin = TestOrigin::start();
    let gw = start_gateway(test_config(&origin.url()));
    let mut clients = connect_clients(&gw, 200);
    wait_until("one origin connection", || origin.open() == 1);

    // Bursts smaller than the queue, each delivered before the next: drops
    // would be legitimate under a sustained overload, but there is none here.
    const N: u64 = 100;
    const BURST: u64 = 10;
    for n in 1..=N {
        assert_eq!(origin.send_seq(n), 1);
        if n % BURST == 0 {
            wait_until("the burst delivered", || {
                gw.stats().frames_delivered == 200 * n
            });
        }
    }
    for (i, client) in clients.iter_mut().enumerate() {
        for n in 1..=N {
            assert_eq!(recv_text(client), n.to_string(), "client {i}");
        }
    }
    let stats = gw.stats();
    assert_eq!(stats.messages_in, N);
    assert_eq!(stats.frames_dropped, 0);
}

#[test]
fn binary_stays_binary_and_text_stays_text() {
    let origin = TestOrigin::start();
    let gw = start_gateway(test_config(&origin.url()));
    let mut client = connect_clients(&gw, 1).remove(0);
    wait_until("origin connection", || origin.open() == 1);
    origin.send(Message::binary(vec![0u8, 1, 2, 255]));
    origin.send(Message::text("héllo"));
    origin.send(Message::binary(vec![7u8; 70_000]));
    assert_eq!(
        client.read().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    assert_eq!(client.read().unwrap(), Message::text("héllo"));
    assert_eq!(client.read().unwrap(), Message::binary(vec![7u8; 70_000]));
}

#[test]
fn clients_fill_the_fullest_lobby_with_room() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.lobby_capacity = 4;
    let gw = start_gateway(config);
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(ws_client(gw.local_addr()));
        wait_clients(&gw, clients.len() as u64);
    }
    let members = |gw: &wsgate::GatewayHandle| -> Vec<usize> {
        gw.lobbies(DEADLINE).iter().map(|l| l.clients).collect()
    };
    // The manager may not have placed the last client when its upgrade completes.
    wait_until("lobbies of 4, 4 and 2", || members(&gw) == [4, 4, 2]);
    wait_until("three origin connections", || origin.open() == 3);
    wait_until("the gateway to count them", || {
        gw.stats().origin_connections == 3
    });

    // The first four clients are in the first lobby; one leaves.
    clients.remove(0).close(None).unwrap();
    wait_until("a place freed in the first lobby", || {
        members(&gw) == [3, 4, 2]
    });

    // The newcomer takes the fullest lobby with room (not the newest one).
    clients.push(ws_client(gw.local_addr()));
    wait_until("the newcomer placed", || members(&gw) == [4, 4, 2]);
    assert_eq!(origin.accepted(), 3, "no extra origin connection");
}

#[test]
fn a_client_that_never_reads_does_not_slow_the_others() {
    const QUEUE: usize = 4;
    const N: u64 = 300;
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.queue_depth = QUEUE;
    let gw = start_gateway(config);
    let slow = ws_client(gw.local_addr());
    wait_placed(&gw, 1);
    let mut fast = connect_clients(&gw, 3);
    wait_until("origin connection", || origin.open() == 1);

    // 64 KiB messages fill the slow client's socket buffers quickly.
    for n in 1..=N {
        origin.send(numbered(n, 64 * 1024));
        // Fast clients keep up as the origin sends.
        for client in &mut fast {
            assert_eq!(number(client.read().unwrap()), n);
        }
    }
    wait_until("the slow client's drops counted", || {
        gw.stats().frames_dropped > 0
    });

    // Now the slow client reads what was kept for it: an increasing sequence
    // that ends with the newest message, whose tail after the last gap is at
    // most the queue (plus the frame that was being written).
    let got = read_until(slow, N);
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
    let tail = got
        .windows(2)
        .rev()
        .take_while(|w| w[1] == w[0] + 1)
        .count()
        + 1;
    assert!(
        tail <= QUEUE + 1,
        "tail of {tail} after the last gap: {got:?}"
    );
    // The writer publishes its counts just after writing; allow it a moment.
    wait_until(
        "every message either delivered or counted as dropped",
        || got.len() as u64 + gw.stats().frames_dropped == N,
    );
}

#[test]
fn under_overload_the_drop_count_equals_what_clients_miss() {
    const QUEUE: usize = 4;
    const N: u64 = 300;
    const PAUSED: usize = 4;
    const READING: usize = 4;
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.queue_depth = QUEUE;
    config.writers = 2;
    let gw = start_gateway(config);
    // The paused clients' small receive buffers overflow after a few
    // messages rather than after megabytes.
    let mut clients: Vec<Client> = (0..PAUSED)
        .map(|_| small_buffer_client(gw.local_addr()))
        .collect();
    wait_placed(&gw, PAUSED);
    clients.extend(connect_clients(&gw, READING));
    wait_until("origin connection", || origin.open() == 1);

    let mut clients = clients.into_iter();
    let paused: Vec<Client> = clients.by_ref().take(PAUSED).collect();
    let received: Vec<Vec<u64>> = std::thread::scope(|s| {
        // Half the clients read as fast as they can while the origin sends
        // faster than the writers can deliver; the other half read nothing
        // until the origin is done, so their queues overflow for certain.
        let readers: Vec<_> = clients.map(|c| s.spawn(move || read_until(c, N))).collect();
        for n in 1..=N {
            origin.send(numbered(n, 64 * 1024));
        }
        wait_until("the gateway to read every message", || {
            gw.stats().messages_in == N
        });
        let late: Vec<_> = paused
            .into_iter()
            .map(|c| s.spawn(move || read_until(c, N)))
            .collect();
        readers
            .into_iter()
            .chain(late)
            .map(|h| h.join().expect("reader"))
            .collect()
    });

    let mut missed = 0;
    let mut delivered = 0;
    for (i, got) in received.iter().enumerate() {
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "client {i} out of order: {got:?}"
        );
        delivered += got.len() as u64;
        missed += N - got.len() as u64;
    }
    assert!(missed > 0, "the paused clients lost nothing: no overload");
    // The writers publish their counts just after writing; allow them a moment.
    wait_until("every frame either delivered or counted as dropped", || {
        let stats = gw.stats();
        stats.frames_dropped == missed && stats.frames_delivered == delivered
    });
    // The final counters, as the binary logs them at exit, say the same.
    gw.shutdown();
    let last = gw.join();
    assert_eq!(
        (last.frames_dropped, last.frames_delivered),
        (missed, delivered)
    );
}

#[test]
fn a_small_send_buffer_keeps_what_a_stalled_client_reads_fresh() {
    const N: u64 = 2000;
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.client_send_buffer = 8 * 1024;
    let gw = start_gateway(config);
    let stalled = small_buffer_client(gw.local_addr());
    wait_placed(&gw, 1);
    wait_until("origin connection", || origin.open() == 1);

    // 2 MB of 1 KiB messages, none read until the gateway has them all:
    // autotuned kernel buffers would hold every one (they grow to 4 MiB).
    for n in 1..=N {
        origin.send(numbered(n, 1024));
    }
    wait_until("the gateway to read every message", || {
        gw.stats().messages_in == N
    });
    // It was not given up on while stalled.
    assert_eq!(gw.stats().clients, 1);
    let got = read_until(stalled, N);
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
    // What waited: the queue (16), the frames being written, and the two
    // kernel buffers (8 KiB send and 16 KiB receive, each doubled by the
    // kernel): about 70 messages, not 2000.
    assert!(
        got.len() < 150,
        "{} messages waited for a stalled client",
        got.len()
    );
    wait_until("the rest counted as dropped", || {
        gw.stats().frames_dropped == N - got.len() as u64
    });
}

#[test]
fn a_writer_that_keeps_up_writes_each_frame_alone_and_one_behind_writes_its_backlog_together() {
    let origin = TestOrigin::start();
    let gw = start_gateway(test_config(&origin.url()));
    let mut client = small_buffer_client(gw.local_addr());
    wait_placed(&gw, 1);
    wait_until("origin connection", || origin.open() == 1);

    // Keeping up: each message is read before the next is sent, so each
    // frame goes out whole in a write of its own, without waiting for more.
    let calm = gw.stats();
    for n in 1..=20 {
        origin.send(numbered(n, 128));
        assert_eq!(number(client.read().expect("read")), n);
    }
    wait_until("the calm frames counted", || {
        gw.stats().frames_delivered == calm.frames_delivered + 20
    });
    assert_eq!(gw.stats().client_writes - calm.client_writes, 20);

    // Behind: the client stops reading. The origin goes on until the
    // client's socket is full and a queue's worth of frames waits for it
    // (the queue overflowing meanwhile, drop-oldest).
    let mut sent = 20;
    let behind = loop {
        assert!(sent < 20_000, "the client's socket never filled");
        for n in sent + 1..=sent + 200 {
            origin.send(numbered(n, 128));
        }
        sent += 200;
        wait_until("the gateway to read every message", || {
            gw.stats().messages_in == sent
        });
        let s = gw.stats();
        if s.frames_delivered + s.frames_dropped + 16 <= sent {
            break s;
        }
    };
    let got = read_until(client, sent);
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
    wait_until("every frame delivered or dropped", || {
        let s = gw.stats();
        s.frames_delivered + s.frames_dropped == sent
    });
    let after = gw.stats();
    let frames = after.frames_delivered - behind.frames_delivered;
    let writes = after.client_writes - behind.client_writes;
    // The backlog (a full queue, 16 frames) goes out in a few vectored
    // writes once the socket has room, not in one write each.
    assert!(frames >= 16, "{frames} frames were queued");
    assert!(
        writes * 4 <= frames,
        "{frames} queued frames took {writes} writes"
    );
}

#[test]
fn clients_survive_an_origin_restart() {
    let origin = TestOrigin::start();
    let gw = start_gateway(test_config(&origin.url()));
    let mut clients = connect_clients(&gw, 5);
    wait_until("origin connection", || origin.open() == 1);
    origin.send_seq(1);
    for c in &mut clients {
        assert_eq!(recv_text(c), "1");
    }

    let (addr, counts) = origin.kill();
    wait_until("the gateway to notice", || {
        gw.stats().origin_connections == 0
    });
    // The clients stay through reconnects that fail while the origin is down.
    wait_until("a reconnect refused", || {
        gw.stats().origin_failed_connect >= 1
    });
    let origin = TestOrigin::start_on(addr, counts, OriginOptions::default());
    wait_until("the lobby to reconnect", || origin.open() == 1);
    assert_eq!(gw.stats().clients, 5, "clients stayed connected");
    origin.send_seq(2);
    for c in &mut clients {
        assert_eq!(recv_text(c), "2");
    }
    assert!(gw.stats().origin_lost >= 1);
}
