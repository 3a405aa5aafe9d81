//! What the gateway's threads share to work together: the manager's inbox
//! and what rides in it, a client's seat, the guard every thread ends
//! under, and the stop switch.
//!
//! Every thread talks to the manager and every thread's end is reported to
//! it, so these types live below all the threads (`edge/`, `fanout/`,
//! `delivery/`, `ops/`): a thread imports them, never another thread's
//! module, to speak to the manager. A [`Seat`](seat::Seat) is taken by the
//! acceptor and travels with its client to the manager and to a writer, so
//! it lives here too. No thread runs here.

pub(crate) mod inbox;
pub(crate) mod seat;
pub(crate) mod shutdown;
pub(crate) mod supervise;
