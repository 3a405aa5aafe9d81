//! Relay tiers: a gateway whose origin is another gateway. Edge gateways
//! hold the clients; their lobbies are clients of a mid-tier gateway, whose
//! lobbies alone connect to the origin.

mod support;

use support::*;

/// Clients at the edge, in lobbies of `EDGE_CAPACITY`.
const CLIENTS: usize = 40;
const EDGE_CAPACITY: usize = 10;
/// Messages sent at once: fewer than a queue holds (16), so none is dropped.
const BURST: u64 = 10;

#[test]
fn edge_mid_origin_every_message_once_in_order_and_the_origin_sees_the_mid_tier_only() {
    let origin = TestOrigin::start();
    let mid = start_gateway(test_config(&origin.url()));
    let mut edge_config = test_config(&format!("ws://{}/", mid.local_addr()));
    edge_config.lobby_capacity = EDGE_CAPACITY;
    let edge = start_gateway(edge_config);

    let mut clients = connect_clients(&edge, CLIENTS);
    let edge_lobbies = CLIENTS / EDGE_CAPACITY;
    assert_eq!(edge.lobbies(DEADLINE).len(), edge_lobbies);
    // Each edge lobby is one client of the mid tier, placed in one lobby
    // there, which is the origin's only connection.
    wait_clients(&mid, edge_lobbies as u64);
    wait_placed(&mid, edge_lobbies);
    wait_until("the mid tier's upstream", || origin.open() == 1);
    assert_eq!(mid.lobbies(DEADLINE).len(), 1);

    let mut next = 1;
    for _ in 0..5 {
        for n in next..next + BURST {
            origin.send_seq(n);
        }
        for client in &mut clients {
            for n in next..next + BURST {
                assert_eq!(recv_text(client), n.to_string(), "once, in order");
            }
        }
        next += BURST;
    }
    // Nothing more came through either tier: the next message is the next.
    origin.send_seq(next);
    for client in &mut clients {
        assert_eq!(recv_text(client), next.to_string());
    }
    assert_eq!(
        origin.accepted(),
        1,
        "the origin saw the mid tier's lobby only"
    );
    assert_eq!(mid.stats().clients, edge_lobbies as u64);
    assert_eq!(edge.stats().clients, CLIENTS as u64);
}
