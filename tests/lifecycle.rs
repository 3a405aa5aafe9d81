//! Lobby lifecycle, alone in its test binary so counting this process's
//! lobby threads sees only this test's gateway.

mod support;

use support::*;

#[test]
fn last_client_leaving_closes_the_origin_and_ends_the_lobby() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.lobby_capacity = 2;
    let gw = start_gateway(config);
    let clients = connect_clients(&gw, 3);
    // Up on both sides: a lobby still reading the origin's 101 when its
    // client leaves abandons the upgrade, which the origin sees as a reset.
    wait_until("two origin connections", || {
        origin.open() == 2 && gw.stats().origin_connections == 2
    });
    assert_eq!(lobby_threads(), 2);
    assert_eq!(gw.stats().lobbies, 2);

    for mut c in clients {
        c.close(None).unwrap();
        let _ = recv_close(&mut c);
    }
    wait_until("the origin connections to close", || origin.open() == 0);
    assert_eq!(
        origin
            .counts
            .closed_by_peer
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    wait_until("the lobby threads to end", || lobby_threads() == 0);
    assert_eq!(gw.stats().lobbies, 0);
    assert!(gw.lobbies(DEADLINE).is_empty());

    // A new client starts a fresh lobby and origin connection.
    let _c = connect_clients(&gw, 1);
    wait_until("a new origin connection", || origin.open() == 1);
    assert_eq!(lobby_threads(), 1);

    gw.shutdown();
    gw.join();
    assert_eq!(lobby_threads(), 0);
    wait_until("the origin connection to close on shutdown", || {
        origin.open() == 0
    });
}
