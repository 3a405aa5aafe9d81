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
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Duration,
};

use crossbeam_channel::{Sender, bounded, unbounded};
use log::{error, info, warn};
use mio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};

#[cfg(feature = "auth")]
use crate::edge::auth::RouteAuth;
#[cfg(feature = "tls")]
use crate::edge::tls::ServerTls;
#[cfg(feature = "admin")]
use crate::ops::{
    admin::{self, AdminHandle, AdminToken},
    metrics::GatewayCollector,
};
use crate::{
    config::Config,
    control::{
        inbox::{self, ManagerMsg},
        shutdown::{OnStop, ShutdownHandle},
    },
    delivery::writer::{self, WriterHandle, WriterMsg},
    edge::acceptor::{self, AcceptorHandle, AcceptorMsg, Served},
    error::{Error, Result},
    fanout::{
        lobby::LobbyEnv,
        manager::{self, FORWARD_QUEUE, Inboxes},
    },
    id::RouteId,
    ops::health::{Health, Probes},
    source::{Publisher, Upstream, route::RouteEnv},
    stats::{LobbyInfo, Stats, StatsSnapshot, bump},
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
        let stats = Arc::new(Stats::default());
        let served = served(&routes, None, &stats)?;
        #[cfg(feature = "admin")]
        let admin_token = {
            let token = Arc::new(AdminToken::default());
            token.set(AdminToken::read(config.admin_token_file.as_deref())?);
            token
        };
        warn_unguarded(&routes);
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
        if let Some(publisher) = &publisher {
            publisher.hub().attach(&stats);
        }
        #[cfg(feature = "tls")]
        let tls = load_tls(&config, None, &stats)?;
        #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
        let (mut prepared, shutdown) =
            acceptor::prepare(listener, &config, &served, Arc::clone(&stats))?;
        #[cfg(feature = "tls")]
        let tls_addr = match config.tls_listen {
            Some(addr) => {
                let listener =
                    bind(addr, config.reuse_port).map_err(|source| Error::Bind { addr, source })?;
                let bound = listener
                    .local_addr()
                    .map_err(Error::io("read the wss:// listener address"))?;
                prepared.listen_tls(listener)?;
                Some(bound)
            }
            None => None,
        };
        #[cfg(feature = "tls")]
        prepared.serve_tls(tls.clone());
        let (manager_tx, manager_rx) = unbounded();
        let reload = ReloadHandle {
            inner: Arc::new(Reloader {
                book: Mutex::new(RouteBook {
                    ids: routes.iter().map(|(id, r)| (r.path.clone(), *id)).collect(),
                    next: u32::try_from(routes.len()).unwrap_or(u32::MAX),
                    config: config.clone(),
                    served,
                    #[cfg(feature = "tls")]
                    tls,
                }),
                acceptor: prepared.commands.clone(),
                wake: shutdown.clone(),
                #[cfg(feature = "admin")]
                admin_token: Arc::clone(&admin_token),
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
            history_bytes: config.history_bytes,
            replay: config.replay,
            compress_min: config.compress_min,
            #[cfg(feature = "sse")]
            id_salt: 0,
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
            #[cfg(feature = "tls")]
            tls_addr,
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
                token: Arc::clone(&admin_token),
            };
            // On failure the handle's drop stops what started.
            handle.admin = Some(admin::spawn(listener, sources)?);
        }
        Ok(handle)
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
    #[cfg(feature = "tls")]
    tls_addr: Option<SocketAddr>,
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

    /// The address `wss://` clients connect to where a second listener
    /// serves them ([`Config::tls_listen`]); `None` without one.
    #[cfg(feature = "tls")]
    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// A snapshot of the gateway's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// The current lobbies and their client counts, ordered by id. Empty if
    /// the gateway has stopped or its manager does not answer within `timeout`.
    pub fn lobbies(&self, timeout: Duration) -> Vec<LobbyInfo> {
        inbox::ask_lobbies(&self.manager_tx, timeout).unwrap_or_default()
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
    /// origin connection up after an attempt failed.
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
    /// The admin server's token, re-read from its file at each reload.
    #[cfg(feature = "admin")]
    admin_token: Arc<AdminToken>,
    manager: Sender<ManagerMsg>,
    stats: Arc<Stats>,
    /// The in-process publisher's upstream, if it feeds the route at
    /// [`Config::path`].
    publisher: Option<Arc<Upstream>>,
}

#[derive(Debug)]
struct RouteBook {
    config: Config,
    /// The routes as the acceptor serves them (their authentication, whose
    /// keys a reload that cannot read new ones keeps).
    served: Vec<Served>,
    /// A route keeps its id while its path is served.
    ids: HashMap<String, RouteId>,
    next: u32,
    /// The client listener's TLS, as the acceptor serves it.
    #[cfg(feature = "tls")]
    tls: Option<ServerTls>,
}

/// Gateway-wide settings a reload cannot change (the threads and sockets
/// they shape are made at start): each as its name, how to compare it, and
/// how to keep its running value in a new configuration.
macro_rules! needs_restart {
    ($($field:ident),* $(,)?) => {
        &[$((
            stringify!($field),
            |a: &Config, b: &Config| a.$field == b.$field,
            |new: &mut Config, running: &Config| new.$field.clone_from(&running.$field),
        )),*]
    };
}

/// A setting that needs a restart: its name, whether two configurations
/// agree on it, and how to keep the running one's value.
type RestartSetting = (
    &'static str,
    fn(&Config, &Config) -> bool,
    fn(&mut Config, &Config),
);

const NEEDS_RESTART: &[RestartSetting] = needs_restart!(
    listen,
    tls_listen,
    tls_threads,
    reuse_port,
    acceptor_nice,
    admin,
    writers,
    write_batch,
    client_ping,
    sse_heartbeat,
    max_client_rate,
    max_client_message,
    slow_client,
    slow_client_drops,
    client_messages,
    drain_timeout,
    auth_threads,
    auth_queue,
);

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

    fn apply(&self, mut config: Config) -> Result<()> {
        let inner = &self.inner;
        let mut book = inner
            .book
            .lock()
            .map_err(|_| Error::Config("a reload panicked; reload again".into()))?;
        // What runs keeps its value, so the next reload compares with it.
        for (name, same, keep) in NEEDS_RESTART {
            if !same(&book.config, &config) {
                warn!("reload: {name} changes only with a restart; keeping the running value");
                keep(&mut config, &book.config);
            }
        }
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
        let served = served(&routes, Some(&book.served), &inner.stats)?;
        warn_unguarded(&routes);
        #[cfg(feature = "admin")]
        match AdminToken::read(config.admin_token_file.as_deref()) {
            Ok(token) => inner.admin_token.set(token),
            Err(e) => {
                bump(&inner.stats.auth_key_failures);
                warn!("reload: {e}; keeping the running admin token");
            }
        }
        #[cfg(feature = "tls")]
        let tls = match load_tls(&config, book.tls.as_ref(), &inner.stats) {
            Ok(tls) => tls,
            Err(e) => {
                bump(&inner.stats.tls_reload_failures);
                warn!("reload: {e}; keeping the running certificates");
                config.tls_cert.clone_from(&book.config.tls_cert);
                config.tls_key.clone_from(&book.config.tls_key);
                config.tls.clone_from(&book.config.tls);
                book.tls.clone()
            }
        };
        let _ = inner.acceptor.send(AcceptorMsg::Reload {
            config: Box::new(config.clone()),
            routes: served.clone(),
            #[cfg(feature = "tls")]
            tls: tls.clone(),
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
        book.served = served;
        #[cfg(feature = "tls")]
        {
            book.tls = tls;
        }
        Ok(())
    }
}

/// The routes as the acceptor serves them, each with its authentication
/// loaded (its key files read). At a reload, `running` are the routes
/// served until now: a route whose keys cannot be read keeps its running
/// authentication, with a warning, counted in `auth_key_failures`; a new
/// route whose keys cannot be read fails the reload.
fn served(
    routes: &[(RouteId, Config)],
    running: Option<&[Served]>,
    stats: &Stats,
) -> Result<Vec<Served>> {
    routes
        .iter()
        .map(|(id, route)| {
            #[cfg(feature = "auth")]
            let auth = match RouteAuth::load(&route.auth) {
                Ok(auth) => auth.map(Arc::new),
                Err(e) => {
                    let kept = running.and_then(|r| r.iter().find(|s| s.id == *id));
                    let Some(kept) = kept else {
                        return Err(e);
                    };
                    bump(&stats.auth_key_failures);
                    warn!(
                        "reload: route {}: {e}; keeping its running keys",
                        route.path
                    );
                    kept.auth.clone()
                }
            };
            #[cfg(not(feature = "auth"))]
            let _ = (running, stats);
            Ok(Served {
                id: *id,
                config: route.clone(),
                #[cfg(feature = "auth")]
                auth,
            })
        })
        .collect()
}

/// The client listener's TLS from `config`'s certificates (`None` if it
/// has no default one); `running` lends its session ticket keys and cache.
/// Each certificate's expiry goes to `stats`.
#[cfg(feature = "tls")]
fn load_tls(
    config: &Config,
    running: Option<&ServerTls>,
    stats: &Stats,
) -> Result<Option<ServerTls>> {
    let tls = ServerTls::load(config, running)?;
    let expiry = tls.as_ref().map_or(&[][..], |tls| &tls.expiry[..]);
    for (name, at) in expiry {
        match at {
            Some(at) => {
                info!("serving wss:// with certificate {name} (expires at {at}, Unix time)")
            }
            None => warn!("serving wss:// with certificate {name}, whose expiry could not be read"),
        }
    }
    stats.tls_certificates.set(
        expiry
            .iter()
            .filter_map(|(name, at)| Some((name.clone(), (*at)?)))
            .collect(),
    );
    Ok(tls)
}

/// Warns about each route that sends its upstream credentials (an origin
/// header, a password in its URL) and admits anyone who reaches it.
fn warn_unguarded(routes: &[(RouteId, Config)]) {
    for (_, route) in routes {
        let credentials = !route.origin_headers.is_empty()
            || route
                .origin
                .split_once("://")
                .is_some_and(|(_, rest)| rest.split('/').next().is_some_and(|a| a.contains('@')));
        if credentials && !route.auth.is_enabled() {
            warn!(
                "route {}: sends credentials upstream and admits anyone who reaches the listener; \
                 set [auth] (a JWT key or an auth service) or keep the listener private",
                route.path
            );
        }
    }
}
