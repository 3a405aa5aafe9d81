//! Several feeds behind one gateway: a route per path with its own origin,
//! query-keyed lobbies, and subprotocols chosen per route.

mod support;

use std::{net::TcpStream, sync::Arc};

use support::*;
use tungstenite::ClientRequestBuilder;
use wsgate::{Config, RouteConfig};

fn routed(routes: Vec<RouteConfig>) -> Config {
    let mut config = test_config("");
    config.origin = String::new();
    config.routes = routes;
    config
}

/// Asserts that the gateway's metrics hold each of `lines`.
#[cfg(feature = "admin")]
fn route_gauges_read(gw: &wsgate::GatewayHandle, lines: &[&str]) {
    let mut registry = prometheus_client::registry::Registry::default();
    wsgate::metrics::register(&mut registry, gw.metrics_collector());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in lines {
        assert!(text.lines().any(|l| l == *line), "{line} not in\n{text}");
    }
}

#[test]
fn each_route_streams_its_own_origin_and_unknown_paths_get_404() {
    let a = TestOrigin::start();
    let b = TestOrigin::start();
    let gw = start_gateway(routed(vec![
        RouteConfig::new("/a", &a.url()),
        RouteConfig::new("/b", &b.url()),
    ]));
    let mut at_a: Vec<Client> = (0..3)
        .map(|_| client_at(gw.local_addr(), "/a", &[]))
        .collect();
    let mut at_b: Vec<Client> = (0..3)
        .map(|_| client_at(gw.local_addr(), "/b", &[]))
        .collect();
    wait_placed(&gw, 6);
    wait_until("one connection to each origin", || {
        a.open() == 1 && b.open() == 1
    });
    let lobbies = gw.lobbies(DEADLINE);
    let routes: Vec<&str> = lobbies.iter().map(|l| l.route.as_str()).collect();
    assert_eq!(routes, ["/a", "/b"], "a lobby per route");
    #[cfg(feature = "admin")]
    route_gauges_read(
        &gw,
        &[
            "wsgate_route_clients{route=\"/a\"} 3",
            "wsgate_route_lobbies{route=\"/b\"} 1",
        ],
    );
    for n in 1..=5 {
        a.send(tungstenite::Message::text(format!("a{n}")));
        b.send(tungstenite::Message::text(format!("b{n}")));
    }
    for (clients, tag) in [(&mut at_a, "a"), (&mut at_b, "b")] {
        for client in clients.iter_mut() {
            let got: Vec<String> = (0..5).map(|_| recv_text(client)).collect();
            let want: Vec<String> = (1..=5).map(|n| format!("{tag}{n}")).collect();
            assert_eq!(got, want);
        }
    }
    let response = http_exchange(
        gw.local_addr(),
        "GET /c HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 404 "), "{response}");
}

#[test]
fn query_keyed_lobbies_get_their_own_upstream_and_the_key_cap_answers_503() {
    let origin = Arc::new(TestOrigin::start_with(OriginOptions {
        tag_per_conn: true,
        ..OriginOptions::default()
    }));
    let mut route = RouteConfig::new("/book", &origin.url());
    route.pass_query = Some(true);
    route.query_params = Some(vec!["symbol".into()]);
    route.max_keys = Some(2);
    let gw = start_gateway(routed(vec![route]));
    let mut btc: Vec<Client> = ["/book?symbol=btc", "/book?x=1&symbol=btc"]
        .iter()
        .map(|t| client_at(gw.local_addr(), t, &[]))
        .collect();
    let mut eth = client_at(gw.local_addr(), "/book?symbol=eth", &[]);
    wait_placed(&gw, 3);
    wait_until("two upstream connections", || origin.open() == 2);
    let mut uris: Vec<String> = origin
        .events()
        .into_iter()
        .filter_map(|e| match e {
            OriginEvent::Connected { uri, .. } => Some(uri),
            _ => None,
        })
        .collect();
    uris.sort();
    assert_eq!(uris, ["/feed?symbol=btc", "/feed?symbol=eth"]);
    // Each key's clients share one upstream: the same connection tag.
    origin.send_seq(1);
    let tag = |text: String| text.split(':').next().unwrap_or("").to_owned();
    let btc_tags: Vec<String> = btc.iter_mut().map(|c| tag(recv_text(c))).collect();
    assert_eq!(btc_tags[0], btc_tags[1]);
    assert_ne!(tag(recv_text(&mut eth)), btc_tags[0]);
    // A third key is one too many.
    let response = http_exchange(
        gw.local_addr(),
        "GET /book?symbol=sol HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
    // Once eth's last client leaves, its key is free for another.
    drop(eth);
    wait_until("eth's client gone", || gw.stats().clients == 2);
    let mut sol = client_at(gw.local_addr(), "/book?symbol=sol", &[]);
    wait_until("sol's upstream", || {
        origin
            .events()
            .iter()
            .any(|e| matches!(e, OriginEvent::Connected { uri, .. } if uri == "/feed?symbol=sol"))
    });
    origin.send_seq(2);
    assert!(recv_text(&mut sol).ends_with(":2"));
}

#[test]
fn a_route_answers_with_the_first_subprotocol_offered_it_speaks_or_400() {
    let origin = TestOrigin::start();
    let mut route = RouteConfig::new("/feed", &origin.url());
    route.subprotocols = Some(vec!["feed.v2".into(), "feed.v1".into()]);
    route.require_subprotocol = Some(true);
    let gw = start_gateway(routed(vec![route]));
    let stream = TcpStream::connect(gw.local_addr()).unwrap();
    let request =
        ClientRequestBuilder::new(format!("ws://{}/feed", gw.local_addr()).parse().unwrap())
            .with_sub_protocol("feed.v1")
            .with_sub_protocol("feed.v2");
    let (_ws, response) = tungstenite::client(request, stream).expect("upgrade");
    assert_eq!(
        response.headers().get("Sec-WebSocket-Protocol").unwrap(),
        "feed.v1",
        "the client's first choice the route lists"
    );
    let none = http_exchange(
        gw.local_addr(),
        "GET /feed HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: other\r\n\r\n",
    );
    assert!(none.starts_with("HTTP/1.1 400 "), "{none}");
}
