//! The acceptor thread: accept TCP connections and complete HTTP upgrades.
//!
//! One `mio::Poll` drives the listener and every connection still in its
//! upgrade: requests are read as bytes arrive (never blocking on a slow peer),
//! bounded in size and in time, answered with 101 or an HTTP error status, and
//! upgraded sockets go to the manager with any bytes read past the request.
//! Request parsing lives in `http.rs`; what happens after the upgrade lives in
//! `manager.rs` and `writer.rs`.

use std::{
    collections::{HashMap, VecDeque},
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender};
use log::{debug, error, info, warn};
use mio::{
    Events, Interest, Poll, Token, Waker,
    net::{TcpListener, TcpStream},
};
use socket2::SockRef;

use crate::{
    config::Config,
    error::{Error, Result},
    gateway::ShutdownHandle,
    http::{self, Parsed, Rejection, Route},
    manager::{Admission, ManagerMsg},
    stats::{Stats, bump, drop_one},
};

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX);
/// How long accepting pauses when the process is out of file descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(250);
/// Bytes read from a handshaking socket at a time.
const READ_CHUNK: usize = 4096;

/// The gateway's handle on the acceptor thread.
#[derive(Debug)]
pub(crate) struct AcceptorHandle {
    /// Stopping the acceptor is how the whole gateway shuts down.
    pub shutdown: ShutdownHandle,
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

/// Starts the acceptor on an already bound listener. `left` carries the
/// address of each client that leaves (for the per-address limit).
pub(crate) fn spawn(
    mut listener: TcpListener,
    config: &Config,
    stats: Arc<Stats>,
    manager: Sender<ManagerMsg>,
    left: Receiver<IpAddr>,
) -> Result<AcceptorHandle> {
    let poll = Poll::new().map_err(Error::io("create the acceptor poll"))?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(Error::io("register the listener"))?;
    let waker =
        Waker::new(poll.registry(), WAKER).map_err(Error::io("create the acceptor waker"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let shutdown = ShutdownHandle::new(Arc::clone(&stop), waker);
    let acceptor = Acceptor {
        poll,
        listener,
        stop: Arc::clone(&stop),
        manager,
        stats,
        path: config.path.clone(),
        allowed_origins: config.allowed_origins.clone(),
        limits: Limits {
            max_clients: (config.max_clients > 0).then_some(config.max_clients as u64),
            lobby_seats: config.lobby_seats(),
            max_per_ip: (config.max_clients_per_ip > 0).then_some(config.max_clients_per_ip),
        },
        per_ip: HashMap::new(),
        left,
        max_request_bytes: config.max_request_bytes,
        handshake_timeout: config.handshake_timeout,
        send_buffer: config.client_send_buffer,
        conns: Vec::new(),
        free: Vec::new(),
        deadlines: VecDeque::new(),
        next_serial: 0,
        paused_until: None,
    };
    let thread = thread::Builder::new()
        .name("wsgate-acceptor".to_owned())
        .spawn(move || acceptor.run())
        .map_err(Error::io("spawn the acceptor thread"))?;
    Ok(AcceptorHandle { shutdown, thread })
}

/// The answer being written to a handshaking connection.
#[derive(Debug)]
struct Reply {
    bytes: Vec<u8>,
    written: usize,
    /// For an upgrade, where the WebSocket bytes start in the request buffer.
    upgrade_at: Option<usize>,
}

/// A connection in its upgrade.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    buf: Vec<u8>,
    reply: Option<Reply>,
    /// The connection holds a seat (counted in `clients`) for its upgrade.
    has_seat: bool,
    serial: u64,
}

/// What to do with a connection after it made progress.
enum Step {
    Wait,
    Admit(usize),
    Close(&'static str),
}

#[derive(Debug)]
struct Acceptor {
    poll: Poll,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    manager: Sender<ManagerMsg>,
    stats: Arc<Stats>,
    path: String,
    allowed_origins: Vec<String>,
    limits: Limits,
    /// Clients per address, kept only when that is limited.
    per_ip: HashMap<IpAddr, usize>,
    /// Addresses of clients that left, from the manager.
    left: Receiver<IpAddr>,
    max_request_bytes: usize,
    handshake_timeout: Duration,
    /// `SO_SNDBUF` for client sockets; 0 leaves the kernel's autotuning.
    send_buffer: usize,
    /// Slab of handshaking connections; the index is the poll token.
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Handshake deadlines in the order they fall (all have the same timeout).
    deadlines: VecDeque<(Instant, usize, u64)>,
    next_serial: u64,
    /// Set while out of file descriptors.
    paused_until: Option<Instant>,
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
            for event in &events {
                match event.token() {
                    LISTENER => self.accept_all(),
                    WAKER => {}
                    Token(index) => self.advance(index),
                }
            }
            if self.paused_until.is_some_and(|at| at <= Instant::now()) {
                self.paused_until = None;
                self.accept_all();
            }
            self.expire();
        }
        info!("listener closed");
        let _ = self.manager.send(ManagerMsg::Shutdown);
    }

    fn timeout(&self) -> Option<Duration> {
        let next = self
            .deadlines
            .front()
            .map(|(at, ..)| *at)
            .into_iter()
            .chain(self.paused_until)
            .min()?;
        Some(next.saturating_duration_since(Instant::now()))
    }

    fn accept_all(&mut self) {
        if self.paused_until.is_some() {
            return;
        }
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => self.add(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_out_of_descriptors(&e) => {
                    warn!(
                        "out of file descriptors ({e}); pausing accepts for {} ms",
                        ACCEPT_PAUSE.as_millis()
                    );
                    self.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    return;
                }
                Err(e) => debug!("accept failed: {e}"),
            }
        }
    }

    fn add(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        if let Err(e) = stream.set_nodelay(true) {
            debug!("{peer}: cannot set TCP_NODELAY: {e}");
        }
        if self.send_buffer > 0 {
            if let Err(e) = SockRef::from(&stream).set_send_buffer_size(self.send_buffer) {
                debug!("{peer}: cannot set SO_SNDBUF: {e}");
            }
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
            reply: None,
            has_seat: false,
            serial,
        });
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
            Step::Admit(at) => {
                // The seat goes with the client to the manager.
                if let Some(Some(conn)) = self.conns.get_mut(index) {
                    conn.has_seat = false;
                }
                let Some(mut conn) = self.take(index) else {
                    return;
                };
                let leftover = conn.buf.split_off(at);
                let admission = Admission {
                    stream: conn.stream,
                    peer: conn.peer,
                    leftover,
                };
                if self.manager.send(ManagerMsg::Admit(admission)).is_err() {
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
            let route = Route {
                path: &self.path,
                allowed_origins: &self.allowed_origins,
                max_bytes: self.max_request_bytes,
            };
            let parsed = match http::parse_route(&conn.buf, &route) {
                Parsed::Upgrade { response, consumed } => {
                    let ip = conn.peer.ip();
                    match admit(&self.stats, &mut self.per_ip, &self.left, &self.limits, ip) {
                        Ok(()) => Parsed::Upgrade { response, consumed },
                        Err(rejection) => Parsed::Reject(rejection),
                    }
                }
                Parsed::Reject(r) if r.status == 403 => {
                    bump(&self.stats.refused_origin);
                    Parsed::Reject(r)
                }
                parsed => parsed,
            };
            let reply = match parsed {
                Parsed::Incomplete => continue,
                Parsed::Upgrade { response, consumed } => {
                    conn.has_seat = true;
                    Reply {
                        bytes: response,
                        written: 0,
                        upgrade_at: Some(consumed),
                    }
                }
                Parsed::Reject(rejection) => {
                    bump(&self.stats.handshakes_rejected);
                    debug!(
                        "{}: refused with {}: {}",
                        conn.peer, rejection.status, rejection.why
                    );
                    Reply {
                        bytes: rejection.response(),
                        written: 0,
                        upgrade_at: None,
                    }
                }
            };
            conn.reply = Some(reply);
            return write_reply(conn);
        }
    }

    /// Removes a connection from the acceptor, giving back its seat (a
    /// connection handed to the manager has passed its seat on first).
    fn take(&mut self, index: usize) -> Option<Conn> {
        let mut conn = self.conns.get_mut(index)?.take()?;
        if std::mem::take(&mut conn.has_seat) {
            drop_one(&self.stats.clients);
            if self.limits.max_per_ip.is_some() {
                release_ip(&mut self.per_ip, conn.peer.ip());
            }
        }
        if let Err(e) = self.poll.registry().deregister(&mut conn.stream) {
            debug!("{}: deregister failed: {e}", conn.peer);
        }
        self.free.push(index);
        Some(conn)
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
    match reply.upgrade_at {
        Some(at) => Step::Admit(at),
        None => Step::Close("refused"),
    }
}

/// The admission limits, all optional.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Most clients connected at once.
    max_clients: Option<u64>,
    /// Most clients the lobbies can hold, when origin connections are limited.
    lobby_seats: Option<u64>,
    /// Most clients from one address.
    max_per_ip: Option<usize>,
}

/// Counts a client from `ip` in (a seat in `clients`, and in `per_ip` when
/// limited), or says which limit refuses it.
fn admit(
    stats: &Stats,
    per_ip: &mut HashMap<IpAddr, usize>,
    left: &Receiver<IpAddr>,
    limits: &Limits,
    ip: IpAddr,
) -> Result<(), Rejection> {
    if let Some(max) = limits.max_per_ip {
        for gone in left.try_iter() {
            release_ip(per_ip, gone);
        }
        if per_ip.get(&ip).is_some_and(|&n| n >= max) {
            bump(&stats.refused_per_ip);
            return Err(Rejection::TOO_MANY_FROM_ADDRESS);
        }
    }
    let before = stats.clients.fetch_add(1, Ordering::SeqCst);
    if limits.max_clients.is_some_and(|max| before >= max) {
        drop_one(&stats.clients);
        bump(&stats.refused_full);
        return Err(Rejection::TOO_MANY_CLIENTS);
    }
    if limits.lobby_seats.is_some_and(|max| before >= max) {
        drop_one(&stats.clients);
        bump(&stats.refused_full);
        return Err(Rejection::FULL);
    }
    if limits.max_per_ip.is_some() {
        *per_ip.entry(ip).or_default() += 1;
    }
    Ok(())
}

/// One client from `ip` is gone.
fn release_ip(per_ip: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = per_ip.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            per_ip.remove(&ip);
        }
    }
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    // EMFILE (per process) and ENFILE (system wide) on Linux.
    matches!(e.raw_os_error(), Some(24 | 23))
}
