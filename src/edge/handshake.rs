//! The TLS handshake threads (`wsgate-tls-N`): where a `wss://` client's
//! handshake spends its CPU when many are pending, so that a storm of TLS
//! reconnects runs on every core rather than on the acceptor's one. (With
//! few pending, the acceptor does them itself: a hand-over costs two
//! thread wakeups.) They start with the first hand-over.
//!
//! The acceptor reads a handshaking client's records into its session
//! (`wire/tls.rs`, [`receive`](crate::wire::tls::receive)) and hands the
//! session here as a [`Job`] until the session has answered once; a
//! thread processes the records (for a ClientHello: the certificate's
//! choice, a key exchange and a signature, hundreds of microseconds) and
//! sends the session back as [`Done`], waking the acceptor (once for every
//! session it has not taken yet), which writes what the session answers
//! and goes on with the connection. The client's next flight (a TLS 1.3
//! Finished: a MAC; TLS 1.2's key exchange) is processed on the acceptor,
//! which saves a second hand-over per handshake. The
//! socket never leaves the acceptor, so its deadline, the pending-handshake
//! cap and the per-address seats hold as before; a connection closed while
//! its session is away has its session dropped when it comes back. A
//! handshaking connection has at most one job out, so the jobs waiting are
//! bounded by the pending-handshake cap. The threads run at the acceptor's
//! nice value (`acceptor_nice`), below the fan-out when it is raised, and
//! end when the acceptor drops the pool: it closes the job channel and
//! joins them, each after its current job. Nothing here touches a socket.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
};

use crossbeam_channel::{Receiver, Sender, unbounded};
use log::{error, warn};

use crate::{
    control::shutdown::ShutdownHandle,
    edge::sys,
    error::{Error, Result},
    wire::tls::{self, Session},
};

/// A handshaking session whose received records wait to be processed.
#[derive(Debug)]
pub(crate) struct Job {
    /// The connection's slot in the acceptor.
    pub index: usize,
    /// The connection's serial: a slot reused meanwhile is another one.
    pub serial: u64,
    pub session: Session,
}

/// A job's session, its records processed.
#[derive(Debug)]
pub(crate) struct Done {
    pub index: usize,
    pub serial: u64,
    pub session: Session,
    /// `InvalidData`: the client broke the handshake (the alert waits in
    /// the session).
    pub result: io::Result<()>,
}

/// The handshake threads, as the acceptor holds them.
#[derive(Debug)]
pub(crate) struct Handshakers {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    /// A wake of the acceptor is pending: the threads wake it once for all
    /// the sessions it has not taken yet, not once each.
    woken: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Handshakers {
    /// Starts `threads` handshake threads, lowered by `nice`; the jobs
    /// they finish wake the acceptor through `acceptor` (once for all those
    /// it has not taken yet).
    pub(crate) fn spawn(threads: usize, nice: u8, acceptor: ShutdownHandle) -> Result<Handshakers> {
        let (jobs, inbox) = unbounded::<Job>();
        let (finished, done) = unbounded();
        let woken = Arc::new(AtomicBool::new(false));
        let mut pool = Handshakers {
            jobs: Some(jobs),
            done,
            woken: Arc::clone(&woken),
            threads: Vec::new(),
        };
        for index in 0..threads {
            let inbox = inbox.clone();
            let finished = finished.clone();
            let acceptor = acceptor.clone();
            let woken = Arc::clone(&woken);
            let thread = thread::Builder::new()
                .name(format!("wsgate-tls-{index}"))
                .spawn(move || {
                    if nice > 0 {
                        if let Err(e) = sys::lower_thread_priority(nice) {
                            warn!("TLS handshake thread: cannot lower its priority: {e}");
                        }
                    }
                    for mut job in inbox {
                        let result = tls::process(&mut job.session);
                        let done = Done {
                            index: job.index,
                            serial: job.serial,
                            session: job.session,
                            result,
                        };
                        if finished.send(done).is_err() {
                            break;
                        }
                        if !woken.swap(true, Ordering::AcqRel) {
                            acceptor.wake();
                        }
                    }
                })
                .map_err(Error::io("spawn a TLS handshake thread"))?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    /// Hands a session over; gives it back when every thread is gone (it
    /// is then processed on the acceptor).
    pub(crate) fn send(&self, job: Job) -> std::result::Result<(), Job> {
        match &self.jobs {
            Some(jobs) => jobs.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }

    /// The sessions processed since the last call (a session sent back
    /// after this call begins wakes the acceptor again).
    pub(crate) fn done(&self) -> impl Iterator<Item = Done> + '_ {
        self.woken.store(false, Ordering::Release);
        self.done.try_iter()
    }
}

impl Drop for Handshakers {
    fn drop(&mut self) {
        // Closing the channel ends each thread after its current job.
        self.jobs = None;
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                error!("a TLS handshake thread panicked");
            }
        }
    }
}
