//! Reloading the configuration of a running gateway: routes added and
//! removed, an upstream changed under its clients, a bad configuration
//! refused; the clients of a route that stays as it was see no gap and no
//! duplicate through it, and those of a route whose upstream changed are
//! promised the same.

mod support;

use std::{sync::Arc, time::Duration};

use support::*;
use wsgate::{Config, Disconnect, RouteConfig};

fn routes(origin: &TestOrigin, routes: &[(&str, &[&str])]) -> Config {
    let mut config = test_config("");
    config.origin = String::new();
    config.compact_interval = Duration::ZERO;
    // The feed sends a frame every 5 ms: 512 frames are 2.5 s of it (the
    // default 16, 80 ms), so a client drops a frame only if its writer
    // stalls that long on this busy box, and the drop counters say so.
    config.queue_depth = 512;
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

/// Waits until each follower has received 20 messages more than `since`.
#[track_caller]
fn wait_flowing(what: &str, followers: &[Follower], since: &[usize]) {
    wait_until(what, || {
        followers
            .iter()
            .zip(since)
            .all(|(f, n)| f.count() >= n + 20)
    });
}

#[test]
fn a_reload_adds_removes_and_reconnects_routes_and_an_unchanged_route_sees_no_gap() {
    let origin = Arc::new(TestOrigin::start());
    let before = routes(&origin, &[("/u", &[]), ("/a", &["X-Gen: 1"]), ("/b", &[])]);
    let gw = start_gateway(before);
    let stay_u: Vec<Follower> = (0..2).map(|_| Follower::spawn(at(&gw, "/u"))).collect();
    let _moved_a: Vec<Client> = (0..2).map(|_| at(&gw, "/a")).collect();
    let mut gone_b = at(&gw, "/b");
    wait_placed(&gw, 5);
    wait_until("three origin connections", || origin.open() == 3);
    let feed = Feed::start(origin.clone(), Duration::from_millis(5));
    wait_flowing("the feed reaching /u", &stay_u, &[0; 2]);

    let after = routes(&origin, &[("/u", &[]), ("/a", &["X-Gen: 2"]), ("/c", &[])]);
    gw.reload(after).expect("a valid configuration");
    // The removed route's client is closed with 1012 after its frames.
    let close = recv_close(&mut gone_b).expect("a close frame");
    assert_eq!(u16::from(close.code), 1012);
    drop(gone_b);
    // The changed route reconnected with its new header, and its clients
    // moved to the new upstream (whether without a gap is the next test's).
    wait_until("/a reconnected with X-Gen: 2", || {
        connections(&origin, "/a").iter().any(|h| {
            h.iter()
                .any(|(n, v)| n.eq_ignore_ascii_case("x-gen") && v == "2")
        })
    });
    wait_until("/a's clients moved", || gw.stats().migrations == 2);
    // The added route serves.
    let mut new_c = at(&gw, "/c");
    wait_until("/c's upstream", || !connections(&origin, "/c").is_empty());
    let n = recv_text(&mut new_c);
    assert!(n.parse::<u64>().is_ok(), "{n}");
    // /u, /a's new upstream and /c: the removed and the replaced are closed.
    wait_until("the old upstreams closed", || origin.open() == 3);
    // A bad configuration changes nothing.
    let mut bad = routes(&origin, &[("/u", &[])]);
    bad.lobby_capacity = 0;
    assert!(gw.reload(bad).is_err());
    let since: Vec<usize> = stay_u.iter().map(Follower::count).collect();
    wait_flowing(
        "the feed going on after the refused reload",
        &stay_u,
        &since,
    );
    let last = feed.stop();
    let stats = gw.stats();
    assert_no_queue_drops(&stats);
    for got in stay_u.into_iter().map(|f| f.finish_at(&last.to_string())) {
        assert_continuous(&got, |_| 0);
    }
    assert_eq!((stats.reloads, stats.reload_failures), (1, 1));
    wait_until("the removed route's client counted", || {
        gw.stats().disconnected(Disconnect::RouteRemoved) == 1
    });
}

/// The README: a route whose upstream changed "gets new lobbies and
/// upstream connections, and its clients move to them the way compaction
/// moves them: gap-free where the old and new streams meet (the same
/// feed)". Both carry the same feed here. (Released before the new
/// upstream had delivered anything, the clients were held 2 s, then joined
/// its live edge with 2 s of messages lost: the new lobbies now warm up
/// first.)
#[test]
fn a_reload_moves_the_clients_of_a_changed_upstream_without_a_gap() {
    let origin = Arc::new(TestOrigin::start());
    let gw = start_gateway(routes(&origin, &[("/a", &["X-Gen: 1"])]));
    let moving: Vec<Follower> = (0..2).map(|_| Follower::spawn(at(&gw, "/a"))).collect();
    wait_placed(&gw, 2);
    wait_until("the origin connection", || origin.open() == 1);
    let feed = Feed::start(origin.clone(), Duration::from_millis(5));
    wait_flowing("the feed reaching /a", &moving, &[0; 2]);
    gw.reload(routes(&origin, &[("/a", &["X-Gen: 2"])]))
        .expect("a valid configuration");
    wait_until("/a's clients moved", || gw.stats().migrations == 2);
    let since: Vec<usize> = moving.iter().map(Follower::count).collect();
    wait_flowing("the feed going on after the move", &moving, &since);
    let last = feed.stop();
    let streams: Vec<Vec<String>> = moving
        .into_iter()
        .map(|f| f.finish_at(&last.to_string()))
        .collect();
    let stats = gw.stats();
    assert_no_queue_drops(&stats);
    assert_eq!(stats.migration_gaps, 0, "{stats:?}");
    for got in streams {
        assert_continuous(&got, |_| 0);
    }
}

/// The new lobbies of a changed upstream may take longer to warm up than
/// an empty lobby lingers (200 ms here: 16 frames of a 50 ms feed take
/// 800 ms). The old lobby serves its held clients meanwhile, so it is not
/// empty: it used to end at its linger, and its clients, never released,
/// received nothing more and never moved.
#[test]
fn an_old_lobby_serves_its_clients_however_long_their_new_lobby_warms_up() {
    let origin = Arc::new(TestOrigin::start());
    let mut config = routes(&origin, &[("/a", &["X-Gen: 1"])]);
    config.lobby_linger = Duration::from_millis(200);
    let gw = start_gateway(config.clone());
    let moving: Vec<Follower> = (0..2).map(|_| Follower::spawn(at(&gw, "/a"))).collect();
    wait_placed(&gw, 2);
    wait_until("the origin connection", || origin.open() == 1);
    let feed = Feed::start(origin.clone(), Duration::from_millis(50));
    wait_flowing("the feed reaching /a", &moving, &[0; 2]);
    let mut changed = routes(&origin, &[("/a", &["X-Gen: 2"])]);
    changed.lobby_linger = config.lobby_linger;
    gw.reload(changed).expect("a valid configuration");
    wait_until("/a's clients moved", || gw.stats().migrations == 2);
    let since: Vec<usize> = moving.iter().map(Follower::count).collect();
    wait_flowing("the feed going on after the move", &moving, &since);
    // While the clients stay, the new lobby keeps its upstream: one open
    // connection means the old lobby let go and ended. (Once the clients
    // leave, the new lobby ends too, and the count would pass 1 on its way
    // to 0 between two polls.)
    wait_until("the old upstream closed", || origin.open() == 1);
    let last = feed.stop();
    let streams: Vec<Vec<String>> = moving
        .into_iter()
        .map(|f| f.finish_at(&last.to_string()))
        .collect();
    let stats = gw.stats();
    assert_no_queue_drops(&stats);
    assert_eq!(stats.migration_gaps, 0, "{stats:?}");
    for got in streams {
        assert_continuous(&got, |_| 0);
    }
}
