//! wsgate: one feed, fanned out to tens of thousands of WebSocket clients.
//!
//! Clients connect to the gateway; the gateway groups them into **lobbies**
//! (512 clients by default), and each lobby reads **one** upstream
//! [source](Config::origin) and broadcasts every message to its members:
//! a WebSocket origin (one connection per lobby), a Redis pub/sub channel
//! or stream (with the `redis` feature), or this program's own messages
//! through a [`Publisher`]. Each client has a bounded queue (16 frames by
//! default) that drops its **oldest** frame when full, so a slow client
//! never slows anyone else.
//!
//! Everything is synchronous: a handful of threads talking over crossbeam
//! channels, no async runtime.
//!
//! Clients that offer `permessage-deflate` (with the default `compression`
//! feature) get each message compressed once per lobby and shared, like the
//! uncompressed frame the others get ([`Config::compression`]).
//!
//! ```text
//! clients ─▶ acceptor (mio: accept, HTTP upgrade) ─Admit─▶ manager (placement, lifecycle)
//!                                                             │ Join / Leave
//!   source: ws origin │ Redis channel/stream │ Publisher ──▶ lobby ×L
//!                                                             │ frame encoded once, Arc-shared
//!                                     per-client drop-oldest queue (crossbeam bounded)
//!                                                             ▼
//! clients ◀── vectored writes ── writer pool ×W (mio: sockets, control frames)
//! ```
//!
//! # Embedding
//!
//! A program with data of its own feeds its clients through a
//! [`Publisher`]: each message is encoded once, shared by every client, and
//! publishing never waits for one.
//!
//! ```
//! use wsgate::{Config, Gateway};
//!
//! let mut config = Config::default();
//! config.listen = "127.0.0.1:0".parse().unwrap();
//! let mut builder = Gateway::builder(config);
//! let publisher = builder.publisher();
//! let gateway = builder.start()?;
//! println!("clients connect to ws://{}/", gateway.local_addr());
//! publisher.publish_text(r#"{"tick":1}"#); // to every client connected now
//! assert_eq!(gateway.stats().clients, 0);
//! gateway.shutdown();
//! let last = gateway.join(); // the final counters
//! assert_eq!(last.frames_delivered, 0);
//! # Ok::<(), wsgate::Error>(())
//! ```
//!
//! A gateway in front of an upstream feed takes its URL instead:
//!
//! ```
//! use wsgate::{Config, Gateway};
//!
//! let mut config = Config::default();
//! config.listen = "127.0.0.1:0".parse().unwrap();
//! config.origin = "ws://127.0.0.1:9/feed".to_owned(); // dialled once a client arrives
//! let gateway = Gateway::start(config)?;
//! gateway.shutdown();
//! gateway.join();
//! # Ok::<(), wsgate::Error>(())
//! ```
//!
//! # Cargo features
//!
//! - `tls` (default): `wss://` for clients ([`Config::tls_cert`]), `wss://`
//!   origins and `rediss://`, through rustls.
//! - `redis` (default): Redis pub/sub and stream sources (the `redis`
//!   crate's blocking connection; no async runtime).
//! - `admin` (default): the admin HTTP server, Prometheus metrics and probes.
//! - `cli` (default): the `wsgate` binary (argh, simplelog, signal-hook).
//! - `sse` (default): Server-Sent Events on every route from the same
//!   lobbies, message IDs, and resume after a `Last-Event-ID` from a
//!   lobby's history ([`Config::sse_heartbeat`], [`Config::sse_retry`]).
//!
//! With `default-features = false` the crate is the embeddable core: the
//! gateway, the WebSocket origin and the [`Publisher`].
//!
//! # Operations
//!
//! With [`Config::admin`] set (and the `admin` feature), one more thread
//! serves operators over HTTP: Prometheus metrics at `/metrics` (the
//! `metrics` module), `/livez` and `/readyz` ([`GatewayHandle::liveness`],
//! [`GatewayHandle::readiness`]), the lobby list at `/lobbies` and a
//! dashboard at `/`. An embedding program can instead add
//! `GatewayHandle::metrics_collector` to its own `prometheus_client`
//! registry. The probes need no feature.
//!
//! # Limits and failures
//!
//! A client costs at most its queue of shared frames plus
//! [`Config::client_unsent`] bytes in its socket, however it behaves; its
//! frames are counted against [`Config::max_client_rate`] as they are
//! decoded; its connection counts against its address from accept. Every
//! thread's end is reported: a writer that panics closes its clients with
//! 1011 and carries on, a lobby's clients are placed elsewhere, and the
//! acceptor's or the manager's failure stops the gateway with
//! [`StatsSnapshot::fatal_errors`] set. Why each client left is counted by
//! [`Disconnect`] reason.
//!
//! The binary (`wsgate --origin ws://…` or `wsgate --demo`) is a thin layer
//! over [`Gateway`]; see the README for flags, logging and guarantees.

#![deny(missing_docs, missing_debug_implementations)]
// One audited exception, with its measured reason: `edge/sys.rs`.
#![deny(unsafe_code)]

mod config;
mod control;
mod delivery;
pub mod demo;
mod edge;
mod error;
mod fanout;
#[cfg(feature = "fault-injection")]
#[doc(hidden)]
pub mod fault;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
mod gateway;
mod id;
mod ops;
mod source;
mod stats;
mod wire;

pub use config::{
    AuthConfig, ClientMessages, Config, OriginLoss, RouteConfig, SlowClient, SlowStream, SniCert,
    TlsConfig, parse_duration, parse_fraction, parse_header,
};
pub use control::shutdown::ShutdownHandle;
pub use error::{Error, Result};
pub use gateway::{Builder, Gateway, GatewayHandle, ReloadHandle};
pub use ops::health::Health;
#[cfg(feature = "admin")]
pub use ops::metrics;
pub use source::Publisher;
pub use stats::{
    AuthResult, Disconnect, DropReason, LobbyInfo, OriginState, StatsSnapshot, TlsFailure,
};
