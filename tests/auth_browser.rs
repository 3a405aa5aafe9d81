//! Client authentication from a real browser: headless Chromium opens a
//! WebSocket to a route that checks HS256 tokens, with its token in the
//! query (`?access_token=`) or in a cookie (browsers cannot set headers on
//! a WebSocket), and without one; then the admin dashboard's auth tile
//! shows what happened. Pages are served from loopback by a small HTTP
//! server in the test, and report what they saw back to it.

mod support;

use jsonwebtoken::Algorithm;
use support::*;
use tungstenite::Message;
use wsgate::AuthResult;

/// Messages the origin sends to each page that gets in.
const N: usize = 5;

/// The cookie the route reads a token from.
const COOKIE: &str = "wsgate_token";

#[test]
fn chromium_gets_in_with_a_query_or_cookie_token_and_is_refused_without_one() {
    let Some(chromium) = find_on_path("chromium") else {
        println!("skipped: chromium not found (apt-get install chromium)");
        return;
    };
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.auth.jwt_secret_file = Some(secret_file("browser"));
    config.auth.token_cookie = Some(COOKIE.into());
    // The query keys lobbies, so a token in it would reach the origin URL
    // if it were ever kept in the key.
    config.pass_query = true;
    config.query_params = vec!["symbol".into()];
    config.admin = Some("127.0.0.1:0".parse().expect("an address"));
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    let token = mint(Algorithm::HS256, &claims_for(600), None);
    let signature = token.rsplit('.').next().expect("a signature").to_owned();

    let ws = |query: &str| format!("ws://{addr}/?symbol=btc{query}");
    let pages = Pages::start(vec![
        (
            "/query",
            page("query", &ws(&format!("&access_token={token}")), ""),
        ),
        (
            "/cookie",
            page(
                "cookie",
                &ws(""),
                &format!("document.cookie = \"{COOKIE}={token}; path=/; SameSite=Lax\";"),
            ),
        ),
        ("/none", page("none", &ws(""), "")),
    ]);

    for way in ["query", "cookie"] {
        // A fresh profile each: the cookie page's cookie stays with it.
        let browser = Browser::open(&chromium, &pages.url(&format!("/{way}")));
        let opened = pages.wait_for(way, "open");
        assert_eq!(opened.get("opened"), "true", "{way}: {opened:?}");
        wait_placed(&gw, 1);
        wait_until("an origin connection", || origin.open() >= 1);
        for n in 1..=N {
            origin.send(Message::text(format!("{way}-{n}")));
        }
        let received = pages.wait_for(way, "received");
        let expected: Vec<String> = (1..=N).map(|n| format!("{way}-{n}")).collect();
        assert_eq!(
            received.get("got"),
            expected.join("_"),
            "{way}: {received:?}"
        );
        drop(browser);
        wait_until(&format!("the {way} client gone"), || {
            gw.stats().clients == 0
        });
    }
    assert!(gw.stats().auth(AuthResult::Ok) >= 2, "{:?}", gw.stats());

    let browser = Browser::open(&chromium, &pages.url("/none"));
    let closed = pages.wait_for_prefix("none", "close-");
    drop(browser);
    assert_eq!(closed.get("opened"), "false", "{closed:?}");
    assert_eq!(closed.get("event"), "close-1006", "{closed:?}");
    assert!(
        pages.reports().iter().any(|r| r.is("none", "error")),
        "the page saw no error event: {:?}",
        pages.reports()
    );
    assert!(!pages.reports().iter().any(|r| r.is("none", "open")));
    assert!(
        gw.stats().auth(AuthResult::Missing) >= 1,
        "{:?}",
        gw.stats()
    );

    // Upstream, only the lobby key: no token in any request URI or header.
    let mut upstreams = 0;
    for event in origin.events() {
        if let OriginEvent::Connected { uri, headers, .. } = event {
            upstreams += 1;
            assert_eq!(uri, "/feed?symbol=btc", "only the lobby key goes upstream");
            for (name, value) in headers {
                assert!(
                    !value.contains(&signature) && !value.contains(COOKIE),
                    "{name} carried the token upstream: {value}"
                );
            }
        }
    }
    assert!(upstreams >= 1, "no upstream connection recorded");

    // The dashboard's auth tile: admitted and refused since start.
    let admin = gw.admin_addr().expect("an admin server");
    let dom = run_chromium(
        &chromium,
        &[
            "--virtual-time-budget=5000",
            "--dump-dom",
            &format!("http://{admin}/"),
        ],
    );
    let ok: u64 = attr_of(&dom, "auth-counts", "data-ok").parse().unwrap_or(0);
    let refused: u64 = attr_of(&dom, "auth-counts", "data-refused")
        .parse()
        .unwrap_or(0);
    assert!(ok >= 2, "data-ok {ok} in\n{dom}");
    assert!(refused >= 1, "data-refused {refused} in\n{dom}");
    println!("{upstreams} upstream connections; dashboard: {refused} refused / {ok} admitted");
    gw.shutdown();
}

/// A page that sets up (`setup`, JavaScript), opens a WebSocket to `url`
/// and reports to its server: `open`, `received` (with what it got) once it
/// has [`N`] messages, `error`, and `close-CODE`.
fn page(way: &str, url: &str, setup: &str) -> String {
    format!(
        r#"<!doctype html><title>wsgate auth {way}</title><script>
{setup}
const got = [];
let opened = false;
function report(event) {{
  const q = new URLSearchParams({{ way: "{way}", event, opened: String(opened), got: got.join("_") }});
  fetch("/report?" + q, {{ cache: "no-store" }});
}}
const ws = new WebSocket("{url}");
ws.onopen = () => {{ opened = true; report("open"); }};
ws.onmessage = (e) => {{ got.push(e.data); if (got.length === {N}) report("received"); }};
ws.onerror = () => report("error");
ws.onclose = (e) => report("close-" + e.code);
</script>"#
    )
}

/// The value of attribute `name` on the element with `id` ("" if none).
fn attr_of<'a>(html: &'a str, id: &str, name: &str) -> &'a str {
    let Some(at) = html.find(&format!("id=\"{id}\"")) else {
        return "";
    };
    let start = html[..at].rfind('<').unwrap_or(0);
    let end = html[at..].find('>').map_or(html.len(), |e| at + e);
    let tag = &html[start..end];
    let key = format!("{name}=\"");
    tag.split_once(&key)
        .and_then(|(_, rest)| rest.split_once('"'))
        .map_or("", |(value, _)| value)
}
