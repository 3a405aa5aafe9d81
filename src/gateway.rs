//! Starting and stopping a gateway: [`Gateway::start`], [`Builder`] and
//! [`GatewayHandle`].
//!
//! Start-up runs on the caller's thread: it validates the configuration,
//! builds the one [`Upstream`] every lobby reads from (from the origin URL,
//! or an in-process [`Publisher`]), binds the listener (so a busy port is
//! an error the caller sees), then spawns the writer pool, the manager (which
//! takes the writers and starts lobbies on demand) and the acceptor. Shutdown
//! runs down the same chain: the acceptor stops accepting and its end reaches
//! the manager, which stops the lobbies and drains the writers together, then
//! joins them all. No thread loop lives here.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crossbeam_channel::{Sender, bounded, unbounded};
use log::{error, info, warn};
use mio::{Waker, net::TcpListener};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    acceptor::{self, AcceptorHandle, AcceptorMsg},
    config::Config,
    error::{Error, Result},
    health::{Health, Probes},
    id::RouteId,
    lobby::LobbyEnv,
    manager::{self, FORWARD_QUEUE, Inboxes, ManagerMsg, RouteEnv},
    source::{Publisher, Upstream},
    stats::{LobbyInfo, Stats, StatsSnapshot, bump},
    writer::{self, WriterHandle, WriterMsg},
};
#[cfg(feature = "admin")]
use crate::{
    admin::{self, AdminHandle},
    metrics::GatewayCollector,
};

/// Entry point for running a gateway in this process.
#[derive(Debug)]
pub struct Gateway {
    _private: (),
}

impl Gateway {
    /// Validates `config`, binds the listener and starts every thread, with
    /// the lobbies reading from [`Config::origin`].
    ///
    /// Returns once the gateway accepts clients. Errors are configuration
    /// problems, a listener that cannot be bound, or threads that cannot start.
    pub fn start(config: Config) -> Result<GatewayHandle> {
        Gateway::builder(config).start()
    }

    /// A gateway to set up further before it starts: fed by this program
    /// through a [`Publisher`] instead of an origin URL, told what to do
    /// when it stops.
    pub fn builder(config: Config) -> Builder {
        Builder {
            config,
            publisher: None,
            on_stop: OnStop(None),
        }
    }
}

/// A gateway not started yet: [`Gateway::builder`], then [`Builder::start`].
#[derive(Debug)]
pub struct Builder {
    config: Config,
    publisher: Option<Publisher>,
    on_stop: OnStop,
}

impl Builder {
    /// Feeds the gateway from this program: every message given to the
    /// returned [`Publisher`] (or a clone of it) goes to every client, and
    /// the gateway dials no origin, so [`Config::origin`] must stay empty.
    /// Calling it again returns the same publisher.
    pub fn publisher(&mut self) -> Publisher {
        self.publisher.get_or_insert_with(Publisher::new).clone()
    }

    /// Runs `f` once the gateway has stopped, on the thread that stopped it
    /// last (after every gateway thread but the acceptor has ended),
    /// whether a shutdown or a fatal failure stopped it; [`GatewayHandle::join`]
    /// then returns at once. A program that waits for something else (a
    /// signal) learns this way that the gateway stopped on its own.
    pub fn on_stop(&mut self, f: impl FnOnce() + Send + 'static) -> &mut Builder {
        self.on_stop = OnStop(Some(Box::new(f)));
        self
    }

    /// Validates the configuration, binds the listener and starts every
    /// thread; see [`Gateway::start`].
    pub fn start(self) -> Result<GatewayHandle> {
        let Builder {
            config,
            publisher,
            on_stop,
        } = self;
        let fed = publisher
            .as_ref()
            .map(|p| Arc::new(Upstream::Publisher(Arc::clone(p.hub()))));
        config.validate_for(fed.is_some())?;
        let routes: Vec<(RouteId, Config)> = config
            .serving(fed.is_some())
            .into_iter()
            .zip(0..)
            .map(|(route, id)| (RouteId(id), route))
            .collect();
        let route_envs = routes
            .iter()
            .map(|(id, route)| RouteEnv::new(*id, route.clone(), fed.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        let listener = bind(config.listen, config.reuse_port).map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let local_addr = listener
            .local_addr()
            .map_err(Error::io("read the listener address"))?;
        #[cfg(feature = "admin")]
        let admin_listener = match config.admin {
            Some(addr) => {
                let listener = admin::bind(addr).map_err(|source| Error::Bind { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(Error::io("read the admin listener address"))?;
                Some((listener, bound))
            }
            None => None,
        };
        let stats = Arc::new(Stats::default());
        if let Some(publisher) = &publisher {
            publisher.hub().attach(&stats);
        }
        let (prepared, shutdown) =
            acceptor::prepare(listener, &config, &routes, Arc::clone(&stats))?;
        let (manager_tx, manager_rx) = unbounded();
        let reload = ReloadHandle {
            inner: Arc::new(Reloader {
                book: Mutex::new(RouteBook {
                    ids: routes.iter().map(|(id, r)| (r.path.clone(), *id)).collect(),
                    next: u32::try_from(routes.len()).unwrap_or(u32::MAX),
                    config: config.clone(),
                }),
                acceptor: prepared.commands.clone(),
                wake: shutdown.clone(),
                manager: manager_tx.clone(),
                stats: Arc::clone(&stats),
                publisher: fed,
            }),
        };
        let (forwards_tx, forwards) = bounded(FORWARD_QUEUE);

        let mut writers: Vec<WriterHandle> = Vec::with_capacity(config.writers);
        for index in 0..config.writers {
            let channels = (manager_tx.clone(), forwards_tx.clone());
            match writer::spawn(index, &config, Arc::clone(&stats), channels) {
                Ok(handle) => writers.push(handle),
                Err(e) => {
                    stop_writers(writers);
                    return Err(e);
                }
            }
        }
        // Per route, the manager fills in the upstream and the route's settings.
        let env = LobbyEnv {
            upstream: Arc::clone(&route_envs[0].upstream),
            writers: writers.iter().map(WriterHandle::wake).collect(),
            stats: Arc::clone(&stats),
            manager: manager_tx.clone(),
            on_origin_loss: config.on_origin_loss,
            history: config.history_len(),
            history_keep: config.queue_depth.max(config.replay),
            replay: config.replay,
            compress_min: config.compress_min,
        };
        let inboxes = Inboxes {
            inbox: manager_rx,
            forwards,
            _forwards_tx: forwards_tx,
            _on_stop: on_stop,
        };
        let manager = manager::spawn(&config, route_envs, inboxes, env, writers, shutdown.clone())?;
        let acceptor = match acceptor::spawn(prepared, manager_tx.clone()) {
            Ok(acceptor) => acceptor,
            Err(e) => {
                let _ = manager_tx.send(ManagerMsg::Shutdown);
                join_manager(manager, &stats);
                return Err(e);
            }
        };
        #[cfg_attr(not(feature = "admin"), allow(unused_mut))]
        let mut handle = GatewayHandle {
            local_addr,
            #[cfg(feature = "admin")]
            admin_addr: admin_listener.as_ref().map(|(_, addr)| *addr),
            probes: Probes::new(Arc::clone(&stats), &config),
            shutdown,
            reload,
            stats,
            manager_tx,
            threads: Some((acceptor, manager)),
            #[cfg(feature = "admin")]
            admin: None,
        };
        #[cfg(feature = "admin")]
        if let Some((listener, _)) = admin_listener {
            let sources = admin::Sources {
                stats: Arc::clone(&handle.stats),
                probes: handle.probes.clone(),
                collector: handle.metrics_collector(),
                manager: handle.manager_tx.clone(),
                lobby_capacity: config.lobby_capacity,
            };
            // On failure the handle's drop stops what started.
            handle.admin = Some(admin::spawn(listener, sources)?);
        }
        Ok(handle)
    }
}

/// What to run once the gateway has stopped ([`Builder::on_stop`]): run
/// when dropped, which the manager does last.
pub(crate) struct OnStop(Option<Box<dyn FnOnce() + Send>>);

impl std::fmt::Debug for OnStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "OnStop(set)"
        } else {
            "OnStop(none)"
        })
    }
}

impl Drop for OnStop {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// Pending connections the kernel may hold for the acceptor (it caps this at
/// `net.core.somaxconn`). Bursts of thousands of clients overflow the usual 128.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds the client listener with a backlog sized for connection bursts;
/// with `reuse_port`, other processes that set it too may bind the same
/// address (`SO_REUSEPORT`).
fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        set_reuse_port(&socket)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

#[cfg(unix)]
fn set_reuse_port(socket: &Socket) -> std::io::Result<()> {
    socket.set_reuse_port(true)
}

/// `Config::validate` refuses `reuse_port` here; this is its last word.
#[cfg(not(unix))]
fn set_reuse_port(_: &Socket) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

fn stop_writers(writers: Vec<WriterHandle>) {
    for writer in &writers {
        writer.send(WriterMsg::Shutdown);
    }
    for writer in writers {
        writer.join();
    }
}

/// Waits for the manager; it catches its own panics, so one that still
/// ends it (in its shutdown) is counted here.
fn join_manager(manager: JoinHandle<()>, stats: &Stats) {
    if manager.join().is_err() {
        bump(&stats.thread_panics);
        bump(&stats.fatal_errors);
        error!("the manager thread panicked while shutting down");
    }
}

/// A running gateway. Dropping it shuts the gateway down and waits for it.
#[derive(Debug)]
pub struct GatewayHandle {
    local_addr: SocketAddr,
    #[cfg(feature = "admin")]
    admin_addr: Option<SocketAddr>,
    stats: Arc<Stats>,
    probes: Probes,
    shutdown: ShutdownHandle,
    reload: ReloadHandle,
    manager_tx: Sender<ManagerMsg>,
    threads: Option<(AcceptorHandle, JoinHandle<()>)>,
    /// Stopped last, so it answers through the drain.
    #[cfg(feature = "admin")]
    admin: Option<AdminHandle>,
}

impl GatewayHandle {
    /// Makes the next thread of `fault`'s kind panic (or stall), to test
    /// supervision. Only in builds with the `fault-injection` feature.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_fault(&self, fault: crate::fault::Fault) {
        use crate::fault::Fault;
        self.stats.faults.arm(fault);
        // Wake the thread that checks it (writers tick, lobbies wake on
        // origin messages).
        match fault {
            Fault::Acceptor => self.shutdown.wake(),
            Fault::Manager => {
                let _ = self.manager_tx.send(ManagerMsg::Inspect(bounded(1).0));
            }
            Fault::Writer | Fault::Lobby | Fault::SlowResolve => {}
        }
    }

    /// The address clients connect to (useful when the config said port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A snapshot of the gateway's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The current lobbies and their client counts, ordered by id. Empty if
    /// the gateway has stopped or its manager does not answer within `timeout`.
    pub fn lobbies(&self, timeout: Duration) -> Vec<LobbyInfo> {
        ask_lobbies(&self.manager_tx, timeout).unwrap_or_default()
    }

    /// The address of the admin HTTP server, if [`Config::admin`] asked for one.
    #[cfg(feature = "admin")]
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// A `prometheus_client` collector of the gateway's metrics, to add them
    /// to an embedding program's registry with [`crate::metrics::register`].
    #[cfg(feature = "admin")]
    pub fn metrics_collector(&self) -> GatewayCollector {
        GatewayCollector::new(Arc::clone(&self.stats), Some(self.manager_tx.clone()))
    }

    /// Whether the gateway should get new clients (what `/readyz` answers):
    /// not while draining, not when full, not while it has clients and no
    /// origin connection is up.
    pub fn readiness(&self) -> Health {
        self.probes.readiness()
    }

    /// Whether the gateway runs without a fatal failure (what `/livez` answers).
    pub fn liveness(&self) -> Health {
        self.probes.liveness()
    }

    /// Begins a graceful shutdown and returns at once: stop accepting, send
    /// each client what it has queued and a 1001 close (within the drain
    /// timeout), close the origin connections. [`join`](Self::join) waits for it.
    pub fn shutdown(&self) {
        self.shutdown.shutdown();
    }

    /// A handle that can begin the shutdown from another thread (a signal
    /// handler, say) while this one waits in [`join`](Self::join).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Applies a new configuration without dropping clients; see
    /// [`ReloadHandle::reload`].
    pub fn reload(&self, config: Config) -> Result<()> {
        self.reload.reload(config)
    }

    /// A handle that can reload the configuration from another thread (a
    /// SIGHUP handler, say) while this one waits in [`join`](Self::join).
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reload.clone()
    }

    /// Waits until the gateway has stopped and every thread has ended, and
    /// returns its final counters. Blocks until [`shutdown`](Self::shutdown)
    /// is called if it was not, or until a fatal failure stops the gateway
    /// ([`StatsSnapshot::fatal_errors`] then says so). Once shutdown has
    /// begun it returns within the drain timeout and a second (the origin
    /// close handshakes overlap the drain).
    pub fn join(mut self) -> StatsSnapshot {
        self.join_threads();
        self.stats.snapshot()
    }

    fn join_threads(&mut self) {
        if let Some((acceptor, manager)) = self.threads.take() {
            acceptor.join();
            join_manager(manager, &self.stats);
        }
        #[cfg(feature = "admin")]
        if let Some(admin) = self.admin.take() {
            admin.stop();
        }
    }
}

impl Drop for GatewayHandle {
    fn drop(&mut self) {
        self.shutdown();
        self.join_threads();
    }
}

/// Applies a new configuration to a running gateway, from any thread. Cheap
/// to clone.
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    inner: Arc<Reloader>,
}

#[derive(Debug)]
struct Reloader {
    /// The running configuration and the ids its routes' paths have. Only
    /// reloads use it (no gateway thread does).
    book: Mutex<RouteBook>,
    acceptor: Sender<AcceptorMsg>,
    /// Wakes the acceptor to read its inbox.
    wake: ShutdownHandle,
    manager: Sender<ManagerMsg>,
    stats: Arc<Stats>,
    /// The in-process publisher's upstream, if it feeds the route at
    /// [`Config::path`].
    publisher: Option<Arc<Upstream>>,
}

#[derive(Debug)]
struct RouteBook {
    config: Config,
    /// A route keeps its id while its path is served.
    ids: HashMap<String, RouteId>,
    next: u32,
}

/// Whether two configurations agree on one setting.
type SameSetting = fn(&Config, &Config) -> bool;

/// Gateway-wide settings a reload cannot change (the threads and sockets
/// they shape are made at start): each as its name and how to compare it.
const NEEDS_RESTART: &[(&str, SameSetting)] = &[
    ("listen", |a, b| a.listen == b.listen),
    ("reuse_port", |a, b| a.reuse_port == b.reuse_port),
    ("admin", |a, b| a.admin == b.admin),
    ("writers", |a, b| a.writers == b.writers),
    ("write_batch", |a, b| a.write_batch == b.write_batch),
    ("client_ping", |a, b| a.client_ping == b.client_ping),
    ("max_client_rate", |a, b| {
        a.max_client_rate == b.max_client_rate
    }),
    ("max_client_message", |a, b| {
        a.max_client_message == b.max_client_message
    }),
    ("slow_client", |a, b| a.slow_client == b.slow_client),
    ("slow_client_drops", |a, b| {
        a.slow_client_drops == b.slow_client_drops
    }),
    ("client_messages", |a, b| {
        a.client_messages == b.client_messages
    }),
    ("drain_timeout", |a, b| a.drain_timeout == b.drain_timeout),
];

impl ReloadHandle {
    /// Applies `config` to the running gateway without dropping clients:
    /// routes added start serving; routes removed close their clients with
    /// 1012 after what they have queued; a route whose upstream changed
    /// (URL, headers, init messages…) reconnects through new lobbies that
    /// its clients move to (gap-free where the two streams meet); other
    /// changes (capacities, limits, subprotocols…) apply to new clients.
    /// Gateway-wide settings that shape threads and sockets made at start
    /// (the listen address, the writers…) keep their running value, with a
    /// warning. A configuration that does not validate changes nothing: it
    /// is logged at error, counted in `reload_failures`, and returned.
    pub fn reload(&self, config: Config) -> Result<()> {
        let inner = &self.inner;
        let applied = config
            .validate_for(inner.publisher.is_some())
            .and_then(|()| self.apply(config));
        match &applied {
            Ok(()) => bump(&inner.stats.reloads),
            Err(e) => self.reject(&e.to_string()),
        }
        applied
    }

    /// Counts and logs a reload that failed before it could be applied (a
    /// config file that does not parse, say); the running configuration stays.
    pub fn reject(&self, why: &str) {
        bump(&self.inner.stats.reload_failures);
        error!("reload failed, keeping the running configuration: {why}");
    }

    fn apply(&self, config: Config) -> Result<()> {
        let inner = &self.inner;
        let mut book = inner
            .book
            .lock()
            .map_err(|_| Error::Config("a reload panicked; reload again".into()))?;
        let mut envs = Vec::new();
        let mut routes = Vec::new();
        for route in config.serving(inner.publisher.is_some()) {
            let id = match book.ids.get(&route.path) {
                Some(id) => *id,
                None => {
                    let id = RouteId(book.next);
                    book.next = book.next.saturating_add(1);
                    id
                }
            };
            envs.push(RouteEnv::new(id, route.clone(), inner.publisher.as_ref())?);
            routes.push((id, route));
        }
        for (name, same) in NEEDS_RESTART {
            if !same(&book.config, &config) {
                warn!("reload: {name} changes only with a restart; keeping the running value");
            }
        }
        let _ = inner.acceptor.send(AcceptorMsg::Reload {
            config: Box::new(config.clone()),
            routes: routes.clone(),
        });
        inner.wake.wake();
        let sent = inner.manager.send(ManagerMsg::Reload {
            routes: envs,
            config: Box::new(config.clone()),
        });
        if sent.is_err() {
            return Err(Error::Config("the gateway has stopped".into()));
        }
        info!("configuration reloaded: {} routes", routes.len());
        book.ids = routes.iter().map(|(id, r)| (r.path.clone(), *id)).collect();
        book.config = config;
        Ok(())
    }
}

/// Begins a gateway's graceful shutdown from any thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    /// Where `draining` is raised, before anything else happens.
    stats: Arc<Stats>,
}

impl ShutdownHandle {
    pub(crate) fn new(stop: Arc<AtomicBool>, waker: Waker, stats: Arc<Stats>) -> ShutdownHandle {
        ShutdownHandle {
            stop,
            waker: Arc::new(waker),
            stats,
        }
    }

    /// Begins the shutdown (see [`GatewayHandle::shutdown`]); returns at once.
    pub fn shutdown(&self) {
        // Readiness fails before the first client hears of the drain.
        self.stats.draining.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    /// Wakes the acceptor to look at its flags.
    pub(crate) fn wake(&self) {
        if let Err(e) = self.waker.wake() {
            error!("cannot wake the acceptor: {e}");
        }
    }
}

/// Asks the manager for its lobby list; `None` if it has stopped or does not
/// answer within `timeout`.
pub(crate) fn ask_lobbies(
    manager: &Sender<ManagerMsg>,
    timeout: Duration,
) -> Option<Vec<LobbyInfo>> {
    let (tx, rx) = bounded(1);
    manager.send(ManagerMsg::Inspect(tx)).ok()?;
    rx.recv_timeout(timeout).ok()
}
