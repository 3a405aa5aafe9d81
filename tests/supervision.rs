//! No thread dies unnoticed: a panic injected into each kind of gateway
//! thread (the `fault-injection` feature, on in test builds only) is
//! recovered or shuts the gateway down as documented, the counters stay
//! exact, and shutdown always ends within the drain timeout and a second.

mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use support::*;
use tungstenite::Message;
use wsgate::{Disconnect, DropReason, GatewayHandle, OriginState, fault::Fault};

/// The promise (README, "Limits and guarantees"): `join()`, dropping the
/// handle and SIGTERM end within the drain timeout and a second.
fn shutdown_bound(drain: Duration) -> Duration {
    drain + Duration::from_secs(1)
}

/// The margin on top of [`shutdown_bound`] for this busy 2-core box: the
/// threads that end (acceptor, manager, lobbies, writers) and the test's
/// own each may wait their turn for a core.
const SLACK: Duration = Duration::from_secs(2);

/// Joins `gw`; how long that took, and its final counters.
fn timed_join(gw: GatewayHandle) -> (Duration, wsgate::StatsSnapshot) {
    let start = Instant::now();
    let stats = gw.join();
    (start.elapsed(), stats)
}

#[test]
fn a_writer_that_panics_closes_its_clients_with_1011_and_carries_on() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.writers = 1;
    let gw = start_gateway(config);
    let mut clients = connect_clients(&gw, 3);
    wait_until("origin connection", || origin.open() == 1);
    // A placed client may still be on its way to the writer (the manager
    // places it, then hands it over); one that is not the writer's yet when
    // it panics is rightly served, not closed. A message each client has
    // received says every one is the writer's.
    origin.send_seq(0);
    for client in &mut clients {
        assert_eq!(recv_text(client), "0");
    }
    gw.inject_fault(Fault::Writer);
    for client in &mut clients {
        let close = recv_close(client).expect("a close frame");
        assert_eq!(u16::from(close.code), 1011);
    }
    wait_clients(&gw, 0);
    let stats = gw.stats();
    assert_eq!(stats.disconnected(Disconnect::InternalError), 3);
    assert_eq!((stats.thread_panics, stats.fatal_errors), (1, 0));
    // The emptied lobby lets its upstream go; a client arriving before it
    // has taken the leaves would keep that one instead of opening another.
    wait_until("the upstream let go", || origin.open() == 0);
    // The writer serves new clients.
    let mut late = connect_clients(&gw, 1).remove(0);
    wait_until("a new origin connection", || {
        origin.accepted() == 2 && origin.open() == 1
    });
    origin.send_seq(7);
    assert_eq!(recv_text(&mut late), "7");
    drop(late);
    gw.shutdown();
    let (_, last) = timed_join(gw);
    assert_eq!(last.clients, 0);
    assert_eq!(last.fatal_errors, 0);
}

#[test]
fn a_lobby_that_panics_has_its_clients_placed_again_exactly_once() {
    let origin = Arc::new(TestOrigin::start());
    let mut config = test_config(&origin.url());
    config.lobby_capacity = 2;
    // The numbered messages go out in one burst: queues deep enough for it.
    config.queue_depth = 64;
    let gw = start_gateway(config);
    let clients = connect_clients(&gw, 4);
    wait_until("two origin connections", || origin.open() == 2);
    let followers: Vec<Follower> = clients.into_iter().map(Follower::spawn).collect();
    gw.inject_fault(Fault::Lobby);
    origin.send_seq(1);
    wait_until("the lobby replaced", || {
        let stats = gw.stats();
        stats.thread_panics == 1 && stats.lobbies_ended == 1 && origin.open() == 2
    });
    // Every client is in exactly one lobby: the placements add up, and
    // nobody receives a message twice.
    wait_until("four placements", || {
        gw.lobbies(DEADLINE)
            .iter()
            .map(|l| l.clients)
            .sum::<usize>()
            == 4
    });
    // Each is held by its lobby, and the replacement's upstream connection
    // is in the origin's broadcast list: each gets what is sent next.
    wait_placed(&gw, 4);
    wait_until("the replacement's upstream registered", || {
        origin
            .events()
            .iter()
            .filter(|e| matches!(e, OriginEvent::Connected { .. }))
            .count()
            == 3
    });
    for n in 2..=20 {
        origin.send_seq(n);
    }
    assert_eq!(gw.stats().clients, 4);
    for follower in followers {
        let got = follower.finish_at("20");
        let numbers: Vec<u64> = got.iter().map(|t| t.parse().unwrap()).collect();
        assert!(
            numbers.windows(2).all(|w| w[0] < w[1]),
            "in order, no duplicate: {numbers:?}"
        );
    }
    assert_eq!(gw.stats().fatal_errors, 0);
}

/// A fatal failure: clients get the shutdown's 1001, `join` returns in time
/// and reports it, and the counters end exact.
fn fatal(fault: Fault) {
    let origin = TestOrigin::start();
    let config = test_config(&origin.url());
    let drain = config.drain_timeout;
    let gw = start_gateway(config);
    let mut clients = connect_clients(&gw, 2);
    wait_until("origin connection", || origin.open() == 1);
    let start = Instant::now();
    gw.inject_fault(fault);
    for client in &mut clients {
        let close = recv_close(client).expect("a close frame");
        assert_eq!(u16::from(close.code), 1001, "{fault:?}");
    }
    let (_, last) = timed_join(gw);
    assert!(
        start.elapsed() < shutdown_bound(drain) + SLACK,
        "{fault:?}: took {:?} (promised {:?}, {SLACK:?} margin)",
        start.elapsed(),
        shutdown_bound(drain)
    );
    assert_eq!(last.fatal_errors, 1, "{fault:?}");
    assert_eq!(last.thread_panics, 1, "{fault:?}");
    assert_eq!(last.clients, 0, "{fault:?}");
    assert_eq!(last.lobbies, 0, "{fault:?}");
    assert_eq!(last.disconnected(Disconnect::Shutdown), 2, "{fault:?}");
}

#[test]
fn an_acceptor_that_panics_shuts_the_gateway_down() {
    fatal(Fault::Acceptor);
}

#[test]
fn a_manager_that_panics_shuts_the_gateway_down() {
    fatal(Fault::Manager);
}

#[test]
fn shutdown_ends_within_the_drain_timeout_and_a_second_whatever_is_stuck() {
    // A lobby stuck resolving its origin's name (30 s), a client that never
    // reads a busy feed, and one that never answers the close.
    let origin = Arc::new(TestOrigin::start());
    let mut config = test_config(&format!("ws://localhost:{}/feed", origin.addr().port()));
    config.lobby_capacity = 1;
    config.drain_timeout = Duration::from_secs(1);
    let drain = config.drain_timeout;
    let gw = start_gateway(config);
    let _stalled = stalled_client(gw.local_addr());
    wait_until("its lobby connected", || origin.open() == 1);
    let feed = Feed::start(origin.clone(), Duration::from_millis(1));
    // 2 MiB more than its 4 KiB receive buffer and 16 KiB unsent hold: the
    // client is stalled once it loses frames for a full socket.
    for n in 1..=32 {
        origin.send(numbered(n, 64 * 1024));
    }
    wait_until("the client stalled", || {
        gw.stats().dropped(DropReason::SlowClient) > 0
    });
    gw.inject_fault(Fault::SlowResolve);
    let _waiting = raw_client(gw.local_addr());
    wait_until("a second lobby", || gw.stats().lobbies == 2);
    // Its inbox is served meanwhile: it holds its client while it resolves.
    wait_placed(&gw, 2);
    wait_until("the second lobby resolving", || {
        gw.lobbies(DEADLINE)
            .iter()
            .any(|l| l.origin == OriginState::Connecting)
    });
    assert_eq!(origin.open(), 1, "the second lobby is still resolving");
    gw.shutdown();
    let (took, last) = timed_join(gw);
    feed.stop();
    assert!(
        took < shutdown_bound(drain) + SLACK,
        "took {took:?} (promised {:?}, {SLACK:?} margin)",
        shutdown_bound(drain)
    );
    assert_eq!(last.clients, 0);
    assert_eq!(last.fatal_errors, 0);
}

#[test]
fn a_host_name_origin_is_resolved_off_the_lobby_thread() {
    let origin = TestOrigin::start();
    let gw = start_gateway(test_config(&format!(
        "ws://localhost:{}/feed",
        origin.addr().port()
    )));
    let mut client = connect_clients(&gw, 1).remove(0);
    wait_until("origin connection", || origin.open() == 1);
    origin.send(Message::text("resolved"));
    assert_eq!(recv_text(&mut client), "resolved");
}
