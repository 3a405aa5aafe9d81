//! A lobby thread: one source fanned out to up to `capacity` clients.
//!
//! For each message from its source (`source/`: a WebSocket origin
//! connection, a Redis subscription, the in-process publisher) the lobby
//! encodes the server frame once (unless the source did); the messages one
//! read of the source yields go into every member's drop-oldest queue
//! member by member, each only as many of the newest as its queue holds
//! (the older ones counted as dropped, which they would have been before a
//! writer came), then it wakes each writer that owns a member, once. When
//! that dropped frames a writer had not reached, the lobby reads its source
//! again only once those writers have looked at their queues (at most
//! [`GATE_MAX`] later, and at once while a read left more in the socket):
//! while writers are behind, messages wait in the socket and are read in
//! batches, so a message its clients would never get costs the lobby
//! almost nothing. It never touches a client socket and
//! never waits on a queue. It keeps its source while it has members and lets it
//! go when the last one leaves; the manager decides when an empty lobby ends
//! and which clients move between lobbies (`manager.rs`).
//!
//! The lobby remembers its last frames (`history.rs`): a new client can be
//! sent the latest few (replay), and a client moving in from another lobby
//! continues right after the last frame that lobby queued for it: from this
//! lobby's history if it is ahead (fed as fast as the client's queue takes
//! frames, so the catch-up itself drops nothing), once it gets there if it is
//! behind (held at most [`ADOPT_WAIT`]), or at the live edge, counted as a
//! gap, if the two streams never meet. Connection mechanics live in the
//! sources (`source/*.rs`).
//!
//! Clients that negotiated permessage-deflate get a compressed frame,
//! built once per message by the lobby (`wire/deflate.rs`) and shared by all of
//! them like the uncompressed one, which the others get; the lobby builds it
//! only while such a member is here, and only for messages of at least
//! `compress_min` bytes that deflate makes smaller (the others go out
//! uncompressed to everyone).
//!
//! With feature `sse` a lobby also builds, once per message and only while
//! such a member is here, the event-stream form for SSE clients
//! (`wire/sse.rs`) and the resume envelope for WebSocket clients that
//! opted in (`wire/envelope.rs`); each kind of member has a list of its
//! own, so the loop over plain members is the same whatever else is here.
//! While a resume member negotiated permessage-deflate, the envelope is
//! compressed too, once per message like the plain frame (same deflater,
//! same `compress_min`, counted the same); a resume member that negotiated
//! it gets the compressed envelope where there is one and the plain
//! envelope otherwise, live and from the history alike (the catch-up
//! compresses nothing: a message that came while no such member was here
//! is sent uncompressed, as RFC 7692 allows).
//! A client resuming after a message ID is caught up from the history like
//! a client moving in; after an ID the history does not know, it waits (at
//! most [`RESUME_WAIT`]) for the message to arrive, this lobby's upstream
//! being perhaps behind the one the client came from, or, on a source that
//! can read its stream again (a Redis stream), for the source
//! ([`Source::reread`], one round trip on this thread per page of a
//! queue's worth, the next page read as the client's queue drains, at most
//! [`STREAM_RESUME_HISTORIES`] histories' worth in all, and at most
//! [`REREADS_PER_TURN`] pages per turn of the loop for all clients, so the
//! fan-out goes on between them); else it is told with a reset that the ID
//! is not held.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering::Relaxed},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError, bounded, unbounded};
use log::{debug, error, info, trace, warn};
use mio::{Events, Poll, Token, Waker};

use crate::{
    config::OriginLoss,
    control::{
        inbox::{Forwarded, ManagerMsg, Resume},
        supervise::EndGuard,
    },
    delivery::{
        queue::{ClientQueue, Pushed},
        writer::WriterWake,
    },
    error::{Error, Result},
    fanout::history::{History, RESUME_RUN},
    id::{ClientId, LobbyId},
    source::{
        Upstream,
        contract::{Body, Drive, LobbyContext, Message, Source},
    },
    stats::{DropReason, LobbyCounters, OriginState, Stats, bump},
    wire::{
        close,
        deflate::Deflater,
        frame::{self, Forms, Frame},
    },
};
#[cfg(feature = "sse")]
use crate::{
    source::contract::Reread,
    wire::{envelope, frame::MessageKind, sse},
};

const WAKER: Token = Token(0);
const ORIGIN: Token = Token(1);
/// Longest a client moving in waits for this lobby to reach its position.
pub(crate) const ADOPT_WAIT: Duration = Duration::from_secs(2);
/// Frames a warming lobby receives before its clients move in: twice the
/// run a position is matched on, so a client's whole run, taken from a
/// lobby a few frames ahead or behind, lies within this lobby's history.
const WARM_FRAMES: u64 = 2 * RESUME_RUN as u64;
/// How often a lobby tops up the queues of clients catching up from its
/// history when no origin message wakes it.
const CATCH_UP_TICK: Duration = Duration::from_millis(5);
/// Longest a client resuming after a message ID the history does not hold
/// waits for it: for the message to arrive (this lobby's upstream behind
/// the one the client came from, as [`ADOPT_WAIT`] holds a client moving
/// in), or for the source to read its stream again (then: the reset).
#[cfg(feature = "sse")]
const RESUME_WAIT: Duration = ADOPT_WAIT;
/// Most pages a lobby reads again from its source (a round trip each, on
/// this thread) per turn of its loop for the clients resuming from beyond
/// its history: live messages are fanned out between turns, and a flood of
/// old (or made-up) IDs waits its turn instead of stalling the broadcast.
/// Four pages of an event stream's queue (32 entries each) took 4-6 ms
/// with 200 event streams resuming at once and a live feed on one lobby
/// (`tests/redis.rs`, on the 2-core test machine): 500 clients resuming
/// at once take 125 turns, each a few milliseconds.
#[cfg(feature = "sse")]
const REREADS_PER_TURN: usize = 4;
/// A turn starts no more rereads once they took this long (a slow Redis):
/// at least one per turn, whatever its time.
#[cfg(feature = "sse")]
const REREAD_TIME: Duration = Duration::from_millis(5);
/// A client resuming from the source is served at most this many times
/// the lobby's history (`Config::history_len`, 256 by default: 1024
/// entries, 20 s of a 50 msg/s feed), then reset. The history is the
/// window the operator chose to resume from; the stream extends it for
/// the lobby that does not have it (a restart, another instance), not
/// without bound: a page costs a round trip on the fan-out thread per
/// queue's worth, and a client further behind than that is better told
/// (the reset) than fed for minutes.
#[cfg(feature = "sse")]
const STREAM_RESUME_HISTORIES: usize = 4;
/// How often a lobby waiting for its writers looks whether they have
/// (see [`Fanout::flush`]).
const GATE_CHECK: Duration = Duration::from_micros(500);
/// Longest a lobby waits for its writers before it reads its origin again.
const GATE_MAX: Duration = Duration::from_millis(5);
/// Client messages waiting for a lobby to send them upstream; more are
/// dropped and counted (each is at most `--max-client-message` bytes).
const FORWARD_QUEUE: usize = 64;

/// A lobby's inbox.
#[derive(Debug)]
pub(crate) enum LobbyMsg {
    /// Start delivering to this new client: after the configured replay,
    /// or, for a client resuming (`after`, a message ID it saw), right
    /// after that message if the history holds it (a reset, an SSE event
    /// or a WebSocket message, and the live edge if not).
    Join { member: Member, after: Option<u64> },
    /// Stop delivering to this client.
    Leave(ClientId),
    /// Stop delivering to this client, which moves to another lobby; answer
    /// the manager with [`ManagerMsg::Released`] and its position.
    Release(ClientId),
    /// Take over a client from another lobby, continuing after `resume`.
    Adopt { member: Member, resume: Resume },
    /// Clients are to move in from lobbies on another upstream (a reload
    /// changed it): start the source now, and say
    /// [`ManagerMsg::Warmed`] once its stream is far enough along that
    /// their positions will be found in this lobby's history.
    Warm,
    /// Its route was removed: close every member with 1012 after what it
    /// has queued, and the origin connection; the manager ends the thread
    /// once it has lingered.
    Retire,
    /// Close the origin connection and end the thread.
    Shutdown,
}

/// A client as its lobby sees it: where to push frames, which writer to
/// wake, and which form of each message it takes.
#[derive(Debug)]
pub(crate) struct Member {
    pub id: ClientId,
    pub queue: ClientQueue,
    pub writer: usize,
    /// It negotiated permessage-deflate: it gets compressed frames.
    pub deflate: bool,
    /// An SSE client: it gets the event-stream form (feature `sse`; always
    /// false without it).
    #[cfg_attr(not(feature = "sse"), allow(dead_code))]
    pub sse: bool,
    /// A WebSocket client that opted into resume: it gets the envelope
    /// form (feature `sse`; always false without it).
    #[cfg_attr(not(feature = "sse"), allow(dead_code))]
    pub envelope: bool,
}

#[cfg(feature = "sse")]
impl Member {
    /// It resumes from the last message it got (an event stream, or a
    /// WebSocket resume client): its queue closes when full, never thinned
    /// (unless `--slow-stream drop`).
    pub(crate) fn resumes(&self) -> bool {
        self.sse || self.envelope
    }
}

/// The manager's handle on a lobby thread.
#[derive(Debug)]
pub(crate) struct LobbyHandle {
    tx: Sender<LobbyMsg>,
    /// Client messages for the origin: a bounded path, apart from the inbox.
    forwards: Sender<Forwarded>,
    waker: Arc<Waker>,
    origin: Arc<AtomicU8>,
    counters: Arc<LobbyCounters>,
    thread: JoinHandle<()>,
}

impl LobbyHandle {
    /// Sends `msg` and wakes the lobby. False if the lobby has ended.
    pub(crate) fn send(&self, msg: LobbyMsg) -> bool {
        let sent = self.tx.send(msg).is_ok();
        self.wake();
        sent
    }

    /// Hands a client's message to the lobby for its origin, unless the
    /// lobby is backed up (or has ended): false then, and it is dropped.
    pub(crate) fn forward(&self, message: Forwarded) -> bool {
        match self.forwards.try_send(message) {
            Ok(()) => {
                self.wake();
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            error!("cannot wake lobby: {e}");
        }
    }

    /// Where the lobby's origin connection stands.
    pub(crate) fn origin_state(&self) -> OriginState {
        OriginState::from_u8(self.origin.load(Relaxed))
    }

    /// The lobby's per-message counters.
    pub(crate) fn counters(&self) -> &LobbyCounters {
        &self.counters
    }

    /// Waits for the thread to end.
    pub(crate) fn join(self) {
        if self.thread.join().is_err() {
            error!("a lobby thread panicked");
        }
    }
}

/// Everything a new lobby needs, shared by all lobbies.
#[derive(Debug, Clone)]
pub(crate) struct LobbyEnv {
    /// Where the lobby's messages come from; it opens one source per lobby.
    pub upstream: Arc<Upstream>,
    pub writers: Arc<[Arc<WriterWake>]>,
    pub stats: Arc<Stats>,
    pub manager: Sender<ManagerMsg>,
    pub on_origin_loss: OriginLoss,
    /// Frames each lobby remembers.
    pub history: usize,
    /// Frames each lobby holds whatever their size (see `history.rs`).
    pub history_keep: usize,
    /// Bytes of frames each lobby holds beyond those.
    pub history_bytes: usize,
    /// Frames a new client is sent from the history.
    pub replay: usize,
    /// Smallest message sent compressed to members that negotiated it.
    pub compress_min: usize,
    /// What the lobby's message IDs are salted with: its route's path and
    /// query key (`history::id_salt`).
    #[cfg(feature = "sse")]
    pub id_salt: u64,
}

/// Starts a lobby thread.
pub(crate) fn spawn(id: LobbyId, env: &LobbyEnv) -> Result<LobbyHandle> {
    let poll = Poll::new().map_err(Error::io("create a lobby poll"))?;
    let waker =
        Arc::new(Waker::new(poll.registry(), WAKER).map_err(Error::io("create a lobby waker"))?);
    let registry = poll
        .registry()
        .try_clone()
        .map_err(Error::io("clone a poll registry"))?;
    let (tx, inbox) = unbounded();
    let (forwards_tx, forwards) = bounded(FORWARD_QUEUE);
    let published = Arc::new(AtomicU8::new(OriginState::Idle as u8));
    let counters = Arc::new(LobbyCounters::starting(&env.stats.epoch));
    let origin = env.upstream.open(LobbyContext {
        lobby: id,
        registry,
        token: ORIGIN,
        waker: Arc::clone(&waker),
        published: Arc::clone(&published),
        stats: Arc::clone(&env.stats),
    });
    #[cfg(feature = "sse")]
    let rereadable = origin.can_reread();
    let lobby = Lobby {
        id,
        poll,
        inbox,
        forwards,
        origin,
        fanout: Fanout {
            lobby: id,
            members: Vec::new(),
            catching_up: Vec::new(),
            adopting: Vec::new(),
            #[cfg(feature = "sse")]
            history: History::new(env.history, env.history_keep, env.history_bytes)
                .salted(env.id_salt),
            #[cfg(not(feature = "sse"))]
            history: History::new(env.history, env.history_keep, env.history_bytes),
            replay: env.replay,
            deflating: 0,
            deflater: None,
            #[cfg(feature = "sse")]
            streams: Vec::new(),
            #[cfg(feature = "sse")]
            streaming: 0,
            #[cfg(feature = "sse")]
            sealed: Vec::new(),
            #[cfg(feature = "sse")]
            sealing: 0,
            #[cfg(feature = "sse")]
            sealing_deflated: 0,
            #[cfg(feature = "sse")]
            rereadable,
            #[cfg(feature = "sse")]
            waiting: Vec::new(),
            #[cfg(feature = "sse")]
            stream_resume_max: STREAM_RESUME_HISTORIES.saturating_mul(env.history),
            #[cfg(feature = "sse")]
            rereads_pending: false,
            compress_min: env.compress_min,
            pending: Vec::new(),
            gate: Gate::open(env.writers.len()),
            writers: Arc::clone(&env.writers),
            touched: vec![false; env.writers.len()],
            stats: Arc::clone(&env.stats),
            counters: Arc::clone(&counters),
        },
        published: Arc::clone(&published),
        manager: env.manager.clone(),
        on_origin_loss: env.on_origin_loss,
        warming_from: None,
    };
    let guard = EndGuard::lobby(id, env.manager.clone(), Arc::clone(&env.stats));
    let thread = thread::Builder::new()
        .name(format!("wsgate-lobby-{}", id.0))
        .spawn(move || {
            let _guard = guard;
            lobby.run();
        });
    match thread {
        Ok(thread) => Ok(LobbyHandle {
            tx,
            forwards: forwards_tx,
            waker,
            origin: published,
            counters,
            thread,
        }),
        // The guard went down with the closure and undid the count.
        Err(e) => Err(Error::Io {
            what: "spawn a lobby thread",
            source: e,
        }),
    }
}

#[derive(Debug)]
struct Lobby {
    id: LobbyId,
    poll: Poll,
    inbox: Receiver<LobbyMsg>,
    forwards: Receiver<Forwarded>,
    origin: Box<dyn Source>,
    fanout: Fanout,
    /// The origin state as `origin` publishes it.
    published: Arc<AtomicU8>,
    manager: Sender<ManagerMsg>,
    on_origin_loss: OriginLoss,
    /// While warming up for clients moving in (see [`LobbyMsg::Warm`]):
    /// the history's head when it began.
    warming_from: Option<u64>,
}

impl Lobby {
    /// The main loop: wait for the origin, the inbox or a deadline; react.
    fn run(mut self) {
        info!("{} up", self.id);
        let mut events = Events::with_capacity(16);
        let mut more = false;
        let mut is_ending = false;
        loop {
            // A drive that left messages in the socket is read on at once:
            // the gate batches what arrives while writers are behind, and
            // must not hold the lobby below the origin's rate.
            let gated = !more && (self.fanout.gate).is_closed(&self.fanout.writers, Instant::now());
            let timeout = if more {
                Some(Duration::ZERO)
            } else {
                self.origin
                    .deadline()
                    .into_iter()
                    .chain(self.own_deadline())
                    .min()
                    .map(|at| at.saturating_duration_since(Instant::now()))
            };
            if gated {
                // Its writers are behind: what the origin sends meanwhile
                // waits in the socket, to be read in one go (an origin
                // message waking the lobby would not open the gate). The
                // origin's own deadlines wait for the gate too.
                let now = Instant::now();
                let wait = self.own_deadline().map_or(GATE_CHECK, |at| {
                    at.saturating_duration_since(now).min(GATE_CHECK)
                });
                thread::sleep(wait);
            } else if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    error!("{}: poll failed: {e}", self.id);
                    break;
                }
            }
            #[cfg(feature = "fault-injection")]
            self.fanout.stats.faults.check(crate::fault::Fault::Lobby);
            if !is_ending && !self.take_messages() {
                // Finish the origin's close handshake before the thread ends.
                is_ending = true;
                self.origin.stop("lobby ending");
            }
            // A source that blocks for input waits no longer than the
            // lobby's own next deadline.
            let budget = self.own_deadline().map_or(Duration::MAX, |at| {
                at.saturating_duration_since(Instant::now())
            });
            if !gated {
                more = self.read_origin(budget);
            }
            self.fanout.expire_adoptions(Instant::now());
            #[cfg(feature = "sse")]
            if !self.fanout.waiting.is_empty() {
                self.serve_waiting();
            }
            if self
                .warming_from
                .is_some_and(|from| self.fanout.history.head() >= from + WARM_FRAMES)
            {
                self.warming_from = None;
                let _ = self.manager.send(ManagerMsg::Warmed(self.id));
            }
            if self.fanout.is_catching_up() {
                self.fanout.catch_up();
                self.fanout.wake_writers();
            }
            if self.origin.take_failure() {
                // Messages sent while it reconnects never reach this lobby.
                #[cfg(feature = "sse")]
                self.fanout.history.sever();
                if self.on_origin_loss == OriginLoss::Close {
                    self.close_members(close::ORIGIN_LOST);
                }
            }
            let state = OriginState::from_u8(self.published.load(Relaxed));
            let stats = &self.fanout.stats;
            self.fanout.counters.observe_origin(&stats.epoch, state);
            if is_ending && !self.origin.is_closing() {
                break;
            }
        }
        info!("{} down", self.id);
    }

    /// Drives the source for at most `budget`, and queues what it delivers
    /// for the clients: all of it once `drive` returns ([`Fanout::flush`]),
    /// or each message as it comes from a source that may wait for the
    /// next. Whether more may be waiting.
    fn read_origin(&mut self, budget: Duration) -> bool {
        let Lobby { origin, fanout, .. } = self;
        let each = origin.waits_for_input();
        let mut deliver = |message: Message<'_>| {
            fanout.broadcast(message);
            if each {
                fanout.flush();
            }
        };
        let more = origin.drive(budget, &mut deliver) == Drive::More;
        fanout.flush();
        more
    }

    /// When the lobby itself needs to run next: rereads left for the next
    /// turn, a catch-up tick, a client moving in or resuming that may wait
    /// no longer.
    fn own_deadline(&self) -> Option<Instant> {
        // (Those left may have gone since: then none are.)
        #[cfg(feature = "sse")]
        if self.fanout.rereads_pending && !self.fanout.waiting.is_empty() {
            return Some(Instant::now());
        }
        if self.fanout.is_catching_up() {
            return Some(Instant::now() + CATCH_UP_TICK);
        }
        let adopt = self.fanout.next_adopt_deadline();
        #[cfg(feature = "sse")]
        let adopt = adopt
            .into_iter()
            .chain(self.fanout.waiting.iter().map(Waiting::next_turn))
            .min();
        adopt
    }

    /// Serves the clients waiting to resume after an ID the history did
    /// not hold: from the history if their message has arrived since;
    /// else, on a source that can read its stream again (a Redis stream),
    /// from the source, page by page: the messages after their ID, a page
    /// as large as the room their queue has, the next once their queue is
    /// half empty again, from where the last ended, until a page reaches
    /// the last message this lobby delivered (then the live stream, no gap,
    /// no duplicate: live messages went to the history meanwhile, not to
    /// them) or a page's last entry is one the history holds (then the
    /// history catches them up). At most [`REREADS_PER_TURN`] pages per
    /// call (fewer past [`REREAD_TIME`]); the others wait for the next,
    /// first in line. The reset once neither can serve them: the source
    /// no longer holds their message (or a page's last), more than
    /// [`STREAM_RESUME_HISTORIES`] histories' worth follow it, or
    /// [`RESUME_WAIT`] passed with the message not arrived, the source not
    /// connected, their turn not come, or their queue not drained.
    #[cfg(feature = "sse")]
    fn serve_waiting(&mut self) {
        self.fanout.resume_arrived();
        let now = Instant::now();
        let mut reads = 0;
        // Those the budget left out go first next time.
        let mut untried = Vec::new();
        let mut rest = Vec::new();
        for mut w in std::mem::take(&mut self.fanout.waiting) {
            if let Some(paged) = w.paged {
                if !w.has_room() {
                    if now < w.deadline {
                        rest.push(w);
                    } else {
                        self.fanout.reset_resume(w, "its queue did not drain");
                    }
                    continue;
                }
                let history = &self.fanout.history;
                if let Some(at) = history
                    .find_position(paged.position)
                    .filter(|at| at + 1 >= history.oldest())
                {
                    // Read again up to where the history holds the rest.
                    self.fanout
                        .resumed_from_source(w.member, paged.served, at + 1);
                    continue;
                }
                if paged.served >= self.fanout.stream_resume_max {
                    // Told once its queue has room for it (a full event
                    // stream's queue would close the stream instead).
                    let why = "more follow than a stream resume serves";
                    self.fanout.reset_resume(w, why);
                    continue;
                }
            }
            if !self.fanout.rereadable {
                if now < w.deadline {
                    rest.push(w);
                } else {
                    self.fanout.reset_resume(w, "its message never arrived");
                }
                continue;
            }
            if reads == REREADS_PER_TURN || (reads > 0 && now.elapsed() >= REREAD_TIME) {
                if Instant::now() < w.deadline {
                    untried.push(w);
                } else {
                    self.fanout.reset_resume(w, "its turn did not come");
                }
                continue;
            }
            let (from, served) = match w.paged {
                Some(paged) => (paged.position, paged.served),
                None => (self.fanout.history.position_of(w.after), 0),
            };
            let queue = &w.member.queue;
            let room = queue.depth().saturating_sub(queue.len());
            let max = room.min(self.fanout.stream_resume_max.saturating_sub(served));
            let outcome = self.origin.reread(from, max);
            if outcome != Reread::NotYet {
                reads += 1;
            }
            match outcome {
                Reread::NotYet if now < w.deadline => rest.push(w),
                Reread::After {
                    messages,
                    more: None,
                } => {
                    let served = served + messages.len();
                    self.fanout.serve_page(&w.member, messages);
                    let head = self.fanout.history.head();
                    self.fanout.resumed_from_source(w.member, served, head);
                }
                Reread::After {
                    messages,
                    more: Some(position),
                } => {
                    let served = served + messages.len();
                    self.fanout.serve_page(&w.member, messages);
                    w.paged = Some(Paged { position, served });
                    w.deadline = Instant::now() + RESUME_WAIT;
                    rest.push(w);
                }
                outcome => {
                    let why = format!("neither arrived nor served by the source ({outcome:?})");
                    self.fanout.reset_resume(w, &why);
                }
            }
        }
        self.fanout.rereads_pending = !untried.is_empty();
        untried.append(&mut rest);
        self.fanout.waiting = untried;
        self.fanout.wake_writers();
    }

    /// With `--on-origin-loss close`: close every member with 1012 so it
    /// reconnects, perhaps to another gateway. The close frame goes through
    /// each member's queue, after what it already holds.
    fn close_members(&mut self, reason: &str) {
        let count = self.fanout.len();
        if count == 0 {
            return;
        }
        warn!(
            "{}: {reason}; closing its {count} clients with 1012",
            self.id
        );
        let close = frame::encode_close(close::SERVICE_RESTART, reason);
        let fanout = &mut self.fanout;
        fanout.deflating = 0;
        let adopting = fanout.adopting.drain(..).map(|a| a.member);
        let catching_up = fanout.catching_up.drain(..).map(|c| c.member);
        #[cfg(feature = "sse")]
        let adopting = adopting
            .chain(fanout.streams.drain(..))
            .chain(fanout.sealed.drain(..))
            .chain(fanout.waiting.drain(..).map(|w| w.member));
        #[cfg(feature = "sse")]
        {
            fanout.streaming = 0;
            fanout.sealing = 0;
            fanout.sealing_deflated = 0;
        }
        for member in fanout.members.drain(..).chain(catching_up).chain(adopting) {
            member.queue.push(close.clone());
            fanout.touched[member.writer] = true;
        }
        fanout.wake_writers();
        fanout.publish_len();
        self.stop_origin();
    }

    /// Lets the origin go: the lobby's clients were all closed.
    fn stop_origin(&mut self) {
        self.origin.stop("no clients");
        #[cfg(feature = "sse")]
        self.fanout.history.sever();
    }

    /// Applies inbox messages. False when the lobby must end.
    fn take_messages(&mut self) -> bool {
        // A client's messages for the origin were sent before its departure
        // (on the other channel): they go out before the link closes.
        let mut left = false;
        loop {
            match self.inbox.try_recv() {
                Ok(LobbyMsg::Join { member, after }) => {
                    trace!("{}: {} joined", self.id, member.id);
                    self.fanout.join_new(member, after);
                    self.origin.start();
                }
                Ok(LobbyMsg::Adopt { member, resume }) => {
                    trace!("{}: {} moving in", self.id, member.id);
                    self.fanout.adopt(member, resume);
                    self.origin.start();
                }
                Ok(LobbyMsg::Warm) => {
                    self.warming_from = Some(self.fanout.history.head());
                    self.origin.start();
                }
                Ok(LobbyMsg::Leave(id)) => {
                    self.fanout.remove(id);
                    left = true;
                }
                Ok(LobbyMsg::Release(id)) => {
                    #[cfg(feature = "sse")]
                    self.fanout.reset_waiting(id);
                    let resume = self.fanout.remove(id).unwrap_or_default();
                    let _ = self.manager.send(ManagerMsg::Released { id, resume });
                    left = true;
                }
                Ok(LobbyMsg::Retire) => self.close_members(close::ROUTE_REMOVED),
                Ok(LobbyMsg::Shutdown) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => break,
            }
        }
        self.fanout.publish_len();
        // What is queued now, no more: the inbox gets its turn again first.
        for _ in 0..self.forwards.len() {
            let Ok(Forwarded { kind, payload }) = self.forwards.try_recv() else {
                break;
            };
            let counter = if self.origin.send(kind, payload) {
                &self.fanout.stats.forwarded
            } else {
                &self.fanout.stats.forward_dropped
            };
            bump(counter);
        }
        if left && self.fanout.is_empty() {
            // It keeps its origin while it lingers: clients back within the
            // linger (a blip that dropped them all) resume with nothing
            // lost, and nobody waits for a new upstream. The manager ends it.
            debug!("{}: empty; lingering with its origin", self.id);
        }
        true
    }
}

/// The writers a lobby waits for before it reads its origin again, once a
/// flush dropped frames they had not reached (see [`Fanout::flush`]).
#[derive(Debug)]
struct Gate {
    /// Per writer: the wakes it had taken when the gate closed, if the
    /// lobby waits for it to take another.
    scans: Vec<Option<u64>>,
    /// Open at the latest then; `None` while open.
    until: Option<Instant>,
}

impl Gate {
    fn open(writers: usize) -> Gate {
        Gate {
            scans: vec![None; writers],
            until: None,
        }
    }

    /// Closes the gate until each writer `touched` takes its next wake.
    fn close(&mut self, writers: &[Arc<WriterWake>], touched: &[bool], now: Instant) {
        let each = self.scans.iter_mut().zip(writers).zip(touched);
        for ((scans, writer), &touched) in each {
            *scans = touched.then(|| writer.scans());
        }
        self.until = Some(now + GATE_MAX);
    }

    /// Whether the lobby still waits: some writer has not taken a wake
    /// since the gate closed, and [`GATE_MAX`] has not passed.
    fn is_closed(&mut self, writers: &[Arc<WriterWake>], now: Instant) -> bool {
        let Some(until) = self.until else {
            return false;
        };
        let waits = now < until
            && (self.scans.iter().zip(writers))
                .any(|(scans, writer)| scans.is_some_and(|at| writer.scans() == at));
        if !waits {
            self.until = None;
        }
        waits
    }
}

/// A client moving in, held until this lobby reaches its position.
#[derive(Debug)]
struct Adopting {
    member: Member,
    resume: Resume,
    deadline: Instant,
}

/// A client resuming after message `after`, which the history does not
/// hold: waiting for it to arrive, or for the source to read the stream
/// again from there (the next page of it, once `paged`). The history was
/// searched up to frame `searched`.
#[cfg(feature = "sse")]
#[derive(Debug)]
struct Waiting {
    member: Member,
    after: u64,
    searched: u64,
    /// When it is reset if not served: [`RESUME_WAIT`] after it came, or
    /// after its last page.
    deadline: Instant,
    /// Being read again from the source, page by page: kept out of the
    /// broadcast until it reaches the live stream.
    paged: Option<Paged>,
}

/// Where a client being read again from the source is.
#[cfg(feature = "sse")]
#[derive(Debug, Clone, Copy)]
struct Paged {
    /// The source position of the last entry of its last page: the next
    /// page starts there.
    position: u64,
    /// Messages it has been served from the source.
    served: usize,
}

#[cfg(feature = "sse")]
impl Waiting {
    /// Whether its queue has room for the next page: half of it, so a
    /// page is worth its round trip.
    fn has_room(&self) -> bool {
        let queue = &self.member.queue;
        queue.len().saturating_mul(2) <= queue.depth()
    }

    /// When the lobby must look at it again unwoken: a client between
    /// pages at the catch-up tick (its queue drains unseen), else at its
    /// deadline.
    fn next_turn(&self) -> Instant {
        match self.paged {
            Some(_) => self.deadline.min(Instant::now() + CATCH_UP_TICK),
            None => self.deadline,
        }
    }
}

/// A client being brought up to the live edge from the history, as fast as
/// its queue takes frames: `next` is the number of its next frame.
#[derive(Debug)]
struct CatchingUp {
    member: Member,
    next: u64,
    /// It already fell behind the history once (a migration gap, counted once).
    is_gapped: bool,
}

/// Everything the fan-out touches: members, their writers, the history.
#[derive(Debug)]
struct Fanout {
    lobby: LobbyId,
    /// Clients at the live edge: each broadcast goes to them.
    members: Vec<Member>,
    catching_up: Vec<CatchingUp>,
    adopting: Vec<Adopting>,
    history: History,
    replay: usize,
    /// Clients here (at the live edge, catching up or moving in) that take
    /// compressed frames (resume clients apart: `sealing_deflated`): while
    /// there are none, none are built.
    deflating: usize,
    /// Made when the first message is compressed.
    deflater: Option<Deflater>,
    /// SSE clients at the live edge: each broadcast's event-stream form
    /// goes to them (apart from `members`, so WebSocket members cost nothing more).
    #[cfg(feature = "sse")]
    streams: Vec<Member>,
    /// Clients here (at the live edge, catching up or moving in) that take
    /// the event-stream form: while there are none, none is built.
    #[cfg(feature = "sse")]
    streaming: usize,
    /// WebSocket clients at the live edge that opted into resume: each
    /// broadcast's envelope form goes to them (apart from `members`, like
    /// `streams`).
    #[cfg(feature = "sse")]
    sealed: Vec<Member>,
    /// Clients here (at the live edge, catching up or moving in) that take
    /// the envelope form: while there are none, none is built.
    #[cfg(feature = "sse")]
    sealing: usize,
    /// Of those, the clients that negotiated permessage-deflate: while
    /// there are none, no envelope is compressed.
    #[cfg(feature = "sse")]
    sealing_deflated: usize,
    /// The source can read again what the history no longer holds (a
    /// Redis stream): resumes from beyond the history wait for it too.
    #[cfg(feature = "sse")]
    rereadable: bool,
    /// Clients resuming after an ID the history does not hold, served by
    /// the lobby loop ([`Lobby::serve_waiting`]).
    #[cfg(feature = "sse")]
    waiting: Vec<Waiting>,
    /// Most messages a client resuming from the source is served
    /// ([`STREAM_RESUME_HISTORIES`] histories' worth).
    #[cfg(feature = "sse")]
    stream_resume_max: usize,
    /// The last [`Lobby::serve_waiting`] left rereads for the next turn:
    /// the loop comes back at once.
    #[cfg(feature = "sse")]
    rereads_pending: bool,
    compress_min: usize,
    /// This drive's messages, plain and compressed, not yet queued for
    /// `members` ([`Fanout::flush`]).
    pending: Vec<(Frame, Option<Frame>)>,
    /// Closed by a flush that dropped frames their writers had not
    /// reached: the origin is read again once those writers have looked.
    gate: Gate,
    writers: Arc<[Arc<WriterWake>]>,
    /// Per writer: owns a member that got frames since the last wake.
    touched: Vec<bool>,
    stats: Arc<Stats>,
    /// This lobby's counters, bumped once per message.
    counters: Arc<LobbyCounters>,
}

impl Fanout {
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The clients this lobby holds: live, catching up, or moving in.
    fn len(&self) -> usize {
        let len = self.members.len() + self.catching_up.len() + self.adopting.len();
        #[cfg(feature = "sse")]
        let len = len + self.streams.len() + self.sealed.len() + self.waiting.len();
        len
    }

    /// Publishes [`Fanout::len`] for the lobby listing.
    fn publish_len(&self) {
        self.counters.attached.store(self.len() as u64, Relaxed);
    }

    /// Encodes one message once (unless its source did), queues it for
    /// every member, and moves along the clients joining from the history
    /// or from another lobby.
    fn broadcast(&mut self, message: Message<'_>) {
        self.stats.messages_in.fetch_add(1, Relaxed);
        // An empty lobby (lingering, or warming up) still keeps its
        // history: its clients may be back any moment, resuming.
        let plain = match message.body {
            Body::Payload(kind, payload) => {
                frame::encode_stamped(kind.opcode(), payload, self.stats.epoch.micros())
            }
            Body::Frame(frame) => frame.clone(),
        };
        let deflated = if self.deflating > 0 {
            self.deflate(&plain)
        } else {
            None
        };
        let mark = self.history.mark(&plain, message.position);
        #[cfg(feature = "sse")]
        let sse = (self.streaming > 0).then(|| sse::event(mark.id, &plain));
        #[cfg(feature = "sse")]
        let envelope = (self.sealing > 0).then(|| envelope::envelope(mark.id, &plain));
        #[cfg(feature = "sse")]
        let envelope_deflated = match &envelope {
            Some(sealed) if self.sealing_deflated > 0 => self.deflate(sealed),
            _ => None,
        };
        let forms = Forms {
            plain,
            deflated,
            #[cfg(feature = "sse")]
            sse,
            #[cfg(feature = "sse")]
            envelope,
            #[cfg(feature = "sse")]
            envelope_deflated,
        };
        if !self.members.is_empty() {
            self.pending
                .push((forms.plain.clone(), forms.deflated.clone()));
        }
        if !self.adopting.is_empty() || self.is_catching_up() {
            // Whoever goes live below must find this message queued for
            // the members already, and none of the next ones.
            self.flush();
        }
        #[cfg(feature = "sse")]
        {
            let mut dropped = [0; DropReason::COUNT];
            let pushed = self.seal(&forms, &mut dropped) + self.stream(&forms, &mut dropped);
            self.count(pushed, &dropped);
        }
        self.counters.message(&self.stats.epoch);
        self.history.push_marked(forms, mark);
        self.counters.history(self.history.held());
        if !self.adopting.is_empty() {
            // Those whose last frame was this one join at the live edge.
            let history = &self.history;
            let (ready, waiting) = std::mem::take(&mut self.adopting)
                .into_iter()
                .partition(|a| history.ends_with(&a.resume));
            self.adopting = waiting;
            for adopted in ready {
                trace!("{}: {} caught up with", self.lobby, adopted.member.id);
                self.go_live(adopted.member);
            }
        }
        self.catch_up();
        self.wake_writers();
    }

    /// Queues the messages of this drive for the members: member by member,
    /// each only the newest of them its queue holds, so a message a full
    /// queue would drop before its writer took it costs nothing but its
    /// count (a burst longer than the queue loses its oldest either way, as
    /// every frame of it would be queued before a writer comes). Frames
    /// dropped for writers that had not reached their clients close the
    /// gate: the origin is read again once those writers have looked, so
    /// while they are behind the lobby reads in batches, not a message at a
    /// time.
    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut dropped = [0; DropReason::COUNT];
        for member in &self.members {
            let queue = &member.queue;
            let skip = self.pending.len().saturating_sub(queue.depth());
            if skip > 0 {
                let reason = queue.why_lost();
                queue.count_lost(reason, skip as u64);
                dropped[reason as usize] += skip as u64;
            }
            for (plain, deflated) in &self.pending[skip..] {
                let frame = frame::for_client(plain, deflated.as_ref(), member.deflate);
                if let Pushed::Dropped(reason) = queue.push(frame.clone()) {
                    dropped[reason as usize] += 1;
                }
            }
            self.touched[member.writer] = true;
        }
        let pushed = (self.members.len() * self.pending.len()) as u64;
        self.pending.clear();
        self.count(pushed, &dropped);
        if dropped[DropReason::WriterBehind as usize] > 0 {
            self.gate
                .close(&self.writers, &self.touched, Instant::now());
        }
        self.wake_writers();
    }

    /// Counts frames queued (`pushed`, those that dropped one included)
    /// and dropped, by reason.
    fn count(&self, pushed: u64, dropped: &[u64; DropReason::COUNT]) {
        for reason in DropReason::ALL {
            self.stats.dropped(reason, dropped[reason as usize]);
        }
        self.counters.frames(pushed, dropped.iter().sum());
    }

    /// Queues a message's event-stream form for the SSE members; how many
    /// took it. A member whose queue is full has its stream closed by its
    /// writer (it resumes from the history), so none of them loses a frame;
    /// with `--slow-stream drop`, its oldest is dropped, counted in `dropped`.
    #[cfg(feature = "sse")]
    fn stream(&mut self, forms: &Forms, dropped: &mut [u64; DropReason::COUNT]) -> u64 {
        let Some(event) = &forms.sse else {
            return 0;
        };
        let mut pushed = 0;
        for member in &self.streams {
            pushed += took(member.queue.push_event(event.clone()), dropped);
            self.touched[member.writer] = true;
        }
        pushed
    }

    /// Queues a message's envelope for the members that opted into
    /// resume: compressed for those that negotiated that, where there is a
    /// compressed envelope. Like an event stream, such a member loses
    /// nothing: a full queue refuses the envelope and its writer closes the
    /// connection (1013), and the client resumes after the last ID it got
    /// (with `--slow-stream drop`, its oldest is dropped instead, counted).
    #[cfg(feature = "sse")]
    fn seal(&mut self, forms: &Forms, dropped: &mut [u64; DropReason::COUNT]) -> u64 {
        let Some(plain) = &forms.envelope else {
            return 0;
        };
        let mut pushed = 0;
        for member in &self.sealed {
            let sealed = match &forms.envelope_deflated {
                Some(deflated) if member.deflate => deflated,
                _ => plain,
            };
            pushed += took(member.queue.push_event(sealed.clone()), dropped);
            self.touched[member.writer] = true;
        }
        pushed
    }

    /// A client reaches the live edge: the broadcast goes to it from now on.
    fn go_live(&mut self, member: Member) {
        #[cfg(feature = "sse")]
        if member.sse {
            return self.streams.push(member);
        }
        #[cfg(feature = "sse")]
        if member.envelope {
            return self.sealed.push(member);
        }
        self.members.push(member);
    }

    /// The compressed frame of `plain` (an origin message's frame or its
    /// envelope), if its payload is at least `compress_min` bytes and
    /// deflate makes it smaller; counted.
    fn deflate(&mut self, plain: &Frame) -> Option<Frame> {
        let (opcode, payload) = frame::opcode_and_payload(plain);
        if payload.len() < self.compress_min {
            return None;
        }
        let compressed = self
            .deflater
            .get_or_insert_with(Deflater::new)
            .compress(payload)?;
        bump(&self.stats.messages_deflated);
        let stats = &self.stats;
        stats
            .deflate_bytes_in
            .fetch_add(payload.len() as u64, Relaxed);
        stats
            .deflate_bytes_out
            .fetch_add(compressed.len() as u64, Relaxed);
        Some(frame::encode_deflated(opcode, compressed, plain.stamp()))
    }

    /// A new client: the last `replay` frames, then the live stream; a
    /// resuming one (`after`), what followed that message.
    fn join_new(&mut self, member: Member, after: Option<u64>) {
        self.deflating += usize::from(member.deflate && !member.envelope);
        #[cfg(feature = "sse")]
        {
            self.streaming += usize::from(member.sse);
            self.sealing += usize::from(member.envelope);
            self.sealing_deflated += usize::from(member.envelope && member.deflate);
            if let Some(after) = after {
                return self.resume(member, after);
            }
        }
        #[cfg(not(feature = "sse"))]
        let _ = after;
        let from = self
            .history
            .head()
            .saturating_sub(self.replay as u64)
            .max(self.history.oldest());
        self.enlist(member, from);
    }

    /// A client that saw message `after` last: the frames after it from the
    /// history, then the live stream. If the history remembers the ID but
    /// no longer holds the frames after it, and the source cannot read them
    /// again, the reset (an event for a stream, a message for a WebSocket),
    /// counted, then the live stream. An ID the history does not know
    /// waits ([`Lobby::serve_waiting`]): it may not have arrived yet here.
    #[cfg(feature = "sse")]
    fn resume(&mut self, member: Member, after: u64) {
        match self.history.find_id(after) {
            Some(at) if at + 1 >= self.history.oldest() && at >= self.history.since() => {
                self.resume_at(member, at)
            }
            Some(_) if !self.rereadable => {
                debug!(
                    "{}: {} resumes after {}, too old for the history or \
                     before its source last stopped",
                    self.lobby,
                    member.id,
                    sse::format_id(after)
                );
                self.reset(member);
            }
            _ => self.waiting.push(Waiting {
                member,
                after,
                searched: self.history.head(),
                deadline: Instant::now() + RESUME_WAIT,
                paged: None,
            }),
        }
    }

    /// `member` resumes after frame `at`: the frames after it from the
    /// history, then the live stream.
    #[cfg(feature = "sse")]
    fn resume_at(&mut self, member: Member, at: u64) {
        bump(&self.stats.resumes);
        debug!(
            "{}: {} resumes {} frames back",
            self.lobby,
            member.id,
            self.history.head() - at - 1
        );
        self.enlist(member, at + 1);
    }

    /// Resumes the waiting clients whose message has arrived since the
    /// history was last searched for it (each new frame is looked at once
    /// per waiting client).
    #[cfg(feature = "sse")]
    fn resume_arrived(&mut self) {
        let head = self.history.head();
        for mut w in std::mem::take(&mut self.waiting) {
            if w.paged.is_some() {
                // Its message came long ago: it is being read again.
                self.waiting.push(w);
                continue;
            }
            match self.history.find_id_from(w.after, w.searched) {
                Some(at) => self.resume_at(w.member, at),
                None => {
                    w.searched = head;
                    self.waiting.push(w);
                }
            }
        }
    }

    /// The reset (an event for a stream, a message for a WebSocket),
    /// counted, then the live stream.
    #[cfg(feature = "sse")]
    fn reset(&mut self, member: Member) {
        bump(&self.stats.resume_resets);
        push_to(&member, reset_for(&member));
        self.touched[member.writer] = true;
        self.enlist(member, self.history.head());
    }

    /// A client still waiting to resume is moving to another lobby, where
    /// it starts live: it is told with the reset first (queued ahead of
    /// anything it gets there).
    #[cfg(feature = "sse")]
    fn reset_waiting(&mut self, id: ClientId) {
        let Some(w) = self.waiting.iter().find(|w| w.member.id == id) else {
            return;
        };
        bump(&self.stats.resume_resets);
        push_to(&w.member, reset_for(&w.member));
        self.touched[w.member.writer] = true;
        self.wake_writers();
    }

    /// The reset for a client resuming from beyond the history (`why` it
    /// was not served, for the log), then the live stream.
    #[cfg(feature = "sse")]
    fn reset_resume(&mut self, w: Waiting, why: &str) {
        debug!(
            "{}: {} resumes after {}, reset: {why}",
            self.lobby,
            w.member.id,
            sse::format_id(w.after)
        );
        self.reset(w.member);
    }

    /// A client resuming from beyond the history: `messages`, read again
    /// from the source (up to the last one this lobby delivered), in its
    /// form, then the live stream. Their IDs are those the live messages
    /// had: made from the same positions.
    #[cfg(feature = "sse")]
    #[cfg(test)]
    fn resume_from_source(&mut self, member: Member, messages: Vec<(MessageKind, Vec<u8>, u64)>) {
        let served = messages.len();
        self.serve_page(&member, messages);
        self.resumed_from_source(member, served, self.history.head());
    }

    /// Queues a page read again from the source for `member`, in its
    /// form, with the IDs the live messages had (made from the same
    /// positions).
    #[cfg(feature = "sse")]
    fn serve_page(&mut self, member: &Member, messages: Vec<(MessageKind, Vec<u8>, u64)>) {
        trace!(
            "{}: {} gets {} messages read again from the source",
            self.lobby,
            member.id,
            messages.len()
        );
        for (kind, payload, position) in messages {
            let plain = frame::encode_stamped(kind.opcode(), &payload, self.stats.epoch.micros());
            let id = self.history.mark(&plain, Some(position)).id;
            let form = if member.sse {
                sse::event(id, &plain)
            } else {
                envelope::envelope(id, &plain)
            };
            push_to(member, form);
        }
        self.touched[member.writer] = true;
    }

    /// A client was read again from the source (`served` messages) up to
    /// frame `next` of the history: from there it is caught up like any
    /// (the history's head: it is at the live edge), counted once.
    #[cfg(feature = "sse")]
    fn resumed_from_source(&mut self, member: Member, served: usize, next: u64) {
        bump(&self.stats.resumes_from_source);
        debug!(
            "{}: {} resumes {served} messages back, read again from the source{}",
            self.lobby,
            member.id,
            if next < self.history.head() {
                ", then from the history"
            } else {
                ""
            }
        );
        self.enlist(member, next);
    }

    /// A client from another lobby: continue right after `resume`.
    fn adopt(&mut self, member: Member, resume: Resume) {
        self.deflating += usize::from(member.deflate && !member.envelope);
        #[cfg(feature = "sse")]
        {
            self.streaming += usize::from(member.sse);
            self.sealing += usize::from(member.envelope);
            self.sealing_deflated += usize::from(member.envelope && member.deflate);
        }
        if resume.is_empty() {
            // It had received nothing yet: the live edge is where it starts.
            return self.enlist(member, self.history.head());
        }
        match self.history.find_after(&resume) {
            Some(next) => self.enlist(member, next),
            None => self.adopting.push(Adopting {
                member,
                resume,
                deadline: Instant::now() + ADOPT_WAIT,
            }),
        }
    }

    /// Brings `member` up from frame `next` to the live edge, then makes it a member.
    fn enlist(&mut self, member: Member, next: u64) {
        self.catching_up.push(CatchingUp {
            member,
            next,
            is_gapped: false,
        });
        self.catch_up();
        self.wake_writers();
    }

    /// Queues history frames for catching-up clients while their queues have
    /// room (never dropping what they have not seen); those that reach the
    /// live edge with an empty queue become members.
    fn catch_up(&mut self) {
        if self.catching_up.is_empty() {
            return;
        }
        let mut i = 0;
        while i < self.catching_up.len() {
            let c = &mut self.catching_up[i];
            #[cfg(feature = "sse")]
            if c.next < self.history.oldest() && c.member.queue.closes_when_full() {
                // An event stream or a resume client loses nothing: its
                // connection is closed, and it resumes from the history it
                // still finds.
                c.member.queue.overflow();
                c.next = self.history.oldest();
            }
            if c.next < self.history.oldest() {
                // Its queue stayed full while the history moved on: the
                // frames it skips are lost to it.
                let lost = self.history.oldest() - c.next;
                debug!(
                    "{}: {} missed {lost} frames catching up",
                    self.lobby, c.member.id
                );
                if !std::mem::replace(&mut c.is_gapped, true) {
                    bump(&self.stats.migration_gaps);
                }
                let reason = c.member.queue.why_lost();
                self.stats.dropped(reason, lost);
                c.member.queue.count_lost(reason, lost);
                c.next = self.history.oldest();
            }
            while c.next < self.history.head() && c.member.queue.len() < c.member.queue.depth() {
                if let Some(frame) = form_at(&self.history, c.next, &c.member) {
                    push_to(&c.member, frame);
                }
                c.next += 1;
                self.touched[c.member.writer] = true;
            }
            // At the live edge, and its writer has taken what the catch-up
            // queued: live from now on, with a whole queue of slack like
            // any member. Until then it waits here (the history keeps what
            // arrives meanwhile), so a live frame never pushes out a frame
            // of the catch-up when its writer is briefly late.
            if c.next == self.history.head() && c.member.queue.is_empty() {
                let done = self.catching_up.swap_remove(i);
                self.go_live(done.member);
            } else {
                i += 1;
            }
        }
    }

    /// Whether some client is still being brought up to the live edge.
    fn is_catching_up(&self) -> bool {
        !self.catching_up.is_empty()
    }

    /// Clients that waited too long for this lobby to reach their position
    /// join at the live edge; each such migration counts as a gap.
    fn expire_adoptions(&mut self, now: Instant) {
        if self.adopting.iter().all(|a| a.deadline > now) {
            return;
        }
        let (late, waiting) = std::mem::take(&mut self.adopting)
            .into_iter()
            .partition(|a: &Adopting| a.deadline <= now);
        self.adopting = waiting;
        for adopted in late {
            debug!(
                "{}: {} joins at the live edge (its position never came)",
                self.lobby, adopted.member.id
            );
            bump(&self.stats.migration_gaps);
            self.go_live(adopted.member);
        }
    }

    fn next_adopt_deadline(&self) -> Option<Instant> {
        self.adopting.iter().map(|a| a.deadline).min()
    }

    /// Removes a client; returns its position in the stream if it was here.
    fn remove(&mut self, id: ClientId) -> Option<Resume> {
        let (resume, member) = self.take(id)?;
        self.deflating -= usize::from(member.deflate && !member.envelope);
        #[cfg(feature = "sse")]
        {
            self.streaming -= usize::from(member.sse);
            self.sealing -= usize::from(member.envelope);
            self.sealing_deflated -= usize::from(member.envelope && member.deflate);
        }
        Some(resume)
    }

    /// Takes a client out of whichever set holds it, with its position.
    fn take(&mut self, id: ClientId) -> Option<(Resume, Member)> {
        if let Some(at) = self.members.iter().position(|m| m.id == id) {
            let member = self.members.swap_remove(at);
            trace!("{}: {id} left", self.lobby);
            return Some((self.history.resume_before(self.history.head()), member));
        }
        #[cfg(feature = "sse")]
        for live in [&mut self.streams, &mut self.sealed] {
            if let Some(at) = live.iter().position(|m| m.id == id) {
                let member = live.swap_remove(at);
                trace!("{}: {id} left", self.lobby);
                return Some((self.history.resume_before(self.history.head()), member));
            }
        }
        if let Some(at) = self.catching_up.iter().position(|c| c.member.id == id) {
            let c = self.catching_up.swap_remove(at);
            return Some((self.history.resume_before(c.next), c.member));
        }
        #[cfg(feature = "sse")]
        if let Some(at) = self.waiting.iter().position(|w| w.member.id == id) {
            // It has had nothing here: wherever it goes, it starts live.
            return Some((Resume::new(), self.waiting.swap_remove(at).member));
        }
        let at = self.adopting.iter().position(|a| a.member.id == id)?;
        let adopting = self.adopting.swap_remove(at);
        Some((adopting.resume, adopting.member))
    }

    fn wake_writers(&mut self) {
        for (writer, touched) in self.writers.iter().zip(self.touched.iter_mut()) {
            if std::mem::take(touched) {
                writer.notify();
            }
        }
    }
}

/// 1 if a push queued its frame (counting the frame it dropped for it, if
/// any, in `dropped`), 0 if the queue refused it.
#[cfg(feature = "sse")]
fn took(pushed: Pushed, dropped: &mut [u64; DropReason::COUNT]) -> u64 {
    match pushed {
        Pushed::Queued => 1,
        Pushed::Dropped(reason) => {
            dropped[reason as usize] += 1;
            1
        }
        Pushed::Overflowed => 0,
    }
}

/// Queues `frame` for `member`. The queue of an event stream or a resume
/// client takes nothing once it has overflowed: its client resumes from the
/// last message it got, so a catch-up that the history outran must not go
/// on past the gap.
fn push_to(member: &Member, frame: Frame) -> Pushed {
    #[cfg(feature = "sse")]
    if member.resumes() {
        return member.queue.push_event(frame);
    }
    member.queue.push(frame)
}

/// The reset `member` takes: an event for a stream, a message for a
/// WebSocket resume client.
#[cfg(feature = "sse")]
fn reset_for(member: &Member) -> Frame {
    if member.sse {
        sse::reset()
    } else {
        envelope::reset()
    }
}

/// The form of frame number `at` of `history` that `member` takes, if
/// still held: compressed, plain, the event-stream form or the envelope
/// (compressed if held so and `member` negotiated that; either form built
/// now, uncompressed, if the lobby had no member taking it when the
/// message came).
fn form_at(history: &History, at: u64, member: &Member) -> Option<Frame> {
    #[cfg(feature = "sse")]
    if member.sse {
        let (forms, id) = history.get_with_id(at)?;
        return Some(match &forms.sse {
            Some(event) => event.clone(),
            None => sse::event(id, &forms.plain),
        });
    }
    #[cfg(feature = "sse")]
    if member.envelope {
        let (forms, id) = history.get_with_id(at)?;
        return Some(match forms.envelope_for(member.deflate) {
            Some(sealed) => sealed.clone(),
            None => envelope::envelope(id, &forms.plain),
        });
    }
    let forms = history.get(at)?;
    Some(forms.for_client(member.deflate).clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::MessageKind;

    /// A text message `x` at source position `position`.
    #[cfg(feature = "sse")]
    fn x_at(position: u64) -> Message<'static> {
        Message {
            body: Body::Payload(MessageKind::Text, b"x"),
            position: Some(position),
        }
    }

    /// The message ID `fanout` gives [`x_at`]`(position)`.
    #[cfg(feature = "sse")]
    fn id_of_x(fanout: &Fanout, position: u64) -> u64 {
        let plain = frame::encode(frame::OP_TEXT, b"x");
        fanout.history.mark(&plain, Some(position)).id
    }

    /// Event stream number `id`, its frames in `queue`.
    #[cfg(feature = "sse")]
    fn stream_member(id: u64, queue: &ClientQueue) -> Member {
        Member {
            id: ClientId(id),
            queue: queue.clone(),
            writer: 0,
            deflate: false,
            sse: true,
            envelope: false,
        }
    }

    /// The frames `queue` holds, as text, taken out.
    #[cfg(feature = "sse")]
    fn texts(queue: &ClientQueue) -> Vec<String> {
        std::iter::from_fn(|| queue.pop())
            .map(|f| String::from_utf8(f.to_vec()).unwrap())
            .collect()
    }

    /// A Redis stream for [`Lobby::serve_waiting`]: an entry at every
    /// position up to `last` (the last one delivered), each `x`, read
    /// again in pages; counts its rereads.
    #[cfg(feature = "sse")]
    #[derive(Debug, Default, Clone)]
    struct Stream {
        last: Arc<std::sync::atomic::AtomicU64>,
        rereads: Arc<std::sync::atomic::AtomicUsize>,
    }

    #[cfg(feature = "sse")]
    impl Source for Stream {
        fn start(&mut self) {}
        fn stop(&mut self, _why: &str) {}
        fn drive(&mut self, _: Duration, _: &mut dyn FnMut(Message<'_>)) -> Drive {
            Drive::Idle
        }
        fn deadline(&self) -> Option<Instant> {
            None
        }
        fn take_failure(&mut self) -> bool {
            false
        }
        fn can_reread(&self) -> bool {
            true
        }
        fn reread(&mut self, position: u64, max: usize) -> Reread {
            let last = self.last.load(Relaxed);
            if position > last {
                return Reread::NotYet;
            }
            self.rereads.fetch_add(1, Relaxed);
            let after = position + 1..=last;
            let more = (after.clone().count() > max).then(|| position + max as u64);
            let messages = after
                .take(max)
                .map(|p| (MessageKind::Text, b"x".to_vec(), p))
                .collect();
            Reread::After { messages, more }
        }
    }

    /// A lobby on `stream` around `fanout` (whose source it becomes).
    #[cfg(feature = "sse")]
    fn lobby_on(mut fanout: Fanout, stream: &Stream) -> Lobby {
        fanout.rereadable = true;
        lobby_with(fanout, Box::new(stream.clone()))
    }

    /// A lobby on `origin` around `fanout`.
    fn lobby_with(fanout: Fanout, origin: Box<dyn Source>) -> Lobby {
        Lobby {
            id: LobbyId(0),
            poll: Poll::new().unwrap(),
            inbox: unbounded().1,
            forwards: bounded(1).1,
            origin,
            fanout,
            published: Arc::new(AtomicU8::new(0)),
            manager: unbounded().0,
            on_origin_loss: OriginLoss::Keep,
            warming_from: None,
        }
    }

    /// The lobby delivers `x` at `position`, its stream having it.
    #[cfg(feature = "sse")]
    fn deliver(lobby: &mut Lobby, stream: &Stream, position: u64) {
        stream.last.store(position, Relaxed);
        lobby.fanout.broadcast(x_at(position));
    }

    /// The positions of the events `queue` holds, taken out (`None` for
    /// the reset).
    #[cfg(feature = "sse")]
    fn positions(fanout: &Fanout, queue: &ClientQueue) -> Vec<Option<u64>> {
        texts(queue)
            .iter()
            .map(|t| {
                let id = t.strip_prefix("id: ")?.split('\n').next()?;
                Some(fanout.history.position_of(sse::parse_id(id).unwrap()))
            })
            .collect()
    }

    /// A lobby's fan-out with one writer (woken through `poll`), replaying
    /// `replay` frames to newcomers, and one member that keeps up, so it
    /// broadcasts.
    fn fanout_with_a_reader(poll: &Poll, replay: usize) -> (Fanout, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        let mut fanout = Fanout {
            lobby: LobbyId(0),
            members: Vec::new(),
            catching_up: Vec::new(),
            adopting: Vec::new(),
            history: History::new(64, 4, 1 << 20),
            replay,
            deflating: 0,
            deflater: None,
            #[cfg(feature = "sse")]
            streams: Vec::new(),
            #[cfg(feature = "sse")]
            streaming: 0,
            #[cfg(feature = "sse")]
            sealed: Vec::new(),
            #[cfg(feature = "sse")]
            sealing: 0,
            #[cfg(feature = "sse")]
            sealing_deflated: 0,
            #[cfg(feature = "sse")]
            rereadable: false,
            #[cfg(feature = "sse")]
            waiting: Vec::new(),
            #[cfg(feature = "sse")]
            stream_resume_max: STREAM_RESUME_HISTORIES * 64,
            #[cfg(feature = "sse")]
            rereads_pending: false,
            compress_min: 256,
            pending: Vec::new(),
            gate: Gate::open(1),
            writers: Arc::from([WriterWake::for_tests(poll)]),
            touched: vec![false],
            counters: Arc::new(LobbyCounters::starting(&stats.epoch)),
            stats: Arc::clone(&stats),
        };
        let reader = ClientQueue::new(1000, false);
        fanout.members.push(plain_member(0, &reader));
        (fanout, stats)
    }

    #[test]
    fn a_member_is_one_cache_line() {
        // The broadcast walks every member for every message: at 72 bytes
        // (a flag inline in the queue) the saturated bench delivered 0.86x
        // as much, six rounds alternated with the 64-byte layout.
        assert_eq!(std::mem::size_of::<Member>(), 64);
    }

    /// A plain member number `id` of writer 0, its frames in `queue`.
    fn plain_member(id: u64, queue: &ClientQueue) -> Member {
        Member {
            id: ClientId(id),
            queue: queue.clone(),
            writer: 0,
            deflate: false,
            sse: false,
            envelope: false,
        }
    }

    /// The one-byte payloads `queue` holds, taken out.
    fn bytes(queue: &ClientQueue) -> Vec<u8> {
        std::iter::from_fn(|| queue.pop()).map(|f| f[2]).collect()
    }

    #[test]
    fn a_drive_longer_than_a_queue_queues_only_its_newest_and_waits_for_the_writer() {
        let poll = Poll::new().unwrap();
        let (mut fanout, stats) = fanout_with_a_reader(&poll, 0);
        let reader = fanout.members[0].queue.clone();
        let short = ClientQueue::new(4, false);
        fanout.members.push(plain_member(1, &short));
        for n in 0..10u8 {
            fanout.broadcast(Message::payload(MessageKind::Text, &[n]));
        }
        assert!(short.is_empty(), "queued once the drive is over");
        fanout.flush();
        assert_eq!(bytes(&reader), (0..10).collect::<Vec<u8>>());
        // Six would have been pushed out before a writer came: never queued,
        // but counted, so every frame is delivered or counted.
        assert_eq!(bytes(&short), [6, 7, 8, 9]);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.dropped(DropReason::WriterBehind), 6);
        assert_eq!(fanout.counters.frames_out.load(Relaxed), 20);
        assert_eq!(fanout.counters.frames_dropped.load(Relaxed), 6);
        // Its writer had not reached it: no more reading until it has.
        let now = Instant::now();
        assert!(fanout.gate.is_closed(&fanout.writers, now));
        assert!(fanout.writers[0].take(), "the flush woke the writer");
        assert!(!fanout.gate.is_closed(&fanout.writers, now));
        // A stalled client's losses are its own: the gate stays open.
        short.set_stalled(true);
        for n in 0..5u8 {
            fanout.broadcast(Message::payload(MessageKind::Text, &[n]));
        }
        fanout.flush();
        assert_eq!(bytes(&short), [1, 2, 3, 4]);
        assert_eq!(stats.snapshot().dropped(DropReason::SlowClient), 1);
        assert!(!fanout.gate.is_closed(&fanout.writers, Instant::now()));
    }

    #[test]
    fn the_gate_opens_after_its_longest_wait_whatever_the_writer_does() {
        let poll = Poll::new().unwrap();
        let (mut fanout, _) = fanout_with_a_reader(&poll, 0);
        let short = ClientQueue::new(1, false);
        fanout.members.push(plain_member(1, &short));
        for n in 0..3u8 {
            fanout.broadcast(Message::payload(MessageKind::Text, &[n]));
        }
        fanout.flush();
        let now = Instant::now();
        assert!(fanout.gate.is_closed(&fanout.writers, now));
        assert!(fanout.gate.is_closed(&fanout.writers, now + GATE_MAX / 2));
        assert!(!fanout.gate.is_closed(&fanout.writers, now + GATE_MAX));
    }

    /// A source delivering `1`, `2`, `3` in one drive, noting before each
    /// how many frames `queue` held.
    #[derive(Debug)]
    struct Three {
        queue: ClientQueue,
        waits: bool,
        seen: Arc<std::sync::Mutex<Vec<usize>>>,
    }

    impl Source for Three {
        fn start(&mut self) {}
        fn stop(&mut self, _why: &str) {}
        fn drive(&mut self, _: Duration, deliver: &mut dyn FnMut(Message<'_>)) -> Drive {
            for n in 1..=3u8 {
                self.seen.lock().unwrap().push(self.queue.len());
                deliver(Message::payload(MessageKind::Text, &[n]));
            }
            Drive::Idle
        }
        fn deadline(&self) -> Option<Instant> {
            None
        }
        fn waits_for_input(&self) -> bool {
            self.waits
        }
        fn take_failure(&mut self) -> bool {
            false
        }
    }

    #[test]
    fn a_source_that_waits_for_input_has_each_message_queued_as_it_comes() {
        for waits in [false, true] {
            let poll = Poll::new().unwrap();
            let (fanout, _) = fanout_with_a_reader(&poll, 0);
            let reader = fanout.members[0].queue.clone();
            let seen = Arc::default();
            let source = Three {
                queue: reader.clone(),
                waits,
                seen: Arc::clone(&seen),
            };
            let mut lobby = lobby_with(fanout, Box::new(source));
            assert!(!lobby.read_origin(Duration::from_secs(1)));
            let expected: &[usize] = if waits { &[0, 1, 2] } else { &[0, 0, 0] };
            assert_eq!(*seen.lock().unwrap(), expected, "waits_for_input: {waits}");
            assert_eq!(bytes(&reader), [1, 2, 3]);
        }
    }

    #[test]
    fn a_client_stuck_catching_up_counts_what_it_loses_as_drops_and_one_gap() {
        let poll = Poll::new().unwrap();
        let (mut fanout, stats) = fanout_with_a_reader(&poll, 0);
        for n in 0..20u8 {
            fanout.broadcast(Message::payload(MessageKind::Text, &[n]));
        }
        // Twenty frames behind, with a queue of four that is never read (its
        // writer found its socket full).
        let queue = ClientQueue::new(4, true);
        queue.set_stalled(true);
        fanout.enlist(plain_member(1, &queue), fanout.history.head() - 20);
        for n in 0..200u8 {
            fanout.broadcast(Message::payload(MessageKind::Text, &[n]));
        }
        // It got the four frames its queue holds; every other frame since is lost.
        assert_eq!(queue.len(), 4);
        let head = fanout.history.head();
        let owed = head - (head - 200 - 20);
        assert_eq!(
            queue.slow_drops(),
            owed - 4 - (head - fanout.history.oldest())
        );
        assert_eq!(stats.snapshot().frames_dropped, queue.slow_drops());
        assert_eq!(
            stats.snapshot().dropped(DropReason::SlowClient),
            queue.slow_drops()
        );
        assert_eq!(
            stats.migration_gaps.load(Relaxed),
            1,
            "one gap, not one per frame"
        );
    }

    #[test]
    fn a_caught_up_client_goes_live_only_once_its_writer_took_the_catch_up() {
        let poll = Poll::new().unwrap();
        let (mut fanout, stats) = fanout_with_a_reader(&poll, 4);
        // One message per read of the source.
        let send = |fanout: &mut Fanout, n: u8| {
            fanout.broadcast(Message::payload(MessageKind::Text, &[n]));
            fanout.flush();
        };
        for n in 0..4 {
            send(&mut fanout, n);
        }
        // A newcomer replayed four frames, its queue of four full: live
        // frames must not push them out before its writer takes them.
        let queue = ClientQueue::new(4, true);
        fanout.join_new(plain_member(1, &queue), None);
        assert_eq!(queue.len(), 4);
        send(&mut fanout, 4);
        send(&mut fanout, 5);
        let mut got = bytes(&queue);
        fanout.catch_up();
        send(&mut fanout, 6);
        assert_eq!(
            fanout.members.len(),
            1,
            "its queue still holds the catch-up"
        );
        got.extend(bytes(&queue));
        fanout.catch_up();
        assert_eq!(fanout.members.len(), 2, "live once its writer took it all");
        send(&mut fanout, 7);
        got.extend(bytes(&queue));
        assert_eq!(got, [0, 1, 2, 3, 4, 5, 6, 7], "every frame, once, in order");
        assert_eq!(stats.snapshot().frames_dropped, 0);
    }

    #[cfg(feature = "sse")]
    #[test]
    fn a_stream_resumes_from_the_history_built_before_it_came_or_is_reset() {
        let poll = Poll::new().unwrap();
        let (mut fanout, stats) = fanout_with_a_reader(&poll, 0);
        for n in 0..5u8 {
            fanout.broadcast(Message::payload(MessageKind::Text, &[b'a' + n]));
        }
        let id_of = |fanout: &Fanout, at: u64| fanout.history.get_with_id(at).unwrap().1;
        // After the second message: the third to the fifth, as events
        // (the lobby had no stream when they came: built now).
        let queue = ClientQueue::closing_when_full(16, false);
        fanout.join_new(stream_member(1, &queue), Some(id_of(&fanout, 1)));
        let want: Vec<String> = (2..5)
            .map(|at| {
                let id = sse::format_id(id_of(&fanout, at));
                format!("id: {id}\ndata: {}\n\n", char::from(b'a' + at as u8))
            })
            .collect();
        assert_eq!(texts(&queue), want);
        fanout.catch_up();
        fanout.broadcast(Message::payload(MessageKind::Text, b"f"));
        let id = sse::format_id(id_of(&fanout, 5));
        assert_eq!(texts(&queue), [format!("id: {id}\ndata: f\n\n")], "live");
        assert_eq!(stats.resumes.load(Relaxed), 1);
        // An ID it never had: it waits for it (not here), then, once the
        // lobby gives up on it, the reset event, then live.
        let other = ClientQueue::closing_when_full(16, false);
        fanout.join_new(stream_member(2, &other), Some(0xdead));
        fanout.resume_arrived();
        assert!(other.is_empty());
        let waited = fanout.waiting.remove(0);
        fanout.reset(waited.member);
        fanout.catch_up();
        fanout.broadcast(Message::payload(MessageKind::Text, b"g"));
        let got = texts(&other);
        assert!(got[0].starts_with("event: reset\n"), "{got:?}");
        assert!(got[1].ends_with("data: g\n\n"), "{got:?}");
        assert_eq!(got.len(), 2);
        assert_eq!(stats.resume_resets.load(Relaxed), 1);
    }

    #[cfg(feature = "sse")]
    #[test]
    fn a_resume_beyond_the_history_waits_for_the_source_or_is_reset_when_it_moves_first() {
        let poll = Poll::new().unwrap();
        let (mut fanout, stats) = fanout_with_a_reader(&poll, 0);
        fanout.rereadable = true;
        fanout.broadcast(x_at(7));
        // After position 4, which the history never held: it waits.
        let queue = ClientQueue::closing_when_full(16, false);
        fanout.join_new(stream_member(1, &queue), Some(id_of_x(&fanout, 4)));
        assert_eq!(fanout.waiting.len(), 1);
        assert_eq!(fanout.history.position_of(fanout.waiting[0].after), 4);
        assert!(queue.is_empty());
        // The source read 5 to 7 again: the IDs the live stream gave them.
        let member = fanout.waiting.remove(0).member;
        let again = (5..=7).map(|p| (MessageKind::Text, b"x".to_vec(), p));
        fanout.resume_from_source(member, again.collect());
        fanout.catch_up();
        fanout.broadcast(x_at(8));
        let want: Vec<String> = (5..=8)
            .map(|p| format!("id: {}\ndata: x\n\n", sse::format_id(id_of_x(&fanout, p))))
            .collect();
        assert_eq!(texts(&queue), want);
        assert_eq!(stats.resumes_from_source.load(Relaxed), 1);
        // One moved away before its source answered: the reset goes first.
        let moving = ClientQueue::closing_when_full(16, false);
        fanout.join_new(stream_member(2, &moving), Some(id_of_x(&fanout, 2)));
        fanout.reset_waiting(ClientId(2));
        assert_eq!(fanout.remove(ClientId(2)), Some(Resume::new()));
        let got = texts(&moving);
        assert!(got[0].starts_with("event: reset\n"), "{got:?}");
        assert_eq!(got.len(), 1);
        assert_eq!(stats.resume_resets.load(Relaxed), 1);
    }

    #[cfg(feature = "sse")]
    #[test]
    fn a_resume_after_a_message_not_arrived_yet_waits_for_it_then_gets_what_follows() {
        let poll = Poll::new().unwrap();
        let (mut fanout, stats) = fanout_with_a_reader(&poll, 0);
        for position in 1..=3 {
            fanout.broadcast(x_at(position));
        }
        // The client saw 5 from a lobby ahead of this one: it waits.
        let queue = ClientQueue::closing_when_full(16, false);
        fanout.join_new(stream_member(1, &queue), Some(id_of_x(&fanout, 5)));
        assert_eq!(fanout.waiting.len(), 1);
        fanout.broadcast(x_at(4));
        fanout.resume_arrived();
        assert_eq!(fanout.waiting.len(), 1, "4 is not its message");
        assert!(queue.is_empty());
        // 5 arrives: it resumes after it, with nothing before.
        fanout.broadcast(x_at(5));
        fanout.resume_arrived();
        assert!(fanout.waiting.is_empty());
        fanout.catch_up();
        fanout.broadcast(x_at(6));
        let six = format!("id: {}\ndata: x\n\n", sse::format_id(id_of_x(&fanout, 6)));
        assert_eq!(texts(&queue), [six]);
        assert_eq!(stats.resumes.load(Relaxed), 1);
        assert_eq!(stats.resume_resets.load(Relaxed), 0);
    }

    #[cfg(feature = "sse")]
    #[test]
    fn a_resume_member_gets_envelopes_beside_unchanged_plain_frames_or_a_reset() {
        let poll = Poll::new().unwrap();
        let (mut fanout, stats) = fanout_with_a_reader(&poll, 0);
        let plain = fanout.members[0].queue.clone();
        for n in 0..3u8 {
            fanout.broadcast(Message::payload(MessageKind::Text, &[b'a' + n]));
        }
        assert!(
            fanout.history.get(0).unwrap().envelope.is_none(),
            "none built"
        );
        let id_of = |fanout: &Fanout, at: u64| fanout.history.get_with_id(at).unwrap().1;
        let sealed = |queue: &ClientQueue, id| Member {
            id: ClientId(id),
            queue: queue.clone(),
            writer: 0,
            deflate: false,
            sse: false,
            envelope: true,
        };
        let payloads = |queue: &ClientQueue| -> Vec<Vec<u8>> {
            std::iter::from_fn(|| queue.pop())
                .map(|f| frame::opcode_and_payload(&f).1.to_vec())
                .collect()
        };
        // After the first message: the second and third, sealed now.
        let queue = ClientQueue::new(16, false);
        fanout.join_new(sealed(&queue, 1), Some(id_of(&fanout, 0)));
        fanout.catch_up();
        fanout.broadcast(Message::payload(MessageKind::Text, b"d"));
        let want: Vec<Vec<u8>> = (1..4)
            .map(|at| {
                format!(
                    "{:016x} {}",
                    id_of(&fanout, at),
                    char::from(b'a' + at as u8)
                )
            })
            .map(String::into_bytes)
            .collect();
        assert_eq!(payloads(&queue), want);
        assert_eq!(
            payloads(&plain),
            [b"a", b"b", b"c", b"d"],
            "the plain member's frames are as ever"
        );
        assert_eq!(stats.resumes.load(Relaxed), 1);
        // An ID it never had: the reset message, then live.
        let other = ClientQueue::new(16, false);
        fanout.join_new(sealed(&other, 2), Some(0xdead));
        let waited = fanout.waiting.remove(0);
        fanout.reset(waited.member);
        fanout.catch_up();
        fanout.broadcast(Message::payload(MessageKind::Binary, b"e"));
        let id = id_of(&fanout, 4);
        let got: Vec<_> = std::iter::from_fn(|| other.pop()).collect();
        assert_eq!(
            frame::opcode_and_payload(&got[0]),
            (frame::OP_TEXT, &b"reset"[..])
        );
        assert_eq!(
            frame::opcode_and_payload(&got[1]),
            (frame::OP_BINARY, format!("{id:016x} e").as_bytes())
        );
        assert_eq!(got.len(), 2);
        assert_eq!(stats.resume_resets.load(Relaxed), 1);
        // Both leave: no envelope is built any more.
        fanout.remove(ClientId(1));
        fanout.remove(ClientId(2));
        fanout.broadcast(Message::payload(MessageKind::Text, b"f"));
        assert!(fanout.history.get(5).unwrap().envelope.is_none());
    }

    #[cfg(feature = "sse")]
    #[test]
    fn a_resume_longer_than_a_queue_is_read_again_page_by_page_then_goes_live() {
        let poll = Poll::new().unwrap();
        let stream = Stream::default();
        let mut lobby = lobby_on(fanout_with_a_reader(&poll, 0).0, &stream);
        let stats = Arc::clone(&lobby.fanout.stats);
        deliver(&mut lobby, &stream, 100);
        // After 40, which this lobby never delivered: 60 follow, a queue
        // of 8 takes them 8 at a time.
        let queue = ClientQueue::closing_when_full(8, false);
        let after = id_of_x(&lobby.fanout, 40);
        lobby.fanout.join_new(stream_member(1, &queue), Some(after));
        let mut got = Vec::new();
        lobby.serve_waiting();
        assert_eq!(queue.len(), 8);
        assert_eq!(lobby.fanout.waiting.len(), 1, "kept out of the broadcast");
        // Its queue full: no page is read, however often the lobby looks.
        lobby.serve_waiting();
        lobby.serve_waiting();
        assert_eq!(stream.rereads.load(Relaxed), 1);
        for turn in 0.. {
            assert!(turn < 100, "never caught up");
            got.extend(positions(&lobby.fanout, &queue));
            // Live messages meanwhile go to the history, not to it.
            if turn < 3 {
                deliver(&mut lobby, &stream, 101 + turn);
            }
            lobby.serve_waiting();
            lobby.fanout.catch_up();
            if lobby.fanout.streams.len() == 1 {
                break;
            }
        }
        deliver(&mut lobby, &stream, 104);
        got.extend(positions(&lobby.fanout, &queue));
        let want: Vec<_> = (41..=104).map(Some).collect();
        assert_eq!(got, want, "every entry once, in order, then live");
        assert_eq!(stream.rereads.load(Relaxed), 8, "63 entries, 8 a page");
        assert_eq!(stats.resumes_from_source.load(Relaxed), 1);
        assert_eq!(stats.resume_resets.load(Relaxed), 0);
    }

    #[cfg(feature = "sse")]
    #[test]
    fn a_stream_resume_goes_on_from_the_history_once_a_page_reaches_it() {
        let poll = Poll::new().unwrap();
        let stream = Stream::default();
        let mut lobby = lobby_on(fanout_with_a_reader(&poll, 0).0, &stream);
        for position in 50..=100 {
            deliver(&mut lobby, &stream, position);
        }
        let queue = ClientQueue::closing_when_full(8, false);
        let after = id_of_x(&lobby.fanout, 20);
        lobby.fanout.join_new(stream_member(1, &queue), Some(after));
        let mut got = Vec::new();
        while lobby.fanout.streams.is_empty() {
            assert!(got.len() < 200, "never caught up");
            lobby.serve_waiting();
            lobby.fanout.catch_up();
            got.extend(positions(&lobby.fanout, &queue));
        }
        let want: Vec<_> = (21..=100).map(Some).collect();
        assert_eq!(got, want);
        // Pages to 28, 36, 44 and 52, which the history holds: no more.
        assert_eq!(stream.rereads.load(Relaxed), 4);
        assert_eq!(lobby.fanout.stats.resumes_from_source.load(Relaxed), 1);
    }

    #[cfg(feature = "sse")]
    #[test]
    fn a_stream_resume_beyond_its_bound_is_reset_after_what_it_was_served() {
        let poll = Poll::new().unwrap();
        let stream = Stream::default();
        let mut lobby = lobby_on(fanout_with_a_reader(&poll, 0).0, &stream);
        lobby.fanout.stream_resume_max = 16;
        deliver(&mut lobby, &stream, 100);
        let queue = ClientQueue::closing_when_full(8, false);
        let after = id_of_x(&lobby.fanout, 40);
        lobby.fanout.join_new(stream_member(1, &queue), Some(after));
        let mut got = Vec::new();
        while lobby.fanout.streams.is_empty() {
            assert!(got.len() < 100, "never live");
            lobby.serve_waiting();
            lobby.fanout.catch_up();
            got.extend(positions(&lobby.fanout, &queue));
        }
        deliver(&mut lobby, &stream, 101);
        got.extend(positions(&lobby.fanout, &queue));
        let want: Vec<_> = (41..=56).map(Some).chain([None, Some(101)]).collect();
        assert_eq!(got, want, "16 served, the reset, then live");
        assert!(!queue.is_overflowed(), "the reset waited for room");
        let stats = &lobby.fanout.stats;
        assert_eq!(stats.resume_resets.load(Relaxed), 1);
        assert_eq!(stats.resumes_from_source.load(Relaxed), 0);
    }

    #[cfg(feature = "sse")]
    #[test]
    fn rereads_are_a_few_per_turn_the_rest_wait_theirs_while_the_broadcast_goes_on() {
        let poll = Poll::new().unwrap();
        let stream = Stream::default();
        let (fanout, stats) = fanout_with_a_reader(&poll, 0);
        let live = fanout.members[0].queue.clone();
        let mut lobby = lobby_on(fanout, &stream);
        deliver(&mut lobby, &stream, 100);
        let queues: Vec<_> = (1..=10)
            .map(|n| {
                let queue = ClientQueue::closing_when_full(8, false);
                let after = id_of_x(&lobby.fanout, 80 + n);
                lobby.fanout.join_new(stream_member(n, &queue), Some(after));
                queue
            })
            .collect();
        let mut got = vec![Vec::new(); queues.len()];
        let mut position = 100;
        let mut turns = 0;
        while lobby.fanout.streams.len() < queues.len() {
            turns += 1;
            assert!(
                turns < 100,
                "never all live: {} {} {}",
                lobby.fanout.waiting.len(),
                lobby.fanout.catching_up.len(),
                lobby.fanout.streams.len()
            );
            let before = stream.rereads.load(Relaxed);
            lobby.serve_waiting();
            let read = stream.rereads.load(Relaxed) - before;
            // Four, not ten, whatever the constant says.
            assert!(read <= 4, "{read} rereads in one turn");
            if turns == 1 {
                assert_eq!(read, 4, "ten are waiting");
                assert_eq!(lobby.fanout.waiting.len(), 10, "four of them paged");
            }
            if read == REREADS_PER_TURN && !lobby.fanout.waiting.is_empty() {
                assert!(lobby.fanout.rereads_pending);
                assert!(lobby.own_deadline().unwrap() <= Instant::now(), "at once");
            }
            // The broadcast between turns.
            position += 1;
            deliver(&mut lobby, &stream, position);
            for _ in 0..2 {
                // Their writers take what they have; those at the live
                // edge go live.
                for (got, queue) in got.iter_mut().zip(&queues) {
                    got.extend(positions(&lobby.fanout, queue));
                }
                lobby.fanout.catch_up();
            }
        }
        assert!(turns >= 3, "10 clients take 3 turns at least");
        for (n, got) in (1..).zip(got) {
            let want: Vec<_> = (81 + n..=position).map(Some).collect();
            assert_eq!(got, want, "client {n}");
        }
        // The live member got every message delivered meanwhile.
        let live = std::iter::from_fn(|| live.pop()).count() as u64;
        assert_eq!(live, position - 100 + 1);
        assert_eq!(stats.resumes_from_source.load(Relaxed), 10);
        assert_eq!(stats.resume_resets.load(Relaxed), 0);
    }

    /// `frame`'s payload, inflated if it is compressed (RSV1).
    #[cfg(all(feature = "sse", feature = "compression"))]
    fn inflated(frame: &Frame) -> Vec<u8> {
        let mut input = frame::opcode_and_payload(frame).1.to_vec();
        if !frame::is_deflated(frame) {
            return input;
        }
        crate::wire::deflate::restore_tail(&mut input);
        let mut out = Vec::new();
        crate::wire::deflate::Inflater::default()
            .inflate(&input, u64::MAX, &mut |chunk, _| {
                out.extend_from_slice(chunk);
                Ok(())
            })
            .unwrap();
        out
    }

    #[cfg(all(feature = "sse", feature = "compression"))]
    #[test]
    fn a_resume_member_that_negotiated_deflate_gets_the_envelope_compressed_once() {
        let poll = Poll::new().unwrap();
        let (mut fanout, stats) = fanout_with_a_reader(&poll, 0);
        let plain = fanout.members[0].queue.clone();
        // Past `compress_min` (256), and deflate halves it.
        let long = |n: u8| format!("{{\"seq\":{n},\"pad\":\"{}\"}}", "ab".repeat(200));
        let resume = |id, deflate, queue: &ClientQueue| Member {
            id: ClientId(id),
            queue: queue.clone(),
            writer: 0,
            deflate,
            sse: false,
            envelope: true,
        };
        fanout.broadcast(Message::payload(MessageKind::Text, long(0).as_bytes()));
        let packed = ClientQueue::closing_when_full(16, false);
        let unpacked = ClientQueue::closing_when_full(16, false);
        fanout.join_new(resume(1, true, &packed), None);
        fanout.join_new(resume(2, false, &unpacked), None);
        fanout.catch_up();
        assert_eq!((fanout.deflating, fanout.sealing_deflated), (0, 1));
        fanout.broadcast(Message::payload(MessageKind::Text, long(1).as_bytes()));
        fanout.broadcast(Message::payload(MessageKind::Text, b"short"));
        let id_of = |fanout: &Fanout, at: u64| fanout.history.get_with_id(at).unwrap().1;
        let sealed = |at: u64, text: &str| format!("{:016x} {text}", id_of(&fanout, at));
        let want = [sealed(1, &long(1)), sealed(2, "short")].map(String::into_bytes);
        // The long one compressed (once: one compression for the message),
        // the short one as its plain envelope; the same envelopes for the
        // member that did not negotiate, uncompressed, and the plain frames
        // untouched (none compressed: no plain member negotiated).
        let got: Vec<Frame> = std::iter::from_fn(|| packed.pop()).collect();
        assert!(frame::is_deflated(&got[0]) && !frame::is_deflated(&got[1]));
        assert!(got[0].len() * 2 < want[0].len(), "{}", got[0].len());
        assert_eq!(got.iter().map(inflated).collect::<Vec<_>>(), want);
        let got: Vec<Frame> = std::iter::from_fn(|| unpacked.pop()).collect();
        assert!(got.iter().all(|f| !frame::is_deflated(f)));
        assert_eq!(got.iter().map(inflated).collect::<Vec<_>>(), want);
        let got: Vec<Frame> = std::iter::from_fn(|| plain.pop()).collect();
        assert!(got.iter().all(|f| !frame::is_deflated(f)));
        assert_eq!(stats.messages_deflated.load(Relaxed), 1);
        let held = fanout.history.get(1).unwrap();
        assert!(held.deflated.is_none() && held.envelope_deflated.is_some());
        // From the history: compressed where it is held so, else the plain
        // envelope (message 0 came before any resume member: built now).
        let late = ClientQueue::closing_when_full(16, false);
        let member = resume(3, true, &late);
        assert!(!frame::is_deflated(
            &form_at(&fanout.history, 0, &member).unwrap()
        ));
        fanout.join_new(member, Some(id_of(&fanout, 0)));
        let got: Vec<Frame> = std::iter::from_fn(|| late.pop()).collect();
        assert!(frame::is_deflated(&got[0]));
        assert_eq!(got.iter().map(inflated).collect::<Vec<_>>(), want);
        // The members that negotiated leave: no envelope is compressed.
        fanout.remove(ClientId(1));
        fanout.remove(ClientId(3));
        fanout.broadcast(Message::payload(MessageKind::Text, long(3).as_bytes()));
        let held = fanout.history.get(3).unwrap();
        assert!(held.envelope.is_some() && held.envelope_deflated.is_none());
        assert_eq!(stats.messages_deflated.load(Relaxed), 1);
    }
}
