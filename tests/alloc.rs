//! The hot path allocates nothing per client per message: a counting global
//! allocator watches the whole process (origin, gateway, clients) while 300
//! messages go to 200 clients, and the count must not grow with the clients.
//! Alone in its test binary, since the allocator is process-wide.

mod support;

use std::{io::Read, time::Duration};

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

#[test]
fn fan_out_allocates_per_message_not_per_client() {
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
    let mut drain = |clients: &[std::net::TcpStream]| {
        for mut c in clients {
            while c.read(&mut buf).is_ok_and(|n| n > 0) {}
        }
    };

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
