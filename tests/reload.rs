//! Reloading the configuration of a running gateway: routes added and
//! removed, an upstream changed under its clients, a bad configuration
//! refused; the clients of every route that stays see no gap and no
//! duplicate through it.

mod support;

use std::{sync::Arc, time::Duration};

use support::*;
use wsgate::{Config, Disconnect, RouteConfig};

fn routes(origin: &TestOrigin, routes: &[(&str, &[&str])]) -> Config {
    let mut config = test_config("");
    config.origin = String::new();
    config.compact_interval = Duration::ZERO;
    for (path, headers) in routes {
        let mut route = RouteConfig::new(path, &format!("ws://{}{path}", origin.addr()));
        route.origin_headers = Some(
            headers
                .iter()
                .map(|h| wsgate::parse_header(h).unwrap())
                .collect(),
        );
        config.routes.push(route);
    }
    config
}

/// Connects a client at `path`.
fn at(gw: &wsgate::GatewayHandle, path: &str) -> Client {
    let stream = std::net::TcpStream::connect(gw.local_addr()).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let url = format!("ws://{}{path}", gw.local_addr());
    tungstenite::client(url, stream).expect("upgrade").0
}

/// The origin connections made for `path`, with their handshake headers.
fn connections(origin: &TestOrigin, path: &str) -> Vec<Vec<(String, String)>> {
    origin
        .events()
        .into_iter()
        .filter_map(|e| match e {
            OriginEvent::Connected { uri, headers, .. } if uri == path => Some(headers),
            _ => None,
        })
        .collect()
}

#[test]
fn a_reload_adds_removes_and_reconnects_routes_without_a_gap_for_those_that_stay() {
    let origin = Arc::new(TestOrigin::start());
    let before = routes(&origin, &[("/u", &[]), ("/a", &["X-Gen: 1"]), ("/b", &[])]);
    let gw = start_gateway(before);
    let stay_u: Vec<Reader> = (0..2).map(|_| Reader::spawn(at(&gw, "/u"))).collect();
    let stay_a: Vec<Reader> = (0..2).map(|_| Reader::spawn(at(&gw, "/a"))).collect();
    let mut gone_b = at(&gw, "/b");
    wait_placed(&gw, 5);
    wait_until("three origin connections", || origin.open() == 3);
    let feed = Feed::start(origin.clone(), Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(300));

    let after = routes(&origin, &[("/u", &[]), ("/a", &["X-Gen: 2"]), ("/c", &[])]);
    gw.reload(after).expect("a valid configuration");
    // The removed route's client is closed with 1012 after its frames.
    let close = recv_close(&mut gone_b).expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    drop(gone_b);
    // The changed route reconnected with its new header.
    wait_until("/a reconnected with X-Gen: 2", || {
        connections(&origin, "/a").iter().any(|h| {
            h.iter()
                .any(|(n, v)| n.eq_ignore_ascii_case("x-gen") && v == "2")
        })
    });
    // The added route serves.
    let mut new_c = at(&gw, "/c");
    wait_until("/c's upstream", || !connections(&origin, "/c").is_empty());
    std::thread::sleep(Duration::from_millis(300));
    let n = recv_text(&mut new_c);
    assert!(n.parse::<u64>().is_ok(), "{n}");
    // /u, /a's new upstream and /c: the removed and the replaced are closed.
    wait_until("the old upstreams closed", || origin.open() == 3);
    // A bad configuration changes nothing.
    let mut bad = routes(&origin, &[("/u", &[])]);
    bad.lobby_capacity = 0;
    assert!(gw.reload(bad).is_err());
    std::thread::sleep(Duration::from_millis(300));
    feed.stop();
    std::thread::sleep(Duration::from_millis(300));
    for reader in stay_u.into_iter().chain(stay_a) {
        assert_continuous(&reader.finish(), |_| 0);
    }
    let stats = gw.stats();
    assert_eq!((stats.reloads, stats.reload_failures), (1, 1));
    wait_until("the removed route's client counted", || {
        gw.stats().disconnected(Disconnect::RouteRemoved) == 1
    });
    assert!(stats.migrations >= 2, "{stats:?}");
    assert_eq!(stats.migration_gaps, 0);
}
