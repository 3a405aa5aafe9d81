//! One client connection as its writer thread holds it.
//!
//! [`Conn`] is the per-client state machine the writer (`writer.rs`) drives:
//! read client bytes through the writer's scratch buffer and decode them
//! (`wire/frame.rs`), answer pings, complete closes, enforce the per-client limits
//! (message size, message rate, keepalive, slow-client policy), forward client
//! messages when configured, and write queued frames with vectored writes.
//! It keeps per client only what it must: the socket, the queue handle, its
//! seat, a frame decoder, a few timestamps, and, only while a write is
//! unfinished, the unwritten frames: at most a queue's worth of data frames
//! and, once its socket is full, one pong (a newer ping's pong replaces an
//! unsent one, as RFC 6455 §5.5.3 allows), a keepalive ping and a close. Every frame a client sends is
//! counted against its rate limit as its header is decoded, before anything
//! in it is answered or forwarded. The writer owns the event loop, the
//! wakeups and the slab of connections; nothing here blocks.
//!
//! A `wss://` client (feature `tls`) has a rustls session beside its socket,
//! and the same state machine with one branch on it where bytes meet the
//! socket (`wire/tls.rs`): its frames go into the session coalesced, as many
//! as one 16 KiB record takes, and out with one write of the records; the
//! session takes more only when the socket took everything, so the queue
//! stays the one queue (a frame counts as delivered, and in the bytes
//! written, once the session took it). A plain client's writes go straight
//! to its socket as before, past a test of an empty `Option`.

use std::{
    collections::VecDeque,
    io::{self, IoSlice, Read, Write},
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::{Sender, TrySendError};
use log::debug;
use mio::net::TcpStream;

#[cfg(feature = "sse")]
use crate::wire::sse;
#[cfg(feature = "tls")]
use crate::wire::tls::{self, Session};
use crate::{
    config::{ClientMessages, Config, SlowClient},
    control::{
        inbox::{ClientMessage, Forwarded, ManagerMsg},
        seat::Seat,
    },
    delivery::queue::Outlet,
    id::ClientId,
    stats::{Disconnect, DropReason, LatencySampler, Stats, bump},
    wire::{
        close::{self, Violation},
        deflate::Inflater,
        frame::{self, Decoder, Event, Frame},
    },
};

/// Most frames gathered into one vectored write.
const MAX_IOV: usize = 64;
/// Vectored writes per client per turn, so one busy client cannot starve others.
const WRITES_PER_TURN: usize = 4;
/// Socket reads per client per turn, for the same reason.
const READS_PER_TURN: usize = 4;
/// The window over which slow-client drops are counted.
const DROP_WINDOW: Duration = Duration::from_secs(60);
/// What a client over its frame rate is closed with.
const RATE_EXCEEDED: Violation = Violation {
    code: close::POLICY_VIOLATION,
    reason: "message rate exceeded",
};

/// The per-client rules, the same for every client; built once from the config.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    max_message: usize,
    /// Messages per second; 0 means no limit.
    max_rate: u32,
    ping_after: Duration,
    /// With the disconnect policy, drops allowed per [`DROP_WINDOW`].
    max_drops: Option<u64>,
    /// How long a client gets to receive its close frame (and answer it).
    close_wait: Duration,
    forward: bool,
    /// How often an idle SSE stream gets a heartbeat comment.
    #[cfg(feature = "sse")]
    sse_heartbeat: Duration,
}

impl Policy {
    /// The rules `config` describes.
    pub(crate) fn new(config: &Config) -> Policy {
        Policy {
            max_message: config.max_client_message,
            max_rate: config.max_client_rate,
            ping_after: config.client_ping,
            max_drops: (config.slow_client == SlowClient::Disconnect)
                .then_some(config.slow_client_drops),
            close_wait: config.drain_timeout,
            forward: config.client_messages == ClientMessages::Forward,
            #[cfg(feature = "sse")]
            sse_heartbeat: config.sse_heartbeat,
        }
    }
}

/// Buffers, counters and rules shared by all clients of a writer.
#[derive(Debug)]
pub(crate) struct IoCtx {
    pub scratch: Box<[u8]>,
    pub batch: Vec<Frame>,
    /// Frames fully written since the counts were last published.
    pub delivered: u64,
    /// Of those, the compressed ones (permessage-deflate).
    pub delivered_deflated: u64,
    /// Data frames lost here since the counts were last published, by reason.
    pub dropped: [u64; DropReason::COUNT],
    /// Bytes written since the counts were last published.
    pub bytes: u64,
    /// Writes that wrote something since the counts were last published.
    pub writes: u64,
    /// Delivery latency samples since the counts were last published.
    pub latency: LatencySampler,
    pub stats: Arc<Stats>,
    pub policy: Policy,
    /// Where departures are reported.
    pub manager: Sender<ManagerMsg>,
    /// Where forwarded client messages go (bounded: when full, they are dropped).
    pub forwards: Sender<ClientMessage>,
    /// The zero of the writer's millisecond clock (see [`Millis`]).
    pub epoch: Instant,
    /// Inflates its clients' compressed messages, one at a time.
    pub inflater: Inflater,
}

/// A point in time as milliseconds since the writer's epoch, wrapping every
/// 49 days: 4 bytes where an `Instant` takes 16, for the timestamps every
/// connection keeps. Intervals compared with it must stay under 24 days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Millis(u32);

impl Millis {
    /// Time from `earlier` to `self` (zero if `earlier` is in fact later).
    fn since(self, earlier: Millis) -> Duration {
        let elapsed = self.0.wrapping_sub(earlier.0) as i32;
        Duration::from_millis(u64::from(elapsed.max(0).unsigned_abs()))
    }

    /// Whether `self` is at or past `deadline`.
    fn reached(self, deadline: Millis) -> bool {
        // The wrapping difference read as signed: a past deadline is a small positive.
        (self.0.wrapping_sub(deadline.0) as i32) >= 0
    }

    fn after(self, d: Duration) -> Millis {
        Millis(self.0.wrapping_add(d.as_millis() as u32))
    }
}

impl IoCtx {
    /// The writer's clock now.
    pub(crate) fn now(&self) -> Millis {
        self.at(Instant::now())
    }

    /// `instant` on the writer's clock.
    pub(crate) fn at(&self, instant: Instant) -> Millis {
        Millis(instant.saturating_duration_since(self.epoch).as_millis() as u32)
    }

    /// Counts `n` data frames lost for `reason`.
    pub(crate) fn lost(&mut self, reason: DropReason, n: u64) {
        self.dropped[reason as usize] += n;
    }
}

/// A client's frame budget: a token bucket holding up to a second's worth
/// of frames (the burst), refilled continuously, in thousandths of a frame.
#[derive(Debug, Clone, Copy)]
struct RateLimit {
    credit: u32,
    at: Millis,
}

impl RateLimit {
    /// A full bucket for `max` frames a second.
    fn full(max: u32, now: Millis) -> RateLimit {
        RateLimit {
            credit: max.saturating_mul(1000),
            at: now,
        }
    }

    /// Takes one frame's credit at `now`; false if there is none (`max` 0:
    /// no limit).
    fn take(&mut self, max: u32, now: Millis) -> bool {
        if max == 0 {
            return true;
        }
        let elapsed = u64::try_from(now.since(self.at).as_millis()).unwrap_or(u64::MAX);
        self.at = now;
        // `max` frames a second is `max` thousandths of a frame a millisecond.
        let cap = u64::from(max) * 1000;
        let credit = (u64::from(self.credit) + elapsed.saturating_mul(u64::from(max))).min(cap);
        let (credit, ok) = match credit.checked_sub(1000) {
            Some(left) => (left, true),
            None => (credit, false),
        };
        self.credit = u32::try_from(credit).unwrap_or(u32::MAX);
        ok
    }
}

/// Where a client stands in the closing handshake.
#[derive(Debug)]
enum Closing {
    /// Normal operation.
    Open,
    /// Shutting down: write what is queued, then this close frame.
    Draining(Frame),
    /// Our close frame is in `pending`; nothing more is taken from the queue.
    Sending,
    /// Our close frame is written; waiting for the peer's.
    Sent,
}

/// What a turn of service decided for a client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Nothing more to do until an event or a wake.
    Idle,
    /// Work is left (budget spent): serve again next turn.
    More,
    /// The connection is finished, for this reason.
    Remove(Disconnect),
}

/// One client connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub id: ClientId,
    link: Link,
    queue: Outlet,
    /// Its place in the client counts, given back when the connection drops.
    _seat: Seat,
    /// Frames taken from the queue (or control frames) not yet fully written.
    pending: VecDeque<Frame>,
    /// Bytes of `pending[0]` already written.
    offset: usize,
    decoder: Decoder,
    closing: Closing,
    /// When to give up on a closing client.
    close_deadline: Option<Millis>,
    /// Why the connection is closing, once it is: who started the close
    /// handshake, or which rule.
    closing_for: Option<Disconnect>,
    /// The socket may have unread input.
    pub readable: bool,
    /// The socket may accept writes (false after `WouldBlock`; see
    /// [`Conn::set_writable`]).
    writable: bool,
    /// The client is on the writer's ready list.
    pub is_ready: bool,
    /// The client sent a close frame, or broke the rules: ignore its input.
    is_peer_done: bool,
    /// When the client last sent anything; for an SSE client, which sends
    /// nothing, when its stream last had a heartbeat.
    last_heard: Millis,
    /// A Server-Sent Events stream (feature `sse`), not a WebSocket: its
    /// queue holds events, its input is ignored, it gets heartbeat comments
    /// instead of pings, and its "close" is the end of the stream.
    sse: bool,
    is_pinged: bool,
    rate: RateLimit,
    /// When the current drop window started.
    drop_window: Millis,
    /// Queue drops seen at its start: the count's low 32 bits, which a
    /// minute's drops never wrap.
    drops_at_window: u32,
    /// A message being received for forwarding.
    inbound: Option<Box<Forwarded>>,
}

/// Where a client's bytes meet the wire: its socket, and its TLS session
/// for a `wss://` client.
#[derive(Debug)]
struct Link {
    stream: TcpStream,
    #[cfg(feature = "tls")]
    tls: Option<Session>,
}

impl Link {
    /// Reads client bytes: from the socket, or decrypted by the session.
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(session) = self.tls.as_deref_mut() {
            return tls::read(session, &mut self.stream, buf);
        }
        self.stream.read(buf)
    }

    /// Writes `frames`, the first from `offset` on: to the socket in one
    /// vectored write, or into the TLS session and on (see the module docs).
    #[inline]
    fn send<'a>(
        &mut self,
        frames: impl ExactSizeIterator<Item = &'a Frame>,
        offset: usize,
    ) -> io::Result<usize> {
        #[cfg(feature = "tls")]
        if let Some(session) = self.tls.as_deref_mut() {
            return tls::encrypt(session, &mut self.stream, frames.map(|f| &f[..]), offset);
        }
        write_frames(&mut self.stream, frames, offset)
    }

    /// Writes what the TLS session holds unsent, if there is a session.
    #[inline]
    fn flush(&mut self) -> io::Result<bool /* everything is out */> {
        #[cfg(feature = "tls")]
        if let Some(session) = self.tls.as_deref_mut() {
            return tls::flush(session, &mut self.stream).map(|f| f == tls::Flushed::All);
        }
        Ok(true)
    }

    /// Ends the TLS session, if there is one, with a `close_notify`, as far
    /// as the socket takes it (the connection is about to go).
    fn close_notify(&mut self) {
        #[cfg(feature = "tls")]
        if let Some(session) = self.tls.as_deref_mut() {
            session.send_close_notify();
            let _ = tls::flush(session, &mut self.stream);
        }
    }

    /// One best-effort write of `bytes` (the connection is about to go).
    fn write_now(&mut self, bytes: &[u8]) {
        #[cfg(feature = "tls")]
        if let Some(session) = self.tls.as_deref_mut() {
            tls::write_now(session, &mut self.stream, bytes);
            return;
        }
        let _ = self.stream.write(bytes);
    }
}

impl Conn {
    /// A connection for a client just attached to the writer; `deflate`
    /// if it negotiated permessage-deflate, `sse` for an event stream.
    pub(crate) fn new(
        id: ClientId,
        stream: TcpStream,
        (queue, seat): (Outlet, Seat),
        (deflate, sse): (bool, bool),
        io: &IoCtx,
    ) -> Conn {
        let now = io.now();
        Conn {
            id,
            link: Link {
                stream,
                #[cfg(feature = "tls")]
                tls: None,
            },
            drops_at_window: queue.slow_drops() as u32,
            queue,
            _seat: seat,
            pending: VecDeque::new(),
            offset: 0,
            decoder: Decoder::new(io.policy.max_message)
                .with_deflate(deflate)
                .skimming(!io.policy.forward),
            closing: Closing::Open,
            close_deadline: None,
            closing_for: None,
            readable: true,
            writable: true,
            is_ready: false,
            is_peer_done: false,
            last_heard: now,
            sse,
            is_pinged: false,
            rate: RateLimit::full(io.policy.max_rate, now),
            drop_window: now,
            inbound: None,
        }
    }

    /// Makes this a `wss://` client: its bytes go through `session` (past
    /// its handshake, its output buffer capped: `wire/tls.rs`).
    #[cfg(feature = "tls")]
    pub(crate) fn set_tls(&mut self, session: Option<Session>) {
        self.link.tls = session.map(|mut session| {
            tls::limit(&mut session);
            session
        });
    }

    /// Ends a `wss://` client's TLS session cleanly before its socket is
    /// dropped (nothing for a plain client).
    pub(crate) fn close_notify(&mut self) {
        self.link.close_notify();
    }

    /// The socket, to register or deregister it.
    pub(crate) fn stream(&mut self) -> &mut TcpStream {
        &mut self.link.stream
    }

    /// Empties what the client was owed but never received: data frames
    /// taken from the queue but unwritten, and those still queued. Returns
    /// how many (they are lost as the connection goes).
    pub(crate) fn discard(&mut self) -> u64 {
        let sse = self.sse;
        let unwritten = self
            .pending
            .drain(..)
            .filter(|f| is_message(f, sse))
            .count() as u64;
        let queued = std::iter::from_fn(|| self.queue.pop())
            .take(self.queue.depth())
            .filter(|f| is_message(f, sse))
            .count() as u64;
        unwritten + queued
    }

    /// Why the connection ends, when the socket says it does: the reason
    /// the close began if it had, else `otherwise`.
    fn ended(&self, otherwise: Disconnect) -> Turn {
        Turn::Remove(self.closing_for.unwrap_or(otherwise))
    }

    /// One best-effort close frame with `code`, written at once (its writer
    /// failed and the connection is about to be dropped).
    pub(crate) fn abort(&mut self, code: u16, why: &str) {
        if !self.sse {
            self.link.write_now(&frame::encode_close(code, why));
        }
    }

    /// Notes whether the socket accepts writes. The queue carries it to the
    /// lobby, which counts a frame it drops while the socket is full as the
    /// client's loss, not the writer's.
    pub(crate) fn set_writable(&mut self, writable: bool) {
        if self.writable != writable {
            self.writable = writable;
            self.queue.set_stalled(!writable);
        }
    }

    /// Whether the lobby's frames for this client should be written now.
    pub(crate) fn wants_queue(&self) -> bool {
        self.writable
            && !self.is_ready
            && matches!(self.closing, Closing::Open | Closing::Draining(_))
            && !self.queue.is_empty()
    }

    /// One turn: read what the client sent, then write what it is owed.
    pub(crate) fn serve(&mut self, io: &mut IoCtx) -> Turn {
        let mut turn = Turn::Idle;
        if self.readable {
            turn = self.read(io);
            if let Turn::Remove(_) = turn {
                return turn;
            }
            if matches!(self.closing, Closing::Sent) && self.is_peer_done {
                return self.ended(Disconnect::ClientClosed);
            }
        }
        if self.writable {
            match self.write(io) {
                Turn::Idle => {}
                other => turn = other,
            }
        }
        turn
    }

    /// Time-driven rules, checked a few times a second: close deadlines,
    /// keepalive pings, the slow-client policy. True if the client needs a turn.
    pub(crate) fn tick(&mut self, now: Millis, io: &mut IoCtx) -> Result<bool, Disconnect> {
        if self.close_deadline.is_some_and(|at| now.reached(at)) {
            debug!("{}: close not completed in time", self.id);
            return Err(self.closing_for.unwrap_or(Disconnect::ConnectionLost));
        }
        if !matches!(self.closing, Closing::Open) {
            return Ok(false);
        }
        #[cfg(feature = "sse")]
        if self.sse {
            return self.tick_stream(now, io);
        }
        #[cfg(feature = "sse")]
        if self.queue.is_overflowed() {
            // A resume client (the only WebSocket client whose queue closes
            // when full): what it has queued, then 1013, and it resumes.
            debug!(
                "{}: resume client cannot keep up; closed to resume",
                self.id
            );
            self.close_after_queue(
                close::TRY_AGAIN_LATER,
                close::RESUME_BEHIND,
                Disconnect::TooSlow,
                now.after(io.policy.close_wait),
            );
            return Ok(true);
        }
        let silent = now.since(self.last_heard);
        if silent >= io.policy.ping_after * 2 {
            debug!("{}: silent for {silent:?}; closing", self.id);
            self.close_now(Disconnect::Silent, "no answer to ping", io);
            return Ok(true);
        }
        if silent >= io.policy.ping_after && !self.is_pinged {
            self.is_pinged = true;
            self.push_controls([frame::encode(frame::OP_PING, b"")]);
            return Ok(true);
        }
        if let Some(max) = io.policy.max_drops {
            let drops =
                u64::from((self.queue.slow_drops() as u32).wrapping_sub(self.drops_at_window));
            if drops > max {
                debug!("{}: lost {drops} frames within a minute; closing", self.id);
                self.close_now(Disconnect::TooSlow, "too slow to keep up", io);
                return Ok(true);
            }
            if now.since(self.drop_window) >= DROP_WINDOW {
                self.drop_window = now;
                self.drops_at_window = self.queue.slow_drops() as u32;
            }
        }
        Ok(false)
    }

    /// An SSE client's time-driven rules: a stream whose queue overflowed
    /// is closed (its client reconnects and resumes from the history, having
    /// lost nothing); an idle one gets a heartbeat comment.
    #[cfg(feature = "sse")]
    fn tick_stream(&mut self, now: Millis, io: &IoCtx) -> Result<bool, Disconnect> {
        if self.queue.is_overflowed() {
            debug!("{}: event stream cannot keep up; closed to resume", self.id);
            return Err(Disconnect::TooSlow);
        }
        if now.since(self.last_heard) < io.policy.sse_heartbeat {
            return Ok(false);
        }
        self.last_heard = now;
        if self.pending.is_empty() && self.queue.is_empty() {
            self.pending.push_back(sse::heartbeat());
            return Ok(true);
        }
        Ok(false)
    }

    /// Starts the shutdown close: what is queued, then 1001, within `deadline`.
    pub(crate) fn begin_drain(&mut self, deadline: Millis) {
        self.close_after_queue(
            close::GOING_AWAY,
            "server shutting down",
            Disconnect::Shutdown,
            deadline,
        );
    }

    /// Ends a client whose access expired (its token's `exp` and the
    /// leeway passed): what is queued, then 4401, within the close wait.
    pub(crate) fn expire(&mut self, io: &IoCtx) {
        debug!("{}: token expired; closing", self.id);
        self.close_after_queue(
            close::TOKEN_EXPIRED,
            close::EXPIRED,
            Disconnect::TokenExpired,
            io.now().after(io.policy.close_wait),
        );
    }

    /// Writes what is queued, then a close with `code` and `reason`, unless
    /// a close is under way; the client has until `deadline`.
    fn close_after_queue(&mut self, code: u16, reason: &str, why: Disconnect, deadline: Millis) {
        if let Closing::Open = self.closing {
            self.closing = Closing::Draining(frame::encode_close(code, reason));
            self.close_deadline = Some(deadline);
            self.closing_for = Some(why);
        }
    }

    /// Decodes bytes the client sent (read from the socket, or sent along
    /// with its upgrade request) and reacts to them. Each frame is counted
    /// against the rate limit as its header is decoded: a client over it is
    /// closed with 1008 before that frame is acted on, and the rest of its
    /// input is ignored.
    pub(crate) fn decode(&mut self, bytes: &mut [u8], io: &mut IoCtx) {
        let now = io.now();
        self.last_heard = now;
        self.is_pinged = false;
        let mut pongs = Vec::new();
        let mut peer_close = None;
        let IoCtx {
            policy,
            forwards,
            stats,
            inflater,
            ..
        } = io;
        let (id, rate, inbound) = (self.id, &mut self.rate, &mut self.inbound);
        let result = self.decoder.decode(bytes, inflater, &mut |event| {
            match event {
                Event::FrameStart if !rate.take(policy.max_rate, now) => return Err(RATE_EXCEEDED),
                Event::FrameStart | Event::Pong => {}
                Event::Ping(payload) => pongs.push(frame::encode(frame::OP_PONG, payload)),
                Event::Close { code, .. } => peer_close = Some(code),
                Event::Data { kind, payload, fin } if policy.forward => {
                    let message = inbound.get_or_insert_with(|| {
                        Box::new(Forwarded {
                            kind,
                            payload: Vec::new(),
                        })
                    });
                    message.payload.extend_from_slice(payload);
                    if let Some(message) = inbound.take_if(|_| fin) {
                        forward(forwards, stats, id, *message);
                    }
                }
                Event::Data { .. } => {}
            }
            Ok(())
        });
        self.push_controls(pongs);
        if let Some(code) = peer_close {
            self.is_peer_done = true;
            let reply = match code {
                Some(code) => frame::encode_close(code, ""),
                None => frame::encode(frame::OP_CLOSE, &[]),
            };
            if self.close_with(reply, now.after(io.policy.close_wait)) {
                self.closing_for = Some(Disconnect::ClientClosed);
            }
        }
        if let Err(Violation { code, reason }) = result {
            debug!("{}: {reason} (closing with {code})", self.id);
            self.close_now(Disconnect::for_close_code(code), reason, io);
        }
    }

    /// Closes the client for breaking a rule (`reason` says which; the
    /// close code follows from it): its input is ignored from now on.
    fn close_now(&mut self, reason: Disconnect, why: &str, io: &IoCtx) {
        self.is_peer_done = true;
        self.inbound = None;
        let code = reason.close_code().unwrap_or(close::POLICY_VIOLATION);
        if self.close_with(
            frame::encode_close(code, why),
            io.now().after(io.policy.close_wait),
        ) {
            self.closing_for = Some(reason);
        }
    }

    fn read(&mut self, io: &mut IoCtx) -> Turn {
        for _ in 0..READS_PER_TURN {
            let mut scratch = std::mem::take(&mut io.scratch);
            let read = self.link.read(&mut scratch);
            let turn = match read {
                Ok(0) => Some(self.ended(Disconnect::ConnectionLost)),
                Ok(n) => {
                    // An SSE client has nothing to say: its bytes are ignored.
                    if !self.is_peer_done && !self.sse {
                        self.decode(&mut scratch[..n], io);
                    }
                    None
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    Some(Turn::Idle)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
                Err(e) => {
                    debug!("{}: read failed: {e}", self.id);
                    Some(self.ended(Disconnect::SocketError))
                }
            };
            io.scratch = scratch;
            if let Some(turn) = turn {
                return turn;
            }
        }
        Turn::More
    }

    /// Queues control frames at the next frame boundary, after earlier
    /// ones (one walk over those, however many are queued). While the socket
    /// is full, a pong replaces an unsent pong (only the latest ping needs
    /// its answer, RFC 6455 §5.5.3): so at most a pong and a ping wait here,
    /// however often a client that never reads pings, while one that reads
    /// gets every pong.
    fn push_controls(&mut self, frames: impl IntoIterator<Item = Frame>) {
        if !matches!(self.closing, Closing::Open | Closing::Draining(_)) {
            return;
        }
        let mut at = usize::from(self.offset > 0).min(self.pending.len());
        let mut unsent_pong = None;
        while let Some(unsent) = self.pending.get(at).filter(|f| !is_data(f)) {
            if opcode(unsent) == frame::OP_PONG {
                unsent_pong = Some(at);
            }
            at += 1;
        }
        for frame in frames {
            if opcode(&frame) == frame::OP_PONG && !self.writable {
                if let Some(pong) = unsent_pong.and_then(|i| self.pending.get_mut(i)) {
                    *pong = frame;
                    continue;
                }
                unsent_pong = Some(at);
            }
            self.pending.insert(at, frame);
            at += 1;
        }
    }

    /// Sends `close` after the frame being written, dropping what else is
    /// unsent; the client has until `deadline` to receive it and answer.
    /// False if a close was already under way (this one is not sent).
    fn close_with(&mut self, close: Frame, deadline: Millis) -> bool {
        match self.closing {
            Closing::Open | Closing::Draining(_) => {
                let keep = usize::from(self.offset > 0).min(self.pending.len());
                self.pending.truncate(keep);
                // An event stream just ends.
                if !self.sse {
                    self.pending.push_back(close);
                }
                self.closing = Closing::Sending;
                self.close_deadline = Some(deadline);
                true
            }
            Closing::Sending | Closing::Sent => false,
        }
    }

    /// Writes queued frames until the queue is empty, the socket is full or the
    /// turn's budget is spent.
    fn write(&mut self, io: &mut IoCtx) -> Turn {
        for _ in 0..WRITES_PER_TURN {
            // TLS records the socket did not take go first (a plain
            // client has none).
            match self.link.flush() {
                Ok(true) => {}
                Ok(false) => {
                    self.set_writable(false);
                    return Turn::Idle;
                }
                Err(e) => {
                    debug!("{}: write failed: {e}", self.id);
                    return self.ended(Disconnect::SocketError);
                }
            }
            if !self.pending.is_empty() {
                // Left from a stalled write: keep no more than a queue's worth.
                self.trim(io);
            }
            let written = if self.pending.is_empty() {
                if matches!(self.closing, Closing::Open | Closing::Draining(_)) {
                    self.pull(io);
                }
                if io.batch.is_empty() {
                    return self.after_flush();
                }
                let r = self.link.send(io.batch.iter(), 0);
                self.advance_batch(r, io)
            } else {
                let r = self.link.send(self.pending.iter(), self.offset);
                self.advance_pending(r, io)
            };
            match written {
                Ok(Progress::Flushed | Progress::Partial) => {}
                Ok(Progress::Blocked) => {
                    self.set_writable(false);
                    return Turn::Idle;
                }
                Err(reason) => return self.ended(reason),
            }
        }
        Turn::More
    }

    /// Takes up to a vectored write's worth of frames from the queue. A close
    /// frame there (the lobby closing its members) ends the stream.
    fn pull(&mut self, io: &mut IoCtx) {
        // Pop what is there, no more: a failed pop costs as much as a good one.
        let queued = self.queue.len().min(MAX_IOV - io.batch.len());
        for _ in 0..queued {
            let Some(frame) = self.queue.pop() else {
                break;
            };
            let is_close = opcode(&frame) == frame::OP_CLOSE;
            let route_removed = is_close && frame.get(4..) == Some(close::ROUTE_REMOVED.as_bytes());
            // An event stream ends where a WebSocket gets its close frame.
            if !(is_close && self.sse) {
                io.batch.push(frame);
            }
            if is_close {
                // A lobby queues a close frame when it lost its origin (with
                // `--on-origin-loss close`) or its route was removed.
                self.closing = Closing::Sending;
                self.close_deadline = Some(io.now().after(io.policy.close_wait));
                self.closing_for = Some(if route_removed {
                    Disconnect::RouteRemoved
                } else {
                    Disconnect::OriginLost
                });
                break;
            }
        }
    }

    /// Everything owed is written: move the close handshake along.
    fn after_flush(&mut self) -> Turn {
        match std::mem::replace(&mut self.closing, Closing::Open) {
            Closing::Draining(_) if self.sse => self.ended(Disconnect::Shutdown),
            Closing::Draining(close) => {
                self.pending.push_back(close);
                self.closing = Closing::Sending;
                Turn::More
            }
            Closing::Sending => {
                self.closing = Closing::Sent;
                if self.is_peer_done || self.sse {
                    return self.ended(Disconnect::ClientClosed);
                }
                Turn::Idle
            }
            other => {
                self.closing = other;
                Turn::Idle
            }
        }
    }

    /// Before writing again after a stall: keep at most a queue's worth of
    /// unwritten frames, dropping the oldest unstarted ones.
    fn trim(&mut self, io: &mut IoCtx) {
        if !matches!(self.closing, Closing::Open) {
            return;
        }
        let started = usize::from(self.offset > 0);
        let unstarted = self.pending.len().saturating_sub(started);
        let excess = (unstarted + self.queue.len()).saturating_sub(self.queue.depth());
        #[cfg(feature = "sse")]
        if self.queue.closes_when_full() {
            // An event stream or a resume client is closed rather than lose
            // a frame (unless `--slow-stream drop` made its queue thin).
            if excess > 0 {
                self.queue.overflow();
            }
            return;
        }
        let mut dropped = 0;
        for _ in 0..excess.min(unstarted) {
            if let Some(frame) = self.pending.remove(started) {
                if is_message(&frame, self.sse) {
                    dropped += 1;
                }
            }
        }
        io.lost(DropReason::SlowClient, dropped);
        self.queue.count_lost(DropReason::SlowClient, dropped);
    }

    /// Accounts a write from the writer's batch: unwritten frames move to
    /// `pending`. The batch is empty afterwards whatever happened (its
    /// frames are this client's; on an error they are counted as dropped).
    fn advance_batch(
        &mut self,
        r: io::Result<usize>,
        io: &mut IoCtx,
    ) -> Result<Progress, Disconnect> {
        let progress = self.take_batch(r, io);
        if !io.batch.is_empty() {
            let sse = self.sse;
            let lost = io.batch.iter().filter(|f| is_message(f, sse)).count() as u64;
            io.lost(DropReason::Departed, lost);
            io.batch.clear();
        }
        progress
    }

    fn take_batch(&mut self, r: io::Result<usize>, io: &mut IoCtx) -> Result<Progress, Disconnect> {
        let (mut n, progress) = match r {
            Ok(0) => {
                debug!("{}: write returned zero", self.id);
                return Err(Disconnect::SocketError);
            }
            Ok(n) => {
                io.bytes += n as u64;
                io.writes += 1;
                (n, Progress::Partial)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, Progress::Blocked),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => (0, Progress::Partial),
            Err(e) => {
                debug!("{}: write failed: {e}", self.id);
                return Err(Disconnect::SocketError);
            }
        };
        let mut done = 0;
        for frame in &io.batch {
            if n < frame.len() {
                break;
            }
            n -= frame.len();
            if is_message(frame, self.sse) {
                io.delivered += 1;
                io.delivered_deflated += u64::from(!self.sse && frame::is_deflated(frame));
                io.latency.delivered(frame.stamp(), &io.stats.epoch);
            }
            done += 1;
        }
        if done == io.batch.len() {
            io.batch.clear();
            return Ok(Progress::Flushed);
        }
        self.offset = n;
        self.pending.extend(io.batch.drain(done..));
        io.batch.clear();
        Ok(progress)
    }

    /// Accounts a write from `pending`.
    fn advance_pending(
        &mut self,
        r: io::Result<usize>,
        io: &mut IoCtx,
    ) -> Result<Progress, Disconnect> {
        let mut n = match r {
            Ok(0) => {
                debug!("{}: write returned zero", self.id);
                return Err(Disconnect::SocketError);
            }
            Ok(n) => {
                io.bytes += n as u64;
                io.writes += 1;
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Progress::Blocked),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Progress::Partial),
            Err(e) => {
                debug!("{}: write failed: {e}", self.id);
                return Err(Disconnect::SocketError);
            }
        };
        while let Some(head) = self.pending.front() {
            let left = head.len() - self.offset;
            if n < left {
                self.offset += n;
                return Ok(Progress::Partial);
            }
            n -= left;
            self.offset = 0;
            if is_message(head, self.sse) {
                io.delivered += 1;
                io.delivered_deflated += u64::from(!self.sse && frame::is_deflated(head));
                io.latency.delivered(head.stamp(), &io.stats.epoch);
            }
            self.pending.pop_front();
        }
        // Stalls are rare: give the memory back rather than keep it per client.
        self.pending = VecDeque::new();
        Ok(Progress::Flushed)
    }
}

/// What one vectored write achieved.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// Everything offered was written.
    Flushed,
    /// Part was written; write again (only `WouldBlock` proves the socket full,
    /// and only then will a writable event follow).
    Partial,
    /// The socket is full: wait for a writable event.
    Blocked,
}

/// Data frames count as deliveries; control frames (ping, pong, close) do not.
pub(crate) fn is_data(frame: &Frame) -> bool {
    frame.first().is_some_and(|b| b & 0x08 == 0)
}

/// Whether a frame a client is sent counts as a message delivered: a data
/// frame for a WebSocket, an event (not a comment) for an SSE stream.
#[inline]
fn is_message(frame: &Frame, sse: bool) -> bool {
    #[cfg(feature = "sse")]
    if sse {
        return sse::is_event(frame);
    }
    #[cfg(not(feature = "sse"))]
    let _ = sse;
    is_data(frame)
}

/// A server frame's opcode.
fn opcode(frame: &Frame) -> u8 {
    frame.first().map_or(0, |b| b & 0x0F)
}

/// Hands a complete client message to the manager for the origin, or drops
/// and counts it when the way there is backed up.
fn forward(forwards: &Sender<ClientMessage>, stats: &Stats, id: ClientId, message: Forwarded) {
    match forwards.try_send(ClientMessage { id, message }) {
        Ok(()) => {}
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => bump(&stats.forward_dropped),
    }
}

/// One vectored write of `frames`, the first starting at `offset`; a plain
/// write for a single frame, the usual case below saturation (no iovec array
/// to fill, none for the kernel to copy).
fn write_frames<'a>(
    stream: &mut TcpStream,
    mut frames: impl ExactSizeIterator<Item = &'a Frame>,
    offset: usize,
) -> io::Result<usize> {
    if frames.len() == 1 {
        if let Some(frame) = frames.next() {
            return stream.write(&frame[offset..]);
        }
    }
    let mut slices = [IoSlice::new(&[]); MAX_IOV];
    let mut count = 0;
    for (slot, frame) in slices.iter_mut().zip(frames) {
        let start = if count == 0 { offset } else { 0 };
        *slot = IoSlice::new(&frame[start..]);
        count += 1;
    }
    stream.write_vectored(&slices[..count])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::seat::Seats;

    /// A connection over a real loopback socket, with its writer context.
    fn conn() -> (Conn, IoCtx, std::net::TcpStream) {
        let config = Config::default();
        let stats = Arc::new(Stats::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, addr) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let seat = Seats::new(&config, Arc::clone(&stats))
            .take(addr.ip())
            .unwrap();
        let io = IoCtx {
            scratch: vec![0; 1024].into_boxed_slice(),
            batch: Vec::new(),
            delivered: 0,
            delivered_deflated: 0,
            dropped: [0; DropReason::COUNT],
            bytes: 0,
            writes: 0,
            latency: LatencySampler::default(),
            stats,
            policy: Policy::new(&config),
            manager: crossbeam_channel::unbounded().0,
            forwards: crossbeam_channel::bounded(1).0,
            epoch: Instant::now(),
            inflater: Inflater::default(),
        };
        let queue = crate::delivery::queue::ClientQueue::new(config.queue_depth, false).outlet();
        let stream = TcpStream::from_std(server);
        (
            Conn::new(ClientId(1), stream, (queue, seat), (false, false), &io),
            io,
            peer,
        )
    }

    #[test]
    fn the_writers_batch_is_left_empty_whatever_the_write_did() {
        let (mut conn, mut io, _peer) = conn();
        let frames = || (0..3).map(|i| frame::encode(frame::OP_TEXT, &[b'0' + i]));
        let failures = [
            Ok(0),
            Err(io::Error::from(io::ErrorKind::BrokenPipe)),
            Err(io::Error::from(io::ErrorKind::ConnectionReset)),
        ];
        for (i, failure) in failures.into_iter().enumerate() {
            io.batch.extend(frames());
            assert!(conn.advance_batch(failure, &mut io).is_err());
            assert!(
                io.batch.is_empty(),
                "case {i}: nothing left for the next client"
            );
            assert_eq!(
                io.dropped[DropReason::Departed as usize],
                3 * (i as u64 + 1),
                "case {i}: counted as dropped"
            );
        }
        // A partial write: the rest waits in the client's own pending list.
        io.batch.extend(frames());
        let progress = conn.advance_batch(Ok(4), &mut io);
        assert_eq!(progress, Ok(Progress::Partial));
        assert!(io.batch.is_empty());
        assert_eq!((io.delivered, conn.pending.len(), conn.offset), (1, 2, 1));
    }

    #[test]
    fn a_client_that_never_reads_has_one_pong_waiting_however_often_it_pings() {
        let (mut conn, _io, _peer) = conn();
        conn.pending
            .push_back(frame::encode(frame::OP_TEXT, b"data"));
        conn.offset = 1; // a data frame half written, its socket full
        conn.writable = false;
        for i in 0..1000u32 {
            conn.push_controls([frame::encode(frame::OP_PONG, &i.to_be_bytes())]);
        }
        conn.push_controls([frame::encode(frame::OP_PING, b"")]);
        let kinds: Vec<u8> = conn.pending.iter().map(opcode).collect();
        assert_eq!(kinds, [frame::OP_TEXT, frame::OP_PONG, frame::OP_PING]);
        assert_eq!(
            &conn.pending[1][2..],
            &999u32.to_be_bytes(),
            "the latest pong"
        );
    }

    #[test]
    fn a_client_whose_socket_has_room_gets_every_pong_in_order() {
        let (mut conn, _io, _peer) = conn();
        let pongs = (0..3u8).map(|i| frame::encode(frame::OP_PONG, &[i]));
        conn.push_controls(pongs);
        let payloads: Vec<u8> = conn.pending.iter().map(|f| f[2]).collect();
        assert_eq!(payloads, [0, 1, 2]);
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_the_rate() {
        let start = Millis(1000);
        let mut rate = RateLimit::full(100, start);
        let burst = (0..1000).take_while(|_| rate.take(100, start)).count();
        assert_eq!(burst, 100);
        // 10 ms later: one more frame's credit (100 a second).
        assert!(rate.take(100, start.after(Duration::from_millis(10))));
        assert!(!rate.take(100, start.after(Duration::from_millis(10))));
        // Long idle refills the burst, no more.
        let later = start.after(Duration::from_secs(60));
        assert_eq!((0..1000).take_while(|_| rate.take(100, later)).count(), 100);
        let mut off = RateLimit::full(0, start);
        assert!((0..1000).all(|_| off.take(0, start)));
    }

    #[test]
    fn the_millisecond_clock_survives_wrapping() {
        let before = Millis(u32::MAX - 5);
        let after = before.after(Duration::from_millis(10));
        assert_eq!(after, Millis(4));
        assert_eq!(after.since(before), Duration::from_millis(10));
        assert!(after.reached(before));
        assert!(!before.reached(after));
        assert!(after.reached(after));
        assert_eq!(
            before.since(after),
            Duration::ZERO,
            "no huge span backwards"
        );
    }
}
