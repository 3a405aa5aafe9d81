//! Identifiers threads use to name clients, lobbies, routes and groups of
//! lobbies in their messages.

use std::{fmt, sync::Arc};

/// A client, unique for the gateway's lifetime. Assigned by the manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

/// A lobby, unique for the gateway's lifetime. Assigned by the manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LobbyId(pub u32);

/// A route (a path clients connect to, and its upstream), unique for the
/// gateway's lifetime: a route changed by a reload keeps its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteId(pub u32);

/// The lobbies a client may share: those of its route and query key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Group {
    pub route: RouteId,
    /// The normalised query string, for a route whose lobbies are keyed by
    /// it; `None` otherwise.
    pub key: Option<Arc<str>>,
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client-{}", self.0)
    }
}

impl fmt::Display for LobbyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lobby-{}", self.0)
    }
}
