//! The acceptor thread: accept TCP connections and complete HTTP upgrades.
//!
//! One `mio::Poll` drives the listener and every connection still in its
//! upgrade: requests are read as bytes arrive (never blocking on a slow peer),
//! bounded in size and in time, answered with 101 or an HTTP error status, and
//! upgraded sockets go to the manager with any bytes read past the request.
//!
//! Admission is counted from accept: each connection takes a seat
//! (`control/seat.rs`) against its address before it has sent a byte, so one
//! address cannot hold more handshakes than it may hold clients. Pending
//! handshakes are capped; at the cap, or when the process is out of file
//! descriptors, the oldest is closed to make room, so a flood of half-sent
//! requests delays a well-behaved client by no more than its own handshake.
//! Request parsing lives in `upgrade.rs`; what happens after the upgrade
//! lives in `fanout/manager.rs` and `delivery/writer.rs`.
//!
//! With `tls_cert` (feature `tls`), each connection speaks TLS first: its
//! rustls session is driven by the same readiness events (`wire/tls.rs`),
//! the request is read and the reply written through it, and the session
//! goes with the socket to the client's writer. The handshake counts
//! against the same deadline and the same pending-handshake cap as the
//! request. Its costly part (a key exchange and a signature, for the
//! ClientHello) is spent here while few connections are pending, and on
//! the TLS handshake threads (`handshake.rs`, `tls_threads`) when many
//! are, as in a storm of reconnects: this thread then reads a handshaking
//! client's records into its session and hands the session over until it
//! has sent its first flight, and goes on with the connection when it
//! comes back. Never on a lobby or a writer. With `tls_threads = 0` it is
//! all spent here.

#[cfg(feature = "auth")]
use std::collections::HashMap;
use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;
use log::{debug, error, info, warn};
use mio::{
    Events, Interest, Poll, Token, Waker,
    net::{TcpListener, TcpStream},
};

use crate::{
    config::Config,
    control::{
        inbox::{Admission, ManagerMsg},
        seat::{RouteLimits, Seat, Seats},
        shutdown::ShutdownHandle,
        supervise::EndGuard,
    },
    edge::{
        sys,
        upgrade::{self, Endpoint, HeadScan, Parsed, Rejection, Route},
    },
    error::{Error, Result},
    id::{Group, RouteId},
    stats::{Stats, bump, drop_one},
};
#[cfg(feature = "auth")]
use crate::{
    edge::auth::{
        self, RouteAuth,
        ask::{Asked, Asking},
        cache::Yes,
    },
    stats::{AuthCounts, AuthResult},
};
#[cfg(feature = "tls")]
use crate::{
    edge::{
        handshake::{Done, Handshakers, Job},
        tls::{ServerTls, failure as tls_failure, suite as tls_suite},
    },
    stats::TlsFailure,
    wire::tls,
};

const LISTENER: Token = Token(usize::MAX - 1);
/// The second listener's, serving `wss://` beside a plain one.
#[cfg(feature = "tls")]
const TLS_LISTENER: Token = Token(usize::MAX - 2);
const WAKER: Token = Token(usize::MAX);
/// How long accepting pauses when accepting fails for want of resources
/// (descriptors with no handshake to shed, kernel memory), instead of spinning.
const ACCEPT_PAUSE: Duration = Duration::from_millis(250);
/// Connections accepted per turn of the loop, so handshakes in progress are
/// served between bursts of new connections.
const ACCEPTS_PER_TURN: usize = 256;
/// Bytes read from a handshaking socket at a time.
const READ_CHUNK: usize = 4096;
/// Pending connections from which ClientHellos go to the TLS handshake
/// threads. With fewer, the acceptor has time for them, and a hand-over
/// would cost more than it spreads: two thread wakeups, 30-60 us a
/// handshake here (README, wss:// for clients).
#[cfg(feature = "tls")]
const HAND_OVER_FROM: usize = 8;

/// The gateway's handle on the acceptor thread.
#[derive(Debug)]
pub(crate) struct AcceptorHandle {
    thread: JoinHandle<()>,
}

impl AcceptorHandle {
    /// Waits for the thread to end.
    pub(crate) fn join(self) {
        if self.thread.join().is_err() {
            error!("the acceptor thread panicked");
        }
    }
}

/// An acceptor ready to run: its poll and listener set up, so the handle
/// that stops it exists before any other thread starts.
#[derive(Debug)]
pub(crate) struct Prepared {
    acceptor: Acceptor,
    /// Where its commands come from (see [`AcceptorMsg`]).
    pub commands: Sender<AcceptorMsg>,
}

/// A route as the acceptor serves it: its settings, and who may connect.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    pub id: RouteId,
    pub config: Config,
    /// Its authentication, loaded by the gateway (keys read from files).
    #[cfg(feature = "auth")]
    pub auth: Option<Arc<RouteAuth>>,
}

/// The acceptor's inbox (read whenever its waker wakes it).
#[derive(Debug)]
pub(crate) enum AcceptorMsg {
    /// A reload: serve these routes, and admit by this configuration's
    /// gateway-wide limits from now on.
    Reload {
        config: Box<Config>,
        routes: Vec<Served>,
        /// Start new connections' TLS from this (`None`: plain `ws://`).
        #[cfg(feature = "tls")]
        tls: Option<ServerTls>,
    },
}

/// Sets up the acceptor on an already bound listener; returns it with the
/// handle that stops it (and with it the gateway).
pub(crate) fn prepare(
    mut listener: TcpListener,
    config: &Config,
    routes: &[Served],
    stats: Arc<Stats>,
) -> Result<(Prepared, ShutdownHandle)> {
    let poll = Poll::new().map_err(Error::io("create the acceptor poll"))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(Error::io("register the listener"))?;
    let waker =
        Waker::new(poll.registry(), WAKER).map_err(Error::io("create the acceptor waker"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let shutdown = ShutdownHandle::new(Arc::clone(&stop), waker, Arc::clone(&stats));
    let mut seats = Seats::new(config, Arc::clone(&stats));
    for route in routes {
        seats.set_route(route.id, RouteLimits::new(&route.config));
    }
    let (commands, inbox) = crossbeam_channel::unbounded();
    let acceptor = Acceptor {
        poll,
        listener,
        stop,
        inbox,
        manager: None,
        seats,
        #[cfg(feature = "auth")]
        asking: Asking::new(
            config.auth_threads,
            config.auth_queue,
            shutdown.clone(),
            Arc::clone(&stats),
        ),
        #[cfg(feature = "auth")]
        auth_counts: auth_counts(routes, &stats),
        #[cfg(feature = "tls")]
        tls: None,
        #[cfg(feature = "tls")]
        tls_listener: None,
        #[cfg(feature = "tls")]
        handshaking: Handshaking {
            pool: None,
            threads: config.tls_threads,
            nice: config.acceptor_nice,
            wake: shutdown.clone(),
        },
        stats,
        endpoints: routes.iter().map(endpoint).collect(),
        allowed_origins: config.allowed_origins.clone(),
        max_request_bytes: config.max_request_bytes,
        handshake_timeout: config.handshake_timeout,
        nice: config.acceptor_nice,
        max_pending: pending_cap(config.max_pending_handshakes),
        send_buffer: config.client_send_buffer,
        unsent: config.client_unsent,
        conns: Vec::new(),
        free: Vec::new(),
        pending: 0,
        deadlines: VecDeque::new(),
        next_serial: 0,
        paused_until: None,
        accept_more: false,
    };
    Ok((Prepared { acceptor, commands }, shutdown))
}

impl Prepared {
    /// Serves clients over TLS from this configuration on (`None`: plain).
    #[cfg(feature = "tls")]
    pub(crate) fn serve_tls(&mut self, tls: Option<ServerTls>) {
        self.acceptor.tls = tls;
    }

    /// Serves `wss://` on `listener`, an already bound second listener,
    /// and plain `ws://` on the first.
    #[cfg(feature = "tls")]
    pub(crate) fn listen_tls(&mut self, mut listener: TcpListener) -> Result<()> {
        self.acceptor
            .poll
            .registry()
            .register(&mut listener, TLS_LISTENER, Interest::READABLE)
            .map_err(Error::io("register the wss:// listener"))?;
        self.acceptor.tls_listener = Some(listener);
        Ok(())
    }
}

/// Starts the prepared acceptor, which hands upgraded clients to `manager`.
pub(crate) fn spawn(prepared: Prepared, manager: Sender<ManagerMsg>) -> Result<AcceptorHandle> {
    let mut acceptor = prepared.acceptor;
    let guard = EndGuard::acceptor(manager.clone(), Arc::clone(&acceptor.stats));
    acceptor.manager = Some(manager);
    let thread = thread::Builder::new()
        .name("wsgate-acceptor".to_owned())
        .spawn(move || {
            let _guard = guard;
            if acceptor.nice > 0 {
                match sys::lower_thread_priority(acceptor.nice) {
                    Ok(nice) => info!("acceptor runs at nice {nice}"),
                    Err(e) => warn!("acceptor: cannot lower its priority: {e}"),
                }
            }
            acceptor.run();
        })
        .map_err(Error::io("spawn the acceptor thread"))?;
    Ok(AcceptorHandle { thread })
}

/// The client-facing rules of a route's settings.
fn endpoint(served: &Served) -> Endpoint {
    let route = &served.config;
    Endpoint {
        route: served.id,
        path: route.path.clone(),
        subprotocols: route.subprotocols.clone(),
        require_subprotocol: route.require_subprotocol,
        query_params: route.pass_query.then(|| route.query_params.clone()),
        compression: route.compression,
        #[cfg(feature = "sse")]
        sse_retry: route.sse_retry,
        #[cfg(feature = "auth")]
        auth: served.auth.clone(),
    }
}

/// Each route's authentication counts, by route id.
#[cfg(feature = "auth")]
fn auth_counts(routes: &[Served], stats: &Stats) -> HashMap<RouteId, Arc<AuthCounts>> {
    routes
        .iter()
        .map(|r| (r.id, stats.auth_routes.of(&r.config.path)))
        .collect()
}

/// The answer being written to a handshaking connection.
#[derive(Debug)]
struct Reply {
    bytes: Vec<u8>,
    written: usize,
    /// For an upgrade: what the client goes to the manager with.
    upgrade: Option<Upgrade>,
}

/// An upgrade the request asked for and every check allowed.
#[derive(Debug)]
struct Upgrade {
    /// The 101 response.
    response: Vec<u8>,
    /// Where the WebSocket bytes start in the request buffer.
    consumed: usize,
    /// The lobbies the client may join.
    group: Group,
    /// It negotiated permessage-deflate.
    deflate: bool,
    /// A Server-Sent Events stream (answered 200), not a WebSocket.
    sse: bool,
    /// A WebSocket client that opted into resume envelopes.
    envelope: bool,
    /// The message ID an SSE or resume client resumes after.
    after: Option<u64>,
    /// When its access ends, in seconds since the Unix epoch, if it does.
    expires: Option<u64>,
}

/// A connection in its upgrade.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
    scan: HeadScan,
    reply: Option<Reply>,
    /// An upgrade waiting for the auth service's answer.
    #[cfg(feature = "auth")]
    asking: Option<Upgrade>,
    /// Its claim on the gateway's capacity (given back when it is dropped).
    seat: Seat,
    serial: u64,
    /// Its TLS session, on a TLS listener (`None` while it is away on a
    /// handshake thread).
    #[cfg(feature = "tls")]
    tls: Option<tls::Session>,
    /// Its session is on a handshake thread.
    #[cfg(feature = "tls")]
    away: bool,
    /// Its session has sent its first flight (the costly part of its
    /// handshake is done): the rest is processed here.
    #[cfg(feature = "tls")]
    answered: bool,
}

impl Conn {
    /// Reads request bytes into `buf`: from the socket, or through the TLS
    /// session (which first completes its handshake, counted in `stats`).
    fn read_some(&mut self, buf: &mut [u8], stats: &Stats) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(session) = self.tls.as_deref_mut() {
            let handshaking = session.is_handshaking();
            let read = tls::read(session, &mut self.stream, buf);
            // A handshake that completed in this call is counted as such,
            // whatever came after it (a client that sends its Finished and
            // closes at once, say).
            if handshaking && !session.is_handshaking() {
                handshake_done(session, stats);
            } else if handshaking {
                match &read {
                    Err(e) if !is_retry(e) => handshake_failed(stats, self.peer, e),
                    Ok(0) => handshake_abandoned(stats, self.peer),
                    _ => {}
                }
            }
            return read;
        }
        let _ = stats;
        self.stream.read(buf)
    }

    /// Whether the connection waits on another thread: for the auth
    /// service's answer (what it sends meanwhile stays in the socket for its
    /// writer), or for its session, away on a handshake thread (what it
    /// sends meanwhile stays in the socket until the session is back).
    fn is_elsewhere(&self) -> bool {
        #[cfg(feature = "auth")]
        if self.asking.is_some() {
            return true;
        }
        #[cfg(feature = "tls")]
        if self.away {
            return true;
        }
        false
    }

    /// Whether the connection is still in its TLS handshake.
    fn is_tls_handshaking(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.away || self.tls.as_ref().is_some_and(|s| s.is_handshaking());
        #[cfg(not(feature = "tls"))]
        false
    }

    /// Ends the connection's TLS session, if it has one, as far as the
    /// socket takes it (`close_notify`), before the socket is shut.
    fn close_tls(&mut self) {
        #[cfg(feature = "tls")]
        if let Some(session) = self.tls.as_deref_mut() {
            session.send_close_notify();
            let _ = tls::flush(session, &mut self.stream);
        }
    }
}

/// Counts and logs a TLS handshake that failed with `e`.
#[cfg(feature = "tls")]
fn handshake_failed(stats: &Stats, peer: SocketAddr, e: &io::Error) {
    let reason = tls_failure(e);
    bump(&stats.tls_handshakes_failed);
    bump(&stats.tls_handshake_failures[reason as usize]);
    debug!("{peer}: TLS handshake failed ({}): {e}", reason.name());
}

/// Counts and logs a TLS handshake its client closed.
#[cfg(feature = "tls")]
fn handshake_abandoned(stats: &Stats, peer: SocketAddr) {
    bump(&stats.tls_handshakes_failed);
    bump(&stats.tls_handshake_failures[TlsFailure::Eof as usize]);
    debug!("{peer}: TLS handshake abandoned by the client");
}

/// Counts a TLS handshake just completed (its version and suite) and caps
/// what its session buffers from now on.
#[cfg(feature = "tls")]
fn handshake_done(session: &mut rustls::ServerConnection, stats: &Stats) {
    bump(&stats.tls_handshakes_ok);
    if let Some(suite) = tls_suite(session) {
        bump(&stats.tls_cipher_suites[suite]);
    }
    match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => bump(&stats.tls_handshakes_tls13),
        Some(rustls::ProtocolVersion::TLSv1_2) => bump(&stats.tls_handshakes_tls12),
        _ => {}
    }
    tls::limit(session);
}

/// The TLS handshake threads, started with the first hand-over.
#[cfg(feature = "tls")]
#[derive(Debug)]
struct Handshaking {
    pool: Option<Handshakers>,
    /// Threads to start (`tls_threads`); 0 once starting them failed, or
    /// every one has ended: handshakes then run on the acceptor.
    threads: usize,
    nice: u8,
    /// Wakes the acceptor when a session comes back.
    wake: ShutdownHandle,
}

#[cfg(feature = "tls")]
impl Handshaking {
    /// Whether handshakes go to the threads (started now if need be).
    fn active(&mut self) -> bool {
        if self.pool.is_none() && self.threads > 0 {
            match Handshakers::spawn(self.threads, self.nice, self.wake.clone()) {
                Ok(pool) => {
                    info!("{} TLS handshake threads started", self.threads);
                    self.pool = Some(pool);
                }
                Err(e) => {
                    error!("{e}; TLS handshakes run on the acceptor");
                    self.threads = 0;
                }
            }
        }
        self.pool.is_some()
    }

    /// Hands `job` to the threads; gives it back if none is left (the
    /// acceptor then does the handshakes from now on).
    fn send(&mut self, job: Job) -> std::result::Result<(), Job> {
        let sent = match &self.pool {
            Some(pool) => pool.send(job),
            None => Err(job),
        };
        if sent.is_err() && self.pool.take().is_some() {
            error!("the TLS handshake threads have ended; TLS handshakes run on the acceptor");
            self.threads = 0;
        }
        sent
    }
}

/// Errors after which reading may go on (the socket is drained, or a
/// signal interrupted the call).
#[cfg(feature = "tls")]
fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// What to do with a connection after it made progress.
enum Step {
    Wait,
    Admit(Upgrade),
    Close(&'static str),
}

#[derive(Debug)]
struct Acceptor {
    poll: Poll,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    inbox: crossbeam_channel::Receiver<AcceptorMsg>,
    /// Where upgraded clients go; set when the thread starts.
    manager: Option<Sender<ManagerMsg>>,
    seats: Seats,
    /// Upgrades waiting for auth services, and their answers.
    #[cfg(feature = "auth")]
    asking: Asking,
    #[cfg(feature = "auth")]
    auth_counts: HashMap<RouteId, Arc<AuthCounts>>,
    /// What new connections' TLS sessions start from, on a TLS listener.
    #[cfg(feature = "tls")]
    tls: Option<ServerTls>,
    /// A second listener serving `wss://` (`tls_listen`): `listener` is
    /// then plain.
    #[cfg(feature = "tls")]
    tls_listener: Option<TcpListener>,
    /// Where handshakes spend their CPU.
    #[cfg(feature = "tls")]
    handshaking: Handshaking,
    stats: Arc<Stats>,
    /// The paths served, with their routes' client-facing rules.
    endpoints: Vec<Endpoint>,
    allowed_origins: Vec<String>,
    max_request_bytes: usize,
    handshake_timeout: Duration,
    /// Added to this thread's nice value when it starts (`acceptor_nice`).
    nice: u8,
    max_pending: usize,
    /// `SO_SNDBUF` for client sockets; 0 leaves the kernel's autotuning.
    send_buffer: usize,
    /// `TCP_NOTSENT_LOWAT` for client sockets; 0 leaves the kernel default.
    unsent: usize,
    /// Slab of handshaking connections; the index is the poll token.
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Connections in the slab.
    pending: usize,
    /// Handshake deadlines in the order they fall (all have the same
    /// timeout), hence also the connections from oldest to newest.
    deadlines: VecDeque<(Instant, usize, u64)>,
    next_serial: u64,
    /// Set while accepting is paused for want of resources.
    paused_until: Option<Instant>,
    /// The last turn stopped accepting before the listener was drained.
    accept_more: bool,
}

impl Acceptor {
    /// The main loop: accept, advance handshakes, expire the slow ones.
    fn run(mut self) {
        match self.listener.local_addr() {
            Ok(addr) => info!("listening on {addr}"),
            Err(e) => info!("listening (address unknown: {e})"),
        }
        #[cfg(feature = "tls")]
        if let Some(Ok(addr)) = self.tls_listener.as_ref().map(TcpListener::local_addr) {
            info!("listening for wss:// on {addr}");
        }
        let mut events = Events::with_capacity(256);
        while !self.stop.load(Ordering::SeqCst) {
            let timeout = self.timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    // No client can be accepted any more: the gateway stops
                    // on a fatal failure (its end reaches the manager).
                    bump(&self.stats.fatal_errors);
                    error!("acceptor poll failed: {e}; shutting the gateway down");
                    break;
                }
            }
            #[cfg(feature = "fault-injection")]
            self.stats.faults.check(crate::fault::Fault::Acceptor);
            for event in &events {
                match event.token() {
                    LISTENER => self.accept_more = true,
                    #[cfg(feature = "tls")]
                    TLS_LISTENER => self.accept_more = true,
                    WAKER => {
                        self.take_commands();
                        #[cfg(feature = "auth")]
                        self.take_answers();
                        #[cfg(feature = "tls")]
                        self.take_handshakes();
                    }
                    Token(index) => self.advance(index),
                }
            }
            if self.paused_until.is_some_and(|at| at <= Instant::now()) {
                self.paused_until = None;
                self.accept_more = true;
            }
            if self.accept_more && self.paused_until.is_none() {
                self.accept_some();
            }
            self.expire();
        }
        info!("listener closed");
    }

    fn take_commands(&mut self) {
        while let Ok(AcceptorMsg::Reload {
            config,
            routes,
            #[cfg(feature = "tls")]
            tls,
        }) = self.inbox.try_recv()
        {
            #[cfg(feature = "tls")]
            {
                self.tls = tls;
            }
            self.seats.set_limits(&config);
            for route in &routes {
                self.seats
                    .set_route(route.id, RouteLimits::new(&route.config));
            }
            #[cfg(feature = "auth")]
            {
                self.auth_counts = auth_counts(&routes, &self.stats);
            }
            self.endpoints = routes.iter().map(endpoint).collect();
            self.allowed_origins.clone_from(&config.allowed_origins);
            self.max_request_bytes = config.max_request_bytes;
            self.handshake_timeout = config.handshake_timeout;
            self.max_pending = pending_cap(config.max_pending_handshakes);
            self.send_buffer = config.client_send_buffer;
            self.unsent = config.client_unsent;
            debug!("acceptor: now serving {} routes", self.endpoints.len());
        }
    }

    fn timeout(&self) -> Option<Duration> {
        if self.accept_more && self.paused_until.is_none() {
            return Some(Duration::ZERO);
        }
        #[cfg(feature = "auth")]
        let asking = self.asking.next_deadline();
        #[cfg(not(feature = "auth"))]
        let asking = None;
        let next = self
            .deadlines
            .front()
            .map(|(at, ..)| *at)
            .into_iter()
            .chain(self.paused_until)
            .chain(asking)
            .min()?;
        Some(next.saturating_duration_since(Instant::now()))
    }

    /// Accepts up to a turn's worth of connections from each listener, so
    /// a flood on one does not starve the other; `accept_more` says
    /// whether a listener may still hold some.
    fn accept_some(&mut self) {
        #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
        let mut drained = self.accept_from(false);
        #[cfg(feature = "tls")]
        if self.tls_listener.is_some() && self.paused_until.is_none() {
            drained &= self.accept_from(true);
        }
        if drained {
            self.accept_more = false;
        }
    }

    /// Accepts from the first listener, or (`second`) the `wss://` one;
    /// whether it is drained.
    fn accept_from(&mut self, second: bool) -> bool {
        for _ in 0..ACCEPTS_PER_TURN {
            #[cfg(feature = "tls")]
            let (accepted, secure) = match &self.tls_listener {
                Some(tls) if second => (tls.accept(), true),
                Some(_) => (self.listener.accept(), false),
                None => (self.listener.accept(), self.tls.is_some()),
            };
            #[cfg(not(feature = "tls"))]
            let (accepted, secure) = (self.listener.accept(), second);
            match accepted {
                Ok((stream, peer)) => self.add(stream, peer, secure),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if is_out_of_descriptors(&e) => {
                    // Close the oldest handshake to free a descriptor for
                    // the connection waiting; pause only if there is none.
                    if !self.shed_oldest("out of file descriptors") {
                        self.pause("out of file descriptors, none held by a handshake", &e);
                        return false;
                    }
                }
                Err(e) if is_transient(&e) => debug!("accept failed: {e}"),
                Err(e) => {
                    self.pause("accept failed", &e);
                    return false;
                }
            }
        }
        false
    }

    fn pause(&mut self, why: &str, e: &io::Error) {
        warn!(
            "{why} ({e}); pausing accepts for {} ms",
            ACCEPT_PAUSE.as_millis()
        );
        self.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
    }

    /// Takes a connection just accepted; `secure`: it speaks TLS first.
    fn add(&mut self, mut stream: TcpStream, peer: SocketAddr, secure: bool) {
        let seat = match self.seats.take(peer.ip()) {
            Ok(seat) => seat,
            Err(refusal) => {
                let rejection = Rejection::from(refusal);
                // Refused before reading a byte: one small write to a fresh
                // socket, which has room for it, then close.
                bump(&self.stats.handshakes_rejected);
                debug!(
                    "{peer}: refused with {}: {}",
                    rejection.status, rejection.why
                );
                // A TLS client cannot read an answer before its handshake:
                // it is closed without one.
                if secure {
                    return;
                }
                let _ = stream.write(&rejection.response());
                return;
            }
        };
        if self.pending >= self.max_pending {
            self.shed_oldest("too many pending handshakes");
        }
        #[cfg(feature = "tls")]
        let tls = match self.tls.as_ref().filter(|_| secure).map(ServerTls::session) {
            None => None,
            Some(Ok(session)) => Some(session),
            Some(Err(e)) => {
                error!("{peer}: cannot start a TLS session: {e}");
                return;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!("{peer}: cannot set TCP_NODELAY: {e}");
        }
        if let Err(e) = sys::limit_send_buffers(&stream, self.send_buffer, self.unsent) {
            debug!("{peer}: cannot limit the socket's send buffering: {e}");
        }
        let index = self.free.pop().unwrap_or(self.conns.len());
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(index), interest)
        {
            debug!("{peer}: cannot register: {e}");
            self.free.push(index);
            return;
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        if index == self.conns.len() {
            self.conns.push(None);
        }
        self.conns[index] = Some(Conn {
            stream,
            peer,
            buf: Vec::new(),
            scan: HeadScan::default(),
            reply: None,
            #[cfg(feature = "auth")]
            asking: None,
            seat,
            serial,
            #[cfg(feature = "tls")]
            tls,
            #[cfg(feature = "tls")]
            away: false,
            #[cfg(feature = "tls")]
            answered: false,
        });
        self.pending += 1;
        bump(&self.stats.handshakes_pending);
        self.deadlines
            .push_back((Instant::now() + self.handshake_timeout, index, serial));
        self.advance(index);
    }

    /// Reads the request or writes the reply, as far as the socket allows.
    fn advance(&mut self, index: usize) {
        // A request is judged by the configuration of the moment it is
        // read: a client that connects once a reload has returned must not
        // meet the routes and keys it replaced, even when it is accepted in
        // the same turn as the client before it, before this turn's wakeup.
        self.take_commands();
        let Some(Some(conn)) = self.conns.get(index) else {
            return;
        };
        if conn.is_elsewhere() {
            return;
        }
        #[cfg(feature = "tls")]
        if !conn.answered && conn.tls.as_ref().is_some_and(|s| s.is_handshaking()) {
            if let Some(step) = self.hand_over(index) {
                self.after(index, step);
                return;
            }
        }
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        let step = match conn.reply {
            None => self.read_request(index),
            Some(_) => write_reply(conn),
        };
        self.after(index, step);
    }

    /// Acts on what a connection's progress came to.
    fn after(&mut self, index: usize, step: Step) {
        match step {
            Step::Wait => {}
            Step::Close(why) => {
                if let Some(mut conn) = self.take(index) {
                    debug!("{}: handshake ended: {why}", conn.peer);
                    conn.close_tls();
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            Step::Admit(upgrade) => {
                let Some(mut conn) = self.take(index) else {
                    return;
                };
                #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
                let mut leftover = conn.buf.split_off(upgrade.consumed);
                #[cfg(feature = "tls")]
                if let Some(session) = conn.tls.as_deref_mut() {
                    // What the session decrypted past the request is the
                    // client's first WebSocket bytes (to its end: a drained
                    // session answers WouldBlock).
                    let _ = session.reader().read_to_end(&mut leftover);
                }
                let admission = Admission {
                    stream: conn.stream,
                    peer: conn.peer,
                    leftover,
                    seat: conn.seat,
                    group: upgrade.group,
                    deflate: upgrade.deflate,
                    sse: upgrade.sse,
                    envelope: upgrade.envelope,
                    after: upgrade.after,
                    expires: upgrade.expires,
                    #[cfg(feature = "tls")]
                    tls: conn.tls,
                };
                let sent = self
                    .manager
                    .as_ref()
                    .is_some_and(|m| m.send(ManagerMsg::Admit(admission)).is_ok());
                if !sent {
                    error!("the manager has ended; refusing {}", conn.peer);
                }
            }
        }
    }

    fn read_request(&mut self, index: usize) -> Step {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return Step::Wait;
        };
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            // Read one byte past the limit at most, enough to know it was exceeded.
            let room = (self.max_request_bytes + 1 - conn.buf.len()).min(READ_CHUNK);
            match conn.read_some(&mut chunk[..room], &self.stats) {
                Ok(0) => return Step::Close("peer closed before upgrading"),
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Step::Close("read error"),
            }
            if !conn.scan.should_parse(&conn.buf, self.max_request_bytes) {
                continue;
            }
            let route = Route {
                endpoints: &self.endpoints,
                allowed_origins: &self.allowed_origins,
                max_bytes: self.max_request_bytes,
                #[cfg(feature = "auth")]
                now: auth::now_unix(),
            };
            let parsed = upgrade::parse_route(&conn.buf, &route);
            let upgrade = match parsed {
                Parsed::Incomplete => continue,
                Parsed::Reject(rejection) => {
                    if rejection.status == 403 && rejection.auth.is_none() {
                        bump(&self.stats.refused_origin);
                    }
                    return self.refuse(index, rejection);
                }
                #[cfg(feature = "sse")]
                Parsed::Answer(answer) => return self.answer(index, answer),
                Parsed::Upgrade {
                    response,
                    consumed,
                    route,
                    key,
                    deflate,
                    sse,
                    envelope,
                    after,
                    #[cfg(feature = "auth")]
                    grant,
                } => {
                    if sse || envelope {
                        debug!(
                            "{}: {}{}",
                            conn.peer,
                            if sse {
                                "event stream"
                            } else {
                                "resume envelopes"
                            },
                            if after.is_some() { ", resuming" } else { "" }
                        );
                    }
                    let upgrade = Upgrade {
                        response,
                        consumed,
                        group: Group { route, key },
                        deflate,
                        sse,
                        envelope,
                        after,
                        #[cfg(feature = "auth")]
                        expires: grant.expires,
                        #[cfg(not(feature = "auth"))]
                        expires: None,
                    };
                    #[cfg(feature = "auth")]
                    if let Some(question) = grant.ask {
                        return self.ask(index, upgrade, question);
                    }
                    #[cfg(feature = "auth")]
                    if self
                        .endpoint(upgrade.group.route)
                        .is_some_and(|e| e.auth.is_some())
                    {
                        self.count_auth(upgrade.group.route, AuthResult::Ok);
                    }
                    upgrade
                }
            };
            return self.upgrade(index, upgrade);
        }
    }

    /// Takes a client's seat for an upgrade every check allowed, and
    /// starts writing its 101 (or the refusal of a limit).
    fn upgrade(&mut self, index: usize, mut upgrade: Upgrade) -> Step {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return Step::Wait;
        };
        match self.seats.claim_client(&mut conn.seat, &upgrade.group) {
            Ok(()) => {
                conn.reply = Some(Reply {
                    bytes: std::mem::take(&mut upgrade.response),
                    written: 0,
                    upgrade: Some(upgrade),
                });
                write_reply(conn)
            }
            Err(refusal) => self.refuse(index, Rejection::from(refusal)),
        }
    }

    /// Starts writing a refusal; the connection closes after it.
    fn refuse(&mut self, index: usize, rejection: Rejection) -> Step {
        #[cfg(feature = "auth")]
        if let Some((route, result)) = rejection.auth {
            self.count_auth(route, result);
        }
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return Step::Wait;
        };
        bump(&self.stats.handshakes_rejected);
        debug!(
            "{}: refused with {}: {}",
            conn.peer, rejection.status, rejection.why
        );
        conn.reply = Some(Reply {
            bytes: rejection.response(),
            written: 0,
            upgrade: None,
        });
        write_reply(conn)
    }

    /// Answers a request that is not an upgrade (a CORS preflight) and
    /// closes the connection once the answer is out.
    #[cfg(feature = "sse")]
    fn answer(&mut self, index: usize, answer: Vec<u8>) -> Step {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return Step::Wait;
        };
        debug!("{}: answered a CORS preflight", conn.peer);
        conn.reply = Some(Reply {
            bytes: answer,
            written: 0,
            upgrade: None,
        });
        write_reply(conn)
    }

    /// The endpoint of `route`.
    #[cfg(feature = "auth")]
    fn endpoint(&self, route: RouteId) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.route == route)
    }

    #[cfg(feature = "auth")]
    fn count_auth(&self, route: RouteId, result: AuthResult) {
        match self.auth_counts.get(&route) {
            Some(counts) => self.stats.count_auth(counts, result),
            None => bump(&self.stats.auth[result as usize]),
        }
    }

    /// Puts an upgrade's question to its route's auth service (or its
    /// cache); the connection waits for the answer without being read.
    #[cfg(feature = "auth")]
    fn ask(&mut self, index: usize, upgrade: Upgrade, mut question: Box<auth::Question>) -> Step {
        let Some(Some(conn)) = self.conns.get(index) else {
            return Step::Wait;
        };
        question.peer = conn.peer.ip().to_string();
        let waiter = (index, conn.serial);
        let params = self
            .endpoint(upgrade.group.route)
            .and_then(|e| e.query_params.clone())
            .unwrap_or_default();
        let normalise = |q: &str| upgrade::lobby_key(q, &params);
        let route = upgrade.group.route;
        let asked = self.asking.ask(
            waiter,
            question,
            Instant::now(),
            auth::now_unix(),
            &normalise,
        );
        match asked {
            Ok(Asked::Cached(yes)) => self.answered(index, upgrade, Ok(yes)),
            Ok(Asked::Waiting) => {
                if let Some(Some(conn)) = self.conns.get_mut(index) {
                    conn.asking = Some(upgrade);
                }
                Step::Wait
            }
            Ok(Asked::Overloaded) => self.refuse(
                index,
                Rejection::auth(
                    route,
                    AuthResult::Overloaded,
                    503,
                    "too many upgrades await auth",
                ),
            ),
            Err(e) => {
                error!("cannot ask the auth service: {e}");
                self.refuse(
                    index,
                    Rejection::auth(route, AuthResult::Error, 503, "the auth service failed"),
                )
            }
        }
    }

    /// Finishes an upgrade that waited for its auth service.
    #[cfg(feature = "auth")]
    fn answered(
        &mut self,
        index: usize,
        mut upgrade: Upgrade,
        outcome: std::result::Result<Yes, auth::Denied>,
    ) -> Step {
        let route = upgrade.group.route;
        match outcome {
            Ok(yes) => {
                self.count_auth(route, AuthResult::Ok);
                upgrade.expires = match (upgrade.expires, yes.expires) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let listed = yes.allowed.as_ref().is_none_or(|list| {
                    let params = self
                        .endpoint(route)
                        .and_then(|e| e.query_params.clone())
                        .unwrap_or_default();
                    let path = self
                        .endpoint(route)
                        .map(|e| e.path.clone())
                        .unwrap_or_default();
                    auth::allows(list, &path, upgrade.group.key.as_ref(), &|q| {
                        upgrade::lobby_key(q, &params)
                    })
                });
                if !listed {
                    return self.refuse(
                        index,
                        Rejection::auth(
                            route,
                            AuthResult::Forbidden,
                            403,
                            "the auth service does not allow this route",
                        ),
                    );
                }
                self.upgrade(index, upgrade)
            }
            Err(denied) => self.refuse(
                index,
                Rejection::auth(route, denied.result, denied.status, denied.why),
            ),
        }
    }

    /// Gives waiting upgrades the answers that came.
    #[cfg(feature = "auth")]
    fn take_answers(&mut self) {
        for ((index, serial), outcome) in self.asking.answered(Instant::now(), auth::now_unix()) {
            self.resume(index, serial, outcome);
        }
    }

    /// Finishes waiter `(index, serial)`, if it is still there, with `outcome`.
    #[cfg(feature = "auth")]
    fn resume(
        &mut self,
        index: usize,
        serial: u64,
        outcome: std::result::Result<Yes, auth::Denied>,
    ) {
        let upgrade = match self.conns.get_mut(index) {
            Some(Some(conn)) if conn.serial == serial => conn.asking.take(),
            _ => None,
        };
        let Some(upgrade) = upgrade else {
            return;
        };
        let step = self.answered(index, upgrade, outcome);
        self.after(index, step);
    }

    /// Reads a handshaking connection's records into its session and hands
    /// the session to a handshake thread, until it has sent its first
    /// flight, while at least [`HAND_OVER_FROM`] connections are pending;
    /// `None` when fewer are, or there are no threads (the handshake then
    /// goes on here, through [`Conn::read_some`]).
    #[cfg(feature = "tls")]
    fn hand_over(&mut self, index: usize) -> Option<Step> {
        if self.pending < HAND_OVER_FROM || !self.handshaking.active() {
            return None;
        }
        let conn = self.conns.get_mut(index)?.as_mut()?;
        let session = conn.tls.as_deref_mut()?;
        match tls::receive(session, &mut conn.stream) {
            Ok(true) => {}
            Ok(false) => {
                handshake_abandoned(&self.stats, conn.peer);
                return Some(Step::Close("peer closed in its TLS handshake"));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(Step::Wait),
            Err(e) => {
                handshake_failed(&self.stats, conn.peer, &e);
                return Some(Step::Close("read error"));
            }
        }
        let job = Job {
            index,
            serial: conn.serial,
            session: conn.tls.take()?,
        };
        conn.away = true;
        if let Err(job) = self.handshaking.send(job) {
            let mut session = job.session;
            let result = tls::process(&mut session);
            self.handshake_back(Done {
                index,
                serial: job.serial,
                session,
                result,
            });
        }
        Some(Step::Wait)
    }

    /// Goes on with the connections whose sessions came back from the
    /// handshake threads.
    #[cfg(feature = "tls")]
    fn take_handshakes(&mut self) {
        let done: Vec<Done> = match &self.handshaking.pool {
            Some(pool) => pool.done().collect(),
            None => return,
        };
        for done in done {
            self.handshake_back(done);
        }
    }

    /// Puts a processed session back in its connection (dropped if the
    /// connection was closed meanwhile) and goes on with the connection.
    #[cfg(feature = "tls")]
    fn handshake_back(&mut self, done: Done) {
        let Some(Some(conn)) = self.conns.get_mut(done.index) else {
            return;
        };
        if conn.serial != done.serial {
            return;
        }
        let mut session = done.session;
        let step = match done.result {
            Err(e) => {
                handshake_failed(&self.stats, conn.peer, &e);
                Some(Step::Close("TLS handshake failed"))
            }
            Ok(()) => {
                if !session.is_handshaking() {
                    handshake_done(&mut session, &self.stats);
                }
                None
            }
        };
        conn.answered = session.wants_write();
        conn.tls = Some(session);
        conn.away = false;
        match step {
            Some(step) => self.after(done.index, step),
            None => self.advance(done.index),
        }
    }

    /// Removes a connection from the acceptor. Its seat goes with it: to the
    /// manager for an upgrade, or given back when the connection is dropped.
    fn take(&mut self, index: usize) -> Option<Conn> {
        let mut conn = self.conns.get_mut(index)?.take()?;
        #[cfg(feature = "auth")]
        self.asking.forget((index, conn.serial));
        if let Err(e) = self.poll.registry().deregister(&mut conn.stream) {
            debug!("{}: deregister failed: {e}", conn.peer);
        }
        self.free.push(index);
        self.pending -= 1;
        drop_one(&self.stats.handshakes_pending);
        // Handshakes mostly end in the order they began: drop the deadlines
        // of the connections already gone from the front, so the queue
        // holds about the pending handshakes, not every connection of the
        // last timeout's span (a reconnect storm's worth, kept as capacity).
        while let Some(&(_, i, serial)) = self.deadlines.front() {
            if matches!(self.conns.get(i), Some(Some(c)) if c.serial == serial) {
                break;
            }
            self.deadlines.pop_front();
        }
        Some(conn)
    }

    /// Closes the oldest pending handshake; false if there is none.
    fn shed_oldest(&mut self, why: &str) -> bool {
        while let Some((_, index, serial)) = self.deadlines.pop_front() {
            let is_same = matches!(&self.conns.get(index), Some(Some(c)) if c.serial == serial);
            if is_same {
                if let Some(conn) = self.take(index) {
                    bump(&self.stats.handshakes_shed);
                    debug!("{}: oldest pending handshake closed ({why})", conn.peer);
                    return true;
                }
            }
        }
        false
    }

    fn expire(&mut self) {
        let now = Instant::now();
        #[cfg(feature = "auth")]
        for (index, serial) in self.asking.expired(now) {
            let timeout = auth::Denied {
                result: AuthResult::Timeout,
                status: 503,
                why: "the auth service did not answer in time",
            };
            self.resume(index, serial, Err(timeout));
        }
        while let Some(&(at, index, serial)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            let is_same = matches!(&self.conns.get(index), Some(Some(c)) if c.serial == serial);
            if is_same {
                if let Some(conn) = self.take(index) {
                    bump(&self.stats.handshakes_timed_out);
                    if conn.is_tls_handshaking() {
                        bump(&self.stats.tls_handshakes_timed_out);
                        debug!("{}: TLS handshake not completed in time; closed", conn.peer);
                    } else {
                        debug!("{}: upgrade not completed in time; closed", conn.peer);
                    }
                }
            }
        }
    }
}

fn write_reply(conn: &mut Conn) -> Step {
    let Some(reply) = conn.reply.as_mut() else {
        return Step::Wait;
    };
    #[cfg(feature = "tls")]
    if let Some(session) = conn.tls.as_deref_mut() {
        // The reply goes into the session whole (it is small), then out as
        // far as the socket takes it.
        while reply.written < reply.bytes.len() {
            match session.writer().write(&reply.bytes[reply.written..]) {
                Ok(0) | Err(_) => return Step::Close("TLS write error"),
                Ok(n) => reply.written += n,
            }
        }
        match tls::flush(session, &mut conn.stream) {
            Ok(tls::Flushed::All) => {}
            Ok(tls::Flushed::Blocked) => return Step::Wait,
            Err(_) => return Step::Close("write error"),
        }
        return match reply.upgrade.take() {
            Some(upgrade) => Step::Admit(upgrade),
            None => Step::Close("refused"),
        };
    }
    while reply.written < reply.bytes.len() {
        match conn.stream.write(&reply.bytes[reply.written..]) {
            Ok(0) => return Step::Close("write returned zero"),
            Ok(n) => reply.written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Step::Close("write error"),
        }
    }
    match reply.upgrade.take() {
        Some(upgrade) => Step::Admit(upgrade),
        None => Step::Close("refused"),
    }
}

/// The pending-handshake cap: as configured, but at most half the
/// open-file limit, so that handshakes alone never take the descriptors
/// clients, lobbies and origin connections need.
fn pending_cap(configured: usize) -> usize {
    let Some(half) = sys::open_files_limit().map(|n| usize::try_from(n / 2).unwrap_or(usize::MAX))
    else {
        return configured;
    };
    let cap = configured.min(half.max(1));
    if cap < configured {
        info!("pending handshakes capped at {cap}, half the open-file limit");
    }
    cap
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE (per process) and ENFILE (system wide) on Linux.
    matches!(e.raw_os_error(), Some(24 | 23))
}

/// Accept errors about one connection (gone before it was accepted), after
/// which the next accept may well succeed.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::PermissionDenied
    ) || matches!(e.raw_os_error(), Some(71)) // EPROTO
}
