//! The manager thread: the lobby registry, client placement, compaction and
//! lobby lifecycle.
//!
//! It places each admitted client in the fullest lobby that still has room,
//! starting a lobby thread only when every lobby is full (and the origin
//! connection limit allows), hands the client's socket to the least-loaded
//! writer, learns when clients leave, ends lobbies that stayed empty for the
//! linger time, re-homes the clients of a lobby that died, and periodically
//! compacts: when the clients would fit in fewer lobbies at the configured
//! fill, it moves the members of the emptiest lobbies into the fullest ones.
//! A move is routed through here (`Release` to the old lobby, its answer,
//! `Adopt` to the new one), so a client that leaves meanwhile is never
//! adopted. It owns the lobby and writer handles and, on shutdown, stops and
//! joins them all. It never touches a socket's bytes.
//!
//! It also supervises: every other thread reports its end here
//! (`supervise.rs`). A lobby that ended unexpectedly has its clients placed
//! afresh; the acceptor's end is the gateway's shutdown; a writer that ended
//! outside a shutdown (its panics are caught in the writer) is fatal. A
//! panic in the manager itself is caught: it shuts the gateway down as
//! gracefully as it can and counts a fatal error.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap},
    io::Write,
    net::SocketAddr,
    panic::{self, AssertUnwindSafe},
    sync::{Arc, atomic::Ordering::Relaxed},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, error, info, warn};
use mio::net::TcpStream;

use crate::{
    config::{Config, SlowClient},
    error::{Error, Result},
    frame::{self, close_code},
    gateway::ShutdownHandle,
    history::Resume,
    id::{ClientId, LobbyId},
    lobby::{self, Forwarded, LobbyEnv, LobbyHandle, LobbyMsg, Member},
    queue::ClientQueue,
    seat::Seat,
    stats::{Disconnect, LobbyInfo, Stats, bump},
    supervise::ThreadKind,
    writer::{Attach, WriterHandle, WriterMsg},
};

/// Client messages waiting for the manager to route them to their lobbies;
/// more are dropped and counted (each is at most `--max-client-message` bytes).
pub(crate) const FORWARD_QUEUE: usize = 256;
/// Longest the manager sleeps with nothing scheduled (it wakes on messages).
const IDLE_WAIT: Duration = Duration::from_secs(3600);

/// The manager's inbox.
#[derive(Debug)]
pub(crate) enum ManagerMsg {
    /// An upgraded client, from the acceptor (which has taken its seat).
    Admit(Admission),
    /// A writer dropped this client's connection.
    Departed(ClientId),
    /// A lobby let a moving client go; this is where it was in the stream.
    Released { id: ClientId, resume: Resume },
    /// A thread ended, whether asked to or by panic.
    ThreadEnded { thread: ThreadKind, panicked: bool },
    /// Reply with the current lobbies, for [`GatewayHandle::lobbies`](crate::GatewayHandle::lobbies).
    Inspect(Sender<Vec<LobbyInfo>>),
    /// Stop every lobby and writer, then end.
    Shutdown,
}

/// A client that completed its upgrade.
#[derive(Debug)]
pub(crate) struct Admission {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    /// Bytes the client sent after its upgrade request.
    pub leftover: Vec<u8>,
    /// Its place in the client counts, given back when the client is dropped.
    pub seat: Seat,
}

/// A client's message for the origin, from its writer (over a bounded
/// channel apart from the inbox).
#[derive(Debug)]
pub(crate) struct ClientMessage {
    pub id: ClientId,
    pub message: Forwarded,
}

/// The channels the manager reads: its inbox and the client messages.
#[derive(Debug)]
pub(crate) struct Inboxes {
    pub inbox: Receiver<ManagerMsg>,
    pub forwards: Receiver<ClientMessage>,
    /// Kept so `forwards` never reads as closed, even with no writer left.
    pub _forwards_tx: Sender<ClientMessage>,
    /// Dropped with the manager, after its lobbies and writers have ended:
    /// runs the embedder's [`Builder::on_stop`](crate::Builder::on_stop).
    pub _on_stop: crate::gateway::OnStop,
}

/// Starts the manager thread, which takes ownership of the writers; on a
/// fatal failure it stops the gateway through `shutdown`.
pub(crate) fn spawn(
    config: &Config,
    inboxes: Inboxes,
    env: LobbyEnv,
    writers: Vec<WriterHandle>,
    shutdown: ShutdownHandle,
) -> Result<JoinHandle<()>> {
    let compact_interval = (!config.compact_interval.is_zero()).then_some(config.compact_interval);
    let manager = Manager {
        inboxes,
        shutdown,
        capacity: config.lobby_capacity,
        compact_to: ((config.lobby_capacity as f64 * config.compact_fill).floor() as usize).max(1),
        compact_interval,
        next_compaction: compact_interval.map(|every| Instant::now() + every),
        max_lobbies: (config.max_origin_connections > 0).then_some(config.max_origin_connections),
        queue_depth: config.queue_depth,
        count_drops: config.slow_client == SlowClient::Disconnect,
        linger: config.lobby_linger,
        writer_load: vec![0; writers.len()],
        writers,
        stats: Arc::clone(&env.stats),
        env,
        lobbies: BTreeMap::new(),
        ending: HashMap::new(),
        clients: HashMap::new(),
        next_client: 0,
        next_lobby: 0,
    };
    // If the thread cannot start, the manager is dropped unstarted, and its
    // drop stops the writers it was given.
    thread::Builder::new()
        .name("wsgate-manager".to_owned())
        .spawn(move || {
            let mut manager = manager;
            if panic::catch_unwind(AssertUnwindSafe(|| manager.run())).is_err() {
                bump(&manager.stats.thread_panics);
                bump(&manager.stats.fatal_errors);
                error!("the manager panicked; shutting the gateway down");
            }
            // Stops the acceptor if it still runs; the drop stops the rest.
            manager.shutdown.shutdown();
        })
        .map_err(Error::io("spawn the manager thread"))
}

#[derive(Debug)]
struct LobbyEntry {
    handle: LobbyHandle,
    /// Clients placed here, moving ones counted where they are going.
    members: usize,
    /// Its thread has ended (a message to it failed): place nobody here;
    /// its end, reported by its guard, re-homes its clients.
    is_dead: bool,
    empty_since: Option<Instant>,
    /// When the lobby started, or last received migrated clients: it is not
    /// drained again until a compaction interval has passed since.
    settled_since: Instant,
}

#[derive(Debug)]
struct ClientEntry {
    lobby: LobbyId,
    queue: ClientQueue,
    writer: usize,
    /// While moving: the old lobby, asked to release it; `lobby` is the new one.
    moving_from: Option<LobbyId>,
}

#[derive(Debug)]
struct Manager {
    inboxes: Inboxes,
    /// Stops the acceptor, hence the gateway, on a fatal failure.
    shutdown: ShutdownHandle,
    capacity: usize,
    /// Members per lobby that compaction packs to (capacity × fill).
    compact_to: usize,
    compact_interval: Option<Duration>,
    next_compaction: Option<Instant>,
    max_lobbies: Option<usize>,
    queue_depth: usize,
    /// Queues count their drops (for the slow-client disconnect policy).
    count_drops: bool,
    linger: Duration,
    env: LobbyEnv,
    stats: Arc<Stats>,
    lobbies: BTreeMap<LobbyId, LobbyEntry>,
    /// Lobbies told to shut down, joined when they report their end.
    ending: HashMap<LobbyId, LobbyHandle>,
    clients: HashMap<ClientId, ClientEntry>,
    writers: Vec<WriterHandle>,
    writer_load: Vec<usize>,
    next_client: u64,
    next_lobby: u32,
}

impl Manager {
    /// The main loop: one message at a time, with timeouts for lingering
    /// lobbies and compaction rounds, until the gateway shuts down (the
    /// thread's closure then drops the manager, which stops everything).
    fn run(&mut self) {
        loop {
            let deadline = self
                .next_linger_end()
                .into_iter()
                .chain(self.next_compaction)
                .min();
            let timeout =
                deadline.map_or(IDLE_WAIT, |at| at.saturating_duration_since(Instant::now()));
            let msg = select! {
                recv(self.inboxes.inbox) -> msg => Some(msg.unwrap_or(ManagerMsg::Shutdown)),
                recv(self.inboxes.forwards) -> message => {
                    if let Ok(message) = message {
                        self.forward(message);
                    }
                    None
                }
                default(timeout) => None,
            };
            #[cfg(feature = "fault-injection")]
            self.stats.faults.check(crate::fault::Fault::Manager);
            match msg {
                Some(ManagerMsg::Admit(admission)) => self.admit(admission),
                Some(ManagerMsg::Departed(id)) => self.depart(id),
                Some(ManagerMsg::Released { id, resume }) => self.released(id, resume),
                Some(ManagerMsg::ThreadEnded { thread, panicked })
                    if !self.thread_ended(thread, panicked) =>
                {
                    return;
                }
                Some(ManagerMsg::ThreadEnded { .. }) => {}
                Some(ManagerMsg::Inspect(reply)) => {
                    let _ = reply.send(self.lobby_infos());
                }
                Some(ManagerMsg::Shutdown) => return,
                None => {}
            }
            let now = Instant::now();
            if self.next_compaction.is_some_and(|at| at <= now) {
                self.compact(now);
                self.next_compaction = self.compact_interval.map(|every| now + every);
            }
            self.end_lingering(now);
        }
    }

    /// Reacts to a thread's end; false if the gateway must shut down.
    fn thread_ended(&mut self, thread: ThreadKind, panicked: bool) -> bool {
        match thread {
            ThreadKind::Lobby(id) => {
                self.lobby_ended(id);
                true
            }
            // Its normal end is the gateway's shutdown.
            ThreadKind::Acceptor if !panicked => false,
            ThreadKind::Acceptor | ThreadKind::Writer(_) => {
                bump(&self.stats.fatal_errors);
                error!("{thread} ended; shutting the gateway down");
                false
            }
        }
    }

    fn admit(&mut self, admission: Admission) {
        let Admission {
            mut stream,
            peer,
            leftover,
            seat,
        } = admission;
        let id = ClientId(self.next_client);
        self.next_client += 1;
        let queue = ClientQueue::new(self.queue_depth, self.count_drops);
        let writer = self.least_loaded_writer();
        let Some(lobby) = self.join_some_lobby(id, &queue, writer) else {
            // Its seat is given back as it drops here; tell the client why.
            bump(&self.stats.refused_full);
            self.stats.disconnected(Disconnect::NoRoom);
            debug!("{id} from {peer} refused: no lobby with room");
            let close = frame::encode_close(close_code::TRY_AGAIN_LATER, "no lobby with room");
            let _ = stream.write(&close);
            return;
        };
        let attach = Attach {
            id,
            stream,
            queue: queue.clone(),
            leftover,
            seat,
        };
        self.clients.insert(
            id,
            ClientEntry {
                lobby,
                queue,
                writer,
                moving_from: None,
            },
        );
        self.writer_load[writer] += 1;
        bump(&self.stats.clients_accepted);
        debug!("{id} from {peer} placed in {lobby}");
        if !self.writers[writer].send(WriterMsg::Attach(attach)) {
            error!("writer {writer} has ended; dropping {id}");
            self.stats.disconnected(Disconnect::InternalError);
            self.depart(id);
        }
    }

    /// Puts a new client in the fullest lobby with room, starting one if
    /// needed and allowed.
    fn join_some_lobby(
        &mut self,
        id: ClientId,
        queue: &ClientQueue,
        writer: usize,
    ) -> Option<LobbyId> {
        loop {
            let lobby = match self.fullest_with_room() {
                Some(lobby) => lobby,
                None => self.start_lobby()?,
            };
            let member = Member {
                id,
                queue: queue.clone(),
                writer,
            };
            let entry = self.lobbies.get_mut(&lobby)?;
            if entry.handle.send(LobbyMsg::Join(member)) {
                entry.members += 1;
                entry.empty_since = None;
                return Some(lobby);
            }
            // Its thread has ended. Its guard's report re-homes its clients
            // later; handling that here would place this client twice.
            entry.is_dead = true;
        }
    }

    /// The fullest live lobby with room (the oldest on ties).
    fn fullest_with_room(&self) -> Option<LobbyId> {
        self.lobbies
            .iter()
            .filter(|(_, l)| l.members < self.capacity && !l.is_dead)
            .max_by_key(|(id, l)| (l.members, Reverse(**id)))
            .map(|(id, _)| *id)
    }

    fn start_lobby(&mut self) -> Option<LobbyId> {
        if self
            .max_lobbies
            .is_some_and(|max| self.lobbies.len() >= max)
        {
            return None;
        }
        let id = LobbyId(self.next_lobby);
        self.next_lobby = self.next_lobby.wrapping_add(1);
        match lobby::spawn(id, &self.env) {
            Ok(handle) => {
                self.lobbies.insert(
                    id,
                    LobbyEntry {
                        handle,
                        members: 0,
                        is_dead: false,
                        empty_since: None,
                        settled_since: Instant::now(),
                    },
                );
                Some(id)
            }
            Err(e) => {
                error!("{e}");
                None
            }
        }
    }

    /// If the clients fit in fewer lobbies at the compaction fill, moves the
    /// members of the emptiest settled lobbies into the fullest ones with room.
    fn compact(&mut self, now: Instant) {
        let Some(interval) = self.compact_interval else {
            return;
        };
        let total: usize = self.lobbies.values().map(|l| l.members).sum();
        let needed = total.div_ceil(self.compact_to);
        let mut occupied: Vec<(LobbyId, usize)> = self
            .lobbies
            .iter()
            .filter(|(_, l)| l.members > 0)
            .map(|(id, l)| (*id, l.members))
            .collect();
        if occupied.len() <= needed {
            return;
        }
        occupied.sort_by_key(|&(id, members)| (Reverse(members), id));
        let targets: Vec<LobbyId> = occupied[..needed].iter().map(|(id, _)| *id).collect();
        let sources: Vec<LobbyId> = occupied[needed..]
            .iter()
            .rev()
            .map(|(id, _)| *id)
            .filter(|id| {
                self.lobbies
                    .get(id)
                    .is_some_and(|l| now.duration_since(l.settled_since) >= interval)
            })
            .collect();
        let mut moved = 0;
        'sources: for source in sources {
            let movers: Vec<ClientId> = self
                .clients
                .iter()
                .filter(|(_, c)| c.lobby == source && c.moving_from.is_none())
                .map(|(id, _)| *id)
                .collect();
            for id in movers {
                let target = targets
                    .iter()
                    .filter_map(|t| self.lobbies.get(t).map(|l| (*t, l.members)))
                    .filter(|&(_, members)| members < self.compact_to)
                    .max_by_key(|&(t, members)| (members, Reverse(t)))
                    .map(|(t, _)| t);
                let Some(target) = target else {
                    break 'sources;
                };
                self.start_move(id, source, target, now);
                moved += 1;
            }
        }
        if moved > 0 {
            info!("compacting: moving {moved} clients into {needed} lobbies");
        }
    }

    /// Asks `source` to release `id`, which will be adopted by `target`.
    fn start_move(&mut self, id: ClientId, source: LobbyId, target: LobbyId, now: Instant) {
        let (Some(client), Some(from)) = (self.clients.get_mut(&id), self.lobbies.get_mut(&source))
        else {
            return;
        };
        if !from.handle.send(LobbyMsg::Release(id)) {
            return;
        }
        from.members -= 1;
        if from.members == 0 {
            from.empty_since = Some(now);
        }
        client.lobby = target;
        client.moving_from = Some(source);
        if let Some(to) = self.lobbies.get_mut(&target) {
            to.members += 1;
            to.empty_since = None;
            to.settled_since = now;
        }
    }

    /// The old lobby let `id` go: hand it to its new lobby with its position.
    fn released(&mut self, id: ClientId, resume: Resume) {
        let Some(client) = self.clients.get_mut(&id) else {
            return; // It left meanwhile.
        };
        if client.moving_from.take().is_none() {
            return;
        }
        let member = Member {
            id,
            queue: client.queue.clone(),
            writer: client.writer,
        };
        let target = client.lobby;
        let adopted = self
            .lobbies
            .get(&target)
            .is_some_and(|l| l.handle.send(LobbyMsg::Adopt { member, resume }));
        if adopted {
            bump(&self.stats.migrations);
            debug!("{id} moved to {target}");
            return;
        }
        // The new lobby is gone: place the client afresh.
        if let Some(entry) = self.lobbies.get_mut(&target) {
            entry.members -= 1;
        }
        self.rehome(id);
    }

    /// Puts an existing client in some lobby (its own died or vanished).
    fn rehome(&mut self, id: ClientId) {
        let Some(client) = self.clients.get(&id) else {
            return;
        };
        let (queue, writer) = (client.queue.clone(), client.writer);
        match self.join_some_lobby(id, &queue, writer) {
            Some(lobby) => {
                if let Some(client) = self.clients.get_mut(&id) {
                    client.lobby = lobby;
                    client.moving_from = None;
                }
            }
            // The client stays connected with nothing to receive until it leaves.
            None => error!("no lobby for {id}"),
        }
    }

    fn lobby_infos(&self) -> Vec<LobbyInfo> {
        let now = self.stats.epoch.millis();
        self.lobbies
            .iter()
            .map(|(id, l)| {
                let counters = l.handle.counters();
                let last = counters.last_message.load(Relaxed);
                let since = counters.origin_since.load(Relaxed);
                LobbyInfo {
                    id: id.0,
                    clients: l.members,
                    origin: l.handle.origin_state(),
                    origin_since: Duration::from_millis(now.saturating_sub(since)),
                    messages_in: counters.messages_in.load(Relaxed),
                    frames_out: counters.frames_out.load(Relaxed),
                    frames_dropped: counters.frames_dropped.load(Relaxed),
                    last_message_age: (last > 0)
                        .then(|| Duration::from_millis(now.saturating_sub(last - 1))),
                }
            })
            .collect()
    }

    fn least_loaded_writer(&self) -> usize {
        (0..self.writer_load.len())
            .min_by_key(|&w| self.writer_load[w])
            .unwrap_or(0)
    }

    /// Sends a client's message upstream through its lobby (the new one if
    /// moving), unless that lobby is backed up.
    fn forward(&mut self, message: ClientMessage) {
        let sent = self.clients.get(&message.id).is_some_and(|client| {
            self.lobbies
                .get(&client.lobby)
                .is_some_and(|l| l.handle.forward(message.message))
        });
        if !sent {
            bump(&self.stats.forward_dropped);
        }
    }

    fn depart(&mut self, id: ClientId) {
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        self.writer_load[client.writer] -= 1;
        if let Some(lobby) = self.lobbies.get_mut(&client.lobby) {
            // A moving client is not in its new lobby yet; its old one lets it go.
            if client.moving_from.is_none() {
                lobby.handle.send(LobbyMsg::Leave(id));
            }
            lobby.members -= 1;
            if lobby.members == 0 {
                lobby.empty_since = Some(Instant::now());
            }
        }
    }

    fn next_linger_end(&self) -> Option<Instant> {
        self.lobbies
            .values()
            .filter_map(|l| l.empty_since)
            .min()
            .map(|since| since + self.linger)
    }

    fn end_lingering(&mut self, now: Instant) {
        let expired: Vec<LobbyId> = self
            .lobbies
            .iter()
            .filter(|(_, l)| {
                l.empty_since
                    .is_some_and(|since| since + self.linger <= now)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(entry) = self.lobbies.remove(&id) {
                debug!("{id} stayed empty for {:?}; ending it", self.linger);
                entry.handle.send(LobbyMsg::Shutdown);
                self.ending.insert(id, entry.handle);
            }
        }
    }

    fn lobby_ended(&mut self, id: LobbyId) {
        if let Some(handle) = self.ending.remove(&id) {
            handle.join();
            return;
        }
        let Some(entry) = self.lobbies.remove(&id) else {
            return;
        };
        warn!(
            "{id} ended unexpectedly; moving its {} clients",
            entry.members
        );
        entry.handle.join();
        // Its clients, and those it was asked to release but never did.
        let orphans: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.lobby == id || c.moving_from == Some(id))
            .map(|(cid, _)| *cid)
            .collect();
        for cid in orphans {
            if let Some(client) = self.clients.get(&cid) {
                if client.lobby != id {
                    // Moving out of the dead lobby: its new lobby takes it as is.
                    self.released(cid, Resume::new());
                    continue;
                }
            }
            self.rehome(cid);
        }
    }

    /// Stops every lobby and writer and waits for them: lobbies stop
    /// fanning out at once (each then finishes its origin's close handshake,
    /// within a second), while writers drain their clients (within the drain
    /// timeout), so the two waits overlap. Runs once, when the manager drops.
    fn stop_all(&mut self) {
        if self.lobbies.is_empty() && self.ending.is_empty() && self.writers.is_empty() {
            return;
        }
        info!(
            "shutting down {} lobbies and {} writers",
            self.lobbies.len(),
            self.writers.len()
        );
        for (id, entry) in std::mem::take(&mut self.lobbies) {
            entry.handle.send(LobbyMsg::Shutdown);
            self.ending.insert(id, entry.handle);
        }
        for writer in &self.writers {
            writer.send(WriterMsg::Shutdown);
        }
        for (_, handle) in self.ending.drain() {
            handle.join();
        }
        for writer in self.writers.drain(..) {
            writer.join();
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop_all();
    }
}
