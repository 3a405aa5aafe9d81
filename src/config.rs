//! Every knob of the gateway, its default, and its validation.
//!
//! [`Config`] is a plain struct the CLI fills from flags and an embedder fills
//! in code; [`Config::validate`] checks it once, before any thread starts.
//! Nothing here opens sockets or spawns threads.

use std::{net::SocketAddr, time::Duration};

use tungstenite::http::Uri;

use crate::error::{Error, Result};

/// Gateway configuration. Start from [`Config::default`] and change what you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Address the client listener binds. Port 0 picks a free port.
    /// Defaults to `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Upstream WebSocket URL every lobby connects to (`ws://host[:port]/path`).
    /// Clients never choose it. Defaults to empty, which [`Config::validate`] rejects.
    pub origin: String,
    /// Request path clients connect to; any other path gets 404. Defaults to `/`.
    pub path: String,
    /// Clients per lobby, hence per origin connection. Defaults to 512.
    pub lobby_capacity: usize,
    /// Frames queued per client before the oldest is dropped. Defaults to 16.
    pub queue_depth: usize,
    /// Writer threads serving client sockets. Defaults to 2.
    pub writers: usize,
    /// How long an empty lobby keeps its thread before it ends. Defaults to 5 s.
    pub lobby_linger: Duration,
    /// Time a client has to complete the HTTP upgrade. Defaults to 10 s.
    pub handshake_timeout: Duration,
    /// Largest HTTP upgrade request accepted, in bytes; larger gets 431. Defaults to 8 KiB.
    pub max_request_bytes: usize,
    /// Largest client message, in bytes; larger closes the client with 1009.
    /// Defaults to 64 KiB.
    pub max_client_message: usize,
    /// Largest origin message, in bytes; larger drops the origin connection.
    /// Defaults to 16 MiB.
    pub max_origin_message: usize,
    /// First delay before reconnecting to a failed origin. Defaults to 100 ms.
    pub origin_backoff_min: Duration,
    /// Longest delay between origin reconnect attempts. Defaults to 30 s.
    pub origin_backoff_max: Duration,
    /// Bound on TCP connect plus WebSocket upgrade to the origin. Defaults to 10 s.
    pub origin_connect_timeout: Duration,
    /// On shutdown, how long clients get to receive what is queued and the
    /// 1001 close. Defaults to 5 s.
    pub drain_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            origin: String::new(),
            path: "/".to_owned(),
            lobby_capacity: 512,
            queue_depth: 16,
            writers: 2,
            lobby_linger: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_request_bytes: 8 * 1024,
            max_client_message: 64 * 1024,
            max_origin_message: 16 << 20,
            origin_backoff_min: Duration::from_millis(100),
            origin_backoff_max: Duration::from_secs(30),
            origin_connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Most writer threads a gateway may run; more would only add hand-offs.
const MAX_WRITERS: usize = 256;

impl Config {
    /// Checks every value, returning [`Error::Config`] naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        self.origin_uri()?;
        let bad = |msg: &str| Err(Error::Config(msg.to_owned()));
        if self.lobby_capacity == 0 {
            return bad("lobby capacity must be at least 1");
        }
        if self.queue_depth == 0 {
            return bad("queue depth must be at least 1");
        }
        if self.writers == 0 || self.writers > MAX_WRITERS {
            return Err(Error::Config(format!(
                "writers must be between 1 and {MAX_WRITERS}"
            )));
        }
        if !self.path.starts_with('/') {
            return bad("path must start with '/'");
        }
        if self.handshake_timeout.is_zero() {
            return bad("handshake timeout must be above zero");
        }
        if self.max_request_bytes < 256 {
            return bad("max request size must be at least 256 bytes");
        }
        if self.max_client_message == 0 || self.max_origin_message == 0 {
            return bad("message size limits must be above zero");
        }
        if self.origin_backoff_min.is_zero() || self.origin_backoff_min > self.origin_backoff_max {
            return bad("origin backoff must satisfy 0 < min <= max");
        }
        if self.origin_connect_timeout.is_zero() {
            return bad("origin connect timeout must be above zero");
        }
        Ok(())
    }

    /// The origin URL, parsed and checked: `ws://`, with a host.
    pub(crate) fn origin_uri(&self) -> Result<Uri> {
        let bad = |why: &str| Err(Error::Config(format!("origin URL {:?} {why}", self.origin)));
        if self.origin.is_empty() {
            return Err(Error::Config("an origin URL is required".to_owned()));
        }
        let Ok(uri) = self.origin.parse::<Uri>() else {
            return bad("is not a valid URL");
        };
        match uri.scheme_str() {
            Some("ws") => {}
            Some("wss") => return bad("uses wss://, which this build does not support yet"),
            _ => return bad("must start with ws://"),
        }
        if uri.host().is_none_or(str::is_empty) {
            return bad("has no host");
        }
        Ok(uri)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_origin(origin: &str) -> Config {
        Config {
            origin: origin.to_owned(),
            ..Config::default()
        }
    }

    #[test]
    fn defaults_need_only_an_origin() {
        assert!(Config::default().validate().is_err());
        assert!(with_origin("ws://127.0.0.1:9000/feed").validate().is_ok());
    }

    #[test]
    fn rejects_bad_origins() {
        for origin in ["http://x/", "x", "ws://", "ws:// bad", "wss://host/"] {
            let err = with_origin(origin).validate().unwrap_err();
            assert!(err.to_string().contains("origin URL"), "{origin}: {err}");
        }
    }

    #[test]
    fn rejects_zero_sizes() {
        let mut c = with_origin("ws://h/");
        c.lobby_capacity = 0;
        assert!(c.validate().is_err());
        let mut c = with_origin("ws://h/");
        c.queue_depth = 0;
        assert!(c.validate().is_err());
        let mut c = with_origin("ws://h/");
        c.writers = 0;
        assert!(c.validate().is_err());
    }
}
