//! Dense lobbies: compaction with gap-free migration, the origin connection
//! limit, and replay for late joiners.

mod support;

use std::{sync::Arc, time::Duration};

use support::*;
use wsgate::Config;

const EVERY: Duration = Duration::from_millis(10);

fn compacting(origin: &TestOrigin) -> Config {
    let mut config = test_config(&origin.url());
    config.lobby_capacity = 10;
    config.compact_interval = Duration::from_millis(500);
    config.compact_fill = 0.9;
    config
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
    for _ in 0..30 {
        clients.push(ws_client(gw.local_addr()));
        wait_clients(&gw, clients.len() as u64);
    }
    wait_until("three origin connections", || origin.open() == 3);
    let members = |gw: &wsgate::GatewayHandle| -> Vec<usize> {
        gw.lobbies(DEADLINE).iter().map(|l| l.clients).collect()
    };
    // The manager may not have placed the last client when its upgrade completes.
    wait_until("three full lobbies", || members(&gw) == [10, 10, 10]);

    let feed = Feed::with_heartbeats(origin.clone(), EVERY, heartbeats);
    let mut readers = Vec::new();
    for (i, mut client) in clients.into_iter().enumerate() {
        if keep.contains(&i) {
            readers.push(Reader::spawn(client));
        } else {
            client.close(None).unwrap();
        }
    }
    wait_until("one lobby of 9", || members(&gw) == [9]);
    wait_until("one origin connection", || origin.open() == 1);
    std::thread::sleep(Duration::from_millis(300));
    let last = feed.stop();
    std::thread::sleep(Duration::from_millis(300));
    for reader in readers {
        let got = reader.finish();
        let numbers = assert_continuous(&got, heartbeats);
        assert_eq!(numbers.last(), Some(&last), "the stream reached its end");
    }
    let stats = gw.stats();
    assert!(stats.migrations >= 5, "{stats:?}");
    assert_eq!(stats.migration_gaps, 0);
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
    let late = Reader::spawn(late);
    let feed = Feed::new(origin.clone(), EVERY, 11, |_| 0);
    std::thread::sleep(Duration::from_millis(200));
    let last = feed.stop();
    std::thread::sleep(Duration::from_millis(200));
    let numbers = assert_continuous(&late.finish(), |_| 0);
    assert_eq!(numbers.first(), Some(&11), "{numbers:?}");
    assert_eq!(numbers.last(), Some(&last));
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
