//! Fault injection for the supervision tests (cargo feature
//! `fault-injection`, which only the test build turns on): arm a fault and
//! the next thread of that kind to reach its check panics. Each gateway has
//! its own set, so tests running side by side do not disturb each other.
//! Nothing here exists in a normal build.

use std::sync::atomic::{AtomicBool, Ordering};

/// A kind of gateway thread to make panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The acceptor, at its next wake-up (a new connection, say).
    Acceptor,
    /// The manager, at its next message.
    Manager,
    /// A writer, at its next wake-up (its timer ticks every 250 ms while it
    /// has clients).
    Writer,
    /// A lobby, at its next wake-up (an origin message, say).
    Lobby,
    /// A lobby's origin name resolution: it takes 30 s (it does not panic).
    SlowResolve,
}

/// The armed faults of one gateway.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    armed: [AtomicBool; 5],
}

impl Faults {
    /// Arms `fault`: the next check for it fires.
    pub(crate) fn arm(&self, fault: Fault) {
        self.armed[fault as usize].store(true, Ordering::SeqCst);
    }

    /// Whether `fault` was armed, disarming it.
    pub(crate) fn take(&self, fault: Fault) -> bool {
        self.armed[fault as usize].swap(false, Ordering::SeqCst)
    }

    /// Panics if `fault` is armed.
    pub(crate) fn check(&self, fault: Fault) {
        if self.take(fault) {
            panic!("injected fault: {fault:?}");
        }
    }
}
