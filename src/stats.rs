//! Gateway counters: atomics every thread bumps, and the snapshot embedders read.
//!
//! The atomics are the only state threads share (DESIGN invariant 5). Hot
//! paths add in batches (a writer adds a whole vectored write's frames at once),
//! so these cache lines are not touched once per delivery.

#[cfg(any(feature = "auth", feature = "admin"))]
use std::sync::Arc;
use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

/// Live counters, shared by every gateway thread.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub clients: AtomicU64,
    pub lobbies: AtomicU64,
    pub origin_connections: AtomicU64,
    pub clients_accepted: AtomicU64,
    pub handshakes_rejected: AtomicU64,
    pub handshakes_timed_out: AtomicU64,
    pub handshakes_pending: AtomicU64,
    pub handshakes_shed: AtomicU64,
    pub disconnects: [AtomicU64; Disconnect::COUNT],
    pub refused_per_ip: AtomicU64,
    pub refused_origin: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_dropped: AtomicU64,
    pub messages_in: AtomicU64,
    pub frames_delivered: AtomicU64,
    /// Data frames that never reached a client, by [`DropReason`].
    pub frames_dropped: [AtomicU64; DropReason::COUNT],
    pub lobbies_started: AtomicU64,
    pub lobbies_ended: AtomicU64,
    pub migrations: AtomicU64,
    pub migration_gaps: AtomicU64,
    pub resumes: AtomicU64,
    pub resumes_from_source: AtomicU64,
    pub resume_resets: AtomicU64,
    pub refused_full: AtomicU64,
    pub origins_connecting: AtomicU64,
    pub origins_backing_off: AtomicU64,
    pub origins_failing: AtomicU64,
    pub origin_connect_attempts: AtomicU64,
    pub origin_connected: AtomicU64,
    pub origin_failed_connect: AtomicU64,
    pub origin_failed_timeout: AtomicU64,
    pub origin_failed_tls: AtomicU64,
    pub origin_failed_upgrade: AtomicU64,
    pub origin_lost: AtomicU64,
    pub origin_silent: AtomicU64,
    pub origin_oversized: AtomicU64,
    pub origin_gaps: AtomicU64,
    pub thread_panics: AtomicU64,
    pub fatal_errors: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// Test hooks that make a thread panic (feature `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub faults: crate::fault::Faults,
    /// Bytes written to client sockets (frames, control frames included).
    pub bytes_sent: AtomicU64,
    /// Writes to client sockets that wrote something.
    pub client_writes: AtomicU64,
    /// Of `frames_delivered`, the compressed ones (permessage-deflate).
    pub frames_delivered_deflated: AtomicU64,
    /// Messages lobbies compressed (once per lobby per form: the frame, the
    /// resume envelope; whatever its clients).
    pub messages_deflated: AtomicU64,
    /// Payload bytes of those messages before compression.
    pub deflate_bytes_in: AtomicU64,
    /// Payload bytes of those messages after compression.
    pub deflate_bytes_out: AtomicU64,
    /// Set first thing when shutdown begins: readiness turns false.
    pub draining: AtomicBool,
    /// When the gateway started: the zero of per-lobby timestamps.
    pub epoch: Epoch,
    pub latency: Latency,
    /// Authentications by result, summed over routes.
    pub auth: [AtomicU64; AuthResult::COUNT],
    /// Each route's authentications by result (the metric's route label).
    #[cfg(any(feature = "auth", feature = "admin"))]
    pub auth_routes: AuthRoutes,
    /// Key files a reload could not read (the route kept its old keys).
    pub auth_key_failures: AtomicU64,
    /// Auth requests' round trips to the auth service.
    pub auth_latency: Latency,
    /// Client TLS handshakes that completed.
    pub tls_handshakes_ok: AtomicU64,
    /// Of those, the ones that negotiated TLS 1.3.
    pub tls_handshakes_tls13: AtomicU64,
    /// Of those, the ones that negotiated TLS 1.2.
    pub tls_handshakes_tls12: AtomicU64,
    /// Client TLS handshakes refused (garbage, no shared version or cipher
    /// suite, an alert from the client) or abandoned by the client.
    pub tls_handshakes_failed: AtomicU64,
    /// Of those, by [`TlsFailure`].
    pub tls_handshake_failures: [AtomicU64; TlsFailure::COUNT],
    /// Client TLS handshakes that completed, by cipher suite (as
    /// [`TLS_SUITES`] lists them).
    pub tls_cipher_suites: [AtomicU64; TLS_SUITES.len()],
    /// Client TLS handshakes still under way at the handshake timeout.
    pub tls_handshakes_timed_out: AtomicU64,
    /// Reloads whose certificate and key pairs could not all be used (the
    /// running ones stayed).
    pub tls_reload_failures: AtomicU64,
    /// The client listener's certificates and when each expires.
    pub tls_certificates: TlsCertificates,
}

/// The cipher suites a client TLS handshake may negotiate (ring's, which
/// are all the server offers), by their IANA names as rustls spells them.
pub(crate) const TLS_SUITES: [&str; 9] = [
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
];

/// Why a client TLS handshake failed. Each reason has a counter
/// ([`StatsSnapshot::tls_handshake_failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TlsFailure {
    /// It sent something that is not TLS (garbage, plain HTTP to a TLS
    /// listener), or a TLS message that is malformed or out of place.
    BadMessage,
    /// It has nothing in common with the server: no shared protocol
    /// version, cipher suite, key exchange group or signature scheme.
    Incompatible,
    /// It ended the handshake with an alert (it refused the certificate,
    /// say).
    PeerAlert,
    /// It closed the connection before the handshake completed.
    Eof,
    /// Anything else (a read error, a protocol step out of order).
    Other,
}

impl TlsFailure {
    /// How many reasons there are.
    pub const COUNT: usize = 5;

    /// Every reason, in declaration order.
    pub const ALL: [TlsFailure; TlsFailure::COUNT] = [
        TlsFailure::BadMessage,
        TlsFailure::Incompatible,
        TlsFailure::PeerAlert,
        TlsFailure::Eof,
        TlsFailure::Other,
    ];

    /// A short snake_case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            TlsFailure::BadMessage => "bad_message",
            TlsFailure::Incompatible => "incompatible",
            TlsFailure::PeerAlert => "peer_alert",
            TlsFailure::Eof => "eof",
            TlsFailure::Other => "other",
        }
    }
}

/// The client listener's certificates, each as its name in metrics and
/// when it expires (seconds since the Unix epoch). Set at start and at each
/// reload, under a lock held for the copy; read by scrapes.
#[derive(Debug, Default)]
pub(crate) struct TlsCertificates(Mutex<Vec<(String, u64)>>);

impl TlsCertificates {
    /// Replaces the list.
    #[cfg(feature = "tls")]
    pub(crate) fn set(&self, certificates: Vec<(String, u64)>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = certificates;
    }

    /// A copy of the list.
    #[cfg(feature = "admin")]
    pub(crate) fn read(&self) -> Vec<(String, u64)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// When the soonest to expire does; 0 if there are none.
    fn soonest(&self) -> u64 {
        let list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().map(|(_, at)| *at).min().unwrap_or(0)
    }
}

/// Authentications of one route, by [`AuthResult`].
#[cfg(any(feature = "auth", feature = "admin"))]
pub(crate) type AuthCounts = [AtomicU64; AuthResult::COUNT];

/// Every route's authentication counts, by path. The acceptor takes a
/// route's counts when it starts serving the route (a lock held for a
/// lookup), then bumps them without one; a scrape copies them.
#[cfg(any(feature = "auth", feature = "admin"))]
#[derive(Debug, Default)]
pub(crate) struct AuthRoutes(Mutex<Vec<(String, Arc<AuthCounts>)>>);

#[cfg(any(feature = "auth", feature = "admin"))]
impl AuthRoutes {
    /// The counts of the route at `path`, made on first use; a route that
    /// comes back after a reload keeps its counts.
    #[cfg(feature = "auth")]
    pub(crate) fn of(&self, path: &str) -> Arc<AuthCounts> {
        let mut routes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, counts)) = routes.iter().find(|(p, _)| p == path) {
            return Arc::clone(counts);
        }
        let counts: Arc<AuthCounts> = Arc::new(Default::default());
        routes.push((path.to_owned(), Arc::clone(&counts)));
        counts
    }

    /// Each route's path and counts so far (routes that counted nothing
    /// left out).
    #[cfg(feature = "admin")]
    pub(crate) fn read(&self) -> Vec<(String, [u64; AuthResult::COUNT])> {
        let routes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        routes
            .iter()
            .map(|(path, counts)| {
                (
                    path.clone(),
                    std::array::from_fn(|i| counts[i].load(Relaxed)),
                )
            })
            .filter(|(_, counts)| counts.iter().any(|n| *n > 0))
            .collect()
    }
}

#[cfg(feature = "auth")]
impl Stats {
    /// Counts one authentication of a route.
    pub(crate) fn count_auth(&self, route: &AuthCounts, result: AuthResult) {
        bump(&route[result as usize]);
        bump(&self.auth[result as usize]);
    }
}

/// The instant a gateway's stats were created, the zero of the millisecond
/// timestamps lobbies publish.
#[derive(Debug)]
pub(crate) struct Epoch(Instant);

impl Default for Epoch {
    fn default() -> Self {
        Epoch(Instant::now())
    }
}

impl Epoch {
    /// Milliseconds since the epoch.
    pub(crate) fn millis(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Microseconds since the epoch, wrapping every 71 minutes: frame stamps.
    pub(crate) fn micros(&self) -> u32 {
        self.0.elapsed().as_micros() as u32
    }
}

/// Upper bounds, in seconds, of the delivery latency histogram's buckets
/// (a last one, +Inf, takes the rest).
pub(crate) const LATENCY_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// One delivery in this many is timed for the histogram.
pub(crate) const LATENCY_SAMPLE: u32 = 16;

/// The delivery latency histogram: from an origin message's arrival (its
/// lobby encoding it) to the write that completes it to a client, one
/// delivery in [`LATENCY_SAMPLE`]. Buckets are not cumulative.
#[derive(Debug, Default)]
pub(crate) struct Latency {
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

impl Latency {
    /// Adds one sample.
    #[cfg(feature = "auth")]
    pub(crate) fn record(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = LATENCY_BOUNDS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(LATENCY_BOUNDS.len());
        bump(&self.buckets[bucket]);
        self.sum_micros
            .fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// The buckets (not cumulative) and the sum in microseconds.
    fn read(&self) -> ([u64; LATENCY_BOUNDS.len() + 1], u64) {
        (
            std::array::from_fn(|i| self.buckets[i].load(Relaxed)),
            self.sum_micros.load(Relaxed),
        )
    }

    /// Adds a writer's samples (and empties them).
    pub(crate) fn absorb(&self, sampler: &mut LatencySampler) {
        if sampler.count == 0 {
            return;
        }
        for (bucket, n) in self.buckets.iter().zip(&mut sampler.buckets) {
            if *n > 0 {
                bucket.fetch_add(std::mem::take(n), Relaxed);
            }
        }
        self.sum_micros
            .fetch_add(std::mem::take(&mut sampler.sum_micros), Relaxed);
        sampler.count = 0;
    }
}

/// A writer's latency samples not yet added to the shared histogram.
#[derive(Debug)]
pub(crate) struct LatencySampler {
    /// Deliveries until the next timed one.
    countdown: u32,
    buckets: [u64; LATENCY_BOUNDS.len() + 1],
    sum_micros: u64,
    count: u64,
}

impl Default for LatencySampler {
    fn default() -> Self {
        LatencySampler {
            countdown: LATENCY_SAMPLE,
            buckets: [0; LATENCY_BOUNDS.len() + 1],
            sum_micros: 0,
            count: 0,
        }
    }
}

impl LatencySampler {
    /// Notes a delivery of a frame stamped `stamp` (see `Frame::stamp`),
    /// timing one in [`LATENCY_SAMPLE`].
    pub(crate) fn delivered(&mut self, stamp: u32, epoch: &Epoch) {
        self.countdown -= 1;
        if self.countdown > 0 {
            return;
        }
        self.countdown = LATENCY_SAMPLE;
        let micros = epoch.micros().wrapping_sub(stamp);
        let seconds = f64::from(micros) / 1e6;
        let bucket = LATENCY_BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[bucket] += 1;
        self.sum_micros += u64::from(micros);
        self.count += 1;
    }
}

/// One lobby's counters, bumped by its thread once per origin message (never
/// per client) and read by the manager for [`LobbyInfo`].
#[derive(Debug, Default)]
pub(crate) struct LobbyCounters {
    /// Origin data messages received.
    pub messages_in: AtomicU64,
    /// Frames pushed into members' queues by broadcasts.
    pub frames_out: AtomicU64,
    /// Frames dropped from full member queues by broadcasts.
    pub frames_dropped: AtomicU64,
    /// When the last origin message arrived, as epoch millis + 1 (0: never).
    pub last_message: AtomicU64,
    /// The origin state last seen (an [`OriginState`] discriminant).
    pub origin_seen: AtomicU8,
    /// Since when the origin has been in that state, in epoch millis.
    pub origin_since: AtomicU64,
    /// Clients the lobby thread holds, as it last counted after its inbox.
    pub attached: AtomicU64,
    /// Messages its history holds, as of its last broadcast.
    pub history_messages: AtomicU64,
    /// Their bytes.
    pub history_bytes: AtomicU64,
}

impl LobbyCounters {
    /// Counters for a lobby starting now, its origin idle.
    pub(crate) fn starting(epoch: &Epoch) -> LobbyCounters {
        let counters = LobbyCounters::default();
        counters.origin_since.store(epoch.millis(), Relaxed);
        counters
    }

    /// Counts one origin message (its frames: [`LobbyCounters::frames`]).
    pub(crate) fn message(&self, epoch: &Epoch) {
        self.messages_in.fetch_add(1, Relaxed);
        self.last_message.store(epoch.millis() + 1, Relaxed);
    }

    /// Counts `pushed` frames queued for members, `dropped` of which
    /// cost a member a frame (its oldest, or one never queued because a
    /// newer one would have pushed it out).
    pub(crate) fn frames(&self, pushed: u64, dropped: u64) {
        if pushed > 0 {
            self.frames_out.fetch_add(pushed, Relaxed);
        }
        if dropped > 0 {
            self.frames_dropped.fetch_add(dropped, Relaxed);
        }
    }

    /// Notes what the history holds after a broadcast: `messages`, `bytes`.
    pub(crate) fn history(&self, (messages, bytes): (usize, usize)) {
        self.history_messages.store(messages as u64, Relaxed);
        self.history_bytes.store(bytes as u64, Relaxed);
    }

    /// Notes the origin link's current state, timing it from when it changed.
    pub(crate) fn observe_origin(&self, epoch: &Epoch, state: OriginState) {
        if self.origin_seen.swap(state as u8, Relaxed) != state as u8 {
            self.origin_since.store(epoch.millis(), Relaxed);
        }
    }
}

/// A point-in-time copy of the gateway's counters.
///
/// Gauges (`clients`, `lobbies`, `origin_connections`) are current values; the
/// rest count since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Clients currently connected, from their upgrade until they leave.
    pub clients: u64,
    /// Lobby threads currently running, lingering ones included.
    pub lobbies: u64,
    /// Origin connections currently up.
    pub origin_connections: u64,
    /// Clients that completed the upgrade since start.
    pub clients_accepted: u64,
    /// Upgrade requests answered with an HTTP error status.
    pub handshakes_rejected: u64,
    /// Connections closed because the upgrade did not complete in time.
    pub handshakes_timed_out: u64,
    /// Connections currently in their HTTP upgrade.
    pub handshakes_pending: u64,
    /// Pending handshakes closed to make room for new connections (at the
    /// pending-handshake cap, or out of file descriptors).
    pub handshakes_shed: u64,
    /// Clients gone, by why: see [`StatsSnapshot::disconnected`].
    pub(crate) disconnects: [u64; Disconnect::COUNT],
    pub(crate) drops: [u64; DropReason::COUNT],
    /// Connections refused with 429: as many from their address as allowed.
    pub refused_per_ip: u64,
    /// Upgrade requests refused with 403: a browser origin not allowed.
    pub refused_origin: u64,
    /// Client messages sent upstream (with `ClientMessages::Forward`).
    pub forwarded: u64,
    /// Client messages that could not be sent upstream (origin down or backed up).
    pub forward_dropped: u64,
    /// Data messages received from the origin, summed over lobbies.
    pub messages_in: u64,
    /// Frames completely written to clients.
    pub frames_delivered: u64,
    /// Data frames that never reached a client, for every reason
    /// ([`StatsSnapshot::dropped`] has them by reason).
    pub frames_dropped: u64,
    /// Lobby threads started since start.
    pub lobbies_started: u64,
    /// Lobby threads ended since start.
    pub lobbies_ended: u64,
    /// Clients moved between lobbies by compaction.
    pub migrations: u64,
    /// Migrations where the two lobbies' streams never met, so the client
    /// joined its new lobby at the live edge and may have missed messages.
    pub migration_gaps: u64,
    /// Clients that resumed after a message ID their lobby's history held
    /// (SSE `Last-Event-ID`, a resume client's `last_event_id`): they got
    /// exactly what followed it.
    pub resumes: u64,
    /// Clients that resumed after a message ID their lobby's history did
    /// not hold, from a Redis stream read again (`XRANGE`, page by page):
    /// they got exactly what followed it; counted once they reached the
    /// live stream (or the history).
    pub resumes_from_source: u64,
    /// Clients that asked to resume after a message ID neither their
    /// lobby's history nor its source held (too old, or unknown), or that
    /// a stream resume could not finish (beyond its bound, not served in
    /// time): they got the reset event or message, then the live stream.
    pub resume_resets: u64,
    /// Upgrade requests refused with 503: the client limit reached, or every
    /// lobby full and no more origin connections allowed.
    pub refused_full: u64,
    /// Lobbies whose origin connection is being established (TCP, TLS, upgrade).
    pub origins_connecting: u64,
    /// Lobbies waiting out a backoff before their next origin attempt.
    pub origins_backing_off: u64,
    /// Lobbies whose last origin attempt failed and that have not been up
    /// since: backing off, or connecting again. A lobby's first attempt,
    /// still under way, is not among them.
    pub origins_failing: u64,
    /// Origin connect attempts (first connects and reconnects).
    pub origin_connect_attempts: u64,
    /// Origin connections established.
    pub origin_connected: u64,
    /// Attempts that failed to resolve or connect over TCP.
    pub origin_failed_connect: u64,
    /// Attempts that did not finish connect, TLS and upgrade in time.
    pub origin_failed_timeout: u64,
    /// Attempts whose TLS handshake failed (certificate, host name, protocol).
    pub origin_failed_tls: u64,
    /// Attempts the origin refused at the WebSocket upgrade (an HTTP status, say).
    pub origin_failed_upgrade: u64,
    /// Established connections that the origin closed or that broke.
    pub origin_lost: u64,
    /// Established connections dropped for silence (no data, no pong).
    pub origin_silent: u64,
    /// Established connections dropped for an oversized message.
    pub origin_oversized: u64,
    /// Messages a lobby's source skipped over, never to be delivered: a
    /// lobby that fell behind an in-process publisher lost its oldest
    /// queued message, or a Redis stream was trimmed past the position a
    /// lobby resumes from (counted once per such reconnect). Not a failure
    /// of the connection: not in [`StatsSnapshot::origin_failures`].
    pub origin_gaps: u64,
    /// Gateway threads that panicked, whether their work was recovered or not.
    pub thread_panics: u64,
    /// Failures the gateway could not recover from (a thread it cannot run
    /// without ended): it shuts down, the binary exits non-zero, and
    /// liveness fails.
    pub fatal_errors: u64,
    /// Bytes written to client sockets, control frames included.
    pub bytes_sent: u64,
    /// Write calls to client sockets that wrote something, control frames
    /// included. [`StatsSnapshot::frames_delivered`] over this is how many
    /// frames a write carried: about one while writers keep up, up to the
    /// queue depth when they are behind (see `delivery/writer.rs`).
    pub client_writes: u64,
    /// Of [`StatsSnapshot::frames_delivered`], those sent compressed
    /// (permessage-deflate); the rest went out uncompressed.
    pub frames_delivered_compressed: u64,
    /// Messages lobbies compressed: once per lobby per message and form
    /// (the frame, the resume envelope) that at least one member takes
    /// compressed and that deflate made smaller.
    pub messages_compressed: u64,
    /// Payload bytes of [`StatsSnapshot::messages_compressed`] before compression.
    pub compress_bytes_in: u64,
    /// Payload bytes of [`StatsSnapshot::messages_compressed`] after compression.
    pub compress_bytes_out: u64,
    /// Configurations applied by a reload (SIGHUP, `GatewayHandle::reload`).
    pub reloads: u64,
    /// Reloads refused: a file that did not parse, or settings that did not
    /// validate (the running configuration stays).
    pub reload_failures: u64,
    /// Whether shutdown has begun (readiness is false from then on).
    pub draining: bool,
    /// The delivery latency histogram's buckets (not cumulative; the last
    /// is above every bound), sampled: see `LATENCY_SAMPLE`.
    pub(crate) latency_buckets: [u64; LATENCY_BOUNDS.len() + 1],
    /// The sum of the sampled latencies, in microseconds.
    pub(crate) latency_sum_micros: u64,
    /// Authentications by result: see [`StatsSnapshot::auth`].
    pub(crate) auth: [u64; AuthResult::COUNT],
    /// Key files a reload could not read; the routes kept their old keys.
    pub auth_key_failures: u64,
    pub(crate) auth_latency_buckets: [u64; LATENCY_BOUNDS.len() + 1],
    pub(crate) auth_latency_sum_micros: u64,
    /// Client TLS handshakes that completed (`wss://` clients, `tls_cert`).
    pub tls_handshakes_ok: u64,
    /// Of [`StatsSnapshot::tls_handshakes_ok`], those that negotiated TLS 1.3.
    pub tls_handshakes_tls13: u64,
    /// Of [`StatsSnapshot::tls_handshakes_ok`], those that negotiated TLS 1.2.
    pub tls_handshakes_tls12: u64,
    /// Client TLS handshakes that failed: garbage instead of a ClientHello,
    /// nothing in common with the client, an alert, or the client gone.
    pub tls_handshakes_failed: u64,
    /// Of those, by reason: see [`StatsSnapshot::tls_handshake_failed`].
    pub(crate) tls_failures: [u64; TlsFailure::COUNT],
    /// Completed client TLS handshakes by cipher suite: see
    /// [`StatsSnapshot::tls_cipher_suites`].
    pub(crate) tls_suites: [u64; TLS_SUITES.len()],
    /// Client TLS handshakes still under way at the handshake timeout
    /// (counted in [`StatsSnapshot::handshakes_timed_out`] too).
    pub tls_handshakes_timed_out: u64,
    /// Reloads whose certificate and key pairs could not all be used; the
    /// running ones stayed.
    pub tls_reload_failures: u64,
    /// When the client listener's certificate that expires soonest does
    /// (the default one or one served by name), in seconds since the Unix
    /// epoch; 0 without TLS.
    pub tls_certificate_expiry: u64,
}

impl StatsSnapshot {
    /// Client TLS handshakes that failed for `reason` (they sum to
    /// [`StatsSnapshot::tls_handshakes_failed`]).
    pub fn tls_handshake_failed(&self, reason: TlsFailure) -> u64 {
        self.tls_failures[reason as usize]
    }

    /// Completed client TLS handshakes by the cipher suite negotiated, by
    /// its IANA name (`TLS13_AES_128_GCM_SHA256`), every suite the server
    /// offers listed.
    pub fn tls_cipher_suites(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        TLS_SUITES.iter().copied().zip(self.tls_suites)
    }

    /// The sampled delivery latency (time from an origin message's arrival
    /// to the write that completes it to a client; one delivery in 16 is
    /// timed): for each bucket its upper bound in seconds (`INFINITY` for
    /// the last) and how many samples fell in it; and the samples' sum in
    /// seconds.
    pub fn delivery_latency(&self) -> (Vec<(f64, u64)>, f64) {
        let bounds = LATENCY_BOUNDS.iter().copied().chain([f64::INFINITY]);
        let buckets = bounds.zip(self.latency_buckets).collect();
        (buckets, self.latency_sum_micros as f64 / 1e6)
    }

    /// Auth requests' round trips to auth services, as
    /// [`StatsSnapshot::delivery_latency`] gives its histogram (every
    /// request is timed).
    pub fn auth_latency(&self) -> (Vec<(f64, u64)>, f64) {
        let bounds = LATENCY_BOUNDS.iter().copied().chain([f64::INFINITY]);
        let buckets = bounds.zip(self.auth_latency_buckets).collect();
        (buckets, self.auth_latency_sum_micros as f64 / 1e6)
    }

    /// Client authentications that ended with `result`, over every route.
    pub fn auth(&self, result: AuthResult) -> u64 {
        self.auth[result as usize]
    }

    /// Clients whose connection ended for `reason`.
    pub fn disconnected(&self, reason: Disconnect) -> u64 {
        self.disconnects[reason as usize]
    }

    /// Data frames that never reached a client, for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// Every origin failure, whatever its cause.
    pub fn origin_failures(&self) -> u64 {
        self.origin_failed_connect
            + self.origin_failed_timeout
            + self.origin_failed_tls
            + self.origin_failed_upgrade
            + self.origin_lost
            + self.origin_silent
            + self.origin_oversized
    }
}

/// One lobby as the manager sees it, from [`GatewayHandle::lobbies`](crate::GatewayHandle::lobbies).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LobbyInfo {
    /// The lobby's number, unique for the gateway's lifetime.
    pub id: u32,
    /// The path of its route.
    pub route: String,
    /// Its query key, for a route whose lobbies are keyed by query.
    pub key: Option<String>,
    /// Clients placed in the lobby.
    pub clients: usize,
    /// Clients the lobby itself holds; trails [`LobbyInfo::clients`] for
    /// the moment a placed client is on its way in (or a leaving one out).
    pub attached: usize,
    /// Where the lobby's origin connection stands.
    pub origin: OriginState,
    /// How long the origin connection has been in that state.
    pub origin_since: Duration,
    /// Origin data messages the lobby received.
    pub messages_in: u64,
    /// Frames its broadcasts pushed into member queues.
    pub frames_out: u64,
    /// Frames its broadcasts dropped from full member queues.
    pub frames_dropped: u64,
    /// Time since the last origin message; `None` if none came yet.
    pub last_message_age: Option<Duration>,
    /// Messages its history holds: how far back a client can resume, be
    /// replayed or caught up (at most [`Config::history_len`](crate::Config::history_len)).
    pub history_messages: usize,
    /// Bytes of the frames its history holds: those beyond the newest
    /// `max(queue_depth, replay)` only within
    /// [`Config::history_bytes`](crate::Config::history_bytes).
    pub history_bytes: usize,
}

/// Set beside a published [`OriginState`] while the lobby's origin is
/// failing: from a failed attempt until it is up, idle or closing.
pub(crate) const FAILING: u8 = 0x80;

/// Where a lobby's origin connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
#[repr(u8)]
pub enum OriginState {
    /// Not connected and not wanted (no clients).
    Idle = 0,
    /// Connecting: TCP, TLS or WebSocket upgrade under way.
    Connecting = 1,
    /// Connected; messages flow.
    Up = 2,
    /// Waiting before the next attempt after a failure.
    BackingOff = 3,
    /// Closing politely (no clients left, or the lobby is ending).
    Closing = 4,
}

impl OriginState {
    /// The state's name in metrics labels and JSON: `idle`, `connecting`,
    /// `up`, `backing_off` or `closing`.
    pub fn name(self) -> &'static str {
        match self {
            OriginState::Idle => "idle",
            OriginState::Connecting => "connecting",
            OriginState::Up => "up",
            OriginState::BackingOff => "backing_off",
            OriginState::Closing => "closing",
        }
    }

    /// Reads back a state published as its `u8` discriminant (the bit
    /// [`FAILING`] set beside it is ignored).
    pub(crate) fn from_u8(value: u8) -> OriginState {
        match value & !FAILING {
            1 => OriginState::Connecting,
            2 => OriginState::Up,
            3 => OriginState::BackingOff,
            4 => OriginState::Closing,
            _ => OriginState::Idle,
        }
    }
}

impl Stats {
    /// The gauge counting lobbies whose origin link is in `state`, if one does
    /// (`Up` is counted by `origin_connections` where the connection is made).
    pub(crate) fn origin_state_gauge(&self, state: OriginState) -> Option<&AtomicU64> {
        match state {
            OriginState::Connecting => Some(&self.origins_connecting),
            OriginState::BackingOff => Some(&self.origins_backing_off),
            OriginState::Idle | OriginState::Up | OriginState::Closing => None,
        }
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let drops = std::array::from_fn(|i| self.frames_dropped[i].load(Relaxed));
        StatsSnapshot {
            clients: self.clients.load(Relaxed),
            lobbies: self.lobbies.load(Relaxed),
            origin_connections: self.origin_connections.load(Relaxed),
            clients_accepted: self.clients_accepted.load(Relaxed),
            handshakes_rejected: self.handshakes_rejected.load(Relaxed),
            handshakes_timed_out: self.handshakes_timed_out.load(Relaxed),
            handshakes_pending: self.handshakes_pending.load(Relaxed),
            handshakes_shed: self.handshakes_shed.load(Relaxed),
            disconnects: std::array::from_fn(|i| self.disconnects[i].load(Relaxed)),
            refused_per_ip: self.refused_per_ip.load(Relaxed),
            refused_origin: self.refused_origin.load(Relaxed),
            forwarded: self.forwarded.load(Relaxed),
            forward_dropped: self.forward_dropped.load(Relaxed),
            messages_in: self.messages_in.load(Relaxed),
            frames_delivered: self.frames_delivered.load(Relaxed),
            frames_dropped: drops.iter().sum(),
            drops,
            lobbies_started: self.lobbies_started.load(Relaxed),
            lobbies_ended: self.lobbies_ended.load(Relaxed),
            migrations: self.migrations.load(Relaxed),
            migration_gaps: self.migration_gaps.load(Relaxed),
            resumes: self.resumes.load(Relaxed),
            resumes_from_source: self.resumes_from_source.load(Relaxed),
            resume_resets: self.resume_resets.load(Relaxed),
            refused_full: self.refused_full.load(Relaxed),
            origins_connecting: self.origins_connecting.load(Relaxed),
            origins_backing_off: self.origins_backing_off.load(Relaxed),
            origins_failing: self.origins_failing.load(Relaxed),
            origin_connect_attempts: self.origin_connect_attempts.load(Relaxed),
            origin_connected: self.origin_connected.load(Relaxed),
            origin_failed_connect: self.origin_failed_connect.load(Relaxed),
            origin_failed_timeout: self.origin_failed_timeout.load(Relaxed),
            origin_failed_tls: self.origin_failed_tls.load(Relaxed),
            origin_failed_upgrade: self.origin_failed_upgrade.load(Relaxed),
            origin_lost: self.origin_lost.load(Relaxed),
            origin_silent: self.origin_silent.load(Relaxed),
            origin_oversized: self.origin_oversized.load(Relaxed),
            origin_gaps: self.origin_gaps.load(Relaxed),
            thread_panics: self.thread_panics.load(Relaxed),
            fatal_errors: self.fatal_errors.load(Relaxed),
            bytes_sent: self.bytes_sent.load(Relaxed),
            client_writes: self.client_writes.load(Relaxed),
            frames_delivered_compressed: self.frames_delivered_deflated.load(Relaxed),
            messages_compressed: self.messages_deflated.load(Relaxed),
            compress_bytes_in: self.deflate_bytes_in.load(Relaxed),
            compress_bytes_out: self.deflate_bytes_out.load(Relaxed),
            reloads: self.reloads.load(Relaxed),
            reload_failures: self.reload_failures.load(Relaxed),
            draining: self.draining.load(Relaxed),
            latency_buckets: std::array::from_fn(|i| self.latency.buckets[i].load(Relaxed)),
            latency_sum_micros: self.latency.sum_micros.load(Relaxed),
            auth: std::array::from_fn(|i| self.auth[i].load(Relaxed)),
            auth_key_failures: self.auth_key_failures.load(Relaxed),
            auth_latency_buckets: self.auth_latency.read().0,
            auth_latency_sum_micros: self.auth_latency.read().1,
            tls_handshakes_ok: self.tls_handshakes_ok.load(Relaxed),
            tls_handshakes_tls13: self.tls_handshakes_tls13.load(Relaxed),
            tls_handshakes_tls12: self.tls_handshakes_tls12.load(Relaxed),
            tls_handshakes_failed: self.tls_handshakes_failed.load(Relaxed),
            tls_failures: std::array::from_fn(|i| self.tls_handshake_failures[i].load(Relaxed)),
            tls_suites: std::array::from_fn(|i| self.tls_cipher_suites[i].load(Relaxed)),
            tls_handshakes_timed_out: self.tls_handshakes_timed_out.load(Relaxed),
            tls_reload_failures: self.tls_reload_failures.load(Relaxed),
            tls_certificate_expiry: self.tls_certificates.soonest(),
        }
    }

    /// Counts a client gone for `reason`.
    pub(crate) fn disconnected(&self, reason: Disconnect) {
        bump(&self.disconnects[reason as usize]);
    }

    /// Counts `n` data frames lost for `reason`.
    pub(crate) fn dropped(&self, reason: DropReason, n: u64) {
        if n > 0 {
            self.frames_dropped[reason as usize].fetch_add(n, Relaxed);
        }
    }
}

/// Why a data frame never reached its client. Each reason has a counter
/// ([`StatsSnapshot::dropped`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DropReason {
    /// The client's socket was full (it reads slower than the feed): the
    /// oldest frame of its full queue, or of what was kept for it while it
    /// stalled. The client's own doing; the slow-client policy counts these.
    SlowClient,
    /// Its queue overflowed while its socket had room: the writers had not
    /// reached it in time, in a burst longer than the queue or with every
    /// core busy. The gateway's doing: a deeper `--queue-depth`, or more
    /// cores or processes, keeps these.
    WriterBehind,
    /// Queued or being written for a client that left (or whose writer
    /// failed) before it was written.
    Departed,
}

impl DropReason {
    /// How many reasons there are.
    pub const COUNT: usize = 3;

    /// Every reason, in declaration order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::SlowClient,
        DropReason::WriterBehind,
        DropReason::Departed,
    ];

    /// A short snake_case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::SlowClient => "slow_client",
            DropReason::WriterBehind => "writer_behind",
            DropReason::Departed => "departed",
        }
    }
}

/// Why a client's connection ended. Each reason has a counter
/// ([`StatsSnapshot::disconnected`]); where the gateway closed the
/// connection, the close code it sent is [`Disconnect::close_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Disconnect {
    /// The client completed a close handshake it started.
    ClientClosed,
    /// The client's connection ended without a close handshake.
    ConnectionLost,
    /// Reading or writing its socket failed (reset, broken pipe).
    SocketError,
    /// It broke the protocol: closed with 1002.
    ProtocolError,
    /// It sent a text message that is not UTF-8: closed with 1007.
    InvalidUtf8,
    /// It sent a message above the size limit: closed with 1009.
    TooBig,
    /// It sent more frames a second than allowed: closed with 1008.
    RateLimited,
    /// It stayed silent through a keepalive ping: closed with 1001.
    Silent,
    /// It lost more frames than the disconnect slow-client policy allows:
    /// closed with 1013.
    TooSlow,
    /// No lobby had room for it: closed with 1013 as it arrived.
    NoRoom,
    /// Its lobby lost the origin, with `--on-origin-loss close`: closed with 1012.
    OriginLost,
    /// A reload removed its route: closed with 1012 after its queued frames.
    RouteRemoved,
    /// The gateway shut down: closed with 1001 after its queued frames.
    Shutdown,
    /// The writer thread serving it failed: closed with 1011.
    InternalError,
    /// Its token expired (its `exp` plus the leeway passed): closed with
    /// 4401 after its queued frames.
    TokenExpired,
}

impl Disconnect {
    /// How many reasons there are.
    pub const COUNT: usize = 15;

    /// Every reason, in declaration order.
    pub const ALL: [Disconnect; Disconnect::COUNT] = [
        Disconnect::ClientClosed,
        Disconnect::ConnectionLost,
        Disconnect::SocketError,
        Disconnect::ProtocolError,
        Disconnect::InvalidUtf8,
        Disconnect::TooBig,
        Disconnect::RateLimited,
        Disconnect::Silent,
        Disconnect::TooSlow,
        Disconnect::NoRoom,
        Disconnect::OriginLost,
        Disconnect::RouteRemoved,
        Disconnect::Shutdown,
        Disconnect::InternalError,
        Disconnect::TokenExpired,
    ];

    /// A short snake_case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Disconnect::ClientClosed => "client_closed",
            Disconnect::ConnectionLost => "connection_lost",
            Disconnect::SocketError => "socket_error",
            Disconnect::ProtocolError => "protocol_error",
            Disconnect::InvalidUtf8 => "invalid_utf8",
            Disconnect::TooBig => "too_big",
            Disconnect::RateLimited => "rate_limited",
            Disconnect::Silent => "silent",
            Disconnect::TooSlow => "too_slow",
            Disconnect::NoRoom => "no_room",
            Disconnect::OriginLost => "origin_lost",
            Disconnect::RouteRemoved => "route_removed",
            Disconnect::Shutdown => "shutdown",
            Disconnect::InternalError => "internal_error",
            Disconnect::TokenExpired => "token_expired",
        }
    }

    /// The close code the gateway sends for this reason, if it closes.
    pub fn close_code(self) -> Option<u16> {
        use crate::wire::close as code;
        match self {
            Disconnect::ClientClosed | Disconnect::ConnectionLost | Disconnect::SocketError => None,
            Disconnect::ProtocolError => Some(code::PROTOCOL_ERROR),
            Disconnect::InvalidUtf8 => Some(code::INVALID_PAYLOAD),
            Disconnect::TooBig => Some(code::TOO_BIG),
            Disconnect::RateLimited => Some(code::POLICY_VIOLATION),
            Disconnect::Silent | Disconnect::Shutdown => Some(code::GOING_AWAY),
            Disconnect::TooSlow | Disconnect::NoRoom => Some(code::TRY_AGAIN_LATER),
            Disconnect::OriginLost | Disconnect::RouteRemoved => Some(code::SERVICE_RESTART),
            Disconnect::InternalError => Some(code::INTERNAL_ERROR),
            Disconnect::TokenExpired => Some(code::TOKEN_EXPIRED),
        }
    }

    /// The reason a close with `code` was sent for, given the violation or
    /// rule behind it.
    pub(crate) fn for_close_code(code: u16) -> Disconnect {
        use crate::wire::close as c;
        match code {
            c::INVALID_PAYLOAD => Disconnect::InvalidUtf8,
            c::TOO_BIG => Disconnect::TooBig,
            c::POLICY_VIOLATION => Disconnect::RateLimited,
            _ => Disconnect::ProtocolError,
        }
    }
}

impl std::fmt::Display for Disconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How an authentication of a client ended. Each result has a counter
/// ([`StatsSnapshot::auth`]), and per route a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthResult {
    /// Admitted: its token or the auth service said yes.
    Ok,
    /// It brought no token where the route needs one: 401.
    Missing,
    /// Its token did not verify (signature, algorithm, key, issuer,
    /// audience, form): 401.
    Invalid,
    /// Its token expired, or is not valid yet: 401.
    Expired,
    /// Its token does not allow this route or query key: 403.
    Forbidden,
    /// The auth service said no (401 or 403, passed on).
    Denied,
    /// The auth service answered something else, or could not be reached:
    /// 503, failing closed.
    Error,
    /// The auth service did not answer in time: 503.
    Timeout,
    /// Too many upgrades were waiting for the auth service: 503 at once.
    Overloaded,
}

impl AuthResult {
    /// How many results there are.
    pub const COUNT: usize = 9;

    /// Every result, in declaration order.
    pub const ALL: [AuthResult; AuthResult::COUNT] = [
        AuthResult::Ok,
        AuthResult::Missing,
        AuthResult::Invalid,
        AuthResult::Expired,
        AuthResult::Forbidden,
        AuthResult::Denied,
        AuthResult::Error,
        AuthResult::Timeout,
        AuthResult::Overloaded,
    ];

    /// A short snake_case name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            AuthResult::Ok => "ok",
            AuthResult::Missing => "missing",
            AuthResult::Invalid => "invalid",
            AuthResult::Expired => "expired",
            AuthResult::Forbidden => "forbidden",
            AuthResult::Denied => "denied",
            AuthResult::Error => "error",
            AuthResult::Timeout => "timeout",
            AuthResult::Overloaded => "overloaded",
        }
    }
}

/// Adds one to a counter.
pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

/// Subtracts one from a gauge.
pub(crate) fn drop_one(gauge: &AtomicU64) {
    gauge.fetch_sub(1, Relaxed);
}
