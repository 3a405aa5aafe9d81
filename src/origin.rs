//! One lobby's origin connection: connect, upgrade, read, reconnect with backoff.
//!
//! [`OriginLink`] is a non-blocking state machine the lobby thread drives from
//! its poll loop: TCP connect and the WebSocket upgrade are readiness-driven
//! and bounded by a deadline, so the lobby stays responsive to its inbox
//! while an origin is slow or down. A lost connection is retried after a
//! capped, jittered exponential [`Backoff`]. This file knows nothing of
//! clients; the lobby (`lobby.rs`) decides when a link is needed and what to
//! do with each message.

use std::{
    io,
    net::{SocketAddr, ToSocketAddrs},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use log::{debug, info, warn};
use mio::{Interest, Registry, Token, net::TcpStream};
use tungstenite::{
    ClientRequestBuilder, Message, WebSocket,
    client::client_with_config,
    handshake::{HandshakeError, MidHandshake, client::ClientHandshake},
    http::Uri,
    protocol::{CloseFrame, WebSocketConfig, frame::coding::CloseCode},
};

use crate::{
    config::Config,
    error::Result,
    frame::MessageKind,
    id::LobbyId,
    stats::{Stats, bump, drop_one},
};

/// Messages read per call to [`OriginLink::drive`], so the lobby's inbox is
/// served between bursts.
const READS_PER_DRIVE: usize = 256;
/// A connection that lived this long earns a fresh backoff when it fails.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long a closing connection waits for the origin's close reply.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Where the origin is and how to talk to it, shared by every lobby.
#[derive(Debug)]
pub(crate) struct OriginTarget {
    uri: Uri,
    host: String,
    port: u16,
    ws_config: WebSocketConfig,
    connect_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

impl OriginTarget {
    /// Builds the target from a validated configuration.
    pub(crate) fn from_config(config: &Config) -> Result<OriginTarget> {
        let uri = config.origin_uri()?;
        let host = uri.host().unwrap_or_default();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(80);
        let ws_config = WebSocketConfig::default()
            .max_message_size(Some(config.max_origin_message))
            .max_frame_size(Some(config.max_origin_message));
        Ok(OriginTarget {
            uri,
            host,
            port,
            ws_config,
            connect_timeout: config.origin_connect_timeout,
            backoff_min: config.origin_backoff_min,
            backoff_max: config.origin_backoff_max,
        })
    }

    fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        Ok((self.host.as_str(), self.port).to_socket_addrs()?.collect())
    }
}

/// Capped exponential backoff with jitter: the n-th delay is drawn uniformly
/// from `[min, min(max, min·2ⁿ⁺¹)]`, so lobbies that lost the origin together
/// do not come back together.
#[derive(Debug)]
pub(crate) struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// A backoff between `min` and `max`, its jitter seeded by `seed`.
    pub(crate) fn new(min: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            min,
            max,
            attempt: 0,
            rng: splitmix64(seed) | 1,
        }
    }

    /// The delay before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << (self.attempt + 1).min(30))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let span = (ceiling - self.min).as_nanos() as u64;
        let jitter = if span == 0 {
            0
        } else {
            self.random() % (span + 1)
        };
        self.min + Duration::from_nanos(jitter)
    }

    /// Starts over from the shortest delay.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// xorshift64*: plenty for jitter, no dependency.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Spreads similar seeds (lobby ids, close timestamps) over the whole range.
fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

type Handshake = MidHandshake<ClientHandshake<TcpStream>>;

#[derive(Debug)]
enum State {
    /// Not wanted: the lobby has no clients.
    Idle,
    /// Waiting out the backoff before the next attempt.
    Waiting(Instant),
    /// TCP connect in progress.
    Connecting(TcpStream, Instant),
    /// WebSocket upgrade in progress.
    Upgrading(Box<Handshake>, Instant),
    /// Connected: messages flow.
    Up {
        ws: Box<WebSocket<TcpStream>>,
        since: Instant,
        got_message: bool,
    },
    /// Our close frame is sent; waiting for the origin's until the deadline.
    /// Closing the socket before that could reset it, and the origin would
    /// never see the close frame.
    Closing(Box<WebSocket<TcpStream>>, Instant),
}

/// What [`OriginLink::drive`] left behind.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drive {
    /// Nothing more to do until the socket is ready or the deadline passes.
    Idle,
    /// More input may be waiting: drive again soon.
    More,
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
    stats: Arc<Stats>,
}

impl OriginLink {
    /// A link for `lobby` that registers its socket under `token`.
    pub(crate) fn new(
        lobby: LobbyId,
        target: Arc<OriginTarget>,
        registry: Registry,
        token: Token,
        stats: Arc<Stats>,
    ) -> OriginLink {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(lobby.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let backoff = Backoff::new(target.backoff_min, target.backoff_max, seed);
        OriginLink {
            lobby,
            target,
            registry,
            token,
            state: State::Idle,
            backoff,
            stats,
        }
    }

    /// Connects now if the link is idle or closing.
    pub(crate) fn start(&mut self) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle => self.connect(),
            State::Closing(mut ws, _) => {
                self.deregister(ws.get_mut());
                self.connect();
            }
            other => self.state = other,
        }
    }

    /// Whether a close handshake is still under way.
    pub(crate) fn is_closing(&self) -> bool {
        matches!(self.state, State::Closing(..))
    }

    /// Closes the connection (politely if it is up, saying `why`) and stays idle.
    pub(crate) fn stop(&mut self, why: &str) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Up { mut ws, .. } => {
                let frame = CloseFrame {
                    code: CloseCode::Normal,
                    reason: why.into(),
                };
                drop_one(&self.stats.origin_connections);
                info!("{}: closing origin connection ({why})", self.lobby);
                match ws.close(Some(frame)).and_then(|()| ws.flush()) {
                    Ok(()) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => {
                        self.deregister(ws.get_mut());
                        return;
                    }
                }
                self.state = State::Closing(ws, Instant::now() + CLOSE_WAIT);
            }
            State::Connecting(mut stream, _) => self.deregister(&mut stream),
            State::Upgrading(mut mid, _) => self.deregister(mid.get_mut().get_mut()),
            State::Closing(ws, at) => self.state = State::Closing(ws, at),
            State::Idle | State::Waiting(_) => {}
        }
        self.backoff.reset();
    }

    /// When [`drive`](Self::drive) must run again even without socket readiness.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Waiting(at)
            | State::Connecting(_, at)
            | State::Upgrading(_, at)
            | State::Closing(_, at) => Some(*at),
            State::Idle | State::Up { .. } => None,
        }
    }

    /// Advances the link: finishes connecting, reads messages into `on_message`,
    /// notices failures and schedules reconnects.
    pub(crate) fn drive(&mut self, on_message: &mut impl FnMut(MessageKind, &[u8])) -> Drive {
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
            State::Connecting(stream, deadline) => self.finish_connect(stream, deadline, now),
            State::Upgrading(mid, deadline) => {
                if now >= deadline {
                    let mut mid = mid;
                    self.deregister(mid.get_mut().get_mut());
                    self.fail("upgrade timed out");
                    return Drive::Idle;
                }
                self.upgraded(mid.handshake(), deadline)
            }
            State::Up {
                ws,
                since,
                got_message,
            } => self.read(ws, since, got_message, on_message),
            State::Closing(ws, at) => {
                self.finish_close(ws, at, now);
                Drive::Idle
            }
        }
    }

    /// Reads (and discards) until the origin's close reply or the deadline.
    fn finish_close(&mut self, mut ws: Box<WebSocket<TcpStream>>, at: Instant, now: Instant) {
        if now < at {
            loop {
                match ws.read() {
                    Ok(_) => {}
                    Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                        let _ = ws.flush();
                        self.state = State::Closing(ws, at);
                        return;
                    }
                    Err(_) => break,
                }
            }
        }
        debug!("{}: origin connection closed", self.lobby);
        self.deregister(ws.get_mut());
    }

    /// Starts a TCP connect to the origin's first address.
    fn connect(&mut self) {
        bump(&self.stats.origin_connects);
        let addr = match self.target.resolve() {
            Ok(addrs) if !addrs.is_empty() => addrs[0],
            Ok(_) => return self.fail("origin host resolves to no address"),
            Err(e) => return self.fail(&format!("cannot resolve origin host: {e}")),
        };
        let mut stream = match TcpStream::connect(addr) {
            Ok(stream) => stream,
            Err(e) => return self.fail(&format!("connect to {addr} failed: {e}")),
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self.registry.register(&mut stream, self.token, interest) {
            return self.fail(&format!("cannot register origin socket: {e}"));
        }
        debug!("{}: connecting to origin at {addr}", self.lobby);
        self.state = State::Connecting(stream, Instant::now() + self.target.connect_timeout);
    }

    fn finish_connect(&mut self, mut stream: TcpStream, deadline: Instant, now: Instant) -> Drive {
        let failed = match stream.take_error() {
            Ok(Some(e)) | Err(e) => Some(e.to_string()),
            Ok(None) => match stream.peer_addr() {
                Ok(_) => None,
                Err(e) if e.kind() == io::ErrorKind::NotConnected && now < deadline => {
                    self.state = State::Connecting(stream, deadline);
                    return Drive::Idle;
                }
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                    Some("connect timed out".to_owned())
                }
                Err(e) => Some(e.to_string()),
            },
        };
        if let Some(why) = failed {
            self.deregister(&mut stream);
            self.fail(&format!("connect failed: {why}"));
            return Drive::Idle;
        }
        if let Err(e) = stream.set_nodelay(true) {
            debug!(
                "{}: cannot set TCP_NODELAY on origin socket: {e}",
                self.lobby
            );
        }
        let request = ClientRequestBuilder::new(self.target.uri.clone());
        let result = client_with_config(request, stream, Some(self.target.ws_config));
        self.upgraded(result, deadline)
    }

    fn upgraded(
        &mut self,
        result: Result<
            (
                WebSocket<TcpStream>,
                tungstenite::handshake::client::Response,
            ),
            HandshakeError<ClientHandshake<TcpStream>>,
        >,
        deadline: Instant,
    ) -> Drive {
        match result {
            Ok((ws, _response)) => {
                info!("{}: origin connected ({})", self.lobby, self.target.uri);
                self.stats
                    .origin_connections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.state = State::Up {
                    ws: Box::new(ws),
                    since: Instant::now(),
                    got_message: false,
                };
                // Data may have arrived with the upgrade response.
                Drive::More
            }
            Err(HandshakeError::Interrupted(mid)) => {
                self.state = State::Upgrading(Box::new(mid), deadline);
                Drive::Idle
            }
            Err(HandshakeError::Failure(e)) => {
                // The socket was consumed by the failed handshake; dropping it deregisters it.
                self.fail(&format!("upgrade failed: {e}"));
                Drive::Idle
            }
        }
    }

    fn read(
        &mut self,
        mut ws: Box<WebSocket<TcpStream>>,
        since: Instant,
        mut got_message: bool,
        on_message: &mut impl FnMut(MessageKind, &[u8]),
    ) -> Drive {
        for _ in 0..READS_PER_DRIVE {
            let lost = match ws.read() {
                Ok(Message::Text(text)) => {
                    got_message = true;
                    on_message(MessageKind::Text, text.as_bytes());
                    continue;
                }
                Ok(Message::Binary(bytes)) => {
                    got_message = true;
                    on_message(MessageKind::Binary, &bytes);
                    continue;
                }
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Ok(Message::Close(frame)) => match frame {
                    Some(f) => format!("origin closed the connection ({} {})", f.code, f.reason),
                    None => "origin closed the connection".to_owned(),
                },
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Answers to pings are queued by tungstenite; push them out.
                    let _ = ws.flush();
                    self.state = State::Up {
                        ws,
                        since,
                        got_message,
                    };
                    return Drive::Idle;
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    "origin closed the connection".to_owned()
                }
                Err(e) => format!("origin connection failed: {e}"),
            };
            let _ = ws.flush();
            self.deregister(ws.get_mut());
            drop_one(&self.stats.origin_connections);
            if got_message || since.elapsed() >= STABLE_AFTER {
                self.backoff.reset();
            }
            self.fail(&lost);
            return Drive::Idle;
        }
        self.state = State::Up {
            ws,
            since,
            got_message,
        };
        Drive::More
    }

    /// Records a failure and waits out the backoff before trying again.
    fn fail(&mut self, why: &str) {
        bump(&self.stats.origin_failures);
        let delay = self.backoff.next_delay();
        warn!(
            "{}: {why}; reconnecting in {} ms",
            self.lobby,
            delay.as_millis()
        );
        self.state = State::Waiting(Instant::now() + delay);
    }

    fn deregister(&self, stream: &mut TcpStream) {
        if let Err(e) = self.registry.deregister(stream) {
            debug!("{}: deregister origin socket: {e}", self.lobby);
        }
    }
}

impl Drop for OriginLink {
    fn drop(&mut self) {
        self.stop("lobby ending");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_bounds_and_resets() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(3);
        let mut b = Backoff::new(min, max, 42);
        let mut ceiling = min * 2;
        for _ in 0..12 {
            let d = b.next_delay();
            assert!(d >= min && d <= ceiling.min(max), "{d:?} vs {ceiling:?}");
            ceiling *= 2;
        }
        b.reset();
        assert!(b.next_delay() <= min * 2);
    }

    #[test]
    fn backoff_jitters() {
        let min = Duration::from_millis(100);
        let delays: Vec<Duration> = (0..8)
            .map(|seed| Backoff::new(min, Duration::from_secs(30), seed).next_delay())
            .collect();
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 4, "{delays:?}");
    }
}
