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
//! (`control/supervise.rs`). A lobby that ended unexpectedly has its clients placed
//! afresh; the acceptor's end is the gateway's shutdown; a writer that ended
//! outside a shutdown (its panics are caught in the writer) is fatal. A
//! panic in the manager itself is caught: it shuts the gateway down as
//! gracefully as it can and counts a fatal error.

use std::{
    collections::HashMap,
    io::Write,
    panic::{self, AssertUnwindSafe},
    sync::{Arc, atomic::Ordering::Relaxed},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crossbeam_channel::{Receiver, Sender, select};
use log::{debug, error, info, warn};

#[cfg(feature = "sse")]
use crate::config::SlowStream;
#[cfg(feature = "sse")]
use crate::fanout::history;
use crate::{
    config::{Config, SlowClient},
    control::{
        inbox::{Admission, ClientMessage, ManagerMsg, Resume, ThreadKind},
        shutdown::{OnStop, ShutdownHandle},
    },
    delivery::{
        queue::ClientQueue,
        writer::{Attach, WriterHandle, WriterMsg},
    },
    error::{Error, Result},
    fanout::{
        lobby::{self, LobbyEnv, LobbyHandle, LobbyMsg, Member},
        registry::{Move, Orphan, Place, Registry, Rules},
    },
    id::{ClientId, Group, LobbyId, RouteId},
    source::route::RouteEnv,
    stats::{Disconnect, LobbyInfo, Stats, bump},
    wire::{close, frame},
};

/// Client messages waiting for the manager to route them to their lobbies;
/// more are dropped and counted (each is at most `--max-client-message` bytes).
pub(crate) const FORWARD_QUEUE: usize = 256;
/// Longest the manager sleeps with nothing scheduled (it wakes on messages).
const IDLE_WAIT: Duration = Duration::from_secs(3600);
/// Longest clients wait in their old lobby for their new lobby's upstream to
/// warm up (a reload changed it); they move then anyway, gap-free only if
/// the streams meet within the new lobby's hold.
const WARM_WAIT: Duration = Duration::from_secs(30);

/// The queue of an event stream or a WebSocket resume client is this many
/// times `--queue-depth` deep: it is closed, not thinned, when full, so it gets room for the bursts a
/// WebSocket client's queue would lose its oldest to; and a lobby's history
/// (at least 4 × the depth) still holds where a closed stream left off.
#[cfg(feature = "sse")]
const SSE_DEPTH: usize = 2;

/// The channels the manager reads: its inbox and the client messages.
#[derive(Debug)]
pub(crate) struct Inboxes {
    pub inbox: Receiver<ManagerMsg>,
    pub forwards: Receiver<ClientMessage>,
    /// Kept so `forwards` never reads as closed, even with no writer left.
    pub _forwards_tx: Sender<ClientMessage>,
    /// Dropped with the manager, after its lobbies and writers have ended:
    /// runs the embedder's [`Builder::on_stop`](crate::Builder::on_stop).
    pub _on_stop: OnStop,
}

/// Starts the manager thread, which takes ownership of the writers; on a
/// fatal failure it stops the gateway through `shutdown`.
pub(crate) fn spawn(
    config: &Config,
    routes: Vec<RouteEnv>,
    inboxes: Inboxes,
    env: LobbyEnv,
    writers: Vec<WriterHandle>,
    shutdown: ShutdownHandle,
) -> Result<JoinHandle<()>> {
    let compact_interval = (!config.compact_interval.is_zero()).then_some(config.compact_interval);
    let mut registry = Registry::default();
    for route in &routes {
        registry.set_rules(route.id, rules(&route.config));
    }
    let manager = Manager {
        inboxes,
        shutdown,
        registry,
        routes: routes.into_iter().map(|r| (r.id, r)).collect(),
        compact_interval,
        next_compaction: compact_interval.map(|every| Instant::now() + every),
        count_drops: config.slow_client == SlowClient::Disconnect,
        #[cfg(feature = "sse")]
        slow_stream: config.slow_stream,
        linger: config.lobby_linger,
        writer_load: vec![0; writers.len()],
        writers,
        stats: Arc::clone(&env.stats),
        env,
        lobbies: HashMap::new(),
        ending: HashMap::new(),
        clients: HashMap::new(),
        next_client: 0,
        held: HashMap::new(),
        warming: HashMap::new(),
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

/// A route's placement rules.
fn rules(route: &Config) -> Rules {
    Rules {
        capacity: route.lobby_capacity,
        compact_to: ((route.lobby_capacity as f64 * route.compact_fill).floor() as usize).max(1),
        max_lobbies: (route.max_origin_connections > 0).then_some(route.max_origin_connections),
    }
}

/// What the manager keeps of a client besides its place (`registry.rs`):
/// its queue, which outlives moves between lobbies, and its writer.
#[derive(Debug)]
struct ClientEntry {
    queue: ClientQueue,
    /// Its writer's index (fewer than `MAX_WRITERS`): 32 bits, so that with
    /// `deflate` the entry packs into 72 bytes, not 80.
    writer: u32,
    group: Group,
    /// It negotiated permessage-deflate: every lobby it joins sends it the
    /// compressed form.
    deflate: bool,
    /// An SSE client: every lobby it joins sends it the event-stream form.
    sse: bool,
    /// A WebSocket client that opted into resume: every lobby it joins
    /// sends it the envelope form.
    envelope: bool,
}

#[derive(Debug)]
struct Manager {
    inboxes: Inboxes,
    /// Stops the acceptor, hence the gateway, on a fatal failure.
    shutdown: ShutdownHandle,
    /// Which client is where, and the placement and compaction rules.
    registry: Registry,
    routes: HashMap<RouteId, RouteEnv>,
    compact_interval: Option<Duration>,
    next_compaction: Option<Instant>,
    /// Queues count their drops (for the slow-client disconnect policy).
    count_drops: bool,
    /// Whether the queue of a client that carries message IDs closes when
    /// full or drops its oldest.
    #[cfg(feature = "sse")]
    slow_stream: SlowStream,
    linger: Duration,
    /// What every lobby shares; per route, [`Manager::lobby_env`] fills in the rest.
    env: LobbyEnv,
    stats: Arc<Stats>,
    /// The running lobbies' threads.
    lobbies: HashMap<LobbyId, LobbyHandle>,
    /// Lobbies told to shut down, joined when they report their end.
    ending: HashMap<LobbyId, LobbyHandle>,
    clients: HashMap<ClientId, ClientEntry>,
    writers: Vec<WriterHandle>,
    writer_load: Vec<usize>,
    next_client: u64,
    /// Clients of a changed upstream, still served by their old lobby until
    /// their new one has warmed up: each with its old and new lobby.
    held: HashMap<ClientId, (LobbyId, LobbyId)>,
    /// Lobbies warming up for held clients, and when those move anyway.
    warming: HashMap<LobbyId, Instant>,
}

impl Manager {
    /// The main loop: one message at a time, with timeouts for lingering
    /// lobbies and compaction rounds, until the gateway shuts down (the
    /// thread's closure then drops the manager, which stops everything).
    fn run(&mut self) {
        loop {
            let deadline = self
                .registry
                .next_linger_end(self.linger)
                .into_iter()
                .chain(self.next_compaction)
                .chain(self.warming.values().copied())
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
            if msg.is_some() {
                // A client's messages go upstream before its departure (sent
                // after them, on the other channel) is handled.
                while let Ok(message) = self.inboxes.forwards.try_recv() {
                    self.forward(message);
                }
            }
            match msg {
                Some(ManagerMsg::Admit(admission)) => self.admit(admission),
                Some(ManagerMsg::Departed(id)) => self.depart(id),
                Some(ManagerMsg::Released { id, resume }) => self.released(id, resume),
                Some(ManagerMsg::Warmed(lobby)) => self.move_held(lobby),
                Some(ManagerMsg::ThreadEnded { thread, panicked })
                    if !self.thread_ended(thread, panicked) =>
                {
                    return;
                }
                Some(ManagerMsg::ThreadEnded { .. }) => {}
                Some(ManagerMsg::Inspect(reply)) => {
                    let _ = reply.send(self.lobby_infos());
                }
                Some(ManagerMsg::Reload { routes, config }) => self.reload(routes, &config),
                Some(ManagerMsg::Shutdown) => return,
                None => {}
            }
            let now = Instant::now();
            if self.next_compaction.is_some_and(|at| at <= now) {
                self.compact(now);
                self.next_compaction = self.compact_interval.map(|every| now + every);
            }
            let cold: Vec<LobbyId> = self
                .warming
                .iter()
                .filter(|(_, until)| **until <= now)
                .map(|(lobby, _)| *lobby)
                .collect();
            for lobby in cold {
                warn!("{lobby} did not warm up in {WARM_WAIT:?}; moving its clients anyway");
                self.move_held(lobby);
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
            group,
            deflate,
            sse,
            envelope,
            after,
            expires,
            #[cfg(feature = "tls")]
            mut tls,
        } = admission;
        // A refused client gets its close frame in one best-effort write
        // (through its TLS session, if it has one).
        #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
        let mut refuse = |stream: &mut mio::net::TcpStream, close: &[u8]| {
            #[cfg(feature = "tls")]
            if let Some(session) = tls.as_deref_mut() {
                crate::wire::tls::write_now(session, stream, close);
                return;
            }
            let _ = stream.write(close);
        };
        let id = ClientId(self.next_client);
        self.next_client += 1;
        let Some(route) = self.routes.get(&group.route) else {
            debug!("{id} from {peer} refused: its route is gone");
            self.stats.disconnected(Disconnect::NoRoom);
            let close = frame::encode_close(close::SERVICE_RESTART, "route removed");
            refuse(&mut stream, &close);
            return;
        };
        let depth = route.config.queue_depth;
        #[cfg(feature = "sse")]
        let queue = if (sse || envelope) && self.slow_stream == SlowStream::Close {
            ClientQueue::closing_when_full(depth.saturating_mul(SSE_DEPTH), self.count_drops)
        } else if sse || envelope {
            ClientQueue::new(depth.saturating_mul(SSE_DEPTH), self.count_drops)
        } else {
            ClientQueue::new(depth, self.count_drops)
        };
        #[cfg(not(feature = "sse"))]
        let queue = ClientQueue::new(depth, self.count_drops);
        let writer = self.least_loaded_writer();
        self.clients.insert(
            id,
            ClientEntry {
                queue: queue.clone(),
                writer: writer as u32,
                group,
                deflate,
                sse,
                envelope,
            },
        );
        let Some(lobby) = self.place(id, after) else {
            // Its seat is given back as it drops here; tell the client why.
            self.clients.remove(&id);
            bump(&self.stats.refused_full);
            self.stats.disconnected(Disconnect::NoRoom);
            debug!("{id} from {peer} refused: no lobby with room");
            let close = frame::encode_close(close::TRY_AGAIN_LATER, "no lobby with room");
            refuse(&mut stream, &close);
            return;
        };
        let attach = Attach {
            id,
            stream,
            queue: queue.outlet(),
            leftover,
            seat,
            deflate,
            sse,
            expires,
            #[cfg(feature = "tls")]
            tls,
        };
        self.writer_load[writer] += 1;
        bump(&self.stats.clients_accepted);
        debug!("{id} from {peer} placed in {lobby}");
        if !self.writers[writer].send(WriterMsg::Attach(Box::new(attach))) {
            error!("writer {writer} has ended; dropping {id}");
            self.stats.disconnected(Disconnect::InternalError);
            self.depart(id);
        }
    }

    /// Puts a known client in the fullest lobby of its group with room,
    /// starting one if needed and allowed, resuming it after the message
    /// ID `after` (only its first lobby does: a re-placed client starts
    /// afresh); the lobby it joined.
    fn place(&mut self, id: ClientId, after: Option<u64>) -> Option<LobbyId> {
        let client = self.clients.get(&id)?;
        let (group, queue, writer) = (
            client.group.clone(),
            client.queue.clone(),
            client.writer as usize,
        );
        let (deflate, sse, envelope) = (client.deflate, client.sse, client.envelope);
        loop {
            let lobby = self.find_lobby(&group)?;
            let member = Member {
                id,
                queue: queue.clone(),
                writer,
                deflate,
                sse,
                envelope,
            };
            if self
                .lobbies
                .get(&lobby)
                .is_some_and(|l| l.send(LobbyMsg::Join { member, after }))
            {
                self.registry.join(id, lobby);
                return Some(lobby);
            }
            // Its thread has ended. Its guard's report re-homes its clients
            // later; handling that here would place this client twice.
            self.registry.mark_dead(lobby);
        }
    }

    /// The lobby of `group` a client should go to, starting it if needed.
    fn find_lobby(&mut self, group: &Group) -> Option<LobbyId> {
        match self.registry.place(group, Instant::now()) {
            Place::Join(lobby) => Some(lobby),
            Place::Start(lobby) => match self
                .lobby_env(group)
                .and_then(|env| lobby::spawn(lobby, &env))
            {
                Ok(handle) => {
                    self.lobbies.insert(lobby, handle);
                    Some(lobby)
                }
                Err(e) => {
                    error!("{e}");
                    self.registry.lobby_ended(lobby);
                    None
                }
            },
            Place::Full => None,
        }
    }

    /// Applies a new configuration. Added routes serve new clients; a
    /// removed route's lobbies close their clients with 1012 after what
    /// they have queued; a route whose upstream changed gets new lobbies,
    /// and its clients move to them as compaction moves clients (gap-free
    /// where the two streams meet); other changes apply to new clients.
    fn reload(&mut self, routes: Vec<RouteEnv>, config: &Config) {
        let now = Instant::now();
        self.compact_interval =
            (!config.compact_interval.is_zero()).then_some(config.compact_interval);
        self.next_compaction = self.compact_interval.map(|every| now + every);
        self.linger = config.lobby_linger;
        #[cfg(feature = "sse")]
        {
            self.slow_stream = config.slow_stream;
        }
        let kept: Vec<RouteId> = routes.iter().map(|r| r.id).collect();
        for env in routes {
            let id = env.id;
            self.registry.set_rules(id, rules(&env.config));
            let old = self.routes.insert(id, env);
            let path = &self.routes[&id].config.path;
            match old {
                None => info!("route {path} added"),
                Some(old) if old.upstream_differs(&self.routes[&id]) => {
                    info!("route {path}: upstream changed; moving its clients to new lobbies");
                    self.evacuate(id, now);
                }
                Some(_) => {}
            }
        }
        let removed: Vec<RouteId> = self
            .routes
            .keys()
            .filter(|id| !kept.contains(id))
            .copied()
            .collect();
        for id in removed {
            if let Some(route) = self.routes.remove(&id) {
                info!("route {} removed; closing its clients", route.config.path);
            }
            self.registry.remove_rules(id);
            for lobby in self.registry.retire(id) {
                if let Some(handle) = self.lobbies.get(&lobby) {
                    handle.send(LobbyMsg::Retire);
                }
            }
        }
    }

    /// Moves every client of `route`'s lobbies into new lobbies (its
    /// upstream changed): the old ones take nobody new and end once empty.
    /// The new lobbies first warm up (their upstream connects and delivers
    /// a few frames) while the old ones go on serving, so each client's
    /// position is in its new lobby's history when it moves: a new
    /// connection never carries the frames sent before it.
    fn evacuate(&mut self, route: RouteId, now: Instant) {
        for retired in self.registry.retire(route) {
            let mut moving: Vec<(ClientId, LobbyId)> = self
                .registry
                .clients_in(retired)
                .into_iter()
                .map(|client| (client, retired))
                .collect();
            // Held for this lobby by an earlier reload, not moved in yet:
            // they move on from the lobby still serving them.
            moving.extend(
                self.held
                    .iter()
                    .filter(|(_, (_, to))| *to == retired)
                    .map(|(client, (from, _))| (*client, *from)),
            );
            moving.sort();
            for (client, from) in moving {
                let Some(group) = self.clients.get(&client).map(|c| c.group.clone()) else {
                    continue;
                };
                let Some(to) = self.find_lobby(&group) else {
                    warn!("no lobby for {client} on its route's new upstream; it stays");
                    continue;
                };
                // Its old lobby serves it, and so counts it, until it is released.
                self.registry.hold_move(Move { client, from, to }, now);
                self.held.insert(client, (from, to));
                if let std::collections::hash_map::Entry::Vacant(warming) = self.warming.entry(to) {
                    warming.insert(now + WARM_WAIT);
                    if let Some(lobby) = self.lobbies.get(&to) {
                        lobby.send(LobbyMsg::Warm);
                    }
                }
            }
        }
    }

    /// Releases the clients held for `lobby` from their old lobbies: it has
    /// warmed up (or did not in time).
    fn move_held(&mut self, lobby: LobbyId) {
        self.warming.remove(&lobby);
        let moving: Vec<(ClientId, LobbyId)> = self
            .held
            .iter()
            .filter(|(_, (_, to))| *to == lobby)
            .map(|(client, (from, _))| (*client, *from))
            .collect();
        let now = Instant::now();
        for (client, from) in moving {
            self.held.remove(&client);
            self.registry.let_go(from, now);
            let released = self
                .lobbies
                .get(&from)
                .is_some_and(|l| l.send(LobbyMsg::Release(client)));
            if !released {
                // Its old lobby is gone: its end adopts or re-places it.
                debug!("{client}: {from} is gone; not released");
            }
        }
    }

    /// If a group's clients fit in fewer lobbies at the compaction fill,
    /// moves the members of its emptiest settled lobbies into its fullest.
    fn compact(&mut self, now: Instant) {
        let Some(interval) = self.compact_interval else {
            return;
        };
        let moves = self.registry.plan_compaction(now, interval);
        let mut moved = 0;
        for m in moves {
            let released = self
                .lobbies
                .get(&m.from)
                .is_some_and(|l| l.send(LobbyMsg::Release(m.client)));
            if released {
                self.registry.start_move(m, now);
                moved += 1;
            }
        }
        if moved > 0 {
            info!("compacting: moving {moved} clients");
        }
    }

    /// The old lobby let `id` go: hand it to its new lobby with its position.
    fn released(&mut self, id: ClientId, resume: Resume) {
        self.held.remove(&id);
        let (Some(target), Some(client)) = (self.registry.released(id), self.clients.get(&id))
        else {
            return; // It left meanwhile, or its move was settled otherwise.
        };
        let member = Member {
            id,
            queue: client.queue.clone(),
            writer: client.writer as usize,
            deflate: client.deflate,
            sse: client.sse,
            envelope: client.envelope,
        };
        let adopted = self
            .lobbies
            .get(&target)
            .is_some_and(|l| l.send(LobbyMsg::Adopt { member, resume }));
        if adopted {
            bump(&self.stats.migrations);
            debug!("{id} moved to {target}");
            return;
        }
        // The new lobby is gone: place the client afresh.
        self.registry.mark_dead(target);
        self.registry.unplace(id, Instant::now());
        self.rehome(id);
    }

    /// Puts an existing client in some lobby (its own died or vanished).
    fn rehome(&mut self, id: ClientId) {
        if self.place(id, None).is_none() {
            // The client stays connected with nothing to receive until it leaves.
            error!("no lobby for {id}");
        }
    }

    /// What a new lobby of `group` runs with.
    fn lobby_env(&self, group: &Group) -> Result<LobbyEnv> {
        let route = self
            .routes
            .get(&group.route)
            .ok_or_else(|| Error::Config(format!("no route {:?}", group.route)))?;
        let c = &route.config;
        Ok(LobbyEnv {
            upstream: route.upstream_for(group.key.as_deref())?,
            on_origin_loss: c.on_origin_loss,
            history: c.history_len(),
            history_keep: c.queue_depth.max(c.replay),
            history_bytes: c.history_bytes,
            replay: c.replay,
            compress_min: c.compress_min,
            #[cfg(feature = "sse")]
            id_salt: history::id_salt(&c.path, group.key.as_deref()),
            ..self.env.clone()
        })
    }

    fn lobby_infos(&self) -> Vec<LobbyInfo> {
        let now = self.stats.epoch.millis();
        self.registry
            .occupancy()
            .into_iter()
            .filter_map(|o| {
                let handle = self.lobbies.get(&o.id)?;
                let counters = handle.counters();
                let last = counters.last_message.load(Relaxed);
                let since = counters.origin_since.load(Relaxed);
                Some(LobbyInfo {
                    id: o.id.0,
                    route: self
                        .routes
                        .get(&o.group.route)
                        .map_or_else(String::new, |r| r.config.path.clone()),
                    key: o.group.key.as_deref().map(str::to_owned),
                    clients: o.members,
                    attached: counters.attached.load(Relaxed) as usize,
                    origin: handle.origin_state(),
                    origin_since: Duration::from_millis(now.saturating_sub(since)),
                    messages_in: counters.messages_in.load(Relaxed),
                    frames_out: counters.frames_out.load(Relaxed),
                    frames_dropped: counters.frames_dropped.load(Relaxed),
                    last_message_age: (last > 0)
                        .then(|| Duration::from_millis(now.saturating_sub(last - 1))),
                    history_messages: counters.history_messages.load(Relaxed) as usize,
                    history_bytes: counters.history_bytes.load(Relaxed) as usize,
                })
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
        let sent = self
            .registry
            .lobby_of(message.id)
            .and_then(|lobby| self.lobbies.get(&lobby))
            .is_some_and(|l| l.forward(message.message));
        if !sent {
            bump(&self.stats.forward_dropped);
        }
    }

    fn depart(&mut self, id: ClientId) {
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        self.writer_load[client.writer as usize] -= 1;
        if let Some((from, _)) = self.held.remove(&id) {
            // Held for a move: still its old lobby's member.
            self.registry.let_go(from, Instant::now());
            if let Some(lobby) = self.lobbies.get(&from) {
                lobby.send(LobbyMsg::Leave(id));
            }
        }
        if let Some(gone) = self.registry.leave(id, Instant::now()) {
            // A moving client is not in its new lobby yet; its old one lets it go.
            if gone.tell_lobby {
                if let Some(lobby) = self.lobbies.get(&gone.lobby) {
                    lobby.send(LobbyMsg::Leave(id));
                }
            }
        }
    }

    fn end_lingering(&mut self, now: Instant) {
        for id in self.registry.take_lingering(now, self.linger) {
            if let Some(handle) = self.lobbies.remove(&id) {
                debug!("{id} stayed empty for {:?}; ending it", self.linger);
                handle.send(LobbyMsg::Shutdown);
                self.ending.insert(id, handle);
            }
        }
    }

    fn lobby_ended(&mut self, id: LobbyId) {
        if let Some(handle) = self.ending.remove(&id) {
            handle.join();
            return;
        }
        let Some(orphans) = self.registry.lobby_ended(id) else {
            return;
        };
        warn!(
            "{id} ended unexpectedly; moving its {} clients",
            orphans.len()
        );
        if let Some(handle) = self.lobbies.remove(&id) {
            handle.join();
        }
        self.warming.remove(&id);
        for orphan in orphans {
            match orphan {
                // Moving out of the dead lobby: its new lobby takes it as is.
                Orphan::Adopt(cid, _) => self.released(cid, Resume::new()),
                Orphan::Rehome(cid) => {
                    // Held for a move into the dead lobby: its old one still
                    // serves it, until it is placed afresh.
                    if let Some((from, _)) = self.held.remove(&cid) {
                        self.registry.let_go(from, Instant::now());
                        if let Some(lobby) = self.lobbies.get(&from) {
                            lobby.send(LobbyMsg::Leave(cid));
                        }
                    }
                    self.rehome(cid);
                }
            }
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
        self.registry.take_all();
        for (id, handle) in std::mem::take(&mut self.lobbies) {
            handle.send(LobbyMsg::Shutdown);
            self.ending.insert(id, handle);
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
