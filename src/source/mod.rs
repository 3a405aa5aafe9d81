//! Sources: where a lobby's messages come from, behind one small interface.
//!
//! Each lobby thread owns one [`Source`] and drives it from its loop
//! (`fanout/lobby.rs`): it asks for the source when it gets its first
//! client ([`Source::start`]), lets it go when the last one leaves
//! ([`Source::stop`]), and in between calls [`Source::drive`], which hands
//! every message to the lobby's fan-out with its position in the stream.
//! Connecting, reconnecting with backoff (`backoff.rs`), liveness and the
//! per-cause failure counters live inside each source; the lobby knows none
//! of it. The interface is `contract.rs`.
//!
//! [`Upstream`] is the shared, immutable description of where a gateway's
//! lobbies read from, built once at start-up from the origin URL and the
//! configuration (or from an in-process [`Publisher`]); it opens one source
//! per lobby. A route's upstreams, one per query key, are its [`RouteEnv`]
//! (`route.rs`). The sources, one file or folder each:
//!
//! - `websocket/`: a WebSocket origin (`ws://`, `wss://`), one connection
//!   per lobby (its upgrade in `websocket/handshake.rs`, its TLS client
//!   configuration in `tls.rs`);
//! - `redis.rs`: a Redis pub/sub channel or stream (`redis://`,
//!   `redis+stream://`, with the `redis` feature), one connection per lobby;
//! - `publisher.rs`: the embedding program's own messages, through
//!   [`Publisher`].
//!
//! A source runs on its lobby's thread and owns its connection; it never
//! touches a client, a queue or the history. Their URLs are parsed by
//! `config/url.rs`, which validation shares. What a source hands over is a
//! [`Message`]; the lobby encodes it once (unless the source already did)
//! and fans it out.
//!
//! [`RouteEnv`]: route::RouteEnv
//! [`Source`]: contract::Source
//! [`Source::start`]: contract::Source::start
//! [`Source::stop`]: contract::Source::stop
//! [`Source::drive`]: contract::Source::drive
//! [`Message`]: contract::Message

use std::sync::Arc;

use crate::{
    config::{
        Config,
        url::{Scheme, origin_url, scheme},
    },
    error::Result,
    source::contract::{LobbyContext, Source},
};

pub(crate) mod backoff;
pub(crate) mod contract;
pub(crate) mod publisher;
#[cfg(feature = "redis")]
pub(crate) mod redis;
pub(crate) mod rng;
pub(crate) mod route;
#[cfg(feature = "tls")]
pub(crate) mod tls;
pub(crate) mod websocket;

pub use publisher::Publisher;

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
    /// scheme picks the source; see `config/url.rs`.
    pub(crate) fn from_url(url: &str, config: &Config) -> Result<Upstream> {
        match scheme(url)? {
            Scheme::WebSocket => {
                let uri = origin_url(url)?;
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
