//! The edge: everything between a TCP accept and a client's upgrade.
//!
//! One thread runs here, the acceptor (`acceptor.rs`, `wsgate-acceptor`):
//! it accepts connections, takes a seat for each (`control/seat.rs`),
//! reads and answers the HTTP upgrade (`upgrade.rs`, pure functions over
//! bytes), authenticates the client where its route asks (`auth/`, whose
//! auth threads, `wsgate-auth-N`, ask auth services so the acceptor never
//! waits), sets the client socket's options (`sys.rs`), and hands each
//! upgraded client to the manager as an admission (`control/inbox.rs`).
//! With `tls_cert`, connections speak TLS first (`tls.rs`: the server
//! configuration; the handshake is driven by the acceptor through
//! `wire/tls.rs`, and its CPU spent on the TLS handshake threads,
//! `handshake.rs`, `wsgate-tls-N`).
//! Nothing here places a client in a lobby or writes it a frame.

pub(crate) mod acceptor;
#[cfg(feature = "auth")]
pub(crate) mod auth;
#[cfg(feature = "tls")]
pub(crate) mod handshake;
pub(crate) mod sys;
#[cfg(feature = "tls")]
pub(crate) mod tls;
pub(crate) mod upgrade;
