//! The acceptor's side of auth requests: which upgrades wait for which
//! answer, and until when.
//!
//! [`Asking::ask`] answers an upgrade's question from the cache, joins it
//! to the same question already on its way, or hands it to the auth
//! threads (`pool.rs`), which it starts on first use; a full queue is
//! [`Asked::Overloaded`]. [`Asking::answered`] takes the threads' answers
//! and gives each waiting upgrade its outcome; [`Asking::expired`] those
//! whose route's timeout passed first. Upgrades are named by their slot in
//! the acceptor and their serial, so one that closed meanwhile is simply
//! not found. Runs on the acceptor thread only; it never blocks.

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    sync::Arc,
    time::Instant,
};

use crate::{
    control::shutdown::ShutdownHandle,
    edge::auth::{
        Denied, Question,
        cache::{self, Cache, Yes},
        pool::{Job, Pool, Verdict},
    },
    error::Result,
    stats::{AuthResult, Stats},
};

/// An upgrade waiting for an answer: its slot in the acceptor and serial.
pub(crate) type Waiter = (usize, u64);

/// What became of a question.
#[derive(Debug)]
pub(crate) enum Asked {
    /// A remembered yes covers it.
    Cached(Yes),
    /// Its answer will come through [`Asking::answered`] or
    /// [`Asking::expired`].
    Waiting,
    /// The auth threads' queue is full: 503 now.
    Overloaded,
}

/// A question on its way, and who waits for its answer.
#[derive(Debug)]
struct InFlight {
    question: Box<Question>,
    job: u64,
    waiters: Vec<Waiter>,
}

/// The acceptor's auth requests.
#[derive(Debug)]
pub(crate) struct Asking {
    pool: Option<Pool>,
    threads: usize,
    queue: usize,
    wake: ShutdownHandle,
    stats: Arc<Stats>,
    cache: Cache,
    /// Questions on their way, by what they ask.
    flights: HashMap<cache::Asked, InFlight>,
    /// Which question each job asked.
    jobs: HashMap<u64, cache::Asked>,
    next_job: u64,
    /// When each waiter's route stops waiting for it.
    deadlines: BinaryHeap<Reverse<(Instant, Waiter, u64)>>,
    /// The job each waiter waits on, to find its flight at its deadline.
    waiting: HashMap<Waiter, u64>,
}

impl Asking {
    /// Nothing asked yet; `threads` auth threads with a queue of `queue`
    /// start when the first question comes. Their answers wake the
    /// acceptor through `wake`.
    pub(crate) fn new(
        threads: usize,
        queue: usize,
        wake: ShutdownHandle,
        stats: Arc<Stats>,
    ) -> Asking {
        Asking {
            pool: None,
            threads,
            queue,
            wake,
            stats,
            cache: Cache::default(),
            flights: HashMap::new(),
            jobs: HashMap::new(),
            next_job: 0,
            deadlines: BinaryHeap::new(),
            waiting: HashMap::new(),
        }
    }

    /// Answers, joins or sends `question` for `waiter`, at `now` (Unix
    /// seconds `unix`).
    pub(crate) fn ask(
        &mut self,
        waiter: Waiter,
        question: Box<Question>,
        now: Instant,
        unix: u64,
        normalise: &impl Fn(&str) -> Option<Arc<str>>,
    ) -> Result<Asked> {
        if let Some(yes) = self.cache.get(&question, now, unix, normalise) {
            return Ok(Asked::Cached(yes));
        }
        let asked: cache::Asked = (
            question.key,
            question.path.clone(),
            question.lobby_key.clone(),
        );
        let deadline = now + question.timeout;
        if let Some(flight) = self.flights.get_mut(&asked) {
            flight.waiters.push(waiter);
            let job = flight.job;
            self.wait(waiter, deadline, job);
            return Ok(Asked::Waiting);
        }
        if self.pool.is_none() {
            self.pool = Some(Pool::spawn(
                self.threads,
                self.queue,
                self.wake.clone(),
                Arc::clone(&self.stats),
            )?);
        }
        let job = self.next_job;
        self.next_job += 1;
        let Some(pool) = &self.pool else {
            return Ok(Asked::Overloaded);
        };
        if pool
            .ask(Job {
                id: job,
                question: question.clone(),
            })
            .is_err()
        {
            return Ok(Asked::Overloaded);
        }
        self.jobs.insert(job, asked.clone());
        self.flights.insert(
            asked,
            InFlight {
                question,
                job,
                waiters: vec![waiter],
            },
        );
        self.wait(waiter, deadline, job);
        Ok(Asked::Waiting)
    }

    fn wait(&mut self, waiter: Waiter, deadline: Instant, job: u64) {
        self.deadlines.push(Reverse((deadline, waiter, job)));
        self.waiting.insert(waiter, job);
    }

    /// The answers that came: each waiting upgrade with its outcome (the
    /// yes, or why not). Yeses are remembered.
    pub(crate) fn answered(
        &mut self,
        now: Instant,
        unix: u64,
    ) -> Vec<(Waiter, Result<Yes, Denied>)> {
        let mut out = Vec::new();
        let answers: Vec<_> = match &self.pool {
            Some(pool) => pool.answers().collect(),
            None => return out,
        };
        for answer in answers {
            let Some(asked) = self.jobs.remove(&answer.id) else {
                continue;
            };
            let Some(flight) = self.flights.remove(&asked) else {
                continue;
            };
            let outcome = match answer.verdict {
                Verdict::Yes(yes) => {
                    self.cache.put(&flight.question, &yes, now, unix);
                    Ok(yes)
                }
                Verdict::No(status) => Err(Denied {
                    result: AuthResult::Denied,
                    status,
                    why: if status == 401 {
                        "the auth service asks for credentials"
                    } else {
                        "the auth service refused"
                    },
                }),
                Verdict::Error => Err(Denied {
                    result: AuthResult::Error,
                    status: 503,
                    why: "the auth service failed",
                }),
                Verdict::Timeout => Err(Denied {
                    result: AuthResult::Timeout,
                    status: 503,
                    why: "the auth service did not answer in time",
                }),
            };
            for waiter in flight.waiters {
                if self.waiting.get(&waiter) == Some(&answer.id) {
                    self.waiting.remove(&waiter);
                    out.push((waiter, outcome.clone()));
                }
            }
        }
        out
    }

    /// Upgrades whose route's timeout passed before their answer came. The
    /// question stays on its way for the others waiting on it.
    pub(crate) fn expired(&mut self, now: Instant) -> Vec<Waiter> {
        let mut out = Vec::new();
        while let Some(Reverse((at, waiter, job))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if self.waiting.get(&waiter) == Some(&job) {
                self.waiting.remove(&waiter);
                out.push(waiter);
            }
        }
        out
    }

    /// Forgets an upgrade that ended while it waited (closed, shed).
    pub(crate) fn forget(&mut self, waiter: Waiter) {
        self.waiting.remove(&waiter);
    }

    /// The next instant a waiting upgrade times out.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|Reverse((at, ..))| *at)
    }
}
