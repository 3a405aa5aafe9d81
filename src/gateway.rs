//! Starting and stopping a gateway: [`Gateway::start`] and [`GatewayHandle`].
//!
//! Start-up validates the configuration, binds the listener (so a busy port is
//! an error the caller sees), then spawns the writer pool, the manager (which
//! takes the writers and starts lobbies on demand) and the acceptor. Shutdown
//! runs down the same chain: the acceptor stops accepting and tells the
//! manager, which stops and joins the lobbies and then the writers. No thread
//! loop lives here.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crossbeam_channel::{Sender, bounded, unbounded};
use log::error;
use mio::{Waker, net::TcpListener};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    acceptor::{self, AcceptorHandle},
    admin::{self, AdminHandle},
    config::Config,
    error::{Error, Result},
    health::{Health, Probes},
    lobby::LobbyEnv,
    manager::{self, ManagerMsg},
    metrics::GatewayCollector,
    origin::OriginTarget,
    stats::{LobbyInfo, Stats, StatsSnapshot},
    writer::{self, WriterHandle, WriterMsg},
};

/// Entry point for running a gateway in this process.
#[derive(Debug)]
pub struct Gateway {
    _private: (),
}

impl Gateway {
    /// Validates `config`, binds the listener and starts every thread.
    ///
    /// Returns once the gateway accepts clients. Errors are configuration
    /// problems, a listener that cannot be bound, or threads that cannot start.
    pub fn start(config: Config) -> Result<GatewayHandle> {
        config.validate()?;
        let target = Arc::new(OriginTarget::from_config(&config)?);
        let listener = bind(config.listen).map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let local_addr = listener
            .local_addr()
            .map_err(Error::io("read the listener address"))?;
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
        let (manager_tx, manager_rx) = unbounded();

        let mut writers: Vec<WriterHandle> = Vec::with_capacity(config.writers);
        for index in 0..config.writers {
            match writer::spawn(index, &config, Arc::clone(&stats), manager_tx.clone()) {
                Ok(handle) => writers.push(handle),
                Err(e) => {
                    stop_writers(writers);
                    return Err(e);
                }
            }
        }
        let env = LobbyEnv {
            target,
            writers: writers.iter().map(WriterHandle::wake).collect(),
            stats: Arc::clone(&stats),
            manager: manager_tx.clone(),
            on_origin_loss: config.on_origin_loss,
            history: config.history_len(),
            history_keep: config.queue_depth.max(config.replay),
            replay: config.replay,
        };
        let (left_tx, left_rx) = unbounded();
        let manager = manager::spawn(&config, manager_rx, env, writers, left_tx)?;
        let acceptor = match acceptor::spawn(
            listener,
            &config,
            Arc::clone(&stats),
            manager_tx.clone(),
            left_rx,
        ) {
            Ok(acceptor) => acceptor,
            Err(e) => {
                let _ = manager_tx.send(ManagerMsg::Shutdown);
                join_manager(manager);
                return Err(e);
            }
        };
        let mut handle = GatewayHandle {
            local_addr,
            admin_addr: admin_listener.as_ref().map(|(_, addr)| *addr),
            probes: Probes::new(Arc::clone(&stats), &config),
            shutdown: acceptor.shutdown.clone().marking(Arc::clone(&stats)),
            stats,
            manager_tx,
            threads: Some((acceptor, manager)),
            admin: None,
        };
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

/// Pending connections the kernel may hold for the acceptor (it caps this at
/// `net.core.somaxconn`). Bursts of thousands of clients overflow the usual 128.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds the client listener with a backlog sized for connection bursts.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

fn stop_writers(writers: Vec<WriterHandle>) {
    for writer in &writers {
        writer.send(WriterMsg::Shutdown);
    }
    for writer in writers {
        writer.join();
    }
}

fn join_manager(manager: JoinHandle<()>) {
    if manager.join().is_err() {
        error!("the manager thread panicked");
    }
}

/// A running gateway. Dropping it shuts the gateway down and waits for it.
#[derive(Debug)]
pub struct GatewayHandle {
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    stats: Arc<Stats>,
    probes: Probes,
    shutdown: ShutdownHandle,
    manager_tx: Sender<ManagerMsg>,
    threads: Option<(AcceptorHandle, JoinHandle<()>)>,
    /// Stopped last, so it answers through the drain.
    admin: Option<AdminHandle>,
}

impl GatewayHandle {
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
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// A `prometheus_client` collector of the gateway's metrics, to add them
    /// to an embedding program's registry with [`crate::metrics::register`].
    pub fn metrics_collector(&self) -> GatewayCollector {
        GatewayCollector::new(Arc::clone(&self.stats))
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

    /// Waits until the gateway has stopped and every thread has ended, and
    /// returns its final counters. Blocks until [`shutdown`](Self::shutdown)
    /// is called if it was not.
    pub fn join(mut self) -> StatsSnapshot {
        self.join_threads();
        self.stats.snapshot()
    }

    fn join_threads(&mut self) {
        if let Some((acceptor, manager)) = self.threads.take() {
            acceptor.join();
            join_manager(manager);
        }
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

/// Begins a gateway's graceful shutdown from any thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    /// Where `draining` is raised, before anything else happens.
    stats: Option<Arc<Stats>>,
}

impl ShutdownHandle {
    pub(crate) fn new(stop: Arc<AtomicBool>, waker: Waker) -> ShutdownHandle {
        ShutdownHandle {
            stop,
            waker: Arc::new(waker),
            stats: None,
        }
    }

    /// The same handle, raising `stats.draining` first when it shuts down.
    pub(crate) fn marking(self, stats: Arc<Stats>) -> ShutdownHandle {
        ShutdownHandle {
            stats: Some(stats),
            ..self
        }
    }

    /// Begins the shutdown (see [`GatewayHandle::shutdown`]); returns at once.
    pub fn shutdown(&self) {
        // Readiness fails before the first client hears of the drain.
        if let Some(stats) = &self.stats {
            stats.draining.store(true, Ordering::SeqCst);
        }
        self.stop.store(true, Ordering::SeqCst);
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
