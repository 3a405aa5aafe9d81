//! Validation: [`Config::validate`] checks every setting once, before any
//! thread starts or a reload applies, and names the first bad one.
//!
//! Each route is checked as the full settings its lobbies run with (the top
//! level with its overrides): its origin URL (`url.rs`), its limits, its
//! headers and names (`syntax.rs`). Nothing here opens a socket or reads a
//! file.

use std::{collections::HashSet, time::Duration};

use crate::{
    config::{
        ClientMessages, Config,
        syntax::{is_header_name, is_header_value, is_query_name, is_token},
        url::{check_url, is_authority},
    },
    error::{Error, Result},
};

/// Most writer threads a gateway may run; more would only add hand-offs.
const MAX_WRITERS: usize = 256;

/// Most messages a lobby's history may remember: its entries are allocated
/// when the lobby starts (40 bytes each, 40 MB at this bound).
const MAX_HISTORY: usize = 1_000_000;

/// Most auth threads a gateway may run.
const MAX_AUTH_THREADS: usize = 64;
/// Most TLS handshake threads (`tls_threads`).
const MAX_TLS_THREADS: usize = 64;
/// Highest client frame rate limit accepted (the limiter counts in
/// thousandths of a frame in 32 bits).
pub(super) const MAX_CLIENT_RATE: u32 = 1_000_000;

impl Config {
    /// Checks every value, returning [`Error::Config`] naming the first bad
    /// one (its setting's name first, after `route PATH:` for a route's).
    pub fn validate(&self) -> Result<()> {
        self.validate_for(false)
    }

    /// [`Config::validate`] for a gateway that an in-process publisher
    /// feeds (`fed`): its route at [`Config::path`] takes no origin URL.
    pub(crate) fn validate_for(&self, fed: bool) -> Result<()> {
        if fed && !self.origin.is_empty() {
            return Err(Error::Config(
                "origin: a gateway fed by a publisher takes no origin URL".to_owned(),
            ));
        }
        self.validate_tls()?;
        self.tls.validate(self.tls_cert.is_some())?;
        let routes = self.serving(fed);
        if routes.is_empty() {
            return Err(Error::Config(
                "origin: an origin is required: --origin URL or --route PATH=URL (or try --demo)"
                    .to_owned(),
            ));
        }
        let mut paths = HashSet::new();
        for (index, route) in routes.iter().enumerate() {
            let scoped = |e: Error| match e {
                Error::Config(msg) if !self.routes.is_empty() => {
                    Error::Config(format!("route {}: {msg}", route.path))
                }
                e => e,
            };
            if !paths.insert(route.path.as_str()) {
                return Err(scoped(Error::Config("path: served by two routes".into())));
            }
            let checked = if fed && index == 0 {
                route.validate_published()
            } else {
                route.validate_route()
            };
            checked.map_err(scoped)?;
        }
        Ok(())
    }

    /// Checks the client listener's TLS settings: both files or neither,
    /// in a build that has TLS, and a second listener only with them, on
    /// another address. (The files are read when the gateway starts or
    /// reloads: `edge/tls.rs`.)
    fn validate_tls(&self) -> Result<()> {
        if self.tls_threads > MAX_TLS_THREADS {
            return Err(Error::Config(format!(
                "tls_threads must be at most {MAX_TLS_THREADS}"
            )));
        }
        if let Some(addr) = self.tls_listen {
            if self.tls_cert.is_none() {
                return Err(Error::Config(
                    "tls_listen: a wss:// listener needs a certificate (tls_cert and tls_key)"
                        .into(),
                ));
            }
            if addr == self.listen && addr.port() != 0 {
                return Err(Error::Config(format!(
                    "tls_listen: {addr} is the plain listener's address (listen) too"
                )));
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (None, None) => Ok(()),
            (Some(_), None) => Err(Error::Config(
                "tls_key: tls_cert needs its private key too (--tls-key FILE)".into(),
            )),
            (None, Some(_)) => Err(Error::Config(
                "tls_cert: tls_key needs its certificate chain too (--tls-cert FILE)".into(),
            )),
            (Some(_), Some(_)) if !cfg!(feature = "tls") => Err(Error::Config(
                "tls_cert: wss:// for clients needs a build with TLS (feature `tls`)".into(),
            )),
            (Some(cert), Some(key))
                if cert.as_os_str().is_empty() || key.as_os_str().is_empty() =>
            {
                Err(Error::Config(
                    "tls_cert, tls_key: a file name is empty".into(),
                ))
            }
            _ => Ok(()),
        }
    }

    /// Checks the route a publisher feeds: it has no origin URL to pass a
    /// query string to.
    fn validate_published(&self) -> Result<()> {
        if self.pass_query {
            return Err(Error::Config(
                "pass_query: the publisher's route has no origin URL to pass a query to".into(),
            ));
        }
        self.validate_settings()
    }

    /// Checks one route's settings (and the gateway-wide ones with them).
    fn validate_route(&self) -> Result<()> {
        check_url(&self.origin)?;
        let scheme = self.origin.split("://").next().unwrap_or_default();
        if self.pass_query && !matches!(scheme.to_ascii_lowercase().as_str(), "ws" | "wss") {
            return Err(Error::Config(
                "pass_query: only a WebSocket origin takes the client's query".into(),
            ));
        }
        self.validate_settings()
    }

    /// Checks every value but the origin URL: the gateway-wide settings
    /// and one route's.
    fn validate_settings(&self) -> Result<()> {
        let bad = |msg: &str| Err(Error::Config(msg.to_owned()));
        if self.lobby_capacity == 0 {
            return bad("lobby_capacity must be at least 1");
        }
        if self.queue_depth == 0 {
            return bad("queue_depth must be at least 1");
        }
        if self.writers == 0 || self.writers > MAX_WRITERS {
            return Err(Error::Config(format!(
                "writers must be between 1 and {MAX_WRITERS}"
            )));
        }
        if !(self.compact_fill > 0.0 && self.compact_fill <= 1.0) {
            return bad("compact_fill must be above 0 and at most 1");
        }
        if self.history_len() > MAX_HISTORY {
            return Err(Error::Config(format!(
                "history (and 4 x queue_depth) must be at most {MAX_HISTORY} messages"
            )));
        }
        if self.replay > self.history_len() {
            return Err(Error::Config(format!(
                "replay must be at most {} (the frames a lobby remembers)",
                self.history_len()
            )));
        }
        if !self.path.starts_with('/') || self.path.contains(['?', '#', ' ']) {
            return bad("path must start with '/' and hold no query");
        }
        if self.acceptor_nice > 19 {
            return bad("acceptor_nice must be at most 19");
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake_timeout must be above zero");
        }
        if self.max_request_bytes < 256 {
            return bad("max_request_bytes must be at least 256");
        }
        if self.max_client_message == 0 {
            return bad("max_client_message must be above zero");
        }
        if self.max_origin_message == 0 {
            return bad("max_origin_message must be above zero");
        }
        if !(self.client_send_buffer == 0 || (4096..=1 << 30).contains(&self.client_send_buffer)) {
            return bad("client_send_buffer must be 0 (autotuning) or 4 KiB to 1 GiB");
        }
        if !(self.client_unsent == 0 || (1024..=1 << 30).contains(&self.client_unsent)) {
            return bad("client_unsent must be 0 (kernel default) or 1 KiB to 1 GiB");
        }
        if self.ipv6_prefix > 128 {
            return bad("ipv6_prefix must be at most 128 bits");
        }
        if self.max_pending_handshakes == 0 {
            return bad("max_pending_handshakes must be at least 1");
        }
        if self.max_client_rate > MAX_CLIENT_RATE {
            return Err(Error::Config(format!(
                "max_client_rate must be at most {MAX_CLIENT_RATE} frames a second"
            )));
        }
        if self.client_messages == ClientMessages::Forward
            && self.allowed_origins.is_empty()
            && !self.allow_any_origin
        {
            return bad(
                "client_messages: forwarding needs --allow-origin (the browser origins that may \
                 send upstream) or an explicit --allow-any-origin",
            );
        }
        if self.origin_backoff_min.is_zero() || self.origin_backoff_min > self.origin_backoff_max {
            return bad("origin_backoff_min must be above zero and at most origin_backoff_max");
        }
        if self.origin_connect_timeout.is_zero() {
            return bad("origin_connect_timeout must be above zero");
        }
        if self.write_batch > Duration::from_secs(1) {
            return bad("write_batch must be at most 1s");
        }
        if self.client_ping.is_zero() {
            return bad("client_ping must be above zero");
        }
        if self.sse_heartbeat.is_zero() {
            return bad("sse_heartbeat must be above zero");
        }
        for origin in &self.allowed_origins {
            if !is_web_origin(origin) {
                return Err(Error::Config(format!(
                    "allowed_origins: {origin:?} is not a scheme://host[:port] origin"
                )));
            }
        }
        if self.origin_ping.is_zero() || self.origin_timeout <= self.origin_ping {
            return bad("origin_timeout must be above origin_ping, which must be above zero");
        }
        for (name, value) in &self.origin_headers {
            if !is_header_name(name) || !is_header_value(value) {
                return Err(Error::Config(format!(
                    "origin_headers: {name:?} is not a valid header, or one the upgrade sets itself"
                )));
            }
        }
        if self
            .admin
            .is_some_and(|a| a == self.listen && a.port() != 0)
        {
            return bad("admin must differ from the client listen address");
        }
        if self.reuse_port && !cfg!(unix) {
            return bad("reuse_port: SO_REUSEPORT needs a Unix system");
        }
        if self.admin.is_some() && !cfg!(feature = "admin") {
            return bad(
                "admin: an admin address needs a build with the admin server (feature `admin`)",
            );
        }
        for (key, protocols) in [
            ("origin_subprotocols", &self.origin_subprotocols),
            ("subprotocols", &self.subprotocols),
        ] {
            if let Some(p) = protocols.iter().find(|p| !is_token(p)) {
                return Err(Error::Config(format!("{key}: {p:?} is not a valid token")));
            }
        }
        if self.require_subprotocol && self.subprotocols.is_empty() {
            return bad("require_subprotocol needs subprotocols");
        }
        if self.pass_query && self.query_params.is_empty() {
            return bad("pass_query needs query_params (the parameters that key lobbies)");
        }
        if let Some(p) = self.query_params.iter().find(|p| !is_query_name(p)) {
            return Err(Error::Config(format!(
                "query_params: {p:?} is not a query parameter name"
            )));
        }
        let auth_used = self.auth.url.is_some();
        if auth_used && (self.auth_threads == 0 || self.auth_threads > MAX_AUTH_THREADS) {
            return Err(Error::Config(format!(
                "auth_threads must be between 1 and {MAX_AUTH_THREADS}"
            )));
        }
        if auth_used && self.auth_queue == 0 {
            return bad("auth_queue must be at least 1");
        }
        if self.admin_token_file.is_some() && !cfg!(feature = "admin") {
            return bad("admin_token_file needs the admin server (feature `admin`)");
        }
        self.auth.validate(&self.query_params)
    }
}

/// Whether `origin` is a browser origin, `scheme://host[:port]`; a
/// trailing slash is allowed, as origins are compared without it.
fn is_web_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.trim().split_once("://") else {
        return false;
    };
    let scheme_byte = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.');
    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme.bytes().all(scheme_byte)
        && is_authority(rest.strip_suffix('/').unwrap_or(rest))
}
