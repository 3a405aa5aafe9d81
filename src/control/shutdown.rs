//! The gateway's stop switch and what runs once it has stopped.
//!
//! [`ShutdownHandle`] is a flag and the acceptor's waker: raising it starts
//! the chain that stops every thread (the acceptor stops accepting, its end
//! reaches the manager, which stops the lobbies and drains the writers). The
//! acceptor makes it (`edge/acceptor.rs`), the gateway hands it out
//! ([`GatewayHandle::shutdown_handle`](crate::GatewayHandle::shutdown_handle)),
//! and the manager pulls it on a fatal failure; it lives here, below all
//! three. [`OnStop`] is the embedder's hook the manager drops last. No thread
//! runs here.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use log::error;
use mio::Waker;

use crate::stats::Stats;

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

    /// Begins the shutdown (see
    /// [`GatewayHandle::shutdown`](crate::GatewayHandle::shutdown));
    /// returns at once.
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

/// What to run once the gateway has stopped ([`Builder::on_stop`](crate::Builder::on_stop)): run
/// when dropped, which the manager does last.
pub(crate) struct OnStop(pub(crate) Option<Box<dyn FnOnce() + Send>>);

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
