//! How the gateway ends a WebSocket connection: the close codes it sends
//! or echoes (RFC 6455, section 7.4.1), the reasons it gives, and the
//! [`Violation`] a broken rule becomes. The frame decoder (`frame.rs`) and
//! the inflater (`deflate.rs`) both report violations, so they live below
//! both. Pure constants and a type; nothing runs here.

pub(crate) const GOING_AWAY: u16 = 1001;
pub(crate) const PROTOCOL_ERROR: u16 = 1002;
pub(crate) const INVALID_PAYLOAD: u16 = 1007;
pub(crate) const POLICY_VIOLATION: u16 = 1008;
pub(crate) const TOO_BIG: u16 = 1009;
pub(crate) const INTERNAL_ERROR: u16 = 1011;
pub(crate) const SERVICE_RESTART: u16 = 1012;
pub(crate) const TRY_AGAIN_LATER: u16 = 1013;
/// A private-use code (4000-4999, RFC 6455 section 7.4.2) in the style of
/// HTTP 401: the client's token expired; it may reconnect with a fresh one.
pub(crate) const TOKEN_EXPIRED: u16 = 4401;

/// The reason of the 1012 close a lobby sends its clients when it lost its
/// origin (with `--on-origin-loss close`).
pub(crate) const ORIGIN_LOST: &str = "origin connection lost";
/// The reason of the 1012 close a lobby sends its clients when a reload
/// removed their route.
pub(crate) const ROUTE_REMOVED: &str = "route removed";
/// The reason of the 4401 close a writer sends a client whose token expired.
pub(crate) const EXPIRED: &str = "token expired";
/// The reason of the 1013 close a writer sends a resume client whose queue
/// overflowed: it reconnects with the last ID it got and loses nothing.
#[cfg(feature = "sse")]
pub(crate) const RESUME_BEHIND: &str = "too slow; resume from your last ID";

/// A broken rule: the close code and reason to send before dropping the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Violation {
    pub code: u16,
    pub reason: &'static str,
}
