//! The fan-out: lobbies, and the manager that keeps them.
//!
//! The manager thread (`manager.rs`, `wsgate-manager`) places each admitted
//! client in a lobby by the registry's rules (`registry.rs`, pure
//! bookkeeping), starts and ends lobby threads, moves clients between them
//! and supervises every thread. Each lobby thread (`lobby.rs`,
//! `wsgate-lobby-N`) reads one source, encodes each message once, pushes
//! the shared frame into its members' queues and wakes their writers; it
//! remembers its last frames (`history.rs`) for migrations and late
//! joiners. Nothing here touches a client socket (`delivery/`).

pub(crate) mod history;
pub(crate) mod lobby;
pub(crate) mod manager;
pub(crate) mod registry;
