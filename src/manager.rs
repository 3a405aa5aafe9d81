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

use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap},
    io::Write,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering::Relaxed},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, error, info, warn};
use mio::net::TcpStream;

use crate::{
    config::{Config, SlowClient},
    error::{Error, Result},
    frame::{self, MessageKind, close_code},
    history::Resume,
    id::{ClientId, LobbyId},
    lobby::{self, LobbyEnv, LobbyHandle, LobbyMsg, Member},
    queue::ClientQueue,
    stats::{LobbyInfo, Stats, bump, drop_one},
    writer::{Attach, WriterHandle, WriterMsg},
};

/// The manager's inbox.
#[derive(Debug)]
pub(crate) enum ManagerMsg {
    /// An upgraded client, from the acceptor (which has taken its seat).
    Admit(Admission),
    /// A writer dropped this client's connection.
    Departed(ClientId),
    /// A client sent this message, to go upstream on its lobby's origin connection.
    Forward {
        id: ClientId,
        kind: MessageKind,
        payload: Vec<u8>,
    },
    /// A lobby let a moving client go; this is where it was in the stream.
    Released { id: ClientId, resume: Resume },
    /// A lobby thread ended, whether asked to or by panic.
    LobbyEnded(LobbyId),
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
}

/// Starts the manager thread, which takes ownership of the writers. The
/// address of each client that leaves goes to `left` when clients per address
/// are limited (the acceptor counts them).
pub(crate) fn spawn(
    config: &Config,
    inbox: Receiver<ManagerMsg>,
    env: LobbyEnv,
    writers: Vec<WriterHandle>,
    left: Sender<IpAddr>,
) -> Result<JoinHandle<()>> {
    let compact_interval = (!config.compact_interval.is_zero()).then_some(config.compact_interval);
    let manager = Manager {
        inbox,
        capacity: config.lobby_capacity,
        compact_to: ((config.lobby_capacity as f64 * config.compact_fill).floor() as usize).max(1),
        compact_interval,
        next_compaction: compact_interval.map(|every| Instant::now() + every),
        max_lobbies: (config.max_origin_connections > 0).then_some(config.max_origin_connections),
        queue_depth: config.queue_depth,
        count_drops: config.slow_client == SlowClient::Disconnect,
        left: (config.max_clients_per_ip > 0).then_some(left),
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
    thread::Builder::new()
        .name("wsgate-manager".to_owned())
        .spawn(move || manager.run())
        .map_err(Error::io("spawn the manager thread"))
}

#[derive(Debug)]
struct LobbyEntry {
    handle: LobbyHandle,
    /// Clients placed here, moving ones counted where they are going.
    members: usize,
    empty_since: Option<Instant>,
    /// When the lobby started, or last received migrated clients: it is not
    /// drained again until a compaction interval has passed since.
    settled_since: Instant,
}

#[derive(Debug)]
struct ClientEntry {
    lobby: LobbyId,
    ip: IpAddr,
    queue: ClientQueue,
    writer: usize,
    /// While moving: the old lobby, asked to release it; `lobby` is the new one.
    moving_from: Option<LobbyId>,
}

#[derive(Debug)]
struct Manager {
    inbox: Receiver<ManagerMsg>,
    capacity: usize,
    /// Members per lobby that compaction packs to (capacity × fill).
    compact_to: usize,
    compact_interval: Option<Duration>,
    next_compaction: Option<Instant>,
    max_lobbies: Option<usize>,
    queue_depth: usize,
    /// Queues count their drops (for the slow-client disconnect policy).
    count_drops: bool,
    /// Where departing clients' addresses go, when they are counted.
    left: Option<Sender<IpAddr>>,
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
    /// lobbies and compaction rounds.
    fn run(mut self) {
        loop {
            let deadline = self
                .next_linger_end()
                .into_iter()
                .chain(self.next_compaction)
                .min();
            let msg = match deadline {
                Some(at) => match self
                    .inbox
                    .recv_timeout(at.saturating_duration_since(Instant::now()))
                {
                    Ok(msg) => Some(msg),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => Some(ManagerMsg::Shutdown),
                },
                None => Some(self.inbox.recv().unwrap_or(ManagerMsg::Shutdown)),
            };
            match msg {
                Some(ManagerMsg::Admit(admission)) => self.admit(admission),
                Some(ManagerMsg::Departed(id)) => self.depart(id),
                Some(ManagerMsg::Forward { id, kind, payload }) => self.forward(id, kind, payload),
                Some(ManagerMsg::Released { id, resume }) => self.released(id, resume),
                Some(ManagerMsg::LobbyEnded(id)) => self.lobby_ended(id),
                Some(ManagerMsg::Inspect(reply)) => {
                    let _ = reply.send(self.lobby_infos());
                }
                Some(ManagerMsg::Shutdown) => break,
                None => {}
            }
            let now = Instant::now();
            if self.next_compaction.is_some_and(|at| at <= now) {
                self.compact(now);
                self.next_compaction = self.compact_interval.map(|every| now + every);
            }
            self.end_lingering(now);
        }
        self.shutdown();
    }

    fn admit(&mut self, admission: Admission) {
        let Admission {
            mut stream,
            peer,
            leftover,
        } = admission;
        let id = ClientId(self.next_client);
        self.next_client += 1;
        let queue = ClientQueue::new(self.queue_depth, self.count_drops);
        let writer = self.least_loaded_writer();
        let Some(lobby) = self.join_some_lobby(id, &queue, writer) else {
            // The seat the acceptor took is given back; tell the client why.
            drop_one(&self.stats.clients);
            self.release_ip(peer.ip());
            bump(&self.stats.refused_full);
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
        };
        self.clients.insert(
            id,
            ClientEntry {
                lobby,
                ip: peer.ip(),
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
            // The lobby died under us; forget it and try another.
            self.lobby_ended(lobby);
        }
    }

    /// The fullest lobby with room (the oldest on ties).
    fn fullest_with_room(&self) -> Option<LobbyId> {
        self.lobbies
            .iter()
            .filter(|(_, l)| l.members < self.capacity)
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

    /// Sends a client's message upstream through its lobby (the new one if moving).
    fn forward(&mut self, id: ClientId, kind: MessageKind, payload: Vec<u8>) {
        let sent = self.clients.get(&id).is_some_and(|client| {
            self.lobbies
                .get(&client.lobby)
                .is_some_and(|l| l.handle.send(LobbyMsg::Forward { kind, payload }))
        });
        if !sent {
            bump(&self.stats.forward_dropped);
        }
    }

    fn release_ip(&self, ip: IpAddr) {
        if let Some(left) = &self.left {
            let _ = left.send(ip);
        }
    }

    fn depart(&mut self, id: ClientId) {
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        self.writer_load[client.writer] -= 1;
        drop_one(&self.stats.clients);
        self.release_ip(client.ip);
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

    fn shutdown(mut self) {
        info!(
            "shutting down {} lobbies and {} writers",
            self.lobbies.len(),
            self.writers.len()
        );
        for (id, entry) in std::mem::take(&mut self.lobbies) {
            entry.handle.send(LobbyMsg::Shutdown);
            self.ending.insert(id, entry.handle);
        }
        for (_, handle) in self.ending.drain() {
            handle.join();
        }
        for writer in &self.writers {
            writer.send(WriterMsg::Shutdown);
        }
        for writer in self.writers.drain(..) {
            writer.join();
        }
        self.stats.clients.store(0, Relaxed);
    }
}
