//! Sources: where a lobby's messages come from, behind one small interface.
//!
//! Each lobby thread owns one [`Source`] and drives it from its loop
//! (`lobby.rs`): it asks for the source when it gets its first client
//! ([`Source::start`]), lets it go when the last one leaves
//! ([`Source::stop`]), and in between calls [`Source::drive`], which hands
//! every message to the lobby's fan-out with its position in the stream.
//! Connecting, reconnecting with backoff, liveness and the per-cause failure
//! counters live inside each source; the lobby knows none of it.
//!
//! [`Upstream`] is the shared, immutable description of where a gateway's
//! lobbies read from, built once at start-up from the origin URL and the
//! configuration (or from an in-process [`Publisher`]); it opens one source
//! per lobby. The sources, one file each:
//!
//! - `source/websocket.rs`: a WebSocket origin (`ws://`, `wss://`), one
//!   connection per lobby (its upgrade in `source/websocket/handshake.rs`);
//! - `source/redis.rs`: a Redis pub/sub channel or stream (`redis://`,
//!   `redis+stream://`, with the `redis` feature), one connection per lobby;
//! - `source/publisher.rs`: the embedding program's own messages, through
//!   [`Publisher`].
//!
//! A source runs on its lobby's thread and owns its connection; it never
//! touches a client, a queue or the history.
//!
//! The source URLs share one authority grammar, `host[:port]`
//! ([`split_host_port`]), which config validation uses for browser origins
//! too. What it hands over is a
//! [`Message`]; the lobby encodes it once (unless the source already did)
//! and fans it out.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use mio::{Registry, Token, Waker};

use crate::{
    config::Config,
    error::{Error, Result},
    frame::{Frame, MessageKind},
    id::LobbyId,
    stats::{OriginState, Stats, bump, drop_one},
};

pub(crate) mod publisher;
#[cfg(feature = "redis")]
pub(crate) mod redis;
pub(crate) mod websocket;

pub use publisher::Publisher;

/// One message from a source, and where it sits in the source's stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    /// The message itself.
    pub body: Body<'a>,
    /// The source's exact position for this message, as 64 bits (a hash of a
    /// Redis stream ID, a publisher's sequence number): what lobbies align
    /// migrating clients on. `None` where the source has no positions (a
    /// WebSocket origin, Redis pub/sub): the lobby then fingerprints the
    /// frame's bytes and aligns on runs of those (`history.rs`).
    pub position: Option<u64>,
}

/// What a source read: bytes to encode, or a frame already encoded.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Body<'a> {
    /// A text or binary payload; the lobby encodes the frame, once.
    Payload(MessageKind, &'a [u8]),
    /// A server frame the source encoded itself, once for every lobby (the
    /// in-process publisher); the lobby shares it as it is.
    Frame(&'a Frame),
}

impl<'a> Message<'a> {
    /// A payload without a position of its own.
    pub(crate) fn payload(kind: MessageKind, payload: &'a [u8]) -> Message<'a> {
        Message {
            body: Body::Payload(kind, payload),
            position: None,
        }
    }
}

/// What [`Source::drive`] left behind.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drive {
    /// Nothing more to do until the lobby is woken or the deadline passes.
    Idle,
    /// More input may be waiting: drive again soon.
    More,
}

/// A lobby's upstream: a connection (or subscription) that yields messages.
///
/// Every method runs on the lobby's thread and returns promptly: a source
/// that waits for input inside [`drive`](Source::drive) (a blocking Redis
/// connection) waits no longer than the `budget` it is given and a bound
/// of its own, so the lobby serves its inbox between calls. Failures are
/// counted by cause in [`Stats`], logged, and retried with backoff; none is
/// returned.
pub(crate) trait Source: fmt::Debug + Send {
    /// Connects (or subscribes) now, unless it already is or is on its way:
    /// the lobby has clients.
    fn start(&mut self);

    /// Lets go of the upstream, politely where the protocol has a way, and
    /// stays idle until [`start`](Source::start): the lobby has no clients,
    /// or is ending (`why` says which, for the log).
    fn stop(&mut self, why: &str);

    /// Does what is due: connection steps, reading (each message goes to
    /// `deliver`, in the stream's order), liveness, reconnects. A source
    /// that can only wait by blocking waits at most `budget` here.
    fn drive(&mut self, budget: Duration, deliver: &mut dyn FnMut(Message<'_>)) -> Drive;

    /// When [`drive`](Source::drive) must run again if nothing wakes the
    /// lobby; `None` if only a wake-up can make it useful. A source that
    /// waits inside `drive` answers "now" while it is connected.
    fn deadline(&self) -> Option<Instant>;

    /// Whether a polite close is still under way (the lobby finishes it
    /// before its thread ends).
    fn is_closing(&self) -> bool {
        false
    }

    /// Whether the connection failed since the last call (and forgets it):
    /// with `--on-origin-loss close` the lobby then closes its clients.
    fn take_failure(&mut self) -> bool;

    /// Sends a client's message upstream (`--client-messages forward`);
    /// false if it cannot be sent now, or this source takes no messages.
    fn send(&mut self, _kind: MessageKind, _payload: Vec<u8>) -> bool {
        false
    }
}

/// What a lobby lends its source: a name for the logs, its poll registry
/// (for sources with a socket the lobby can wait on), its waker (for
/// answers from other threads), where to publish the connection's state,
/// and the gateway's counters.
#[derive(Debug)]
pub(crate) struct LobbyContext {
    pub lobby: LobbyId,
    pub registry: Registry,
    pub token: Token,
    pub waker: Arc<Waker>,
    /// The source's [`OriginState`], read by the manager for the lobby list.
    pub published: Arc<AtomicU8>,
    pub stats: Arc<Stats>,
}

/// Where a gateway's lobbies read from: built once, shared by every lobby.
#[derive(Debug)]
pub(crate) enum Upstream {
    /// A WebSocket origin.
    WebSocket(Arc<websocket::OriginTarget>),
    /// A Redis channel or stream.
    #[cfg(feature = "redis")]
    Redis(Arc<redis::RedisTarget>),
    /// The embedding program's [`Publisher`].
    Publisher(Arc<publisher::Hub>),
}

impl Upstream {
    /// The upstream an origin URL names, with the configuration's origin
    /// settings (loading TLS roots where the URL asks for TLS). The URL's
    /// scheme picks the source; see [`check_url`].
    pub(crate) fn from_url(url: &str, config: &Config) -> Result<Upstream> {
        match scheme(url)? {
            Scheme::WebSocket => {
                let uri = websocket::parse_url(url)?;
                Ok(Upstream::WebSocket(Arc::new(websocket::OriginTarget::new(
                    uri, config,
                )?)))
            }
            #[cfg(feature = "redis")]
            Scheme::Redis => Ok(Upstream::Redis(Arc::new(redis::RedisTarget::new(
                url, config,
            )?))),
        }
    }

    /// Opens this upstream's source for one lobby (it starts idle).
    pub(crate) fn open(&self, lobby: LobbyContext) -> Box<dyn Source> {
        match self {
            Upstream::WebSocket(target) => Box::new(websocket::OriginLink::new(
                lobby.lobby,
                Arc::clone(target),
                (lobby.registry, lobby.token, lobby.waker),
                lobby.published,
                lobby.stats,
            )),
            #[cfg(feature = "redis")]
            Upstream::Redis(target) => Box::new(redis::RedisLink::new(Arc::clone(target), lobby)),
            Upstream::Publisher(hub) => {
                Box::new(publisher::PublisherSource::new(Arc::clone(hub), lobby))
            }
        }
    }
}

/// The kinds of origin URL.
enum Scheme {
    WebSocket,
    #[cfg(feature = "redis")]
    Redis,
}

fn scheme(url: &str) -> Result<Scheme> {
    let bad = |why: &str| Err(Error::Config(format!("origin: {url:?} {why}")));
    if url.is_empty() {
        return Err(Error::Config(
            "origin: an origin URL is required".to_owned(),
        ));
    }
    let Some((scheme, _)) = url.split_once("://") else {
        return bad("is not a valid URL");
    };
    match scheme.to_ascii_lowercase().as_str() {
        "ws" | "wss" => Ok(Scheme::WebSocket),
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redis+stream" | "rediss+stream" => Ok(Scheme::Redis),
        #[cfg(not(feature = "redis"))]
        "redis" | "rediss" | "redis+stream" | "rediss+stream" => {
            bad("is a Redis URL, but this build has no Redis (feature `redis`)")
        }
        _ if scheme.contains(char::is_whitespace) => bad("is not a valid URL"),
        _ if cfg!(feature = "redis") => bad(
            "must start with ws://, wss://, redis://, rediss://, redis+stream:// or rediss+stream://",
        ),
        _ => bad("must start with ws:// or wss://"),
    }
}

/// Checks an origin URL without opening anything or reading any file: its
/// scheme names a source this build has, and the rest parses for it.
pub(crate) fn check_url(url: &str) -> Result<()> {
    match scheme(url)? {
        Scheme::WebSocket => websocket::parse_url(url).map(drop),
        #[cfg(feature = "redis")]
        Scheme::Redis => redis::RedisUrl::parse(url).map(drop),
    }
}

/// Whether `authority` is `host[:port]` (an IPv6 address in brackets), as
/// in a URL or a browser origin.
pub(crate) fn is_authority(authority: &str) -> bool {
    split_host_port(authority).is_ok()
}

/// The host and the port (`None` when absent) of a source URL's authority
/// without credentials (`ws://`, `redis://`, and browser origins too); the
/// error says what is wrong, to follow the URL in a message.
pub(crate) fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), &'static str> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let Some((host, after)) = v6.split_once(']') else {
            return Err("has an unclosed IPv6 address");
        };
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err("has an invalid IPv6 address");
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err("has an invalid port"),
            },
        }
    } else {
        match authority.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("has no host");
    }
    let name_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
    if !authority.starts_with('[') && !host.bytes().all(name_byte) {
        return Err("has an invalid host");
    }
    let port = match port {
        None => None,
        // Digits only: u16's parser would take a sign.
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => match p.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => return Err("has an invalid port"),
        },
        Some(_) => return Err("has an invalid port"),
    };
    Ok((host, port))
}

/// Publishes a source's state for the lobby listing, keeping the
/// per-state gauges (connecting, backing off) in step.
pub(crate) fn publish_state(published: &AtomicU8, stats: &Stats, new: OriginState) {
    let old = OriginState::from_u8(published.swap(new as u8, Relaxed));
    if old != new {
        if let Some(gauge) = stats.origin_state_gauge(old) {
            drop_one(gauge);
        }
        if let Some(gauge) = stats.origin_state_gauge(new) {
            bump(gauge);
        }
    }
}

/// Spreads a position (a sequence number, a stream ID's two halves) over
/// 64 bits, so positions read as fingerprints (splitmix64's finaliser).
pub(crate) fn position(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Why a source's connection attempt or connection failed (a WebSocket
/// origin's or Redis's); each cause has its counter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Failure {
    /// Name resolution or TCP connect.
    Connect,
    /// Connect, TLS and upgrade did not finish within the connect timeout.
    Timeout,
    /// TLS handshake (certificate, host name, protocol).
    #[cfg(feature = "tls")]
    Tls,
    /// The peer refused the session: a WebSocket origin refused or botched
    /// the upgrade, or Redis refused AUTH, SELECT or SUBSCRIBE.
    Upgrade,
    /// An established connection was closed or broke.
    Lost,
    /// An established connection stayed silent past the liveness timeout.
    Silent,
    /// A WebSocket origin sent a message above the size limit.
    Oversized,
}

impl Failure {
    /// The counter of this cause in `stats`.
    pub(crate) fn counter(self, stats: &Stats) -> &AtomicU64 {
        match self {
            Failure::Connect => &stats.origin_failed_connect,
            Failure::Timeout => &stats.origin_failed_timeout,
            #[cfg(feature = "tls")]
            Failure::Tls => &stats.origin_failed_tls,
            Failure::Upgrade => &stats.origin_failed_upgrade,
            Failure::Lost => &stats.origin_lost,
            Failure::Silent => &stats.origin_silent,
            Failure::Oversized => &stats.origin_oversized,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_picks_the_source() {
        assert!(check_url("ws://h/").is_ok());
        assert!(check_url("WSS://h:443/x").is_ok() == cfg!(feature = "tls"));
        for bad in ["", "http://h/", "h", "ws://", "ws:// bad", "redis//h"] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert_eq!(
            check_url("redis://127.0.0.1:6379/feed").is_ok(),
            cfg!(feature = "redis")
        );
        assert_eq!(
            check_url("redis+stream://127.0.0.1/events").is_ok(),
            cfg!(feature = "redis")
        );
    }

    #[test]
    fn positions_differ_where_their_parts_do() {
        let p = position(1_700_000_000_000, 0);
        assert_ne!(p, position(1_700_000_000_000, 1));
        assert_ne!(p, position(1_700_000_000_001, 0));
        assert_ne!(position(0, 1), position(1, 0));
        assert_eq!(p, position(1_700_000_000_000, 0));
    }
}
