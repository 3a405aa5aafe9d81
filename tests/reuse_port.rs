//! `--reuse-port`: several `wsgate` processes (the real binary) bound to one
//! address, the kernel spreading clients over them, every client served the
//! whole feed by whichever process it landed on.

mod support;

use std::sync::Arc;

use support::*;

const CLIENTS: usize = 200;
/// Fewer than a client's queue holds (16), so sending them at once drops none.
const MESSAGES: u64 = 10;

#[test]
fn two_processes_share_one_port_and_each_client_gets_every_message() {
    let origin = Arc::new(TestOrigin::start());
    let url = origin.url();
    let args = |listen: &str| {
        GatewayProcess::spawn(&[
            "--listen",
            listen,
            "--reuse-port",
            "--origin",
            &url,
            "--admin",
            "127.0.0.1:0",
            "--log-level",
            "warn",
        ])
    };
    let first = args("127.0.0.1:0");
    let shared = first.addr.to_string();
    let second = args(&shared);
    assert_eq!(second.addr, first.addr, "both listen on one address");
    let gateways = [&first, &second];

    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| ws_client(first.addr)).collect();
    let placed = |g: &GatewayProcess| g.lobby_clients().iter().sum::<u64>();
    wait_until("every client placed, and each lobby's origin up", || {
        let lobbies: usize = gateways.iter().map(|g| g.lobby_clients().len()).sum();
        gateways.iter().map(|g| placed(g)).sum::<u64>() == CLIENTS as u64
            && origin.open() == lobbies
    });
    let counts: Vec<u64> = gateways.iter().map(|g| placed(g)).collect();
    eprintln!("clients per process: {counts:?}");
    assert!(
        counts.iter().all(|&n| n > 0),
        "the kernel spread the clients over both processes: {counts:?}"
    );
    for (g, n) in gateways.iter().zip(&counts) {
        assert_eq!(g.metric("wsgate_clients"), Some(*n as f64));
    }

    for n in 1..=MESSAGES {
        origin.send_seq(n);
    }
    for client in &mut clients {
        let got: Vec<String> = (0..MESSAGES).map(|_| recv_text(client)).collect();
        let want: Vec<String> = (1..=MESSAGES).map(|n| n.to_string()).collect();
        assert_eq!(got, want, "every message, once, in order");
    }
    drop(clients);
    for g in gateways {
        g.signal("TERM");
    }
    for g in [first, second] {
        let (code, log) = g.wait();
        assert_eq!(code, Some(0), "{log}");
    }
}
