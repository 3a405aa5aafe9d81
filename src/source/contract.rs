//! What a source is to its lobby: the [`Source`] trait every source
//! implements, the [`Message`] it hands over with its position in the
//! stream, the [`LobbyContext`] its lobby lends it, and the per-cause
//! [`Failure`] counters they share.
//!
//! Each source (`websocket/`, `redis.rs`, `publisher.rs`) implements this,
//! and the lobby (`fanout/lobby.rs`) drives it; the sources' dispatch
//! ([`Upstream`](super::Upstream), `mod.rs`) stands above them. Nothing
//! here runs on a thread of its own.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU8, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use mio::{Registry, Token, Waker};

use crate::{
    id::LobbyId,
    stats::{FAILING, OriginState, Stats, bump, drop_one},
    wire::frame::{Frame, MessageKind},
};

/// One message from a source, and where it sits in the source's stream.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    /// The message itself.
    pub body: Body<'a>,
    /// The source's exact position for this message, as 64 bits (a Redis
    /// stream ID packed, a hash of a publisher's sequence number): what lobbies align
    /// migrating clients on. `None` where the source has no positions (a
    /// WebSocket origin, Redis pub/sub): the lobby then fingerprints the
    /// frame's bytes and aligns on runs of those (`fanout/history.rs`).
    pub position: Option<u64>,
}

/// What a source read: bytes to encode, or a frame already encoded.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Body<'a> {
    /// A text or binary payload; the lobby encodes the frame, once.
    Payload(MessageKind, &'a [u8]),
    /// A server frame the source encoded itself, once for every lobby (the
    /// in-process publisher); the lobby shares it as it is.
    Frame(&'a Frame),
}

impl<'a> Message<'a> {
    /// A payload without a position of its own.
    pub(crate) fn payload(kind: MessageKind, payload: &'a [u8]) -> Message<'a> {
        Message {
            body: Body::Payload(kind, payload),
            position: None,
        }
    }
}

/// What [`Source::reread`] found after a position. Only a Redis stream
/// (feature `redis`) finds more than [`Reread::Unsupported`].
#[cfg(feature = "sse")]
#[cfg_attr(not(feature = "redis"), allow(dead_code))]
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reread {
    /// This source keeps nothing to read again (only the lobby's history
    /// can serve a resume).
    Unsupported,
    /// Not connected yet: ask again once it is.
    NotYet,
    /// The source does not hold the entry at that position (trimmed,
    /// deleted, or never there).
    Gone,
    /// A page of the messages after it, in order: (kind, payload,
    /// position) each, at most the most asked for.
    After {
        messages: Vec<(MessageKind, Vec<u8>, u64)>,
        /// `None` if the page reaches the last message this source
        /// delivered; else more follow, and this is the position of the
        /// page's last entry, where the next page starts (an entry the
        /// source skipped, without the field or too large, counts too).
        more: Option<u64>,
    },
}

/// What [`Source::drive`] left behind.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Drive {
    /// Nothing more to do until the lobby is woken or the deadline passes.
    Idle,
    /// More input may be waiting: drive again soon.
    More,
}

/// A lobby's upstream: a connection (or subscription) that yields messages.
///
/// Every method runs on the lobby's thread and returns promptly: a source
/// that waits for input inside [`drive`](Source::drive) (a blocking Redis
/// connection) waits no longer than the `budget` it is given and a bound
/// of its own, so the lobby serves its inbox between calls. Failures are
/// counted by cause in [`Stats`], logged, and retried with backoff; none is
/// returned.
pub(crate) trait Source: fmt::Debug + Send {
    /// Connects (or subscribes) now, unless it already is or is on its way:
    /// the lobby has clients.
    fn start(&mut self);

    /// Lets go of the upstream, politely where the protocol has a way, and
    /// stays idle until [`start`](Source::start): the lobby has no clients,
    /// or is ending (`why` says which, for the log).
    fn stop(&mut self, why: &str);

    /// Does what is due: connection steps, reading (each message goes to
    /// `deliver`, in the stream's order), liveness, reconnects. A source
    /// that can only wait by blocking waits at most `budget` here.
    fn drive(&mut self, budget: Duration, deliver: &mut dyn FnMut(Message<'_>)) -> Drive;

    /// Whether [`drive`](Source::drive) may wait for input after it has
    /// delivered a message (a blocking Redis connection): the lobby then
    /// queues each message for its clients as it comes, not all of them
    /// once `drive` returns.
    fn waits_for_input(&self) -> bool {
        false
    }

    /// When [`drive`](Source::drive) must run again if nothing wakes the
    /// lobby; `None` if only a wake-up can make it useful. A source that
    /// waits inside `drive` answers "now" while it is connected.
    fn deadline(&self) -> Option<Instant>;

    /// Whether a polite close is still under way (the lobby finishes it
    /// before its thread ends).
    fn is_closing(&self) -> bool {
        false
    }

    /// Whether the connection failed since the last call (and forgets it):
    /// with `--on-origin-loss close` the lobby then closes its clients.
    fn take_failure(&mut self) -> bool;

    /// Whether [`reread`](Source::reread) can serve resumes (a Redis
    /// stream): a resume the history cannot serve then waits for it.
    #[cfg(feature = "sse")]
    fn can_reread(&self) -> bool {
        false
    }

    /// Reads again the messages after the one at `position`, up to the
    /// last one delivered, a page of at most `max` entries: what a client
    /// resuming from beyond the lobby's history missed (the lobby asks for
    /// the next page from where this one ended). Blocks for one round trip
    /// at most (a Redis `XRANGE`).
    #[cfg(feature = "sse")]
    fn reread(&mut self, _position: u64, _max: usize) -> Reread {
        Reread::Unsupported
    }

    /// Sends a client's message upstream (`--client-messages forward`);
    /// false if it cannot be sent now, or this source takes no messages.
    fn send(&mut self, _kind: MessageKind, _payload: Vec<u8>) -> bool {
        false
    }
}

/// What a lobby lends its source: a name for the logs, its poll registry
/// (for sources with a socket the lobby can wait on), its waker (for
/// answers from other threads), where to publish the connection's state,
/// and the gateway's counters.
#[derive(Debug)]
pub(crate) struct LobbyContext {
    pub lobby: LobbyId,
    pub registry: Registry,
    pub token: Token,
    pub waker: Arc<Waker>,
    /// The source's [`OriginState`], read by the manager for the lobby list.
    pub published: Arc<AtomicU8>,
    pub stats: Arc<Stats>,
}

/// Publishes a source's state for the lobby listing, keeping the
/// per-state gauges (connecting, backing off) in step, and whether its
/// origin is failing (a failed attempt, not up since: what readiness
/// reads). Only the lobby's own thread publishes.
pub(crate) fn publish_state(published: &AtomicU8, stats: &Stats, new: OriginState) {
    let before = published.load(Relaxed);
    let old = OriginState::from_u8(before);
    let was_failing = before & FAILING != 0;
    let failing = match new {
        OriginState::BackingOff => true,
        OriginState::Connecting => was_failing,
        OriginState::Idle | OriginState::Up | OriginState::Closing => false,
    };
    published.store(new as u8 | if failing { FAILING } else { 0 }, Relaxed);
    if old != new {
        if let Some(gauge) = stats.origin_state_gauge(old) {
            drop_one(gauge);
        }
        if let Some(gauge) = stats.origin_state_gauge(new) {
            bump(gauge);
        }
    }
    match (was_failing, failing) {
        (false, true) => bump(&stats.origins_failing),
        (true, false) => drop_one(&stats.origins_failing),
        _ => {}
    }
}

/// Spreads a position (a sequence number, a stream ID's two halves) over
/// 64 bits, so positions read as fingerprints (splitmix64's finaliser).
pub(crate) fn position(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Why a source's connection attempt or connection failed (a WebSocket
/// origin's or Redis's); each cause has its counter.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Failure {
    /// Name resolution or TCP connect.
    Connect,
    /// Connect, TLS and upgrade did not finish within the connect timeout.
    Timeout,
    /// TLS handshake (certificate, host name, protocol).
    #[cfg(feature = "tls")]
    Tls,
    /// The peer refused the session: a WebSocket origin refused or botched
    /// the upgrade, or Redis refused AUTH, SELECT or SUBSCRIBE.
    Upgrade,
    /// An established connection was closed or broke.
    Lost,
    /// An established connection stayed silent past the liveness timeout.
    Silent,
    /// A WebSocket origin sent a message above the size limit.
    Oversized,
}

impl Failure {
    /// The counter of this cause in `stats`.
    pub(crate) fn counter(self, stats: &Stats) -> &AtomicU64 {
        match self {
            Failure::Connect => &stats.origin_failed_connect,
            Failure::Timeout => &stats.origin_failed_timeout,
            #[cfg(feature = "tls")]
            Failure::Tls => &stats.origin_failed_tls,
            Failure::Upgrade => &stats.origin_failed_upgrade,
            Failure::Lost => &stats.origin_lost,
            Failure::Silent => &stats.origin_silent,
            Failure::Oversized => &stats.origin_oversized,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_differ_where_their_parts_do() {
        let p = position(1_700_000_000_000, 0);
        assert_ne!(p, position(1_700_000_000_000, 1));
        assert_ne!(p, position(1_700_000_000_001, 0));
        assert_ne!(position(0, 1), position(1, 0));
        assert_eq!(p, position(1_700_000_000_000, 0));
    }

    #[test]
    fn an_origin_is_failing_from_a_failed_attempt_until_it_is_up_or_idle() {
        use OriginState::*;
        let stats = Stats::default();
        let published = AtomicU8::new(Idle as u8);
        let steps = [
            (Connecting, 0, 1, 0),
            (BackingOff, 1, 0, 1),
            (Connecting, 1, 1, 0),
            (Up, 0, 0, 0),
            (Connecting, 0, 1, 0),
            (BackingOff, 1, 0, 1),
            (Idle, 0, 0, 0),
        ];
        for (state, failing, connecting, backing_off) in steps {
            publish_state(&published, &stats, state);
            let s = stats.snapshot();
            assert_eq!(
                (
                    s.origins_failing,
                    s.origins_connecting,
                    s.origins_backing_off
                ),
                (failing, connecting, backing_off),
                "after {state:?}"
            );
            assert_eq!(OriginState::from_u8(published.load(Relaxed)), state);
        }
    }
}
