//! The manager thread: the lobby registry, client placement and lobby lifecycle.
//!
//! It places each admitted client in the fullest lobby that still has room,
//! starting a lobby thread only when every lobby is full, hands the client's
//! socket to the least-loaded writer, learns when clients leave, ends lobbies
//! that stayed empty for the linger time, and re-homes the clients of a lobby
//! that died. It owns the lobby and writer handles and, on shutdown, stops and
//! joins them all. It never touches a socket's bytes: upgrades happen in
//! `acceptor.rs`, delivery in `lobby.rs` and `writer.rs`.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, HashMap},
    io::Write,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering::Relaxed},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, error, info, warn};
use mio::net::TcpStream;

use crate::{
    config::Config,
    error::{Error, Result},
    frame::{self, close_code},
    id::{ClientId, LobbyId},
    lobby::{self, LobbyEnv, LobbyHandle, LobbyMsg, Member},
    queue::ClientQueue,
    stats::{LobbyInfo, Stats, bump, drop_one},
    writer::{Attach, WriterHandle, WriterMsg},
};

/// The manager's inbox.
#[derive(Debug)]
pub(crate) enum ManagerMsg {
    /// An upgraded client, from the acceptor.
    Admit(Admission),
    /// A writer dropped this client's connection.
    Departed(ClientId),
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

/// Starts the manager thread, which takes ownership of the writers.
pub(crate) fn spawn(
    config: &Config,
    inbox: Receiver<ManagerMsg>,
    env: LobbyEnv,
    writers: Vec<WriterHandle>,
) -> Result<JoinHandle<()>> {
    let manager = Manager {
        inbox,
        capacity: config.lobby_capacity,
        queue_depth: config.queue_depth,
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
    members: usize,
    empty_since: Option<Instant>,
}

#[derive(Debug)]
struct ClientEntry {
    lobby: LobbyId,
    queue: ClientQueue,
    writer: usize,
}

#[derive(Debug)]
struct Manager {
    inbox: Receiver<ManagerMsg>,
    capacity: usize,
    queue_depth: usize,
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
    /// The main loop: one message at a time, with a timeout for lingering lobbies.
    fn run(mut self) {
        loop {
            let msg = match self.next_linger_end() {
                Some(at) => {
                    match self
                        .inbox
                        .recv_timeout(at.saturating_duration_since(Instant::now()))
                    {
                        Ok(msg) => Some(msg),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => Some(ManagerMsg::Shutdown),
                    }
                }
                None => Some(self.inbox.recv().unwrap_or(ManagerMsg::Shutdown)),
            };
            match msg {
                Some(ManagerMsg::Admit(admission)) => self.admit(admission),
                Some(ManagerMsg::Departed(id)) => self.depart(id),
                Some(ManagerMsg::LobbyEnded(id)) => self.lobby_ended(id),
                Some(ManagerMsg::Inspect(reply)) => {
                    let _ = reply.send(self.lobby_infos());
                }
                Some(ManagerMsg::Shutdown) => break,
                None => {}
            }
            self.end_lingering();
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
        let queue = ClientQueue::new(self.queue_depth);
        let writer = self.least_loaded_writer();
        let Some(lobby) = self.join_some_lobby(id, &queue, writer) else {
            // Best effort: tell the client why before dropping it.
            let _ = stream.write(&frame::encode_close(
                close_code::INTERNAL_ERROR,
                "no lobby available",
            ));
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
                queue,
                writer,
            },
        );
        self.writer_load[writer] += 1;
        bump(&self.stats.clients);
        bump(&self.stats.clients_accepted);
        debug!("{id} from {peer} placed in {lobby}");
        if !self.writers[writer].send(WriterMsg::Attach(attach)) {
            error!("writer {writer} has ended; dropping {id}");
            self.depart(id);
        }
    }

    /// Puts a client in the fullest lobby with room, starting one if needed.
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

    fn fullest_with_room(&self) -> Option<LobbyId> {
        self.lobbies
            .iter()
            .filter(|(_, l)| l.members < self.capacity)
            .max_by_key(|(id, l)| (l.members, Reverse(**id)))
            .map(|(id, _)| *id)
    }

    fn start_lobby(&mut self) -> Option<LobbyId> {
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

    fn lobby_infos(&self) -> Vec<LobbyInfo> {
        self.lobbies
            .iter()
            .map(|(id, l)| LobbyInfo {
                id: id.0,
                clients: l.members,
                origin: l.handle.origin_state(),
            })
            .collect()
    }

    fn least_loaded_writer(&self) -> usize {
        (0..self.writer_load.len())
            .min_by_key(|&w| self.writer_load[w])
            .unwrap_or(0)
    }

    fn depart(&mut self, id: ClientId) {
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        self.writer_load[client.writer] -= 1;
        drop_one(&self.stats.clients);
        if let Some(lobby) = self.lobbies.get_mut(&client.lobby) {
            lobby.handle.send(LobbyMsg::Leave(id));
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

    fn end_lingering(&mut self) {
        let now = Instant::now();
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
        let orphans: Vec<ClientId> = self
            .clients
            .iter()
            .filter(|(_, c)| c.lobby == id)
            .map(|(cid, _)| *cid)
            .collect();
        for cid in orphans {
            let Some(client) = self.clients.get(&cid) else {
                continue;
            };
            let (queue, writer) = (client.queue.clone(), client.writer);
            match self.join_some_lobby(cid, &queue, writer) {
                Some(lobby) => {
                    if let Some(client) = self.clients.get_mut(&cid) {
                        client.lobby = lobby;
                    }
                }
                // The client stays connected with nothing to receive until it leaves.
                None => error!("no lobby for {cid}"),
            }
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
