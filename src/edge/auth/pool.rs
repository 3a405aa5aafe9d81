//! The auth threads (`wsgate-auth-N`): a small pool that asks auth services
//! about upgrades, so the acceptor never waits on one.
//!
//! The acceptor hands each [`Job`] over a bounded channel and, when it is
//! full, answers 503 at once ([`Pool::ask`] gives the job back). Each
//! thread takes a job, sends the question with a blocking HTTP client that
//! keeps connections to the service alive (ureq, one agent shared by the
//! threads), bounded by the route's timeout, and sends the [`Answer`] back,
//! waking the acceptor. 2xx is a yes (with what the `X-Wsgate-Expires` and
//! `X-Wsgate-Allow` response headers add), 401 and 403 are a no passed on
//! to the client, anything else or no answer in time fails closed. The
//! threads end when the acceptor drops the pool: it closes the job channel
//! and joins them, each within its current request's timeout.

use std::{
    io::Read,
    sync::Arc,
    thread::{self, JoinHandle},
    time::Instant,
};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded, unbounded};
use log::{debug, error};

use crate::{
    control::shutdown::ShutdownHandle,
    edge::auth::{Question, cache::Yes},
    error::{Error, Result},
    stats::Stats,
};

/// Most bytes of an auth service's response body read (and discarded, so
/// the connection can carry the next question).
const MAX_BODY: u64 = 16 * 1024;
/// The response headers that add to a yes.
const EXPIRES: &str = "x-wsgate-expires";
const ALLOW: &str = "x-wsgate-allow";

/// One upgrade's question, and which upgrade asked it.
#[derive(Debug)]
pub(crate) struct Job {
    pub id: u64,
    pub question: Box<Question>,
}

/// What the auth service said about job `id`.
#[derive(Debug)]
pub(crate) struct Answer {
    pub id: u64,
    pub verdict: Verdict,
}

/// An auth service's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// 2xx.
    Yes(Yes),
    /// 401 or 403, passed on.
    No(u16),
    /// Another status, or the service could not be reached: fails closed.
    Error,
    /// No answer within the route's timeout: fails closed.
    Timeout,
}

/// The auth threads, as the acceptor holds them.
#[derive(Debug)]
pub(crate) struct Pool {
    jobs: Option<Sender<Job>>,
    answers: Receiver<Answer>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `threads` auth threads taking at most `queue` waiting jobs;
    /// their answers wake the acceptor through `acceptor`.
    pub(crate) fn spawn(
        threads: usize,
        queue: usize,
        acceptor: ShutdownHandle,
        stats: Arc<Stats>,
    ) -> Result<Pool> {
        let (jobs, inbox) = bounded::<Job>(queue);
        let (answer, answers) = unbounded();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_idle_connections(threads.max(1) * 2)
            .max_idle_connections_per_host(threads.max(1) * 2)
            .max_response_header_size(16 * 1024)
            .user_agent("wsgate")
            .build()
            .new_agent();
        let mut pool = Pool {
            jobs: Some(jobs),
            answers,
            threads: Vec::new(),
        };
        for index in 0..threads {
            let inbox = inbox.clone();
            let answer = answer.clone();
            let agent = agent.clone();
            let acceptor = acceptor.clone();
            let stats = Arc::clone(&stats);
            let thread = thread::Builder::new()
                .name(format!("wsgate-auth-{index}"))
                .spawn(move || {
                    for job in inbox {
                        let started = Instant::now();
                        let verdict = ask(&agent, &job.question);
                        stats.auth_latency.record(started.elapsed());
                        if answer
                            .send(Answer {
                                id: job.id,
                                verdict,
                            })
                            .is_err()
                        {
                            break;
                        }
                        acceptor.wake();
                    }
                })
                .map_err(Error::io("spawn an auth thread"))?;
            pool.threads.push(thread);
        }
        Ok(pool)
    }

    /// Queues a job; gives it back when the queue is full (the upgrade
    /// gets 503) or the threads are gone.
    pub(crate) fn ask(&self, job: Job) -> std::result::Result<(), Job> {
        let Some(jobs) = &self.jobs else {
            return Err(job);
        };
        jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
        })
    }

    /// The answers that came since the last call.
    pub(crate) fn answers(&self) -> impl Iterator<Item = Answer> + '_ {
        self.answers.try_iter()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the channel ends each thread after its current request.
        self.jobs = None;
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                error!("an auth thread panicked");
            }
        }
    }
}

/// Asks the service one question, within its timeout.
fn ask(agent: &ureq::Agent, question: &Question) -> Verdict {
    let mut request = agent
        .get(&*question.url)
        .config()
        .timeout_global(Some(question.timeout))
        .build();
    for (name, value) in &question.headers {
        request = request.header(name, value);
    }
    request = request.header(&question.client_header, &question.peer);
    let response = match request.call() {
        Ok(response) => response,
        Err(ureq::Error::Timeout(_)) => return Verdict::Timeout,
        Err(e) => {
            debug!("auth service {}: {e}", question.url);
            return Verdict::Error;
        }
    };
    let status = response.status().as_u16();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let verdict = match status {
        200..=299 => Verdict::Yes(Yes {
            expires: header(EXPIRES).and_then(|v| v.trim().parse().ok()),
            allowed: header(ALLOW).map(|v| {
                v.split(',')
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty())
                    .collect()
            }),
        }),
        401 | 403 => Verdict::No(status),
        _ => {
            debug!("auth service {}: answered {status}", question.url);
            Verdict::Error
        }
    };
    // Read the rest of the body so the connection can be kept; a body
    // above the bound, or that fails, only costs the connection.
    let mut body = response.into_body();
    let mut sink = Vec::new();
    let _ = body
        .with_config()
        .limit(MAX_BODY)
        .reader()
        .take(MAX_BODY)
        .read_to_end(&mut sink);
    verdict
}
