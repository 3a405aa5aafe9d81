//! One client connection as its writer thread holds it.
//!
//! [`Conn`] is the per-client state machine the writer (`writer.rs`) drives:
//! read client bytes through the writer's scratch buffer and decode them
//! (`frame.rs`), answer pings, complete closes, enforce the per-client limits
//! (message size, message rate, keepalive, slow-client policy), forward client
//! messages when configured, and write queued frames with vectored writes.
//! It keeps per client only what it must: the socket, the queue handle, a
//! frame decoder, a few timestamps, and, only while a write is unfinished,
//! the unwritten frames. The writer owns the event loop, the wakeups and the
//! slab of connections; nothing here blocks.

use std::{
    collections::VecDeque,
    io::{self, IoSlice, Read, Write},
    sync::Arc,
    time::{Duration, Instant},
};

use crossbeam_channel::Sender;
use log::debug;
use mio::net::TcpStream;

use crate::{
    config::{ClientMessages, Config, SlowClient},
    frame::{self, Decoder, Event, Frame, MessageKind, Violation, close_code},
    id::ClientId,
    manager::ManagerMsg,
    queue::ClientQueue,
    stats::{Stats, bump},
};

/// Most frames gathered into one vectored write.
const MAX_IOV: usize = 64;
/// Vectored writes per client per turn, so one busy client cannot starve others.
const WRITES_PER_TURN: usize = 4;
/// Socket reads per client per turn, for the same reason.
const READS_PER_TURN: usize = 4;
/// The window over which slow-client drops are counted.
const DROP_WINDOW: Duration = Duration::from_secs(60);

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
    /// Frames dropped here since the counts were last published.
    pub dropped: u64,
    /// Bytes written since the counts were last published.
    pub bytes: u64,
    pub stats: Arc<Stats>,
    pub policy: Policy,
    /// Where forwarded client messages go.
    pub manager: Sender<ManagerMsg>,
    /// The zero of the writer's millisecond clock (see [`Millis`]).
    pub epoch: Instant,
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
    /// The connection is finished.
    Remove(&'static str),
}

/// A data message being received, for forwarding.
#[derive(Debug)]
struct Inbound {
    kind: MessageKind,
    payload: Vec<u8>,
}

/// One client connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub id: ClientId,
    stream: TcpStream,
    queue: ClientQueue,
    /// Frames taken from the queue (or control frames) not yet fully written.
    pending: VecDeque<Frame>,
    /// Bytes of `pending[0]` already written.
    offset: usize,
    decoder: Decoder,
    closing: Closing,
    /// When to give up on a closing client.
    close_deadline: Option<Millis>,
    /// The socket may have unread input.
    pub readable: bool,
    /// The socket may accept writes (false after `WouldBlock`).
    pub writable: bool,
    /// The client is on the writer's ready list.
    pub is_ready: bool,
    /// The client sent a close frame, or broke the rules: ignore its input.
    is_peer_done: bool,
    /// When the client last sent anything.
    last_heard: Millis,
    is_pinged: bool,
    /// Messages counted in the current one-second window.
    rate_window: Millis,
    rate_count: u32,
    /// Queue drops seen at the start of the current drop window.
    drop_window: Millis,
    drops_at_window: u64,
    /// A message being received for forwarding.
    inbound: Option<Box<Inbound>>,
}

impl Conn {
    /// A connection for a client just attached to the writer.
    pub(crate) fn new(id: ClientId, stream: TcpStream, queue: ClientQueue, io: &IoCtx) -> Conn {
        let now = io.now();
        Conn {
            id,
            stream,
            drops_at_window: queue.drops(),
            queue,
            pending: VecDeque::new(),
            offset: 0,
            decoder: Decoder::new(io.policy.max_message),
            closing: Closing::Open,
            close_deadline: None,
            readable: true,
            writable: true,
            is_ready: false,
            is_peer_done: false,
            last_heard: now,
            is_pinged: false,
            rate_window: now,
            rate_count: 0,
            drop_window: now,
            inbound: None,
        }
    }

    /// The socket, to register or deregister it.
    pub(crate) fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }

    /// Data frames taken from the queue but never written (lost when it goes).
    pub(crate) fn unwritten(&self) -> u64 {
        self.pending.iter().filter(|f| is_data(f)).count() as u64
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
                return Turn::Remove("close handshake done");
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
    pub(crate) fn tick(&mut self, now: Millis, io: &mut IoCtx) -> Result<bool, &'static str> {
        if self.close_deadline.is_some_and(|at| now.reached(at)) {
            return Err("close not completed in time");
        }
        if !matches!(self.closing, Closing::Open) {
            return Ok(false);
        }
        let silent = now.since(self.last_heard);
        if silent >= io.policy.ping_after * 2 {
            bump(&io.stats.clients_timed_out);
            debug!("{}: silent for {silent:?}; closing", self.id);
            self.close_now(close_code::GOING_AWAY, "no answer to ping", io);
            return Ok(true);
        }
        if silent >= io.policy.ping_after && !self.is_pinged {
            self.is_pinged = true;
            self.push_control(frame::encode(frame::OP_PING, b""));
            return Ok(true);
        }
        if let Some(max) = io.policy.max_drops {
            let drops = self.queue.drops() - self.drops_at_window;
            if drops > max {
                bump(&io.stats.slow_disconnects);
                debug!("{}: lost {drops} frames within a minute; closing", self.id);
                self.close_now(close_code::TRY_AGAIN_LATER, "too slow to keep up", io);
                return Ok(true);
            }
            if now.since(self.drop_window) >= DROP_WINDOW {
                self.drop_window = now;
                self.drops_at_window = self.queue.drops();
            }
        }
        Ok(false)
    }

    /// Starts the shutdown close: what is queued, then 1001, within `deadline`.
    pub(crate) fn begin_drain(&mut self, deadline: Millis) {
        if let Closing::Open = self.closing {
            self.closing = Closing::Draining(frame::encode_close(
                close_code::GOING_AWAY,
                "server shutting down",
            ));
            self.close_deadline = Some(deadline);
        }
    }

    /// Decodes bytes the client sent (read from the socket, or sent along
    /// with its upgrade request) and reacts to them.
    pub(crate) fn decode(&mut self, bytes: &mut [u8], io: &mut IoCtx) {
        let now = io.now();
        self.last_heard = now;
        self.is_pinged = false;
        let mut pongs: Vec<Frame> = Vec::new();
        let mut peer_close = None;
        let mut messages = 0u32;
        let forward = io.policy.forward;
        let inbound = &mut self.inbound;
        let mut outbound = Vec::new();
        let result = self.decoder.decode(bytes, &mut |event| match event {
            Event::Ping(payload) => {
                messages += 1;
                pongs.push(frame::encode(frame::OP_PONG, payload));
            }
            Event::Pong => messages += 1,
            Event::Close { code, .. } => peer_close = Some(code),
            Event::Data { kind, payload, fin } => {
                if forward {
                    let message = inbound.get_or_insert_with(|| {
                        Box::new(Inbound {
                            kind,
                            payload: Vec::new(),
                        })
                    });
                    message.payload.extend_from_slice(payload);
                    if fin {
                        outbound.extend(inbound.take());
                    }
                }
                if fin {
                    messages += 1;
                }
            }
        });
        for pong in pongs {
            self.push_control(pong);
        }
        for message in outbound {
            let Inbound { kind, payload } = *message;
            let _ = io.manager.send(ManagerMsg::Forward {
                id: self.id,
                kind,
                payload,
            });
        }
        if let Some(code) = peer_close {
            self.is_peer_done = true;
            let reply = match code {
                Some(code) => frame::encode_close(code, ""),
                None => frame::encode(frame::OP_CLOSE, &[]),
            };
            self.close_with(reply, now.after(io.policy.close_wait));
        }
        if let Err(Violation { code, reason }) = result {
            debug!(
                "{}: protocol violation: {reason} (closing with {code})",
                self.id
            );
            bump(&io.stats.client_protocol_errors);
            self.close_now(code, reason, io);
        } else if self.over_rate(messages, io.policy.max_rate, now) {
            debug!(
                "{}: more than {} messages a second; closing",
                self.id, io.policy.max_rate
            );
            bump(&io.stats.client_rate_limited);
            self.close_now(close_code::POLICY_VIOLATION, "message rate exceeded", io);
        }
    }

    /// Counts `messages` in the current second; true once over `max` (0: no limit).
    fn over_rate(&mut self, messages: u32, max: u32, now: Millis) -> bool {
        if max == 0 || messages == 0 {
            return false;
        }
        if now.since(self.rate_window) >= Duration::from_secs(1) {
            self.rate_window = now;
            self.rate_count = 0;
        }
        self.rate_count = self.rate_count.saturating_add(messages);
        self.rate_count > max
    }

    /// Closes the client for breaking a rule: its input is ignored from now on.
    fn close_now(&mut self, code: u16, reason: &str, io: &IoCtx) {
        self.is_peer_done = true;
        self.inbound = None;
        self.close_with(
            frame::encode_close(code, reason),
            io.now().after(io.policy.close_wait),
        );
    }

    fn read(&mut self, io: &mut IoCtx) -> Turn {
        for _ in 0..READS_PER_TURN {
            let mut scratch = std::mem::take(&mut io.scratch);
            let read = self.stream.read(&mut scratch);
            let turn = match read {
                Ok(0) => Some(Turn::Remove("closed by peer")),
                Ok(n) => {
                    if !self.is_peer_done {
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
                    Some(Turn::Remove("read error"))
                }
            };
            io.scratch = scratch;
            if let Some(turn) = turn {
                return turn;
            }
        }
        Turn::More
    }

    /// Queues a control frame at the next frame boundary, after earlier ones.
    fn push_control(&mut self, frame: Frame) {
        if matches!(self.closing, Closing::Open | Closing::Draining(_)) {
            let mut at = usize::from(self.offset > 0).min(self.pending.len());
            while self.pending.get(at).is_some_and(|f| !is_data(f)) {
                at += 1;
            }
            self.pending.insert(at, frame);
        }
    }

    /// Sends `close` after the frame being written, dropping what else is
    /// unsent; the client has until `deadline` to receive it and answer.
    fn close_with(&mut self, close: Frame, deadline: Millis) {
        match self.closing {
            Closing::Open | Closing::Draining(_) => {
                let keep = usize::from(self.offset > 0).min(self.pending.len());
                self.pending.truncate(keep);
                self.pending.push_back(close);
                self.closing = Closing::Sending;
                self.close_deadline = Some(deadline);
            }
            Closing::Sending | Closing::Sent => {}
        }
    }

    /// Writes queued frames until the queue is empty, the socket is full or the
    /// turn's budget is spent.
    fn write(&mut self, io: &mut IoCtx) -> Turn {
        for _ in 0..WRITES_PER_TURN {
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
                let r = write_frames(&mut self.stream, io.batch.iter(), 0);
                self.advance_batch(r, io)
            } else {
                let r = write_frames(&mut self.stream, self.pending.iter(), self.offset);
                self.advance_pending(r, io)
            };
            match written {
                Ok(Progress::Flushed | Progress::Partial) => {}
                Ok(Progress::Blocked) => {
                    self.writable = false;
                    return Turn::Idle;
                }
                Err(why) => return Turn::Remove(why),
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
            let is_close = frame.first().is_some_and(|b| b & 0x0F == frame::OP_CLOSE);
            io.batch.push(frame);
            if is_close {
                self.closing = Closing::Sending;
                self.close_deadline = Some(io.now().after(io.policy.close_wait));
                break;
            }
        }
    }

    /// Everything owed is written: move the close handshake along.
    fn after_flush(&mut self) -> Turn {
        match std::mem::replace(&mut self.closing, Closing::Open) {
            Closing::Draining(close) => {
                self.pending.push_back(close);
                self.closing = Closing::Sending;
                Turn::More
            }
            Closing::Sending => {
                self.closing = Closing::Sent;
                if self.is_peer_done {
                    return Turn::Remove("close handshake done");
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
        let mut dropped = 0;
        for _ in 0..excess.min(unstarted) {
            if let Some(frame) = self.pending.remove(started) {
                if is_data(&frame) {
                    dropped += 1;
                }
            }
        }
        io.dropped += dropped;
        self.queue.count_drops(dropped);
    }

    /// Accounts a write from the writer's batch; unwritten frames move to `pending`.
    fn advance_batch(
        &mut self,
        r: io::Result<usize>,
        io: &mut IoCtx,
    ) -> Result<Progress, &'static str> {
        let (mut n, progress) = match r {
            Ok(0) => return Err("write returned zero"),
            Ok(n) => {
                io.bytes += n as u64;
                (n, Progress::Partial)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, Progress::Blocked),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => (0, Progress::Partial),
            Err(e) => {
                debug!("{}: write failed: {e}", self.id);
                io.dropped += io.batch.iter().filter(|f| is_data(f)).count() as u64;
                io.batch.clear();
                return Err("write error");
            }
        };
        let mut done = 0;
        for frame in &io.batch {
            if n < frame.len() {
                break;
            }
            n -= frame.len();
            if is_data(frame) {
                io.delivered += 1;
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
    ) -> Result<Progress, &'static str> {
        let mut n = match r {
            Ok(0) => return Err("write returned zero"),
            Ok(n) => {
                io.bytes += n as u64;
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Progress::Blocked),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Progress::Partial),
            Err(e) => {
                debug!("{}: write failed: {e}", self.id);
                return Err("write error");
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
            if is_data(head) {
                io.delivered += 1;
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
fn is_data(frame: &Frame) -> bool {
    frame.first().is_some_and(|b| b & 0x08 == 0)
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
