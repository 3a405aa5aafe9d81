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
//! as seq and timestamp; a text message's data is the text itself, whose
//! start, in the origin's text mode, is the same base64). Such a client
//! writes nothing after its request and ends by closing its socket; the
//! server ending the stream is its normal end, counted like a server Close.
//!
//! With [`Config::reconnect`] as well, a stream the server ends (or that
//! fails) is not the client's end: after the delay the client connects
//! again from the same source address, with `Last-Event-ID` set to the last
//! event ID its stream gave (`events.rs`), and goes on checking seqs across
//! the reconnect: a resumed stream must go on with no gap and no duplicate.
//! An `event: reset` (an ID the server cannot serve) makes the next gap the
//! reset's own (`reset_gaps`), not a loss. A reconnect that fails is tried
//! again after the delay; reconnects go through the same bound on
//! connections in flight as the first connects. A stream that is down
//! at the window's end for longer than the delay + 2 s counts as
//! `unresumed`.
//!
//! The resume storm ([`Config::storm`], driven by [`Clients::storm_leave`],
//! [`Clients::storm_back`] and [`Clients::storm_over`], or by [`run`]): the
//! last `storm` clients all close their streams at once and keep their
//! resume state; called back, they all reconnect with their
//! `Last-Event-ID` (as fast as the in-flight bound lets them). A storm
//! client is *live* again when it receives a message with a seq above the
//! highest any client had received when the call back came (so published
//! after it); the time from the call back to that message is its time to
//! live. Storm clients' gaps, duplicates and resets are counted apart too,
//! and while the storm lasts (from the call back until
//! [`Clients::storm_over`]) the other clients' latency goes to a histogram
//! of its own, beside theirs over the whole window.
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
//! (text messages: those 16 bytes in padded base64, the origin's text mode)
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
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
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

const STORM_NONE: u8 = 0;
const STORM_AWAY: u8 = 1;
const STORM_BACK: u8 = 2;
const STORM_OVER: u8 = 3;
/// How long the storm lasts after its last client is live.
const STORM_TAIL: Duration = Duration::from_secs(1);
/// How long a stream may be down at the window's end, beyond the
/// reconnect delay, before it counts as unresumed.
const RESUME_GRACE: Duration = Duration::from_secs(2);
/// How often reconnects in flight are checked against the connect timeout.
const RESUME_CHECK: Duration = Duration::from_secs(1);

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
    /// With `sse`: reconnect a stream the server ended (or that failed)
    /// after this delay, with `Last-Event-ID` (see the module docs).
    /// Defaults to `None`: the server ending a stream is its end.
    pub reconnect: Option<Duration>,
    /// With `reconnect`: the last `storm` clients make the resume storm
    /// (see the module docs); fewer than `clients`. Defaults to 0.
    pub storm: usize,
    /// How long [`run`] keeps the storm clients away. Defaults to 2 s.
    pub storm_away: Duration,
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
            reconnect: None,
            storm: 0,
            storm_away: Duration::from_secs(2),
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
    /// resume; these clients do not reconnect: without
    /// [`Config::reconnect`]).
    pub streams_ended_early: u64,
    /// Clients that completed the closing handshake at the end.
    pub clean_closes: u64,
    /// With [`Config::reconnect`], over the whole run: event streams the
    /// server ended (not counted in `server_closes`: they reconnect).
    pub stream_ends: u64,
    /// Streams reconnected (answered `200 text/event-stream`), whole run.
    pub reconnects: u64,
    /// Reconnect attempts that failed (tried again after the delay).
    pub reconnect_failed: u64,
    /// `event: reset` received (whole run).
    pub resets: u64,
    /// Seqs missing before the first message after a reset, in the window
    /// (expected: not in `gaps` nor `missed`).
    pub reset_gaps: u64,
    /// Clients whose stream was down at the window's end for longer than
    /// the reconnect delay + 2 s (could not reconnect).
    pub unresumed: u64,
    /// The resume storm's figures (zero without one).
    pub storm: StormReport,
    /// With a storm: the other clients' latency over the window, µs.
    pub others_latency: Histogram<u64>,
}

/// What the resume storm measured, merged over all threads.
pub struct StormReport {
    /// Storm clients that left (closed their streams).
    pub left: u64,
    /// Storm clients live again (see the module docs).
    pub live: u64,
    /// Each live storm client's time from the call back to live, µs.
    pub time_to_live: Histogram<u64>,
    /// Messages storm clients received from their reconnect until live
    /// (what they resumed, then live ones up to the first new one).
    pub resumed: u64,
    /// Storm clients' gaps (in the window).
    pub gaps: u64,
    /// Storm clients' duplicates (in the window).
    pub dups: u64,
    /// Storm clients' resets (whole run).
    pub resets: u64,
    /// Storm clients' reset gaps (in the window).
    pub reset_gaps: u64,
    /// The other clients' latency while the storm lasted, µs.
    pub others_latency: Histogram<u64>,
}

impl StormReport {
    fn empty() -> StormReport {
        StormReport {
            left: 0,
            live: 0,
            time_to_live: new_histogram(),
            resumed: 0,
            gaps: 0,
            dups: 0,
            resets: 0,
            reset_gaps: 0,
            others_latency: new_histogram(),
        }
    }

    fn absorb(&mut self, t: StormReport) {
        self.left += t.left;
        self.live += t.live;
        // Same bounds: adding cannot fail.
        let _ = self.time_to_live.add(&t.time_to_live);
        self.resumed += t.resumed;
        self.gaps += t.gaps;
        self.dups += t.dups;
        self.resets += t.resets;
        self.reset_gaps += t.reset_gaps;
        let _ = self.others_latency.add(&t.others_latency);
    }
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
            stream_ends: 0,
            reconnects: 0,
            reconnect_failed: 0,
            resets: 0,
            reset_gaps: 0,
            unresumed: 0,
            storm: StormReport::empty(),
            others_latency: new_histogram(),
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
        self.stream_ends += t.stream_ends;
        self.reconnects += t.reconnects;
        self.reconnect_failed += t.reconnect_failed;
        self.resets += t.resets;
        self.reset_gaps += t.reset_gaps;
        self.unresumed += t.unresumed;
        self.storm.absorb(t.storm);
        let _ = self.others_latency.add(&t.others_latency);
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
    /// The storm clients were just called back (they reconnect now).
    StormBack,
    /// The storm just ended: every storm client live (or the window's end
    /// near), and 1 s more.
    StormOver,
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
    let storm_away = config.storm_away;
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
    let window_end = Instant::now() + measure;
    if clients.storm > 0 {
        // The storm, inside the window: leave at its start, come back after
        // `storm_away`, over once every storm client is live (or 1 s before
        // the window's end) and 1 s more.
        clients.storm_leave();
        std::thread::sleep(storm_away.min(measure));
        clients.storm_back();
        hook(Phase::StormBack);
        let last = window_end.checked_sub(STORM_TAIL).unwrap_or(window_end);
        while Instant::now() < last && !clients.storm_all_live() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let rest = window_end.saturating_duration_since(Instant::now());
        std::thread::sleep(STORM_TAIL.min(rest));
        clients.storm_over();
        hook(Phase::StormOver);
    }
    std::thread::sleep(window_end.saturating_duration_since(Instant::now()));
    clients.end_window();
    hook(Phase::WindowEnd);
    Ok(clients.finish())
}

struct Shared {
    phase: AtomicU8,
    connected: AtomicUsize,
    failed: AtomicUsize,
    threads_done: AtomicUsize,
    /// `STORM_*`: where the resume storm is.
    storm: AtomicU8,
    /// When the storm clients were called back.
    storm_back_at: OnceLock<Instant>,
    /// The seq a storm client must pass to be live (set before `STORM_BACK`).
    storm_target: AtomicU64,
    /// Storm clients that left, and that are live again.
    storm_left: AtomicUsize,
    storm_live: AtomicUsize,
    /// The highest seq any event-stream client has received (each thread
    /// raises it once per turn).
    newest_seq: AtomicU64,
}

/// A running set of clients; see the module docs.
pub struct Clients {
    shared: Arc<Shared>,
    wakers: Vec<Arc<Waker>>,
    threads: Vec<JoinHandle<Report>>,
    clients: usize,
    window_start: Option<Instant>,
    window_end: Option<Instant>,
    /// Storm clients configured (0: no storm).
    storm: usize,
}

impl Clients {
    /// Validates the configuration, resolves the URL and spawns the client
    /// threads, which start connecting at once.
    pub fn start(config: Config) -> Result<Clients, String> {
        if config.clients == 0 {
            return Err("need at least one client".to_string());
        }
        if config.reconnect.is_some() && !config.sse {
            return Err("reconnecting needs event-stream clients (sse)".to_string());
        }
        if config.storm > 0 && config.reconnect.is_none() {
            return Err("a resume storm needs reconnecting clients".to_string());
        }
        if config.storm >= config.clients {
            return Err(format!(
                "the storm needs clients that stay: {} storm clients of {}",
                config.storm, config.clients
            ));
        }
        let target = Target::parse(&config.url, &config.headers, config.tls_ca.as_deref())?;
        let threads = config.threads.clamp(1, config.clients);
        let shared = Arc::new(Shared {
            phase: AtomicU8::new(PHASE_WARMUP),
            connected: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            threads_done: AtomicUsize::new(0),
            storm: AtomicU8::new(STORM_NONE),
            storm_back_at: OnceLock::new(),
            storm_target: AtomicU64::new(0),
            storm_left: AtomicUsize::new(0),
            storm_live: AtomicUsize::new(0),
            newest_seq: AtomicU64::new(0),
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
            storm: config.storm,
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
                reconnect: config.reconnect.filter(|_| config.sse),
                storm_from: config.clients - config.storm,
                has_storm: config.storm > 0,
                connect_timeout: config.connect_timeout,
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

    /// The storm clients close their streams, keeping what they need to
    /// resume.
    pub fn storm_leave(&mut self) {
        self.set_storm(STORM_AWAY);
    }

    /// The storm clients reconnect, all at once, with their
    /// `Last-Event-ID`; the time to live counts from now.
    pub fn storm_back(&mut self) {
        let target = self.shared.newest_seq.load(Ordering::Acquire);
        self.shared.storm_target.store(target, Ordering::Release);
        let _ = self.shared.storm_back_at.set(Instant::now());
        self.set_storm(STORM_BACK);
    }

    /// Whether every storm client that left is live again.
    pub fn storm_all_live(&self) -> bool {
        let left = self.shared.storm_left.load(Ordering::Acquire);
        self.shared.storm_live.load(Ordering::Acquire) >= left
    }

    /// Ends the storm's measurement of the other clients' latency.
    pub fn storm_over(&mut self) {
        self.set_storm(STORM_OVER);
    }

    fn set_storm(&self, storm: u8) {
        self.shared.storm.store(storm, Ordering::Release);
        self.wake_all();
    }

    fn set_phase(&self, phase: u8) {
        self.shared.phase.store(phase, Ordering::Release);
        self.wake_all();
    }

    fn wake_all(&self) {
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
    /// The whole event-stream request, without `Last-Event-ID`.
    event_stream_request: String,
}

impl Target {
    /// The event-stream request, resuming after `last_id` if any.
    fn event_stream_request(&self, last_id: Option<u64>) -> String {
        let mut request = self.event_stream_request.clone();
        if let Some(id) = last_id {
            // Before the blank line that ends the head.
            request.truncate(request.len() - 2);
            request.push_str(&format!("Last-Event-ID: {id:016x}\r\n\r\n"));
        }
        request
    }

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
    /// A reconnect: when its stream went down (for `unresumed`).
    down_since: Option<Instant>,
    /// When this attempt started (a reconnect's own connect timeout).
    started: Instant,
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
    /// The event stream's parser and resume state (with `sse`; `parser` is
    /// then unused), boxed to keep a WebSocket client small.
    stream: Option<Box<Stream>>,
}

impl Conn {
    /// Whether this is a reconnect still being set up.
    fn is_resuming(&self) -> bool {
        matches!(&self.state, State::Connecting(hs) | State::Upgrading(hs) if hs.down_since.is_some())
    }
}

/// An event-stream client's parser and what it keeps across reconnects.
#[derive(Debug, Clone)]
struct Stream {
    reader: EventReader,
    /// The global client index: its source address, its storm membership.
    index: usize,
    /// A reset came and no sequenced message since: the next one's gap is
    /// the reset's.
    after_reset: bool,
    /// One of the resume storm's clients.
    storm: bool,
    /// A storm client called back that is not live yet.
    awaiting_live: bool,
}

/// An event-stream client between two streams: what it resumes with.
struct Resume {
    stream: Box<Stream>,
    last_seq: u64,
    /// When its stream went down (or the storm called it back).
    down_since: Instant,
    /// When to connect again.
    due: Instant,
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
    /// Reconnect delay of event streams (`None`: no reconnects).
    reconnect: Option<Duration>,
    /// Clients from this index on are the storm's.
    storm_from: usize,
    /// There is a storm (`storm_from` is below the client count).
    has_storm: bool,
    /// Per reconnect attempt: its deadline to be set up.
    connect_timeout: Duration,
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
    /// The storm's state as this thread last saw it (`STORM_*`), the seq a
    /// storm client must pass to be live, when they were called back.
    storm: u8,
    storm_target: u64,
    storm_back_at: Option<Instant>,
    /// The highest seq this thread's event streams have received.
    newest_seq: u64,
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
            storm: STORM_NONE,
            storm_target: 0,
            storm_back_at: None,
            newest_seq: 0,
        };
        // Event streams waiting to reconnect (due in order: the delay is
        // the same for all), storm clients away, and storm clients called
        // back (due at once).
        let mut waiting: VecDeque<Resume> = VecDeque::new();
        let mut away: Vec<Resume> = Vec::new();
        let mut returning: Vec<Resume> = Vec::new();
        let mut window_ended = false;
        let mut next_resume_check = Instant::now() + RESUME_CHECK;
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
                    match self.connect(index, slot, None) {
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
                                && !c.is_resuming()
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

            if self.reconnect.is_some() && phase < PHASE_CLOSE {
                let storm = self.shared.storm.load(Ordering::Acquire);
                if storm != lp.storm {
                    lp.storm = storm;
                    match storm {
                        STORM_AWAY => {
                            // Every storm client leaves: open, reconnecting
                            // or waiting to.
                            for (slot, c) in conns.iter_mut().enumerate() {
                                if !c
                                    .as_ref()
                                    .is_some_and(|c| c.stream.as_ref().is_some_and(|s| s.storm))
                                {
                                    continue;
                                }
                                let Some(mut conn) = c.take() else { continue };
                                if matches!(conn.state, State::Connecting(_) | State::Upgrading(_))
                                {
                                    in_flight -= 1;
                                }
                                free.push(slot);
                                live -= 1;
                                if let Some(r) = self.resume_of(&mut conn, now) {
                                    away.push(r);
                                }
                            }
                            let (storm, rest): (Vec<Resume>, Vec<Resume>) =
                                waiting.drain(..).partition(|r| r.stream.storm);
                            waiting.extend(rest);
                            away.extend(storm);
                            lp.stats.storm.left += away.len() as u64;
                            self.shared
                                .storm_left
                                .fetch_add(away.len(), Ordering::AcqRel);
                        }
                        STORM_BACK => {
                            lp.storm_target = self.shared.storm_target.load(Ordering::Acquire);
                            lp.storm_back_at = self.shared.storm_back_at.get().copied();
                            for mut r in away.drain(..) {
                                r.stream.awaiting_live = true;
                                r.down_since = now;
                                r.due = now;
                                returning.push(r);
                            }
                        }
                        _ => {}
                    }
                }
                // Reconnects, called-back storm clients first, within the
                // same bound on connects in flight as the first connects.
                while in_flight < self.max_in_flight {
                    let r = match returning.pop() {
                        Some(r) => r,
                        None if waiting.front().is_some_and(|r| r.due <= now) => {
                            match waiting.pop_front() {
                                Some(r) => r,
                                None => break,
                            }
                        }
                        None => break,
                    };
                    let slot = free.pop().unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    match self.connect(r.stream.index, slot, Some(&r)) {
                        Ok(conn) => {
                            conns[slot] = Some(conn);
                            in_flight += 1;
                            live += 1;
                        }
                        Err(e) => {
                            free.push(slot);
                            lp.reconnect_failed(format!("reconnect: {e}"));
                            waiting.push_back(Resume {
                                due: now + self.reconnect.unwrap_or_default(),
                                ..r
                            });
                        }
                    }
                }
                if now >= next_resume_check {
                    // Reconnects that take longer than the connect timeout
                    // start over.
                    next_resume_check = now + RESUME_CHECK;
                    for (slot, c) in conns.iter_mut().enumerate() {
                        let late = c.as_ref().is_some_and(|c| match &c.state {
                            State::Connecting(hs) | State::Upgrading(hs) => {
                                hs.down_since.is_some() && now >= hs.started + self.connect_timeout
                            }
                            _ => false,
                        });
                        if !late {
                            continue;
                        }
                        let Some(mut conn) = c.take() else { continue };
                        free.push(slot);
                        live -= 1;
                        in_flight -= 1;
                        lp.reconnect_failed("reconnect timeout".to_string());
                        if let Some(r) = self.resume_of(&mut conn, now) {
                            waiting.push_back(r);
                        }
                    }
                }
            }
            if phase >= PHASE_AFTER && !window_ended {
                // Streams down for longer than a reconnect should take.
                window_ended = true;
                let grace = self.reconnect.unwrap_or_default() + RESUME_GRACE;
                let long_down = |since: Instant| now.saturating_duration_since(since) > grace;
                let setting_up = conns.iter().flatten().filter(|c| match &c.state {
                    State::Connecting(hs) | State::Upgrading(hs) => {
                        hs.down_since.is_some_and(long_down)
                    }
                    _ => false,
                });
                let queued = waiting
                    .iter()
                    .chain(&returning)
                    .filter(|r| long_down(r.down_since));
                lp.stats.unresumed += (setting_up.count() + queued.count() + away.len()) as u64;
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
                            if !conn.is_resuming() {
                                self.connect_failed(&mut lp, "aborted at close".to_string());
                            }
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
            // The next reconnect due, unless the in-flight bound holds it.
            let timeout = match waiting.front() {
                Some(r) if in_flight < self.max_in_flight => {
                    timeout.min(r.due.saturating_duration_since(Instant::now()))
                }
                _ => timeout,
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
                let was_resuming = conn.is_resuming();
                let (outcome, more) = self.service(conn, &mut lp);
                let now_open = matches!(conn.state, State::Open);
                if was_setup && now_open {
                    in_flight -= 1;
                    if was_resuming {
                        lp.stats.reconnects += 1;
                    } else {
                        lp.stats.connected += 1;
                        if conn.slow {
                            lp.stats.slow_connected += 1;
                        }
                        self.shared.connected.fetch_add(1, Ordering::AcqRel);
                    }
                }
                if let Outcome::Drop = outcome {
                    if was_setup && !now_open {
                        in_flight -= 1;
                    }
                    if let Some(mut conn) = conns[slot].take() {
                        // A stream that was open, or a reconnect, goes on
                        // (a first connect that failed does not).
                        if (now_open || was_resuming) && phase < PHASE_CLOSE {
                            if let Some(r) = self.resume_of(&mut conn, now) {
                                waiting.push_back(r);
                            }
                        }
                    }
                    free.push(slot);
                    live -= 1;
                } else if more {
                    again.push(slot);
                }
            }
            if self.sse {
                // Once per turn, not per message.
                self.shared
                    .newest_seq
                    .fetch_max(lp.newest_seq, Ordering::AcqRel);
            }
        }
        // Dropping `conns` closes every remaining socket.
        drop(conns);
        if !connecting_done {
            self.shared.threads_done.fetch_add(1, Ordering::AcqRel);
        }
        lp.stats
    }

    /// A connection still being set up failed: a first connect's failure,
    /// or a reconnect's (`resuming`), which will be tried again.
    fn setup_failed(&self, resuming: bool, lp: &mut Loop, why: String) {
        if resuming {
            lp.reconnect_failed(why);
        } else {
            self.connect_failed(lp, why);
        }
    }

    /// What `conn`, an event stream that ended or failed to come back,
    /// resumes with, if it reconnects (its parser is taken).
    fn resume_of(&self, conn: &mut Conn, now: Instant) -> Option<Resume> {
        let delay = self.reconnect?;
        let stream = conn.stream.take()?;
        let down_since = match &conn.state {
            State::Connecting(hs) | State::Upgrading(hs) => hs.down_since,
            State::Open | State::Closing => None,
        };
        Some(Resume {
            stream,
            last_seq: conn.last_seq,
            down_since: down_since.unwrap_or(now),
            due: now + delay,
        })
    }

    fn connect_failed(&self, lp: &mut Loop, why: String) {
        lp.stats.connect_failed += 1;
        if lp.stats.first_connect_error.is_none() {
            lp.stats.first_connect_error = Some(why);
        }
        self.shared.failed.fetch_add(1, Ordering::AcqRel);
    }

    /// Starts a non-blocking connect for global client `index` in `slot`;
    /// `resume` for an event stream's reconnect.
    fn connect(&self, index: usize, slot: usize, resume: Option<&Resume>) -> io::Result<Conn> {
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
        let last_id = resume.and_then(|r| r.stream.reader.last_id());
        let (request, accept) = if self.sse {
            let request = self.target.event_stream_request(last_id).into_bytes();
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
                down_since: resume.map(|r| r.down_since),
                started: Instant::now(),
            })),
            slow,
            last_seq: resume.map_or(0, |r| r.last_seq),
            pending: Vec::new(),
            parser: Parser::new(false).with_deflate(self.deflate),
            stream: self.sse.then(|| match resume {
                Some(r) => Box::new(Stream {
                    reader: EventReader::resuming(last_id),
                    ..(*r.stream).clone()
                }),
                None => Box::new(Stream {
                    reader: EventReader::new(),
                    index,
                    after_reset: false,
                    storm: index >= self.storm_from,
                    awaiting_live: false,
                }),
            }),
        })
    }

    /// Handles readiness for one connection. Returns whether to keep it and
    /// whether it has more to read (serviced again next turn).
    fn service(&self, conn: &mut Conn, lp: &mut Loop) -> (Outcome, bool) {
        if let State::Connecting(_) = conn.state {
            match conn.io.stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    self.setup_failed(conn.is_resuming(), lp, format!("connect: {e}"));
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
                    self.setup_failed(conn.is_resuming(), lp, format!("connect: {e}"));
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
        let resuming = conn.is_resuming();
        // What a full socket left in the TLS session (handshake records, the
        // request) goes first: this may be the writable event it waited for.
        if let Err(e) = conn.io.flush_tls() {
            self.setup_failed(resuming, lp, format!("send TLS handshake: {e}"));
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
                    self.setup_failed(resuming, lp, format!("send upgrade: {e}"));
                    return (Outcome::Drop, false);
                }
            }
        }
        loop {
            let n = match conn.io.read(&mut lp.scratch) {
                Ok(0) => {
                    self.setup_failed(
                        resuming,
                        lp,
                        "connection closed during handshake".to_string(),
                    );
                    return (Outcome::Drop, false);
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (Outcome::Keep, false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.setup_failed(resuming, lp, format!("read upgrade response: {e}"));
                    return (Outcome::Drop, false);
                }
            };
            let before = hs.response.len();
            hs.response
                .extend_from_slice(&lp.scratch[..n.min(MAX_RESPONSE)]);
            let Some(end) = find_header_end(&hs.response, before.saturating_sub(3)) else {
                if hs.response.len() >= MAX_RESPONSE {
                    self.setup_failed(resuming, lp, "upgrade response too long".to_string());
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
                self.setup_failed(resuming, lp, why);
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
                    } else if self.sse && self.reconnect.is_some() {
                        // Not its end: it reconnects.
                        lp.stats.stream_ends += 1;
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
                let mut inflated = [0u8; wire::TEXT_PREFIX_LEN];
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
                // A text message (the origin's text mode) carries seq and
                // timestamp in base64.
                let mut decoded = [0u8; events::DATA_PREFIX / 4 * 3];
                let sequenced = if binary {
                    (len >= wire::PREFIX_LEN as u64).then_some(prefix)
                } else {
                    events::binary_prefix(prefix, &mut decoded).map(|n| &decoded[..n])
                };
                count_message(stats, last_seq, &mut false, measuring, now_ns, sequenced);
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
    /// Parses `lp.scratch[..n]` as the event stream and counts its events
    /// (and, for a storm, who is live again and the other clients'
    /// latency). Data lines are not checked against the frame they came
    /// from: a malformed stream shows as gaps or as events without a seq.
    fn on_events(&self, conn: &mut Conn, lp: &mut Loop, n: usize) {
        let now_ns = unix_ns();
        let measuring = lp.measuring;
        let Loop {
            stats,
            scratch,
            storm,
            storm_target,
            storm_back_at,
            newest_seq,
            ..
        } = lp;
        if measuring {
            stats.wire_bytes += n as u64;
        }
        let last_seq = &mut conn.last_seq;
        let Some(stream) = conn.stream.as_deref_mut() else {
            return;
        };
        let Stream {
            reader,
            after_reset,
            storm: is_storm,
            awaiting_live,
            ..
        } = stream;
        let has_storm = self.has_storm;
        reader.feed(&scratch[..n], |event| {
            if event.reset {
                stats.resets += 1;
                if *is_storm {
                    stats.storm.resets += 1;
                }
                *after_reset = true;
                return;
            }
            // A binary message's data is its payload in base64; a text
            // one's (the origin's text mode) starts with seq and timestamp
            // in base64: either way, the same decoding.
            let mut decoded = [0u8; events::DATA_PREFIX / 4 * 3];
            let prefix = events::binary_prefix(event.data, &mut decoded).map(|len| &decoded[..len]);
            let seen = count_message(stats, last_seq, after_reset, measuring, now_ns, prefix);
            let Some(seen) = seen else { return };
            *newest_seq = (*newest_seq).max(seen.seq);
            if *is_storm {
                if measuring {
                    stats.storm.gaps += seen.continuity.gap;
                    stats.storm.reset_gaps += seen.continuity.reset_gap;
                    stats.storm.dups += u64::from(seen.continuity.dup);
                }
                if *awaiting_live {
                    stats.storm.resumed += 1;
                    if seen.seq > *storm_target {
                        *awaiting_live = false;
                        let since = storm_back_at.map_or(Duration::ZERO, |at| at.elapsed());
                        let us = u64::try_from(since.as_micros()).unwrap_or(u64::MAX);
                        stats.storm.time_to_live.saturating_record(us.max(1));
                        stats.storm.live += 1;
                        self.shared.storm_live.fetch_add(1, Ordering::AcqRel);
                    }
                }
            } else if has_storm && measuring {
                stats.others_latency.saturating_record(seen.latency_us);
                if *storm == STORM_BACK {
                    stats
                        .storm
                        .others_latency
                        .saturating_record(seen.latency_us);
                }
            }
        });
    }
}

/// Continuity of one sequenced message with those before it on its client.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Continuity {
    /// Seqs missing right before this one (none after a reset).
    gap: u64,
    /// Seqs missing before the first message after a reset: what the reset
    /// said would not come.
    reset_gap: u64,
    /// At or below the last seq seen: a duplicate or a reorder.
    dup: bool,
}

/// Checks `seq` against `last_seq` (0: none yet), raising it; `after_reset`
/// (a reset came since the last message) is cleared.
fn continuity(last_seq: &mut u64, after_reset: &mut bool, seq: u64) -> Continuity {
    let mut c = Continuity::default();
    if *last_seq != 0 {
        let missing = seq.saturating_sub(*last_seq + 1);
        if std::mem::take(after_reset) {
            c.reset_gap = missing;
        } else {
            c.gap = missing;
        }
        c.dup = seq <= *last_seq;
    }
    *after_reset = false;
    *last_seq = (*last_seq).max(seq);
    c
}

/// What [`count_message`] found in a sequenced message.
struct Seen {
    seq: u64,
    continuity: Continuity,
    /// now − sent, µs (at least 1).
    latency_us: u64,
}

/// Counts one message received at `now_ns`; `prefix` is the start of its
/// payload (decoded, for a text message or an event) when it carries `seq`
/// and `sent_unix_ns`: then gaps (a reset's apart), duplicates and latency are
/// checked too, and returned.
fn count_message(
    stats: &mut Report,
    last_seq: &mut u64,
    after_reset: &mut bool,
    measuring: bool,
    now_ns: u64,
    prefix: Option<&[u8]>,
) -> Option<Seen> {
    stats.total_messages += 1;
    if measuring {
        stats.delivered += 1;
    }
    let prefix = prefix.filter(|p| p.len() >= wire::PREFIX_LEN)?;
    let seq = u64::from_le_bytes(prefix[0..8].try_into().unwrap_or([0; 8]));
    let sent = u64::from_le_bytes(prefix[8..16].try_into().unwrap_or([0; 8]));
    let c = continuity(last_seq, after_reset, seq);
    stats.missed += c.gap;
    let latency_us = (now_ns.saturating_sub(sent) / 1_000).max(1);
    if measuring {
        stats.gaps += c.gap;
        stats.reset_gaps += c.reset_gap;
        stats.dups += u64::from(c.dup);
        stats.latency.saturating_record(latency_us);
    }
    Some(Seen {
        seq,
        continuity: c,
        latency_us,
    })
}

impl Loop {
    fn mask(&mut self) -> [u8; 4] {
        next_mask(&mut self.rng)
    }

    /// Counts a failed reconnect attempt (not an error: it is tried again).
    fn reconnect_failed(&mut self, _why: String) {
        self.stats.reconnect_failed += 1;
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
    fn text_prefixes_decode_as_event_data_does() {
        let prefix: [u8; wire::PREFIX_LEN] = std::array::from_fn(|i| 0xf0 ^ i as u8);
        let mut text = [0u8; wire::TEXT_PREFIX_LEN];
        wire::encode_text_prefix(&prefix, &mut text);
        // What follows the padding, the origin's dots, is never decoded.
        let payload = [&text[..], b"...."].concat();
        let mut decoded = [0u8; events::DATA_PREFIX / 4 * 3];
        let n = events::binary_prefix(&payload[..wire::TEXT_PREFIX_LEN], &mut decoded);
        assert_eq!(n, Some(wire::PREFIX_LEN));
        assert_eq!(decoded[..wire::PREFIX_LEN], prefix);
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
    fn continuity_across_reconnects_and_resets() {
        let (mut last, mut after_reset) = (0, false);
        let mut check = |seq| continuity(&mut last, &mut after_reset, seq);
        let none = Continuity::default();
        // The first message has nothing to follow.
        assert_eq!(check(5), none);
        assert_eq!(check(6), none);
        // A resumed stream goes on where it was: nothing to count.
        assert_eq!(check(7), none);
        assert_eq!(check(10), Continuity { gap: 2, ..none });
        assert_eq!(check(10), Continuity { dup: true, ..none });
        assert_eq!(check(9), Continuity { dup: true, ..none });
        assert_eq!(last, 10);
        // After a reset, the jump to the live edge is the reset's; the
        // next gap is a gap again.
        after_reset = true;
        let mut check = |seq| continuity(&mut last, &mut after_reset, seq);
        assert_eq!(
            check(110),
            Continuity {
                reset_gap: 99,
                ..none
            }
        );
        assert_eq!(check(112), Continuity { gap: 1, ..none });
        // A reset before the first message changes nothing.
        let (mut last, mut after_reset) = (0, true);
        assert_eq!(continuity(&mut last, &mut after_reset, 3), none);
        assert!(!after_reset);
    }

    #[test]
    fn counts_resets_apart_from_gaps() {
        let mut stats = Report::empty(1, Duration::ZERO);
        let (mut last, mut after_reset) = (0, false);
        let prefix = |seq: u64| {
            let mut p = [0u8; 16];
            p[..8].copy_from_slice(&seq.to_le_bytes());
            p[8..].copy_from_slice(&unix_ns().to_le_bytes());
            p
        };
        for (seq, reset) in [(1, false), (2, false), (4, false), (50, true), (51, false)] {
            after_reset |= reset;
            let p = prefix(seq);
            let seen = count_message(
                &mut stats,
                &mut last,
                &mut after_reset,
                true,
                unix_ns(),
                Some(&p),
            );
            assert_eq!(seen.map(|s| s.seq), Some(seq));
        }
        assert_eq!(
            (stats.gaps, stats.reset_gaps, stats.missed, stats.dups),
            (1, 45, 1, 0)
        );
        assert_eq!(stats.delivered, 5);
        assert_eq!(stats.latency.len(), 5);
    }

    #[test]
    fn resumes_with_last_event_id() {
        let t = Target::parse("ws://127.0.0.1:9001/a", &["X-A: b".to_string()], None).unwrap();
        assert_eq!(
            t.event_stream_request(Some(0xab)),
            "GET /a HTTP/1.1\r\nHost: 127.0.0.1:9001\r\nX-A: b\r\nAccept: text/event-stream\r\n\
             Last-Event-ID: 00000000000000ab\r\n\r\n"
        );
        assert_eq!(t.event_stream_request(None), t.event_stream_request);
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
