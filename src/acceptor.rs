//! The acceptor thread: accept TCP connections and complete HTTP upgrades.
//!
//! One `mio::Poll` drives the listener and every connection still in its
//! upgrade: requests are read as bytes arrive (never blocking on a slow peer),
//! bounded in size and in time, answered with 101 or an HTTP error status, and
//! upgraded sockets go to the manager with any bytes read past the request.
//!
//! Admission is counted from accept: each connection takes a seat
//! (`seat.rs`) against its address before it has sent a byte, so one
//! address cannot hold more handshakes than it may hold clients. Pending
//! handshakes are capped; at the cap, or when the process is out of file
//! descriptors, the oldest is closed to make room, so a flood of half-sent
//! requests delays a well-behaved client by no more than its own handshake.
//! Request parsing lives in `http.rs`; what happens after the upgrade lives in
//! `manager.rs` and `writer.rs`.

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
    error::{Error, Result},
    gateway::ShutdownHandle,
    http::{self, Endpoint, HeadScan, Parsed, Route},
    id::RouteId,
    manager::{Admission, ManagerMsg},
    registry::Group,
    seat::{RouteLimits, Seat, Seats},
    stats::{Stats, bump, drop_one},
    supervise::EndGuard,
    sys,
};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX);
/// How long accepting pauses when accepting fails for want of resources
/// (descriptors with no handshake to shed, kernel memory), instead of spinning.
const ACCEPT_PAUSE: Duration = Duration::from_millis(250);
/// Connections accepted per turn of the loop, so handshakes in progress are
/// served between bursts of new connections.
const ACCEPTS_PER_TURN: usize = 256;
/// Bytes read from a handshaking socket at a time.
const READ_CHUNK: usize = 4096;

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

/// The acceptor's inbox (read whenever its waker wakes it).
#[derive(Debug)]
pub(crate) enum AcceptorMsg {
    /// A reload: serve these routes, and admit by this configuration's
    /// gateway-wide limits from now on.
    Reload {
        config: Box<Config>,
        routes: Vec<(RouteId, Config)>,
    },
}

/// Sets up the acceptor on an already bound listener; returns it with the
/// handle that stops it (and with it the gateway).
pub(crate) fn prepare(
    mut listener: TcpListener,
    config: &Config,
    routes: &[(RouteId, Config)],
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
    for (id, route) in routes {
        seats.set_route(*id, RouteLimits::new(route));
    }
    let (commands, inbox) = crossbeam_channel::unbounded();
    let acceptor = Acceptor {
        poll,
        listener,
        stop,
        inbox,
        manager: None,
        seats,
        stats,
        endpoints: routes.iter().map(|(id, r)| endpoint(*id, r)).collect(),
        allowed_origins: config.allowed_origins.clone(),
        max_request_bytes: config.max_request_bytes,
        handshake_timeout: config.handshake_timeout,
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

/// Starts the prepared acceptor, which hands upgraded clients to `manager`.
pub(crate) fn spawn(prepared: Prepared, manager: Sender<ManagerMsg>) -> Result<AcceptorHandle> {
    let mut acceptor = prepared.acceptor;
    let guard = EndGuard::acceptor(manager.clone(), Arc::clone(&acceptor.stats));
    acceptor.manager = Some(manager);
    let thread = thread::Builder::new()
        .name("wsgate-acceptor".to_owned())
        .spawn(move || {
            let _guard = guard;
            acceptor.run();
        })
        .map_err(Error::io("spawn the acceptor thread"))?;
    Ok(AcceptorHandle { thread })
}

/// The client-facing rules of a route's settings.
fn endpoint(id: RouteId, route: &Config) -> Endpoint {
    Endpoint {
        route: id,
        path: route.path.clone(),
        subprotocols: route.subprotocols.clone(),
        require_subprotocol: route.require_subprotocol,
        query_params: route.pass_query.then(|| route.query_params.clone()),
        compression: route.compression,
    }
}

/// The answer being written to a handshaking connection.
#[derive(Debug)]
struct Reply {
    bytes: Vec<u8>,
    written: usize,
    /// For an upgrade: where the WebSocket bytes start in the request
    /// buffer, the lobbies the client may join, and whether it negotiated
    /// permessage-deflate.
    upgrade: Option<(usize, Group, bool)>,
}

/// A connection in its upgrade.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
    scan: HeadScan,
    reply: Option<Reply>,
    /// Its claim on the gateway's capacity (given back when it is dropped).
    seat: Seat,
    serial: u64,
}

/// What to do with a connection after it made progress.
enum Step {
    Wait,
    Admit(usize, Group, bool),
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
    stats: Arc<Stats>,
    /// The paths served, with their routes' client-facing rules.
    endpoints: Vec<Endpoint>,
    allowed_origins: Vec<String>,
    max_request_bytes: usize,
    handshake_timeout: Duration,
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
        let mut events = Events::with_capacity(256);
        while !self.stop.load(Ordering::SeqCst) {
            let timeout = self.timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!("acceptor poll failed: {e}");
                    break;
                }
            }
            #[cfg(feature = "fault-injection")]
            self.stats.faults.check(crate::fault::Fault::Acceptor);
            for event in &events {
                match event.token() {
                    LISTENER => self.accept_more = true,
                    WAKER => self.take_commands(),
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
        while let Ok(AcceptorMsg::Reload { config, routes }) = self.inbox.try_recv() {
            self.seats.set_limits(&config);
            for (id, route) in &routes {
                self.seats.set_route(*id, RouteLimits::new(route));
            }
            self.endpoints = routes.iter().map(|(id, r)| endpoint(*id, r)).collect();
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
        let next = self
            .deadlines
            .front()
            .map(|(at, ..)| *at)
            .into_iter()
            .chain(self.paused_until)
            .min()?;
        Some(next.saturating_duration_since(Instant::now()))
    }

    /// Accepts up to a turn's worth of connections; `accept_more` says
    /// whether the listener may still hold some.
    fn accept_some(&mut self) {
        for _ in 0..ACCEPTS_PER_TURN {
            match self.listener.accept() {
                Ok((stream, peer)) => self.add(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_more = false;
                    return;
                }
                Err(e) if is_out_of_descriptors(&e) => {
                    // Close the oldest handshake to free a descriptor for
                    // the connection waiting; pause only if there is none.
                    if !self.shed_oldest("out of file descriptors") {
                        self.pause("out of file descriptors, none held by a handshake", &e);
                        return;
                    }
                }
                Err(e) if is_transient(&e) => debug!("accept failed: {e}"),
                Err(e) => {
                    self.pause("accept failed", &e);
                    return;
                }
            }
        }
    }

    fn pause(&mut self, why: &str, e: &io::Error) {
        warn!(
            "{why} ({e}); pausing accepts for {} ms",
            ACCEPT_PAUSE.as_millis()
        );
        self.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
    }

    fn add(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        let seat = match self.seats.take(peer.ip()) {
            Ok(seat) => seat,
            Err(rejection) => {
                // Refused before reading a byte: one small write to a fresh
                // socket, which has room for it, then close.
                bump(&self.stats.handshakes_rejected);
                debug!(
                    "{peer}: refused with {}: {}",
                    rejection.status, rejection.why
                );
                let _ = stream.write(&rejection.response());
                return;
            }
        };
        if self.pending >= self.max_pending {
            self.shed_oldest("too many pending handshakes");
        }
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
            seat,
            serial,
        });
        self.pending += 1;
        bump(&self.stats.handshakes_pending);
        self.deadlines
            .push_back((Instant::now() + self.handshake_timeout, index, serial));
        self.advance(index);
    }

    /// Reads the request or writes the reply, as far as the socket allows.
    fn advance(&mut self, index: usize) {
        let Some(Some(conn)) = self.conns.get_mut(index) else {
            return;
        };
        let step = match conn.reply {
            None => self.read_request(index),
            Some(_) => write_reply(conn),
        };
        match step {
            Step::Wait => {}
            Step::Close(why) => {
                if let Some(conn) = self.take(index) {
                    debug!("{}: handshake ended: {why}", conn.peer);
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            Step::Admit(at, group, deflate) => {
                let Some(mut conn) = self.take(index) else {
                    return;
                };
                let leftover = conn.buf.split_off(at);
                let admission = Admission {
                    stream: conn.stream,
                    peer: conn.peer,
                    leftover,
                    seat: conn.seat,
                    group,
                    deflate,
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
            match conn.stream.read(&mut chunk[..room]) {
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
            };
            let rejection = match http::parse_route(&conn.buf, &route) {
                Parsed::Incomplete => continue,
                Parsed::Upgrade {
                    response,
                    consumed,
                    route,
                    key,
                    deflate,
                } => {
                    let group = Group { route, key };
                    match self.seats.claim_client(&mut conn.seat, &group) {
                        Ok(()) => {
                            conn.reply = Some(Reply {
                                bytes: response,
                                written: 0,
                                upgrade: Some((consumed, group, deflate)),
                            });
                            return write_reply(conn);
                        }
                        Err(rejection) => rejection,
                    }
                }
                Parsed::Reject(rejection) => {
                    if rejection.status == 403 {
                        bump(&self.stats.refused_origin);
                    }
                    rejection
                }
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
            return write_reply(conn);
        }
    }

    /// Removes a connection from the acceptor. Its seat goes with it: to the
    /// manager for an upgrade, or given back when the connection is dropped.
    fn take(&mut self, index: usize) -> Option<Conn> {
        let mut conn = self.conns.get_mut(index)?.take()?;
        if let Err(e) = self.poll.registry().deregister(&mut conn.stream) {
            debug!("{}: deregister failed: {e}", conn.peer);
        }
        self.free.push(index);
        self.pending -= 1;
        drop_one(&self.stats.handshakes_pending);
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
        while let Some(&(at, index, serial)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            let is_same = matches!(&self.conns.get(index), Some(Some(c)) if c.serial == serial);
            if is_same {
                if let Some(conn) = self.take(index) {
                    bump(&self.stats.handshakes_timed_out);
                    debug!("{}: upgrade not completed in time; closed", conn.peer);
                }
            }
        }
    }
}

fn write_reply(conn: &mut Conn) -> Step {
    let Some(reply) = conn.reply.as_mut() else {
        return Step::Wait;
    };
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
        Some((at, group, deflate)) => Step::Admit(at, group, deflate),
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
