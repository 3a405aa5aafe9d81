//! Origin of the load tool: a single-threaded mio WebSocket server that the
//! gateway's lobbies connect to as upstream clients, and that broadcasts
//! sequenced binary messages to every connected upstream connection.
//!
//! Every message is a binary frame whose payload is `seq: u64 LE` (1, 2, 3,
//! …, the same seq for the same message on every connection), then
//! `sent_unix_ns: u64 LE` (taken when the message is generated), then zero
//! padding up to the configured size (at least 16 bytes). In text mode
//! ([`Origin::start_text`], for relays that pass messages on as text, such
//! as an event stream's `data:`) each message is a text frame instead: the
//! same 16 bytes in padded base64 (24 characters, `wire::encode_text_prefix`),
//! then dots up to the size (at least 24 bytes).
//!
//! Pacing: with [`Rate::PerSecond`] a 1 ms ticker generates the messages due
//! so far, so 200 msg/s is smooth rather than bursts of 200; messages are
//! generated even while no upstream is connected (a live feed).
//! [`Rate::Bursts`] releases what is due a whole burst at a time. With
//! [`Rate::Saturated`] messages are generated whenever every upstream link
//! has drained below a low watermark, i.e. as fast as the links accept them
//! (only while at least one upstream is connected). [`Rate::Paused`] only
//! accepts and serves connections.
//!
//! Back-pressure: each connection has an output buffer; while any open
//! connection has more than max(1 MiB, 2 frames) unsent, generation stalls,
//! so one slow upstream slows the whole origin (like a blocking writer would;
//! the origin link becomes the queue for a slow relay). When paced and
//! behind schedule by more than one second of messages, the excess schedule
//! slots are skipped (no seq is skipped; those messages are never generated).
//! Memory is thus bounded by connections × that limit.
//!
//! The origin answers Ping with Pong and Close with Close, keeps accepting
//! connections during the run, and on [`Origin::stop`] sends Close 1001 to
//! every upstream (waiting at most 1 s to flush) before the thread exits.
//!
//! Public API (self-contained: depends only on external crates and `wire.rs`):
//! [`Origin::start_with`] / [`Origin::start_ticks`] / [`Origin::start_text`],
//! [`Origin::local_addr`],
//! [`Origin::published`], [`Origin::connections`], [`Origin::stop`]
//! (dropping an `Origin` stops it too).

// A private copy of the shared wire code keeps this file self-contained: a
// bench can include it alone with `#[path = "..."] mod NAME;`.
#[allow(clippy::duplicate_mod)]
#[path = "wire.rs"]
mod wire;

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use wire::{Frame, Parser, SmallFrame};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKE: Token = Token(usize::MAX);
/// Largest upgrade request accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Reads per readiness event before servicing others.
const READS_PER_TURN: usize = 16;
/// Messages generated per loop turn at most when saturated.
const SATURATED_BATCH: usize = 64;
/// Time allowed to flush Close frames on stop.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// Listen backlog (the kernel caps it at `net.core.somaxconn`).
const BACKLOG: i32 = 1024;
/// Most connections served at once; more are refused.
const MAX_CONNECTIONS: usize = 20_000;

/// How fast the origin publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// Publish nothing; only accept and serve connections.
    Paused,
    /// Publish this many messages per second, paced by a 1 ms ticker.
    PerSecond(u64),
    /// Publish `per_second` on average, `burst` messages back to back every
    /// `burst / per_second` seconds: a feed that spikes.
    Bursts { per_second: u64, burst: u64 },
    /// Publish as fast as the upstream links accept.
    Saturated,
}

/// What a message carries after the frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    /// Binary: seq, timestamp, zeros.
    Zeros,
    /// Binary: seq, timestamp, a JSON price tick padded with spaces.
    Ticks,
    /// Text: seq and timestamp in base64, dots.
    Text,
}

struct Shared {
    stop: AtomicBool,
    published: AtomicU64,
    connections: AtomicUsize,
}

/// A running origin; see the module docs.
pub struct Origin {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Origin {
    /// Binds `addr` and starts publishing messages of `size` bytes (raised
    /// to at least 16) at `rate`.
    pub fn start_with(addr: SocketAddr, rate: Rate, size: usize) -> io::Result<Origin> {
        Origin::start_inner(addr, rate, size, Body::Zeros)
    }

    /// Like [`Origin::start_with`], each message's bytes after seq and
    /// timestamp a JSON price tick (repeated keys, numbers that change with
    /// every message), padded with spaces to `size`: what compresses like
    /// a real feed.
    pub fn start_ticks(addr: SocketAddr, rate: Rate, size: usize) -> io::Result<Origin> {
        Origin::start_inner(addr, rate, size, Body::Ticks)
    }

    /// Like [`Origin::start_with`], each message a text frame: seq and
    /// timestamp in base64, then dots up to `size` (raised to at least 24);
    /// see the module docs.
    pub fn start_text(addr: SocketAddr, rate: Rate, size: usize) -> io::Result<Origin> {
        Origin::start_inner(addr, rate, size, Body::Text)
    }

    fn start_inner(addr: SocketAddr, rate: Rate, size: usize, body: Body) -> io::Result<Origin> {
        let mut listener = listen(addr)?;
        let local_addr = listener.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            published: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
        });
        let (opcode, size, fill) = match body {
            Body::Text => (wire::OP_TEXT, size.max(wire::TEXT_PREFIX_LEN), b'.'),
            Body::Zeros | Body::Ticks => (wire::OP_BINARY, size.max(wire::PREFIX_LEN), 0),
        };
        let mut hdr = [0u8; wire::MAX_HEADER];
        let h = wire::encode_header(opcode, size as u64, None, &mut hdr);
        let mut frame = Vec::with_capacity(h + size);
        frame.extend_from_slice(&hdr[..h]);
        frame.resize(h + size, fill);
        let server = Server {
            poll,
            listener,
            shared: shared.clone(),
            rate,
            conns: Vec::new(),
            free: Vec::new(),
            open: 0,
            high_water: (2 * frame.len()).max(1 << 20),
            low_water: frame.len().max(256 << 10),
            frame,
            prefix_at: h,
            seq: 0,
            body,
            scratch: vec![0u8; 64 * 1024],
        };
        let thread = std::thread::Builder::new()
            .name("load-origin".to_string())
            .spawn(move || server.run())?;
        Ok(Origin {
            local_addr,
            shared,
            waker,
            thread: Some(thread),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Messages generated so far (= the last seq).
    pub fn published(&self) -> u64 {
        self.shared.published.load(Ordering::Acquire)
    }

    /// Upstream connections currently open (handshake done).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Sends Close 1001 to every upstream, stops the thread and joins it.
    /// Returns the thread's fatal error, if it had one.
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.shared.stop.store(true, Ordering::Release);
        // If waking fails the thread still sees the flag within 100 ms.
        let _ = self.waker.wake();
        thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("origin thread panicked")))
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

enum State {
    /// Reading the upgrade request.
    Handshake(Vec<u8>),
    /// Receiving broadcasts.
    Open,
    /// Close (or an error answer) queued; drop once `out` is flushed.
    CloseAfterFlush,
}

struct Conn {
    stream: TcpStream,
    state: State,
    out: Vec<u8>,
    out_pos: usize,
    parser: Parser,
}

impl Conn {
    fn pending(&self) -> usize {
        self.out.len() - self.out_pos
    }

    fn queue(&mut self, bytes: &[u8]) {
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        } else if self.out_pos >= 64 * 1024 && self.out_pos * 2 >= self.out.len() {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        self.out.extend_from_slice(bytes);
    }

    /// Writes as much of `out` as the socket takes.
    fn flush(&mut self) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
            if self.out.capacity() > (4 << 20) {
                self.out = Vec::new();
            }
        }
        Ok(())
    }
}

struct Server {
    poll: Poll,
    listener: TcpListener,
    shared: Arc<Shared>,
    rate: Rate,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    open: usize,
    high_water: usize,
    low_water: usize,
    /// Frame template: header then payload; seq/ts patched per message.
    frame: Vec<u8>,
    prefix_at: usize,
    seq: u64,
    /// What each message carries.
    body: Body,
    scratch: Vec<u8>,
}

impl Server {
    fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let start = Instant::now();
        let mut slots: u64 = 0;
        let mut max_pending = 0usize;
        while !self.shared.stop.load(Ordering::Acquire) {
            let timeout = match self.rate {
                Rate::Paused => Duration::from_millis(100),
                Rate::PerSecond(_) | Rate::Bursts { .. } => Duration::from_millis(1),
                Rate::Saturated if self.open > 0 && max_pending < self.low_water => Duration::ZERO,
                Rate::Saturated => Duration::from_millis(100),
            };
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                match ev.token() {
                    WAKE => {}
                    LISTENER => self.accept_all(),
                    Token(slot) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_readable(slot);
                        }
                        // Flushing happens below for every connection.
                    }
                }
            }
            match self.rate {
                Rate::Paused => {}
                Rate::PerSecond(r) | Rate::Bursts { per_second: r, .. } => {
                    let due = (start.elapsed().as_nanos() * u128::from(r) / 1_000_000_000) as u64;
                    // Bursts: what is due is released a whole burst at a time.
                    let due = match self.rate {
                        Rate::Bursts { burst, .. } => due - due % burst.max(1),
                        _ => due,
                    };
                    if due > slots + r {
                        slots = due - r;
                    }
                    while slots < due && max_pending <= self.high_water {
                        max_pending = self.emit();
                        slots += 1;
                    }
                }
                Rate::Saturated => {
                    for _ in 0..SATURATED_BATCH {
                        if self.open == 0 || max_pending >= self.low_water {
                            break;
                        }
                        max_pending = self.emit();
                    }
                }
            }
            max_pending = self.flush_all();
        }
        self.close_all();
        Ok(())
    }

    /// Generates the next message and queues it on every open connection.
    /// Returns the largest output backlog afterwards.
    fn emit(&mut self) -> usize {
        self.seq += 1;
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let at = self.prefix_at;
        let mut prefix = [0u8; wire::PREFIX_LEN];
        prefix[..8].copy_from_slice(&self.seq.to_le_bytes());
        prefix[8..].copy_from_slice(&ts.to_le_bytes());
        match self.body {
            Body::Text => {
                let mut text = [0u8; wire::TEXT_PREFIX_LEN];
                wire::encode_text_prefix(&prefix, &mut text);
                self.frame[at..at + text.len()].copy_from_slice(&text);
            }
            Body::Zeros => self.frame[at..at + prefix.len()].copy_from_slice(&prefix),
            Body::Ticks => {
                self.frame[at..at + prefix.len()].copy_from_slice(&prefix);
                let body = &mut self.frame[at + prefix.len()..];
                body.fill(b' ');
                let tick = tick_json(self.seq, ts);
                let n = tick.len().min(body.len());
                body[..n].copy_from_slice(&tick.as_bytes()[..n]);
            }
        }
        let mut max_pending = 0;
        for conn in self.conns.iter_mut().flatten() {
            if let State::Open = conn.state {
                conn.queue(&self.frame);
                max_pending = max_pending.max(conn.pending());
            }
        }
        self.shared.published.store(self.seq, Ordering::Release);
        max_pending
    }

    /// Flushes every connection; drops the broken and the finished ones.
    /// Returns the largest remaining backlog of an open connection.
    fn flush_all(&mut self) -> usize {
        let mut max_pending = 0;
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else {
                continue;
            };
            if conn.pending() == 0 && !matches!(conn.state, State::CloseAfterFlush) {
                continue;
            }
            let done = match conn.flush() {
                Err(_) => true,
                Ok(()) => matches!(conn.state, State::CloseAfterFlush) && conn.pending() == 0,
            };
            if done {
                self.remove(slot);
            } else if let State::Open = conn.state {
                max_pending = max_pending.max(conn.pending());
            }
        }
        max_pending
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.conns.len() - self.free.len() >= MAX_CONNECTIONS {
                        continue; // dropped: refuse beyond the cap
                    }
                    let _ = stream.set_nodelay(true);
                    let slot = self.free.pop().unwrap_or_else(|| {
                        self.conns.push(None);
                        self.conns.len() - 1
                    });
                    let registered = self.poll.registry().register(
                        &mut stream,
                        Token(slot),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                    if registered.is_err() {
                        self.free.push(slot);
                        continue;
                    }
                    self.conns[slot] = Some(Conn {
                        stream,
                        state: State::Handshake(Vec::new()),
                        out: Vec::new(),
                        out_pos: 0,
                        parser: Parser::new(true),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // E.g. out of file descriptors: try again on the next connection.
                Err(_) => return,
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        if let Some(conn) = self.conns[slot].take() {
            if let State::Open = conn.state {
                self.open -= 1;
                self.shared.connections.store(self.open, Ordering::Release);
            }
            self.free.push(slot);
        }
    }

    fn on_readable(&mut self, slot: usize) {
        for _ in 0..READS_PER_TURN {
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            let n = match conn.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.remove(slot);
                    return;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.remove(slot);
                    return;
                }
            };
            let mut data = &self.scratch[..n];
            if let State::Handshake(buf) = &mut conn.state {
                let before = buf.len();
                buf.extend_from_slice(&data[..data.len().min(MAX_REQUEST)]);
                let Some(end) = find_header_end(buf, before.saturating_sub(3)) else {
                    if buf.len() >= MAX_REQUEST {
                        self.remove(slot);
                        return;
                    }
                    continue;
                };
                match accept_key(&buf[..end]) {
                    Ok(accept) => {
                        let resp = format!(
                            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                             Sec-WebSocket-Accept: {accept}\r\n\r\n"
                        );
                        conn.state = State::Open;
                        conn.queue(resp.as_bytes());
                        self.open += 1;
                        self.shared.connections.store(self.open, Ordering::Release);
                    }
                    Err(why) => {
                        let resp = format!(
                            "HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{why}",
                            why.len()
                        );
                        conn.state = State::CloseAfterFlush;
                        conn.queue(resp.as_bytes());
                        return;
                    }
                }
                data = &data[(end - before).min(n)..];
            }
            if !matches!(conn.state, State::Open) {
                continue; // discard whatever follows our Close
            }
            let mut reply: Option<SmallFrame> = None;
            let mut close: Option<SmallFrame> = None;
            let parsed = conn.parser.feed(data, |frame| match frame {
                Frame::Ping(p) => reply = Some(SmallFrame::new(wire::OP_PONG, p, None)),
                Frame::Close(p) => {
                    if close.is_none() {
                        close = Some(SmallFrame::new(wire::OP_CLOSE, &p[..p.len().min(2)], None));
                    }
                }
                Frame::Pong(_) | Frame::Message { .. } => {}
            });
            if parsed.is_err() {
                close = Some(SmallFrame::close(1002, None));
            }
            if let Some(pong) = reply {
                conn.queue(pong.as_bytes());
            }
            if let Some(close) = close {
                conn.queue(close.as_bytes());
                conn.state = State::CloseAfterFlush;
                self.open -= 1;
                self.shared.connections.store(self.open, Ordering::Release);
            }
        }
    }

    /// Sends Close 1001 to every open connection and flushes for a while.
    fn close_all(&mut self) {
        let going_away = SmallFrame::close(1001, None);
        for conn in self.conns.iter_mut().flatten() {
            if let State::Open = conn.state {
                conn.queue(going_away.as_bytes());
                conn.state = State::CloseAfterFlush;
            } else if let State::Handshake(_) = conn.state {
                conn.state = State::CloseAfterFlush;
            }
        }
        self.open = 0;
        self.shared.connections.store(0, Ordering::Release);
        let deadline = Instant::now() + STOP_GRACE;
        let mut events = Events::with_capacity(1024);
        loop {
            self.flush_all();
            let left = deadline.saturating_duration_since(Instant::now());
            if self.conns.iter().all(Option::is_none) || left.is_zero() {
                break;
            }
            if self
                .poll
                .poll(&mut events, Some(left.min(Duration::from_millis(10))))
                .is_err()
            {
                break;
            }
            for ev in events.iter() {
                let Token(slot) = ev.token();
                if slot < self.conns.len() && (ev.is_readable() || ev.is_read_closed()) {
                    self.drain(slot);
                }
            }
        }
        self.conns.clear();
    }

    /// Reads and discards, removing the connection at EOF or error.
    fn drain(&mut self, slot: usize) {
        for _ in 0..READS_PER_TURN {
            let Some(conn) = self.conns[slot].as_mut() else {
                return;
            };
            match conn.stream.read(&mut self.scratch) {
                Ok(0) => return self.remove(slot),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.remove(slot),
            }
        }
    }
}

/// Binds a non-blocking listener with a backlog of [`BACKLOG`] (mio's own
/// `bind` uses 128, which a burst of connecting clients overruns).
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(TcpListener::from_std(std::net::TcpListener::from(socket)))
}

/// Index just past `\r\n\r\n` in `buf`, searching from `from`.
fn find_header_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| from + p + 4)
}

/// Validates an upgrade request head; returns the `Sec-WebSocket-Accept` value.
fn accept_key(head: &[u8]) -> Result<String, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err("incomplete request".to_string()),
        Err(e) => return Err(format!("bad request: {e}")),
    }
    if req.method != Some("GET") {
        return Err("method must be GET".to_string());
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    if !header("upgrade").is_some_and(|v| v.to_ascii_lowercase().contains("websocket")) {
        return Err("not a websocket upgrade".to_string());
    }
    if header("sec-websocket-version").is_some_and(|v| v != "13") {
        return Err("unsupported websocket version".to_string());
    }
    let key = header("sec-websocket-key").ok_or_else(|| "missing Sec-WebSocket-Key".to_string())?;
    Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}
/// A price tick for message `seq`: a symbol, a timestamp and twelve book
/// levels, each number moving with `seq`.
fn tick_json(seq: u64, ts: u64) -> String {
    let levels: Vec<String> = (0..12u64)
        .map(|i| {
            let price = 64_000.0 + (seq * 7 + i * 13) as f64 * 0.25;
            let qty = ((seq * 31 + i * 17) % 997) as f64 / 100.0;
            format!(
                "{{\"price\":{price:.2},\"qty\":{qty:.2},\"orders\":{}}}",
                (seq + i) % 9
            )
        })
        .collect();
    format!(
        "{{\"seq\":{seq},\"symbol\":\"BTC-USD\",\"ts\":{},\"levels\":[{}]}}",
        ts / 1_000_000,
        levels.join(",")
    )
}
