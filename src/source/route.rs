//! A route's upstream as the manager runs it: its settings, and the
//! [`Upstream`] its lobbies read, one per query key for a route whose
//! lobbies are keyed by the client's query.
//!
//! The gateway builds one [`RouteEnv`] per route at start and at each
//! reload, and sends them to the manager, which opens lobbies on them and
//! decides from two of them whether a reload must reconnect lobbies. No
//! thread runs here.

use std::sync::Arc;

use crate::{config::Config, error::Result, id::RouteId, source::Upstream};

/// A route as the manager runs it: its settings and where its lobbies'
/// messages come from.
#[derive(Debug)]
pub(crate) struct RouteEnv {
    pub id: RouteId,
    /// The route's settings (the top level with its overrides).
    pub config: Config,
    /// The upstream of its lobbies without a query key.
    pub upstream: Arc<Upstream>,
}

impl RouteEnv {
    /// A route's runtime form; fails if its upstream is unusable (a CA
    /// file that cannot be read, say). A route without an origin URL is
    /// the one `publisher` feeds.
    pub(crate) fn new(
        id: RouteId,
        config: Config,
        publisher: Option<&Arc<Upstream>>,
    ) -> Result<RouteEnv> {
        let upstream = match publisher {
            Some(publisher) if config.origin.is_empty() => Arc::clone(publisher),
            _ => Arc::new(Upstream::from_url(&config.origin, &config)?),
        };
        Ok(RouteEnv {
            id,
            config,
            upstream,
        })
    }

    /// Whether `other` reaches its upstream differently (URL, handshake,
    /// init messages, limits of the link), so lobbies must reconnect.
    pub(crate) fn upstream_differs(&self, other: &RouteEnv) -> bool {
        let (a, b) = (&self.config, &other.config);
        a.origin != b.origin
            || a.origin_headers != b.origin_headers
            || a.origin_init != b.origin_init
            || a.origin_subprotocols != b.origin_subprotocols
            || a.origin_ca != b.origin_ca
            || a.max_origin_message != b.max_origin_message
            || a.origin_connect_timeout != b.origin_connect_timeout
            || a.origin_ping != b.origin_ping
            || a.origin_timeout != b.origin_timeout
            || a.origin_backoff_min != b.origin_backoff_min
            || a.origin_backoff_max != b.origin_backoff_max
            || a.pass_query != b.pass_query
            || a.query_params != b.query_params
    }

    /// The upstream of the lobbies of query `key`: the route's URL with the
    /// key appended as its query.
    pub(crate) fn upstream_for(&self, key: Option<&str>) -> Result<Arc<Upstream>> {
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return Ok(Arc::clone(&self.upstream));
        };
        let origin = &self.config.origin;
        let join = if origin.contains('?') { '&' } else { '?' };
        Upstream::from_url(&format!("{origin}{join}{key}"), &self.config).map(Arc::new)
    }
}
