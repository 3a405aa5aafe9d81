//! The WebSocket source: one lobby's origin connection: connect, secure,
//! upgrade, read, stay alive, reconnect.
//!
//! [`OriginLink`] is a non-blocking state machine the lobby thread drives from
//! its poll loop. TCP connect, the TLS handshake (`wss://`) and the WebSocket
//! upgrade are readiness-driven and share one deadline, so the lobby keeps
//! serving its inbox while an origin is slow or down. Once up, the link pings
//! the origin and declares it dead when nothing arrives for the liveness
//! timeout. Every failure is counted by cause and retried after a jittered
//! [`Backoff`]. A host name is resolved on a short-lived thread of its own
//! (the system resolver blocks), whose answer wakes the lobby; the lobby
//! waits for it no longer than the connect timeout and never joins a lookup
//! it gave up on, so a slow resolver delays neither its inbox nor shutdown.
//! The upgrade's bytes (the URL, the request, the check of the response) are
//! built and checked in `handshake.rs`; this file moves them.
//! This file knows nothing of clients: the lobby (`fanout/lobby.rs`) decides when a
//! link is needed and what to do with each message, through the
//! [`Source`] interface (`source/contract.rs`).

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    net::{IpAddr, SocketAddr, ToSocketAddrs},
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering::Relaxed},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, TryRecvError, bounded};
use log::{debug, info, warn};
use mio::{Interest, Registry, Token, Waker, net::TcpStream};
use tungstenite::{
    Message, WebSocket,
    protocol::{CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode},
};

use crate::{
    config::{Config, url::OriginUrl},
    error::Result,
    id::LobbyId,
    source::{
        backoff::Backoff,
        contract::{self, Drive, Failure, Source, publish_state},
        rng::Rng,
    },
    stats::{OriginState, Stats, bump, drop_one},
    wire::frame::MessageKind,
};

/// Messages read per call to [`OriginLink::drive`], so the lobby's inbox is
/// served between bursts.
const READS_PER_DRIVE: usize = 256;
/// Bytes read from the origin socket at a time. tungstenite zero-fills its read
/// buffer to this size, so it is resident memory per lobby: its default, 128 KiB,
/// costs 256 bytes per client at 10 000 clients. A lobby reads until the socket
/// is drained either way.
const READ_BUFFER: usize = 16 * 1024;
/// Bytes tungstenite buffers before writing to the origin socket.
const WRITE_BUFFER: usize = 128 * 1024;
/// How long a closing connection waits for the origin's close reply.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

mod handshake;

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use handshake::check_response;

/// Where the origin is and how to talk to it: built once from the
/// configuration, shared by every lobby.
#[derive(Debug)]
pub(crate) struct OriginTarget {
    url: OriginUrl,
    /// The address, when the host is an IP address (nothing to resolve).
    literal: Option<SocketAddr>,
    /// Extra upgrade request headers.
    headers: Vec<(String, String)>,
    /// Subprotocols offered in the upgrade.
    protocols: Vec<String>,
    init: Vec<String>,
    ws_config: WebSocketConfig,
    connect_timeout: Duration,
    ping: Duration,
    timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    /// Bytes of client messages kept while the connection comes up.
    outbox_bytes: usize,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl OriginTarget {
    /// Builds the target for the origin at `url` (from
    /// [`origin_url`](crate::config::url::origin_url)) with the
    /// configuration's origin settings, loading the TLS roots for a
    /// `wss://` origin.
    pub(crate) fn new(url: OriginUrl, config: &Config) -> Result<OriginTarget> {
        // Forwarded client messages queue in the write buffer while the origin
        // is slow; bound it.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .max_message_size(Some(config.max_origin_message))
            .max_frame_size(Some(config.max_origin_message))
            .max_write_buffer_size(WRITE_BUFFER + 2 * config.max_client_message);
        #[cfg(feature = "tls")]
        let tls = if url.secure {
            Some(crate::source::tls::client_config(
                config.origin_ca.as_deref(),
            )?)
        } else {
            None
        };
        Ok(OriginTarget {
            literal: url
                .host
                .parse::<IpAddr>()
                .ok()
                .map(|ip| SocketAddr::new(ip, url.port)),
            url,
            headers: config.origin_headers.clone(),
            protocols: config.origin_subprotocols.clone(),
            init: config.origin_init.clone(),
            ws_config,
            connect_timeout: config.origin_connect_timeout,
            ping: config.origin_ping,
            timeout: config.origin_timeout,
            backoff_min: config.origin_backoff_min,
            backoff_max: config.origin_backoff_max,
            outbox_bytes: (2 * config.max_client_message).max(1 << 20),
            #[cfg(feature = "tls")]
            tls,
        })
    }
}

/// A host name lookup under way on its own thread.
#[derive(Debug)]
struct Lookup {
    answer: Receiver<io::Result<Vec<SocketAddr>>>,
    /// Joined once it answered; left to finish alone if given up on.
    thread: JoinHandle<()>,
}

/// The byte stream to the origin: plain TCP, or TLS over it.
#[derive(Debug)]
pub(crate) enum OriginStream {
    /// `ws://`
    Plain(TcpStream),
    /// `wss://`
    #[cfg(feature = "tls")]
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl OriginStream {
    fn tcp(&mut self) -> &mut TcpStream {
        match self {
            OriginStream::Plain(tcp) => tcp,
            #[cfg(feature = "tls")]
            OriginStream::Tls(tls) => &mut tls.sock,
        }
    }
}

impl Read for OriginStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            OriginStream::Plain(tcp) => tcp.read(buf),
            #[cfg(feature = "tls")]
            OriginStream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for OriginStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            OriginStream::Plain(tcp) => tcp.write(buf),
            #[cfg(feature = "tls")]
            OriginStream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            OriginStream::Plain(tcp) => tcp.flush(),
            #[cfg(feature = "tls")]
            OriginStream::Tls(tls) => tls.flush(),
        }
    }
}

/// Client messages waiting for the origin connection to come up, bounded in bytes.
#[derive(Debug)]
struct Outbox {
    messages: VecDeque<Message>,
    bytes: usize,
    limit: usize,
}

impl Outbox {
    fn new(limit: usize) -> Outbox {
        Outbox {
            messages: VecDeque::new(),
            bytes: 0,
            limit,
        }
    }

    /// Keeps `message` unless that would exceed the limit.
    fn push(&mut self, message: Message) -> bool {
        let len = message.len();
        if self.bytes + len > self.limit {
            return false;
        }
        self.bytes += len;
        self.messages.push_back(message);
        true
    }

    fn drain(&mut self) -> impl Iterator<Item = Message> + '_ {
        self.bytes = 0;
        self.messages.drain(..)
    }

    fn clear(&mut self) {
        self.bytes = 0;
        self.messages.clear();
    }
}

type Ws = WebSocket<OriginStream>;

/// An upgrade under way: the request going out, then the response coming in.
#[derive(Debug)]
struct Upgrade {
    stream: OriginStream,
    /// The nonce sent, which the response's accept key must answer.
    key: String,
    request: Vec<u8>,
    /// Bytes of `request` written so far.
    sent: usize,
    /// The response so far (at most [`handshake::MAX_RESPONSE`] bytes).
    response: Vec<u8>,
}

/// A connection that is up.
#[derive(Debug)]
struct Live {
    ws: Ws,
    since: Instant,
    got_message: bool,
    last_rx: Instant,
    next_ping: Instant,
}

#[derive(Debug)]
enum State {
    /// Not wanted: the lobby has no clients.
    Idle,
    /// Waiting out the backoff before the next attempt.
    Waiting(Instant),
    /// Resolving the origin's host name, until the connect deadline.
    Resolving(Box<Lookup>, Instant),
    /// TCP connect in progress.
    Connecting(TcpStream, Instant),
    /// TLS handshake in progress.
    #[cfg(feature = "tls")]
    Securing(
        Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
        Instant,
    ),
    /// WebSocket upgrade in progress.
    Upgrading(Box<Upgrade>, Instant),
    /// Connected: messages flow.
    Up(Box<Live>),
    /// Our close frame is sent; waiting for the origin's until the deadline.
    /// Closing the socket before that could reset it, and the origin would
    /// never see the close frame.
    Closing(Box<Ws>, Instant),
}

impl State {
    fn public(&self) -> OriginState {
        match self {
            State::Idle => OriginState::Idle,
            State::Waiting(_) => OriginState::BackingOff,
            State::Resolving(..) | State::Connecting(..) | State::Upgrading(..) => {
                OriginState::Connecting
            }
            #[cfg(feature = "tls")]
            State::Securing(..) => OriginState::Connecting,
            State::Up(_) => OriginState::Up,
            State::Closing(..) => OriginState::Closing,
        }
    }
}

/// A lobby's connection to the origin.
#[derive(Debug)]
pub(crate) struct OriginLink {
    lobby: LobbyId,
    target: Arc<OriginTarget>,
    registry: Registry,
    token: Token,
    state: State,
    backoff: Backoff,
    /// Draws the upgrade's nonces.
    rng: Rng,
    /// Connect attempts made, to rotate over the origin's addresses.
    attempts: usize,
    /// Wakes the lobby (a host name lookup answered).
    waker: Arc<Waker>,
    /// A failure happened since the lobby last asked.
    has_failed: bool,
    /// Client messages to forward once the connection is up.
    outbox: Outbox,
    /// The state, published for the manager's lobby listing.
    published: Arc<AtomicU8>,
    stats: Arc<Stats>,
}

impl OriginLink {
    /// A link for `lobby` that registers its socket under `token` and
    /// publishes its state in `published`.
    pub(crate) fn new(
        lobby: LobbyId,
        target: Arc<OriginTarget>,
        (registry, token, waker): (Registry, Token, Arc<Waker>),
        published: Arc<AtomicU8>,
        stats: Arc<Stats>,
    ) -> OriginLink {
        let mut rng = Rng::from_clock(u64::from(lobby.0));
        let jitter = Rng::new(rng.next_u64());
        let backoff = Backoff::new(target.backoff_min, target.backoff_max, jitter);
        let outbox = Outbox::new(target.outbox_bytes);
        OriginLink {
            lobby,
            target,
            registry,
            token,
            state: State::Idle,
            backoff,
            rng,
            attempts: 0,
            waker,
            has_failed: false,
            outbox,
            published,
            stats,
        }
    }

    /// Connects now if the link is idle or closing.
    pub(crate) fn start(&mut self) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle => self.connect(),
            State::Closing(mut ws, _) => {
                self.deregister(ws.get_mut().tcp());
                self.connect();
            }
            other => self.state = other,
        }
        self.publish();
    }

    /// Sends a client's message upstream; false if it cannot be sent now
    /// (the link is not up, or its write buffer is full).
    pub(crate) fn send(&mut self, kind: MessageKind, payload: Vec<u8>) -> bool {
        let message = match kind {
            MessageKind::Binary => Message::binary(payload),
            MessageKind::Text => match String::from_utf8(payload) {
                Ok(text) => Message::text(text),
                Err(_) => return false,
            },
        };
        let live = match &mut self.state {
            State::Up(live) => live,
            // On its way up: keep the message for the connection (bounded).
            State::Waiting(_)
            | State::Resolving(..)
            | State::Connecting(..)
            | State::Upgrading(..) => {
                return self.outbox.push(message);
            }
            #[cfg(feature = "tls")]
            State::Securing(..) => return self.outbox.push(message),
            State::Idle | State::Closing(..) => return false,
        };
        match live.ws.write(message).and_then(|()| live.ws.flush()) {
            Ok(()) => true,
            Err(e) if is_would_block(&e) => true,
            Err(tungstenite::Error::WriteBufferFull(_)) => false,
            // A broken connection shows on the next read; this message is lost.
            Err(_) => false,
        }
    }

    /// Whether a close handshake is still under way.
    pub(crate) fn is_closing(&self) -> bool {
        matches!(self.state, State::Closing(..))
    }

    /// Whether the link failed since the last call (and forgets it).
    pub(crate) fn take_failure(&mut self) -> bool {
        std::mem::take(&mut self.has_failed)
    }

    /// Closes the connection (politely if it is up, saying `why`) and stays idle.
    pub(crate) fn stop(&mut self, why: &str) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Up(mut live) => {
                drop_one(&self.stats.origin_connections);
                info!("{}: closing origin connection ({why})", self.lobby);
                let frame = CloseFrame {
                    code: CloseCode::Normal,
                    reason: why.into(),
                };
                match live.ws.close(Some(frame)).and_then(|()| live.ws.flush()) {
                    Ok(()) => {}
                    Err(e) if is_would_block(&e) => {}
                    Err(_) => {
                        self.deregister(live.ws.get_mut().tcp());
                        self.publish();
                        return;
                    }
                }
                self.state = State::Closing(Box::new(live.ws), Instant::now() + CLOSE_WAIT);
            }
            State::Connecting(mut tcp, _) => self.deregister(&mut tcp),
            #[cfg(feature = "tls")]
            State::Securing(mut tls, _) => self.deregister(&mut tls.sock),
            State::Upgrading(mut upgrade, _) => self.deregister(upgrade.stream.tcp()),
            State::Closing(ws, at) => self.state = State::Closing(ws, at),
            // The lookup finishes alone; nobody reads its answer.
            State::Idle | State::Waiting(_) | State::Resolving(..) => {}
        }
        self.backoff.reset();
        self.outbox.clear();
        self.publish();
    }

    /// When [`drive`](Self::drive) must run again even without socket readiness.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Waiting(at)
            | State::Resolving(_, at)
            | State::Connecting(_, at)
            | State::Upgrading(_, at)
            | State::Closing(_, at) => Some(*at),
            #[cfg(feature = "tls")]
            State::Securing(_, at) => Some(*at),
            State::Up(live) => Some(live.next_ping.min(live.last_rx + self.target.timeout)),
            State::Idle => None,
        }
    }

    /// Advances the link: finishes connecting, reads messages into `on_message`,
    /// keeps the connection alive, notices failures and schedules reconnects.
    pub(crate) fn drive(&mut self, on_message: &mut dyn FnMut(contract::Message<'_>)) -> Drive {
        let drive = self.step(on_message);
        self.publish();
        drive
    }

    fn step(&mut self, on_message: &mut dyn FnMut(contract::Message<'_>)) -> Drive {
        let now = Instant::now();
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle => Drive::Idle,
            State::Waiting(at) if now < at => {
                self.state = State::Waiting(at);
                Drive::Idle
            }
            State::Waiting(_) => {
                self.connect();
                Drive::Idle
            }
            State::Resolving(lookup, deadline) => {
                self.resolved(lookup, deadline, now);
                Drive::Idle
            }
            State::Connecting(tcp, deadline) => self.finish_connect(tcp, deadline, now),
            #[cfg(feature = "tls")]
            State::Securing(tls, deadline) => self.secure(tls, deadline, now),
            State::Upgrading(mut upgrade, deadline) => {
                if now >= deadline {
                    self.deregister(upgrade.stream.tcp());
                    self.fail(Failure::Timeout, "origin upgrade timed out");
                    return Drive::Idle;
                }
                self.upgrade(upgrade, deadline)
            }
            State::Up(live) => self.read(live, now, on_message),
            State::Closing(ws, at) => {
                self.finish_close(ws, at, now);
                Drive::Idle
            }
        }
    }

    /// Starts an attempt: a TCP connect to an IP address, or else a lookup
    /// of the host name first.
    fn connect(&mut self) {
        bump(&self.stats.origin_connect_attempts);
        let deadline = Instant::now() + self.target.connect_timeout;
        if let Some(addr) = self.target.literal {
            return self.connect_to(addr, deadline);
        }
        let (tx, answer) = bounded(1);
        let target = Arc::clone(&self.target);
        let waker = Arc::clone(&self.waker);
        #[cfg(feature = "fault-injection")]
        let slow = self.stats.faults.take(crate::fault::Fault::SlowResolve);
        let spawned = thread::Builder::new()
            .name(format!("wsgate-resolve-{}", self.lobby.0))
            .spawn(move || {
                #[cfg(feature = "fault-injection")]
                if slow {
                    thread::sleep(Duration::from_secs(30));
                }
                let addrs = (target.url.host.as_str(), target.url.port)
                    .to_socket_addrs()
                    .map(Iterator::collect);
                let _ = tx.send(addrs);
                let _ = waker.wake();
            });
        match spawned {
            Ok(thread) => {
                debug!("{}: resolving {}", self.lobby, self.target.url.host);
                self.state = State::Resolving(Box::new(Lookup { answer, thread }), deadline);
            }
            Err(e) => self.fail(
                Failure::Connect,
                &format!("cannot start a name lookup: {e}"),
            ),
        }
    }

    /// Connects to an address of the lookup's answer, once it has come.
    fn resolved(&mut self, lookup: Box<Lookup>, deadline: Instant, now: Instant) {
        let answer = match lookup.answer.try_recv() {
            Err(TryRecvError::Empty) if now < deadline => {
                self.state = State::Resolving(lookup, deadline);
                return;
            }
            Err(TryRecvError::Empty) => {
                return self.fail(Failure::Timeout, "origin host name lookup timed out");
            }
            Err(TryRecvError::Disconnected) => Err(io::Error::other(
                "the lookup thread ended without an answer",
            )),
            Ok(answer) => answer,
        };
        // It has answered, so it is ending: this join is immediate.
        let _ = lookup.thread.join();
        match answer {
            Ok(addrs) if !addrs.is_empty() => {
                let addr = addrs[self.attempts % addrs.len()];
                self.connect_to(addr, deadline);
            }
            Ok(_) => self.fail(Failure::Connect, "origin host resolves to no address"),
            Err(e) => self.fail(
                Failure::Connect,
                &format!("cannot resolve origin host: {e}"),
            ),
        }
    }

    /// Starts a TCP connect to `addr` (rotating over the origin's addresses
    /// from one attempt to the next).
    fn connect_to(&mut self, addr: SocketAddr, deadline: Instant) {
        self.attempts = self.attempts.wrapping_add(1);
        let mut tcp = match TcpStream::connect(addr) {
            Ok(tcp) => tcp,
            Err(e) => {
                return self.fail(Failure::Connect, &format!("connect to {addr} failed: {e}"));
            }
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self.registry.register(&mut tcp, self.token, interest) {
            return self.fail(
                Failure::Connect,
                &format!("cannot register origin socket: {e}"),
            );
        }
        debug!("{}: connecting to origin at {addr}", self.lobby);
        self.state = State::Connecting(tcp, deadline);
    }

    fn finish_connect(&mut self, mut tcp: TcpStream, deadline: Instant, now: Instant) -> Drive {
        let failed = match tcp.take_error() {
            Ok(Some(e)) | Err(e) => Some((Failure::Connect, format!("connect failed: {e}"))),
            Ok(None) => match tcp.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotConnected && now < deadline => {
                    self.state = State::Connecting(tcp, deadline);
                    return Drive::Idle;
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    Some((Failure::Timeout, "origin connect timed out".to_owned()))
                }
                Err(e) => Some((Failure::Connect, format!("connect failed: {e}"))),
            },
        };
        if let Some((cause, why)) = failed {
            self.deregister(&mut tcp);
            self.fail(cause, &why);
            return Drive::Idle;
        }
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(
                "{}: cannot set TCP_NODELAY on origin socket: {e}",
                self.lobby
            );
        }
        #[cfg(feature = "tls")]
        if let Some(config) = &self.target.tls {
            let name = match rustls::pki_types::ServerName::try_from(self.target.url.host.clone()) {
                Ok(name) => name,
                Err(e) => {
                    self.deregister(&mut tcp);
                    self.fail(Failure::Tls, &format!("bad TLS server name: {e}"));
                    return Drive::Idle;
                }
            };
            return match rustls::ClientConnection::new(Arc::clone(config), name) {
                Ok(conn) => {
                    let tls = Box::new(rustls::StreamOwned::new(conn, tcp));
                    self.secure(tls, deadline, now)
                }
                Err(e) => {
                    self.deregister(&mut tcp);
                    self.fail(Failure::Tls, &format!("TLS setup failed: {e}"));
                    Drive::Idle
                }
            };
        }
        self.upgrade_on(OriginStream::Plain(tcp), deadline)
    }

    /// Advances the TLS handshake, then starts the upgrade.
    #[cfg(feature = "tls")]
    fn secure(
        &mut self,
        mut tls: Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>,
        deadline: Instant,
        now: Instant,
    ) -> Drive {
        if now >= deadline {
            self.deregister(&mut tls.sock);
            self.fail(Failure::Timeout, "origin TLS handshake timed out");
            return Drive::Idle;
        }
        while tls.conn.is_handshaking() {
            match tls.conn.complete_io(&mut tls.sock) {
                Ok((0, 0)) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.deregister(&mut tls.sock);
                    self.fail(Failure::Tls, &format!("TLS handshake failed: {e}"));
                    return Drive::Idle;
                }
            }
        }
        if tls.conn.is_handshaking() {
            self.state = State::Securing(tls, deadline);
            return Drive::Idle;
        }
        self.upgrade_on(OriginStream::Tls(tls), deadline)
    }

    /// Starts the upgrade on a connected (and secured) stream.
    fn upgrade_on(&mut self, stream: OriginStream, deadline: Instant) -> Drive {
        let key = handshake::nonce([self.rng.next_u64(), self.rng.next_u64()]);
        let target = &self.target;
        let request = handshake::request(&target.url, &key, &target.headers, &target.protocols);
        let upgrade = Upgrade {
            stream,
            key,
            request,
            sent: 0,
            response: Vec::new(),
        };
        self.upgrade(Box::new(upgrade), deadline)
    }

    /// Advances the upgrade: sends the request, reads the response, and
    /// once the origin accepted, goes up with what followed the response.
    fn upgrade(&mut self, mut upgrade: Box<Upgrade>, deadline: Instant) -> Drive {
        match self.exchange(&mut upgrade) {
            Ok(None) => {
                self.state = State::Upgrading(upgrade, deadline);
                Drive::Idle
            }
            Ok(Some(consumed)) => {
                let Upgrade {
                    stream, response, ..
                } = *upgrade;
                let data = response[consumed..].to_vec();
                let config = Some(self.target.ws_config);
                self.up(WebSocket::from_partially_read(
                    stream,
                    data,
                    Role::Client,
                    config,
                ))
            }
            Err(why) => {
                self.deregister(upgrade.stream.tcp());
                self.fail(Failure::Upgrade, &why);
                Drive::Idle
            }
        }
    }

    /// The upgrade's I/O, as far as the socket allows: `Ok(None)` to wait
    /// for readiness, `Ok(Some(n))` once the origin accepted in the first
    /// `n` bytes of its response.
    fn exchange(&self, upgrade: &mut Upgrade) -> std::result::Result<Option<usize>, String> {
        let would_block = |e: &io::Error| e.kind() == io::ErrorKind::WouldBlock;
        while upgrade.sent < upgrade.request.len() {
            match upgrade.stream.write(&upgrade.request[upgrade.sent..]) {
                Ok(0) => return Err("origin closed the connection during the upgrade".to_owned()),
                Ok(n) => upgrade.sent += n,
                Err(e) if would_block(&e) => return Ok(None),
                Err(e) => return Err(format!("sending the upgrade request failed: {e}")),
            }
        }
        match upgrade.stream.flush() {
            Err(e) if would_block(&e) => return Ok(None),
            Err(e) => return Err(format!("sending the upgrade request failed: {e}")),
            Ok(()) => {}
        }
        let mut chunk = [0; 4096];
        loop {
            let room = handshake::MAX_RESPONSE - upgrade.response.len();
            let n = match upgrade.stream.read(&mut chunk[..room.min(4096)]) {
                Ok(0) => return Err("origin closed the connection during the upgrade".to_owned()),
                Ok(n) => n,
                Err(e) if would_block(&e) => return Ok(None),
                Err(e) => return Err(format!("reading the upgrade response failed: {e}")),
            };
            upgrade.response.extend_from_slice(&chunk[..n]);
            let answer =
                handshake::check_response(&upgrade.response, &upgrade.key, &self.target.protocols)?;
            if answer.is_some() {
                return Ok(answer);
            }
        }
    }

    /// The upgrade succeeded: sends the init messages and what clients sent
    /// meanwhile, and goes up.
    fn up(&mut self, mut ws: Ws) -> Drive {
        info!("{}: origin connected ({})", self.lobby, self.target.url);
        bump(&self.stats.origin_connected);
        self.stats.origin_connections.fetch_add(1, Relaxed);
        // Init messages go out first, in order, then what clients sent meanwhile.
        let init = self.target.init.iter().map(|t| Message::text(t.as_str()));
        for message in init.chain(self.outbox.drain()) {
            if let Err(e) = ws.write(message) {
                if !is_would_block(&e) {
                    warn!("{}: cannot queue a message for the origin: {e}", self.lobby);
                }
            }
        }
        if let Err(e) = ws.flush() {
            if !is_would_block(&e) {
                debug!("{}: flushing init messages: {e}", self.lobby);
            }
        }
        let now = Instant::now();
        self.state = State::Up(Box::new(Live {
            ws,
            since: now,
            got_message: false,
            last_rx: now,
            next_ping: now + self.target.ping,
        }));
        // Data may have arrived with the upgrade response.
        Drive::More
    }

    fn read(
        &mut self,
        mut live: Box<Live>,
        now: Instant,
        on_message: &mut dyn FnMut(contract::Message<'_>),
    ) -> Drive {
        for _ in 0..READS_PER_DRIVE {
            let (cause, why) = match live.ws.read() {
                Ok(message) => {
                    live.last_rx = now;
                    match message {
                        Message::Text(text) => {
                            live.got_message = true;
                            on_message(contract::Message::payload(
                                MessageKind::Text,
                                text.as_bytes(),
                            ));
                        }
                        Message::Binary(bytes) => {
                            live.got_message = true;
                            on_message(contract::Message::payload(MessageKind::Binary, &bytes));
                        }
                        Message::Close(frame) => {
                            let why = match frame {
                                Some(f) => format!(
                                    "origin closed the connection ({} {})",
                                    f.code, f.reason
                                ),
                                None => "origin closed the connection".to_owned(),
                            };
                            self.lose(live, Failure::Lost, &why);
                            return Drive::Idle;
                        }
                        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    }
                    continue;
                }
                Err(e) if is_would_block(&e) => return self.keep_alive(live, now),
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    (Failure::Lost, "origin closed the connection".to_owned())
                }
                Err(tungstenite::Error::Capacity(e)) => {
                    let frame = CloseFrame {
                        code: CloseCode::Size,
                        reason: "message too big".into(),
                    };
                    let _ = live.ws.close(Some(frame)).and_then(|()| live.ws.flush());
                    (Failure::Oversized, format!("origin message too big: {e}"))
                }
                Err(e) => (Failure::Lost, format!("origin connection failed: {e}")),
            };
            self.lose(live, cause, &why);
            return Drive::Idle;
        }
        self.state = State::Up(live);
        Drive::More
    }

    /// After a read burst: push out queued writes, ping, check liveness.
    fn keep_alive(&mut self, mut live: Box<Live>, now: Instant) -> Drive {
        if now >= live.last_rx + self.target.timeout {
            let why = format!(
                "origin silent for {} ms (no data, no pong)",
                self.target.timeout.as_millis()
            );
            self.lose(live, Failure::Silent, &why);
            return Drive::Idle;
        }
        if now >= live.next_ping {
            live.next_ping = now + self.target.ping;
            if let Err(e) = live.ws.write(Message::Ping(Default::default())) {
                if !is_would_block(&e) {
                    self.lose(live, Failure::Lost, &format!("cannot ping origin: {e}"));
                    return Drive::Idle;
                }
            }
        }
        // Pongs and pings queued by tungstenite or by us; WouldBlock keeps them queued.
        let _ = live.ws.flush();
        self.state = State::Up(live);
        Drive::Idle
    }

    /// An established connection is gone: count it and reconnect after a backoff.
    fn lose(&mut self, mut live: Box<Live>, cause: Failure, why: &str) {
        let _ = live.ws.flush();
        self.deregister(live.ws.get_mut().tcp());
        drop_one(&self.stats.origin_connections);
        self.backoff
            .connection_ended(live.since.elapsed(), live.got_message);
        self.fail(cause, why);
    }

    /// Reads (and discards) until the origin's close reply or the deadline.
    fn finish_close(&mut self, mut ws: Box<Ws>, at: Instant, now: Instant) {
        if now < at {
            loop {
                match ws.read() {
                    Ok(_) => {}
                    Err(e) if is_would_block(&e) => {
                        let _ = ws.flush();
                        self.state = State::Closing(ws, at);
                        return;
                    }
                    Err(_) => break,
                }
            }
        }
        debug!("{}: origin connection closed", self.lobby);
        self.deregister(ws.get_mut().tcp());
    }

    /// Counts a failure by cause and waits out the backoff before trying again.
    fn fail(&mut self, cause: Failure, why: &str) {
        bump(cause.counter(&self.stats));
        self.has_failed = true;
        let delay = self.backoff.next_delay();
        warn!(
            "{}: {why}; reconnecting in {} ms",
            self.lobby,
            delay.as_millis()
        );
        self.state = State::Waiting(Instant::now() + delay);
    }

    fn deregister(&self, tcp: &mut TcpStream) {
        if let Err(e) = self.registry.deregister(tcp) {
            debug!("{}: deregister origin socket: {e}", self.lobby);
        }
    }

    /// Publishes the state for the lobby listing, and keeps the per-state
    /// gauges (connecting, backing off) in step.
    fn publish(&self) {
        publish_state(&self.published, &self.stats, self.state.public());
    }
}

impl Source for OriginLink {
    fn start(&mut self) {
        OriginLink::start(self);
    }

    fn stop(&mut self, why: &str) {
        OriginLink::stop(self, why);
    }

    /// Never blocks: the lobby waits for the socket in its poll.
    fn drive(
        &mut self,
        _budget: Duration,
        deliver: &mut dyn FnMut(contract::Message<'_>),
    ) -> Drive {
        OriginLink::drive(self, deliver)
    }

    fn deadline(&self) -> Option<Instant> {
        OriginLink::deadline(self)
    }

    fn is_closing(&self) -> bool {
        OriginLink::is_closing(self)
    }

    fn take_failure(&mut self) -> bool {
        OriginLink::take_failure(self)
    }

    fn send(&mut self, kind: MessageKind, payload: Vec<u8>) -> bool {
        OriginLink::send(self, kind, payload)
    }
}

impl Drop for OriginLink {
    fn drop(&mut self) {
        self.stop("lobby ending");
    }
}

fn is_would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock)
}
