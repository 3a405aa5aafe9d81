//! Thirty seconds of random joins and leaves while the origin streams, then
//! compaction settles. Alone in its test binary so that counting this
//! process's lobby threads sees only this gateway's.

mod support;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use support::*;

const CAPACITY: usize = 10;
const FILL: f64 = 0.9;
const CHURN: Duration = Duration::from_secs(30);

#[test]
fn after_churn_lobbies_settle_dense_and_threads_match() {
    let origin = Arc::new(TestOrigin::start());
    let mut config = test_config(&origin.url());
    config.lobby_capacity = CAPACITY;
    config.compact_fill = FILL;
    config.compact_interval = Duration::from_millis(500);
    config.lobby_linger = Duration::from_millis(300);
    let gw = start_gateway(config);
    let feed = Feed::start(origin.clone(), Duration::from_millis(20));

    // xorshift: reproducible churn without a dependency.
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut random = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let mut clients: Vec<Client> = Vec::new();
    let end = Instant::now() + CHURN;
    let mut peak = 0;
    while Instant::now() < end {
        // Drift between about 5 and 60 clients, in bursts both ways.
        let joining = clients.len() < 5 || (clients.len() < 60 && random(100) < 52);
        for _ in 0..=random(4) {
            if joining {
                clients.push(ws_client(gw.local_addr()));
            } else if !clients.is_empty() {
                let mut leaving = clients.swap_remove(random(clients.len()));
                let _ = leaving.close(None);
            }
        }
        peak = peak.max(clients.len());
        std::thread::sleep(Duration::from_millis(random(40) as u64));
    }
    let n = clients.len();
    let stats = gw.stats();
    assert!(stats.migrations > 0, "compaction moved nobody: {stats:?}");
    assert!(
        peak > 2 * CAPACITY,
        "churn never needed several lobbies (peak {peak})"
    );

    let per = (CAPACITY as f64 * FILL).floor() as usize;
    let (fewest, most) = (n.div_ceil(CAPACITY), n.div_ceil(per));
    wait_until("compaction and lingering lobbies to settle", || {
        let lobbies = gw.lobbies(DEADLINE);
        let placed: usize = lobbies.iter().map(|l| l.clients).sum();
        placed == n
            && (fewest..=most).contains(&lobbies.len())
            && lobbies.iter().all(|l| l.clients > 0)
            // Each lobby thread holds exactly the clients the manager placed in it.
            && lobbies.iter().all(|l| l.attached == l.clients)
            && lobby_threads() == lobbies.len()
            && origin.open() == lobbies.len()
    });
    let lobbies = gw.lobbies(DEADLINE);
    assert_eq!(
        gw.stats().clients as usize,
        n,
        "every client is in exactly one lobby"
    );
    assert!(lobbies.iter().all(|l| l.clients <= CAPACITY));
    feed.stop();
    eprintln!(
        "churn: {n} clients left in {} lobbies (peak {peak}); {:?}",
        lobbies.len(),
        gw.stats()
    );
}
