//! Redis sources against a real `redis-server` (one per test, on a free
//! loopback port): pub/sub fan-out and order, reconnects after the server
//! restarts or kills the gateway's connections, a silent server (stopped
//! with SIGSTOP) replaced, streams that lose nothing across reconnects (and
//! count what was trimmed or lacks the field), messages above the limit
//! skipped, binary payloads, credentials and databases, two gateway
//! processes on one channel, and (feature `sse`) event streams resuming
//! from the stream itself on a gateway whose history never held their ID.

mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use support::*;
use tungstenite::Message;
use wsgate::{Config, GatewayHandle};

fn redis_config(url: &str) -> Config {
    let mut config = test_config(url);
    config.origin_backoff_min = Duration::from_millis(50);
    config.origin_backoff_max = Duration::from_millis(300);
    config
}

/// Runs `publish` until one message reached `clients` members: every
/// client is then at the live edge of its lobby.
fn warm_up(gw: &GatewayHandle, clients: u64, mut publish: impl FnMut()) {
    let pushed = || -> (u64, u64) {
        let lobbies = gw.lobbies(DEADLINE);
        (
            lobbies.iter().map(|l| l.messages_in).sum(),
            lobbies.iter().map(|l| l.frames_out).sum(),
        )
    };
    let lobbies = gw.lobbies(DEADLINE).len() as u64;
    let end = Instant::now() + DEADLINE;
    loop {
        let (messages, frames) = pushed();
        publish();
        let took = Instant::now() + Duration::from_secs(2);
        while pushed().0 < messages + lobbies && Instant::now() < took {
            thread::sleep(Duration::from_millis(5));
        }
        let (now_messages, now_frames) = pushed();
        if now_messages == messages + lobbies && now_frames - frames == clients {
            // Wait for the writers too, so counts start from rest.
            wait_until("the warm-up delivered", || {
                gw.stats().frames_delivered == pushed().1
            });
            return;
        }
        assert!(Instant::now() < end, "clients never all joined");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a client's text messages, skipping the warm-up ones.
fn numbers(got: Vec<String>) -> Vec<String> {
    got.into_iter().skip_while(|m| m == "warm").collect()
}

#[test]
fn five_hundred_clients_over_three_lobbies_get_every_message_in_order() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const CLIENTS: usize = 500;
    const N: u64 = 100;
    let mut config = redis_config(&redis.channel_url("prices"));
    config.lobby_capacity = 170;
    let gw = start_gateway(config);
    let mut clients = connect_clients(&gw, CLIENTS);
    wait_until("three subscriptions", || gw.stats().origin_connections == 3);
    let mut con = redis.connect().expect("connect");
    warm_up(&gw, CLIENTS as u64, || {
        redis.publish(&mut con, "prices", "warm");
    });
    let delivered = gw.stats().frames_delivered;

    for n in 1..=N {
        assert_eq!(redis.publish(&mut con, "prices", &n.to_string()), 3);
        if n % 10 == 0 {
            wait_until("the burst delivered", || {
                gw.stats().frames_delivered == delivered + CLIENTS as u64 * n
            });
        }
    }
    expect_numbered(&mut clients, N);
    let stats = gw.stats();
    assert_eq!(stats.frames_dropped, 0);
    assert_eq!(stats.origin_failures(), 0);
    assert_eq!(gw.lobbies(DEADLINE).len(), 3);
}

#[test]
fn lobbies_reconnect_when_redis_restarts_and_clients_stay() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let gw = start_gateway(redis_config(&redis.channel_url("feed")));
    let mut clients = connect_clients(&gw, 5);
    wait_until("subscribed", || gw.stats().origin_connections == 1);
    let mut con = redis.connect().expect("connect");
    warm_up(&gw, 5, || {
        redis.publish(&mut con, "feed", "warm");
    });

    let port = redis.kill();
    wait_until("the lobby to notice", || gw.stats().origin_connections == 0);
    wait_until("a reconnect refused while the server is down", || {
        gw.stats().origin_failed_connect >= 1
    });
    let redis = RedisServer::start_on(port, &[]).expect("restart on the same port");
    wait_until("the lobby to resubscribe", || {
        gw.stats().origin_connections == 1
    });
    assert_eq!(gw.stats().clients, 5, "clients stayed connected");
    let mut con = redis.connect().expect("connect");
    wait_until("the subscription in place", || {
        redis.publish(&mut con, "feed", "warm") == 1
    });
    redis.publish(&mut con, "feed", "after");
    for c in &mut clients {
        assert_eq!(recv_past_warm(c), "after");
    }
    let stats = gw.stats();
    assert!(stats.origin_lost >= 1, "{stats:?}");
    assert!(stats.origin_connected >= 2, "{stats:?}");
}

#[test]
fn killed_subscriptions_are_replaced_with_backoff() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut config = redis_config(&redis.channel_url("feed"));
    config.lobby_capacity = 2;
    let gw = start_gateway(config);
    let mut clients = connect_clients(&gw, 4);
    wait_until("two subscriptions", || gw.stats().origin_connections == 2);
    let mut con = redis.connect().expect("connect");
    for round in 1..=3 {
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query(&mut con)
            .expect("CLIENT KILL");
        assert_eq!(killed, 2, "round {round}");
        wait_until("both lobbies to resubscribe", || {
            redis.publish(&mut con, "feed", "warm") == 2
        });
    }
    redis.publish(&mut con, "feed", "after");
    for c in &mut clients {
        assert_eq!(recv_past_warm(c), "after");
    }
    let stats = gw.stats();
    assert_eq!(stats.origin_lost, 6, "{stats:?}");
    assert_eq!(stats.clients, 4);
}

/// Adds `"1"`, `"2"`, … to a stream every `every` until stopped.
struct StreamFeed {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<u64>,
}

impl StreamFeed {
    fn start(redis: &RedisServer, key: &'static str, every: Duration) -> StreamFeed {
        let mut con = redis.connect().expect("connect");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let mut n = 0;
            while !flag.load(Ordering::SeqCst) {
                n += 1;
                redis::cmd("XADD")
                    .arg(key)
                    .arg("*")
                    .arg("data")
                    .arg(n.to_string())
                    .exec(&mut con)
                    .expect("XADD");
                thread::sleep(every);
            }
            n
        });
        StreamFeed { stop, thread }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("feed")
    }
}

#[test]
fn a_stream_loses_nothing_when_the_gateways_connections_are_killed() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut config = redis_config(&redis.stream_url("events"));
    config.lobby_capacity = 10;
    // A reconnecting lobby reads the backlog (up to 150 entries here) as
    // fast as Redis sends it: client queues must hold it, or a client
    // that is not written to in time loses the oldest (the slow-client
    // policy, not the source). Deep queues keep this test about the source.
    config.queue_depth = 256;
    let gw = start_gateway(config);
    let clients = connect_clients(&gw, 20);
    wait_until("two stream readers", || gw.stats().origin_connections == 2);
    let mut con = redis.connect().expect("connect");
    warm_up(&gw, 20, || {
        redis::cmd("XADD")
            .arg("events")
            .arg("*")
            .arg("data")
            .arg("warm")
            .exec(&mut con)
            .expect("XADD");
    });
    let readers: Vec<Reader> = clients.into_iter().map(Reader::spawn).collect();
    // Entries each lobby has read, by lobby id.
    let read = || -> Vec<u64> {
        let mut lobbies = gw.lobbies(DEADLINE);
        lobbies.sort_by_key(|l| l.id);
        lobbies.iter().map(|l| l.messages_in).collect()
    };
    // Until each lobby has read `n` more entries than it had.
    let read_on = |what: &str, n: u64| {
        let before = read();
        wait_until(what, || {
            read()
                .iter()
                .zip(&before)
                .all(|(now, then)| *now >= then + n)
        });
    };
    let warm = read();

    let feed = StreamFeed::start(&redis, "events", Duration::from_millis(2));
    for round in 1..=3 {
        read_on("both lobbies reading the feed", 20);
        let ids = redis.gateway_clients();
        assert_eq!(ids.len(), 2, "round {round}: {ids:?}");
        for id in ids {
            redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .exec(&mut con)
                .expect("CLIENT KILL");
        }
        // The feed goes on while the lobbies back off and reconnect.
        wait_until("both lobbies to reconnect", || {
            gw.stats().origin_connected == 2 + 2 * round
        });
    }
    read_on("both lobbies reading the feed after the last reconnect", 20);
    let last = feed.stop();
    // Both lobbies read to the end, and the writers wrote it all.
    wait_until("both lobbies to read to the end", || {
        read()
            .iter()
            .zip(&warm)
            .all(|(now, then)| *now >= then + last)
    });
    wait_until("every frame delivered or dropped", || {
        let pushed: u64 = gw.lobbies(DEADLINE).iter().map(|l| l.frames_out).sum();
        let stats = gw.stats();
        stats.frames_delivered + stats.frames_dropped == pushed
    });
    assert_eq!(gw.stats().frames_dropped, 0);
    for reader in readers {
        let got = numbers(reader.finish());
        let numbers = assert_continuous(&got, |_| 0);
        assert_eq!(numbers.first(), Some(&1));
        assert_eq!(numbers.last(), Some(&last), "the stream reached its end");
    }
    let stats = gw.stats();
    assert_eq!(stats.origin_lost, 6, "{stats:?}");
    assert_eq!(stats.origin_gaps, 0);
    assert_eq!(stats.frames_dropped, 0);
}

#[test]
fn a_stream_trimmed_past_a_lobbys_position_is_a_counted_gap() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut config = redis_config(&redis.stream_url("events"));
    // Long enough to trim the stream before the lobby is back.
    config.origin_backoff_min = Duration::from_millis(500);
    config.origin_backoff_max = Duration::from_millis(500);
    let gw = start_gateway(config);
    let mut client = connect_clients(&gw, 1).remove(0);
    wait_until("the stream reader", || gw.stats().origin_connections == 1);
    let mut con = redis.connect().expect("connect");
    let xadd = |con: &mut redis::Connection, data: &str| {
        redis::cmd("XADD")
            .arg("events")
            .arg("MAXLEN")
            .arg(5)
            .arg("*")
            .arg("data")
            .arg(data)
            .exec(con)
            .expect("XADD");
    };
    warm_up(&gw, 1, || xadd(&mut con, "warm"));

    for id in redis.gateway_clients() {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .exec(&mut con)
            .expect("CLIENT KILL");
    }
    // Twenty entries while the lobby is away; the stream keeps five.
    for n in 1..=20 {
        xadd(&mut con, &n.to_string());
    }
    // Entries 1..=15 were trimmed before it read them.
    wait_until("the gap counted", || gw.stats().origin_gaps == 15);
    wait_until("the lobby back", || gw.stats().origin_connections == 1);
    // It resumed with what the stream still held.
    assert_eq!(recv_past_warm(&mut client), "16");
    for n in 17..=20 {
        assert_eq!(recv_text(&mut client), n.to_string());
    }
    assert_eq!(gw.stats().origin_lost, 1);
}

#[test]
fn credentials_and_database_come_from_the_url() {
    let Some(redis) = RedisServer::start_with(&["--requirepass", "s3cret"]) else {
        return;
    };
    let port = redis.port();
    let gw = start_gateway(redis_config(&format!(
        "redis+stream://:s3cret@127.0.0.1:{port}/3/events?field=body"
    )));
    let mut client = connect_clients(&gw, 1).remove(0);
    wait_until("connected", || gw.stats().origin_connections == 1);
    let mut con = redis.connect().expect("connect");
    redis::cmd("SELECT").arg(3).exec(&mut con).expect("SELECT");
    warm_up(&gw, 1, || {
        redis::cmd("XADD")
            .arg("events")
            .arg("*")
            .arg("body")
            .arg("warm")
            .exec(&mut con)
            .expect("XADD");
    });
    redis::cmd("XADD")
        .arg("events")
        .arg("*")
        .arg("data")
        .arg("not this field")
        .arg("body")
        .arg("hello")
        .exec(&mut con)
        .expect("XADD");
    assert_eq!(recv_past_warm(&mut client), "hello");

    // A wrong password is a refusal, counted and retried.
    let bad = start_gateway(redis_config(&format!(
        "redis://:wrong@127.0.0.1:{port}/feed"
    )));
    let _client = connect_clients(&bad, 1);
    wait_until("the refusal counted", || {
        bad.stats().origin_failed_upgrade >= 2
    });
    assert_eq!(bad.stats().origin_connections, 0);
}

#[cfg(feature = "cli")]
#[test]
fn two_gateway_processes_on_one_channel_each_give_every_client_every_message() {
    use std::{
        io::{BufRead, BufReader},
        net::SocketAddr,
        process::{Child, Command, Stdio},
    };

    let Some(redis) = RedisServer::start() else {
        return;
    };
    struct Process(Child);
    impl Drop for Process {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let spawn = || -> (Process, SocketAddr) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_wsgate"))
            .args(["--listen", "127.0.0.1:0", "--log-level", "warn"])
            .args(["--origin", &redis.channel_url("ticks")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wsgate");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("wsgate prints its address");
        let addr = line
            .split_whitespace()
            .last()
            .and_then(|u| {
                u.trim_start_matches("ws://")
                    .trim_end_matches('/')
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        (Process(child), addr)
    };
    let (_a, addr_a) = spawn();
    let (_b, addr_b) = spawn();
    let mut clients: Vec<Client> = (0..20)
        .map(|i| ws_client(if i % 2 == 0 { addr_a } else { addr_b }))
        .collect();

    // Warm up from another thread until every client has had a message.
    let mut con = redis.connect().expect("connect");
    let warming = Arc::new(AtomicBool::new(true));
    let flag = warming.clone();
    let port = redis.port();
    let warmer = thread::spawn(move || {
        let mut con = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .and_then(|c| c.get_connection())
            .expect("connect");
        while flag.load(Ordering::SeqCst) {
            let _: i64 = redis::cmd("PUBLISH")
                .arg("ticks")
                .arg("warm")
                .query(&mut con)
                .expect("PUBLISH");
            thread::sleep(Duration::from_millis(20));
        }
    });
    for c in &mut clients {
        assert_eq!(recv_text(c), "warm");
    }
    warming.store(false, Ordering::SeqCst);
    warmer.join().expect("warmer");

    // Each message read by every client before the next is published (a
    // burst larger than a queue would lose its oldest frames, as it should).
    const N: u64 = 200;
    for n in 1..=N {
        assert_eq!(redis.publish(&mut con, "ticks", &n.to_string()), 2);
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(recv_past_warm(c), n.to_string(), "client {i}");
        }
    }
}

#[test]
fn shutdown_ends_within_the_drain_timeout_and_a_second() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut config = redis_config(&redis.channel_url("feed"));
    config.lobby_capacity = 5;
    config.drain_timeout = Duration::from_secs(1);
    let drain = config.drain_timeout;
    let gw = start_gateway(config);
    // Clients that never read: the drain waits its whole timeout for them.
    let _clients = connect_clients(&gw, 10);
    wait_until("two subscriptions", || gw.stats().origin_connections == 2);
    let started = Instant::now();
    gw.shutdown();
    let last = gw.join();
    let took = started.elapsed();
    // The promise: the drain timeout and a second; with 2 s for this
    // noisy machine.
    let bound = drain + Duration::from_secs(1) + Duration::from_secs(2);
    assert!(
        took < bound,
        "shutdown took {took:?}, promised under {bound:?}"
    );
    assert_eq!(last.origin_connections, 0);
    assert_eq!(last.lobbies, 0);
}

#[test]
fn a_pong_later_than_a_second_counts_the_subscription_silent_and_replaces_it() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const PING: Duration = Duration::from_millis(200);
    let mut config = redis_config(&redis.channel_url("feed"));
    config.origin_ping = PING;
    let gw = start_gateway(config);
    let mut clients = connect_clients(&gw, 2);
    wait_until("subscribed", || gw.stats().origin_connections == 1);
    let mut con = redis.connect().expect("connect");
    warm_up(&gw, 2, || {
        redis.publish(&mut con, "feed", "warm");
    });

    // Stopped for 300 ms, the server answers a ping (one is due every
    // 200 ms) that much late: within the second, the connection stays.
    redis.pause();
    thread::sleep(Duration::from_millis(300));
    redis.resume();
    let stats = gw.stats();
    assert_eq!(
        (stats.origin_silent, stats.origin_connected),
        (0, 1),
        "{stats:?}"
    );
    redis.publish(&mut con, "feed", "kept");
    for c in &mut clients {
        assert_eq!(recv_past_warm(c), "kept");
    }

    // Stopped for good, it leaves the next ping unanswered: counted silent
    // within the ping interval and the second a pong may take (plus 2 s
    // for this machine).
    let stopped = Instant::now();
    redis.pause();
    wait_until("the subscription counted silent", || {
        gw.stats().origin_silent == 1
    });
    let took = stopped.elapsed();
    let bound = PING + Duration::from_secs(1) + Duration::from_secs(2);
    assert!(
        took < bound,
        "silent after {took:?}, promised under {bound:?}"
    );
    redis.resume();

    // It is replaced; the clients stayed, and get what comes next.
    wait_until("a new subscription", || {
        let stats = gw.stats();
        stats.origin_connected == 2 && stats.origin_connections == 1
    });
    wait_until("the new subscription in place", || {
        redis.publish(&mut con, "feed", "warm") == 1
    });
    redis.publish(&mut con, "feed", "after");
    for c in &mut clients {
        assert_eq!(recv_past_warm(c), "after");
    }
    let stats = gw.stats();
    assert_eq!((stats.clients, stats.origin_silent), (2, 1), "{stats:?}");
}

#[test]
fn an_oversized_message_is_skipped_and_counted_and_the_subscription_stays() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut config = redis_config(&redis.channel_url("feed"));
    config.max_origin_message = 1024;
    let gw = start_gateway(config);
    let mut client = connect_clients(&gw, 1).remove(0);
    wait_until("subscribed", || gw.stats().origin_connections == 1);
    let mut con = redis.connect().expect("connect");
    warm_up(&gw, 1, || {
        redis.publish(&mut con, "feed", "warm");
    });
    redis.publish(&mut con, "feed", &"x".repeat(1025));
    redis.publish(&mut con, "feed", &"y".repeat(1024));
    assert_eq!(recv_past_warm(&mut client), "y".repeat(1024));
    let stats = gw.stats();
    assert_eq!(stats.origin_oversized, 1, "{stats:?}");
    assert_eq!(
        (
            stats.origin_connected,
            stats.origin_connections,
            stats.origin_lost
        ),
        (1, 1, 0),
        "the same subscription: {stats:?}"
    );
}

#[test]
fn a_stream_entry_without_the_field_is_skipped_and_counted() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let gw = start_gateway(redis_config(&redis.stream_url("events")));
    let mut client = connect_clients(&gw, 1).remove(0);
    wait_until("the stream reader", || gw.stats().origin_connections == 1);
    let mut con = redis.connect().expect("connect");
    let xadd = |con: &mut redis::Connection, field: &str, value: &str| {
        redis::cmd("XADD")
            .arg("events")
            .arg("*")
            .arg(field)
            .arg(value)
            .exec(con)
            .expect("XADD");
    };
    warm_up(&gw, 1, || xadd(&mut con, "data", "warm"));
    xadd(&mut con, "other", "not data");
    xadd(&mut con, "data", "after");
    assert_eq!(recv_past_warm(&mut client), "after");
    let stats = gw.stats();
    assert_eq!(stats.origin_gaps, 1, "{stats:?}");
    assert_eq!(
        (stats.origin_connected, stats.origin_lost),
        (1, 0),
        "{stats:?}"
    );
}

#[test]
fn payloads_that_are_not_utf8_reach_clients_as_binary_and_the_rest_as_text() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    const NOT_UTF8: &[u8] = &[0xff, 0xfe, 0x00, 0x80, b'x'];
    let mut con = redis.connect().expect("connect");
    for url in [redis.channel_url("feed"), redis.stream_url("feed-stream")] {
        let is_stream = url.starts_with("redis+stream");
        let mut send = |payload: &[u8]| {
            let mut cmd = if is_stream {
                let mut c = redis::cmd("XADD");
                c.arg("feed-stream").arg("*").arg("data");
                c
            } else {
                let mut c = redis::cmd("PUBLISH");
                c.arg("feed");
                c
            };
            cmd.arg(payload).exec(&mut con).expect("send");
        };
        let gw = start_gateway(redis_config(&url));
        let mut client = connect_clients(&gw, 1).remove(0);
        wait_until("connected", || gw.stats().origin_connections == 1);
        warm_up(&gw, 1, || send(b"warm"));
        send(NOT_UTF8);
        send("héllo".as_bytes());
        let mut next = || loop {
            match client.read().expect("a message") {
                Message::Text(t) if t.as_str() == "warm" => {}
                m @ (Message::Text(_) | Message::Binary(_)) => return m,
                _ => {}
            }
        };
        assert_eq!(next(), Message::binary(NOT_UTF8), "{url}");
        assert_eq!(next(), Message::text("héllo"), "{url}");
    }
}

/// Adds an entry with field `data` to stream `events`; its ID.
#[cfg(feature = "sse")]
fn xadd(con: &mut redis::Connection, data: &str) -> String {
    redis::cmd("XADD")
        .arg("events")
        .arg("*")
        .arg("data")
        .arg(data)
        .query(con)
        .expect("XADD")
}

/// The data of `n` events of `client`, each with an ID, and the last ID.
#[cfg(feature = "sse")]
#[track_caller]
fn read_messages(client: &mut SseClient, n: usize) -> (Vec<String>, String) {
    let mut last = String::new();
    let got = (0..n)
        .map(|_| {
            let (data, id) = client.message();
            last = id;
            data
        })
        .collect();
    (got, last)
}

#[cfg(feature = "sse")]
fn texts(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|n| n.to_string()).collect()
}

#[cfg(feature = "sse")]
#[test]
fn an_event_stream_resumes_on_a_new_gateway_from_the_stream_itself() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut con = redis.connect().expect("connect");
    let mut config = redis_config(&redis.stream_url("events"));
    let gw = start_gateway(config.clone());
    let addr = gw.local_addr();
    let mut client = sse_client(addr, "/", &[]);
    wait_until("the stream reader", || gw.stats().origin_connections == 1);
    warm_up(&gw, 1, || {
        xadd(&mut con, "warm");
    });
    for n in 1..=5 {
        xadd(&mut con, &n.to_string());
    }
    let first = loop {
        let (data, _) = client.message();
        if data != "warm" {
            break data;
        }
    };
    assert_eq!(first, "1");
    let (got, last) = read_messages(&mut client, 4);
    assert_eq!(got, texts(2..=5));
    drop(client);
    // The gateway restarts; the stream goes on meanwhile.
    gw.shutdown();
    gw.join();
    for n in 6..=15 {
        xadd(&mut con, &n.to_string());
    }
    config.listen = addr;
    let gw = start_gateway(config);
    // Its history is empty: the stream itself has 6 to 15.
    let mut back = sse_client(addr, "/", &[&format!("Last-Event-ID: {last}")]);
    let (got, ten) = read_messages(&mut back, 5);
    assert_eq!(got, texts(6..=10));
    let (got, _) = read_messages(&mut back, 5);
    assert_eq!(got, texts(11..=15));
    // Then live.
    xadd(&mut con, "16");
    assert_eq!(back.message().0, "16");
    // The IDs this gateway gave are the stream's too: one resumed after
    // the tenth is read again from there.
    let mut other = sse_client(addr, "/", &[&format!("Last-Event-ID: {ten}")]);
    let (got, _) = read_messages(&mut other, 6);
    assert_eq!(got, texts(11..=16));
    xadd(&mut con, "17");
    assert_eq!(back.message().0, "17");
    assert_eq!(other.message().0, "17");
    let stats = gw.stats();
    let resumes = (
        stats.resumes,
        stats.resumes_from_source,
        stats.resume_resets,
    );
    assert_eq!(resumes, (0, 2, 0), "{stats:?}");
}

#[cfg(feature = "sse")]
#[test]
fn a_resume_after_a_trimmed_entry_or_beyond_its_bound_is_reset() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut con = redis.connect().expect("connect");
    let config = redis_config(&redis.stream_url("events"));
    let gw = start_gateway(config.clone());
    let mut client = sse_client(gw.local_addr(), "/", &[]);
    wait_until("the stream reader", || gw.stats().origin_connections == 1);
    warm_up(&gw, 1, || {
        xadd(&mut con, "warm");
    });
    let entries: Vec<String> = (1..=42).map(|n| xadd(&mut con, &n.to_string())).collect();
    // The message IDs of 1 to 42, by number.
    let mut ids = vec![String::new()];
    while ids.len() <= 42 {
        let (data, id) = client.message();
        if data != "warm" {
            assert_eq!(data, ids.len().to_string());
            ids.push(id);
        }
    }
    // Another instance: its history is empty, so the stream serves
    // resumes; a small one, remembering 8 messages (4 queues of 2), so a
    // resume from the stream is served 32 at most, in pages of an event
    // stream's queue (4).
    let mut small = config;
    small.queue_depth = 2;
    small.history = 0;
    let other = start_gateway(small);
    let addr = other.local_addr();
    let resume = |after: &str| sse_client(addr, "/", &[&format!("Last-Event-ID: {after}")]);
    // 40 follow 2: the first 32, then the reset.
    let mut too_far = resume(&ids[2]);
    let (got, _) = read_messages(&mut too_far, 32);
    assert_eq!(got, texts(3..=34));
    assert_eq!(too_far.event().event.as_deref(), Some("reset"));
    // 30 and everything before it are trimmed away.
    redis::cmd("XTRIM")
        .arg("events")
        .arg("MINID")
        .arg(&entries[30])
        .exec(&mut con)
        .expect("XTRIM");
    let mut trimmed = resume(&ids[30]);
    assert_eq!(trimmed.event().event.as_deref(), Some("reset"));
    // 11 follow 31: read again from the stream, in three pages.
    let mut near = resume(&ids[31]);
    let (got, _) = read_messages(&mut near, 11);
    assert_eq!(got, texts(32..=42));
    // Then all of them live.
    xadd(&mut con, "43");
    for stream in [&mut too_far, &mut trimmed, &mut near] {
        assert_eq!(stream.message().0, "43");
    }
    let stats = other.stats();
    let resumes = (
        stats.resumes,
        stats.resumes_from_source,
        stats.resume_resets,
    );
    assert_eq!(resumes, (0, 1, 2), "{stats:?}");
}

/// The data of every entry of stream `events`, oldest first.
#[cfg(feature = "sse")]
fn stream_data(con: &mut redis::Connection) -> Vec<String> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg("events")
        .arg("-")
        .arg("+")
        .query(con)
        .expect("XRANGE");
    entries
        .into_iter()
        .map(|(_, fields)| fields.into_iter().next().expect("a field").1)
        .collect()
}

/// A gateway on stream `events` whose event stream reads `0` to `n - 1`,
/// added now: their message IDs (the same in every instance), once it
/// has shut down.
#[cfg(feature = "sse")]
fn ids_of_the_first(n: u32, config: &Config, con: &mut redis::Connection) -> Vec<String> {
    let gw = start_gateway(config.clone());
    let mut client = sse_client(gw.local_addr(), "/", &[]);
    wait_until("the stream reader", || gw.stats().origin_connections == 1);
    warm_up(&gw, 1, || {
        xadd(con, "warm");
    });
    for n in 0..n {
        xadd(con, &n.to_string());
    }
    let mut ids = Vec::new();
    while ids.len() < n as usize {
        let (data, id) = client.message();
        if data != "warm" {
            assert_eq!(data, ids.len().to_string());
            ids.push(id);
        }
    }
    drop(client);
    gw.shutdown();
    gw.join();
    ids
}

/// The events a follower read, once its last has data `last`.
#[cfg(feature = "sse")]
#[track_caller]
fn events_to(follower: &SseFollower, last: &str) -> Vec<Event> {
    let end = Instant::now() + DEADLINE;
    loop {
        let events = follower.events();
        assert!(!follower.has_ended(), "ended: {events:?}");
        if events.last().is_some_and(|e| e.data == last) {
            break;
        }
        let got: Vec<_> = events.iter().map(|e| (&e.event, &e.data)).collect();
        assert!(
            Instant::now() < end,
            "an event stream never reached {last}: {got:?}"
        );
        thread::sleep(Duration::from_millis(10));
    }
    follower.events()
}

#[cfg(feature = "sse")]
#[test]
fn a_resume_many_queues_long_is_read_from_the_stream_page_by_page_then_live() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut con = redis.connect().expect("connect");
    let config = redis_config(&redis.stream_url("events"));
    let ids = ids_of_the_first(1, &config, &mut con);
    // 100 entries after 0: an event stream's queue (32) three times over.
    for n in 1..=100 {
        xadd(&mut con, &n.to_string());
    }
    let gw = start_gateway(config);
    let back = sse_client(
        gw.local_addr(),
        "/",
        &[&format!("Last-Event-ID: {}", ids[0])],
    );
    let back = SseFollower::spawn(back);
    // The stream goes on while it catches up.
    let feed = {
        let mut con = redis.connect().expect("connect");
        thread::spawn(move || {
            for n in 101..=150 {
                xadd(&mut con, &n.to_string());
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    feed.join().unwrap();
    let events = events_to(&back, "150");
    assert!(events.iter().all(|e| e.event.is_none()), "{events:?}");
    let got: Vec<String> = events.into_iter().map(|e| e.data).collect();
    assert_eq!(got, texts(1..=150), "every entry once, in order");
    xadd(&mut con, "151");
    events_to(&back, "151");
    let stats = gw.stats();
    let resumes = (
        stats.resumes,
        stats.resumes_from_source,
        stats.resume_resets,
    );
    assert_eq!(resumes, (0, 1, 0), "{stats:?}");
}

#[cfg(feature = "sse")]
#[test]
fn a_storm_of_stream_resumes_is_served_or_reset_while_a_live_client_loses_nothing() {
    const STREAMS: usize = 200;
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let mut con = redis.connect().expect("connect");
    let config = redis_config(&redis.stream_url("events"));
    let ids = ids_of_the_first(10, &config, &mut con);
    // 40 entries after the last of those: more than an event stream's queue.
    for n in 10..50 {
        xadd(&mut con, &n.to_string());
    }
    let gw = start_gateway(config);
    let addr = gw.local_addr();
    let live = ws_client(addr);
    wait_until("the stream reader", || gw.stats().origin_connections == 1);
    warm_up(&gw, 1, || {
        xadd(&mut con, "live-warm");
    });
    // Read until the end, on a thread of its own.
    let live = thread::spawn(move || {
        let mut live = live;
        let mut got = Vec::new();
        while got.last().is_none_or(|d| d != "end") {
            got.push(recv_text(&mut live));
        }
        got
    });
    let feed = {
        let mut con = redis.connect().expect("connect");
        thread::spawn(move || {
            for n in 50..250 {
                xadd(&mut con, &n.to_string());
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // Every stream resumes after one of 0 to 9, all on this lobby.
    let streams: Vec<(usize, SseFollower)> = (0..STREAMS)
        .map(|i| {
            let after = &ids[i % ids.len()];
            let client = sse_client(addr, "/", &[&format!("Last-Event-ID: {after}")]);
            (i % ids.len(), SseFollower::spawn(client))
        })
        .collect();
    feed.join().unwrap();
    assert_eq!(gw.lobbies(DEADLINE).len(), 1);
    // Once every resume was served or reset, all of them are live.
    wait_until("every resume served or reset", || {
        let stats = gw.stats();
        stats.resumes_from_source + stats.resume_resets == STREAMS as u64
    });
    xadd(&mut con, "end");
    let all = stream_data(&mut con);
    let at = |data: &str| all.iter().position(|d| d == data).unwrap();
    let (mut served, mut reset) = (0, 0);
    for (after, stream) in &streams {
        let events = events_to(stream, "end");
        let from = at(&after.to_string()) + 1;
        match events.iter().position(|e| e.event.is_some()) {
            // Everything after its ID, once, in order, then live.
            None => {
                served += 1;
                let got: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
                assert_eq!(got, all[from..], "resumed after {after}");
            }
            // Told, then live from some entry on with no gap.
            Some(told) => {
                reset += 1;
                assert_eq!(events[told].event.as_deref(), Some("reset"));
                let before: Vec<&str> = events[..told].iter().map(|e| e.data.as_str()).collect();
                assert_eq!(before, all[from..from + told], "served before its reset");
                let after_reset: Vec<&str> =
                    events[told + 1..].iter().map(|e| e.data.as_str()).collect();
                let first = at(after_reset[0]);
                assert_eq!(after_reset, all[first..], "live after its reset");
            }
        }
    }
    let stats = gw.stats();
    assert_eq!(
        (stats.resumes_from_source, stats.resume_resets),
        (served, reset),
        "{stats:?}"
    );
    assert_eq!(served + reset, STREAMS as u64);
    assert!(served > 0, "none read again from the stream: {stats:?}");
    // The live client got every entry published since it joined.
    let got = live.join().unwrap();
    let live_warm = got.iter().rposition(|d| d == "live-warm").unwrap();
    assert_eq!(got[live_warm + 1..], all[at("50")..], "no gap");
}
