//! Every gateway thread's end is reported: the guard each one runs under.
//!
//! An [`EndGuard`] lives on a thread's stack; when the thread ends, by
//! returning or by panicking, its drop counts the panic and tells the
//! manager ([`ManagerMsg::ThreadEnded`]), which decides
//! (`fanout/manager.rs`): a lobby's clients are re-placed in other lobbies;
//! the acceptor's end, or a writer's end outside a shutdown, shuts the
//! gateway down. A writer catches its own panics and recovers in place
//! (`delivery/writer.rs`), and the manager catches its own and shuts down,
//! so their guards report only what could not be caught. The acceptor, the
//! lobbies and the writers all run under one, so it lives below them.

use std::{sync::Arc, sync::atomic::Ordering::Relaxed, thread};

use crossbeam_channel::Sender;
use log::error;

use crate::{
    control::inbox::{ManagerMsg, ThreadKind},
    id::LobbyId,
    stats::{Stats, bump},
};

/// Reports its thread's end to the manager, however the thread ends.
#[derive(Debug)]
pub(crate) struct EndGuard {
    kind: ThreadKind,
    manager: Sender<ManagerMsg>,
    stats: Arc<Stats>,
}

impl EndGuard {
    /// A guard for the acceptor thread.
    pub(crate) fn acceptor(manager: Sender<ManagerMsg>, stats: Arc<Stats>) -> EndGuard {
        EndGuard {
            kind: ThreadKind::Acceptor,
            manager,
            stats,
        }
    }

    /// A guard for writer thread `index`.
    pub(crate) fn writer(index: usize, manager: Sender<ManagerMsg>, stats: Arc<Stats>) -> EndGuard {
        EndGuard {
            kind: ThreadKind::Writer(index),
            manager,
            stats,
        }
    }

    /// A guard for a lobby thread; it also keeps the lobby gauges (counted
    /// up here, down when the guard drops, whether or not the thread started).
    pub(crate) fn lobby(id: LobbyId, manager: Sender<ManagerMsg>, stats: Arc<Stats>) -> EndGuard {
        stats.lobbies.fetch_add(1, Relaxed);
        bump(&stats.lobbies_started);
        EndGuard {
            kind: ThreadKind::Lobby(id),
            manager,
            stats,
        }
    }
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        let panicked = thread::panicking();
        if panicked {
            bump(&self.stats.thread_panics);
            error!("{} panicked", self.kind);
        }
        if let ThreadKind::Lobby(_) = self.kind {
            self.stats.lobbies.fetch_sub(1, Relaxed);
            bump(&self.stats.lobbies_ended);
        }
        // A closed inbox: the manager has ended, and with it the gateway.
        let _ = self.manager.send(ManagerMsg::ThreadEnded {
            thread: self.kind,
            panicked,
        });
    }
}
