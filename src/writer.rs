//! The writer pool: each writer thread owns a share of the client sockets.
//!
//! A writer sleeps in `mio::Poll` until a lobby has queued frames for one of
//! its clients (a [`WriterWake`] notification: one wake per writer per lobby
//! message at most), a socket becomes readable or writable, or its inbox has
//! a message. It then drains client queues and writes each client's frames
//! with one vectored write, parks a client that hits `WouldBlock` until the
//! socket is writable again, and reads client input through one scratch
//! buffer (ping → pong, close → close reply, violations → close codes).
//!
//! Per client it keeps the socket, the queue handle, a frame decoder and, only
//! while a write is unfinished, the unwritten frames. It does not decide which
//! lobby a client belongs to (`manager.rs`) nor encode broadcast frames
//! (`lobby.rs`).

use std::{
    collections::VecDeque,
    io::{self, IoSlice, Read, Write},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering, fence},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, TryRecvError, unbounded};
use log::{debug, error, info, trace};
use mio::{Events, Interest, Poll, Token, Waker, net::TcpStream};

use crate::{
    config::Config,
    error::{Error, Result},
    frame::{self, Decoder, Event, Frame, Violation, close_code},
    id::ClientId,
    manager::ManagerMsg,
    queue::ClientQueue,
    stats::{Stats, bump},
};

/// Poll token of the writer's waker; client tokens are slab indices below it.
const WAKER: Token = Token(usize::MAX);
/// Most frames gathered into one vectored write.
const MAX_IOV: usize = 64;
/// Vectored writes per client per turn, so one busy client cannot starve others.
const WRITES_PER_TURN: usize = 4;
/// Socket reads per client per turn, for the same reason.
const READS_PER_TURN: usize = 4;
/// Size of the writer's one read buffer, shared by all its clients.
const SCRATCH_BYTES: usize = 64 * 1024;
/// How long a client that we closed gets to answer with its own close frame.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// A writer's inbox.
#[derive(Debug)]
pub(crate) enum WriterMsg {
    /// Take over an upgraded client socket and its queue.
    Attach(Attach),
    /// Send each client what is queued and a 1001 close, then end.
    Shutdown,
}

/// An upgraded client handed to a writer.
#[derive(Debug)]
pub(crate) struct Attach {
    pub id: ClientId,
    pub stream: TcpStream,
    pub queue: ClientQueue,
    /// Bytes the client sent after its upgrade request.
    pub leftover: Vec<u8>,
}

/// How a lobby tells a writer its clients have frames: at most one wake per
/// writer until the writer has looked.
#[derive(Debug)]
pub(crate) struct WriterWake {
    notified: AtomicBool,
    waker: Waker,
}

impl WriterWake {
    /// Wakes the writer unless a wake is already pending.
    pub(crate) fn notify(&self) {
        fence(Ordering::SeqCst);
        if !self.notified.swap(true, Ordering::SeqCst) {
            if let Err(e) = self.waker.wake() {
                error!("cannot wake writer: {e}");
            }
        }
    }

    /// Clears the pending wake; true if there was one.
    fn take(&self) -> bool {
        let was = self.notified.swap(false, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        was
    }
}

/// The manager's handle on one writer thread.
#[derive(Debug)]
pub(crate) struct WriterHandle {
    tx: Sender<WriterMsg>,
    wake: Arc<WriterWake>,
    thread: JoinHandle<()>,
}

impl WriterHandle {
    /// Sends `msg` and wakes the writer. False if the writer has ended.
    pub(crate) fn send(&self, msg: WriterMsg) -> bool {
        let sent = self.tx.send(msg).is_ok();
        if let Err(e) = self.wake.waker.wake() {
            error!("cannot wake writer: {e}");
        }
        sent
    }

    /// The notification lobbies use when they queue frames for this writer.
    pub(crate) fn wake(&self) -> Arc<WriterWake> {
        Arc::clone(&self.wake)
    }

    /// Waits for the thread to end.
    pub(crate) fn join(self) {
        if self.thread.join().is_err() {
            error!("a writer thread panicked");
        }
    }
}

/// Starts writer thread number `index`.
pub(crate) fn spawn(
    index: usize,
    config: &Config,
    stats: Arc<Stats>,
    manager: Sender<ManagerMsg>,
) -> Result<WriterHandle> {
    let poll = Poll::new().map_err(Error::io("create a writer poll"))?;
    let waker = Waker::new(poll.registry(), WAKER).map_err(Error::io("create a writer waker"))?;
    let wake = Arc::new(WriterWake {
        notified: AtomicBool::new(false),
        waker,
    });
    let (tx, inbox) = unbounded();
    let writer = Writer {
        index,
        poll,
        inbox,
        wake: Arc::clone(&wake),
        clients: Vec::new(),
        free: Vec::new(),
        ready: Vec::new(),
        spare: Vec::new(),
        closing: Vec::new(),
        drain_deadline: None,
        drain_timeout: config.drain_timeout,
        max_client_message: config.max_client_message,
        manager,
        io: IoCtx {
            scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
            batch: Vec::with_capacity(MAX_IOV),
            delivered: 0,
            dropped: 0,
            stats,
        },
    };
    let thread = thread::Builder::new()
        .name(format!("wsgate-writer-{index}"))
        .spawn(move || writer.run())
        .map_err(Error::io("spawn a writer thread"))?;
    Ok(WriterHandle { tx, wake, thread })
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
    /// Our close frame is written; waiting for the peer's until the deadline.
    Sent,
}

/// One client socket and what the writer keeps for it.
#[derive(Debug)]
struct Client {
    id: ClientId,
    stream: TcpStream,
    queue: ClientQueue,
    /// Frames taken from the queue (or control frames) not yet fully written.
    pending: VecDeque<Frame>,
    /// Bytes of `pending[0]` already written.
    offset: usize,
    decoder: Decoder,
    closing: Closing,
    /// The socket may have unread input.
    readable: bool,
    /// The socket may accept writes (false after `WouldBlock`).
    writable: bool,
    /// The client is on the ready list.
    is_ready: bool,
    /// The client sent a close frame, or broke the protocol: ignore its input.
    is_peer_done: bool,
}

/// What a turn of service decided for a client.
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    /// Nothing more to do until an event or a wake.
    Idle,
    /// Work is left (budget spent): serve again next turn.
    More,
    /// The connection is finished.
    Remove(&'static str),
}

/// Buffers and counters shared by all clients of a writer.
#[derive(Debug)]
struct IoCtx {
    scratch: Box<[u8]>,
    batch: Vec<Frame>,
    delivered: u64,
    dropped: u64,
    stats: Arc<Stats>,
}

#[derive(Debug)]
struct Writer {
    index: usize,
    poll: Poll,
    inbox: Receiver<WriterMsg>,
    wake: Arc<WriterWake>,
    /// Slab of clients; the index is the poll token.
    clients: Vec<Option<Client>>,
    free: Vec<usize>,
    /// Clients with work to do this turn.
    ready: Vec<usize>,
    /// The previous turn's list, kept for its allocation.
    spare: Vec<usize>,
    /// Clients we closed, with when to give up waiting for their close.
    closing: Vec<(Instant, usize, ClientId)>,
    drain_deadline: Option<Instant>,
    drain_timeout: Duration,
    max_client_message: usize,
    manager: Sender<ManagerMsg>,
    io: IoCtx,
}

impl Writer {
    /// The main loop: poll, take messages, serve ready clients, expire closes.
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!("writer {}: poll failed: {e}", self.index);
                    break;
                }
            }
            for event in &events {
                let token = event.token().0;
                let Some(Some(client)) = self.clients.get_mut(token) else {
                    continue;
                };
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    client.readable = true;
                }
                if event.is_writable() || event.is_write_closed() {
                    client.writable = true;
                }
                mark_ready(&mut self.ready, client, token);
            }
            self.take_messages();
            if self.wake.take() {
                self.scan_queues();
            }
            self.serve_ready();
            self.expire_closing();
            self.publish_counts();
            if let Some(deadline) = self.drain_deadline {
                if self.clients.iter().all(Option::is_none) || Instant::now() >= deadline {
                    break;
                }
            }
        }
        let left = self.clients.iter().flatten().count();
        if left > 0 {
            info!("writer {}: dropping {left} clients still open", self.index);
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        let next = self
            .closing
            .iter()
            .map(|(at, ..)| *at)
            .chain(self.drain_deadline)
            .min()?;
        Some(next.saturating_duration_since(Instant::now()))
    }

    fn take_messages(&mut self) {
        loop {
            match self.inbox.try_recv() {
                Ok(WriterMsg::Attach(attach)) => self.attach(attach),
                Ok(WriterMsg::Shutdown) | Err(TryRecvError::Disconnected) => {
                    if self.drain_deadline.is_none() {
                        self.begin_drain();
                    }
                    if self.inbox.is_empty() {
                        return;
                    }
                }
                Err(TryRecvError::Empty) => return,
            }
        }
    }

    fn attach(&mut self, attach: Attach) {
        let Attach {
            id,
            mut stream,
            queue,
            leftover,
        } = attach;
        let token = self.free.pop().unwrap_or(self.clients.len());
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            debug!("{id}: cannot register socket: {e}");
            self.free.push(token);
            self.depart(id);
            return;
        }
        let mut client = Client {
            id,
            stream,
            queue,
            pending: VecDeque::new(),
            offset: 0,
            decoder: Decoder::new(self.max_client_message),
            closing: Closing::Open,
            readable: true,
            writable: true,
            is_ready: false,
            is_peer_done: false,
        };
        if self.drain_deadline.is_some() {
            client.begin_drain();
        }
        if !leftover.is_empty() {
            let mut leftover = leftover;
            client.decode(&mut leftover, &self.io.stats);
        }
        if token == self.clients.len() {
            self.clients.push(None);
        }
        mark_ready(&mut self.ready, &mut client, token);
        self.clients[token] = Some(client);
        trace!("writer {}: attached {id}", self.index);
    }

    fn begin_drain(&mut self) {
        debug!("writer {}: draining clients", self.index);
        self.drain_deadline = Some(Instant::now() + self.drain_timeout);
        for (token, slot) in self.clients.iter_mut().enumerate() {
            if let Some(client) = slot {
                client.begin_drain();
                mark_ready(&mut self.ready, client, token);
            }
        }
    }

    /// After a lobby's wake: put every client with queued frames on the ready list.
    fn scan_queues(&mut self) {
        for (token, slot) in self.clients.iter_mut().enumerate() {
            if let Some(client) = slot {
                if client.writable
                    && !client.is_ready
                    && matches!(client.closing, Closing::Open | Closing::Draining(_))
                    && !client.queue.is_empty()
                {
                    mark_ready(&mut self.ready, client, token);
                }
            }
        }
    }

    fn serve_ready(&mut self) {
        let mut ready = std::mem::replace(&mut self.ready, std::mem::take(&mut self.spare));
        for &token in &ready {
            let Some(Some(client)) = self.clients.get_mut(token) else {
                continue;
            };
            client.is_ready = false;
            let was_sent = matches!(client.closing, Closing::Sent);
            match client.serve(&mut self.io) {
                Turn::Idle => {}
                Turn::More => {
                    client.is_ready = true;
                    self.ready.push(token);
                }
                Turn::Remove(why) => {
                    self.remove(token, why);
                    continue;
                }
            }
            if let Some(Some(client)) = self.clients.get(token) {
                if !was_sent && matches!(client.closing, Closing::Sent) {
                    self.closing
                        .push((Instant::now() + CLOSE_WAIT, token, client.id));
                }
            }
        }
        ready.clear();
        self.spare = ready;
    }

    fn expire_closing(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut expired = Vec::new();
        self.closing.retain(|&(at, token, id)| {
            if at <= now {
                expired.push((token, id));
            }
            at > now
        });
        for (token, id) in expired {
            if matches!(&self.clients.get(token), Some(Some(c)) if c.id == id) {
                self.remove(token, "no close reply in time");
            }
        }
    }

    fn remove(&mut self, token: usize, why: &str) {
        let Some(mut client) = self.clients.get_mut(token).and_then(Option::take) else {
            return;
        };
        if let Err(e) = self.poll.registry().deregister(&mut client.stream) {
            debug!("{}: deregister failed: {e}", client.id);
        }
        self.free.push(token);
        self.io.dropped += client.pending.iter().filter(|f| is_data(f)).count() as u64;
        debug!("{} left: {why}", client.id);
        self.depart(client.id);
    }

    fn depart(&self, id: ClientId) {
        // A closed inbox means the manager is shutting down and no longer cares.
        let _ = self.manager.send(ManagerMsg::Departed(id));
    }

    fn publish_counts(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.io.delivered > 0 {
            self.io
                .stats
                .frames_delivered
                .fetch_add(self.io.delivered, Relaxed);
            self.io.delivered = 0;
        }
        if self.io.dropped > 0 {
            self.io
                .stats
                .frames_dropped
                .fetch_add(self.io.dropped, Relaxed);
            self.io.dropped = 0;
        }
    }
}

fn mark_ready(ready: &mut Vec<usize>, client: &mut Client, token: usize) {
    if !client.is_ready {
        client.is_ready = true;
        ready.push(token);
    }
}

/// Data frames count as deliveries; control frames (pong, close) do not.
fn is_data(frame: &Frame) -> bool {
    frame.first().is_some_and(|b| b & 0x08 == 0)
}

impl Client {
    /// One turn: read what the client sent, then write what it is owed.
    fn serve(&mut self, io: &mut IoCtx) -> Turn {
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

    fn read(&mut self, io: &mut IoCtx) -> Turn {
        for _ in 0..READS_PER_TURN {
            match self.stream.read(&mut io.scratch) {
                Ok(0) => return Turn::Remove("closed by peer"),
                Ok(n) => {
                    if !self.is_peer_done {
                        self.decode(&mut io.scratch[..n], &io.stats);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Turn::Idle;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("{}: read failed: {e}", self.id);
                    return Turn::Remove("read error");
                }
            }
        }
        Turn::More
    }

    /// Decodes client bytes and queues the answers they call for.
    fn decode(&mut self, bytes: &mut [u8], stats: &Stats) {
        let mut pong = None;
        let mut peer_close = None;
        let result = self.decoder.decode(bytes, &mut |event| match event {
            Event::Ping(payload) => pong = Some(frame::encode(frame::OP_PONG, payload)),
            Event::Close { code, .. } => peer_close = Some(code),
            Event::Pong | Event::Data { .. } => {}
        });
        if let Some(pong) = pong {
            self.push_control(pong);
        }
        if let Some(code) = peer_close {
            self.is_peer_done = true;
            let reply = match code {
                Some(code) => frame::encode_close(code, ""),
                None => frame::encode(frame::OP_CLOSE, &[]),
            };
            self.close_with(reply);
        }
        if let Err(Violation { code, reason }) = result {
            debug!(
                "{}: protocol violation: {reason} (closing with {code})",
                self.id
            );
            bump(&stats.client_protocol_errors);
            self.is_peer_done = true;
            self.close_with(frame::encode_close(code, reason));
        }
    }

    /// Queues a control frame at the next frame boundary.
    fn push_control(&mut self, frame: Frame) {
        if matches!(self.closing, Closing::Open | Closing::Draining(_)) {
            let at = usize::from(self.offset > 0).min(self.pending.len());
            self.pending.insert(at, frame);
        }
    }

    /// Sends `close` after the frame being written, dropping what else is unsent.
    fn close_with(&mut self, close: Frame) {
        match self.closing {
            Closing::Open | Closing::Draining(_) => {
                let keep = usize::from(self.offset > 0).min(self.pending.len());
                self.pending.truncate(keep);
                self.pending.push_back(close);
                self.closing = Closing::Sending;
            }
            Closing::Sending | Closing::Sent => {}
        }
    }

    fn begin_drain(&mut self) {
        if let Closing::Open = self.closing {
            self.closing = Closing::Draining(frame::encode_close(
                close_code::GOING_AWAY,
                "server shutting down",
            ));
        }
    }

    /// Writes queued frames until the queue is empty, the socket is full or the
    /// turn's budget is spent.
    fn write(&mut self, io: &mut IoCtx) -> Turn {
        for _ in 0..WRITES_PER_TURN {
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
                self.trim(io);
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
        while io.batch.len() < MAX_IOV {
            let Some(frame) = self.queue.pop() else {
                break;
            };
            let is_close = frame.first().is_some_and(|b| b & 0x0F == frame::OP_CLOSE);
            io.batch.push(frame);
            if is_close {
                self.closing = Closing::Sending;
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
        for _ in 0..excess.min(unstarted) {
            if let Some(frame) = self.pending.remove(started) {
                if is_data(&frame) {
                    io.dropped += 1;
                }
            }
        }
    }

    /// Accounts a write from the writer's batch; unwritten frames move to `pending`.
    fn advance_batch(
        &mut self,
        r: io::Result<usize>,
        io: &mut IoCtx,
    ) -> Result<Progress, &'static str> {
        let (mut n, progress) = match r {
            Ok(0) => return Err("write returned zero"),
            Ok(n) => (n, Progress::Partial),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => (0, Progress::Blocked),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => (0, Progress::Partial),
            Err(e) => {
                debug!("{}: write failed: {e}", self.id);
                io.dropped += io.batch.len() as u64;
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
            done += 1;
        }
        io.delivered += done as u64;
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
            Ok(n) => n,
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

/// One vectored write of `frames`, the first starting at `offset`.
fn write_frames<'a>(
    stream: &mut TcpStream,
    frames: impl Iterator<Item = &'a Frame>,
    offset: usize,
) -> io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); MAX_IOV];
    let mut count = 0;
    for (slot, frame) in slices.iter_mut().zip(frames) {
        let start = if count == 0 { offset } else { 0 };
        *slot = IoSlice::new(&frame[start..]);
        count += 1;
    }
    stream.write_vectored(&slices[..count])
}
