//! Client engine of the load tool: N WebSocket clients multiplexed with mio
//! over a few threads (no thread per client, no async runtime).
//!
//! Each client binds to a source address `127.0.0.x` (x cycling over
//! `1..=source_ips`) before a non-blocking connect, so more clients than one
//! source address has ephemeral ports are possible. It then sends a
//! hand-written HTTP upgrade request, checks the `101` answer and its
//! `Sec-WebSocket-Accept`, and from then on parses unmasked server frames with
//! a streaming parser reading into a per-thread 64 KiB scratch buffer; per
//! client state is about 270 bytes (a `wss://` client's
//! TLS session is boxed beside it). Clients answer Ping with a masked Pong and
//! Close with a masked Close, and close politely (masked Close 1000) at the end.
//!
//! With [`Config::sse`] the clients read an event stream instead: a plain
//! `GET` with `Accept: text/event-stream`, a `200 text/event-stream` answer,
//! then events parsed incrementally by `events.rs`'s reader (a binary
//! message arrives as an `event: binary` whose base64 data is decoded as far
//! as seq and timestamp). Such a client writes nothing after its request and
//! ends by closing its socket; the server ending the stream is its normal
//! end, counted like a server Close.
//!
//! With a `wss://` URL ([`Config::tls_ca`] names the CA to trust) each
//! client runs its own rustls session (aws-lc-rs, ALPN `http/1.1`, no
//! session resumption: every client makes a full handshake, as distinct
//! clients would) and every read and write above goes through it: the TLS
//! handshake runs while the upgrade request waits in the session, and the
//! frame handling is the same. A certificate the CA does not vouch for, or
//! any other handshake error, fails that client's connect like a refused
//! upgrade (counted, first error kept). A slow client's unsent control
//! frames may also fill the session's buffer (64 KiB) before its own
//! backlog. A plain client pays a test of an empty `Option` per read and
//! write.
//!
//! Binary messages whose payload starts with `seq: u64 LE, sent_unix_ns: u64 LE`
//! are checked per client for gaps and duplicates/reorders and their latency
//! (now - sent_unix_ns, in µs) is recorded into an hdrhistogram; all of this
//! and the delivery count only inside the measurement window.
//!
//! Public API (self-contained: depends only on external crates and `wire.rs`):
//! - [`Config`]: what to connect, how many, how.
//! - [`Clients::start`] spawns the threads, which connect in batches of at
//!   most [`Config::max_in_flight`] per thread; [`Clients::wait_connected`],
//!   [`Clients::begin_window`], [`Clients::end_window`] and
//!   [`Clients::finish`] (polite close, join, merged [`Report`]) drive a run.
//! - [`run`] does the whole sequence (connect, warm-up, window, close) and
//!   calls a hook at each [`Phase`].

// A private copy of the shared wire code keeps this file self-contained: a
// bench can include it alone with `#[path = "..."] mod NAME;`.
#[allow(clippy::duplicate_mod)]
#[path = "events.rs"]
mod events;
#[allow(clippy::duplicate_mod)]
#[path = "wire.rs"]
mod wire;

use miniz_oxide::inflate::core::{DecompressorOxide, decompress, inflate_flags};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use events::EventReader;
use wire::{Frame, OP_PING, Parser, SmallFrame};

/// `EINPROGRESS` on Linux: what a non-blocking `connect` returns.
const EINPROGRESS: i32 = 115;
/// Per-thread read buffer.
const SCRATCH: usize = 64 * 1024;
/// Reads per readiness event before yielding to other clients.
const READS_PER_TURN: usize = 16;
/// Receive buffer of a slow client (the kernel doubles it).
const SLOW_RCVBUF: usize = 4 * 1024;
/// Largest handshake response we accept.
const MAX_RESPONSE: usize = 8 * 1024;
/// Largest unsent control-frame backlog per client before it is dropped.
const MAX_PENDING: usize = 4 * 1024;
/// How long the polite close may take at the end.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Largest latency the histogram records (µs); larger values saturate.
const MAX_LATENCY_US: u64 = 600_000_000;
const WAKE: Token = Token(usize::MAX);

const PHASE_WARMUP: u8 = 0;
const PHASE_MEASURE: u8 = 1;
const PHASE_AFTER: u8 = 2;
const PHASE_CLOSE: u8 = 3;

/// Client engine configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `ws://HOST:PORT/PATH` or `wss://...`; HOST must resolve to a
    /// loopback address.
    pub url: String,
    /// Number of clients.
    pub clients: usize,
    /// Number of event-loop threads.
    pub threads: usize,
    /// Source addresses `127.0.0.1 ..= 127.0.0.<source_ips>` to cycle over
    /// (IPv4 loopback targets only; clamped to 1..=254).
    pub source_ips: u8,
    /// The first `slow` clients handshake and then never read again; their
    /// receive buffers are small (4 KiB), so they fill within seconds.
    pub slow: usize,
    /// Pings a second each slow client sends (125-byte payloads), never
    /// reading the pongs; 0 sends none.
    pub slow_ping: u32,
    /// Deadline for all clients to connect and handshake, from `start`.
    pub connect_timeout: Duration,
    /// Connections being set up (connect + upgrade) at once per thread.
    /// Keep `threads × max_in_flight` at or below the server's listen
    /// backlog (128 with mio's `TcpListener::bind`), or the kernel drops
    /// SYNs and those clients connect only after a 1 s retransmit.
    pub max_in_flight: usize,
    /// Offer permessage-deflate; compressed messages are inflated as far
    /// as their seq and timestamp.
    pub deflate: bool,
    /// Extra request header lines (`Name: value`), e.g. a bearer token.
    pub headers: Vec<String>,
    /// Read a Server-Sent Events stream (`GET` with `Accept:
    /// text/event-stream`) instead of upgrading to WebSocket; excludes
    /// `deflate`, and `slow_ping` sends nothing.
    pub sse: bool,
    /// The CA certificates (PEM) a `wss://` URL's server is checked
    /// against; required with `wss://`, refused with `ws://`.
    pub tls_ca: Option<PathBuf>,
}

impl Config {
    /// A configuration with the defaults: 2 threads, 50 source IPs, no slow
    /// clients, 30 s connect timeout, 64 connects in flight per thread.
    pub fn new(url: &str, clients: usize) -> Config {
        Config {
            url: url.to_string(),
            clients,
            threads: 2,
            source_ips: 50,
            slow: 0,
            slow_ping: 0,
            connect_timeout: Duration::from_secs(30),
            max_in_flight: 64,
            deflate: false,
            headers: Vec::new(),
            sse: false,
            tls_ca: None,
        }
    }
}

/// Connection progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    /// Clients whose handshake succeeded.
    pub connected: usize,
    /// Clients that failed to connect or handshake (or timed out).
    pub failed: usize,
    /// True once every thread has finished connecting its clients.
    pub done: bool,
}

/// Results of a run, merged over all threads.
pub struct Report {
    /// Clients requested.
    pub clients: usize,
    /// Clients whose handshake succeeded.
    pub connected: usize,
    /// Connected clients that are slow (never read).
    pub slow_connected: usize,
    /// Clients that failed to connect or handshake.
    pub connect_failed: usize,
    /// First connect error seen, for diagnosis.
    pub first_connect_error: Option<String>,
    /// First error after connect, for diagnosis.
    pub first_error: Option<String>,
    /// Measurement window length (zero if no window was run).
    pub window: Duration,
    /// Messages (text or binary) received during the window.
    pub delivered: u64,
    /// Bytes read from the sockets during the window (frames as sent; a
    /// `wss://` client counts the frames its TLS records carried, not the
    /// records).
    pub wire_bytes: u64,
    /// Messages received over the whole run.
    pub total_messages: u64,
    /// Latency of seq-carrying messages received in the window, µs.
    pub latency: Histogram<u64>,
    /// Missing seqs seen in the window.
    pub gaps: u64,
    /// Missing seqs over the whole run, window or not: what the clients lost
    /// between each one's first and last message.
    pub missed: u64,
    /// Seqs at or below the last one seen, in the window.
    pub dups: u64,
    /// I/O errors (resets, unexpected EOF) on connected clients.
    pub io_errors: u64,
    /// Protocol violations by the server.
    pub protocol_errors: u64,
    /// Close frames the server sent before we asked to close (for an event
    /// stream: the server ending it).
    pub server_closes: u64,
    /// Event streams the server ended before the measurement window did
    /// (wsgate closes a stream that cannot keep up, for its client to
    /// resume; these clients do not reconnect).
    pub streams_ended_early: u64,
    /// Clients that completed the closing handshake at the end.
    pub clean_closes: u64,
}

/// Formats a latency in µs as milliseconds with about three significant digits.
pub fn ms(us: u64) -> String {
    let v = us as f64 / 1000.0;
    if v < 10.0 {
        format!("{v:.2}ms")
    } else if v < 100.0 {
        format!("{v:.1}ms")
    } else {
        format!("{v:.0}ms")
    }
}

impl Report {
    /// A report with nothing counted yet.
    fn empty(clients: usize, window: Duration) -> Report {
        Report {
            clients,
            connected: 0,
            slow_connected: 0,
            connect_failed: 0,
            first_connect_error: None,
            first_error: None,
            window,
            wire_bytes: 0,
            delivered: 0,
            total_messages: 0,
            latency: new_histogram(),
            gaps: 0,
            missed: 0,
            dups: 0,
            io_errors: 0,
            protocol_errors: 0,
            server_closes: 0,
            streams_ended_early: 0,
            clean_closes: 0,
        }
    }

    /// Adds one client thread's counts (its `clients` and `window` are unused).
    fn absorb(&mut self, t: Report) {
        self.connected += t.connected;
        self.slow_connected += t.slow_connected;
        self.connect_failed += t.connect_failed;
        if self.first_connect_error.is_none() {
            self.first_connect_error = t.first_connect_error;
        }
        if self.first_error.is_none() {
            self.first_error = t.first_error;
        }
        self.delivered += t.delivered;
        self.wire_bytes += t.wire_bytes;
        self.total_messages += t.total_messages;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency.add(&t.latency);
        self.gaps += t.gaps;
        self.missed += t.missed;
        self.dups += t.dups;
        self.io_errors += t.io_errors;
        self.protocol_errors += t.protocol_errors;
        self.server_closes += t.server_closes;
        self.streams_ended_early += t.streams_ended_early;
        self.clean_closes += t.clean_closes;
    }

    /// All errors after connect: I/O, protocol, and server-initiated closes.
    pub fn errors(&self) -> u64 {
        self.io_errors + self.protocol_errors + self.server_closes
    }
}

/// Where a [`run`] is, reported to its hook.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    /// Connecting ended (all attempted, or the connect timeout passed).
    Connected(Progress),
    /// The measurement window just began (after the warm-up).
    WindowStart,
    /// The measurement window just ended.
    WindowEnd,
}

/// Connects `config.clients` clients, waits `warmup`, measures for
/// `measure`, closes politely and returns the report. `hook` is called at
/// each phase change (e.g. to sample other counters at the window edges).
/// Fails only if the configuration is bad or no client connected.
pub fn run(
    config: Config,
    warmup: Duration,
    measure: Duration,
    hook: &mut dyn FnMut(Phase),
) -> Result<Report, String> {
    let deadline = Instant::now() + config.connect_timeout;
    let mut clients = Clients::start(config)?;
    let progress = clients.wait_connected(deadline);
    hook(Phase::Connected(progress));
    if progress.connected == 0 {
        let report = clients.finish();
        let why = report
            .first_connect_error
            .unwrap_or_else(|| "timed out".to_string());
        return Err(format!(
            "no client connected ({} failed: {why})",
            report.connect_failed
        ));
    }
    std::thread::sleep(warmup);
    clients.begin_window();
    hook(Phase::WindowStart);
    std::thread::sleep(measure);
    clients.end_window();
    hook(Phase::WindowEnd);
    Ok(clients.finish())
}

struct Shared {
    phase: AtomicU8,
    connected: AtomicUsize,
    failed: AtomicUsize,
    threads_done: AtomicUsize,
}

/// A running set of clients; see the module docs.
pub struct Clients {
    shared: Arc<Shared>,
    wakers: Vec<Arc<Waker>>,
    threads: Vec<JoinHandle<Report>>,
    clients: usize,
    window_start: Option<Instant>,
    window_end: Option<Instant>,
}

impl Clients {
    /// Validates the configuration, resolves the URL and spawns the client
    /// threads, which start connecting at once.
    pub fn start(config: Config) -> Result<Clients, String> {
        if config.clients == 0 {
            return Err("need at least one client".to_string());
        }
        let target = Target::parse(&config.url, &config.headers, config.tls_ca.as_deref())?;
        let threads = config.threads.clamp(1, config.clients);
        let shared = Arc::new(Shared {
            phase: AtomicU8::new(PHASE_WARMUP),
            connected: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            threads_done: AtomicUsize::new(0),
        });
        let target = Arc::new(target);
        let connect_deadline = Instant::now() + config.connect_timeout;
        let mut handles = Clients {
            shared: shared.clone(),
            wakers: Vec::new(),
            threads: Vec::new(),
            clients: config.clients,
            window_start: None,
            window_end: None,
        };
        for t in 0..threads {
            let poll = Poll::new().map_err(|e| format!("poll: {e}"))?;
            let waker =
                Arc::new(Waker::new(poll.registry(), WAKE).map_err(|e| format!("waker: {e}"))?);
            let worker = Worker {
                poll,
                shared: shared.clone(),
                target: target.clone(),
                // Client i goes to thread i % threads.
                indices: (t..config.clients).step_by(threads).collect(),
                source_ips: config.source_ips.clamp(1, 254),
                slow: config.slow,
                slow_ping: config.slow_ping,
                max_in_flight: config.max_in_flight.max(1),
                connect_deadline,
                deflate: config.deflate && !config.sse,
                sse: config.sse,
            };
            let spawned = std::thread::Builder::new()
                .name(format!("load-client-{t}"))
                .spawn(move || worker.run());
            match spawned {
                Ok(h) => {
                    handles.wakers.push(waker);
                    handles.threads.push(h);
                }
                Err(e) => {
                    // Dropping `handles` stops and joins the threads already started.
                    return Err(format!("spawn client thread: {e}"));
                }
            }
        }
        Ok(handles)
    }

    /// Current connection progress.
    pub fn progress(&self) -> Progress {
        Progress {
            connected: self.shared.connected.load(Ordering::Acquire),
            failed: self.shared.failed.load(Ordering::Acquire),
            done: self.shared.threads_done.load(Ordering::Acquire) >= self.threads.len(),
        }
    }

    /// Waits until every client connected or failed, or `deadline` passed.
    pub fn wait_connected(&self, deadline: Instant) -> Progress {
        loop {
            let p = self.progress();
            if p.done || p.connected + p.failed >= self.clients || Instant::now() >= deadline {
                return p;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts counting deliveries, gaps, duplicates and latency.
    pub fn begin_window(&mut self) {
        self.window_start = Some(Instant::now());
        self.set_phase(PHASE_MEASURE);
    }

    /// Stops counting.
    pub fn end_window(&mut self) {
        self.set_phase(PHASE_AFTER);
        self.window_end = Some(Instant::now());
    }

    fn set_phase(&self, phase: u8) {
        self.shared.phase.store(phase, Ordering::Release);
        for w in &self.wakers {
            // A failed wake only delays the thread until its next poll timeout.
            let _ = w.wake();
        }
    }

    /// Closes every client politely (masked Close 1000, waiting up to 2 s
    /// for the server's Close), joins the threads and merges their reports.
    pub fn finish(mut self) -> Report {
        self.set_phase(PHASE_CLOSE);
        let window = match (self.window_start, self.window_end) {
            (Some(s), Some(e)) => e.saturating_duration_since(s),
            _ => Duration::ZERO,
        };
        let mut report = Report::empty(self.clients, window);
        for h in std::mem::take(&mut self.threads) {
            match h.join() {
                Ok(thread) => report.absorb(thread),
                Err(_) => report.io_errors += 1,
            }
        }
        report
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        self.set_phase(PHASE_CLOSE);
        for h in std::mem::take(&mut self.threads) {
            let _ = h.join();
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// Where clients connect.
struct Target {
    addr: SocketAddr,
    /// With `wss://`: the session configuration and the name the server's
    /// certificate must carry.
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
    /// The ready-to-send request up to and including `Sec-WebSocket-Key: `.
    request_head: String,
    /// The whole event-stream request.
    event_stream_request: String,
}

impl Target {
    fn parse(url: &str, headers: &[String], tls_ca: Option<&Path>) -> Result<Target, String> {
        let (rest, is_tls) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => return Err(format!("url must start with ws:// or wss:// (got {url})")),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("no host in url {url}"));
        }
        let has_port = match authority.rfind(']') {
            Some(close) => authority[close..].contains(':'),
            None => authority.contains(':'),
        };
        let with_port = match (has_port, is_tls) {
            (true, _) => authority.to_string(),
            (false, false) => format!("{authority}:80"),
            (false, true) => format!("{authority}:443"),
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {authority}: {e}"))?
            // Prefer IPv4 (e.g. for "localhost"): source-address spreading needs it.
            .min_by_key(|a| a.is_ipv6())
            .ok_or_else(|| format!("{authority} resolves to nothing"))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "refusing non-loopback target {addr}: this tool only targets loopback"
            ));
        }
        let tls = match (is_tls, tls_ca) {
            (true, Some(ca)) => {
                let host = match authority.rfind(']') {
                    Some(close) => authority[..close].trim_start_matches('['),
                    None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
                };
                let name = ServerName::try_from(host.to_string())
                    .map_err(|e| format!("bad server name {host:?}: {e}"))?;
                Some((tls_config(ca)?, name))
            }
            (true, None) => return Err(format!("{url} needs --tls-ca")),
            (false, Some(_)) => return Err(format!("--tls-ca needs a wss:// url (got {url})")),
            (false, None) => None,
        };
        let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
        let request_head = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             {extra}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
        );
        let event_stream_request = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\n{extra}Accept: text/event-stream\r\n\r\n"
        );
        Ok(Target {
            addr,
            tls,
            request_head,
            event_stream_request,
        })
    }
}

/// A client configuration trusting only the CA certificates in the PEM
/// file `ca`, on aws-lc-rs (the gateway's own provider) with ALPN `http/1.1`
/// and without resumption (the gateway issues tickets: with a shared cache
/// all but the first clients would resume).
fn tls_config(ca: &Path) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(ca)
        .map_err(|e| format!("cannot read {}: {e}", ca.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("bad PEM in {}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("bad CA certificate in {}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("no certificate in {}", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS client configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Transient state while a connection is being set up (freed after).
struct Handshake {
    request: Vec<u8>,
    written: usize,
    response: Vec<u8>,
    accept: String,
}

enum State {
    /// TCP connect in progress.
    Connecting(Box<Handshake>),
    /// Request sent (or being sent), waiting for `101` (`200` for an event
    /// stream).
    Upgrading(Box<Handshake>),
    /// WebSocket open.
    Open,
    /// We sent Close and wait for the server's Close.
    Closing,
}

/// One client; kept small (about 270 bytes) so 10 000+ are cheap.
struct Conn {
    io: Transport,
    state: State,
    slow: bool,
    last_seq: u64,
    /// Control frames that could not be written yet.
    pending: Vec<u8>,
    parser: Parser,
    /// The event-stream parser (with `sse`; `parser` is then unused), boxed
    /// to keep a WebSocket client small.
    events: Option<Box<EventReader>>,
}

/// A client's socket and, for `wss://`, its TLS session: every byte of the
/// upgrade and the frames goes through [`Transport::read`] and
/// [`Transport::write`].
struct Transport {
    stream: TcpStream,
    /// The rustls session of a `wss://` client, boxed: plain clients stay
    /// small.
    tls: Option<Box<ClientConnection>>,
}

impl Transport {
    /// Reads plaintext: from the socket, or through the TLS session, with a
    /// socket's meaning (`Ok(0)` the server is done, `WouldBlock` nothing
    /// until the socket is readable).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.stream.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return done,
            }
            if tls.read_tls(&mut self.stream)? == 0 {
                return Ok(0);
            }
            if let Err(e) = tls.process_new_packets() {
                // Best effort: the alert that tells the server why.
                let _ = flush_tls(tls, &mut self.stream);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("TLS: {e}"),
                ));
            }
            // The handshake's answers, or the upgrade request once it is done.
            flush_tls(tls, &mut self.stream)?;
        }
    }

    /// Writes plaintext to the socket, or through the TLS session (which
    /// keeps what the socket does not take; `WouldBlock` once it holds its
    /// limit, 64 KiB: an upgrade request, written before the handshake
    /// ends, always fits).
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_deref_mut() else {
            return self.stream.write(bytes);
        };
        let n = tls.writer().write(bytes)?;
        flush_tls(tls, &mut self.stream)?;
        if n == 0 && !bytes.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Writes what the TLS session holds for the server, as far as the
    /// socket takes it (nothing to do for a plain client).
    fn flush_tls(&mut self) -> io::Result<()> {
        match self.tls.as_deref_mut() {
            Some(tls) => flush_tls(tls, &mut self.stream),
            None => Ok(()),
        }
    }

    /// Whether this is a `wss://` client.
    fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// Writes what `tls` holds for the server until it holds nothing or the
/// socket is full (the rest goes on the next read, write or writable event).
fn flush_tls(tls: &mut ClientConnection, stream: &mut TcpStream) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What frame handling asks the event loop to do.
#[derive(Default)]
struct Actions {
    pong: Option<SmallFrame>,
    close_reply: Option<SmallFrame>,
    got_close: bool,
}

/// Outcome of servicing a connection.
enum Outcome {
    Keep,
    /// Drop the connection; the reason was already counted.
    Drop,
}

struct Worker {
    poll: Poll,
    shared: Arc<Shared>,
    target: Arc<Target>,
    indices: Vec<usize>,
    source_ips: u8,
    slow: usize,
    slow_ping: u32,
    max_in_flight: usize,
    connect_deadline: Instant,
    deflate: bool,
    sse: bool,
}

/// The event loop's mutable state besides the connections.
struct Loop {
    stats: Report,
    measuring: bool,
    /// The run has not reached the window's end yet.
    before_window_end: bool,
    rng: u64,
    scratch: Vec<u8>,
    /// Inflates the start of compressed messages (with `deflate`): the
    /// bare decompressor, whose reset is a few fields (flate2's zeroes 43 KB,
    /// which at 200 000 messages a second made the clients the bottleneck).
    inflater: Box<DecompressorOxide>,
}

impl Worker {
    fn run(mut self) -> Report {
        let mut lp = Loop {
            stats: Report::empty(0, Duration::ZERO),
            measuring: false,
            before_window_end: true,
            rng: seed(),
            scratch: vec![0u8; SCRATCH],
            inflater: Box::default(),
        };
        let mut conns: Vec<Option<Conn>> = Vec::new();
        let mut free: Vec<usize> = Vec::new();
        let mut live = 0usize;
        let mut in_flight = 0usize;
        let mut next = 0usize;
        let mut connecting_done = false;
        let mut close_deadline: Option<Instant> = None;
        let ping_every = (self.slow_ping > 0).then(|| Duration::from_secs(1) / self.slow_ping);
        let mut next_ping = Instant::now();
        let mut again: Vec<usize> = Vec::new();
        let mut todo: Vec<usize> = Vec::new();
        let mut events = Events::with_capacity(1024);

        loop {
            let phase = self.shared.phase.load(Ordering::Acquire);
            lp.measuring = phase == PHASE_MEASURE;
            lp.before_window_end = phase < PHASE_AFTER;
            let now = Instant::now();

            if !connecting_done && phase < PHASE_CLOSE {
                while in_flight < self.max_in_flight
                    && next < self.indices.len()
                    && now < self.connect_deadline
                {
                    let index = self.indices[next];
                    next += 1;
                    let slot = free.pop().unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    match self.connect(index, slot) {
                        Ok(conn) => {
                            conns[slot] = Some(conn);
                            in_flight += 1;
                            live += 1;
                        }
                        Err(e) => {
                            free.push(slot);
                            self.connect_failed(&mut lp, format!("connect: {e}"));
                        }
                    }
                }
                if now >= self.connect_deadline {
                    // Give up on whatever is still being set up or not started.
                    for (slot, c) in conns.iter_mut().enumerate() {
                        if c.as_ref().is_some_and(|c| {
                            matches!(c.state, State::Connecting(_) | State::Upgrading(_))
                        }) {
                            *c = None;
                            free.push(slot);
                            live -= 1;
                            in_flight -= 1;
                            self.connect_failed(&mut lp, "connect timeout".to_string());
                        }
                    }
                    while next < self.indices.len() {
                        next += 1;
                        self.connect_failed(&mut lp, "connect timeout".to_string());
                    }
                }
                if next == self.indices.len() && in_flight == 0 {
                    connecting_done = true;
                    self.shared.threads_done.fetch_add(1, Ordering::AcqRel);
                }
            }

            if phase == PHASE_CLOSE && close_deadline.is_none() {
                close_deadline = Some(now + CLOSE_GRACE);
                for (slot, c) in conns.iter_mut().enumerate() {
                    let Some(conn) = c else { continue };
                    let keep = match conn.state {
                        // An event stream has no closing handshake: hang up.
                        State::Open if self.sse => {
                            lp.stats.clean_closes += 1;
                            false
                        }
                        State::Open if !conn.slow => {
                            conn.state = State::Closing;
                            let frame = SmallFrame::close(1000, Some(lp.mask()));
                            send(conn, frame.as_bytes()).is_ok()
                        }
                        State::Open => {
                            // Slow clients never read: say goodbye and go.
                            let frame = SmallFrame::close(1000, Some(lp.mask()));
                            let _ = send(conn, frame.as_bytes());
                            false
                        }
                        State::Connecting(_) | State::Upgrading(_) => {
                            in_flight -= 1;
                            self.connect_failed(&mut lp, "aborted at close".to_string());
                            false
                        }
                        State::Closing => true,
                    };
                    if !keep {
                        *c = None;
                        free.push(slot);
                        live -= 1;
                    }
                }
                if !connecting_done {
                    while next < self.indices.len() {
                        next += 1;
                        self.connect_failed(&mut lp, "aborted at close".to_string());
                    }
                    connecting_done = true;
                    self.shared.threads_done.fetch_add(1, Ordering::AcqRel);
                }
            }
            if let Some(d) = close_deadline {
                if live == 0 || now >= d {
                    break;
                }
            }

            if let Some(every) = ping_every.filter(|_| now >= next_ping) {
                next_ping += every;
                let ping = SmallFrame::new(OP_PING, &[b'p'; 125], Some(lp.mask()));
                for conn in conns.iter_mut().flatten() {
                    if conn.slow && !self.sse && matches!(conn.state, State::Open) {
                        // A full socket only delays this ping; the count is what matters.
                        let _ = send(conn, ping.as_bytes());
                    }
                }
            }
            let timeout = if !again.is_empty() {
                Duration::ZERO
            } else if ping_every.is_some() {
                next_ping
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50))
            } else {
                Duration::from_millis(50)
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // A broken poll cannot be recovered; end this thread's run.
                lp.error(format!("poll: {e}"));
                break;
            }

            todo.clear();
            todo.append(&mut again);
            for ev in events.iter() {
                if ev.token() != WAKE {
                    todo.push(ev.token().0);
                }
            }
            // Deduplicate so a slot is serviced once per turn.
            todo.sort_unstable();
            todo.dedup();
            for &slot in &todo {
                let Some(Some(conn)) = conns.get_mut(slot) else {
                    continue;
                };
                let was_setup = matches!(conn.state, State::Connecting(_) | State::Upgrading(_));
                let (outcome, more) = self.service(conn, &mut lp);
                let now_open = matches!(conn.state, State::Open);
                if was_setup && now_open {
                    in_flight -= 1;
                    lp.stats.connected += 1;
                    if conn.slow {
                        lp.stats.slow_connected += 1;
                    }
                    self.shared.connected.fetch_add(1, Ordering::AcqRel);
                }
                if let Outcome::Drop = outcome {
                    if was_setup && !now_open {
                        in_flight -= 1;
                    }
                    conns[slot] = None;
                    free.push(slot);
                    live -= 1;
                } else if more {
                    again.push(slot);
                }
            }
        }
        // Dropping `conns` closes every remaining socket.
        drop(conns);
        if !connecting_done {
            self.shared.threads_done.fetch_add(1, Ordering::AcqRel);
        }
        lp.stats
    }

    fn connect_failed(&self, lp: &mut Loop, why: String) {
        lp.stats.connect_failed += 1;
        if lp.stats.first_connect_error.is_none() {
            lp.stats.first_connect_error = Some(why);
        }
        self.shared.failed.fetch_add(1, Ordering::AcqRel);
    }

    /// Starts a non-blocking connect for global client `index` in `slot`.
    fn connect(&self, index: usize, slot: usize) -> io::Result<Conn> {
        let addr = self.target.addr;
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket.set_tcp_nodelay(true)?;
        let slow = index < self.slow;
        if slow {
            // Without reads the kernel never grows the receive buffer from
            // its default, which still absorbs minutes of a small feed: the
            // relay's own queue would never be reached within a run.
            socket.set_recv_buffer_size(SLOW_RCVBUF)?;
        }
        if let IpAddr::V4(v4) = addr.ip() {
            if v4.is_loopback() {
                let x = 1 + (index % usize::from(self.source_ips)) as u8;
                let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, x)), 0);
                socket.bind(&SockAddr::from(src))?;
            }
        }
        match socket.connect(&SockAddr::from(addr)) {
            Ok(()) => {}
            Err(e)
                if e.raw_os_error() == Some(EINPROGRESS)
                    || e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(std::net::TcpStream::from(socket));
        self.poll.registry().register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let (request, accept) = if self.sse {
            let request = self.target.event_stream_request.as_bytes().to_vec();
            (request, String::new())
        } else {
            let key = tungstenite::handshake::client::generate_key();
            let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
            let mut request = Vec::with_capacity(self.target.request_head.len() + key.len() + 4);
            request.extend_from_slice(self.target.request_head.as_bytes());
            request.extend_from_slice(key.as_bytes());
            if self.deflate {
                request.extend_from_slice(b"\r\nSec-WebSocket-Extensions: permessage-deflate");
            }
            request.extend_from_slice(b"\r\n\r\n");
            (request, accept)
        };
        let tls = match &self.target.tls {
            Some((config, name)) => Some(Box::new(
                ClientConnection::new(config.clone(), name.clone()).map_err(io::Error::other)?,
            )),
            None => None,
        };
        Ok(Conn {
            io: Transport { stream, tls },
            state: State::Connecting(Box::new(Handshake {
                request,
                written: 0,
                response: Vec::new(),
                accept,
            })),
            slow,
            last_seq: 0,
            pending: Vec::new(),
            parser: Parser::new(false).with_deflate(self.deflate),
            events: self.sse.then(Box::default),
        })
    }

    /// Handles readiness for one connection. Returns whether to keep it and
    /// whether it has more to read (serviced again next turn).
    fn service(&self, conn: &mut Conn, lp: &mut Loop) -> (Outcome, bool) {
        if let State::Connecting(_) = conn.state {
            match conn.io.stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    self.connect_failed(lp, format!("connect: {e}"));
                    return (Outcome::Drop, false);
                }
            }
            match conn.io.stream.peer_addr() {
                Ok(_) => {
                    let State::Connecting(hs) = std::mem::replace(&mut conn.state, State::Closing)
                    else {
                        return (Outcome::Drop, false);
                    };
                    conn.state = State::Upgrading(hs);
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return (Outcome::Keep, false),
                Err(e) => {
                    self.connect_failed(lp, format!("connect: {e}"));
                    return (Outcome::Drop, false);
                }
            }
        }
        if let State::Upgrading(_) = conn.state {
            return self.upgrade(conn, lp);
        }
        // Open or Closing: flush the session and pending control frames,
        // then read.
        if let Err(e) = conn.io.flush_tls() {
            return (self.io_error(conn, lp, &e), false);
        }
        if !conn.pending.is_empty() {
            if let Err(e) = flush_pending(conn) {
                return (self.io_error(conn, lp, &e), false);
            }
        }
        if conn.slow && matches!(conn.state, State::Open) {
            return (Outcome::Keep, false);
        }
        self.read_frames(conn, lp)
    }

    /// Writes the upgrade request and reads the `101` response (or the
    /// event-stream request and its `200`).
    fn upgrade(&self, conn: &mut Conn, lp: &mut Loop) -> (Outcome, bool) {
        // What a full socket left in the TLS session (handshake records, the
        // request) goes first: this may be the writable event it waited for.
        if let Err(e) = conn.io.flush_tls() {
            self.connect_failed(lp, format!("send TLS handshake: {e}"));
            return (Outcome::Drop, false);
        }
        let State::Upgrading(hs) = &mut conn.state else {
            return (Outcome::Keep, false);
        };
        while hs.written < hs.request.len() {
            match conn.io.write(&hs.request[hs.written..]) {
                Ok(n) => hs.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (Outcome::Keep, false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.connect_failed(lp, format!("send upgrade: {e}"));
                    return (Outcome::Drop, false);
                }
            }
        }
        loop {
            let n = match conn.io.read(&mut lp.scratch) {
                Ok(0) => {
                    self.connect_failed(lp, "connection closed during handshake".to_string());
                    return (Outcome::Drop, false);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (Outcome::Keep, false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.connect_failed(lp, format!("read upgrade response: {e}"));
                    return (Outcome::Drop, false);
                }
            };
            let before = hs.response.len();
            hs.response
                .extend_from_slice(&lp.scratch[..n.min(MAX_RESPONSE)]);
            let Some(end) = find_header_end(&hs.response, before.saturating_sub(3)) else {
                if hs.response.len() >= MAX_RESPONSE {
                    self.connect_failed(lp, "upgrade response too long".to_string());
                    return (Outcome::Drop, false);
                }
                continue;
            };
            let checked = if self.sse {
                check_event_stream_response(&hs.response[..end])
            } else {
                check_response(&hs.response[..end], &hs.accept)
            };
            if let Err(why) = checked {
                self.connect_failed(lp, why);
                return (Outcome::Drop, false);
            }
            // Bytes after the response head are already frames (or events).
            let leftover_start = end - before;
            let leftover = n - leftover_start.min(n);
            conn.state = State::Open;
            if leftover > 0 && !conn.slow {
                lp.scratch.copy_within(leftover_start..n, 0);
                let outcome = self.on_bytes(conn, lp, leftover);
                if let Outcome::Drop = outcome {
                    return (outcome, false);
                }
            }
            if conn.slow {
                return (Outcome::Keep, false);
            }
            // Drain whatever else is there (edge-triggered readiness).
            return self.read_frames(conn, lp);
        }
    }

    /// Reads and parses frames until the socket would block (or the turn's
    /// read budget is used up, then `more` is true).
    fn read_frames(&self, conn: &mut Conn, lp: &mut Loop) -> (Outcome, bool) {
        for _ in 0..READS_PER_TURN {
            match conn.io.read(&mut lp.scratch) {
                Ok(0) => {
                    if matches!(conn.state, State::Closing) {
                        lp.stats.clean_closes += 1;
                    } else if self.sse {
                        // An event stream ends when its connection does.
                        lp.stats.server_closes += 1;
                        if lp.before_window_end {
                            lp.stats.streams_ended_early += 1;
                        }
                    } else {
                        lp.error("connection closed by server without Close".to_string());
                    }
                    return (Outcome::Drop, false);
                }
                Ok(n) => {
                    if let Outcome::Drop = self.on_bytes(conn, lp, n) {
                        return (Outcome::Drop, false);
                    }
                    if n < lp.scratch.len() && !conn.io.is_tls() {
                        // A short read drained the socket; with edge-triggered
                        // readiness new data raises a new event, so skip the
                        // read that would only return WouldBlock. (A TLS
                        // session's short read says only that its records
                        // ran out, not the socket.)
                        return (Outcome::Keep, false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (Outcome::Keep, false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (self.io_error(conn, lp, &e), false),
            }
        }
        (Outcome::Keep, true)
    }

    fn io_error(&self, conn: &Conn, lp: &mut Loop, e: &io::Error) -> Outcome {
        // Errors while closing (e.g. a reset after the server's Close) are expected.
        if !matches!(conn.state, State::Closing) {
            lp.error(format!("read/write: {e}"));
        }
        Outcome::Drop
    }

    /// Parses `lp.scratch[..n]` and acts on the frames.
    fn on_bytes(&self, conn: &mut Conn, lp: &mut Loop, n: usize) -> Outcome {
        if self.sse {
            self.on_events(conn, lp, n);
            return Outcome::Keep;
        }
        let now_ns = unix_ns();
        let measuring = lp.measuring;
        let closing = matches!(conn.state, State::Closing);
        let mut actions = Actions::default();
        let Loop {
            stats,
            scratch,
            rng,
            inflater,
            ..
        } = lp;
        if measuring {
            stats.wire_bytes += n as u64;
        }
        let last_seq = &mut conn.last_seq;
        let result = conn.parser.feed(&scratch[..n], |frame| match frame {
            Frame::Message {
                binary,
                len,
                prefix,
                deflated,
            } => {
                if closing {
                    return;
                }
                let mut inflated = [0u8; wire::PREFIX_LEN];
                let prefix = if deflated.is_empty() {
                    prefix
                } else {
                    // Only as far as seq and timestamp: the output buffer
                    // is the 16 bytes wanted, and inflating stops there.
                    inflater.init();
                    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
                        | inflate_flags::TINFL_FLAG_HAS_MORE_INPUT;
                    let (_, _, out) = decompress(inflater, deflated, &mut inflated, 0, flags);
                    &inflated[..out]
                };
                let sequenced = binary && len >= wire::PREFIX_LEN as u64;
                count_message(
                    stats,
                    last_seq,
                    measuring,
                    now_ns,
                    sequenced.then_some(prefix),
                );
            }
            Frame::Ping(payload) => {
                if !closing {
                    actions.pong = Some(SmallFrame::new(
                        wire::OP_PONG,
                        payload,
                        Some(next_mask(rng)),
                    ));
                }
            }
            Frame::Pong(_) => {}
            Frame::Close(payload) => {
                actions.got_close = true;
                if !closing && actions.close_reply.is_none() {
                    let code = if payload.len() >= 2 {
                        &payload[..2]
                    } else {
                        &[][..]
                    };
                    actions.close_reply =
                        Some(SmallFrame::new(wire::OP_CLOSE, code, Some(next_mask(rng))));
                }
            }
        });
        if let Err(e) = result {
            lp.stats.protocol_errors += 1;
            if lp.stats.first_error.is_none() {
                lp.stats.first_error = Some(format!("protocol: {e}"));
            }
            let frame = SmallFrame::close(1002, Some(lp.mask()));
            let _ = send(conn, frame.as_bytes());
            return Outcome::Drop;
        }
        if let Some(pong) = actions.pong.filter(|_| !actions.got_close) {
            if let Err(e) = send(conn, pong.as_bytes()) {
                return self.io_error(conn, lp, &e);
            }
        }
        if actions.got_close {
            if closing {
                lp.stats.clean_closes += 1;
            } else {
                lp.stats.server_closes += 1;
                if let Some(reply) = actions.close_reply {
                    let _ = send(conn, reply.as_bytes());
                }
            }
            return Outcome::Drop;
        }
        Outcome::Keep
    }
}

impl Worker {
    /// Parses `lp.scratch[..n]` as the event stream and counts its events.
    /// Data lines are not checked against the frame they came from: a
    /// malformed stream shows as gaps or as events without a seq.
    fn on_events(&self, conn: &mut Conn, lp: &mut Loop, n: usize) {
        let now_ns = unix_ns();
        let measuring = lp.measuring;
        let stats = &mut lp.stats;
        if measuring {
            stats.wire_bytes += n as u64;
        }
        let last_seq = &mut conn.last_seq;
        let Some(events) = conn.events.as_deref_mut() else {
            return;
        };
        events.feed(&lp.scratch[..n], |event| {
            let mut decoded = [0u8; events::DATA_PREFIX / 4 * 3];
            let prefix = event
                .binary
                .then(|| events::binary_prefix(event.data, &mut decoded))
                .flatten()
                .map(|len| &decoded[..len]);
            count_message(stats, last_seq, measuring, now_ns, prefix);
        });
    }
}

/// Counts one message received at `now_ns`; `prefix` is the start of its
/// payload when it is binary and long enough to carry `seq` and
/// `sent_unix_ns`: then gaps, duplicates and latency are checked too.
fn count_message(
    stats: &mut Report,
    last_seq: &mut u64,
    measuring: bool,
    now_ns: u64,
    prefix: Option<&[u8]>,
) {
    stats.total_messages += 1;
    if measuring {
        stats.delivered += 1;
    }
    let Some(prefix) = prefix.filter(|p| p.len() >= wire::PREFIX_LEN) else {
        return;
    };
    let seq = u64::from_le_bytes(prefix[0..8].try_into().unwrap_or([0; 8]));
    let sent = u64::from_le_bytes(prefix[8..16].try_into().unwrap_or([0; 8]));
    if *last_seq != 0 {
        let gap = seq.saturating_sub(*last_seq + 1);
        stats.missed += gap;
        if measuring {
            stats.gaps += gap;
            if seq <= *last_seq {
                stats.dups += 1;
            }
        }
    }
    *last_seq = (*last_seq).max(seq);
    if measuring {
        let us = now_ns.saturating_sub(sent) / 1_000;
        stats.latency.saturating_record(us.max(1));
    }
}

impl Loop {
    fn mask(&mut self) -> [u8; 4] {
        next_mask(&mut self.rng)
    }

    /// Counts an I/O error on a connected client.
    fn error(&mut self, why: String) {
        self.stats.io_errors += 1;
        if self.stats.first_error.is_none() {
            self.stats.first_error = Some(why);
        }
    }
}

/// xorshift64*: masking keys only need to vary, not be secret, for load tests.
fn next_mask(state: &mut u64) -> [u8; 4] {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
    ((v >> 32) as u32).to_ne_bytes()
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(unix_ns());
    h.finish() | 1
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Sends a small frame, keeping what does not fit into `pending`.
fn send(conn: &mut Conn, bytes: &[u8]) -> io::Result<()> {
    if !conn.pending.is_empty() {
        if conn.pending.len() + bytes.len() > MAX_PENDING {
            return Err(io::Error::other("control frame backlog too large"));
        }
        conn.pending.extend_from_slice(bytes);
        return flush_pending(conn);
    }
    let mut off = 0;
    while off < bytes.len() {
        match conn.io.write(&bytes[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    conn.pending.extend_from_slice(&bytes[off..]);
    Ok(())
}

fn flush_pending(conn: &mut Conn) -> io::Result<()> {
    let mut off = 0;
    while off < conn.pending.len() {
        match conn.io.write(&conn.pending[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    conn.pending.drain(..off);
    if conn.pending.is_empty() {
        conn.pending = Vec::new();
    }
    Ok(())
}

/// Index just past `\r\n\r\n` in `buf`, searching from `from`.
fn find_header_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| from + p + 4)
}

/// Checks a complete upgrade response head.
fn check_response(head: &[u8], accept: &str) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete upgrade response".to_string()),
        Err(e) => return Err(format!("bad upgrade response: {e}")),
    }
    if resp.code != Some(101) {
        return Err(format!("upgrade refused: HTTP {}", resp.code.unwrap_or(0)));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err("upgrade response without Upgrade: websocket".to_string());
    }
    if header("sec-websocket-accept").as_deref() != Some(accept) {
        return Err("wrong Sec-WebSocket-Accept".to_string());
    }
    Ok(())
}

/// Checks a complete event-stream response head: `200`, `text/event-stream`.
fn check_event_stream_response(head: &[u8]) -> Result<(), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete event-stream response".to_string()),
        Err(e) => return Err(format!("bad event-stream response: {e}")),
    }
    if resp.code != Some(200) {
        return Err(format!(
            "event stream refused: HTTP {}",
            resp.code.unwrap_or(0)
        ));
    }
    let is_event_stream = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("content-type")
            && String::from_utf8_lossy(h.value)
                .trim()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
    });
    if !is_event_stream {
        return Err("event-stream response without Content-Type: text/event-stream".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_client_state_is_small() {
        let size = std::mem::size_of::<Option<Conn>>();
        assert!(size <= 320, "Conn is {size} bytes");
    }

    #[test]
    fn parses_urls() {
        let t = Target::parse("ws://127.0.0.1:9001/lobby/a", &[], None).unwrap();
        assert_eq!(t.addr, "127.0.0.1:9001".parse().unwrap());
        assert!(
            t.request_head
                .starts_with("GET /lobby/a HTTP/1.1\r\nHost: 127.0.0.1:9001\r\n")
        );
        let t = Target::parse("ws://127.0.0.1:9001", &[], None).unwrap();
        assert!(t.request_head.starts_with("GET / HTTP/1.1\r\n"));
        assert_eq!(
            Target::parse("ws://[::1]:80/", &[], None)
                .unwrap()
                .addr
                .port(),
            80
        );
        assert!(Target::parse("http://127.0.0.1/", &[], None).is_err());
        assert!(Target::parse("ws://192.0.2.1:80/", &[], None).is_err());
        // wss:// needs a CA to trust, and a CA needs wss://.
        assert!(Target::parse("wss://127.0.0.1:9001/", &[], None).is_err());
        let ca = Path::new("ca.pem");
        assert!(Target::parse("ws://127.0.0.1:9001/", &[], Some(ca)).is_err());
    }

    #[test]
    fn parses_wss_urls() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let path = std::env::temp_dir().join(format!("wsgate-load-ca-{}.pem", std::process::id()));
        std::fs::write(&path, ca.pem()).unwrap();
        let by_name = Target::parse("wss://localhost/a", &[], Some(&path));
        let by_ip = Target::parse("wss://127.0.0.1:9443/", &[], Some(&path));
        std::fs::remove_file(&path).unwrap();
        let t = by_name.unwrap();
        // The default port is 443, the name checked the URL's host.
        assert_eq!(t.addr.port(), 443);
        assert_eq!(t.tls.unwrap().1, ServerName::try_from("localhost").unwrap());
        assert!(t.request_head.contains("\r\nHost: localhost\r\n"));
        let t = by_ip.unwrap();
        assert_eq!(t.addr, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(t.tls.unwrap().1, ServerName::try_from("127.0.0.1").unwrap());
        let missing = Path::new("/nonexistent/ca.pem");
        assert!(Target::parse("wss://localhost/", &[], Some(missing)).is_err());
    }

    #[test]
    fn checks_upgrade_response() {
        let accept = tungstenite::handshake::derive_accept_key(b"dGhlIHNhbXBsZSBub25jZQ==");
        let ok = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        assert!(check_response(ok.as_bytes(), &accept).is_ok());
        assert!(check_response(ok.as_bytes(), "nope").is_err());
        assert!(check_response(b"HTTP/1.1 404 Not Found\r\n\r\n", &accept).is_err());
    }

    #[test]
    fn checks_event_stream_response() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\r\n";
        assert!(check_event_stream_response(ok).is_ok());
        let html = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n";
        assert!(check_event_stream_response(html).is_err());
        let refused = b"HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/event-stream\r\n\r\n";
        assert!(check_event_stream_response(refused).is_err());
        let t = Target::parse("ws://127.0.0.1:9001/a", &[], None).unwrap();
        assert_eq!(
            t.event_stream_request,
            "GET /a HTTP/1.1\r\nHost: 127.0.0.1:9001\r\nAccept: text/event-stream\r\n\r\n"
        );
    }
}
