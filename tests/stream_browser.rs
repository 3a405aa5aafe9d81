//! The issue-26 goal, in a browser: headless Chromium's `EventSource` on a
//! `redis+stream://` route, across a restart of the gateway process
//! (SIGTERM, then a new process on the same port). The new process has an
//! empty history, so the page's `Last-Event-ID` is served from the stream
//! itself (`XRANGE`): the page sees every message once, in order, and no
//! reset. Real processes, a real `redis-server`; counts and order, never speed.

mod support;

use std::time::Duration;

use support::*;

/// A page that follows the event stream at `url` and reports each message
/// (all of them so far, in order), each (re)connection and each reset.
fn page(url: &str) -> String {
    format!(
        r#"<!doctype html><title>wsgate stream resume</title><script>
const got = [];
let opens = 0;
function report(event) {{
  const q = new URLSearchParams({{ way: "sse", event, got: got.join("_") }});
  fetch("/report?" + q, {{ cache: "no-store" }});
}}
const source = new EventSource("{url}");
source.onopen = () => {{ opens += 1; report("open-" + opens); }};
source.onmessage = (e) => {{ got.push(e.data); report("got-" + got.length); }};
source.addEventListener("reset", () => report("reset"));
</script>"#
    )
}

/// Adds entries with field `data` to stream `events`, numbered `numbers`.
fn xadd(redis: &RedisServer, numbers: std::ops::RangeInclusive<u32>) {
    let mut con = redis.connect().expect("connect");
    for n in numbers {
        redis::cmd("XADD")
            .arg("events")
            .arg("*")
            .arg("data")
            .arg(n)
            .exec(&mut con)
            .expect("XADD");
    }
}

/// Waits until a lobby of a gateway reads the stream (its connection sits
/// in `XREAD`): entries added from now on reach it.
fn wait_reading(redis: &RedisServer) {
    wait_until("a lobby reading the stream", || {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(&mut redis.connect().expect("connect"))
            .expect("CLIENT LIST");
        list.lines()
            .any(|l| l.contains(" name=wsgate-lobby-") && l.contains(" cmd=xread"))
    });
}

/// The page's messages so far, from a report.
fn got(report: &Report) -> Vec<String> {
    report.get("got").split('_').map(str::to_owned).collect()
}

#[test]
fn event_source_in_chromium_loses_nothing_across_a_gateway_restart() {
    let Some(chromium) = chromium() else {
        return;
    };
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let origin = redis.stream_url("events");
    let args = |listen: &str| -> Vec<String> {
        [
            "--listen",
            listen,
            "--origin",
            &origin,
            "--drain-timeout",
            "250ms",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let spawn = |args: &[String]| {
        GatewayProcess::spawn(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let first = spawn(&args("127.0.0.1:0"));
    let addr = first.addr;
    let pages = Pages::start(vec![("/", page(&format!("http://{addr}/")))]);
    let _browser = Browser::open(&chromium, &pages.url("/"));
    pages.wait_for("sse", "open-1");
    wait_reading(&redis);
    xadd(&redis, 1..=10);
    let before = pages.wait_for("sse", "got-10");
    // The gateway stops; the stream goes on meanwhile.
    first.signal("TERM");
    let (code, log) = first.wait();
    assert_eq!(code, Some(0), "{log}");
    xadd(&redis, 11..=20);
    // A new process on the same port, its history empty.
    let _second = spawn(&args(&addr.to_string()));
    pages.wait_for("sse", "open-2");
    let back = pages.wait_for("sse", "got-20");
    wait_reading(&redis);
    xadd(&redis, 21..=30);
    let after = pages.wait_for("sse", "got-30");
    let want: Vec<String> = (1..=30).map(|n| n.to_string()).collect();
    assert_eq!(got(&before), want[..10]);
    assert_eq!(got(&back), want[..20], "read again from the stream");
    assert_eq!(got(&after), want, "every message once, in order");
    assert!(
        !pages.reports().iter().any(|r| r.is("sse", "reset")),
        "{:?}",
        pages.reports()
    );
    // Nothing more came (no duplicate after the last).
    std::thread::sleep(Duration::from_millis(200));
    assert!(!pages.reports().iter().any(|r| r.is("sse", "got-31")));
}
