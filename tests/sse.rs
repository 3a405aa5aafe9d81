//! Server-Sent Events end to end (feature `sse`).
#![cfg(feature = "sse")]
