//! The manager's inbox, and what rides in it.
//!
//! Every thread reports to the manager (`fanout/manager.rs`): the acceptor
//! admits upgraded clients, writers report departures and forward client
//! messages, lobbies release moving clients, every thread's guard reports
//! its end (`supervise.rs`), and the gateway, the admin thread and the
//! metrics collector ask for the lobby list. So the manager's message types
//! live here, below all of those threads, and none of them imports another
//! thread's module to talk to the manager. The inboxes of the lobby and
//! writer threads, which only the manager sends to, stay beside their
//! threads. Nothing here runs on a thread of its own.

use std::{fmt, net::SocketAddr, time::Duration};

use crossbeam_channel::{Sender, bounded};
use mio::net::TcpStream;

#[cfg(feature = "tls")]
use crate::wire::tls::Session;
use crate::{
    config::Config,
    control::seat::Seat,
    id::{ClientId, Group, LobbyId},
    source::route::RouteEnv,
    stats::LobbyInfo,
    wire::frame::MessageKind,
};

/// The manager's inbox.
#[derive(Debug)]
pub(crate) enum ManagerMsg {
    /// An upgraded client, from the acceptor (which has taken its seat).
    Admit(Admission),
    /// A writer dropped this client's connection.
    Departed(ClientId),
    /// A lobby let a moving client go; this is where it was in the stream.
    Released { id: ClientId, resume: Resume },
    /// A lobby asked to warm up has its upstream's stream under way: the
    /// clients waiting to move into it can move without a gap.
    Warmed(LobbyId),
    /// A thread ended, whether asked to or by panic.
    ThreadEnded { thread: ThreadKind, panicked: bool },
    /// A new configuration: these routes (new ones, changed ones and
    /// unchanged ones), and the gateway-wide settings in `config`.
    Reload {
        routes: Vec<RouteEnv>,
        config: Box<Config>,
    },
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
    /// The lobbies it may join: its route's, and its query key's.
    pub group: Group,
    /// It negotiated permessage-deflate.
    pub deflate: bool,
    /// It asked for Server-Sent Events (feature `sse`), not a WebSocket.
    pub sse: bool,
    /// A WebSocket client that opted into resume: it takes the envelope form.
    pub envelope: bool,
    /// The message ID it saw last (its `Last-Event-ID`): its lobby sends
    /// it what followed, from its history.
    pub after: Option<u64>,
    /// When its access ends (its token's expiry), in seconds since the Unix
    /// epoch; its writer closes it then.
    pub expires: Option<u64>,
    /// Its TLS session, past the handshake, for a `wss://` client.
    #[cfg(feature = "tls")]
    pub tls: Option<Session>,
}

/// A client's message for the origin, from its writer (over a bounded
/// channel apart from the inbox).
#[derive(Debug)]
pub(crate) struct ClientMessage {
    pub id: ClientId,
    pub message: Forwarded,
}

/// Which thread a guard watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ThreadKind {
    Acceptor,
    Writer(usize),
    Lobby(LobbyId),
}

impl fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThreadKind::Acceptor => f.write_str("the acceptor"),
            ThreadKind::Writer(index) => write!(f, "writer {index}"),
            ThreadKind::Lobby(id) => write!(f, "{id}"),
        }
    }
}

/// Where a migrating client is in the stream: the fingerprints of the last
/// frames queued for it, oldest first (at most the history's `RESUME_RUN`,
/// `fanout/history.rs`; empty if none).
pub(crate) type Resume = Vec<u64>;

/// A client's message for the origin, on its way through its lobby.
#[derive(Debug)]
pub(crate) struct Forwarded {
    pub kind: MessageKind,
    pub payload: Vec<u8>,
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
