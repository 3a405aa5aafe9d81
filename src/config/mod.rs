//! Every knob of the gateway, its default, and its validation: the one
//! definition of each setting.
//!
//! [`Config`] is a plain struct that an embedder fills in code, a config
//! file fills through serde ([`Config::from_toml`], `file.rs`: TOML,
//! durations as `250ms` or `10s`, unknown keys refused with their line),
//! and the CLI overrides flag by flag (`cli.rs`, beside the binary). Its
//! [`Default`] is the only place a default is written. Route settings at
//! the top level are the defaults of every route; a `[[route]]` table
//! ([`RouteConfig`]) overrides them for its path. [`Config::validate`]
//! (`validate.rs`) checks it all once, before any thread starts or a reload
//! applies. The text forms of values live in `syntax.rs`, the source URLs'
//! grammar in `url.rs`; the sources parse their URLs with it too, so it
//! stands below them. Nothing here opens sockets or spawns threads.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

#[cfg(feature = "config-file")]
use serde::{Deserialize, Serialize};

mod auth;
#[cfg(feature = "config-file")]
mod file;
pub(crate) mod syntax;
mod tls;
pub(crate) mod url;
mod validate;

pub use auth::AuthConfig;
pub use syntax::{parse_duration, parse_fraction, parse_header};
#[cfg(feature = "tls")]
pub(crate) use tls::DEFAULT_NAME as DEFAULT_CERT_NAME;
pub use tls::{SniCert, TlsConfig};

/// Gateway configuration. Start from [`Config::default`] and change what you need.
///
/// Settings marked *per route* are the defaults of every route and can be
/// overridden in a [`RouteConfig`]; the others are gateway-wide.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "config-file", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "config-file", serde(default, deny_unknown_fields))]
#[non_exhaustive]
pub struct Config {
    /// Address the client listener binds. Port 0 picks a free port.
    /// Defaults to `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// Set `SO_REUSEPORT` on the client listener, so several gateway
    /// processes can bind [`Config::listen`] together and the kernel spreads
    /// new connections over them (Linux hashes each connection to one of
    /// the listening sockets). One process per core is how this
    /// thread-per-lobby design uses a bigger machine. Every process sharing
    /// the address must set it. Needs a Unix system. Defaults to false.
    pub reuse_port: bool,
    /// Upstream URL of the route served at [`Config::path`] (the short
    /// form of one [`RouteConfig`]); its scheme picks the source: a
    /// WebSocket origin (`ws://host[:port]/path`, `wss://` with the `tls`
    /// feature), or with the `redis` feature a Redis pub/sub channel
    /// (`redis://[[user]:password@]host[:port][/db]/channel`, `rediss://`
    /// with TLS) or stream (`redis+stream://…/key[?field=NAME]`, reading
    /// each entry's `data` field unless `field` names another). Clients
    /// never choose it. Empty serves only [`Config::routes`], or the
    /// [`Publisher`](crate::Publisher) of a gateway built with
    /// [`Builder::publisher`](crate::Builder::publisher); with none of
    /// these, [`Config::validate`] refuses the configuration. Defaults to
    /// empty.
    pub origin: String,
    /// Request path of the route [`Config::origin`] describes. Defaults to `/`.
    pub path: String,
    /// Routes: each a path clients connect to and its own upstream, with
    /// overrides of the per-route settings. A client joins lobbies of its
    /// route only; a path no route serves gets 404. Defaults to none.
    #[cfg_attr(feature = "config-file", serde(rename = "route"))]
    pub routes: Vec<RouteConfig>,
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
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub client_ping: Duration,
    /// How often an idle Server-Sent Events stream (feature `sse`) gets a
    /// heartbeat comment, so proxies keep it open and a vanished client is
    /// noticed. Defaults to 15 s.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub sse_heartbeat: Duration,
    /// The reconnection delay SSE clients are told (`retry:`), after which
    /// a browser's EventSource reconnects and resumes. Defaults to 1 s.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub sse_retry: Duration,
    /// What happens to a client that cannot keep up. Defaults to
    /// [`SlowClient::Drop`].
    pub slow_client: SlowClient,
    /// What happens to a client that carries message IDs (an event stream,
    /// a WebSocket resume client; feature `sse`) when its queue is full.
    /// Defaults to [`SlowStream::Close`].
    pub slow_stream: SlowStream,
    /// With [`SlowClient::Disconnect`], frames a client may lose within a
    /// minute before it is closed with 1013. Defaults to 256.
    pub slow_client_drops: u64,
    /// What happens to the text and binary messages clients send. Defaults
    /// to [`ClientMessages::Drop`].
    pub client_messages: ClientMessages,
    /// Clients per lobby, hence per origin connection. Per route. Defaults to 512.
    pub lobby_capacity: usize,
    /// Frames queued per client before the oldest is dropped (an event
    /// stream's queue is twice as deep, and closes its stream when full).
    /// Per route. Defaults to 16.
    pub queue_depth: usize,
    /// Writer threads serving client sockets. Defaults to 2.
    pub writers: usize,
    /// How long a client's frames may wait to be written together (fewer,
    /// larger writes: less CPU, more latency). Zero writes as soon as frames
    /// arrive. Defaults to 0.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub write_batch: Duration,
    /// Most lobbies, hence origin connections; 0 means no limit. When every
    /// lobby is full and the limit is reached, new clients get 503 with
    /// Retry-After. Per route. Defaults to 0.
    pub max_origin_connections: usize,
    /// How often the manager checks whether the clients fit in fewer lobbies
    /// and migrates them if so; zero turns compaction off. Defaults to 10 s.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub compact_interval: Duration,
    /// Fill, as a fraction of capacity, that compaction packs lobbies to.
    /// Defaults to 0.9.
    pub compact_fill: f64,
    /// Frames a new client is sent from its lobby's recent history before the
    /// live stream (at most [`Config::history_len`]). Per route. Defaults to 0.
    pub replay: usize,
    /// Messages each lobby remembers, for resume, gap-free migrations and
    /// replay; at least 4 × [`Config::queue_depth`] whatever is set here
    /// (see [`Config::history_len`]). Per route; a reload applies it to
    /// lobbies started after it. Defaults to 256: 5 s of a 50 msg/s feed.
    pub history: usize,
    /// Bytes of messages each lobby keeps beyond its newest
    /// `max(queue_depth, replay)` (which it keeps whatever their size):
    /// older ones are forgotten first, so large messages do not make every
    /// lobby hold [`Config::history`] of them. Per route; a reload applies
    /// it to lobbies started after it. Defaults to 1 MiB.
    pub history_bytes: usize,
    /// How long an empty lobby keeps its thread and its origin connection
    /// (and goes on recording its history) before it ends, so clients back
    /// within it resume with nothing lost. Defaults to 5 s.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub lobby_linger: Duration,
    /// Time a client has to complete the HTTP upgrade. Defaults to 10 s.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub handshake_timeout: Duration,
    /// Nice value (1-19) the acceptor thread adds to the process's on Linux,
    /// where it is per thread: when the CPU is short, admitting clients
    /// (accepts, upgrades, TLS handshakes, JWT checks) yields to the lobbies
    /// and writers serving those already connected, so a reconnect storm
    /// takes longer instead of delaying everyone's messages. With the CPU
    /// to spare it changes nothing. A CPU hog beside the gateway at normal
    /// priority slows admission too, to handshake timeouts. 0 leaves the
    /// acceptor as the process. Needs a restart. Defaults to 0.
    pub acceptor_nice: u8,
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
    /// Per route. Defaults to 16 MiB.
    pub max_origin_message: usize,
    /// First delay before reconnecting to a failed origin. Defaults to 100 ms.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub origin_backoff_min: Duration,
    /// Longest delay between origin reconnect attempts. Defaults to 30 s.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub origin_backoff_max: Duration,
    /// Bound on TCP connect, TLS handshake and WebSocket upgrade to the origin.
    /// Defaults to 10 s.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub origin_connect_timeout: Duration,
    /// Interval between pings a lobby sends its origin. Defaults to 15 s.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub origin_ping: Duration,
    /// An origin connection with nothing received (data or pong) for this long
    /// is declared dead and replaced. Defaults to 45 s.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub origin_timeout: Duration,
    /// What a lobby does with its clients when its origin connection fails.
    /// Per route. Defaults to [`OriginLoss::Keep`].
    pub on_origin_loss: OriginLoss,
    /// Extra headers sent on every origin handshake (credentials, say);
    /// clients never see them. `Host` replaces the URL's host (a virtual
    /// host behind an IP address); the headers the upgrade sets itself
    /// (`Connection`, `Upgrade`, `Sec-WebSocket-*`) are refused. In a config
    /// file, `"Name: value"` strings. Per route. Defaults to none.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::headers"))]
    pub origin_headers: Vec<(String, String)>,
    /// Text messages sent, in order, right after every origin (re)connect and
    /// before anything is forwarded (a subscribe request, say). Per route.
    /// Defaults to none.
    pub origin_init: Vec<String>,
    /// Subprotocols offered on the origin handshake. Per route. Defaults to none.
    pub origin_subprotocols: Vec<String>,
    /// PEM file of the CA that signs the origin's certificate, for `wss://`
    /// origins with a private CA; replaces the built-in web roots. Defaults to none.
    pub origin_ca: Option<PathBuf>,
    /// PEM file of the certificate chain (leaf first) the client listener
    /// presents (the default one, where [`Config::tls`] lists certificates
    /// by name): with it and [`Config::tls_key`], clients connect with
    /// `wss://` (TLS 1.2 or 1.3, ALPN `http/1.1`) and plain `ws://` is no
    /// longer served. Re-read on reload; a pair that cannot be used then
    /// keeps the running one. Needs the `tls` feature. Defaults to none.
    pub tls_cert: Option<PathBuf>,
    /// PEM file of the private key of [`Config::tls_cert`] (PKCS#8, PKCS#1
    /// or SEC1). Defaults to none.
    pub tls_key: Option<PathBuf>,
    /// Certificates served instead of [`Config::tls_cert`] to clients that
    /// ask for one of their names (SNI); see [`TlsConfig`]. In a config
    /// file, `[[tls.cert]]` tables. Defaults to none.
    #[cfg_attr(
        feature = "config-file",
        serde(skip_serializing_if = "TlsConfig::is_empty")
    )]
    pub tls: TlsConfig,
    /// A second client listener, serving `wss://` with the certificates
    /// above while [`Config::listen`] serves plain `ws://`, both into the
    /// same routes and lobbies. Without it, the certificates make
    /// [`Config::listen`] itself `wss://`. Needs [`Config::tls_cert`].
    /// Changes only with a restart. Defaults to none.
    pub tls_listen: Option<SocketAddr>,
    /// Threads that spend `wss://` handshakes' CPU (a key exchange and a
    /// signature each), so that a storm of TLS reconnects uses every core
    /// rather than the acceptor's one; they run at
    /// [`Config::acceptor_nice`]. 0 runs handshakes on the acceptor
    /// itself. At most 64. Changes only with a restart. Defaults to 2.
    pub tls_threads: usize,
    /// On shutdown, how long clients get to receive what is queued and the
    /// 1001 close. Defaults to 5 s.
    #[cfg_attr(feature = "config-file", serde(with = "syntax::duration"))]
    pub drain_timeout: Duration,
    /// Address of the admin HTTP server (`/metrics`, `/livez`, `/readyz`,
    /// `/lobbies`, a dashboard at `/`), never the client listener. Bind it
    /// where only operators reach it. Needs the `admin` feature. Defaults
    /// to none (no admin server).
    pub admin: Option<SocketAddr>,
    /// Subprotocols clients may ask for (`Sec-WebSocket-Protocol`): the
    /// gateway answers with the first one the client offers that is listed
    /// here. Per route. Defaults to none (the header is ignored).
    pub subprotocols: Vec<String>,
    /// Refuse (400) a client that offers none of [`Config::subprotocols`].
    /// Per route. Defaults to false.
    pub require_subprotocol: bool,
    /// Key lobbies by the client's query string: clients share lobbies (and
    /// upstream connections) only with clients of the same normalised query
    /// (the parameters named in [`Config::query_params`], sorted), which is
    /// appended to the origin URL. Without it a query string is ignored.
    /// Per route. Defaults to false.
    pub pass_query: bool,
    /// With [`Config::pass_query`], the query parameters that make a lobby's
    /// key (others are dropped). Per route. Defaults to none.
    pub query_params: Vec<String>,
    /// With [`Config::pass_query`], most distinct keys at once; clients with
    /// a new key beyond it get 503. 0 means no limit. Per route. Defaults to 0.
    pub max_keys: usize,
    /// Negotiate `permessage-deflate` (RFC 7692) with clients that offer it
    /// (every browser does): each message at least [`Config::compress_min`]
    /// bytes is compressed once per lobby and shared by its compressing
    /// clients, and their compressed messages are inflated within
    /// [`Config::max_client_message`]. Needs the `compression` feature (a
    /// build without it never negotiates). Per route. Defaults to true.
    pub compression: bool,
    /// Smallest message, in bytes, that is sent compressed; smaller ones (and
    /// any that deflate does not make smaller) go out uncompressed to every
    /// client. Per route. Defaults to 256.
    pub compress_min: usize,
    /// Who may connect: a JWT checked against a key, an auth service asked,
    /// or both; see [`AuthConfig`]. In a config file, the `[auth]` table.
    /// Per route. Defaults to no auth.
    pub auth: AuthConfig,
    /// Threads asking auth services ([`AuthConfig::url`]); the acceptor
    /// never waits on one. Defaults to 4.
    pub auth_threads: usize,
    /// Upgrades waiting for an auth thread at most; beyond, 503 at once.
    /// They count against [`Config::max_pending_handshakes`] too. Defaults
    /// to 256.
    pub auth_queue: usize,
    /// File holding the bearer token the admin server requires on every
    /// path but `/livez` and `/readyz` (Prometheus sends it with
    /// `bearer_token_file`); re-read on reload. Defaults to none (no token
    /// needed: bind the admin server where only operators reach it).
    pub admin_token_file: Option<PathBuf>,
}

/// One route of a [`Config`]: the path clients connect to, its upstream, and
/// overrides of the per-route settings (`None`: the top level's value). In a
/// config file, a `[[route]]` table.
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "config-file", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "config-file", serde(deny_unknown_fields))]
#[non_exhaustive]
pub struct RouteConfig {
    /// Request path clients connect to, e.g. `/prices`.
    pub path: String,
    /// Upstream URL of this route's lobbies.
    pub origin: String,
    /// Overrides [`Config::lobby_capacity`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub lobby_capacity: Option<usize>,
    /// Overrides [`Config::queue_depth`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub queue_depth: Option<usize>,
    /// Overrides [`Config::replay`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub replay: Option<usize>,
    /// Overrides [`Config::history`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub history: Option<usize>,
    /// Overrides [`Config::history_bytes`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub history_bytes: Option<usize>,
    /// Overrides [`Config::max_origin_connections`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub max_origin_connections: Option<usize>,
    /// Overrides [`Config::max_origin_message`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub max_origin_message: Option<usize>,
    /// Overrides [`Config::on_origin_loss`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub on_origin_loss: Option<OriginLoss>,
    /// Overrides [`Config::origin_headers`].
    #[cfg_attr(
        feature = "config-file",
        serde(
            default,
            with = "syntax::opt_headers",
            skip_serializing_if = "Option::is_none"
        )
    )]
    pub origin_headers: Option<Vec<(String, String)>>,
    /// Overrides [`Config::origin_init`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub origin_init: Option<Vec<String>>,
    /// Overrides [`Config::origin_subprotocols`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub origin_subprotocols: Option<Vec<String>>,
    /// Overrides [`Config::subprotocols`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub subprotocols: Option<Vec<String>>,
    /// Overrides [`Config::require_subprotocol`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub require_subprotocol: Option<bool>,
    /// Overrides [`Config::pass_query`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub pass_query: Option<bool>,
    /// Overrides [`Config::query_params`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub query_params: Option<Vec<String>>,
    /// Overrides [`Config::max_keys`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub max_keys: Option<usize>,
    /// Overrides [`Config::compression`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub compression: Option<bool>,
    /// Overrides [`Config::compress_min`].
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub compress_min: Option<usize>,
    /// Replaces [`Config::auth`] whole (an empty table: no auth).
    #[cfg_attr(
        feature = "config-file",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub auth: Option<AuthConfig>,
}

impl RouteConfig {
    /// A route serving `path` from `origin`, with every per-route setting
    /// taken from the top level.
    pub fn new(path: &str, origin: &str) -> RouteConfig {
        RouteConfig {
            path: path.to_owned(),
            origin: origin.to_owned(),
            ..RouteConfig::default()
        }
    }

    /// `defaults` with this route's path, origin and overrides: the
    /// settings its lobbies run with.
    fn apply(&self, defaults: &Config) -> Config {
        let mut c = defaults.clone();
        c.routes = Vec::new();
        c.path.clone_from(&self.path);
        c.origin.clone_from(&self.origin);
        macro_rules! set {
            ($($field:ident),*) => {
                $(if let Some(value) = &self.$field {
                    c.$field = value.clone();
                })*
            };
        }
        set!(
            lobby_capacity,
            queue_depth,
            replay,
            history,
            history_bytes,
            max_origin_connections,
            max_origin_message,
            on_origin_loss,
            origin_headers,
            origin_init,
            origin_subprotocols,
            subprotocols,
            require_subprotocol,
            pass_query,
            query_params,
            max_keys,
            compression,
            compress_min,
            auth
        );
        c
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            reuse_port: false,
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
            sse_heartbeat: Duration::from_secs(15),
            sse_retry: Duration::from_secs(1),
            slow_client: SlowClient::Drop,
            slow_stream: SlowStream::Close,
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
            history: 256,
            history_bytes: 1 << 20,
            lobby_linger: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            acceptor_nice: 0,
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
            tls_cert: None,
            tls_key: None,
            tls: TlsConfig::default(),
            tls_listen: None,
            tls_threads: 2,
            drain_timeout: Duration::from_secs(5),
            admin: None,
            routes: Vec::new(),
            subprotocols: Vec::new(),
            require_subprotocol: false,
            pass_query: false,
            query_params: Vec::new(),
            max_keys: 0,
            compression: true,
            compress_min: 256,
            auth: AuthConfig::default(),
            auth_threads: 4,
            auth_queue: 256,
            admin_token_file: None,
        }
    }
}

/// What a lobby does with its clients when its origin connection fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "config-file", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "config-file", serde(rename_all = "lowercase"))]
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
#[cfg_attr(feature = "config-file", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "config-file", serde(rename_all = "lowercase"))]
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

/// What happens to a client that carries message IDs (an event stream, a
/// WebSocket resume client) when its queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "config-file", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "config-file", serde(rename_all = "lowercase"))]
pub enum SlowStream {
    /// Its connection is closed (a WebSocket after what it has queued, with
    /// 1013), and it resumes from the history with nothing lost.
    #[default]
    Close,
    /// Its queue drops its oldest, as a plain WebSocket client's does: it
    /// stays connected, and the IDs it sees skip what it lost.
    Drop,
}

impl std::str::FromStr for SlowStream {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "close" => Ok(SlowStream::Close),
            "drop" => Ok(SlowStream::Drop),
            _ => Err(format!("expected close or drop, not {s:?}")),
        }
    }
}

/// What happens to the text and binary messages clients send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "config-file", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "config-file", serde(rename_all = "lowercase"))]
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

impl Config {
    /// Every route, each as the full settings its lobbies run with (the
    /// top level with the route's path, origin and overrides): the route
    /// [`Config::origin`] describes first, if any, then [`Config::routes`].
    pub fn route_configs(&self) -> Vec<Config> {
        self.serving(false)
    }

    /// The routes a gateway serves, as [`Config::route_configs`]; with
    /// `fed`, the first is the route an in-process publisher feeds, at
    /// [`Config::path`] with no origin URL.
    pub(crate) fn serving(&self, fed: bool) -> Vec<Config> {
        let short =
            (fed || !self.origin.is_empty()).then(|| RouteConfig::new(&self.path, &self.origin));
        short
            .iter()
            .chain(&self.routes)
            .map(|route| route.apply(self))
            .collect()
    }

    /// Messages each lobby remembers, for resume, gap-free migrations and
    /// replay: [`Config::history`], and at least 4 × the queue depth (a
    /// migration matches positions within it). Of large messages it holds
    /// fewer: beyond the newest `max(queue_depth, replay)`, only
    /// [`Config::history_bytes`].
    pub fn history_len(&self) -> usize {
        self.history.max(self.queue_depth.saturating_mul(4))
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
    use super::{validate::MAX_CLIENT_RATE, *};

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
            assert!(err.to_string().contains("origin: "), "{origin}: {err}");
        }
    }

    #[test]
    fn a_refused_url_is_shown_without_its_credentials() {
        let mut urls = vec!["ws://user:s3cret@h/feed", "wss://:s3cret@h:0/"];
        if cfg!(feature = "redis") {
            urls.push("redis://:s3cret@h:70000/ch");
        }
        for origin in urls {
            let err = with_origin(origin).validate().unwrap_err().to_string();
            assert!(err.contains("***@h"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        if cfg!(feature = "auth") {
            let mut c = with_origin("ws://h/");
            c.auth.url = Some("https://user:s3cret@auth.example/check".to_owned());
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("***@auth.example"), "{err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn allowed_origins_are_scheme_host_and_port() {
        for good in [
            "https://app.example",
            "http://localhost:3000/",
            "https://[::1]:8443",
        ] {
            let mut c = with_origin("ws://h/");
            c.allowed_origins = vec![good.into()];
            assert!(c.validate().is_ok(), "{good}");
        }
        for bad in [
            "app.example",
            "null",
            "https://app.example/page",
            "https://",
            "1x://a",
        ] {
            let mut c = with_origin("ws://h/");
            c.allowed_origins = vec![bad.into()];
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("allowed_origins"), "{bad}: {err}");
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
        c.origin_headers = vec![("Sec-WebSocket-Key".into(), "x".into())];
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("one the upgrade sets itself"), "{err}");
        let mut c = with_origin("ws://h/");
        c.origin_headers = vec![("Host".into(), "feed.example".into())];
        assert!(c.validate().is_ok());
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

    #[cfg(feature = "config-file")]
    #[test]
    fn a_config_file_names_the_line_and_key_of_what_is_wrong() {
        let cases = [
            (
                "listen = \"127.0.0.1:1\"\nlobby_capacty = 5\n",
                "line 2",
                "lobby_capacty",
            ),
            ("queue_depth = \"many\"\n", "line 1", "queue_depth"),
            (
                "\n\ndrain_timeout = \"10 parsecs\"\n",
                "line 3",
                "drain_timeout",
            ),
            (
                "[[route]]\npath = \"/a\"\norigin = \"ws://h/\"\nqueue = 3\n",
                "line 4",
                "queue",
            ),
        ];
        for (text, line, key) in cases {
            let err = Config::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(line) && err.contains(key), "{text:?}: {err}");
            assert_eq!(err.lines().count(), 1, "one line: {err}");
        }
    }

    #[cfg(feature = "config-file")]
    #[test]
    fn routes_inherit_the_top_level_and_override_it() {
        let text = "lobby_capacity = 100\norigin = \"ws://h/all\"\n\
                    [[route]]\npath = \"/book\"\norigin = \"ws://h/book\"\n\
                    lobby_capacity = 10\npass_query = true\nquery_params = [\"symbol\"]\n\
                    origin_headers = [\"Authorization: Bearer x\"]\n";
        let config = Config::from_toml(text).unwrap();
        config.validate().unwrap();
        let routes = config.route_configs();
        assert_eq!(routes.len(), 2);
        assert_eq!(
            (routes[0].path.as_str(), routes[0].lobby_capacity),
            ("/", 100)
        );
        assert_eq!(
            (routes[1].path.as_str(), routes[1].lobby_capacity),
            ("/book", 10)
        );
        assert!(routes[1].pass_query && !routes[0].pass_query);
        assert_eq!(
            routes[1].origin_headers,
            [("Authorization".to_owned(), "Bearer x".to_owned())]
        );
        // Two routes on one path are refused.
        let mut twice = config.clone();
        twice.routes.push(RouteConfig::new("/book", "ws://h/other"));
        let err = twice.validate().unwrap_err().to_string();
        assert!(err.contains("route /book: path"), "{err}");
        // A route's bad value is named with its route.
        let mut bad = config;
        bad.routes[0].lobby_capacity = Some(0);
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("route /book: lobby_capacity"), "{err}");
    }

    #[cfg(feature = "config-file")]
    #[test]
    fn the_file_form_round_trips() {
        let mut config = with_origin("ws://h/feed");
        config.routes.push(RouteConfig {
            replay: Some(3),
            origin_headers: Some(vec![("X-Key".into(), "k".into())]),
            ..RouteConfig::new("/r", "ws://h/r")
        });
        config.write_batch = Duration::from_millis(2);
        config.origin_headers = vec![("Authorization".into(), "Bearer t".into())];
        let text = config.to_toml();
        assert_eq!(Config::from_toml(&text).unwrap(), config, "{text}");
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
    fn tls_needs_a_certificate_and_its_key_together() {
        let mut c = with_origin("ws://h/");
        c.tls_cert = Some("/cert.pem".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("tls_key"), "{err}");
        c.tls_cert = None;
        c.tls_key = Some("/key.pem".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("tls_cert"), "{err}");
        c.tls_cert = Some("/cert.pem".into());
        assert_eq!(c.validate().is_ok(), cfg!(feature = "tls"));
        for (threads, ok) in [(0, true), (64, true), (65, false)] {
            c.tls_threads = threads;
            assert_eq!(
                c.validate().is_ok(),
                ok && cfg!(feature = "tls"),
                "{threads}"
            );
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
