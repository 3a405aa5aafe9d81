//! The issue-26 goal, in a browser: a page in headless Chromium follows a
//! `redis+stream://` route across a restart of the gateway process
//! (SIGTERM, then a new process on the same port), once with an
//! `EventSource` and once with `examples/resume.js` (a WebSocket with the
//! `wsgate.resume.v1` subprotocol, resuming with `last_event_id`). The new
//! process has an empty history, so the ID the page hands back is served
//! from the stream itself (`XRANGE`): the page sees every message once, in
//! order, and no reset. Real processes, a real `redis-server`; counts and
//! order, never speed.

mod support;

use std::{
    net::SocketAddr,
    thread,
    time::{Duration, Instant},
};

use support::*;

/// A page that runs `client` (a script that follows the gateway) and
/// reports, as page `way`, what it calls: `opened()` on each
/// (re)connection, `message(data)` on each message (reported with all of
/// them so far, in order) and `reset()` on a reset.
fn page(way: &str, client: &str) -> String {
    format!(
        r#"<!doctype html><title>wsgate stream resume</title><script>
const got = [];
let opens = 0;
function report(event) {{
  const q = new URLSearchParams({{ way: "{way}", event, got: got.join("_") }});
  fetch("/report?" + q, {{ cache: "no-store" }});
}}
function opened() {{ opens += 1; report("open-" + opens); }}
function message(data) {{ got.push(data); report("got-" + got.length); }}
function reset() {{ report("reset"); }}
</script><script>{client}</script>"#
    )
}

/// An `EventSource` on the gateway at `addr`.
fn event_source(addr: SocketAddr) -> String {
    format!(
        r#"const source = new EventSource("http://{addr}/");
source.onopen = opened;
source.onmessage = (e) => message(e.data);
source.addEventListener("reset", reset);"#
    )
}

/// `examples/resume.js` on the gateway at `addr`, called as its comment
/// shows: it reconnects with backoff and resumes with `last_event_id`.
fn example_client(addr: SocketAddr) -> String {
    format!(
        r#"{}
wsgateResume("ws://{addr}/", {{ onOpen: opened, onReset: reset, onMessage: message }});"#,
        include_str!("../examples/resume.js")
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

/// Waits for page `way` to report its `n`th message; fails at once, with
/// every report, if it reports a reset instead, and past [`DEADLINE`] with
/// its last report.
#[track_caller]
fn wait_got(pages: &Pages, way: &str, n: usize) -> Report {
    let event = format!("got-{n}");
    let end = Instant::now() + DEADLINE;
    loop {
        let reports = pages.reports();
        assert!(
            !reports.iter().any(|r| r.is(way, "reset")),
            "the {way} page got the reset, waiting for {event}: {reports:?}"
        );
        if let Some(report) = reports.iter().find(|r| r.is(way, &event)) {
            return report.clone();
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for the {way} page to report {event}; its last report: {:?}",
            reports.last()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The page's messages so far, from a report.
fn got(report: &Report) -> Vec<String> {
    report.get("got").split('_').map(str::to_owned).collect()
}

#[test]
fn event_source_in_chromium_loses_nothing_across_a_gateway_restart() {
    follow_across_a_restart("sse", event_source);
}

#[test]
fn the_example_client_in_chromium_loses_nothing_across_a_gateway_restart() {
    follow_across_a_restart("resume", example_client);
}

/// Page `way`, running `client` (given the gateway's address) in headless
/// Chromium, follows stream `events` while entries 1 to 30 are added: 1-10
/// with the first gateway process up, 11-20 while it is stopped (SIGTERM)
/// and none runs, 21-30 once a new process listens on the same port. The
/// page must report every number once, in order, two (re)connections and
/// no reset. Only ten entries are added while no gateway runs: a resume
/// read again from the stream serves at most a queue's worth of entries
/// (16 for a WebSocket resume client by default, `--queue-depth`; 32 for an
/// event stream), and more would be the reset.
fn follow_across_a_restart(way: &str, client: fn(SocketAddr) -> String) {
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
    let pages = Pages::start(vec![("/", page(way, &client(addr)))]);
    let _browser = Browser::open(&chromium, &pages.url("/"));
    pages.wait_for(way, "open-1");
    wait_reading(&redis);
    xadd(&redis, 1..=10);
    let before = wait_got(&pages, way, 10);
    // The gateway stops; the stream goes on meanwhile.
    first.signal("TERM");
    let (code, log) = first.wait();
    assert_eq!(code, Some(0), "{log}");
    xadd(&redis, 11..=20);
    // A new process on the same port, its history empty.
    let _second = spawn(&args(&addr.to_string()));
    pages.wait_for(way, "open-2");
    let back = wait_got(&pages, way, 20);
    wait_reading(&redis);
    xadd(&redis, 21..=30);
    let after = wait_got(&pages, way, 30);
    let want: Vec<String> = (1..=30).map(|n| n.to_string()).collect();
    assert_eq!(got(&before), want[..10]);
    assert_eq!(got(&back), want[..20], "read again from the stream");
    assert_eq!(got(&after), want, "every message once, in order");
    assert!(
        !pages.reports().iter().any(|r| r.is(way, "reset")),
        "{:?}",
        pages.reports()
    );
    // Nothing more came (no duplicate after the last).
    thread::sleep(Duration::from_millis(200));
    assert!(!pages.reports().iter().any(|r| r.is(way, "got-31")));
}
