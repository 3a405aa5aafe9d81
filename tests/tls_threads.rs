//! Where `wss://` handshakes spend their CPU, read per thread in `/proc` of
//! a `wsgate` process: on the acceptor while few connections are pending
//! (no TLS thread even starts), on the TLS handshake threads
//! (`--tls-threads`) while many are, and with `--tls-threads 0` on the
//! acceptor whatever is pending. A test binary of its own, so the
//! handshakes' CPU does not starve the timing-sensitive tests of
//! tests/tls_clients.rs running beside it.
#![cfg(all(feature = "tls", feature = "cli", feature = "admin"))]

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    sync::Arc,
};

use rustls::{
    ClientConfig, ClientConnection, HandshakeKind, RootCertStore, client::Resumption,
    pki_types::ServerName,
};
use support::*;

/// Full handshakes each gateway is given.
const HANDSHAKES: u64 = 50;

/// Least CPU a full handshake's ClientHello costs the server: an ECDHE key
/// exchange and an ECDSA signature (about 200 us in a release build here,
/// more in a test build).
const CLIENT_HELLO_NS: u64 = 50_000;

/// A self-signed certificate for `localhost` in two files, removed when
/// dropped, and a TLS 1.3 client configuration trusting it that never
/// resumes (every handshake is a full one).
struct Cert {
    cert: PathBuf,
    key: PathBuf,
    client: Arc<ClientConfig>,
}

impl Cert {
    fn new() -> Cert {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let base = std::env::temp_dir().join(format!("wsgate-tls-threads-{}", std::process::id()));
        let files = Cert {
            cert: base.with_extension("crt"),
            key: base.with_extension("key"),
            client: {
                let mut roots = RootCertStore::empty();
                roots.add(cert.der().clone()).unwrap();
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let mut config = ClientConfig::builder_with_provider(provider)
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                config.resumption = Resumption::disabled();
                Arc::new(config)
            },
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        files
    }
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cert);
        let _ = std::fs::remove_file(&self.key);
    }
}

/// Connections held open without a byte sent, so that this many handshakes
/// are pending: above the acceptor's threshold for handing over (8).
const PENDING: usize = 16;

/// A `wsgate` process serving `wss://` with `cert`, fed by `origin`, with
/// `--tls-threads threads`, after [`HANDSHAKES`] full TLS 1.3 handshakes
/// (no upgrade after them) made to it one after another, then one
/// connection sending plain HTTP, which must be closed and counted, while
/// `pending` other connections wait in their handshakes.
fn handshaken(cert: &Cert, origin: &TestOrigin, threads: &str, pending: usize) -> GatewayProcess {
    let gw = GatewayProcess::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--origin",
        &origin.url(),
        "--tls-cert",
        cert.cert.to_str().unwrap(),
        "--tls-key",
        cert.key.to_str().unwrap(),
        "--tls-threads",
        threads,
        "--admin",
        "127.0.0.1:0",
        "--log-level",
        "warn",
    ]);
    let held: Vec<TcpStream> = (0..pending)
        .map(|_| TcpStream::connect(gw.addr).unwrap())
        .collect();
    for _ in 0..HANDSHAKES {
        let mut tcp = TcpStream::connect(gw.addr).unwrap();
        tcp.set_read_timeout(Some(DEADLINE)).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = ClientConnection::new(Arc::clone(&cert.client), name).unwrap();
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).expect("a TLS handshake");
        }
        // The client's Finished, which `complete_io` leaves to be written.
        while tls.wants_write() {
            tls.write_tls(&mut tcp).expect("the client's Finished");
        }
        assert_eq!(tls.handshake_kind(), Some(HandshakeKind::Full));
    }
    // Plain HTTP instead of a ClientHello: closed, counted `bad_message`.
    let mut stray = TcpStream::connect(gw.addr).unwrap();
    stray.set_read_timeout(Some(DEADLINE)).unwrap();
    stray
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let closed = stray.read_to_end(&mut answer);
    assert!(
        closed.is_ok(),
        "closed at once, not at a deadline: {closed:?}"
    );
    wait_until(
        "every handshake counted: ok, and the stray bad_message",
        || {
            gw.metric("wsgate_tls_handshakes_total{result=\"ok\"}") == Some(HANDSHAKES as f64)
                && gw.metric("wsgate_tls_handshake_failures_total{reason=\"bad_message\"}")
                    == Some(1.0)
        },
    );
    drop(held);
    gw
}

/// CPU time, in nanoseconds, of the threads of process `pid` whose names
/// start with `prefix` (`/proc/PID/task/*/schedstat`), and how many there
/// are.
fn thread_cpu_ns(pid: u32, prefix: &str) -> (usize, u64) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
    let (mut threads, mut ns) = (0, 0);
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !name.starts_with(prefix) {
            continue;
        }
        let schedstat = std::fs::read_to_string(path.join("schedstat")).unwrap_or_default();
        threads += 1;
        ns += schedstat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
    }
    (threads, ns)
}

#[test]
fn handshakes_spend_their_cpu_on_the_tls_threads_when_many_are_pending_else_on_the_acceptor() {
    let cert = Cert::new();
    let origin = TestOrigin::start();

    let alone = handshaken(&cert, &origin, "2", 0);
    let (threads, _) = thread_cpu_ns(alone.pid(), "wsgate-tls-");
    let (_, acceptor) = thread_cpu_ns(alone.pid(), "wsgate-accepto");
    println!(
        "{HANDSHAKES} handshakes one at a time: acceptor {} us",
        acceptor / 1000
    );
    assert_eq!(threads, 0, "one handshake at a time stays on the acceptor");
    assert!(
        acceptor >= HANDSHAKES * CLIENT_HELLO_NS,
        "which spends their CPU: {acceptor} ns for {HANDSHAKES} handshakes"
    );

    let pooled = handshaken(&cert, &origin, "2", PENDING);
    let (threads, tls) = thread_cpu_ns(pooled.pid(), "wsgate-tls-");
    let (_, acceptor) = thread_cpu_ns(pooled.pid(), "wsgate-accepto");
    println!(
        "{HANDSHAKES} handshakes, {PENDING} pending: {threads} TLS threads {} us, acceptor {} us",
        tls / 1000,
        acceptor / 1000
    );
    assert_eq!(threads, 2, "the threads --tls-threads asks for");
    assert!(
        tls >= HANDSHAKES * CLIENT_HELLO_NS,
        "the ClientHellos' key exchanges and signatures are on the TLS threads: \
         {tls} ns there for {HANDSHAKES} handshakes (the acceptor {acceptor} ns)"
    );

    let inline = handshaken(&cert, &origin, "0", PENDING);
    let (threads, _) = thread_cpu_ns(inline.pid(), "wsgate-tls-");
    let (_, acceptor) = thread_cpu_ns(inline.pid(), "wsgate-accepto");
    println!(
        "{HANDSHAKES} handshakes, {PENDING} pending, --tls-threads 0: acceptor {} us",
        acceptor / 1000
    );
    assert_eq!(threads, 0, "with --tls-threads 0 the acceptor does them");
    assert!(
        acceptor >= HANDSHAKES * CLIENT_HELLO_NS,
        "and spends their CPU: {acceptor} ns for {HANDSHAKES} handshakes"
    );
}
