//! `wss://` for clients (`tls_cert`, `tls_key`): real tungstenite clients
//! over rustls trusting a private CA the test makes with rcgen, against a
//! gateway on 127.0.0.1 port 0 fed by the in-process origin. Covered: a
//! client receives; garbage instead of a ClientHello is closed at once and
//! counted; a handshake that stops halfway ends at the handshake timeout;
//! a certificate rotated by reload reaches new clients while old ones keep
//! receiving with no gap, and a broken pair keeps the running one; a TLS
//! client that never reads stays within its queue, the session's capped
//! buffer and the kernel's unsent bound; half-finished handshakes from one
//! address do not lock out another. Certificates by name (SNI): each name
//! gets its own, wildcards cover one label, other names and clients without
//! SNI get the default; a reload rotates one name's, and a broken pair
//! keeps them all. Failed handshakes counted by reason, completed ones by
//! cipher suite. (Where handshakes spend their CPU: tests/tls_threads.rs.)
#![cfg(feature = "tls")]

mod support;

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SerialNumber,
};
use rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned,
    pki_types::{CertificateDer, ServerName},
};
use support::*;
use tungstenite::{Message, WebSocket};

type TlsClient = WebSocket<StreamOwned<ClientConnection, TcpStream>>;

/// A test certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A leaf certificate: its chain's PEM, its key's PEM, its DER.
struct Leaf {
    chain_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "wsgate test CA");
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    /// A certificate for `localhost` with this `serial`, expiring at the
    /// start of 2040.
    fn leaf(&self, serial: u64) -> Leaf {
        self.leaf_for(&["localhost"], serial, 2040)
    }

    /// A certificate for `names` with this `serial`, expiring at the start
    /// of `year`.
    fn leaf_for(&self, names: &[&str], serial: u64, year: i32) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.issuer.pem()),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }

    /// A client configuration trusting only this CA, offering `versions`
    /// and ALPN `http/1.1`.
    fn client(&self, versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.issuer.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// The 2040-01-01 expiry of every [`Ca::leaf`], in Unix seconds.
const LEAF_EXPIRY: u64 = 2_208_988_800;

/// The certificate and key files a gateway reads, removed when dropped.
struct Files {
    cert: PathBuf,
    key: PathBuf,
}

impl Files {
    fn new() -> Files {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let base = std::env::temp_dir().join(format!("wsgate-tls-{}-{n}", std::process::id()));
        Files {
            cert: base.with_extension("crt"),
            key: base.with_extension("key"),
        }
    }

    fn write(&self, leaf: &Leaf) {
        std::fs::write(&self.cert, &leaf.chain_pem).unwrap();
        std::fs::write(&self.key, &leaf.key_pem).unwrap();
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cert);
        let _ = std::fs::remove_file(&self.key);
    }
}

/// A TLS configuration fed by `origin`, serving `leaf` from the files
/// returned (kept while the gateway runs).
fn tls_config(origin: &TestOrigin, leaf: &Leaf) -> (wsgate::Config, Files) {
    let files = Files::new();
    files.write(leaf);
    let mut config = test_config(&origin.url());
    config.tls_cert = Some(files.cert.clone());
    config.tls_key = Some(files.key.clone());
    (config, files)
}

/// A TLS gateway fed by `origin`, serving `leaf`; its config, to reload.
fn tls_gateway(origin: &TestOrigin, leaf: &Leaf) -> (wsgate::GatewayHandle, wsgate::Config, Files) {
    let (config, files) = tls_config(origin, leaf);
    (start_gateway(config.clone()), config, files)
}

/// A TLS connection to `addr` (handshake not yet driven), from a socket
/// with a receive buffer of `rcvbuf` bytes (0: the default).
fn tls_stream(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    rcvbuf: usize,
) -> StreamOwned<ClientConnection, TcpStream> {
    let tcp = connect_from(addr, [127, 0, 0, 1], rcvbuf);
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(Arc::clone(config), name).unwrap();
    StreamOwned::new(conn, tcp)
}

/// A `wss://` client of the gateway at `addr` asking for `name` (SNI,
/// and the name its certificate is checked for).
fn sni_client(addr: SocketAddr, config: &Arc<ClientConfig>, name: &str) -> TlsClient {
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    let server_name = ServerName::try_from(name.to_owned()).unwrap();
    let conn = ClientConnection::new(Arc::clone(config), server_name).unwrap();
    let url = format!("wss://{name}:{}/", addr.port());
    tungstenite::client(url, StreamOwned::new(conn, tcp))
        .unwrap_or_else(|e| panic!("upgrade over TLS as {name}: {e}"))
        .0
}

/// The leaf certificate a TLS client was shown.
fn presented(client: &TlsClient) -> CertificateDer<'static> {
    client.get_ref().conn.peer_certificates().unwrap()[0].clone()
}

/// The gateway's metrics, as a scrape shows them.
#[cfg(feature = "admin")]
fn metrics_text(gw: &wsgate::GatewayHandle) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    wsgate::metrics::register(&mut registry, gw.metrics_collector());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

/// A `wss://` client of the gateway at `addr`.
fn wss_client(addr: SocketAddr, config: &Arc<ClientConfig>) -> TlsClient {
    wss_client_with(addr, config, 0)
}

fn wss_client_with(addr: SocketAddr, config: &Arc<ClientConfig>, rcvbuf: usize) -> TlsClient {
    let stream = tls_stream(addr, config, rcvbuf);
    let url = format!("wss://localhost:{}/", addr.port());
    tungstenite::client(url, stream)
        .expect("upgrade over TLS")
        .0
}

/// The next data message's text.
#[track_caller]
fn next_text(ws: &mut TlsClient) -> String {
    loop {
        match ws.read().expect("a message before the deadline") {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Binary(b) => return String::from_utf8_lossy(&b).into_owned(),
            Message::Close(frame) => panic!("closed by the gateway: {frame:?}"),
            _ => {}
        }
    }
}

/// Waits until `n` clients are placed and the origin has its connection.
fn wait_ready(gw: &wsgate::GatewayHandle, origin: &TestOrigin, n: usize) {
    wait_placed(gw, n);
    wait_until("the origin connection", || origin.open() >= 1);
}

/// Reads the raw socket to its end: the bytes that came, or the error that
/// ended it (a reset, or the deadline).
fn read_to_end(stream: &mut TcpStream) -> Result<Vec<u8>, io::Error> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[test]
fn wss_clients_receive_every_message_in_order_over_tls_1_3_and_1_2() {
    let ca = Ca::new();
    let leaf = ca.leaf(1);
    let origin = TestOrigin::start();
    let (gw, _config, _files) = tls_gateway(&origin, &leaf);
    let tls13 = ca.client(&[&rustls::version::TLS13]);
    let tls12 = ca.client(&[&rustls::version::TLS12]);
    let mut clients = vec![
        wss_client(gw.local_addr(), &tls13),
        wss_client(gw.local_addr(), &tls12),
    ];
    for (client, version) in clients.iter().zip([
        rustls::ProtocolVersion::TLSv1_3,
        rustls::ProtocolVersion::TLSv1_2,
    ]) {
        let conn = &client.get_ref().conn;
        assert_eq!(conn.protocol_version(), Some(version));
        assert_eq!(conn.alpn_protocol(), Some(&b"http/1.1"[..]));
        let presented = conn.peer_certificates().unwrap();
        assert_eq!(presented[0], leaf.der, "the configured leaf first");
        assert_eq!(presented.len(), 2, "the chain as configured");
    }
    // A client that comes back resumes its session (a ticket): no
    // certificate, no signature.
    let again = wss_client(gw.local_addr(), &tls13);
    assert_eq!(
        again.get_ref().conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    drop(again);
    wait_ready(&gw, &origin, 2);
    // Fewer than a queue's worth at once, so none is dropped.
    for n in 1..=10 {
        origin.send_seq(n);
    }
    for client in &mut clients {
        for n in 1..=10 {
            assert_eq!(next_text(client), n.to_string());
        }
    }
    // A large message goes out in several records and arrives whole.
    let big = "x".repeat(100_000);
    origin.send(Message::text(big.clone()));
    for client in &mut clients {
        assert_eq!(next_text(client), big);
    }
    // Pings are answered through the session.
    clients[0]
        .send(Message::Ping(b"hi".to_vec().into()))
        .unwrap();
    match clients[0].read().expect("the pong") {
        Message::Pong(payload) => assert_eq!(&payload[..], b"hi"),
        other => panic!("unexpected {other:?}"),
    }
    let stats = gw.stats();
    assert_eq!(stats.tls_handshakes_ok, 3);
    assert_eq!(
        (stats.tls_handshakes_tls13, stats.tls_handshakes_tls12),
        (2, 1)
    );
    assert_eq!(stats.tls_handshakes_failed, 0);
    assert_eq!(stats.tls_certificate_expiry, LEAF_EXPIRY);
    #[cfg(feature = "admin")]
    {
        let mut registry = prometheus_client::registry::Registry::default();
        wsgate::metrics::register(&mut registry, gw.metrics_collector());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "wsgate_tls_handshakes_total{result=\"ok\"} 3".to_owned(),
            "wsgate_tls_handshakes_total{result=\"failed\"} 0".to_owned(),
            "wsgate_tls_versions_total{version=\"1.3\"} 2".to_owned(),
            "wsgate_tls_versions_total{version=\"1.2\"} 1".to_owned(),
            format!(
                "wsgate_tls_certificate_expiry_timestamp_seconds{{name=\"default\"}} {LEAF_EXPIRY}"
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
    }
    // The client's close is completed through the session.
    clients[0].close(None).unwrap();
    loop {
        match clients[0].read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("the close did not complete: {e}"),
        }
    }
    wait_until("the closed client is gone", || gw.stats().clients == 1);
}

#[test]
fn garbage_instead_of_a_client_hello_gets_a_clean_close() {
    let ca = Ca::new();
    let origin = TestOrigin::start();
    let (gw, _config, _files) = tls_gateway(&origin, &ca.leaf(1));
    // A plain ws:// client on the TLS listener: its request is garbage there.
    let mut plain = TcpStream::connect(gw.local_addr()).unwrap();
    plain.set_read_timeout(Some(DEADLINE)).unwrap();
    plain.write_all(UPGRADE_REQUEST.as_bytes()).unwrap();
    // Closed before the deadline (the handshake timeout is 10 s, the
    // deadline 20), without a reset, with at most an alert record.
    let got = read_to_end(&mut plain).expect("a clean close, not a reset or a hang");
    assert!(
        got.is_empty() || got[0] == 0x15,
        "an alert or nothing: {got:?}"
    );
    wait_until("the failure counted", || {
        gw.stats().tls_handshakes_failed == 1
    });
    let stats = gw.stats();
    assert_eq!(
        (stats.tls_handshakes_timed_out, stats.handshakes_timed_out),
        (0, 0),
        "closed at once, not at the timeout"
    );
    assert_eq!((stats.handshakes_pending, stats.clients), (0, 0));
    // The listener still serves a real client.
    let mut client = wss_client(gw.local_addr(), &ca.client(rustls::ALL_VERSIONS));
    wait_ready(&gw, &origin, 1);
    origin.send_seq(7);
    assert_eq!(next_text(&mut client), "7");
}

#[test]
fn a_handshake_that_stops_halfway_ends_at_the_handshake_timeout() {
    let ca = Ca::new();
    let origin = TestOrigin::start();
    let (mut config, _files) = tls_config(&origin, &ca.leaf(1));
    config.handshake_timeout = Duration::from_secs(1);
    let gw = start_gateway(config);
    let client_config = ca.client(rustls::ALL_VERSIONS);

    // Half a ClientHello.
    let mut hello = Vec::new();
    let mut conn =
        ClientConnection::new(Arc::clone(&client_config), "localhost".try_into().unwrap()).unwrap();
    conn.write_tls(&mut hello).unwrap();
    let mut half = TcpStream::connect(gw.local_addr()).unwrap();
    half.set_read_timeout(Some(DEADLINE)).unwrap();
    half.write_all(&hello[..hello.len() / 2]).unwrap();

    // A whole ClientHello, the server's flight read, and no Finished.
    let mut stalled = TcpStream::connect(gw.local_addr()).unwrap();
    stalled.set_read_timeout(Some(DEADLINE)).unwrap();
    stalled.write_all(&hello).unwrap();
    let mut flight = [0u8; 1];
    stalled.read_exact(&mut flight).unwrap();
    assert_eq!(flight[0], 0x16, "the server's handshake began");

    let started = Instant::now();
    for (what, stream) in [("half a hello", &mut half), ("no Finished", &mut stalled)] {
        read_to_end(stream).unwrap_or_else(|e| panic!("{what}: not closed cleanly: {e}"));
    }
    println!("both closed after {:?}", started.elapsed());
    let stats = gw.stats();
    assert_eq!(stats.tls_handshakes_timed_out, 2);
    assert_eq!(stats.handshakes_timed_out, 2);
    assert_eq!(
        (stats.tls_handshakes_failed, stats.tls_handshakes_ok),
        (0, 0)
    );
    assert_eq!(stats.handshakes_pending, 0);
}

/// A thread that reads a TLS client's numbered messages until stopped.
struct Numbers {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
    thread: thread::JoinHandle<Vec<u64>>,
}

impl Numbers {
    fn spawn(mut client: TlsClient) -> Numbers {
        client
            .get_ref()
            .sock
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicUsize::new(0));
        let (flag, counted) = (Arc::clone(&stop), Arc::clone(&count));
        let thread = thread::spawn(move || {
            let mut got = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match client.read() {
                    Ok(Message::Text(t)) => {
                        let number = t.as_str().split(' ').next().unwrap_or_default();
                        got.push(number.parse().expect("a number"));
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e))
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("reader failed after {} messages: {e}", got.len()),
                }
            }
            got
        });
        Numbers {
            stop,
            count,
            thread,
        }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    fn finish(self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("reader thread")
    }
}

#[test]
fn a_reload_rotates_the_certificate_without_dropping_a_client() {
    let ca = Ca::new();
    let (first, second) = (ca.leaf(1001), ca.leaf(2002));
    let origin = Arc::new(TestOrigin::start());
    let (gw, config, files) = tls_gateway(&origin, &first);
    let client_config = ca.client(rustls::ALL_VERSIONS);
    let old: Vec<TlsClient> = (0..5)
        .map(|_| wss_client(gw.local_addr(), &client_config))
        .collect();
    for client in &old {
        assert_eq!(
            client.get_ref().conn.peer_certificates().unwrap()[0],
            first.der
        );
    }
    wait_ready(&gw, &origin, 5);
    let readers: Vec<Numbers> = old.into_iter().map(Numbers::spawn).collect();
    let feed = Feed::start(Arc::clone(&origin), Duration::from_millis(5));
    wait_until("the old clients receive", || {
        readers.iter().all(|r| r.count() >= 20)
    });

    files.write(&second);
    gw.reload(config.clone()).expect("the reload applies");
    // A fresh client: one that resumes a session is shown no certificate
    // (rustls then reports the session's).
    let new = wss_client(gw.local_addr(), &ca.client(rustls::ALL_VERSIONS));
    assert_eq!(
        new.get_ref().conn.peer_certificates().unwrap()[0],
        second.der,
        "a new client sees the new certificate"
    );
    assert_eq!(gw.stats().tls_reload_failures, 0);

    // A broken pair (the new certificate with another key) keeps the
    // running one, counted.
    std::fs::write(&files.key, ca.leaf(3003).key_pem).unwrap();
    gw.reload(config).expect("the rest of the reload applies");
    assert_eq!(gw.stats().tls_reload_failures, 1);
    let newest = wss_client(gw.local_addr(), &ca.client(rustls::ALL_VERSIONS));
    assert_eq!(
        newest.get_ref().conn.peer_certificates().unwrap()[0],
        second.der,
        "the running certificate stays"
    );

    let seen: Vec<usize> = readers.iter().map(Numbers::count).collect();
    wait_until("the old clients keep receiving", || {
        readers.iter().zip(&seen).all(|(r, &s)| r.count() >= s + 20)
    });
    wait_placed(&gw, 7);
    let last = feed.stop();
    wait_until("the old clients have the last message", || {
        readers.iter().all(|r| r.count() as u64 >= last)
    });
    for (i, reader) in readers.into_iter().enumerate() {
        let got = reader.finish();
        assert_eq!(got.first(), Some(&1), "client {i} from the start");
        assert_eq!(got.last(), Some(&last), "client {i} to the end");
        for pair in got.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "client {i}: a gap or a duplicate");
        }
    }
    assert_eq!(gw.stats().tls_handshakes_failed, 0);
    assert_eq!(gw.stats().frames_dropped, 0);
    drop((new, newest));
}

#[test]
fn a_tls_client_that_never_reads_stays_within_its_bounds() {
    /// The plain stalled client's bound (tests/hardening.rs): the unsent
    /// bound, what is in flight to a 4 KiB receive buffer, slack.
    const SEND_Q_BOUND: u64 = 64 * 1024;
    const MESSAGES: u64 = 600;
    let ca = Ca::new();
    let origin = TestOrigin::start();
    let (gw, _config, _files) = tls_gateway(&origin, &ca.leaf(1));
    let client_config = ca.client(rustls::ALL_VERSIONS);
    let mut stalled: Vec<TlsClient> = (0..5)
        .map(|_| wss_client_with(gw.local_addr(), &client_config, 4096))
        .collect();
    let good = Numbers::spawn(wss_client(gw.local_addr(), &client_config));
    wait_ready(&gw, &origin, 6);
    // 200 messages a second of 512 bytes, for 3 s.
    for n in 1..=MESSAGES {
        let mut text = n.to_string();
        text.push(' ');
        text.extend(std::iter::repeat_n('.', 512 - text.len()));
        origin.send(Message::text(text));
        thread::sleep(Duration::from_millis(5));
    }
    wait_until("the reading client has every message", || {
        good.count() as u64 >= MESSAGES
    });
    thread::sleep(Duration::from_millis(300));
    for client in &stalled {
        let local = client.get_ref().sock.local_addr().unwrap();
        let (send_q, _) = socket_queues(gw.local_addr(), local).expect("the gateway's socket");
        println!("stalled TLS client's Send-Q: {send_q} bytes");
        assert!(
            send_q <= SEND_Q_BOUND,
            "a stalled TLS client's socket holds {send_q} bytes"
        );
    }
    assert!(
        gw.stats().frames_dropped > 0,
        "the stalled clients lost their oldest frames"
    );
    // Resuming, one reads what waited (its queue, the session's one
    // record, the kernel's bytes), then the newest message.
    let waited = (1..)
        .find(|_| {
            next_text(&mut stalled[0])
                .split(' ')
                .next()
                .is_some_and(|n| n == MESSAGES.to_string())
        })
        .unwrap_or(0);
    println!("{waited} messages waited for the stalled TLS client");
    // Queue 16, 16 KiB in the session (31 of these), the kernel's share
    // (about 64 KiB: 124): far below the 600 sent.
    assert!(
        waited <= 16 + 31 + 124,
        "{waited} of {MESSAGES} messages waited for the stalled TLS client"
    );
    let _ = good.finish();
}

#[test]
fn half_finished_handshakes_from_one_address_do_not_lock_out_another() {
    let ca = Ca::new();
    let origin = TestOrigin::start();
    let (mut config, _files) = tls_config(&origin, &ca.leaf(1));
    config.handshake_timeout = Duration::from_secs(60);
    config.max_clients_per_ip = 5;
    let gw = start_gateway(config);
    let client_config = ca.client(rustls::ALL_VERSIONS);
    let mut hello = Vec::new();
    ClientConnection::new(Arc::clone(&client_config), "localhost".try_into().unwrap())
        .unwrap()
        .write_tls(&mut hello)
        .unwrap();
    // 20 connections from 127.0.0.2, each with half a ClientHello: five
    // wait in their handshake, the rest are refused at accept.
    let _slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = connect_from(gw.local_addr(), [127, 0, 0, 2], 0);
            let _ = s.write_all(&hello[..hello.len() / 2]);
            s
        })
        .collect();
    wait_until("five pending, fifteen refused", || {
        let s = gw.stats();
        s.handshakes_pending == 5 && s.handshakes_rejected == 15
    });
    // A client from 127.0.0.1 completes its handshake and receives.
    let mut client = wss_client(gw.local_addr(), &client_config);
    wait_ready(&gw, &origin, 1);
    origin.send_seq(1);
    assert_eq!(next_text(&mut client), "1");
    let stats = gw.stats();
    assert_eq!(stats.tls_handshakes_ok, 1);
    assert_eq!(stats.handshakes_pending, 5, "the slow ones still wait");
}

/// Certificates served by name (`[[tls.cert]]`) beside a default one: the
/// files of each, removed when dropped.
struct ByName {
    default: Files,
    a: Files,
    b: Files,
}

/// A configuration fed by `origin` serving `default` to any other name
/// (and to clients that send none), `a` to `a.example`, `b` to
/// `*.b.example`.
fn by_name_config(origin: &TestOrigin, [default, a, b]: [&Leaf; 3]) -> (wsgate::Config, ByName) {
    let (mut config, default_files) = tls_config(origin, default);
    let (a_files, b_files) = (Files::new(), Files::new());
    a_files.write(a);
    b_files.write(b);
    config.tls.certs = vec![
        wsgate::SniCert::new(["a.example"], &a_files.cert, &a_files.key),
        wsgate::SniCert::new(["*.b.example"], &b_files.cert, &b_files.key),
    ];
    let files = ByName {
        default: default_files,
        a: a_files,
        b: b_files,
    };
    (config, files)
}

/// A gateway as [`by_name_config`] has it.
fn by_name_gateway(
    origin: &TestOrigin,
    leaves: [&Leaf; 3],
) -> (wsgate::GatewayHandle, wsgate::Config, ByName) {
    let (config, files) = by_name_config(origin, leaves);
    (start_gateway(config.clone()), config, files)
}

/// When the test certificates of 2038 and 2039 expire, in Unix seconds
/// (the second is read only through the metrics, feature `admin`).
const A_EXPIRY: u64 = 2_145_916_800;
#[cfg(feature = "admin")]
const B_EXPIRY: u64 = 2_177_452_800;

/// Every name the default certificate below is valid for: a client asking
/// for any of these (or for none) must be shown it.
const DEFAULT_NAMES: [&str; 4] = ["localhost", "other.example", "b.example", "y.x.b.example"];

#[test]
fn certificates_are_chosen_by_the_name_a_client_asks_for() {
    let ca = Ca::new();
    let default = ca.leaf_for(&DEFAULT_NAMES, 10, 2040);
    let a = ca.leaf_for(&["a.example"], 11, 2038);
    let b = ca.leaf_for(&["*.b.example"], 12, 2039);
    let origin = TestOrigin::start();
    let (gw, _config, _files) = by_name_gateway(&origin, [&default, &a, &b]);
    let client_config = ca.client(rustls::ALL_VERSIONS);
    let addr = gw.local_addr();

    let mut clients = Vec::new();
    let for_a = sni_client(addr, &client_config, "a.example");
    assert_eq!(presented(&for_a), a.der, "a.example: its own certificate");
    clients.push(for_a);
    let for_b = sni_client(addr, &client_config, "x.b.example");
    assert_eq!(presented(&for_b), b.der, "x.b.example: the wildcard's");
    clients.push(for_b);
    // The wildcard covers one label: not its parent, not two labels; an
    // unknown name gets the default.
    for name in ["b.example", "y.x.b.example", "other.example"] {
        let client = sni_client(addr, &client_config, name);
        assert_eq!(presented(&client), default.der, "{name}: the default");
        clients.push(client);
    }
    // A client that sends no name at all (an address, an old client).
    let mut nameless = (*client_config).clone();
    nameless.enable_sni = false;
    let client = sni_client(addr, &Arc::new(nameless), "localhost");
    assert_eq!(presented(&client), default.der, "no SNI: the default");
    clients.push(client);

    // Clients on every certificate share the lobby's feed.
    wait_ready(&gw, &origin, 6);
    origin.send_seq(5);
    for client in &mut clients {
        assert_eq!(next_text(client), "5");
    }

    // Each certificate's expiry by name; the snapshot has the soonest.
    assert_eq!(gw.stats().tls_certificate_expiry, A_EXPIRY);
    #[cfg(feature = "admin")]
    {
        let text = metrics_text(&gw);
        let expiry = "wsgate_tls_certificate_expiry_timestamp_seconds";
        for line in [
            format!("{expiry}{{name=\"default\"}} {LEAF_EXPIRY}"),
            format!("{expiry}{{name=\"a.example\"}} {A_EXPIRY}"),
            format!("{expiry}{{name=\"*.b.example\"}} {B_EXPIRY}"),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
    }
    assert_eq!(gw.stats().tls_handshakes_failed, 0);
}

#[test]
fn a_reload_rotates_one_names_certificate_and_a_broken_pair_keeps_them_all() {
    let ca = Ca::new();
    let default = ca.leaf_for(&DEFAULT_NAMES, 20, 2040);
    let (a1, a2) = (
        ca.leaf_for(&["a.example"], 21, 2040),
        ca.leaf_for(&["a.example"], 22, 2041),
    );
    let b = ca.leaf_for(&["*.b.example"], 23, 2040);
    let origin = Arc::new(TestOrigin::start());
    let (gw, config, files) = by_name_gateway(&origin, [&default, &a1, &b]);
    let client_config = ca.client(rustls::ALL_VERSIONS);
    let addr = gw.local_addr();
    let old = sni_client(addr, &client_config, "a.example");
    assert_eq!(presented(&old), a1.der);
    wait_ready(&gw, &origin, 1);
    let reader = Numbers::spawn(old);
    let feed = Feed::start(Arc::clone(&origin), Duration::from_millis(5));
    wait_until("the old client receives", || reader.count() >= 20);

    // a.example's certificate is renewed: new clients for it see the new
    // one; the other names keep theirs.
    files.a.write(&a2);
    gw.reload(config.clone()).expect("the reload applies");
    let fresh = ca.client(rustls::ALL_VERSIONS);
    assert_eq!(presented(&sni_client(addr, &fresh, "a.example")), a2.der);
    assert_eq!(presented(&sni_client(addr, &fresh, "x.b.example")), b.der);
    assert_eq!(
        presented(&sni_client(addr, &fresh, "localhost")),
        default.der
    );
    assert_eq!(gw.stats().tls_reload_failures, 0);

    // A broken pair (*.b.example's certificate with another key) keeps
    // every running certificate, a.example's too, though its files changed.
    files.b.write(&Leaf {
        key_pem: ca.leaf(24).key_pem,
        ..ca.leaf_for(&["*.b.example"], 25, 2040)
    });
    files.a.write(&a1);
    gw.reload(config).expect("the rest of the reload applies");
    assert_eq!(gw.stats().tls_reload_failures, 1);
    let fresh = ca.client(rustls::ALL_VERSIONS);
    assert_eq!(presented(&sni_client(addr, &fresh, "x.b.example")), b.der);
    assert_eq!(presented(&sni_client(addr, &fresh, "a.example")), a2.der);
    #[cfg(feature = "admin")]
    assert!(
        metrics_text(&gw).contains("wsgate_tls_reload_failures_total 1"),
        "the failure in /metrics"
    );

    let seen = reader.count();
    wait_until("the old client keeps receiving", || {
        reader.count() >= seen + 20
    });
    let last = feed.stop();
    wait_until("the old client has the last message", || {
        reader.count() as u64 >= last
    });
    let got = reader.finish();
    assert_eq!((got.first(), got.last()), (Some(&1), Some(&last)));
    for pair in got.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "a gap or a duplicate");
    }
    drop(files.default);
}

/// A TLS 1.0 ClientHello offering one cipher suite
/// (TLS_RSA_WITH_AES_128_CBC_SHA) and no extensions: an old client.
const TLS10_CLIENT_HELLO: [u8; 50] = {
    let mut hello = [0u8; 50];
    let head = [
        0x16, 0x03, 0x01, 0x00, 0x2d, 0x01, 0x00, 0x00, 0x29, 0x03, 0x01,
    ];
    let mut i = 0;
    while i < head.len() {
        hello[i] = head[i];
        i += 1;
    }
    // 32 bytes of random (zeros), then: no session id, one suite, null
    // compression.
    let tail = [0x00, 0x00, 0x02, 0x00, 0x2f, 0x01, 0x00];
    let mut j = 0;
    while j < tail.len() {
        hello[43 + j] = tail[j];
        j += 1;
    }
    hello
};

#[test]
fn failed_handshakes_are_counted_by_reason() {
    let ca = Ca::new();
    let origin = TestOrigin::start();
    let (gw, _config, _files) = tls_gateway(&origin, &ca.leaf(1));
    let addr = gw.local_addr();
    let closed = |bytes: &[u8]| {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.write_all(bytes).unwrap();
        read_to_end(&mut stream).expect("closed, not reset or left hanging")
    };
    // Plain HTTP on the TLS listener: not TLS at all.
    let answer = closed(UPGRADE_REQUEST.as_bytes());
    assert!(answer.is_empty() || answer[0] == 0x15, "{answer:?}");
    // An old client: TLS 1.0 only, answered with a handshake_failure alert
    // (level 2, description 40).
    let answer = closed(&TLS10_CLIENT_HELLO);
    assert_eq!(answer, [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]);
    // A client that does not trust the certificate says so with an alert.
    let stranger = Ca::new().client(rustls::ALL_VERSIONS);
    let mut distrust = tls_stream(addr, &stranger, 0);
    let error = distrust.conn.complete_io(&mut distrust.sock).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::InvalidData, "{error}");
    // One that connects and leaves without a word.
    drop(TcpStream::connect(addr).unwrap());

    wait_until("four failures counted", || {
        gw.stats().tls_handshakes_failed == 4
    });
    let stats = gw.stats();
    for reason in [
        wsgate::TlsFailure::BadMessage,
        wsgate::TlsFailure::Incompatible,
        wsgate::TlsFailure::PeerAlert,
        wsgate::TlsFailure::Eof,
    ] {
        assert_eq!(stats.tls_handshake_failed(reason), 1, "{}", reason.name());
    }
    assert_eq!(stats.tls_handshake_failed(wsgate::TlsFailure::Other), 0);
    #[cfg(feature = "admin")]
    {
        let text = metrics_text(&gw);
        for (reason, n) in [
            ("bad_message", 1),
            ("incompatible", 1),
            ("peer_alert", 1),
            ("eof", 1),
            ("other", 0),
        ] {
            let line = format!("wsgate_tls_handshake_failures_total{{reason=\"{reason}\"}} {n}");
            assert!(text.lines().any(|l| l == line), "{line} in {text}");
        }
    }
}

#[test]
fn the_negotiated_cipher_suite_is_counted() {
    let ca = Ca::new();
    let origin = TestOrigin::start();
    let (gw, _config, _files) = tls_gateway(&origin, &ca.leaf(1));
    // A TLS 1.3 client preferring ChaCha20, a TLS 1.2 one AES-256: not
    // the server's first choices, so the count follows the client.
    let offering = |version, suite: rustls::SupportedCipherSuite| {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![suite];
        let mut roots = RootCertStore::empty();
        roots.add(ca.issuer.der().clone()).unwrap();
        let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    };
    use rustls::crypto::ring::cipher_suite as suites;
    let tls13 = offering(
        &rustls::version::TLS13,
        suites::TLS13_CHACHA20_POLY1305_SHA256,
    );
    let tls12 = offering(
        &rustls::version::TLS12,
        suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    );
    let clients = [
        wss_client(gw.local_addr(), &tls13),
        wss_client(gw.local_addr(), &tls12),
        wss_client(gw.local_addr(), &tls12),
    ];
    let names: Vec<&str> = clients
        .iter()
        .map(|c| {
            let suite = c.get_ref().conn.negotiated_cipher_suite().unwrap();
            suite.suite().as_str().unwrap()
        })
        .collect();
    assert_eq!(
        names,
        [
            "TLS13_CHACHA20_POLY1305_SHA256",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
            "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"
        ]
    );
    let stats = gw.stats();
    let counted: Vec<(&str, u64)> = stats.tls_cipher_suites().filter(|(_, n)| *n > 0).collect();
    assert_eq!(
        counted,
        [
            ("TLS13_CHACHA20_POLY1305_SHA256", 1),
            ("TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", 2)
        ]
    );
    #[cfg(feature = "admin")]
    {
        let text = metrics_text(&gw);
        let line =
            "wsgate_tls_cipher_suites_total{suite=\"TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384\"} 2";
        assert!(text.lines().any(|l| l == line), "{line} in {text}");
        assert!(
            text.lines().any(
                |l| l == "wsgate_tls_cipher_suites_total{suite=\"TLS13_AES_128_GCM_SHA256\"} 0"
            ),
            "every suite listed: {text}"
        );
    }
}

#[cfg(feature = "admin")]
#[test]
fn the_dashboard_shows_tls_handshakes_and_the_soonest_expiry_in_chromium() {
    let Some(chromium) = chromium() else {
        return;
    };
    let ca = Ca::new();
    let default = ca.leaf_for(&DEFAULT_NAMES, 30, 2040);
    let a = ca.leaf_for(&["a.example"], 31, 2038);
    let b = ca.leaf_for(&["*.b.example"], 32, 2039);
    let origin = TestOrigin::start();
    let (mut config, _files) = by_name_config(&origin, [&default, &a, &b]);
    config.admin = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let gw = start_gateway(config);
    let _client = sni_client(
        gw.local_addr(),
        &ca.client(rustls::ALL_VERSIONS),
        "x.b.example",
    );
    let mut garbage = TcpStream::connect(gw.local_addr()).unwrap();
    garbage.set_read_timeout(Some(DEADLINE)).unwrap();
    garbage.write_all(UPGRADE_REQUEST.as_bytes()).unwrap();
    let _ = read_to_end(&mut garbage);
    wait_until("one failure counted", || {
        gw.stats().tls_handshakes_failed == 1
    });

    let url = format!("http://{}/", gw.admin_addr().unwrap());
    let dom = run_chromium(
        &chromium,
        &["--virtual-time-budget=3000", "--dump-dom", &url],
    );
    let tag = |id: &str| {
        let at = dom
            .find(&format!("id=\"{id}\""))
            .unwrap_or_else(|| panic!("#{id} in {dom}"));
        let start = dom[..at].rfind('<').unwrap();
        let end = at + dom[at..].find('>').unwrap();
        dom[start..end].to_owned()
    };
    for id in ["tls", "tls-expiry"] {
        assert!(!tag(id).contains(" hidden"), "#{id} shown: {}", tag(id));
    }
    let handshakes = tag("tls-handshakes");
    assert!(
        handshakes.contains("data-failed=\"1\"") && handshakes.contains("data-ok=\"1\""),
        "{handshakes}"
    );
    assert!(tag("tls").contains("bad_message 1"), "{}", tag("tls"));
    let expiry = tag("tls-expiry-days");
    assert!(
        expiry.contains(&format!("data-seconds=\"{A_EXPIRY}\""))
            && expiry.contains("data-name=\"a.example\""),
        "the soonest: {expiry}"
    );
}

#[test]
fn a_second_listener_serves_wss_beside_plain_ws_into_the_same_lobby() {
    let ca = Ca::new();
    let origin = TestOrigin::start();
    let (mut config, _files) = tls_config(&origin, &ca.leaf(1));
    config.tls_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    let gw = start_gateway(config);
    let secure = gw.tls_local_addr().expect("the wss:// listener's address");
    assert_ne!(secure, gw.local_addr());

    let mut plain = ws_client(gw.local_addr());
    let mut tls = wss_client(secure, &ca.client(rustls::ALL_VERSIONS));
    assert_eq!(tls.get_ref().conn.peer_certificates().unwrap().len(), 2);
    wait_placed(&gw, 2);
    wait_until("one origin connection for both", || origin.open() == 1);
    assert_eq!(
        gw.lobbies(DEADLINE).len(),
        1,
        "one lobby for both listeners"
    );
    for n in 1..=5 {
        origin.send_seq(n);
    }
    for n in 1..=5 {
        assert_eq!(recv_text(&mut plain), n.to_string(), "ws://");
        assert_eq!(next_text(&mut tls), n.to_string(), "wss://");
    }
    // Plain HTTP on the wss:// listener is not TLS there.
    let mut stray = TcpStream::connect(secure).unwrap();
    stray.set_read_timeout(Some(DEADLINE)).unwrap();
    stray.write_all(UPGRADE_REQUEST.as_bytes()).unwrap();
    let _ = read_to_end(&mut stray);
    wait_until("the stray counted", || {
        gw.stats().tls_handshakes_failed == 1
    });
    let stats = gw.stats();
    assert_eq!(
        stats.tls_handshakes_ok, 1,
        "only the wss:// client spoke TLS"
    );
    assert_eq!(
        stats.tls_handshake_failed(wsgate::TlsFailure::BadMessage),
        1
    );
}
