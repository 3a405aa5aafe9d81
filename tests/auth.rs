//! Client authentication: JWTs checked at the upgrade against each route's
//! keys, what a token may open, the expiry of an open connection, and auth
//! requests to a real auth service (its pool, its timeout, its cache).
//! Real sockets on loopback, a real origin, real clients; tokens minted
//! with the test keys in `tests/support/keys/`.

mod support;

use std::{
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use jsonwebtoken::Algorithm;
use serde_json::json;
use support::*;
use tungstenite::Message;
use wsgate::{AuthConfig, AuthResult, Config, Disconnect, RouteConfig};

/// A gateway on `origin` whose route `/` checks HS256 tokens (issuer
/// `tests`, audience `feed`, 5 s of leeway).
fn hs256_gateway(origin: &TestOrigin, tag: &str) -> Config {
    let mut config = test_config(&origin.url());
    config.auth.jwt_secret_file = Some(secret_file(tag));
    config.auth.jwt_issuer = Some("tests".into());
    config.auth.jwt_audience = Some("feed".into());
    config.auth.jwt_leeway = Duration::from_secs(5);
    config
}

fn good_claims() -> serde_json::Value {
    json!({ "sub": "u", "iss": "tests", "aud": "feed", "exp": now() + 600 })
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

#[test]
fn each_bad_token_gets_its_status_and_none_reaches_a_lobby() {
    let origin = TestOrigin::start();
    let gw = start_gateway(hs256_gateway(&origin, "statuses"));
    let addr = gw.local_addr();
    let good = mint(Algorithm::HS256, &good_claims(), None);
    let with = |changes: serde_json::Value| {
        let mut claims = good_claims();
        for (k, v) in changes.as_object().expect("an object") {
            claims[k] = v.clone();
        }
        mint(Algorithm::HS256, &claims, None)
    };
    let parts: Vec<&str> = good.split('.').collect();
    let other = with(json!({ "sub": "admin" }));
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    let none = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(good_claims().to_string().as_bytes())
    );
    let cases: Vec<(&str, String, u16)> = vec![
        ("expired", with(json!({ "exp": now() - 60 })), 401),
        ("not yet valid", with(json!({ "nbf": now() + 60 })), 401),
        ("wrong aud", with(json!({ "aud": "other" })), 401),
        ("wrong iss", with(json!({ "iss": "other" })), 401),
        (
            "no exp",
            {
                let mut c = good_claims();
                c.as_object_mut().unwrap().remove("exp");
                mint(Algorithm::HS256, &c, None)
            },
            401,
        ),
        ("tampered payload", tampered, 401),
        ("alg none", none, 401),
        ("garbage", "not.a.token".into(), 401),
        ("too large", "a".repeat(9000), 431),
    ];
    for (name, token, status) in &cases {
        let (_, head) = upgrade_with(addr, "/", &bearer(token));
        assert_eq!(status_of(&head), *status, "{name}: {head}");
        if *status == 401 {
            assert!(head.contains("WWW-Authenticate: Bearer"), "{name}: {head}");
        }
    }
    let (_, head) = upgrade_with(addr, "/", "");
    assert_eq!(status_of(&head), 401, "no token: {head}");
    let stats = gw.stats();
    assert_eq!(stats.clients, 0, "no refused client is a client");
    assert_eq!(stats.auth(AuthResult::Missing), 1);
    assert_eq!(
        stats.auth(AuthResult::Expired),
        2,
        "expired and not yet valid"
    );
    assert_eq!(stats.auth(AuthResult::Invalid), 6);
    assert_eq!(stats.auth(AuthResult::Ok), 0);
    assert_eq!(origin.accepted(), 0, "no refused client opened an upstream");

    let (_kept, head) = upgrade_with(addr, "/", &bearer(&good));
    assert_eq!(status_of(&head), 101, "{head}");
    wait_until("the good client to be placed", || gw.stats().clients == 1);
    assert_eq!(gw.stats().auth(AuthResult::Ok), 1);
}

#[test]
fn a_key_accepts_only_the_algorithm_it_is_pinned_to() {
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.auth.jwt_public_key = Some(public_key_file(Algorithm::RS256));
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    // HS256 signed with the RSA public key's PEM as the secret: the
    // classic algorithm confusion.
    let pem = std::fs::read(public_key_file(Algorithm::RS256)).unwrap();
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims_for(600),
        &jsonwebtoken::EncodingKey::from_secret(&pem),
    )
    .unwrap();
    for (name, token) in [
        ("HS256 with the public key as secret", confused),
        (
            "RS384 with the right key",
            mint(Algorithm::RS384, &claims_for(600), None),
        ),
        ("ES256", mint(Algorithm::ES256, &claims_for(600), None)),
    ] {
        let (_, head) = upgrade_with(addr, "/", &bearer(&token));
        assert_eq!(status_of(&head), 401, "{name}: {head}");
    }
    let (_, head) = upgrade_with(
        addr,
        "/",
        &bearer(&mint(Algorithm::RS256, &claims_for(600), None)),
    );
    assert_eq!(status_of(&head), 101, "RS256: {head}");
    assert_eq!(gw.stats().auth(AuthResult::Invalid), 3);
}

#[test]
fn every_algorithm_verifies_with_its_key_and_a_jwks_picks_by_kid() {
    let origin = TestOrigin::start();
    let all = [
        Algorithm::HS256,
        Algorithm::HS384,
        Algorithm::HS512,
        Algorithm::RS256,
        Algorithm::RS384,
        Algorithm::RS512,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];
    for alg in all {
        let mut config = test_config(&origin.url());
        if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            config.auth.jwt_secret_file = Some(secret_file(&format!("{alg:?}")));
        } else {
            config.auth.jwt_public_key = Some(public_key_file(alg));
        }
        if !matches!(alg, Algorithm::ES256 | Algorithm::ES384 | Algorithm::EdDSA) {
            config.auth.jwt_algorithm = Some(format!("{alg:?}"));
        }
        let gw = start_gateway(config);
        let (_, head) = upgrade_with(
            gw.local_addr(),
            "/",
            &bearer(&mint(alg, &claims_for(600), None)),
        );
        assert_eq!(status_of(&head), 101, "{alg:?}: {head}");
    }
    let jwks = [
        Algorithm::RS256,
        Algorithm::PS256,
        Algorithm::ES256,
        Algorithm::ES384,
        Algorithm::EdDSA,
    ];
    let mut config = test_config(&origin.url());
    config.auth.jwks_file = Some(jwks_file("every", &jwks));
    let gw = start_gateway(config);
    for alg in jwks {
        let kid = format!("{alg:?}");
        let token = mint(alg, &claims_for(600), Some(&kid));
        let (_, head) = upgrade_with(gw.local_addr(), "/", &bearer(&token));
        assert_eq!(status_of(&head), 101, "JWKS {alg:?}: {head}");
    }
    for (name, token) in [
        (
            "unknown kid",
            mint(Algorithm::ES256, &claims_for(600), Some("nobody")),
        ),
        ("no kid", mint(Algorithm::ES256, &claims_for(600), None)),
        (
            "kid of another alg",
            mint(Algorithm::ES256, &claims_for(600), Some("ES384")),
        ),
    ] {
        let (_, head) = upgrade_with(gw.local_addr(), "/", &bearer(&token));
        assert_eq!(status_of(&head), 401, "{name}: {head}");
    }
}

#[test]
fn a_token_comes_from_a_header_query_cookie_or_subprotocol_and_never_goes_upstream() {
    let origin = TestOrigin::start();
    let mut config = hs256_gateway(&origin, "sources");
    config.pass_query = true;
    config.query_params = vec!["symbol".into()];
    config.auth.token_cookie = Some("wsgate_token".into());
    config.subprotocols = vec!["feed.v1".into()];
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    let token = mint(Algorithm::HS256, &good_claims(), None);
    let ways = [
        ("header", "/?symbol=btc".to_owned(), bearer(&token)),
        (
            "query",
            format!("/?symbol=btc&access_token={token}"),
            String::new(),
        ),
        (
            "cookie",
            "/?symbol=btc".to_owned(),
            format!("Cookie: a=1; wsgate_token={token}\r\n"),
        ),
        (
            "subprotocol",
            "/?symbol=btc".to_owned(),
            format!("Sec-WebSocket-Protocol: feed.v1, bearer.{token}\r\n"),
        ),
    ];
    let mut streams = Vec::new();
    for (name, target, extra) in &ways {
        let (stream, head) = upgrade_with(addr, target, extra);
        assert_eq!(status_of(&head), 101, "{name}: {head}");
        assert!(
            !head.contains(&token),
            "{name}: the token came back: {head}"
        );
        streams.push(stream);
    }
    let (fifth, head) = upgrade_with(addr, "/?symbol=btc", &ways[3].2);
    streams.push(fifth);
    assert!(
        head.contains("Sec-WebSocket-Protocol: feed.v1\r\n"),
        "{head}"
    );
    wait_until("the clients to be placed", || gw.stats().clients == 5);
    wait_until("the origin connection", || origin.accepted() >= 1);
    for event in origin.events() {
        if let OriginEvent::Connected { uri, headers, .. } = event {
            assert!(
                uri.ends_with("?symbol=btc"),
                "only the lobby key goes upstream: {uri}"
            );
            for (name, value) in headers {
                assert!(!value.contains(&token), "{name} carried the token upstream");
            }
        }
    }
}

#[test]
fn a_token_opens_only_the_routes_and_keys_its_claim_lists() {
    let origin = TestOrigin::start();
    let mut config = hs256_gateway(&origin, "claims");
    config.routes = vec![RouteConfig::new("/trades", &origin.url()), {
        let mut book = RouteConfig::new("/book", &origin.url());
        book.pass_query = Some(true);
        book.query_params = Some(vec!["symbol".into(), "depth".into()]);
        book
    }];
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    let token = |allowed: serde_json::Value| {
        let mut claims = good_claims();
        claims["wsgate"] = allowed;
        mint(Algorithm::HS256, &claims, None)
    };
    let btc = token(json!(["/book?symbol=btc&depth=5"]));
    let book = token(json!(["/book"]));
    let any = token(json!(["*"]));
    let cases = [
        (&btc, "/book?depth=5&symbol=btc", 101),
        (&btc, "/book?symbol=eth&depth=5", 403),
        (&btc, "/book?symbol=btc", 403),
        (&btc, "/trades", 403),
        (&book, "/book?symbol=eth", 101),
        (&book, "/trades", 403),
        (&any, "/trades", 101),
    ];
    for (token, target, status) in cases {
        let (_, head) = upgrade_with(addr, target, &bearer(token));
        assert_eq!(status_of(&head), status, "{target}: {head}");
    }
    assert_eq!(gw.stats().auth(AuthResult::Forbidden), 4);
}

#[test]
fn a_client_is_closed_with_4401_when_its_token_expires_and_others_stay() {
    let origin = Arc::new(TestOrigin::start());
    let mut config = test_config(&origin.url());
    config.auth.jwt_secret_file = Some(secret_file("expiry"));
    config.auth.jwt_leeway = Duration::ZERO;
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    let exp = now() + 2;
    let short = mint(Algorithm::HS256, &json!({ "exp": exp }), None);
    let long = mint(Algorithm::HS256, &claims_for(3600), None);
    let mut expiring = client_at_with(addr, &short);
    let mut staying = client_at_with(addr, &long);
    wait_clients(&gw, 2);
    let feed = Feed::start(Arc::clone(&origin), Duration::from_millis(50));
    // It reads what was queued for it, then the close.
    let mut got = 0;
    let close = loop {
        match expiring.read() {
            Ok(Message::Text(_)) => got += 1,
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(e) => panic!("read failed before the close: {e}"),
        }
    };
    let closed_at = now();
    let frame = close.expect("a close frame");
    assert_eq!(u16::from(frame.code), 4401);
    assert_eq!(frame.reason.as_str(), "token expired");
    assert!(got > 0, "it received the feed until its expiry");
    // The promise: closed at exp plus the leeway (0 here); seconds are
    // whole, so a second either side, and 2 s of margin for the machine.
    assert!(
        closed_at + 1 >= exp,
        "closed at {closed_at}, before its exp {exp}"
    );
    assert!(
        closed_at <= exp + 3,
        "closed at {closed_at}, long after its exp {exp}"
    );
    let before = recv_past_warm(&mut staying);
    assert!(!before.is_empty());
    thread::sleep(Duration::from_millis(300));
    assert!(
        !recv_text(&mut staying).is_empty(),
        "the long-lived client keeps receiving"
    );
    feed.stop();
    wait_until("the expiry to be counted", || {
        gw.stats().disconnected(Disconnect::TokenExpired) == 1
    });
}

/// A WebSocket client presenting `token` in its `Authorization` header.
fn client_at_with(addr: std::net::SocketAddr, token: &str) -> Client {
    use tungstenite::client::IntoClientRequest;
    let stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    let mut request = format!("ws://{addr}/")
        .into_client_request()
        .expect("request");
    request.headers_mut().insert(
        "Authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    tungstenite::client(request, stream).expect("upgrade").0
}

/// A gateway whose route `/` asks `service`, and whose route `/public`
/// asks nobody.
fn service_gateway(origin: &TestOrigin, service: &AuthService, timeout: Duration) -> Config {
    let mut config = test_config(&origin.url());
    config.auth.url = Some(service.url());
    config.auth.timeout = timeout;
    let mut public = RouteConfig::new("/public", &origin.url());
    public.auth = Some(AuthConfig::default());
    config.routes = vec![RouteConfig::new("/", &origin.url()), public];
    config.origin = String::new();
    config
}

#[test]
fn the_auth_service_admits_denies_and_hears_what_the_client_sent() {
    let origin = TestOrigin::start();
    let yes = AuthService::start(AuthBehaviour::default());
    let gw = start_gateway(service_gateway(&origin, &yes, Duration::from_secs(2)));
    let (_, head) = upgrade_with(
        gw.local_addr(),
        "/?room=1",
        "Cookie: session=abc\r\nAuthorization: Bearer xyz\r\nOrigin: https://app.example\r\n",
    );
    assert_eq!(status_of(&head), 101, "{head}");
    let asked = yes.heads.lock().unwrap()[0].clone();
    for line in [
        "X-Original-URI: /?room=1",
        "Cookie: session=abc",
        "Authorization: Bearer xyz",
        "Origin: https://app.example",
        "X-Forwarded-For: 127.0.0.1",
    ] {
        assert!(
            asked.to_lowercase().contains(&line.to_lowercase()),
            "{line:?} not in {asked}"
        );
    }
    for status in [401, 403] {
        let no = AuthService::start(AuthBehaviour {
            status,
            ..AuthBehaviour::default()
        });
        let gw = start_gateway(service_gateway(&origin, &no, Duration::from_secs(2)));
        let (_, head) = upgrade_with(gw.local_addr(), "/", "Cookie: session=abc\r\n");
        assert_eq!(status_of(&head), status, "{head}");
        assert_eq!(gw.stats().auth(AuthResult::Denied), 1);
        assert_eq!(gw.stats().clients, 0);
    }
    let odd = AuthService::start(AuthBehaviour {
        status: 500,
        ..AuthBehaviour::default()
    });
    let gw = start_gateway(service_gateway(&origin, &odd, Duration::from_secs(2)));
    let (_, head) = upgrade_with(gw.local_addr(), "/", "");
    assert_eq!(status_of(&head), 503, "another status fails closed: {head}");
    assert_eq!(gw.stats().auth(AuthResult::Error), 1);
}

#[test]
fn the_auth_service_is_asked_over_kept_alive_connections() {
    let origin = TestOrigin::start();
    let service = AuthService::start(AuthBehaviour::default());
    let gw = start_gateway(service_gateway(&origin, &service, Duration::from_secs(2)));
    for i in 0..20 {
        let (_, head) = upgrade_with(gw.local_addr(), "/", &format!("Cookie: s={i}\r\n"));
        assert_eq!(status_of(&head), 101, "{head}");
    }
    let requests = service.requests.load(std::sync::atomic::Ordering::SeqCst);
    let connections = service
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(requests, 20, "20 credentials, 20 questions");
    // At most one connection per auth thread (4), each asked many times.
    assert!(
        connections <= 4,
        "{connections} connections for {requests} requests"
    );
}

#[test]
fn what_the_auth_service_allows_and_when_it_expires_is_kept() {
    let origin = Arc::new(TestOrigin::start());
    let expires = now() + 2;
    let service = AuthService::start(AuthBehaviour {
        headers: format!("X-Wsgate-Allow: /, /public\r\nX-Wsgate-Expires: {expires}\r\n"),
        ..AuthBehaviour::default()
    });
    let mut config = service_gateway(&origin, &service, Duration::from_secs(2));
    let mut other = RouteConfig::new("/other", &origin.url());
    other.auth = Some(config.auth.clone());
    config.routes.push(other);
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    let cookie = "Cookie: session=listed\r\n";
    let (stream, head) = upgrade_with(addr, "/", cookie);
    assert_eq!(status_of(&head), 101, "{head}");
    // The same credentials for a route the service did not list: asked
    // again (the remembered yes does not cover it), and refused.
    let (_, head) = upgrade_with(addr, "/other", cookie);
    assert_eq!(status_of(&head), 403, "{head}");
    assert_eq!(gw.stats().auth(AuthResult::Forbidden), 1);
    // Its access ends when the service said: 4401 after what is queued.
    let mut client =
        tungstenite::WebSocket::from_raw_socket(stream, tungstenite::protocol::Role::Client, None);
    let feed = Feed::start(Arc::clone(&origin), Duration::from_millis(50));
    let close = loop {
        match client.read() {
            Ok(Message::Close(frame)) => break frame,
            Ok(_) => {}
            Err(e) => panic!("read failed before the close: {e}"),
        }
    };
    let closed_at = now();
    feed.stop();
    assert_eq!(close.map(|f| u16::from(f.code)), Some(4401));
    // Seconds are whole: a second either side, and 2 s for the machine.
    assert!(
        closed_at + 1 >= expires && closed_at <= expires + 3,
        "closed at {closed_at}, expiry {expires}"
    );
}

#[test]
fn a_reload_that_cannot_read_the_key_keeps_the_running_one_and_counts_it() {
    let origin = TestOrigin::start();
    let path = secret_file("reload");
    let mut config = test_config(&origin.url());
    config.auth.jwt_secret_file = Some(path.clone());
    let gw = start_gateway(config.clone());
    let old = mint(jsonwebtoken::Algorithm::HS256, &claims_for(600), None);
    let admitted = |token: &str| {
        let (_, head) = upgrade_with(gw.local_addr(), "/", &bearer(token));
        status_of(&head)
    };
    assert_eq!(admitted(&old), 101);
    // A secret too short to use: the reload applies, the old key stays.
    std::fs::write(&path, "short\n").unwrap();
    gw.reload(config.clone())
        .expect("the configuration itself is valid");
    assert_eq!(gw.stats().auth_key_failures, 1);
    assert_eq!(admitted(&old), 101, "the running key still verifies");
    // A new secret: tokens of the old one are refused from now on.
    let new_secret = b"another-secret-for-the-reload-test-0123456789";
    std::fs::write(&path, new_secret).unwrap();
    gw.reload(config).expect("a valid configuration");
    assert_eq!(gw.stats().auth_key_failures, 1);
    assert_eq!(admitted(&old), 401, "the old key is gone");
    let new = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims_for(600),
        &jsonwebtoken::EncodingKey::from_secret(new_secret),
    )
    .unwrap();
    assert_eq!(admitted(&new), 101);
    // A route added by a reload with an unreadable key fails the reload.
    let _ = std::fs::remove_file(&path);
    let mut broken = test_config(&origin.url());
    broken.auth.jwt_secret_file = Some(path);
    broken.routes = vec![RouteConfig::new("/new", &origin.url())];
    assert!(
        gw.reload(broken).is_err(),
        "no running key to keep for /new"
    );
}

#[test]
fn a_slow_or_absent_auth_service_gets_503_and_the_acceptor_goes_on() {
    let origin = TestOrigin::start();
    let slow = AuthService::start(AuthBehaviour {
        delay: Duration::from_secs(5),
        ..AuthBehaviour::default()
    });
    let timeout = Duration::from_millis(500);
    let gw = start_gateway(service_gateway(&origin, &slow, timeout));
    let addr = gw.local_addr();
    let started = Instant::now();
    let waiting = thread::spawn(move || upgrade_with(addr, "/", "Cookie: session=slow\r\n").1);
    wait_until("the auth request to reach the service", || {
        !slow.heads.lock().unwrap().is_empty() || gw.stats().handshakes_pending == 1
    });
    // Meanwhile a client of the public route upgrades: the acceptor is not
    // waiting on the auth service.
    let public_started = Instant::now();
    let (_, head) = upgrade_with(addr, "/public", "");
    let public_took = public_started.elapsed();
    assert_eq!(status_of(&head), 101, "{head}");
    let head = waiting.join().unwrap();
    let took = started.elapsed();
    assert_eq!(status_of(&head), 503, "{head}");
    assert!(
        slow.answered.lock().unwrap().is_empty(),
        "the 503 came before the service answered"
    );
    assert!(
        took >= timeout,
        "503 after {took:?}, before the {timeout:?} timeout"
    );
    println!("public upgrade meanwhile: {public_took:?}; the slow one's 503 after {took:?}");
    assert_eq!(gw.stats().auth(AuthResult::Timeout), 1);

    // An auth service that is not there.
    let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/check", gone.local_addr().unwrap());
    drop(gone);
    let mut config = test_config(&origin.url());
    config.auth.url = Some(url);
    let gw = start_gateway(config);
    let (_, head) = upgrade_with(gw.local_addr(), "/", "");
    assert_eq!(status_of(&head), 503, "{head}");
    assert_eq!(gw.stats().auth(AuthResult::Error), 1);
}

#[test]
fn a_reconnect_storm_with_one_cookie_asks_the_service_once_per_ttl() {
    let origin = TestOrigin::start();
    let service = AuthService::start(AuthBehaviour::default());
    let mut config = service_gateway(&origin, &service, Duration::from_secs(2));
    config.auth.cache_ttl = Duration::from_secs(30);
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    let started = Instant::now();
    let storm: Vec<_> = (0..4)
        .map(|_| {
            thread::spawn(move || {
                for _ in 0..250 {
                    let (_, head) = upgrade_with(addr, "/", "Cookie: session=storm\r\n");
                    assert_eq!(status_of(&head), 101, "{head}");
                }
            })
        })
        .collect();
    for thread in storm {
        thread.join().unwrap();
    }
    let took = started.elapsed();
    let asked = service.requests.load(std::sync::atomic::Ordering::SeqCst);
    println!("1000 reconnects in {took:?}: {asked} auth requests");
    assert!(asked >= 1);
    assert!(
        asked as u64 <= took.as_secs() / 30 + 1,
        "{asked} requests in {took:?} with a 30 s ttl"
    );
    assert_eq!(gw.stats().auth(AuthResult::Ok), 1000);
    // Another cookie is another credential.
    let (_, head) = upgrade_with(addr, "/", "Cookie: session=other\r\n");
    assert_eq!(status_of(&head), 101, "{head}");
    wait_until("the second credential's request", || {
        service.requests.load(std::sync::atomic::Ordering::SeqCst) == asked + 1
    });
}

#[test]
fn a_full_auth_queue_answers_503_at_once() {
    let origin = TestOrigin::start();
    let slow = AuthService::start(AuthBehaviour {
        delay: Duration::from_secs(2),
        ..AuthBehaviour::default()
    });
    // Long enough for the second to wait out the first's answer, then its own.
    let mut config = service_gateway(&origin, &slow, Duration::from_secs(10));
    config.auth_threads = 1;
    config.auth_queue = 1;
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    // Distinct cookies, so three questions: the one thread takes the
    // first, the queue of one holds the second, the third is refused.
    let ask = move |cookie: &str| {
        let cookie = format!("Cookie: s={cookie}\r\n");
        thread::spawn(move || upgrade_with(addr, "/", &cookie).1)
    };
    let first = ask("first");
    wait_until("the auth thread to take the first", || {
        slow.heads.lock().unwrap().len() == 1
    });
    let second = ask("second");
    wait_until("the second to wait in the queue", || {
        gw.stats().handshakes_pending == 2
    });
    let (_, head) = upgrade_with(addr, "/", "Cookie: s=third\r\n");
    assert_eq!(status_of(&head), 503, "{head}");
    assert!(
        slow.answered.lock().unwrap().is_empty(),
        "refused before any answer"
    );
    assert_eq!(gw.stats().auth(AuthResult::Overloaded), 1);
    for waiting in [first, second] {
        assert_eq!(status_of(&waiting.join().unwrap()), 101);
    }
}

#[cfg(feature = "admin")]
#[test]
fn the_admin_server_asks_for_its_token_and_counts_auth_by_route() {
    let origin = TestOrigin::start();
    let mut config = hs256_gateway(&origin, "admin");
    let token_file = std::env::temp_dir().join(format!("wsgate-admin-{}", std::process::id()));
    std::fs::write(&token_file, "operator-token-0123456789\n").unwrap();
    config.admin = Some("127.0.0.1:0".parse().unwrap());
    config.admin_token_file = Some(token_file);
    let gw = start_gateway(config);
    let admin = gw.admin_addr().unwrap();
    let (_, head) = upgrade_with(gw.local_addr(), "/", "");
    assert_eq!(status_of(&head), 401);
    let get = |path: &str, auth: &str| {
        http_exchange(
            admin,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n"),
        )
    };
    for path in ["/metrics", "/lobbies"] {
        let answer = get(path, "");
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
        let answer = get(path, "Authorization: Bearer wrong-token-0123456789\r\n");
        assert!(answer.starts_with("HTTP/1.1 401"), "{path}: {answer}");
    }
    assert!(get("/livez", "").starts_with("HTTP/1.1 200"));
    let metrics = get(
        "/metrics",
        "Authorization: Bearer operator-token-0123456789\r\n",
    );
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains(r#"wsgate_auth_total{route="/",result="missing"} 1"#),
        "{metrics}"
    );
}
