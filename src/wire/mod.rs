//! The bytes on the client's wire: the gateway's one WebSocket codec.
//!
//! `frame.rs` encodes server frames (once per lobby, shared by every
//! member's queue) and decodes client frames; `deflate.rs` compresses and
//! inflates permessage-deflate messages and negotiates the extension;
//! `close.rs` holds the close codes and the violations both report;
//! `handshake.rs` computes the upgrades' accept key; `sse.rs` (feature
//! `sse`) encodes a message as a Server-Sent Event, and `envelope.rs` as
//! the resume envelope of a WebSocket client that opted in; `tls.rs` (feature
//! `tls`) moves a `wss://` client's bytes through its rustls session, the
//! one place here that reads and writes a socket (any `Read + Write`). Sources encode with it,
//! lobbies and their history share its frames, writers decode with it, and
//! the tests, the load tool and the fuzz targets reuse it (through
//! `fuzz.rs`), so it stands below all of them. Pure functions and types: no
//! thread runs here, and nothing but `tls.rs` touches a socket.

pub(crate) mod close;
pub(crate) mod deflate;
#[cfg(feature = "sse")]
pub(crate) mod envelope;
pub(crate) mod frame;
pub(crate) mod handshake;
#[cfg(feature = "sse")]
pub(crate) mod sse;
#[cfg(feature = "tls")]
pub(crate) mod tls;
