//! The admin thread (`wsgate-admin`): a small HTTP/1.1 server for operators,
//! on its own listener (`--admin ADDR`), never the client one.
//!
//! It serves `/metrics`, `/livez`, `/readyz`, `/lobbies` and a dashboard at
//! `/` (the endpoints live in `routes.rs`). It owns its listener and
//! its connections, and nothing else: it reads the stats atomics and asks the
//! manager for the lobby list with a bounded wait, so a slow or hostile admin
//! client costs the gateway nothing. It never touches a client socket.
//!
//! Everything is bounded, in the same way the acceptor bounds upgrades: one
//! thread, non-blocking sockets under mio; at most [`MAX_CONNECTIONS`] at
//! once (when full, the connection that has waited longest for its request is
//! closed to make room, so a slowloris cannot lock operators out); request
//! heads of at most [`MAX_HEAD`] bytes (larger gets 431); a request must
//! arrive within [`REQUEST_TIMEOUT`] of the connection, and its response be
//! written within [`RESPONSE_TIMEOUT`]. One request per connection (`Connection:
//! close`); request bodies are not read. After its response a connection is
//! half-closed and what the client still sends is discarded (a bounded
//! amount, briefly), so the response is not destroyed by a reset.
//!
//! The thread starts after the gateway's other threads and stops last, once
//! the manager has finished (see `gateway.rs`): it keeps answering, `/readyz`
//! with 503, during the drain.

mod routes;

use std::{
    io::{self, Read, Write},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use log::{debug, error, info, warn};
use mio::{
    Events, Interest, Poll, Token, Waker,
    net::{TcpListener, TcpStream},
};

use self::routes::Reply;
pub(crate) use self::routes::{AdminToken, Sources};
use crate::error::{Error, Result};

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
/// Tokens from here on are connections (`token - FIRST_CONN` indexes `conns`).
const FIRST_CONN: usize = 2;

/// Most admin connections open at once.
pub(crate) const MAX_CONNECTIONS: usize = 32;
/// Largest request head (request line and headers) accepted; larger gets 431.
pub(crate) const MAX_HEAD: usize = 8 * 1024;
/// Most request headers accepted; more gets 431.
const MAX_HEADERS: usize = 64;
/// Time a connection has to send its whole request head.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a response has to be written.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long, and how much, input is discarded after a response before closing.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;
/// Longest sleep between checks of the stop flag and the deadlines.
const TICK: Duration = Duration::from_secs(1);
/// Pause after an accept error other than `WouldBlock` (descriptor exhaustion).
const ACCEPT_PAUSE: Duration = Duration::from_millis(250);

/// The gateway's handle on the admin thread.
#[derive(Debug)]
pub(crate) struct AdminHandle {
    stop: Arc<AtomicBool>,
    waker: Waker,
    thread: JoinHandle<()>,
}

impl AdminHandle {
    /// Stops the thread and waits for it (it closes its connections first).
    pub(crate) fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            error!("cannot wake the admin thread: {e}");
        }
        if self.thread.join().is_err() {
            error!("the admin thread panicked");
        }
    }
}

/// Binds the admin listener (so a busy port is a start-up error).
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
}

/// Starts the admin thread on `listener`.
pub(crate) fn spawn(mut listener: TcpListener, sources: Sources) -> Result<AdminHandle> {
    let poll = Poll::new().map_err(Error::io("create the admin poll"))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(Error::io("register the admin listener"))?;
    let waker = Waker::new(poll.registry(), WAKER).map_err(Error::io("create the admin waker"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let admin = Admin {
        poll,
        listener,
        conns: Vec::new(),
        stop: Arc::clone(&stop),
        sources,
        paused_until: None,
    };
    let thread = thread::Builder::new()
        .name("wsgate-admin".to_owned())
        .spawn(move || admin.run())
        .map_err(Error::io("spawn the admin thread"))?;
    Ok(AdminHandle {
        stop,
        waker,
        thread,
    })
}

#[derive(Debug)]
struct Admin {
    poll: Poll,
    listener: TcpListener,
    /// Connections by token; `None` slots are free.
    conns: Vec<Option<Conn>>,
    stop: Arc<AtomicBool>,
    sources: Sources,
    /// Accepting is paused until then after an accept error.
    paused_until: Option<Instant>,
}

/// One admin connection.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    opened: Instant,
    /// When the current phase must be over.
    deadline: Instant,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// Reading the request head.
    Reading(Vec<u8>),
    /// Writing the response.
    Writing { bytes: Vec<u8>, written: usize },
    /// Response sent and write side shut: discarding input until the peer closes.
    Lingering { discarded: usize },
}

impl Admin {
    /// The main loop: wait for connections, bytes or a deadline; serve.
    fn run(mut self) {
        match self.listener.local_addr() {
            Ok(addr) => info!("admin server on http://{addr}/"),
            Err(e) => info!("admin server up (address unknown: {e})"),
        }
        let mut events = Events::with_capacity(64);
        while !self.stop.load(Ordering::SeqCst) {
            let now = Instant::now();
            let next = self
                .conns
                .iter()
                .flatten()
                .map(|c| c.deadline)
                .chain(self.paused_until)
                .min()
                .map_or(TICK, |at| at.saturating_duration_since(now).min(TICK));
            if let Err(e) = self.poll.poll(&mut events, Some(next)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!("admin poll failed: {e}");
                    break;
                }
            }
            for event in &events {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(token) => self.serve(token - FIRST_CONN),
                }
            }
            self.expire(Instant::now());
            if self.paused_until.is_some_and(|at| at <= Instant::now()) {
                self.paused_until = None;
                self.accept();
            }
        }
        let open = self.conns.iter().flatten().count();
        for index in 0..self.conns.len() {
            self.close(index);
        }
        info!("admin server stopped ({open} connections closed)");
    }

    /// Accepts until `WouldBlock`, making room by closing the connection that
    /// has waited longest for its request when every slot is taken.
    fn accept(&mut self) {
        if self.paused_until.is_some() {
            return;
        }
        loop {
            let (stream, peer) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("admin accept failed: {e}; pausing accepts");
                    self.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
            };
            let Some(index) = self.free_slot() else {
                debug!("admin: {peer} refused: {MAX_CONNECTIONS} connections busy writing");
                continue; // dropped: closed
            };
            self.open(index, stream, peer);
        }
    }

    /// A free connection slot, evicting the oldest connection still reading
    /// its request if all [`MAX_CONNECTIONS`] are taken.
    fn free_slot(&mut self) -> Option<usize> {
        if let Some(free) = self.conns.iter().position(Option::is_none) {
            return Some(free);
        }
        if self.conns.len() < MAX_CONNECTIONS {
            self.conns.push(None);
            return Some(self.conns.len() - 1);
        }
        let oldest = self
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .filter(|(_, c)| matches!(c.phase, Phase::Reading(_)))
            .min_by_key(|(_, c)| c.opened)
            .map(|(i, _)| i)?;
        if let Some(c) = &self.conns[oldest] {
            debug!("admin: {} closed to make room (no request yet)", c.peer);
        }
        self.close(oldest);
        Some(oldest)
    }

    fn open(&mut self, index: usize, mut stream: TcpStream, peer: SocketAddr) {
        let token = Token(index + FIRST_CONN);
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            debug!("admin: {peer}: cannot register: {e}");
            return;
        }
        let now = Instant::now();
        self.conns[index] = Some(Conn {
            stream,
            peer,
            opened: now,
            deadline: now + REQUEST_TIMEOUT,
            phase: Phase::Reading(Vec::new()),
        });
        // Bytes may have arrived with the connection: edge-triggered
        // readiness would not report them again.
        self.serve(index);
    }

    /// Moves a connection along as far as its socket allows.
    fn serve(&mut self, index: usize) {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        let done = match drive(conn, &self.sources) {
            Ok(done) => done,
            Err(e) => {
                debug!("admin: {}: {e}", conn.peer);
                true
            }
        };
        if done {
            self.close(index);
        }
    }

    /// Closes connections whose phase outlived its deadline.
    fn expire(&mut self, now: Instant) {
        for index in 0..self.conns.len() {
            if let Some(conn) = &self.conns[index] {
                if conn.deadline <= now {
                    if matches!(conn.phase, Phase::Reading(_)) {
                        debug!(
                            "admin: {} closed: no request within the deadline",
                            conn.peer
                        );
                    }
                    self.close(index);
                }
            }
        }
    }

    fn close(&mut self, index: usize) {
        if let Some(mut conn) = self.conns.get_mut(index).and_then(Option::take) {
            if let Err(e) = self.poll.registry().deregister(&mut conn.stream) {
                debug!("admin: {}: deregister failed: {e}", conn.peer);
            }
        }
    }
}

/// Reads, answers and lingers until the socket would block; true when the
/// connection is finished.
fn drive(conn: &mut Conn, sources: &Sources) -> io::Result<bool> {
    loop {
        match &mut conn.phase {
            Phase::Reading(head) => {
                let mut chunk = [0u8; 2048];
                let n = match conn.stream.read(&mut chunk) {
                    Ok(0) => return Ok(true),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                head.extend_from_slice(&chunk[..n]);
                let Some(reply) = parse(head, sources) else {
                    continue;
                };
                debug!(
                    "admin: {} answered {} ({} bytes)",
                    conn.peer,
                    reply.status,
                    reply.body.len()
                );
                conn.phase = Phase::Writing {
                    bytes: reply.bytes(),
                    written: 0,
                };
                conn.deadline = Instant::now() + RESPONSE_TIMEOUT;
            }
            Phase::Writing { bytes, written } => {
                match conn.stream.write(&bytes[*written..]) {
                    Ok(0) => return Ok(true),
                    Ok(n) => *written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                if *written == bytes.len() {
                    conn.stream.shutdown(std::net::Shutdown::Write)?;
                    conn.phase = Phase::Lingering { discarded: 0 };
                    conn.deadline = Instant::now() + LINGER;
                }
            }
            Phase::Lingering { discarded } => {
                let mut chunk = [0u8; 4096];
                match conn.stream.read(&mut chunk) {
                    Ok(0) => return Ok(true),
                    Ok(n) => {
                        *discarded += n;
                        if *discarded > LINGER_BYTES {
                            return Ok(true);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// The reply to a request head, once it is complete (or known to be bad).
fn parse(head: &[u8], sources: &Sources) -> Option<Reply> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            Some(Reply::text(431, "request header fields too large\n"))
        }
        Ok(httparse::Status::Complete(_)) => {
            let method = request.method.unwrap_or("");
            let path = request.path.unwrap_or("");
            let authorization = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("authorization"))
                .and_then(|h| std::str::from_utf8(h.value).ok());
            Some(routes::route(method, path, authorization, sources))
        }
        Ok(httparse::Status::Partial) if head.len() > MAX_HEAD => {
            Some(Reply::text(431, "request header fields too large\n"))
        }
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => {
            Some(Reply::text(431, "request header fields too large\n"))
        }
        Err(_) => Some(Reply::text(400, "bad request\n")),
    }
}
