//! Delivery: a client's bytes, from its queue to its socket.
//!
//! The writer threads (`writer.rs`, `wsgate-writer-N`) each own a share of
//! the client sockets: woken when a lobby has queued frames, they write
//! each client's frames with one vectored write, read and answer what the
//! client sends, and keep its timers. A client's connection state and rules
//! live in `conn.rs`; its drop-oldest queue, which its lobby fills and its
//! writer drains, in `queue.rs`. Nothing here decides which lobby a client
//! is in (`fanout/`) or encodes a broadcast frame (`wire/`).

pub(crate) mod conn;
pub(crate) mod queue;
pub(crate) mod writer;
