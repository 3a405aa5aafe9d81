//! A lobby thread: one origin connection fanned out to up to `capacity` clients.
//!
//! For each origin message the lobby encodes the server frame once and pushes
//! the shared bytes into every member's drop-oldest queue, then wakes each
//! writer that owns a member, once. It never touches a client socket and never
//! waits on a queue. It keeps its origin link while it has members and closes
//! it when the last one leaves; the manager decides when an empty lobby ends
//! (`manager.rs`). Origin connection mechanics live in `origin.rs`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering::Relaxed},
    },
    thread::{self, JoinHandle},
    time::Instant,
};

use crossbeam_channel::{Receiver, Sender, TryRecvError, unbounded};
use log::{error, info, trace, warn};
use mio::{Events, Poll, Token, Waker};

use crate::{
    config::OriginLoss,
    error::{Error, Result},
    frame::{self, MessageKind, close_code},
    id::{ClientId, LobbyId},
    manager::ManagerMsg,
    origin::{Drive, OriginLink, OriginTarget},
    queue::{ClientQueue, Pushed},
    stats::{OriginState, Stats},
    writer::WriterWake,
};

const WAKER: Token = Token(0);
const ORIGIN: Token = Token(1);

/// A lobby's inbox.
#[derive(Debug)]
pub(crate) enum LobbyMsg {
    /// Start delivering to this client.
    Join(Member),
    /// Stop delivering to this client.
    Leave(ClientId),
    /// Close the origin connection and end the thread.
    Shutdown,
}

/// A client as its lobby sees it: where to push frames and which writer to wake.
#[derive(Debug)]
pub(crate) struct Member {
    pub id: ClientId,
    pub queue: ClientQueue,
    pub writer: usize,
}

/// The manager's handle on a lobby thread.
#[derive(Debug)]
pub(crate) struct LobbyHandle {
    tx: Sender<LobbyMsg>,
    waker: Waker,
    origin: Arc<AtomicU8>,
    thread: JoinHandle<()>,
}

impl LobbyHandle {
    /// Sends `msg` and wakes the lobby. False if the lobby has ended.
    pub(crate) fn send(&self, msg: LobbyMsg) -> bool {
        let sent = self.tx.send(msg).is_ok();
        if let Err(e) = self.waker.wake() {
            error!("cannot wake lobby: {e}");
        }
        sent
    }

    /// Where the lobby's origin connection stands.
    pub(crate) fn origin_state(&self) -> OriginState {
        OriginState::from_u8(self.origin.load(Relaxed))
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
    pub target: Arc<OriginTarget>,
    pub writers: Arc<[Arc<WriterWake>]>,
    pub stats: Arc<Stats>,
    pub manager: Sender<ManagerMsg>,
    pub on_origin_loss: OriginLoss,
}

/// Starts a lobby thread.
pub(crate) fn spawn(id: LobbyId, env: &LobbyEnv) -> Result<LobbyHandle> {
    let poll = Poll::new().map_err(Error::io("create a lobby poll"))?;
    let waker = Waker::new(poll.registry(), WAKER).map_err(Error::io("create a lobby waker"))?;
    let registry = poll
        .registry()
        .try_clone()
        .map_err(Error::io("clone a poll registry"))?;
    let (tx, inbox) = unbounded();
    let published = Arc::new(AtomicU8::new(OriginState::Idle as u8));
    let origin = OriginLink::new(
        id,
        Arc::clone(&env.target),
        registry,
        ORIGIN,
        Arc::clone(&published),
        Arc::clone(&env.stats),
    );
    let lobby = Lobby {
        id,
        poll,
        inbox,
        members: Vec::new(),
        origin,
        writers: Arc::clone(&env.writers),
        touched: vec![false; env.writers.len()],
        stats: Arc::clone(&env.stats),
        on_origin_loss: env.on_origin_loss,
    };
    let guard = EndGuard {
        id,
        manager: env.manager.clone(),
        stats: Arc::clone(&env.stats),
    };
    env.stats.lobbies.fetch_add(1, Relaxed);
    let thread = thread::Builder::new()
        .name(format!("wsgate-lobby-{}", id.0))
        .spawn(move || {
            let _guard = guard;
            lobby.run();
        });
    match thread {
        Ok(thread) => Ok(LobbyHandle {
            tx,
            waker,
            origin: published,
            thread,
        }),
        // The guard went down with the closure and undid the count.
        Err(e) => Err(Error::Io {
            what: "spawn a lobby thread",
            source: e,
        }),
    }
}

/// Tells the manager the lobby ended, however it ended (a panic included).
#[derive(Debug)]
struct EndGuard {
    id: LobbyId,
    manager: Sender<ManagerMsg>,
    stats: Arc<Stats>,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.stats.lobbies.fetch_sub(1, Relaxed);
        let _ = self.manager.send(ManagerMsg::LobbyEnded(self.id));
    }
}

#[derive(Debug)]
struct Lobby {
    id: LobbyId,
    poll: Poll,
    inbox: Receiver<LobbyMsg>,
    members: Vec<Member>,
    origin: OriginLink,
    writers: Arc<[Arc<WriterWake>]>,
    /// Per writer: owns a member that got the current frame.
    touched: Vec<bool>,
    stats: Arc<Stats>,
    on_origin_loss: OriginLoss,
}

impl Lobby {
    /// The main loop: wait for the origin, the inbox or a deadline; react.
    fn run(mut self) {
        info!("{} up", self.id);
        let mut events = Events::with_capacity(16);
        let mut more = false;
        let mut is_ending = false;
        loop {
            let timeout = if more {
                Some(std::time::Duration::ZERO)
            } else {
                self.origin
                    .deadline()
                    .map(|at| at.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    error!("{}: poll failed: {e}", self.id);
                    break;
                }
            }
            if !is_ending && !self.take_messages() {
                // Finish the origin's close handshake before the thread ends.
                is_ending = true;
                self.origin.stop("lobby ending");
            }
            let Lobby {
                origin,
                members,
                writers,
                touched,
                stats,
                ..
            } = &mut self;
            more = origin.drive(&mut |kind, payload| {
                fan_out(members, writers, touched, stats, kind, payload);
            }) == Drive::More;
            if self.origin.take_failure() && self.on_origin_loss == OriginLoss::Close {
                self.close_members();
            }
            if is_ending && !self.origin.is_closing() {
                break;
            }
        }
        info!("{} down", self.id);
    }

    /// With `--on-origin-loss close`: close every member with 1012 so it
    /// reconnects, perhaps to another gateway. The close frame goes through
    /// each member's queue, after what it already holds.
    fn close_members(&mut self) {
        if self.members.is_empty() {
            return;
        }
        warn!(
            "{}: origin lost; closing its {} clients with 1012",
            self.id,
            self.members.len()
        );
        let close = frame::encode_close(close_code::SERVICE_RESTART, "origin connection lost");
        for member in self.members.drain(..) {
            member.queue.push(close.clone());
            self.touched[member.writer] = true;
        }
        for (writer, touched) in self.writers.iter().zip(self.touched.iter_mut()) {
            if std::mem::take(touched) {
                writer.notify();
            }
        }
        self.origin.stop("no clients");
    }

    /// Applies inbox messages. False when the lobby must end.
    fn take_messages(&mut self) -> bool {
        loop {
            match self.inbox.try_recv() {
                Ok(LobbyMsg::Join(member)) => {
                    trace!("{}: {} joined", self.id, member.id);
                    self.members.push(member);
                    self.origin.start();
                }
                Ok(LobbyMsg::Leave(id)) => {
                    if let Some(at) = self.members.iter().position(|m| m.id == id) {
                        self.members.swap_remove(at);
                        trace!("{}: {id} left", self.id);
                    }
                    if self.members.is_empty() {
                        self.origin.stop("no clients");
                    }
                }
                Ok(LobbyMsg::Shutdown) | Err(TryRecvError::Disconnected) => return false,
                Err(TryRecvError::Empty) => return true,
            }
        }
    }
}

/// Encodes one origin message once and queues it for every member.
fn fan_out(
    members: &[Member],
    writers: &[Arc<WriterWake>],
    touched: &mut [bool],
    stats: &Stats,
    kind: MessageKind,
    payload: &[u8],
) {
    stats.messages_in.fetch_add(1, Relaxed);
    if members.is_empty() {
        return;
    }
    let frame = frame::encode(kind.opcode(), payload);
    let mut dropped = 0;
    for member in members {
        if member.queue.push(frame.clone()) == Pushed::DroppedOldest {
            dropped += 1;
        }
        touched[member.writer] = true;
    }
    for (writer, touched) in writers.iter().zip(touched.iter_mut()) {
        if std::mem::take(touched) {
            writer.notify();
        }
    }
    if dropped > 0 {
        stats.frames_dropped.fetch_add(dropped, Relaxed);
    }
}
