//! The in-process source: an embedding program publishes its own messages.
//!
//! [`Publisher::publish_text`] and [`Publisher::publish_binary`] run on the
//! embedder's threads (any number of them: a publisher is cheap to clone).
//! Each message is encoded into one server frame, once, and the same shared
//! frame, with the next sequence number, goes to every lobby that has
//! clients: into that lobby's bounded queue, then a wake of its thread.
//! Nothing is copied per lobby or per client, and publishing never waits: a
//! lobby whose queue is full (it fell [`LOBBY_QUEUE`] messages behind) loses
//! its oldest queued message, counted in `origin_gaps` and logged by the
//! lobby. Sequence numbers are exact positions, so clients move between
//! lobbies without a gap or a duplicate.
//!
//! [`PublisherSource`] is the lobby side, run by the lobby thread: it
//! subscribes to the [`Hub`] when the lobby gets its first client and
//! unsubscribes when the last one leaves. The hub's list of subscribed
//! lobbies sits behind a mutex, held only to number a message and hand it to
//! each queue (no I/O but the wake-ups, which never block), so every lobby
//! sees the messages in one order. This file knows nothing of clients.

use std::{
    fmt,
    sync::{
        Arc, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError, bounded};
use log::{error, info, warn};
use mio::Waker;

use crate::{
    id::LobbyId,
    source::contract::{Body, Drive, LobbyContext, Message, Source, position, publish_state},
    stats::{OriginState, Stats, bump, drop_one},
    wire::frame::{self, Frame, OP_BINARY, OP_TEXT},
};

/// Messages a lobby may fall behind its publisher before it loses the
/// oldest: a lobby's queue holds this many shared frames (pointers; 8 KiB).
/// A lobby drains it far faster than clients read, whose own queues are
/// the bound that matters.
pub(crate) const LOBBY_QUEUE: usize = 256;
/// Messages a lobby takes from its queue per drive, so its inbox is served
/// between bursts.
const READS_PER_DRIVE: usize = 256;

/// Feeds a gateway's lobbies from this program: the in-process source.
///
/// Get one from [`Builder::publisher`](crate::Builder::publisher) before
/// starting the gateway. Cloning is cheap and every clone feeds the same
/// gateway. A message published while no client is connected (or before
/// the gateway starts, or after it stops) reaches nobody.
///
/// ```
/// use wsgate::{Config, Gateway};
///
/// let mut config = Config::default();
/// config.listen = "127.0.0.1:0".parse().unwrap();
/// let mut builder = Gateway::builder(config);
/// let publisher = builder.publisher();
/// let gateway = builder.start()?;
/// publisher.publish_text(r#"{"price":42}"#);
/// publisher.publish_binary(vec![1, 2, 3]);
/// # drop(gateway);
/// # Ok::<(), wsgate::Error>(())
/// ```
#[derive(Clone)]
pub struct Publisher {
    hub: Arc<Hub>,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("lobbies", &self.hub.lock().lobbies.len())
            .finish()
    }
}

impl Publisher {
    /// A publisher for a gateway not started yet.
    pub(crate) fn new() -> Publisher {
        Publisher {
            hub: Arc::new(Hub::default()),
        }
    }

    /// The hub the gateway's lobbies subscribe to.
    pub(crate) fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Sends a text message to every client. The text is taken by value and
    /// encoded once; every client shares that one frame. Never blocks.
    pub fn publish_text(&self, text: impl Into<String>) {
        self.publish(OP_TEXT, text.into().as_bytes());
    }

    /// Sends a binary message to every client. The bytes are taken by value
    /// and encoded once; every client shares that one frame. Never blocks.
    pub fn publish_binary(&self, bytes: impl Into<Vec<u8>>) {
        self.publish(OP_BINARY, &bytes.into());
    }

    fn publish(&self, opcode: u8, payload: &[u8]) {
        let Some(stats) = self.hub.stats.get() else {
            return; // not started: no lobby to feed
        };
        let frame = frame::encode_stamped(opcode, payload, stats.epoch.micros());
        let mut state = self.hub.lock();
        let seq = state.next;
        state.next += 1;
        for lobby in &state.lobbies {
            lobby.push((frame.clone(), seq));
        }
    }
}

/// What every lobby's publisher source shares: the lobbies that have
/// clients, and the sequence numbers.
#[derive(Default)]
pub(crate) struct Hub {
    state: Mutex<HubState>,
    /// The gateway's counters, once it has started (frames are stamped on
    /// its clock).
    stats: OnceLock<Arc<Stats>>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Hub {
    /// Ties the hub to the gateway that starts with it.
    pub(crate) fn attach(&self, stats: &Arc<Stats>) {
        let _ = self.stats.set(Arc::clone(stats));
    }

    /// The state; a publisher that panicked while holding the lock left it
    /// consistent (every step under it is a push or a wake), so a poisoned
    /// lock is taken as it is.
    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Debug, Default)]
struct HubState {
    /// The next message's sequence number.
    next: u64,
    lobbies: Vec<Subscribed>,
}

/// A lobby with clients, as the publishers see it.
#[derive(Debug)]
struct Subscribed {
    lobby: LobbyId,
    tx: Sender<(Frame, u64)>,
    /// To drop the oldest message when the queue is full.
    rx: Receiver<(Frame, u64)>,
    /// Messages dropped since the lobby last looked.
    skipped: Arc<AtomicU64>,
    waker: Arc<Waker>,
}

impl Subscribed {
    /// Queues a message for the lobby, dropping its oldest if it is that
    /// far behind, and wakes it. Never blocks.
    fn push(&self, mut message: (Frame, u64)) {
        loop {
            match self.tx.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) => {
                    message = back;
                    if self.rx.try_recv().is_ok() {
                        self.skipped.fetch_add(1, Relaxed);
                    }
                }
                // Unreachable while we hold `rx`.
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
        if let Err(e) = self.waker.wake() {
            error!("cannot wake {}: {e}", self.lobby);
        }
    }
}

/// A lobby's end of the publisher: its queue, while it has clients.
pub(crate) struct PublisherSource {
    hub: Arc<Hub>,
    lobby: LobbyContext,
    /// The queue, while subscribed.
    queue: Option<Receiver<(Frame, u64)>>,
    skipped: Arc<AtomicU64>,
}

impl fmt::Debug for PublisherSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublisherSource")
            .field("lobby", &self.lobby.lobby)
            .field("subscribed", &self.queue.is_some())
            .finish_non_exhaustive()
    }
}

impl PublisherSource {
    /// The source for one lobby; it subscribes on [`Source::start`].
    pub(crate) fn new(hub: Arc<Hub>, lobby: LobbyContext) -> PublisherSource {
        PublisherSource {
            hub,
            lobby,
            queue: None,
            skipped: Arc::default(),
        }
    }

    fn publish(&self, state: OriginState) {
        publish_state(&self.lobby.published, &self.lobby.stats, state);
    }
}

impl Source for PublisherSource {
    fn start(&mut self) {
        if self.queue.is_some() {
            return;
        }
        let (tx, rx) = bounded(LOBBY_QUEUE);
        let stats = &self.lobby.stats;
        bump(&stats.origin_connect_attempts);
        bump(&stats.origin_connected);
        stats.origin_connections.fetch_add(1, Relaxed);
        self.hub.lock().lobbies.push(Subscribed {
            lobby: self.lobby.lobby,
            tx,
            rx: rx.clone(),
            skipped: Arc::clone(&self.skipped),
            waker: Arc::clone(&self.lobby.waker),
        });
        self.queue = Some(rx);
        info!("{}: subscribed to the publisher", self.lobby.lobby);
        self.publish(OriginState::Up);
    }

    fn stop(&mut self, why: &str) {
        if self.queue.take().is_none() {
            return;
        }
        let id = self.lobby.lobby;
        self.hub.lock().lobbies.retain(|l| l.lobby != id);
        drop_one(&self.lobby.stats.origin_connections);
        info!("{id}: unsubscribed from the publisher ({why})");
        self.publish(OriginState::Idle);
    }

    /// Never blocks: publishers wake the lobby.
    fn drive(&mut self, _budget: Duration, deliver: &mut dyn FnMut(Message<'_>)) -> Drive {
        let Some(queue) = &self.queue else {
            return Drive::Idle;
        };
        let mut drive = Drive::More;
        for _ in 0..READS_PER_DRIVE {
            match queue.try_recv() {
                Ok((frame, seq)) => deliver(Message {
                    body: Body::Frame(&frame),
                    position: Some(position(seq, 0)),
                }),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => {
                    drive = Drive::Idle;
                    break;
                }
            }
        }
        let skipped = self.skipped.swap(0, Relaxed);
        if skipped > 0 {
            self.lobby.stats.origin_gaps.fetch_add(skipped, Relaxed);
            warn!(
                "{}: fell behind the publisher; its clients miss {skipped} messages",
                self.lobby.lobby
            );
        }
        drive
    }

    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// A publisher never fails: a lobby that fell behind lost messages
    /// (counted), not its source.
    fn take_failure(&mut self) -> bool {
        false
    }
}

impl Drop for PublisherSource {
    fn drop(&mut self) {
        self.stop("lobby ending");
    }
}
