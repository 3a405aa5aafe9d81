//! Where `wss://` handshakes spend their CPU: on the TLS handshake threads
//! (`--tls-threads`), read per thread in `/proc` of a `wsgate` process, or
//! with `--tls-threads 0` on the acceptor. A test binary of its own, so the
//! handshakes' CPU does not starve the timing-sensitive tests of
//! tests/tls_clients.rs running beside it.
#![cfg(all(feature = "tls", feature = "cli"))]

mod support;

use std::{net::TcpStream, path::PathBuf, sync::Arc};

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

/// A `wsgate` process serving `wss://` with `cert`, fed by `origin`, with
/// `--tls-threads threads`, after [`HANDSHAKES`] full TLS 1.3 handshakes
/// (no upgrade after them) made to it one after another.
fn handshaken(cert: &Cert, origin: &TestOrigin, threads: &str) -> GatewayProcess {
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
        "--log-level",
        "warn",
    ]);
    for _ in 0..HANDSHAKES {
        let mut tcp = TcpStream::connect(gw.addr).unwrap();
        tcp.set_read_timeout(Some(DEADLINE)).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = ClientConnection::new(Arc::clone(&cert.client), name).unwrap();
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).expect("a TLS handshake");
        }
        assert_eq!(tls.handshake_kind(), Some(HandshakeKind::Full));
    }
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
fn handshakes_spend_their_cpu_on_the_tls_threads_and_with_none_on_the_acceptor() {
    let cert = Cert::new();
    let origin = TestOrigin::start();

    let pooled = handshaken(&cert, &origin, "2");
    let (threads, tls) = thread_cpu_ns(pooled.pid(), "wsgate-tls-");
    let (_, acceptor) = thread_cpu_ns(pooled.pid(), "wsgate-accepto");
    println!(
        "{HANDSHAKES} handshakes: {threads} TLS threads {} us, acceptor {} us",
        tls / 1000,
        acceptor / 1000
    );
    assert_eq!(threads, 2, "the threads --tls-threads asks for");
    assert!(
        tls >= HANDSHAKES * CLIENT_HELLO_NS,
        "the ClientHellos' key exchanges and signatures are on the TLS threads: \
         {tls} ns there for {HANDSHAKES} handshakes (the acceptor {acceptor} ns)"
    );

    let inline = handshaken(&cert, &origin, "0");
    let (threads, _) = thread_cpu_ns(inline.pid(), "wsgate-tls-");
    let (_, acceptor) = thread_cpu_ns(inline.pid(), "wsgate-accepto");
    println!(
        "{HANDSHAKES} handshakes with --tls-threads 0: acceptor {} us",
        acceptor / 1000
    );
    assert_eq!(threads, 0, "with --tls-threads 0 the acceptor does them");
    assert!(
        acceptor >= HANDSHAKES * CLIENT_HELLO_NS,
        "and spends their CPU: {acceptor} ns for {HANDSHAKES} handshakes"
    );
}
