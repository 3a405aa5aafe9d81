//! The hot path allocates nothing per client per message: a counting global
//! allocator watches the whole process (origin or publisher, gateway,
//! clients) while 300 messages go to 200 clients, and the count must not
//! grow with the clients; with half of them taking permessage-deflate too
//! (the compressed frame is built once per lobby). And an idle client holds
//! no more heap than the README's memory budget. Alone in its test binary,
//! since the allocator is process-wide; its tests take turns.

mod support;

use std::{
    io::Read,
    net::TcpStream,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use support::*;

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const CLIENTS: usize = 200;
const MESSAGES: u64 = 300;
/// Allocations allowed per message, whatever the number of clients: the
/// origin's own (the test origin's message, channel and socket writes), the
/// lobby's read and its one encoded frame.
const PER_MESSAGE: usize = 16;
/// Allocations allowed per message from the in-process publisher: its
/// one frame (and the test's own number formatting).
const PER_PUBLISHED: usize = 4;

/// The allocator counts the whole process: one test at a time.
fn alone() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads whatever the clients have, into one buffer (no allocation).
fn drain(clients: &[TcpStream], buf: &mut [u8]) {
    for mut c in clients {
        while c.read(buf).is_ok_and(|n| n > 0) {}
    }
}

#[test]
fn published_messages_allocate_per_message_not_per_client() {
    let _turn = alone();
    let mut config = test_config("");
    config.client_ping = Duration::from_secs(3600);
    let mut builder = wsgate::Gateway::builder(config);
    let publisher = builder.publisher();
    let gw = builder.start().expect("gateway starts");
    let clients: Vec<_> = (0..CLIENTS).map(|_| raw_client(gw.local_addr())).collect();
    wait_placed(&gw, CLIENTS);
    wait_until("the lobby subscribed", || {
        gw.stats().origin_connections == 1
    });
    // Every client at the live edge: a message reaches all of them.
    let end = Instant::now() + DEADLINE;
    loop {
        let before = gw.stats().frames_delivered;
        publisher.publish_text("warm");
        std::thread::sleep(Duration::from_millis(50));
        if gw.stats().frames_delivered - before == CLIENTS as u64 {
            break;
        }
        assert!(
            Instant::now() < end,
            "no warm-up message reached all {CLIENTS} clients within {DEADLINE:?}"
        );
    }
    let mut buf = vec![0u8; 64 * 1024];
    for c in &clients {
        c.set_nonblocking(true).unwrap();
    }
    let mut sent = 0u64;
    let burst = |sent: &mut u64| {
        let before = gw.stats().frames_delivered;
        for _ in 0..10 {
            *sent += 1;
            publisher.publish_text(sent.to_string());
        }
        wait_until("the burst delivered", || {
            gw.stats().frames_delivered >= before + 10 * CLIENTS as u64
        });
    };
    for _ in 0..10 {
        burst(&mut sent);
        drain(&clients, &mut buf);
    }

    let region = Region::new(GLOBAL);
    let start = sent;
    while sent < start + MESSAGES {
        burst(&mut sent);
        drain(&clients, &mut buf);
    }
    let allocations = region.change().allocations;
    assert_eq!(gw.stats().frames_dropped, 0);
    eprintln!(
        "publisher: {allocations} allocations for {MESSAGES} messages to {CLIENTS} clients \
         ({:.1} per message)",
        allocations as f64 / MESSAGES as f64
    );
    assert!(
        allocations < MESSAGES as usize * PER_PUBLISHED,
        "{allocations} allocations for {MESSAGES} published messages to {CLIENTS} clients"
    );
}

#[test]
fn fan_out_allocates_per_message_not_per_client() {
    let _turn = alone();
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    // The raw clients never answer pings.
    config.client_ping = Duration::from_secs(3600);
    let gw = start_gateway(config);
    // Raw clients read into a fixed buffer: they allocate nothing per message.
    let clients: Vec<_> = (0..CLIENTS).map(|_| raw_client(gw.local_addr())).collect();
    wait_placed(&gw, CLIENTS);
    wait_until("origin connection", || origin.open() == 1);
    let mut buf = vec![0u8; 64 * 1024];
    for c in &clients {
        c.set_nonblocking(true).unwrap();
    }
    let mut drain = |clients: &[TcpStream]| drain(clients, &mut buf);

    // Warm up: every buffer and queue reaches its working size.
    let mut sent = 0;
    let send_burst = |sent: &mut u64| {
        for _ in 0..10 {
            *sent += 1;
            origin.send_seq(*sent);
        }
        let want = *sent * CLIENTS as u64;
        wait_until("the burst delivered", || {
            gw.stats().frames_delivered >= want
        });
    };
    for _ in 0..10 {
        send_burst(&mut sent);
        drain(&clients);
    }

    let region = Region::new(GLOBAL);
    let start = sent;
    while sent < start + MESSAGES {
        send_burst(&mut sent);
        drain(&clients);
    }
    let allocations = region.change().allocations;
    assert_eq!(gw.stats().frames_dropped, 0);
    assert!(
        allocations < MESSAGES as usize * PER_MESSAGE,
        "{allocations} allocations for {MESSAGES} messages to {CLIENTS} clients \
         ({:.1} per message)",
        allocations as f64 / MESSAGES as f64
    );
    eprintln!(
        "{allocations} allocations for {MESSAGES} messages to {CLIENTS} clients ({:.1} per message)",
        allocations as f64 / MESSAGES as f64
    );
}

#[cfg(feature = "compression")]
#[test]
fn compressed_fan_out_allocates_per_message_not_per_client() {
    let _turn = alone();
    let origin = TestOrigin::start();
    let mut config = test_config(&origin.url());
    config.client_ping = Duration::from_secs(3600);
    let gw = start_gateway(config);
    // Half the clients negotiate permessage-deflate, half do not: one
    // lobby builds both forms of every message.
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            if i % 2 == 0 {
                raw_client_offering(gw.local_addr(), "permessage-deflate").0
            } else {
                raw_client(gw.local_addr())
            }
        })
        .collect();
    wait_placed(&gw, CLIENTS);
    wait_until("origin connection", || origin.open() == 1);
    let mut buf = vec![0u8; 64 * 1024];
    for c in &clients {
        c.set_nonblocking(true).unwrap();
    }
    // 1 KiB messages that compress well, made before counting.
    let messages: Vec<tungstenite::Message> = (0..MESSAGES + 100)
        .map(|n| {
            let mut text = format!(
                "{{\"seq\":{n},\"price\":{}.25,\"qty\":{}}}",
                64_000 + n,
                n % 97
            );
            while text.len() < 1024 {
                text.push_str(",\"pad\":0");
            }
            tungstenite::Message::text(text)
        })
        .collect();
    let mut next = messages.into_iter();
    let mut sent = 0u64;
    let mut send_burst = |sent: &mut u64| {
        for message in next.by_ref().take(10) {
            *sent += 1;
            origin.send(message);
        }
        let want = *sent * CLIENTS as u64;
        wait_until("the burst delivered", || {
            gw.stats().frames_delivered >= want
        });
    };
    for _ in 0..10 {
        send_burst(&mut sent);
        drain(&clients, &mut buf);
    }

    let region = Region::new(GLOBAL);
    let start = sent;
    while sent < start + MESSAGES {
        send_burst(&mut sent);
        drain(&clients, &mut buf);
    }
    let allocations = region.change().allocations;
    let stats = gw.stats();
    assert_eq!(stats.frames_dropped, 0);
    assert_eq!(
        stats.frames_delivered_compressed,
        sent * CLIENTS as u64 / 2,
        "half the deliveries compressed"
    );
    eprintln!(
        "compressed: {allocations} allocations for {MESSAGES} messages to {CLIENTS} clients \
         ({:.1} per message)",
        allocations as f64 / MESSAGES as f64
    );
    assert!(
        allocations < MESSAGES as usize * PER_MESSAGE,
        "{allocations} allocations for {MESSAGES} messages to {CLIENTS} clients"
    );
}

/// Idle clients this test connects: six lobbies of the default 512, not a
/// power of two, so the tables' growth shows as it would at any count.
const IDLE_CLIENTS: usize = 3000;
/// Heap bytes the gateway may hold per idle client (README, Memory): its
/// queue, its connection, and its entries in the manager, registry and
/// lobby, with the tables' slack.
const IDLE_BUDGET: usize = 1536;

#[test]
fn an_idle_client_holds_at_most_its_budget_of_heap() {
    let _turn = alone();
    let mut config = test_config("");
    config.client_ping = Duration::from_secs(3600);
    let mut builder = wsgate::Gateway::builder(config);
    let _publisher = builder.publisher();
    let gw = builder.start().expect("gateway starts");
    let mut clients = Vec::with_capacity(IDLE_CLIENTS);
    let region = Region::new(GLOBAL);
    for _ in 0..IDLE_CLIENTS {
        clients.push(raw_client(gw.local_addr()));
    }
    wait_placed(&gw, IDLE_CLIENTS);
    let change = region.change();
    // A growing reallocation counts its growth as allocated, a shrinking
    // one its shrink as deallocated (stats_alloc).
    let held = change.bytes_allocated as isize - change.bytes_deallocated as isize;
    let per_client = held / IDLE_CLIENTS as isize;
    eprintln!("idle: {held} heap bytes held for {IDLE_CLIENTS} clients ({per_client} per client)");
    assert!(
        per_client <= IDLE_BUDGET as isize,
        "{per_client} heap bytes per idle client, over the budget of {IDLE_BUDGET}"
    );
}
