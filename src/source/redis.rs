//! The Redis sources: a pub/sub channel or a stream, one connection per lobby.
//!
//! [`RedisLink`] runs on its lobby's thread and owns one connection of the
//! `redis` crate's blocking client (no async runtime). Connecting (TCP, TLS
//! for `rediss://`, AUTH, SELECT, then SUBSCRIBE or finding the stream's
//! position) blocks, so it runs on a short-lived thread of its own, like a
//! WebSocket origin's host name lookup: its answer wakes the lobby, which
//! waits for it no longer than the connect timeout and never joins an
//! attempt it gave up on. Once connected, the lobby waits for messages
//! inside [`Source::drive`], in a read with a timeout of at most
//! [`INBOX_SLICE`] (and of the lobby's own next deadline), so it serves its
//! inbox (joins, leaves, moves, shutdown) at least that often:
//!
//! - **pub/sub** (`redis://`): messages are read with the crate's pub/sub
//!   reader, which keeps a partly received message across read timeouts.
//!   Every `--origin-ping` the link sends PING on the subscription
//!   connection and reads up to its pong, delivering the messages before
//!   it; a pong later than [`PONG_WAIT`] (or than what is left of
//!   `--origin-timeout`) means a silent connection, dropped and replaced.
//!   Pub/sub keeps nothing for a subscriber that is away: what is
//!   published while a lobby reconnects is not seen by its clients.
//! - **stream** (`redis+stream://`): `XREAD BLOCK` from the newest entry
//!   when the lobby first connects and, after a lost connection, from right
//!   after the last entry it delivered, so nothing published meanwhile is
//!   lost while the stream still holds it. Entries trimmed (or deleted)
//!   before the lobby got them are counted in `origin_gaps` when it
//!   reconnects, one per entry (from `XINFO STREAM`'s `entries-added`,
//!   Redis 7; older servers do not say). Each `XREAD` asks for at most a
//!   client queue's worth of entries (so a backlog reaches the queues no
//!   faster than a round trip per queue), blocks server-side at most
//!   [`INBOX_SLICE`], and its reply, even an empty one, is the liveness
//!   signal. Stream IDs, packed into 64 bits, are the messages'
//!   positions, so lobbies align migrating clients on them exactly; a
//!   client resuming after an entry its lobby's history no longer holds is
//!   served by [`Source::reread`], one `XRANGE` per page (a queue's worth)
//!   from that entry, or where the last page ended, towards the last one
//!   delivered.
//!
//! A payload that is valid UTF-8 goes to clients as a text message, any
//! other as binary. Failures are counted by the same causes as a
//! WebSocket origin's (`connect`, `timeout`, `tls`, `upgrade` for a
//! refused AUTH, SELECT or SUBSCRIBE, `lost`, `silent`, `oversized`) and
//! retried with the same backoff. A message above `--max-message` is
//! skipped and counted (`oversized`); the connection stays. The crate reads
//! a reply whole before its size can be checked: Redis itself bounds a
//! subscriber's pending output (`client-output-buffer-limit pubsub`, 32 MB
//! by default), and a stream reply holds at most [`XREAD_COUNT`] entries.
//! This file knows nothing of clients.

use std::{
    fmt,
    mem::ManuallyDrop,
    sync::{Arc, atomic::Ordering::Relaxed},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, TryRecvError, bounded};
use log::{debug, info, warn};
use redis::{
    Client, Connection, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Msg,
    RedisConnectionInfo, RedisError, Value,
};

#[cfg(feature = "sse")]
use crate::source::contract::Reread;
use crate::{
    config::{
        Config,
        url::{Mode, RedisUrl},
    },
    error::{Error, Result},
    id::LobbyId,
    source::{
        backoff::Backoff,
        contract::{Drive, Failure, LobbyContext, Message, Source, position, publish_state},
        rng::Rng,
    },
    stats::{OriginState, bump, drop_one},
    wire::frame::MessageKind,
};

/// Longest a lobby on a Redis source goes without serving its inbox while
/// its connection is up: the read timeout between inbox checks, and the
/// longest an `XREAD` blocks.
pub(crate) const INBOX_SLICE: Duration = Duration::from_millis(50);
/// Longest a lobby waits for the pong to its PING before it calls the
/// subscription silent (less if `--origin-timeout` has less left): the
/// lobby's inbox waits meanwhile.
pub(crate) const PONG_WAIT: Duration = Duration::from_secs(1);
/// Most stream entries asked for per `XREAD` (fewer with a smaller
/// `--queue`).
pub(crate) const XREAD_COUNT: usize = 256;
/// Pub/sub messages read per drive, so the inbox is served between bursts.
const READS_PER_DRIVE: usize = 256;
/// The shortest read timeout the socket takes (zero means none at all).
const MIN_WAIT: Duration = Duration::from_millis(1);

/// Where the Redis source is and how to talk to it: built once from the
/// URL and the configuration, shared by every lobby.
pub(crate) struct RedisTarget {
    url: RedisUrl,
    /// Names the server in logs (no credentials).
    name: String,
    client: Client,
    connect_timeout: Duration,
    ping: Duration,
    timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    max_message: usize,
    /// Entries asked for per `XREAD`: a client queue's worth.
    xread_count: usize,
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisTarget")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RedisTarget {
    /// The target an origin URL names, with the configuration's origin
    /// settings (`--origin-ca` for a `rediss://` server with a private CA).
    pub(crate) fn new(url: &str, config: &Config) -> Result<RedisTarget> {
        let url = RedisUrl::parse(url)?;
        let addr = if url.is_tls {
            ConnectionAddr::TcpTls {
                host: url.host.clone(),
                port: url.port,
                insecure: false,
                tls_params: None,
            }
        } else {
            ConnectionAddr::Tcp(url.host.clone(), url.port)
        };
        let mut redis = RedisConnectionInfo::default().set_db(url.db);
        if let Some(user) = &url.username {
            redis = redis.set_username(user);
        }
        if let Some(password) = &url.password {
            redis = redis.set_password(password);
        }
        let config_error = |e: RedisError| Error::Config(format!("Redis origin: {e}"));
        let info: ConnectionInfo = addr
            .into_connection_info()
            .map_err(config_error)?
            .set_redis_settings(redis);
        let client = match &config.origin_ca {
            #[cfg(feature = "tls")]
            Some(ca) if url.is_tls => {
                let pem = std::fs::read(ca).map_err(|e| {
                    Error::Config(format!("cannot read the origin CA {}: {e}", ca.display()))
                })?;
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                Client::build_with_tls(info, certificates).map_err(config_error)?
            }
            _ => Client::open(info).map_err(config_error)?,
        };
        let (what, name) = match &url.mode {
            Mode::PubSub { channel } => ("channel", channel),
            Mode::Stream { key, .. } => ("stream", key),
        };
        let scheme = if url.is_tls { "rediss" } else { "redis" };
        let name = format!(
            "{what} {name:?} on {scheme}://{}:{}/{}",
            url.host, url.port, url.db
        );
        Ok(RedisTarget {
            url,
            name,
            client,
            connect_timeout: config.origin_connect_timeout,
            ping: config.origin_ping,
            timeout: config.origin_timeout,
            backoff_min: config.origin_backoff_min,
            backoff_max: config.origin_backoff_max,
            max_message: config.max_origin_message,
            xread_count: config.queue_depth.clamp(1, XREAD_COUNT),
        })
    }

    /// Connects, authenticates, selects the database and subscribes (or
    /// finds where to read the stream from), within `deadline`. Blocks: it
    /// runs on a connect thread.
    fn connect(&self, lobby: LobbyId, resume: Option<&StreamPos>, deadline: Instant) -> Attempt {
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(MIN_WAIT)
        };
        let mut con = self
            .client
            .get_connection_with_timeout(left())
            .map_err(|e| self.failure("connect", &e))?;
        con.set_read_timeout(Some(left()))
            .and_then(|()| con.set_write_timeout(Some(left())))
            .map_err(|e| self.failure("connect", &e))?;
        // Operators see which lobby a connection serves (CLIENT LIST).
        let name = format!("wsgate-{lobby}");
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(&name)
            .exec(&mut con)
            .map_err(|e| self.failure("name the connection", &e))?;
        match &self.url.mode {
            Mode::PubSub { channel } => {
                let command = redis::cmd("SUBSCRIBE").arg(channel).get_packed_command();
                con.send_packed_command(&command)
                    .map_err(|e| self.failure("subscribe", &e))?;
                // ["subscribe", channel, count]; nothing can come before it.
                match con.recv_response() {
                    Ok(Value::Array(reply))
                        if reply.first().is_some_and(|v| is_bulk(v, b"subscribe")) => {}
                    Ok(other) => {
                        return Err((
                            Failure::Upgrade,
                            format!("Redis refused SUBSCRIBE: {other:?}"),
                        ));
                    }
                    Err(e) => return Err(self.failure("subscribe", &e)),
                }
                Ok(Ready {
                    con,
                    next: None,
                    gap: 0,
                })
            }
            Mode::Stream { key, .. } => {
                let info = self.stream_info(&mut con, key)?;
                let (next, gap) = match resume {
                    Some(last) => (*last, info.missed_after(*last)),
                    // From the newest entry on.
                    None => (
                        StreamPos {
                            id: info.last_generated.unwrap_or_default(),
                            added: info.entries_added,
                        },
                        0,
                    ),
                };
                Ok(Ready {
                    con,
                    next: Some(next),
                    gap,
                })
            }
        }
    }

    /// What `XINFO STREAM` says of the stream (an empty one if it does not
    /// exist yet: it is read from its first entry once created).
    fn stream_info(
        &self,
        con: &mut Connection,
        key: &str,
    ) -> std::result::Result<StreamInfo, (Failure, String)> {
        let reply = match redis::cmd("XINFO")
            .arg("STREAM")
            .arg(key)
            .query::<Value>(con)
        {
            Ok(reply) => reply,
            Err(e) if e.code() == Some("WRONGTYPE") => {
                return Err(self.failure("read the key as a stream", &e));
            }
            // "no such key"
            Err(e) if e.code().is_some() => return Ok(StreamInfo::missing()),
            Err(e) => return Err(self.failure("inspect the stream", &e)),
        };
        let pairs: Vec<(&Value, &Value)> = match &reply {
            Value::Array(items) => items.chunks_exact(2).map(|p| (&p[0], &p[1])).collect(),
            Value::Map(items) => items.iter().map(|(k, v)| (k, v)).collect(),
            _ => Vec::new(),
        };
        let get = |name: &[u8]| {
            pairs
                .iter()
                .find(|(k, _)| is_bulk(k, name))
                .map(|(_, v)| *v)
        };
        let int = |name: &[u8]| match get(name) {
            Some(Value::Int(n)) => u64::try_from(*n).ok(),
            _ => None,
        };
        Ok(StreamInfo {
            last_generated: get(b"last-generated-id").and_then(StreamId::from_value),
            entries_added: int(b"entries-added"),
            length: int(b"length").unwrap_or(0),
            first: match get(b"first-entry") {
                Some(Value::Array(entry)) => entry.first().and_then(StreamId::from_value),
                _ => None,
            },
            max_deleted: get(b"max-deleted-entry-id").and_then(StreamId::from_value),
        })
    }

    /// Classifies a failed step of a connection attempt.
    fn failure(&self, step: &str, e: &RedisError) -> (Failure, String) {
        let text = e.to_string();
        let lower = text.to_ascii_lowercase();
        let cause = if e.is_timeout() {
            Failure::Timeout
        } else if self.url.is_tls
            && ["tls", "certificate", "handshake", "alert"]
                .iter()
                .any(|w| lower.contains(w))
        {
            #[cfg(feature = "tls")]
            {
                Failure::Tls
            }
            #[cfg(not(feature = "tls"))]
            {
                Failure::Connect
            }
        } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
            Failure::Connect
        } else {
            // AUTH, SELECT or SUBSCRIBE answered with an error.
            Failure::Upgrade
        };
        (cause, format!("cannot {step}: {text}"))
    }
}

/// What `XINFO STREAM` says, as far as a lobby needs it.
#[derive(Debug, Default)]
struct StreamInfo {
    last_generated: Option<StreamId>,
    /// Entries ever added (Redis 7).
    entries_added: Option<u64>,
    length: u64,
    /// The oldest entry still held.
    first: Option<StreamId>,
    /// The newest entry ever deleted by XDEL (Redis 7).
    max_deleted: Option<StreamId>,
}

impl StreamInfo {
    fn missing() -> StreamInfo {
        StreamInfo {
            entries_added: Some(0),
            ..StreamInfo::default()
        }
    }

    /// How many entries added after `last` are gone (trimmed or deleted)
    /// before a lobby that delivered `last` could read them. Exact for
    /// trimming on Redis 7 (from the count of entries ever added); an
    /// `XDEL` after `last` counts at least one; older servers say nothing.
    fn missed_after(&self, last: StreamPos) -> u64 {
        let trimmed = match (self.first, last.added, self.entries_added) {
            // Everything up to `last` is gone, so is what the stream no
            // longer holds of what came after it.
            (Some(first), Some(at), Some(added)) if first > last.id => {
                added.saturating_sub(at).saturating_sub(self.length)
            }
            _ => 0,
        };
        let deleted = self.max_deleted.is_some_and(|d| d > last.id);
        trimmed.max(u64::from(deleted))
    }
}

/// Where a lobby is in a stream: the last entry it delivered (or the
/// newest when it started), and that entry's number among all entries ever
/// added (Redis 7's `entries-added`), to tell how many were trimmed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct StreamPos {
    id: StreamId,
    added: Option<u64>,
}

/// A stream entry ID, `ms-seq`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
struct StreamId(u64, u64);

/// Bits of a stream ID's milliseconds in its packed position: enough
/// until the year 2527.
const MS_BITS: u32 = 44;
/// Bits of a stream ID's sequence number in its packed position: a
/// million entries per millisecond.
const SEQ_BITS: u32 = 64 - MS_BITS;

impl StreamId {
    /// The entry's position in 64 bits: the ID packed, `ms << 20 | seq`,
    /// so the lobby can read the stream again from it
    /// ([`StreamId::from_position`]). An ID too large to pack (one given
    /// explicitly to `XADD`) is hashed instead: still exact for
    /// migration, but a client can resume after it only from a history.
    fn position(self) -> u64 {
        let StreamId(ms, seq) = self;
        if ms >> MS_BITS == 0 && seq >> SEQ_BITS == 0 {
            ms << SEQ_BITS | seq
        } else {
            position(ms, seq)
        }
    }

    #[cfg(feature = "sse")]
    /// The ID a packed position stands for (any 64 bits stand for one).
    fn from_position(position: u64) -> StreamId {
        StreamId(position >> SEQ_BITS, position & ((1 << SEQ_BITS) - 1))
    }

    fn parse(text: &[u8]) -> Option<StreamId> {
        let text = std::str::from_utf8(text).ok()?;
        let (ms, seq) = text.split_once('-')?;
        Some(StreamId(ms.parse().ok()?, seq.parse().ok()?))
    }

    fn from_value(value: &Value) -> Option<StreamId> {
        match value {
            Value::BulkString(bytes) => StreamId::parse(bytes),
            Value::SimpleString(text) => StreamId::parse(text.as_bytes()),
            _ => None,
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

fn is_bulk(value: &Value, want: &[u8]) -> bool {
    match value {
        Value::BulkString(bytes) => bytes.eq_ignore_ascii_case(want),
        Value::SimpleString(text) => text.as_bytes().eq_ignore_ascii_case(want),
        _ => false,
    }
}

/// A connection that is ready to read.
struct Ready {
    con: Connection,
    /// For a stream: where to read after.
    next: Option<StreamPos>,
    /// For a stream: entries after the resume position that are gone.
    gap: u64,
}

type Attempt = std::result::Result<Ready, (Failure, String)>;

/// An attempt under way on its own thread.
struct Connecting {
    answer: Receiver<Attempt>,
    /// Joined once it answered; left to finish alone if given up on.
    thread: JoinHandle<()>,
    deadline: Instant,
}

/// A connection that is up.
struct Live {
    con: Connection,
    since: Instant,
    got_message: bool,
    last_rx: Instant,
    next_ping: Instant,
    /// The read timeout the socket has now.
    read_timeout: Option<Duration>,
}

enum State {
    /// Not wanted: the lobby has no clients.
    Idle,
    /// Waiting out the backoff before the next attempt.
    Waiting(Instant),
    Connecting(Box<Connecting>),
    Up(Box<Live>),
}

/// A lobby's Redis connection.
pub(crate) struct RedisLink {
    target: Arc<RedisTarget>,
    lobby: LobbyContext,
    state: State,
    backoff: Backoff,
    has_failed: bool,
    /// A message was skipped (oversized, no such field) and logged at warn.
    has_skipped: bool,
    /// For a stream: the last entry delivered, where a reconnect resumes.
    last: Option<StreamPos>,
}

impl fmt::Debug for RedisLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLink")
            .field("lobby", &self.lobby.lobby)
            .field("state", &self.public())
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl RedisLink {
    /// The link for one lobby; it connects on [`Source::start`].
    pub(crate) fn new(target: Arc<RedisTarget>, lobby: LobbyContext) -> RedisLink {
        let rng = Rng::from_clock(u64::from(lobby.lobby.0));
        let backoff = Backoff::new(target.backoff_min, target.backoff_max, rng);
        RedisLink {
            target,
            lobby,
            state: State::Idle,
            backoff,
            has_failed: false,
            has_skipped: false,
            last: None,
        }
    }

    fn public(&self) -> OriginState {
        match &self.state {
            State::Idle => OriginState::Idle,
            State::Waiting(_) => OriginState::BackingOff,
            State::Connecting(_) => OriginState::Connecting,
            State::Up(_) => OriginState::Up,
        }
    }

    fn publish(&self) {
        publish_state(&self.lobby.published, &self.lobby.stats, self.public());
    }

    /// Starts an attempt on a connect thread.
    fn connect(&mut self) {
        let stats = &self.lobby.stats;
        bump(&stats.origin_connect_attempts);
        let deadline = Instant::now() + self.target.connect_timeout;
        let (tx, answer) = bounded(1);
        let target = Arc::clone(&self.target);
        let waker = Arc::clone(&self.lobby.waker);
        let (lobby, resume) = (self.lobby.lobby, self.last);
        let spawned = thread::Builder::new()
            .name(format!("wsgate-redis-{}", lobby.0))
            .spawn(move || {
                let attempt = target.connect(lobby, resume.as_ref(), deadline);
                // A lobby that gave up has dropped the receiver: the
                // connection closes here.
                if tx.send(attempt).is_ok() {
                    let _ = waker.wake();
                }
            });
        match spawned {
            Ok(thread) => {
                debug!("{lobby}: connecting to {}", self.target.name);
                self.state = State::Connecting(Box::new(Connecting {
                    answer,
                    thread,
                    deadline,
                }));
            }
            Err(e) => self.fail(
                Failure::Connect,
                &format!("cannot start a connect thread: {e}"),
            ),
        }
    }

    /// Takes the connect thread's answer, once it has come.
    fn connected(&mut self, connecting: Box<Connecting>, now: Instant) -> Drive {
        let attempt = match connecting.answer.try_recv() {
            Err(TryRecvError::Empty) if now < connecting.deadline => {
                self.state = State::Connecting(connecting);
                return Drive::Idle;
            }
            Err(TryRecvError::Empty) => {
                self.fail(Failure::Timeout, "Redis connect timed out");
                return Drive::Idle;
            }
            Err(TryRecvError::Disconnected) => Err((
                Failure::Connect,
                "the connect thread ended without an answer".to_owned(),
            )),
            Ok(attempt) => attempt,
        };
        // It has answered, so it is ending: this join is immediate.
        let _ = connecting.thread.join();
        let ready = match attempt {
            Ok(ready) => ready,
            Err((cause, why)) => {
                self.fail(cause, &why);
                return Drive::Idle;
            }
        };
        let stats = &self.lobby.stats;
        if ready.gap > 0 {
            stats.origin_gaps.fetch_add(ready.gap, Relaxed);
            warn!(
                "{}: {} lost {} entries after {} (trimmed or deleted) while the lobby reconnected: \
                 its clients miss them",
                self.lobby.lobby,
                self.target.name,
                ready.gap,
                self.last.unwrap_or_default().id
            );
        }
        if ready.next.is_some() {
            self.last = ready.next;
        }
        info!(
            "{}: origin connected ({})",
            self.lobby.lobby, self.target.name
        );
        bump(&stats.origin_connected);
        stats.origin_connections.fetch_add(1, Relaxed);
        let now = Instant::now();
        self.state = State::Up(Box::new(Live {
            con: ready.con,
            since: now,
            got_message: false,
            last_rx: now,
            next_ping: now + self.target.ping,
            read_timeout: None,
        }));
        Drive::More
    }

    /// Reads for at most `wait`: messages as they come, a ping when due.
    fn read(
        &mut self,
        mut live: Box<Live>,
        wait: Duration,
        deliver: &mut dyn FnMut(Message<'_>),
    ) -> Drive {
        let result = match &self.target.url.mode {
            Mode::PubSub { .. } => self.read_pubsub(&mut live, wait, deliver),
            Mode::Stream { key, field } => {
                let (key, field) = (key.clone(), field.clone());
                self.read_stream(&mut live, &key, &field, wait, deliver)
            }
        };
        match result {
            Ok(drive) => {
                self.state = State::Up(live);
                drive
            }
            Err((cause, why)) => {
                self.lose(live, cause, &why);
                Drive::Idle
            }
        }
    }

    fn read_pubsub(
        &mut self,
        live: &mut Live,
        wait: Duration,
        deliver: &mut dyn FnMut(Message<'_>),
    ) -> std::result::Result<Drive, (Failure, String)> {
        let end = Instant::now() + wait;
        for _ in 0..READS_PER_DRIVE {
            let now = Instant::now();
            if now >= live.next_ping {
                self.ping(live, deliver)?;
                continue;
            }
            let left = end.min(live.next_ping).saturating_duration_since(now);
            if left < MIN_WAIT {
                return Ok(Drive::Idle);
            }
            set_read_timeout(live, left)?;
            // The crate's pub/sub reader keeps a partly read message across
            // timeouts. Dropping a `PubSub` would unsubscribe, and this one
            // is made for one read: it holds nothing else (no message is
            // ever queued in it: subscribing and pings bypass it).
            let mut pubsub = ManuallyDrop::new(live.con.as_pubsub());
            match pubsub.get_message() {
                Ok(msg) => {
                    live.last_rx = Instant::now();
                    live.got_message = true;
                    self.deliver_pubsub(&msg, deliver);
                }
                Err(e) if e.is_timeout() => return Ok(Drive::Idle),
                Err(e) => return Err(lost(&e)),
            }
        }
        Ok(Drive::More)
    }

    /// PING on the subscription, reading up to its pong (and delivering
    /// the messages before it). A late pong ends the connection: the
    /// crate would otherwise skip the next reply when it came.
    fn ping(
        &mut self,
        live: &mut Live,
        deliver: &mut dyn FnMut(Message<'_>),
    ) -> std::result::Result<(), (Failure, String)> {
        let now = Instant::now();
        let left = (live.last_rx + self.target.timeout).saturating_duration_since(now);
        let wait = left.min(PONG_WAIT).max(MIN_WAIT);
        set_read_timeout(live, wait)?;
        live.con
            .send_packed_command(&redis::cmd("PING").get_packed_command())
            .map_err(|e| lost(&e))?;
        loop {
            match live.con.recv_response() {
                Ok(value) => {
                    if let Some(msg) = Msg::from_owned_value(value.clone()) {
                        live.got_message = true;
                        self.deliver_pubsub(&msg, deliver);
                    } else if matches!(&value, Value::Array(v) if v.first().is_some_and(|p| is_bulk(p, b"pong")))
                        || is_bulk(&value, b"pong")
                    {
                        live.last_rx = Instant::now();
                        live.next_ping = live.last_rx + self.target.ping;
                        return Ok(());
                    }
                }
                Err(e) if e.is_timeout() => {
                    return Err((
                        Failure::Silent,
                        format!("Redis silent: no pong within {} ms", wait.as_millis()),
                    ));
                }
                Err(e) => return Err(lost(&e)),
            }
        }
    }

    fn deliver_pubsub(&mut self, msg: &Msg, deliver: &mut dyn FnMut(Message<'_>)) {
        let payload = msg.get_payload_bytes();
        if self.is_oversized(payload.len()) {
            return;
        }
        deliver(Message::payload(kind_of(payload), payload));
    }

    fn read_stream(
        &mut self,
        live: &mut Live,
        key: &str,
        field: &str,
        wait: Duration,
        deliver: &mut dyn FnMut(Message<'_>),
    ) -> std::result::Result<Drive, (Failure, String)> {
        // No wait at all (the lobby has rereads left for its next turn):
        // no BLOCK, as Redis ends a short block only at its next cron tick
        // (every 100 ms at the default `hz` 10) when nothing arrives.
        let block = (!wait.is_zero()).then(|| wait.clamp(MIN_WAIT, INBOX_SLICE));
        // The reply comes within the block time, and an empty one too:
        // nothing within what is left of the liveness timeout means silence.
        let left = (live.last_rx + self.target.timeout).saturating_duration_since(Instant::now());
        let blocks = block.unwrap_or_default();
        set_read_timeout(live, blocks + left.min(PONG_WAIT).max(MIN_WAIT))?;
        let after = self.last.unwrap_or_default().id.to_string();
        let mut xread = redis::cmd("XREAD");
        xread.arg("COUNT").arg(self.target.xread_count);
        if let Some(block) = block {
            xread.arg("BLOCK").arg(block.as_millis() as u64);
        }
        let reply = xread
            .arg("STREAMS")
            .arg(key)
            .arg(&after)
            .query::<Value>(&mut live.con);
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) if e.is_timeout() => {
                return Err((
                    Failure::Silent,
                    format!(
                        "Redis silent: no XREAD reply within {} ms",
                        blocks.as_millis()
                    ),
                ));
            }
            Err(e) => return Err(lost(&e)),
        };
        live.last_rx = Instant::now();
        let mut count = 0;
        for entry in stream_entries(&reply) {
            count += 1;
            let Some((id, fields)) = entry_parts(entry) else {
                continue;
            };
            let added = self.last.and_then(|l| l.added).map(|a| a + 1);
            self.last = Some(StreamPos { id, added });
            live.got_message = true;
            let Some(payload) = field_of(fields, field) else {
                bump(&self.lobby.stats.origin_gaps);
                let why = format!(
                    "{}: stream entry {id} has no field {field:?}; skipped",
                    self.lobby.lobby
                );
                self.skipped(&why);
                continue;
            };
            if self.is_oversized(payload.len()) {
                continue;
            }
            deliver(Message {
                body: crate::source::contract::Body::Payload(kind_of(payload), payload),
                position: Some(id.position()),
            });
        }
        Ok(if count >= self.target.xread_count {
            Drive::More
        } else {
            Drive::Idle
        })
    }

    /// Counts and logs a message above `--max-message`, which is skipped.
    /// Logged at warn once per lobby, then at debug: a feed of them
    /// must not flood the log.
    fn is_oversized(&mut self, len: usize) -> bool {
        if len <= self.target.max_message {
            return false;
        }
        bump(&self.lobby.stats.origin_oversized);
        let why = format!(
            "{}: skipped a {len}-byte message from {}: above the {}-byte limit",
            self.lobby.lobby, self.target.name, self.target.max_message
        );
        self.skipped(&why);
        true
    }

    /// Logs a skipped message: at warn the first time, at debug after.
    fn skipped(&mut self, why: &str) {
        if std::mem::replace(&mut self.has_skipped, true) {
            debug!("{why}");
        } else {
            warn!("{why} (more are counted, and logged at debug)");
        }
    }

    /// An established connection is gone: count it and reconnect after a backoff.
    fn lose(&mut self, live: Box<Live>, cause: Failure, why: &str) {
        drop_one(&self.lobby.stats.origin_connections);
        self.backoff
            .connection_ended(live.since.elapsed(), live.got_message);
        drop(live);
        self.fail(cause, why);
    }

    /// Counts a failure by cause and waits out the backoff before trying again.
    fn fail(&mut self, cause: Failure, why: &str) {
        bump(cause.counter(&self.lobby.stats));
        self.has_failed = true;
        let delay = self.backoff.next_delay();
        warn!(
            "{}: {why} ({}); reconnecting in {} ms",
            self.lobby.lobby,
            self.target.name,
            delay.as_millis()
        );
        self.state = State::Waiting(Instant::now() + delay);
    }
}

/// The entries of an `XREAD` reply for one stream: `[[key, [entry…]]]`
/// (RESP2), or a map of key to entries (RESP3).
fn stream_entries(reply: &Value) -> &[Value] {
    let per_stream = match reply {
        Value::Array(streams) => streams.first().and_then(|s| match s {
            Value::Array(pair) => pair.get(1),
            _ => None,
        }),
        Value::Map(streams) => streams.first().map(|(_, entries)| entries),
        _ => None,
    };
    match per_stream {
        Some(Value::Array(entries)) => entries,
        _ => &[],
    }
}

/// The value of `field` among an entry's `fields` (name, value, …).
fn field_of<'a>(fields: &'a [Value], field: &str) -> Option<&'a [u8]> {
    fields
        .chunks_exact(2)
        .find(|pair| is_bulk(&pair[0], field.as_bytes()))
        .and_then(|pair| match &pair[1] {
            Value::BulkString(bytes) => Some(bytes.as_slice()),
            _ => None,
        })
}

/// The ID and fields of one stream entry, `[id, [field, value, …]]`.
fn entry_parts(entry: &Value) -> Option<(StreamId, &[Value])> {
    let Value::Array(parts) = entry else {
        return None;
    };
    match (parts.first().and_then(StreamId::from_value), parts.get(1)) {
        (Some(id), Some(Value::Array(fields))) => Some((id, fields)),
        _ => None,
    }
}

#[cfg(feature = "sse")]
/// What an `XRANGE` from entry `first` (inclusive) holds for a client
/// that saw `first` last: the first `max` entries after it, with `field`'s
/// value each (entries without it, or above `max_message` bytes, are
/// skipped as the live reader skips them), and whether more follow, if
/// `first` is there.
fn reread_reply(
    entries: &[Value],
    first: StreamId,
    field: &str,
    max: usize,
    max_message: usize,
) -> Reread {
    let mut entries = entries.iter().filter_map(entry_parts);
    if entries.next().is_none_or(|(id, _)| id != first) {
        return Reread::Gone;
    }
    let mut after: Vec<_> = entries.collect();
    let more = (after.len() > max).then(|| {
        after.truncate(max);
        after.last().map_or(first, |(id, _)| *id).position()
    });
    let messages = after
        .into_iter()
        .filter_map(|(id, fields)| {
            let payload = field_of(fields, field).filter(|p| p.len() <= max_message)?;
            Some((kind_of(payload), payload.to_vec(), id.position()))
        })
        .collect();
    Reread::After { messages, more }
}

/// Text if it is UTF-8, binary otherwise.
fn kind_of(payload: &[u8]) -> MessageKind {
    if std::str::from_utf8(payload).is_ok() {
        MessageKind::Text
    } else {
        MessageKind::Binary
    }
}

fn set_read_timeout(live: &mut Live, wait: Duration) -> std::result::Result<(), (Failure, String)> {
    // Milliseconds are what the kernel's timer keeps anyway; skip equal ones.
    let wait = Duration::from_millis(wait.as_millis().max(1) as u64);
    if live.read_timeout != Some(wait) {
        live.con
            .set_read_timeout(Some(wait))
            .map_err(|e| lost(&e))?;
        live.read_timeout = Some(wait);
    }
    Ok(())
}

fn lost(e: &RedisError) -> (Failure, String) {
    let why = if e.is_connection_dropped() {
        "Redis closed the connection".to_owned()
    } else {
        format!("Redis connection failed: {e}")
    };
    (Failure::Lost, why)
}

impl Source for RedisLink {
    fn start(&mut self) {
        if let State::Idle = self.state {
            self.connect();
        }
        self.publish();
    }

    fn stop(&mut self, why: &str) {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Up(live) => {
                drop_one(&self.lobby.stats.origin_connections);
                info!("{}: closing origin connection ({why})", self.lobby.lobby);
                drop(live);
            }
            // The attempt finishes alone; its connection closes unread.
            State::Connecting(_) | State::Waiting(_) | State::Idle => {}
        }
        // A lobby that starts again reads from the newest entry.
        self.last = None;
        self.backoff.reset();
        self.publish();
    }

    /// Waits for input here, at most `budget` and [`INBOX_SLICE`].
    fn drive(&mut self, budget: Duration, deliver: &mut dyn FnMut(Message<'_>)) -> Drive {
        let now = Instant::now();
        let drive = match std::mem::replace(&mut self.state, State::Idle) {
            State::Idle => Drive::Idle,
            State::Waiting(at) if now < at => {
                self.state = State::Waiting(at);
                Drive::Idle
            }
            State::Waiting(_) => {
                self.connect();
                Drive::Idle
            }
            State::Connecting(connecting) => self.connected(connecting, now),
            State::Up(live) => self.read(live, budget.min(INBOX_SLICE), deliver),
        };
        self.publish();
        drive
    }

    fn waits_for_input(&self) -> bool {
        true
    }

    fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Idle => None,
            State::Waiting(at) => Some(*at),
            State::Connecting(connecting) => Some(connecting.deadline),
            // It waits inside `drive`.
            State::Up(_) => Some(Instant::now()),
        }
    }

    fn take_failure(&mut self) -> bool {
        std::mem::take(&mut self.has_failed)
    }

    #[cfg(feature = "sse")]
    fn can_reread(&self) -> bool {
        matches!(self.target.url.mode, Mode::Stream { .. })
    }

    #[cfg(feature = "sse")]
    /// `XRANGE` from the entry at `position` (inclusive, to check that the
    /// stream still holds it) to the last entry delivered, asking for at
    /// most `max + 2` entries: one more than the page tells that more
    /// follow.
    fn reread(&mut self, position: u64, max: usize) -> Reread {
        let Mode::Stream { key, field } = &self.target.url.mode else {
            return Reread::Unsupported;
        };
        let (State::Up(live), Some(last)) = (&mut self.state, self.last) else {
            return Reread::NotYet;
        };
        let first = StreamId::from_position(position);
        if first > last.id {
            // Not delivered here yet (this reader behind another lobby's,
            // or an ID of no entry): the lobby waits for it, then resets.
            return Reread::NotYet;
        }
        let reply = set_read_timeout(live, PONG_WAIT).and_then(|()| {
            redis::cmd("XRANGE")
                .arg(key)
                .arg(first.to_string())
                .arg(last.id.to_string())
                .arg("COUNT")
                .arg(max.saturating_add(2))
                .query::<Value>(&mut live.con)
                .map_err(|e| lost(&e))
        });
        match reply {
            Ok(Value::Array(entries)) => {
                reread_reply(&entries, first, field, max, self.target.max_message)
            }
            Ok(_) => Reread::Gone,
            Err((cause, why)) => {
                if let State::Up(live) = std::mem::replace(&mut self.state, State::Idle) {
                    self.lose(live, cause, &why);
                }
                Reread::NotYet
            }
        }
    }
}

impl Drop for RedisLink {
    fn drop(&mut self) {
        self.stop("lobby ending");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimmed_entries_are_counted_from_the_entries_ever_added() {
        let id = |ms| StreamId(ms, 0);
        // Delivered entry 10 (id 100); since then 20 were added and the
        // stream keeps 5: entries 11..=25 are gone.
        let last = StreamPos {
            id: id(100),
            added: Some(10),
        };
        let info = StreamInfo {
            last_generated: Some(id(130)),
            entries_added: Some(30),
            length: 5,
            first: Some(id(126)),
            max_deleted: None,
        };
        assert_eq!(info.missed_after(last), 15);
        // The stream still holds the last entry delivered: nothing missed.
        let kept = StreamInfo {
            first: Some(id(90)),
            length: 41,
            ..info
        };
        assert_eq!(kept.missed_after(last), 0);
        // An XDEL after it counts, where the counts cannot tell.
        let deleted = StreamInfo {
            max_deleted: Some(id(101)),
            ..kept
        };
        assert_eq!(deleted.missed_after(last), 1);
        // An older server says nothing.
        let old = StreamInfo {
            entries_added: None,
            max_deleted: None,
            first: Some(id(126)),
            length: 5,
            last_generated: None,
        };
        assert_eq!(old.missed_after(last), 0);
    }

    #[cfg(feature = "sse")]
    #[test]
    fn stream_ids_pack_into_positions_and_back() {
        for id in [
            StreamId(1_765_000_000_000, 0),
            StreamId(1_765_000_000_000, 7),
            StreamId(1, 1),
            StreamId((1 << MS_BITS) - 1, (1 << SEQ_BITS) - 1),
        ] {
            assert_eq!(StreamId::from_position(id.position()), id, "{id}");
        }
        // Packed positions keep the entries' order.
        assert!(StreamId(5, 1).position() < StreamId(5, 2).position());
        assert!(StreamId(5, 9).position() < StreamId(6, 0).position());
        // Too large to pack: hashed, so it reads back as another entry.
        let huge = StreamId(1 << MS_BITS, 0);
        assert_ne!(StreamId::from_position(huge.position()), huge);
        let many = StreamId(1, 1 << SEQ_BITS);
        assert_ne!(StreamId::from_position(many.position()), many);
    }

    #[cfg(feature = "sse")]
    #[test]
    fn a_reread_starts_at_the_entry_seen_and_is_paged() {
        let bulk = |t: &str| Value::BulkString(t.as_bytes().to_vec());
        let entry = |id: &str, field: &str, value: &str| {
            Value::Array(vec![bulk(id), Value::Array(vec![bulk(field), bulk(value)])])
        };
        let reply = [
            entry("5-0", "data", "seen"),
            entry("6-0", "data", "a"),
            entry("6-1", "other", "skipped"),
            entry("7-0", "data", "b"),
        ];
        let after = |max| reread_reply(&reply, StreamId(5, 0), "data", max, 1024);
        let a = (MessageKind::Text, b"a".to_vec(), StreamId(6, 0).position());
        let b = (MessageKind::Text, b"b".to_vec(), StreamId(7, 0).position());
        assert_eq!(
            after(3),
            Reread::After {
                messages: vec![a.clone(), b],
                more: None
            }
        );
        // Three entries follow: a page of two, the next from the skipped one.
        assert_eq!(
            after(2),
            Reread::After {
                messages: vec![a.clone()],
                more: Some(StreamId(6, 1).position())
            }
        );
        assert_eq!(
            after(1),
            Reread::After {
                messages: vec![a],
                more: Some(StreamId(6, 0).position())
            }
        );
        assert_eq!(
            after(0),
            Reread::After {
                messages: vec![],
                more: Some(StreamId(5, 0).position())
            },
            "a page of none"
        );
        // The stream no longer holds the entry seen: its first is later.
        assert_eq!(
            reread_reply(&reply, StreamId(4, 0), "data", 3, 1024),
            Reread::Gone
        );
        assert_eq!(
            reread_reply(&[], StreamId(5, 0), "data", 3, 1024),
            Reread::Gone
        );
    }

    #[test]
    fn stream_ids_order_and_parse() {
        let a = StreamId::parse(b"1700000000000-5").unwrap();
        let b = StreamId::parse(b"1700000000001-0").unwrap();
        assert!(a < b);
        assert_eq!(a.to_string(), "1700000000000-5");
        assert!(StreamId::parse(b"17").is_none());
        assert_eq!(StreamId::default().to_string(), "0-0");
    }
}
