//! Dense lobbies: compaction with gap-free migration, the origin connection
//! limit, and replay for late joiners.

mod support;

use std::{sync::Arc, time::Duration};

use support::*;
use wsgate::{Config, GatewayHandle};

const EVERY: Duration = Duration::from_millis(10);

/// Frames each client may have queued: 1.28 s of the feed at its peak (4
/// frames every 10 ms), where the default 16 hold 40 ms. A migration test
/// fails for a gap, not because a writer on this busy box fell 40 ms
/// behind; a longer stall still fails, and the drop counters name it.
const QUEUE: usize = 512;

fn compacting(origin: &TestOrigin) -> Config {
    let mut config = test_config(&origin.url());
    config.lobby_capacity = 10;
    config.compact_interval = Duration::from_millis(500);
    config.compact_fill = 0.9;
    config.queue_depth = QUEUE;
    config
}

/// Clients placed in each lobby, in the gateway's order.
fn members(gw: &GatewayHandle) -> Vec<usize> {
    gw.lobbies(DEADLINE).iter().map(|l| l.clients).collect()
}

/// Upstream connections the origin has recorded: each is in its broadcast
/// list by then, so it gets every message sent afterwards. The origin
/// numbers connections as their upgrades complete, and skews them by that
/// number: a test that waits for lobby k's before starting lobby k + 1
/// knows lobby k's is connection k.
fn upstreams_registered(origin: &TestOrigin) -> usize {
    origin
        .events()
        .iter()
        .filter(|e| matches!(e, OriginEvent::Connected { .. }))
        .count()
}

/// Messages the lobby with `clients` clients has received (0 if there is none).
fn received_by_lobby_of(gw: &GatewayHandle, clients: usize) -> u64 {
    gw.lobbies(DEADLINE)
        .iter()
        .find(|l| l.clients == clients)
        .map_or(0, |l| l.messages_in)
}

/// Keeps 2, 3 and 4 clients in lobbies 0, 1, 2: the last is the target.
const KEEP_TARGET_LAST: [usize; 9] = [0, 1, 10, 11, 12, 20, 21, 22, 23];
/// Keeps 4, 3 and 2 clients in lobbies 0, 1, 2: the first is the target.
const KEEP_TARGET_FIRST: [usize; 9] = [0, 1, 2, 3, 10, 11, 12, 20, 21];

/// Fills three lobbies of 10, streams numbered messages, then leaves 9
/// clients in them (`keep`; 9 fit one lobby at 90%): compaction must end with
/// one lobby and one origin connection, every remaining client's stream intact.
fn compact_three_into_one(origin: TestOrigin, keep: [usize; 9], heartbeats: fn(u64) -> usize) {
    let origin = Arc::new(origin);
    let gw = start_gateway(compacting(&origin));
    let mut clients = Vec::new();
    for i in 0..30 {
        clients.push(ws_client(gw.local_addr()));
        wait_clients(&gw, clients.len() as u64);
        if i % 10 == 0 {
            // A lobby's first client: lobby k's upstream is connection k.
            wait_until("the new lobby's upstream registered", || {
                upstreams_registered(&origin) == i / 10 + 1
            });
        }
    }
    wait_until("three origin connections", || origin.open() == 3);
    // The manager may not have placed the last client when its upgrade completes.
    wait_until("three full lobbies", || members(&gw) == [10, 10, 10]);

    let feed = Feed::with_heartbeats(origin.clone(), EVERY, heartbeats);
    let mut followers = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        if keep.contains(&i) {
            followers.push(Follower::spawn(client));
        } else {
            client.close(None).unwrap();
        }
    }
    wait_until("one lobby of 9", || members(&gw) == [9]);
    wait_until("one origin connection", || origin.open() == 1);
    let moved_at = received_by_lobby_of(&gw, 9);
    wait_until(
        "the stream going on through the lobby they moved into",
        || received_by_lobby_of(&gw, 9) >= moved_at + 20,
    );
    let last = feed.stop();
    let streams: Vec<Vec<String>> = followers
        .into_iter()
        .map(|f| f.finish_at(&last.to_string()))
        .collect();
    let stats = gw.stats();
    assert_no_queue_drops(&stats);
    assert_eq!(stats.migration_gaps, 0, "{stats:?}");
    for got in streams {
        let numbers = assert_continuous(&got, heartbeats);
        assert_eq!(numbers.last(), Some(&last), "the stream reached its end");
    }
    assert!(stats.migrations >= 5, "{stats:?}");
    assert_eq!(stats.lobbies, 1);
}

#[test]
fn under_filled_lobbies_are_compacted_without_gaps() {
    compact_three_into_one(TestOrigin::start(), KEEP_TARGET_LAST, |_| 0);
}

/// Upstream connection k runs k × 40 ms (4 messages) behind the first.
fn skewed() -> TestOrigin {
    TestOrigin::start_with(OriginOptions {
        skew: Duration::from_millis(40),
        ..OriginOptions::default()
    })
}

#[test]
fn migration_into_a_lobby_behind_waits_for_it_to_catch_up() {
    compact_three_into_one(skewed(), KEEP_TARGET_LAST, |_| 0);
}

#[test]
fn migration_into_a_lobby_ahead_sends_what_the_client_missed() {
    compact_three_into_one(skewed(), KEEP_TARGET_FIRST, |_| 0);
}

#[test]
fn identical_heartbeats_do_not_misalign_a_migration() {
    compact_three_into_one(skewed(), KEEP_TARGET_FIRST, |n| (n % 4) as usize);
}

#[test]
fn identical_heartbeats_do_not_misalign_a_migration_behind() {
    compact_three_into_one(skewed(), KEEP_TARGET_LAST, |n| (n % 4) as usize);
}

#[test]
fn streams_that_never_meet_join_at_the_live_edge_and_count_a_gap() {
    let origin = Arc::new(TestOrigin::start_with(OriginOptions {
        tag_per_conn: true,
        ..OriginOptions::default()
    }));
    let gw = start_gateway(compacting(&origin));
    let mut first = Vec::new();
    for _ in 0..10 {
        first.push(ws_client(gw.local_addr()));
        wait_clients(&gw, first.len() as u64);
    }
    let mut last = ws_client(gw.local_addr());
    wait_until("two origin connections", || origin.open() == 2);
    let feed = Feed::start(origin.clone(), EVERY);
    for mut c in first.drain(2..) {
        c.close(None).unwrap();
    }
    wait_until("one lobby", || gw.lobbies(DEADLINE).len() == 1);
    wait_until("the gap counted", || gw.stats().migration_gaps == 1);
    // The moved client now gets the other connection's stream.
    let tag = |m: String| m.split_once(':').map(|(t, _)| t.to_owned());
    let mut tags = std::collections::HashSet::new();
    while tags.len() < 2 {
        tags.insert(tag(recv_text(&mut last)));
    }
    feed.stop();
}

#[test]
fn replay_gives_a_late_joiner_the_last_frames_first() {
    let origin = Arc::new(TestOrigin::start());
    let mut config = test_config(&origin.url());
    config.replay = 3;
    config.queue_depth = QUEUE;
    let gw = start_gateway(config);
    let mut early = ws_client(gw.local_addr());
    wait_until("origin connection", || origin.open() == 1);
    for n in 1..=10 {
        origin.send_seq(n);
    }
    for n in 1..=10 {
        assert_eq!(recv_text(&mut early), n.to_string());
    }
    let mut late = ws_client(gw.local_addr());
    for n in [8, 9, 10] {
        assert_eq!(recv_text(&mut late), n.to_string());
    }
    let late = Follower::spawn(late);
    let feed = Feed::new(origin.clone(), EVERY, 11, |_| 0);
    wait_until("the late joiner on the live feed", || late.count() >= 20);
    let last = feed.stop();
    let got = late.finish_at(&last.to_string());
    assert_no_queue_drops(&gw.stats());
    let numbers = assert_continuous(&got, |_| 0);
    assert_eq!(numbers.first(), Some(&11), "{numbers:?}");
}

#[test]
fn a_new_lobby_replays_what_it_has() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.replay = 5;
    let gw = start_gateway(config);
    let mut first = ws_client(gw.local_addr());
    wait_until("origin connection", || origin.open() == 1);
    origin.send_seq(1);
    origin.send_seq(2);
    assert_eq!(recv_text(&mut first), "1");
    assert_eq!(recv_text(&mut first), "2");
    let mut second = ws_client(gw.local_addr());
    wait_clients(&gw, 2);
    origin.send_seq(3);
    for n in ["1", "2", "3"] {
        assert_eq!(recv_text(&mut second), n);
    }
}

#[test]
fn the_origin_connection_limit_turns_clients_away_with_503() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.lobby_capacity = 5;
    config.max_origin_connections = 2;
    let gw = start_gateway(config);
    let _clients = connect_clients(&gw, 10);
    let request = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let response = http_exchange(gw.local_addr(), request);
    assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
    assert!(response.contains("Retry-After: "), "{response}");
    assert_eq!(gw.stats().refused_full, 1);
    assert_eq!(gw.lobbies(DEADLINE).len(), 2);
    wait_until("two origin connections", || origin.open() == 2);
}

#[test]
fn a_client_moved_into_a_lobby_far_behind_is_held_at_most_two_seconds() {
    /// The promise (README, "Dense lobbies"): a client moving into a lobby
    /// behind it is held at most this long (`ADOPT_WAIT`).
    const HOLD: Duration = Duration::from_secs(2);
    /// For this busy box: the lobby's wake-up at the deadline, the manager
    /// routing the move, the writer and the reading thread, each of which
    /// may wait its turn for a core; 1.5 s is tens of times what they take.
    const MARGIN: Duration = Duration::from_millis(1500);
    /// How far the second upstream connection runs behind the first: an
    /// unbounded hold would last this long, beyond `HOLD + MARGIN`.
    const BEHIND: Duration = Duration::from_secs(4);
    let origin = Arc::new(TestOrigin::start_with(OriginOptions {
        skew: BEHIND,
        ..OriginOptions::default()
    }));
    let mut config = compacting(&origin);
    // Lobbies of 4, compacted to 3.
    config.lobby_capacity = 4;
    let gw = start_gateway(config);
    // Lobby 0 (upstream connection 0): three clients that leave and the one
    // that moves; lobby 1 (four seconds behind): two, so it is the fuller.
    let mut clients = Vec::new();
    for i in 0..6 {
        clients.push(ws_client(gw.local_addr()));
        wait_clients(&gw, clients.len() as u64);
        if i % 4 == 0 {
            // A lobby's first client: lobby k's upstream is connection k.
            wait_until("the new lobby's upstream registered", || {
                upstreams_registered(&origin) == i / 4 + 1
            });
        }
    }
    wait_until("lobbies of 4 and 2", || members(&gw) == [4, 2]);
    let feed = Feed::start(origin.clone(), EVERY);
    let mut clients = clients.into_iter();
    let leaving: Vec<Client> = clients.by_ref().take(3).collect();
    let mover = Follower::spawn(clients.next().expect("a fourth client"));
    let _behind: Vec<Follower> = clients.map(Follower::spawn).collect();
    // The lobby behind has a stream: the mover's position is in its future.
    wait_until("the feed reaching the lobby behind", || {
        received_by_lobby_of(&gw, 2) > 0
    });
    for mut client in leaving {
        client.close(None).unwrap();
    }
    wait_until("the move", || gw.stats().migrations == 1);
    let moved_at = mover.count();
    wait_until("the mover receiving again", || {
        mover.count() >= moved_at + 50
    });
    let got = mover.finish_timed();
    feed.stop();

    let stats = gw.stats();
    assert_no_queue_drops(&stats);
    // The hold is the one silence in a stream that otherwise brings a
    // message every 10 ms.
    let (held, resumed) = got
        .windows(2)
        .enumerate()
        .map(|(i, w)| (w[1].0 - w[0].0, i + 1))
        .max()
        .expect("messages around the move");
    let texts: Vec<String> = got.into_iter().map(|(_, text)| text).collect();
    eprintln!("held {held:?} before {:?}", texts[resumed]);
    assert!(
        held <= HOLD + MARGIN,
        "held {held:?} (at most {HOLD:?} promised, {MARGIN:?} margin) before {:?}",
        texts[resumed]
    );
    assert_eq!(stats.migration_gaps, 1, "joined the live edge: {stats:?}");
    // Before the hold and after it, each stream is continuous; after it,
    // the client is where the lobby behind is, and goes on from there.
    let before = assert_continuous(&texts[..resumed], |_| 0);
    let after = assert_continuous(&texts[resumed..], |_| 0);
    assert!(
        after[0] < before[before.len() - 1],
        "the lobby behind was behind: {before:?} then {after:?}"
    );
    assert!(after.len() >= 20, "continued after the hold: {after:?}");
}

/// A client that negotiated permessage-deflate, moved into a lobby ahead of
/// its own, is caught up from that lobby's history compressed, gap-free.
#[cfg(feature = "compression")]
#[test]
fn a_compressing_client_moved_into_a_lobby_ahead_is_caught_up_compressed() {
    use std::sync::atomic::{AtomicBool, Ordering};

    use deflate::{END, OFFER, big, read_raw};
    let origin = Arc::new(TestOrigin::start_with(OriginOptions {
        // The second upstream connection runs 20 messages behind the first.
        skew: 20 * EVERY,
        ..OriginOptions::default()
    }));
    let mut config = compacting(&origin);
    // Lobbies of 4, compacted to 3.
    config.lobby_capacity = 4;
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    // Lobby 0 (upstream connection 0): a compressing client, which makes
    // the lobby keep compressed frames, and three plain ones, two of which
    // leave; lobby 1 (20 messages behind): the compressing client that moves.
    let (stay, _) = raw_client_offering(addr, OFFER);
    wait_placed(&gw, 1);
    // Lobby k's upstream is connection k.
    wait_until("lobby 0's upstream registered", || {
        upstreams_registered(&origin) == 1
    });
    let mut plain = Vec::new();
    for placed in 2..=4 {
        plain.push(raw_client(addr));
        wait_placed(&gw, placed);
    }
    let (mover, response) = raw_client_offering(addr, OFFER);
    assert!(response.contains("permessage-deflate"), "{response}");
    wait_until("lobbies of 4 and 1", || members(&gw) == [4, 1]);
    wait_until("both upstreams registered", || {
        upstreams_registered(&origin) == 2
    });

    let stop = Arc::new(AtomicBool::new(false));
    let feed = {
        let (origin, stop) = (origin.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                origin.send(big(n));
                std::thread::sleep(EVERY);
            }
            n
        })
    };
    let mut plain = plain.into_iter();
    let readers = [stay, plain.next().expect("a plain client"), mover].map(read_raw);
    let leaving: Vec<_> = plain.collect();
    wait_until("the mover's lobby streaming", || {
        received_by_lobby_of(&gw, 1) >= 20
    });
    drop(leaving);
    wait_until("one lobby of 3", || members(&gw) == [3]);
    let moved_at = received_by_lobby_of(&gw, 3);
    wait_until("the stream going on through the lobby ahead", || {
        received_by_lobby_of(&gw, 3) >= moved_at + 20
    });
    stop.store(true, Ordering::SeqCst);
    let last = feed.join().expect("feed thread");
    origin.send(tungstenite::Message::text(END));
    let [stay, plain, mover] = readers.map(|r| r.join().expect("reader thread"));

    let stats = gw.stats();
    assert_no_queue_drops(&stats);
    assert_eq!(
        (stats.migrations, stats.migration_gaps),
        (1, 0),
        "{stats:?}"
    );
    for (who, got, compressed) in [
        ("stay", &stay, true),
        ("plain", &plain, false),
        ("mover", &mover, true),
    ] {
        for (n, was) in got {
            assert_eq!(*was, compressed, "{who}: message {n} compressed: {was}");
        }
        let numbers: Vec<u64> = got.iter().map(|(n, _)| *n).collect();
        assert!(
            numbers.windows(2).all(|w| w[1] == w[0] + 1),
            "{who}: gap or duplicate in {numbers:?}"
        );
        assert_eq!(numbers.last(), Some(&last), "{who}");
    }
}

/// Raw permessage-deflate clients, read frame by frame (tests/compression.rs
/// has the same tools; test files do not share code but through support).
#[cfg(feature = "compression")]
mod deflate {
    use std::{net::TcpStream, thread};

    use tungstenite::Message;

    use crate::support::{inflate, read_server_frame_whole};

    /// What browsers offer.
    pub const OFFER: &str = "permessage-deflate; client_max_window_bits";
    /// The message that ends a raw reader's stream (short: never compressed).
    pub const END: &str = "end";
    const RSV1: u8 = 0x40;

    /// Message `n`: its number in 8 digits, then text that deflate shrinks,
    /// longer than `compress_min` (256 bytes).
    pub fn big(n: u64) -> Message {
        Message::text(format!(
            "{n:08} {}",
            "bid 64000.25 ask 64000.50 ".repeat(12)
        ))
    }

    /// Reads a raw client's data messages in its own thread until [`END`]:
    /// each one's number, and whether it came compressed.
    pub fn read_raw(mut stream: TcpStream) -> thread::JoinHandle<Vec<(u64, bool)>> {
        thread::spawn(move || {
            let mut got = Vec::new();
            loop {
                let (first, payload) =
                    read_server_frame_whole(&mut stream).expect("a frame before the deadline");
                if !matches!(first & 0x0F, 0x1 | 0x2) {
                    continue;
                }
                let compressed = first & RSV1 != 0;
                let text = if compressed {
                    inflate(&payload)
                } else {
                    payload
                };
                if text == END.as_bytes() {
                    return got;
                }
                let n = std::str::from_utf8(&text[..8])
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .expect("a numbered message");
                got.push((n, compressed));
            }
        })
    }
}
