//! Every knob of the gateway, its default, and its validation.
//!
//! [`Config`] is a plain struct the CLI fills from flags and an embedder fills
//! in code; [`Config::validate`] checks it once, before any thread starts.
//! Nothing here opens sockets or spawns threads.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tungstenite::http::{HeaderName, HeaderValue, Uri};

use crate::error::{Error, Result};

/// Gateway configuration. Start from [`Config::default`] and change what you need.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Address the client listener binds. Port 0 picks a free port.
    /// Defaults to `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Upstream URL every lobby reads from; its scheme picks the source:
    /// a WebSocket origin (`ws://host[:port]/path`, `wss://` with the `tls`
    /// feature), or with the `redis` feature a Redis pub/sub channel
    /// (`redis://[[user]:password@]host[:port][/db]/channel`, `rediss://`
    /// with TLS) or stream (`redis+stream://…/key[?field=NAME]`, reading
    /// each entry's `data` field unless `field` names another). Clients
    /// never choose it. Leave it empty for a gateway fed by a
    /// [`Publisher`](crate::Publisher) ([`Builder::publisher`](crate::Builder::publisher)).
    /// Defaults to empty, which [`Config::validate`] rejects.
    pub origin: String,
    /// Request path clients connect to; any other path gets 404. Defaults to `/`.
    pub path: String,
    /// Most clients connected at once; more get 503. 0 means no limit.
    /// Defaults to 0.
    pub max_clients: usize,
    /// Most connections at once from one address (IPv4) or network (IPv6,
    /// see [`Config::ipv6_prefix`]), counted from accept, pending handshakes
    /// included; more get 429 at once. 0 means no limit. Defaults to 0.
    pub max_clients_per_ip: usize,
    /// Leading bits of an IPv6 address that [`Config::max_clients_per_ip`]
    /// counts together (a /64 is usually one subscriber). Defaults to 64.
    pub ipv6_prefix: u8,
    /// Most connections in their HTTP upgrade at once. At this cap, or when
    /// the process runs out of file descriptors, the oldest pending
    /// handshake is closed to make room for the new connection, so a flood
    /// of half-sent requests cannot lock out other clients. The gateway uses
    /// at most half its open-file limit for them, leaving the rest to
    /// clients, lobbies and origin connections. Defaults to 1024.
    pub max_pending_handshakes: usize,
    /// Browser origins allowed to connect (`https://app.example`); a request
    /// whose `Origin` header is not listed gets 403. Requests without an
    /// `Origin` header (non-browser clients) are not affected. Empty allows
    /// every origin. Defaults to empty.
    pub allowed_origins: Vec<String>,
    /// Says that every browser origin may connect even though client
    /// messages are forwarded upstream: with [`ClientMessages::Forward`],
    /// [`Config::validate`] refuses an empty [`Config::allowed_origins`]
    /// unless this is set, since any web page could otherwise send messages
    /// to the origin with the gateway's credentials. Defaults to false.
    pub allow_any_origin: bool,
    /// Most frames (data and control) a client may send per second, with a
    /// burst of as many; each frame is counted as it is decoded, before it is
    /// answered or forwarded, and a client over the limit is closed with 1008
    /// and its further input ignored. 0 means no limit. Defaults to 100.
    pub max_client_rate: u32,
    /// A client silent this long is pinged; one that stays silent as long
    /// again is closed. Defaults to 30 s.
    pub client_ping: Duration,
    /// What happens to a client that cannot keep up. Defaults to
    /// [`SlowClient::Drop`].
    pub slow_client: SlowClient,
    /// With [`SlowClient::Disconnect`], frames a client may lose within a
    /// minute before it is closed with 1013. Defaults to 256.
    pub slow_client_drops: u64,
    /// What happens to the text and binary messages clients send. Defaults
    /// to [`ClientMessages::Drop`].
    pub client_messages: ClientMessages,
    /// Clients per lobby, hence per origin connection. Defaults to 512.
    pub lobby_capacity: usize,
    /// Frames queued per client before the oldest is dropped. Defaults to 16.
    pub queue_depth: usize,
    /// Writer threads serving client sockets. Defaults to 2.
    pub writers: usize,
    /// How long a client's frames may wait to be written together (fewer,
    /// larger writes: less CPU, more latency). Zero writes as soon as frames
    /// arrive. Defaults to 0.
    pub write_batch: Duration,
    /// Most lobbies, hence origin connections; 0 means no limit. When every
    /// lobby is full and the limit is reached, new clients get 503 with
    /// Retry-After. Defaults to 0.
    pub max_origin_connections: usize,
    /// How often the manager checks whether the clients fit in fewer lobbies
    /// and migrates them if so; zero turns compaction off. Defaults to 10 s.
    pub compact_interval: Duration,
    /// Fill, as a fraction of capacity, that compaction packs lobbies to.
    /// Defaults to 0.9.
    pub compact_fill: f64,
    /// Frames a new client is sent from its lobby's recent history before the
    /// live stream (at most [`Config::history_len`]). Defaults to 0.
    pub replay: usize,
    /// How long an empty lobby keeps its thread before it ends. Defaults to 5 s.
    pub lobby_linger: Duration,
    /// Time a client has to complete the HTTP upgrade. Defaults to 10 s.
    pub handshake_timeout: Duration,
    /// Largest HTTP upgrade request accepted, in bytes; larger gets 431. Defaults to 8 KiB.
    pub max_request_bytes: usize,
    /// Largest client message, in bytes; larger closes the client with 1009.
    /// Defaults to 64 KiB.
    pub max_client_message: usize,
    /// Kernel send buffer of each client socket (`SO_SNDBUF`), in bytes; 0
    /// leaves it to the kernel's autotuning. Defaults to 0. A client that
    /// stops reading first fills this buffer, then its queue, and only then
    /// loses its oldest frames: autotuning lets megabytes wait there, which a
    /// small-message feed takes minutes to fill, so such a client later reads
    /// that old backlog. A small buffer (tens of KiB) keeps what a slow client
    /// reads fresh, at the cost of throughput to distant clients (a window of
    /// at most this much per round trip).
    pub client_send_buffer: usize,
    /// Most bytes written to a client socket but not yet sent
    /// (`TCP_NOTSENT_LOWAT`); 0 leaves the kernel default. A client that
    /// stops reading then holds at most its queue plus about this much in
    /// the kernel, instead of the megabytes send-buffer autotuning allows,
    /// and reads fresh frames when it resumes; bytes in flight (what a
    /// distant fast client needs) are not limited. Defaults to 16 KiB.
    pub client_unsent: usize,
    /// Largest origin message, in bytes; larger drops the origin connection.
    /// Defaults to 16 MiB.
    pub max_origin_message: usize,
    /// First delay before reconnecting to a failed origin. Defaults to 100 ms.
    pub origin_backoff_min: Duration,
    /// Longest delay between origin reconnect attempts. Defaults to 30 s.
    pub origin_backoff_max: Duration,
    /// Bound on TCP connect, TLS handshake and WebSocket upgrade to the origin.
    /// Defaults to 10 s.
    pub origin_connect_timeout: Duration,
    /// Interval between pings a lobby sends its origin. Defaults to 15 s.
    pub origin_ping: Duration,
    /// An origin connection with nothing received (data or pong) for this long
    /// is declared dead and replaced. Defaults to 45 s.
    pub origin_timeout: Duration,
    /// What a lobby does with its clients when its origin connection fails.
    /// Defaults to [`OriginLoss::Keep`].
    pub on_origin_loss: OriginLoss,
    /// Extra headers sent on every origin handshake (credentials, say);
    /// clients never see them. Defaults to none.
    pub origin_headers: Vec<(String, String)>,
    /// Text messages sent, in order, right after every origin (re)connect and
    /// before anything is forwarded (a subscribe request, say). Defaults to none.
    pub origin_init: Vec<String>,
    /// Subprotocols offered on the origin handshake. Defaults to none.
    pub origin_subprotocols: Vec<String>,
    /// PEM file of the CA that signs the origin's certificate, for `wss://`
    /// origins with a private CA; replaces the built-in web roots. Defaults to none.
    pub origin_ca: Option<PathBuf>,
    /// On shutdown, how long clients get to receive what is queued and the
    /// 1001 close. Defaults to 5 s.
    pub drain_timeout: Duration,
    /// Address of the admin HTTP server (`/metrics`, `/livez`, `/readyz`,
    /// `/lobbies`, a dashboard at `/`), never the client listener. Bind it
    /// where only operators reach it. Needs the `admin` feature. Defaults
    /// to none (no admin server).
    pub admin: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            origin: String::new(),
            path: "/".to_owned(),
            max_clients: 0,
            max_clients_per_ip: 0,
            ipv6_prefix: 64,
            max_pending_handshakes: 1024,
            allowed_origins: Vec::new(),
            allow_any_origin: false,
            max_client_rate: 100,
            client_ping: Duration::from_secs(30),
            slow_client: SlowClient::Drop,
            slow_client_drops: 256,
            client_messages: ClientMessages::Drop,
            lobby_capacity: 512,
            queue_depth: 16,
            writers: 2,
            write_batch: Duration::ZERO,
            max_origin_connections: 0,
            compact_interval: Duration::from_secs(10),
            compact_fill: 0.9,
            replay: 0,
            lobby_linger: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_request_bytes: 8 * 1024,
            max_client_message: 64 * 1024,
            client_send_buffer: 0,
            client_unsent: 16 * 1024,
            max_origin_message: 16 << 20,
            origin_backoff_min: Duration::from_millis(100),
            origin_backoff_max: Duration::from_secs(30),
            origin_connect_timeout: Duration::from_secs(10),
            origin_ping: Duration::from_secs(15),
            origin_timeout: Duration::from_secs(45),
            on_origin_loss: OriginLoss::Keep,
            origin_headers: Vec::new(),
            origin_init: Vec::new(),
            origin_subprotocols: Vec::new(),
            origin_ca: None,
            drain_timeout: Duration::from_secs(5),
            admin: None,
        }
    }
}

/// What a lobby does with its clients when its origin connection fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OriginLoss {
    /// Keep clients connected; they resume receiving after the reconnect.
    #[default]
    Keep,
    /// Close clients with 1012 (service restart) so they reconnect, perhaps
    /// to another gateway.
    Close,
}

impl std::str::FromStr for OriginLoss {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "keep" => Ok(OriginLoss::Keep),
            "close" => Ok(OriginLoss::Close),
            _ => Err(format!("expected keep or close, not {s:?}")),
        }
    }
}

/// What happens to a client that cannot keep up with its lobby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlowClient {
    /// Its queue drops its oldest frames; it stays connected.
    #[default]
    Drop,
    /// Beyond [`Config::slow_client_drops`] drops in a minute, close it with 1013.
    Disconnect,
}

impl std::str::FromStr for SlowClient {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "drop" => Ok(SlowClient::Drop),
            "disconnect" => Ok(SlowClient::Disconnect),
            _ => Err(format!("expected drop or disconnect, not {s:?}")),
        }
    }
}

/// What happens to the text and binary messages clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientMessages {
    /// Read and discarded: the feed is one-way.
    #[default]
    Drop,
    /// Sent upstream on the client's lobby's origin connection (what the
    /// origin answers is broadcast as usual).
    Forward,
}

impl std::str::FromStr for ClientMessages {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "drop" => Ok(ClientMessages::Drop),
            "forward" => Ok(ClientMessages::Forward),
            _ => Err(format!("expected drop or forward, not {s:?}")),
        }
    }
}

/// Most writer threads a gateway may run; more would only add hand-offs.
const MAX_WRITERS: usize = 256;
/// Highest client frame rate limit accepted (the limiter counts in
/// thousandths of a frame in 32 bits).
const MAX_CLIENT_RATE: u32 = 1_000_000;

impl Config {
    /// Checks every value, returning [`Error::Config`] naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        crate::source::check_url(&self.origin)?;
        self.validate_settings()
    }

    /// Checks every value but the origin URL (a gateway fed by a publisher
    /// has none).
    pub(crate) fn validate_settings(&self) -> Result<()> {
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
        if !(self.compact_fill > 0.0 && self.compact_fill <= 1.0) {
            return bad("compact fill must be above 0 and at most 1");
        }
        if self.replay > self.history_len() {
            return Err(Error::Config(format!(
                "replay must be at most {} (the frames a lobby remembers)",
                self.history_len()
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
        if !(self.client_send_buffer == 0 || (4096..=1 << 30).contains(&self.client_send_buffer)) {
            return bad("client send buffer must be 0 (autotuning) or 4 KiB to 1 GiB");
        }
        if !(self.client_unsent == 0 || (1024..=1 << 30).contains(&self.client_unsent)) {
            return bad("client unsent bytes must be 0 (kernel default) or 1 KiB to 1 GiB");
        }
        if self.ipv6_prefix > 128 {
            return bad("IPv6 prefix must be at most 128 bits");
        }
        if self.max_pending_handshakes == 0 {
            return bad("max pending handshakes must be at least 1");
        }
        if self.max_client_rate > MAX_CLIENT_RATE {
            return Err(Error::Config(format!(
                "max client rate must be at most {MAX_CLIENT_RATE} frames a second"
            )));
        }
        if self.client_messages == ClientMessages::Forward
            && self.allowed_origins.is_empty()
            && !self.allow_any_origin
        {
            return bad(
                "forwarding client messages needs --allow-origin (the browser origins that may \
                 send upstream) or an explicit --allow-any-origin",
            );
        }
        if self.origin_backoff_min.is_zero() || self.origin_backoff_min > self.origin_backoff_max {
            return bad("origin backoff must satisfy 0 < min <= max");
        }
        if self.origin_connect_timeout.is_zero() {
            return bad("origin connect timeout must be above zero");
        }
        if self.write_batch > Duration::from_secs(1) {
            return bad("write batch window must be at most 1 s");
        }
        if self.client_ping.is_zero() {
            return bad("client ping interval must be above zero");
        }
        for origin in &self.allowed_origins {
            if origin
                .parse::<Uri>()
                .map_or(true, |u| u.scheme().is_none() || u.host().is_none())
            {
                return Err(Error::Config(format!(
                    "allowed origin {origin:?} is not a scheme://host[:port] origin"
                )));
            }
        }
        if self.origin_ping.is_zero() || self.origin_timeout <= self.origin_ping {
            return bad("origin liveness must satisfy 0 < ping interval < timeout");
        }
        for (name, value) in &self.origin_headers {
            if HeaderName::try_from(name.as_str()).is_err()
                || HeaderValue::try_from(value.as_str()).is_err()
            {
                return Err(Error::Config(format!(
                    "origin header {name:?} is not valid"
                )));
            }
        }
        if self
            .admin
            .is_some_and(|a| a == self.listen && a.port() != 0)
        {
            return bad("the admin address must differ from the client listen address");
        }
        if self.admin.is_some() && !cfg!(feature = "admin") {
            return bad("an admin address needs a build with the admin server (feature `admin`)");
        }
        for protocol in &self.origin_subprotocols {
            if protocol.is_empty() || !protocol.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
                return Err(Error::Config(format!(
                    "origin subprotocol {protocol:?} is not a valid token"
                )));
            }
        }
        Ok(())
    }

    /// Frames each lobby remembers, for gap-free migrations and replay:
    /// well above the queue depth (4×), and at least 64. Of large frames it
    /// holds fewer: beyond the newest `max(queue_depth, replay)`, only 1 MiB.
    pub fn history_len(&self) -> usize {
        self.queue_depth.saturating_mul(4).max(64)
    }

    /// Most clients the lobbies can hold given the origin connection limit, if any.
    pub(crate) fn lobby_seats(&self) -> Option<u64> {
        (self.max_origin_connections > 0).then(|| {
            (self.max_origin_connections as u64).saturating_mul(self.lobby_capacity as u64)
        })
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
        for origin in ["http://x/", "x", "ws://", "ws:// bad"] {
            let err = with_origin(origin).validate().unwrap_err();
            assert!(err.to_string().contains("origin URL"), "{origin}: {err}");
        }
    }

    #[test]
    fn wss_needs_the_tls_feature() {
        assert_eq!(
            with_origin("wss://h/").validate().is_ok(),
            cfg!(feature = "tls")
        );
    }

    #[test]
    fn rejects_bad_origin_settings() {
        let mut c = with_origin("ws://h/");
        c.origin_headers = vec![("Bad Name".into(), "v".into())];
        assert!(c.validate().is_err());
        let mut c = with_origin("ws://h/");
        c.origin_headers = vec![("Authorization".into(), "Bearer x\n".into())];
        assert!(c.validate().is_err());
        let mut c = with_origin("ws://h/");
        c.origin_timeout = c.origin_ping;
        assert!(c.validate().is_err());
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

    #[test]
    fn forwarding_needs_the_browser_origins_said() {
        let mut c = with_origin("ws://h/");
        c.client_messages = ClientMessages::Forward;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--allow-any-origin"), "{err}");
        c.allowed_origins = vec!["https://app.example".into()];
        assert!(c.validate().is_ok());
        c.allowed_origins.clear();
        c.allow_any_origin = true;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn admission_and_buffering_limits_are_sane() {
        let mut c = with_origin("ws://h/");
        c.ipv6_prefix = 129;
        assert!(c.validate().is_err());
        let mut c = with_origin("ws://h/");
        c.max_pending_handshakes = 0;
        assert!(c.validate().is_err());
        let mut c = with_origin("ws://h/");
        c.max_client_rate = MAX_CLIENT_RATE + 1;
        assert!(c.validate().is_err());
        for (bytes, ok) in [(0, true), (1023, false), (1024, true), (1 << 31, false)] {
            let mut c = with_origin("ws://h/");
            c.client_unsent = bytes;
            assert_eq!(c.validate().is_ok(), ok, "{bytes}");
        }
    }

    #[test]
    fn client_send_buffer_is_autotuned_or_sane() {
        for (bytes, ok) in [
            (0, true),
            (1, false),
            (4095, false),
            (4096, true),
            (1 << 31, false),
        ] {
            let mut c = with_origin("ws://h/");
            c.client_send_buffer = bytes;
            assert_eq!(c.validate().is_ok(), ok, "{bytes}");
        }
    }

    #[test]
    #[cfg(feature = "admin")]
    fn the_admin_server_never_shares_the_client_listener() {
        let mut c = with_origin("ws://h/");
        c.admin = Some(c.listen);
        assert!(c.validate().is_err());
        c.admin = Some(SocketAddr::from(([127, 0, 0, 1], 9090)));
        assert!(c.validate().is_ok());
        c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.admin = Some(c.listen);
        assert!(c.validate().is_ok(), "port 0 binds two different ports");
    }
}
