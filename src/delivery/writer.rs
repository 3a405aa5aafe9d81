//! The writer pool: each writer thread owns a share of the client sockets.
//!
//! A writer sleeps in `mio::Poll` until a lobby has queued frames for one of
//! its clients (a [`WriterWake`] notification: one wake per writer per lobby
//! message at most), a socket becomes readable or writable, its inbox has a
//! message, or its timer ticks. It then serves the clients that have work:
//! each client's queued frames go out in one vectored write, a client that
//! hits `WouldBlock` is parked until its socket is writable again, and client
//! input is read through one scratch buffer. The per-client protocol and
//! rules live in `conn.rs`; this file is the loop, the wakeups, the slab of
//! connections and the timers. It does not decide which lobby a client
//! belongs to (`fanout/manager.rs`) nor encode broadcast frames
//! (`fanout/lobby.rs`).
//!
//! Writes coalesce by themselves, with no timer: a client's queued frames
//! all go out in one vectored write, so a writer that keeps up writes each
//! frame alone the moment its wake arrives, and one that falls behind (a
//! burst, a saturated feed) finds the frames that arrived meanwhile queued
//! and writes them together. The batch is as large as the writer is late,
//! up to the queue depth: with 1000 clients, 1.0 frames per write at 50
//! messages a second, 1.6 at 200, 9.8 at 1000 and 14.5 of 16 at 2000
//! (`wsgate_client_writes_total`; README, Performance). A window
//! (`--write-batch`) only adds waiting on top, for operators who prefer
//! fewer, larger writes below saturation to the lowest latency.
//!
//! A panic in the loop is caught: the writer's clients are closed with 1011
//! and reported gone (their seats released, their frames counted as
//! dropped), and the writer carries on, empty, taking new clients. Only an
//! end it cannot catch reaches its guard (`control/supervise.rs`), and is fatal.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    io,
    panic::{self, AssertUnwindSafe},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering, fence},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crossbeam_channel::{Receiver, Sender, TryRecvError, unbounded};
use log::{debug, error, info, trace};
use mio::{Events, Interest, Poll, Token, Waker, net::TcpStream};

#[cfg(feature = "tls")]
use crate::wire::tls::Session;
use crate::{
    config::Config,
    control::{
        inbox::{ClientMessage, ManagerMsg},
        seat::Seat,
        supervise::EndGuard,
    },
    delivery::{
        conn::{Conn, IoCtx, Policy, Turn, is_data},
        queue::Outlet,
    },
    error::{Error, Result},
    id::ClientId,
    stats::{Disconnect, DropReason, LatencySampler, Stats, bump},
    wire::{close, deflate::Inflater},
};

/// Poll token of the writer's waker; client tokens are slab indices below it.
const WAKER: Token = Token(usize::MAX);
/// Size of the writer's one read buffer, shared by all its clients.
const SCRATCH_BYTES: usize = 64 * 1024;
/// How often the time-driven rules (keepalive, close deadlines, slow clients) run.
const TICK: Duration = Duration::from_millis(250);
/// Fewest connection slots the writer's table grows by at a time.
const TABLE_STEP: usize = 64;

/// A writer's inbox.
#[derive(Debug)]
pub(crate) enum WriterMsg {
    /// Take over an upgraded client socket and its queue (boxed: it carries
    /// a `wss://` client's TLS session).
    Attach(Box<Attach>),
    /// Send each client what is queued and a 1001 close, then end.
    Shutdown,
}

/// An upgraded client handed to a writer.
#[derive(Debug)]
pub(crate) struct Attach {
    pub id: ClientId,
    pub stream: TcpStream,
    pub queue: Outlet,
    /// Bytes the client sent after its upgrade request.
    pub leftover: Vec<u8>,
    /// Its place in the client counts; it drops with the connection.
    pub seat: Seat,
    /// It negotiated permessage-deflate: its compressed messages are inflated.
    pub deflate: bool,
    /// A Server-Sent Events stream, not a WebSocket.
    pub sse: bool,
    /// When its access ends, in seconds since the Unix epoch: it is closed
    /// with 4401 then, after what is queued.
    pub expires: Option<u64>,
    /// Its TLS session (`wss://`), handshake done: its frames are written
    /// through it.
    #[cfg(feature = "tls")]
    pub tls: Option<Session>,
}

/// How a lobby tells a writer its clients have frames: at most one wake per
/// writer until the writer has looked.
#[derive(Debug)]
pub(crate) struct WriterWake {
    notified: AtomicBool,
    /// Wakes the writer has taken: a lobby whose frames it is behind on
    /// waits for this to move before it reads more (`fanout/lobby.rs`).
    scans: AtomicU64,
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

    /// A wake for tests of the lobby's fan-out, on `poll`.
    #[cfg(test)]
    pub(crate) fn for_tests(poll: &Poll) -> Arc<WriterWake> {
        Arc::new(WriterWake {
            notified: AtomicBool::new(false),
            scans: AtomicU64::new(0),
            waker: Waker::new(poll.registry(), WAKER).expect("a waker"),
        })
    }

    /// How many wakes the writer has taken, each followed by a look at
    /// every queue of its clients.
    pub(crate) fn scans(&self) -> u64 {
        self.scans.load(Ordering::Relaxed)
    }

    /// Whether a wake is pending (without clearing it).
    fn is_pending(&self) -> bool {
        self.notified.load(Ordering::SeqCst)
    }

    /// Clears the pending wake; true if there was one (then the writer
    /// looks at every queue, counted in [`WriterWake::scans`]). Only the
    /// writer takes its wakes (and tests, acting as one).
    pub(crate) fn take(&self) -> bool {
        let was = self.notified.swap(false, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if was {
            self.scans.fetch_add(1, Ordering::Relaxed);
        }
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

/// Starts writer thread number `index`, reporting departures to `manager`
/// and sending client messages for the origin to `forwards`.
pub(crate) fn spawn(
    index: usize,
    config: &Config,
    stats: Arc<Stats>,
    (manager, forwards): (Sender<ManagerMsg>, Sender<ClientMessage>),
) -> Result<WriterHandle> {
    let poll = Poll::new().map_err(Error::io("create a writer poll"))?;
    let waker = Waker::new(poll.registry(), WAKER).map_err(Error::io("create a writer waker"))?;
    let wake = Arc::new(WriterWake {
        notified: AtomicBool::new(false),
        scans: AtomicU64::new(0),
        waker,
    });
    let (tx, inbox) = unbounded();
    let writer = Writer {
        index,
        poll,
        inbox,
        wake: Arc::clone(&wake),
        conns: Vec::new(),
        free: Vec::new(),
        ready: Vec::new(),
        spare: Vec::new(),
        next_tick: Instant::now() + TICK,
        expiries: BinaryHeap::new(),
        batch_window: (!config.write_batch.is_zero()).then_some(config.write_batch),
        flush_at: None,
        drain_deadline: None,
        drain_timeout: config.drain_timeout,
        io: IoCtx {
            scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
            batch: Vec::with_capacity(64),
            delivered: 0,
            delivered_deflated: 0,
            dropped: [0; DropReason::COUNT],
            bytes: 0,
            writes: 0,
            latency: LatencySampler::default(),
            stats,
            policy: Policy::new(config),
            manager: manager.clone(),
            forwards,
            epoch: Instant::now(),
            inflater: Inflater::default(),
        },
    };
    let guard = EndGuard::writer(index, manager, Arc::clone(&writer.io.stats));
    let thread = thread::Builder::new()
        .name(format!("wsgate-writer-{index}"))
        .spawn(move || {
            let _guard = guard;
            writer.run();
        })
        .map_err(Error::io("spawn a writer thread"))?;
    Ok(WriterHandle { tx, wake, thread })
}

#[derive(Debug)]
struct Writer {
    index: usize,
    poll: Poll,
    inbox: Receiver<WriterMsg>,
    wake: Arc<WriterWake>,
    /// Slab of connections; the index is the poll token.
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    /// Connections with work to do this turn.
    ready: Vec<usize>,
    /// The previous turn's list, kept for its allocation.
    spare: Vec<usize>,
    /// When the time-driven rules are next checked.
    next_tick: Instant,
    /// Its clients' access expiries, soonest first: one timer structure per
    /// writer, nothing checked per frame.
    expiries: BinaryHeap<Reverse<(Instant, usize, ClientId)>>,
    /// With write batching: how long queued frames may wait to be written together.
    batch_window: Option<Duration>,
    /// With write batching: when the frames queued since the first wake are written.
    flush_at: Option<Instant>,
    drain_deadline: Option<Instant>,
    drain_timeout: Duration,
    io: IoCtx,
}

impl Writer {
    /// Serves clients until the shutdown drain ends, recovering from panics
    /// (see the module docs), then drops whoever is left.
    fn run(mut self) {
        while panic::catch_unwind(AssertUnwindSafe(|| self.serve())).is_err() {
            self.recover();
        }
        let open: Vec<usize> = (0..self.conns.len())
            .filter(|&token| self.conns[token].is_some())
            .collect();
        if !open.is_empty() {
            info!(
                "writer {}: dropping {} clients still open",
                self.index,
                open.len()
            );
        }
        for token in open {
            self.remove(token, Disconnect::Shutdown);
        }
        self.publish_counts();
    }

    /// After a panic: closes every client with 1011 and forgets them, so the
    /// loop starts again from a clean state.
    fn recover(&mut self) {
        bump(&self.io.stats.thread_panics);
        let open: Vec<usize> = (0..self.conns.len())
            .filter(|&token| self.conns[token].is_some())
            .collect();
        error!(
            "writer {} panicked; closing its {} clients with 1011",
            self.index,
            open.len()
        );
        let lost = self.io.batch.drain(..).filter(is_data).count() as u64;
        self.io.lost(DropReason::Departed, lost);
        self.ready.clear();
        self.spare.clear();
        for token in open {
            if let Some(Some(conn)) = self.conns.get_mut(token) {
                conn.abort(close::INTERNAL_ERROR, "internal error");
            }
            self.remove(token, Disconnect::InternalError);
        }
        self.publish_counts();
    }

    /// The main loop: poll, take messages, serve ready clients, check timers,
    /// until the shutdown drain is over.
    fn serve(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    error!("writer {}: poll failed: {e}", self.index);
                    break;
                }
            }
            #[cfg(feature = "fault-injection")]
            self.io.stats.faults.check(crate::fault::Fault::Writer);
            for event in &events {
                let token = event.token().0;
                let Some(Some(conn)) = self.conns.get_mut(token) else {
                    continue;
                };
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    conn.readable = true;
                }
                if event.is_writable() || event.is_write_closed() {
                    conn.set_writable(true);
                }
                mark_ready(&mut self.ready, conn, token);
            }
            self.take_messages();
            let now = Instant::now();
            self.expire(now);
            self.take_wake(now);
            if now >= self.next_tick {
                self.tick(now);
            }
            self.serve_ready();
            self.publish_counts();
            if let Some(deadline) = self.drain_deadline {
                if self.conns.iter().all(Option::is_none) || Instant::now() >= deadline {
                    break;
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.ready.is_empty() {
            return Some(Duration::ZERO);
        }
        let has_clients = self.conns.len() > self.free.len();
        let next = has_clients
            .then_some(self.next_tick)
            .into_iter()
            .chain(self.drain_deadline)
            .chain(self.flush_at)
            .chain(self.expiries.peek().map(|Reverse((at, ..))| *at))
            .min()?;
        Some(next.saturating_duration_since(Instant::now()))
    }

    fn take_messages(&mut self) {
        loop {
            match self.inbox.try_recv() {
                Ok(WriterMsg::Attach(attach)) => self.attach(*attach),
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
            seat,
            deflate,
            sse,
            expires,
            #[cfg(feature = "tls")]
            tls,
        } = attach;
        let token = self.free.pop().unwrap_or(self.conns.len());
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut stream, Token(token), interest)
        {
            debug!("{id}: cannot register socket: {e}");
            self.free.push(token);
            self.io.stats.disconnected(Disconnect::SocketError);
            self.depart(id);
            return;
        }
        let mut conn = Conn::new(id, stream, (queue, seat), (deflate, sse), &self.io);
        #[cfg(feature = "tls")]
        conn.set_tls(tls);
        if let Some(deadline) = self.drain_deadline {
            conn.begin_drain(self.io.at(deadline));
        }
        if !leftover.is_empty() && !sse {
            let mut leftover = leftover;
            conn.decode(&mut leftover, &mut self.io);
        }
        if token == self.conns.len() {
            if self.conns.len() == self.conns.capacity() {
                // Grow by an eighth, not double: a connection is hundreds
                // of bytes, and a doubled table would hold up to as many
                // empty slots as clients. Still amortized: each slot is
                // moved about eight times over the table's growth.
                self.conns
                    .reserve_exact((self.conns.len() / 8).max(TABLE_STEP));
            }
            self.conns.push(None);
        }
        mark_ready(&mut self.ready, &mut conn, token);
        self.conns[token] = Some(conn);
        if let Some(unix) = expires {
            self.expiries.push(Reverse((instant_at(unix), token, id)));
        }
        trace!("writer {}: attached {id}", self.index);
    }

    /// Closes the clients whose access has ended by `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&Reverse((at, token, id))) = self.expiries.peek() {
            if at > now {
                break;
            }
            self.expiries.pop();
            // The slot may hold another client by now.
            if let Some(Some(conn)) = self.conns.get_mut(token) {
                if conn.id == id {
                    conn.expire(&self.io);
                    mark_ready(&mut self.ready, conn, token);
                }
            }
        }
    }

    fn begin_drain(&mut self) {
        debug!("writer {}: draining clients", self.index);
        let deadline = Instant::now() + self.drain_timeout;
        self.drain_deadline = Some(deadline);
        let deadline = self.io.at(deadline);
        for (token, slot) in self.conns.iter_mut().enumerate() {
            if let Some(conn) = slot {
                conn.begin_drain(deadline);
                mark_ready(&mut self.ready, conn, token);
            }
        }
    }

    /// Reacts to lobbies' wakes: at once, or, with a write-batching window,
    /// once the window since the first wake has passed. During the window the
    /// wake stays pending, so lobbies do not wake the writer again.
    fn take_wake(&mut self, now: Instant) {
        match self.batch_window {
            None => {
                if self.wake.take() {
                    self.scan_queues();
                }
            }
            Some(window) => {
                if self.flush_at.is_none() && self.wake.is_pending() {
                    self.flush_at = Some(now + window);
                }
                if self.flush_at.is_some_and(|at| at <= now) {
                    self.flush_at = None;
                    self.wake.take();
                    self.scan_queues();
                }
            }
        }
    }

    /// After a lobby's wake: put every client with queued frames on the ready list.
    fn scan_queues(&mut self) {
        for (token, slot) in self.conns.iter_mut().enumerate() {
            if let Some(conn) = slot {
                if conn.wants_queue() {
                    mark_ready(&mut self.ready, conn, token);
                }
            }
        }
    }

    /// Checks every client's time-driven rules (close deadlines, keepalive,
    /// slow-client policy).
    fn tick(&mut self, now: Instant) {
        self.next_tick = now + TICK;
        let now = self.io.at(now);
        let mut expired = Vec::new();
        for (token, slot) in self.conns.iter_mut().enumerate() {
            let Some(conn) = slot else {
                continue;
            };
            match conn.tick(now, &mut self.io) {
                Ok(true) => mark_ready(&mut self.ready, conn, token),
                Ok(false) => {}
                Err(why) => expired.push((token, why)),
            }
        }
        for (token, reason) in expired {
            self.remove(token, reason);
        }
    }

    fn serve_ready(&mut self) {
        let mut ready = std::mem::replace(&mut self.ready, std::mem::take(&mut self.spare));
        for &token in &ready {
            let Some(Some(conn)) = self.conns.get_mut(token) else {
                continue;
            };
            conn.is_ready = false;
            match conn.serve(&mut self.io) {
                Turn::Idle => {}
                Turn::More => {
                    conn.is_ready = true;
                    self.ready.push(token);
                }
                Turn::Remove(reason) => self.remove(token, reason),
            }
        }
        ready.clear();
        self.spare = ready;
    }

    /// Drops a client (and with it its seat), counting why and what it
    /// was never sent.
    fn remove(&mut self, token: usize, reason: Disconnect) {
        let Some(mut conn) = self.conns.get_mut(token).and_then(Option::take) else {
            return;
        };
        conn.close_notify();
        if let Err(e) = self.poll.registry().deregister(conn.stream()) {
            debug!("{}: deregister failed: {e}", conn.id);
        }
        self.free.push(token);
        let lost = conn.discard();
        self.io.lost(DropReason::Departed, lost);
        self.io.stats.disconnected(reason);
        debug!("{} left: {reason}", conn.id);
        self.depart(conn.id);
    }

    fn depart(&self, id: ClientId) {
        // A closed inbox means the manager is shutting down and no longer cares.
        let _ = self.io.manager.send(ManagerMsg::Departed(id));
    }

    fn publish_counts(&mut self) {
        let io = &mut self.io;
        publish(&mut io.delivered, &io.stats.frames_delivered);
        publish(
            &mut io.delivered_deflated,
            &io.stats.frames_delivered_deflated,
        );
        publish(&mut io.bytes, &io.stats.bytes_sent);
        publish(&mut io.writes, &io.stats.client_writes);
        for (count, total) in io.dropped.iter_mut().zip(&io.stats.frames_dropped) {
            publish(count, total);
        }
        io.stats.latency.absorb(&mut io.latency);
    }
}

/// The instant of `unix`, seconds since the Unix epoch (now, if past).
fn instant_at(unix: u64) -> Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Instant::now() + Duration::from_secs(unix).saturating_sub(now)
}

/// Adds a writer's local `count` to the shared `total` and restarts it.
fn publish(count: &mut u64, total: &AtomicU64) {
    if *count > 0 {
        total.fetch_add(std::mem::take(count), Ordering::Relaxed);
    }
}

fn mark_ready(ready: &mut Vec<usize>, conn: &mut Conn, token: usize) {
    if !conn.is_ready {
        conn.is_ready = true;
        ready.push(token);
    }
}
